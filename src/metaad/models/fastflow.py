"""FastFlow (Yu et al., "FastFlow: Unsupervised Anomaly Detection and Localization via 2D Normalizing Flows",
arXiv 2111.07677, 2021; MIAD A.2.3).

The pipeline, top to bottom: frozen backbone -> the feature maps of three stages -> a trainable layer norm per
stage (over C, H, W, as the reference code) -> per stage a 2-D normalizing flow (§3.2: steps of affine coupling
with clamped scales whose subnets are small convolutional networks, 3×3 and 1×1 kernels alternating, §3.3) that
maps the features to a standard normal z. Training maximises the likelihood of defect-free features (§3.1). The
anomaly map is the mean over stages of -exp(-½·mean_c z²) upsampled to the input (the reference code and
anomalib); the image score is the maximum of the map, as in anomalib (the paper gives no image score).

The flows are built with FrEIA (``SequenceINN`` of ``AllInOneBlock``: affine coupling, clamping 2.0, a fixed
hard channel permutation and a global affine scaling per step), as the reference implementations are.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metaad.backbones import create_backbone
from metaad.data.transforms import exposure_variation, standardize_intensity, standardizing
from metaad.training import train_model
from metaad.training.data import TrainImages
from metaad.types import AnomalyPrediction, NotFittedError, TrainData, TrainingSettings, device_of


def subnet(kernel_size: int, hidden_ratio: float):
    """The coupling subnet of one flow step (§3.3): conv k×k -> ReLU -> conv k×k, 'same' padding."""

    def build(in_channels: int, out_channels: int) -> nn.Module:
        hidden = max(1, int(in_channels * hidden_ratio))
        return nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size, padding="same"),
            nn.ReLU(),
            nn.Conv2d(hidden, out_channels, kernel_size, padding="same"),
        )

    return build


def flow_2d(shape: tuple[int, int, int], steps: int, conv3x3_only: bool, hidden_ratio: float,
            clamp: float) -> Ff.SequenceINN:
    """A 2-D normalizing flow of ``steps`` affine coupling steps over (C, H, W) features (§3.2, §3.3).

    Odd steps use 1×1 subnets unless ``conv3x3_only``. FrEIA draws each step's channel permutation from
    numpy's global generator: seed it (see :meth:`FastFlow._build_trainable`).
    """
    flow = Ff.SequenceINN(*shape)
    for step in range(steps):
        kernel = 1 if step % 2 == 1 and not conv3x3_only else 3
        flow.append(Fm.AllInOneBlock, subnet_constructor=subnet(kernel, hidden_ratio), affine_clamping=clamp,
                    permute_soft=False)
    return flow


class FastFlow(nn.Module):
    """FastFlow anomaly detector: 2-D normalizing flows on frozen backbone features (see the module docstring).

    Args:
        backbone: timm architecture of the frozen feature extractor.
        layers: the stages whose features each get a flow (the paper: the first three blocks). EfficientNet-Lite0
            stages 1, 2, 3 have strides 4, 8, 16 and 24, 40, 112 channels.
        weights: backbone weights (None = offline ImageNet package; a path; or "hub").
        image_size: side of the square images are resized to (A.2.3: 256 px); the layer norms' shapes depend
            on it. Maps come back at the input's size.
        flow_steps: coupling steps per flow (A.2.3: 8).
        conv3x3_only: 3×3 subnets in every step (the reference's setting for ResNet-18) instead of 3×3 and 1×1
            alternating (§3.3).
        hidden_ratio: hidden channels of a subnet over its input channels (reference: 1.0 for CNN backbones).
        clamp: soft clamping α of the coupling's log-scales (reference: 2.0).
        standardize_images: "auto" (default), "always" or "never": PatchCore's exposure standardisation
            (``metaad.data.transforms.standardize_intensity``) before the frozen backbone; "auto" applies it when
            the training images' mean brightness varies by more than 10% (``exposure_variation``, measured at fit).
            A metaad addition, not in the paper, taken over from PatchCore, whose validation chose it (see
            ``PatchCore``); for FastFlow it was prompted by the first MTD test (0.764 without it,
            ``benchmarks/NOTES.md``).
        epochs, batch_size, lr, weight_decay: Adam settings of the shared loop (A.2.3: 500 epochs, batch 32, lr
            1e-3, weight decay 1e-5). The defaults, 6 epochs of batch 8, were chosen on held-out defect-free MTD
            training images with synthetic defects (``benchmarks/epoch_validation.py``; no test image read):
            on 2 cores the epoch is what the time budget counts, and batch 8 takes four times the Adam steps per
            epoch (validation image AUROC after 2 epochs 0.946 vs 0.782 at batch 32, after 5 epochs 0.986 vs
            0.917). The AUROC still rose at epoch 6 (0.989); 6 epochs were kept for time: an epoch of 610
            images at 256 px took 67 s on 2 cores (load 4), about 8 minutes of fit for 6 epochs of 700 images,
            and up to 5 minutes per epoch when the shared machine was loaded threefold.
        map_form: "complement" (default): the map is 1 − p, in [0, 1], 0 where the flow finds the features
            likely; "negative": −p, in [−1, 0], as the reference code and anomalib. Both order every image and
            pixel the same (identical AUROC, PRO). metaad's default gives positive scores like every other method,
            and a score whose relative difference means something: anomalous scores under −p are tiny negative
            numbers, beside which float noise (e.g. onnxruntime's against torch's) is relatively large.
        predict_batch_size: images per forward pass at prediction.
        seed: seeds the flows' initial weights and permutations, and the training order.

    Presets: ``"paper"`` (A.2.3 with the reference's ResNet-18 setting: 3×3 subnets; pass ``weights=PATH``),
    ``"cpu"`` (the defaults, chosen to train on 2 cores) and ``"tiny"`` (tests: 64 px, 2 steps, 2 epochs).
    """

    SAVED_WITHOUT: ClassVar[dict[str, object]] = {"map_form": "negative", "fitted": True}
    PRESETS: ClassVar[dict[str, dict]] = {
        "paper": {"backbone": "resnet18", "layers": (1, 2, 3), "image_size": 256, "conv3x3_only": True,
                  "epochs": 500, "batch_size": 32, "standardize_images": "never"},
        "cpu": {},
        "tiny": {"image_size": 64, "flow_steps": 2, "epochs": 2, "batch_size": 8},
    }

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        layers: tuple[int, ...] = (1, 2, 3),
        weights: str | None = None,
        image_size: int = 256,
        flow_steps: int = 8,
        conv3x3_only: bool = False,
        hidden_ratio: float = 1.0,
        clamp: float = 2.0,
        standardize_images: str = "auto",
        epochs: int = 6,
        batch_size: int = 8,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        map_form: str = "complement",
        predict_batch_size: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(image_size, int) or image_size < 32:
            raise ValueError(f"image_size must be an integer of at least 32 pixels, got {image_size!r}")
        if standardize_images not in ("auto", "always", "never"):
            raise ValueError(f"standardize_images must be 'auto', 'always' or 'never', got {standardize_images!r}")
        if map_form not in ("complement", "negative"):
            raise ValueError(f"map_form must be 'complement' or 'negative', got {map_form!r}")
        if flow_steps < 1:
            raise ValueError(f"flow_steps must be at least 1, got {flow_steps}")
        self.backbone = backbone
        self.layers = tuple(layers)
        self.weights = weights
        self.image_size = image_size
        self.flow_steps = flow_steps
        self.conv3x3_only = conv3x3_only
        self.hidden_ratio = hidden_ratio
        self.clamp = clamp
        self.standardize_images = standardize_images
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.map_form = map_form
        self.predict_batch_size = predict_batch_size
        self.seed = seed
        self.feature_extractor = create_backbone(backbone, self.layers, weights)
        with torch.no_grad():  # the stages' (C, H, W) at image_size fix the layer norms' and flows' shapes
            probe = self.feature_extractor(torch.zeros(1, 3, image_size, image_size))
        self._build_trainable([tuple(feature.shape[1:]) for feature in probe])
        self.register_buffer("exposure_variation", torch.tensor(float("nan")))
        self.register_buffer("fitted", torch.tensor(False))

    @property
    def standardizing(self) -> bool:
        """Whether images are standardised before the backbone (for "auto", decided by the last fit)."""
        return standardizing(self.standardize_images, float(self.exposure_variation))

    def _build_trainable(self, shapes: list[tuple[int, int, int]]) -> None:
        """Layer norms and flows, seeded: torch's generator (weights) and numpy's (FrEIA's permutations)."""
        numpy_state = np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                np.random.seed(self.seed)
                self.norms = nn.ModuleList(nn.LayerNorm(list(shape), elementwise_affine=True) for shape in shapes)
                self.flows = nn.ModuleList(
                    flow_2d(shape, self.flow_steps, self.conv3x3_only, self.hidden_ratio, self.clamp)
                    for shape in shapes
                )
        finally:
            np.random.set_state(numpy_state)

    # ------------------------------------------------------------------------------------------ forward
    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        side = self.image_size
        if images.shape[-2:] != (side, side):
            images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        return images

    def encode(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(z, log|det J|) per stage for images in [0, 1]: backbone -> layer norm -> flow (§3.1)."""
        with torch.no_grad():
            images = self._resize(images)
            if self.standardizing:
                images = standardize_intensity(images)
            features = self.feature_extractor(images)
        outputs = []
        for feature, norm, flow in zip(features, self.norms, self.flows, strict=True):
            z, log_jac_det = flow(norm(feature.contiguous()))
            outputs.append((z, log_jac_det))
        return outputs

    # --------------------------------------------------------------------------------------------- train
    def training_settings(self) -> TrainingSettings:
        """A.2.3: Adam, lr 1e-3, weight decay 1e-5, batch 32 (500 epochs in the paper; see ``epochs``)."""
        return TrainingSettings(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                                weight_decay=self.weight_decay, seed=self.seed)

    def training_loss(self, images: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood (§3.1): per stage the batch mean of ½·Σz² − log|det J|, summed over stages."""
        self.fitted.fill_(True)  # trained weights from the first step: predict works during a training too
        loss = images.new_zeros(())
        for z, log_jac_det in self.encode(images):
            loss = loss + torch.mean(0.5 * torch.sum(z**2, dim=(1, 2, 3)) - log_jac_det)
        return loss

    def fit(
        self, train: TrainData, *, progress: bool = False, workdir: str | Path | None = None, resume: bool = False
    ) -> FastFlow:
        """Train the layer norms and flows on defect-free images with the shared loop (``metaad.training``)."""
        images = TrainImages.from_data(train)
        if self.standardize_images == "auto":
            self.exposure_variation = torch.tensor(exposure_variation(images.batches()))
        train_model(self, images, progress=progress, workdir=workdir, resume=resume)
        self.fitted.fill_(True)
        return self

    # ------------------------------------------------------------------------------------------- predict
    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyPrediction:
        """Scores (B,) and maps (B, H, W) at the input size, from (B, 3, H, W) images in [0, 1].

        The map is the mean over stages of 1 − p (``map_form="complement"``) or −p (``"negative"``, the
        reference code), p = exp(−½·mean_c z²); the score is its maximum (anomalib's image score).
        """
        if not bool(self.fitted):
            raise NotFittedError("FastFlow is not fitted: call fit(train_images) or load a fitted model")
        self.eval()
        device = device_of(self)
        scores, maps = [], []
        for batch in images.split(self.predict_batch_size):
            size = batch.shape[-2:]
            stage_maps = []
            for z, _ in self.encode(batch.to(device)):
                probability = torch.exp(-0.5 * torch.mean(z**2, dim=1, keepdim=True))
                value = 1 - probability if self.map_form == "complement" else -probability
                stage_maps.append(F.interpolate(value, size=size, mode="bilinear", align_corners=False))
            anomaly_map = torch.stack(stage_maps).mean(0)[:, 0]
            maps.append(anomaly_map.cpu())
            scores.append(anomaly_map.flatten(1).amax(1).cpu())
        return AnomalyPrediction(torch.cat(scores), torch.cat(maps))
