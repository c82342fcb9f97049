"""Typed run configuration: defaults < YAML file < ``key.sub=value`` overrides.

Every run is described by one :class:`Config`. ``load_config`` merges the three sources into a
raw nested dict, expands a model preset, and builds the dataclasses field by field; any unknown
key or ill-typed value raises :class:`ConfigError` with the dotted key and the bad value.
This module imports neither torch nor megatron so a broken config fails in well under a second.
"""
from __future__ import annotations

import copy
import json
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer.data.config import DataConfig, DataConfigError
from trainer.dmu.config import DMUConfig, DMUConfigError
from trainer.moe.config import MoEConfig, MoEConfigError
from trainer.models.presets import MODEL_PRESETS


class ConfigError(ValueError):
    """A configuration problem; its message is one line naming the key and the value."""


# kernels.activations.ACTIVATIONS (kernels imports torch, this module must not); a unit test
# keeps the two equal.
ACTIVATIONS = ("gelu", "quick_gelu")


@dataclass
class TowerConfig:
    """What both towers share: a stack of pre-LN transformer blocks."""
    width: int = 64
    layers: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    act: str = "gelu"      # gelu | quick_gelu (OpenAI's checkpoints)
    ln_eps: float = 1e-5
    moe: MoEConfig = field(default_factory=MoEConfig)  # num_experts=0: dense MLPs

    def validate(self, key: str) -> None:
        for name in ("width", "layers", "heads"):
            _positive(self, key, name)
        if self.width % self.heads:
            raise ConfigError(f"{key}.width={self.width} is not divisible by "
                              f"{key}.heads={self.heads}")
        if self.act not in ACTIVATIONS:
            raise ConfigError(f"{key}.act={self.act!r}: expected one of {', '.join(ACTIVATIONS)}")
        if not 0 < self.ln_eps < 1:
            raise ConfigError(f"{key}.ln_eps={self.ln_eps} must be in (0, 1)")


@dataclass
class VisionConfig(TowerConfig):
    image_size: int = 32
    patch_size: int = 8

    def validate(self, key: str) -> None:
        super().validate(key)
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"{key}.image_size={self.image_size} is not a multiple of "
                f"{key}.patch_size={self.patch_size}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def seq_length(self) -> int:
        return self.num_patches + 1  # + class token


@dataclass
class TextConfig(TowerConfig):
    context_length: int = 16
    vocab_size: int = 49408
    # The text tower pools the hidden state at the first end-of-text token (CLIP BPE: 49407,
    # which is also the largest id, so this equals open_clip's argmax pooling). -1: vocab_size - 1.
    eot_token_id: int = -1

    def validate(self, key: str) -> None:
        super().validate(key)
        if self.eot_token_id >= self.vocab_size:
            raise ConfigError(f"{key}.eot_token_id={self.eot_token_id} is outside the vocabulary "
                              f"({key}.vocab_size={self.vocab_size})")

    @property
    def eot_id(self) -> int:
        return self.vocab_size - 1 if self.eot_token_id < 0 else self.eot_token_id


@dataclass
class PrompterConfig:
    """CLOC's region prompter (trainer/models/prompter.py) on top of the vision tower."""
    layers: int = 0        # 0: no prompter (no region loss possible)
    heads: int = 4
    mlp_ratio: float = 4.0
    grounding: bool = False  # text prompts + a box head: CLOC's grounding task (train.grounding_*)

    def validate(self, key: str) -> None:
        if self.layers < 0:
            raise ConfigError(f"{key}.layers={self.layers} must be >= 0")
        _positive(self, key, "heads")
        if self.grounding and not self.layers:
            raise ConfigError(f"{key}.grounding=true needs {key}.layers > 0")


ATTENTIONS = ("sdpa", "unfused")  # model.attention (trainer/models/layer_spec.py)


