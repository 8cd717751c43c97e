"""The decision thresholds of a run, set on held-out defect-free training images: no test label is looked at."""

from __future__ import annotations

from typing import Any

import numpy as np


def calibrate_threshold(good_scores: np.ndarray, false_alarm_rate: float = 0.01) -> float:
    """The (1 - false_alarm_rate) quantile of held-out defect-free scores."""
    if good_scores.size == 0:
        raise ValueError("no held-out defect-free images to set a threshold from")
    return float(np.quantile(good_scores, 1.0 - false_alarm_rate, method="higher"))


def calibrate_pixel_threshold(good_maps: np.ndarray, false_alarm_rate: float = 0.01) -> float:
    """The map value above which a pixel is predicted defective: the (1 - false_alarm_rate) quantile of the
    held-out defect-free images' map maxima, so that share of good images has no predicted defect pixel."""
    if good_maps.size == 0:
        raise ValueError("no held-out defect-free images to set a pixel threshold from")
    return calibrate_threshold(good_maps.reshape(len(good_maps), -1).max(axis=1), false_alarm_rate)


def threshold_record(calibration, false_alarm_rate: float) -> dict[str, Any]:
    """What ``threshold.json`` holds, from the held-out defect-free images' :class:`Predictions`."""
    return {
        "threshold": calibrate_threshold(calibration.scores, false_alarm_rate),
        "false_alarm_rate": false_alarm_rate,
        "n_calibration_images": len(calibration.scores),
        "method": "quantile of held-out defect-free training images' scores",
        "score_low": float(np.min(calibration.scores)),
        "pixel_threshold": calibrate_pixel_threshold(calibration.maps, false_alarm_rate),
        "pixel_method": "the same quantile of held-out defect-free training images' map maxima",
        "map_low": float(np.percentile(calibration.maps, 1)),
    }


def unified_threshold_record(calibration, false_alarm_rate: float) -> dict[str, Any]:
    """``threshold.json`` of a run that trained several categories as one: the global thresholds (all held-out
    images; the fallback where no category is named) and, under ``"categories"``, each category's own, set on
    its own held-out images. A category with fewer held-out images than one false alarm per ``1 /
    false_alarm_rate`` needs gets its quantile all the same, and ``"few_calibration_images"`` says so."""
    record = threshold_record(calibration, false_alarm_rate)
    groups = calibration.by_category()
    if len(groups) < 2:
        return record
    record["categories"] = {name: threshold_record(group, false_alarm_rate) for name, group in groups.items()}
    needed = int(np.ceil(1 / false_alarm_rate)) if false_alarm_rate > 0 else 0
    few = sorted(name for name, group in groups.items() if len(group.scores) < needed)
    if few:
        record["few_calibration_images"] = (
            f"{', '.join(few)}: fewer than {needed} held-out images, so the {1 - false_alarm_rate:.0%} quantile "
            "is their maximum or near it"
        )
    record["method"] += "; per category under 'categories', the global one where no category is named"
    return record
