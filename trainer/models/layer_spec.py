"""megatron-core layer specs for CLIP towers.

A CLIP residual block is exactly megatron's pre-LN ``TransformerLayer``:
``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``, with biases on every linear layer.
The vision tower attends bidirectionally, the text tower causally. The MoE issue swaps the
``mlp`` submodule; nothing else changes. Core attention (``model.attention``): ``sdpa``, torch's
``scaled_dot_product_attention`` (trainer/models/attention.py), or ``unfused``, megatron's
``DotProductAttention``.
"""
from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from trainer.models.attention import SDPAttention

try:  # apex's fused LayerNorm when it is importable; torch's otherwise (same parameters)
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm as LayerNormImpl
    import apex  # noqa: F401
except ImportError:
    from megatron.core.transformer.torch_norm import WrappedTorchNorm as LayerNormImpl


def dense_mlp_spec() -> ModuleSpec:
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(
        linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))


def moe_mlp_spec(moe, activation: str, tower: str = "") -> ModuleSpec:
    """The MoE MLP (trainer/moe/layer.py) in place of the dense one; ``tower`` names it in
    logs ("vision" / "text")."""
    from trainer.moe.layer import MoEMLP
    return ModuleSpec(module=MoEMLP, params={"moe": moe, "activation": activation,
                                             "tower": tower})


CORE_ATTENTION = {"sdpa": SDPAttention, "unfused": DotProductAttention}  # model.attention


def tower_layer_specs(tower, causal: bool, first: int, count: int,
                      attention: str = "sdpa") -> list[ModuleSpec]:
    """Specs of blocks ``first .. first+count-1`` of a tower (global block indices, so a
    pipeline stage knows which of its blocks are MoE)."""
    moe_layers = set(tower.moe.moe_layers(tower.layers))
    name = "text" if causal else "vision"
    return [clip_layer_spec(causal, moe_mlp_spec(tower.moe, tower.act, name) if i in moe_layers
                            else None, attention) for i in range(first, first + count)]


def clip_layer_spec(causal: bool, mlp: ModuleSpec | None = None,
                    attention: str = "sdpa") -> ModuleSpec:
    mask = AttnMaskType.causal if causal else AttnMaskType.no_mask
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=LayerNormImpl,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear, core_attention=CORE_ATTENTION[attention],
                    linear_proj=RowParallelLinear, q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=LayerNormImpl,
            mlp=mlp or dense_mlp_spec(),
            mlp_bda=get_bias_dropout_add,
        ),
    )
