"""The contract between a method and the rest of metaad (runs, deploy, the training loop), written once.

A method is a plain ``torch.nn.Module`` that also satisfies :class:`AnomalyModel`:

- its constructor arguments are its whole config: each is stored under the same name, is JSON-serialisable,
  and ``type(model)(**config)`` rebuilds it (``metaad.models.get_config``);
- ``PRESETS`` on the class holds ``"paper"`` (the paper's settings), ``"cpu"`` (what trains on 2 cores)
  and ``"tiny"`` (for tests), each a dict of constructor arguments;
- inputs are float (B, 3, H, W) RGB images in [0, 1] of any H and W; the method resizes to its own
  ``image_size`` and normalises for its own backbone (``metaad.components.preprocess``); maps come back at H × W;
- ``predict`` on a method that needs fitting and has not been fitted raises :class:`NotFittedError`; it takes
  images on any device, runs them on the model's (:func:`device_of`; the engine moves the model with ``.to``)
  and returns CPU tensors (all three written once, in ``metaad.components.estimator``);
- every fitted tensor lives in a parameter or a buffer, so ``state_dict`` (one safetensors file) plus the
  config rebuild a fitted model. A buffer whose size depends on the data (a memory bank) is registered
  empty; loading resizes it to the saved shape. A frozen backbone's pretrained weights are read by ``fit``
  (``metaad.backbones.Backbone.load_weights``), never by the constructor: a loaded model has them from its
  state dict;
- the hooks every method declares (:class:`AnomalyModel`): ``SAVED_WITHOUT``, the constructor arguments a
  model saved by an older metaad lacks, with the value its fit used (what every method's older saves lack,
  renamed buffers included, is ``metaad.models.persistence``'s rule); ``fit_summary()``, what the fit decided
  from the data (a run's ``metrics.json``, ``{}`` when nothing); ``export_forward(images)``, ``predict``'s
  computation for one batch in plain tensor operations, what ONNX export traces (``metaad.deploy.export``):
  PatchCore's faiss search becomes an exact one there.

Gradient-trained methods are also :class:`TrainableModel`: they give the shared training loop
(``metaad.training``) a loss for a batch and their optimiser settings, and their ``fit`` calls the loop.
The engine relies on these names and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import torch


class NotFittedError(RuntimeError):
    """``predict`` was called on a method that has not been fitted (or loaded) yet."""


def device_of(model: torch.nn.Module) -> torch.device:
    """The device a method's tensors are on (its first parameter's, else its first buffer's): where it
    moves the batches it makes itself, since ``model.to(device)`` moves both."""
    first = next(chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


class AnomalyPrediction(NamedTuple):
    """Output of ``predict``: scores (B,) higher = more anomalous; maps (B, H, W) at the input's size."""

    scores: torch.Tensor
    maps: torch.Tensor


TrainData = torch.Tensor | Iterable[Any]
"""What ``fit`` accepts: a (N, 3, H, W) tensor in [0, 1], a map-style data set or DataLoader of metaad
samples (dicts with an ``"image"`` entry), or any iterable of such batches."""


@runtime_checkable
class AnomalyModel(Protocol):
    """What every registered method provides (see the module docstring)."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]]
    SAVED_WITHOUT: ClassVar[dict[str, Any]]
    image_size: int | None

    def fit(
        self, train: TrainData, *, progress: bool = False, workdir: str | Path | None = None, resume: bool = False
    ) -> AnomalyModel:
        """Learn from defect-free images; ``workdir`` receives checkpoints and logs of trained methods,
        ``resume`` continues from its last checkpoint. Returns ``self``."""
        ...

    def predict(self, images: torch.Tensor) -> AnomalyPrediction:
        """Scores and maps for (B, 3, H, W) images in [0, 1]."""
        ...

    def export_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``predict`` of one batch on the model's device, in plain tensor operations (for ONNX export)."""
        ...

    def fit_summary(self) -> dict[str, Any]:
        """What the last fit decided from the data (``{}`` when nothing)."""
        ...


@dataclass(frozen=True)
class TrainingSettings:
    """How the shared loop optimises a method (its paper's settings, from the method's constructor).

    ``lr_milestones`` are fractions of ``epochs`` after which the learning rate is multiplied by
    ``lr_gamma`` (DRAEM: (0.8, 0.9), ×0.2). ``gradient_clip_norm`` clips the global gradient norm before
    every step (UniAD: 0.1); None: no clipping.
    """

    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "adam"  # "adam" or "adamw" or "sgd"
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    lr_milestones: tuple[float, ...] = ()
    lr_gamma: float = 0.1
    gradient_clip_norm: float | None = None
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


EpochEnd = Callable[[int, torch.nn.Module], None]
"""``on_epoch_end(epoch, model)``, which a trained method's ``fit`` passes to every training loop it runs: called
after each epoch (1-based; each stage counts its own), e.g. to validate along one training."""


@runtime_checkable
class TrainableModel(AnomalyModel, Protocol):
    """A gradient-trained method: the loop owns epochs, optimiser, schedule, order, checkpoints and resume.
    Its ``fit`` also takes ``on_epoch_end`` (an :data:`EpochEnd`, None by default)."""

    def training_settings(self) -> TrainingSettings:
        """The optimiser, schedule, batch size and epochs to train with."""
        ...

    def training_loss(self, images: torch.Tensor) -> torch.Tensor:
        """A scalar loss for a batch of defect-free (B, 3, H, W) images in [0, 1] (the model is in train mode);
        for a method whose ``fit`` hands the loop its frozen maps (``metaad.components.feature_cache``), the
        batch is the list of those maps."""
        ...


def model_params(cls: type) -> list[str]:
    """Constructor parameter names of a method class (each stored as an attribute of the same name)."""
    import inspect

    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def get_config(model: torch.nn.Module) -> dict[str, Any]:
    """The constructor arguments that rebuild ``model`` (JSON-serialisable; tuples become lists)."""
    config = {}
    for name in model_params(type(model)):
        value = getattr(model, name)
        config[name] = list(value) if isinstance(value, tuple) else value
    return config


def check_param_types(cls: type, settings: dict[str, Any], owner: str) -> None:
    """Each of ``settings`` against the annotation of ``cls``'s constructor argument of that name: a value of
    the wrong type is a one-line error naming the parameter, the value and what is expected, before the
    constructor could fail deep inside with an unrelated message. JSON's lists stand for tuples and its
    integers for floats; an annotation this check cannot read accepts anything."""
    import typing

    from metaad.param_types import conforms

    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that does not evaluate here: leave the constructor to check
        return
    for name, value in settings.items():
        hint = hints.get(name)
        if hint is not None and not conforms(value, hint):
            expected = getattr(hint, "__name__", None) if isinstance(hint, type) else None
            raise ValueError(
                f"{owner}: parameter {name}={value!r} is not a valid value: expected {expected or hint}"
            )
