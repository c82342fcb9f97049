"""MoE configuration of one tower (``model.vision.moe`` / ``model.text.moe``); no torch import.

Which layers are MoE: ``every=k`` makes blocks k-1, 2k-1, ... MoE (``every=2``: every other
block, ending at the last one when the depth is even, as in V-MoE / CLIP-UP), ``last=n`` the
last n blocks, ``layers=[...]`` an explicit list of 0-based block indices. Exactly one of them
is set when ``num_experts > 0``; ``num_experts = 0`` leaves the tower dense.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path


class MoEConfigError(ValueError):
    pass


NOISY_GATES = ("none", "jitter", "rsample")
ROUTER_INITS = ("normal", "zeros")
DISPATCHES = ("capacity", "dropless")
ROUTINGS = ("token", "image")
IMAGE_ROUTER_INPUTS = ("cls", "mean")
# how capacity follows the capacity factor (trainer/moe/routing.py ``capacity_for``):
# deepspeed ceil(U / E * CF * k) (DeepSpeed, Megatron); axlearn floor(U * CF / E) rounded up to
# a multiple of 4, no ``* k`` (AXLearn, the framework of CLIP-UP)
CAPACITY_RULES = ("deepspeed", "axlearn")
# which choices the load-balance fraction f_e counts: every one of the k (topk: DeepSpeed's
# topkgating for k > 2) or the first (top1: DeepSpeed's top2gating, AXLearn's Top2Gating)
LOAD_BALANCE_MASKS = ("topk", "top1")
# kernels.BACKENDS (kernels/api.py; equal, tested): who runs the experts' grouped MLP
EXPERT_BACKENDS = ("auto", "cuda", "torch", "reference")


@dataclass
class AuxLossConfig:
    """Router auxiliary loss weights (0 turns a loss off)."""
    load_balance: float = 0.01    # GShard/Switch: E * sum_e f_e * P_e (1.0 when balanced)
    # f_e counts every top-k choice (topk, the default: the golden curves were made with it)
    # or the first choice only (top1: DeepSpeed's top-2 gate, AXLearn's Top2Gating)
    load_balance_mask: str = "topk"
    z_loss: float = 0.0           # ST-MoE: mean over tokens of logsumexp(logits)^2
    entropy_local: float = 0.0    # LIMoE: mean per-token routing entropy (sharp choices)
    entropy_global: float = 0.0   # LIMoE: max(0, threshold - entropy of the mean routing)
    entropy_global_threshold: float = -1.0  # < 0: log(num_experts), i.e. always active
    # Mobile V-MoE: cross-entropy between an image's router logits and its super-class (the
    # expert ``superclass_map`` assigns to its class label); image routing only.
    superclass: float = 0.0


@dataclass
class MoEConfig:
    num_experts: int = 0          # experts E per MoE block; 0: dense tower
    every: int = 0                # MoE at blocks k-1, 2k-1, ...
    last: int = 0                 # MoE at the last n blocks
    layers: list[int] = field(default_factory=list)  # explicit 0-based block indices
    top_k: int = 2                # experts per token (or image): 1 or 2
    # capacity per expert from the factor: deepspeed ceil(units / E * factor * top_k) (the
    # default: every config before the option trained with it); axlearn floor(units * factor / E)
    # rounded up to a multiple of 4, no top_k (CLIP-UP's framework). See CAPACITY_RULES.
    capacity_rule: str = "deepspeed"
    capacity_factor: float = 2.0  # capacity factor in training (see capacity_rule)
    eval_capacity_factor: float = 2.0  # capacity_factor at evaluation / inference
    min_capacity: int = 4         # never fewer slots per expert (axlearn: its expert_capacity)
    drop_tokens: bool = True      # capacity mode only; False: capacity = the busiest expert's load
    dispatch: str = "capacity"    # capacity (DeepSpeed buffers + all-to-all) | dropless (ragged)
    # auto: the CUDA extension when built and the call fits, else torch's grouped mm where it
    # runs without a host sync (CPU bf16/fp16, CUDA bf16 on sm90/sm100), else the reference loop
    expert_backend: str = "auto"  # auto | cuda | torch | reference (kernels/README.md)
    noisy_gate: str = "none"      # none | jitter (multiplicative, on inputs) | rsample (Gumbel)
    # normal: small random logits, so step-0 routing spreads tokens over the experts. zeros
    # ties every probability at 1/E: top-k then sends every token to the same experts, which
    # overflows their capacity (drops break function preservation) unless capacity is ample.
    router_init: str = "normal"   # normal | zeros
    router_init_std: float = 0.02  # std of the router weights when router_init=normal
    routing: str = "token"        # token | image (Mobile V-MoE: one decision per image)
    image_router_input: str = "cls"  # image routing reads the class token or the mean token
    # Class label -> super-class (= expert index), used when aux.superclass > 0: the list
    # itself, or a JSON file holding it (or {"superclass_of_class": [...]}, which
    # `python -m trainer.dmu.superclass` writes from k-means of class-name text embeddings).
    superclass_map: str | list[int] = ""
    aux: AuxLossConfig = field(default_factory=AuxLossConfig)  # router aux loss weights

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    @property
    def dropless(self) -> bool:
        """No token is dropped: ragged dispatch, or capacity raised to the busiest expert."""
        return self.dispatch == "dropless" or not self.drop_tokens

    def moe_layers(self, num_layers: int) -> list[int]:
        """The 0-based block indices that are MoE in a tower of ``num_layers`` blocks."""
        if not self.enabled:
            return []
        if self.every:
            return list(range(self.every - 1, num_layers, self.every))
        if self.last:
            return list(range(num_layers - self.last, num_layers))
        return sorted(self.layers)

    def global_threshold(self) -> float:
        t = self.aux.entropy_global_threshold
        return math.log(self.num_experts) if t < 0 else t

    def validate(self, key: str, num_layers: int, tower: str, ep: int) -> None:
        def err(msg: str) -> MoEConfigError:
            return MoEConfigError(f"{key}.{msg}")

        if self.num_experts < 0:
            raise err(f"num_experts={self.num_experts} must be >= 0")
        if not self.enabled:
            return
        chosen = [n for n, v in (("every", self.every), ("last", self.last),
                                 ("layers", self.layers)) if v]
        if len(chosen) != 1:
            raise err(f"num_experts={self.num_experts}: set exactly one of every, last, layers "
                      f"(got {', '.join(chosen) or 'none'})")
        if self.every < 0 or self.last < 0 or self.last > num_layers:
            raise err(f"every={self.every} / last={self.last} out of range for {num_layers} "
                      f"layers")
        bad = [i for i in self.layers if not 0 <= i < num_layers]
        if bad or len(set(self.layers)) != len(self.layers):
            raise err(f"layers={self.layers}: indices must be distinct and in [0, {num_layers})")
        if not self.moe_layers(num_layers):
            raise err(f"every={self.every} selects no layer of {num_layers}")
        if self.top_k not in (1, 2) or self.top_k > self.num_experts:
            raise err(f"top_k={self.top_k}: expected 1 or 2, at most num_experts="
                      f"{self.num_experts}")
        if self.num_experts % ep:
            raise err(f"num_experts={self.num_experts} is not divisible by parallel.ep={ep}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            if getattr(self, name) <= 0:
                raise err(f"{name}={getattr(self, name)} must be > 0")
        if self.min_capacity < 0:
            raise err(f"min_capacity={self.min_capacity} must be >= 0")
        for name, allowed in (("dispatch", DISPATCHES), ("capacity_rule", CAPACITY_RULES),
                              ("expert_backend", EXPERT_BACKENDS),
                              ("noisy_gate", NOISY_GATES),
                              ("router_init", ROUTER_INITS), ("routing", ROUTINGS),
                              ("image_router_input", IMAGE_ROUTER_INPUTS)):
            if getattr(self, name) not in allowed:
                raise err(f"{name}={getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        if self.aux.load_balance_mask not in LOAD_BALANCE_MASKS:
            raise err(f"aux.load_balance_mask={self.aux.load_balance_mask!r}: expected one of "
                      f"{', '.join(LOAD_BALANCE_MASKS)}")
        if self.routing == "image" and tower != "vision":
            raise err("routing='image' is for the vision tower only")
        for name in ("load_balance", "z_loss", "entropy_local", "entropy_global", "superclass"):
            if getattr(self.aux, name) < 0:
                raise err(f"aux.{name}={getattr(self.aux, name)} must be >= 0")
        if self.aux.superclass > 0:
            if self.routing != "image":
                raise err(f"aux.superclass={self.aux.superclass} needs routing='image' (one "
                          f"decision per image; got {self.routing!r})")
            try:  # empty: given per run (like checkpoint.upcycle_from); checked when used
                if self.superclass_map not in ("", []):
                    self.superclasses()
            except ValueError as e:
                raise err(str(e)) from None

    def superclasses(self) -> list[int]:
        """Class label -> super-class (expert) from ``superclass_map``; ValueError naming the
        field when the list or the file is missing or malformed."""
        raw = self.superclass_map
        if isinstance(raw, str):
            path = Path(raw) if raw else None
            if path is None or not path.is_file():
                raise ValueError(f"superclass_map={raw!r}: no such file (give a list of one "
                                 "expert index per class label, or a JSON file holding it)")
            try:
                raw = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"superclass_map={self.superclass_map!r}: not valid JSON "
                                 f"({e.msg})") from None
        if isinstance(raw, dict):
            raw = raw.get("superclass_of_class")
        if (not isinstance(raw, list) or not raw
                or not all(isinstance(v, int) and 0 <= v < self.num_experts for v in raw)):
            raise ValueError(f"superclass_map={self.superclass_map!r}: expected a non-empty "
                             f"list of expert indices in [0, {self.num_experts}) (or "
                             '{"superclass_of_class": [...]})')
        return list(raw)
