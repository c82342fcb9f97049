"""DMU configuration (``cfg.dmu``, read by ``python -m trainer.dmu``); no torch import.

The rest of the config describes the FINAL model (the MoE towers: which blocks, E, top-k, aux
losses), the data and the parallel layout shared by every DMU phase; ``train.*`` is the router
phase's schedule unless ``dmu.router`` overrides it. Expert 0 is the dense checkpoint's FFN and
experts 1..E-1 come from the E-1 multistage-contrastive (MCL) stages, so the MoE towers must
agree on ``num_experts``.
"""
from __future__ import annotations

from dataclasses import dataclass, field


class DMUConfigError(ValueError):
    pass


CLUSTER_ON = ("both", "image", "text")


@dataclass
class DMUConfig:
    dense: str = ""            # the dense checkpoint: expert 0 and every stage's starting point
    # Before stage k the stage k-1 model embeds the training set; k-means splits the image and
    # the text embeddings into `clusters` groups each (CLIP-MoE's code: 3 per modality, the
    # label is text * clusters + image) and the label joins the sample's accumulated labels.
    clusters: int = 3
    cluster_on: str = "both"   # both | image | text
    kmeans_iters: int = 100    # Lloyd iterations at most (stops earlier when no label changes)
    # key=value overrides (the trainer's syntax) for the MCL stages and for the router phase,
    # applied on top of this config: e.g. ["train.steps=2000", "train.lr=1.0e-5"].
    stage: list[str] = field(default_factory=list)
    router: list[str] = field(default_factory=list)   # overrides for the router phase

    def validate(self, key: str) -> None:
        if self.clusters < 1:
            raise DMUConfigError(f"{key}.clusters={self.clusters} must be >= 1")
        if self.kmeans_iters < 1:
            raise DMUConfigError(f"{key}.kmeans_iters={self.kmeans_iters} must be >= 1")
        if self.cluster_on not in CLUSTER_ON:
            raise DMUConfigError(f"{key}.cluster_on={self.cluster_on!r}: expected one of "
                                 f"{', '.join(CLUSTER_ON)}")
        for name in ("stage", "router"):
            for i, item in enumerate(getattr(self, name)):
                if "=" not in item:
                    raise DMUConfigError(f"{key}.{name}[{i}]={item!r} is not of the form "
                                         "key.sub=value")

    @property
    def groups_per_stage(self) -> int:
        """How many clusters one stage's k-means adds (per accumulated group)."""
        return self.clusters ** 2 if self.cluster_on == "both" else self.clusters
