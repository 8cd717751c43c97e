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


@dataclass(frozen=True)
class Setting:
    """One constructor argument of a method, as its source declares it."""

    name: str
    default: str  # the default as written in the signature
    presets: dict[str, str]  # preset -> value, where the preset sets it
    meaning: str  # from the class docstring's Args section ("" where it says nothing)
    annotation: str = ""  # the type as written in the signature ("" where it has none)


def describe(name: str) -> tuple[list[str], list[Setting]]:
    """(preset names, settings) of the method registered as ``name``, read from its module's source with
    :mod:`ast`, so that ``metaad models`` answers without importing torch (the class itself is not imported)."""
    import ast
    from pathlib import Path

    entry = REGISTRY.get(name)
    if entry is None:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(REGISTRY))}")
    module, _, class_name = entry.path.partition(":")
    source = Path(__file__).resolve().parents[1].joinpath(*module.split(".")[1:]).with_suffix(".py")
    tree = ast.parse(source.read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    presets: dict[str, dict] = {}
    init = None
    for item in node.body:
        if isinstance(item, ast.AnnAssign | ast.Assign):
            targets = [item.target] if isinstance(item, ast.AnnAssign) else item.targets
            if any(isinstance(t, ast.Name) and t.id == "PRESETS" for t in targets) and item.value is not None:
                presets = {k: {key: ast.unparse(v) for key, v in zip(d.keys, d.values, strict=True)}
                           for k, d in zip((ast.literal_eval(k) for k in item.value.keys), item.value.values,
                                           strict=True) if isinstance(d, ast.Dict)}
        elif isinstance(item, ast.FunctionDef) and item.name == "__init__":
            init = item
    docstring = ast.get_docstring(node) or ""
    meanings = _docstring_args(docstring)
    settings = []
    if init is not None:
        arguments = [*init.args.args[1:], *init.args.kwonlyargs]
        defaults = [None] * (len(init.args.args) - 1 - len(init.args.defaults)) + list(init.args.defaults)
        defaults += list(init.args.kw_defaults)
        for argument, default in zip(arguments, defaults, strict=True):
            settings.append(Setting(
                argument.arg, "" if default is None else ast.unparse(default),
                {p: values[argument.arg] for p, values in presets.items() if argument.arg in values},
                meanings.get(argument.arg) or _mention(docstring, argument.arg),
                "" if argument.annotation is None else ast.unparse(argument.annotation),
            ))
    return list(presets), settings


def check_params(name: str, params: dict[str, Any]) -> None:
    """``params`` of the method ``name`` checked against its signature as the source writes it (names and
    types, :func:`describe`), without importing torch: a one-line error for an unknown or wrong-typed one.
    Annotations naming the library's own classes are left to :func:`create_model`'s check."""
    import difflib

    from metaad.param_types import annotation_from_text, conforms

    settings = {setting.name: setting for setting in describe(name)[1]}
    for key, value in params.items():
        setting = settings.get(key)
        if setting is None:
            close = difflib.get_close_matches(key, settings, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"model {name!r} has no parameter {key!r}; {hint}accepted: {', '.join(settings)}")
        hint_type = annotation_from_text(setting.annotation) if setting.annotation else None
        if hint_type is not None and not conforms(value, hint_type):
            raise ValueError(f"model {name!r}: parameter {key}={value!r} is not a valid value: expected "
                             f"{setting.annotation}")


def _mention(docstring: str, name: str) -> str:
    """The sentence of ``docstring`` that first names ``name`` as ``name`` ("" where none does)."""
    import re

    text = " ".join(docstring.split())
    found = re.search(r"(?:^|(?<=[.;:]\s))[^.;]*``" + re.escape(name) + r"``.*?(?:[.;](?=\s|$)|$)", text)
    return found.group(0).strip() if found else ""


def _docstring_args(docstring: str) -> dict[str, str]:
    """name -> text of a Google-style ``Args:`` section (``a, b: text`` gives both names the text)."""
    import re

    meanings: dict[str, str] = {}
    lines = docstring.splitlines()
    if "Args:" not in (line.strip() for line in lines):
        return meanings
    start = [line.strip() for line in lines].index("Args:") + 1
    names: list[str] = []
    for line in lines[start:]:
        if line.strip() and not line.startswith("    "):
            break  # the section ends at the next unindented line
        entry = re.match(r"^    ([A-Za-z_][\w, ]*):\s*(.*)$", line)
        if entry and not line.startswith("     "):
            names = [n.strip() for n in entry.group(1).split(",")]
            for n in names:
                meanings[n] = entry.group(2).strip()
        elif names and line.strip():
            for n in names:
                meanings[n] += " " + line.strip()
    return meanings
