"""Typed run configuration: defaults < YAML file < ``key.sub=value`` overrides.

Every run is described by one :class:`Config`. ``load_config`` merges the three sources into a
raw nested dict, expands a model preset, and builds the dataclasses field by field; any unknown
key or ill-typed value raises :class:`ConfigError` with the dotted key and the bad value.
This module imports neither torch nor megatron so a broken config fails in well under a second.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer.config_base import ConfigError, check_positive, quoted_list_example
from trainer.config_cli import named_configs, resolve_config_path
from trainer.config_docs import did_you_mean, get_dotted
from trainer.data.config import DataConfig, DataConfigError
from trainer.dmu.config import DMUConfig, DMUConfigError
from trainer.eval.config import EvalConfig
from trainer.moe.config import MoEConfig, MoEConfigError
from trainer.models.presets import MODEL_PRESETS


# kernels.activations.ACTIVATIONS (kernels imports torch, this module must not); a unit test
# keeps the two equal.
ACTIVATIONS = ("gelu", "quick_gelu")


@dataclass
class TowerConfig:
    """What both towers share: a stack of pre-LN transformer blocks."""
    width: int = 64        # hidden size of the tower's transformer blocks
    layers: int = 2        # number of transformer blocks
    heads: int = 4         # attention heads per block (divisible by parallel.tp)
    mlp_ratio: float = 4.0  # MLP hidden size = width * mlp_ratio
    act: str = "gelu"      # gelu | quick_gelu (OpenAI's checkpoints)
    ln_eps: float = 1e-5   # LayerNorm epsilon (1e-5 in OpenAI / open_clip checkpoints)
    moe: MoEConfig = field(default_factory=MoEConfig)  # MoE blocks (num_experts=0: dense)

    def validate(self, key: str) -> None:
        for name in ("width", "layers", "heads"):
            check_positive(self, key, name)
        if self.width % self.heads:
            raise ConfigError(f"{key}.width={self.width} is not divisible by "
                              f"{key}.heads={self.heads}")
        if self.act not in ACTIVATIONS:
            raise ConfigError(f"{key}.act={self.act!r}: expected one of {', '.join(ACTIVATIONS)}")
        if not 0 < self.ln_eps < 1:
            raise ConfigError(f"{key}.ln_eps={self.ln_eps} must be in (0, 1)")


@dataclass
class VisionConfig(TowerConfig):
    image_size: int = 32   # input resolution in pixels; data.image_size follows it unless set
    patch_size: int = 8    # ViT patch size in pixels (image_size must be a multiple)

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
    # Text tokens per caption (positional embeddings); data.tokenizer.context_length follows
    # it unless set.
    context_length: int = 16
    vocab_size: int = 49408  # token embedding rows (CLIP BPE: 49408)
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
    heads: int = 4         # attention heads of the prompter's blocks
    mlp_ratio: float = 4.0  # prompter MLP hidden size = vision width * mlp_ratio
    grounding: bool = False  # text prompts + a box head: CLOC's grounding task (train.grounding_*)

    def validate(self, key: str) -> None:
        if self.layers < 0:
            raise ConfigError(f"{key}.layers={self.layers} must be >= 0")
        check_positive(self, key, "heads")
        if self.grounding and not self.layers:
            raise ConfigError(f"{key}.grounding=true needs {key}.layers > 0")


ATTENTIONS = ("sdpa", "unfused")  # model.attention (trainer/models/layer_spec.py)


@dataclass
class ModelConfig:
    # A named preset (tiny, vit-b-32, vit-b-16, vit-l-14) fills every field below; fields given
    # beside it in YAML or on the command line override the preset's values.
    preset: str = "tiny"
    embed_dim: int = 32    # joint image-text embedding size (both projections' output)
    vision: VisionConfig = field(default_factory=VisionConfig)  # the image tower (a ViT)
    text: TextConfig = field(default_factory=TextConfig)  # the text tower (causal transformer)
    logit_scale_init: float = 2.6592600  # log(1 / 0.07), as in CLIP
    # SigLIP's learnable logit bias (the paper starts at -10 with logit_scale_init = log 10);
    # null: no bias parameter (the softmax CLIP loss has no use for one).
    logit_bias_init: float | None = None
    params_dtype: str = "float32"  # float32 | bfloat16 (inference; training: train.precision)
    # Core attention of both towers: sdpa (torch scaled_dot_product_attention: flash / cuDNN /
    # memory-efficient kernels on CUDA, a fused kernel on CPU) or unfused (megatron-core's
    # DotProductAttention: [b*heads, s, s] scores in fp32). Same math (fp32: within 1e-5).
    attention: str = "sdpa"
    prompter: PrompterConfig = field(default_factory=PrompterConfig)  # CLOC region prompter

    def validate(self, key: str) -> None:
        self.vision.validate(f"{key}.vision")
        self.text.validate(f"{key}.text")
        check_positive(self, key, "embed_dim")
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
            check_positive(self, key, name)


WANDB_MODES = ("", "online", "offline", "disabled")


@dataclass
class WandbConfig:
    """Weights & Biases logging (trainer/wandb_logger.py): the reporting rank only, the same
    scalars as metrics.jsonl / TensorBoard, the resolved config. Needs ``pip install wandb``."""
    project: str = ""  # W&B project; empty: no wandb
    entity: str = ""   # team or user that owns the project (empty: your default entity)
    name: str = ""     # run name shown in the UI (empty: the name of run_dir)
    group: str = ""    # groups runs in the UI, e.g. the phases of one experiment
    tags: list[str] = field(default_factory=list)  # labels for filtering runs in the UI
    mode: str = ""     # online | offline (no network) | disabled; empty: $WANDB_MODE or online
    dir: str = ""      # where wandb writes its run files (empty: run_dir)

    @property
    def enabled(self) -> bool:
        return bool(self.project) and self.mode != "disabled"

    def validate(self, key: str) -> None:
        if self.mode not in WANDB_MODES:
            raise ConfigError(f"{key}.mode={self.mode!r}: expected one of "
                              f"{', '.join(m for m in WANDB_MODES if m)} (or empty)")

    def check_installed(self, key: str) -> None:
        """A run that logs to wandb needs the package (checked before training starts)."""
        import importlib.util

        if self.enabled and importlib.util.find_spec("wandb") is None:
            raise ConfigError(f"{key}.project={self.project!r} but wandb is not installed "
                              f"(pip install wandb, or leave {key}.project empty)")


LOSSES = ("clip", "siglip")
TRAINABLE_NAMES = ("all", "ffn", "experts", "router")  # trainer/step.py TRAINABLE_SETS
SCHEDULES = ("cosine", "constant")
SCOPES = ("microbatch", "step")  # train.contrastive_scope
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    steps: int = 4              # optimizer steps of the run (the schedule ends here)
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
    # Which samples share one contrastive loss: microbatch (each micro-batch, x DP when
    # global_contrastive) or step (every micro-batch of the optimizer step x DP: one loss over
    # the step's whole batch by feature caching in two passes, one extra forward; trainer/
    # step_cache.py). Router aux losses stay per micro-batch either way.
    contrastive_scope: str = "microbatch"
    lr: float = 1e-3            # AdamW peak learning rate (after warmup)
    # AdamW decoupled weight decay; none on norms, biases, embeddings of rank < 2, logit
    # scale / bias.
    weight_decay: float = 0.1
    beta1: float = 0.9          # AdamW first-moment decay
    beta2: float = 0.98         # AdamW second-moment decay (CLIP: 0.98)
    eps: float = 1e-6           # AdamW denominator epsilon
    lr_mult_experts: float = 1.0  # expert FFN params learn at lr * this
    lr_mult_routers: float = 1.0  # router (gate) params learn at lr * this
    warmup_steps: int = 0       # linear warmup of the lr from 0 over this many steps
    # After warmup: cosine (decay to lr * min_lr_ratio at train.steps) | constant
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.0   # the cosine schedule's final lr, as a fraction of lr
    grad_clip: float = 1.0      # on the true global norm over TP/PP/EP; 0: off
    max_logit_scale: float = 100.0  # CLIP clamps exp(logit_scale) at 100
    # bf16: bf16 params + activations, fp32 master weights / moments / grad reduction;
    # fp32; auto: bf16 on CUDA, fp32 on CPU (trainer/distributed/device.py)
    precision: str = "auto"
    activation_checkpointing: bool = False  # recompute transformer blocks in backward
    # A step whose loss or gradient norm is not finite is skipped (no update) and counted;
    # this many in a row abort the run.
    max_nonfinite_steps: int = 5
    seed: int = 0               # parameter init and per-rank RNG (dropout, noisy gates)
    # What trains (the rest is frozen: no gradient, no optimizer state): empty or [all];
    # ffn (dense MLPs and MoE experts), experts, router, or globs over canonical parameter
    # names (e.g. "visual.transformer.layers.11.mlp.*"); entries add up.
    trainable: list[str] = field(default_factory=list)
    log_every: int = 1          # steps between metric lines (metrics.jsonl, TensorBoard)
    tensorboard: bool = True    # run_dir/tensorboard next to run_dir/metrics.jsonl
    progress_bar: bool = True   # rank 0 only, when stderr is a terminal
    wandb: WandbConfig = field(default_factory=WandbConfig)  # Weights & Biases (off by default)

    def validate(self, key: str) -> None:
        for name in ("steps", "micro_batch_size", "num_microbatches", "log_every",
                     "max_nonfinite_steps"):
            check_positive(self, key, name)
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
                              ("precision", PRECISIONS), ("contrastive_scope", SCOPES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{key}.{name}={getattr(self, name)!r}: expected one of "
                                  f"{', '.join(allowed)}")
        for i, entry in enumerate(self.trainable):
            if entry not in TRAINABLE_NAMES and not any(c in entry for c in ".*?["):
                raise ConfigError(f"{key}.trainable[{i}]={entry!r}: expected one of "
                                  f"{', '.join(TRAINABLE_NAMES)} or a glob over parameter "
                                  "names (e.g. 'visual.transformer.layers.*.mlp.*')")
        self.wandb.validate(f"{key}.wandb")


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
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)  # architecture: towers, MoE, prompter
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # TP / PP / EP degrees
    train: TrainConfig = field(default_factory=TrainConfig)  # batch, loss, optimizer, schedule
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # load, save, resume
    data: DataConfig = field(default_factory=DataConfig)  # shards, loader, augmentation, tokenizer
    eval: EvalConfig = field(default_factory=EvalConfig)  # zero-shot, retrieval, region eval
    dmu: DMUConfig = field(default_factory=DMUConfig)  # DMU / CLIP-MoE phases (trainer.dmu)
    # Where config.json, metrics.jsonl, tensorboard/ and exit_status.json go
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


# --------------------------------------------------------------------------- building

class UnknownKeyError(ConfigError):
    """A key no dataclass field has; `config_of` adds "did you mean" guesses to it."""

    def __init__(self, dotted: str, name: str, known: list[str], guesses: tuple = ()):
        hint = f"did you mean {' or '.join(map(repr, guesses))}? " if guesses else ""
        super().__init__(f"unknown config key '{dotted}' ({hint}known here: "
                         f"{', '.join(known)})")
        self.dotted, self.name, self.known = dotted, name, known


def config_of(raw: dict) -> Config:
    """``from_dict(Config, raw)`` whose unknown-key error names the likely meant keys
    (trainer/config_docs.py ``did_you_mean``: not part of an export's modeling file)."""
    try:
        return from_dict(Config, raw)
    except UnknownKeyError as e:
        guesses = tuple(did_you_mean(e.dotted, e.name, e.known, Config))
        raise UnknownKeyError(e.dotted, e.name, e.known, guesses) from None


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
            raise UnknownKeyError(dotted, str(name), sorted(names))
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
                              f"'{key}={quoted_list_example(value)}'")
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
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a mapping")
        return {str(k): _coerce(item, v, f"{key}.{k}") for k, v in value.items()}
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
    """A config file by path, or by the name of a shipped config (``smoke``, ``b16_upcycle``)."""
    found = resolve_config_path(path)
    if found is None:
        raise ConfigError(f"config file {str(path)!r} does not exist (shipped configs: "
                          f"{', '.join(named_configs()) or 'none found'})")
    path = found
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {str(path)!r}{where}: not valid YAML") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r}: top level must be a mapping")
    return raw


