"""State-dict adapters between UpCLIP's canonical CLIP and its peers.

``from_open_clip`` / ``to_open_clip`` (also OpenAI-CLIP, whose state dicts open_clip reuses),
``from_hf`` / ``to_hf`` (Hugging Face ``CLIPModel``) and ``to_hub`` (the plain-PyTorch model of
``trainer/hub.py``: open_clip's names plus stacked experts), with config readers and writers.
Canonical names are those of ``trainer.models.clip.CLIP`` at tp=1, pp=1 (see ``state.py``).
The only real work: megatron fuses Q, K, V per head (``[h0: q k v, h1: q k v, ...]``) where
open_clip stacks them (``[q; k; v]``) and HF keeps three matrices. open_clip and HF have no
experts: an MoE state dict goes to them only through ``merge_experts`` (trainer/export.py).
"""
from __future__ import annotations

import logging
import math
import re

import torch

from trainer.config import ConfigError, ModelConfig, TextConfig, VisionConfig


# --------------------------------------------------------------------------- QKV layouts

def qkv_stacked_to_megatron(w: torch.Tensor, heads: int) -> torch.Tensor:
    """``[3*d, ...]`` as ``[q; k; v]`` -> megatron's per-head ``[h, (q k v), hd, ...]``."""
    q, k, v = w.chunk(3, dim=0)
    d = q.shape[0]
    split = lambda t: t.reshape(heads, d // heads, *t.shape[1:])  # noqa: E731
    return torch.stack([split(q), split(k), split(v)], dim=1).reshape(3 * d, *w.shape[1:])


def qkv_megatron_to_stacked(w: torch.Tensor, heads: int) -> torch.Tensor:
    d = w.shape[0] // 3
    per = w.reshape(heads, 3, d // heads, *w.shape[1:])
    return torch.cat([per[:, i].reshape(d, *w.shape[1:]) for i in range(3)], dim=0)


# --------------------------------------------------------------------------- key tables
# Each peer is one table, read in both directions. Keys are ours, values the peer's.

_OC_TOP = {
    "visual.conv1.weight": "visual.conv1.weight",
    "visual.class_embedding": "visual.class_embedding",
    "visual.positional_embedding": "visual.positional_embedding",
    "visual.ln_pre.weight": "visual.ln_pre.weight", "visual.ln_pre.bias": "visual.ln_pre.bias",
    "visual.ln_post.weight": "visual.ln_post.weight", "visual.ln_post.bias": "visual.ln_post.bias",
    "visual.proj.weight": "visual.proj",          # open_clip stores projections as [in, out]
    "text.token_embedding.weight": "token_embedding.weight",
    "text.positional_embedding": "positional_embedding",
    "text.ln_final.weight": "ln_final.weight", "text.ln_final.bias": "ln_final.bias",
    "text.proj.weight": "text_projection",
    "logit_scale": "logit_scale",
}
_OC_TRANSPOSED = {"visual.proj.weight", "text.proj.weight"}
_OC_TOWERS = (("visual.transformer.layers.", "visual.transformer.resblocks.", "vision"),
              ("text.transformer.layers.", "transformer.resblocks.", "text"))
_OC_BLOCK = {  # inside a block, without .weight / .bias
    "input_layernorm": "ln_1", "pre_mlp_layernorm": "ln_2",
    "self_attention.linear_proj": "attn.out_proj",
    "mlp.linear_fc1": "mlp.c_fc", "mlp.linear_fc2": "mlp.c_proj",
}

_HF_TOP = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic, HF's spelling
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "visual.proj.weight": "visual_projection.weight",
    "text.token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "text.positional_embedding": "text_model.embeddings.position_embedding.weight",
    "text.ln_final.weight": "text_model.final_layer_norm.weight",
    "text.ln_final.bias": "text_model.final_layer_norm.bias",
    "text.proj.weight": "text_projection.weight",
    "logit_scale": "logit_scale",
}
_HF_TOWERS = (("visual.transformer.layers.", "vision_model.encoder.layers.", "vision"),
              ("text.transformer.layers.", "text_model.encoder.layers.", "text"))
_HF_BLOCK = {
    "input_layernorm": "layer_norm1", "pre_mlp_layernorm": "layer_norm2",
    "self_attention.linear_proj": "self_attn.out_proj",
    "mlp.linear_fc1": "mlp.fc1", "mlp.linear_fc2": "mlp.fc2",
}
_QKV = "self_attention.linear_qkv"
# An MoE block's MLP, under ``mlp.``: ours (DeepSpeed's names) -> the plain model's.
_HUB_MOE = {
    "deepspeed_moe.gate.wg.weight": "router.weight",   # [E, d]
    "deepspeed_moe.experts.w1": "experts.w1",          # [E, d, f]
    "deepspeed_moe.experts.b1": "experts.b1",          # [E, f]
    "deepspeed_moe.experts.w2": "experts.w2",          # [E, f, d]
    "deepspeed_moe.experts.b2": "experts.b2",          # [E, d]
}
_ROUTER = "mlp.deepspeed_moe.gate.wg.weight"


def _blocks(sd: dict, prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m}
    return max(idx) + 1 if idx else 0


def _take(sd: dict, key: str, source: str) -> torch.Tensor:
    if key not in sd:
        raise KeyError(f"{source} state dict has no '{key}'")
    return sd[key]


def _import(sd: dict, cfg: ModelConfig, top: dict, towers: tuple, block: dict, read_qkv,
            source: str, transposed: frozenset | set = frozenset()) -> dict[str, torch.Tensor]:
    """Peer state dict -> canonical. ``read_qkv(sd, block_prefix, suffix)`` returns the
    peer's Q, K, V stacked as ``[q; k; v]``."""
    out = {ours: _take(sd, theirs, source) for ours, theirs in top.items()}
    for ours in transposed:
        out[ours] = out[ours].t()
    for ours, theirs, tower in towers:
        heads = getattr(cfg, tower).heads
        for i in range(_blocks(sd, theirs)):
            a, b = f"{ours}{i}.", f"{theirs}{i}."
            for suffix in ("weight", "bias"):
                for o, t in block.items():
                    out[f"{a}{o}.{suffix}"] = _take(sd, f"{b}{t}.{suffix}", source)
                out[f"{a}{_QKV}.{suffix}"] = qkv_stacked_to_megatron(
                    read_qkv(sd, b, suffix), heads)
    key = "visual.positional_embedding"
    if key in out:
        out[key] = resize_pos_embed(out[key], cfg.vision.image_size // cfg.vision.patch_size)
    return {k: v.detach().clone().float() for k, v in out.items()}


def resize_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """``[1 + g*g, D]`` vision positional embedding -> ``[1 + grid*grid, D]``: class token kept,
    the grid resized as open_clip's ``resize_pos_embed`` and timm's ``resample_abs_pos_embed``
    do (bicubic, antialias: torch's PIL-style kernel, a = -0.5; align_corners=False), for every
    source. transformers' ``interpolate_pos_encoding`` uses plain bicubic (a = -0.75, no
    antialias), which differs even when upsampling (tests/unit/test_import_openai.py)."""
    if pos.shape[0] == grid * grid + 1:
        return pos
    old = math.isqrt(pos.shape[0] - 1)
    if old * old + 1 != pos.shape[0]:
        raise ValueError(f"visual.positional_embedding has {pos.shape[0]} rows: not 1 + a square grid")
    logging.getLogger(__name__).info("resizing the vision positional embedding grid from "
                                     "%dx%d to %dx%d", old, old, grid, grid)
    img = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    img = torch.nn.functional.interpolate(img, size=(grid, grid), mode="bicubic",
                                          antialias=True, align_corners=False)
    return torch.cat([pos[:1], img.permute(0, 2, 3, 1).reshape(grid * grid, -1)], dim=0)


def _export(full: dict, cfg: ModelConfig, top: dict, towers: tuple, block: dict, write_qkv,
            transposed: frozenset | set = frozenset(), moe: dict | None = None,
            peer: str = "") -> dict[str, torch.Tensor]:
    """Canonical -> peer state dict; ``write_qkv(out, block_prefix, suffix, stacked)``.
    ``moe``: how the peer names an MoE block's MLP (None: the peer has no experts)."""
    out = {theirs: full[ours].t() if ours in transposed else full[ours]
           for ours, theirs in top.items()}
    for ours, theirs, tower in towers:
        t_cfg = getattr(cfg, tower)
        for i in range(t_cfg.layers):
            a, b = f"{ours}{i}.", f"{theirs}{i}."
            is_moe = a + _ROUTER in full
            if is_moe and moe is None:
                raise ValueError(f"{a}mlp is a mixture of experts and {peer} has none: merge "
                                 f"the experts first (lossy) or export the MoE model")
            for suffix in ("weight", "bias"):
                for o, t in block.items():
                    if not (is_moe and o.startswith("mlp.")):
                        out[f"{b}{t}.{suffix}"] = full[f"{a}{o}.{suffix}"]
                write_qkv(out, b, suffix,
                          qkv_megatron_to_stacked(full[f"{a}{_QKV}.{suffix}"], t_cfg.heads))
            if is_moe:
                for o, t in moe.items():
                    out[f"{b}mlp.{t}"] = full[f"{a}mlp.{o}"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def _oc_read_qkv(sd, b, suffix):
    return _take(sd, f"{b}attn.in_proj_{suffix}", "open_clip")


def _oc_write_qkv(out, b, suffix, stacked):
    out[f"{b}attn.in_proj_{suffix}"] = stacked


def _hf_read_qkv(sd, b, suffix):
    return torch.cat([_take(sd, f"{b}self_attn.{n}_proj.{suffix}", "Hugging Face CLIPModel")
                      for n in "qkv"], dim=0)


def _hf_write_qkv(out, b, suffix, stacked):
    for n, t in zip("qkv", stacked.chunk(3, dim=0)):
        out[f"{b}self_attn.{n}_proj.{suffix}"] = t


def from_open_clip(sd: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    transposed = set(_OC_TRANSPOSED)
    if "text_projection.weight" in sd:  # open_clip with an nn.Linear text projection
        sd = dict(sd, text_projection=sd["text_projection.weight"])
        transposed.discard("text.proj.weight")
    return _import(sd, cfg, _OC_TOP, _OC_TOWERS, _OC_BLOCK, _oc_read_qkv, "open_clip",
                   transposed)


def to_open_clip(full: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = _export(full, cfg, _OC_TOP, _OC_TOWERS, _OC_BLOCK, _oc_write_qkv, _OC_TRANSPOSED,
                  peer="open_clip")
    if "logit_bias" in full:  # SigLIP; open_clip builds it from init_logit_bias
        out["logit_bias"] = full["logit_bias"].detach().clone()
    return out


def to_hub(full: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The plain model's state dict (trainer/hub.py): open_clip's names, stacked experts,
    and the SigLIP logit bias and CLOC prompter when present."""
    out = _export(full, cfg, _OC_TOP, _OC_TOWERS, _OC_BLOCK, _oc_write_qkv, _OC_TRANSPOSED,
                  moe=_HUB_MOE)
    out.update({k: v.detach().clone().contiguous() for k, v in full.items()
                if k == "logit_bias" or k.startswith("prompter.")})
    return out


def from_hf(sd: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    return _import(sd, cfg, _HF_TOP, _HF_TOWERS, _HF_BLOCK, _hf_read_qkv,
                   "Hugging Face CLIPModel")


def to_hf(full: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return _export(full, cfg, _HF_TOP, _HF_TOWERS, _HF_BLOCK, _hf_write_qkv,
                   peer="Hugging Face CLIPModel")


def not_exported(full: dict, peer: str) -> list[str]:
    """Canonical names a dense export to ``peer`` (hf | open_clip) leaves out: the CLOC
    prompter (both) and the SigLIP logit bias (HF). Neither changes an embedding."""
    return sorted(k for k in full if k.startswith("prompter.")
                  or (k == "logit_bias" and peer == "hf"))


# --------------------------------------------------------------------------- configs

def _act(quick: bool) -> str:
    return "quick_gelu" if quick else "gelu"


def config_from_open_clip(model_cfg: dict, quick_gelu: bool | None = None) -> ModelConfig:
    """ModelConfig from an open_clip model config (the JSON in open_clip/model_configs)."""
    v, t = dict(model_cfg.get("vision_cfg", {})), dict(model_cfg.get("text_cfg", {}))
    unsupported = {
        "vision_cfg.timm_model_name": v.get("timm_model_name"),
        "vision_cfg.attentional_pool": v.get("attentional_pool"),
        "vision_cfg.no_ln_pre": v.get("no_ln_pre"),
        "vision_cfg.final_ln_after_pool": v.get("final_ln_after_pool"),
        "vision_cfg.ls_init_value": v.get("ls_init_value"),
        "text_cfg.hf_model_name": t.get("hf_model_name"),
        "text_cfg.final_ln_after_pool": t.get("final_ln_after_pool"),
        "text_cfg.proj_bias": t.get("proj_bias"),
        "text_cfg.ls_init_value": t.get("ls_init_value"),
        "text_cfg.no_causal_mask": t.get("no_causal_mask"),
        "text_cfg.embed_cls": t.get("embed_cls"),
    }
    for key, value in unsupported.items():
        if value:
            raise ConfigError(f"open_clip config {key}={value!r} is not supported by UpCLIP")
    if v.get("pool_type", "tok") != "tok":
        raise ConfigError(f"open_clip config vision_cfg.pool_type={v['pool_type']!r}: only 'tok'")
    if t.get("pool_type", "argmax") not in ("argmax", "eos"):
        raise ConfigError(f"open_clip config text_cfg.pool_type={t['pool_type']!r}: only "
                          "'argmax' or 'eos'")
    if not isinstance(v.get("layers", 12), int):
        raise ConfigError("open_clip config vision_cfg.layers: ResNet towers are not supported")
    quick = bool(model_cfg.get("quick_gelu", False)) if quick_gelu is None else quick_gelu
    vw = v.get("width", 768)
    vocab = t.get("vocab_size", 49408)
    eot = t.get("eos_id", 2) if t.get("pool_type") == "eos" else -1
    eps_v = (v.get("norm_kwargs") or {}).get("eps", 1e-5)
    eps_t = (t.get("norm_kwargs") or {}).get("eps", 1e-5)
    return ModelConfig(
        preset="", embed_dim=model_cfg["embed_dim"],
        vision=VisionConfig(image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 16),
                            width=vw, layers=v.get("layers", 12),
                            heads=vw // v.get("head_width", 64), mlp_ratio=v.get("mlp_ratio", 4.0),
                            act=_act(quick), ln_eps=eps_v),
        text=TextConfig(context_length=t.get("context_length", 77), vocab_size=vocab,
                        width=t.get("width", 512), layers=t.get("layers", 12),
                        heads=t.get("heads", 8), mlp_ratio=t.get("mlp_ratio", 4.0),
                        act=_act(quick), ln_eps=eps_t, eot_token_id=eot))


OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")  # not weights


def open_clip_config_of_openai(sd: dict) -> dict:
    """The open_clip model config of an OpenAI-CLIP ViT state dict, read from its shapes as
    open_clip's ``build_model_from_openai_state_dict`` does (64-wide heads, QuickGELU)."""
    if "visual.proj" not in sd:
        raise ConfigError("OpenAI state dict without visual.proj: ResNet towers are not "
                          "supported")
    conv = sd["visual.conv1.weight"]                                  # [width, 3, p, p]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    width = sd["ln_final.weight"].shape[0]
    return {"embed_dim": sd["text_projection"].shape[1], "quick_gelu": True,
            "vision_cfg": {"layers": _blocks(sd, "visual.transformer.resblocks."),
                           "width": conv.shape[0], "patch_size": conv.shape[-1],
                           "image_size": conv.shape[-1] * grid, "head_width": 64},
            "text_cfg": {"context_length": sd["positional_embedding"].shape[0],
                         "vocab_size": sd["token_embedding.weight"].shape[0], "width": width,
                         "heads": width // 64, "layers": _blocks(sd, "transformer.resblocks.")}}


def config_from_hf(hf) -> ModelConfig:
    """ModelConfig from a transformers ``CLIPConfig`` (object or dict)."""
    d = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
    v, t = d["vision_config"], d["text_config"]
    for key, c in (("vision_config", v), ("text_config", t)):
        if c.get("hidden_act", "quick_gelu") not in ("gelu", "quick_gelu"):
            raise ConfigError(f"Hugging Face config {key}.hidden_act={c['hidden_act']!r}: "
                              "only gelu / quick_gelu")
    eos = t.get("eos_token_id", 2)
    vocab = t["vocab_size"]
    return ModelConfig(
        preset="", embed_dim=d.get("projection_dim", 512),
        vision=VisionConfig(image_size=v["image_size"], patch_size=v["patch_size"],
                            width=v["hidden_size"], layers=v["num_hidden_layers"],
                            heads=v["num_attention_heads"],
                            mlp_ratio=v["intermediate_size"] / v["hidden_size"],
                            act=v.get("hidden_act", "quick_gelu"),
                            ln_eps=v.get("layer_norm_eps", 1e-5)),
        text=TextConfig(context_length=t["max_position_embeddings"], vocab_size=vocab,
                        width=t["hidden_size"], layers=t["num_hidden_layers"],
                        heads=t["num_attention_heads"],
                        mlp_ratio=t["intermediate_size"] / t["hidden_size"],
                        act=t.get("hidden_act", "quick_gelu"), ln_eps=t.get("layer_norm_eps", 1e-5),
                        # HF's legacy eos_token_id == 2 means argmax pooling, the largest id:
                        # our default (-1) as is an eos equal to the largest id
                        eot_token_id=-1 if eos in (2, vocab - 1) else eos))


def _moe_off(cfg: ModelConfig, peer: str) -> None:
    for name in ("vision", "text"):
        if getattr(cfg, name).moe.enabled:
            raise ConfigError(f"model.{name}.moe.num_experts={getattr(cfg, name).moe.num_experts}: "
                              f"{peer} has no experts (merge them first, or export the MoE model)")


def config_to_open_clip(cfg: ModelConfig) -> dict:
    """open_clip model config (the JSON of open_clip/model_configs) of a dense ModelConfig."""
    _moe_off(cfg, "open_clip")
    v, t = cfg.vision, cfg.text
    if v.act != t.act:
        raise ConfigError(f"model.vision.act={v.act!r} != model.text.act={t.act!r}: open_clip "
                          "has one quick_gelu flag for both towers")
    vision = dict(image_size=v.image_size, patch_size=v.patch_size, width=v.width,
                  layers=v.layers, head_width=v.width // v.heads, mlp_ratio=v.mlp_ratio)
    text = dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width,
                heads=t.heads, layers=t.layers, mlp_ratio=t.mlp_ratio)
    if t.eot_id != t.vocab_size - 1:  # argmax pooling finds the eot only when it is the max id
        text.update(pool_type="eos", eos_id=t.eot_id)
    for tower, c in ((vision, v), (text, t)):
        if c.ln_eps != 1e-5:
            tower["norm_kwargs"] = {"eps": c.ln_eps}
    out = {"embed_dim": cfg.embed_dim, "quick_gelu": v.act == "quick_gelu",
           "vision_cfg": vision, "text_cfg": text}
    if cfg.logit_bias_init is not None:
        out["init_logit_bias"] = cfg.logit_bias_init
    return out


def config_to_hf(cfg: ModelConfig) -> dict:
    """transformers ``CLIPConfig`` dict of a dense ModelConfig."""
    _moe_off(cfg, "Hugging Face CLIPModel")
    v, t = cfg.vision, cfg.text
    if t.eot_id == 2:
        raise ConfigError("model.text.eot_token_id=2: Hugging Face reads eos_token_id=2 as "
                          "'pool at the largest id' (legacy CLIP); not representable")

    def tower(c) -> dict:
        return dict(hidden_size=c.width, intermediate_size=int(c.width * c.mlp_ratio),
                    num_hidden_layers=c.layers, num_attention_heads=c.heads, hidden_act=c.act,
                    layer_norm_eps=c.ln_eps, attention_dropout=0.0, projection_dim=cfg.embed_dim)

    return {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": cfg.logit_scale_init,
        "text_config": dict(tower(t), vocab_size=t.vocab_size,
                            max_position_embeddings=t.context_length, eos_token_id=t.eot_id,
                            bos_token_id=max(t.eot_id - 1, 0), pad_token_id=t.eot_id),
        "vision_config": dict(tower(v), image_size=v.image_size, patch_size=v.patch_size,
                              num_channels=3),
    }
