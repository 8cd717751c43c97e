"""Glancing at the Patch (Wang, Wu, Cui & Shen, "Glancing at the Patch: Anomaly Localization with Global and
Local Feature Comparison", CVPR 2021; its supplementary's settings).

A Local-Net describes a 33×33 patch (supp. Table 1), distilled from a pretrained teacher; a Global-Net of
partial convolutions describes the image with that patch masked out (Table 2); the DAD head (Table 3) says
whether the two descriptions match. A patch that the rest of the image does not predict is anomalous.
Pipeline: Local-Net distillation (general image folder, then the category) → Global-Net + DAD head training
with Local-Net frozen, stained patches as negatives (C.1) → 20×20 patches per image scored (λs = 0.8) → scores
fused into a map by inverse-distance weighting, p = 5 (C.1) → image score = the map's maximum (D.1).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from metaad.backbones.registry import create_backbone
from metaad.components.partial_conv import PartialConv2d, masked_max_pool
from metaad.training.data import TrainImages
from metaad.training.loop import train_model
from metaad.types import AnomalyPrediction, NotFittedError, TrainingSettings, device_of

GLOBAL_MIN_SIZE = 243  # the smallest input Table 2's unpadded layers reduce to 1×1


class LocalNet(nn.Module):
    """Supp. Table 1: 33×33×3 → 128, leaky ReLU slope 5e-3, no padding."""

    def __init__(self, slope: float = 5e-3) -> None:
        super().__init__()
        act = nn.LeakyReLU(slope)
        self.body = nn.Sequential(
            nn.Conv2d(3, 128, 3), act, nn.MaxPool2d(2, 2),
            nn.Conv2d(128, 256, 5), act, nn.MaxPool2d(2, 2),
            nn.Conv2d(256, 256, 2), act,
            nn.Conv2d(256, 128, 4), act,
        )

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.body(patches).flatten(1)


class GlobalNet(nn.Module):
    """Supp. Table 2: partial convolutions, ReLU, no padding; 256×256×3 + mask → 128 (larger inputs end in a
    global average of the last map)."""

    SPEC: ClassVar[list[tuple[int, int, int]]] = [  # (out channels, kernel, stride) after PartialConv0 + MaxPool
        (32, 3, 2), (32, 3, 1), (64, 3, 2), (64, 3, 1), (128, 3, 2), (128, 3, 1), (128, 3, 1),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.first = PartialConv2d(3, 16, 7, 2)
        layers, channels = [], 16
        for out, kernel, stride in self.SPEC:
            layers.append(PartialConv2d(channels, out, kernel, stride))
            channels = out
        self.layers = nn.ModuleList(layers)
        # (kernel, stride) of each stage: PartialConv0, MaxPool, then SPEC
        self.stage_windows = [(7, 2), (3, 2)] + [(kernel, stride) for _, kernel, stride in self.SPEC]

    def _stage(self, index: int, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage ``index`` of ``stage_windows``: PartialConv0 + ReLU, the masked max pool, then Table 2's layers
        (ReLU after all but the last)."""
        if index == 1:
            return masked_max_pool(x, mask, 3, 2)
        layer = self.first if index == 0 else self.layers[index - 2]
        y, mask = layer(x, mask)
        return (y if index == len(self.stage_windows) - 1 else F.relu(y)), mask

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = images
        for index in range(len(self.stage_windows)):
            x, mask = self._stage(index, x, mask)
        return x.mean((2, 3))

    def masked_patch_features(
        self, image: torch.Tensor, origins: torch.Tensor, patch: int, incremental: bool = True
    ) -> torch.Tensor:
        """``forward`` of one (3, S, S) image with each of N ``patch``-sized squares at ``origins`` (N, 2) hidden
        in turn: (N, 128).

        ``incremental`` (about 8× cheaper than N masked passes, ``False``): hiding a square changes each stage's
        map only inside a box (the square grown by the stages' windows); everything else equals the unmasked
        map. So the image passes once unmasked, and per square only its box is recomputed, stage by stage, from
        the window of the previous stage's map around it: the unmasked map there with the previous box pasted
        in. ``incremental=False`` runs the N plain masked passes: the reference the incremental path is tested
        against (ONNX export, which cannot write the boxes in place, builds them for a whole batch in
        ``Glance._maps``)."""
        if not incremental:
            masks = hidden_square_masks(origins, patch, image.shape[-1]).to(image)
            batch = image.expand(len(origins), -1, -1, -1).contiguous(memory_format=torch.channels_last)
            return self(batch, masks.contiguous(memory_format=torch.channels_last))  # 1.4x faster on CPU
        x, mask = image[None], image.new_ones(1, 1, *image.shape[-2:])
        cache = [(x[0], mask[0])]
        for index in range(len(self.stage_windows)):
            x, mask = self._stage(index, x, mask)
            cache.append((x[0], mask[0]))
        n = len(origins)
        lo, hi = origins, origins + patch - 1  # the changed box, inclusive, per square
        box_origin = origins
        rows = origins[:, :1] + torch.arange(patch)
        cols = origins[:, 1:] + torch.arange(patch)
        region = image[:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3)  # pixels unchanged …
        region_mask = image.new_zeros(n, 1, patch, patch)  # … but hidden
        for level, (kernel, stride) in enumerate(self.stage_windows, start=1):
            size = cache[level][0].shape[-1]
            lo = torch.div(lo - kernel + 1 + stride - 1, stride, rounding_mode="floor").clamp(min=0)
            hi = torch.div(hi, stride, rounding_mode="floor").clamp(max=size - 1)
            box = min(size, max(1, int((hi - lo + 1).max())))
            new_origin = torch.minimum(lo, torch.full_like(lo, size - box))
            window = (box - 1) * stride + kernel
            start = new_origin * stride
            x_window = _gather_windows(cache[level - 1][0], start, window)
            mask_window = _gather_windows(cache[level - 1][1], start, window)
            x_window = _paste(x_window, region, box_origin - start)
            mask_window = _paste(mask_window, region_mask, box_origin - start)
            region, region_mask = self._stage(level - 1, x_window, mask_window)
            box_origin = new_origin
        final = cache[-1][0].expand(n, -1, -1, -1)
        return _paste(final, region, box_origin).mean((2, 3))


