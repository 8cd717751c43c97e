"""The model registry: every method metaad ships, by name, imported only when asked for.

It is also the conformance test matrix (``tests/test_conformance.py``). Adding a method = one module in this
package + one line here. Nothing in this file imports torch, so ``metaad --help`` stays fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Registered:
    """A method's registry entry: where its class lives, its paper, and whether it is gradient-trained."""

    path: str  # "module:Class"
    paper: str
    trains: bool


REGISTRY: dict[str, Registered] = {
    "patchcore": Registered("metaad.models.patchcore:PatchCore", "Roth et al., CVPR 2022 (MIAD A.2.2)", False),
    "metaformer": Registered("metaad.models.metaformer.model:Metaformer", "Wu et al., ICCV 2021", True),
    "reverse_distillation": Registered(
        "metaad.models.reverse_distillation:ReverseDistillation", "Deng & Li, CVPR 2022 (MIAD A.2.1)", True
    ),
    "fastflow": Registered("metaad.models.fastflow:FastFlow", "Yu et al. 2021 (MIAD A.2.3)", True),
    "draem": Registered("metaad.models.draem:Draem", "Zavrtanik et al., ICCV 2021 (MIAD A.2.4)", True),
    "unet_autoencoder": Registered(
        "metaad.models.unet_autoencoder:UNetAutoencoder", "MIAD A.2.5 (Bergmann et al., CVPR 2019 AE)", True
    ),
    "multiscale_patch": Registered(
        "metaad.models.multiscale_patch:MultiScalePatch", "Tsai, Wu & Lai, WACV 2022 (supplementary)", True
    ),
    "glance": Registered("metaad.models.glance:Glance", "Wang et al., CVPR 2021 (supplementary)", True),
    "uniad": Registered("metaad.models.uniad:UniAD", "You et al., NeurIPS 2022 (MIAD A.2.6)", True),
}
MODELS = tuple(REGISTRY)  # the registered names, for the CLI's choices


def model_class(name: str) -> type:
    """The class registered as ``name`` (imported now), with an error listing the valid names."""
    try:
        entry = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(REGISTRY))}") from None
    module, _, attribute = entry.path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def create_model(name: str, preset: str | None = None, **params: Any):
    """``REGISTRY[name](**PRESETS[preset], **params)``: unknown parameters are an error, never ignored."""
    from metaad.types import check_param_types, model_params

    cls = model_class(name)
    settings: dict[str, Any] = {}
    if preset is not None:
        presets = cls.PRESETS
        if preset not in presets:
            raise ValueError(f"model {name!r} has no preset {preset!r}; presets: {', '.join(sorted(presets))}")
        settings.update(presets[preset])
    settings.update(params)
    accepted = model_params(cls)
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        raise ValueError(f"model {name!r} got unknown parameter(s) {unknown}; accepted: {', '.join(accepted)}")
    check_param_types(cls, settings, f"model {name!r}")
    return cls(**settings)


def registered_name(model: Any) -> str:
    """The registry name of a model instance."""
    cls = type(model)
    for name, entry in REGISTRY.items():
        if entry.path == f"{cls.__module__}:{cls.__qualname__}":
            return name
    raise ValueError(f"{cls.__name__} is not a registered metaad model")


def get_config(model: Any) -> dict[str, Any]:
    """The constructor arguments that rebuild ``model`` (see ``metaad.types.get_config``)."""
    from metaad.types import get_config as config_of

    return config_of(model)
