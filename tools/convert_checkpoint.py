"""Convert CLIP checkpoints to and from UpCLIP.

  import: open_clip / OpenAI-CLIP state dict (+ its model config) or a Hugging Face
          CLIPModel directory -> an UpCLIP checkpoint (megatron-core dist_checkpointing),
          loadable at any TP/PP: ``checkpoint.load=<out>``.

    python tools/convert_checkpoint.py import --from open_clip --weights ViT-B-32.pt \\
        --model-config ViT-B-32-quickgelu --out ckpt/b32
    python tools/convert_checkpoint.py import --from hf --weights path/to/clip-vit-base-patch32 \\
        --out ckpt/b32

``--model-config`` is an open_clip model name (its bundled JSON) or a path to a JSON file.
Runs as one process on CPU; no GPU needed.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import Config, ConfigError, ParallelConfig, config_to_dict  # noqa: E402


def fail(msg: str) -> None:
    print(f"convert_checkpoint: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def read_state_dict(path: Path) -> dict:
    import torch

    if not path.exists():
        fail(f"--weights {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict):
        fail(f"--weights {str(path)!r}: not a state dict")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def read_open_clip_config(spec: str) -> dict:
    path = Path(spec)
    if path.suffix == ".json":
        if not path.is_file():
            fail(f"--model-config {spec!r} does not exist")
        return json.loads(path.read_text())
    import open_clip

    cfg = open_clip.get_model_config(spec)
    if cfg is None:
        fail(f"--model-config {spec!r}: not an open_clip model name nor a .json file")
    return cfg


def load_source(args) -> tuple:
    from trainer.models import convert

    weights = Path(args.weights)
    if args.source == "open_clip":
        if not args.model_config:
            fail("--from open_clip needs --model-config (an open_clip model name or JSON path)")
        model_cfg = convert.config_from_open_clip(read_open_clip_config(args.model_config),
                                                  quick_gelu=args.quick_gelu)
        sd = read_state_dict(weights)
        return model_cfg, convert.from_open_clip(sd, model_cfg)
    # Hugging Face CLIPModel directory (config.json + model.safetensors / pytorch_model.bin)
    if not (weights / "config.json").is_file():
        fail(f"--weights {str(weights)!r}: not a Hugging Face model directory (no config.json)")
    model_cfg = convert.config_from_hf(json.loads((weights / "config.json").read_text()))
    files = sorted(weights.glob("*.safetensors")) or sorted(weights.glob("pytorch_model*.bin"))
    if not files:
        fail(f"--weights {str(weights)!r}: no *.safetensors or pytorch_model*.bin")
    sd = {}
    for f in files:
        sd.update(read_state_dict(f))
    return model_cfg, convert.from_hf(sd, model_cfg)


def cmd_import(args) -> None:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        fail(f"--out {str(out)!r} exists and is not empty")
    try:
        model_cfg, full = load_source(args)
    except (ConfigError, KeyError) as e:
        fail(str(e).strip("'\""))
    cfg = Config(model=model_cfg, parallel=ParallelConfig())
    cfg.validate()

    from trainer.checkpoint import save_checkpoint
    from trainer.distributed import ParallelLayout, init_distributed, read_launch_env
    from trainer.models.clip import CLIP
    from trainer.models.state import load_full_state_dict

    init_distributed(read_launch_env())
    layout = ParallelLayout(1).initialize()
    model = CLIP(cfg.model, cfg.parallel)
    load_full_state_dict(model, full, layout)
    unused = sorted(set(full) - {k for k, _ in model.named_parameters()})
    if unused:
        fail(f"converted weights have tensors the model does not use: {unused[:3]}")
    ckpt = save_checkpoint(out, 0, model, config_to_dict(cfg), layout,
                           extra={"imported_from": args.source,
                                  "weights": str(Path(args.weights).resolve())})
    print(f"imported {args.source} weights ({sum(v.numel() for v in full.values()) / 1e6:.1f}M "
          f"params) -> {ckpt}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="open_clip / HF weights -> UpCLIP checkpoint")
    imp.add_argument("--from", dest="source", choices=("open_clip", "openai", "hf"),
                     required=True)
    imp.add_argument("--weights", required=True,
                     help="state dict file (.pt/.bin/.safetensors) or HF model directory")
    imp.add_argument("--model-config", help="open_clip model name or JSON (open_clip/openai)")
    imp.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None,
                     help="override the activation (OpenAI weights use QuickGELU)")
    imp.add_argument("--out", required=True, help="checkpoint root to create")
    args = parser.parse_args(argv)
    if args.source == "openai":
        args.source = "open_clip"
        if args.quick_gelu is None:
            args.quick_gelu = True
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "import":
        cmd_import(args)


if __name__ == "__main__":
    main()
