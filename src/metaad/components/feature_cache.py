"""The frozen-feature cache: a frozen network's maps of every training image, computed once per fit.

A method that trains a head on a frozen backbone (Reverse Distillation's student, FastFlow's flows, UniAD's
transformer) sees the same un-augmented images every epoch, so the backbone's output is the same every epoch:
:class:`FrozenFeatures` computes it once and the shared loop trains on it. On 2 cores the backbone is most of an
epoch's time at 256 px.

Where the maps live:
- in memory while they take at most ``memory_limit`` bytes (default 2 GiB, ``METAAD_FEATURE_CACHE_MEMORY_GB``);
- above it, in memory-mapped ``.npy`` files (so that ten thousand images train on a machine with little memory):
  in ``directory`` (default: ``METAAD_FEATURE_CACHE``, else a temporary folder, removed when the fit ends).

A ``directory`` is also reused: the maps are stored under a key (the backbone, its weights' digest, the taps, the
input size, the preprocessing, the storage type and the digest of every image), so a second fit on the same
images with the same frozen part reads them instead of computing them (a sweep over a head's settings; a resumed
fit). ``METAAD_FEATURE_CACHE=off`` computes the maps batch by batch instead, as if there were no cache;
``METAAD_FEATURE_CACHE_FLOAT16=1`` stores them as float16 (half the memory; the head then trains on rounded maps).

Never for a method that augments its inputs (DRAEM's synthetic anomalies): its frozen maps change every epoch.
Such a method says so with ``augments_inputs = True``, and :class:`FrozenFeatures` refuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from metaad.io import atomic_write

Extract = Callable[[torch.Tensor], Sequence[torch.Tensor]]

ENV_DIRECTORY = "METAAD_FEATURE_CACHE"
ENV_MEMORY = "METAAD_FEATURE_CACHE_MEMORY_GB"
ENV_FLOAT16 = "METAAD_FEATURE_CACHE_FLOAT16"
DEFAULT_MEMORY_LIMIT = 2 * 2**30
KEY_FILE = "key.json"


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, shapes, types and values): which weights a frozen part has."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(_bytes(tensor))
    return digest.hexdigest()


def images_digest(images: torch.Tensor) -> str:
    """SHA-256 of a stack of images (their type, shape and every value)."""
    digest = hashlib.sha256(f"{tuple(images.shape)}:{images.dtype}".encode())
    digest.update(_bytes(images))
    return digest.hexdigest()


def _bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's values in row-major order, whatever its memory layout (channels-last weights included)."""
    return tensor.detach().cpu().reshape(-1).clone().view(torch.uint8).numpy().tobytes()


def frozen_part_key(backbone: nn.Module, preprocess: nn.Module) -> dict[str, Any]:
    """What identifies a frozen backbone's maps besides the images: its architecture, taps and weights
    (``metaad.backbones.Backbone``), and the input size and preprocessing before it
    (``metaad.components.preprocess.Preprocess``, after its ``measure``)."""
    return {
        "backbone": backbone.name, "layers": list(backbone.layers), "weights": weights_digest(backbone),
        "image_size": preprocess.image_size, "standardizing": preprocess.standardizing,
        "normalization": preprocess.normalization,
    }


