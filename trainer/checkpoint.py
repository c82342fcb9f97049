"""Checkpoints: a directory per step, sharded weights via megatron-core dist_checkpointing.

Layout of ``<root>/step_00001200/``::

    model/           torch_dist shards (ShardedTensors: any TP/PP layout loads any other)
    manifest.json    written LAST: step, resolved config, world layout, versions, checksums

A directory without a valid manifest is not a checkpoint. Saving writes into
``step_XXXXXXXX.partial`` and renames it only after the manifest is on disk, then points
``<root>/latest`` (a one-line text file, replaced atomically) at it, so a crash at any moment
leaves the previous checkpoint and ``latest`` intact.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.distributed.layout import ParallelLayout

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SHARDED_METADATA = {"non_homogeneous_layers": True}  # dense and MoE layers may mix


class CheckpointError(RuntimeError):
    pass


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("megatron.core", "deepspeed", "open_clip", "transformers"):
        try:
            from importlib.metadata import version
            dist_name = {"megatron.core": "megatron-core", "open_clip": "open-clip-torch"}
            out[name] = version(dist_name.get(name, name))
        except Exception:  # noqa: BLE001 - optional packages
            pass
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_checkpoint(root: str | Path, step: int, model: torch.nn.Module, config: dict,
                    layout: ParallelLayout, extra: dict | None = None) -> Path:
    """Collective: every rank calls it. Returns the committed checkpoint directory."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = root / f"step_{step:08d}"
    partial = root / f"step_{step:08d}.partial"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)
        (partial / "model").mkdir(parents=True)
    _barrier()
    t0 = time.time()
    dist_checkpointing.save(model.sharded_state_dict(metadata=dict(SHARDED_METADATA)),
                            str(partial / "model"))
    _barrier()
    if _rank() == 0:
        files = sorted(p for p in partial.rglob("*") if p.is_file())
        manifest = {
            "format_version": FORMAT_VERSION, "step": step, "kind": "upclip",
            "config": config,
            "layout": {"world_size": layout.world_size, "tp": layout.tp, "pp": layout.pp,
                       "dp": layout.dp, "ep": layout.ep},
            "sharded_metadata": dict(SHARDED_METADATA), "versions": versions(),
            "extra": extra or {}, "time": time.time(),
            "files": {str(p.relative_to(partial)): {"bytes": p.stat().st_size,
                                                    "sha256": _sha256(p)} for p in files},
        }
        _write_atomic(partial / MANIFEST, json.dumps(manifest, indent=1))
        if final.exists():  # re-saving a step: the old copy goes only once the new is complete
            shutil.rmtree(final)
        os.replace(partial, final)
        _write_atomic(root / "latest", final.name + "\n")
        log.info("saved checkpoint step %d to %s in %.1fs (%s)", step, final, time.time() - t0,
                 layout.describe())
    _barrier()
    return final


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or a root whose ``latest`` names one."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    latest = path / "latest"
    if latest.is_file():
        target = path / latest.read_text().strip()
        if (target / MANIFEST).is_file():
            return target
        raise CheckpointError(f"{latest} points at {target}, which has no {MANIFEST}")
    raise CheckpointError(f"{path}: not a checkpoint (no {MANIFEST}) and no 'latest' file")


def read_manifest(path: str | Path) -> dict:
    ckpt = resolve(path)
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{ckpt / MANIFEST}: not valid JSON ({e.msg})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt / MANIFEST}: format_version "
                              f"{manifest.get('format_version')} != {FORMAT_VERSION}")
    return manifest


def verify(path: str | Path) -> None:
    """Check every file against the manifest's size and sha256."""
    ckpt = resolve(path)
    for rel, info in read_manifest(ckpt)["files"].items():
        p = ckpt / rel
        if not p.is_file() or p.stat().st_size != info["bytes"] or _sha256(p) != info["sha256"]:
            raise CheckpointError(f"{p}: missing or does not match its manifest checksum")


def load_model(path: str | Path, model: torch.nn.Module, layout: ParallelLayout) -> dict:
    """Collective. Loads weights saved at any layout into ``model``; returns the manifest."""
    from megatron.core import dist_checkpointing

    ckpt = resolve(path)
    manifest = read_manifest(ckpt)
    saved = manifest["layout"]
    log.info("loading checkpoint step %d from %s (saved at tp=%d pp=%d ep=%d; now %s)",
             manifest["step"], ckpt, saved["tp"], saved["pp"], saved.get("ep", 1),
             layout.describe())
    sharded = model.sharded_state_dict(metadata=dict(manifest.get("sharded_metadata",
                                                                  SHARDED_METADATA)))
    # dist_checkpointing raises on a tensor the checkpoint lacks; strict load_state_dict
    # catches anything the model has that the sharded dict did not cover.
    state = dist_checkpointing.load(sharded, str(ckpt / "model"))
    model.load_state_dict(state, strict=True)
    return manifest
