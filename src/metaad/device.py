"""Where a fitted model runs: ``--device cpu`` (the default), ``cuda`` or ``auto`` for test, predict, serve and
export. One rule: the model is moved with ``.to`` (:func:`on_device`), and its ``predict`` takes images on any
device, runs them on the model's and hands back CPU tensors (``metaad.components.estimator.predict_in_batches``,
the one predict loop), so everything after it (metrics, reports, CSVs, the service) is unchanged."""

from __future__ import annotations

import torch
from torch import nn


def select_device(name: str = "cpu") -> torch.device:
    """``cpu``, ``cuda`` or ``auto`` (cuda when available) as a torch device; asking for a missing GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device here (use --device cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or auto, got {name!r}")
    return torch.device(name)


def on_device(model: nn.Module, device: str = "cpu") -> nn.Module:
    """``model`` moved to ``device`` (as :func:`select_device`) with ``.to``; it is returned, for chaining."""
    return model.to(select_device(device))
