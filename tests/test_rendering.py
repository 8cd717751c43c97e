"""The heat-map colours and the overlay blend that predict and serve draw (metaad.runs.rendering)."""

import numpy as np
from matplotlib import colormaps

from metaad.runs.rendering import heat_colours, overlay


def test_heat_colours_are_matplotlibs_jet_over_the_scale():
    rng = np.random.default_rng(0)
    anomaly_map = rng.normal(0.5, 0.4, (64, 80)).astype(np.float32)
    expected = (colormaps["jet"](np.clip((anomaly_map - 0.1) / 0.8, 0, 1))[..., :3] * 255).round().astype(np.uint8)
    got = heat_colours(anomaly_map, (0.1, 0.9))
    assert got.shape == (64, 80, 3) and got.dtype == np.uint8
    assert (got != expected).any(-1).mean() < 0.01  # float rounding at the table's bin edges only
    assert np.abs(got.astype(int) - expected).max() <= 8
    assert (heat_colours(np.array([[-5.0, 5.0]]), (0.0, 1.0)) == heat_colours(np.array([[0.0, 1.0]]), (0.0, 1.0))).all()


def test_overlay_blends_to_a_grey_level_and_outlines_the_mask():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    anomaly_map = rng.random((40, 50)).astype(np.float32)
    mask = np.zeros((40, 50), bool)
    mask[10:20, 10:30] = True
    pixels = overlay(image, anomaly_map, (0.0, 1.0), mask, alpha=0.45)
    exact = 0.55 * image + 0.45 * heat_colours(anomaly_map, (0.0, 1.0))
    inside = ~mask
    assert np.abs(pixels[inside].astype(float) - exact[inside]).max() <= 1.0
    assert (pixels[10, 10:30] == 255).all() and (pixels[15, 15] != 255).any()  # outline, not the fill
