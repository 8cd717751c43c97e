"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

The pipeline, top to bottom: frozen backbone -> locally aware patch features (p x p neighbourhood average of
two mid-level stages, the deeper one upsampled, concatenated; §3.1, p = 3) -> greedy k-center coreset of all
training patches after a random projection (§3.2) -> memory bank -> nearest-neighbour patch scores ->
re-weighted image score (eq. 7) and an anomaly map upsampled to the input and smoothed with a Gaussian of
sigma 4 (§3.3).

Nearest-neighbour search uses faiss. ``search="exact"`` is a flat L2 index; ``search="ivf"`` (default) an
inverted-file index over the memory bank whose coarse centroids are learned at fit time and stored with
the model, so a loaded model searches exactly as the fitted one did. Banks smaller than
``ivf_min_bank`` are always searched exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from metaad.backbones import Backbone
from metaad.components.coreset import greedy_coreset, random_projection
from metaad.components.estimator import predict_in_batches
from metaad.components.knn import NearestNeighbours, SearchCache, exact_search, search_centroids
from metaad.components.preprocess import Preprocess
from metaad.components.smoothing import gaussian_blur
from metaad.data.batches import iter_image_batches
from metaad.types import AnomalyPrediction, NotFittedError, TrainData, device_of

Search = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]  # (queries, k) -> distances, indices


def reweighted_score(
    patch_scores: torch.Tensor, queries: torch.Tensor, nn_index: torch.Tensor, memory_bank: torch.Tensor,
    num_neighbors: int, search: Search,
) -> torch.Tensor:
    """Eq. 7: s = (1 - exp||m_test - m*|| / sum_{m in N_b(m*)} exp||m_test - m||) * s*, per image.

    ``patch_scores`` (B, N) and ``nn_index`` (B, N) are each patch's distance to its nearest bank entry and that
    entry's row, ``queries`` (B, N, C) the patches; ``search(m*, b)`` finds N_b(m*), which contains m* itself.
    """
    worst = patch_scores.argmax(dim=1, keepdim=True)  # (B, 1)
    max_scores = patch_scores.gather(1, worst)[:, 0]
    if num_neighbors <= 1:
        return max_scores
    m_test = queries.gather(1, worst[..., None].expand(-1, 1, queries.shape[-1]))[:, 0]  # (B, C)
    m_star = memory_bank[nn_index.gather(1, worst)[:, 0]]  # (B, C)
    _, neighbours = search(m_star.contiguous(), min(num_neighbors, memory_bank.shape[0]))
    distances = torch.linalg.vector_norm(memory_bank[neighbours] - m_test[:, None], dim=-1)
    weight = 1.0 - torch.softmax(distances.double(), dim=1)[:, 0].float()
    return weight * max_scores


