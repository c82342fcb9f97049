"""Checkpoints: a directory per step; weights and optimizer moments sharded through megatron-core
dist_checkpointing, so a checkpoint saved at one TP/PP/EP layout loads at any other.

Layout of ``<root>/step_00001200/``::

    model/             torch_dist: every parameter as a ShardedTensor (MoE experts by global
                       expert index, trainer/moe/layer.py)
    optimizer/         torch_dist, only when an optimizer was saved:
                         optimizer.state.exp_avg.<param key>     sharded like the parameter
                         optimizer.state.exp_avg_sq.<param key>  sharded like the parameter
                         optimizer.state.step.<param key>        shape [1]: the param's step count
    rank_state/rank_00003.json   one per global rank, when given: that rank's RNG
                       (trainer/distributed/rng.py) and data position
    manifest.json      written LAST by rank 0: step, resolved config, world layout, train_state
                       (schedule step, consumed samples...), optimizer hyperparameters, versions,
                       and the size and sha256 of every other file

A directory without a valid manifest is not a checkpoint. Every rank writes into
``step_XXXXXXXX.partial`` and fsyncs what it wrote; after a barrier rank 0 writes the
manifest, renames the directory to ``step_XXXXXXXX`` and replaces ``<root>/latest`` (a
one-line text file) atomically. A crash at any moment leaves the previous checkpoint and
``latest`` intact; the next save removes leftover ``*.partial`` directories first.
``keep_last=N`` then deletes complete ``step_*`` directories older than the one just saved,
keeping N in all (that one included); directories of later steps (a checkpoint a resume fell
back from, trainer/resume.py) are left alone until a save of their step replaces them.

Optimizer state on load (``load_checkpoint(..., optimizer=...)``): moments and step counts map
by the parameter's sharded key, so they reshard with the weights; which param group a parameter
sits in does not matter. Hyperparameters (lr, betas, eps, weight_decay...) are NOT restored: the
current optimizer's groups win (they come from the config), and the caller's schedule restores
the learning rate from ``train_state``. Saved and current group hyperparameters are compared
by position and differences are logged. A parameter with no state in the checkpoint (it never
had a gradient before the save) starts fresh, as it would have.
"""
from __future__ import annotations

import json
import logging
import multiprocessing.managers
import os
import platform
import re
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from trainer.distributed.layout import ParallelLayout
from trainer.distributed import collectives as C
from trainer.io import fsync, sha256, write_atomic, write_durable
from trainer.signals import die_with_parent

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"  # a one-line file naming the newest complete step directory
FORMAT_VERSION = 1
SHARDED_METADATA = {"non_homogeneous_layers": True}  # dense and MoE layers may mix
RANK_STATE = "rank_state/rank_{rank:05d}.json"
OPTIMIZER_PREFIX = "optimizer.state"
STEP_DIR = re.compile(r"step_(\d+)")
_LEFTOVER = (".partial", ".stale")  # an interrupted save; an old copy on its way out


class CheckpointError(RuntimeError):
    pass


class CorruptCheckpointError(CheckpointError):
    """The directory is not a usable checkpoint: no or an unreadable manifest, or a file it
    lists is missing or differs from its size and sha256."""


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


def layout_dict(layout: ParallelLayout) -> dict:
    return {"world_size": layout.world_size, "tp": layout.tp, "pp": layout.pp,
            "dp": layout.dp, "ep": layout.ep}


# ---- files
def _remove(path: Path) -> None:
    """Rename out of the ``step_*`` namespace first, so a crash mid-delete leaves a leftover
    that the next save clears, never a half-deleted checkpoint."""
    gone = path if path.name.endswith(_LEFTOVER) else path.with_name(path.name + ".stale")
    if gone != path:
        os.replace(path, gone)
    shutil.rmtree(gone)


def _checksums(ckpt: Path, rels: list[str]) -> dict:
    """Size and sha256 of ``rels``, hashed in parallel: rank r takes every world-th file."""
    mine = {rel: {"bytes": (ckpt / rel).stat().st_size, "sha256": sha256(ckpt / rel)}
            for rel in rels[C.rank()::C.world()]}
    out = {}
    for part in C.all_gather_object(mine):
        out.update(part)
    return dict(sorted(out.items()))


