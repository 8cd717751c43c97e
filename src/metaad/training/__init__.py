"""The one training loop every gradient-trained method uses (see ``loop.py``)."""

from metaad.training.loop import distributed_context, epoch_end_hook, train_model

__all__ = ["distributed_context", "epoch_end_hook", "train_model"]
