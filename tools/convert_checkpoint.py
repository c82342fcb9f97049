"""Convert CLIP checkpoints to and from UpCLIP, and reshard UpCLIP training checkpoints.

  import   open_clip / OpenAI-CLIP state dict (+ its model config), OpenAI's TorchScript
           archives, open_clip hub directories or a Hugging Face CLIPModel directory -> an
           UpCLIP checkpoint, loadable at any TP/PP/EP (checkpoint.load=<out>); --image-size
           imports at another resolution (positional embedding interpolated)
  export   an UpCLIP checkpoint -> a Hugging Face CLIPModel directory (--to hf), an open_clip
           state dict + model config (--to open_clip), or config.json + model.safetensors for
           the plain-PyTorch model of trainer/hub.py (--to moe: MoE or dense)
  reshard  an UpCLIP training checkpoint -> the same at another TP/PP/EP layout, optimizer
           state and train_state included; run it at the target world size

    python tools/convert_checkpoint.py import --from open_clip --weights ViT-B-32.pt \\
        --model-config ViT-B-32-quickgelu --out ckpt/b32
    python tools/convert_checkpoint.py import --from hf --weights clip-vit-base-patch32 \\
        --out ckpt/b32
    python tools/convert_checkpoint.py import --from openai --weights ViT-B-16.pt --out ckpt/b16
    python tools/convert_checkpoint.py import --from open_clip --image-size 336 \\
        --weights hub/CLIP-ViT-B-16-laion2B-s34B-b88K --out ckpt/b16-336
    python tools/convert_checkpoint.py export --to hf --ckpt runs/b32/ckpt --out exports/b32-hf
    python tools/convert_checkpoint.py export --to open_clip --ckpt runs/b32/ckpt \\
        --out exports/b32-oc
    python tools/convert_checkpoint.py export --to moe --ckpt runs/b16-moe/ckpt \\
        --out exports/b16-moe
    python tools/convert_checkpoint.py export --to hf --merge-experts --ckpt runs/b16-moe/ckpt \\
        --out exports/b16-merged-hf
    torchrun --nproc_per_node=4 tools/convert_checkpoint.py reshard --ckpt runs/b16-moe/ckpt \\
        --out runs/b16-moe/ckpt-tp1 --tp 1 --ep 1

Loading the exports:
    transformers.CLIPModel.from_pretrained("exports/b32-hf")    (CLIPTokenizer, CLIPProcessor:
        the same directory; tokenizer files when the model uses the CLIP BPE vocabulary)
    open_clip.create_model("local-dir:exports/b32-oc"), or with the model config registered:
        open_clip.add_model_config("exports/b32-oc")            (registers "b32-oc", see --name)
        open_clip.create_model("b32-oc", pretrained="exports/b32-oc/open_clip_model.safetensors")
    trainer.hub.load("exports/b16-moe"), trainer.hub.load_tokenizer("exports/b16-moe"), or
    without UpCLIP: transformers.AutoModel.from_pretrained("exports/b16-moe",
        trust_remote_code=True)                 (the export's modeling_upclip.py; README.md)

Every command refuses a non-empty --out unless --force; verifies the checksums of what it
reads (a checkpoint's manifest) and writes (the new manifest; SHA256SUMS of an export); and
on a mismatch lists the missing, unexpected and wrongly-shaped tensors. An export is also
reloaded with its library and its embeddings compared with UpCLIP's (--no-check skips it).
--merge-experts averages each MoE layer's experts into one dense MLP: exact right after
upcycling, LOSSY after training (the export logs how far the embeddings moved).
import and export run as one process on CPU (no GPU needed); reshard runs under torchrun
(or srun / mpirun) with as many processes as the target layout's world size.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import Config, ConfigError, ParallelConfig, config_to_dict  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")


def fail(msg: str) -> None:
    from trainer.distributed.collectives import rank
    if rank() == 0:
        print(f"convert_checkpoint: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def refuse_existing(out: Path, force: bool) -> None:
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        fail(f"--out {str(out)!r} exists and is not empty (--force overwrites)")


# --------------------------------------------------------------------------- import

def is_torchscript(path: Path) -> bool:
    """A TorchScript archive (OpenAI's original ViT-B-16.pt etc.): a zip with code/ and
    constants.pkl beside the data."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") for n in z.namelist())