# ---- weights in fp32, whatever the parameters' dtype
def _fp32_weights(sharded: dict, optimizer: torch.optim.Optimizer | None) -> dict:
    """The model's sharded state dict with fp32 data in place of low-precision parameters:
    a parameter's fp32 master (trainer/optim.py MasterWeightAdamW) when the optimizer keeps
    one, else an fp32 copy. Checkpoints therefore always hold fp32 weights, and a bf16 run
    loads into its masters exactly. Returns {key: master} for the keys given a master."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    master_of = getattr(optimizer, "master_of", None)
    by_ptr = {p.data_ptr(): p for p in getattr(optimizer, "model_params", [])}
    masters = {}
    for key, sh in sharded.items():
        if not (isinstance(sh, ShardedTensor) and sh.data.is_floating_point()
                and sh.data.dtype != torch.float32):
            continue
        param = by_ptr.get(sh.data.data_ptr())
        master = master_of(param) if master_of and param is not None else None
        if master is not None and master.shape == sh.data.shape:
            sh.data = masters[key] = master
        else:
            sh.data = sh.data.float()
    return masters


# ---- optimizer state as ShardedTensors
def _param_id_map(model_sharded: dict, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer param index (torch's ``state_dict`` numbering) -> the param's ShardedTensor
    (a MasterWeightAdamW numbers its masters in the order of ``model_params``)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.optimizer import get_param_id_to_sharded_param_map

    params = getattr(optimizer, "model_params", None) or [
        p for g in optimizer.param_groups for p in g["params"]]
    id_map = get_param_id_to_sharded_param_map(model_sharded, params)
    missing = [tuple(p.shape) for i, p in enumerate(params) if i not in id_map]
    if missing:
        raise CheckpointError(f"{len(missing)} optimizer parameters are not in the model's "
                              f"sharded state dict (shapes {missing[:3]}): is the optimizer "
                              f"built over this model?")
    odd = [t.key for t in id_map.values() if not isinstance(t, ShardedTensor)]
    if odd:
        raise CheckpointError(f"parameters saved through a ShardedTensorFactory are not "
                              f"supported with optimizer state: {odd[:3]}")
    return id_map


def _step_tensor(param, data: torch.Tensor):
    """A param's step count as a [1] tensor keyed by the param; its main replica is the rank
    holding the param's first shard (all shards of a param step together)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica

    n = param.prepend_axis_num
    main = is_main_replica(param.replica_id) and not any(param.global_offset[n:])
    prepended = [(i, param.global_offset[i], param.global_shape[i]) for i in range(n)]
    return ShardedTensor.from_rank_offsets(f"{OPTIMIZER_PREFIX}.step.{param.key}", data,
                                           *prepended, replica_id=0 if main else 1,
                                           prepend_axis_num=n)


def _optimizer_sharded_state(model_sharded: dict, optimizer: torch.optim.Optimizer) -> dict:
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    id_map = _param_id_map(model_sharded, optimizer)
    out = {}
    for idx, state in optimizer.state_dict()["state"].items():
        param = id_map[idx]
        for name, value in state.items():
            if name == "step":
                step = value if torch.is_tensor(value) else torch.tensor(float(value))
                out[f"{idx}.{name}"] = _step_tensor(param, step.detach().reshape(1).clone())
            elif torch.is_tensor(value) and tuple(value.shape) == tuple(param.local_shape):
                out[f"{idx}.{name}"] = make_sharded_optimizer_tensor(
                    param, value, prefix=f"{OPTIMIZER_PREFIX}.{name}")
            else:
                raise CheckpointError(f"optimizer state {name!r} of {param.key} is neither "
                                      f"shaped like the parameter nor a step count")
    return out


