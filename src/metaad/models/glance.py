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

from functools import partial
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from metaad.backbones import Backbone
from metaad.components.anomaly_synthesis import check_anomaly_options, grey_images, to_luma
from metaad.components.estimator import marking_fitted, predict_in_batches
from metaad.components.partial_conv import PartialConv2d, masked_max_pool
from metaad.components.preprocess import Preprocess, resize
from metaad.training.data import TrainImages
from metaad.training.loop import train_model
from metaad.types import AnomalyPrediction, EpochEnd, TrainData, TrainingSettings, device_of

GLOBAL_MIN_SIZE = 243  # the smallest input Table 2's unpadded layers reduce to 1×1


LOCAL_STRIDE = 4  # the Local-Net's two 2 × 2 poolings: its dense map moves 4 px a step


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
    """Supp. Table 3: 256 → FC 128 → leaky ReLU → FC 2 → leaky ReLU (slope 1e-2) → (softmax in the loss).
    ``leaky_logits=False`` leaves the logits linear: a leaky ReLU on them squeezes a negative logit 100-fold,
    which can stall the head (both logits negative: their difference, and its gradient, almost vanish)."""

    def __init__(self, lr_scale: float, leaky_logits: bool = True) -> None:
        super().__init__()
        last = nn.LeakyReLU(1e-2) if leaky_logits else nn.Identity()
        self.body = nn.Sequential(
            ScaledLinear(256, 128, lr_scale), nn.LeakyReLU(1e-2), ScaledLinear(128, 2, lr_scale), last
        )

    def forward(self, global_feature: torch.Tensor, local_feature: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat([global_feature, local_feature], 1))


def random_stains(patches: torch.Tensor, min_axis: float = 2.0, max_axis: float = 10.0,
                  grey: torch.Tensor | None = None) -> torch.Tensor:
    """Each patch with one stain (C.1): a filled ellipse of random centre, axes, angle and colour (global RNG).
    ``grey`` (B,) bool: those patches' stains take their colour's luma, so that on a grey image colour alone
    cannot tell a stained patch (the same draws either way)."""
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
    if grey is not None and grey.any():
        colour = torch.where(grey.cpu().view(-1, 1, 1, 1), to_luma(colour), colour)
    return torch.where(inside.to(patches.device), colour.to(patches.device), patches)


def grid_origins(image_size: int, patch_size: int, grid: int, stride: int = 1) -> torch.Tensor:
    """Top-left corners (grid², 2) of ``grid`` × ``grid`` patches spread uniformly, in raster order (C.1), on
    multiples of ``stride`` pixels (``LOCAL_STRIDE``: where one dense Local-Net pass has each patch's descriptor)."""
    last = (image_size - patch_size) // stride
    if grid > last + 1:
        raise ValueError(f"a {grid} x {grid} grid of {patch_size} px patches on a {stride} px step needs images of at "
                         f"least {(grid - 1) * stride + patch_size} px, got {image_size}")
    steps = torch.linspace(0, last, grid).round().long() * stride
    return torch.cartesian_prod(steps, steps)


def idw_weights(points: torch.Tensor, size: int, power: float) -> torch.Tensor:
    """(size², N) inverse-distance weights (Bartier & Keller 1996) of N (y, x) ``points`` at each pixel of a
    size × size grid: wᵢ = d⁻ᵖ normalised to sum 1; a pixel on a point takes that point's value alone.
    Elementwise ops only, so that an exported graph computes the table instead of storing it."""
    coords = torch.arange(size, dtype=points.dtype, device=points.device)
    dy = coords.view(size, 1, 1) - points[:, 0].view(1, 1, -1)  # (S, 1, N)
    dx = coords.view(1, size, 1) - points[:, 1].view(1, 1, -1)  # (1, S, N)
    squared = (dy * dy + dx * dx).reshape(size * size, -1)  # (P, N)
    on_point = squared < 1e-12
    weights = torch.where(on_point, 1.0, squared.clamp(min=1e-12).pow(-power / 2))  # a scalar: no P × N constant
    weights = torch.where(on_point.any(1, keepdim=True), on_point.to(points.dtype), weights)
    return weights / weights.sum(1, keepdim=True)


def _below(workdir: Path | None, name: str) -> Path | None:
    return workdir / name if workdir is not None else None


