"""Anomaly-detection data sets: MVTec AD layout, Magnetic Tile Defects, and plain folders.

Every reader produces :class:`ImageRecord` lists; :class:`AnomalyDataset` turns records into samples
``{"image": (3,H,W) RGB in [0, 1], "mask": (1,H,W) {0,1}, "has_mask": bool, "label": 0|1, "defect": str,
"path": str}``; ``has_mask`` is False for a defective image whose mask is unknown (image labels only).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from metaad.data.transforms import (
    DEFAULT_IMAGE_SIZE,
    IMAGE_EXTENSIONS,
    RESIZES,
    letterbox,
    mask_to_tensor,
    pil_to_tensor,
)

GOOD = "good"


class DataError(ValueError):
    """A data set file or folder is missing, unreadable or inconsistent; the message names it."""


class DataWarning(UserWarning):
    """Something in the data was left out or cannot be used; the command line prints it as one line."""


@dataclass(frozen=True)
class ImageRecord:
    """One image of a data set: its file, label (0 good, 1 defective), defect type, mask file, and the category
    (product) it belongs to ("" where the data set has none)."""

    path: Path
    label: int
    defect: str = GOOD
    mask_path: Path | None = None
    category: str = ""


def seeded_split(items: Sequence, n_held_out: int, seed: int) -> tuple[list, list]:
    """(kept, held out): a seeded random ``n_held_out`` of ``items`` held out; both keep the input order."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_held_out])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Image files directly in ``folder`` (or anywhere below it with ``recursive``; extensions matched
    case-insensitively), sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found (expected a folder of images)")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in candidates if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def split_off_masks(images: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """(images, masks): leave out the files that are masks of other images in the same folder.

    A mask is ``NAME_mask.*`` beside an image ``NAME.*``, or ``NAME.png`` beside a photograph ``NAME.jpg``
    (or another non-PNG image), as in Magnetic Tile Defects' ``Imgs`` folders. Order is kept.
    """
    stems: dict[Path, dict[str, set[str]]] = {}
    for path in images:
        stems.setdefault(path.parent, {}).setdefault(path.stem, set()).add(path.suffix.lower())
    kept, masks = [], []
    for path in images:
        siblings = stems[path.parent]
        beside_photo = path.suffix.lower() == ".png" and bool(siblings[path.stem] - {".png"})
        mask_named = path.stem.endswith("_mask") and path.stem.removesuffix("_mask") in siblings
        (masks if beside_photo or mask_named else kept).append(path)
    return kept, masks


def _require_images(folder: Path) -> list[Path]:
    images = list_images(folder)
    if not images:
        raise DataError(f"{folder}: no images found (expected files ending in {', '.join(IMAGE_EXTENSIONS)})")
    return images


def _find_mask(folder: Path, stem: str, suffixes: Sequence[str], exclude: Path | None = None) -> Path | None:
    """The first image file ``<stem><suffix>.<ext>`` in ``folder`` (PNG preferred), other than ``exclude``."""
    if not folder.is_dir():
        return None
    for suffix in suffixes:
        candidates = [
            p
            for p in folder.glob(f"{stem}{suffix}.*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.stem == f"{stem}{suffix}" and p != exclude
        ]
        if candidates:
            return min(candidates, key=lambda p: (p.suffix.lower() != ".png", p.name))
    return None


# ----------------------------------------------------------------------------------------------- MVTec AD
def mvtec_categories(root: str | Path) -> list[str]:
    """Category folders of an MVTec-AD-layout root (those with a ``train/good`` folder)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data root not found")
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and (p / "train" / GOOD).is_dir())


