"""Counting torch.distributed collectives (what would be a launch and a wait on NCCL).

    with CollectiveCalls() as calls:
        ...
    calls.total, calls.calls   # count, [("all_reduce", torch.int64, "trainer/step.py:95"), ...]

Patches the module attributes of ``torch.distributed`` (our code and megatron-core call them
as ``dist.<name>`` / ``torch.distributed.<name>``, looked up at call time), restored on exit.
A call made inside another counted one (``all_gather_object`` runs ``all_gather``) counts
once. Each call is attributed to the innermost frame of our code (trainer/), or "?".
"""
from __future__ import annotations

import functools
import traceback

import torch
import torch.distributed as dist

NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
         "all_to_all_single", "all_to_all", "broadcast", "all_gather_object",
         "broadcast_object_list", "barrier", "reduce_scatter")


def _site() -> str:
    frames = [f for f in traceback.extract_stack() if "/trainer/" in f.filename]
    if not frames:
        return "?"
    return f"trainer/{frames[-1].filename.split('/trainer/', 1)[1]}:{frames[-1].lineno}"


class CollectiveCalls:
    def __init__(self):
        self.calls: list[tuple[str, torch.dtype | None, str]] = []
        self._saved: dict[str, object] = {}
        self._depth = 0

    @property
    def total(self) -> int:
        return len(self.calls)

    def count(self, name: str | None = None, integer: bool | None = None) -> int:
        """Calls of ``name`` (None: any), on integer tensors only (True), on others (False)."""
        def is_int(dtype):
            return dtype is not None and not dtype.is_floating_point and dtype != torch.bool
        return sum(1 for n, dtype, _ in self.calls if (name is None or n == name)
                   and (integer is None or is_int(dtype) == integer))

    def _wrap(self, name: str, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self._depth == 0:
                first = args[0] if args else None
                if isinstance(first, (list, tuple)) and first:   # all_gather(out_list, x)
                    first = args[1] if len(args) > 1 else first[0]
                dtype = first.dtype if isinstance(first, torch.Tensor) else None
                self.calls.append((name, dtype, _site()))
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
        return counted

    def __enter__(self) -> "CollectiveCalls":
        for name in NAMES:
            fn = getattr(dist, name, None)
            if fn is not None:
                self._saved[name] = fn
                setattr(dist, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()
