"""Defect regions of a predicted mask: areas, boxes, peaks, the minimum area."""

import numpy as np
import pytest

from metaad.deploy.regions import find_regions, without_small_regions


def _mask_and_map():
    mask = np.zeros((40, 60), bool)
    mask[5:10, 10:20] = True  # 50 px
    mask[30:32, 50:53] = True  # 6 px
    mask[20, 30] = mask[21, 31] = True  # diagonal neighbours: one 8-connected region of 2 px
    anomaly_map = np.zeros((40, 60), np.float32)
    anomaly_map[7, 12] = 3.0
    anomaly_map[31, 51] = 5.0
    anomaly_map[21, 31] = 1.0
    return mask, anomaly_map


def test_regions_have_area_box_and_peak_highest_peak_first():
    regions = find_regions(*_mask_and_map())
    assert [(r.area, r.x, r.y, r.width, r.height, r.peak) for r in regions] == [
        (6, 50, 30, 3, 2, 5.0), (50, 10, 5, 10, 5, 3.0), (2, 30, 20, 2, 2, 1.0)]
    assert find_regions(np.zeros((4, 4), bool), np.zeros((4, 4))) == []


def test_small_regions_are_dropped():
    mask, anomaly_map = _mask_and_map()
    assert [r.area for r in find_regions(mask, anomaly_map, min_area=6)] == [6, 50]
    kept = without_small_regions(mask, 10)
    assert kept.sum() == 50 and kept[5:10, 10:20].all()
    with pytest.raises(ValueError, match="min_area"):
        find_regions(mask, anomaly_map, min_area=0)