# (model side, data side): values that must agree. The data side follows the model side unless
# only it is given; both given and different is an error naming both.
PAIRED_KEYS = (("train.micro_batch_size", "data.batch_size"),
               ("model.vision.image_size", "data.image_size"),
               ("model.text.context_length", "data.tokenizer.context_length"))


def _given(raw: dict, dotted: str) -> bool:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _set_dotted(obj: Any, dotted: str, value: Any) -> None:
    parent, _, last = dotted.rpartition(".")
    setattr(get_dotted(obj, parent) if parent else obj, last, value)


def derive_paired(cfg: Config, given: dict) -> None:
    """Make each PAIRED_KEYS pair equal: the side given in ``given`` (the YAML + overrides
    before preset expansion; a preset counts as the model, not as given) wins, the model
    side when neither or both are; both given and different is a ConfigError."""
    for model_key, data_key in PAIRED_KEYS:
        m, d = get_dotted(cfg, model_key), get_dotted(cfg, data_key)
        if m == d:
            continue
        if _given(given, model_key) and _given(given, data_key):
            raise ConfigError(f"{data_key}={d} and {model_key}={m} are both set and differ; "
                              f"set one of them (the other follows)")
        if _given(given, data_key):
            _set_dotted(cfg, model_key, d)
        else:
            _set_dotted(cfg, data_key, m)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """defaults < YAML file < overrides; then preset expansion, the paired keys, validation."""
    given = read_yaml(path) if path else {}
    given = deep_merge(given, parse_overrides(overrides or []))
    cfg = config_of(_expand_preset(given))
    derive_paired(cfg, given)
    cfg.validate()
    return cfg


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_from_saved(d: dict) -> Config:
    """Rebuild a resolved config saved with a run or checkpoint (no preset re-expansion)."""
    cfg = config_of(d)
    cfg.validate()
    return cfg
