"""The training loop: setup, one optimizer step, logging, checkpoint and evaluation cadence.

    trainer = Trainer(cfg, launch, layout)     # process groups, model, optimizer, data, resume
    result = trainer.train()                   # {"losses", "evals", "exit_code", "step"}

Where a run starts: ``checkpoint.save_dir`` when it holds checkpoints (a restarted or requeued
job continues exactly: model, optimizer, schedule, RNG, data position; from ``latest``, or
the newest checkpoint that verifies when ``latest`` is unusable: trainer/resume.py; none
usable is an error, never a fresh start, unless ``checkpoint.resume=false``), else
``checkpoint.load`` (weights only), else ``checkpoint.upcycle_from`` (a dense checkpoint made
MoE), else a fresh model. ``train()`` returns exit code 0 (done), 3 (``EXIT_REQUEUE``: stopped
by SIGUSR1/SIGTERM after saving) or 4 (``EXIT_NONFINITE``: too many non-finite steps in a row).
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

import kernels
from trainer import checkpoint, optim, resume as R, step as S
from trainer.config import Config, config_to_dict
from trainer.data import build_tokenizer
from trainer.data.batches import Batches, to_device
from trainer.data.counters import NoDataError
from trainer.distributed import init_distributed
from trainer.distributed.device import default_device
from trainer.distributed.grads import clip_grads, finalize_grads, wrap_ddp, zero_grads
from trainer.distributed.layout import ParallelLayout
from trainer.distributed.logs import optional_dependencies
from trainer.distributed.rng import rng_state, set_rng_state
from trainer.eval import evaluate, format_metrics
from trainer.eval.embed import EvalSetError
from trainer.eval.sets import eval_sets, prefixed
from trainer.metrics import (MetricsLogger, backend_calls, expert_calls, model_flops_per_sample,
                             moe_layer_stats, peak_flops)
from trainer.models.build import build_for_training
from trainer.signals import (EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_REQUEUE, StopSignals,
                             stop_signals_blocked, write_exit_status)

log = logging.getLogger("upclip")

# Bad input found once the run has started: one line, exit 2, no requeue.
BAD_INPUT_ERRORS = (R.ResumeError, NoDataError)


def bad_input_exit(error: Exception, run_dir: str, rank: int) -> int:
    """Print ``error: ...`` (a ResumeError, raised alike on every rank: from rank 0 only) and
    return 2, also recorded in run_dir/exit_status.json for the torchrun launch path, whose
    exit code is 1 whatever the workers' (slurm/launch.sh must not requeue bad input)."""
    if rank == 0 or not isinstance(error, R.ResumeError):
        print(f"error: {error}", file=sys.stderr, flush=True)
    write_exit_status(run_dir, EXIT_BAD_INPUT, 0)
    return EXIT_BAD_INPUT


def initial_model(cfg: Config, layout: ParallelLayout):
    """(model, checkpoint root to resume from or None): see the module docstring."""
    ck = cfg.checkpoint
    resume = R.resume_root(ck.save_dir, ck.resume) if ck.save_dir else None
    if resume is None and ck.upcycle_from:
        from trainer.upcycle import upcycle_model
        return upcycle_model(cfg.checkpoint.upcycle_from, cfg, layout), None
    model = build_for_training(cfg, layout)
    if resume is None and ck.load:
        checkpoint.load_model(ck.load, model, layout)
    return model, resume


@dataclass
class StepResult:
    out: dict | None   # the averaged microbatch metrics (last stage), None elsewhere
    norm: float        # global gradient norm before clipping
    lr: float
    finite: bool       # every rank agreed the loss and norm were finite: the update ran
    stop: bool         # a stop signal reached some rank: save and exit after this step
    seconds: float


