"""Multi-scale patch representation learning (Tsai, Wu & Lai, "Multi-Scale Patch-Based Representation
Learning for Image Anomaly Detection and Segmentation", WACV 2022; its supplementary as ``"paper"`` preset).

Pipeline: frozen pretrained backbone → one encoder per patch size (Enc64, Enc32, Enc16; supp. §3, Fig. 2:
convolutions with padding 1, each followed by a leaky ReLU, ending in a 64-d feature per patch) → trained
with Patch SVDD's self-supervised losses plus a k-means clustering term (K = 50, supp. Table 3) → every
training patch's embedding kept per scale → a test patch's score is the distance to its nearest training
patch (``metaad.components.knn``) → each pixel averages the scores of the patches covering it → the scales'
maps are multiplied → image score = the map's maximum.

Dense evaluation: an encoder is fully convolutional over the backbone map whose stride s is a quarter of
its patch size P, so each output location is the embedding of the P×P patch around it (s-pixel steps), for
a whole batch in one pass instead of patch-by-patch crops.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from metaad.backbones import Backbone
from metaad.components.coreset import greedy_coreset
from metaad.components.estimator import predict_in_batches
from metaad.components.knn import SearchCache, exact_search, search_centroids
from metaad.components.preprocess import Preprocess
from metaad.training.data import TrainImages
from metaad.training.loop import train_model
from metaad.types import AnomalyPrediction, EpochEnd, TrainData, TrainingSettings, device_of

# the 8 neighbours of a patch, the classes of the relative-position task (Patch SVDD §3.3)
DIRECTIONS = torch.tensor([(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)])


class PatchEncoder(nn.Module):
    """Enc_P on a backbone map: 3×3 convolutions, padding 1, each followed by a leaky ReLU (supp. §3) → 64-d."""

    def __init__(self, in_channels: int, width: int, out_channels: int, slope: float) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1), nn.LeakyReLU(slope),
            nn.Conv2d(width, out_channels, 3, 1, 1), nn.LeakyReLU(slope),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.body(features)


class PositionClassifier(nn.Module):
    """C: three fully connected layers, leaky ReLU after all but the last (supp. §3); input f(p1) − f(p2)
    (Patch SVDD's reference code), output the 8 relative positions."""

    def __init__(self, dim: int, hidden: int, slope: float) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(dim, hidden), nn.LeakyReLU(slope), nn.Linear(hidden, hidden), nn.LeakyReLU(slope),
            nn.Linear(hidden, len(DIRECTIONS)),
        )

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return self.body(first - second)


def kmeans_labels(points: torch.Tensor, k: int, iterations: int = 10, sample: int = 4096) -> torch.Tensor:
    """Lloyd's k-means on (N, D) detached points (a seeded global RNG picks the start and the sample);
    returns the (k, D) centroids. Empty clusters keep their previous centre."""
    n = points.shape[0]
    k = min(k, n)
    fit_on = points[torch.randperm(n)[:sample]] if n > sample else points
    centres = fit_on[torch.randperm(fit_on.shape[0])[:k]].clone()
    for _ in range(iterations):
        labels = torch.cdist(fit_on, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, labels, fit_on)
        counts = torch.bincount(labels, minlength=k).unsqueeze(1)
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
    return centres


