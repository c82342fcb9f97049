"""The DMU driver: MCL stages 1..E-1, assembly, router phase; resumable phase by phase.

    python -m trainer.dmu --config configs/dmu_b16.yaml key=value ...   (torchrun / srun too)

Phases under ``run_dir`` (each finished one holds a ``DONE.json``; a rerun skips those and
continues the current one from its ``ckpt/latest``, so a requeued job just runs again):

    stage_k/labels.json   accumulated cluster labels (k-means of the stage k-1 model's image
                          and text embeddings of data.train_urls; stage 0 = the dense model)
    stage_k/ckpt/         MCL stage k: an ordinary training run from dmu.dense in which only
                          the FFNs of the future MoE blocks train (train.trainable), on
                          label-grouped batches (data.group_labels), negatives from each rank's
                          own micro-batch (train.global_contrastive=false: a batch is one
                          group), its own sample order (data.seed + k); dmu.stage overrides
                          apply
    assembled/            the MoE model: expert 0 = the dense FFN, expert k = stage k's FFN,
                          router per model.*.moe (trainer/dmu/assemble.py)
    router/ckpt/          the router phase: ordinary training from assembled/ (dmu.router
                          overrides, e.g. train.trainable=[router] as CLIP-MoE does)

Exit codes as trainer.train (also in ``run_dir/exit_status.json`` for slurm/launch.sh): 0 done,
2 bad input, 3 stopped by SIGUSR1/SIGTERM (rerun to continue; a signal during a labelling or
assembly phase takes effect when that phase has finished), 4 too many non-finite steps.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from trainer.config import (Config, ConfigError, config_to_dict, deep_merge, derive_paired,
                            config_of, load_config, parse_overrides)
from trainer.config_cli import parse_config_args
from trainer.distributed.launch import LaunchError, read_launch_env
from trainer.distributed.logs import setup_logging
from trainer.distributed.layout import LayoutError, ParallelLayout
from trainer.moe.upcycle import dense_config

log = logging.getLogger("upclip")

DONE = "DONE.json"


@dataclass
class Plan:
    cfg: Config                 # the DMU config (final MoE model)
    stages: list[Config]        # MCL stage k = stages[k - 1]
    router: Config              # checkpoint.load is set to assembled/ once it exists

    @property
    def root(self) -> Path:
        return Path(self.cfg.run_dir)


def _with_overrides(cfg: Config, items: list[str], key: str) -> Config:
    try:
        given = parse_overrides(items)
        out = config_of(deep_merge(config_to_dict(cfg), given))
        derive_paired(out, given)  # a stage's train.micro_batch_size carries data.batch_size
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None
    if config_to_dict(out.model) != config_to_dict(cfg.model):
        raise ConfigError(f"{key} may not change model.* (every DMU phase shares the "
                          "architecture; set it at the top level)")
    return out


def make_plan(cfg: Config) -> Plan:
    """Every phase's config, validated before anything heavy runs (ConfigError otherwise)."""
    from trainer.dmu.assemble import ffn_patterns

    d = cfg.dmu
    if not d.dense:
        raise ConfigError("dmu.dense is empty: the dense checkpoint to upcycle")
    if not any((Path(d.dense) / f).is_file() for f in ("manifest.json", "latest")):
        raise ConfigError(f"dmu.dense={d.dense!r}: no checkpoint there (neither manifest.json "
                          "nor latest)")
    towers = [(n, getattr(cfg.model, n).moe) for n in ("vision", "text")
              if getattr(cfg.model, n).moe.enabled]
    if not towers:
        raise ConfigError("dmu: no tower has model.*.moe.num_experts > 0")
    experts = {moe.num_experts for _, moe in towers}
    if len(experts) != 1 or min(experts) < 2:
        raise ConfigError("dmu: " + ", ".join(f"model.{n}.moe.num_experts={m.num_experts}"
                                              for n, m in towers)
                          + ": the MoE towers need one common num_experts >= 2 (expert 0 = "
                          "the dense FFN, one MCL stage per further expert)")
    if not cfg.data.train_urls:
        raise ConfigError("dmu: data.train_urls is empty (the stages group real samples by key)")
    root = Path(cfg.run_dir)
    stages = []
    for k in range(1, experts.pop()):
        s = _with_overrides(cfg, d.stage, "dmu.stage")
        s.model = dense_config(cfg.model)
        s.train.trainable = ffn_patterns(cfg.model)
        s.train.global_contrastive = False
        s.checkpoint.load, s.checkpoint.upcycle_from = d.dense, ""
        s.checkpoint.save_dir = str(root / f"stage_{k}" / "ckpt")
        s.run_dir = str(root / f"stage_{k}")
        s.data.group_labels = str(root / f"stage_{k}" / "labels.json")
        s.data.seed = cfg.data.seed + k  # each stage its own sample order
        s.validate()
        stages.append(s)
    r = _with_overrides(cfg, d.router, "dmu.router")
    r.checkpoint.load, r.checkpoint.upcycle_from = "", ""
    r.checkpoint.save_dir = str(root / "router" / "ckpt")
    r.run_dir = str(root / "router")
    r.validate()
    return Plan(cfg, stages, r)


