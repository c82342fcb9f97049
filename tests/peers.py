"""Peer CLIP models (open_clip, Hugging Face) built offline with every weight perturbed.

No package ships real CLIP weights, so tests build the peer architecture with
``pretrained=None`` / a plain config and add seeded noise to every weight, bias and norm so a
mapping mistake (a transposed projection, a swapped q/k, a LayerNorm left at 1) shows up.
"""
from __future__ import annotations

import torch

VOCAB = 1000          # a small vocabulary keeps the tests fast; end-of-text is VOCAB - 1
CONTEXT = 16
EMBED = 32
VISION = dict(image_size=32, patch_size=8, width=64, layers=2, head_width=16, mlp_ratio=4.0)
TEXT = dict(context_length=CONTEXT, vocab_size=VOCAB, width=64, heads=4, layers=2)


def open_clip_config(quick_gelu: bool = False) -> dict:
    return {"embed_dim": EMBED, "quick_gelu": quick_gelu, "vision_cfg": dict(VISION),
            "text_cfg": dict(TEXT)}


def perturb_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                p.fill_(2.3)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def make_open_clip(seed: int = 0, quick_gelu: bool = False):
    import open_clip

    cfg = open_clip_config(quick_gelu)
    model = open_clip.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"],
                           quick_gelu=quick_gelu)
    return perturb_(model, seed), cfg


def make_hf(seed: int = 0, act: str = "quick_gelu"):
    from transformers import CLIPConfig, CLIPModel

    common = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, hidden_act=act, layer_norm_eps=1e-5,
                  attention_dropout=0.0)
    cfg = CLIPConfig(
        text_config=dict(common, vocab_size=VOCAB, max_position_embeddings=CONTEXT,
                         eos_token_id=VOCAB - 1, bos_token_id=VOCAB - 2, pad_token_id=0),
        vision_config=dict(common, image_size=32, patch_size=8, num_channels=3),
        projection_dim=EMBED)
    model = CLIPModel(cfg)
    return perturb_(model, seed), cfg


def sample_inputs(n: int = 4, seed: int = 1):
    """Images and token rows with exactly one end-of-text token (the largest id)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    text = torch.randint(1, VOCAB - 2, (n, CONTEXT), generator=g)
    text[:, 0] = VOCAB - 2  # start-of-text
    ends = torch.randint(2, CONTEXT, (n,), generator=g)
    for i, e in enumerate(ends.tolist()):
        text[i, e] = VOCAB - 1
        text[i, e + 1:] = 0
    return images, text


def hf_features(model, images, text):
    def unwrap(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output
    with torch.no_grad():
        return (unwrap(model.get_image_features(pixel_values=images)),
                unwrap(model.get_text_features(input_ids=text)))


def open_clip_features(model, images, text):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(text)
