"""What a person sees of one prediction, drawn once for ``predict`` and ``serve``: the heat map in colour and the
overlay, the image at its own size with the heat map blended in and the predicted defect outlined."""

from __future__ import annotations

import functools

import numpy as np

OUTLINE = (255, 255, 255)  # the predicted defect's outline


def map_scale(maps: np.ndarray, pixel_threshold: float | None = None) -> tuple[float, float]:
    """One colour scale for a set of anomaly maps: from their 1st percentile to twice the distance to the
    pixel threshold, so the threshold is the middle of the colour bar (without one: 1st to 99.9th percentile)."""
    low, high = (float(v) for v in np.percentile(maps, [1, 99.9]))
    if pixel_threshold is not None and pixel_threshold > low:
        high = low + 2 * (pixel_threshold - low)
    return low, max(high, low + 1e-6)


def heat_colours(anomaly_map: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """(H, W) map -> (H, W, 3) uint8 jet colours over ``scale`` = (low, high): matplotlib's 256-entry table,
    indexed as matplotlib indexes it, without its float RGBA image."""
    low, high = scale
    scaled = (anomaly_map - low) * (256.0 / max(high - low, 1e-12))
    return _jet_table()[np.clip(scaled, 0, 255).astype(np.uint8)]


@functools.cache
def _jet_table() -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps["jet"](np.arange(256))[:, :3] * 255).round().astype(np.uint8)


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The boundary pixels of a boolean mask (inside it, ``width`` pixels wide)."""
    from scipy import ndimage

    if not mask.any():
        return mask
    inner = ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), iterations=width, border_value=0)
    return mask & ~inner


def overlay(image: np.ndarray, anomaly_map: np.ndarray, scale: tuple[float, float],
            predicted: np.ndarray | None = None, alpha: float = 0.45) -> np.ndarray:
    """(H, W, 3) uint8: ``image`` (H, W, 3, at the map's size) blended with the heat map, the ``predicted``
    defect's outline drawn in white (its width grows with the image: 1 px up to 512 px, then 2, ...)."""
    if image.shape[:2] != anomaly_map.shape:
        raise ValueError(f"image {image.shape[:2]} and map {anomaly_map.shape} must have the same size")
    weight = round(alpha * 256)  # in integers: 8-bit fixed point is exact to a grey level and 3x faster
    blended = image.astype(np.uint16) * (256 - weight) + heat_colours(anomaly_map, scale) * np.uint16(weight)
    pixels = ((blended + 128) >> 8).astype(np.uint8)
    if predicted is not None and predicted.any() and not predicted.all():
        pixels[outline(predicted, max(1, round(max(anomaly_map.shape) / 512)))] = OUTLINE
    return pixels
