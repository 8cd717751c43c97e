"""Score images with a fitted run from Python: ``metaad.load_run(RUN).predict([...])``.

Any input a user has: image files, PIL images, numpy arrays, of any size, grayscale, RGB, RGBA or 16-bit,
decoded as the command line does. Each image is resized to the run's size for the model and its anomaly map
is resized back, so maps and predicted masks come at the image's own size and aspect. A run fitted with tiles
(``metaad fit --tile``) scores every image through the same tiles (:mod:`metaad.data.tiles`); for a run fitted
without, ``tile`` cuts a large image into tiles at its own resolution instead (for a model fitted on images at
the scale of the tiles), and the tiles' maps are blended.
Scoring itself is :class:`metaad.runs.scoring.Scorer`, the path evaluation takes too.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from metaad.data.datasets import DataError, open_image
from metaad.data.tiles import Tiling
from metaad.data.transforms import letterbox, pil_to_tensor
from metaad.deploy.regions import Region, find_regions, without_small_regions
from metaad.device import on_device
from metaad.models.persistence import load_model
from metaad.runs.layout import read_config, read_thresholds, run_image_size
from metaad.runs.scoring import Scorer

ImageInput = str | Path | Image.Image | np.ndarray


@dataclass
class ImageResult:
    """What a run says about one image. ``map`` and ``mask`` are (H, W) at the image's own size."""

    source: str  # the file, or "<PIL image 2>" / "<array 2>" by position in the input
    score: float  # the model's image score (NaN when ``error``)
    anomalous: bool | None  # score > the run's threshold; None without a threshold
    normalized_score: float | None  # the score mapped so that the threshold is 0.5, unclipped (Run.normalize)
    map: np.ndarray | None  # float32 anomaly map
    mask: np.ndarray | None  # bool predicted defect pixels (map > the run's pixel threshold)
    size: tuple[int, int]  # (width, height) of the image
    error: str | None = None  # why the image could not be scored
    regions: list[Region] | None = None  # connected regions of ``mask`` (None without a pixel threshold)


