import numpy as np
import pytest

from metaad.components.anomaly_synthesis import paste_anomaly, perlin_noise


def test_perlin_noise_is_smooth_bounded_and_seeded():
    a = perlin_noise((64, 64), (4, 4), np.random.default_rng(0))
    b = perlin_noise((64, 64), (4, 4), np.random.default_rng(0))
    assert np.array_equal(a, b) and a.shape == (64, 64)
    assert np.abs(a).max() <= 1.5 and a.std() > 0.1
    assert np.abs(np.diff(a, axis=1)).max() < 0.3  # neighbouring pixels differ little: smooth noise
    assert np.allclose(a[::16, ::16], 0.0, atol=1e-9)  # gradient noise vanishes on lattice points


def test_pasted_anomaly_changes_only_the_masked_pixels():
    rng = np.random.default_rng(1)
    image = np.full((32, 32, 3), 0.5)
    texture = np.zeros((32, 32, 3))
    defective, mask = paste_anomaly(image, texture, rng, opacity=(0.5, 0.5))
    assert mask.any() and not mask.all()
    assert np.array_equal(defective[~mask], image[~mask])
    assert np.allclose(defective[mask], 0.25)
    with pytest.raises(ValueError, match="must match"):
        paste_anomaly(image, texture[:16], rng)
