"""Tiling: a high-resolution image seen as overlapping tiles, each at the model's own working size, so that a
defect of a few pixels is not lost when the image is shrunk to the model's input.

One option of a run (``metaad fit --tile SIZE``, recorded in ``config.json`` as ``"tiling"``): the images are
loaded at the run's ``image_size`` L (a square, like every run's), cut into ``tile`` x ``tile`` crops of that
L-pixel image overlapping by ``overlap``, and the model trains on the crops (:class:`TiledDataset`). Scoring cuts
every image the same way (``metaad.runs.scoring.Scorer``), averages the tiles' maps where they overlap and takes
the highest tile score as the image's score; ``test``, ``predict``, ``export`` and ``serve`` read the tiling from
the run, so every command sees an image exactly as the fit did.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

MIN_TILE = 8  # pixels
# without --image-size, a tiled run loads images at their median long side, up to this many pixels: the
# evaluation keeps one float32 map of L x L per test image (4 MB at 1024 px)
MAX_TILED_IMAGE_SIZE = 1024


@dataclass(frozen=True)
class Tiling:
    """``tile`` x ``tile`` crops (pixels of the image as it is tiled) overlapping by at least ``overlap`` (a share
    of the tile, in [0, 1))."""

    tile: int
    overlap: float = 0.25

    def __post_init__(self) -> None:
        if isinstance(self.tile, bool) or not isinstance(self.tile, int) or self.tile < MIN_TILE:
            raise ValueError(f"tile must be an integer of at least {MIN_TILE} pixels, got {self.tile!r}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"tile_overlap must be in [0, 1), got {self.overlap}")

    def boxes(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """(top, left, tile height, tile width) of every tile of an image of ``height`` x ``width``: rows then
        columns; a side shorter than the tile is one tile of that side."""
        tile_h, tile_w = min(self.tile, height), min(self.tile, width)
        return [(y, x, tile_h, tile_w) for y in tile_starts(height, tile_h, self.overlap)
                for x in tile_starts(width, tile_w, self.overlap)]

    def to_config(self) -> dict[str, Any]:
        return {"tile": self.tile, "overlap": self.overlap}

    @classmethod
    def from_config(cls, record: dict[str, Any] | None) -> Tiling | None:
        """The tiling a run's ``config.json`` records under ``"tiling"`` (None for a run without tiles)."""
        if not record:
            return None
        return cls(int(record["tile"]), float(record.get("overlap", 0.25)))


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``length``, overlapping by at least ``overlap``, the
    first at 0 and the last at the end."""
    if tile >= length:
        return [0]
    step = max(1, int(tile * (1.0 - overlap)))
    n = math.ceil((length - tile) / step) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def tiled_image_size(paths: Sequence[str | Path], tiling: Tiling) -> int:
    """The side a tiled run loads its images at when none is given: the training images' median long side
    (read from the files' headers), at least one tile and at most :data:`MAX_TILED_IMAGE_SIZE`."""
    sides = []
    for path in paths:
        with Image.open(path) as image:
            sides.append(max(image.size))
    sides.sort()
    median = sides[len(sides) // 2] if sides else tiling.tile
    return int(min(max(median, tiling.tile), MAX_TILED_IMAGE_SIZE))


class TiledDataset:
    """The tiles of every sample of a square-image ``dataset`` (metaad samples: dicts with ``"image"`` (3, L, L) and
    ``"mask"`` (1, L, L)), image by image, each tile a sample of its own with the image's other entries.

    Tiles of one image follow each other, and the last decoded image is kept, so reading in order decodes each
    image once. A map-style data set for torch's ``DataLoader``; this module imports no torch, so that the
    command line checks a tiling before torch loads."""

    def __init__(self, dataset: Any, tiling: Tiling, image_size: int) -> None:
        self.dataset, self.tiling = dataset, tiling
        self.tile_boxes = tiling.boxes(image_size, image_size)
        self.image_size = image_size
        self._last: tuple[int, dict] | None = None

    def __len__(self) -> int:
        return len(self.dataset) * len(self.tile_boxes)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"tile {index} of {len(self)}")
        image_index, box = divmod(index, len(self.tile_boxes))
        if self._last is None or self._last[0] != image_index:
            self._last = (image_index, self.dataset[image_index])
        sample = self._last[1]
        y, x, h, w = self.tile_boxes[box]
        tile = dict(sample)
        tile["image"] = sample["image"][:, y : y + h, x : x + w]
        tile["mask"] = sample["mask"][:, y : y + h, x : x + w]
        return tile