class Run:
    """A fitted run folder: its model, thresholds and image size. Build it with :func:`load_run`.

    A run that trained several categories as one (``metaad fit --category a,b,c``) holds a threshold per
    category: ``category`` picks one; without it, or for a category the run has none for, the run's global
    threshold decides and ``note`` says so."""

    def __init__(
        self, folder: str | Path, threshold: float | None = None, image_size: int | None = None, device: str = "cpu",
        category: str | None = None, min_region_area: int = 1,
    ) -> None:
        if min_region_area < 1:
            raise ValueError(f"min_region_area must be at least 1 pixel, got {min_region_area}")
        self.min_region_area = min_region_area
        self.folder = Path(folder)
        self.model = on_device(load_model(self.folder), device)
        self.config = read_config(self.folder)
        self.run_thresholds = read_thresholds(self.folder)
        self.threshold_override = threshold
        self.image_size = run_image_size(self.folder, image_size)
        self.tiling = Tiling.from_config(self.config.get("tiling"))  # the fit's tiles, used on every image
        self.resize = self.config.get("resize", "stretch")  # "pad": each image letterboxed, as the fit saw it
        self.scorer = Scorer(self.model, self.image_size, self.tiling)
        self._select(category)

    @property
    def categories(self) -> list[str]:
        """The categories with thresholds of their own (empty for a run of one category)."""
        return list(self.run_thresholds.get("categories", {}))

    def with_category(self, category: str | None) -> Run:
        """This run deciding with ``category``'s thresholds (the model is shared, not copied)."""
        view = copy.copy(self)
        view._select(category)
        return view

    def _select(self, category: str | None) -> None:
        own = self.run_thresholds.get("categories", {})
        self.category, self.note = category, None
        if category is not None and category in own:
            self.thresholds = own[category]
        else:
            self.thresholds = self.run_thresholds
            if own and category is None:
                self.note = (f"this run trained {len(own)} categories as one ({', '.join(own)}); no category was "
                             "named, so the global threshold decides (name one with --category)")
            elif own:
                self.note = (f"category {category!r} has no threshold of its own in this run (it has: "
                             f"{', '.join(own)}); the global threshold decides")
            elif category is not None:
                self.note = f"this run was fitted on one category; its threshold decides ({category!r} ignored)"
        override = self.threshold_override
        self.threshold: float | None = override if override is not None else self.thresholds.get("threshold")
        self.pixel_threshold: float | None = self.thresholds.get("pixel_threshold")

    def __repr__(self) -> str:
        return (
            f"Run({str(self.folder)!r}, model={self.config.get('model', type(self.model).__name__)!r}, "
            f"threshold={self.threshold}, image_size={self.image_size})"
        )

    def colour_scale(self) -> tuple[float, float] | None:
        """The heat maps' one colour scale: from the held-out good maps' 1st percentile to twice the distance
        to the pixel threshold (the threshold in the middle); None for a run without a pixel threshold."""
        from metaad.runs.rendering import map_scale

        if self.pixel_threshold is None or "map_low" not in self.thresholds:
            return None
        return map_scale(np.array([self.thresholds["map_low"]]), self.pixel_threshold)

    def normalize(self, score: float) -> float | None:
        """``score`` on a scale where the threshold is 0.5: linear, the lowest held-out good score at 0 and as
        far above the threshold at 1. Not clipped, so it keeps the order of the raw scores beyond both ends (a
        part far worse than the threshold scores above 1). None without a threshold."""
        if self.threshold is None:
            return None
        spread = self.threshold - self.thresholds.get("score_low", self.threshold)
        if not spread > 0:
            spread = abs(self.threshold) or 1.0
        return float(0.5 + 0.5 * (score - self.threshold) / spread)

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        tile: int | None = None,
        tile_overlap: float = 0.25,
        batch_size: int = 16,
        on_error: str = "raise",
    ) -> list[ImageResult]:
        """Score ``images`` (one or a list). ``on_error="report"`` returns a result with ``error`` set for an
        unreadable image instead of raising :class:`~metaad.data.datasets.DataError`. ``tile`` (a run fitted
        without tiles only): cut each image into overlapping ``tile`` px tiles at its own resolution."""
        if isinstance(images, str | Path | Image.Image | np.ndarray):
            images = [images]
        return list(self.iter_predict(images, tile, tile_overlap, batch_size, on_error))

    def iter_predict(
        self,
        images: Iterable[ImageInput],
        tile: int | None = None,
        tile_overlap: float = 0.25,
        batch_size: int = 16,
        on_error: str = "raise",
    ) -> Iterator[ImageResult]:
        """:meth:`predict` one batch at a time, for more images than fit in memory at once."""
        if on_error not in ("raise", "report"):
            raise ValueError(f"on_error must be 'raise' or 'report', got {on_error!r}")
        tiling = self._native_tiling(tile, tile_overlap)
        pending: list[tuple[str, Image.Image]] = []
        for index, item in enumerate(images):
            source = _describe(item, index)
            try:
                pending.append((source, to_pil(item, source)))
            except DataError as error:
                if on_error == "raise":
                    raise
                yield from self._predict_batch(pending, tiling, batch_size)
                pending = []
                yield ImageResult(source, math.nan, None, None, None, None, (0, 0), str(error))
                continue
            if len(pending) == batch_size or tiling is not None:
                yield from self._predict_batch(pending, tiling, batch_size)
                pending = []
        yield from self._predict_batch(pending, tiling, batch_size)

    def _native_tiling(self, tile: int | None, overlap: float) -> Tiling | None:
        """The tiling ``tile`` asks for at the images' own resolution (None: the run's way)."""
        if tile is None:
            return None
        if self.tiling is not None:
            raise ValueError(
                f"this run was fitted on {self.tiling.tile} px tiles of its {self.image_size} px images and scores "
                "every image through them; --tile is for runs fitted without tiles"
            )
        return Tiling(tile, overlap)

    def _predict_batch(
        self, pending: list[tuple[str, Image.Image]], tiling: Tiling | None, batch_size: int
    ) -> Iterator[ImageResult]:
        if not pending:
            return
        if tiling is not None:
            scorer = Scorer(self.model, self.image_size, batch_size=batch_size)
            for source, pil in pending:
                width, height = pil.size
                score, anomaly_map = scorer.predict_tiled(pil_to_tensor(pil, (height, width)), tiling)
                yield self._result(source, pil.size, score, anomaly_map)
            return
        sizes = [(pil.size[1], pil.size[0]) for _, pil in pending]
        if self.resize == "pad":
            boxed = [letterbox(pil, self.image_size) for _, pil in pending]
            batch, content = torch.stack([image for image, _ in boxed]), torch.tensor([box for _, box in boxed])
        else:
            batch, content = torch.stack([pil_to_tensor(pil, self.image_size) for _, pil in pending]), None
        scores, maps = self.scorer.predict_at_sizes(batch, sizes, content)
        for (source, pil), score, anomaly_map in zip(pending, scores, maps, strict=True):
            yield self._result(source, pil.size, score, anomaly_map)

    def _result(self, source: str, size: tuple[int, int], score: float, anomaly_map: np.ndarray) -> ImageResult:
        mask = None
        if self.pixel_threshold is not None:  # regions below the minimum area are not defects
            mask = without_small_regions(anomaly_map > self.pixel_threshold, self.min_region_area)
        regions = None if mask is None else find_regions(mask, anomaly_map)
        return ImageResult(
            source,
            score,
            None if self.threshold is None else bool(score > self.threshold),
            self.normalize(score),
            anomaly_map,
            mask,
            size,
            regions=regions,
        )