def _load_optimizer(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    metadata: dict) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    id_map = _param_id_map(model.sharded_state_dict(metadata=dict(metadata)), optimizer)
    saved: dict[str, dict] = {}  # param key -> {state name: saved tensor's metadata}
    for key, meta in dist_checkpointing.load_tensors_metadata(str(directory)).items():
        name, param_key = key[len(OPTIMIZER_PREFIX) + 1:].split(".", 1)
        saved.setdefault(param_key, {})[name] = meta
    params = [p for g in optimizer.param_groups for p in g["params"]]
    request, fresh = {}, 0
    for idx, param in id_map.items():
        fresh += param.key not in saved
        for name, meta in saved.get(param.key, {}).items():
            if name == "step":
                request[f"{idx}.{name}"] = _step_tensor(param, torch.zeros(1, dtype=meta.dtype))
            else:
                request[f"{idx}.{name}"] = make_sharded_optimizer_tensor(
                    param, torch.empty_like(params[idx], dtype=meta.dtype),
                    prefix=f"{OPTIMIZER_PREFIX}.{name}")
    loaded = dist_checkpointing.load(request, str(directory))
    state: dict[int, dict] = {}
    for key, value in loaded.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value.reshape(()) if name == "step" else value
    if fresh and C.rank() == 0:
        log.info("optimizer: %d of %d parameters have no saved state on rank 0 (fresh moments)",
                 fresh, len(id_map))
    current = optimizer.state_dict()  # the current groups' hyperparameters win
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def _jsonable(v):
    if torch.is_tensor(v):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)


def _group_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    return [{k: _jsonable(v) for k, v in g.items() if k != "params"} | {
             "num_params": len(g["params"])} for g in optimizer.param_groups]


def _log_hyperparameter_changes(saved: list[dict], optimizer: torch.optim.Optimizer) -> None:
    """Groups pair up by their ``name`` (trainer.step.build_optimizer names them), else by
    position; only differences are logged, nothing is changed."""
    now = _group_hyperparameters(optimizer)
    named = all("name" in g for g in saved + now)
    key = (lambda i, g: g["name"]) if named else (lambda i, g: i)  # noqa: E731
    before = {key(i, g): g for i, g in enumerate(saved)}
    after = {key(i, g): g for i, g in enumerate(now)}
    if set(before) != set(after):
        log.info("optimizer groups saved %s, now %s; hyperparameters from the current optimizer",
                 sorted(before, key=str), sorted(after, key=str))
    for k in sorted(set(before) & set(after), key=str):
        a, b = before[k], after[k]
        diff = {h: (a.get(h), b.get(h)) for h in sorted(set(a) | set(b))
                if h != "num_params" and a.get(h) != b.get(h)}
        if diff:
            log.info("optimizer group %s: current hyperparameters kept over saved ones: %s",
                     k, ", ".join(f"{h} {s} -> {c}" for h, (s, c) in diff.items()))


# ---- save
def _check_inputs(optimizer, train_state, rank_state) -> bool:
    """Collective: JSON problems and optimizer presence must agree on every rank before any
    rank starts writing (a lone failing rank would leave the others in a barrier). Returns
    whether any rank has a rank_state."""
    error = ""
    try:
        json.dumps(train_state)
        json.dumps(rank_state)
    except (TypeError, ValueError) as e:
        error = f"train_state / rank_state is not JSON-serialisable: {e}"
    gathered = C.all_gather_object((error, optimizer is not None, rank_state is not None))
    C.raise_if_any([g[0] for g in gathered], CheckpointError)
    if len({g[1] for g in gathered}) > 1:
        raise CheckpointError("save_checkpoint: some ranks passed an optimizer and some did not")
    return any(g[2] for g in gathered)


def step_of(d: Path) -> int:
    return int(STEP_DIR.fullmatch(d.name).group(1))


