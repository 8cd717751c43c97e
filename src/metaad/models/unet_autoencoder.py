"""A U-Net autoencoder (the MIAD paper's A.2.5 baseline: the MVTec AD paper's l2-AE and SSIM-AE, Bergmann et
al., CVPR 2019, with "a modified U-Net" as the network).

Pipeline: image → normalised with mean 0.5, std 0.5 → U-Net → reconstruction → anomaly map, per pixel the
squared error (``map_type="l2"``, the l2-AE) or 1 − local SSIM (``"ssim"``, the SSIM-AE, 11 × 11 Gaussian
window) → Gaussian smoothing → upsampled to the input; image score = the map's maximum.

A U-Net with a skip connection at every level learns the identity and then reconstructs defects too. This one
is kept from it in two ways: (1) skips only at the ``skips`` coarsest levels (default 1: at 1/8 resolution),
so fine detail has to pass the bottleneck; (2) it is trained to *restore* corrupted inputs: with
``corruption_probability`` an input gets a Perlin blob of a procedural texture (metaad's DRAEM simulator,
``metaad.components.anomaly_synthesis``, no texture data needed) while the target stays the clean image, so
copying the input through is penalised where it differs from good texture.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from metaad.components.anomaly_synthesis import check_anomaly_options, generate_textures, simulate_anomalies
from metaad.components.estimator import marking_fitted, predict_in_batches
from metaad.components.preprocess import Preprocess
from metaad.components.scaling import scaled_length
from metaad.components.smoothing import gaussian_blur
from metaad.components.ssim import ssim_loss, ssim_map, ssim_window_at
from metaad.training import train_model
from metaad.types import AnomalyPrediction, EpochEnd, TrainData, TrainingSettings

DEPTH = 4  # poolings: image_size must be a multiple of 16


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3×3 convolutions with batch norm and ReLU (a U-Net level)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """A U-Net of widths w, 2w, 4w, 8w and an 8w bottleneck at 1/16, whose decoder receives the encoder's
    features only at the ``skips`` coarsest levels (0: a plain encoder-decoder)."""

    def __init__(self, width: int, skips: int) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width, 8 * width]
        self.skips = skips
        self.encoder = nn.ModuleList([_block(3, widths[0])])
        self.encoder.extend(_block(widths[i], widths[i + 1]) for i in range(DEPTH))
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for level in range(DEPTH - 1, -1, -1):  # decoder, coarsest first
            skip = widths[level] if self.uses_skip(level) else 0
            self.ups.append(nn.ConvTranspose2d(widths[level + 1], widths[level], 2, stride=2))
            self.blocks.append(_block(widths[level] + skip, widths[level]))
        self.head = nn.Conv2d(widths[0], 3, 1)

    def uses_skip(self, level: int) -> bool:
        """Whether decoder level ``level`` (0 = full resolution) gets the encoder's features."""
        return level >= DEPTH - self.skips

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = []
        for index, block in enumerate(self.encoder):
            x = block(F.max_pool2d(x, 2) if index else x)
            features.append(x)
        x = features.pop()
        for level, up, block in zip(range(DEPTH - 1, -1, -1), self.ups, self.blocks, strict=True):
            x, skip = up(x), features.pop()
            x = block(torch.cat([x, skip], dim=1) if self.uses_skip(level) else x)
        return self.head(x)