def load_run(
    folder: str | Path, threshold: float | None = None, image_size: int | None = None, device: str = "cpu",
    category: str | None = None, min_region_area: int = 1,
) -> Run:
    """Load a run folder written by ``metaad fit`` (``threshold`` overrides its calibrated one; ``device``:
    cpu, cuda or auto, where the model runs; ``category``: whose thresholds decide, in a unified run;
    ``min_region_area``: predicted defect regions smaller than this many pixels are dropped from the mask)."""
    return Run(folder, threshold, image_size, device, category, min_region_area)


def to_pil(item: Any, source: str = "image") -> Image.Image:
    """A PIL image from a file, a PIL image or a numpy array (HxW, HxWx1, HxWx3 or HxWx4; uint8, uint16,
    or float in [0, 1]). :class:`DataError` when it cannot be one."""
    if isinstance(item, str | Path):
        return open_image(item)
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, np.ndarray):
        return _array_to_pil(item, source)
    raise DataError(f"{source}: expected an image file path, a PIL image or a numpy array, got {type(item).__name__}")


def _array_to_pil(array: np.ndarray, source: str) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))) or min(array.shape[:2]) < 1:
        raise DataError(f"{source}: expected an HxW, HxWx3 or HxWx4 array, got shape {array.shape}")
    if array.dtype == np.uint16:
        if array.ndim == 2:
            return Image.fromarray(array)  # I;16, scaled to 8 bit as a 16-bit file is
        array = (array / 257.0).round().astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating) or array.dtype == bool:
        array = (np.clip(np.asarray(array, np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    elif array.dtype != np.uint8:
        raise DataError(f"{source}: expected a uint8, uint16 or float array, got {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(array))


def _describe(item: Any, index: int) -> str:
    if isinstance(item, str | Path):
        return str(item)
    kind = "PIL image" if isinstance(item, Image.Image) else "array" if isinstance(item, np.ndarray) else "input"
    return f"<{kind} {index}>"
