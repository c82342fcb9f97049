"""DMU assembly: the FFN sets of the dense model and of each MCL stage become the experts of
one MoE CLIP (expert 0 = the dense FFN, expert k = stage k's), with a fresh router.

Every weight outside the FFNs of the MoE blocks comes from the dense checkpoint; each stage
must have left those weights bit-identical (the stages train only those FFNs), which is
checked. Expert e is then an exact copy of stage e's FFN, so with every unit forced to expert
e (``trainer.moe.layer.force_expert``) the assembled model computes what stage e's dense model
does: ``assemble`` measures that on a probe batch and the pairwise distances between experts,
and records both in the checkpoint's manifest (``extra.dmu``) and ``assembled/DONE.json``.
"""
from __future__ import annotations

import copy
import logging

import torch
import torch.distributed as dist

from trainer.config import Config, ModelConfig, config_to_dict
from trainer.distributed.device import default_device
from trainer.distributed.layout import ParallelLayout
from trainer.moe import names
from trainer.moe.upcycle import dense_config, upcycle_state_dict

log = logging.getLogger("upclip")

class DMUError(ValueError):
    pass


def ffn_patterns(model: ModelConfig) -> list[str]:
    """``train.trainable`` globs for the MCL stages: the FFNs of the blocks that become MoE."""
    return [f"{p}{name}" for p in names.moe_mlp_prefixes(model) for name in names.DENSE_FFN]


def stage_ffn(full: dict[str, torch.Tensor], dense: dict[str, torch.Tensor],
              model: ModelConfig, stage: int) -> dict[str, torch.Tensor]:
    """The FFN tensors of the MoE blocks from a stage's full state dict; raises DMUError when
    the stage changed any other weight."""
    ffn = {p + n for p in names.moe_mlp_prefixes(model) for n in names.DENSE_FFN}
    for name, value in dense.items():
        if name not in ffn and not torch.equal(full[name], value):
            raise DMUError(f"stage {stage} changed {name}, which is not an FFN of an MoE block "
                           "(the MCL stages must train only those; see dmu.stage overrides)")
    return {name: full[name] for name in ffn}


def assemble_state_dict(dense: dict[str, torch.Tensor], stages: list[dict[str, torch.Tensor]],
                        model: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Canonical MoE state dict: experts [dense FFN, stage 1 FFN, ...], router per config."""
    out = upcycle_state_dict(dense, model, seed=seed)
    for e, ffn in enumerate(stages, start=1):
        for mlp in names.moe_mlp_prefixes(model):
            out[names.expert_key(mlp, "w1")][e] = ffn[mlp + names.FC1_WEIGHT].t()   # [d, f]
            out[names.expert_key(mlp, "b1")][e] = ffn[mlp + names.FC1_BIAS]
            out[names.expert_key(mlp, "w2")][e] = ffn[mlp + names.FC2_WEIGHT].t()   # [f, d]
            out[names.expert_key(mlp, "b2")][e] = ffn[mlp + names.FC2_BIAS]
    return out


def expert_distances(state: dict[str, torch.Tensor], model: ModelConfig) -> list[list[float]]:
    """[E, E]: ||expert a - expert b|| / ||expert a|| (all four tensors flattened), averaged
    over the MoE blocks."""
    mlps = names.moe_mlp_prefixes(model)
    flat = [torch.cat([state[names.expert_key(m, n)].flatten(1).double()
                       for n in names.EXPERT_TENSORS], dim=1) for m in mlps]   # [E, P] each
    e = flat[0].shape[0]
    return [[sum(float((f[a] - f[b]).norm() / f[a].norm()) for f in flat) / len(flat)
             for b in range(e)] for a in range(e)]


def assemble(cfg: Config, sources: list[str], out_root: str, layout: ParallelLayout) -> dict:
    """Collective. ``cfg``: the MoE (router-phase) config; ``sources``: the dense checkpoint,
    then the stage checkpoints. Saves the assembled model to ``out_root`` (step 0, no
    optimizer) and returns the measurements."""
    from trainer import checkpoint
    from trainer.models.build import build_for_training
    from trainer.dmu.labels import forward_features
    from trainer.models.state import full_state_dict, load_full_state_dict
    from trainer.moe.layer import force_expert
    from trainer.signals import stop_signals_blocked
    from trainer.data.batches import synthetic_microbatches

    device = default_device()
    dense_cfg = copy.deepcopy(cfg)
    dense_cfg.model = dense_config(cfg.model)
    dense_cfg.train.trainable = []
    probe = {k: v.to(device) if torch.is_tensor(v) else v
             for k, v in synthetic_microbatches(cfg, layout, step=1)[0].items()}
    dense_full, ffns, refs = None, [], []
    for i, src in enumerate(sources):
        model = build_for_training(dense_cfg, layout)
        checkpoint.load_model(src, model, layout)
        model.to(device)
        refs.append(forward_features(model, probe, dense_cfg, layout))
        full = full_state_dict(model, layout)
        del model
        if i == 0:
            dense_full = full
        else:
            ffns.append(stage_ffn(full, dense_full, cfg.model, i))
    state = assemble_state_dict(dense_full, ffns, cfg.model, seed=cfg.train.seed)
    del dense_full, ffns
    model = build_for_training(cfg, layout)
    load_full_state_dict(model, state, layout)
    model.to(device)
    errors = []
    for e, ref in enumerate(refs):
        with force_expert(model, e):
            got = forward_features(model, probe, cfg, layout)
        err = 0.0 if got is None else max(float((got[m] - ref[m]).abs().max())
                                           for m in ("image", "text"))
        errors.append(err)
    worst = torch.tensor(errors, dtype=torch.float64, device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # the last stage measured it
    info = {"sources": list(sources), "forced_expert_max_abs_diff": worst.tolist(),
            "expert_relative_distance": expert_distances(state, cfg.model)}
    log.info("dmu: assembled %d experts from %s; forced-expert vs source model max |diff| %s; "
             "mean relative expert distance %s", len(sources), sources,
             [f"{v:.2e}" for v in info["forced_expert_max_abs_diff"]],
             [[round(v, 4) for v in row] for row in info["expert_relative_distance"]])
    with stop_signals_blocked():  # the save's helper processes must outlive a stop signal
        checkpoint.save_checkpoint(out_root, 0, model, config_to_dict(cfg), layout,
                                   extra={"dmu": info})
    return info