def read_state_dict(path: Path) -> dict:
    import torch

    from trainer.models.convert import OPENAI_EXTRA_KEYS

    if not path.exists():
        fail(f"--weights {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(str(path))
    elif is_torchscript(path):  # as open_clip's load_openai_model reads them
        sd = {k: v for k, v in torch.jit.load(str(path), map_location="cpu").state_dict().items()
              if k not in OPENAI_EXTRA_KEYS}
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


HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin",
               "open_clip_model.bin")


def open_clip_source(weights: Path, args) -> tuple[dict | None, list[Path]]:
    """(open_clip model config or None, weight files) of ``--weights``: a state dict file or
    TorchScript archive, or an open_clip hub directory (open_clip_config.json +
    open_clip_model.safetensors / open_clip_pytorch_model.bin). The config: --model-config,
    else the directory's, else None (--from openai: read from the weights' shapes)."""
    files, oc_cfg = [weights], None
    if weights.is_dir():
        cfg_file = weights / "open_clip_config.json"
        found = [weights / n for n in HUB_WEIGHTS if (weights / n).is_file()]
        if not cfg_file.is_file() or not found:
            fail(f"--weights {str(weights)!r}: not an open_clip hub directory (needs "
                 f"open_clip_config.json and one of {', '.join(HUB_WEIGHTS)})")
        files = found[:1]
        try:
            oc_cfg = json.loads(cfg_file.read_text())["model_cfg"]
        except (json.JSONDecodeError, KeyError, TypeError):
            fail(f"{cfg_file}: no 'model_cfg' mapping")
    if args.model_config:
        oc_cfg = read_open_clip_config(args.model_config)
    if oc_cfg is None and args.source == "open_clip":
        fail("--from open_clip needs --model-config (an open_clip model name or JSON path) "
             "unless --weights is an open_clip hub directory")
    return oc_cfg, files


def with_image_size(model_cfg, args):
    """``--image-size``: the target resolution (the conversion then interpolates the vision
    positional embedding to its patch grid)."""
    if args.image_size:
        patch = model_cfg.vision.patch_size
        if args.image_size <= 0 or args.image_size % patch:
            fail(f"--image-size {args.image_size} is not a positive multiple of the patch size "
                 f"{patch}")
        model_cfg.vision.image_size = args.image_size
    return model_cfg


def load_source(args) -> tuple:
    """(model config, canonical state dict, {file: sha256} of the weights read)."""
    from trainer.io import sha256
    from trainer.models import convert

    weights = Path(args.weights)
    if not weights.exists():
        fail(f"--weights {str(weights)!r} does not exist")
    if args.source in ("open_clip", "openai"):
        oc_cfg, files = open_clip_source(weights, args)
        sd = {}
        for f in files:
            sd.update(read_state_dict(f))
        if oc_cfg is None:  # OpenAI's archives carry no config: read it off the shapes
            oc_cfg = convert.open_clip_config_of_openai(sd)
        model_cfg = with_image_size(convert.config_from_open_clip(oc_cfg, args.quick_gelu), args)
        return model_cfg, convert.from_open_clip(sd, model_cfg), {str(f): sha256(f) for f in files}
    # Hugging Face CLIPModel directory (config.json + model.safetensors / pytorch_model.bin)
    if not (weights / "config.json").is_file():
        fail(f"--weights {str(weights)!r}: not a Hugging Face model directory (no config.json)")
    model_cfg = with_image_size(
        convert.config_from_hf(json.loads((weights / "config.json").read_text())), args)
    files = sorted(weights.glob("*.safetensors")) or sorted(weights.glob("pytorch_model*.bin"))
    if not files:
        fail(f"--weights {str(weights)!r}: no *.safetensors or pytorch_model*.bin")
    sd = {}
    for f in files:
        sd.update(read_state_dict(f))
    return model_cfg, convert.from_hf(sd, model_cfg), {str(f): sha256(f) for f in files}


def cmd_import(args) -> None:
    out = Path(args.out)
    refuse_existing(out, args.force)
    try:
        model_cfg, full, hashes = load_source(args)
    except (ConfigError, KeyError) as e:
        fail(str(e).strip("'\""))
    cfg = Config(model=model_cfg, parallel=ParallelConfig())
    cfg.validate()

    from trainer import checkpoint
    from trainer.distributed import ParallelLayout, init_distributed, read_launch_env
    from trainer.hub import mismatch_report
    from trainer.models.build import build_model
    from trainer.models.state import canonical_names, load_full_state_dict

    init_distributed(read_launch_env())
    layout = ParallelLayout(1).initialize()
    model = build_model(cfg.model, layout, parallel=cfg.parallel)
    names = canonical_names(model)
    report = mismatch_report({names[n]: tuple(p.shape) for n, p in model.named_parameters()},
                             {k: tuple(v.shape) for k, v in full.items()})
    if report:
        fail(f"--weights {args.weights!r}: converted weights do not fit the model of its "
             f"config: {report}")
    load_full_state_dict(model, full, layout)
    ckpt = checkpoint.save_checkpoint(out, 0, model, config_to_dict(cfg), layout,
                                      extra={"imported_from": args.source,
                                             "weights": str(Path(args.weights).resolve()),
                                             "weights_sha256": hashes})
    checkpoint.verify(ckpt)
    print(f"imported {args.source} weights ({sum(v.numel() for v in full.values()) / 1e6:.1f}M "
          f"params) -> {ckpt}")


