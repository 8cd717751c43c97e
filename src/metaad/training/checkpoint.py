"""The one checkpoint format of metaad's training loops: the shared loop, MAML meta-training, the prior's GAN.

A checkpoint is one safetensors file, written atomically (``metaad.io.save_checkpoint_file``), so that a kill
never pairs one epoch's weights with another epoch's progress. Its tensors are keyed ``<part>.<key>``:

- a module's ``state_dict`` under the module's name (``model.net.0.weight``);
- an optimiser's per-parameter state under its name and the parameter's index in it, PyTorch's own keying
  (``optimizer.0.exp_avg``);
- the global RNG states under ``rng`` (``rng.torch``, ``rng.cuda.0``, ``rng.numpy``, ``rng.python``).

Its progress record (JSON in the file's metadata) holds the format, the epochs done, the run's ``identity``
(what a resumed run must share with it: settings but the epoch count, data), the optimisers' param groups,
the schedulers' states, the RNG states' scalars and the loss history. Resuming restores all of it, so a run
stopped after any epoch continues as if it never stopped, whatever its method draws from torch, numpy or
Python's ``random``. Checkpoints of the shared loop before this format resume too; those of MAML and of the
GAN training before it do not (the error says to start afresh).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from metaad.io import load_checkpoint_file, save_checkpoint_file, write_json

FORMAT = "metaad-training-checkpoint-1"
RNG = "rng"
Schedulers = Mapping[str, torch.optim.lr_scheduler.LRScheduler]
_SCHEDULE_SETTINGS = ("milestones",)  # set from the run's settings again: a resumed run may get more epochs


def save_training_checkpoint(
    path: str | Path,
    *,
    epoch: int,
    identity: dict[str, Any],
    modules: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    schedulers: Schedulers | None = None,
    history: Sequence[dict] = (),
    readable_copy: str | Path | None = None,
) -> Path:
    """Write the training's state after ``epoch`` epochs to ``path`` atomically (``readable_copy``: the progress
    record again as JSON, for people; resuming never needs it)."""
    schedulers = schedulers or {}
    _check_names(modules, optimizers, schedulers)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        tensors.update({f"{name}.{key}": value for key, value in module.state_dict().items()})
    groups = {}
    for name, optimizer in optimizers.items():
        state = optimizer.state_dict()
        for index, values in state["state"].items():
            tensors.update({f"{name}.{index}.{key}": torch.as_tensor(value) for key, value in values.items()})
        groups[name] = state["param_groups"]
    rng_tensors, rng_scalars = _rng_state()
    tensors.update(rng_tensors)
    progress = {
        "format": FORMAT,
        "epoch": epoch,
        "identity": _as_json(identity),
        "optimizers": groups,
        "schedulers": {
            name: {k: v for k, v in scheduler.state_dict().items() if k not in _SCHEDULE_SETTINGS}
            for name, scheduler in schedulers.items()
        },
        RNG: rng_scalars,
        "history": list(history),
    }
    save_checkpoint_file(path, tensors, progress)
    if readable_copy is not None:
        write_json(readable_copy, progress)
    return Path(path)


def load_training_checkpoint(
    path: str | Path,
    *,
    identity: dict[str, Any],
    modules: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    schedulers: Schedulers | None = None,
    readable_copy: str | Path | None = None,
) -> tuple[int, list[dict]]:
    """Restore what ``save_training_checkpoint`` wrote into the given parts; returns (epochs done, history).

    Refuses a checkpoint of another run (its ``identity`` differs: the error names what) or of an older format.
    """
    schedulers = schedulers or {}
    _check_names(modules, optimizers, schedulers)
    path = Path(path)
    tensors, progress = load_checkpoint_file(path, readable_copy)
    if progress.get("format") != FORMAT and "fingerprint" in progress and "param_groups" in progress:
        progress = _older_loop_record(progress)  # the shared loop's own checkpoints before this format
    if progress.get("format") != FORMAT:
        written = f"format {progress['format']!r}" if "format" in progress else "no format recorded"
        raise ValueError(
            f"{path}: a checkpoint of an older metaad ({written}, this one reads {FORMAT!r}); start afresh "
            "without --resume"
        )
    differences = _differences(progress["identity"], _as_json(identity))
    if differences:
        raise ValueError(
            f"{path}: cannot resume, the checkpoint is of another training ({'; '.join(differences)}). Resume with "
            "the same settings and data, or start afresh without --resume"
        )
    for name, module in modules.items():
        prefix = name + "."
        module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    for name, optimizer in optimizers.items():
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            part, _, rest = key.partition(".")
            if part == name:
                index, field = rest.split(".", 1)
                state.setdefault(int(index), {})[field] = value
        optimizer.load_state_dict({"state": state, "param_groups": _groups(progress["optimizers"][name], optimizer)})
    for name, scheduler in schedulers.items():
        schedule_state = scheduler.state_dict()
        schedule_state.update(progress["schedulers"][name])
        scheduler.load_state_dict(schedule_state)
    if RNG in progress:
        _set_rng_state(tensors, progress[RNG])
    return int(progress["epoch"]), list(progress["history"])


def _check_names(modules: Mapping, optimizers: Mapping, schedulers: Mapping) -> None:
    names = [*modules, *optimizers, *schedulers]
    if len(set(names)) != len(names) or RNG in names or any("." in name or not name for name in names):
        raise ValueError(f"checkpoint parts need distinct names without dots, other than {RNG!r}; got {names}")


def _groups(saved: list[dict[str, Any]], optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Saved param groups with the tuples that JSON made lists (betas) tuples again, as the optimiser has them."""
    current = optimizer.param_groups
    return [
        {k: tuple(v) if i < len(current) and isinstance(current[i].get(k), tuple) else v for k, v in group.items()}
        for i, group in enumerate(saved)
    ]


