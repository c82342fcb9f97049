"""The ONE place that patches our dependencies so they run on CPU + gloo.

megatron-core 0.16.1 assumes CUDA in a handful of places (listed in ../shared/DESIGN.md):
``torch.cuda.current_device()`` for buffer placement, causal masks built on ``device="cuda"``,
the CUDA RNG tracker that attention always forks, ``torch.zeros(..., device="cuda")`` in the
pipeline schedules, ``torch.cuda.synchronize`` in p2p and async checkpoint saves, and a missing
``te_general_gemm`` name without TransformerEngine. ``apply()`` patches exactly these, and only
when CUDA is absent: on a GPU machine it does nothing.
"""
from __future__ import annotations

import contextlib
import functools
import os
import types

import torch

_APPLIED = False


def needed() -> bool:
    return not torch.cuda.is_available()


def select_deepspeed_accelerator() -> None:
    """Without CUDA, DeepSpeed falls back to its CPU accelerator by itself and warns "Setting
    accelerator to CPU" on every rank; naming it first (``DS_ACCELERATOR=cpu``, unless the
    user set one) is the same choice, said once in our log instead. Call before DeepSpeed is
    imported (trainer/moe/router.py, dispatch.py, groups.py do)."""
    if needed():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def apply() -> None:
    """Idempotent. Call before building megatron modules (``trainer.distributed`` does)."""
    global _APPLIED
    if _APPLIED or not needed():
        return
    _patch_torch_cuda()
    _patch_megatron()
    _APPLIED = True


def _patch_torch_cuda() -> None:
    # Megatron places buffers with device=torch.cuda.current_device(); "cpu" is a valid device.
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None


class _CudaToCpu(types.ModuleType):
    """Stands in for ``torch`` inside one megatron module: factory calls that name
    ``device="cuda"`` get the CPU instead. Everything else is plain torch."""

    _FACTORIES = ("zeros", "ones", "empty", "tensor", "full", "arange")

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in self._FACTORIES:
            @functools.wraps(attr)
            def factory(*args, **kwargs):
                if str(kwargs.get("device", "")).startswith("cuda"):
                    kwargs["device"] = "cpu"
                kwargs.pop("pin_memory", None)
                return attr(*args, **kwargs)
            return factory
        return attr


@functools.lru_cache(maxsize=32)
def _causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _sliding_window_causal_mask(sq, skv, window_size):
    m = torch.ones(sq, skv, dtype=torch.bool)
    mu = torch.triu(m, diagonal=skv - sq - window_size[0])
    return ~torch.tril(mu, diagonal=skv - sq + window_size[1])


def _patch_megatron() -> None:
    from megatron.core.fusions import fused_softmax
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import utils as tutils
    from megatron.core.transformer.moe import moe_utils

    for mod in (tutils, fused_softmax):
        mod.get_default_causal_mask = _causal_mask
        mod.get_sliding_window_causal_mask = _sliding_window_causal_mask
    schedules.torch = _CudaToCpu()
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Megatron's tracker API over CPU generator states (attention forks it even with
        dropout 0; TP ranks must draw the same dropout masks only where megatron says so)."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    def initialize_rng_tracker(*args, force_reset: bool = False, **kwargs):
        if force_reset or not mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED:
            mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
            mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    mrandom.initialize_rng_tracker = initialize_rng_tracker
    # activation recompute saves and restores "the CUDA RNG": here it is the CPU generator
    mrandom._get_cuda_rng_state = lambda device=-1, clone=False, graph_safe=False: (
        torch.get_rng_state())
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: (
        torch.set_rng_state(new_state))
    mrandom._CUDA_RNG_STATE_TRACKER = None
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
    initialize_rng_tracker()
    # model_parallel_cuda_manual_seed calls torch.cuda.manual_seed, harmless without a GPU.


def patch_deepspeed() -> None:
    """DeepSpeed's comm backend compiles a shared-memory op (~2.5 min) on first init; on CPU
    we talk gloo through torch.distributed and never need it."""
    if not needed():
        return
    import importlib

    # Not ``import deepspeed.comm.torch as m``: that resolves the attribute ``torch`` of
    # deepspeed.comm, which is the torch package its star-imports leak.
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    ds_torch.build_shm_op = lambda *a, **k: None
