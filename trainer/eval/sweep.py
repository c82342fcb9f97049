"""The compute dial: one checkpoint evaluated at several evaluation capacity factors and top-k,
each setting beside its inference FLOPs (CLIP-UP trades quality for FLOPs through expert
capacity).

    settings = parse_sweep(["capacity_factor=1,1.5,2", "top_k=1,2"])   # the grid, 6 settings
    rows = run_sweep(model, cfg.model, settings, batch_size, lambda: evaluate(...))
    print(format_table(rows))

A setting changes, in every MoE layer of both towers, the routing at evaluation only: top-k
and ``eval_capacity_factor`` (the capacity rule stays the trained one). It works on the
megatron model of a checkpoint (trainer/moe/layer.py: the router's ``k`` and
``eval_capacity_factor``) and on the plain model of an export (trainer/hub.py: its MoE
config), and is undone afterwards. FLOPs come from ``trainer.metrics.inference_flops_per_sample``
of the config with the same setting: the number the metrics code reports for that model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import sys
from typing import Callable

SWEEP_KEYS = ("capacity_factor", "top_k")


class SweepError(ValueError):
    """A bad ``--sweep`` argument; the message names it."""


@dataclasses.dataclass(frozen=True)
class Setting:
    top_k: int | None = None              # None: as trained
    capacity_factor: float | None = None  # eval_capacity_factor; None: as trained

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items() if v is not None)


def parse_sweep(items: list[str]) -> list[Setting]:
    """``["capacity_factor=1,1.5,2", "top_k=1,2"]`` -> the grid of settings (top_k outer)."""
    values: dict[str, list] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in SWEEP_KEYS:
            raise SweepError(f"--sweep {item!r}: expected KEY=V1,V2,... with KEY one of "
                             f"{', '.join(SWEEP_KEYS)} (config overrides go before --sweep)")
        if key in values:
            raise SweepError(f"--sweep: {key} given twice")
        try:
            vals = [int(v) if key == "top_k" else float(v) for v in raw.split(",")]
        except ValueError:
            raise SweepError(f"--sweep {item!r}: not a list of "
                             f"{'integers' if key == 'top_k' else 'numbers'}") from None
        bad = [v for v in vals if (v not in (1, 2) if key == "top_k" else not v > 0)]
        if bad:
            raise SweepError(f"--sweep {key}={raw}: {bad} out of range (top_k: 1 or 2; "
                             f"capacity_factor: > 0)")
        values[key] = vals
    ks = values.get("top_k", [None])
    cfs = values.get("capacity_factor", [None])
    return [Setting(k, cf) for k, cf in itertools.product(ks, cfs)]


def check_sweep(cfg, settings: list[Setting]) -> None:
    """SweepError before any model is built: a top_k beyond a tower's experts, TP > 1 (the
    FLOPs count one routing group of the whole batch)."""
    if cfg.parallel.tp > 1:
        raise SweepError(f"--sweep counts FLOPs at parallel.tp=1 (got parallel.tp="
                         f"{cfg.parallel.tp})")
    for setting in settings:
        apply_setting(cfg.model, setting)


def apply_setting(model_cfg, setting: Setting):
    """A copy of the ModelConfig with the setting in every MoE tower's config."""
    cfg = dataclasses.replace(model_cfg)
    for name in ("vision", "text"):
        tower = getattr(cfg, name)
        if not tower.moe.enabled:
            continue
        moe = tower.moe
        if setting.top_k is not None:
            if setting.top_k > moe.num_experts:
                raise SweepError(f"--sweep top_k={setting.top_k}: the {name} tower has "
                                 f"{moe.num_experts} experts")
            moe = dataclasses.replace(moe, top_k=setting.top_k)
        if setting.capacity_factor is not None:
            moe = dataclasses.replace(moe, eval_capacity_factor=setting.capacity_factor)
        setattr(cfg, name, dataclasses.replace(tower, moe=moe))
    return cfg


@contextlib.contextmanager
def routing_setting(model, setting: Setting):
    """Inside, every MoE layer of ``model`` routes at ``setting`` (evaluation routing)."""
    from trainer import hub

    undo = []
    layer = sys.modules.get("trainer.moe.layer")  # loaded if the model has megatron layers
    for m in model.modules():
        if isinstance(m, hub.MoEMLP):
            undo.append((m, "moe", m.moe))
            m.moe = dataclasses.replace(
                m.moe, top_k=setting.top_k or m.moe.top_k,
                eval_capacity_factor=setting.capacity_factor or m.moe.eval_capacity_factor)
        elif layer is not None and isinstance(m, layer.MoEMLP):
            r = m.router
            undo += [(r, "k", r.k), (r, "eval_capacity_factor", r.eval_capacity_factor)]
            r.k = setting.top_k or r.k
            r.eval_capacity_factor = setting.capacity_factor or r.eval_capacity_factor
    try:
        yield
    finally:
        for obj, attr, old in reversed(undo):
            setattr(obj, attr, old)


def run_sweep(model, model_cfg, settings: list[Setting], batch_size: int,
              evaluate: Callable[[], dict | None], log: Callable[[str], None] = print
              ) -> list[dict]:
    """Evaluate ``model`` at each setting -> rows {setting, flops, metrics} (metrics None on
    ranks that do not report). ``batch_size``: the pairs routed together at evaluation."""
    from trainer.metrics import inference_flops_per_sample

    rows = []
    for setting in settings:
        flops = inference_flops_per_sample(apply_setting(model_cfg, setting), batch_size)
        with routing_setting(model, setting):
            metrics = evaluate()
        if metrics is not None:
            log(f"sweep {setting.describe() or 'as trained'}: "
                f"{flops['total'] / 1e9:.4g} GFLOPs/pair")
        rows.append({**dataclasses.asdict(setting), "batch_size": batch_size,
                     "flops": flops, "metrics": metrics})
    return rows


def format_table(rows: list[dict], columns: tuple[str, ...] | None = None) -> str:
    """A text table: top_k, capacity_factor, GFLOPs per image-text pair (vision, text, total),
    then each metric (``columns``, by default every scalar metric of the first row)."""
    if columns is None:
        first = rows[0]["metrics"] or {}
        columns = tuple(k for k, v in first.items() if isinstance(v, (int, float))
                        and not k.endswith("_chance"))
    head = ["top_k", "capacity_factor", "GFLOPs_vision", "GFLOPs_text", "GFLOPs_total",
            *columns]
    body = []
    for r in rows:
        f, m = r["flops"], r["metrics"] or {}
        body.append(["trained" if r["top_k"] is None else str(r["top_k"]),
                     "trained" if r["capacity_factor"] is None else f"{r['capacity_factor']:g}",
                     *(f"{f[t] / 1e9:.6g}" for t in ("vision", "text", "total")),
                     *(f"{m[c]:.4f}" if isinstance(m.get(c), float) else str(m.get(c, ""))
                       for c in columns)])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths))
                     for line in (head, *body))
