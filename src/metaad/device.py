"""Where a fitted model runs: ``--device cpu`` (the default), ``cuda`` or ``auto`` for test, predict, serve and
export. Only inference moves: a method's ``predict`` gets its inputs on the model's device and hands back CPU
tensors, so everything after it (metrics, reports, CSVs, the service) is unchanged."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from metaad.types import AnomalyPrediction


def select_device(name: str = "cpu") -> torch.device:
    """``cpu``, ``cuda`` or ``auto`` (cuda when available) as a torch device; asking for a missing GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device here (use --device cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or auto, got {name!r}")
    return torch.device(name)


class OnDevice:
    """A fitted model moved to ``device``: ``predict`` takes CPU images and returns CPU tensors; any other
    attribute is the model's."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model.to(device)
        self.device = device

    def predict(self, images: torch.Tensor) -> AnomalyPrediction:
        scores, maps = self.model.predict(images.to(self.device))
        return AnomalyPrediction(scores.cpu(), maps.cpu())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def on_device(model: nn.Module, device: str = "cpu") -> nn.Module | OnDevice:
    """``model`` itself on the CPU, else wrapped in :class:`OnDevice` (``device`` as :func:`select_device`)."""
    target = select_device(device)
    return model if target.type == "cpu" else OnDevice(model, target)
