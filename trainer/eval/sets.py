"""Several eval sets per run: the run's own set (``data.eval_urls`` or ``eval.csv``, with the
``eval.*`` keys) and the named sets of ``eval.sets``, each evaluated on its own and reported
under its name.

    for s in eval_sets(cfg):                       # EvalSet(name, cfg): "" for the run's own
        result = evaluate(model, s.cfg, layout, tokenizer)
        log(prefixed(s.name, result))              # eval/<metric>, eval/<name>/<metric>

A set's config is the run's config with ``data.eval_urls`` / ``eval.csv`` and the ``eval.*``
keys of that set: its own values where given, else the run's ``eval.*`` (tasks, classnames,
templates, max_batches); class names and templates then fall back to the files beside the set
(trainer/eval/names.py).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

from trainer.config import Config
from trainer.eval.embed import EvalSetError, check_eval_set, describe_eval_set


@dataclass
class EvalSet:
    name: str      # "" for the run's own set (data.eval_urls / eval.csv)
    cfg: Config    # the run's config as this set sees it (no eval.sets inside)


def eval_sets(cfg: Config) -> list[EvalSet]:
    """The run's own set (when configured) first, then ``eval.sets`` in their order."""
    out = []
    base = copy.deepcopy(cfg)
    base.eval.sets = {}
    if cfg.data.eval_urls or cfg.eval.csv:
        out.append(EvalSet("", base))
    for name, s in cfg.eval.sets.items():
        c = copy.deepcopy(base)
        c.data.eval_urls, e = s.urls, c.eval
        e.csv, e.csv_image_key, e.csv_caption_key, e.csv_label_key = (
            s.csv, s.csv_image_key, s.csv_caption_key, s.csv_label_key)
        e.tasks = list(s.tasks or e.tasks)
        e.classnames = s.classnames or e.classnames
        e.templates = s.templates or e.templates
        e.max_batches = e.max_batches if s.max_batches < 0 else s.max_batches
        out.append(EvalSet(name, c))
    return out


def check_eval_sets(cfg: Config) -> list[EvalSet]:
    """``eval_sets(cfg)`` after ``check_eval_set`` on each (cheap); raises EvalSetError naming
    the set, or when there is no set at all."""
    sets = eval_sets(cfg)
    if not sets:
        raise EvalSetError("no eval set: set data.eval_urls (WebDataset shards), eval.csv or "
                           "eval.sets")
    for s in sets:
        try:
            check_eval_set(s.cfg)
        except EvalSetError as e:
            raise EvalSetError(f"eval.sets.{s.name}: {e}" if s.name else str(e)) from None
    return sets


def describe(s: EvalSet) -> dict:
    """What a report says of a set: its source, tasks and the templates it was given."""
    from trainer.eval.names import templates

    e = s.cfg.eval
    return {"eval_set": describe_eval_set(s.cfg), "tasks": list(e.tasks),
            "templates": e.templates if isinstance(e.templates, str) else templates(s.cfg)}


def flat_metrics(report: dict | None) -> dict | None:
    """One flat dict of a `run_sets` report's metrics: the run's own set's as they are, a
    named set's as ``<name>/<metric>`` (a sweep row's columns)."""
    if report is None:
        return None
    out = dict(report.get("metrics", {}))
    for name, entry in report.get("sets", {}).items():
        out.update({f"{name}/{k}": v for k, v in entry["metrics"].items()})
    return out


def prefixed(name: str, metrics: dict) -> dict:
    """``{"eval/<metric>": ...}`` for the run's own set, ``{"eval/<name>/<metric>": ...}``
    for a named one."""
    head = f"eval/{name}/" if name else "eval/"
    return {head + k: v for k, v in metrics.items()}


def run_sets(sets: list[EvalSet], evaluate_one: Callable[[Config], dict | None]
             ) -> dict | None:
    """Calls ``evaluate_one(set config)`` (collective where it is) for each set; the report
    on the rank that got metrics, None elsewhere: the run's own set as ``eval_set``,
    ``tasks``, ``templates``, ``metrics``; the named ones under ``sets.<name>`` alike."""
    out: dict = {}
    for s in sets:
        metrics = evaluate_one(s.cfg)
        if metrics is None:
            continue
        entry = {**describe(s), "metrics": metrics}
        if s.name:
            out.setdefault("sets", {})[s.name] = entry
        else:
            out.update(entry)
    return out or None
