"""Every random generator a rank draws from, captured and restored.

The generators: Python's ``random``, NumPy's global generator, the torch CPU generator, every
CUDA device's generator (when CUDA is available) and megatron-core's tensor-parallel RNG
tracker (the named streams dropout forks; on CPU trainer/distributed/cpu_compat.py makes them
CPU generator states). Restoring a capture makes the draws after the restore equal the draws
after the capture.

``snapshot()`` / ``restore(snap)``   in memory (tensors), for replaying a forward within a
                                     process (trainer/step_cache.py)
``rng_state()`` / ``set_rng_state(state)``   the same as JSON (byte states as base64 strings):
                                     per rank, in each checkpoint's ``rank_state`` file
"""
from __future__ import annotations

import base64
import random

import numpy as np
import torch

VERSION = 1


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def _tracker():
    """megatron-core's tracker, or None where megatron-core is absent (plain-PyTorch export)."""
    try:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    except ImportError:
        return None
    return get_cuda_rng_tracker()


def _generator_state(state) -> torch.Tensor:
    # the tracker keeps ByteTensors, or torch.Generator objects with cudagraph-safe RNG
    return state.get_state() if isinstance(state, torch.Generator) else state


def snapshot() -> dict:
    """Copies of every generator's state (see the module docstring), in memory."""
    tracker = _tracker()
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "megatron_tracker": None if tracker is None else {
            name: _generator_state(s).clone() for name, s in tracker.get_states().items()},
    }


def restore(snap: dict) -> None:
    """Set every generator to its state in ``snap`` (from ``snapshot``); ValueError when this
    process has other CUDA devices or tracker streams than the snapshot."""
    random.setstate(snap["python"])
    np.random.set_state(snap["numpy"])
    torch.set_rng_state(snap["torch_cpu"])
    cuda = snap["torch_cuda"]
    if cuda:
        if not torch.cuda.is_available() or torch.cuda.device_count() != len(cuda):
            raise ValueError(f"rng state has {len(cuda)} CUDA generators; this process sees "
                             f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}")
        torch.cuda.set_rng_state_all(cuda)
    saved = snap["megatron_tracker"]
    tracker = _tracker()
    if saved is None or tracker is None:
        return
    current = tracker.get_states()
    if set(saved) != set(current):
        raise ValueError(f"megatron RNG tracker streams differ: saved {sorted(saved)}, "
                         f"this process {sorted(current)}")
    states = {}
    for name, s in saved.items():
        if isinstance(current[name], torch.Generator):
            current[name].set_state(s)
            states[name] = current[name]
        else:  # a copy: the snapshot stays valid for another restore
            states[name] = s.clone()
    tracker.set_states(states)


def rng_state() -> dict:
    """``snapshot()`` as JSON."""
    snap = snapshot()
    version, mt, gauss = snap["python"]
    kind, keys, pos, has_gauss, cached = snap["numpy"]
    out = {
        "version": VERSION,
        "python": [version, list(mt), gauss],
        "numpy": {"kind": kind, "keys": base64.b64encode(keys.astype("<u4").tobytes()).decode(),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch_cpu": _b64(snap["torch_cpu"]),
        "torch_cuda": [_b64(s) for s in snap["torch_cuda"]],
    }
    if snap["megatron_tracker"] is not None:
        out["megatron_tracker"] = {name: _b64(s) for name, s in snap["megatron_tracker"].items()}
    return out


def set_rng_state(state: dict) -> None:
    """``restore`` from ``rng_state()``'s JSON."""
    if state.get("version") != VERSION:
        raise ValueError(f"rng state version {state.get('version')!r} != {VERSION}")
    version, mt, gauss = state["python"]
    n = state["numpy"]
    keys = np.frombuffer(base64.b64decode(n["keys"]), dtype="<u4").astype(np.uint32)
    tracker = state.get("megatron_tracker")
    restore({
        "python": (version, tuple(mt), gauss),
        "numpy": (n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]),
        "torch_cpu": _unb64(state["torch_cpu"]),
        "torch_cuda": [_unb64(s) for s in state.get("torch_cuda", [])],
        "megatron_tracker": None if tracker is None else {
            name: _unb64(s) for name, s in tracker.items()},
    })
