"""The MoE MLP: the ``mlp`` submodule of a megatron-core ``TransformerLayer``.

    out = sum_j w_j * expert_{e_j}(x)        e_j, w_j: the router's top-k choice for x's unit

Megatron calls ``mlp(x [s, b, d], padding_mask=[b, s] True for real tokens)`` and adds the
returned bias (None here: each expert applies its own fc2 bias) in bias-dropout-add. The unit
of routing is a token, or a whole image (``routing: image``, Mobile V-MoE: the class token or
the mean token decides for all of the image's tokens). At TP > 1 each TP rank routes 1/tp of
the units (see dispatch.py). The weighted router aux losses ride on the output through
megatron's ``MoEAuxLossAutoScaler``, so their gradient reaches the router on every pipeline
stage with no loss plumbing.

Mobile V-MoE's super-class guidance (``aux.superclass > 0``, image routing): the training step
hands each MoE layer the microbatch's class labels (``class_labels``, set by
``trainer.step.forward_step``); the layer maps them to super-classes through
``superclass_map`` and adds the weighted cross-entropy between the router logits and the
super-class to the aux losses. That loss reaches the router weights only (the router input is
detached for it): it guides routing without turning into a classification loss on the tower.
``force_expert(model, e)`` routes every unit to expert e alone.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import make_sharded_tensor_for_checkpoint

from trainer.moe import names
from trainer.moe.config import MoEConfig
from trainer.moe.dispatch import (CapacityDispatch, busiest_expert, dropless_dispatch,
                                  gather_from_tp, scatter_to_tp)
from trainer.moe.experts import GroupedExperts
from trainer.moe.groups import use_megatron_groups
from trainer.moe.router import Router
from trainer.moe.routing import Routing, aux_losses, expert_counts, superclass_loss

AUX_LOSSES = ("load_balance", "z_loss", "entropy_local", "entropy_global", "superclass")


class MoEMLP(MegatronModule):
    def __init__(self, config: TransformerConfig, moe: MoEConfig, activation: str,
                 tower: str = "", **_):
        super().__init__(config=config)
        group = use_megatron_groups()
        self.cfg = moe
        self.ep = ps.get_expert_model_parallel_world_size()
        self.ep_rank = ps.get_expert_model_parallel_rank()
        self.tp = ps.get_tensor_model_parallel_world_size()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.ep_group = ps.get_expert_model_parallel_group()
        self.tp_group = ps.get_tensor_model_parallel_group()
        num_local = moe.num_experts // self.ep
        router = Router(config.hidden_size, moe)
        # The router sees only this TP rank's units: its gradient is summed over TP.
        router.wg.weight.sequence_parallel = True
        names.mark(router.wg.weight, "router")
        experts = GroupedExperts(num_local, config.hidden_size, config.ffn_hidden_size,
                                 activation, config.init_method_std, config.params_dtype, group,
                                 backend=moe.expert_backend)
        for p in experts.parameters():
            names.mark(p, "expert")
        # DeepSpeed's MOELayer owns the gate and the experts: the attribute is names.DISPATCH,
        # so the state keys are names.ROUTER and names.EXPERTS + w1 ... (as in DeepSpeed's MoE).
        self.deepspeed_moe = CapacityDispatch(router, experts, self.ep, num_local)
        self.deepspeed_moe._set_ep_group(self.ep_group)
        self.layer_number, self.tower = 0, tower
        # the experts' backend is logged by the first rank of each pipeline stage only
        self.logs_backend = ps.get_data_parallel_rank() == 0 and self.tp_rank == 0
        self.stats: dict[str, torch.Tensor] = {}
        # super-class guided routing: class label -> expert, and this microbatch's labels
        self.uses_class_labels = moe.aux.superclass > 0
        self.class_labels: torch.Tensor | None = None
        if self.uses_class_labels:
            self.register_buffer("superclass_of_class", torch.tensor(moe.superclasses()),
                                 persistent=False)

    @property
    def router(self) -> Router:
        return self.deepspeed_moe.gate

    @property
    def experts(self) -> GroupedExperts:
        return self.deepspeed_moe.experts

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number  # megatron's, 1-based
        if self.logs_backend:
            self.experts.log_name = f"{self.tower or 'layer'}.{layer_number - 1}"

    # ---- forward

    def _units(self, x: torch.Tensor, padding_mask: torch.Tensor | None):
        """[s, b, d] -> (tokens [U, n, d], router input [U, d], valid [U]) where a unit is a
        token (n = 1) or an image (n = s)."""
        s, b, d = x.shape
        if self.cfg.routing == "image":
            tokens = x.transpose(0, 1)                              # [b, s, d]
            pooled = tokens[:, 0] if self.cfg.image_router_input == "cls" else tokens.mean(1)
            return tokens, pooled, torch.ones(b, dtype=torch.bool, device=x.device)
        valid = (padding_mask.t().reshape(-1).bool() if padding_mask is not None
                 else torch.ones(s * b, dtype=torch.bool, device=x.device))
        flat = x.reshape(s * b, 1, d)
        return flat, flat[:, 0], valid

    def _superclass_targets(self, units: int, device) -> torch.Tensor | None:
        """[units] super-class (expert) of each image, -1 where the class label is missing or
        outside the map; None when this microbatch carries no labels."""
        if not self.uses_class_labels or self.class_labels is None:
            return None
        labels = self.class_labels.to(device).long()
        if labels.shape != (units,):
            raise ValueError(f"super-class routing: {tuple(labels.shape)} class labels for "
                             f"{units} images")
        lut = self.superclass_of_class
        known = (labels >= 0) & (labels < lut.numel())
        return torch.where(known, lut[labels.clamp(0, lut.numel() - 1)], -1)

    def forward(self, hidden: torch.Tensor, padding_mask: torch.Tensor | None = None, **_):
        s, b, d = hidden.shape
        tokens, router_in, valid = self._units(hidden, padding_mask)
        units, per_unit = tokens.shape[:2]
        targets = self._superclass_targets(units, hidden.device)
        pad = -units % self.tp                                      # units split evenly over TP
        if pad:
            tokens = torch.cat([tokens, tokens.new_zeros(pad, per_unit, d)])
            router_in = torch.cat([router_in, router_in.new_zeros(pad, d)])
            valid = torch.cat([valid, valid.new_zeros(pad)])
            if targets is not None:
                targets = torch.cat([targets, targets.new_full((pad,), -1)])
        tokens = scatter_to_tp(tokens, self.tp_group, self.tp)
        router_in = scatter_to_tp(router_in, self.tp_group, self.tp)
        valid = valid.chunk(self.tp)[self.tp_rank]

        routing, logits, probs, chosen = self.router(router_in, valid, self._capacity_fn())
        flat = tokens.reshape(-1, d)
        routing = _expand(routing, per_unit)
        if self.cfg.dispatch == "dropless" or routing.capacity is None:  # forced: no capacity
            out = dropless_dispatch(flat, routing, self.experts, self.ep_group, self.ep)
        else:
            out = self.deepspeed_moe(flat, routing)
        out = gather_from_tp(out.view(-1, per_unit, d), self.tp_group, self.tp)[:units]
        out = out.transpose(0, 1) if self.cfg.routing == "image" else out.view(s, b, d)
        out = out.to(hidden.dtype)                                  # [s, b, d]

        losses = aux_losses(logits, probs, chosen, valid, self.cfg.global_threshold(),
                            self.cfg.aux.load_balance_mask)
        if targets is not None:  # trains the router alone: its input is detached here
            losses["superclass"] = superclass_loss(
                F.linear(router_in.detach().float(), self.router.wg.weight.float()),
                targets.chunk(self.tp)[self.tp_rank])
        self._record(routing, valid, losses)
        if torch.is_grad_enabled():
            total = sum(getattr(self.cfg.aux, n) * losses[n] for n in AUX_LOSSES if n in losses)
            out = MoEAuxLossAutoScaler.apply(out, total / self.tp)
        return out, None

    def _capacity_fn(self):
        if self.cfg.dispatch == "dropless":
            return lambda chosen, valid: None
        if self.cfg.drop_tokens:
            return None  # the router's capacity-factor rule
        return functools.partial(busiest_expert, num_experts=self.cfg.num_experts,
                                 group=self.ep_group, ep=self.ep)

    # ---- statistics for logging (accumulated over microbatches until popped)

    def _record(self, routing, valid, losses) -> None:
        with torch.no_grad():
            units = valid.sum().float()
            new = {"tokens_per_expert": expert_counts(routing.experts, self.cfg.num_experts),
                   "routes_wanted": routing.wanted.float(),
                   "routes_kept": (routing.experts >= 0).sum().float(),
                   "entropy_sum": losses["entropy_local"].detach() * units, "units": units,
                   **{f"aux_{k}": v.detach() for k, v in losses.items()}, "calls": torch.ones(())}
            for k, v in new.items():
                self.stats[k] = self.stats[k] + v if k in self.stats else v.clone()

    def pop_stats(self) -> dict[str, torch.Tensor]:
        out, self.stats = self.stats, {}
        return out

    # ---- checkpointing: the router is replicated, experts are sharded over EP

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        out = {prefix + names.ROUTER: make_sharded_tensor_for_checkpoint(
            self.router.wg.weight, prefix + names.ROUTER, prepend_offsets=sharded_offsets)}
        edp_rank = ps.get_expert_data_parallel_rank()
        axis = len(sharded_offsets)
        for name, p in self.experts.named_parameters():
            key = names.expert_key(prefix, name)
            out[key] = ShardedTensor.from_rank_offsets(
                key, p, *sharded_offsets, (axis, self.ep_rank, self.ep),
                replica_id=(0, 0, edp_rank), prepend_axis_num=axis)
        return out


def _expand(routing, per_unit: int):
    """Unit routing -> token routing: an image's n tokens follow its decision, taking n
    consecutive capacity slots (capacity counts images, the buffers count tokens)."""
    if per_unit == 1:
        return routing
    k = routing.experts.shape[1]
    offs = torch.arange(per_unit, device=routing.slots.device).view(1, per_unit, 1)
    rep = lambda t: t.unsqueeze(1).expand(-1, per_unit, k).reshape(-1, k)  # noqa: E731
    slots = (routing.slots.unsqueeze(1) * per_unit + offs).reshape(-1, k)
    return Routing(rep(routing.experts), torch.where(rep(routing.experts) >= 0, slots, 0),
                   rep(routing.weights),
                   None if routing.capacity is None else routing.capacity * per_unit,
                   routing.wanted * per_unit)


def moe_mlps(model: torch.nn.Module) -> list[MoEMLP]:
    """Every MoE layer of ``model`` (a CLIP stage, DDP-wrapped or not), in module order."""
    return [m for m in model.modules() if isinstance(m, MoEMLP)]


@contextlib.contextmanager
def force_expert(model: torch.nn.Module, expert: int):
    """Within the block every MoE layer sends every unit to ``expert`` alone (weight 1, no
    capacity limit): the model computes what that expert's dense model computes."""
    layers = moe_mlps(model)
    for m in layers:
        if not 0 <= expert < m.cfg.num_experts:
            raise ValueError(f"force_expert: expert {expert} outside [0, {m.cfg.num_experts})")
    before = [m.router.forced_expert for m in layers]
    for m in layers:
        m.router.forced_expert = expert
    try:
        yield
    finally:
        for m, old in zip(layers, before):
            m.router.forced_expert = old
