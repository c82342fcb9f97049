"""UpCLIP for downstream use: a plain-PyTorch CLIP (dense or MoE) that loads an export.

    from trainer.hub import load, load_tokenizer
    model = load("exports/b16-moe")              # config.json + model.safetensors (+ SHA256SUMS)
    tokenizer = load_tokenizer("exports/b16-moe")
    with torch.no_grad():
        image = model.encode_image(images)        # [b, e], not normalised (as CLIP.encode_image)
        text = model.encode_text(tokenizer(["a photo of a cat"]))
        out = model(images, tokens)               # normalised features + logit_scale, as CLIP

No megatron-core, no DeepSpeed, no process group: torch, safetensors, this repo's config
dataclasses, its routing rules (trainer/moe/routing.py), CLOC's prompter and ``kernels`` (the
experts run through ``kernels.expert_mlp`` with backend "auto": the CUDA extension when
built, else torch's grouped mm for bf16/fp16, else the PyTorch reference; the export's
modeling_upclip.py always runs the reference).
``tools/convert_checkpoint.py export --to moe`` writes the directory:

    config.json        {"format": "upclip", "format_version": 1, "model": <ModelConfig>,
                        "tokenizer": <TokenizerConfig>, "preprocess": {...}, "source": {...}}
    model.safetensors  open_clip's names (``visual.transformer.resblocks.{i}.attn.in_proj_weight``
                       with Q, K, V stacked ``[q; k; v]``, projections ``[width, embed]``); the MLP
                       of an MoE block is, experts stacked:
                         mlp.router.weight  [E, d]     logits = x @ W^T (fp32), softmax
                         mlp.experts.w1     [E, d, f]  expert e: act(x @ w1[e] + b1[e]) @ w2[e]
                         mlp.experts.b1     [E, f]                + b2[e]
                         mlp.experts.w2     [E, f, d]
                         mlp.experts.b2     [E, d]
                       plus ``logit_bias`` (SigLIP) and ``prompter.*`` (CLOC) when trained with them
    modeling_upclip.py this module's model as one plain-torch file (trainer/remote_code.py
                       generates it from the source), so that transformers loads the export
                       without UpCLIP: ``AutoModel.from_pretrained(dir, trust_remote_code=True)``
                       (config.json's ``model_type``/``auto_map``); ``.clip`` is UpCLIPModel
    README.md          model card: architecture, use, preprocessing, provenance, config
    SHA256SUMS         ``sha256sum -c`` format, every other file; ``load`` checks it

Routing is the trainer's at evaluation (trainer/moe/routing.py, tensor parallel size 1): top-k
of the router's softmax; capacity from ``eval_capacity_factor`` by the trained
``capacity_rule`` (deepspeed: ``ceil(units / E * factor * k)``; axlearn: ``floor(units * factor
/ E)`` rounded up to a multiple of 4; at least ``min_capacity``) with slots first-come first-served, every unit's first choice before any
second choice, units in the trainer's sequence-major order; top-2 weights renormalised over
the kept routes, top-1 weight 1. Text tokens after the end-of-text token are not routed.
``dispatch: dropless`` or ``drop_tokens: false`` drop nothing; ``model.set_dropless(True)``
turns drops off everywhere (then an embedding no longer depends on the rest of the batch).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kernels import expert_mlp
from kernels.activations import activation_fn
from trainer.config import ModelConfig, from_dict
from trainer.io import sha256
from trainer.models.prompter import build_prompter
from trainer.moe.routing import Routing, capacity_for, choose, group_routes, route, router_logits

FORMAT = "upclip"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CHECKSUMS_FILE = "SHA256SUMS"


class HubError(ValueError):
    """A bad export directory; the message names the file and what is wrong."""


# --------------------------------------------------------------------------- MoE

class Experts(nn.Module):
    """Stacked expert FFNs (kernels' layout), run by ``kernels.expert_mlp`` grouped by expert
    (backend "auto", kernels/README.md)."""

    def __init__(self, num: int, d: int, f: int, act: str):
        super().__init__()
        self.activation = act
        self.w1 = nn.Parameter(torch.zeros(num, d, f))
        self.b1 = nn.Parameter(torch.zeros(num, f))
        self.w2 = nn.Parameter(torch.zeros(num, f, d))
        self.b2 = nn.Parameter(torch.zeros(num, d))

    def forward(self, units: torch.Tensor, routing: Routing) -> torch.Tensor:
        """``units [U, n, d]`` (n tokens follow one decision) -> ``[U, n, d]``: the weighted
        sum of each unit's kept routes; 0 for a unit with none."""
        u, n, d = units.shape
        routes, rows, counts = group_routes(routing.experts, self.w1.shape[0])
        xs = units.index_select(0, rows).reshape(-1, d)                  # [R*n, d] by expert
        ys = expert_mlp(xs, self.w1, self.b1, self.w2, self.b2, counts * n,
                        activation=self.activation).view(-1, n, d)
        w = routing.weights.reshape(-1).index_select(0, routes).to(ys.dtype)
        return torch.zeros_like(units).index_add(0, rows, ys * w[:, None, None])


class MoEMLP(nn.Module):
    """Router + stacked experts; ``forward(x [b, s, d], valid [b, s] | None)``."""

    def __init__(self, d: int, f: int, moe, act: str):
        super().__init__()
        self.moe, self.dropless = moe, False
        self.router = nn.Linear(d, moe.num_experts, bias=False)
        self.experts = Experts(moe.num_experts, d, f, act)

    def route(self, x: torch.Tensor, valid: torch.Tensor) -> Routing:
        """Router input ``x [U, d]``, ``valid [U]`` -> the trainer's evaluation routing."""
        moe = self.moe
        chosen, probs = choose(router_logits(x, self.router.weight), moe.top_k)
        capacity = None
        if not (self.dropless or moe.dropless):
            capacity = capacity_for(x.shape[0], moe.num_experts, moe.eval_capacity_factor,
                                    moe.top_k, moe.min_capacity, moe.capacity_rule)
        return route(probs, chosen, valid, capacity)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        b, s, d = x.shape
        if self.moe.routing == "image":                                  # a unit is an image
            units = x                                                    # [b, s, d]
            router_in = x[:, 0] if self.moe.image_router_input == "cls" else x.mean(1)
            unit_valid = torch.ones(b, dtype=torch.bool, device=x.device)
        else:                                                            # a unit is a token
            units = x.transpose(0, 1).reshape(s * b, 1, d)               # sequence-major
            router_in = units[:, 0]
            unit_valid = (valid.t().reshape(-1) if valid is not None else
                          torch.ones(s * b, dtype=torch.bool, device=x.device))
        out = self.experts(units, self.route(router_in, unit_valid))
        return out if self.moe.routing == "image" else out.view(s, b, d).transpose(0, 1)


# --------------------------------------------------------------------------- towers

class MLP(nn.Module):
    def __init__(self, d: int, f: int, act: str):
        super().__init__()
        self.c_fc, self.c_proj, self.act = nn.Linear(d, f), nn.Linear(f, d), activation_fn(act)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.zeros(3 * d, d))        # [q; k; v]
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d))
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        b, s, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)        # [b, s, 3d]
        q, k, v = qkv.view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)    # [b, h, s, hd]
        return self.out_proj(y.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    """Pre-LN: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, tower, moe: bool):
        super().__init__()
        d, f = tower.width, int(tower.width * tower.mlp_ratio)
        self.ln_1 = nn.LayerNorm(d, eps=tower.ln_eps)
        self.attn = Attention(d, tower.heads)
        self.ln_2 = nn.LayerNorm(d, eps=tower.ln_eps)
        self.mlp = MoEMLP(d, f, tower.moe, tower.act) if moe else MLP(d, f, tower.act)

    def forward(self, x: torch.Tensor, causal: bool, valid: torch.Tensor | None = None):
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x), valid)


class Transformer(nn.Module):
    def __init__(self, tower):
        super().__init__()
        moe = set(tower.moe.moe_layers(tower.layers))
        self.resblocks = nn.ModuleList(Block(tower, i in moe) for i in range(tower.layers))

    def forward(self, x: torch.Tensor, causal: bool, valid: torch.Tensor | None = None):
        for block in self.resblocks:
            x = block(x, causal, valid)
        return x


class VisionTower(nn.Module):
    def __init__(self, cfg, embed_dim: int):
        super().__init__()
        d = cfg.width
        self.conv1 = nn.Conv2d(3, d, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(d))
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.seq_length, d))
        self.ln_pre = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.transformer = Transformer(cfg)
        self.ln_post = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.proj = nn.Parameter(torch.zeros(d, embed_dim))

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """``[b, 3, H, W]`` -> ``[b, 1 + g*g, d]`` final tokens after ln_post."""
        x = self.conv1(images.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        return self.ln_post(self.transformer(x, causal=False))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokens(images)[:, 0] @ self.proj                    # [b, e]


class UpCLIPModel(nn.Module):
    """CLIP in open_clip's module layout, with MoE MLPs where the config says so."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        t = cfg.text
        self.eot_id = t.eot_id
        self.visual = VisionTower(cfg.vision, cfg.embed_dim)
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.zeros(t.context_length, t.width))
        self.transformer = Transformer(t)
        self.ln_final = nn.LayerNorm(t.width, eps=t.ln_eps)
        self.text_projection = nn.Parameter(torch.zeros(t.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(cfg.logit_scale_init))
        if cfg.logit_bias_init is not None:
            self.logit_bias = nn.Parameter(torch.tensor(cfg.logit_bias_init))
        if cfg.prompter.layers:
            self.prompter = build_prompter(cfg)

    def set_dropless(self, dropless: bool = True) -> None:
        """True: no MoE layer drops a route (capacity off); False: the trained behaviour."""
        for m in self.modules():
            if isinstance(m, MoEMLP):
                m.dropless = dropless

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """``[b, L]`` token ids (one end-of-text token per row) -> ``[b, e]``."""
        eot = (text == self.eot_id).int().argmax(dim=-1)                 # first end-of-text
        valid = torch.arange(text.shape[1], device=text.device) <= eot[:, None]  # [b, L]
        x = self.token_embedding(text) + self.positional_embedding
        x = self.ln_final(self.transformer(x, causal=True, valid=valid))
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection

    def encode_regions(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """CLOC region embeddings ``[b, R, e]`` (not normalised) for ``boxes [b, R, 4]`` xyxy
        as fractions of the image."""
        if not hasattr(self, "prompter"):
            raise HubError("this model has no region prompter (model.prompter.layers = 0)")
        return self.prompter(self.visual.tokens(images), boxes)

    def locate_regions(self, images: torch.Tensor, region_text: torch.Tensor) -> torch.Tensor:
        """CLOC grounding: ``region_text [b, R, e]`` (region caption embeddings, L2-normalised)
        -> ``[b, R, 4]`` the boxes they locate, xyxy as fractions of the image."""
        if not getattr(getattr(self, "prompter", None), "grounding", False):
            raise HubError("this model has no grounding head (model.prompter.grounding = false)")
        return self.prompter.ground(self.visual.tokens(images), region_text)

    def forward(self, images: torch.Tensor | None, text: torch.Tensor | None) -> dict:
        out = {"logit_scale": self.logit_scale.exp()}
        if hasattr(self, "logit_bias"):
            out["logit_bias"] = self.logit_bias
        if images is not None:
            out["image_features"] = F.normalize(self.encode_image(images), dim=-1)
        if text is not None:
            out["text_features"] = F.normalize(self.encode_text(text), dim=-1)
        return out


# --------------------------------------------------------------------------- files

def mismatch_report(expected: dict, got: dict) -> str:
    """Names -> shapes, both sides. '' when they agree; else one line listing the missing,
    unexpected and wrongly-shaped names (at most 5 of each, with the counts)."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shaped = sorted(k for k in set(expected) & set(got)
                    if tuple(expected[k]) != tuple(got[k]))
    parts = []
    for what, keys, show in (
            ("missing", missing, str), ("unexpected", unexpected, str),
            ("wrongly shaped", shaped,
             lambda k: f"{k} (expected {list(expected[k])}, got {list(got[k])})")):
        if keys:
            more = f", ... {len(keys) - 5} more" if len(keys) > 5 else ""
            parts.append(f"{len(keys)} {what}: {', '.join(map(show, keys[:5]))}{more}")
    return "; ".join(parts)


def verify_checksums(directory: str | Path) -> None:
    """Check every file that ``SHA256SUMS`` lists; raise HubError naming the first bad one."""
    directory = Path(directory)
    sums = directory / CHECKSUMS_FILE
    if not sums.is_file():
        raise HubError(f"{sums}: missing (pass verify=False to load without checksums)")
    for line in sums.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        path = directory / name.lstrip("*")
        if not path.is_file():
            raise HubError(f"{path}: missing (listed in {CHECKSUMS_FILE})")
        if sha256(path) != digest:
            raise HubError(f"{path}: sha256 does not match {CHECKSUMS_FILE}")


def read_config(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise HubError(f"{path}: missing; not an UpCLIP export (tools/convert_checkpoint.py "
                       f"export --to moe writes one)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HubError(f"{path}: not valid JSON ({e.msg})") from None
    if cfg.get("format") != FORMAT or cfg.get("format_version") != FORMAT_VERSION:
        raise HubError(f"{path}: format {cfg.get('format')!r} version "
                       f"{cfg.get('format_version')!r}, expected {FORMAT!r} {FORMAT_VERSION}")
    return cfg


def model_config(cfg: dict) -> ModelConfig:
    """The exported ModelConfig; router aux-loss settings (training only, possibly naming
    files of the training machine) are reset to their defaults."""
    model = from_dict(ModelConfig, cfg["model"], "model")
    for tower in (model.vision, model.text):
        tower.moe.aux = type(tower.moe.aux)()
    model.validate("model")
    return model


def load(directory: str | Path, verify: bool = True, dtype: torch.dtype = torch.float32,
         device: str | torch.device = "cpu") -> UpCLIPModel:
    """The model of an export directory, in eval mode. ``verify``: check SHA256SUMS first."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = read_config(directory)
    if verify:
        verify_checksums(directory)
    model = UpCLIPModel(model_config(cfg))
    weights = directory / cfg.get("weights", WEIGHTS_FILE)
    state = load_file(str(weights))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    report = mismatch_report(expected, {k: tuple(v.shape) for k, v in state.items()})
    if report:
        raise HubError(f"{weights}: does not match {directory / CONFIG_FILE}: {report}")
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval()


def load_tokenizer(directory: str | Path):
    """The tokenizer the model was trained with (trainer/data/tokenizer.py), context length
    from the model; a SentencePiece model file is looked up beside config.json."""
    from trainer.data.config import TokenizerConfig
    from trainer.data.tokenizer import build_tokenizer

    directory = Path(directory)
    cfg = read_config(directory)
    tok = from_dict(TokenizerConfig, cfg["tokenizer"], "tokenizer")
    tok.context_length = cfg["model"]["text"]["context_length"]
    if tok.kind == "sentencepiece":
        tok.model_path = str(directory / Path(tok.model_path).name)
    return build_tokenizer(tok)
