"""Training losses over the global (data-parallel) batch; trainer/losses/gather.py states the
gradient convention they share."""
from trainer.losses.contrastive import clip_loss
from trainer.losses.gather import all_gather_with_grad
from trainer.losses.grounding import box_iou_giou, grounding_loss
from trainer.losses.region import region_text_loss
from trainer.losses.sigmoid import siglip_loss

__all__ = ["all_gather_with_grad", "box_iou_giou", "clip_loss", "grounding_loss",
           "region_text_loss", "siglip_loss"]