# --------------------------------------------------------------------------- export

def cmd_export(args) -> None:
    import torch

    from trainer import checkpoint, export, reshard
    from trainer.models import convert
    from trainer.moe.upcycle import dense_config

    out = Path(args.out)
    refuse_existing(out, args.force)
    try:  # the cheap checks, before megatron is imported
        ckpt = checkpoint.resolve(args.ckpt)
        cfg = reshard.saved_config(checkpoint.read_manifest(ckpt), ckpt)
        moe = export.is_moe(cfg.model)
        if moe and args.target != "moe" and not args.merge_experts:
            tower = "vision" if cfg.model.vision.moe.enabled else "text"
            fail(f"{ckpt}: an MoE checkpoint (model.{tower}.moe.num_experts="
                 f"{getattr(cfg.model, tower).moe.num_experts}); --to {args.target} needs "
                 f"--merge-experts (averages the experts: lossy) or use --to moe")
        dense = dense_config(cfg.model)
        if args.target == "hf":
            convert.config_to_hf(dense)
        elif args.target == "open_clip":
            convert.config_to_open_clip(dense)
    except (checkpoint.CheckpointError, export.ExportError, ConfigError) as e:
        fail(str(e))

    from trainer.distributed import ParallelLayout, init_distributed, read_launch_env

    launch = read_launch_env()
    init_distributed(launch)
    layout = ParallelLayout(launch.world_size).initialize()
    from trainer.distributed.collectives import on_rank0

    try:
        src = reshard.read_checkpoint(ckpt, layout)
        if args.merge_experts and moe:
            src = export.merge_experts(src, layout)
        written, notes = on_rank0(
            export.write_export, src, args.target, out, force=args.force,
            dtype=getattr(torch, args.dtype), name=args.name, check=args.check,
            error_type=export.ExportError)
    except (checkpoint.CheckpointError, export.ExportError, ConfigError, ValueError) as e:
        fail(str(e))  # ValueError: trainer.hub.HubError when the check reloads the export
    if launch.rank == 0:
        for note in notes:
            logging.getLogger("upclip").info("note: %s", note)
        merged = " (experts merged: lossy)" if args.merge_experts and moe else ""
        print(f"exported {ckpt} (step {src.manifest['step']}) --to {args.target}{merged} "
              f"-> {written}")


# --------------------------------------------------------------------------- reshard

def cmd_reshard(args) -> None:
    from trainer import checkpoint
    from trainer.distributed import (LayoutError, ParallelLayout, init_distributed,
                                     read_launch_env)
    from trainer import reshard

    out = Path(args.out)
    refuse_existing(out, args.force)
    try:
        ckpt = checkpoint.resolve(args.ckpt)
        cfg = reshard.saved_config(checkpoint.read_manifest(ckpt), ckpt)
        if out.resolve() in (ckpt.resolve(), ckpt.parent.resolve()):
            fail(f"--out {str(out)!r} is the checkpoint's own root; pick a new directory")
        p = cfg.parallel
        for name in ("tp", "pp", "ep", "vision_layers_last_stage"):
            if getattr(args, name) is not None:
                setattr(p, name, getattr(args, name))
        reshard.validate(cfg, ckpt)
        launch = read_launch_env()
        layout = ParallelLayout(launch.world_size, p.tp, p.pp, p.ep)
    except (checkpoint.CheckpointError, LayoutError) as e:
        fail(str(e))
    init_distributed(launch)
    layout.initialize(seed=cfg.train.seed)
    try:
        written = reshard.reshard(ckpt, out, layout, cfg)
    except checkpoint.CheckpointError as e:
        fail(str(e))
    if launch.rank == 0:
        print(f"resharded {ckpt} -> {written} ({layout.describe()}, world={layout.world_size})")


