"""Sparse upcycling (CLIP-UP): a dense CLIP checkpoint -> an MoE CLIP, by config.

Every MLP that ``model.{vision,text}.moe`` selects becomes ``num_experts`` exact copies of the
dense MLP (fc1 and fc2, biases included) plus a router (zeros or small normal, per config);
every other weight is copied. With the router's top-k weights renormalised and no token
dropped, the upcycled model computes what the dense one did.

This module holds the state-dict transformation (pure torch, canonical names from
trainer/moe/names.py); trainer/upcycle.py applies it to checkpoints (``python -m
trainer.upcycle``, and ``checkpoint.upcycle_from=CKPT`` at the start of training).
"""
from __future__ import annotations

import copy

import torch

from trainer.config import ModelConfig
from trainer.moe import names
from trainer.moe.names import TOWERS

_ARCH_FIELDS = ("width", "layers", "heads", "mlp_ratio", "act", "ln_eps")


class UpcycleError(ValueError):
    pass


def dense_config(model: ModelConfig) -> ModelConfig:
    """The same architecture with every tower dense."""
    out = copy.deepcopy(model)
    out.vision.moe.num_experts = 0
    out.text.moe.num_experts = 0
    return out


def upcycle_state_dict(dense: dict[str, torch.Tensor], model: ModelConfig,
                       seed: int = 0) -> dict[str, torch.Tensor]:
    """Canonical dense state dict -> canonical MoE state dict (same on every rank)."""
    out = dict(dense)
    gen = torch.Generator().manual_seed(seed)
    for prefix, name in TOWERS:
        tower = getattr(model, name)
        moe = tower.moe
        for i in moe.moe_layers(tower.layers):
            mlp = names.mlp_prefix(prefix, i)
            try:
                fc1_w, fc1_b, fc2_w, fc2_b = (out.pop(mlp + n) for n in names.DENSE_FFN)
            except KeyError as e:
                raise UpcycleError(f"dense state dict has no {e.args[0]} (is block {i} of the "
                                   f"{name} tower dense there?)") from None
            e = moe.num_experts
            copies = lambda t: t.unsqueeze(0).repeat(e, *([1] * t.dim())).contiguous()  # noqa: E731
            out[names.expert_key(mlp, "w1")] = copies(fc1_w.t())   # [E, d, f]
            out[names.expert_key(mlp, "b1")] = copies(fc1_b)       # [E, f]
            out[names.expert_key(mlp, "w2")] = copies(fc2_w.t())   # [E, f, d]
            out[names.expert_key(mlp, "b2")] = copies(fc2_b)       # [E, d]
            router = torch.zeros(e, tower.width, dtype=fc1_w.dtype)
            if moe.router_init == "normal":
                router.normal_(0.0, moe.router_init_std, generator=gen)
            out[names.router_key(mlp)] = router
    return out


def check_same_architecture(saved: ModelConfig, wanted: ModelConfig, where: str) -> None:
    for _, name in TOWERS:
        for f in _ARCH_FIELDS + (("image_size", "patch_size") if name == "vision" else
                                 ("context_length", "vocab_size")):
            a, b = getattr(getattr(saved, name), f), getattr(getattr(wanted, name), f)
            if a != b:
                raise UpcycleError(f"{where}: model.{name}.{f}={a} but the config asks for {b}")
        if getattr(saved, name).moe.enabled:
            raise UpcycleError(f"{where}: model.{name} is already MoE; upcycle a dense "
                               f"checkpoint")
    if saved.embed_dim != wanted.embed_dim:
        raise UpcycleError(f"{where}: model.embed_dim={saved.embed_dim} but the config asks "
                           f"for {wanted.embed_dim}")