class Trainer:
    def __init__(self, cfg: Config, launch, layout: ParallelLayout,
                 signals: StopSignals | None = None):
        self.cfg, self.launch, self.layout, self.t_start = cfg, launch, layout, time.time()
        init_distributed(launch)
        layout.initialize(seed=cfg.train.seed)
        self.device = default_device()
        self.reporter = layout.is_last_stage and layout.tp_rank == 0 and layout.dp_rank == 0
        if launch.rank == 0:
            log.info("%s; layout %s", launch.describe(), layout.describe())
            log.info(optional_dependencies())
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.run_dir) / "config.json").write_text(
                json.dumps(config_to_dict(cfg), indent=1))
        self.model, resume = initial_model(cfg, layout)
        self.model.to(self.device)
        self.ddp = wrap_ddp(self.model)
        self.optimizer = optim.build_optimizer(self.model, cfg.train)
        self.tokenizer = (build_tokenizer(cfg.data.tokenizer)
                          if cfg.data.train_urls or cfg.data.eval_urls else None)
        self.batches = Batches(cfg, layout, self.tokenizer)
        self.state = {"step": 0, "skipped_steps": 0, "consumed_samples": 0, "data_epoch": 0}
        if resume is not None:
            self.resume(resume)
        if launch.rank == 0:
            n = sum(p.numel() for p in self.model.parameters())
            log.info("CLIP stage %d/%d: %.2fM params on this rank", layout.pp_rank + 1,
                     layout.pp, n / 1e6)
        t = cfg.train
        self.samples_per_step = t.micro_batch_size * t.num_microbatches * layout.dp
        self.flops, self.peak = model_flops_per_sample(cfg), peak_flops()
        self.metrics = MetricsLogger(cfg.run_dir, self.reporter, t.steps, self.state["step"],
                                     tensorboard=t.tensorboard, progress_bar=t.progress_bar,
                                     wandb=t.wandb, config=config_to_dict(cfg))
        self.signals = signals or StopSignals()
        self.history: list[float] = []
        self.evals: list[dict] = []
        self.has_moe = cfg.model.vision.moe.enabled or cfg.model.text.moe.enabled
        self.expert_calls: Counter = Counter()  # training expert calls since the last log

    # ---- the loop

    def train(self) -> dict:
        """Steps until ``train.steps``, a stop signal or too many non-finite steps."""
        t, ckpt = self.cfg.train, self.cfg.checkpoint
        if self.state["step"] and self.state["step"] >= t.steps:  # resumed at or past the end
            self.log_rank0(logging.INFO, "checkpoint at step %d already reaches train.steps=%d: "
                           "nothing to train (raise train.steps to continue)",
                           self.state["step"], t.steps)
            self.signals.restore()
            self.metrics.close()
            return {"losses": [], "evals": [], "exit_code": 0, "step": self.state["step"]}
        if self.state["step"] == 0:
            self.run_eval(0)
        step, nonfinite_run, exit_code = self.state["step"], 0, 0
        while step < t.steps:
            step += 1
            r = self.train_step(step)
            nonfinite_run = 0 if r.finite else nonfinite_run + 1
            if not r.finite:
                self.state["skipped_steps"] += 1
                self.log_rank0(logging.WARNING, "step %d: non-finite loss or gradient norm (%s): "
                               "update skipped (%d in a row)", step, r.norm, nonfinite_run)
            self.state["consumed_samples"] += self.samples_per_step
            if nonfinite_run >= t.max_nonfinite_steps:
                self.log_rank0(logging.ERROR, "aborting: %d steps in a row had a non-finite "
                               "loss or gradient norm (train.max_nonfinite_steps=%d); last good "
                               "checkpoint: %s", nonfinite_run, t.max_nonfinite_steps,
                               ckpt.save_dir or "none")
                exit_code = EXIT_NONFINITE
                break
            if step % t.log_every == 0 or step == t.steps:
                self.log_step(step, r)
            if ckpt.save_dir and (r.stop or step == t.steps or (
                    ckpt.save_every and step % ckpt.save_every == 0)):
                self.save(step)
            if self.cfg.eval.every and step % self.cfg.eval.every == 0 and step != t.steps:
                self.run_eval(step)
            if r.stop:
                self.log_rank0(logging.WARNING, "stopped by %s at step %d; exit %d to be "
                               "requeued", self.signals.received or "a signal on another rank",
                               step, EXIT_REQUEUE)
                exit_code = EXIT_REQUEUE
                break
        if exit_code == 0 and step == t.steps:
            self.run_eval(step)
        self.signals.restore()
        self.metrics.close()
        if self.reporter:
            log.info("done: step %d/%d in %.1fs", step, t.steps, time.time() - self.t_start)
        return {"losses": self.history, "evals": self.evals, "exit_code": exit_code,
                "step": step}

    def train_step(self, step: int) -> StepResult:
        """Forward, backward, gradient sync and clipping, then the update unless some rank
        saw a non-finite loss or norm (all ranks agree in one all-reduce, stop signals too)."""
        t, ts = self.cfg.train, time.time()
        host = self.batches.next(step)
        S.plan_regions(host, t)  # CLOC's region counts from the CPU masks: one collective
        microbatches = [to_device(b, self.device, self.cfg) for b in host]
        lr = optim.lr_at(step, t)
        optim.set_lr(self.optimizer, lr)
        calls_before = kernels.BACKEND_CALLS.copy()
        out = S.forward_backward(self.ddp, microbatches, self.cfg)
        self.expert_calls += expert_calls(calls_before)
        finalize_grads(self.ddp, self.layout)
        norm = clip_grads(self.ddp, self.layout, t.grad_clip)
        # a signal that arrives after this point is acted on at the next step
        finite, stop = self.signals.agree(math.isfinite(norm) and (
            out is None or math.isfinite(out["loss"])))
        if finite:
            self.optimizer.step()
            optim.clamp_logit_scale(self.model, t.max_logit_scale, self.optimizer)
        zero_grads(self.ddp, self.optimizer)
        return StepResult(out, norm, lr, finite, stop, time.time() - ts)

    # ---- around a step

    def log_rank0(self, level: int, msg: str, *args) -> None:
        if self.launch.rank == 0:
            log.log(level, msg, *args)

    def log_step(self, step: int, r: StepResult) -> None:
        """Collective over DP (the metrics are averaged); rank 0 of the last stage reports."""
        out, layout = r.out, self.layout
        if layout.is_last_stage and layout.dp > 1:
            vec = torch.tensor(list(out.values()), dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(vec, group=layout.dp_group())
            out = dict(zip(out, (vec / layout.dp).tolist()))
        moe = moe_layer_stats(self.model, layout)
        calls = backend_calls(self.expert_calls, self.device) if self.has_moe else None
        self.expert_calls.clear()
        if not self.reporter:
            return
        rate = self.samples_per_step / r.seconds
        rec = {**out, "lr": r.lr, "grad_norm": r.norm, "step_time": r.seconds,
               "samples_per_s": rate,
               "logit_scale": float(self.model.logit_scale.detach().exp()),
               "skipped_steps": self.state["skipped_steps"], "data_skipped": self.batches.skipped(),
               "data_shards_failed": self.batches.shards_failed()}
        if self.peak:
            rec["mfu"] = self.flops * rate / (self.peak * layout.world_size)
        if moe:
            rec["moe"] = moe
        if calls is not None:  # which kernels backend ran the experts (all ranks, all layers)
            rec["moe/backend_calls"] = calls
        self.metrics.log(step, rec)
        self.metrics.progress(step, out["loss"], rate)
        self.history.append(out["loss"])
        dropped = (f" moe dropped {100 * sum(v['dropped'] for v in moe.values()) / len(moe):.1f}%"
                   if moe else "")
        log.info("step %d/%d loss %.4f grad_norm %.3f lr %.2e %.2fs %.1f samples/s%s", step,
                 self.cfg.train.steps, out["loss"], r.norm, r.lr, r.seconds, rate, dropped)

    def run_eval(self, step: int) -> None:
        """Every eval set in turn (the run's own, then eval.sets), logged in one metrics row,
        each set's metrics under its name (eval/<metric>, eval/<name>/<metric>)."""
        row = {}
        for s in eval_sets(self.cfg):
            label = f"eval set {s.name!r}" if s.name else "evaluation"
            try:
                result = evaluate(self.ddp, s.cfg, self.layout, self.tokenizer)
            except EvalSetError as e:  # raised on every rank alike; training goes on
                self.log_rank0(logging.ERROR, "step %d: %s skipped: %s", step, label, e)
                continue
            if self.reporter and result is not None:
                log.info("step %d: %s%s", step, f"{s.name}: " if s.name else "",
                         format_metrics(result))
                row.update(prefixed(s.name, result))
                self.evals.append({"step": step, **({"set": s.name} if s.name else {}),
                                   **result})
        if row:
            self.metrics.log(step, row)

    def save(self, step: int) -> None:
        b = self.batches
        self.state["data_epoch"] = b.loader.epoch if b.loader is not None else 0
        position = b.position()  # collective over DP, before the save's own collectives
        with stop_signals_blocked():  # helper processes the save starts must outlive a signal
            checkpoint.save_checkpoint(
                self.cfg.checkpoint.save_dir, step, self.model, config_to_dict(self.cfg),
                self.layout, optimizer=self.optimizer,
                train_state=dict(self.state, step=step, data_position=position),
                rank_state={"rng": rng_state()}, keep_last=self.cfg.checkpoint.keep_last)

    def resume(self, root: Path) -> None:
        path, manifest, rank_state = R.load_newest_good(root, self.model, self.layout,
                                                        optimizer=self.optimizer)
        train_state = dict(manifest.get("train_state") or {})
        position = train_state.pop("data_position", None)
        self.state.update(train_state)
        if rank_state is not None:
            set_rng_state(rank_state["rng"])
        self.batches.resume(position, (rank_state or {}).get("data"), self.state["data_epoch"])
        self.log_rank0(logging.INFO, "resumed from %s at step %d", path, self.state["step"])
