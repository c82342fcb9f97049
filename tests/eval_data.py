"""Eval-side test fixtures made in the test: a trainer/hub.py export of a tiny CLIP with
random weights, and WebDataset tars written sample by sample (clip_benchmark's layout, or
ours with region JSON)."""
from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import torch

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def tiny_export(directory: Path, seed: int = 0, size: int = 32, prompter_layers: int = 0,
                grounding: bool = False) -> None:
    """A trainer/hub.py export (config.json + model.safetensors + SHA256SUMS) of the tiny
    preset's dense CLIP at ``size`` px, 16-token context, random weights (LayerNorm scales 1);
    with ``prompter_layers`` a CLOC prompter, ``grounding`` its text prompts and box head."""
    from safetensors.torch import save_file

    from trainer import hub
    from trainer.config import ModelConfig
    from trainer.data.config import TokenizerConfig
    from trainer.io import sha256

    cfg = ModelConfig()
    cfg.vision.image_size = size
    cfg.text.context_length = 16
    cfg.prompter.layers, cfg.prompter.grounding = prompter_layers, grounding
    torch.manual_seed(seed)
    model = hub.UpCLIPModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "ln" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name != "logit_scale":
                p.normal_(0, 0.2 if p.dim() > 1 else 0.02)
    directory.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(directory / hub.WEIGHTS_FILE))
    tok = dataclasses.asdict(TokenizerConfig(context_length=16))
    (directory / hub.CONFIG_FILE).write_text(json.dumps({
        "format": hub.FORMAT, "format_version": hub.FORMAT_VERSION,
        "model": dataclasses.asdict(cfg), "tokenizer": tok, "weights": hub.WEIGHTS_FILE,
        "preprocess": {"image_size": size, "interpolation": "bicubic", "mean": CLIP_MEAN,
                       "std": CLIP_STD}}))
    (directory / hub.CHECKSUMS_FILE).write_text("".join(
        f"{sha256(directory / n)}  {n}\n" for n in (hub.CONFIG_FILE, hub.WEIGHTS_FILE)))


def write_tar(path: Path, samples: list[dict]) -> None:
    """One tar of ``{"__key__": key, ext: bytes, ...}`` samples, members in the given order."""
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for ext, payload in s.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