def _done(path: Path) -> dict | None:
    try:
        return json.loads((path / DONE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _mark_done(path: Path, info: dict) -> None:
    import torch.distributed as dist

    if dist.get_rank() == 0:
        tmp = path / (DONE + ".tmp")
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, path / DONE)
    dist.barrier()


def run(plan: Plan, launch, layout: ParallelLayout, signals=None) -> int:
    """Collective. Runs what is not done yet; returns the exit code."""
    from trainer import checkpoint
    from trainer.distributed import init_distributed
    from trainer.dmu.assemble import assemble
    from trainer.dmu.labels import make_stage_labels
    from trainer.signals import EXIT_REQUEUE, StopSignals
    from trainer.trainer import Trainer

    signals = signals or StopSignals()

    def stop_requested(after: str) -> bool:  # collective: every rank agrees
        if signals.agree(True)[1]:
            log.warning("dmu: stopped by %s after %s; exit %d to be requeued",
                        signals.received or "a signal on another rank", after, EXIT_REQUEUE)
            return True
        return False

    def train_phase(cfg: Config) -> dict:
        nonlocal signals
        result = Trainer(cfg, launch, layout, signals).train()
        signals = StopSignals()  # train() restored the previous handlers
        return result

    init_distributed(launch)
    layout.initialize(seed=plan.cfg.train.seed)
    if launch.rank == 0:
        plan.root.mkdir(parents=True, exist_ok=True)
        (plan.root / "dmu_config.json").write_text(json.dumps(config_to_dict(plan.cfg), indent=1))
    sources = [plan.cfg.dmu.dense]
    for k, s in enumerate(plan.stages, start=1):
        sdir = Path(s.run_dir)
        if _done(sdir):
            log.info("dmu: stage %d/%d done (%s); skipping", k, len(plan.stages), sdir / DONE)
        else:
            labels = Path(s.data.group_labels)
            if not labels.is_file():
                if launch.rank == 0:
                    sdir.mkdir(parents=True, exist_ok=True)
                prev = plan.stages[k - 2].data.group_labels if k > 1 else None
                make_stage_labels(s, sources[-1], prev, labels, layout,
                                  seed=plan.cfg.train.seed + 1000 * k)
                if stop_requested(f"the stage {k} labels"):
                    return EXIT_REQUEUE
            log.info("dmu: stage %d/%d: FFNs of %d blocks train on label-grouped batches",
                     k, len(plan.stages), len(s.train.trainable) // 4)
            result = train_phase(s)
            if result["exit_code"]:
                return result["exit_code"]
            _mark_done(sdir, {"stage": k, "step": result["step"],
                              "checkpoint": str(checkpoint.resolve(s.checkpoint.save_dir))})
        sources.append(s.checkpoint.save_dir)
    adir = plan.root / "assembled"
    if _done(adir):
        log.info("dmu: assembly done (%s); skipping", adir / DONE)
    else:
        layout.initialize(seed=plan.cfg.train.seed)
        _mark_done(adir, assemble(plan.router, sources, str(adir), layout))
        if stop_requested("the assembly"):
            return EXIT_REQUEUE
    r = plan.router
    r.checkpoint.load = str(adir)
    rdir = Path(r.run_dir)
    if _done(rdir):
        log.info("dmu: router phase done (%s); nothing to do", rdir / DONE)
        return 0
    result = train_phase(r)
    if result["exit_code"]:
        return result["exit_code"]
    _mark_done(rdir, {"checkpoint": str(checkpoint.resolve(r.checkpoint.save_dir)),
                      "step": result["step"]})
    log.info("dmu: done; the MoE model is %s", checkpoint.resolve(r.checkpoint.save_dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    from trainer.signals import StopSignals, write_exit_status

    signals = StopSignals()  # before the heavy imports, as trainer.train does
    p = argparse.ArgumentParser(prog="python -m trainer.dmu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file (configs/dmu_*.yaml)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides (after the YAML)")
    args = parse_config_args(p, sys.argv[1:] if argv is None else argv, Config)
    try:
        cfg = load_config(args.config, args.overrides)
        plan = make_plan(cfg)
        launch = read_launch_env()
        layout = ParallelLayout(launch.world_size, cfg.parallel.tp, cfg.parallel.pp,
                                cfg.parallel.ep)
    except (ConfigError, LaunchError, LayoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    setup_logging(launch.rank)  # as trainer.train: INFO from rank 0, known-benign filtered
    from trainer.trainer import BAD_INPUT_ERRORS, bad_input_exit
    try:
        code = run(plan, launch, layout, signals)
    except BAD_INPUT_ERRORS as e:  # a phase's save_dir with no usable checkpoint, no data
        return bad_input_exit(e, cfg.run_dir, launch.rank)
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
    if launch.rank == 0:
        write_exit_status(cfg.run_dir, code, 0)
    return code


if __name__ == "__main__":
    sys.exit(main())
