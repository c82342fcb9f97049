"""Counting host reads of tensor values on CPU (what would be a device sync on a GPU).

    with HostReads() as reads:
        ...
    reads.total, reads.where   # count, {"trainer/moe/routing.py:94": n, ...}

Two hooks, because no single one sees every read: a TorchDispatchMode counts
``aten._local_scalar_dense`` (``.item()``, ``int(t)``, ``float(t)``, ``bool(t)``, and the checks
inside ops such as ``F.one_hot``), and a TorchFunctionMode counts ``Tensor.tolist`` /
``.item`` / ``.numpy`` (``tolist`` copies without ``_local_scalar_dense``; ``item`` is seen by
both: it counts once per hook). Reads inside an op's own C++ kernel are not seen (the mode is
off while it runs): e.g. torch's CPU grouped mm loops over ``offs`` in C++; on CUDA that op
reads nothing in its bf16 sm90/sm100 kernel. ``where`` attributes each read to the innermost
frame of our code (kernels/, trainer/), or "?" .
"""
from __future__ import annotations

import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

OURS = ("/kernels/", "/trainer/")


def _site() -> str:
    frames = [f for f in traceback.extract_stack() if any(s in f.filename for s in OURS)]
    if not frames:
        return "?"
    f = frames[-1]
    path = f.filename
    for s in OURS:
        if s in path:
            path = s.strip("/") + "/" + path.split(s, 1)[1]
            break
    return f"{path}:{f.lineno}"


class _Dispatch(TorchDispatchMode):
    def __init__(self, sink):
        super().__init__()
        self.sink = sink

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.sink("_local_scalar_dense")
        return func(*args, **(kwargs or {}))


class _Function(TorchFunctionMode):
    NAMES = {"tolist", "item", "numpy"}

    def __init__(self, sink):
        super().__init__()
        self.sink = sink

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in self.NAMES:
            self.sink(f"Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))


class HostReads:
    def __init__(self):
        self.by_kind: dict[str, int] = {}
        self.where: dict[str, int] = {}
        self._modes = [_Function(self._count), _Dispatch(self._count)]

    def _count(self, kind: str) -> None:
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        site = _site()
        self.where[site] = self.where.get(site, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def __enter__(self) -> "HostReads":
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)