def step_dirs(root: str | Path) -> list[Path]:
    """The ``step_*`` directories under ``root`` (complete or not), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((d for d in root.iterdir() if d.is_dir() and STEP_DIR.fullmatch(d.name)),
                  key=step_of)


def _prune(root: Path, keep_last: int, saved: Path) -> None:
    """Delete complete checkpoints older than ``saved`` beyond the newest ``keep_last - 1``.
    ``saved`` (just written and checksummed: the newest valid checkpoint) always stays, and so
    do later steps' directories: this run did not write them (trainer/resume.py fell back from
    them) and pruning must not guess whether they are worth keeping."""
    older = [d for d in step_dirs(root)
             if step_of(d) < step_of(saved) and (d / MANIFEST).is_file()]
    for d in older[:max(0, len(older) - (keep_last - 1))]:
        _remove(d)
        log.info("removed old checkpoint %s (keep_last=%d)", d, keep_last)


def own_writer_queue() -> None:
    """Start megatron's checkpoint-writer results queue ourselves, once per process.

    megatron's torch_dist save makes it on first use: a ``spawn`` multiprocessing Manager that
    lives as long as this process, and that nothing stops when this process is killed with
    SIGKILL (measured: a ~0.7 GB orphan per killed rank). Ours is the same Manager, started
    with an initializer that has the kernel kill it when its parent dies. Call it from the
    thread that saves (the main thread), with the stop signals blocked (as saves are)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa
    if getattr(fsa, "_results_queue", False) is not None:  # made already (or renamed upstream)
        return
    manager = multiprocessing.managers.SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
    fsa._results_queue = manager.Queue()  # the proxy keeps the manager alive


def save_checkpoint(root: str | Path, step: int, model: torch.nn.Module, config: dict,
                    layout: ParallelLayout, extra: dict | None = None, *,
                    optimizer: torch.optim.Optimizer | None = None,
                    train_state: dict | None = None, rank_state: dict | None = None,
                    keep_last: int = 0) -> Path:
    """Collective: every rank calls it (with an optimizer on all ranks or on none). Returns
    the committed checkpoint directory.

    ``train_state``: JSON, the same on every rank (rank 0's copy goes into the manifest).
    ``rank_state``: JSON, this rank's own (RNG, data position), one file per rank.
    ``keep_last``: 0 keeps every checkpoint; N keeps this one and the N-1 newest complete
    ``step_*`` directories before it, and deletes the older ones.
    """
    from megatron.core import dist_checkpointing

    own_writer_queue()
    root = Path(root)
    final = root / f"step_{step:08d}"
    partial = root / f"step_{step:08d}.partial"
    any_rank_state = _check_inputs(optimizer, train_state, rank_state)
    t0 = time.time()
    if C.rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for d in root.iterdir():
            if d.is_dir() and d.name.endswith(_LEFTOVER):
                log.info("removing %s left by an interrupted save", d)
                shutil.rmtree(d)
        for sub, wanted in (("model", True), ("optimizer", optimizer is not None),
                            ("rank_state", any_rank_state)):
            if wanted:
                (partial / sub).mkdir(parents=True)
    C.barrier()
    metadata = dict(SHARDED_METADATA)
    weights = model.sharded_state_dict(metadata=dict(metadata))
    _fp32_weights(weights, optimizer)
    dist_checkpointing.save(weights, str(partial / "model"))
    if optimizer is not None:
        dist_checkpointing.save(_optimizer_sharded_state(
            model.sharded_state_dict(metadata=dict(metadata)), optimizer),
            str(partial / "optimizer"))
    if rank_state is not None:
        write_durable(partial / RANK_STATE.format(rank=C.rank()), json.dumps(rank_state))
    C.barrier()  # every rank's files are written and fsynced (megatron fsyncs its shards)
    files = None
    if C.rank() == 0:
        files = sorted(str(p.relative_to(partial)) for p in partial.rglob("*") if p.is_file())
        for rel in files:  # common.pt and metadata.json are rank 0's own, not fsynced by megatron
            fsync(partial / rel)
    files = _checksums(partial, C.broadcast_object(files))
    if C.rank() == 0:
        manifest = {
            "format_version": FORMAT_VERSION, "step": step, "kind": "upclip",
            "config": config, "layout": layout_dict(layout),
            "sharded_metadata": metadata, "versions": versions(),
            "extra": extra or {}, "time": time.time(),
            "train_state": train_state,
            "optimizer": None if optimizer is None else {
                "class": type(optimizer).__name__,
                "param_groups": _group_hyperparameters(optimizer)},
            "rank_state": RANK_STATE if rank_state is not None else None,
            "files": files,
        }
        for d in {(partial / rel).parent for rel in files}:  # directory entries too
            fsync(d)
        write_atomic(partial / MANIFEST, json.dumps(manifest, indent=1))
        if final.exists():  # re-saving a step: the old copy goes only once the new is complete
            os.replace(final, final.with_name(final.name + ".stale"))
        os.replace(partial, final)
        write_atomic(root / LATEST, final.name + "\n")
        shutil.rmtree(final.with_name(final.name + ".stale"), ignore_errors=True)
        if keep_last > 0:
            _prune(root, keep_last, final)
        log.info("saved checkpoint step %d to %s in %.1fs (%s%s)", step, final,
                 time.time() - t0, layout.describe(), ", with optimizer" if optimizer else "")
    C.barrier()
    return final


