"""Atomic file writing and safe tensor files: a crash never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json(path: str | Path) -> Any:
    """Read a JSON file with an error that names it when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected a JSON file)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Save tensors as safetensors, atomically (contiguous CPU copies; shared storage is duplicated)."""
    flat = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata=metadata))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file (never unpickles anything), with an error that names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected a .safetensors weights file)")
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from error


PROGRESS_KEY = "progress"


def save_checkpoint_file(path: str | Path, tensors: Mapping[str, torch.Tensor], progress: dict[str, Any]) -> Path:
    """Tensors and the progress record in one safetensors file, written atomically.

    One file, not weights then JSON: a kill between two writes would pair one epoch's weights with another
    epoch's progress, and a resume would silently train an epoch twice.
    """
    text = json.dumps(progress, default=_json_default)
    return save_tensors(path, tensors, metadata={PROGRESS_KEY: text})


def load_checkpoint_file(
    path: str | Path, progress_copy: str | Path | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the progress record that ``save_checkpoint_file`` wrote.

    A checkpoint of an older metaad kept its progress in ``progress_copy`` (JSON) only; it is read from there
    when its epoch matches the one the tensors were saved at.
    """
    tensors = load_tensors(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if PROGRESS_KEY in metadata:
        return tensors, json.loads(metadata[PROGRESS_KEY])
    if progress_copy is not None and Path(progress_copy).is_file() and "epoch" in metadata:
        progress = read_json(progress_copy)
        if str(progress.get("epoch")) == metadata["epoch"]:
            return tensors, progress
        raise ValueError(
            f"{path} is at epoch {metadata['epoch']} but {progress_copy} says {progress.get('epoch')} (interrupted "
            "between the two writes of an older metaad); start afresh without --resume"
        )
    raise ValueError(
        f"{path}: no progress record (not a metaad checkpoint, or one of an older metaad); start afresh without "
        "--resume"
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | set):
        return list(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