# --------------------------------------------------------------------------- CLI

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/convert_checkpoint.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{import,export,reshard}")

    imp = sub.add_parser("import", help="open_clip / OpenAI / HF weights -> UpCLIP checkpoint",
                         description="open_clip / OpenAI-CLIP state dict (+ model config) or "
                         "a Hugging Face CLIPModel directory -> an UpCLIP checkpoint "
                         "(step 0, loadable at any TP/PP/EP).")
    imp.add_argument("--from", dest="source", choices=("open_clip", "openai", "hf"),
                     required=True, help="openai = OpenAI-CLIP weights (a TorchScript archive "
                     "or state dict; QuickGELU)")
    imp.add_argument("--weights", required=True,
                     help="state dict file (.pt/.bin/.safetensors), OpenAI TorchScript archive, "
                     "open_clip hub directory (open_clip_config.json + weights) or HF model "
                     "directory")
    imp.add_argument("--model-config", help="open_clip model name or JSON (open_clip; openai: "
                     "default read from the weights' shapes)")
    imp.add_argument("--image-size", type=int, default=0,
                     help="import at this image size (vision positional embedding "
                     "interpolated, as open_clip's resize_pos_embed, for every source; "
                     "transformers' interpolate_pos_encoding uses another bicubic kernel)")
    imp.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None,
                     help="override the activation (OpenAI weights use QuickGELU)")
    imp.add_argument("--out", required=True, help="checkpoint root to create")
    imp.add_argument("--force", action="store_true", help="write into a non-empty --out")

    exp = sub.add_parser("export", help="UpCLIP checkpoint -> HF / open_clip / plain MoE model",
                         description="An UpCLIP checkpoint (any layout) -> --to hf: a "
                         "transformers CLIPModel directory (config.json, model.safetensors, "
                         "preprocessor and CLIP BPE tokenizer files); --to open_clip: "
                         "open_clip_model.safetensors + open_clip_config.json + NAME.json; "
                         "--to moe: config.json + model.safetensors (experts stacked per "
                         "layer) + modeling_upclip.py + README.md for trainer/hub.py and "
                         "transformers AutoModel (trust_remote_code=True). MoE checkpoints go "
                         "to hf / open_clip only with --merge-experts (lossy).")
    exp.add_argument("--to", dest="target", choices=("hf", "open_clip", "moe"), required=True,
                     help="target format (moe: the plain model of trainer/hub.py)")
    exp.add_argument("--ckpt", required=True, help="checkpoint directory, or a root with 'latest'")
    exp.add_argument("--out", required=True, help="export directory to create")
    exp.add_argument("--merge-experts", action="store_true",
                     help="average each MoE layer's experts into one dense MLP (LOSSY after "
                     "training; exact right after upcycling)")
    exp.add_argument("--dtype", choices=DTYPES, default="float32", help="of the saved weights")
    exp.add_argument("--name", default="",
                     help="open_clip model name of NAME.json (default: the --out folder name)")
    exp.add_argument("--no-check", dest="check", action="store_false",
                     help="skip reloading the export with its library and comparing embeddings")
    exp.add_argument("--force", action="store_true", help="replace an existing --out")

    rs = sub.add_parser("reshard", help="UpCLIP checkpoint -> another TP/PP/EP layout",
                        description="Rewrites a training checkpoint (weights, AdamW moments and "
                        "step counts, train_state) as shards of another layout, with the "
                        "config's parallel sizes updated. Run it at the target world size "
                        "(torchrun --nproc_per_node=N ...). Per-rank RNG and data positions "
                        "are kept only when the world layout is unchanged.")
    rs.add_argument("--ckpt", required=True, help="checkpoint directory, or a root with 'latest'")
    rs.add_argument("--out", required=True, help="checkpoint root to create")
    for name in ("tp", "pp", "ep"):
        rs.add_argument(f"--{name}", type=int, help=f"target parallel.{name} (default: as saved)")
    rs.add_argument("--vision-layers-last-stage", type=int,
                    help="target parallel.vision_layers_last_stage (default: as saved)")
    rs.add_argument("--force", action="store_true", help="write into a non-empty --out")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if getattr(args, "source", None) == "openai" and args.quick_gelu is None:
        args.quick_gelu = True
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("upclip", "trainer"):  # our narration; the peers' INFO chatter stays off
        logging.getLogger(name).setLevel(logging.INFO)
    {"import": cmd_import, "export": cmd_export, "reshard": cmd_reshard}[args.command](args)


if __name__ == "__main__":
    main()