# ---- read
def latest_step_dir(root: str | Path) -> Path | None:
    """The step directory ``<root>/latest`` names (the one reader of that file); None when
    there is no ``latest``. CorruptCheckpointError when it names no ``step_*`` directory
    (an interrupted save's ``*.partial`` included) or one that does not exist; whether that
    directory holds a checkpoint is the caller's question."""
    latest = Path(root) / LATEST
    if not latest.is_file():
        return None
    name = latest.read_text().strip()
    if not STEP_DIR.fullmatch(name):
        raise CorruptCheckpointError(f"{latest} names {name!r}, not a step_* directory")
    target = latest.parent / name
    if not target.is_dir():
        raise CorruptCheckpointError(f"{latest} names {target}, which does not exist")
    return target


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or a root whose ``latest`` names one; never a partial save."""
    path = Path(path)
    if path.name.endswith(_LEFTOVER):
        raise CheckpointError(f"{path}: an interrupted save, not a checkpoint")
    if (path / MANIFEST).is_file():
        return path
    target = latest_step_dir(path)
    if target is None:
        raise CheckpointError(f"{path}: not a checkpoint (no {MANIFEST}) and no {LATEST!r} file")
    if not (target / MANIFEST).is_file():
        raise CorruptCheckpointError(f"{path / LATEST} names {target}, which has no {MANIFEST}")
    return target


def read_manifest(path: str | Path) -> dict:
    ckpt = resolve(path)
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise CorruptCheckpointError(f"{ckpt / MANIFEST}: not valid JSON ({e.msg})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise CorruptCheckpointError(f"{ckpt / MANIFEST}: format_version {version} != "
                                     f"{FORMAT_VERSION}")
    for key in ("step", "layout", "files"):
        if key not in manifest:
            raise CorruptCheckpointError(f"{ckpt / MANIFEST}: no {key!r} entry")
    return manifest


def file_error(ckpt: Path, rel: str, info: dict, checksum: bool = True) -> str:
    """What is wrong with file ``rel`` of ``ckpt`` against its manifest entry ``info`` ("" if
    nothing): missing, another size (stat only), or (``checksum``) another sha256."""
    p = ckpt / rel
    if not p.is_file():
        return f"{p}: missing (listed in the manifest)"
    size = p.stat().st_size
    if size != info["bytes"]:
        return f"{p}: {size} bytes, its manifest says {info['bytes']} (truncated or replaced)"
    if checksum and sha256(p) != info["sha256"]:
        return f"{p}: does not match its manifest checksum"
    return ""


def _first_file_error(ckpt: Path, files: Iterable[tuple[str, dict]], checksum: bool) -> str:
    """The first problem among ``files`` ((rel, manifest entry) pairs) of ``ckpt``, "" if
    none: the one walk behind ``verify``, ``check_sizes`` and the collective check."""
    return next((e for rel, info in files if (e := file_error(ckpt, rel, info, checksum))), "")


def verify(path: str | Path, contents: bool = True) -> dict:
    """The manifest of a checkpoint whose every listed file is present with its size and
    (``contents``) sha256, read by this process alone; CorruptCheckpointError naming the
    first file that is not. ``contents=False`` is a stat per file: cheap."""
    ckpt = resolve(path)
    manifest = read_manifest(ckpt)
    error = _first_file_error(ckpt, manifest["files"].items(), checksum=contents)
    if error:
        raise CorruptCheckpointError(error)
    return manifest


def check_sizes(path: str | Path) -> dict:
    """``verify(path, contents=False)``: every listed file present with its size."""
    return verify(path, contents=False)


def _verify_collective(ckpt: Path, manifest: dict) -> None:
    """``verify`` split over the ranks (rank r hashes every world-th file); all raise alike."""
    mine = sorted(manifest["files"].items())[C.rank()::C.world()]
    error = _first_file_error(ckpt, mine, checksum=True)
    C.raise_if_any(C.all_gather_object(error), CorruptCheckpointError)


def _load_weights(ckpt: Path, manifest: dict, model: torch.nn.Module,
                  layout: ParallelLayout, optimizer: torch.optim.Optimizer | None = None) -> None:
    from megatron.core import dist_checkpointing

    saved = manifest["layout"]
    log.info("loading checkpoint step %d from %s (saved at tp=%d pp=%d ep=%d; now %s)",
             manifest["step"], ckpt, saved["tp"], saved["pp"], saved.get("ep", 1),
             layout.describe())
    _verify_collective(ckpt, manifest)
    sharded = model.sharded_state_dict(metadata=dict(manifest.get("sharded_metadata",
                                                                  SHARDED_METADATA)))
    # dist_checkpointing raises on a tensor the checkpoint lacks; strict load_state_dict
    # catches anything the model has that the sharded dict did not cover.
    masters = _fp32_weights(sharded, optimizer)
    state = dist_checkpointing.load(sharded, str(ckpt / "model"))
    model.load_state_dict(state, strict=True)  # casts to the parameters' dtype
    with torch.no_grad():
        for key, master in masters.items():
            if state[key] is not master:
                master.copy_(state[key])


def load_model(path: str | Path, model: torch.nn.Module, layout: ParallelLayout) -> dict:
    """Collective. Loads weights saved at any layout into ``model``; returns the manifest."""
    ckpt = resolve(path)
    manifest = read_manifest(ckpt)
    _load_weights(ckpt, manifest, model, layout)
    return manifest


def _rank_state(ckpt: Path, manifest: dict, layout: ParallelLayout) -> dict | None:
    if not manifest.get("rank_state"):
        log.info("checkpoint %s has no per-rank state", ckpt)
        return None
    saved, now = manifest["layout"], layout_dict(layout)
    if any(saved.get(k) != v for k, v in now.items()):
        if C.rank() == 0:
            log.info("per-rank state (RNG, data position) not restored: saved at world=%s "
                     "tp=%s pp=%s dp=%s ep=%s, now world=%d %s", saved.get("world_size"),
                     saved.get("tp"), saved.get("pp"), saved.get("dp"), saved.get("ep"),
                     layout.world_size, layout.describe())
        return None
    path = ckpt / manifest["rank_state"].format(rank=C.rank())
    if not path.is_file():
        log.info("rank %d: no per-rank state in %s", C.rank(), ckpt)
        return None
    return json.loads(path.read_text())


def load_checkpoint(path: str | Path, model: torch.nn.Module, layout: ParallelLayout, *,
                    optimizer: torch.optim.Optimizer | None = None,
                    load_rank_state: bool = True) -> tuple[dict, dict | None]:
    """Collective. Restores weights (and optimizer moments and step counts, when given an
    optimizer) saved at any layout. Returns ``(manifest, rank_state)``: this rank's saved
    ``rank_state``, or None when the world layout (world size, tp, pp, dp, ep) differs from
    the saved one or none was saved; the caller restores RNG and data position from it and
    the schedule from ``manifest["train_state"]``."""
    ckpt = resolve(path)
    manifest = read_manifest(ckpt)
    _load_weights(ckpt, manifest, model, layout, optimizer)
    if optimizer is not None:
        if not manifest.get("optimizer") or not (ckpt / "optimizer").is_dir():
            raise CheckpointError(f"{ckpt}: saved without optimizer state (weights only); "
                                  f"load it with load_model or checkpoint.load")
        _load_optimizer(ckpt / "optimizer", model, optimizer,
                        manifest.get("sharded_metadata", SHARDED_METADATA))
        if C.rank() == 0:
            _log_hyperparameter_changes(manifest["optimizer"]["param_groups"], optimizer)
    rank_state = _rank_state(ckpt, manifest, layout) if load_rank_state else None
    return manifest, rank_state
