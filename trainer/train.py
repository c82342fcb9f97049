"""Train UpCLIP: ``python -m trainer.train --config configs/X.yaml key.sub=value ...``.

Runs as one process, under torchrun, srun or mpirun (see trainer/distributed/launch.py).
Bad configs and layouts fail before any heavy import, with one line naming the problem.

Where a run starts: ``checkpoint.save_dir/latest`` when it exists (a restarted or requeued
job continues exactly: model, optimizer, schedule, RNG, data position), else
``checkpoint.load`` (weights only), else ``checkpoint.upcycle_from`` (a dense checkpoint made
MoE), else a fresh model. Exit codes: 0 done, 2 bad input, 3 (``EXIT_REQUEUE``) stopped by
SIGUSR1/SIGTERM after saving, 4 too many non-finite steps in a row.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

from trainer.config import Config, ConfigError, config_to_dict, load_config
from trainer.distributed.launch import LaunchError, read_launch_env
from trainer.distributed.layout import LayoutError, ParallelLayout

log = logging.getLogger("upclip")


def synthetic_microbatches(cfg: Config, layout: ParallelLayout, step: int) -> list[dict]:
    """Random images and captions, fixed per (step mod 4, microbatch, dp rank) so a tiny model
    can fit them; identical on every TP/PP rank of a data-parallel replica. Used when
    ``data.train_urls`` is empty (tests, benchmarks)."""
    import torch

    m, t = cfg.model, cfg.train
    out = []
    for mb in range(t.num_microbatches):
        g = torch.Generator().manual_seed(
            hash((t.seed, step % 4, mb, layout.dp_rank)) % (2 ** 31))
        b = t.micro_batch_size
        images = torch.randn(b, 3, m.vision.image_size, m.vision.image_size, generator=g)
        text = torch.randint(1, m.text.eot_id, (b, m.text.context_length), generator=g)
        ends = torch.randint(1, m.text.context_length, (b,), generator=g)
        text[torch.arange(b), ends] = m.text.eot_id
        text = torch.where(torch.arange(m.text.context_length) > ends[:, None], 0, text)
        out.append({"images": images, "text": text, "size": b})
    return out


class Batches:
    """Microbatches for each step: from the shard loader (epochs roll over), or synthetic."""

    def __init__(self, cfg: Config, layout: ParallelLayout, tokenizer):
        self.cfg, self.layout = cfg, layout
        self.loader = self._it = None
        if cfg.data.train_urls:
            from trainer.data import build_train_loader
            self.loader = build_train_loader(cfg.data, rank=layout.dp_rank, world=layout.dp,
                                             tokenizer=tokenizer)

    def next(self, step: int) -> list[dict]:
        if self.loader is None:
            return synthetic_microbatches(self.cfg, self.layout, step)
        return [self._one() for _ in range(self.cfg.train.num_microbatches)]

    def _one(self) -> dict:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.loader)
            batch = next(self._it, None)
            if batch is not None:
                return batch
            self._it = None  # the epoch ended: the next iter() starts the next one
        raise RuntimeError(f"data rank {self.layout.dp_rank}: an epoch of data.train_urls="
                           f"{self.cfg.data.train_urls!r} gave no batch")

    def state_dict(self) -> dict | None:
        return None if self.loader is None else self.loader.state_dict()

    def load_state_dict(self, state: dict | None, epoch_hint: int) -> None:
        if self.loader is None:
            return
        if state is None:  # resumed at another layout: the data position is per rank
            log.warning("data: the checkpoint was saved at another layout; its data position "
                        "cannot be restored exactly, starting epoch %d", epoch_hint + 1)
            self.loader.set_epoch(epoch_hint + 1)
        else:
            self.loader.load_state_dict(state)

    def skipped(self) -> int:
        return 0 if self.loader is None else self.loader.counters.skipped()


def to_device(batch: dict, device, cfg: Config) -> dict:
    """The batch on ``device``; uint8 images (``data.normalize=device``) CLIP-normalised there."""
    from trainer.data.normalize import normalize_on_device

    out = {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v
           for k, v in batch.items()}
    if "images" in out:
        a = cfg.data.augment
        out["images"] = normalize_on_device(out["images"], a.mean, a.std)
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m trainer.train",
                                description="Train (or upcycle) a CLIP model.")
    p.add_argument("--config", help="YAML file under configs/")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides (after the YAML)")
    return p.parse_args(argv)


def prepare(argv) -> tuple[Config, "object", ParallelLayout]:
    """Everything that can fail on bad input, before torch.distributed or megatron."""
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    launch = read_launch_env()
    layout = ParallelLayout(launch.world_size, cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep)
    return cfg, launch, layout


def _start(cfg: Config, layout: ParallelLayout):
    """(model, checkpoint to resume from or None): see the module docstring."""
    from trainer import checkpoint, step as S

    resume = None
    if cfg.checkpoint.resume and cfg.checkpoint.save_dir:
        try:
            resume = checkpoint.resolve(cfg.checkpoint.save_dir)
        except checkpoint.CheckpointError:
            resume = None
    if resume is None and cfg.checkpoint.upcycle_from:
        from trainer.moe.upcycle import upcycle_model
        return upcycle_model(cfg.checkpoint.upcycle_from, cfg, layout), None
    model = S.build_model(cfg, layout)
    if resume is None and cfg.checkpoint.load:
        checkpoint.load_model(cfg.checkpoint.load, model, layout)
    return model, resume


def run(cfg: Config, launch, layout: ParallelLayout, signals=None) -> dict:
    import torch

    from trainer import checkpoint, step as S
    from trainer.data import build_tokenizer
    from trainer.distributed import init_distributed
    from trainer.distributed.rng import rng_state, set_rng_state
    from trainer.eval import evaluate, format_metrics
    from trainer.eval.embed import EvalSetError
    from trainer.metrics import (MetricsLogger, model_flops_per_sample, moe_layer_stats,
                                 peak_flops)
    from trainer.signals import (EXIT_NONFINITE, EXIT_REQUEUE, StopSignals,
                                 stop_signals_blocked)

    t_start = time.time()
    init_distributed(launch)
    layout.initialize(seed=cfg.train.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reporter = layout.is_last_stage and layout.tp_rank == 0 and layout.dp_rank == 0
    if launch.rank == 0:
        log.info("%s; layout %s", launch.describe(), layout.describe())
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run_dir) / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=1))
    model, resume = _start(cfg, layout)
    model.to(device)
    ddp = S.wrap_ddp(model)
    optimizer = S.build_optimizer(model, cfg)
    tokenizer = build_tokenizer(cfg.data.tokenizer) if (cfg.data.train_urls or
                                                        cfg.data.eval_urls) else None
    batches = Batches(cfg, layout, tokenizer)
    state = {"step": 0, "skipped_steps": 0, "consumed_samples": 0, "data_epoch": 0}
    if resume is not None:
        manifest, rank_state = checkpoint.load_checkpoint(resume, model, layout,
                                                          optimizer=optimizer)
        state.update(manifest.get("train_state") or {})
        if rank_state is not None:
            set_rng_state(rank_state["rng"])
        batches.load_state_dict(rank_state["data"] if rank_state else None, state["data_epoch"])
        if launch.rank == 0:
            log.info("resumed from %s at step %d", resume, state["step"])
    if launch.rank == 0:
        n = sum(p.numel() for p in model.parameters())
        log.info("CLIP stage %d/%d: %.2fM params on this rank", layout.pp_rank + 1, layout.pp,
                 n / 1e6)

    t = cfg.train
    samples_per_step = t.micro_batch_size * t.num_microbatches * layout.dp
    flops, peak = model_flops_per_sample(cfg), peak_flops()
    metrics_log = MetricsLogger(cfg.run_dir, reporter, t.steps, state["step"],
                                tensorboard=t.tensorboard, progress_bar=t.progress_bar)
    signals = signals or StopSignals()
    history, evals, nonfinite_run, exit_code = [], [], 0, 0

    def run_eval(step: int) -> None:
        try:
            result = evaluate(ddp, cfg, layout, tokenizer)
        except EvalSetError as e:  # raised on every rank alike; training goes on
            if launch.rank == 0:
                log.error("step %d: evaluation skipped: %s", step, e)
            return
        if reporter and result is not None:
            log.info("step %d: %s", step, format_metrics(result))
            metrics_log.log(step, {f"eval/{k}": v for k, v in result.items()})
            evals.append({"step": step, **result})

    def save(step: int) -> None:
        state["data_epoch"] = batches.loader.epoch if batches.loader is not None else 0
        with stop_signals_blocked():  # helper processes the save starts must outlive a signal
            checkpoint.save_checkpoint(
                cfg.checkpoint.save_dir, step, model, config_to_dict(cfg), layout,
                optimizer=optimizer, train_state=dict(state, step=step),
                rank_state={"rng": rng_state(), "data": batches.state_dict()},
                keep_last=cfg.checkpoint.keep_last)

    if state["step"] == 0:
        run_eval(0)
    step = state["step"]
    while step < t.steps:
        step += 1
        ts = time.time()
        microbatches = [to_device(b, device, cfg) for b in batches.next(step)]
        lr = S.lr_at(step, t)
        S.set_lr(optimizer, lr)
        out = S.forward_backward(ddp, microbatches, cfg)
        S.finalize_grads(ddp, layout)
        norm = S.clip_grads(ddp, layout, t.grad_clip)
        # a signal that arrives after this point is acted on at the next step
        finite, stop = signals.agree(math.isfinite(norm) and (out is None or
                                                              math.isfinite(out["loss"])))
        if finite:
            optimizer.step()
            S.clamp_logit_scale(model, t.max_logit_scale)
            nonfinite_run = 0
        else:
            state["skipped_steps"] += 1
            nonfinite_run += 1
            if launch.rank == 0:
                log.warning("step %d: non-finite loss or gradient norm (%s): update skipped "
                            "(%d in a row)", step, norm, nonfinite_run)
        S.zero_grads(ddp, optimizer)
        state["consumed_samples"] += samples_per_step
        if nonfinite_run >= t.max_nonfinite_steps:
            if launch.rank == 0:
                log.error("aborting: %d steps in a row had a non-finite loss or gradient norm "
                          "(train.max_nonfinite_steps=%d); last good checkpoint: %s", nonfinite_run,
                          t.max_nonfinite_steps, cfg.checkpoint.save_dir or "none")
            exit_code = EXIT_NONFINITE
            break
        if step % t.log_every == 0 or step == t.steps:
            if layout.is_last_stage and layout.dp > 1:
                vec = torch.tensor(list(out.values()), dtype=torch.float64, device=device)
                torch.distributed.all_reduce(vec, group=layout.dp_group())
                out = dict(zip(out, (vec / layout.dp).tolist()))
            moe = moe_layer_stats(model, layout)
            dt = time.time() - ts
            if reporter:
                rec = {**out, "lr": lr, "grad_norm": norm, "step_time": dt,
                       "samples_per_s": samples_per_step / dt,
                       "logit_scale": float(model.logit_scale.detach().exp()),
                       "skipped_steps": state["skipped_steps"], "data_skipped": batches.skipped()}
                if peak:
                    rec["mfu"] = flops * samples_per_step / dt / (peak * layout.world_size)
                if moe:
                    rec["moe"] = moe
                metrics_log.log(step, rec)
                metrics_log.progress(step, out["loss"], samples_per_step / dt)
                history.append(out["loss"])
                dropped = (f" moe dropped {100 * sum(v['dropped'] for v in moe.values()) / len(moe):.1f}%"
                           if moe else "")
                log.info("step %d/%d loss %.4f grad_norm %.3f lr %.2e %.2fs %.1f samples/s%s",
                         step, t.steps, out["loss"], norm, lr, dt, samples_per_step / dt, dropped)
        if cfg.checkpoint.save_dir and (stop or step == t.steps or (
                cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0)):
            save(step)
        if cfg.eval.every and step % cfg.eval.every == 0 and step != t.steps:
            run_eval(step)
        if stop:
            if launch.rank == 0:
                log.warning("stopped by %s at step %d; exit %d to be requeued",
                            signals.received or "a signal on another rank", step, EXIT_REQUEUE)
            exit_code = EXIT_REQUEUE
            break
    if exit_code == 0 and step == t.steps:
        run_eval(step)
    signals.restore()
    metrics_log.close()
    if reporter:
        log.info("done: step %d/%d in %.1fs", step, t.steps, time.time() - t_start)
    return {"losses": history, "evals": evals, "exit_code": exit_code, "step": step}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # it lists every param at INFO
    from trainer.signals import StopSignals, write_exit_status

    # Handlers first: a SLURM stop signal that arrives while megatron is still importing is
    # acted on at the first step instead of killing the process.
    signals = StopSignals()
    try:
        cfg, launch, layout = prepare(argv if argv is not None else sys.argv[1:])
    except (ConfigError, LaunchError, LayoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = run(cfg, launch, layout, signals)
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
    if launch.rank == 0:
        write_exit_status(cfg.run_dir, result["exit_code"], result["step"])
    return result["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
