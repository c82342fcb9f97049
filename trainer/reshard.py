"""A training checkpoint read whole (``read_checkpoint``: the Source that export and the tools
use), and resharding a checkpoint to another TP/PP/EP layout.

    src = read_checkpoint(path, layout)         # collective; any world size at tp = pp = ep = 1
    reshard(path, out_root, layout, cfg)        # collective, at the target layout
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer import checkpoint
from trainer.checkpoint import CheckpointError
from trainer.config import Config, ConfigError, from_dict
from trainer.distributed.collectives import all_gather_object, on_rank0
from trainer.distributed.layout import ParallelLayout
from trainer.hub import mismatch_report
from trainer.models.build import build_for_training, build_model
from trainer.models.state import full_state_dict
from trainer.optim import build_optimizer


@dataclass
class Source:
    """A training checkpoint in canonical names (trainer/models/state.py), on CPU."""
    path: Path                     # the resolved checkpoint directory
    manifest: dict
    cfg: Config                    # as saved; cfg.model describes ``full``
    full: dict[str, torch.Tensor]  # owned copies
    model: torch.nn.Module         # UpCLIP at tp = pp = ep = 1 holding ``full`` (eval mode)
    merged_from: torch.nn.Module | None = None  # the MoE model, after merge_experts


def saved_config(manifest: dict, where: Path) -> Config:
    """The resolved config a checkpoint was saved with."""
    try:
        cfg = from_dict(Config, manifest["config"])
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{where / 'manifest.json'}: config: "
                              f"{str(e).strip(chr(39))}") from None
    validate(cfg, where)
    return cfg


def validate(cfg: Config, where: Path) -> None:
    """Config.validate, except that files of the training run (checkpoint.load /
    upcycle_from, router aux-loss inputs) need not exist here."""
    check = copy.deepcopy(cfg)
    check.checkpoint.load = check.checkpoint.upcycle_from = ""
    for tower in (check.model.vision, check.model.text):
        tower.moe.aux = type(tower.moe.aux)()
    try:
        check.validate()
    except ConfigError as e:
        raise CheckpointError(f"{where / 'manifest.json'}: config: {e}") from None


def tensor_shapes(directory: Path) -> dict[str, tuple]:
    """Global shape of every ShardedTensor in a torch_dist directory."""
    from megatron.core import dist_checkpointing
    return {k: tuple(t.global_shape)
            for k, t in dist_checkpointing.load_tensors_metadata(str(directory)).items()}


def check_sharded_keys(model: torch.nn.Module, directory: Path, metadata: dict) -> None:
    """Collective: the model's sharded tensors (all ranks together) against those saved in
    ``directory``; raises CheckpointError listing missing / unexpected / wrongly-shaped keys."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    mine = {t.key: tuple(t.global_shape)
            for t in nested_values(model.sharded_state_dict(metadata=dict(metadata)))
            if isinstance(t, ShardedTensor)}
    wanted: dict = {}
    for part in all_gather_object(mine):
        wanted.update(part)
    report = mismatch_report(wanted, tensor_shapes(directory))
    if report:
        raise CheckpointError(f"{directory}: does not fit the model of its manifest's config "
                              f"(missing = the model has, the checkpoint lacks): {report}")


def read_checkpoint(path: str | Path, layout: ParallelLayout) -> Source:
    """Collective (``layout``: tp = pp = ep = 1, any world size). Verifies the checkpoint's
    checksums and keys, then gathers every weight."""
    ckpt = checkpoint.resolve(path)
    manifest = checkpoint.read_manifest(ckpt)
    cfg = saved_config(manifest, ckpt)
    model = build_model(cfg.model, layout, inference=True)
    check_sharded_keys(model, ckpt / "model",
                       manifest.get("sharded_metadata", checkpoint.SHARDED_METADATA))
    checkpoint.load_model(ckpt, model, layout)  # checksums first
    full = {k: v.clone() for k, v in full_state_dict(model, layout).items()}
    return Source(ckpt, manifest, cfg, full, model.eval())


def reshard(path: str | Path, out_root: Path, layout: ParallelLayout, cfg: Config) -> Path:
    """Collective, at the target ``layout`` (``cfg.parallel`` matching it): the checkpoint's
    weights, AdamW moments and step counts and train_state, saved again as ``layout``
    shards with ``cfg`` in the manifest. Per-rank state (RNG, data position) is kept only
    when the world layout is unchanged; otherwise training resumes without it (as it does
    when restarted at another layout)."""
    ckpt = checkpoint.resolve(path)
    manifest = checkpoint.read_manifest(ckpt)
    metadata = manifest.get("sharded_metadata", checkpoint.SHARDED_METADATA)
    model = build_for_training(cfg, layout)
    check_sharded_keys(model, ckpt / "model", metadata)
    optimizer = None
    if manifest.get("optimizer") and (ckpt / "optimizer").is_dir():
        optimizer = build_optimizer(model, cfg.train)
    _, rank_state = checkpoint.load_checkpoint(ckpt, model, layout, optimizer=optimizer)
    extra = dict(manifest.get("extra") or {}, resharded_from=str(ckpt),
                 resharded_from_layout=manifest["layout"])
    out = checkpoint.save_checkpoint(out_root, manifest["step"], model, dataclasses.asdict(cfg),
                                     layout, extra=extra, optimizer=optimizer,
                                     train_state=manifest.get("train_state"),
                                     rank_state=rank_state)

    def check_output() -> None:
        checkpoint.verify(out)
        for sub in ("model", "optimizer") if optimizer is not None else ("model",):
            report = mismatch_report(tensor_shapes(ckpt / sub), tensor_shapes(out / sub))
            if report:
                raise CheckpointError(f"{out / sub}: tensors differ from {ckpt / sub}: {report}")

    on_rank0(check_output, error_type=CheckpointError)
    return out
