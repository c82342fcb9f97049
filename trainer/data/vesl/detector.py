"""An open-vocabulary detector (OWL-ViT / OWLv2 from transformers) that boxes caption phrases
in stored-image pixels.

The detector sees the image its processor makes: OWLv2's pads the stored image to a square
(bottom and right) and resizes that; OWL-ViT's resizes (stretches) it to its input size. The
predicted boxes are centre-size boxes normalised to that input, so in stored-image pixels
    pad_square: (x, y) * max(width, height)        stretch: x * width, y * height
(`to_stored_pixels`); boxes are then clipped to the stored image, and a box left with no area
(it lay in the padding) is dropped. A processor that centre-crops is refused: the crop would
cut away part of the stored image.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

SUPPORTED = ("owlv2", "owlvit")


class DetectorError(ValueError):
    """A detector directory this module cannot use (message names the file and field)."""


def geometry_of(image_processor) -> str:
    """"pad_square" or "stretch": how `image_processor` maps a stored image to its input."""
    name = type(image_processor).__name__
    if getattr(image_processor, "do_center_crop", False):
        raise DetectorError(f"{name}: do_center_crop=True cuts part of the image away; "
                            "set it false in preprocessor_config.json")
    return "pad_square" if getattr(image_processor, "do_pad", False) else "stretch"


def to_stored_pixels(boxes: torch.Tensor, width: int, height: int, geometry: str) -> torch.Tensor:
    """[n, 4] (cx, cy, w, h) normalised to the detector input -> [n, 4] xyxy pixels of the
    stored `width` x `height` image (float64, clipped to it)."""
    b = boxes.double()
    if geometry == "pad_square":
        sx = sy = float(max(width, height))
    elif geometry == "stretch":
        sx, sy = float(width), float(height)
    else:
        raise ValueError(f"geometry={geometry!r} (pad_square|stretch)")
    cx, cy, w, h = b.unbind(-1)
    xyxy = torch.stack([(cx - w / 2) * sx, (cy - h / 2) * sy, (cx + w / 2) * sx,
                        (cy + h / 2) * sy], dim=-1)
    lo = torch.zeros(4, dtype=xyxy.dtype)
    hi = torch.tensor([width, height, width, height], dtype=xyxy.dtype)
    return torch.minimum(torch.maximum(xyxy, lo), hi)


@dataclass(frozen=True)
class DetectOptions:
    score: float = 0.3        # keep boxes whose best phrase scores above this (ours)
    nms_iou: float = 0.5      # per-phrase NMS IoU (ours)
    max_regions: int = 16     # per image, best scores first (0: no cap)
    min_size: float = 1.0     # pixels: narrower or shorter boxes (after clipping) are dropped
    prompt: str = "{}"        # the text query for a phrase


def read_model_type(path: str | Path) -> str:
    config = Path(path) / "config.json"
    if not config.is_file():
        raise DetectorError(f"--detector {path}: no config.json (a transformers model directory "
                            "written by save_pretrained)")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except ValueError as e:
        raise DetectorError(f"{config}: not JSON ({e})") from None
    if model_type not in SUPPORTED:
        raise DetectorError(f"{config}: model_type={model_type!r}; supported: "
                            f"{', '.join(SUPPORTED)}")
    return model_type


class RegionDetector:
    """OWL-ViT / OWLv2 loaded from a local directory (model, preprocessor and tokenizer files)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self.model_type = read_model_type(path)
        try:
            self.processor = AutoProcessor.from_pretrained(str(path))
        except (OSError, ValueError, TypeError) as e:
            raise DetectorError(f"--detector {path}: cannot load its processor "
                                f"(preprocessor and tokenizer files): {str(e).splitlines()[0]}") from None
        if not hasattr(self.processor, "tokenizer") or not hasattr(self.processor, "image_processor"):
            raise DetectorError(f"--detector {path}: {type(self.processor).__name__} has no "
                                "tokenizer + image processor pair")
        self.geometry = geometry_of(self.processor.image_processor)
        self.device = torch.device(device)
        self.model = AutoModelForZeroShotObjectDetection.from_pretrained(str(path), dtype=dtype)
        self.model.to(self.device).eval()
        self.text_length = self.model.config.text_config.max_position_embeddings

    def queries(self, phrases: list[list[str]], prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention masks [B * Q, L] of every image's phrases, Q the largest
        phrase count; padding queries are all-zero ids (the model masks a query whose first
        id is 0) with one attended position (no empty attention row)."""
        b, q, length = len(phrases), max(1, max(len(p) for p in phrases)), self.text_length
        ids = torch.zeros(b, q, length, dtype=torch.long)
        mask = torch.zeros(b, q, length, dtype=torch.long)
        mask[..., 0] = 1
        flat = [prompt.format(p) for ps in phrases for p in ps]
        if flat:
            tok = self.processor.tokenizer(flat, padding="max_length", truncation=True,
                                           max_length=length, return_tensors="pt")
            rows = torch.tensor([[i, j] for i, ps in enumerate(phrases) for j in range(len(ps))])
            ids[rows[:, 0], rows[:, 1]] = tok["input_ids"]
            mask[rows[:, 0], rows[:, 1]] = tok["attention_mask"]
        return ids.view(b * q, length), mask.view(b * q, length)

    @torch.inference_mode()
    def detect(self, images: list[Image.Image], phrases: list[list[str]],
               opts: DetectOptions) -> list[list[dict]]:
        """Regions {"bbox": xyxy stored pixels, "caption": phrase, "score"} per image, best
        score first. Every image needs at least one phrase."""
        from torchvision.ops import batched_nms

        if len(images) != len(phrases) or any(not p for p in phrases):
            raise ValueError("detect: one non-empty phrase list per image")
        pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        ids, mask = self.queries(phrases, opts.prompt)
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         pixel_values=pixels.to(self.device, self.model.dtype))
        logits = out.logits.float().cpu()            # [B, P, Q]
        boxes = out.pred_boxes.float().cpu()         # [B, P, 4] cxcywh, normalised
        results = []
        for i, (img, ps) in enumerate(zip(images, phrases)):
            best, label = logits[i, :, :len(ps)].max(dim=-1)  # [P]: each box's best phrase
            score = torch.sigmoid(best)  # after the argmax: sigmoids of large logits tie at 1.0
            xyxy = to_stored_pixels(boxes[i], img.width, img.height, self.geometry)
            keep = ((score > opts.score) & (xyxy[:, 2] - xyxy[:, 0] >= opts.min_size)
                    & (xyxy[:, 3] - xyxy[:, 1] >= opts.min_size))
            xyxy, score, label = xyxy[keep], score[keep], label[keep]
            order = batched_nms(xyxy, score.double(), label, opts.nms_iou)  # by score, descending
            if opts.max_regions:
                order = order[:opts.max_regions]
            results.append([{"bbox": [round(float(v), 2) for v in xyxy[k]],
                             "caption": ps[int(label[k])], "score": round(float(score[k]), 4)}
                            for k in order.tolist()])
        return results
