"""Lengths in physical terms: the papers give windows, σ and patch sizes at their working size (256 px, MIAD
A.2 and DRAEM §4); a model working at another size scales them with it, so that a 4 px defect is diluted by
the same share of its window at 128 px as at 256 px."""

from __future__ import annotations

PAPER_SIDE = 256  # the working size at which the papers give their lengths


def scaled_length(length: float, size: int, reference: int = PAPER_SIDE) -> float:
    """``length`` pixels at ``reference`` px, at ``size`` px."""
    if size < 1 or reference < 1:
        raise ValueError(f"sizes must be positive, got size={size}, reference={reference}")
    return length * size / reference


def scaled_window(window: int, size: int, reference: int = PAPER_SIDE) -> int:
    """An odd window of ``window`` pixels at ``reference`` px, at ``size`` px (at least 1: a centred window)."""
    scaled = round(scaled_length(window, size, reference))
    return max(1, scaled if scaled % 2 else scaled + (1 if scaled < window * size / reference else -1))