def hidden_square_masks(origins: torch.Tensor, patch: int, size: int) -> torch.Tensor:
    """(N, 1, size, size) visibility masks, each 0 on the ``patch``-sized square at one of the (N, 2) ``origins``
    (y, x) and 1 elsewhere; built by comparisons, so an exported graph holds no N × size² constant."""
    pixels = torch.arange(size, device=origins.device)
    inside_y = (pixels >= origins[:, :1]) & (pixels < origins[:, :1] + patch)  # (N, size)
    inside_x = (pixels >= origins[:, 1:]) & (pixels < origins[:, 1:] + patch)
    return (~(inside_y[:, :, None] & inside_x[:, None, :]))[:, None].float()


def _gather_windows(feature: torch.Tensor, origins: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, size, size) windows of a (C, H, W) map at (N, 2) top-left ``origins``."""
    rows = origins[:, :1] + torch.arange(size)
    cols = origins[:, 1:] + torch.arange(size)
    return feature[:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3)


def _paste(windows: torch.Tensor, region: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``windows`` (N, C, W, W) with ``region`` (N, C, S, S) written at (N, 2) ``offsets``; the parts of the
    region outside a window are dropped (sent to a scratch row and column that is cut off)."""
    n, _, w, _ = windows.shape
    side = region.shape[-1]
    out = F.pad(windows, (0, 1, 0, 1))
    rows = offsets[:, :1] + torch.arange(side)
    cols = offsets[:, 1:] + torch.arange(side)
    rows = torch.where((rows >= 0) & (rows < w), rows, w)
    cols = torch.where((cols >= 0) & (cols < w), cols, w)
    out[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]] = region.permute(0, 2, 3, 1)
    return out[..., :w, :w]


class ScaledLinear(nn.Linear):
    """A linear layer whose weights are stored divided by ``scale``: Adam's steps, which do not depend on the
    gradient's size, then change the effective weights ``scale`` times as much as the loop's lr."""

    def __init__(self, in_features: int, out_features: int, scale: float) -> None:
        super().__init__(in_features, out_features)
        self.scale = scale
        with torch.no_grad():
            self.weight.div_(scale)
            self.bias.div_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias * self.scale)


