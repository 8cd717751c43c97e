"""The model registry: every method metaad ships, by name. It is also the conformance test matrix."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from metaad.models.metaformer import Metaformer
from metaad.models.patchcore import PatchCore

MODELS: dict[str, type[nn.Module]] = {
    "metaformer": Metaformer,
    "patchcore": PatchCore,
}


def model_class(name: str) -> type[nn.Module]:
    """The class registered as ``name``, with an error listing the valid names."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}") from None


def create_model(name: str, preset: str | None = None, **params: Any) -> nn.Module:
    """``MODELS[name](**PRESETS[preset], **params)``: unknown parameters are an error, never ignored."""
    cls = model_class(name)
    settings: dict[str, Any] = {}
    if preset is not None:
        presets = getattr(cls, "PRESETS", {})
        if preset not in presets:
            raise ValueError(f"model {name!r} has no preset {preset!r}; presets: {', '.join(sorted(presets))}")
        settings.update(presets[preset])
    settings.update(params)
    accepted = model_params(cls)
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        raise ValueError(f"model {name!r} got unknown parameter(s) {unknown}; accepted: {', '.join(accepted)}")
    return cls(**settings)


def model_params(cls: type[nn.Module]) -> list[str]:
    """Constructor parameter names of a method class (stored as attributes of the same name)."""
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def get_config(model: nn.Module) -> dict[str, Any]:
    """The constructor arguments that rebuild ``model`` (JSON-serialisable)."""
    config = {}
    for name in model_params(type(model)):
        value = getattr(model, name)
        config[name] = list(value) if isinstance(value, tuple) else value
    return config


def registered_name(model: nn.Module) -> str:
    """The registry name of a model instance."""
    for name, cls in MODELS.items():
        if type(model) is cls:
            return name
    raise ValueError(f"{type(model).__name__} is not a registered metaad model")
