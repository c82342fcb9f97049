"""The parameter-naming contract of UpCLIP's canonical state dict (trainer/models/state.py).

Every module that reads or writes parameters by name (upcycling, expert merging, export, the
open_clip / HF / hub converters, DMU assembly, ``train.trainable`` and the learning-rate groups)
asks this module; the MoE layer (trainer/moe/layer.py) is built so its parameters carry these
names. Renaming a submodule means changing it here, and the tests that build a model and
look its names up here fail if the two disagree.

    <tower>.transformer.layers.<i>.mlp.                     one block's MLP (``mlp_prefix``)
        linear_fc1.weight [f, d]  linear_fc1.bias [f]       a dense MLP (megatron-core names)
        linear_fc2.weight [d, f]  linear_fc2.bias [d]
        deepspeed_moe.gate.wg.weight  [E, d]                an MoE MLP: the router
        deepspeed_moe.experts.w1 [E, d, f]  .b1 [E, f]      and the stacked experts
        deepspeed_moe.experts.w2 [E, f, d]  .b2 [E, d]

A parameter's kind (which learning-rate multiplier applies) is an attribute set where the
parameter is made (``mark``), not a substring of its name.
"""
from __future__ import annotations

import torch

TOWERS = (("visual", "vision"), ("text", "text"))   # canonical prefix, ModelConfig field
DISPATCH = "deepspeed_moe"                          # MoEMLP's dispatch submodule (DeepSpeed's name)
ROUTER = f"{DISPATCH}.gate.wg.weight"               # relative to the block's ``mlp.``
EXPERTS = f"{DISPATCH}.experts."
EXPERT_TENSORS = ("w1", "b1", "w2", "b2")
FC1_WEIGHT, FC1_BIAS = "linear_fc1.weight", "linear_fc1.bias"
FC2_WEIGHT, FC2_BIAS = "linear_fc2.weight", "linear_fc2.bias"
DENSE_FFN = (FC1_WEIGHT, FC1_BIAS, FC2_WEIGHT, FC2_BIAS)

# train.trainable entries -> glob patterns over canonical names
TRAINABLE_SETS = {
    "ffn": ("*.mlp.linear_fc1.*", "*.mlp.linear_fc2.*", f"*.mlp.{EXPERTS}*"),
    "experts": (f"*.mlp.{EXPERTS}*",),
    "router": (f"*.mlp.{DISPATCH}.gate.*",),
}

KIND_ATTR = "upclip_kind"
KINDS = ("dense", "expert", "router")


def mlp_prefix(tower_prefix: str, layer: int) -> str:
    """``visual``, 3 -> ``visual.transformer.layers.3.mlp.``"""
    return f"{tower_prefix}.transformer.layers.{layer}.mlp."


def expert_key(mlp: str, tensor: str) -> str:
    """``mlp_prefix(...)``, ``w1`` -> the stacked expert tensor's canonical name."""
    return f"{mlp}{EXPERTS}{tensor}"


def router_key(mlp: str) -> str:
    return mlp + ROUTER


def moe_mlp_prefixes(model_cfg) -> list[str]:
    """The ``mlp.`` prefixes of every MoE block of both towers, in order."""
    out = []
    for prefix, field in TOWERS:
        tower = getattr(model_cfg, field)
        out += [mlp_prefix(prefix, i) for i in tower.moe.moe_layers(tower.layers)]
    return out


def mark(param: torch.nn.Parameter, kind: str) -> torch.nn.Parameter:
    """Tags ``param`` with its kind (``expert`` | ``router``); untagged parameters are dense."""
    assert kind in KINDS, kind
    setattr(param, KIND_ATTR, kind)
    return param


def kind_of(param: torch.nn.Parameter) -> str:
    """expert | router | dense: which learning-rate multiplier applies."""
    return getattr(param, KIND_ATTR, "dense")
