"""Metaformer (Wu et al., ICCV 2021): Î = A(I) ⊗ T(P(I); A(I)), adapted from a meta-learned universal model.

A, the autoencoder of the supplementary's Table 1, reconstructs images in [0, 1] RGB space (the contract's
input; the output is a sigmoid).
P, the frozen instance-prior generator, gives a response map R in [0, 1]; T, a vanilla encoder-decoder
transformer (8 heads, 3 + 3 layers, §3.2), takes R as the encoder's input and the reconstruction Ĩ = A(I) as
the decoder's, and its output, folded back to an image-sized map R', re-weights Ĩ element-wise (eq. 8).
Meta-training (Algorithm 1) is ``maml.py`` and ``tasks.py`` beside this file; ``fit`` here is the meta-testing step.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from metaad.backbones import Backbone, create_backbone
from metaad.components.estimator import marking_fitted, predict_in_batches
from metaad.components.feature_cache import FrozenFeatures, frozen_part_key, weights_digest
from metaad.components.preprocess import Preprocess, resize
from metaad.components.scaling import scaled_length
from metaad.components.smoothing import gaussian_blur
from metaad.components.ssim import ssim_loss
from metaad.data.transforms import normalize
from metaad.io import load_tensors
from metaad.models.metaformer.feature_space import (
    OPTIMIZERS,
    FeatureAutoencoder,
    GridTransformer,
    channel_statistics,
    feature_grid,
    inner_loop,
    location_errors,
    prior_weights,
    weighted_loss,
)
from metaad.training import train_model, write_loss_log
from metaad.training.data import TrainImages
from metaad.types import AnomalyPrediction, EpochEnd, TrainData, TrainingSettings, device_of

CONFIGURATIONS = ("A", "A+P", "A+P+T")  # Table 3 of the paper
TABLE1_CHANNELS = (32, 64, 128, 256, 512)  # supplementary Table 1, Conv1..Conv5
CENTER_BIAS = "center-bias"  # the built-in stand-in prior, used only when asked for by name
UNIVERSAL_FORMAT = "metaad-metaformer-universal"
ARCHITECTURE_ARGS = ("configuration", "width_multiplier", "image_size")  # of a pixel-space universal model
FEATURE_ARCHITECTURE_ARGS = ("space", "configuration", "taps", "bottleneck", "hidden", "image_size")
SPACES = ("feature", "pixel")
MAP_TYPES = ("l2", "feature")
FEATURE_BACKBONE, FEATURE_LAYERS, FEATURE_SIZE = "tf_efficientnet_lite0", (2, 3), 256  # map_type="feature"
# universal models that ship inside the package, by the name ``init`` accepts for them (how each was meta-trained:
# the .json beside it). "universal-cpu" is the default; "universal-cpu-second-order" is its second-order twin.
SHIPPED_UNIVERSAL = {
    name: Path(__file__).resolve().parents[2] / "weights" / f"metaformer_{name.replace('-', '_')}.safetensors"
    for name in ("universal-feature", "universal-cpu", "universal-cpu-second-order")
}
DEFAULT_INIT = {"feature": "universal-feature", "pixel": "universal-cpu"}  # what init="shipped" is, by space
DEFAULT_SIZE = {"feature": 256, "pixel": 64}  # what image_size=None is, by space
DEFAULT_CONFIGURATION = {"feature": "A", "pixel": "A+P+T"}  # what configuration=None is (the shipped models')


def architecture_args(space: str) -> tuple[str, ...]:
    """The constructor arguments a universal model of ``space`` must share with the model adapting from it."""
    return FEATURE_ARCHITECTURE_ARGS if space == "feature" else ARCHITECTURE_ARGS


def reconstruction_loss(output: torch.Tensor, target: torch.Tensor, ssim_weight: float = 0.1) -> torch.Tensor:
    """Eq. (7): l_mse + λ·l_ssim between a reconstruction and its target, both in [0, 1]."""
    return F.mse_loss(output, target) + ssim_weight * ssim_loss(output, target)


def _scaled(channels: int, width_multiplier: float) -> int:
    return max(1, round(channels * width_multiplier))


def _average_pool_to_2x2(side: int) -> nn.Module:
    """``nn.AdaptiveAvgPool2d(2)`` for a known ``side`` × ``side`` input, as a fixed pool: the same windows
    (side 2k: k wide, stride k; 2k + 1: k + 1 wide, stride k; 1: the value repeated), with static shapes that
    the ONNX exporter can follow after an in-graph resize (the adaptive pool cannot be exported there)."""
    if side == 1:
        return nn.Upsample(scale_factor=2, mode="nearest")
    half = side // 2
    return nn.AvgPool2d(half + side % 2, stride=half)


class Autoencoder(nn.Module):
    """A of the supplementary's Table 1: five 5×5 conv + BN + leaky ReLU + 2×2 max-pool stages (32→512),
    average pool to 2×2, then upsample + five 5×5 transposed convs back to the input size; sigmoid output.

    Module names follow the table (conv1, pool1, ..., avgpool, up1, tconv1, ..., tconv5) so that a test can
    check each layer's output size. ``image_size`` must be a multiple of 32.
    """

    def __init__(self, width_multiplier: float = 1.0, image_size: int = 256, negative_slope: float = 0.2) -> None:
        super().__init__()
        if image_size < 32 or image_size % 32:
            raise ValueError(f"Metaformer image_size must be a multiple of 32 (five 2×2 pools), got {image_size}")
        widths = [_scaled(c, width_multiplier) for c in TABLE1_CHANNELS]
        encoder: OrderedDict[str, nn.Module] = OrderedDict()
        previous = 3
        for i, width in enumerate(widths, start=1):
            encoder[f"conv{i}"] = nn.Conv2d(previous, width, 5, padding=2, bias=False)
            encoder[f"bn{i}"] = nn.BatchNorm2d(width)
            encoder[f"act{i}"] = nn.LeakyReLU(negative_slope)
            encoder[f"pool{i}"] = nn.MaxPool2d(2)
            previous = width
        encoder["avgpool"] = _average_pool_to_2x2(image_size // 32)
        decoder: OrderedDict[str, nn.Module] = OrderedDict()
        # Table 1: 2×2 → 16×16 at 256 px, i.e. to image_size / 16, then ×2 before each of T.Conv2..5.
        decoder["up1"] = nn.Upsample(size=(image_size // 16, image_size // 16), mode="bilinear")
        outputs = [*widths[::-1][1:], 3]
        for i, width in enumerate(outputs, start=1):
            if i > 1:
                decoder[f"up{i}"] = nn.Upsample(scale_factor=2, mode="bilinear")
            decoder[f"tconv{i}"] = nn.ConvTranspose2d(previous, width, 5, padding=2, bias=i == len(outputs))
            if i < len(outputs):
                decoder[f"tbn{i}"] = nn.BatchNorm2d(width)
                decoder[f"tact{i}"] = nn.LeakyReLU(negative_slope)
            previous = width
        decoder["out"] = nn.Sigmoid()
        self.encoder = nn.Sequential(encoder)
        self.decoder = nn.Sequential(decoder)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images in [0, 1] → reconstruction Ĩ in [0, 1]."""
        return self.decoder(self.encoder(images))


