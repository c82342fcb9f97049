"""Data configuration (nested into the root config as ``cfg.data``). No torch import here."""
from __future__ import annotations

from dataclasses import dataclass, field

# OpenAI CLIP's image normalisation (open_clip OPENAI_DATASET_MEAN / STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class TokenizerConfig:
    # CLIP BPE needs nothing else; sentencepiece needs model_path.
    kind: str = "clip_bpe"        # "clip_bpe" | "sentencepiece"
    model_path: str = ""          # sentencepiece model file (kind == "sentencepiece")
    # Tokens per caption, padded or truncated; follows model.text.context_length unless set
    # (both set: they must be equal).
    context_length: int = 77
    add_bos: bool = True          # sentencepiece: prepend bos (its sot token)
    lowercase: bool = False       # sentencepiece: lower-case before encoding


class DataConfigError(ValueError):
    """A data-config problem; the message names the dotted key and the bad value."""


@dataclass
class AugmentConfig:
    """Training: random resized crop (area fraction `scale_*`, aspect ratio `ratio_*`) then an
    optional horizontal flip. Evaluation: resize the short side + center crop."""
    scale_min: float = 0.9            # smallest crop area fraction
    scale_max: float = 1.0            # largest crop area fraction
    ratio_min: float = 0.75           # smallest crop aspect ratio (width / height)
    ratio_max: float = 4.0 / 3.0      # largest crop aspect ratio
    hflip_prob: float = 0.0           # region captions often say left/right: off by default
    interpolation: str = "bicubic"    # bicubic | bilinear | nearest
    mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))  # per-channel (RGB) mean
    std: list[float] = field(default_factory=lambda: list(CLIP_STD))    # per-channel (RGB) std
    # A box is kept after a crop when at least this fraction of its area is still visible and
    # it is at least `min_box_size` output pixels wide and high.
    min_box_visibility: float = 0.5
    min_box_size: float = 2.0         # smallest kept box side, in output pixels
    # Decode JPEGs at a reduced size (libjpeg DCT scaling by 1/2, 1/4 or 1/8) when the crop
    # still has at least S x S decoded pixels: the resize then starts from fewer pixels. The
    # crop and the boxes are computed in stored-image pixels either way; only the pixel values
    # differ slightly (DCT-domain downscaling instead of the resize filter). false: full decode.
    jpeg_draft: bool = True
    # Evaluation preprocessing. "reference": open_clip's / OpenAI's eval transform exactly (PIL
    # bicubic resize of the short side of the fully decoded image, center crop; see
    # trainer/data/eval_transform.py). "fast": the training path's one-pass transform without
    # randomness (JPEG draft decoding, torch resize): faster, not the published numbers' input.
    eval_resize: str = "reference"

    def validate(self, key: str) -> None:
        if not 0 < self.scale_min <= self.scale_max <= 1:
            raise DataConfigError(f"{key}.scale_min={self.scale_min}, {key}.scale_max="
                                  f"{self.scale_max}: need 0 < scale_min <= scale_max <= 1")
        if not 0 < self.ratio_min <= self.ratio_max:
            raise DataConfigError(f"{key}.ratio_min={self.ratio_min}, {key}.ratio_max="
                                  f"{self.ratio_max}: need 0 < ratio_min <= ratio_max")
        if not 0 <= self.hflip_prob <= 1:
            raise DataConfigError(f"{key}.hflip_prob={self.hflip_prob} must be in [0, 1]")
        if self.eval_resize not in ("reference", "fast"):
            raise DataConfigError(f"{key}.eval_resize={self.eval_resize!r}: expected reference "
                                  "or fast")
        if self.interpolation not in ("bicubic", "bilinear", "nearest"):
            raise DataConfigError(f"{key}.interpolation={self.interpolation!r}: expected "
                                  "bicubic, bilinear or nearest")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != 3:
                raise DataConfigError(f"{key}.{name}={getattr(self, name)}: expected 3 values")
        if any(s <= 0 for s in self.std):
            raise DataConfigError(f"{key}.std={self.std}: values must be > 0")
        if not 0 <= self.min_box_visibility <= 1:
            raise DataConfigError(f"{key}.min_box_visibility={self.min_box_visibility} must be in [0, 1]")


