"""Grouped GEMM and fused expert MLP over ragged row groups (the MoE expert FFN).

    from kernels import expert_mlp, grouped_gemm

Three backends: the CUTLASS extension on CUDA bf16/fp16 when it has been built (`python -m
kernels.build`), torch's own grouped mm (kernels/torch_grouped.py: no host sync; CPU bf16/fp16,
CUDA bf16 on Hopper/Blackwell) and a pure-PyTorch reference that runs anywhere; "auto" picks the
first that fits. Importing this package never loads or requires the extension. Layouts and
semantics: kernels/README.md.
"""
from kernels._ext import (
    BUILD_COMMAND,
    ExtensionNotBuiltError,
    extension_available,
    extension_status,
)
from kernels.activations import ACTIVATIONS
from kernels.api import BACKEND_CALLS, BACKENDS, SERVED_BY, expert_mlp, grouped_gemm
from kernels.layout import linear_weights_to_grouped

__all__ = [
    "ACTIVATIONS",
    "BACKEND_CALLS",
    "BACKENDS",
    "BUILD_COMMAND",
    "ExtensionNotBuiltError",
    "expert_mlp",
    "extension_available",
    "extension_status",
    "grouped_gemm",
    "linear_weights_to_grouped",
    "SERVED_BY",
]
