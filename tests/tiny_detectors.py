"""Tiny randomly initialised OWLv2 / OWL-ViT detector directories, built offline.

No package ships detector weights, so tests of tools/label_regions.py use these: they check the
plumbing (pixel space, query padding, resume, array split), not the boxes' quality. The tokenizer
is Hugging Face's CLIPTokenizer over open_clip's BPE vocabulary (trainer.export writes its files);
OWL models use CLIP's tokenizer with 16-token queries.
"""
from __future__ import annotations

from pathlib import Path

import torch

TEXT_LENGTH = 16


def build_detector(directory: str | Path, kind: str = "owlv2", image_size: int = 64,
                   patch_size: int = 16, seed: int = 0, score_shift: float = 0.0) -> Path:
    """Write model + processor (image processor and tokenizer) files into `directory`.
    `score_shift` is added to the class head's logit shift (raises every score). The box head's
    last layer is scaled down: at the default init its outputs saturate the sigmoid (boxes of
    zero or full size); scaled, each patch predicts a box near its own cell, as a trained head
    does, with some spread."""
    from transformers import (CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection,
                              Owlv2ImageProcessor, Owlv2Processor, OwlViTConfig,
                              OwlViTForObjectDetection, OwlViTImageProcessor, OwlViTProcessor)

    from trainer.export import write_clip_tokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_clip_tokenizer(directory, TEXT_LENGTH)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    text = dict(tower, max_position_embeddings=TEXT_LENGTH)
    vision = dict(tower, image_size=image_size, patch_size=patch_size)
    config_cls, model_cls, image_cls, proc_cls = {
        "owlv2": (Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor),
        "owlvit": (OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor, OwlViTProcessor),
    }[kind]
    torch.manual_seed(seed)
    model = model_cls(config_cls(text_config=text, vision_config=vision, projection_dim=32))
    with torch.no_grad():
        model.class_head.logit_shift.bias += score_shift
        model.box_head.dense2.weight.normal_(0.0, 1e-3)
        model.box_head.dense2.bias.zero_()
    model.save_pretrained(directory)
    size = {"height": image_size, "width": image_size}
    image_processor = (image_cls(size=size) if kind == "owlv2"
                       else image_cls(size=size, crop_size=size))
    proc_cls(image_processor=image_processor,
             tokenizer=CLIPTokenizer.from_pretrained(directory)).save_pretrained(directory)
    return directory