@dataclass
class ModelConfig:
    # A named preset (tiny, vit-b-32, vit-b-16, vit-l-14) fills every field below; fields given
    # beside it in YAML or on the command line override the preset's values.
    preset: str = "tiny"
    embed_dim: int = 32
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    logit_scale_init: float = 2.6592600  # log(1 / 0.07), as in CLIP
    # SigLIP's learnable logit bias (the paper starts at -10 with logit_scale_init = log 10);
    # null: no bias parameter (the softmax CLIP loss has no use for one).
    logit_bias_init: float | None = None
    params_dtype: str = "float32"  # float32 | bfloat16 (inference; training: train.precision)
    # Core attention of both towers: sdpa (torch scaled_dot_product_attention: flash / cuDNN /
    # memory-efficient kernels on CUDA, a fused kernel on CPU) or unfused (megatron-core's
    # DotProductAttention: [b*heads, s, s] scores in fp32). Same math (fp32: within 1e-5).
    attention: str = "sdpa"
    prompter: PrompterConfig = field(default_factory=PrompterConfig)

    def validate(self, key: str) -> None:
        self.vision.validate(f"{key}.vision")
        self.text.validate(f"{key}.text")
        _positive(self, key, "embed_dim")
        self.prompter.validate(f"{key}.prompter")
        if self.params_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"{key}.params_dtype={self.params_dtype!r}: expected float32 or bfloat16")
        if self.attention not in ATTENTIONS:
            raise ConfigError(f"{key}.attention={self.attention!r}: expected one of "
                              f"{', '.join(ATTENTIONS)}")


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel degree (megatron-core)
    pp: int = 1  # pipeline parallel degree; the text tower sits on the last stage
    ep: int = 1  # expert parallel degree (DeepSpeed-MoE over megatron's EP groups)
    # Vision blocks on the last pipeline stage (which also holds the text tower); -1: an even
    # split of model.vision.layers over parallel.pp stages.
    vision_layers_last_stage: int = -1

    def validate(self, key: str) -> None:
        for name in ("tp", "pp", "ep"):
            _positive(self, key, name)


