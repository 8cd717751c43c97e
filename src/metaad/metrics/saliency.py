"""Saliency-map metrics: mean absolute error and max F-measure (β² = 0.3), as in the saliency literature.

Maps are evaluated as they are produced (values in [0, 1], no per-image min-max rescaling). The F-measure
follows the common protocol (e.g. PySODMetrics): the map is quantised to 256 levels, binarised at every
threshold t = 0..255 (``map >= t``), each image gets precision, recall and F_β at every threshold, the F
curves are averaged over images and the maximum over thresholds is the max F-measure.
"""

from __future__ import annotations

import torch

F_BETA2 = 0.3  # β² = 0.3 weighs precision over recall (Achanta et al. 2009, used by every SOD benchmark)
LEVELS = 256
_EPS = 1e-8


def _as_maps(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W) float maps and boolean masks; accepts (B, 1, H, W), (B, H, W) or one (H, W) map."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} and mask shape {tuple(target.shape)} differ")
    if pred.ndim == 2:
        pred, target = pred[None], target[None]
    if pred.ndim == 4:
        if pred.shape[1] != 1:
            raise ValueError(f"expected (B, 1, H, W) maps, got {tuple(pred.shape)}")
        pred, target = pred[:, 0], target[:, 0]
    if pred.ndim != 3:
        raise ValueError(f"expected (B, H, W) or (B, 1, H, W) maps, got {tuple(pred.shape)}")
    pred = pred.detach().float()
    if pred.numel() and (pred.min() < 0 or pred.max() > 1):
        raise ValueError(f"saliency maps must lie in [0, 1], got [{pred.min():.3g}, {pred.max():.3g}]")
    return pred, target.detach() > 0.5


def mae_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) mean absolute error between each map and its binary mask."""
    pred, mask = _as_maps(pred, target)
    return (pred - mask.float()).abs().flatten(1).mean(1)


def f_measure_curves(pred: torch.Tensor, target: torch.Tensor, beta2: float = F_BETA2) -> torch.Tensor:
    """(B, 256) F_β of each image at thresholds t / 255, t = 0..255 (binarised as ``round(255·map) >= t``)."""
    pred, mask = _as_maps(pred, target)
    batch = pred.shape[0]
    levels = (pred * (LEVELS - 1)).round().long().flatten(1)
    index = levels + torch.arange(batch, device=levels.device)[:, None] * LEVELS
    fg = mask.flatten(1)
    fg_hist = torch.bincount(index[fg], minlength=batch * LEVELS).view(batch, LEVELS).double()
    bg_hist = torch.bincount(index[~fg], minlength=batch * LEVELS).view(batch, LEVELS).double()
    tp = fg_hist.flip(1).cumsum(1).flip(1)  # pixels with level >= t that are foreground
    fp = bg_hist.flip(1).cumsum(1).flip(1)
    precision = tp / (tp + fp + _EPS)
    recall = tp / (fg_hist.sum(1, keepdim=True) + _EPS)
    return ((1 + beta2) * precision * recall / (beta2 * precision + recall + _EPS)).float()


def mae(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean absolute error between maps in [0, 1] and binary masks, averaged over images."""
    return float(mae_per_image(pred, target).mean())


def max_f_measure(pred: torch.Tensor, target: torch.Tensor, beta2: float = F_BETA2) -> float:
    """Max over thresholds of the image-averaged F_β curve (β² = 0.3)."""
    return float(f_measure_curves(pred, target, beta2).mean(0).max())


class SaliencyMetrics:
    """Accumulates MAE and F curves over images of any size; ``compute()`` gives ``{"mae", "max_f"}``."""

    def __init__(self, beta2: float = F_BETA2) -> None:
        self.beta2 = beta2
        self._mae: list[torch.Tensor] = []
        self._curves: list[torch.Tensor] = []

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> SaliencyMetrics:
        """Add a batch of same-size maps and masks ((B, 1, H, W), (B, H, W) or (H, W))."""
        self._mae.append(mae_per_image(pred, target).cpu())
        self._curves.append(f_measure_curves(pred, target, self.beta2).cpu())
        return self

    def compute(self) -> dict[str, float]:
        if not self._mae:
            raise ValueError("SaliencyMetrics.compute() called before any update()")
        curve = torch.cat(self._curves).mean(0)
        return {
            "mae": float(torch.cat(self._mae).mean()),
            "max_f": float(curve.max()),
            "best_threshold": float(curve.argmax()) / (LEVELS - 1),
            "images": int(sum(len(m) for m in self._mae)),
        }
