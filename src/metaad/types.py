"""Small shared types: what every method's ``predict`` returns."""

from __future__ import annotations

from typing import NamedTuple

import torch


class AnomalyPrediction(NamedTuple):
    """Output of ``Method.predict``.

    scores: (B,) image anomaly scores, higher = more anomalous.
    maps: (B, H, W) pixel anomaly maps at the input resolution.
    """

    scores: torch.Tensor
    maps: torch.Tensor
