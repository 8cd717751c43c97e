"""DRAEM (Zavrtanik et al., "DRAEM - A discriminatively trained reconstruction embedding for surface anomaly
detection", ICCV 2021; the MIAD paper's A.2.4 setting as the ``"paper"`` preset).

Training needs no real defect: each defect-free image gets, with probability ½, a simulated anomaly (a Perlin
blob filled with an augmented texture, ``metaad.components.anomaly_synthesis``, §3.3). A reconstructive
sub-network (an encoder-decoder without skips, §3.1) learns to restore the defect-free image (L2 + SSIM
loss); a discriminative sub-network (a U-Net on the simulated image and its reconstruction, concatenated,
§3.2) learns to segment the simulated anomaly (focal loss, γ = 2). Pipeline at test time: image →
reconstruction → U-Net → softmax anomaly channel = the map; image score = the maximum of the map after a
21 × 21 mean filter (the reference code ``vitjanz/draem``, ``test_DRAEM.py``; anomalib takes the maximum of
the unfiltered map instead, which reacts to single-pixel outliers).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from metaad.components.anomaly_synthesis import (
    TextureSource,
    augment_textures,
    check_anomaly_options,
    rotate_images,
    simulate_anomalies,
)
from metaad.components.estimator import marking_fitted, predict_in_batches
from metaad.components.preprocess import Preprocess
from metaad.components.scaling import scaled_window
from metaad.components.ssim import ssim_loss, ssim_window_at
from metaad.training import train_model
from metaad.types import AnomalyPrediction, EpochEnd, TrainData, TrainingSettings

DEPTH = 5  # the discriminative encoder halves the resolution five times: image_size must be a multiple of 32


def _block(in_channels: int, out_channels: int, narrow_last: bool = False) -> nn.Sequential:
    """Two 3×3 convolutions with batch norm and ReLU (every block of both reference sub-networks); the width
    changes at the first convolution, or at the last with ``narrow_last`` (the reconstructive decoder's)."""
    middle = in_channels if narrow_last else out_channels
    return nn.Sequential(
        nn.Conv2d(in_channels, middle, 3, padding=1), nn.BatchNorm2d(middle), nn.ReLU(inplace=True),
        nn.Conv2d(middle, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
    )


def _up(in_channels: int, out_channels: int) -> nn.Sequential:
    """Bilinear ×2 upsampling, then a 3×3 convolution with batch norm and ReLU."""
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
        nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
    )


class ReconstructiveNetwork(nn.Module):
    """The reconstructive sub-network (§3.1): five blocks of widths w, 2w, 4w, 8w, 8w with max pooling between,
    mirrored by a decoder, and no skip connection (so the anomaly cannot be copied through)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width, 8 * width]
        self.encoder = nn.ModuleList([_block(3, widths[0])])
        self.encoder.extend(_block(a, b) for a, b in itertools.pairwise(widths))
        self.decoder = nn.Sequential(*[
            layer for a, b in [(widths[4], widths[2]), (widths[2], widths[1]), (widths[1], widths[0]),
                               (widths[0], widths[0])]
            for layer in (_up(a, a), _block(a, b, narrow_last=True))
        ])
        self.head = nn.Conv2d(widths[0], 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, block in enumerate(self.encoder):
            x = block(F.max_pool2d(x, 2) if index else x)
        return self.head(self.decoder(x))


class DiscriminativeNetwork(nn.Module):
    """The discriminative sub-network (§3.2): a U-Net of six encoder blocks (w, 2w, 4w, 8w, 8w, 8w) with
    skip connections into the decoder; two output channels (good, anomalous) as logits."""

    def __init__(self, width: int, in_channels: int = 6) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width, 8 * width, 8 * width]
        self.encoder = nn.ModuleList([_block(in_channels, widths[0])])
        self.encoder.extend(_block(a, b) for a, b in itertools.pairwise(widths))
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        current = widths[-1]
        skip_widths, out_widths = widths[-2::-1], [8 * width, 4 * width, 2 * width, width, width]  # the reference's
        for skip, out in zip(skip_widths, out_widths, strict=True):  # from the deepest skip to the finest
            self.ups.append(_up(current, out))
            self.blocks.append(_block(out + skip, out))
            current = out
        self.head = nn.Conv2d(widths[0], 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for index, block in enumerate(self.encoder):
            x = block(F.max_pool2d(x, 2) if index else x)
            skips.append(x)
        x = skips.pop()
        for up, block in zip(self.ups, self.blocks, strict=True):
            x = block(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


def reference_init(module: nn.Module) -> None:
    """The reference's ``weights_init``: convolution weights N(0, 0.02); batch norm weights N(1, 0.02), bias 0."""
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def focal_loss(logits: torch.Tensor, masks: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) of (B, 2, H, W) logits against (B, 1, H, W) 0/1 masks, mean over pixels
    (the reference's ``FocalLoss`` without class weights, its targets smoothed by 1e-5)."""
    log_p = F.log_softmax(logits, dim=1).gather(1, masks.long())
    p = log_p.exp().clamp(1e-5, 1 - 1e-5)
    return (-((1 - p) ** gamma) * p.log()).mean()


class Draem(nn.Module):
    """DRAEM: simulated anomalies, a reconstructive and a discriminative sub-network (Zavrtanik et al. 2021).

    Args:
        image_size: the side images are resized to (A.2.4: 256); a multiple of 32.
        reconstructive_width: base width of the reconstructive sub-network (the reference: 128).
        discriminative_width: base width of the discriminative U-Net (the reference: 64).
        texture_dir: a folder of anomaly-source images, searched at any depth (A.2.4: DTD,
            ``../shared/data/dtd``); None: procedural textures generated by metaad (no data needed).
        anomaly_probability: share of training images that get a simulated anomaly (the reference: 0.5).
        anomaly_colour: ``"auto"``: on grey images the textures are taken in luma, so that colour alone
            cannot tell a simulated anomaly (``"as_is"``: the paper's coloured textures everywhere).
        anomaly_kinds: ``"textures"`` (§3.3's Perlin-masked textures), ``"surface"`` (low-contrast grey-level
            cracks, pits, stains, shading) or ``"mixed"`` (either, even odds): ``anomaly_synthesis``.
        score_window: the mean filter before the image score's maximum, in pixels at 256 px (the reference:
            21), scaled with ``image_size``.
        rotation, rotation_probability: defect-free images are rotated by an angle in (−rotation, rotation)
            with this probability (A.2.4: ±45°; the reference code: probability 0.3).
        epochs, batch_size, lr: training (A.2.4: 700 epochs, batch 8, Adam lr 1e-4 × 0.2 at 80% and 90%).
        seed: seeds the initial weights, the training order and the simulated anomalies.

    The default (= ``"cpu"``) is the reference architecture narrowed for 2 CPU cores: widths 16 and 16 instead
    of 128 and 64, 128 px instead of 256, and 34 epochs at lr 1e-3 instead of 700 at 1e-4 (a short schedule
    needs the larger step). Width, size and epochs were chosen together at equal CPU time on held-out training
    images with low-contrast defects (``benchmarks/issue29_grid.sh``; rule and figures in
    ``benchmarks/NOTES.md``); 34 epochs are what fits about 40 minutes on ~760 images on 2 cores.
    What it gives up: the reconstruction of fine texture (a narrow network blurs; the discriminative network
    then has to tell blur from defect), defects smaller than ~2 px at 128 px, and the long schedule the
    reference relies on for precise segmentation.
    ``"tiny"`` (32 px, widths 4 and 8, 15 epochs at lr 2e-3) is for tests.
    """

    augments_inputs: ClassVar[bool] = True  # simulated anomalies: no feature cache
    SAVED_WITHOUT: ClassVar[dict[str, object]] = {}
    PRESETS: ClassVar[dict[str, dict]] = {
        "paper": {"image_size": 256, "reconstructive_width": 128, "discriminative_width": 64, "epochs": 700,
                  "batch_size": 8, "lr": 1e-4, "anomaly_colour": "as_is", "anomaly_kinds": "textures"},
        "cpu": {},
        "tiny": {"image_size": 32, "reconstructive_width": 4, "discriminative_width": 8, "epochs": 15,
                 "batch_size": 4, "lr": 2e-3},
    }

    def __init__(
        self,
        image_size: int = 128, reconstructive_width: int = 16, discriminative_width: int = 16,
        texture_dir: str | None = None, anomaly_probability: float = 0.5,
        anomaly_colour: str = "auto", anomaly_kinds: str = "mixed", score_window: int = 21,
        rotation: float = 45.0, rotation_probability: float = 0.3,
        epochs: int = 34, batch_size: int = 8, lr: float = 1e-3, seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(image_size, int) or image_size < 32 or image_size % 2**DEPTH:
            raise ValueError(f"image_size must be a multiple of {2**DEPTH} pixels, got {image_size!r}")
        if reconstructive_width < 1 or discriminative_width < 1:
            raise ValueError(f"widths must be positive, got {reconstructive_width}, {discriminative_width}")
        self.image_size, self.reconstructive_width = image_size, reconstructive_width
        self.discriminative_width = discriminative_width
        self.texture_dir = str(texture_dir) if texture_dir is not None else None
        check_anomaly_options(anomaly_colour, anomaly_kinds, ("anomaly_colour", "anomaly_kinds"))
        if not isinstance(score_window, int) or score_window < 1:
            raise ValueError(f"score_window must be a positive number of pixels, got {score_window!r}")
        self.anomaly_probability, self.anomaly_colour, self.anomaly_kinds = (
            anomaly_probability, anomaly_colour, anomaly_kinds)
        self.score_window = score_window
        self.rotation, self.rotation_probability = rotation, rotation_probability
        self.epochs, self.batch_size, self.lr, self.seed = epochs, batch_size, lr, seed
        self.preprocess = Preprocess(image_size)
        with torch.random.fork_rng(devices=[]):  # same seed, same initial weights; the global RNG is untouched
            torch.manual_seed(seed)
            self.reconstructive = ReconstructiveNetwork(reconstructive_width)
            self.discriminative = DiscriminativeNetwork(discriminative_width)
            self.apply(reference_init)
        self.register_buffer("fitted", torch.tensor(False))
        self._textures: TextureSource | None = None  # listed at the first training step, not here

    def fit_summary(self) -> dict:
        return {}

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction and segmentation logits (B, 2, S, S) of images in [0, 1] already at S = image_size."""
        reconstruction = self.reconstructive(images)
        return reconstruction, self.discriminative(torch.cat([reconstruction, images], dim=1))

    # ----------------------------------------------------------------------------------------- training
    def training_settings(self) -> TrainingSettings:
        """A.2.4: Adam, lr 1e-4, multiplied by 0.2 after 80% and 90% of the epochs."""
        return TrainingSettings(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, optimizer="adam",
                                lr_milestones=(0.8, 0.9), lr_gamma=0.2, seed=self.seed)

    def simulate(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(defect-free targets, simulated images, masks) for a batch in [0, 1], at ``image_size``: rotation,
        then anomalies from augmented textures (global RNG, re-seeded by the loop every epoch)."""
        if self._textures is None:
            self._textures = TextureSource(self.texture_dir)
        good = rotate_images(self.preprocess(images), self.rotation, self.rotation_probability)
        textures = augment_textures(self._textures.sample(len(good), good.shape[-2:]))
        simulated, masks = simulate_anomalies(good, textures, probability=self.anomaly_probability,
                                              colour=self.anomaly_colour, kinds=self.anomaly_kinds)
        return good, simulated, masks

    def training_loss(self, images: torch.Tensor) -> torch.Tensor:
        """L2 + SSIM loss of the reconstruction against the defect-free image, + focal loss (γ = 2) of the
        segmentation against the simulated mask (§3.4; the reference weighs the three terms equally)."""
        good, simulated, masks = self.simulate(images)
        reconstruction, logits = self(simulated)
        window, sigma = ssim_window_at(self.image_size)  # 11 taps at 256 px
        return (F.mse_loss(reconstruction, good) + ssim_loss(reconstruction, good, window_size=window, sigma=sigma)
                + focal_loss(logits, masks))

    def fit(self, train: TrainData, *, progress: bool = False, workdir: str | Path | None = None,
            resume: bool = False, on_epoch_end: EpochEnd | None = None) -> Draem:
        """Train both sub-networks on defect-free images with simulated anomalies."""
        train_model(self, train, progress=progress, workdir=workdir, resume=resume,
                    on_epoch_end=marking_fitted(self, on_epoch_end))
        self.fitted.fill_(True)
        return self.eval()

    # ------------------------------------------------------------------------------------------ predict
    def export_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (B,): max of the mean-filtered map (21 × 21 at 256 px); maps (B, H, W): the anomaly channel's
        softmax."""
        _, logits = self(self.preprocess(images))
        anomalous = logits.softmax(dim=1)[:, 1:]
        # the reference: avg_pool2d(21, stride 1, padding 10), zero padding counted at the border
        window = scaled_window(self.score_window, self.image_size)
        scores = F.avg_pool2d(anomalous, window, stride=1, padding=window // 2).flatten(1).amax(1)
        return scores, F.interpolate(anomalous, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]

    def predict(self, images: torch.Tensor) -> AnomalyPrediction:
        """Scores and maps (see :meth:`export_forward`) for (B, 3, H, W) images in [0, 1]."""
        return predict_in_batches(self, images, self.batch_size, self.export_forward, fitted=bool(self.fitted))
