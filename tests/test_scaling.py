"""Lengths the papers give at 256 px, at other working sizes (metaad.components.scaling)."""

import pytest

from metaad.components.scaling import scaled_length, scaled_window
from metaad.components.ssim import ssim_window_at


@pytest.mark.parametrize("size, window", [(32, 3), (64, 5), (128, 11), (256, 21), (512, 41)])
def test_windows_stay_odd_and_nearest(size, window):
    assert scaled_window(21, size) == window


def test_lengths_and_ssim_windows_scale():
    assert scaled_length(4.0, 128) == 2.0 and scaled_length(4.0, 512) == 8.0
    assert ssim_window_at(256) == (11, 1.5)
    assert ssim_window_at(128) == (5, pytest.approx(1.5 * 5 / 11))
    assert ssim_window_at(32)[0] == 3  # never below 3 taps
    with pytest.raises(ValueError, match="positive"):
        scaled_length(1.0, 0)
