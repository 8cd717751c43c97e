"""Reverse Distillation (Deng & Li, "Anomaly Detection via Reverse Distillation from One-Class Embedding",
CVPR 2022; the MIAD paper's A.2.1 setting as the ``"paper"`` preset).

A frozen teacher encoder E gives maps at strides 4, 8 and 16 (§3.1). A trained one-class bottleneck
embedding (OCBE, §3.2) fuses them into one compact map at stride 32, and a trained student decoder D
(§3.1) rebuilds the teacher's three maps from it. The student only learns to rebuild defect-free
features, so where it disagrees with the teacher (1 − cosine similarity per location, §3.3) there is
an anomaly. Pipeline: teacher → OCBE (multi-scale fusion + residual block) → decoder → cosine maps →
upsample, sum, Gaussian σ = 4 → image score = the map's maximum.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from metaad.backbones import Backbone
from metaad.components.estimator import marking_fitted, predict_in_batches
from metaad.components.feature_cache import FrozenFeatures, frozen_part_key
from metaad.components.preprocess import Preprocess
from metaad.components.smoothing import gaussian_blur
from metaad.training.data import TrainImages
from metaad.training.loop import train_model
from metaad.types import AnomalyPrediction, EpochEnd, TrainData, TrainingSettings, device_of


def _conv_bn(in_channels: int, out_channels: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    """3×3 convolution, batch norm and (optionally) ReLU."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """A ResNet basic block; ``up=True`` doubles the resolution (the decoder's transposed-convolution block),
    ``stride=2`` halves it (the OCBE's block)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, up: bool = False) -> None:
        super().__init__()
        if up:
            first: nn.Module = nn.ConvTranspose2d(in_channels, out_channels, 2, 2, bias=False)
            shortcut: nn.Module = nn.ConvTranspose2d(in_channels, out_channels, 2, 2, bias=False)
        else:
            first = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
            shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
        self.body = nn.Sequential(
            first, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True), _conv_bn(out_channels, out_channels, relu=False)
        )
        changes = up or stride != 1 or in_channels != out_channels
        self.shortcut = nn.Sequential(shortcut, nn.BatchNorm2d(out_channels)) if changes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """The one-class bottleneck embedding (§3.2, the reference code's ``BN_layer``).

    Each teacher map but the deepest is brought to the deepest one's stride with strided 3×3 convolutions
    (halving the resolution each time); the maps are concatenated and residual blocks, the first of stride 2,
    compress them to one compact map at twice the deepest stride.
    """

    def __init__(self, channels: list[int], reductions: list[int], width: int, blocks: int) -> None:
        super().__init__()
        deepest = reductions[-1]
        self.align = nn.ModuleList()
        for c, r in zip(channels[:-1], reductions[:-1], strict=True):
            steps, layers, current = (deepest // r).bit_length() - 1, [], c
            for _ in range(steps):  # the reference doubles the channels at every halving
                layers.append(_conv_bn(current, current * 2, stride=2))
                current *= 2
            self.align.append(nn.Sequential(*layers))
        fused = sum(c * (deepest // r) for c, r in zip(channels, reductions, strict=True))
        self.fuse = nn.Sequential(
            ResidualBlock(fused, width, stride=2), *[ResidualBlock(width, width) for _ in range(blocks - 1)]
        )

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        aligned = [align(f) for align, f in zip(self.align, features[:-1], strict=True)] + [features[-1]]
        return self.fuse(torch.cat(aligned, dim=1))


class Decoder(nn.Module):
    """The student decoder (§3.1), the teacher reversed: one upsampling stage per teacher map, deepest first.

    Each stage doubles the resolution with a transposed-convolution residual block (then ``blocks − 1``
    plain ones) at its own width (``widths``, shallowest first; the reference's equal the teacher's). The
    stage's map is read out through a 1×1 convolution to the teacher map's channels, because the teacher's maps
    are signed (EfficientNet stages end without an activation) while the blocks end in a ReLU; the next stage
    continues from the block's output.
    """

    def __init__(self, in_channels: int, channels: list[int], widths: list[int], blocks: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList()
        self.heads = nn.ModuleList()
        current = in_channels
        for c, w in zip(reversed(channels), reversed(widths), strict=True):
            self.stages.append(
                nn.Sequential(ResidualBlock(current, w, up=True), *[ResidualBlock(w, w) for _ in range(blocks - 1)])
            )
            self.heads.append(nn.Conv2d(w, c, 1))
            current = w

    def forward(self, embedding: torch.Tensor) -> list[torch.Tensor]:
        """The rebuilt maps, shallowest first (the teacher's order)."""
        maps, x = [], embedding
        for stage, head in zip(self.stages, self.heads, strict=True):
            x = stage(x)
            maps.append(head(x))
        return maps[::-1]


class ReverseDistillation(nn.Module):
    """Reverse Distillation: teacher encoder → one-class bottleneck → student decoder (Deng & Li, CVPR 2022).

    Args:
        backbone: the teacher, a timm architecture (default: the offline EfficientNet-Lite0; the paper's is
            ``"wide_resnet50_2"``, which needs ``weights=PATH``).
        layers: the teacher's stages (indices into timm's ``feature_info``) at strides 4, 8 and 16.
        weights: a local weights file for the teacher (None: its offline package).
        image_size: the side images are resized to (A.2.1: 256).
        bottleneck_channels: width of the OCBE's compact map (the reference: 2048 for WideResNet-50).
        bottleneck_blocks: residual blocks of the OCBE (the reference: 3).
        decoder_channels: the decoder stages' widths, shallowest first (default 64/128/256; None: the teacher's
            channels, as the reference, whose WideResNet-50 teacher is 256/512/1024 wide; Lite0's 24/40/112 leave
            a student too narrow to rebuild normal features). 1×1 heads map each stage back to the teacher's
            channels.
        decoder_blocks: residual blocks per decoder stage (the reference: 3, 4, 6 for ResNet-50 layers).
        loss_stages, map_stages: which of the teacher's maps (positions in ``layers``) enter the loss and the
            anomaly map (default: the deepest, stride 16, alone; None: all, as the paper).
        loss: "flat" (the reference code: 1 − cosine between whole maps flattened into one vector per image,
            §3.3's L_KD computed as in its released code) or "local" (the paper's eq. 1-2: the mean over
            locations of the per-location 1 − cosine). "flat" is the default: it is what the published
            figures were produced with, and the per-location form is reported to reproduce worse.
        epochs, batch_size, lr, betas: training (A.2.1: Adam, lr 0.005, betas (0.5, 0.999), batch 32;
            the reference trains 200 epochs).
        blur_sigma: Gaussian smoothing of the anomaly map (§4.1: σ = 4).
        standardize_images: "auto" (default), "always" or "never" (the paper): PatchCore's exposure
            standardisation before the teacher (``metaad.components.preprocess.Preprocess``). A metaad addition.
        seed: seeds the trainable layers' initialisation and the training order.

    The default is a student sized for EfficientNet-Lite0 and 2 cores: decoder 64/128/256 wide, a 256-wide
    bottleneck of 3 blocks, loss and map on the stride-16 stage, 12 epochs on cached teacher maps. It was
    chosen among candidates listed in advance on held-out defect-free MTD training images with low-contrast
    synthetic defects (``benchmarks/epoch_validation.py --defects subtle``; no test image read; the rule and
    the figures are in ``benchmarks/NOTES.md``). The stride-16 stage carries most of the signal on Lite0; the
    shallower maps' student errors mostly add noise.
    Presets: ``"paper"`` (A.2.1 with the reference's widths: WideResNet-50 teacher, needs ``weights=PATH``;
    all stages; no standardisation), ``"cpu"`` (the defaults) and ``"tiny"`` (tests).
    """

    SAVED_WITHOUT: ClassVar[dict[str, object]] = {"decoder_channels": None, "loss_stages": None, "map_stages": None}
    PRESETS: ClassVar[dict[str, dict]] = {
        "paper": {
            "backbone": "wide_resnet50_2",
            "image_size": 256,
            "bottleneck_channels": 2048,
            "bottleneck_blocks": 3,
            "decoder_channels": None,
            "decoder_blocks": 3,
            "loss_stages": None,
            "map_stages": None,
            "epochs": 200,
            "batch_size": 32,
            "standardize_images": "never",
        },
        "cpu": {},
        "tiny": {"image_size": 64, "bottleneck_channels": 64, "bottleneck_blocks": 1, "decoder_blocks": 1, "epochs": 2,
                 "batch_size": 4},
    }

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0", layers: tuple[int, ...] = (1, 2, 3), weights: str | None = None,
        image_size: int = 256,
        bottleneck_channels: int = 256, bottleneck_blocks: int = 3,
        decoder_channels: tuple[int, ...] | None = (64, 128, 256), decoder_blocks: int = 2,
        loss_stages: tuple[int, ...] | None = (2,), map_stages: tuple[int, ...] | None = (2,),
        loss: str = "flat",
        epochs: int = 12, batch_size: int = 16, lr: float = 0.005, betas: tuple[float, float] = (0.5, 0.999),
        blur_sigma: float = 4.0, standardize_images: str = "auto", seed: int = 0,
    ) -> None:
        super().__init__()
        if loss not in ("flat", "local"):
            raise ValueError(f"loss must be 'flat' or 'local', got {loss!r}")
        if not isinstance(image_size, int) or image_size < 32:
            raise ValueError(f"image_size must be an integer of at least 32 pixels, got {image_size!r}")
        if bottleneck_blocks < 1 or decoder_blocks < 1:
            raise ValueError(f"need at least one block, got {bottleneck_blocks} and {decoder_blocks}")
        self.backbone, self.layers, self.weights = backbone, tuple(layers), weights
        self.image_size = image_size
        self.bottleneck_channels, self.bottleneck_blocks = bottleneck_channels, bottleneck_blocks
        self.decoder_channels = tuple(decoder_channels) if decoder_channels is not None else None
        self.decoder_blocks = decoder_blocks
        self.loss_stages = tuple(loss_stages) if loss_stages is not None else None
        self.map_stages = tuple(map_stages) if map_stages is not None else None
        self.loss = loss
        self.epochs, self.batch_size, self.lr, self.betas = epochs, batch_size, lr, tuple(betas)
        self.blur_sigma, self.standardize_images, self.seed = blur_sigma, standardize_images, seed
        self.teacher = Backbone(backbone, self.layers)
        self.preprocess = Preprocess(image_size, standardize_images, self.teacher.normalization)
        channels, reductions = self.teacher.channels, self.teacher.reductions
        if any(b != 2 * a for a, b in itertools.pairwise(reductions)):
            raise ValueError(f"the teacher's layers must each halve the resolution, got strides {reductions}")
        if image_size % (2 * reductions[-1]):
            raise ValueError(f"image_size must be a multiple of {2 * reductions[-1]}, got {image_size}")
        widths = list(self.decoder_channels) if self.decoder_channels is not None else channels
        if len(widths) != len(channels):
            raise ValueError(f"decoder_channels needs one width per teacher layer ({len(channels)}), got {widths}")
        for name, stages in (("loss_stages", self.loss_stages), ("map_stages", self.map_stages)):
            if stages is not None and (not stages or any(not 0 <= i < len(channels) for i in stages)):
                raise ValueError(f"{name} must list positions in layers (0 to {len(channels) - 1}), got {stages}")
        with torch.random.fork_rng(devices=[]):  # same seed, same initial weights; the global RNG is untouched
            torch.manual_seed(seed)
            self.bottleneck = Bottleneck(channels, reductions, bottleneck_channels, bottleneck_blocks)
            self.decoder = Decoder(bottleneck_channels, channels, widths, decoder_blocks)
        self.register_buffer("fitted", torch.tensor(False))

    def fit_summary(self) -> dict:
        return self.preprocess.fit_summary()

    # ------------------------------------------------------------------------------------------ features
    @torch.no_grad()
    def teacher_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen teacher's maps of (B, 3, H, W) images in [0, 1] (what the feature cache holds)."""
        return [t.contiguous() for t in self.teacher(self.preprocess(images))]

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Teacher maps and the student's rebuilt maps for (B, 3, H, W) images in [0, 1]."""
        teacher = self.teacher_maps(images)
        return teacher, self.decoder(self.bottleneck(teacher))

    # ----------------------------------------------------------------------------------------- training
    def training_settings(self) -> TrainingSettings:
        """A.2.1: Adam, lr 0.005, betas (0.5, 0.999); no schedule, no augmentation."""
        return TrainingSettings(
            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, optimizer="adam", betas=self.betas,
            seed=self.seed,
        )

    def training_loss(self, teacher: list[torch.Tensor]) -> torch.Tensor:
        """L_KD (§3.3) from a batch of the teacher's maps: the sum over ``loss_stages`` of 1 − cosine similarity
        (see ``loss`` for the two forms)."""
        student = self.decoder(self.bottleneck(teacher))
        total = teacher[0].new_zeros(())
        for i, (t, s) in enumerate(zip(teacher, student, strict=True)):
            if self.loss_stages is not None and i not in self.loss_stages:
                continue
            if self.loss == "flat":
                total = total + (1 - F.cosine_similarity(t.flatten(1), s.flatten(1), dim=1)).mean()
            else:
                total = total + (1 - F.cosine_similarity(t, s, dim=1)).mean()
        return total

    def fit(self, train: TrainData, *, progress: bool = False, workdir: str | Path | None = None,
            resume: bool = False, on_epoch_end: EpochEnd | None = None) -> ReverseDistillation:
        """Train the bottleneck and the decoder on defect-free images (the teacher stays frozen, so its maps are
        computed once: ``metaad.components.feature_cache``)."""
        self.teacher.load_weights(self.weights)
        train = TrainImages.from_data(train)
        self.preprocess.measure(train.batches())
        features = FrozenFeatures(self, self.teacher_maps, train, frozen_part_key(self.teacher, self.preprocess),
                                  device=device_of(self))
        train_model(self, features, progress=progress, workdir=workdir, resume=resume,
                    on_epoch_end=marking_fitted(self, on_epoch_end))
        self.fitted.fill_(True)
        return self.eval()

    # ------------------------------------------------------------------------------------------ predict
    @torch.inference_mode()
    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W) maps at the input's size: sum over ``map_stages`` of the upsampled 1 − cosine, Gaussian σ."""
        size = images.shape[-2:]
        teacher, student = self(images)
        total = images.new_zeros(images.shape[0], 1, *size)
        for i, (t, s) in enumerate(zip(teacher, student, strict=True)):
            if self.map_stages is not None and i not in self.map_stages:
                continue
            distance = 1 - F.cosine_similarity(t, s, dim=1).unsqueeze(1)
            total += F.interpolate(distance, size=size, mode="bilinear", align_corners=False)
        return gaussian_blur(total, self.blur_sigma)[:, 0]

    def export_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores (B,), the map's maximum, and anomaly maps (B, H, W) of one batch."""
        maps = self.anomaly_maps(images)
        return maps.flatten(1).amax(1), maps

    def predict(self, images: torch.Tensor) -> AnomalyPrediction:
        """Image scores (B,) (the map's maximum) and anomaly maps (B, H, W) for images in [0, 1]."""
        return predict_in_batches(self, images, self.batch_size, self.export_forward, fitted=bool(self.fitted))