class UNetAutoencoder(nn.Module):
    """l2-AE / SSIM-AE with a U-Net that restores corrupted inputs (MIAD A.2.5; see the module docstring).

    Args:
        image_size: the side images are resized to (A.2.5: 256); a multiple of 16.
        width: base width of the U-Net (widths w, 2w, 4w, 8w, 8w).
        skips: how many of the coarsest decoder levels get skip connections (0 … 4; 4 = a full U-Net, which
            tends to the identity).
        map_type: ``"l2"`` (squared error, trained with the L2 loss: l2-AE) or ``"ssim"`` (1 − SSIM, trained
            with the SSIM loss: SSIM-AE), as in the MVTec AD paper.
        corruption_probability: share of training images given a synthetic defect to restore (0: plain AE).
        corruption_colour, corruption_kinds: the corruptions' colour (``"auto"``: in luma on grey images)
            and kinds (textures, grey-level surface defects, or either), as DRAEM's ``anomaly_colour`` and
            ``anomaly_kinds`` (``metaad.components.anomaly_synthesis``).
        blur_sigma: Gaussian smoothing of the map, in pixels at 256 px, scaled with ``image_size`` (0: none,
            as the MVTec paper).
        ssim_window: the SSIM map's window at 256 px (the MVTec paper: 11), scaled with ``image_size``.
        epochs, batch_size, lr, weight_decay: training (A.2.5: 100 epochs, batch 16, Adam lr 1e-4, wd 5e-4).
        seed: seeds the initial weights, the training order and the corruptions.

    The default (= ``"cpu"``) is sized for 2 CPU cores: 128 px instead of 256, width 32 and 21 epochs instead
    of 100 at lr 1e-3 instead of 1e-4 (about 40 minutes for ~760 images on 2 cores), chosen on held-out
    training images with low-contrast synthetic defects among widths and sizes at equal CPU time
    (``benchmarks/NOTES.md``). What it gives up: defects below ~2 px at 128 px and a longer training.
    ``"paper"``: 256 px, width 64 (the usual U-Net width; A.2.5 gives none), 100 epochs. ``"tiny"``: tests.
    """

    SAVED_WITHOUT: ClassVar[dict[str, object]] = {}
    PRESETS: ClassVar[dict[str, dict]] = {
        "paper": {"image_size": 256, "width": 64, "epochs": 100, "batch_size": 16, "lr": 1e-4,
                  "corruption_colour": "as_is", "corruption_kinds": "textures"},
        "cpu": {},
        "tiny": {"image_size": 64, "width": 8, "epochs": 3, "batch_size": 4, "lr": 3e-3},
    }

    def __init__(
        self,
        image_size: int = 128, width: int = 32, skips: int = 1,
        map_type: str = "l2", corruption_probability: float = 0.5, corruption_colour: str = "auto",
        corruption_kinds: str = "mixed", blur_sigma: float = 4.0, ssim_window: int = 11,
        epochs: int = 21, batch_size: int = 16, lr: float = 1e-3, weight_decay: float = 5e-4, seed: int = 0,
    ) -> None:
        super().__init__()
        if map_type not in ("l2", "ssim"):
            raise ValueError(f"map_type must be 'l2' or 'ssim', got {map_type!r}")
        if not isinstance(image_size, int) or image_size < 2**DEPTH or image_size % 2**DEPTH:
            raise ValueError(f"image_size must be a multiple of {2**DEPTH} pixels, got {image_size!r}")
        if not 0 <= skips <= DEPTH:
            raise ValueError(f"skips must be in 0 … {DEPTH}, got {skips}")
        self.image_size, self.width, self.skips = image_size, width, skips
        check_anomaly_options(corruption_colour, corruption_kinds, ("corruption_colour", "corruption_kinds"))
        if not isinstance(ssim_window, int) or ssim_window < 3:
            raise ValueError(f"ssim_window must be an odd number of pixels of at least 3, got {ssim_window!r}")
        self.map_type, self.corruption_probability, self.blur_sigma = map_type, corruption_probability, blur_sigma
        self.corruption_colour, self.corruption_kinds, self.ssim_window = (
            corruption_colour, corruption_kinds, ssim_window)
        self.epochs, self.batch_size, self.lr, self.weight_decay, self.seed = epochs, batch_size, lr, weight_decay, seed
        self.preprocess = Preprocess(image_size)
        with torch.random.fork_rng(devices=[]):  # same seed, same initial weights; the global RNG is untouched
            torch.manual_seed(seed)
            self.unet = UNet(width, skips)
        self.register_buffer("fitted", torch.tensor(False))

    def fit_summary(self) -> dict:
        return {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The reconstruction in [0, 1] space of images in [0, 1] (normalised with mean 0.5, std 0.5 inside)."""
        return self.unet((images - 0.5) / 0.5) * 0.5 + 0.5

    # ----------------------------------------------------------------------------------------- training
    def training_settings(self) -> TrainingSettings:
        """A.2.5: Adam with weight decay 5e-4; no schedule."""
        return TrainingSettings(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, optimizer="adam",
                                weight_decay=self.weight_decay, seed=self.seed)

    def training_loss(self, images: torch.Tensor) -> torch.Tensor:
        """L2 (in the normalised space) or SSIM loss between the reconstruction of a possibly corrupted input
        and the clean image."""
        clean = self.preprocess(images)
        corrupted = clean
        if self.corruption_probability > 0:
            textures = generate_textures(len(clean), clean.shape[-2:])
            corrupted, _ = simulate_anomalies(clean, textures, probability=self.corruption_probability,
                                              colour=self.corruption_colour, kinds=self.corruption_kinds)
        reconstruction = self(corrupted)
        if self.map_type == "ssim":
            window, sigma = ssim_window_at(self.image_size, self.ssim_window)
            return ssim_loss(reconstruction, clean, window_size=window, sigma=sigma)
        return F.mse_loss(reconstruction / 0.5, clean / 0.5)

    def fit(self, train: TrainData, *, progress: bool = False, workdir: str | Path | None = None,
            resume: bool = False, on_epoch_end: EpochEnd | None = None) -> UNetAutoencoder:
        """Train the U-Net on defect-free images."""
        train_model(self, train, progress=progress, workdir=workdir, resume=resume,
                    on_epoch_end=marking_fitted(self, on_epoch_end))
        self.fitted.fill_(True)
        return self.eval()

    # ------------------------------------------------------------------------------------------ predict
    def residual_map(self, images: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) per-pixel anomaly: squared error summed over channels, or 1 − SSIM (mean of channels;
        the images are reflect-padded so that the map keeps their size)."""
        if self.map_type == "l2":
            return (images - reconstruction).square().sum(1, keepdim=True)
        window, sigma = ssim_window_at(self.image_size, self.ssim_window)
        padded = [F.pad(x, (window // 2,) * 4, mode="reflect") for x in (images, reconstruction)]
        return 1 - ssim_map(*padded, window_size=window, sigma=sigma).mean(1, keepdim=True)

    def export_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (B,) (the map's maximum) and maps (B, H, W) of one batch."""
        resized = self.preprocess(images)
        sigma = scaled_length(self.blur_sigma, self.image_size)
        residual = gaussian_blur(self.residual_map(resized, self(resized)), sigma)
        maps = F.interpolate(residual, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return maps.flatten(1).amax(1), maps

    def predict(self, images: torch.Tensor) -> AnomalyPrediction:
        """Scores (B,) (the map's maximum) and maps (B, H, W) for images in [0, 1]."""
        return predict_in_batches(self, images, self.batch_size, self.export_forward, fitted=bool(self.fitted))
