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
from metaad.components.preprocess import Preprocess
from metaad.components.smoothing import gaussian_blur
from metaad.components.ssim import ssim_loss
from metaad.data.transforms import normalize
from metaad.io import load_tensors
from metaad.training import train_model
from metaad.types import AnomalyPrediction, EpochEnd, TrainData, TrainingSettings

CONFIGURATIONS = ("A", "A+P", "A+P+T")  # Table 3 of the paper
TABLE1_CHANNELS = (32, 64, 128, 256, 512)  # supplementary Table 1, Conv1..Conv5
CENTER_BIAS = "center-bias"  # the built-in stand-in prior, used only when asked for by name
UNIVERSAL_FORMAT = "metaad-metaformer-universal"
ARCHITECTURE_ARGS = ("configuration", "width_multiplier", "image_size")
MAP_TYPES = ("l2", "feature")
FEATURE_BACKBONE, FEATURE_LAYERS, FEATURE_SIZE = "tf_efficientnet_lite0", (2, 3), 256  # map_type="feature"
# universal models that ship inside the package, by the name ``init`` accepts for them (how each was meta-trained:
# the .json beside it). "universal-cpu" is the default; "universal-cpu-second-order" is its second-order twin.
SHIPPED_UNIVERSAL = {
    name: Path(__file__).resolve().parents[2] / "weights" / f"metaformer_{name.replace('-', '_')}.safetensors"
    for name in ("universal-cpu", "universal-cpu-second-order")
}


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
    feature_extractor: Backbone | None = None
    prior_cache: dict[bytes, torch.Tensor] = field(default_factory=dict)


