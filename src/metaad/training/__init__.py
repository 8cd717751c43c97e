"""The one training loop every gradient-trained method uses (see ``loop.py``), and the one checkpoint format of
every training loop (see ``checkpoint.py``)."""

from metaad.training.loop import distributed_context, train_model, write_loss_log

__all__ = ["distributed_context", "train_model", "write_loss_log"]
