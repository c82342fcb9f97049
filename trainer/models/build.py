"""The one model factory: every CLIP that training, upcycling, evaluation, export, conversion
and DMU use is built here.

    model = build_model(cfg.model, layout, parallel=cfg.parallel,
                        trainable=cfg.train.trainable, recompute=...)   # a training stage
    model = build_model(saved.model, layout, inference=True, full=weights)  # eval / export
    model = build_for_training(cfg, layout)                            # the first, from a Config
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
from typing import Sequence

import torch

from trainer.config import Config, ModelConfig, ParallelConfig
from trainer.distributed.device import params_dtype_name
from trainer.distributed.layout import ParallelLayout
from trainer.moe.names import TRAINABLE_SETS


def build_model(model_cfg: ModelConfig, layout: ParallelLayout, *,
                parallel: ParallelConfig | None = None, trainable: Sequence[str] = (),
                recompute: bool = False, inference: bool = False,
                full: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """This pipeline stage of CLIP under ``layout``.

    ``parallel``: the pipeline split (``vision_layers_last_stage``); default: an even split.
    ``trainable``: ``train.trainable`` entries; every other parameter is frozen
    (``requires_grad=False``: no gradient buffer, no optimizer state, never updated).
    ``inference``: no router aux losses (they are for training), eval mode.
    ``full``: canonical weights (trainer/models/state.py) to load.
    """
    from trainer.models.clip import CLIP
    from trainer.models.state import load_full_state_dict

    if parallel is None:
        parallel = ParallelConfig(tp=layout.tp, pp=layout.pp, ep=layout.ep)
    if inference:
        model_cfg = copy.deepcopy(model_cfg)
        for tower in (model_cfg.vision, model_cfg.text):
            tower.moe.aux = type(tower.moe.aux)()
    model = CLIP(model_cfg, parallel, pre_process=layout.pp == 1 or layout.is_first_stage,
                 post_process=layout.pp == 1 or layout.is_last_stage, recompute=recompute)
    apply_trainable(model, list(trainable))
    if full is not None:
        load_full_state_dict(model, full, layout)
    return model.eval() if inference else model


def build_for_training(cfg: Config, layout: ParallelLayout) -> torch.nn.Module:
    """``build_model`` as a training run's config asks: its split, trainable set, recompute,
    and parameters in the dtype of ``train.precision`` (bf16: trainer/optim.py keeps fp32
    masters)."""
    model_cfg = cfg.model
    dtype = params_dtype_name(cfg.train.precision)
    if dtype != model_cfg.params_dtype:
        model_cfg = dataclasses.replace(model_cfg, params_dtype=dtype)
    return build_model(model_cfg, layout, parallel=cfg.parallel, trainable=cfg.train.trainable,
                       recompute=cfg.train.activation_checkpointing)


def trainable_patterns(entries: list[str]) -> list[str]:
    """``train.trainable`` entries -> glob patterns over canonical parameter names."""
    out = []
    for entry in entries:
        out += list(TRAINABLE_SETS.get(entry, (entry,)))
    return out


def apply_trainable(model: torch.nn.Module, entries: list[str]) -> int:
    """Freezes every parameter that no entry of ``train.trainable`` selects (empty or "all":
    nothing is frozen). Returns how many parameter tensors stay trainable on this rank;
    ``build_optimizer`` refuses a model with none."""
    from trainer.models.state import canonical_names

    if not entries or "all" in entries:
        return sum(1 for _ in model.parameters())
    patterns = trainable_patterns(entries)
    names = canonical_names(model)
    kept = 0
    for name, p in model.named_parameters():
        keep = any(fnmatch.fnmatchcase(names[name], pat) for pat in patterns)
        p.requires_grad_(keep)
        kept += keep
    return kept
