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

from metaad.backbones import Backbone
from metaad.components.estimator import marking_fitted, predict_in_batches
from metaad.components.feature_cache import FrozenFeatures, frozen_part_key
from metaad.components.preprocess import Preprocess
from metaad.training import train_model
from metaad.training.data import TrainImages
from metaad.types import AnomalyPrediction, EpochEnd, TrainData, TrainingSettings, device_of

MAP_FORMS = ("complement", "negative", "log_likelihood")


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
        conv3x3_only: 3×3 subnets in every step (default; the reference's setting for ResNet-18) instead of 3×3
            and 1×1 alternating (§3.3).
        hidden_ratio: hidden channels of a subnet over its input channels (default 4; the reference: 1.0 for CNN
            backbones, which leaves Lite0's 24/40/112-channel flows with 0.45 M weights in all).
        clamp: soft clamping α of the coupling's log-scales (reference: 2.0).
        standardize_images: "auto" (default), "always" or "never": PatchCore's exposure standardisation before
            the frozen backbone (``metaad.components.preprocess.Preprocess``). A metaad addition, not in the paper,
            taken over from PatchCore, whose validation chose it (see ``PatchCore``); for FastFlow it was prompted
            by the first MTD test (``benchmarks/NOTES.md``).
        epochs, batch_size, lr, weight_decay: Adam settings of the shared loop (A.2.3: 500 epochs, batch 32, lr
            1e-3, weight decay 1e-5). 6 epochs of batch 8 by default: on 2 cores the epoch is what the time
            budget counts, and batch 8 takes four times the Adam steps per epoch of batch 32.
        map_form: "complement" (default): the map is 1 − p, in [0, 1], 0 where the flow finds the features
            likely; "negative": −p, in [−1, 0], as the reference code and anomalib. Both order every image and
            pixel the same (identical AUROC, PRO). metaad's default gives positive scores like every other method,
            and a score whose relative difference means something: anomalous scores under −p are tiny negative
            numbers, beside which float noise (e.g. onnxruntime's against torch's) is relatively large.
            "log_likelihood": −log p = ½·mean_c z², which does not saturate: 1 − p is close to 1 at every
            clearly anomalous location, so the maxima of two defective images barely differ.
        predict_batch_size: images per forward pass at prediction.
        seed: seeds the flows' initial weights and permutations, and the training order.

    The defaults (hidden ratio 4, 3×3 subnets, strides 4/8/16, the map 1 − p, 6 epochs) were chosen on
    held-out defect-free MTD training images with low-contrast synthetic defects
    (``benchmarks/epoch_validation.py --defects subtle``; no test image read; the candidates, the rule and the
    figures are in ``benchmarks/NOTES.md``). AUROC peaks after a few epochs and then falls.
    Presets: ``"paper"`` (A.2.3 with the reference's ResNet-18 setting: 3×3 subnets, hidden ratio 1; pass
    ``weights=PATH``), ``"cpu"`` (the defaults, chosen to train on 2 cores) and ``"tiny"`` (tests: 64 px,
    2 steps, hidden ratio 1, 2 epochs).
    """

    SAVED_WITHOUT: ClassVar[dict[str, object]] = {"map_form": "negative"}
    PRESETS: ClassVar[dict[str, dict]] = {
        "paper": {"backbone": "resnet18", "layers": (1, 2, 3), "image_size": 256, "conv3x3_only": True,
                  "hidden_ratio": 1.0, "epochs": 500, "batch_size": 32, "standardize_images": "never"},
        "cpu": {},
        "tiny": {"image_size": 64, "flow_steps": 2, "hidden_ratio": 1.0, "epochs": 2, "batch_size": 8},
    }

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0", layers: tuple[int, ...] = (1, 2, 3), weights: str | None = None,
        image_size: int = 256,
        flow_steps: int = 8, conv3x3_only: bool = True, hidden_ratio: float = 4.0, clamp: float = 2.0,
        standardize_images: str = "auto",
        epochs: int = 6, batch_size: int = 8, lr: float = 1e-3, weight_decay: float = 1e-5,
        map_form: str = "complement", predict_batch_size: int = 8, seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(image_size, int) or image_size < 32:
            raise ValueError(f"image_size must be an integer of at least 32 pixels, got {image_size!r}")
        if map_form not in MAP_FORMS:
            raise ValueError(f"map_form must be one of {', '.join(map(repr, MAP_FORMS))}, got {map_form!r}")
        if flow_steps < 1:
            raise ValueError(f"flow_steps must be at least 1, got {flow_steps}")
        self.backbone, self.layers, self.weights = backbone, tuple(layers), weights
        self.image_size = image_size
        self.flow_steps, self.conv3x3_only = flow_steps, conv3x3_only
        self.hidden_ratio, self.clamp = hidden_ratio, clamp
        self.standardize_images = standardize_images
        self.epochs, self.batch_size, self.lr, self.weight_decay = epochs, batch_size, lr, weight_decay
        self.map_form, self.predict_batch_size, self.seed = map_form, predict_batch_size, seed
        self.feature_extractor = Backbone(backbone, self.layers)
        self.preprocess = Preprocess(image_size, standardize_images, self.feature_extractor.normalization)
        # the stages' (C, H, W) at image_size fix the layer norms' and flows' shapes ("same" padding: ⌈S / r⌉)
        sides = [-(-image_size // r) for r in self.feature_extractor.reductions]
        self._build_trainable([(c, s, s) for c, s in zip(self.feature_extractor.channels, sides, strict=True)])
        self.register_buffer("fitted", torch.tensor(False))

    def fit_summary(self) -> dict:
        return self.preprocess.fit_summary()

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
    @torch.no_grad()
    def frozen_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen backbone's maps of (B, 3, H, W) images in [0, 1] (what the feature cache holds)."""
        return [f.contiguous() for f in self.feature_extractor(self.preprocess(images))]

    def encode(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(z, log|det J|) per stage for images in [0, 1]: backbone -> layer norm -> flow (§3.1)."""
        return self.flow_maps(self.frozen_maps(images))

    def flow_maps(self, features: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(z, log|det J|) per stage from the frozen maps: layer norm -> flow."""
        outputs = []
        for feature, norm, flow in zip(features, self.norms, self.flows, strict=True):
            z, log_jac_det = flow(norm(feature))
            outputs.append((z, log_jac_det))
        return outputs

    # --------------------------------------------------------------------------------------------- train
    def training_settings(self) -> TrainingSettings:
        """A.2.3: Adam, lr 1e-3, weight decay 1e-5, batch 32 (500 epochs in the paper; see ``epochs``)."""
        return TrainingSettings(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                                weight_decay=self.weight_decay, seed=self.seed)

    def training_loss(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Negative log-likelihood (§3.1) of a batch of frozen maps: per stage the batch mean of
        ½·Σz² − log|det J|, summed over stages."""
        loss = features[0].new_zeros(())
        for z, log_jac_det in self.flow_maps(features):
            loss = loss + torch.mean(0.5 * torch.sum(z**2, dim=(1, 2, 3)) - log_jac_det)
        return loss

    def fit(self, train: TrainData, *, progress: bool = False, workdir: str | Path | None = None,
            resume: bool = False, on_epoch_end: EpochEnd | None = None) -> FastFlow:
        """Train the layer norms and flows on defect-free images with the shared loop (``metaad.training``), on
        the frozen backbone's maps computed once (``metaad.components.feature_cache``)."""
        self.feature_extractor.load_weights(self.weights)
        images = TrainImages.from_data(train)
        self.preprocess.measure(images.batches())
        features = FrozenFeatures(self, self.frozen_maps, images,
                                  frozen_part_key(self.feature_extractor, self.preprocess), device=device_of(self))
        train_model(self, features, progress=progress, workdir=workdir, resume=resume,
                    on_epoch_end=marking_fitted(self, on_epoch_end))
        self.fitted.fill_(True)
        return self

    # ------------------------------------------------------------------------------------------- predict
    def export_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (B,) and maps (B, H, W) of one batch: the map is the mean over stages of 1 − p
        (``map_form="complement"``), −p (``"negative"``, the reference code) or −log p (``"log_likelihood"``),
        p = exp(−½·mean_c z²), upsampled to the input; the score is its maximum (anomalib's image score)."""
        stage_maps = []
        for z, _ in self.encode(images):
            energy = 0.5 * torch.mean(z**2, dim=1, keepdim=True)  # −log p
            if self.map_form == "log_likelihood":
                value = energy
            else:
                value = 1 - torch.exp(-energy) if self.map_form == "complement" else -torch.exp(-energy)
            stage_maps.append(F.interpolate(value, size=images.shape[-2:], mode="bilinear", align_corners=False))
        anomaly_map = torch.stack(stage_maps).mean(0)[:, 0]
        return anomaly_map.flatten(1).amax(1), anomaly_map

    def predict(self, images: torch.Tensor) -> AnomalyPrediction:
        """Scores (B,) and maps (B, H, W) at the input size, from (B, 3, H, W) images in [0, 1]."""
        return predict_in_batches(self, images, self.predict_batch_size, self.export_forward,
                                  fitted=bool(self.fitted))
