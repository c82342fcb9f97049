"""Core attention on torch ``scaled_dot_product_attention``.

A drop-in for megatron-core's unfused ``DotProductAttention`` (same constructor, same
``forward`` and shapes): ``query`` ``[sq, b, np, hn]``, ``key`` / ``value`` ``[sk, b, ng, hn]``
(``np`` heads and ``ng`` query groups on this tensor-parallel rank) -> ``[sq, b, np * hn]``.
The unfused module materialises ``[b * np, sq, sk]`` fp32 scores; SDPA picks a fused kernel
(flash / cuDNN / memory-efficient on CUDA, the flash-style kernel on CPU) that never does.

Same math as the unfused module: scale ``softmax_scale`` (default ``1 / sqrt(hn)``;
``apply_query_key_layer_scaling`` only moves a factor between the matmul and the fp32
softmax there, so the product is unchanged), a causal mask when ``attn_mask_type`` is causal
and no mask is given, otherwise megatron's boolean mask (True = masked out), grouped-query
heads shared as ``repeat_interleave`` shares them, attention dropout only in training, drawn
from megatron's model-parallel RNG stream like the unfused module's.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    """megatron core attention through ``F.scaled_dot_product_attention`` (no parameters)."""

    def __init__(self, config: TransformerConfig, layer_number: int,
                 attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("model.attention=sdpa: context parallelism is not supported")
        if config.softmax_type != "vanilla":
            raise ValueError(f"model.attention=sdpa: softmax_type={config.softmax_type!r} is "
                             "not supported (use model.attention=unfused)")
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq,
                                     layer_number):
            raise ValueError("model.attention=sdpa: window attention is not supported")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        tp = pg_collection.tp.size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, tp)
        self.hidden_size_per_attention_head = divide(projection_size, config.num_attention_heads)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, tp)
        self.num_query_groups_per_partition = divide(config.num_query_groups, tp)
        self.softmax_scale = (1.0 / math.sqrt(self.hidden_size_per_attention_head)
                              if softmax_scale is None else softmax_scale)
        self.dropout_p = (config.attention_dropout if attention_dropout is None
                          else attention_dropout)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor],
                attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None,
                packed_seq_params=None) -> torch.Tensor:
        if packed_seq_params is not None:
            raise ValueError("model.attention=sdpa: packed sequences are not supported")
        if attention_bias is not None:
            raise ValueError("model.attention=sdpa: attention_bias is not supported")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sq, b = query.shape[:2]
        # [s, b, heads, hn] -> [b, heads, s, hn] (views; SDPA takes strided inputs)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask, causal = None, False
        if attention_mask is not None:  # megatron's bool mask: True = masked out; SDPA's: attend
            mask = ~attention_mask
        elif mask_type == AttnMaskType.causal and sq > 1:
            causal = True
        dropout = self.dropout_p if self.training else 0.0
        gqa = self.num_query_groups_per_partition != self.num_attention_heads_per_partition
        # dropout draws from megatron's model-parallel stream, as the unfused module's does
        rng = (tensor_parallel.get_cuda_rng_tracker().fork()
               if dropout > 0.0 and not self.config.sequence_parallel else contextlib.nullcontext())
        with rng:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=causal, scale=self.softmax_scale,
                                                 enable_gqa=gqa)
        # [b, heads, sq, hn] -> [sq, b, heads * hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
