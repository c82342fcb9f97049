"""README.md of an MoE export (``tools/convert_checkpoint.py export --to moe``): what the model
is, how to load it (transformers with the shipped modeling file, or trainer/hub.py), its
preprocessing and tokenizer, where it came from (the checkpoint, its step, layout and the
library versions it was trained with) and its resolved config."""
from __future__ import annotations

import dataclasses
import datetime
import json

from trainer.checkpoint import versions
from trainer.config import Config, TowerConfig


def _tower(name: str, t: TowerConfig, extra: str) -> str:
    line = (f"- {name}: {t.layers} blocks, width {t.width}, {t.heads} heads, MLP ratio "
            f"{t.mlp_ratio:g}, {t.act}{extra}")
    moe = t.moe
    if moe.enabled:
        layers = moe.moe_layers(t.layers)
        line += (f"; MoE at blocks {layers}: {moe.num_experts} experts, top-{moe.top_k}, "
                 f"{moe.routing} routing, "
                 + ("dropless" if moe.dropless else
                    f"eval capacity factor {moe.eval_capacity_factor:g}"))
    return line


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M UTC")


def _versions(v: dict) -> str:
    return ", ".join(f"{k} {v[k]}" for k in sorted(v)) or "unknown"


def model_card(cfg: Config, manifest: dict, source: dict, preprocess: dict) -> str:
    """The card's Markdown. ``source``: config.json's "source" (checkpoint path, step,
    merged_experts); ``manifest``: the checkpoint's manifest.json."""
    m, state = cfg.model, manifest.get("train_state") or {}
    kind = "Mixture-of-Experts" if m.vision.moe.enabled or m.text.moe.enabled else "dense"
    layout = manifest.get("layout") or {}
    rows = [
        ("checkpoint", f"`{source['checkpoint']}`"),
        ("step", str(source["step"])),
        ("samples seen", str(state.get("consumed_samples", "unknown"))),
        ("saved", _when(manifest.get("time"))),
        ("layout", ", ".join(f"{k}={layout[k]}" for k in ("world_size", "tp", "pp", "dp", "ep")
                             if k in layout) or "unknown"),
        ("experts merged", "yes (lossy: experts averaged)" if source.get("merged_experts")
         else "no"),
        ("trained with", _versions(manifest.get("versions") or {})),
        ("exported with", _versions(versions())),
    ]
    tok = cfg.data.tokenizer
    train = {k: v for k, v in dataclasses.asdict(cfg.train).items()
             if k not in ("progress_bar", "tensorboard")}
    return "\n".join([
        "---",
        "library_name: transformers",
        "tags: [clip, upclip, custom_code" + (", mixture-of-experts" if kind != "dense"
                                               else "") + "]",
        "pipeline_tag: zero-shot-image-classification",
        "---",
        f"# UpCLIP {kind} CLIP",
        "",
        f"Trained with UpCLIP; embedding size {m.embed_dim}.",
        "",
        _tower("vision", m.vision, f", image {m.vision.image_size}, patch {m.vision.patch_size}"),
        _tower("text", m.text, f", context {m.text.context_length}, vocabulary "
                               f"{m.text.vocab_size}"),
        (f"- CLOC region prompter: {m.prompter.layers} block"
         + ("s" if m.prompter.layers > 1 else "") if m.prompter.layers
         else "- no region prompter"),
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModel",
        "model = AutoModel.from_pretrained(DIR, trust_remote_code=True)  # modeling_upclip.py",
        "image = model.get_image_features(pixel_values=images)  # [b, embed], not normalised",
        "text = model.get_text_features(input_ids=tokens)        # one end-of-text token a row",
        "model.clip                                              # the plain-PyTorch CLIP",
        "```",
        "With UpCLIP installed: `trainer.hub.load(DIR)` and `trainer.hub.load_tokenizer(DIR)`.",
        "",
        f"Images: resized (shortest side) and center-cropped to {preprocess['image_size']}, "
        f"{preprocess['interpolation']} interpolation, normalised with mean "
        f"{preprocess['mean']} and std {preprocess['std']}.",
        f"Text: tokenizer `{tok.kind}`, context length {m.text.context_length}, padded with 0 "
        "after the end-of-text token.",
        "",
        "## Provenance",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        "## Config",
        "",
        "Model (also in config.json):",
        "```json",
        json.dumps(dataclasses.asdict(m), indent=1),
        "```",
        "Training:",
        "```json",
        json.dumps(train, indent=1),
        "```",
        "",
    ])
