"""CLIP with megatron-core towers.

Vision: patch embed -> [class token; patches] + positions -> ln_pre -> blocks -> ln_post(class
token) -> projection. Text: tokens + positions -> causal blocks -> ln_final -> state at the
end-of-text token -> projection. Logit scale is learned in log space.

Pipeline layout (``parallel.pp = P``): the vision blocks are split over the P stages (stage 0
also holds the patch embedding; ``parallel.vision_layers_last_stage`` may lighten the last
one) and the whole text tower, both projections, the logit scale and the loss sit on the last
stage, which receives the vision hidden states ``[s, b, d]`` from the previous stage. Stages
exchange one tensor, the vision residual stream, so megatron-core's schedules apply as-is.
Tensor parallelism lives inside megatron's Column/RowParallelLinear layers; everything else
(embeddings, norms, projections, the CLOC prompter) is replicated over TP.

CLOC (``model.prompter.layers > 0``): the last stage also holds a region prompter that turns
the vision tower's final tokens plus a box into a region embedding; region captions go through
the text tower in the same pass as the captions. With ``model.prompter.grounding`` the
prompter also takes each region caption's embedding as a prompt and returns a box.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import (TransformerBlock,
                                                         TransformerBlockSubmodules)
from megatron.core.transformer.transformer_config import TransformerConfig

from kernels.activations import activation_fn
from trainer.config import ModelConfig, ParallelConfig, TextConfig, VisionConfig
from trainer.models.layer_spec import tower_layer_specs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def tower_transformer_config(tower: VisionConfig | TextConfig, model: ModelConfig, tp: int,
                             pp: int = 1, layers_last_stage: int | None = None,
                             recompute: bool = False) -> TransformerConfig:
    """megatron TransformerConfig for one tower. ``pp`` is the number of stages this tower is
    split over (1 for the text tower, which lives on the last stage). ``recompute``: every
    block's activations are recomputed in backward (megatron's full/uniform recompute)."""
    dtype = DTYPES[model.params_dtype]
    extra = {}
    if pp > 1 and layers_last_stage is not None and layers_last_stage >= 0:
        extra["num_layers_in_last_pipeline_stage"] = layers_last_stage
    if recompute:
        extra.update(recompute_granularity="full", recompute_method="uniform",
                     recompute_num_layers=1)
    return TransformerConfig(
        num_layers=tower.layers, hidden_size=tower.width, num_attention_heads=tower.heads,
        ffn_hidden_size=int(tower.width * tower.mlp_ratio),
        activation_func=activation_fn(tower.act), layernorm_epsilon=tower.ln_eps,
        normalization="LayerNorm", add_bias_linear=True, add_qkv_bias=True,
        gated_linear_unit=False, hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        sequence_parallel=False, params_dtype=dtype, pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16, use_cpu_initialization=not torch.cuda.is_available(),
        init_method_std=0.02, deallocate_pipeline_outputs=False,
        cuda_graph_scope=[],  # the whole layer; the default "full" is deprecated (and warns)
        **extra)


class VisionTower(MegatronModule):
    def __init__(self, cfg: VisionConfig, tcfg: TransformerConfig, embed_dim: int,
                 pre_process: bool, post_process: bool, attention: str = "sdpa"):
        super().__init__(config=tcfg)
        self.pre_process, self.post_process = pre_process, post_process
        d = cfg.width
        if pre_process:
            self.conv1 = torch.nn.Conv2d(3, d, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size, bias=False)
            self.class_embedding = torch.nn.Parameter(torch.randn(d) * d ** -0.5)
            self.positional_embedding = torch.nn.Parameter(
                torch.randn(cfg.seq_length, d) * d ** -0.5)
            self.ln_pre = torch.nn.LayerNorm(d, eps=cfg.ln_eps)
        first, count = _stage_layers(tcfg)
        self.transformer = TransformerBlock(
            tcfg, TransformerBlockSubmodules(
                layer_specs=tower_layer_specs(cfg, causal=False, first=first, count=count,
                                              attention=attention)),
            post_layer_norm=False, pre_process=pre_process, post_process=post_process)
        if post_process:
            self.ln_post = torch.nn.LayerNorm(d, eps=cfg.ln_eps)
            self.proj = torch.nn.Linear(d, embed_dim, bias=False)

    def set_input_tensor(self, tensor: torch.Tensor) -> None:
        self.transformer.set_input_tensor(tensor)

    def forward(self, images: torch.Tensor | None, return_tokens: bool = False):
        """``[b, e]`` pooled embedding on the last stage (with the ``[b, s, d]`` normalised
        tokens too when ``return_tokens``); the ``[s, b, d]`` hidden states elsewhere."""
        x = None
        if self.pre_process:
            x = self.conv1(images.to(self.conv1.weight.dtype))     # [b, d, g, g]
            x = x.flatten(2).transpose(1, 2)                        # [b, n, d]
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
            x = self.ln_pre(x).transpose(0, 1).contiguous()         # [s, b, d]
        x = self.transformer(hidden_states=x, attention_mask=None)  # [s, b, d]
        if not self.post_process:
            return x
        if not return_tokens:
            return self.proj(self.ln_post(x[0]))                    # [b, e]
        tokens = self.ln_post(x.transpose(0, 1))                    # [b, s, d]
        return self.proj(tokens[:, 0]), tokens


class TextTower(MegatronModule):
    def __init__(self, cfg: TextConfig, tcfg: TransformerConfig, embed_dim: int,
                 attention: str = "sdpa"):
        super().__init__(config=tcfg)
        d = cfg.width
        self.eot_id = cfg.eot_id
        self.token_embedding = torch.nn.Embedding(cfg.vocab_size, d)
        self.positional_embedding = torch.nn.Parameter(torch.randn(cfg.context_length, d) * 0.01)
        self.transformer = TransformerBlock(
            tcfg, TransformerBlockSubmodules(
                layer_specs=tower_layer_specs(cfg, causal=True, first=0, count=cfg.layers,
                                              attention=attention)),
            post_layer_norm=False, pre_process=True, post_process=True)
        self.ln_final = torch.nn.LayerNorm(d, eps=cfg.ln_eps)
        self.proj = torch.nn.Linear(d, embed_dim, bias=False)
        torch.nn.init.normal_(self.token_embedding.weight, std=0.02)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        eot = (text == self.eot_id).int().argmax(dim=-1)            # first end-of-text
        # Tokens after the first end-of-text never reach the pooled state (causal attention);
        # MoE layers leave them out of routing and its statistics.
        real = torch.arange(text.shape[1], device=text.device) <= eot[:, None]  # [b, l]
        x = self.token_embedding(text) + self.positional_embedding  # [b, l, d]
        x = self.transformer(hidden_states=x.transpose(0, 1).contiguous(), attention_mask=None,
                             padding_mask=real)
        x = self.ln_final(x.transpose(0, 1))                        # [b, l, d]
        return self.proj(x[torch.arange(x.shape[0], device=x.device), eot])  # [b, e]


def pack_regions(region_text: torch.Tensor, mask: torch.Tensor | None, rows: int | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Region captions ``[b, R, L]`` -> the rows the text tower runs and where they go back:
    without a mask every slot (``[b*R, L]``, None); with one the present regions only, in
    row-major order, then empty captions up to ``rows`` (``[max(n, rows), L]``, their indices
    ``[n]`` in ``b*R``). Padding slots never reach the text tower."""
    flat = region_text.flatten(0, 1)                                            # [b*R, L]
    if mask is None:
        return flat, None
    keep = mask.flatten().nonzero().squeeze(1)                                  # [n]
    packed = flat[keep]
    extra = (rows or 0) - packed.shape[0]
    if extra > 0:
        packed = torch.cat([packed, packed.new_zeros(extra, packed.shape[1])])
    return packed, keep


