"""Salient-object folders (``images/`` + ``masks/``), seeded disjoint splits, and colour-selectivo effect images.

For the instance-prior GAN (Metaformer §3.2, [8]) the data are split three ways, disjointly and reproducibly:
the *effect* part, whose images and masks make the real colour-selectivo photos (standing in for the
paper's 4,061 Flickr effect photos); the *generator* part, whose images alone train G (its masks are never
read); and a small *validation* part whose masks only measure progress in the training log.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from metaad.data.datasets import DataError
from metaad.data.transforms import IMAGE_EXTENSIONS

SALIENCY_IMAGE_EXTENSIONS = IMAGE_EXTENSIONS
MASK_EXTENSIONS = (".png",)


@dataclass(frozen=True)
class SaliencySample:
    """One image of a saliency folder and its binary mask file (None when the folder has no masks)."""

    stem: str
    image: Path
    mask: Path | None


def _files_by_stem(folder: Path, extensions: Sequence[str]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in extensions:
            if path.stem in files:
                raise DataError(f"{folder}: two files for {path.stem!r} ({files[path.stem].name}, {path.name})")
            files[path.stem] = path
    return files


def list_saliency_folder(root: str | Path, require_masks: bool = True) -> list[SaliencySample]:
    """The samples of ``root/images/*.jpg`` (or .jpeg/.png) with ``root/masks/<stem>.png``, sorted by stem.

    Extensions are matched case-insensitively. With ``require_masks`` every image needs a mask and every
    mask an image (the error lists the first unmatched names); without it masks are optional.
    """
    root = Path(root)
    images_dir, masks_dir = root / "images", root / "masks"
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: folder not found (a saliency folder holds images/ and masks/)")
    images = _files_by_stem(images_dir, SALIENCY_IMAGE_EXTENSIONS)
    if not images:
        raise DataError(f"{images_dir}: no images (expected files ending in {', '.join(SALIENCY_IMAGE_EXTENSIONS)})")
    if not masks_dir.is_dir():
        if require_masks:
            raise DataError(f"{masks_dir}: folder not found (expected one <stem>.png mask per image)")
        return [SaliencySample(stem, path, None) for stem, path in images.items()]
    masks = _files_by_stem(masks_dir, MASK_EXTENSIONS)
    if require_masks:
        no_mask = sorted(set(images) - set(masks))
        no_image = sorted(set(masks) - set(images))
        if no_mask:
            raise DataError(f"{masks_dir}: no mask <stem>.png for {len(no_mask)} image(s), e.g. {no_mask[:3]}")
        if no_image:
            raise DataError(f"{images_dir}: no image for {len(no_image)} mask(s), e.g. {no_image[:3]}")
    return [SaliencySample(stem, path, masks.get(stem)) for stem, path in images.items()]


def disjoint_split(items: Sequence, fractions: Sequence[float], seed: int = 0) -> list[list]:
    """Shuffle ``items`` with ``seed`` and cut them into ``len(fractions)`` disjoint parts.

    Fractions must be positive and sum to at most 1; each part gets ``round(fraction·N)`` items (at least one)
    and the last part also takes what rounding leaves when the fractions sum to 1.
    """
    if not fractions or any(f <= 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
        raise ValueError(f"fractions must be positive and sum to at most 1, got {list(fractions)}")
    order = list(items)
    random.Random(seed).shuffle(order)
    sizes = [max(1, round(f * len(order))) for f in fractions]
    if abs(sum(fractions) - 1) < 1e-9:
        sizes[-1] = len(order) - sum(sizes[:-1])
    if sum(sizes) > len(order) or min(sizes) < 1:
        raise ValueError(f"cannot split {len(order)} items into parts of {sizes}")
    parts, start = [], 0
    for size in sizes:
        parts.append(order[start : start + size])
        start += size
    return parts


def _open(path: Path, mode: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (OSError, UnidentifiedImageError) as error:
        raise DataError(f"{path}: cannot read image ({error})") from error


def load_square_images(paths: Sequence[Path], size: int, progress: bool = False) -> torch.Tensor:
    """(N, 3, size, size) uint8 RGB, each image resized to a square (as metaad's 256×256 preprocessing)."""
    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    for i, path in enumerate(tqdm(paths, desc="images", disable=not progress, leave=False)):
        image = _open(Path(path), "RGB").resize((size, size), Image.BILINEAR)
        out[i] = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    return out


def load_square_masks(paths: Sequence[Path], size: int, progress: bool = False) -> torch.Tensor:
    """(N, 1, size, size) uint8 masks in 0..255: binarised at 128, then resized with antialiasing (soft edges,
    like the boundary pixels of a downscaled effect photo)."""
    out = torch.empty(len(paths), 1, size, size, dtype=torch.uint8)
    for i, path in enumerate(tqdm(paths, desc="masks", disable=not progress, leave=False)):
        mask = _open(Path(path), "L")
        binary = Image.fromarray(((np.asarray(mask) >= 128) * 255).astype(np.uint8))
        out[i, 0] = torch.from_numpy(np.asarray(binary.resize((size, size), Image.BILINEAR)).copy())
    return out
