"""AdamW over UpCLIP's parameter groups, and the learning-rate schedule.

    opt = build_optimizer(model, cfg.train)
    set_lr(opt, lr_at(step, cfg.train)); opt.step()

Mixed precision the megatron way: a model with bf16 parameters gets ``MasterWeightAdamW``,
which keeps an fp32 master copy of every trainable parameter, steps AdamW (fp32 moments) on
the masters with DDP's fp32 reduced gradients (``param.main_grad``), and writes the masters
back into the bf16 parameters. No loss scaling (bf16 has fp32's exponent range).
Checkpoints save the masters as the model's weights (trainer/checkpoint.py), so bf16 and fp32
runs resume each other.

Up to six param groups: (dense | expert | router) x (decay | no decay). A parameter's kind is
the tag its module gave it (trainer/moe/names.py ``mark``); each group carries ``lr_mult``
(``train.lr_mult_experts``, ``train.lr_mult_routers``), which ``set_lr`` applies.
"""
from __future__ import annotations

import math

import torch

from trainer.config import TrainConfig
from trainer.distributed.grads import grad_of, unwrap
from trainer.moe.names import kind_of


def no_weight_decay(name: str, p: torch.nn.Parameter) -> bool:
    """As open_clip: gains, biases (the experts' stacked ``b1``/``b2`` too), rank-1 embeddings
    (the class embedding) and the logit scale/bias."""
    return p.ndim < 2 or "logit_" in name or name.endswith(("bias", "experts.b1", "experts.b2"))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA) over the trainable parameters of this pipeline stage."""
    from trainer.models.state import canonical_names

    mult = {"dense": 1.0, "expert": cfg.lr_mult_experts, "router": cfg.lr_mult_routers}
    groups: dict[tuple[str, bool], list] = {}
    for name, p in unwrap(model).named_parameters():
        if p.requires_grad:
            groups.setdefault((kind_of(p), not no_weight_decay(name, p)), []).append(p)
    if not groups:
        example = next(iter(canonical_names(unwrap(model)).values()))
        raise ValueError(f"train.trainable={cfg.trainable!r} selects no parameter of this model "
                         f"(pipeline stage); canonical names look like {example!r}")
    param_groups = [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0,
                     "lr_mult": mult[kind], "name": f"{kind}_{'decay' if decay else 'no_decay'}"}
                    for (kind, decay), ps in sorted(groups.items())]
    kind = MasterWeightAdamW if any(p.dtype != torch.float32 for g in param_groups
                                    for p in g["params"]) else torch.optim.AdamW
    return kind(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                fused=torch.cuda.is_available())


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW on fp32 masters of low-precision parameters (see the module docstring).

    ``param_groups`` hold the masters; ``model_params`` lists the model's parameters in the
    same order (the optimizer's state numbering), and ``master_of(p)`` finds a parameter's
    master: the checkpoint code keys the moments by the model's parameters and saves and
    loads the masters in place of the weights.
    """

    def __init__(self, param_groups: list[dict], **kwargs):
        self.model_params = [p for g in param_groups for p in g["params"]]
        self._masters = {id(p): p.detach().float().clone() for p in self.model_params}
        groups = [dict(g, params=[self._masters[id(p)] for p in g["params"]])
                  for g in param_groups]
        super().__init__(groups, **kwargs)

    def master_of(self, param: torch.nn.Parameter) -> torch.Tensor | None:
        return self._masters.get(id(param))

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "MasterWeightAdamW.step takes no closure"
        for p in self.model_params:
            g = grad_of(p)
            self._masters[id(p)].grad = None if g is None else g.float()
        super().step()
        for p in self.model_params:
            p.copy_(self._masters[id(p)])

    @torch.no_grad()
    def sync_params_from_masters(self) -> None:
        """After the masters were loaded (checkpoint resume): the bf16 weights follow."""
        for p in self.model_params:
            p.copy_(self._masters[id(p)])

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for p in self.model_params:
            p.grad = None


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (1-based): linear warmup from 0 over
    ``warmup_steps``, then cosine decay from ``lr`` to ``lr * min_lr_ratio`` at ``steps`` (or
    constant)."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)


def clamp_logit_scale(model: torch.nn.Module, max_scale: float,
                      optimizer: torch.optim.Optimizer | None = None) -> None:
    """CLIP clamps the learned temperature: exp(logit_scale) <= max_scale (on the fp32 master
    too when ``optimizer`` keeps one, or the next step would undo the clamp)."""
    model = unwrap(model)
    if hasattr(model, "logit_scale"):
        master_of = getattr(optimizer, "master_of", None)
        master = master_of(model.logit_scale) if master_of else None
        with torch.no_grad():
            for t in (model.logit_scale, master):
                if t is not None:
                    t.clamp_(0, math.log(max_scale))