class MultiScalePatch(nn.Module):
    """Multi-scale patch representation learning (Tsai et al., WACV 2022).

    Args:
        backbone: the pretrained network the encoders start from (paper: VGG16, supp. Fig. 2, with
            ``backbone="vgg16", weights=PATH``, layers chosen to match; default the offline EfficientNet-Lite0).
        layers: one backbone stage per patch size, in ``patch_sizes`` order. Lite0's stages 3, 2, 1 (strides
            16, 8, 4) give 4×4-cell patches for 64, 32 and 16 pixels.
        patch_sizes: the scales; (64, 32, 16) is the 3-scale model, (64, 32) the 2-scale one (supp. Table 5).
        weights: a local weights file for the backbone (None: its offline package).
        image_size: images are resized to this side (supp. §2, Magnetic Tile: 128).
        embedding_dim, encoder_width: the encoders' output (supp. Fig. 2: 64) and hidden width.
        clusters: K of the k-means pseudo-labels (supp. Table 3: K = 50).
        lambda_svdd, lambda_kmeans: weights of the SVDD and the k-means terms (position loss weight 1).
        anchors: patches sampled per image and scale for each loss term.
        fusion: "mult" (the scales' maps multiplied, as Patch SVDD's reference evaluation) or "sum".
        coreset_ratio: fraction of training patches kept per scale (greedy k-center, as PatchCore §3.2;
            1.0 keeps all, as the paper's exhaustive nearest-neighbour search does).
        standardize_images: "auto" (default), "always" or "never" (the paper preset): PatchCore's exposure
            standardisation before the backbone (``metaad.components.preprocess.Preprocess``). A metaad addition,
            which raised the paper setting's image AUROC on held-out MTD training images with synthetic surface
            defects (``benchmarks/epoch_validation.py``, no test image; ``benchmarks/NOTES.md``).
        epochs, batch_size, lr: Adam training (not given by the supplementary: Patch SVDD's lr 1e-4; 10 epochs
            of 762 Magnetic Tile images take about 10 minutes on 2 shared cores).
        seed: seeds the layers, the training order and sampling, the coreset and the search index.

    The loss of a scale is Patch SVDD's (Yi & Yoon, ACCV 2020), which this paper extends: cross-entropy of C
    predicting which of the 8 neighbours (one patch size away) a patch is, plus ``lambda_svdd`` × the squared
    distance between the embeddings of patches one cell apart, plus ``lambda_kmeans`` × the k-means term. The
    k-means term: the batch's embeddings (detached) are clustered into K groups; each embedding's pseudo-label
    is its nearest centre, and the term is the mean squared distance of the (not detached) embedding to that
    centre, so it pulls patches towards their cluster and carries a gradient (the published code is reported
    to compute it on detached features, where it has none). The backbone is frozen (the paper fine-tunes its
    VGG16 layers); only the encoders and C are trained.

    Presets: ``"paper"`` (supp. §2's Magnetic Tile setting: 128 px, 3 scales, K = 50), ``"cpu"`` and ``"tiny"``.
    """

    SAVED_WITHOUT: ClassVar[dict[str, object]] = {}
    PRESETS: ClassVar[dict[str, dict]] = {
        "paper": {"image_size": 128, "patch_sizes": (64, 32, 16), "layers": (3, 2, 1), "clusters": 50,
                  "standardize_images": "never"},
        "cpu": {"image_size": 128, "epochs": 5},
        "tiny": {"image_size": 64, "patch_sizes": (32, 16), "layers": (2, 1), "epochs": 2, "batch_size": 4,
                 "clusters": 8, "coreset_ratio": 1.0},
    }

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0", layers: tuple[int, ...] = (3, 2, 1),
        patch_sizes: tuple[int, ...] = (64, 32, 16), weights: str | None = None,
        image_size: int = 128,
        embedding_dim: int = 64, encoder_width: int = 128, clusters: int = 50,
        lambda_svdd: float = 1.0, lambda_kmeans: float = 1.0, anchors: int = 16,
        fusion: str = "mult", coreset_ratio: float = 0.1, standardize_images: str = "auto",
        epochs: int = 10, batch_size: int = 16, lr: float = 1e-4, seed: int = 0,
    ) -> None:
        super().__init__()
        if len(layers) != len(patch_sizes) or not patch_sizes:
            raise ValueError(f"need one backbone layer per patch size, got {layers} and {patch_sizes}")
        if fusion not in ("mult", "sum"):
            raise ValueError(f"fusion must be 'mult' or 'sum', got {fusion!r}")
        if not 0.0 < coreset_ratio <= 1.0:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        if not isinstance(image_size, int) or image_size < max(patch_sizes):
            raise ValueError(f"image_size must be an integer of at least {max(patch_sizes)}, got {image_size!r}")
        self.backbone, self.layers = backbone, tuple(layers)
        self.patch_sizes, self.weights = tuple(patch_sizes), weights
        self.image_size = image_size
        self.embedding_dim, self.encoder_width, self.clusters = embedding_dim, encoder_width, clusters
        self.lambda_svdd, self.lambda_kmeans, self.anchors = lambda_svdd, lambda_kmeans, anchors
        self.fusion, self.coreset_ratio, self.standardize_images = fusion, coreset_ratio, standardize_images
        self.epochs, self.batch_size, self.lr, self.seed = epochs, batch_size, lr, seed
        order = sorted(set(self.layers))
        self.feature_extractor = Backbone(backbone, tuple(order))
        self.preprocess = Preprocess(image_size, standardize_images, self.feature_extractor.normalization)
        self._which = [order.index(layer) for layer in self.layers]
        channels = [self.feature_extractor.channels[i] for i in self._which]
        self.strides = [self.feature_extractor.reductions[i] for i in self._which]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.encoders = nn.ModuleList(PatchEncoder(c, encoder_width, embedding_dim, 0.1) for c in channels)
            self.classifiers = nn.ModuleList(PositionClassifier(embedding_dim, 128, 0.1) for _ in channels)
        for i in range(len(self.patch_sizes)):
            self.register_buffer(f"bank_{i}", torch.empty(0, embedding_dim))
            self.register_buffer(f"ivf_{i}", torch.empty(0, embedding_dim))
        self._indexes = SearchCache()

    def fit_summary(self) -> dict:
        banks = {f"bank_{p}px": int(getattr(self, f"bank_{i}").shape[0]) for i, p in enumerate(self.patch_sizes)}
        return {**banks, **self.preprocess.fit_summary()}

    # ------------------------------------------------------------------------------------------ features
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Dense patch embeddings (B, D, h_s, w_s), one map per patch size, for images in [0, 1]."""
        with torch.no_grad():
            maps = self.feature_extractor(self.preprocess(images))
        return [enc(maps[i].contiguous()) for enc, i in zip(self.encoders, self._which, strict=True)]

    # ----------------------------------------------------------------------------------------- training
    def training_settings(self) -> TrainingSettings:
        """Adam (β 0.9, 0.999) at ``lr``, no schedule (Patch SVDD's reference settings)."""
        return TrainingSettings(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed)

    def training_loss(self, images: torch.Tensor) -> torch.Tensor:
        """Sum over scales of position cross-entropy + λ_svdd·SVDD + λ_kmeans·k-means (see the class docstring)."""
        total = images.new_zeros(())
        for scale, (z, classifier) in enumerate(zip(self(images), self.classifiers, strict=True)):
            b, _, h, w = z.shape
            far = max(1, min(self.patch_sizes[scale] // self.strides[scale], (min(h, w) - 1) // 2))
            n = b * self.anchors
            image = torch.randint(b, (n,))
            direction = torch.randint(len(DIRECTIONS), (n,))
            y, x = torch.randint(far, h - far, (n,)), torch.randint(far, w - far, (n,))
            offset = DIRECTIONS[direction]
            anchor = z[image, :, y, x]
            position = classifier(anchor, z[image, :, y + far * offset[:, 0], x + far * offset[:, 1]])
            total = total + F.cross_entropy(position, direction.to(position.device))
            near = DIRECTIONS[torch.randint(len(DIRECTIONS), (n,))]
            neighbour = z[image, :, y + near[:, 0], x + near[:, 1]]
            total = total + self.lambda_svdd * (anchor - neighbour).square().sum(1).mean()
            if self.lambda_kmeans:
                points = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
                centres = kmeans_labels(points.detach(), self.clusters)
                labels = torch.cdist(points.detach(), centres).argmin(1)
                total = total + self.lambda_kmeans * (points - centres[labels]).square().sum(1).mean()
        return total

    def fit(self, train: TrainData, *, progress: bool = False, workdir: str | Path | None = None,
            resume: bool = False, on_epoch_end: EpochEnd | None = None) -> MultiScalePatch:
        """Train the encoders and C (shared loop), then keep every training patch's embedding per scale."""
        self.feature_extractor.load_weights(self.weights)
        images = TrainImages.from_data(train)
        self.preprocess.measure(images.batches())
        train_model(self, images, progress=progress, workdir=workdir, resume=resume, on_epoch_end=on_epoch_end)
        self.eval()
        chunks: list[list[torch.Tensor]] = [[] for _ in self.patch_sizes]
        device = device_of(self)
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                index = torch.arange(start, min(start + self.batch_size, len(images)))
                for scale, z in enumerate(self(images[index].to(device))):
                    chunks[scale].append(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
        for scale, parts in enumerate(chunks):
            bank = torch.cat(parts)
            n_select = max(1, round(bank.shape[0] * self.coreset_ratio))
            if n_select < bank.shape[0]:
                shards = max(1, math.ceil(bank.shape[0] / 4096))
                bank = bank[greedy_coreset(bank, n_select, shards=shards, seed=self.seed + scale)]
            setattr(self, f"bank_{scale}", bank.contiguous())
            setattr(self, f"ivf_{scale}", search_centroids(bank, seed=self.seed))
        return self

    # ------------------------------------------------------------------------------------------ predict
    def _search(self, scale: int, queries: torch.Tensor) -> torch.Tensor:
        """Euclidean distance of each query to its nearest training patch of ``scale`` (index built once)."""
        bank, ivf = getattr(self, f"bank_{scale}"), getattr(self, f"ivf_{scale}")
        return self._indexes.search(f"bank_{scale}", bank, ivf, queries, 1)[0][:, 0]

    def _exact_search(self, scale: int, queries: torch.Tensor) -> torch.Tensor:
        return exact_search(queries, getattr(self, f"bank_{scale}"))[0][:, 0]

    def _fused_map(self, images: torch.Tensor, search: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """(B, H, W) maps at the input's size: per scale, nearest-neighbour distances, each pixel the mean of
        the patches covering it; scales fused by ``fusion``."""
        side = self.image_size
        per_scale = []
        for scale, z in enumerate(self(images)):
            b, d, h, w = z.shape
            distances = search(scale, z.permute(0, 2, 3, 1).reshape(-1, d)).view(b, 1, h, w)
            pixels = F.interpolate(distances, size=(side, side), mode="bilinear", align_corners=False)
            kernel = self.patch_sizes[scale] // 2 * 2 + 1  # odd, so the map keeps its size
            pixels = F.avg_pool2d(pixels, kernel, 1, kernel // 2, count_include_pad=False)
            per_scale.append(pixels)
        stacked = torch.stack(per_scale)
        fused = stacked.prod(0) if self.fusion == "mult" else stacked.sum(0)
        return F.interpolate(fused, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]

    @torch.inference_mode()
    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W) anomaly maps for images in [0, 1], each bank searched as fitted (exact or IVF)."""
        return self._fused_map(images, self._search)

    def export_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``predict`` in tensor operations for ONNX export (``metaad.types``): every bank searched exactly."""
        maps = self._fused_map(images, self._exact_search)
        return maps.flatten(1).amax(1), maps

    def predict(self, images: torch.Tensor) -> AnomalyPrediction:
        """Image scores (B,) (the map's maximum) and anomaly maps (B, H, W) for images in [0, 1]."""
        def score(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            maps = self.anomaly_maps(batch)
            return maps.flatten(1).amax(1), maps

        return predict_in_batches(self, images, self.batch_size, score, fitted=self.bank_0.shape[0] > 0)