class FrozenFeatures:
    """The frozen maps of a set of training images, indexed like them: ``features[index]`` is the list of
    (B, C_i, H_i, W_i) float32 maps of ``images[index]`` (on the CPU), what ``extract`` gives for those images.

    Args:
        model: the method that trains on the maps (refused when its ``augments_inputs`` is true).
        extract: (B, 3, H, W) images in [0, 1] -> the frozen part's maps (no gradient is taken).
        images: the training images: ``len(images)``, ``images[index]`` -> float (B, 3, H, W) in [0, 1], and
            their stored tensor as ``images.images`` (``metaad.training.data.TrainImages``).
        key: what identifies ``extract`` besides the images (backbone name, weights digest, taps, size,
            preprocessing), JSON-serialisable.
        batch_size: images per extraction pass.
        device: where ``extract`` runs (the model's device).
        directory, memory_limit, enabled, float16: see the module docstring; None reads the environment.
        progress: a progress bar while the maps are computed.
    """

    def __init__(
        self,
        model: nn.Module,
        extract: Extract,
        images: Any,
        key: dict[str, Any],
        *,
        batch_size: int = 32,
        device: torch.device | str = "cpu",
        directory: str | Path | None = None,
        memory_limit: int | None = None,
        enabled: bool | None = None,
        float16: bool | None = None,
        progress: bool = False,
    ) -> None:
        if getattr(model, "augments_inputs", False):
            raise ValueError(
                f"{type(model).__name__} augments its training images: their frozen features change every epoch "
                "and cannot be cached"
            )
        environment = os.environ.get(ENV_DIRECTORY, "")
        self.enabled = environment.lower() != "off" if enabled is None else enabled
        self.float16 = os.environ.get(ENV_FLOAT16, "") not in ("", "0") if float16 is None else float16
        if memory_limit is None:
            memory_limit = int(float(os.environ.get(ENV_MEMORY, DEFAULT_MEMORY_LIMIT / 2**30)) * 2**30)
        if directory is None and environment and environment.lower() != "off":
            directory = environment
        self.extract, self.images, self.batch_size, self.device = extract, images, batch_size, torch.device(device)
        self.progress = progress
        self.maps: list[torch.Tensor] | list[np.ndarray] = []
        self.location: Path | None = None
        self.computed = False  # whether this object ran the extraction (False: read from a directory)
        if not self.enabled:
            return
        dtype = torch.float16 if self.float16 else torch.float32
        full_key = {**key, "dtype": str(dtype), "images": images_digest(images.images)}
        shapes = self._shapes()
        size = sum(len(images) * int(np.prod(s)) for s in shapes) * dtype.itemsize
        if directory is None and size <= memory_limit:
            self.maps = [torch.empty(len(images), *s, dtype=dtype) for s in shapes]
            self._fill(self.maps)
            return
        if directory is None:
            directory = tempfile.mkdtemp(prefix="metaad_features_")
            weakref.finalize(self, shutil.rmtree, directory, ignore_errors=True)
        name = hashlib.sha256(json.dumps(full_key, sort_keys=True, default=str).encode()).hexdigest()[:24]
        self.location = Path(directory) / name
        if not self._reuse(full_key, shapes):
            self._write(full_key, shapes)
        self.maps = [np.load(self.location / f"map{i}.npy", mmap_mode="r") for i in range(len(shapes))]
        if size <= memory_limit:  # a reused directory small enough: read into memory once
            self.maps = [torch.from_numpy(np.array(m)) for m in self.maps]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: torch.Tensor) -> list[torch.Tensor]:
        if not self.enabled:
            return self._run(self.images[index])
        rows = index.numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
        batch = []
        for stored in self.maps:
            if isinstance(stored, torch.Tensor):
                batch.append(stored[torch.as_tensor(rows)].float())
            else:  # memory-mapped: sorted reads are sequential on disk, then back to the asked order
                order = np.argsort(rows, kind="stable")
                picked = np.empty((len(rows), *stored.shape[1:]), stored.dtype)
                picked[order] = stored[rows[order]]
                batch.append(torch.from_numpy(picked).float())
        return batch

    # ------------------------------------------------------------------------------------------ internals
    @torch.no_grad()
    def _run(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [m.float().cpu().contiguous() for m in self.extract(images.to(self.device))]

    def _shapes(self) -> list[tuple[int, ...]]:
        return [tuple(m.shape[1:]) for m in self._run(self.images[torch.arange(min(2, len(self.images)))])]

    def _fill(self, targets: Sequence[torch.Tensor] | Sequence[np.ndarray]) -> None:
        self.computed = True
        batches = torch.arange(len(self.images)).split(self.batch_size)
        for index in tqdm(batches, desc="frozen features", unit="batch", disable=not self.progress, leave=False):
            for target, m in zip(targets, self._run(self.images[index]), strict=True):
                if isinstance(target, torch.Tensor):
                    target[index] = m.to(target.dtype)
                else:
                    target[index.numpy()] = m.to(torch.float16 if self.float16 else torch.float32).numpy()

    def _reuse(self, key: dict[str, Any], shapes: list[tuple[int, ...]]) -> bool:
        assert self.location is not None
        try:
            stored_key = json.loads((self.location / KEY_FILE).read_text(encoding="utf-8"))
            headers = [np.load(self.location / f"map{i}.npy", mmap_mode="r") for i in range(len(shapes))]
        except (OSError, ValueError):
            return False
        expected = [(len(self.images), *s) for s in shapes]
        return stored_key == json.loads(json.dumps(key, default=str)) and [h.shape for h in headers] == expected

    def _write(self, key: dict[str, Any], shapes: list[tuple[int, ...]]) -> None:
        """The maps into ``location`` (key file last, so a half-written folder is never reused)."""
        assert self.location is not None
        (self.location / KEY_FILE).unlink(missing_ok=True)
        self.location.mkdir(parents=True, exist_ok=True)
        dtype = np.float16 if self.float16 else np.float32
        files = [np.lib.format.open_memmap(self.location / f"map{i}.npy", "w+", dtype, (len(self.images), *s))
                 for i, s in enumerate(shapes)]
        self._fill(files)
        for f in files:
            f.flush()
        del files
        text = json.dumps(key, sort_keys=True, default=str)
        atomic_write(self.location / KEY_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
