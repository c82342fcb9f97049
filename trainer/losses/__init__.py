"""Training losses over the global (data-parallel) batch; trainer/losses/gather.py states the
gradient convention they share."""
from trainer.losses.contrastive import clip_loss
from trainer.losses.gather import all_gather_with_grad
from trainer.losses.region import region_text_loss
from trainer.losses.sigmoid import siglip_loss

__all__ = ["all_gather_with_grad", "clip_loss", "region_text_loss", "siglip_loss"]