class DADHead(nn.Module):
    """Supp. Table 3: 256 → FC 128 → leaky ReLU → FC 2 → leaky ReLU (slope 1e-2) → (softmax in the loss)."""

    def __init__(self, lr_scale: float) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ScaledLinear(256, 128, lr_scale), nn.LeakyReLU(1e-2), ScaledLinear(128, 2, lr_scale), nn.LeakyReLU(1e-2)
        )

    def forward(self, global_feature: torch.Tensor, local_feature: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat([global_feature, local_feature], 1))


def random_stains(patches: torch.Tensor, min_axis: float = 2.0, max_axis: float = 10.0) -> torch.Tensor:
    """Each patch with one stain (C.1): a filled ellipse of random centre, axes, angle and colour (global RNG)."""
    b, _, h, w = patches.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=patches.dtype), torch.arange(w, dtype=patches.dtype), indexing="ij")
    centre = torch.rand(b, 2) * torch.tensor([h - 1.0, w - 1.0])  # drawn on the CPU: the same stains on any device
    axes = min_axis + torch.rand(b, 2) * (max_axis - min_axis)
    angle = torch.rand(b) * torch.pi
    dy, dx = ys - centre[:, 0, None, None], xs - centre[:, 1, None, None]
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos
    inside = ((u / axes[:, 1, None, None]) ** 2 + (v / axes[:, 0, None, None]) ** 2 <= 1).unsqueeze(1)
    colour = torch.rand(b, 3, 1, 1, dtype=patches.dtype)
    return torch.where(inside.to(patches.device), colour.to(patches.device), patches)


def grid_origins(image_size: int, patch_size: int, grid: int) -> torch.Tensor:
    """Top-left corners (grid², 2) of ``grid`` × ``grid`` patches spread uniformly, in raster order (C.1)."""
    steps = torch.linspace(0, image_size - patch_size, grid).round().long()
    return torch.cartesian_prod(steps, steps)


def idw_weights(points: torch.Tensor, size: int, power: float) -> torch.Tensor:
    """(size², N) inverse-distance weights (Bartier & Keller 1996) of N (y, x) ``points`` at each pixel of a
    size × size grid: wᵢ = d⁻ᵖ normalised to sum 1; a pixel on a point takes that point's value alone."""
    ys, xs = torch.meshgrid(torch.arange(size, dtype=points.dtype), torch.arange(size, dtype=points.dtype),
                            indexing="ij")
    pixels = torch.stack([ys.flatten(), xs.flatten()], 1)
    distance = torch.cdist(pixels, points)  # (P, N)
    on_point = distance < 1e-6
    weights = torch.where(on_point, 1.0, distance.clamp(min=1e-6).pow(-power))
    weights = torch.where(on_point.any(1, keepdim=True), on_point.to(points.dtype), weights)
    return weights / weights.sum(1, keepdim=True)


def idw_map(values: torch.Tensor, points: torch.Tensor, size: int, power: float) -> torch.Tensor:
    """Inverse-distance-weighted interpolation of (B, N) values at (N, 2) (y, x) points onto a size × size
    pixel grid: Σ wᵢ vᵢ / Σ wᵢ, wᵢ = d⁻ᵖ (:func:`idw_weights`)."""
    return (values @ idw_weights(points.to(values.dtype), size, power).T).view(-1, size, size)


