"""The estimator scaffolding every method shares, written once: the not-fitted guard, the ``fitted`` flag that
a trained method's ``fit`` sets, and the ``predict`` loop (eval mode, batches moved to the model's device,
results handed back on the CPU: the device rule of ``metaad.device``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from metaad.data.batches import iter_image_batches
from metaad.types import AnomalyPrediction, EpochEnd, NotFittedError, device_of

ScoreBatch = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def marking_fitted(model: nn.Module, on_epoch_end: EpochEnd | None) -> EpochEnd:
    """What a trained method's ``fit`` gives the loop as ``on_epoch_end``: its ``fitted`` flag set after each
    epoch (so that ``on_epoch_end``, e.g. a validation, can predict along the training), then ``on_epoch_end``."""

    def after_epoch(epoch: int, trained: nn.Module) -> None:
        model.fitted.fill_(True)
        if on_epoch_end is not None:
            on_epoch_end(epoch, trained)

    return after_epoch


@torch.no_grad()
def predict_in_batches(
    model: nn.Module, images: torch.Tensor | Iterable, batch_size: int, score: ScoreBatch, *, fitted: bool
) -> AnomalyPrediction:
    """``score(batch) -> (scores, maps)`` over ``images`` (a tensor, or batches of them) ``batch_size`` at a
    time, each batch on the model's device and the model in eval mode (its mode restored after); scores (B,)
    and maps (B, H, W) come back on the CPU. Unless ``fitted``, :class:`NotFittedError`: never a silent score
    from untrained weights or an empty memory bank."""
    if not fitted:
        raise NotFittedError(f"{type(model).__name__} is not fitted: call fit(train_images) or load a fitted model")
    was_training = model.training
    model.eval()
    device = device_of(model)
    scores, maps = [], []
    try:
        for batch in iter_image_batches(images, batch_size):
            batch_scores, batch_maps = score(batch.to(device))
            scores.append(batch_scores.cpu())
            maps.append(batch_maps.cpu())
    finally:
        model.train(was_training)
    return AnomalyPrediction(torch.cat(scores), torch.cat(maps))
