"""tools/convert_checkpoint.py import of what the field downloads, end to end (import, then
export --to moe and trainer/hub.py's model), embeddings vs the source within 1e-5:

- an OpenAI-style TorchScript archive: an open_clip ViT (64-wide heads, QuickGELU, as OpenAI's)
  traced here, with OpenAI's non-weight input_resolution entry, saved with torch.jit.save; ``--from openai`` without --model-config reads the config off
  the shapes as open_clip's load_openai_model does;
- an open_clip hub directory (open_clip_config.json + open_clip_pytorch_model.bin);
- the archive imported at twice the image size (--image-size): equal to open_clip's model at
  that size with its resize_pos_embed applied to the same weights;
- a Hugging Face CLIPModel directory (save_pretrained) imported at twice the image size: equal
  to transformers' CLIPModel at that size holding open_clip's resize_pos_embed of its grid;
  transformers' own interpolate_pos_encoding (another bicubic kernel) is matched only when its
  grid is swapped in (which one we follow and why: the test's docstring).
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


def test_hf_directory_imported_at_a_larger_image_size(tmp_path, dist1):
    """A transformers CLIPModel directory (save_pretrained of a tiny perturbed CLIPModel, 32 px,
    4x4 patch grid) imported with --image-size 64 (8x8 grid). Which interpolation: open_clip's
    resize_pos_embed (bicubic with antialias, torch's PIL-style kernel, a = -0.5), as timm's
    resample_abs_pos_embed and the open_clip/OpenAI imports; transformers'
    interpolate_pos_encoding resizes the same grid with plain bicubic (a = -0.75, no
    antialias) on every forward, which gives other values even when upsampling (here the
    image embeddings move by > 1e-3). So:
    - ours equals transformers' CLIPModel configured at 64 px holding the source weights with
      open_clip's resize_pos_embed applied to its position grid (image and text, <= 1e-5);
    - with transformers' own interpolated grid (its interpolate_pos_encoding) put in place of
      ours, the imported model equals the source model run with interpolate_pos_encoding=True
      (<= 1e-5): the only difference is the kernel, not the grid layout or anything else;
    - without it they differ by > 1e-3.
    Measured: 0.0 and 0.0 (bit-exact); the two kernels' embeddings differ by 2.2e-2 (the
    source's position grid set to unit scale so that its interpolation shows)."""
    from types import SimpleNamespace

    from open_clip.model import resize_pos_embed as oc_resize
    from transformers import CLIPConfig, CLIPModel

    source, cfg = peers.make_hf(seed=6, act="gelu")
    with torch.no_grad():  # a position grid of unit scale: its interpolation shows clearly
        source.vision_model.embeddings.position_embedding.weight.normal_(
            0, 1, generator=torch.Generator().manual_seed(7))
    source.save_pretrained(tmp_path / "hf")
    plain = imported_plain(tmp_path, "hf64", "--from", "hf", "--weights", tmp_path / "hf",
                           "--image-size", 64)
    assert plain.cfg.vision.image_size == 64
    assert tuple(plain.visual.positional_embedding.shape) == (8 * 8 + 1, 64)

    key = "vision_model.embeddings.position_embedding.weight"
    sd = {k: v.clone() for k, v in source.state_dict().items()}
    grid = {"visual.positional_embedding": sd[key]}
    oc_resize(grid, SimpleNamespace(visual=SimpleNamespace(grid_size=(8, 8))))  # in place
    sd[key] = grid["visual.positional_embedding"]
    big_cfg = CLIPConfig.from_dict(cfg.to_dict())
    big_cfg.vision_config.image_size = 64
    big = CLIPModel(big_cfg).eval()
    big.load_state_dict(sd)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    text = peers.sample_inputs(n=3)[1]
    ours = features(plain, images, text)
    assert diff(ours, peers.hf_features(big, images, text)) <= TOL

    with torch.no_grad():
        theirs = source.get_image_features(pixel_values=images, interpolate_pos_encoding=True)
        theirs = theirs if isinstance(theirs, torch.Tensor) else theirs.pooler_output
        hf_grid = source.vision_model.embeddings.interpolate_pos_encoding(
            torch.zeros(1, 8 * 8 + 1, 64), 64, 64)[0]                            # [65, 64]
        assert float((ours[0] - theirs).abs().max()) > 1e-3
        plain.visual.positional_embedding.copy_(hf_grid)
        assert float((plain.encode_image(images) - theirs).abs().max()) <= TOL
