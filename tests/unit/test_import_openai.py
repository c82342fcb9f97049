"""tools/convert_checkpoint.py import of what the field downloads, end to end (import, then
export --to moe and trainer/hub.py's model), embeddings vs the source within 1e-5:

- an OpenAI-style TorchScript archive: an open_clip ViT (64-wide heads, QuickGELU, as OpenAI's)
  traced here, with OpenAI's non-weight input_resolution entry, saved with torch.jit.save; ``--from openai`` without --model-config reads the config off
  the shapes as open_clip's load_openai_model does;
- an open_clip hub directory (open_clip_config.json + open_clip_pytorch_model.bin);
- the archive imported at twice the image size (--image-size): equal to open_clip's model at
  that size with its resize_pos_embed applied to the same weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import peers
from tools import convert_checkpoint
from trainer import hub

TOL = 1e-5
CFG = {"embed_dim": 32, "quick_gelu": True,
       "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2,
                      "head_width": 64},
       "text_cfg": {"context_length": peers.CONTEXT, "vocab_size": peers.VOCAB, "width": 64,
                    "heads": 1, "layers": 2}}


def cli(*args):
    convert_checkpoint.main([str(a) for a in args])


def open_clip_model(image_size: int = 32):
    import open_clip

    v = dict(CFG["vision_cfg"], image_size=image_size)
    return open_clip.CLIP(CFG["embed_dim"], v, CFG["text_cfg"], quick_gelu=True)


def imported_plain(tmp: Path, name: str, *args) -> hub.UpCLIPModel:
    cli("import", *args, "--out", tmp / f"{name}-ck")
    cli("export", "--to", "moe", "--ckpt", tmp / f"{name}-ck", "--out", tmp / f"{name}-plain")
    return hub.load(tmp / f"{name}-plain")


def features(model, images, text):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(text)


def diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def source(tmp_path_factory, dist1):
    d = tmp_path_factory.mktemp("openai")
    model = peers.perturb_(open_clip_model(), 5)
    # OpenAI's archives hold input_resolution (and context_length, vocab_size: open_clip's
    # CLIP has those names as attributes already) among the weights
    model.register_buffer("input_resolution", torch.tensor(32))
    images, text = peers.sample_inputs(n=4)
    traced = torch.jit.trace(model, (images, text), check_trace=False)
    torch.jit.save(traced, str(d / "ViT-tiny.pt"))
    return dict(dir=d, model=model, images=images, text=text,
                ref=features(model, images, text))


def test_torchscript_archive_imports_with_config_from_shapes(source):
    assert convert_checkpoint.is_torchscript(source["dir"] / "ViT-tiny.pt")
    with pytest.raises(Exception):  # what users hit before: torch.load refuses the archive
        torch.load(source["dir"] / "ViT-tiny.pt", weights_only=True)
    plain = imported_plain(source["dir"], "jit", "--from", "openai", "--weights",
                           source["dir"] / "ViT-tiny.pt")
    assert plain.cfg.vision.act == "quick_gelu" and plain.cfg.vision.heads == 1
    err = diff(features(plain, source["images"], source["text"]), source["ref"])
    assert err <= TOL


def test_open_clip_hub_directory(source):
    hub_dir = source["dir"] / "hub-model"
    hub_dir.mkdir()
    (hub_dir / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": CFG, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
    sd = {k: v for k, v in source["model"].state_dict().items()
          if k not in ("input_resolution", "context_length", "vocab_size")}
    torch.save(sd, hub_dir / "open_clip_pytorch_model.bin")
    plain = imported_plain(source["dir"], "hubdir", "--from", "open_clip", "--weights", hub_dir)
    err = diff(features(plain, source["images"], source["text"]), source["ref"])
    assert err <= TOL


def test_archive_imported_at_a_larger_image_size(source):
    from open_clip.model import resize_pos_embed as oc_resize

    plain = imported_plain(source["dir"], "x2", "--from", "openai", "--weights",
                           source["dir"] / "ViT-tiny.pt", "--image-size", 64)
    assert plain.cfg.vision.image_size == 64
    big = open_clip_model(64).eval()
    sd = {k: v for k, v in source["model"].state_dict().items()
          if k not in ("input_resolution", "context_length", "vocab_size")}
    oc_resize(sd, big)  # open_clip's own interpolation, in place: 4x4 -> 8x8 grid
    big.load_state_dict(sd)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    text = source["text"][:3]
    err = diff(features(plain, images, text), features(big, images, text))
    assert err <= TOL
