"""Which checkpoint a run continues from: the newest one that verifies.

``save_dir/latest`` names the newest complete checkpoint (trainer/checkpoint.py). When it
cannot be used (a partial copy lost its ``manifest.json``, the directory was deleted, a shard
file was truncated or altered), a run neither fails for good nor starts over: it continues
from the newest other checkpoint that verifies, with one warning that says what was wrong.

    order   the directory ``latest`` names, then every other ``step_*`` directory, newest first
    cheap   manifest readable, every file it lists present with its listed size (stat only)
    full    every file's sha256 against the manifest, as the checkpoint loads (split over the
            ranks, rank r hashing every world-th file): the read that every load already did,
            so the happy path costs nothing more; each candidate that fails costs one such read

A ``save_dir`` holding checkpoints of which none is usable is an error (``ResumeError``: the
trainer exits 2 with one line naming them), never a silent fresh start;
``checkpoint.resume=false`` is how a run starts over there.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from trainer import checkpoint
from trainer.checkpoint import CheckpointError, CorruptCheckpointError, LATEST, MANIFEST
from trainer.distributed import collectives as C
from trainer.distributed.layout import ParallelLayout

log = logging.getLogger("upclip")


class ResumeError(CheckpointError):
    """``save_dir`` holds checkpoints but none of them can be resumed from."""


def _candidates(root: Path) -> tuple[list[Path], list[str]]:
    """(directories to try in order, problems already known), as rank 0 sees them."""
    dirs = checkpoint.step_dirs(root)[::-1]
    try:
        target = checkpoint.latest_step_dir(root)
    except CorruptCheckpointError as e:  # names no step directory, or a missing one
        return dirs, [str(e)]
    if target is None:
        return dirs, [f"{root / LATEST}: missing"] if dirs else []
    return [target] + [d for d in dirs if d != target], []


def resume_root(save_dir: str | Path, resume: bool = True) -> Path | None:
    """Collective: ``save_dir`` when it holds checkpoints (a ``latest`` file or a ``step_*``
    directory, complete or not; the ``*.partial`` leftover of an interrupted first save does
    not count) and ``resume``; else None (with ``resume`` false, after a warning)."""
    root = Path(save_dir)
    dirs = checkpoint.step_dirs(root)
    found = C.broadcast_object(((root / LATEST).is_file() or bool(dirs))
                               if C.rank() == 0 else None)
    if found and not resume:
        if C.rank() == 0:
            log.warning("checkpoint.resume=false: starting over although %s holds checkpoints "
                        "(%s); saves of the same steps will replace them", root,
                        ", ".join(d.name for d in dirs) or "a latest file")
        return None
    return root if found else None


def _cheap_check(d: Path) -> str:
    if not (d / MANIFEST).is_file():
        return f"{d}: no {MANIFEST} (an incomplete copy or save)"
    try:
        checkpoint.check_sizes(d)
    except CorruptCheckpointError as e:
        return str(e)
    return ""


def load_newest_good(root: str | Path, model: torch.nn.Module, layout: ParallelLayout, *,
                     optimizer: torch.optim.Optimizer | None = None
                     ) -> tuple[Path, dict, dict | None]:
    """Collective: load the first usable checkpoint of ``root`` (see the module docstring)
    into ``model`` and ``optimizer``; ``(its directory, manifest, this rank's rank_state)``
    as ``checkpoint.load_checkpoint`` returns them. ResumeError when none is usable."""
    root = Path(root)
    dirs, problems = C.broadcast_object(_candidates(root) if C.rank() == 0 else None)
    for d in dirs:
        error = C.broadcast_object(_cheap_check(d) if C.rank() == 0 else None)
        if not error:
            try:
                manifest, rank_state = checkpoint.load_checkpoint(d, model, layout,
                                                                  optimizer=optimizer)
            except CorruptCheckpointError as e:  # a checksum: raised on every rank alike
                error = str(e)
        if error:
            problems.append(error)
            continue
        if problems and C.rank() == 0:
            log.warning("checkpoint: resuming from %s, the newest checkpoint that verifies, "
                        "not from %s/latest: %s", d, root, "; ".join(problems))
        return d, manifest, rank_state
    tried = ", ".join(d.name for d in dirs) or "none"
    raise ResumeError(f"checkpoint.save_dir={str(root)!r} holds checkpoints but none can be "
                      f"resumed from (step directories: {tried}): {'; '.join(problems)}. Repair "
                      f"or move them away, or pass checkpoint.resume=false to start over there")
