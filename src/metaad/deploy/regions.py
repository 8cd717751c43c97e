"""Defect regions: the connected regions of a predicted defect mask, each with its area, bounding box and peak
anomaly score, what an inspection station acts on (where, how large, how bad)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Region:
    """One connected region of predicted defect pixels (8-connected), in the image's own pixels."""

    area: int  # pixels
    x: int  # bounding box: left column, top row, width and height
    y: int
    width: int
    height: int
    peak: float  # the highest anomaly-map value inside the region

    def as_dict(self) -> dict:
        return asdict(self)


def find_regions(mask: np.ndarray, anomaly_map: np.ndarray, min_area: int = 1) -> list[Region]:
    """The regions of ``mask`` (H, W bool) of at least ``min_area`` pixels, largest peak first."""
    from scipy import ndimage

    if min_area < 1:
        raise ValueError(f"min_area must be at least 1 pixel, got {min_area}")
    if mask.shape != anomaly_map.shape:
        raise ValueError(f"mask {mask.shape} and anomaly map {anomaly_map.shape} must have the same shape")
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if count == 0:
        return []
    inside = labels[mask]  # only the mask's pixels: ndimage.maximum would sort the whole image
    areas = np.bincount(inside, minlength=count + 1)
    peaks = np.full(count + 1, -np.inf)
    np.maximum.at(peaks, inside, anomaly_map[mask].astype(np.float64))
    regions = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None or areas[index] < min_area:
            continue
        rows, cols = box
        regions.append(Region(int(areas[index]), cols.start, rows.start, cols.stop - cols.start,
                              rows.stop - rows.start, float(peaks[index])))
    return sorted(regions, key=lambda r: -r.peak)


def without_small_regions(mask: np.ndarray, min_area: int) -> np.ndarray:
    """``mask`` with its regions of fewer than ``min_area`` pixels removed (8-connected)."""
    from scipy import ndimage

    if min_area <= 1 or not mask.any():
        return mask
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), bool))
    areas = np.bincount(labels.ravel())
    keep = areas >= min_area
    keep[0] = False
    return keep[labels]
