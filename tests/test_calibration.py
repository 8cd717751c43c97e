"""Thresholds set for a target on labelled images, in the scores' own precision."""

import numpy as np
import pytest

from metaad.runs.calibration import parse_target, threshold_for_target


def test_a_miss_rate_threshold_misses_at_most_that_share_even_in_float32():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=200).astype(np.float32)
    labels = (np.arange(200) >= 150).astype(int)
    scores[labels == 1] += 2
    for rate in (0.0, 0.02, 0.1):
        chosen = threshold_for_target(labels, scores, "miss-rate", rate)
        missed = np.sum(scores[labels == 1] <= chosen["threshold"])  # NumPy compares in float32 here
        assert missed == chosen["misses"] <= int(np.floor(rate * 50))
        # the highest such threshold: one step up would miss one more
        assert np.sum(scores[labels == 1] <= np.nextafter(np.float32(chosen["threshold"]), np.float32(np.inf))) > missed


def test_a_false_alarm_threshold_flags_at_most_that_share():
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.9, 1.0, 1.1], np.float32)
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    assert threshold_for_target(labels, scores, "false-alarm-rate", 0.0)["threshold"] == pytest.approx(0.4)
    chosen = threshold_for_target(labels, scores, "false-alarm-rate", 0.25)
    assert chosen["threshold"] == pytest.approx(0.3) and chosen["false_alarms"] == 1


@pytest.mark.parametrize("spec", ["miss=0.1", "miss-rate", "miss-rate=abc", "false-alarm-rate=1.5"])
def test_malformed_targets_are_refused(spec):
    with pytest.raises(ValueError, match="expected miss-rate=R or false-alarm-rate=R"):
        parse_target(spec)
