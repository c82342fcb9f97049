"""Every random generator a rank draws from, captured as JSON and restored.

``rng_state()`` returns a JSON-able dict (byte states as base64 strings) of: Python's
``random``, NumPy's global generator, the torch CPU generator, every CUDA device's generator
(when CUDA is available) and megatron-core's tensor-parallel RNG tracker (the named streams
dropout forks; on CPU trainer/distributed/cpu_compat.py makes them CPU generator states).
``set_rng_state(state)`` restores them, so the draws after a restore equal the draws after
the capture. The state is per rank: checkpoints keep it in each rank's ``rank_state`` file.
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


def rng_state() -> dict:
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out = {
        "version": VERSION,
        "python": [version, list(mt), gauss],
        "numpy": {"kind": kind, "keys": base64.b64encode(keys.astype("<u4").tobytes()).decode(),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch_cpu": _b64(torch.get_rng_state()),
        "torch_cuda": ([_b64(s) for s in torch.cuda.get_rng_state_all()]
                       if torch.cuda.is_available() else []),
    }
    tracker = _tracker()
    if tracker is not None:
        out["megatron_tracker"] = {name: _b64(_generator_state(s))
                                   for name, s in tracker.get_states().items()}
    return out


def set_rng_state(state: dict) -> None:
    if state.get("version") != VERSION:
        raise ValueError(f"rng state version {state.get('version')!r} != {VERSION}")
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    n = state["numpy"]
    keys = np.frombuffer(base64.b64decode(n["keys"]), dtype="<u4").astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(_unb64(state["torch_cpu"]))
    cuda = state.get("torch_cuda", [])
    if cuda:
        if not torch.cuda.is_available() or torch.cuda.device_count() != len(cuda):
            raise ValueError(f"rng state has {len(cuda)} CUDA generators; this process sees "
                             f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}")
        torch.cuda.set_rng_state_all([_unb64(s) for s in cuda])
    saved = state.get("megatron_tracker")
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
            current[name].set_state(_unb64(s))
            states[name] = current[name]
        else:
            states[name] = _unb64(s)
    tracker.set_states(states)