class PriorTransformer(nn.Module):
    """T(R; Ĩ) of §3.2: a vanilla encoder-decoder transformer, 8 heads, 3 encoder and 3 decoder layers.

    R and Ĩ are cut into 16×16-pixel patches (a 16×16 grid at 256 px); each patch is a token with a learned
    position. R feeds the encoder, Ĩ the decoder; the decoder's tokens are mapped back to patches of R' and
    passed through a sigmoid. Dropout is off so that meta-gradients are deterministic. d_model is 256 × width
    (at least 32).
    """

    def __init__(self, image_size: int = 256, width_multiplier: float = 1.0, patch: int = 16) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} must be a multiple of the {patch}-pixel patch")
        self.patch = patch
        grid = image_size // patch
        d_model = max(32, 8 * round(256 * width_multiplier / 8))
        area = self.patch * self.patch
        self.embed_prior = nn.Linear(area, d_model)
        self.embed_reconstruction = nn.Linear(3 * area, d_model)
        self.position_prior = nn.Parameter(torch.randn(1, grid * grid, d_model) * 0.02)
        self.position_reconstruction = nn.Parameter(torch.randn(1, grid * grid, d_model) * 0.02)
        self.transformer = nn.Transformer(
            d_model,
            nhead=8,
            num_encoder_layers=3,
            num_decoder_layers=3,
            dim_feedforward=4 * d_model,
            dropout=0.0,
            batch_first=True,
        )
        self.head = nn.Linear(d_model, area)
        nn.init.constant_(self.head.bias, 2.0)  # R' ≈ 0.88 at the start, so Î starts close to Ĩ

    def forward(self, prior_map: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """R (B, 1, S, S) and Ĩ (B, 3, S, S) → R' (B, 1, S, S) in [0, 1]."""
        size = reconstruction.shape[-2:]
        source = self.embed_prior(F.unfold(prior_map, self.patch, stride=self.patch).transpose(1, 2))
        target = self.embed_reconstruction(F.unfold(reconstruction, self.patch, stride=self.patch).transpose(1, 2))
        tokens = self.transformer(source + self.position_prior, target + self.position_reconstruction)
        patches = self.head(tokens)  # (B, L, p²): F.fold without overlap is a reshape (and exports to ONNX)
        b, p = patches.shape[0], self.patch
        grid = patches.view(b, size[0] // p, size[1] // p, p, p).permute(0, 1, 3, 2, 4)
        return torch.sigmoid(grid.reshape(b, 1, size[0], size[1]))


class CenterBiasPrior(nn.Module):
    """A parameter-free stand-in for P: an isotropic Gaussian centred on the image (the classic saliency
    centre bias). Only used when ``prior="center-bias"``, e.g. for tests or before a trained P exists."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        ys = torch.linspace(-1, 1, height, device=images.device, dtype=images.dtype)
        xs = torch.linspace(-1, 1, width, device=images.device, dtype=images.dtype)
        prior = torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * 0.5**2))
        return prior.expand(images.shape[0], 1, height, width)


@dataclass
class FrozenParts:
    """The frozen networks a Metaformer uses but does not own, held outside its module tree: P (from the
    ``prior`` file, the built-in stand-in, or ``set_prior``) and the "feature" map's backbone, each loaded on
    first use. So neither is in ``state_dict`` (saves and universal models hold A and T), trained, or moved by
    ``.to``: each is moved to its input's device where it runs. ``prior_cache``: R per training image, for one
    fit (P is frozen)."""

    prior: nn.Module | None = None
    prior_injected: bool = False  # P came from set_prior: no file describes it
    feature_extractor: Backbone | None = None  # pixel space's "feature" map
    prior_cache: dict[bytes, torch.Tensor] = field(default_factory=dict)


class Metaformer(nn.Module):
    """Metaformer anomaly detector: meta-tested from a universal model, scores by the reconstruction gap.

    ``space`` is what A reconstructs. "feature", the default: the frozen EfficientNet-Lite0 features of the
    image (``taps``, offline weights, at ``image_size`` = 256 px), standardised per channel on the images it
    adapts to, through a convolutional autoencoder with a ``bottleneck``-channel code a location
    (``feature_space.py``); the anomaly map is the per-location reconstruction error, upsampled to the input and
    smoothed with ``smoothing_sigma`` (pixels at 256 px). "pixel": the paper's (supplementary Table 1), A
    reconstructs the image in [0, 1] RGB, the map is ``map_type``'s gap; the "paper" preset.

    ``configuration`` picks Table 3's variant (None: the shipped universal model's, "A" in feature space,
    "A+P+T" in pixel space; chosen by Table 3 on the validation, ``benchmarks/NOTES.md``). In pixel space
    "A" (Î = Ĩ), "A+P" (Î = Ĩ ⊗ R), "A+P+T" (Î = Ĩ ⊗ R'). In feature space P weights the map and the loss
    (1 + ``prior_weight`` · R: errors on the salient object count more, none is dropped) and never multiplies
    the reconstruction; T re-weights the reconstructed features on the grid (F̂ = F̃ ⊗ R'), as §3.2 does on
    pixels.
    ``init`` is a universal checkpoint (safetensors, from ``metaad meta-train``) to adapt from, "shipped" (the
    universal model of ``space`` shipped with metaad: "universal-feature", or "universal-cpu" in pixel space),
    another shipped name ("universal-cpu-second-order"), or None to train from scratch.

    Adaptation (``fit``, meta-testing, §3.1.1 eq. 6). In feature space it is the meta-training inner loop,
    unchanged: ``adapt_steps`` steps of ``adapt_optimizer`` at ``lr`` on batches of ``batch_size`` features
    (all of them when there are fewer), so that what the universal model learned to do in a few steps is what
    adaptation does; a support set larger than a batch gets ``adapt_min_epochs`` passes at least, when that
    takes more steps (many images then train longer). In pixel space: ``adapt_epochs`` epochs of Adam (§4:
    30, lr 1e-4, batch 64) in the shared loop, loss eq. (7) with λ = ``ssim_weight``.
    ``prior`` is the instance-prior weights file (None: metaad's shipped generator; "center-bias": a built-in
    stand-in); ``set_prior`` injects any module mapping (B, 3, H, W) images in [0, 1] to R (B, 1, H, W) in
    [0, 1]. P is frozen and not part of ``state_dict`` (:class:`FrozenParts`); the feature space's frozen
    backbone is (a saved model scores without reading pretrained weights again), its weights read at ``fit``,
    and universal models leave it out.

    Pixel space's anomaly map (``map_type``): "feature" is the gap measured by a frozen EfficientNet-Lite0
    (stages 2 and 3, I and Î seen at 256 px): 1 − cosine per location, upsampled, summed, smoothed with σ = 4;
    "l2", the paper's, the squared error between I and Î averaged over RGB, smoothed with ``smoothing_sigma``.
    The image score is the map's maximum. The feature space's settings were chosen on held-out MTD training
    images with synthetic defects (rule and figures in ``benchmarks/NOTES.md``).

    Saves of metaad before the feature space existed load in pixel space (before the feature map, with "l2";
    before ``adapt_min_epochs``, with 0: a refit adapts as it did).

    Args:
        width_multiplier: pixel space: channel width of A, P's and T's convolutions relative to Table 1.
        image_size: the working side (None: 256 in feature space, 64 in pixel space).
        taps, bottleneck, hidden: feature space: the backbone stages, the code's and the hidden layers' widths.
        standardize_images: feature space: exposure standardisation before the backbone ("auto", "always",
            "never"; ``metaad.components.preprocess``).
        lr, batch_size: the adaptation's learning rate and batch size.
        seed: seeds the initial weights (when ``init`` is None) and the adaptation's order.
    """

    SAVED_WITHOUT: ClassVar[dict[str, object]] = {"map_type": "l2", "space": "pixel", "adapt_min_epochs": 0.0}

    PRESETS: ClassVar[dict[str, dict]] = {
        "paper": {"space": "pixel", "width_multiplier": 1.0, "image_size": 256, "init": None, "batch_size": 64,
                  "lr": 1e-4, "map_type": "l2"},
        "cpu": {},
        "tiny": {"image_size": 64, "init": None, "adapt_steps": 5, "adapt_epochs": 1, "batch_size": 4,
                 "prior": "center-bias", "bottleneck": 8, "hidden": 16, "taps": (2, 3)},
    }

    def __init__(
        self,
        space: str = "feature", configuration: str | None = None, width_multiplier: float = 0.125,
        image_size: int | None = None, init: str | None = "shipped",
        taps: tuple[int, ...] = (2, 3, 4), bottleneck: int = 32, hidden: int = 64,
        adapt_steps: int = 30, adapt_min_epochs: float = 10.0, adapt_optimizer: str = "adam",
        prior_weight: float = 1.0, standardize_images: str = "auto",
        adapt_epochs: int = 30, lr: float = 1e-3, batch_size: int = 16, ssim_weight: float = 0.1,
        prior: str | None = None, smoothing_sigma: float = 4.0, map_type: str = "feature", seed: int = 0,
    ) -> None:
        super().__init__()
        if space not in SPACES:
            raise ValueError(f"Metaformer space must be one of {SPACES}, got {space!r}")
        if map_type not in MAP_TYPES:
            raise ValueError(f"map_type must be one of {MAP_TYPES}, got {map_type!r}")
        if not width_multiplier > 0:
            raise ValueError(f"Metaformer width_multiplier must be > 0, got {width_multiplier}")
        configuration = DEFAULT_CONFIGURATION[space] if configuration is None else configuration
        if configuration not in CONFIGURATIONS:
            raise ValueError(f"Metaformer configuration must be one of {CONFIGURATIONS}, got {configuration!r}")
        if adapt_optimizer not in OPTIMIZERS:
            raise ValueError(f"adapt_optimizer must be one of {OPTIMIZERS}, got {adapt_optimizer!r}")
        if adapt_steps < 0:
            raise ValueError(f"adapt_steps must be at least 0, got {adapt_steps}")
        if not adapt_min_epochs >= 0:
            raise ValueError(f"adapt_min_epochs must be at least 0, got {adapt_min_epochs}")
        image_size = DEFAULT_SIZE[space] if image_size is None else image_size
        init = DEFAULT_INIT[space] if init == "shipped" else init
        self.space, self.configuration, self.width_multiplier = space, configuration, width_multiplier
        self.image_size, self.init = image_size, init
        self.taps, self.bottleneck, self.hidden = tuple(taps), bottleneck, hidden
        self.adapt_steps, self.adapt_optimizer, self.prior_weight = adapt_steps, adapt_optimizer, prior_weight
        self.adapt_min_epochs = adapt_min_epochs
        self.standardize_images = standardize_images
        self.adapt_epochs, self.lr, self.batch_size, self.ssim_weight = adapt_epochs, lr, batch_size, ssim_weight
        self.prior, self.smoothing_sigma, self.map_type, self.seed = prior, smoothing_sigma, map_type, seed
        self.frozen = FrozenParts()
        self.adaptation_losses: list[float] = []  # feature space: the last fit's inner-loop losses
        with torch.random.fork_rng():  # the initial weights depend on ``seed`` alone
            torch.manual_seed(seed)
            if space == "feature":
                if image_size < 32 or image_size % 32:
                    raise ValueError(f"Metaformer image_size must be a multiple of 32, got {image_size}")
                self.backbone = Backbone(FEATURE_BACKBONE, self.taps)  # its weights are read at fit
                channels = sum(self.backbone.channels)
                self.preprocess = Preprocess(image_size, standardize_images, self.backbone.normalization)
                self.autoencoder = FeatureAutoencoder(channels, bottleneck, hidden)
                self.transformer = GridTransformer(channels) if configuration == "A+P+T" else None
                self.register_buffer("feature_mean", torch.zeros(channels))
                self.register_buffer("feature_std", torch.ones(channels))
            else:
                self.preprocess = Preprocess(image_size)
                self.autoencoder = Autoencoder(width_multiplier, image_size)
                self.transformer = PriorTransformer(image_size, width_multiplier) if configuration == "A+P+T" else None
        self.register_buffer("fitted", torch.tensor(False))

    def fit_summary(self) -> dict:
        if self.space == "pixel":
            return {}
        losses = self.adaptation_losses
        return {**self.preprocess.fit_summary(), "adapt_steps": len(losses),
                **({"adapt_loss_first": losses[0], "adapt_loss_last": losses[-1]} if losses else {})}

    # -- the instance prior P ------------------------------------------------------------------------------

    def set_prior(self, module: nn.Module) -> Metaformer:
        """Use ``module`` as P (frozen, eval mode) instead of loading it from ``prior``."""
        self.frozen.prior = module.eval().requires_grad_(False)
        self.frozen.prior_injected = True
        return self

    @property
    def prior_injected(self) -> bool:
        """Whether P came from ``set_prior`` rather than from ``prior`` (a weights file or "center-bias")."""
        return self.frozen.prior_injected

    @property
    def prior_module(self) -> nn.Module | None:
        """P, loaded on first use (None for configuration "A")."""
        if self.configuration == "A":
            return None
        if self.frozen.prior is None:
            if self.prior == CENTER_BIAS:
                self.frozen.prior = CenterBiasPrior()
            else:
                try:
                    from metaad.models.metaformer.instance_prior import load_instance_prior
                except ImportError as error:
                    raise RuntimeError(
                        f"Metaformer configuration {self.configuration!r} needs the instance-prior generator "
                        f"(metaad.models.metaformer.instance_prior could not be imported: {error}); pass "
                        f"prior='{CENTER_BIAS}' for the built-in stand-in or call set_prior(module)"
                    ) from error
                self.frozen.prior = load_instance_prior(self.prior)  # frozen, in eval mode
        return self.frozen.prior

    @torch.no_grad()
    def compute_prior(self, images: torch.Tensor) -> torch.Tensor | None:
        """R = P(I), (B, 1, S, S) in [0, 1], from [0, 1] images; None for configuration "A"."""
        prior = self.prior_module
        if prior is None:
            return None
        prior.to(images.device)
        response = prior(images)
        if response.ndim != 4 or response.shape[:2] != (images.shape[0], 1):
            raise ValueError(f"the instance prior must return (B, 1, H, W), got {tuple(response.shape)}")
        if response.shape[-2:] != images.shape[-2:]:
            response = F.interpolate(response, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return response.clamp(0.0, 1.0)

    # -- the model ------------------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor, prior_map: torch.Tensor | None = None) -> torch.Tensor:
        """Î (eq. 8), (B, 3, S, S) in [0, 1], from (B, 3, S, S) images in [0, 1].

        ``prior_map`` is R when already computed (meta-training caches it); otherwise P runs here.
        """
        reconstruction = self.autoencoder(images)
        if self.configuration == "A":
            return reconstruction
        if prior_map is None:
            prior_map = self.compute_prior(images)
        if self.configuration == "A+P":
            return reconstruction * prior_map
        return reconstruction * self.transformer(prior_map, reconstruction)

    # -- feature space --------------------------------------------------------------------------------------

    @torch.no_grad()
    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Feature space: [the frozen grid (B, C, h, w), unstandardised] of (B, 3, H, W) images in [0, 1], and
        P's R averaged onto the grid (B, 1, h, w) when the configuration uses P: what the feature cache holds."""
        grid = feature_grid(self.backbone(self.preprocess(images)))
        if self.configuration == "A":
            return [grid]
        prior = self.compute_prior(resize(images.float(), self.image_size))
        return [grid, F.avg_pool2d(prior, self.backbone.reductions[0])]  # a fixed pool: exports to ONNX

    def standardized(self, grid: torch.Tensor) -> torch.Tensor:
        """A grid in the units A works in: per channel, less the adaptation images' mean, over their spread."""
        return (grid - self.feature_mean[:, None, None]) / self.feature_std[:, None, None]

    def reconstruct(self, grid: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        """F̂ of a standardised grid: A's reconstruction, re-weighted by T's R' for "A+P+T"."""
        rebuilt = self.autoencoder(grid)
        if self.transformer is not None:
            rebuilt = rebuilt * self.transformer(prior, rebuilt)
        return rebuilt

    def grid_errors(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The location errors (B, 1, h, w) of a batch of ``feature_maps`` and P's weights on them (or None)."""
        grid = self.standardized(maps[0])
        prior = maps[1] if len(maps) > 1 else None
        errors = location_errors(grid, self.reconstruct(grid, prior))
        return errors, prior_weights(prior, self.prior_weight)

    def grid_loss(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """The adaptation's (and meta-training's) loss: the P-weighted mean squared feature error."""
        return weighted_loss(*self.grid_errors(maps))

    def feature_anomaly_map(self, images: torch.Tensor) -> torch.Tensor:
        """Feature space: (B, S, S) maps at the working size S from (B, 3, H, W) images in [0, 1]."""
        return self.map_from_features(self.feature_maps(images))

    def map_from_features(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """(B, S, S) maps at the working size S from a batch of ``feature_maps``: P-weighted location errors,
        upsampled, smoothed with ``smoothing_sigma`` (pixels at 256 px)."""
        errors, weights = self.grid_errors(maps)
        if weights is not None:
            errors = errors * weights
        size = (self.image_size, self.image_size)
        errors = F.interpolate(errors, size=size, mode="bilinear", align_corners=False)
        sigma = scaled_length(self.smoothing_sigma, self.image_size)
        return (gaussian_blur(errors, sigma) if sigma > 0 else errors)[:, 0]

    def adaptation_steps(self, count: int) -> int:
        """The inner loop's step count on ``count`` support images: ``adapt_steps`` when they fit in one batch
        (as every meta-training task does), else enough steps for ``adapt_min_epochs`` passes if that is more."""
        if count <= self.batch_size:
            return self.adapt_steps
        return max(self.adapt_steps, math.ceil(self.adapt_min_epochs * count / self.batch_size))

    def _adapt_features(self, train: TrainData, on_epoch_end: EpochEnd | None, workdir: str | Path | None) -> None:
        """Meta-testing in feature space: the grid of every training image once (the feature cache), the
        channel statistics, then the inner loop of meta-training (``feature_space.inner_loop``); its losses, a
        step to a line, in ``workdir``'s training log."""
        train = TrainImages.from_data(train)
        self.backbone.load_weights()
        self.preprocess.measure(train.batches())
        key = frozen_part_key(self.backbone, self.preprocess)
        if self.configuration != "A":
            key["prior"] = weights_digest(self.prior_module)
        device = device_of(self)
        features = FrozenFeatures(self, self.feature_maps, train, key, device=device)
        grids = (features[index][0] for index in torch.arange(len(features)).split(64))
        mean, std = channel_statistics(grids)
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)
        self.train()
        generator = torch.Generator().manual_seed(self.seed)
        self.adaptation_losses = inner_loop(
            self, lambda index: self.grid_loss([m.to(device) for m in features[index]]), len(features),
            self.adaptation_steps(len(features)), self.lr, self.batch_size, self.adapt_optimizer, generator,
        )
        self.eval()
        self.fitted.fill_(True)
        if workdir is not None:
            history = [{"epoch": step, "loss": loss} for step, loss in enumerate(self.adaptation_losses, start=1)]
            write_loss_log(workdir, history, title="Metaformer adaptation (steps)")
        if on_epoch_end is not None:
            on_epoch_end(1, self)

    # -- pixel space ----------------------------------------------------------------------------------------

    def loss(self, images: torch.Tensor, prior_map: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. (7) between Î and I."""
        return reconstruction_loss(self(images, prior_map), images, self.ssim_weight)

    def anomaly_map(self, images: torch.Tensor) -> torch.Tensor:
        """(B, S, S) smoothed reconstruction gap (``map_type``), from (B, 3, S, S) images in [0, 1]; S is
        ``image_size`` for "l2" and at least 256 for "feature"."""
        reconstruction = self(images)
        if self.map_type == "feature":
            return self.feature_gap(images, reconstruction)
        gap = (reconstruction - images).pow(2).mean(1, keepdim=True)
        sigma = self.smoothing_sigma * self.image_size / 256
        if sigma > 0:
            gap = gaussian_blur(gap, sigma, truncate=3.0)
        return gap[:, 0]

    def feature_gap(self, images: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """The "feature" map, (B, S, S) with S = max(256, input side), between images I and their Î."""
        if self.frozen.feature_extractor is None:
            self.frozen.feature_extractor = create_backbone(FEATURE_BACKBONE, FEATURE_LAYERS)
        extractor = self.frozen.feature_extractor.to(images.device)
        side = max(FEATURE_SIZE, images.shape[-1])
        pair = torch.cat([images, reconstruction])
        if pair.shape[-1] != side:
            pair = F.interpolate(pair, size=(side, side), mode="bilinear", align_corners=False)
        distances = []
        for feature in extractor(normalize(pair, *extractor.normalization)):
            original, rebuilt = feature.chunk(2)
            distance = 1 - F.cosine_similarity(original, rebuilt, dim=1).unsqueeze(1)
            distances.append(F.interpolate(distance, size=(side, side), mode="bilinear", align_corners=False))
        return gaussian_blur(torch.stack(distances).sum(0), 4.0)[:, 0]  # no batch-sized zeros: exports any batch

    # -- estimator API --------------------------------------------------------------------------------------

    def load_universal(self, path: str) -> Metaformer:
        """Load a universal checkpoint written by meta-training; its architecture must match this model's.

        ``path`` may name a universal model shipped with metaad (see ``SHIPPED_UNIVERSAL``)."""
        path = str(SHIPPED_UNIVERSAL.get(path, path))
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"{path}: no such universal checkpoint; shipped ones: {', '.join(SHIPPED_UNIVERSAL)} "
                "(or write one with `metaad meta-train`)"
            )
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != UNIVERSAL_FORMAT:
            raise ValueError(
                f"{path}: not a Metaformer universal checkpoint (metadata format is "
                f"{metadata.get('format')!r}, expected {UNIVERSAL_FORMAT!r})"
            )
        saved = {"space": "pixel", **json.loads(metadata["model"])}  # files before the feature space: pixel
        names = architecture_args(self.space)
        mine = json.loads(json.dumps({name: getattr(self, name) for name in names}))  # tuples as JSON lists
        if {name: saved.get(name) for name in names} != mine:
            raise ValueError(f"{path}: universal model was meta-trained with {saved}, this Metaformer has {mine}")
        state = load_tensors(path)
        state["fitted"] = self.fitted.new_tensor(False)  # meta-trained, not yet adapted (the file has no flag)
        if self.space == "feature":  # the frozen backbone is not in a universal file: its weights are read at fit
            state.update({f"backbone.{k}": v for k, v in self.backbone.state_dict().items()})
        self.load_state_dict(state)
        return self

    def training_settings(self) -> TrainingSettings:
        """§4: meta-testing adapts for 30 epochs with Adam, lr 1e-4, batch 64."""
        return TrainingSettings(epochs=self.adapt_epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed)

    def training_loss(self, images: torch.Tensor) -> torch.Tensor:
        """Eq. (7) on a batch of defect-free images in [0, 1]. P is frozen, so R is computed once per training
        image and kept for the epochs that follow (keyed by the image's bytes; the cache lives for one fit)."""
        images = self.preprocess(images)
        return self.loss(images, self._cached_priors(images))

    def _cached_priors(self, images: torch.Tensor) -> torch.Tensor | None:
        if self.configuration == "A":
            return None
        cache = self.frozen.prior_cache
        keys = [image.detach().cpu().numpy().tobytes() for image in images]
        missing = [i for i, key in enumerate(keys) if key not in cache]
        if missing:
            for i, prior in zip(missing, self.compute_prior(images[missing]), strict=True):
                cache[keys[i]] = prior
        return torch.stack([cache[key] for key in keys])

    def fit(
        self, train: TrainData, *, progress: bool = False, workdir: str | Path | None = None, resume: bool = False,
        on_epoch_end: EpochEnd | None = None,
    ) -> Metaformer:
        """Meta-testing (§3.1.1, eq. 6): adapt θ from ``init`` (or scratch) on defect-free images: in feature
        space the meta-training inner loop (seconds: ``workdir`` gets its loss log, ``resume`` has nothing to
        continue), in pixel space the shared training loop (``metaad.training``)."""
        if self.init is not None:  # a resumed adaptation's checkpoint then replaces these weights
            self.load_universal(self.init)
        if self.space == "feature":
            self._adapt_features(train, on_epoch_end, workdir)
            return self
        self.frozen.prior_cache = {}
        try:
            train_model(self, train, progress=progress, workdir=workdir, resume=resume,
                        on_epoch_end=marking_fitted(self, on_epoch_end))
        finally:
            self.frozen.prior_cache = {}
        self.fitted.fill_(True)
        return self

    def export_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (B,), the map's maximum, and maps (B, H, W) at the input size, of one batch."""
        size = images.shape[-2:]
        if self.space == "feature":
            anomaly = self.feature_anomaly_map(images)
        else:
            anomaly = self.anomaly_map(self.preprocess(images))
        if anomaly.shape[-2:] != size:
            anomaly = F.interpolate(anomaly[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        return anomaly.flatten(1).amax(1), anomaly

    def predict(self, images: torch.Tensor | Iterable) -> AnomalyPrediction:
        """Scores (B,) and maps (B, H, W) at the input size, from images in [0, 1]."""
        return predict_in_batches(self, images, self.batch_size, self.export_forward, fitted=bool(self.fitted))
