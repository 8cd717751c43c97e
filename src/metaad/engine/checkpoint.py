"""Saving and loading fitted models: ``model.json`` (name + constructor arguments) and ``model.safetensors``.

Loading never unpickles or executes anything: the JSON names a registered class, the tensors are safetensors.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

import metaad
from metaad.engine.io import load_tensors, read_json, save_tensors, write_json
from metaad.models import create_model, get_config, model_class, registered_name

CONFIG_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"


def save_model(model: nn.Module, folder: str | Path) -> Path:
    """Write the model's config and state (weights, memory banks, thresholds) into ``folder``."""
    folder = Path(folder)
    save_tensors(folder / WEIGHTS_FILE, model.state_dict(), metadata={"format": "metaad"})
    write_json(
        folder / CONFIG_FILE,
        {"model": registered_name(model), "params": get_config(model), "metaad_version": metaad.__version__},
    )
    return folder


def load_model(folder: str | Path) -> nn.Module:
    """Rebuild a saved model from ``folder`` (a run folder or a model folder)."""
    folder = Path(folder)
    if (folder / "model" / CONFIG_FILE).is_file():
        folder = folder / "model"
    config = read_json(folder / CONFIG_FILE)
    if not isinstance(config, dict) or "model" not in config or "params" not in config:
        raise ValueError(f"{folder / CONFIG_FILE}: expected keys 'model' and 'params'")
    params = config["params"]
    # a parameter added after the model was saved takes the value its fit used, not today's default
    legacy = getattr(model_class(config["model"]), "SAVED_WITHOUT", {})
    params = {**{k: v for k, v in legacy.items() if k not in params}, **params}
    model = create_model(config["model"], **params)
    state = load_tensors(folder / WEIGHTS_FILE)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{folder / WEIGHTS_FILE}: does not match model {config['model']!r} "
            f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    return model.eval()
