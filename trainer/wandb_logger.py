"""Weights & Biases as one more sink of trainer/metrics.py (``train.wandb.project``).

The reporting rank alone opens a run; it gets the resolved config and, at every logged step,
the scalars that metrics.jsonl and TensorBoard get (nested metrics flattened with "/", as
TensorBoard names them). ``wandb`` is imported only here, only when enabled. A restarted or
requeued job continues the same W&B run: its id is kept in ``run_dir/wandb_run_id``. Offline
(``train.wandb.mode=offline`` or ``WANDB_MODE=offline``) it writes the run under
``<dir>/wandb/offline-run-*`` without touching the network; ``wandb sync`` uploads it later.
"""
from __future__ import annotations

import logging
import secrets
from pathlib import Path

from trainer.config import WandbConfig
from trainer.io import write_atomic

log = logging.getLogger("upclip")
RUN_ID_FILE = "wandb_run_id"


class WandbLogger:
    def __init__(self, cfg: WandbConfig, run_dir: str | Path, config: dict):
        import wandb

        run_dir = Path(run_dir)
        id_file = run_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        write_atomic(id_file, run_id + "\n")
        directory = Path(cfg.dir or run_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity or None, name=cfg.name or run_dir.name,
            group=cfg.group or None, tags=cfg.tags or None, mode=cfg.mode or None,
            dir=str(directory), config=config, id=run_id, resume="allow",
            settings=wandb.Settings(silent=True))  # our one line below instead of its banner
        log.info("wandb: run %s (%s, id %s) in %s", self.run.name,
                 "offline: `wandb sync` uploads it" if self.run.offline else self.run.url,
                 run_id, Path(self.run.dir).parent)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        import wandb

        self.run.finish()
        # finish() only tells the service process the run is over; the service writes and closes
        # the run file later. teardown() waits for the service to exit, so the offline run file
        # is whole on disk when close() returns (a job killed right after keeps all its steps).
        wandb.teardown()
