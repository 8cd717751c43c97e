"""The instance-prior generator P of Metaformer (§3.2, Fig. 3), learned as a Visual-Effect GAN (Chen et al. [8]).

P maps an image to a response map R in [0, 1] that is high on the foreground object. It is the generator G
of a GAN that imitates the *color selectivo* effect (object in colour, background gray):

- G (:class:`Generator`): (B, 3, H, W) RGB in [0, 1] → R (B, 1, H, W); a U-Net whose encoder is the
  stem and first five blocks of EfficientNet-Lite0 (strides 2..16, initialised from ImageNet classification
  weights, image-level labels only) and whose light decoder goes back to full resolution through skip
  connections and the RGB input, so that R keeps object boundaries.
- E (:func:`apply_color_selectivo`): E(I, R) = R·I + (1 − R)·gray(I), differentiable in R.
- D (:class:`Discriminator`): spectral-normalised patch discriminator telling E(I, G(I)) from real effect
  images, helped by frozen ImageNet features of the effect image's luminance.

What keeps the GAN away from degenerate R (tested in ``tests/test_instance_prior.py``):

1. The editor only moves saturation: gray(E(I, R)) = gray(I) and E − gray(E) = R·(I − gray(I)). An all-ones R
   returns the unedited colour photo, an all-zeros R a fully gray one; real effect images are neither, and D
   sees the chroma magnitude |E − gray(E)| as an extra input channel so that it judges colour vs gray at once.
2. :func:`collapse_guard`: a hinge on the mean of R per image, zero inside a plausible coloured-area range and
   1 at all-ones / all-zeros, plus a binarisation term 4·R(1 − R) that is 1 for a flat R = 0.5.
3. Mismatched effect images (an effect-part image edited with another image's mask) are shown to D as fakes,
   so that an object-shaped coloured region is real only where the object is (``prior_training.py``).
4. Spectral norm in D, hinge loss, mirrored images, and an exponential moving average of G (``prior_training.py``).

G never sees a mask; the masks of a disjoint part of the data only make the real effect images
(``metaad.data.saliency``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from metaad.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize
from metaad.io import load_tensors, read_json

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma
WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"  # metaad/weights
SHIPPED_WEIGHTS = WEIGHTS_DIR / "instance_prior.safetensors"
FORMAT = "metaad-instance-prior"
SKIP_STRIDES = (2, 4, 8, 16)


def to_gray(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma of (B, 3, H, W) RGB images in [0, 1]."""
    return (images * images.new_tensor(GRAY_WEIGHTS).view(1, 3, 1, 1)).sum(1, keepdim=True)


