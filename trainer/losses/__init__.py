from trainer.losses.contrastive import clip_loss

__all__ = ["clip_loss"]