def _as_json(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` as it reads back from JSON (tuples as lists, paths as strings), to compare with a saved one."""
    return json.loads(json.dumps(record, default=str))


def _differences(saved: Any, current: Any, where: str = "") -> list[str]:
    """Where two identity records differ, as ``key.key: saved X, now Y``."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [
            line
            for key in sorted(set(saved) | set(current), key=str)
            for line in _differences(saved.get(key), current.get(key), f"{where}.{key}" if where else str(key))
        ]
    return [] if saved == current else [f"{where or 'identity'}: saved {saved!r}, now {current!r}"]


def _older_loop_record(progress: dict[str, Any]) -> dict[str, Any]:
    """The shared loop's record before this format (its parts were already named model, optimizer, schedule)."""
    return {
        "format": FORMAT,
        "epoch": progress["epoch"],
        "identity": progress["fingerprint"],
        "optimizers": {"optimizer": progress["param_groups"]},
        "schedulers": {"schedule": progress["schedule"]},
        "history": progress["history"],
    }


# ------------------------------------------------------------------------------------------------ RNG states
def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The global RNG states of torch (CPU, and CUDA once initialised), numpy and Python's ``random``."""
    tensors = {f"{RNG}.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"{RNG}.cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    tensors[f"{RNG}.numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    tensors[f"{RNG}.python"] = torch.tensor(internal, dtype=torch.int64)
    scalars = {"numpy": [kind, int(position), int(has_gauss), float(cached_gaussian)],
               "python": [version, gauss_next]}
    return tensors, scalars


def _set_rng_state(tensors: Mapping[str, torch.Tensor], scalars: dict[str, Any]) -> None:
    torch.set_rng_state(tensors[f"{RNG}.torch"])
    if torch.cuda.is_available():  # a device that the saving machine lacked keeps its own state
        for index in range(torch.cuda.device_count()):
            if f"{RNG}.cuda.{index}" in tensors:
                torch.cuda.set_rng_state(tensors[f"{RNG}.cuda.{index}"], index)
    kind, position, has_gauss, cached_gaussian = scalars["numpy"]
    np.random.set_state((kind, tensors[f"{RNG}.numpy"].numpy().astype(np.uint32), position, has_gauss,
                         cached_gaussian))
    version, gauss_next = scalars["python"]
    random.setstate((version, tuple(tensors[f"{RNG}.python"].tolist()), gauss_next))