def apply_color_selectivo(images: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """The editor E of [8]: E(I, R) = R·I + (1 − R)·gray(I), for RGB images in [0, 1] and R in [0, 1].

    ``response`` is (B, 1, H, W) (a mask makes a real effect image, G's R an edited one); differentiable in both.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W) RGB images in [0, 1], got {tuple(images.shape)}")
    if response.ndim != 4 or response.shape[1] != 1 or response.shape[-2:] != images.shape[-2:]:
        raise ValueError(
            f"expected a (B, 1, H, W) response matching images {tuple(images.shape)}, got {tuple(response.shape)}"
        )
    return response * images + (1 - response) * to_gray(images)


def chroma(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) mean |I − gray(I)| over RGB: zero exactly where an image is gray."""
    return (images - to_gray(images)).abs().mean(1, keepdim=True)


def collapse_guard(response: torch.Tensor, area_range: tuple[float, float] = (0.05, 0.6)) -> dict[str, torch.Tensor]:
    """The two guard losses against degenerate R, each 0 for a plausible map and 1 for a degenerate one.

    ``area``: per-image hinge on mean(R) outside ``area_range``, normalised so that all-zeros and all-ones
    both cost 1 (training passes the 2.5th-97.5th percentiles of the effect photos' coloured area).
    ``binary``: mean of 4·R(1 − R), 1 for a flat R = 0.5 and 0 for a binary map.
    """
    low, high = area_range
    if not 0 < low < high < 1:
        raise ValueError(f"area_range must satisfy 0 < low < high < 1, got {area_range}")
    area = response.flatten(1).mean(1)
    area_loss = F.relu(low - area) / low + F.relu(area - high) / (1 - high)
    return {"area": area_loss.mean(), "binary": (4 * response * (1 - response)).mean()}


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class Generator(nn.Module):
    """G = P: a U-Net with a frozen ImageNet EfficientNet encoder and a light decoder back to full resolution.

    ``encoder`` is a timm EfficientNet-family name; its stem and blocks up to stride 16 give skip features at
    strides 2, 4, 8 and 16 and stay frozen (weights and batch-norm statistics), so that training only fits the
    decoder, whose widths at strides 16, 8, 4, 2, 1 are ``decoder_channels``; the last stage also sees the
    RGB input, which keeps object boundaries sharp. ``working_size`` (optional) is the side at which
    :meth:`forward` runs (inputs resized to it, R resized back): the resolution G was trained at.
    Architecture only: ImageNet weights come from :meth:`load_encoder_weights` or a weights file.
    """

    def __init__(
        self,
        encoder: str = "tf_efficientnet_lite0",
        decoder_channels: tuple[int, ...] = (64, 48, 32, 16, 8),
        working_size: int | None = None,
    ) -> None:
        super().__init__()
        if len(decoder_channels) != 5:
            raise ValueError(f"decoder_channels needs 5 widths (strides 16, 8, 4, 2, 1), got {decoder_channels}")
        self.encoder = encoder
        self.decoder_channels = tuple(int(c) for c in decoder_channels)
        self.working_size = working_size
        model = timm.create_model(encoder, pretrained=False)
        if not all(hasattr(model, name) for name in ("conv_stem", "bn1", "blocks")):
            raise ValueError(f"encoder {encoder!r} is not an EfficientNet-family timm model (conv_stem, bn1, blocks)")
        info = {d["reduction"]: d for d in model.feature_info}
        if any(r not in info for r in SKIP_STRIDES):
            raise ValueError(f"encoder {encoder!r} has no features at strides {SKIP_STRIDES}")
        self._taps = [int(info[r]["module"].split(".")[1]) for r in SKIP_STRIDES]
        self.skip_channels = [int(info[r]["num_chs"]) for r in SKIP_STRIDES]
        self.conv_stem, self.bn1 = model.conv_stem, model.bn1
        self.blocks = nn.Sequential(*list(model.blocks)[: self._taps[-1] + 1])
        for module in self.encoder_modules():
            module.requires_grad_(False).eval()  # ImageNet batch-norm statistics are never updated
        # ImageNet-normalised input -> the encoder's own normalisation (TF-ported Lite models use 0.5 / 0.5).
        cfg = model.pretrained_cfg
        mean, std = torch.tensor(cfg.get("mean", IMAGENET_MEAN)), torch.tensor(cfg.get("std", IMAGENET_STD))
        scale = torch.tensor(IMAGENET_STD) / std
        shift = (torch.tensor(IMAGENET_MEAN) - mean) / std
        self.register_buffer("input_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", shift.view(1, 3, 1, 1), persistent=False)
        c16, c8, c4, c2, c1 = self.decoder_channels
        s2, s4, s8, s16 = self.skip_channels
        self.lateral = _conv_bn_relu(s16, c16)
        self.up8 = _conv_bn_relu(c16 + s8, c8)
        self.up4 = _conv_bn_relu(c8 + s4, c4)
        self.up2 = _conv_bn_relu(c4 + s2, c2)
        self.up1 = _conv_bn_relu(c2 + 3, c1)
        self.head = nn.Conv2d(c1, 1, 3, padding=1)
        nn.init.constant_(self.head.bias, -1.0)  # start sparse (mean R about 0.27), inside the area range

    def encoder_modules(self) -> list[nn.Module]:
        return [self.conv_stem, self.bn1, self.blocks]

    def train(self, mode: bool = True) -> Generator:
        """Train the decoder; the frozen encoder stays in eval mode."""
        super().train(mode)
        for module in self.encoder_modules():
            module.eval()
        return self

    def load_encoder_weights(self, weights: str | None = None) -> Generator:
        """Initialise the encoder from ImageNet weights via ``metaad.backbones.load_pretrained`` (None: the
        offline weight package; or a local file)."""
        from metaad.backbones import load_pretrained

        source = load_pretrained(self.encoder, weights)
        self.conv_stem.load_state_dict(source.conv_stem.state_dict())
        self.bn1.load_state_dict(source.bn1.state_dict())
        for own, theirs in zip(self.blocks, source.blocks, strict=False):
            own.load_state_dict(theirs.state_dict())
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen encoder's features at strides 2, 4, 8, 16 of ImageNet-normalised images (training
        precomputes them once)."""
        x = self.bn1(self.conv_stem(images * self.input_scale + self.input_shift))
        features = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self._taps:
                features.append(x)
        return features

    def decode(self, features: Sequence[torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid R at the resolution of ImageNet-normalised ``images`` from the encoder's ``features``."""
        f2, f4, f8, f16 = (f.to(images.dtype) for f in features)
        x = self.lateral(f16)
        for stage, skip in ((self.up8, f8), (self.up4, f4), (self.up2, f2)):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = stage(torch.cat([x, skip], 1))
        x = F.interpolate(x, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.up1(torch.cat([x, images], 1)))

    def respond(self, images: torch.Tensor) -> torch.Tensor:
        """R in [0, 1] of ImageNet-normalised images, at their own resolution."""
        return torch.sigmoid(self.decode(self.encode(images), images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """R (B, 1, H, W) in [0, 1] for (B, 3, H, W) RGB images in [0, 1], run at ``working_size`` on the images
        normalised with ImageNet's statistics (what the decoder sees; the encoder converts to its own)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) RGB images in [0, 1], got {tuple(images.shape)}")
        images = normalize(images)
        size = images.shape[-2:]
        if self.working_size is None or tuple(size) == (self.working_size, self.working_size):
            return self.respond(images)
        work = (self.working_size, self.working_size)
        small = F.interpolate(images, size=work, mode="bilinear", antialias=True, align_corners=False)
        return F.interpolate(self.respond(small), size=size, mode="bilinear", align_corners=False).clamp(0, 1)


class Discriminator(nn.Module):
    """D: a spectral-normalised PatchGAN that also sees frozen ImageNet features of the photo's luminance.

    Input: an effect image E in [0, 1] RGB, as [E·2 − 1, 4·chroma(E)] (4 channels), through four stride-2
    4×4 convolutions of widths ``channels``; after the third and fourth, 1×1 projections of the ``context``
    are added: the encoder's stride-8 and stride-16 features of gray(E), whose channels are
    ``context_channels`` (:func:`luminance_context`). Since gray(E(I, R)) = gray(I), the context is a function
    of the effect image alone, so D still judges effect images only; the features let it tell within a few
    hundred steps whether the coloured region is the object (a projected-GAN idea, Sauer et al. 2021).
    Output: hinge-loss logits per stride-16 patch; high = real.
    """

    def __init__(
        self,
        channels: tuple[int, ...] = (64, 128, 256, 256),
        context_channels: tuple[int, ...] = (40, 112),
        spectral_norm: bool = True,
    ) -> None:
        super().__init__()
        if len(channels) != 4 or len(context_channels) != 2:
            raise ValueError(f"expected 4 channel widths and 2 context widths, got {channels}, {context_channels}")
        self.channels = tuple(int(c) for c in channels)
        self.context_channels = tuple(int(c) for c in context_channels)
        self.spectral_norm = spectral_norm
        wrap = nn.utils.spectral_norm if spectral_norm else (lambda module: module)
        widths = [4, *self.channels]
        self.convs = nn.ModuleList(wrap(nn.Conv2d(widths[i], widths[i + 1], 4, 2, 1)) for i in range(4))
        self.projections = nn.ModuleList(
            wrap(nn.Conv2d(c, w, 1)) for c, w in zip(self.context_channels, self.channels[2:], strict=True)
        )
        self.out = wrap(nn.Conv2d(self.channels[-1], 1, 3, padding=1))

    def forward(self, edited: torch.Tensor, context: Sequence[torch.Tensor]) -> torch.Tensor:
        """Patch logits (B, 1, H/16, W/16) for effect images (B, 3, H, W) and their luminance ``context``."""
        x = torch.cat([edited * 2 - 1, 4 * chroma(edited)], 1)
        for index, conv in enumerate(self.convs):
            x = conv(x)
            if index >= 2:
                feature = context[index - 2].to(x.dtype)
                x = x + F.interpolate(self.projections[index - 2](feature), size=x.shape[-2:], mode="nearest")
            x = F.leaky_relu(x, 0.2)
        return self.out(x)


@torch.no_grad()
def luminance_context(generator: Generator, images: torch.Tensor) -> list[torch.Tensor]:
    """D's context: the frozen encoder's stride-8 and stride-16 features of gray(images) ([0, 1] RGB)."""
    gray = to_gray(images).expand(-1, 3, -1, -1)
    return generator.encode(normalize(gray))[2:]


def generator_config(generator: Generator) -> dict:
    """The constructor arguments of ``generator``, as JSON."""
    return {
        "encoder": generator.encoder,
        "decoder_channels": list(generator.decoder_channels),
        "working_size": generator.working_size,
    }


def load_instance_prior(path: str | None = None) -> nn.Module:
    """The frozen eval-mode generator P from ``path`` (a ``.safetensors`` file with a ``.json`` config beside it).

    ``None`` loads the generator shipped in ``metaad/weights/instance_prior.safetensors``; nothing is
    downloaded. Input: (B, 3, H, W) RGB in [0, 1]; output: R (B, 1, H, W) in [0, 1].
    """
    weights = Path(path) if path is not None else SHIPPED_WEIGHTS
    config_path = weights.with_suffix(".json")
    if not weights.is_file():
        where = "the shipped instance prior" if path is None else "instance-prior weights"
        raise FileNotFoundError(
            f"{weights}: {where} not found. Train one with `metaad train-prior --data DIR --out DIR "
            "--export PATH` and pass its .safetensors path (the .json config must sit beside it)."
        )
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: missing config for {weights.name} (written by the export)")
    config = read_json(config_path)
    if config.get("format") != FORMAT or "generator" not in config:
        raise ValueError(f"{config_path}: expected format {FORMAT!r} with a 'generator' entry")
    generator = Generator(**config["generator"])
    state = load_tensors(weights)
    expected = generator.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{weights}: tensors do not match the generator (missing {missing[:5]}, extra {unexpected[:5]})"
        )
    generator.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return generator.eval().requires_grad_(False)


def export_generator(generator: Generator, path: str | Path, provenance: dict | None = None) -> Path:
    """Write ``path`` (.safetensors, float32) and its ``.json`` config (+ how it was trained)."""
    from metaad.io import save_tensors, write_json

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: the exported generator must be a .safetensors file")
    save_tensors(path, generator.state_dict(), metadata={"format": FORMAT})
    payload = {"format": FORMAT, "generator": generator_config(generator)}
    if provenance:
        payload["training"] = provenance
    write_json(path.with_suffix(".json"), json.loads(json.dumps(payload)))
    return path


def make_effect_images(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Real colour-selectivo photos: object (mask) in colour, background gray; float RGB in [0, 1].

    ``images`` (N, 3, H, W) and ``masks`` (N, 1, H, W), uint8 (0..255) or float in [0, 1].
    """
    def as_float(x: torch.Tensor) -> torch.Tensor:
        return x.float() / 255 if x.dtype == torch.uint8 else x.float()

    return apply_color_selectivo(as_float(images), as_float(masks))
