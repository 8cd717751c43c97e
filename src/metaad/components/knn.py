"""Nearest-neighbour search over a memory bank with faiss: exact (flat L2) or inverted-file (IVF).

The IVF coarse centroids are learned at fit time (:func:`train_ivf_centroids`) and stored with the model, so a
loaded model searches exactly as the fitted one did. This module owns faiss's threads: faiss and torch each
run an OpenMP pool, and when torch was imported before metaad the pools spin against each other, so faiss
then searches single-threaded (see ``metaad/__init__.py``).
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import torch

import metaad


def train_ivf_centroids(bank: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """k-means coarse centroids for an IVF index over ``bank`` (N, D): 4·√N lists, as faiss recommends."""
    n_lists = int(4 * math.sqrt(bank.shape[0]))
    kmeans = faiss.Kmeans(bank.shape[1], n_lists, niter=20, seed=seed, max_points_per_centroid=64)
    kmeans.train(np.ascontiguousarray(bank.numpy(), dtype=np.float32))
    return torch.from_numpy(kmeans.centroids.copy())


class NearestNeighbours:
    """k-nearest-neighbour search over a (N, D) bank; ``centroids`` (L, D) makes it an IVF search
    visiting ``nprobe`` lists per query, an empty tensor an exact one."""

    def __init__(self, bank: torch.Tensor, centroids: torch.Tensor | None = None, nprobe: int = 16) -> None:
        vectors = np.ascontiguousarray(bank.detach().cpu().numpy(), dtype=np.float32)
        dim = vectors.shape[1]
        if centroids is None or centroids.shape[0] == 0:
            self.index: faiss.Index = faiss.IndexFlatL2(dim)
        else:
            quantizer = faiss.IndexFlatL2(dim)
            quantizer.add(np.ascontiguousarray(centroids.detach().cpu().numpy(), dtype=np.float32))
            self.index = faiss.IndexIVFFlat(quantizer, dim, centroids.shape[0], faiss.METRIC_L2)
            self.index.is_trained = True
            self.index.nprobe = nprobe
            self._quantizer = quantizer  # the IVF index does not own it
        self.index.add(vectors)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Euclidean distances (Q, k) and bank indices (Q, k) of the k nearest entries."""
        threads = faiss.omp_get_max_threads()
        if not metaad.OPENMP_PASSIVE:
            faiss.omp_set_num_threads(1)
        try:
            distances, indices = self.index.search(
                np.ascontiguousarray(queries.detach().cpu().numpy(), dtype=np.float32), k
            )
        finally:
            faiss.omp_set_num_threads(threads)
        return torch.from_numpy(distances).clamp_(min=0).sqrt_(), torch.from_numpy(indices).long()