def mvtec_records(root: str | Path, category: str, split: str) -> list[ImageRecord]:
    """Records of ``<root>/<category>/{train,test}`` in MVTec AD layout.

    ``train/good/*`` are the training images; ``test/<defect>/*`` the test images, each defective one with
    its mask ``ground_truth/<defect>/<stem>_mask.<ext>`` (any image extension). A category without a
    ``ground_truth`` folder has image labels only: its defective records have no mask (pixel metrics are then
    skipped); when the folder exists, every defective image needs its mask.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    base = Path(root) / category
    if not base.is_dir():
        known = ", ".join(mvtec_categories(root)) if Path(root).is_dir() else "none (root missing)"
        raise DataError(f"{base}: category folder not found; categories under {root}: {known}")
    if split == "train":
        return [ImageRecord(p, 0, category=category) for p in _require_images(base / "train" / GOOD)]
    test_dir = base / "test"
    if not test_dir.is_dir():
        raise DataError(f"{test_dir}: test folder not found (expected test/good and test/<defect> folders)")
    records: list[ImageRecord] = []
    labels_only = not (base / "ground_truth").is_dir()
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        images = list_images(defect_dir)
        if defect_dir.name == GOOD:
            records += [ImageRecord(p, 0, category=category) for p in images]
            continue
        if labels_only:
            records += [ImageRecord(p, 1, defect_dir.name, category=category) for p in images]
            continue
        mask_dir = base / "ground_truth" / defect_dir.name
        for image in images:
            mask = _find_mask(mask_dir, image.stem, ("_mask", ""))
            if mask is None:
                raise DataError(
                    f"{image}: defective test image has no mask; expected {mask_dir / (image.stem + '_mask.png')} "
                    "(any image extension; without a ground_truth folder at all, only image metrics are computed)"
                )
            records.append(ImageRecord(image, 1, defect_dir.name, mask, category))
    if not records:
        raise DataError(f"{test_dir}: no test images found")
    return records


# ---------------------------------------------------------------------------------- Magnetic Tile Defects
def mtd_records(root: str | Path, split: str, seed: int = 0, test_fraction: float = 0.2) -> list[ImageRecord]:
    """Magnetic Tile Defects (Huang et al. 2018) in its original layout ``MT_*/Imgs/NAME.jpg`` + ``NAME.png``.

    The papers' protocol (Metaformer §4.1, multi-scale patch §4): a seeded random ``test_fraction`` of the
    defect-free ``MT_Free`` images plus all defective images form the test split, the rest of ``MT_Free``
    the training split.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    root = Path(root)
    free = _mtd_images(root / "MT_Free" / "Imgs")
    train, held_out = seeded_split(free, round(len(free) * test_fraction), seed)
    if split == "train":
        return [ImageRecord(p, 0) for p in train]
    records = [ImageRecord(p, 0) for p in held_out]
    defect_dirs = sorted(p for p in root.glob("MT_*") if p.is_dir() and p.name != "MT_Free")
    if not defect_dirs:
        raise DataError(f"{root}: no defect folders MT_<type>/Imgs found")
    for defect_dir in defect_dirs:
        for image in _mtd_images(defect_dir / "Imgs"):
            mask = _find_mask(image.parent, image.stem, ("",), exclude=image)
            if mask is None:
                raise DataError(f"{image}: defective image has no mask; expected {image.with_suffix('.png')}")
            records.append(ImageRecord(image, 1, defect_dir.name.removeprefix("MT_").lower(), mask))
    return records


def _mtd_images(folder: Path) -> list[Path]:
    """The photographs of an MTD ``Imgs`` folder: JPEGs (the PNGs beside them are masks)."""
    images = [p for p in list_images(folder) if p.suffix.lower() in (".jpg", ".jpeg")]
    if not images:
        raise DataError(f"{folder}: no images found (expected NAME.jpg with masks NAME.png)")
    return images


