"""Which images a run uses: the data source (MVTec layout, Magnetic Tile Defects, a folder), its splits, the
held-out calibration images and the k-shot draw, decided here once; and the image files named on a command line.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from metaad.data.datasets import (
    DataError,
    ImageRecord,
    folder_records,
    list_images,
    mtd_records,
    mvtec_categories,
    mvtec_records,
    seeded_split,
    split_off_masks,
)
from metaad.data.transforms import IMAGE_EXTENSIONS


@dataclass
class DataSpec:
    """Where the data is: ``format`` is "mvtec" (root + category), "mtd" (root) or "folder".

    ``category`` names one category folder of an MVTec-layout root, or several, comma-separated, or "all"
    (every category folder under the root): the unified protocol, one model trained on the union of their
    defect-free images (UniAD's setting), each category keeping its own held-out images and thresholds.
    """

    root: str
    format: str = "auto"
    category: str | None = None
    abnormal_dir: str | None = None
    mask_dir: str | None = None
    seed: int = 0

    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        root = Path(self.root)
        if (root / "MT_Free").is_dir():
            return "mtd"
        if self.category is not None or mvtec_categories(root):
            return "mvtec"
        return "folder"

    def categories(self) -> list[str]:
        """The categories ``category`` names (one for the separate protocol; several for the unified one)."""
        if self.category is None:
            raise DataError(
                f"{self.root}: MVTec-layout data needs --category (one, a,b,c, or all); found: "
                f"{', '.join(mvtec_categories(self.root))}"
            )
        if self.category.strip() == "all":
            found = mvtec_categories(self.root)
            if not found:
                raise DataError(f"{self.root}: --category all, but no category folder (NAME/train/good) is there")
            return found
        names = [name.strip() for name in self.category.split(",")]
        if not all(names):
            raise DataError(f"--category {self.category!r}: an empty name (expected NAME or A,B,C or all)")
        if len(set(names)) != len(names):
            raise DataError(f"--category {self.category!r}: a category is named twice")
        return names

    @property
    def unified(self) -> bool:
        """Whether several categories are trained as one (the unified protocol)."""
        return self.resolved_format() == "mvtec" and self.category is not None and (
            self.category.strip() == "all" or "," in self.category
        )

    def records(self, split: str) -> list[ImageRecord]:
        fmt = self.resolved_format()
        if fmt == "mtd":
            return mtd_records(self.root, split, seed=self.seed)
        if fmt == "mvtec":
            return [record for name in self.categories() for record in mvtec_records(self.root, name, split)]
        if fmt == "folder":
            return folder_records(self.root, split, self.abnormal_dir, self.mask_dir, seed=self.seed)
        raise ValueError(f"unknown data format {fmt!r}: expected auto, mvtec, mtd or folder")


@dataclass
class RunSplit:
    """The images of one run: fitted on, held out to set the thresholds, and evaluated on."""

    fit: list[ImageRecord]
    calibration: list[ImageRecord]
    test: list[ImageRecord]


def run_split(
    data: DataSpec, calibration_fraction: float, shots: int | None = None, shots_seed: int | None = None
) -> RunSplit:
    """The training split minus a seeded ``calibration_fraction`` held out for the thresholds, then the
    k-shot draw (``shots`` images, seeded by ``shots_seed``, default the split's seed). Under the unified
    protocol both happen per category (each category holds out its share and draws its k images). A test
    split without defective images (a folder of good images only) has nothing to evaluate: its images join
    the held-out ones."""
    fit, calibration = [], []
    for group in _by_category(data.records("train")):
        kept, held = split_calibration(group, calibration_fraction, data.seed)
        fit += select_shots(kept, shots, data.seed if shots_seed is None else shots_seed)
        calibration += held
    test = data.records("test")
    if calibration and not any(record.label for record in test):
        calibration = calibration + test
    return RunSplit(fit, calibration, test)


def _by_category(records: list[ImageRecord]) -> list[list[ImageRecord]]:
    """The records grouped by category, in order of first appearance (one group without categories)."""
    groups: dict[str, list[ImageRecord]] = {}
    for record in records:
        groups.setdefault(record.category, []).append(record)
    return list(groups.values())


def split_calibration(records: list[ImageRecord], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a seeded ``fraction`` of the defect-free training images to set the threshold."""
    if fraction <= 0:
        return list(records), []
    n_held = max(1, round(len(records) * fraction)) if len(records) > 1 else 0
    return seeded_split(records, n_held, seed)


def select_shots(records: list[ImageRecord], shots: int | None, seed: int) -> list[ImageRecord]:
    """The k-shot protocol: a seeded random subset of k defect-free training images (all when None)."""
    if shots is None or shots >= len(records):
        return list(records)
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    return random.Random(seed).sample(list(records), shots)


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[Path], list[Path]]:
    """(images, masks left out, other files left out): the named files, and the images below the named folders
    except the masks of other images beside them (see :func:`metaad.data.datasets.split_off_masks`); the
    files below the folders that are not images (by extension) are the third list."""
    files: list[Path] = []
    masks: list[Path] = []
    others: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():  # every image below it, sub-folders included (e.g. an MVTec test/ folder)
            images, left_out = split_off_masks(list_images(path, recursive=True))
            files += images
            masks += left_out
            others += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() not in IMAGE_EXTENSIONS
                             and not p.name.startswith("."))
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise ValueError(f"{path}: not an image file (expected {', '.join(IMAGE_EXTENSIONS)})")
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    if not files:
        raise ValueError(f"no images found in {', '.join(inputs)}")
    return files, masks, others