class Glance(nn.Module):
    """Glancing at the Patch (Wang et al., CVPR 2021).

    Args:
        backbone, teacher_layer, weights: the Local-Net's teacher (paper: ResNet-18, ``backbone="resnet18",
            teacher_layer=4, weights=PATH``; default the offline EfficientNet-Lite0's last stage, 320-d), its
            globally averaged last map on the patch resized to ``teacher_size`` px being the target.
        image_size, patch_size: C.1: images at 256×256, patches 33×33 (Tables 1-2).
        pretrain_folders: image folders for the Local-Net's first distillation (paper: ImageNet), each image
            resized to ``image_size``; () skips it. ``pretrain_epochs``: passes over them.
        local_epochs, local_lr, local_batch_size: the distillation settings (C.1: Adam 2e-4, batch 64 on
            ImageNet, 16 on the category; λk = λc = 1).
        global_epochs, global_lr, batch_size: Global-Net + DAD head training (C.1: Adam, Global-Net 1e-4,
            batch 64). ``dad_lr_ratio``: the DAD head's lr over the Global-Net's (C.1: 1e-5 / 1e-4, the paper
            preset). The shared loop has one lr, so the head's weights are stored divided by this ratio
            (``ScaledLinear``): Adam's step on them is then the ratio times smaller, exactly a second learning
            rate. The default, 1 (both 1e-4), and 8 Global-Net epochs were chosen on held-out MTD training images
            with synthetic surface defects (``benchmarks/epoch_validation.py``, no test image): image AUROC 0.706
            / 0.693 after 8 / 16 epochs, against 0.586 / 0.562 with the paper's ratio, whose head barely moves in
            the few hundred steps of a CPU budget (the paper trains 200K iterations).
        lambda_t, margin: weight of the triplet term (C.1: 0.01) and its margin (not given: 1).
        lambda_s: weight of the DAD head's mismatch probability in a patch's score (C.1: 0.8); the rest goes to
            the global-local cosine distance (1 − cos)/2 (the main paper's distance term, here on a 0-1 scale).
        grid, idw_power: C.1: 20 × 20 patches per image, IDW with p = 5.
        one_class: C.2's protocol: the whole image resized to the patch size is the patch, the Global-Net sees
            the whole image unmasked, the negative is another image of the batch; map = the image's score.
        seed: seeds the layers, training order and crops.

    Each training step crops one random patch per image (the paper: 50K + 200K iterations; here epochs over the
    training images). Local-Net loss (Uninformed Students, Bergmann et al. 2020, whose patch network Table 1
    is): λk‖D(L(p)) − T(p)‖² with a linear decoder D to the teacher's width + λc Σ_{i≠j} corr(L(p))_ij over
    the batch. Global loss: cross-entropy of the DAD head on (G(I∖p), L(p)) = match and (G(I∖p), L(p⁻)) =
    mismatch + λt max(0, ‖g − L(p)‖ − ‖g − L(p⁻)‖ + margin). The teacher is frozen with its own normalisation.

    A metaad addition, not in the supplementary: after distillation the Local-Net's descriptors are standardised
    per dimension (mean and std over random training patches, kept as buffers) before the Global-Net and the
    DAD head see them. Distilled descriptors spread by about 0.01 per dimension (MTD), and a head fed inputs that
    small stayed at chance (cross-entropy ln 2) for a whole CPU-budget training; standardised, a stained
    patch lies far from clean ones and the head learns within a few hundred steps (``benchmarks/NOTES.md``).

    Presets: ``"paper"`` (C.1's settings with the paper's iteration counts as epochs of 762 images: long),
    ``"cpu"`` (what fits ~20 minutes on 2 cores) and ``"tiny"`` (tests).
    """

    SAVED_WITHOUT: ClassVar[dict[str, object]] = {"descriptor_mean": None, "descriptor_std": None}
    PRESETS: ClassVar[dict[str, dict]] = {
        "paper": {"local_epochs": 1050, "global_epochs": 16800, "local_batch_size": 16, "batch_size": 64,
                  "dad_lr_ratio": 0.1},
        "cpu": {"local_epochs": 4, "global_epochs": 8},
        "tiny": {"local_epochs": 3, "global_epochs": 3, "local_batch_size": 4, "batch_size": 4, "grid": 3,
                 "teacher_size": 33},
    }

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        teacher_layer: int = 4,
        weights: str | None = None,
        teacher_size: int = 64,
        image_size: int = 256,
        patch_size: int = 33,
        pretrain_folders: tuple[str, ...] = (),
        pretrain_epochs: int = 1,
        local_epochs: int = 8,
        local_lr: float = 2e-4,
        local_batch_size: int = 16,
        lambda_k: float = 1.0,
        lambda_c: float = 1.0,
        global_epochs: int = 8,
        global_lr: float = 1e-4,
        dad_lr_ratio: float = 1.0,
        batch_size: int = 16,
        lambda_t: float = 0.01,
        margin: float = 1.0,
        lambda_s: float = 0.8,
        grid: int = 20,
        idw_power: float = 5.0,
        one_class: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if image_size < GLOBAL_MIN_SIZE:
            raise ValueError(f"image_size must be at least {GLOBAL_MIN_SIZE} (Global-Net, Table 2), got {image_size}")
        if patch_size != 33:
            raise ValueError(f"the Local-Net of Table 1 takes 33×33 patches, got patch_size={patch_size}")
        self.backbone = backbone
        self.teacher_layer = teacher_layer
        self.weights = weights
        self.teacher_size = teacher_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.pretrain_folders = tuple(pretrain_folders)
        self.pretrain_epochs = pretrain_epochs
        self.local_epochs = local_epochs
        self.local_lr = local_lr
        self.local_batch_size = local_batch_size
        self.lambda_k = lambda_k
        self.lambda_c = lambda_c
        self.global_epochs = global_epochs
        self.global_lr = global_lr
        self.dad_lr_ratio = dad_lr_ratio
        self.batch_size = batch_size
        self.lambda_t = lambda_t
        self.margin = margin
        self.lambda_s = lambda_s
        self.grid = grid
        self.idw_power = idw_power
        self.one_class = one_class
        self.seed = seed
        self.teacher = create_backbone(backbone, (teacher_layer,), weights)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.local_net = LocalNet()
            self.decoder = nn.Linear(128, self.teacher.channels[0])
            self.global_net = GlobalNet()
            self.dad_head = DADHead(dad_lr_ratio)
        self.register_buffer("descriptor_mean", torch.zeros(128))
        self.register_buffer("descriptor_std", torch.ones(128))
        self.register_buffer("fitted", torch.tensor(False))
        self._stage = "local"
        self._epochs = local_epochs
        self._idw_cache: tuple[tuple, torch.Tensor] | None = None

    # ------------------------------------------------------------------------------------------ helpers
    def _resize(self, images: torch.Tensor, side: int) -> torch.Tensor:
        if images.shape[-2:] != (side, side):
            images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        return images

    def _random_patches(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One random patch per image and the image's visibility mask with that patch hidden."""
        b, side, p = images.shape[0], self.image_size, self.patch_size
        origin = torch.randint(0, side - p + 1, (b, 2))
        rows = origin[:, :1] + torch.arange(p)  # (B, p)
        cols = origin[:, 1:] + torch.arange(p)
        patches = images[torch.arange(b)[:, None, None, None], torch.arange(3)[None, :, None, None],
                         rows[:, None, :, None], cols[:, None, None, :]]
        mask = images.new_ones(b, 1, side, side)
        for i in range(b):
            mask[i, :, rows[i, 0] : rows[i, -1] + 1, cols[i, 0] : cols[i, -1] + 1] = 0
        return patches, mask

    def _patch_and_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(patches, Global-Net inputs, masks) of a training batch, per C.1 or C.2."""
        full = self._resize(images, self.image_size)
        if self.one_class and self._stage != "pretrain":  # C.2; its general-image distillation is C.1's
            return self._resize(images, self.patch_size), full, full.new_ones(full.shape[0], 1, *full.shape[-2:])
        patches, mask = self._random_patches(full)
        return patches, full, mask

    # ----------------------------------------------------------------------------------------- training
    def training_settings(self) -> TrainingSettings:
        """The stage being trained: Local-Net distillation or Global-Net + DAD head (C.1: Adam, β 0.9, 0.999)."""
        if self._stage == "global":
            return TrainingSettings(epochs=self._epochs, batch_size=self.batch_size, lr=self.global_lr,
                                    seed=self.seed + 2)
        return TrainingSettings(epochs=self._epochs, batch_size=self.local_batch_size, lr=self.local_lr,
                                seed=self.seed + (0 if self._stage == "pretrain" else 1))

    def training_loss(self, images: torch.Tensor) -> torch.Tensor:
        return self._global_loss(images) if self._stage == "global" else self._local_loss(images)

    def _local_loss(self, images: torch.Tensor) -> torch.Tensor:
        """λk · distillation MSE + λc · compactness (sum of off-diagonal descriptor correlations)."""
        patches = self._patch_and_image(images)[0]
        with torch.no_grad():
            target = self.teacher(self._resize(patches, self.teacher_size))[0].mean((2, 3))
        descriptors = self.local_net(patches)
        loss = self.lambda_k * (self.decoder(descriptors) - target).square().sum(1).mean()
        if self.lambda_c and descriptors.shape[0] > 1:
            centred = descriptors - descriptors.mean(0)
            std = centred.square().mean(0).add(1e-8).sqrt()
            corr = (centred / std).T @ (centred / std) / descriptors.shape[0]
            loss = loss + self.lambda_c * (corr.sum() - corr.diagonal().sum())
        return loss

    def _global_loss(self, images: torch.Tensor) -> torch.Tensor:
        """DAD cross-entropy on matching / stained (C.1) or other-image (C.2) patches + λt · triplet."""
        patches, full, mask = self._patch_and_image(images)
        negatives = patches.roll(1, 0) if self.one_class else random_stains(patches)
        with torch.no_grad():
            positive, negative = self.local_features(torch.cat([patches, negatives])).chunk(2)
        g = self.global_net(full, mask)
        logits = self.dad_head(torch.cat([g, g]), torch.cat([positive, negative]))
        labels = torch.cat([torch.ones(len(g)), torch.zeros(len(g))]).long().to(logits.device)
        triplet = F.relu((g - positive).norm(dim=1) - (g - negative).norm(dim=1) + self.margin).mean()
        return F.cross_entropy(logits, labels) + self.lambda_t * triplet

    def _train_stage(self, stage: str, epochs: int, data, progress: bool, workdir: Path | None, resume: bool):
        self._stage, self._epochs = stage, epochs
        local = stage != "global"
        self.local_net.requires_grad_(local)
        self.decoder.requires_grad_(local)
        self.global_net.requires_grad_(not local)
        self.dad_head.requires_grad_(not local)
        if workdir is not None and stage != "global":  # the last stage's log and curve are the run's own
            workdir = workdir / stage
        train_model(self, data, progress=progress, workdir=workdir, resume=resume)

    def fit(
        self,
        train: torch.Tensor | Iterable,
        *,
        progress: bool = False,
        workdir: str | Path | None = None,
        resume: bool = False,
    ) -> Glance:
        """Distil the Local-Net (general images, then ``train``), then train the Global-Net and DAD head on
        ``train`` with the Local-Net frozen; the distillations checkpoint into ``workdir/{pretrain,local}``, the
        last stage into ``workdir``."""
        images = TrainImages.from_data(train)
        workdir = Path(workdir) if workdir is not None else None
        try:
            if self.pretrain_folders and self.pretrain_epochs > 0:
                general = TrainImages(self._load_folders())
                self._train_stage("pretrain", self.pretrain_epochs, general, progress, workdir, resume)
            if self.local_epochs > 0:
                self._train_stage("local", self.local_epochs, images, progress, workdir, resume)
            self._fit_descriptor_statistics(images)
            self.fitted.fill_(True)  # predict works during the last stage too (validation along it)
            self._train_stage("global", self.global_epochs, images, progress, workdir, resume)
        finally:
            self.requires_grad_(True)
            self.teacher.requires_grad_(False)
        self.fitted.fill_(True)
        return self.eval()

    @torch.no_grad()
    def _fit_descriptor_statistics(self, images: TrainImages, patches_per_image: int = 4) -> None:
        """Per-dimension mean and std of the distilled Local-Net's descriptors over random training patches
        (seeded), which ``local_features`` removes."""
        self.local_net.eval()
        device = device_of(self)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 3)
            descriptors = torch.cat([
                self.local_net(self._patch_and_image(batch.to(device))[0])
                for _ in range(patches_per_image) for batch in images.batches(64)
            ])
        self.descriptor_mean.copy_(descriptors.mean(0))
        self.descriptor_std.copy_(descriptors.std(0).clamp_min(1e-6))

    def local_features(self, patches: torch.Tensor) -> torch.Tensor:
        """The Local-Net's descriptors, standardised per dimension with the training patches' statistics."""
        return (self.local_net(patches) - self.descriptor_mean) / self.descriptor_std

    def _load_folders(self) -> torch.Tensor:
        """The images of ``pretrain_folders`` at image_size, as uint8 (decoded once)."""
        from metaad.data.datasets import list_images, open_image
        from metaad.data.transforms import pil_to_tensor

        paths = [path for folder in self.pretrain_folders for path in list_images(folder, recursive=True)]
        if not paths:
            raise ValueError(f"no images in pretrain_folders {self.pretrain_folders}")
        side = self.image_size
        return torch.stack([(pil_to_tensor(open_image(p), side) * 255).round().to(torch.uint8) for p in paths])

    # ------------------------------------------------------------------------------------------ predict
    def patch_scores(self, global_features: torch.Tensor, local_features: torch.Tensor) -> torch.Tensor:
        """λs · P(mismatch) from the DAD head + (1 − λs) · (1 − cos(g, l)) / 2 (C.1, λs = 0.8)."""
        mismatch = self.dad_head(global_features, local_features).softmax(1)[:, 0]
        distance = (1 - F.cosine_similarity(global_features, local_features, dim=1)) / 2
        return self.lambda_s * mismatch + (1 - self.lambda_s) * distance

    def _idw_weights(self, device: torch.device) -> torch.Tensor:
        """The grid's IDW weights at image_size (patch centres as points) on ``device``, computed once, as an
        ordinary tensor (not an inference tensor), so that export tracing can use the cache too."""
        key = (self.image_size, self.patch_size, self.grid, self.idw_power, device)
        if self._idw_cache is None or self._idw_cache[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                centres = grid_origins(self.image_size, self.patch_size, self.grid).float() + (self.patch_size - 1) / 2
                self._idw_cache = (key, idw_weights(centres, self.image_size, self.idw_power).to(device))
        return self._idw_cache[1]

    @torch.inference_mode()
    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W): the grid's patch scores fused by IDW at image_size, resized to the input's size."""
        return self._maps(images, incremental=True)

    def export_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``predict`` for ONNX export (``metaad.types``): the Global-Net's masked passes in full, the images of
        a batch side by side (no loop over them, so the exported graph takes any batch size)."""
        maps = self._maps(images, incremental=False, chunk=50)
        return maps.flatten(1).amax(1), maps

    def _maps(self, images: torch.Tensor, incremental: bool, chunk: int = 400) -> torch.Tensor:
        """(B, H, W) maps: the grid's patch scores (``chunk`` patches at a time), fused by IDW."""
        full = self._resize(images, self.image_size)
        if self.one_class:
            g = self.global_net(full, full.new_ones(full.shape[0], 1, *full.shape[-2:]))
            scores = self.patch_scores(g, self.local_features(self._resize(images, self.patch_size)))
            return scores[:, None, None].expand(-1, *images.shape[-2:]).clone()
        side, p = self.image_size, self.patch_size
        origins = grid_origins(side, p, self.grid)
        rows, cols = origins[:, :1] + torch.arange(p), origins[:, 1:] + torch.arange(p)
        patches = full[:, :, rows[:, :, None], cols[:, None, :]].transpose(1, 2)  # (B, N, 3, p, p)
        if incremental:  # image by image: each image's unmasked pass is shared by its N masked ones
            scores = torch.stack([
                torch.cat([
                    self.patch_scores(
                        self.global_net.masked_patch_features(image, origins[part : part + chunk], p),
                        self.local_features(image_patches[part : part + chunk]),
                    )
                    for part in range(0, len(origins), chunk)
                ])
                for image, image_patches in zip(full, patches, strict=True)
            ])
        else:  # the batch's images side by side, each hidden square in turn
            parts = []
            for part in range(0, len(origins), chunk):
                masks = hidden_square_masks(origins[part : part + chunk], p, side).to(full)  # (n, 1, S, S)
                n = len(masks)
                hidden = full[:, None].expand(-1, n, -1, -1, -1).reshape(-1, 3, side, side)
                g = self.global_net(hidden, masks.repeat(full.shape[0], 1, 1, 1))
                local = self.local_features(patches[:, part : part + n].reshape(-1, 3, p, p))
                parts.append(self.patch_scores(g, local).view(-1, n))
            scores = torch.cat(parts, 1)  # (B, N)
        fused = (scores @ self._idw_weights(full.device).T).view(-1, 1, side, side)
        return F.interpolate(fused, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> AnomalyPrediction:
        """Image scores (B,) (the map's maximum, D.1) and anomaly maps (B, H, W) for images in [0, 1]."""
        if not bool(self.fitted):
            raise NotFittedError("Glance is not fitted: call fit(train_images) or load a fitted model")
        was_training = self.training
        self.eval()
        try:
            maps = torch.cat([self.anomaly_maps(batch) for batch in images.split(8)])
        finally:
            self.train(was_training)
        return AnomalyPrediction(maps.flatten(1).amax(1), maps)