# -------------------------------------------------------------------------------------------- plain folders
def folder_records(
    normal_dir: str | Path,
    split: str,
    abnormal_dir: str | Path | None = None,
    mask_dir: str | Path | None = None,
    normal_test_dir: str | Path | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> list[ImageRecord]:
    """A data set from plain folders: defect-free images, defective images, optional masks.

    Without ``normal_test_dir`` a seeded ``test_fraction`` of ``normal_dir`` is held out for testing.
    Masks in ``mask_dir`` are matched to defective images by stem (``NAME.*`` or ``NAME_mask.*``);
    with a ``mask_dir``, every defective image needs one.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    normal = _require_images(Path(normal_dir))
    if normal_test_dir is None:
        train, normal_test = seeded_split(normal, round(len(normal) * test_fraction), seed)
    else:
        train, normal_test = normal, _require_images(Path(normal_test_dir))
    if split == "train":
        return [ImageRecord(p, 0) for p in train]
    records = [ImageRecord(p, 0) for p in normal_test]
    if abnormal_dir is not None:
        for image in _require_images(Path(abnormal_dir)):
            mask = None
            if mask_dir is not None:
                mask = _find_mask(Path(mask_dir), image.stem, ("_mask", ""))
                if mask is None:
                    raise DataError(f"{image}: no mask named {image.stem}.* or {image.stem}_mask.* in {mask_dir}")
            records.append(ImageRecord(image, 1, "abnormal", mask))
    return records


# ----------------------------------------------------------------------------------------------- samples
class AnomalyDataset(Dataset):
    """Loads records as tensors: RGB in [0, 1] resized to ``image_size`` (the contract's input), binary masks.

    ``on_error="raise"`` (default): any unreadable image or bad mask raises :class:`DataError` naming the file.
    ``on_error="skip"``: every file is checked up front; bad ones are dropped with one warning that counts
    them (``skipped`` lists them).

    ``resize="pad"`` keeps each image's aspect (:func:`metaad.data.transforms.letterbox`): the sample's
    ``"content"`` says where the image lies in the square, (top, left, height, width), and its mask stays
    stretched to the square, the grid every map is evaluated on (``metaad.runs.scoring.Scorer`` brings a
    letterboxed map back to it), so that both resizes are measured on the same pixels.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        image_size: int = DEFAULT_IMAGE_SIZE,
        on_error: str = "raise",
        resize: str = "stretch",
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if resize not in RESIZES:
            raise ValueError(f"resize must be one of {', '.join(RESIZES)}, got {resize!r}")
        self.resize = resize
        if not records:
            raise DataError("no images: the data set is empty")
        self.image_size = image_size
        self.on_error = on_error
        self.skipped: list[tuple[Path, str]] = []
        if on_error == "skip":
            kept = []
            for record in records:
                try:
                    self._load(record)
                    kept.append(record)
                except DataError as error:
                    self.skipped.append((record.path, str(error)))
            if self.skipped:
                warnings.warn(
                    f"skipped {len(self.skipped)} of {len(records)} images that could not be used "
                    f"(first: {self.skipped[0][1]})",
                    DataWarning,
                    stacklevel=2,
                )
            if not kept:
                raise DataError("no usable images: every file was skipped")
            records = kept
        else:
            for record in records:
                _check_mask_header(record)
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        image, mask, content = self._load(record)
        return {
            "image": image,
            "content": torch.tensor(content),
            "mask": mask,
            "has_mask": record.label == 0 or record.mask_path is not None,
            "label": record.label,
            "defect": record.defect,
            "path": str(record.path),
            "category": record.category,
        }

    @property
    def labels(self) -> list[int]:
        return [r.label for r in self.records]

    def _load(self, record: ImageRecord) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int, int]]:
        pil = _open_image(record.path)
        if self.resize == "pad":
            image, content = letterbox(pil, self.image_size)
        else:
            image, content = pil_to_tensor(pil, self.image_size), (0, 0, self.image_size, self.image_size)
        if record.mask_path is None:
            mask = torch.zeros(1, self.image_size, self.image_size)
        else:
            pil_mask = _open_image(record.mask_path)
            if pil_mask.size != pil.size:
                raise DataError(
                    f"{record.mask_path}: mask is {pil_mask.size[0]}x{pil_mask.size[1]} but its image "
                    f"{record.path} is {pil.size[0]}x{pil.size[1]}; expected the same size"
                )
            mask = mask_to_tensor(pil_mask, self.image_size)
        return image, mask, content


def open_image(path: str | Path) -> Image.Image:
    """Decode an image file fully (a palette image becomes RGB); :class:`DataError` names a bad file."""
    return _open_image(Path(path))


def _open_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as handle:
            handle.load()
            return handle.copy() if handle.mode != "P" else handle.convert("RGB")
    except FileNotFoundError as error:
        raise DataError(f"{path}: file not found") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{path}: unreadable or truncated image ({error})") from error


def _check_mask_header(record: ImageRecord) -> None:
    """Cheap check (headers only) that a mask has its image's size."""
    if record.mask_path is None:
        return
    try:
        with Image.open(record.path) as image, Image.open(record.mask_path) as mask:
            image_size, mask_size = image.size, mask.size
    except FileNotFoundError as error:
        raise DataError(f"{error.filename}: file not found") from error
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"{record.path} or its mask {record.mask_path}: unreadable image ({error})") from error
    if image_size != mask_size:
        raise DataError(
            f"{record.mask_path}: mask is {mask_size[0]}x{mask_size[1]} but its image {record.path} is "
            f"{image_size[0]}x{image_size[1]}; expected the same size"
        )
