"""Grouped GEMM and fused expert MLP over ragged row groups (the MoE expert FFN).

    from kernels import expert_mlp, grouped_gemm

Runs anywhere through a pure-PyTorch reference; on CUDA bf16/fp16 tensors it uses the CUTLASS
extension when it has been built (`python -m kernels.build`). Importing this package never
loads or requires the extension. Layouts and semantics: kernels/README.md.
"""
from kernels._ext import (
    BUILD_COMMAND,
    ExtensionNotBuiltError,
    extension_available,
    extension_status,
)
from kernels.activations import ACTIVATIONS
from kernels.api import BACKENDS, expert_mlp, grouped_gemm
from kernels.layout import linear_weights_to_grouped

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "BUILD_COMMAND",
    "ExtensionNotBuiltError",
    "expert_mlp",
    "extension_available",
    "extension_status",
    "grouped_gemm",
    "linear_weights_to_grouped",
]
