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


TARGETS = ("miss-rate", "false-alarm-rate")


def parse_target(spec: str) -> tuple[str, float]:
    """``"miss-rate=0.01"`` or ``"false-alarm-rate=0.05"`` as (kind, rate), or a clear error."""
    kind, sep, value = spec.partition("=")
    try:
        rate = float(value)
    except ValueError:
        rate = float("nan")
    if not sep or kind not in TARGETS or not 0 <= rate < 1:
        raise ValueError(f"--set-threshold {spec!r}: expected miss-rate=R or false-alarm-rate=R with 0 <= R < 1")
    return kind, rate


def threshold_for_target(labels: np.ndarray, scores: np.ndarray, kind: str, rate: float) -> dict[str, Any]:
    """The image threshold (anomalous when score > threshold) that meets a target on labelled images: at most
    ``rate`` of the defective images at or below it ("miss-rate": the highest such threshold, so the fewest
    false alarms), or at most ``rate`` of the good ones above it ("false-alarm-rate": the lowest such, so the
    fewest misses); with the counts it gives on those images."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    # in the scores' own precision: a float32 score compared with the threshold (NumPy compares a float32 with a
    # Python float in float32) must land on the same side as in float64
    defective, good = np.sort(scores[labels == 1]), np.sort(scores[labels == 0])
    if kind == "miss-rate":
        if defective.size == 0:
            raise ValueError("a miss-rate threshold needs defective images in the labelled split")
        allowed = int(np.floor(rate * defective.size))
        below = np.nextafter(defective[allowed], np.array(-np.inf, dtype=defective.dtype))
        threshold = float(below)  # the allowed misses lie at or below it
    else:
        if good.size == 0:
            raise ValueError("a false-alarm-rate threshold needs defect-free images in the labelled split")
        allowed = int(np.floor(rate * good.size))
        threshold = float(good[good.size - allowed - 1])
    misses, alarms = int(np.sum(defective <= threshold)), int(np.sum(good > threshold))
    return {
        "threshold": threshold,
        "target": f"{kind}={rate:g}",
        "n_defective": int(defective.size), "n_good": int(good.size),
        "misses": misses, "false_alarms": alarms,
        "miss_rate": misses / max(defective.size, 1), "false_alarm_rate_on_labelled": alarms / max(good.size, 1),
    }