def _stage_layers(tcfg: TransformerConfig) -> tuple[int, int]:
    """(first global block index, number of blocks) of this pipeline stage."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
    return get_transformer_layer_offset(tcfg), get_num_layers_to_build(tcfg)


class CLIP(MegatronModule):
    """One pipeline stage of CLIP (the whole model when ``pp == 1``).

    ``forward(images, text[, region_boxes, region_text])`` returns the vision hidden states
    ``[s, b, d]`` on every stage but the last, and a dict there: ``image_features`` and
    ``text_features`` ``[b, e]`` (L2-normalised), ``logit_scale`` (exp'd), ``logit_bias``
    (SigLIP only) and, given regions, ``region_features`` / ``region_text_features``
    ``[b, R, e]`` (L2-normalised), and with ``ground=True`` ``region_box_pred`` ``[b, R, 4]``
    (the box each region caption locates, xyxy fractions of the image; float32).
    """

    def __init__(self, cfg: ModelConfig, parallel: ParallelConfig, pre_process: bool = True,
                 post_process: bool = True, recompute: bool = False):
        vcfg = tower_transformer_config(cfg.vision, cfg, parallel.tp, parallel.pp,
                                        parallel.vision_layers_last_stage, recompute)
        super().__init__(config=vcfg)  # the schedules read hidden size / dtype from here
        self.model_type = ModelType.encoder_or_decoder
        self.cfg = cfg
        self.pre_process, self.post_process = pre_process, post_process
        self.visual = VisionTower(cfg.vision, vcfg, cfg.embed_dim, pre_process, post_process,
                                  cfg.attention)
        if post_process:
            tcfg = tower_transformer_config(cfg.text, cfg, parallel.tp, pp=1, recompute=recompute)
            self.text = TextTower(cfg.text, tcfg, cfg.embed_dim, cfg.attention)
            self.logit_scale = torch.nn.Parameter(torch.tensor(cfg.logit_scale_init))
            if cfg.logit_bias_init is not None:
                self.logit_bias = torch.nn.Parameter(torch.tensor(cfg.logit_bias_init))
            if cfg.prompter.layers:
                from trainer.models.prompter import build_prompter
                self.prompter = build_prompter(cfg)
        dtype = DTYPES[cfg.params_dtype]
        if dtype != torch.float32:
            self.to(dtype)

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.visual.set_input_tensor(input_tensor)

    def encode_image(self, images: torch.Tensor | None) -> torch.Tensor:
        return self.visual(images)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        return self.text(text)

    def forward(self, images: torch.Tensor | None, text: torch.Tensor | None,
                region_boxes: torch.Tensor | None = None,
                region_text: torch.Tensor | None = None,
                region_mask: torch.Tensor | None = None, region_rows: int | None = None,
                ground: bool = False):
        regions = region_boxes is not None and hasattr(self, "prompter")
        x = self.visual(images, return_tokens=regions)
        if not self.post_process:
            return x
        out = {"logit_scale": self.logit_scale.exp()}
        if hasattr(self, "logit_bias"):
            out["logit_bias"] = self.logit_bias
        if not regions:
            out["image_features"] = F.normalize(x, dim=-1)
            if text is not None:
                out["text_features"] = F.normalize(self.text(text), dim=-1)
            return out
        pooled, tokens = x
        b, r = region_boxes.shape[:2]
        rows, keep = pack_regions(region_text, region_mask, region_rows)         # [n', L]
        # captions and region captions in one text-tower pass: [b + n', L] -> [b + n', e]
        t = F.normalize(self.text(torch.cat([text, rows])), dim=-1)
        out["image_features"] = F.normalize(pooled, dim=-1)
        out["text_features"] = t[:b]
        region_t = t[b:] if keep is None else t.new_zeros(b * r, t.shape[1]).index_copy(
            0, keep, t[b:b + keep.numel()])                                     # [b*R, e]
        out["region_text_features"] = region_t.view(b, r, -1)                   # [b, R, e]
        out["region_features"] = F.normalize(self.prompter(tokens, region_boxes), dim=-1)
        if ground:  # CLOC's grounding task: each region caption, as a prompt, gives a box
            out["region_box_pred"] = self.prompter.ground(tokens, out["region_text_features"])
        return out
