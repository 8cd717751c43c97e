"""Saving and loading fitted models: ``model.json`` (name + constructor arguments) and ``model.safetensors``.

Loading never unpickles or executes anything: the JSON names a registered class, the tensors are safetensors.
No per-method code: a buffer registered empty (a memory bank, whose size the data decides) is resized to the
saved shape before loading; what the saves of an older metaad lack or name otherwise is one rule for every
method (below), and a method's own constructor arguments added since are its ``SAVED_WITHOUT``
(``metaad.types``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from metaad import runtime
from metaad.io import load_tensors, read_json, save_tensors, write_json
from metaad.models import REGISTRY, create_model, get_config, model_class, registered_name

CONFIG_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
# What the saves of an older metaad name otherwise (old key -> key now), lack among the buffers (the value a save
# without it had; None: the constructed one), and lack among the constructor arguments (the value its fit used).
RENAMED_KEYS = {"exposure_variation": "preprocess.exposure_variation"}
ADDED_BUFFERS: dict[str, object] = {
    "preprocess.exposure_variation": None,  # NaN: saved before exposure standardisation, which it never did
    "descriptor_mean": None,  # Glance before its descriptors were standardised: zeros and ones change nothing
    "descriptor_std": None,
    "fitted": True,  # a save from before the flag was of a fitted model
}
ADDED_PARAMETERS: dict[str, object] = {"standardize_images": "never"}


def save_model(model: nn.Module, folder: str | Path) -> Path:
    """Write the model's config and state (weights, memory banks, thresholds) into ``folder``."""
    folder = Path(folder)
    save_tensors(folder / WEIGHTS_FILE, model.state_dict(), metadata={"format": "metaad"})
    write_json(
        folder / CONFIG_FILE,
        {"model": registered_name(model), "params": get_config(model), "metaad_version": runtime.__version__},
    )
    return folder


def load_model(folder: str | Path) -> nn.Module:
    """Rebuild a saved model from ``folder`` (a run folder or a model folder)."""
    folder = Path(folder)
    if (folder / "model" / CONFIG_FILE).is_file():
        folder = folder / "model"
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"{folder}: no saved model here (expected {CONFIG_FILE} and {WEIGHTS_FILE}, or a run folder "
            "written by 'metaad fit' with them in model/)"
        )
    config = read_json(folder / CONFIG_FILE)
    if not isinstance(config, dict) or "model" not in config or "params" not in config:
        raise ValueError(f"{folder / CONFIG_FILE}: expected keys 'model' and 'params'")
    name = config["model"]
    if name not in REGISTRY:
        raise ValueError(
            f"{folder / CONFIG_FILE}: model {name!r} is not in this metaad ({runtime.__version__}); "
            f"available: {', '.join(sorted(REGISTRY))}. Refit with 'metaad fit'."
        )
    cls = model_class(name)
    model = _build(cls, name, folder, dict(config["params"]))
    state = {RENAMED_KEYS.get(key, key): tensor for key, tensor in load_tensors(folder / WEIGHTS_FILE).items()}
    own = model.state_dict()
    for key, saved in state.items():  # data-sized buffers, registered empty
        if key in own and own[key].numel() == 0 and own[key].shape != saved.shape:
            _set_buffer(model, key, saved)
    missing, unexpected = model.load_state_dict(state, strict=False)
    for key in missing:  # a buffer an older save lacks
        if ADDED_BUFFERS.get(key) is not None:
            with torch.no_grad():
                model.get_buffer(key).fill_(ADDED_BUFFERS[key])
    missing = [key for key in missing if key not in ADDED_BUFFERS]
    if missing or unexpected:
        raise ValueError(
            f"{folder / WEIGHTS_FILE}: does not match model {name!r} of this metaad "
            f"(missing: {missing[:5]}, unexpected: {unexpected[:5]}); it was saved by metaad "
            f"{config.get('metaad_version', '?')}. Refit with 'metaad fit'."
        )
    return model.eval()


def _build(cls: type, name: str, folder: Path, params: dict) -> nn.Module:
    from metaad.types import model_params

    accepted = set(model_params(cls))
    added = {**ADDED_PARAMETERS, **cls.SAVED_WITHOUT}
    params = {**{k: v for k, v in added.items() if k in accepted and k not in params}, **params}
    try:
        return create_model(name, **params)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{folder / CONFIG_FILE}: cannot rebuild {name!r} with this metaad ({error}). Refit with 'metaad fit'."
        ) from error


def _set_buffer(model: nn.Module, key: str, saved) -> None:
    owner_name, _, buffer_name = key.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    setattr(owner, buffer_name, saved.new_empty(saved.shape))