def idw_map(values: torch.Tensor, points: torch.Tensor, size: int, power: float) -> torch.Tensor:
    """Inverse-distance-weighted interpolation of (B, N) values at (N, 2) (y, x) points onto a size × size
    pixel grid: Σ wᵢ vᵢ / Σ wᵢ, wᵢ = d⁻ᵖ (:func:`idw_weights`)."""
    return (values @ idw_weights(points.to(values.dtype), size, power).T).view(-1, size, size)


def training_patches(
    images: torch.Tensor, image_size: int, patch_size: int, whole_image: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(patches, Global-Net inputs, masks) of a training batch in [0, 1]: one random patch per image (global RNG)
    and the image at ``image_size`` with that patch hidden (C.1), or with ``whole_image`` (C.2) the image resized
    to the patch size and the image whole."""
    full = resize(images, image_size)
    b, side, p = full.shape[0], image_size, patch_size
    if whole_image:
        return resize(images, p), full, full.new_ones(b, 1, side, side)
    origin = torch.randint(0, side - p + 1, (b, 2))
    rows = origin[:, :1] + torch.arange(p)  # (B, p)
    cols = origin[:, 1:] + torch.arange(p)
    patches = full[torch.arange(b)[:, None, None, None], torch.arange(3)[None, :, None, None],
                   rows[:, None, :, None], cols[:, None, None, :]]
    mask = full.new_ones(b, 1, side, side)
    for i in range(b):
        mask[i, :, rows[i, 0] : rows[i, -1] + 1, cols[i, 0] : cols[i, -1] + 1] = 0
    return patches, full, mask


class LocalDistillation(nn.Module):
    """One distillation stage of Glance's fit, what the training loop trains: Glance's Local-Net L and linear
    decoder D (held here too, so trained in place) against its frozen teacher T (Uninformed Students, Bergmann
    et al. 2020, whose patch network Table 1 is): λk‖D(L(p)) − T(p)‖² + λc Σ_{i≠j} corr(L(p))_ij over the batch.
    Built by ``Glance.distillation``, which gives it the three networks and T's input preprocessing."""

    def __init__(self, image_size: int, patch_size: int, whole_image: bool, lambda_k: float, lambda_c: float,
                 epochs: int, batch_size: int, lr: float, seed: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        self.whole_image = whole_image
        self.lambda_k = lambda_k
        self.lambda_c = lambda_c
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.seed = seed

    def training_settings(self) -> TrainingSettings:
        """C.1: Adam, β 0.9, 0.999."""
        return TrainingSettings(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed)

    def training_loss(self, images: torch.Tensor) -> torch.Tensor:
        """λk · distillation MSE + λc · compactness (sum of off-diagonal descriptor correlations)."""
        patches = training_patches(images, self.image_size, self.patch_size, self.whole_image)[0]
        with torch.no_grad():
            target = self.teacher(self.teacher_input(patches))[0].mean((2, 3))
        descriptors = self.local_net(patches)
        loss = self.lambda_k * (self.decoder(descriptors) - target).square().sum(1).mean()
        if self.lambda_c and descriptors.shape[0] > 1:
            centred = descriptors - descriptors.mean(0)
            std = centred.square().mean(0).add(1e-8).sqrt()
            corr = (centred / std).T @ (centred / std) / descriptors.shape[0]
            loss = loss + self.lambda_c * (corr.sum() - corr.diagonal().sum())
        return loss


class Glance(nn.Module):
    """Glancing at the Patch (Wang et al., CVPR 2021).

    Args:
        backbone, teacher_layer, weights: the Local-Net's teacher (paper: ResNet-18, ``backbone="resnet18",
            teacher_layer=4, weights=PATH``; default the offline EfficientNet-Lite0's last stage, 320-d), its
            globally averaged last map on the patch resized to ``teacher_size`` px being the target.
        image_size, patch_size: C.1: images at 256×256, patches 33×33 (Tables 1-2).
        pretrain_folders: image folders for the Local-Net's first distillation (paper: ImageNet), each image
            resized to ``image_size``; () skips it. ``pretrain_epochs``: passes over them.
        local_epochs, local_lr, local_batch_size, lambda_k, lambda_c: the distillation settings (C.1: Adam
            2e-4, batch 64 on ImageNet, 16 on the category; the loss weights λk = λc = 1).
        global_epochs, global_lr, batch_size: Global-Net + DAD head training (C.1: Adam, Global-Net 1e-4,
            batch 64). ``dad_lr_ratio``: the DAD head's lr over the Global-Net's (C.1: 1e-5 / 1e-4, the paper
            preset). The shared loop has one lr, so the head's weights are stored divided by this ratio
            (``ScaledLinear``): Adam's step on them is then the ratio times smaller, exactly a second learning
            rate. The default, 1 (both 1e-4), and 8 Global-Net epochs were chosen on held-out MTD training images
            with synthetic surface defects (``benchmarks/epoch_validation.py``, no test image; figures in
            ``benchmarks/NOTES.md``): with the paper's ratio the head barely moves in the few hundred steps of a
            CPU budget (the paper trains 200K iterations).
        leaky_logits: Table 3's leaky ReLU on the DAD head's two logits (False: linear logits).
        lambda_t, margin: weight of the triplet term (C.1: 0.01) and its margin (not given: 1).
        lambda_s: weight of the DAD head's mismatch probability in a patch's score (C.1: 0.8); the rest goes to
            the global-local cosine distance (1 − cos)/2 (the main paper's distance term, here on a 0-1 scale).
        grid, idw_power: C.1: 20 × 20 patches per image, IDW with p = 5.
        one_class: C.2's protocol: the whole image resized to the patch size is the patch, the Global-Net sees
            the whole image unmasked, the negative is another image of the batch; map = the image's score.
        stain_colour: ``"auto"``: the negative patches' stains are grey on grey images (their colour's luma), so
            that the DAD head cannot learn colour for a mismatch where real defects have none; ``"as_is"``: C.1's
            random colours everywhere (the paper preset).
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

    augments_inputs: ClassVar[bool] = True  # random patches, stains: no feature cache
    SAVED_WITHOUT: ClassVar[dict[str, object]] = {}
    PREDICT_BATCH: ClassVar[int] = 8  # images per predict pass
    PRESETS: ClassVar[dict[str, dict]] = {
        "paper": {"local_epochs": 1050, "global_epochs": 16800, "local_batch_size": 16, "batch_size": 64,
                  "dad_lr_ratio": 0.1, "stain_colour": "as_is"},
        "cpu": {"local_epochs": 4, "global_epochs": 8},
        "tiny": {"local_epochs": 3, "global_epochs": 3, "local_batch_size": 4, "batch_size": 4, "grid": 3,
                 "teacher_size": 33},
    }

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0", teacher_layer: int = 4,
        weights: str | None = None, teacher_size: int = 64,
        image_size: int = 256, patch_size: int = 33,
        pretrain_folders: tuple[str, ...] = (), pretrain_epochs: int = 1,
        local_epochs: int = 8, local_lr: float = 2e-4, local_batch_size: int = 16,
        lambda_k: float = 1.0, lambda_c: float = 1.0,
        global_epochs: int = 8, global_lr: float = 1e-4, dad_lr_ratio: float = 1.0, leaky_logits: bool = True,
        batch_size: int = 16,
        lambda_t: float = 0.01, margin: float = 1.0, lambda_s: float = 0.8,
        grid: int = 20, idw_power: float = 5.0, one_class: bool = False, stain_colour: str = "auto", seed: int = 0,
    ) -> None:
        super().__init__()
        if image_size < GLOBAL_MIN_SIZE:
            raise ValueError(f"image_size must be at least {GLOBAL_MIN_SIZE} (Global-Net, Table 2), got {image_size}")
        if patch_size != 33:
            raise ValueError(f"the Local-Net of Table 1 takes 33×33 patches, got patch_size={patch_size}")
        self.backbone, self.teacher_layer = backbone, teacher_layer
        self.weights, self.teacher_size = weights, teacher_size
        self.image_size, self.patch_size = image_size, patch_size
        self.pretrain_folders, self.pretrain_epochs = tuple(pretrain_folders), pretrain_epochs
        self.local_epochs, self.local_lr, self.local_batch_size = local_epochs, local_lr, local_batch_size
        self.lambda_k, self.lambda_c = lambda_k, lambda_c
        self.global_epochs, self.global_lr = global_epochs, global_lr
        self.dad_lr_ratio, self.leaky_logits, self.batch_size = dad_lr_ratio, leaky_logits, batch_size
        self.lambda_t, self.margin, self.lambda_s = lambda_t, margin, lambda_s
        check_anomaly_options(stain_colour, names=("stain_colour", ""))
        self.grid, self.idw_power, self.one_class, self.seed = grid, idw_power, one_class, seed
        self.stain_colour = stain_colour
        self.teacher = Backbone(backbone, (teacher_layer,))
        self.preprocess = Preprocess(image_size)
        self.teacher_input = Preprocess(teacher_size, normalization=self.teacher.normalization)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.local_net = LocalNet()
            self.decoder = nn.Linear(128, self.teacher.channels[0])
            self.global_net = GlobalNet()
            self.dad_head = DADHead(dad_lr_ratio, leaky_logits)
        self.register_buffer("descriptor_mean", torch.zeros(128))
        self.register_buffer("descriptor_std", torch.ones(128))
        self.register_buffer("fitted", torch.tensor(False))
        self._idw_cache: tuple[tuple, torch.Tensor] | None = None

    def fit_summary(self) -> dict:
        return {}

    # ----------------------------------------------------------------------------------------- training
    # ``fit`` runs three stages in order: the Local-Net distilled on general images, then on the category
    # (each a :class:`LocalDistillation`), then the Global-Net and the DAD head with the Local-Net frozen (this
    # model's own ``training_settings`` and ``training_loss``).
    def distillation(self, general: bool) -> LocalDistillation:
        """The distillation stage on general images (``general``: C.1's patches) or on the category (C.1 or
        C.2's, as ``one_class``), training this model's Local-Net and decoder (C.1: Adam 2e-4)."""
        epochs, seed = (self.pretrain_epochs, self.seed) if general else (self.local_epochs, self.seed + 1)
        stage = LocalDistillation(self.image_size, self.patch_size, self.one_class and not general, self.lambda_k,
                                  self.lambda_c, epochs, self.local_batch_size, self.local_lr, seed)
        stage.local_net, stage.decoder, stage.teacher = self.local_net, self.decoder, self.teacher
        stage.teacher_input = self.teacher_input
        return stage

    def training_settings(self) -> TrainingSettings:
        """Global-Net + DAD head (C.1: Adam, β 0.9, 0.999)."""
        return TrainingSettings(epochs=self.global_epochs, batch_size=self.batch_size, lr=self.global_lr,
                                seed=self.seed + 2)

    def training_loss(self, images: torch.Tensor) -> torch.Tensor:
        """DAD cross-entropy on matching / stained (C.1) or other-image (C.2) patches + λt · triplet."""
        patches, full, mask = training_patches(images, self.image_size, self.patch_size, self.one_class)
        if self.one_class:
            negatives = patches.roll(1, 0)
        else:
            negatives = random_stains(patches, grey=grey_images(patches) if self.stain_colour == "auto" else None)
        with torch.no_grad():
            positive, negative = self.local_features(torch.cat([patches, negatives])).chunk(2)
        g = self.global_net(full, mask)
        logits = self.dad_head(torch.cat([g, g]), torch.cat([positive, negative]))
        labels = torch.cat([torch.ones(len(g)), torch.zeros(len(g))]).long().to(logits.device)
        triplet = F.relu((g - positive).norm(dim=1) - (g - negative).norm(dim=1) + self.margin).mean()
        return F.cross_entropy(logits, labels) + self.lambda_t * triplet

    def fit(self, train: TrainData, *, progress: bool = False, workdir: str | Path | None = None,
            resume: bool = False, on_epoch_end: EpochEnd | None = None) -> Glance:
        """Distil the Local-Net (general images, then ``train``), then train the Global-Net and DAD head on
        ``train`` with the Local-Net frozen; the distillations checkpoint into ``workdir/{pretrain,local}``, the
        last stage (whose log and curve are the run's own) into ``workdir``. ``on_epoch_end`` gets this model
        after every epoch of each stage."""
        self.teacher.load_weights(self.weights)
        images = TrainImages.from_data(train)
        workdir = Path(workdir) if workdir is not None else None
        hook = (lambda epoch, _: on_epoch_end(epoch, self)) if on_epoch_end is not None else None
        run_stage = partial(train_model, progress=progress, resume=resume, on_epoch_end=hook)
        try:
            if self.pretrain_folders and self.pretrain_epochs > 0:
                general = TrainImages(self._load_folders())
                run_stage(self.distillation(general=True), general, workdir=_below(workdir, "pretrain"))
            if self.local_epochs > 0:
                run_stage(self.distillation(general=False), images, workdir=_below(workdir, "local"))
            self._fit_descriptor_statistics(images)
            self.local_net.requires_grad_(False)
            self.decoder.requires_grad_(False)
            run_stage(self, images, workdir=workdir, on_epoch_end=marking_fitted(self, on_epoch_end))
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
                self.local_net(training_patches(batch.to(device), self.image_size, self.patch_size,
                                                self.one_class)[0])
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
                centres = self._grid().float() + (self.patch_size - 1) / 2
                self._idw_cache = (key, idw_weights(centres, self.image_size, self.idw_power).to(device))
        return self._idw_cache[1]

    def _grid(self) -> torch.Tensor:
        """The scoring grid's patch origins (C.1's 20 × 20), on the Local-Net's 4 px step."""
        return grid_origins(self.image_size, self.patch_size, self.grid, LOCAL_STRIDE)

    def _grid_local_features(self, full: torch.Tensor, origins: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, 128) standardised descriptors of the patches at ``origins``: from one dense Local-Net pass over
        each image where the patches lie on its 4 px step (no padding: each location of the dense map is
        exactly one patch's pass, at a sixth of the cost of 400 overlapping ones); else patch by patch."""
        if self.patch_size == 33 and bool((origins % LOCAL_STRIDE == 0).all()):
            dense = self.local_net.body(full)  # (B, 128, h, w)
            cells = origins // LOCAL_STRIDE
            found = dense[:, :, cells[:, 0], cells[:, 1]].transpose(1, 2)
            return (found - self.descriptor_mean) / self.descriptor_std
        b, n = patches.shape[:2]
        return self.local_features(patches.reshape(b * n, *patches.shape[2:])).view(b, n, -1)

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
        full = self.preprocess(images)
        if self.one_class:
            g = self.global_net(full, full.new_ones(full.shape[0], 1, *full.shape[-2:]))
            scores = self.patch_scores(g, self.local_features(resize(images, self.patch_size)))
            return scores[:, None, None].expand(-1, *images.shape[-2:]).clone()
        side, p = self.image_size, self.patch_size
        origins = self._grid()
        rows, cols = origins[:, :1] + torch.arange(p), origins[:, 1:] + torch.arange(p)
        patches = full[:, :, rows[:, :, None], cols[:, None, :]].transpose(1, 2)  # (B, N, 3, p, p)
        if incremental:  # image by image: each image's unmasked pass is shared by its N masked ones
            local = self._grid_local_features(full, origins, patches)  # (B, N, 128)
            scores = torch.stack([
                torch.cat([
                    self.patch_scores(
                        self.global_net.masked_patch_features(image, origins[part : part + chunk], p),
                        image_local[part : part + chunk],
                    )
                    for part in range(0, len(origins), chunk)
                ])
                for image, image_local in zip(full, local, strict=True)
            ])
        else:  # the batch's images side by side, each hidden square in turn
            # a zero that depends on the input: the exporter folds whatever derives from constants alone, and the
            # hidden-square masks and the IDW table (grid² × side² floats each) would be stored in the graph
            zero = full.flatten()[:1].isnan().sum() * 0
            origins = origins + zero
            parts = []
            for part in range(0, len(origins), chunk):
                masks = hidden_square_masks(origins[part : part + chunk], p, side).to(full)  # (n, 1, S, S)
                n = len(masks)
                hidden = full[:, None].expand(-1, n, -1, -1, -1).reshape(-1, 3, side, side)
                g = self.global_net(hidden, masks.repeat(full.shape[0], 1, 1, 1))
                local = self.local_features(patches[:, part : part + n].reshape(-1, 3, p, p))
                parts.append(self.patch_scores(g, local).view(-1, n))
            scores = torch.cat(parts, 1)  # (B, N)
        if incremental:
            weights = self._idw_weights(full.device)
        else:  # computed from the (input-anchored) origins: the exported graph holds no grid² × side² table
            weights = idw_weights(origins.to(full) + (p - 1) / 2, side, self.idw_power)
        fused = (scores @ weights.T).view(-1, 1, side, side)
        return F.interpolate(fused, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]

    def predict(self, images: torch.Tensor) -> AnomalyPrediction:
        """Image scores (B,) (the map's maximum, D.1) and anomaly maps (B, H, W) for images in [0, 1]."""
        def score(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            maps = self.anomaly_maps(batch)
            return maps.flatten(1).amax(1), maps

        return predict_in_batches(self, images, self.PREDICT_BATCH, score, fitted=bool(self.fitted))