class PatchCore(nn.Module):
    """PatchCore anomaly detector; defaults are the paper's settings with metaad's offline backbone.

    Args:
        backbone: timm architecture of the frozen feature extractor.
        layers: two mid-level stages (the paper's WideResNet-50 layer 2 and 3; stride 8 and 16).
        weights: backbone weights (None = offline ImageNet package; a path; or "hub").
        image_size: side of the square the images are resized to before the backbone (the papers' 256 px); the
            anomaly map comes back at the input's size. metaad's data pipeline loads photographs at this size
            when it is larger than 256 px, so a photograph is resized once (``metaad.runs.fit.loading_size``).
            None: as given. 320 px localised better on Magnetic Tile Defects but detected worse, at 1.3 times
            the time, so it is an option, not the default (``benchmarks/NOTES.md``).
        standardize_images: "auto" (default), "always" or "never": exposure standardisation before the backbone
            (``metaad.components.preprocess.Preprocess``; "auto" decides at fit from the training images'
            exposure variation). A metaad addition, not in the paper: it raised the validation AUROC on Magnetic
            Tile Defects, whose shots vary in exposure, and lowered it on metaad's evenly lit synthetic categories,
            hence "auto" (``benchmarks/patchcore_validation.py``, ``benchmarks/patchcore_synthetic.py``, figures
            in ``benchmarks/NOTES.md``; no test image read).
        patch_size: neighbourhood aggregated around each patch (§3.1: p = 3). ``patch_size=1`` (no averaging)
            localises thin synthetic defects better but did not detect them better once broad, low-contrast
            shading defects were part of the validation, so the paper's p = 3 stays the default
            (``benchmarks/NOTES.md``).
        aggregation: how the neighbourhood is aggregated: "mean" (the paper's adaptive average pooling, eq. 2)
            or "unfold" (the p×p neighbours' features concatenated, keeping their layout, as the reference
            code's unfold does before its dimension pooling; p² times wider features).
        border_padding: pixels of reflected image added on every side before the backbone and cropped from
            the features after aggregation, so that border patches see mirrored image content instead of the
            backbone's zero padding. A metaad addition, not in the paper (``border_padding=0`` is the paper's
            pipeline): zero-padded corners were the worst false alarms on defect-free tiles, and 32 px gave
            the best validation AUROC with no test image read (``benchmarks/patchcore_validation.py``).
            Must be a multiple of the deepest stride.
        coreset_ratio: fraction of training patches kept in the memory bank (§4.2: 10%).
        projection_dim: random-projection size used for coreset selection (§3.2, reference: 128).
        coreset_shard_size: points per independently selected part of the greedy coreset (see coreset.py).
        num_neighbors: b of eq. 7, the neighbourhood of m* used for re-weighting the image score.
        image_score: "patch" (the paper: the re-weighted largest patch score, eq. 7) or "map" (the maximum of
            the smoothed anomaly map, which pools the evidence of neighbouring patches).
        blur_sigma: Gaussian smoothing of the upsampled anomaly map (§3.3: sigma = 4).
        search: "ivf" (approximate, default) or "exact" nearest-neighbour search.
        nprobe: inverted lists visited per query with ``search="ivf"``.
        ivf_min_bank: banks smaller than this are searched exactly.
        batch_size: images per backbone pass (small batches stay in CPU cache: 4 is fastest on 2 cores).
        out_of_fold_folds: how :meth:`out_of_fold` scores the fitted images. 0 (default): each by the fitted
            bank without its own entries (one pass). K >= 2: the images are dealt into K seeded folds, each
            scored by a bank built, as ``fit`` builds one, from the other folds' images alone (K coreset
            builds). On Magnetic Tile Defects' training images K = 5 scored higher than unseen images (its banks
            come from 80% of the images) and the exclusion did not (``benchmarks/NOTES.md``), hence 0.
        seed: seeds the projection, the coreset start points, the IVF centroids and the out-of-fold folds.

    The defaults are the paper's settings except ``standardize_images`` and ``border_padding`` (see above).
    Presets: ``"paper"`` (the MIAD paper's A.2.2 setting: 224×224 inputs and neither addition; its
    WideResNet-50 needs ``backbone="wide_resnet50_2", weights=PATH``) and ``"cpu"`` (a 1% coreset, for quick
    runs on 2 cores).
    """

    PRESETS: ClassVar[dict[str, dict]] = {
        "paper": {"image_size": 224, "standardize_images": "never", "border_padding": 0},
        "cpu": {"coreset_ratio": 0.01},
        "tiny": {"image_size": 64, "border_padding": 0, "search": "exact", "batch_size": 4},
    }
    # what a model saved by an older metaad lacks (see metaad.types): parameters it was fitted as if it had
    SAVED_WITHOUT: ClassVar[dict[str, object]] = {"image_size": None, "border_padding": 0}

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0", layers: tuple[int, ...] = (2, 3), weights: str | None = None,
        image_size: int | None = 256, standardize_images: str = "auto",
        patch_size: int = 3, aggregation: str = "mean", border_padding: int = 32,
        coreset_ratio: float = 0.1, projection_dim: int = 128, coreset_shard_size: int = 4096,
        num_neighbors: int = 9, image_score: str = "patch", blur_sigma: float = 4.0,
        search: str = "ivf", nprobe: int = 16, ivf_min_bank: int = 20000,
        batch_size: int = 4, out_of_fold_folds: int = 0, seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < coreset_ratio <= 1.0:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        if image_score not in ("patch", "map"):
            raise ValueError(f"image_score must be 'patch' or 'map', got {image_score!r}")
        if aggregation not in ("mean", "unfold"):
            raise ValueError(f"aggregation must be 'mean' or 'unfold', got {aggregation!r}")
        if search not in ("ivf", "exact"):
            raise ValueError(f"search must be 'ivf' or 'exact', got {search!r}")
        if out_of_fold_folds == 1 or out_of_fold_folds < 0:
            raise ValueError(f"out_of_fold_folds must be 0 or at least 2, got {out_of_fold_folds}")
        self.backbone, self.layers, self.weights = backbone, tuple(layers), weights
        self.image_size, self.standardize_images = image_size, standardize_images
        self.patch_size, self.aggregation, self.border_padding = patch_size, aggregation, border_padding
        self.coreset_ratio, self.projection_dim = coreset_ratio, projection_dim
        self.coreset_shard_size = coreset_shard_size
        self.num_neighbors, self.image_score, self.blur_sigma = num_neighbors, image_score, blur_sigma
        self.search, self.nprobe, self.ivf_min_bank = search, nprobe, ivf_min_bank
        self.batch_size, self.out_of_fold_folds, self.seed = batch_size, out_of_fold_folds, seed
        if image_size is not None and (not isinstance(image_size, int) or image_size < 32):
            raise ValueError(f"image_size must be None or an integer of at least 32 pixels, got {image_size!r}")
        self.feature_extractor = Backbone(backbone, self.layers)
        self.preprocess = Preprocess(image_size, standardize_images, self.feature_extractor.normalization)
        deepest = max(self.feature_extractor.reductions)
        if border_padding < 0 or border_padding % deepest:
            raise ValueError(
                f"border_padding must be a non-negative multiple of the deepest stride {deepest}, "
                f"got {border_padding}"
            )
        width = sum(self.feature_extractor.channels) * (patch_size**2 if aggregation == "unfold" else 1)
        self.register_buffer("memory_bank", torch.empty(0, width))
        self.register_buffer("ivf_centroids", torch.empty(0, width))
        self._indexes = SearchCache()
        self._fitted_images: int | None = None  # how many images the last fit saw, for out_of_fold (not saved)
        self._bank_sources: np.ndarray | None = None  # which of them each bank entry came from (not saved)

    def fit_summary(self) -> dict:
        """What the last fit decided from the data (written to a run's ``metrics.json`` as ``fitted``)."""
        return {"memory_bank_size": int(self.memory_bank.shape[0]), **self.preprocess.fit_summary()}

    # ------------------------------------------------------------------------------------------ features
    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features (B, C, h, w) at the resolution of the first chosen stage (§3.1)."""
        images = self.preprocess(images)
        border = self.border_padding
        if border:
            if border >= min(images.shape[-2:]):
                raise ValueError(f"border_padding {border} must be smaller than the image size {images.shape[-2:]}")
            images = F.pad(images, (border,) * 4, mode="reflect")
        maps = self.feature_extractor(images)
        size = maps[0].shape[-2:]
        pad = self.patch_size // 2
        pooled = []
        for feature in maps:
            if self.aggregation == "unfold":
                b, c, h, w = feature.shape
                feature = F.unfold(feature, self.patch_size, padding=pad).view(b, c * self.patch_size**2, h, w)
            else:
                feature = F.avg_pool2d(feature, self.patch_size, stride=1, padding=pad, count_include_pad=False)
            if feature.shape[-2:] != size:
                feature = F.interpolate(feature, size=size, mode="bilinear", align_corners=False)
            pooled.append(feature)
        features = torch.cat(pooled, dim=1)
        if border:
            cells = border // min(self.feature_extractor.reductions)
            features = features[..., cells:-cells, cells:-cells]
        return features

    # ----------------------------------------------------------------------------------------------- fit
    def fit(self, train: TrainData, *, progress: bool = False, workdir: str | Path | None = None,
            resume: bool = False) -> PatchCore:
        """Build the memory bank from defect-free images in [0, 1]: all patch features -> greedy coreset (§3.2).

        One pass, no checkpoints: ``workdir`` and ``resume`` are accepted for the contract and unused."""
        self.feature_extractor.load_weights(self.weights)
        if self.standardize_images == "auto" and not hasattr(train, "__len__"):  # a one-shot iterator: keep its
            train = list(iter_image_batches(train, self.batch_size))  # batches for the second pass
        self.preprocess.measure(iter_image_batches(train, self.batch_size))
        grids = self._patch_grids(train, progress)
        if not grids:
            raise ValueError("fit needs at least one training image")
        sources = np.repeat(np.arange(len(grids)), [g.shape[-2] * g.shape[-1] for g, _ in grids])
        features, self._fitted_images = _rows([g for g, _ in grids]), len(grids)
        del grids
        self.memory_bank, keep, self.ivf_centroids = self._build_bank(features)
        self._bank_sources = sources if keep is None else sources[keep.cpu().numpy()]
        return self

    def _patch_grids(self, train: TrainData, progress: bool = False, limit: int | None = None
                     ) -> list[tuple[torch.Tensor, torch.Size]]:
        """Each image's patch features (C, h, w) and its size, embedded ``batch_size`` images at a time;
        more than ``limit`` images is an error as soon as it is seen."""
        if isinstance(train, torch.Tensor):
            total = math.ceil(len(train) / self.batch_size)
        else:
            total = len(train) if hasattr(train, "__len__") else None  # a DataLoader: its number of batches
        grids, device = [], device_of(self)
        batches = tqdm(iter_image_batches(train, self.batch_size), desc="PatchCore features", total=total,
                       disable=not progress, unit="batch")
        for images in batches:
            for part in images.split(self.batch_size):
                if limit is not None and len(grids) + len(part) > limit:
                    raise ValueError(f"out_of_fold got more images than the {limit} the bank was built from")
                grids.extend((patches, part.shape[-2:]) for patches in self.embed(part.to(device)))
        return grids

    def _build_bank(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The memory bank of patch features (P, C): their greedy coreset after a random projection (§3.2), the
        rows it kept (None: all) and the bank's IVF centroids."""
        n_select = max(1, round(features.shape[0] * self.coreset_ratio))
        keep = None
        if n_select < features.shape[0]:
            projected = random_projection(features, self.projection_dim, self.seed)
            shards = max(1, math.ceil(features.shape[0] / self.coreset_shard_size))
            keep = greedy_coreset(projected, n_select, shards=shards, seed=self.seed)
            features = features[keep]
        bank = features.contiguous()
        centroids = search_centroids(bank, exact=self.search == "exact", min_bank=self.ivf_min_bank, seed=self.seed)
        return bank, keep, centroids

    def folds(self, n_images: int) -> np.ndarray:
        """The out-of-fold fold (0 .. K-1) of each of ``n_images`` fitted images: a seeded shuffle dealt into
        K = min(``out_of_fold_folds``, n_images) folds whose sizes differ by at most one."""
        k = min(self.out_of_fold_folds, n_images)
        if k < 2:
            raise ValueError(f"folds need out_of_fold_folds >= 2 and at least 2 images, got {k} folds")
        order = torch.randperm(n_images, generator=torch.Generator().manual_seed(self.seed)).numpy()
        folds = np.empty(n_images, dtype=np.int64)
        folds[order] = np.arange(n_images) % k
        return folds

    def out_of_fold(self, train: TrainData) -> AnomalyPrediction:
        """Scores (N,) and maps (N, H, W) of the N training images just fitted, each scored as if it had been
        held out: what a run calibrates its thresholds on, so that every good image both trains and sets them.

        The images are embedded again and scored as ``predict`` scores them, by the fitted bank without each
        image's own entries (``out_of_fold_folds=0``) or, with K folds (:meth:`folds`), each fold by a bank
        built as ``fit`` builds one from the other folds' images alone (so its images took no part in choosing
        the coreset; only the preprocessing is the fit's, measured on all N images), at K coreset builds' cost.
        All N images' patch features are held in memory meanwhile, as ``fit`` holds them. ``train`` must be the
        images of the last ``fit``, in the same order; a loaded model cannot do this."""
        fitted = getattr(self, "_fitted_images", None)
        if fitted is None:
            raise NotFittedError("out-of-fold scores need the fit that built the bank (not a loaded model)")
        if fitted < 2:
            raise ValueError(f"out-of-fold scores need at least 2 fitted images, got {fitted}")
        was_training = self.training
        self.eval()
        try:
            grids = self._patch_grids(train, limit=fitted)
            if len(grids) != fitted:
                raise ValueError(f"out_of_fold got {len(grids)} images; the bank was built from {fitted}")
            if self.out_of_fold_folds == 0:
                scored = self._out_of_fold_excluding_own(grids)
            else:
                scored = [None] * fitted
                folds = self.folds(fitted)
                for fold in range(int(folds.max()) + 1):
                    others = _rows([grids[i][0] for i in np.flatnonzero(folds != fold)])
                    bank, _, centroids = self._build_bank(others)
                    del others
                    search = NearestNeighbours(bank, centroids, self.nprobe).search
                    for i in np.flatnonzero(folds == fold):
                        scored[i] = self._score_patches(grids[i][0][None], grids[i][1], search, bank)
        finally:
            self.train(was_training)
        return AnomalyPrediction(torch.cat([s.cpu() for s, _ in scored]), torch.cat([m.cpu() for _, m in scored]))

    def _out_of_fold_excluding_own(self, grids: list[tuple[torch.Tensor, torch.Size]]
                                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each image scored by the fitted bank less its own entries (``out_of_fold_folds=0``)."""
        sources = self._bank_sources
        order = np.argsort(sources, kind="stable")
        starts = np.searchsorted(sources[order], np.arange(len(grids) + 1))  # image i's: order[starts[i]:...]
        return [self._score_patches(patches[None], size, partial(self._search, exclude=order[starts[i]:starts[i + 1]]),
                                    self.memory_bank) for i, (patches, size) in enumerate(grids)]

    # ------------------------------------------------------------------------------------------- predict
    def predict(self, images: torch.Tensor) -> AnomalyPrediction:
        """Image scores (B,) and anomaly maps (B, H, W) for (B, 3, H, W) images in [0, 1]."""
        score = partial(self._score, search=self._search)
        return predict_in_batches(self, images, self.batch_size, score, fitted=self.memory_bank.shape[0] > 0)

    EXPORT_CHUNK: ClassVar[int] = 4096  # bank rows per matrix product in ``export_forward`` (bounds its memory)

    def export_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``predict`` in plain tensor operations for ONNX export (``metaad.types``): the faiss search becomes an
        exact one (matrix products and minima over bank chunks), so it matches ``search="exact"``."""
        return self._score(images, lambda queries, k: exact_search(queries, self.memory_bank, k, self.EXPORT_CHUNK))

    def _score(self, images: torch.Tensor, search: Search) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (B,) and maps (B, H, W) of one batch of images, by ``search`` in the memory bank."""
        return self._score_patches(self.embed(images), images.shape[-2:], search, self.memory_bank)

    def _score_patches(self, patches: torch.Tensor, size: torch.Size, search: Search, bank: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (B,) and maps (B, H, W) of images of ``size`` from their patch features (B, C, h, w):
        nearest-neighbour patch scores by ``search`` in ``bank``, the map (§3.3) and the image score (eq. 7, or
        the map's maximum)."""
        b, c, h, w = patches.shape
        queries = patches.permute(0, 2, 3, 1).reshape(-1, c).contiguous()
        distances, nn_index = search(queries, 1)
        patch_scores = distances[:, 0].view(b, h * w)
        anomaly_map = self._anomaly_map(patch_scores.view(b, 1, h, w), size)
        if self.image_score == "map":
            return anomaly_map.flatten(1).amax(1), anomaly_map
        scores = reweighted_score(patch_scores, queries.view(b, h * w, c), nn_index.view(b, h * w), bank,
                                  self.num_neighbors, search)
        return scores, anomaly_map

    def _anomaly_map(self, patch_scores: torch.Tensor, size: torch.Size) -> torch.Tensor:
        """Patch scores upsampled to the input size and smoothed with a Gaussian (§3.3, sigma = 4)."""
        upsampled = F.interpolate(patch_scores, size=size, mode="bilinear", align_corners=False)
        return gaussian_blur(upsampled, self.blur_sigma)[:, 0]

    # -------------------------------------------------------------------------------------------- search
    def _search(self, queries: torch.Tensor, k: int, exclude: np.ndarray | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """k nearest memory-bank entries: Euclidean distances (N, k) and indices (N, k); ``exclude``: entries
        left out (an image's own, for :meth:`out_of_fold`)."""
        return self._indexes.search("memory_bank", self.memory_bank, self.ivf_centroids, queries, k, self.nprobe,
                                    exclude)


def _rows(grids: list[torch.Tensor]) -> torch.Tensor:
    """Patch feature grids (C, h, w) as one (sum of h·w, C) matrix, image by image in row-major order."""
    return torch.cat([grid.flatten(1).T for grid in grids])