LOSSES = ("clip", "siglip")
TRAINABLE_NAMES = ("all", "ffn", "experts", "router")  # trainer/step.py TRAINABLE_SETS
SCHEDULES = ("cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    steps: int = 4
    micro_batch_size: int = 8   # per data-parallel rank, per microbatch
    num_microbatches: int = 1   # gradient accumulation / pipeline microbatches
    loss: str = "clip"          # clip (softmax InfoNCE) | siglip (sigmoid); global batch
    region_loss_weight: float = 0.0  # CLOC region-text loss (needs model.prompter.layers > 0)
    region_dedupe_captions: bool = True  # equal region captions are not each other's negatives
    grounding_loss_weight: float = 0.0  # CLOC grounding loss (needs model.prompter.grounding)
    grounding_l1_weight: float = 5.0    # per region: L1 over the 4 normalised xyxy (DETR: 5)
    grounding_giou_weight: float = 2.0  # per region: 1 - GIoU (DETR: 2)
    grounding_l2_weight: float = 0.0    # per region: squared error, mean of 4 (CLOC Eq. 3)
    # Negatives from the micro-batches of every data-parallel rank (features gathered, CLIP's
    # global batch); false: each rank's micro-batch alone.
    global_contrastive: bool = True
    # AdamW; no weight decay on norms, biases, embeddings of rank < 2, logit scale / bias.
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    lr_mult_experts: float = 1.0  # expert FFN params learn at lr * this
    lr_mult_routers: float = 1.0  # router (gate) params learn at lr * this
    # Linear warmup from 0 over warmup_steps, then cosine decay to lr * min_lr_ratio at `steps`
    # (or constant).
    warmup_steps: int = 0
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0      # on the true global norm over TP/PP/EP; 0: off
    max_logit_scale: float = 100.0  # CLIP clamps exp(logit_scale) at 100
    # bf16: bf16 params + activations, fp32 master weights / moments / grad reduction;
    # fp32; auto: bf16 on CUDA, fp32 on CPU (trainer/distributed/device.py)
    precision: str = "auto"
    activation_checkpointing: bool = False  # recompute transformer blocks in backward
    # A step whose loss or gradient norm is not finite is skipped (no update) and counted;
    # this many in a row abort the run.
    max_nonfinite_steps: int = 5
    seed: int = 0
    # What trains (the rest is frozen: no gradient, no optimizer state): empty or [all];
    # ffn (dense MLPs and MoE experts), experts, router, or globs over canonical parameter
    # names (e.g. "visual.transformer.layers.11.mlp.*"); entries add up.
    trainable: list[str] = field(default_factory=list)
    log_every: int = 1
    tensorboard: bool = True    # run_dir/tensorboard next to run_dir/metrics.jsonl
    progress_bar: bool = True   # rank 0 only, when stderr is a terminal

    def validate(self, key: str) -> None:
        for name in ("steps", "micro_batch_size", "num_microbatches", "log_every",
                     "max_nonfinite_steps"):
            _positive(self, key, name)
        for name in ("lr", "eps", "max_logit_scale", "lr_mult_experts", "lr_mult_routers"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{key}.{name}={getattr(self, name)} must be > 0")
        for name in ("weight_decay", "grad_clip", "warmup_steps", "region_loss_weight",
                     "grounding_loss_weight", "grounding_l1_weight", "grounding_giou_weight",
                     "grounding_l2_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name}={getattr(self, name)} must be >= 0")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{key}.{name}={getattr(self, name)} must be in [0, 1)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"{key}.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        for name, allowed in (("loss", LOSSES), ("lr_schedule", SCHEDULES),
                              ("precision", PRECISIONS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{key}.{name}={getattr(self, name)!r}: expected one of "
                                  f"{', '.join(allowed)}")
        for i, entry in enumerate(self.trainable):
            if entry not in TRAINABLE_NAMES and not any(c in entry for c in ".*?["):
                raise ConfigError(f"{key}.trainable[{i}]={entry!r}: expected one of "
                                  f"{', '.join(TRAINABLE_NAMES)} or a glob over parameter "
                                  "names (e.g. 'visual.transformer.layers.*.mlp.*')")


@dataclass
class CheckpointConfig:
    load: str = ""      # a checkpoint directory (its manifest.json) to start from
    save_dir: str = ""  # where step checkpoints go; empty: no saving
    # A DENSE checkpoint to upcycle into this config's MoE model at start (trainer/moe/upcycle.py)
    upcycle_from: str = ""
    save_every: int = 0     # steps between checkpoints (0: only at the end and on a signal)
    keep_last: int = 0      # keep the newest N step checkpoints (0: all)
    # Continue from save_dir/latest when it exists (a requeued or restarted job); `load` and
    # `upcycle_from` apply only to a fresh start.
    resume: bool = True

    def validate(self, key: str) -> None:
        for name in ("save_every", "keep_last"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name}={getattr(self, name)} must be >= 0")
        if self.load and self.upcycle_from:
            raise ConfigError(f"{key}.load and {key}.upcycle_from are both set; pick one")
        for name in ("load", "upcycle_from"):
            value = getattr(self, name)
            path = Path(value)
            if value and not (path / "manifest.json").is_file() and not (path / "latest").is_file():
                raise ConfigError(f"{key}.{name}={value!r}: no checkpoint there "
                                  f"(neither {path / 'manifest.json'} nor {path / 'latest'})")


@dataclass
class EvalConfig:
    """Zero-shot classification, image-text retrieval and CLOC region retrieval on one eval set
    (data.eval_urls shards, or eval.csv); see trainer/eval/__init__.py."""
    every: int = 0          # steps between evaluations (0: only before and after training)
    # What to compute; each runs when the data supports it (zero_shot: class labels,
    # regions: region boxes and model.prompter.layers > 0).
    tasks: list[str] = field(default_factory=lambda: ["zero_shot", "retrieval", "regions"])
    # A CSV eval set instead of data.eval_urls (tab-separated if it ends in .tsv): one row per
    # (image, caption), image paths relative to the CSV's folder; the label column is optional.
    csv: str = ""
    csv_image_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_label_key: str = ""
    # Class names in label order; empty: `classnames` of the dataset.json that
    # tools/make_shards.py writes beside the eval shards.
    classnames: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}"])
    max_batches: int = 0    # per rank; 0: the whole split

    def validate(self, key: str) -> None:
        for name in ("every", "max_batches"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name}={getattr(self, name)} must be >= 0")
        if not self.templates or any("{}" not in t for t in self.templates):
            raise ConfigError(f"{key}.templates={self.templates!r}: each needs a '{{}}'")
        known = ("zero_shot", "retrieval", "regions")
        if any(t not in known for t in self.tasks):
            raise ConfigError(f"{key}.tasks={self.tasks!r}: each must be one of {known}")
        if self.csv and not (self.csv_image_key and self.csv_caption_key):
            raise ConfigError(f"{key}.csv is set: {key}.csv_image_key and {key}.csv_caption_key "
                              "must name its columns")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dmu: DMUConfig = field(default_factory=DMUConfig)  # `python -m trainer.dmu` only
    run_dir: str = "runs/default"

    def validate(self) -> None:
        try:
            self.data.validate("data")
        except DataConfigError as e:
            raise ConfigError(str(e)) from None
        if self.data.train_urls and (self.data.tokenizer.context_length
                                     != self.model.text.context_length):
            raise ConfigError(f"data.tokenizer.context_length={self.data.tokenizer.context_length}"
                              f" != model.text.context_length={self.model.text.context_length}")
        self.model.validate("model")
        self.parallel.validate("parallel")
        self.train.validate("train")
        self.checkpoint.validate("checkpoint")
        self.eval.validate("eval")
        try:
            self.dmu.validate("dmu")
        except DMUConfigError as e:
            raise ConfigError(str(e)) from None
        t = self.train
        if t.loss == "siglip" and self.model.logit_bias_init is None:
            raise ConfigError("train.loss=siglip needs model.logit_bias_init (SigLIP: -10 with "
                              "model.logit_scale_init=2.302585)")
        if t.region_loss_weight > 0 and self.model.prompter.layers == 0:
            raise ConfigError(f"train.region_loss_weight={t.region_loss_weight} needs "
                              "model.prompter.layers > 0")
        if t.region_loss_weight > 0 and self.data.train_urls and self.data.max_regions == 0:
            raise ConfigError(f"train.region_loss_weight={t.region_loss_weight} needs "
                              "data.max_regions > 0")
        if t.grounding_loss_weight > 0:
            p = self.model.prompter
            if p.layers == 0 or not p.grounding:
                raise ConfigError(f"train.grounding_loss_weight={t.grounding_loss_weight} needs "
                                  f"model.prompter.layers > 0 (is {p.layers}) and "
                                  f"model.prompter.grounding=true (is {str(p.grounding).lower()})")
            if self.data.train_urls and self.data.max_regions == 0:
                raise ConfigError(f"train.grounding_loss_weight={t.grounding_loss_weight} needs "
                                  "data.max_regions > 0")
            if not (t.grounding_l1_weight or t.grounding_giou_weight or t.grounding_l2_weight):
                raise ConfigError(f"train.grounding_loss_weight={t.grounding_loss_weight} but "
                                  "train.grounding_l1_weight, grounding_giou_weight and "
                                  "grounding_l2_weight are all 0")
        if self.data.train_urls and self.data.batch_size != t.micro_batch_size:
            raise ConfigError(f"data.batch_size={self.data.batch_size} != "
                              f"train.micro_batch_size={t.micro_batch_size}: one loader batch "
                              "is one microbatch")
        if self.data.train_urls and self.data.image_size != self.model.vision.image_size:
            raise ConfigError(f"data.image_size={self.data.image_size} != "
                              f"model.vision.image_size={self.model.vision.image_size}")
        moe_sets = [e for e in t.trainable if e in ("router", "experts")]
        if moe_sets and not (self.model.vision.moe.enabled or self.model.text.moe.enabled):
            raise ConfigError(f"train.trainable={t.trainable!r}: {moe_sets[0]} needs a tower "
                              "with model.*.moe.num_experts > 0")
        if self.checkpoint.upcycle_from and not (self.model.vision.moe.enabled
                                                 or self.model.text.moe.enabled):
            raise ConfigError("checkpoint.upcycle_from is set but no tower has "
                              "model.*.moe.num_experts > 0")
        vision, text, tp, pp = self.model.vision, self.model.text, self.parallel.tp, self.parallel.pp
        last = self.parallel.vision_layers_last_stage
        if pp > 1:
            rest, stages = vision.layers - max(last, 0), pp - (1 if last >= 0 else 0)
            if last > vision.layers or rest % stages:
                raise ConfigError(
                    f"model.vision.layers={vision.layers} cannot be split over parallel.pp={pp} "
                    f"stages (parallel.vision_layers_last_stage={last})")
        for key, tower in (("model.vision", vision), ("model.text", text)):
            if tower.heads % tp:
                raise ConfigError(f"{key}.heads={tower.heads} is not divisible by parallel.tp={tp}")
            try:
                tower.moe.validate(f"{key}.moe", tower.layers, key.split(".")[1],
                                   self.parallel.ep)
            except MoEConfigError as e:
                raise ConfigError(str(e)) from None
            if tower.moe.enabled and tower.moe.aux.superclass > 0 and pp > 1 and \
                    t.activation_checkpointing:
                raise ConfigError(f"{key}.moe.aux.superclass={tower.moe.aux.superclass} with "
                                  f"train.activation_checkpointing at parallel.pp={pp} is not "
                                  "supported (1F1B recomputes a microbatch after the next "
                                  "one's labels were set)")


def _positive(obj: Any, key: str, name: str) -> None:
    value = getattr(obj, name)
    if value <= 0:
        raise ConfigError(f"{key}.{name}={value} must be > 0")


# --------------------------------------------------------------------------- building

def from_dict(cls: type, raw: dict, key: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys and bad types are errors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in raw.items():
        dotted = f"{key}.{name}" if key else str(name)
        if name not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key '{dotted}' (known here: {known})")
        kwargs[name] = _coerce(hints[name], value, dotted)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1] or (Any,)
        if item is str and (not isinstance(value, (list, tuple))
                            or any(isinstance(v, (dict, list, tuple)) or v is None for v in value)):
            raise ConfigError(f"{key} expects a list of strings; quote items: "
                              f"'{key}={_quoted_list_example(value)}'")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise ConfigError(f"{key}: unsupported field type {tp}")
    raise ConfigError(f"{key}={value!r}: expected {tp.__name__}")


def _quoted_list_example(value: Any) -> str:
    """The JSON-quoted list a user most likely meant by ``value`` (the raw text YAML refused,
    e.g. ``[a photo of a {}, a {}]``, or what YAML made of it)."""
    if isinstance(value, str):
        inner = value.strip()
        if inner.startswith("[") and inner.endswith("]"):
            inner = inner[1:-1]
        items = [t.strip() for t in inner.split(",") if t.strip()] or ["..."]
    else:
        items = ["..."]
    return json.dumps(items)


def parse_overrides(items: list[str]) -> dict:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML scalars)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        dotted, text = item.split("=", 1)
        dotted = dotted.strip().lstrip("-")
        if not dotted or any(not part for part in dotted.split(".")):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _expand_preset(raw: dict) -> dict:
    model = raw.get("model")
    name = (model or {}).get("preset", ModelConfig.preset) if isinstance(model, dict) else None
    if name is None:
        return raw
    if name not in MODEL_PRESETS:
        raise ConfigError(f"model.preset={name!r}: expected one of {', '.join(MODEL_PRESETS)}")
    return deep_merge(raw, {"model": deep_merge(MODEL_PRESETS[name], model or {})})


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {str(path)!r}{where}: not valid YAML") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r}: top level must be a mapping")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """defaults < YAML file < overrides; then preset expansion and validation."""
    raw = read_yaml(path) if path else {}
    raw = deep_merge(raw, parse_overrides(overrides or []))
    raw = _expand_preset(raw)
    cfg = from_dict(Config, raw)
    cfg.validate()
    return cfg


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_from_saved(d: dict) -> Config:
    """Rebuild a resolved config saved with a run or checkpoint (no preset re-expansion)."""
    cfg = from_dict(Config, d)
    cfg.validate()
    return cfg
