"""CLOC's region prompter (Chen et al. 2024, "Contrastive Localized Language-Image
Pre-Training", arXiv 2410.02746): a light transformer over the image encoder's tokens, prompted
with a box (-> a region embedding, trained against the region's caption by
trainer/losses/region.py) or with a region caption's text embedding (-> a box, trained by
trainer/losses/grounding.py: the paper's grounding task).

    box prompt:  box (x0, y0, x1, y1) -> Fourier features -> MLP            = prompt
                 patch tokens averaged by their cell's overlap with the box = RoI feature
                 query = prompt + RoI feature (the class token if the box covers no cell)
    text prompt: query = Linear(region caption embedding)                  (grounding only)
    layers x [query += cross-attention(query -> all image tokens); query += MLP]   (pre-LN)
    LayerNorm -> box prompt: projection to embed_dim     (the region embedding)
              -> text prompt: 2-layer GELU MLP -> 4      (the box, normalised xyxy)

From the paper (Sec. 3.2-3.3, Table A): one Prompter shared by both prompt kinds, box prompts
as positional encodings of the two corners, text prompts "encoded by re-using the text
encoder (w/ pooling & projection)", a single-layer transformer of the ViT's width, and a
"2-layer MLP with GELUs" box head. Ours: queries cross-attend to the image tokens instead of
being prepended to them (so a region's output depends on its own prompt and the image alone,
and R prompts cost R queries, not R full encoder passes), the RoI feature added to the box
prompt, the text embedding taken L2-normalised (as the contrastive loss sees it) through a
linear map to the width, and the box head's output read as sigmoid (cx, cy, w, h), DETR's
parametrisation (Carion et al. 2020), then converted to xyxy. Plain torch, replicated over
tensor parallelism.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NUM_FREQS = 8  # Fourier frequencies per box coordinate: pi * 2^k, k < NUM_FREQS


def box_fourier_features(boxes: torch.Tensor, num_freqs: int = NUM_FREQS) -> torch.Tensor:
    """``[..., 4]`` -> ``[..., 4 * 2 * num_freqs]``: sin and cos of each coordinate at
    frequencies ``pi * 2^k`` (the finest resolves 1/2^num_freqs of the image)."""
    freqs = math.pi * 2.0 ** torch.arange(num_freqs, dtype=boxes.dtype, device=boxes.device)
    angles = boxes[..., None] * freqs                                # [..., 4, F]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


def roi_weights(boxes: torch.Tensor, grid: int) -> torch.Tensor:
    """``boxes [b, R, 4]`` xyxy in [0, 1] -> ``[b, R, grid*grid]``: the area of each patch cell
    (row-major, cell (i, j) spans x in [j/g, (j+1)/g], y in [i/g, (i+1)/g]) that lies inside
    the box, divided by the box's total covered area, so each row sums to 1; all-zero rows for
    boxes that cover no cell (outside the image or degenerate). Exact: the overlap of two
    axis-aligned rectangles is the product of their 1-D overlaps."""
    edges = torch.arange(grid + 1, dtype=boxes.dtype, device=boxes.device) / grid
    lo, hi = edges[:-1], edges[1:]                                   # [g]
    x0, y0, x1, y1 = (boxes[..., k, None] for k in range(4))         # [b, R, 1] each
    overlap_x = (torch.minimum(x1, hi) - torch.maximum(x0, lo)).clamp(min=0)  # [b, R, g]
    overlap_y = (torch.minimum(y1, hi) - torch.maximum(y0, lo)).clamp(min=0)  # [b, R, g]
    area = (overlap_y[..., :, None] * overlap_x[..., None, :]).flatten(-2)    # [b, R, g*g]
    total = area.sum(-1, keepdim=True)
    return torch.where(total > 0, area / total.clamp(min=torch.finfo(area.dtype).tiny), 0.0)


class BoxEncoder(nn.Module):
    """Box coordinates -> a prompt embedding of the tokens' width."""

    def __init__(self, width: int, num_freqs: int = NUM_FREQS):
        super().__init__()
        self.num_freqs = num_freqs
        self.fc1 = nn.Linear(8 * num_freqs, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, boxes: torch.Tensor) -> torch.Tensor:
        x = box_fourier_features(boxes, self.num_freqs).to(self.fc1.weight.dtype)  # [b, R, 8F]
        return self.fc2(F.gelu(self.fc1(x)))                                        # [b, R, d]


class CrossAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"prompter width={width} is not divisible by heads={heads}")
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        def split(x: torch.Tensor) -> torch.Tensor:  # [b, n, d] -> [b, h, n, d/h]
            return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q = split(self.q_proj(queries))                              # [b, h, R, d/h]
        k, v = split(self.k_proj(tokens)), split(self.v_proj(tokens))  # [b, h, 1+g*g, d/h]
        out = F.scaled_dot_product_attention(q, k, v)                # [b, h, R, d/h]
        return self.out_proj(out.transpose(1, 2).flatten(-2))        # [b, R, d]


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, out or width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class PrompterBlock(nn.Module):
    """Pre-LN: the region queries read the image tokens, then think alone."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, ln_eps: float):
        super().__init__()
        self.ln_query = nn.LayerNorm(width, eps=ln_eps)
        self.ln_tokens = nn.LayerNorm(width, eps=ln_eps)
        self.attn = CrossAttention(width, heads)
        self.ln_mlp = nn.LayerNorm(width, eps=ln_eps)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        queries = queries + self.attn(self.ln_query(queries), self.ln_tokens(tokens))
        return queries + self.mlp(self.ln_mlp(queries))


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` (centre x, centre y, width, height) -> (x0, y0, x1, y1)."""
    c, size = boxes[..., :2], boxes[..., 2:]
    return torch.cat([c - 0.5 * size, c + 0.5 * size], dim=-1)


class RegionPrompter(nn.Module):
    def __init__(self, width: int, embed_dim: int, grid: int, heads: int, layers: int = 1,
                 mlp_ratio: float = 4.0, ln_eps: float = 1e-5, grounding: bool = False):
        super().__init__()
        self.grid = grid
        self.box_encoder = BoxEncoder(width)
        self.blocks = nn.ModuleList(
            PrompterBlock(width, heads, mlp_ratio, ln_eps) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width, eps=ln_eps)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=width ** -0.5)  # CLIP's projection init
        if grounding:  # text prompts and the box head (created last: box-only RNG use unchanged)
            self.text_encoder = nn.Linear(embed_dim, width)
            self.box_head = Mlp(width, width, out=4)

    @property
    def grounding(self) -> bool:
        return hasattr(self, "box_head")

    def attend(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The shared transformer: ``queries [b, R, d]`` read ``tokens [b, 1 + g*g, d]``;
        returns the final-normalised queries ``[b, R, d]``."""
        if tokens.shape[1] != 1 + self.grid ** 2:
            raise ValueError(f"prompter expects 1 + {self.grid}^2 tokens, got {tokens.shape[1]}")
        for block in self.blocks:
            queries = block(queries, tokens)
        return self.ln_final(queries)

    def forward(self, tokens: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """``tokens [b, 1 + grid*grid, width]`` (class token first, patch tokens row-major,
        after the vision tower's ln_post); ``boxes [b, R, 4]`` xyxy as fractions of the image.
        Returns ``[b, R, embed_dim]`` region embeddings, not normalised."""
        geometry = boxes.to(torch.promote_types(boxes.dtype, torch.float32))
        prompt = self.box_encoder(geometry)                                    # [b, R, d]
        weights = roi_weights(geometry, self.grid).to(tokens.dtype)            # [b, R, g*g]
        roi = weights @ tokens[:, 1:]                                          # [b, R, d]
        covered = weights.sum(-1, keepdim=True) > 0                            # [b, R, 1]
        roi = torch.where(covered, roi, tokens[:, :1])  # no patch area: the class token
        queries = prompt.to(tokens.dtype) + roi                                # [b, R, d]
        return self.proj(self.attend(queries, tokens))                         # [b, R, e]

    def ground(self, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The grounding task: ``tokens`` as in ``forward``, ``text [b, R, embed_dim]`` the
        region captions' embeddings (one prompt per slot). Returns ``[b, R, 4]`` boxes, xyxy
        as fractions of the image (x0 <= x1, y0 <= y1; may reach past the image edges)."""
        if not self.grounding:
            raise ValueError("this prompter has no text prompts (model.prompter.grounding=false)")
        queries = self.text_encoder(text.to(self.text_encoder.weight.dtype))   # [b, R, d]
        raw = self.box_head(self.attend(queries.to(tokens.dtype), tokens))     # [b, R, 4]
        return cxcywh_to_xyxy(raw.float().sigmoid())


def build_prompter(cfg) -> RegionPrompter:
    """The CLOC prompter of a model config (``trainer.config.ModelConfig``): ``cfg.prompter``
    sized by the vision tower's width and patch grid, projecting to ``cfg.embed_dim``."""
    v = cfg.vision
    return RegionPrompter(v.width, cfg.embed_dim, grid=v.image_size // v.patch_size,
                          heads=cfg.prompter.heads, layers=cfg.prompter.layers,
                          mlp_ratio=cfg.prompter.mlp_ratio, ln_eps=v.ln_eps,
                          grounding=cfg.prompter.grounding)
