"""Synthetic anomalies on real images: Perlin-noise masks filled with a foreign texture (DRAEM §3.3).

Used to validate settings without test labels (defect-free training images + synthetic defects; the numpy
functions) and as the training signal of DRAEM and the U-Net autoencoder (the batched torch functions below:
Perlin masks of any size, DTD or generated textures, A.2.4's augmentations, the blend).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF


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


# ------------------------------------------------------------------------------------------ batched torch
# DRAEM's anomaly simulator (§3.3 and the reference code ``vitjanz/draem``), on torch tensors of any H × W.
# Randomness comes from ``generator`` (None: torch's global RNG, which the training loop re-seeds every epoch).


def perlin_noise_torch(size: tuple[int, int], cells: tuple[int, int],
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """:func:`perlin_noise` in torch: (H, W) gradient noise with ``cells`` lattice cells per axis, any size."""
    height, width = size
    angles = torch.rand(cells[0] + 1, cells[1] + 1, generator=generator) * (2 * math.pi)
    gy, gx = torch.cos(angles), torch.sin(angles)
    y = torch.arange(height, dtype=torch.float32) * (cells[0] / height)
    x = torch.arange(width, dtype=torch.float32) * (cells[1] / width)
    y0, x0 = y.long(), x.long()
    fy, fx = (y - y0).view(-1, 1), (x - x0).view(1, -1)  # separable: (H, 1) and (1, W)
    rows, columns = y0.view(-1, 1), x0.view(1, -1)

    def corner(dy: int, dx: int) -> torch.Tensor:
        return gy[rows + dy, columns + dx] * (fy - dy) + gx[rows + dy, columns + dx] * (fx - dx)

    def fade(t: torch.Tensor) -> torch.Tensor:
        return t * t * t * (t * (6 * t - 15) + 10)

    top = torch.lerp(corner(0, 0), corner(0, 1), fade(fx))
    bottom = torch.lerp(corner(1, 0), corner(1, 1), fade(fx))
    return math.sqrt(2) * torch.lerp(top, bottom, fade(fy))


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """An integer in [low, high)."""
    return int(torch.randint(low, high, (), generator=generator))


def perlin_masks(n: int, size: tuple[int, int], *, threshold: float = 0.5, max_cells_log2: int = 6,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, H, W) boolean blob masks, as DRAEM's reference: Perlin noise with 2^0..2^(max−1) cells per axis
    (drawn per axis), rotated by an angle in (−90°, 90°), thresholded at ``threshold``; never empty."""
    masks = torch.zeros(n, *size, dtype=torch.bool)
    for i in range(n):
        for _ in range(20):
            cells = (2 ** _randint(0, max_cells_log2, generator), 2 ** _randint(0, max_cells_log2, generator))
            noise = perlin_noise_torch(size, cells, generator)
            noise = TF.rotate(noise[None], _uniform(-90, 90, generator), interpolation=TF.InterpolationMode.BILINEAR)
            masks[i] = noise[0] > threshold
            if masks[i].any():
                break
        else:  # a rare run of empty masks: a box in the middle
            (top, bottom), (left, right) = ((s // 3, max(s // 2, s // 3 + 1)) for s in size)
            masks[i, top:bottom, left:right] = True
    return masks


def generate_textures(n: int, size: tuple[int, int], generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 3, H, W) uint8 procedural textures, metaad's offline stand-in for DTD: each is one of fractal
    colour noise (three octaves of Perlin noise between two random colours), a grating (rotated stripes),
    colour patches (a random grid of colours) or speckle (coarse random noise per channel)."""
    height, width = size
    ys = torch.linspace(0, 1, height).view(-1, 1).expand(height, width)
    xs = torch.linspace(0, 1, width).view(1, -1).expand(height, width)
    out = torch.empty(n, 3, height, width)
    for i in range(n):
        kind = _randint(0, 4, generator)
        low, high = torch.rand(3, 1, 1, generator=generator), torch.rand(3, 1, 1, generator=generator)
        if kind == 0:
            noise = sum(perlin_noise_torch(size, (2**o * c, 2**o * c), generator) / 2**o
                        for o, c in enumerate([2 ** _randint(0, 4, generator)] * 3))
            t = (noise - noise.min()) / (noise.max() - noise.min() + 1e-8)
            out[i] = low + (high - low) * t
        elif kind == 1:
            angle, frequency = _uniform(0, math.pi, generator), _uniform(2, 24, generator)
            phase = (xs * math.cos(angle) + ys * math.sin(angle)) * frequency * 2 * math.pi
            t = 0.5 + 0.5 * torch.sin(phase + _uniform(0, 2 * math.pi, generator))
            out[i] = low + (high - low) * (t if _randint(0, 2, generator) else (t > 0.5).float())
        elif kind == 2:
            cells = (_randint(2, 17, generator), _randint(2, 17, generator))
            grid = torch.rand(1, 3, *cells, generator=generator)
            out[i] = F.interpolate(grid, size=size, mode="nearest")[0]
        else:
            grain = _randint(1, 9, generator)
            coarse = torch.rand(1, 3, max(1, height // grain), max(1, width // grain), generator=generator)
            out[i] = low + (high - low) * F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)[0]
    return (out.clamp(0, 1) * 255).round().to(torch.uint8)


def _colour(image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    image = TF.adjust_hue(image, _uniform(-0.14, 0.14, generator))
    return TF.adjust_saturation(image, _uniform(0.5, 1.5, generator))


# the seven texture augmentations of MIAD A.2.4 (the reference's imgaug ranges where it has them)
TEXTURE_AUGMENTATIONS: dict[str, Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]] = {
    "posterize": lambda im, g: TF.posterize(im, _randint(2, 8, g)),
    "sharpness": lambda im, g: TF.adjust_sharpness(im, _uniform(0.0, 2.0, g)),
    "solarize": lambda im, g: TF.solarize(im, _uniform(32, 128, g)),
    "equalize": lambda im, g: TF.equalize(im),
    "brightness": lambda im, g: TF.adjust_brightness(im, _uniform(0.8, 1.2, g)),
    "colour": _colour,
    "auto_contrast": lambda im, g: TF.autocontrast(im),
}


def augment_textures(textures: torch.Tensor, n_ops: int = 3, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each (3, H, W) uint8 texture through ``n_ops`` distinct augmentations drawn from
    :data:`TEXTURE_AUGMENTATIONS`, in random order (torchvision ``transforms.v2`` functional ops)."""
    names = list(TEXTURE_AUGMENTATIONS)
    out = []
    for texture in textures:
        for index in torch.randperm(len(names), generator=generator)[:n_ops].tolist():
            texture = TEXTURE_AUGMENTATIONS[names[index]](texture, generator)
        out.append(texture)
    return torch.stack(out)


class TextureSource:
    """Where anomaly textures come from: image files under ``folder`` (any depth, e.g. DTD), each resized
    to the requested size as the reference does; or, with no folder, :func:`generate_textures`."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = folder
        self.paths: list[Path] = []
        if folder is not None:
            from metaad.data.datasets import list_images

            self.paths = list_images(folder, recursive=True)
            if not self.paths:
                raise ValueError(f"{folder}: no texture images found below it (expected jpg/png files)")

    def sample(self, n: int, size: tuple[int, int], generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, 3, H, W) uint8 textures, drawn at random."""
        if not self.paths:
            return generate_textures(n, size, generator)
        from PIL import Image

        out = []
        for index in torch.randint(len(self.paths), (n,), generator=generator).tolist():
            with Image.open(self.paths[index]) as image:
                texture = TF.pil_to_tensor(image.convert("RGB"))
            out.append(TF.resize(texture, list(size), antialias=True))
        return torch.stack(out)


def rotate_images(images: torch.Tensor, max_degrees: float = 45.0, probability: float = 0.3,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Each (C, H, W) image rotated by an angle in (−max, max) with ``probability`` (A.2.4's rotation of
    defect-free images; the reference applies it with probability 0.3), corners filled with 0 as imgaug."""
    out = images.clone()
    for i in range(len(images)):
        if float(torch.rand((), generator=generator)) < probability:
            angle = _uniform(-max_degrees, max_degrees, generator)
            out[i] = TF.rotate(images[i], angle, interpolation=TF.InterpolationMode.BILINEAR)
    return out


# ------------------------------------------------------------------------ anomalies that match the data
# Grey images (three equal channels, as Magnetic Tile Defects) would let a detector find coloured simulated
# anomalies by colour alone, a cue real grey-level defects never give; so on a grey image the textures are
# taken in luma, and the simulator also draws grey-level surface defects: low contrast, a few pixels wide.
# These are the training signal only; the validation defects of ``metaad.data.synthetic`` are drawn by other
# code with other shapes, so that a validation does not measure the simulator against itself.

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601
ANOMALY_COLOURS = ("auto", "as_is")
ANOMALY_KINDS = ("textures", "surface", "mixed")
SURFACE_DEFECTS = ("crack", "pit", "stain", "shading")


def check_anomaly_options(colour: str, kinds: str | None = None, names: tuple[str, str] = ("colour", "kinds")) -> None:
    """A one-line error naming the setting (``names``: how the caller calls them) when ``colour`` is not one
    of :data:`ANOMALY_COLOURS` or ``kinds`` (None: not checked) not one of :data:`ANOMALY_KINDS`."""
    if colour not in ANOMALY_COLOURS:
        raise ValueError(f"{names[0]} must be one of {', '.join(ANOMALY_COLOURS)}, got {colour!r}")
    if kinds is not None and kinds not in ANOMALY_KINDS:
        raise ValueError(f"{names[1]} must be one of {', '.join(ANOMALY_KINDS)}, got {kinds!r}")


def grey_images(images: torch.Tensor, tolerance: float = 2 / 255) -> torch.Tensor:
    """(B,) bool: which (B, 3, H, W) images in [0, 1] have three equal channels (to ``tolerance``)."""
    spread = images.amax(1) - images.amin(1)
    return spread.flatten(1).amax(1) <= tolerance


def to_luma(textures: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) textures (uint8 or floats) with each channel replaced by their luma (BT.601)."""
    weights = torch.tensor(LUMA, dtype=torch.float32).view(1, 3, 1, 1)
    luma = (textures.float() * weights).sum(1, keepdim=True).expand_as(textures)
    return luma.round().to(torch.uint8) if textures.dtype == torch.uint8 else luma.to(textures.dtype)


def _soft_disc(size: tuple[int, int], centre: tuple[float, float], radii: tuple[float, float],
               angle: float) -> torch.Tensor:
    """(H, W) in [0, 1]: 1 at the centre of a rotated ellipse, falling to 0 at its edge."""
    ys = torch.arange(size[0], dtype=torch.float32).view(-1, 1) - centre[0]
    xs = torch.arange(size[1], dtype=torch.float32).view(1, -1) - centre[1]
    u = (xs * math.cos(angle) + ys * math.sin(angle)) / radii[0]
    v = (-xs * math.sin(angle) + ys * math.cos(angle)) / radii[1]
    return (1 - (u * u + v * v)).clamp(min=0).sqrt()


def _crack(size: tuple[int, int], scale: float, g: torch.Generator | None) -> torch.Tensor:
    """A branching-free random walk, 1-3 px wide at 256 px (at least 1 px), its segments 6-30 px long."""
    height, width = size
    y, x = _uniform(0, height, g), _uniform(0, width, g)
    heading = _uniform(0, 2 * math.pi, g)
    points = []
    for _ in range(_randint(3, 9, g)):
        heading += _uniform(-0.7, 0.7, g)
        length = _uniform(6, 30, g) * scale
        steps = max(2, int(length * 2))
        for t in range(steps):
            points.append((y + math.sin(heading) * length * t / steps, x + math.cos(heading) * length * t / steps))
        y, x = y + math.sin(heading) * length, x + math.cos(heading) * length
    centre = torch.zeros(1, 1, height, width)
    rows = torch.tensor([p[0] for p in points]).round().long()
    cols = torch.tensor([p[1] for p in points]).round().long()
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    centre[0, 0, rows[inside], cols[inside]] = 1
    width_px = max(1, round(_uniform(1, 3, g) * scale))
    kernel = width_px if width_px % 2 else width_px + 1
    return F.max_pool2d(centre, kernel, stride=1, padding=kernel // 2)[0, 0, :height, :width]


def _pits(size: tuple[int, int], scale: float, g: torch.Generator | None) -> torch.Tensor:
    """One to three pits: soft ellipses 3-14 px across at 256 px (at least 2 px), clustered."""
    height, width = size
    cy, cx = _uniform(0, height, g), _uniform(0, width, g)
    weight = torch.zeros(size)
    for _ in range(_randint(1, 4, g)):
        radii = (max(1.0, _uniform(1.5, 7, g) * scale), max(1.0, _uniform(1.5, 7, g) * scale))
        centre = (cy + _uniform(-12, 12, g) * scale, cx + _uniform(-12, 12, g) * scale)
        weight = torch.maximum(weight, _soft_disc(size, centre, radii, _uniform(0, math.pi, g)))
    return weight


def _stain(size: tuple[int, int], g: torch.Generator | None, coarsest: int) -> torch.Tensor:
    """A Perlin blob with a soft edge: ``coarsest`` = 1 gives a large smooth shading, 4 a stain."""
    cells = (2 ** _randint(0, coarsest, g), 2 ** _randint(0, coarsest, g))
    noise = perlin_noise_torch(size, cells, g)
    threshold = _uniform(0.2, 0.6, g)
    return ((noise - threshold) / 0.25).clamp(0, 1)


def surface_defects(images: torch.Tensor, *, contrast: tuple[float, float] = (0.04, 0.3),
                    kinds: tuple[str, ...] = SURFACE_DEFECTS, generator: torch.Generator | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One grey-level defect per (B, 3, H, W) image in [0, 1]: a crack, pits, a stain or shading, darker (or,
    one in four, lighter) by a ``contrast`` share of the local grey level, the same on every channel (a grey
    image stays grey). Lengths are given at 256 px and scale with the image. Returns the images and their
    (B, 1, H, W) masks (where the change is at least half its peak)."""
    batch, _, height, width = images.shape
    scale = min(height, width) / 256
    out, masks = images.clone(), torch.zeros(batch, 1, height, width, dtype=images.dtype, device=images.device)
    for i in range(batch):
        kind = kinds[_randint(0, len(kinds), generator)]
        for _ in range(5):
            if kind == "crack":
                weight = _crack((height, width), scale, generator)
            elif kind == "pit":
                weight = _pits((height, width), scale, generator)
            else:
                weight = _stain((height, width), generator, 4 if kind == "stain" else 2)
            if weight.max() > 0.2:
                break
        weight = (weight / weight.max().clamp(min=1e-6)).to(images.device, images.dtype)  # peak 1
        amount = _uniform(*contrast, generator) * (1 if float(torch.rand((), generator=generator)) < 0.75 else -1)
        out[i] = (images[i] * (1 - amount * weight)).clamp(0, 1)
        masks[i, 0] = (weight >= 0.5).to(images.dtype)
    return out, masks


def simulate_anomalies(images: torch.Tensor, textures: torch.Tensor, *, probability: float = 0.5,
                       opacity: tuple[float, float] = (0.2, 1.0), generator: torch.Generator | None = None,
                       colour: str = "as_is", kinds: str = "textures",
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """DRAEM eq. 1 on a batch: inside a Perlin mask, blend the texture with opacity 1 − β (``opacity``: the
    reference's β ∈ [0, 0.8) gives (0.2, 1.0]); each image gets an anomaly with ``probability`` (0.5, as the
    reference). ``images``: (B, 3, H, W) floats in [0, 1]; ``textures``: (B, 3, H, W) uint8 or floats.

    ``colour="auto"``: a grey image's texture is taken in luma (``"as_is"``: the paper's coloured textures);
    ``kinds``: ``"textures"`` (the paper's), ``"surface"`` (:func:`surface_defects` only) or ``"mixed"``
    (each anomaly one or the other, even odds).
    Returns the simulated images and their (B, 1, H, W) float masks (1 exactly where pixels were replaced).
    """
    if textures.shape != images.shape:
        raise ValueError(f"textures {tuple(textures.shape)} must match images {tuple(images.shape)}")
    check_anomaly_options(colour, kinds)
    if colour == "auto":
        grey = grey_images(images).cpu()
        if grey.any():
            textures = textures.clone()
            textures[grey] = to_luma(textures[grey])
    textures = textures.float().div(255) if textures.dtype == torch.uint8 else textures.float()
    batch, _, height, width = images.shape
    chosen = (torch.rand(batch, generator=generator) < probability).view(-1, 1, 1, 1)
    masks = perlin_masks(batch, (height, width), generator=generator).unsqueeze(1) & chosen
    alpha = (opacity[0] + (opacity[1] - opacity[0]) * torch.rand(batch, 1, 1, 1, generator=generator))
    masks = masks.to(images.device, images.dtype)
    alpha = alpha.to(images.device, images.dtype) * masks
    simulated = images * (1 - alpha) + textures.to(images.device) * alpha
    if kinds == "textures":
        return simulated, masks
    surface = chosen.view(-1).clone()
    if kinds == "mixed":
        surface &= torch.rand(batch, generator=generator) < 0.5
    if surface.any():
        index = surface.nonzero()[:, 0].to(images.device)
        simulated[index], masks[index] = surface_defects(images[index], generator=generator)
    return simulated, masks
