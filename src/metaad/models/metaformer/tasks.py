"""Meta-tasks without labels (§3.1.1): embed wild images, k-means into coarse groups, trim each by eq. (1).

1. Embed every wild image with a frozen pretrained backbone (global average of its last stage; ResNet-18 in
   the paper when a weights file is given, EfficientNet-Lite0 offline by default), L2-normalised.
2. k-means (scikit-learn, seeded) into N coarse groups; N defaults to (number of images) / ``group_size``.
3. The centre of a group is its member nearest the k-means centroid ("center features"); every member is
   scored by the structural similarity of eq. (1) between its grayscale thumbnail and the centre's, and the
   ``group_size`` most similar are kept: the fine groups Gᵢ. Groups under ``min_group_size`` are dropped.

The result is cached as JSON keyed by a hash of the inputs (files with size and mtime, backbone, settings).
Only ``images/`` of a wild folder is read: its ``masks/`` are never used.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.cluster import KMeans
from tqdm.auto import tqdm

from metaad.components.ssim import global_ssim
from metaad.data.transforms import IMAGE_EXTENSIONS, pil_to_tensor
from metaad.io import read_json, write_json

CACHE_VERSION = 1
Embedder = Callable[[torch.Tensor], torch.Tensor]


def list_wild_images(folders: Sequence[str | Path]) -> list[str]:
    """Image files of each folder's ``images/`` (or of the folder itself when it has none), sorted.

    Extensions are matched case-insensitively; a folder without images is an error that names it.
    """
    paths: list[str] = []
    for folder in folders:
        folder = Path(folder)
        source = folder / "images" if (folder / "images").is_dir() else folder
        if not source.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder of wild images")
        found = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not found:
            raise ValueError(f"{source}: no images found (expected files ending in {', '.join(IMAGE_EXTENSIONS)})")
        paths.extend(str(p) for p in found)
    return paths


def backbone_embedder(name: str = "tf_efficientnet_lite0", weights: str | None = None) -> Embedder:
    """Global-average-pooled last-stage features of a frozen metaad backbone."""
    from metaad.backbones import create_backbone
    from metaad.data.transforms import normalize

    backbone = create_backbone(name, layers=(4,), weights=weights)

    @torch.no_grad()
    def embed(images: torch.Tensor) -> torch.Tensor:
        return backbone(normalize(images, *backbone.normalization))[-1].mean(dim=(2, 3))

    return embed


def build_meta_tasks(
    paths: Sequence[str],
    group_size: int = 200,
    n_groups: int | None = None,
    min_group_size: int = 20,
    seed: int = 0,
    backbone: str = "tf_efficientnet_lite0",
    weights: str | None = None,
    embed_size: int = 224,
    thumbnail_size: int = 64,
    cache_dir: str | Path | None = None,
    embedder: Embedder | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> list[list[str]]:
    """Fine groups of image paths, most similar to their centre first; read from the cache when present.

    ``embedder`` (ImageNet-normalised (B, 3, s, s) → (B, D)) replaces the backbone, e.g. in tests; it is not
    part of the cache key, so pass no ``cache_dir`` with it.
    """
    paths = list(paths)
    if not paths:
        raise ValueError("build_meta_tasks needs at least one wild image")
    settings = {
        "group_size": group_size,
        "n_groups": n_groups,
        "min_group_size": min_group_size,
        "seed": seed,
        "backbone": backbone,
        "weights": file_identity(weights),
        "embed_size": embed_size,
        "thumbnail_size": thumbnail_size,
        "version": CACHE_VERSION,
    }
    key = cache_key(paths, settings)
    cache = Path(cache_dir) / f"meta_tasks_{key[:16]}.json" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        cached = read_json(cache)
        if cached.get("key") == key:
            return cached["groups"]
    features, thumbnails = _embed_all(
        paths, embedder or backbone_embedder(backbone, weights), embed_size, thumbnail_size, batch_size, progress
    )
    clusters = n_groups or max(1, round(len(paths) / group_size))
    if clusters > len(paths):
        raise ValueError(f"cannot form {clusters} groups from {len(paths)} wild images")
    kmeans = KMeans(n_clusters=clusters, random_state=seed, n_init=10).fit(features.numpy())
    groups, similarities = [], []
    for label in range(clusters):
        members = np.flatnonzero(kmeans.labels_ == label)
        centre = members[np.argmin(((features[members].numpy() - kmeans.cluster_centers_[label]) ** 2).sum(1))]
        score = global_ssim(thumbnails[members], thumbnails[centre][None]).numpy()
        keep = members[np.argsort(-score, kind="stable")][:group_size]
        if len(keep) >= min_group_size:
            groups.append([paths[i] for i in keep])
            similarities.append(np.sort(score)[::-1][: len(keep)].round(5).tolist())
    if not groups:
        raise ValueError(
            f"no group of at least {min_group_size} images among {len(paths)} wild images; "
            "pass more wild images (a meta-task's support and query come from one group)"
        )
    if cache is not None:
        write_json(
            cache,
            {
                "key": key,
                "settings": settings,
                "n_images": len(paths),
                "groups": groups,
                "ssim_to_centre": similarities,
            },
        )
    return groups


def _embed_all(
    paths: Sequence[str], embedder: Embedder, embed_size: int, thumbnail_size: int, batch_size: int, progress: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised embeddings (N, D) and grayscale thumbnails (N, t, t) in [0, 1]."""
    features, thumbnails = [], []
    for start in tqdm(range(0, len(paths), batch_size), desc="embedding wild images", disable=not progress):
        batch = []
        for path in paths[start : start + batch_size]:
            try:
                with Image.open(path) as image:
                    batch.append(pil_to_tensor(image, embed_size))
            except OSError as error:
                raise ValueError(f"{path}: cannot read image ({error})") from error
        images = torch.stack(batch)
        features.append(F.normalize(embedder(images).float(), dim=1))
        gray = images.mean(1, keepdim=True)
        thumbnails.append(F.interpolate(gray, size=(thumbnail_size,) * 2, mode="area")[:, 0])
    return torch.cat(features), torch.cat(thumbnails)


def file_identity(path: str | None) -> str | None:
    """``path`` resolved, with its size and modification time (``path`` itself when it is no file)."""
    if path is None or not Path(path).is_file():
        return path
    stat = Path(path).stat()
    return f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def cache_key(paths: Sequence[str], settings: dict) -> str:
    """SHA-256 of ``settings`` and of every file's identity: a cache of results computed from them."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in paths:
        stat = Path(path).stat()
        digest.update(f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