class Metaformer(nn.Module):
    """Metaformer anomaly detector: meta-tested from a universal model, scores by the reconstruction gap.

    ``configuration`` picks Table 3's variant: "A" (Î = Ĩ), "A+P" (Î = Ĩ ⊗ R) or "A+P+T" (Î = Ĩ ⊗ R').
    ``init`` is a universal checkpoint (safetensors, from ``metaad meta-train``) to adapt from, or the name of
    one shipped with metaad ("universal-cpu": A+P+T at the "cpu" preset's size, first-order MAML;
    "universal-cpu-second-order": the same, second order); None trains from scratch.
    ``fit`` adapts on defect-free images for ``adapt_epochs`` with Adam (§4: 30 meta-test epochs, lr 1e-4,
    batch 64), loss eq. (7) with λ = ``ssim_weight``. ``prior`` is the instance-prior weights file (None:
    metaad's shipped generator; "center-bias": a built-in stand-in); ``set_prior`` injects any module mapping
    (B, 3, H, W) images in [0, 1] to R (B, 1, H, W) in [0, 1]. P is frozen and not part of ``state_dict``
    (:class:`FrozenParts`).

    Anomaly map (``map_type``): "feature", the default, is the gap measured by a frozen EfficientNet-Lite0
    (offline weights, stages 2 and 3, I and Î seen at 256 px): 1 − cosine per location, upsampled, summed,
    smoothed with σ = 4. "l2", the paper's (and the "paper" preset's), is the squared error between I and Î
    (both in [0, 1]) averaged over RGB, Gaussian-smoothed with ``smoothing_sigma`` pixels (at 256 px; scaled
    with ``image_size``). The default was chosen on held-out MTD training images with synthetic surface
    defects, never test labels (``benchmarks/metaformer_map_validation.py``; figures and rule in
    ``benchmarks/NOTES.md``); it costs a Lite0 pass on I and Î per image. On featureless surfaces (smooth
    gradients, no texture) the backbone's responses are weak, the cosine gap is noisy and the image borders
    score highest: use "l2" there. Either map is resized to the input size; the image score is its maximum.
    The backbone, like P, is frozen and kept out of ``state_dict``.

    The defaults (= preset "cpu") adapt the universal model shipped with metaad ("universal-cpu": 64 px,
    width 1/8, batch 16, lr 1e-3, the size the "cpu" meta-training preset produces): Metaformer exists to
    adapt a meta-trained model, so that is what ``metaad fit --model metaformer --shots K`` does. Random
    initialisation is an explicit choice (``init=None``; ``--param init=null``). "paper" is §4: 256 px, full
    width, batch 64, lr 1e-4, the squared-error map, from ``init=None`` or a paper-preset universal model
    (``init=PATH``). Saves of metaad before the feature map was the default load with the map they had ("l2").

    Args:
        width_multiplier: channel width of A, P's and T's convolutions relative to Table 1 (1.0: the paper's).
        lr, batch_size: Adam's learning rate and batch size of the adaptation (§4: 1e-4, 64).
        seed: seeds the initial weights (when ``init`` is None) and the adaptation's order.
    """

    SAVED_WITHOUT: ClassVar[dict[str, object]] = {"map_type": "l2"}

    PRESETS: ClassVar[dict[str, dict]] = {
        "paper": {"width_multiplier": 1.0, "image_size": 256, "init": None, "batch_size": 64, "lr": 1e-4,
                  "map_type": "l2"},
        "cpu": {},
        "tiny": {"width_multiplier": 0.125, "image_size": 64, "init": None, "adapt_epochs": 1, "batch_size": 4,
                 "prior": "center-bias", "map_type": "l2"},  # no backbone pass; the feature map has its own tests
    }

    def __init__(
        self,
        configuration: str = "A+P+T", width_multiplier: float = 0.125,
        image_size: int = 64, init: str | None = "universal-cpu",
        adapt_epochs: int = 30, lr: float = 1e-3, batch_size: int = 16, ssim_weight: float = 0.1,
        prior: str | None = None, smoothing_sigma: float = 4.0, map_type: str = "feature", seed: int = 0,
    ) -> None:
        super().__init__()
        if map_type not in MAP_TYPES:
            raise ValueError(f"map_type must be one of {MAP_TYPES}, got {map_type!r}")
        if not width_multiplier > 0:
            raise ValueError(f"Metaformer width_multiplier must be > 0, got {width_multiplier}")
        if configuration not in CONFIGURATIONS:
            raise ValueError(f"Metaformer configuration must be one of {CONFIGURATIONS}, got {configuration!r}")
        self.configuration, self.width_multiplier = configuration, width_multiplier
        self.image_size, self.init = image_size, init
        self.adapt_epochs, self.lr, self.batch_size, self.ssim_weight = adapt_epochs, lr, batch_size, ssim_weight
        self.prior, self.smoothing_sigma, self.map_type, self.seed = prior, smoothing_sigma, map_type, seed
        self.preprocess = Preprocess(image_size)
        with torch.random.fork_rng():  # the initial weights depend on ``seed`` alone
            torch.manual_seed(seed)
            self.autoencoder = Autoencoder(width_multiplier, image_size)
            self.transformer = PriorTransformer(image_size, width_multiplier) if configuration == "A+P+T" else None
        self.register_buffer("fitted", torch.tensor(False))
        self.frozen = FrozenParts()

    def fit_summary(self) -> dict:
        return {}

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
        saved = json.loads(metadata["model"])
        mine = {name: getattr(self, name) for name in ARCHITECTURE_ARGS}
        if {name: saved.get(name) for name in ARCHITECTURE_ARGS} != mine:
            raise ValueError(f"{path}: universal model was meta-trained with {saved}, this Metaformer has {mine}")
        state = load_tensors(path)
        state["fitted"] = self.fitted.new_tensor(False)  # meta-trained, not yet adapted (the file has no flag)
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
        """Meta-testing (§3.1.1, eq. 6): adapt θ from ``init`` (or scratch) on defect-free images, with the
        shared training loop (``metaad.training``)."""
        if self.init is not None:  # a resumed adaptation's checkpoint then replaces these weights
            self.load_universal(self.init)
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
        anomaly = self.anomaly_map(self.preprocess(images))
        if anomaly.shape[-2:] != size:
            anomaly = F.interpolate(anomaly[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        return anomaly.flatten(1).amax(1), anomaly

    def predict(self, images: torch.Tensor | Iterable) -> AnomalyPrediction:
        """Scores (B,) and maps (B, H, W) at the input size, from images in [0, 1]."""
        return predict_in_batches(self, images, self.batch_size, self.export_forward, fitted=bool(self.fitted))
