"""Synthetic anomalies on real images: Perlin-noise masks filled with a foreign texture (DRAEM §3.3).

Used to validate settings without test labels (defect-free training images + synthetic defects) and, later,
as DRAEM's training signal.
"""

from __future__ import annotations

import numpy as np


def perlin_noise(size: tuple[int, int], cells: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise of ``size`` with ``cells`` lattice cells per axis, values about in [-1, 1]."""
    height, width = size
    angles = rng.uniform(0, 2 * np.pi, (cells[0] + 1, cells[1] + 1))
    gradients = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    y = np.linspace(0, cells[0], height, endpoint=False)
    x = np.linspace(0, cells[1], width, endpoint=False)
    yy, xx = np.meshgrid(y, x, indexing="ij")
    y0, x0 = yy.astype(int), xx.astype(int)
    fy, fx = yy - y0, xx - x0

    def corner(dy: int, dx: int) -> np.ndarray:
        g = gradients[y0 + dy, x0 + dx]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    def fade(t: np.ndarray) -> np.ndarray:
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    top = corner(0, 0) + fade(fx) * (corner(0, 1) - corner(0, 0))
    bottom = corner(1, 0) + fade(fx) * (corner(1, 1) - corner(1, 0))
    return np.sqrt(2) * (top + fade(fy) * (bottom - top))


def perlin_mask(size: tuple[int, int], rng: np.random.Generator, threshold: float = 0.5,
                max_cells_log2: int = 6) -> np.ndarray:
    """A binary blob mask: Perlin noise at a random scale (2^0..2^max per axis) thresholded; never empty."""
    for _ in range(20):
        cells = (2 ** int(rng.integers(0, max_cells_log2)), 2 ** int(rng.integers(0, max_cells_log2)))
        mask = perlin_noise(size, cells, rng) > threshold
        if mask.any():
            return mask
    mask = np.zeros(size, bool)
    mask[size[0] // 3 : size[0] // 2, size[1] // 3 : size[1] // 2] = True
    return mask


def paste_anomaly(image: np.ndarray, texture: np.ndarray, rng: np.random.Generator,
                  opacity: tuple[float, float] = (0.2, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """Blend ``texture`` into ``image`` inside a Perlin mask (DRAEM eq. 1 with opacity 1 - beta).

    ``image`` and ``texture``: float arrays in [0, 1] of the same (H, W, 3) shape. Returns the image with the
    anomaly and its boolean mask.
    """
    if image.shape != texture.shape:
        raise ValueError(f"texture shape {texture.shape} must match image shape {image.shape}")
    mask = perlin_mask(image.shape[:2], rng)
    alpha = rng.uniform(*opacity)
    blended = image.copy()
    blended[mask] = (1 - alpha) * image[mask] + alpha * texture[mask]
    return blended, mask