@dataclass
class DataConfig:
    # Shard URLs: a brace pattern ("/data/cc-{000000..000999}.tar"), several joined by "::",
    # a list file (*.txt / *.list / *.lst: one URL or pattern per line), a directory (its
    # *.tar), or "pipe:CMD" (e.g. "pipe:aws s3 cp s3://b/x-{000..009}.tar -").
    train_urls: str = ""
    eval_urls: str = ""               # class-labelled eval split (zero-shot); may be empty
    # Samples per loader batch, per rank: one microbatch; follows train.micro_batch_size
    # unless set (both set: they must be equal).
    batch_size: int = 8
    eval_batch_size: int = 0          # 0: batch_size
    workers: int = 2                  # DataLoader workers per rank (0: in the main process)
    prefetch_factor: int = 2          # batches each worker loads ahead
    pin_memory: bool = False          # page-locked batches (faster host-to-GPU copies)
    seed: int = 0                     # shard and sample shuffling
    shuffle_shards: bool = True       # per-epoch permutation of the shard list
    shuffle_buffer: int = 1000        # sample shuffle buffer per worker; 0 or 1: no shuffle
    resampled: bool = False           # draw shards with replacement, endless per-worker streams
    # Batches per rank per epoch. Required when resampled (an "epoch" is then this many batches);
    # optional otherwise, where it caps the epoch so every rank runs the same number of steps.
    batches_per_epoch: int = 0
    drop_last: bool = True            # training: only full batches (fixed shapes)
    # A JSON label table {"labels": {sample key: group}} (DMU writes one per stage): every
    # training batch then holds samples of one group only (grouping.py); empty: plain batches.
    group_labels: str = ""
    # Side of the square training images; follows model.vision.image_size unless set (both
    # set: they must be equal).
    image_size: int = 224
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # crops, flips, normalisation
    max_regions: int = 0              # R: region boxes/captions per image (0: global loss only)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)  # caption tokenizer
    # Where images are CLIP-normalised. "loader": batch["images"] is float32, normalised by the
    # data workers. "device": batch["images"] stays uint8 [B, 3, S, S] (4x less to collate,
    # pin and copy); the training step calls `trainer.data.normalize_on_device(images, mean,
    # std)` with data.augment.mean / std after moving the batch to the accelerator.
    normalize: str = "loader"         # "loader" | "device"

    def validate(self, key: str = "data") -> None:
        for name in ("batch_size", "image_size", "prefetch_factor"):
            if getattr(self, name) <= 0:
                raise DataConfigError(f"{key}.{name}={getattr(self, name)} must be > 0")
        for name in ("workers", "shuffle_buffer", "batches_per_epoch", "max_regions", "eval_batch_size"):
            if getattr(self, name) < 0:
                raise DataConfigError(f"{key}.{name}={getattr(self, name)} must be >= 0")
        if self.resampled and self.batches_per_epoch <= 0:
            raise DataConfigError(f"{key}.resampled=true needs {key}.batches_per_epoch > 0 "
                                  f"(got {self.batches_per_epoch})")
        if self.normalize not in ("loader", "device"):
            raise DataConfigError(f"{key}.normalize={self.normalize!r}: expected loader or device")
        if self.tokenizer.kind not in ("clip_bpe", "sentencepiece"):
            raise DataConfigError(f"{key}.tokenizer.kind={self.tokenizer.kind!r}: expected "
                                  "clip_bpe or sentencepiece")
        if self.tokenizer.kind == "sentencepiece" and not self.tokenizer.model_path:
            raise DataConfigError(f"{key}.tokenizer.kind=sentencepiece needs "
                                  f"{key}.tokenizer.model_path")
        if self.tokenizer.context_length < 2:
            raise DataConfigError(f"{key}.tokenizer.context_length={self.tokenizer.context_length} "
                                  "must be >= 2")
        self.augment.validate(f"{key}.augment")
