"""Nearest-neighbour search over a memory bank with faiss: exact (flat L2) or inverted-file (IVF); and the same
exact search in plain tensor operations (:func:`exact_search`) for ONNX export, which scores as faiss's exact
search does up to float rounding (faiss's kernel is about 1.5 times as fast on 2 cores, so metaad uses it).

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

from metaad import runtime

IVF_MIN_BANK = 20000  # banks smaller than this are searched exactly: IVF gains little there and loses recall


def exact_search(
    queries: torch.Tensor, bank: torch.Tensor, k: int = 1, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances (Q, k) and indices (Q, k) of the ``k`` nearest ``bank`` rows of each query, in plain
    tensor operations (what a model's ``export_forward`` runs in its ONNX graph).

    ‖b‖² − 2 q·b in one fused matrix product over ``chunk`` bank rows at a time (bounded memory; 4096 rows
    ran fastest on 2 cores), minima or top-k per chunk, merged, and ‖q‖² added last (it does not change the
    order).
    """
    k = min(k, bank.shape[0])
    distances, indices = [], []
    for start in range(0, bank.shape[0], chunk):
        part = bank[start : start + chunk]
        partial = torch.addmm((part**2).sum(1), queries, part.T, beta=1, alpha=-2)
        if k == 1:
            value, index = partial.min(dim=1, keepdim=True)
        else:
            value, index = partial.topk(min(k, part.shape[0]), dim=1, largest=False)
        distances.append(value)
        indices.append(index + start)
    value, index = torch.cat(distances, 1), torch.cat(indices, 1)
    if value.shape[1] > k:  # several chunks: keep the best k of their candidates
        if k == 1:
            value, which = value.min(dim=1, keepdim=True)
        else:
            value, which = value.topk(k, dim=1, largest=False)
        index = index.gather(1, which)
    return (value + (queries**2).sum(1, keepdim=True)).clamp_min(0).sqrt(), index


def search_centroids(
    bank: torch.Tensor, *, exact: bool = False, min_bank: int = IVF_MIN_BANK, seed: int = 0
) -> torch.Tensor:
    """IVF centroids for ``bank``, or an empty (0, D) tensor, which means exact search: when ``exact`` is
    asked for or the bank has fewer than ``min_bank`` rows."""
    if exact or bank.shape[0] < min_bank:
        return bank.new_empty(0, bank.shape[1])
    return train_ivf_centroids(bank, seed)


def train_ivf_centroids(bank: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """k-means coarse centroids for an IVF index over ``bank`` (N, D): 4·√N lists, as faiss recommends."""
    n_lists = int(4 * math.sqrt(bank.shape[0]))
    kmeans = faiss.Kmeans(bank.shape[1], n_lists, niter=20, seed=seed, max_points_per_centroid=64)
    kmeans.train(np.ascontiguousarray(bank.detach().cpu().numpy(), dtype=np.float32))
    return torch.from_numpy(kmeans.centroids.copy()).to(bank.device)


class NearestNeighbours:
    """k-nearest-neighbour search over a (N, D) bank with faiss; ``centroids`` (L, D) makes it an IVF search
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

    def search(
        self, queries: torch.Tensor, k: int, exclude: np.ndarray | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Euclidean distances (Q, k) and bank indices (Q, k) of the k nearest entries (on the queries' device);
        ``exclude``: bank indices never returned (e.g. an image's own patches, for out-of-fold scores)."""
        threads = faiss.omp_get_max_threads()
        if not runtime.OPENMP_PASSIVE:
            faiss.omp_set_num_threads(1)
        extra = {}
        if exclude is not None and len(exclude):
            excluded = faiss.IDSelectorBatch(np.ascontiguousarray(exclude, dtype=np.int64))
            selector = faiss.IDSelectorNot(excluded)
            ivf = isinstance(self.index, faiss.IndexIVF)
            extra["params"] = (faiss.SearchParametersIVF(sel=selector, nprobe=self.index.nprobe) if ivf
                               else faiss.SearchParameters(sel=selector))
        try:
            distances, indices = self.index.search(
                np.ascontiguousarray(queries.detach().cpu().numpy(), dtype=np.float32), k, **extra
            )
        finally:
            faiss.omp_set_num_threads(threads)
        distances = torch.from_numpy(distances).clamp_(min=0).sqrt_()
        return distances.to(queries.device), torch.from_numpy(indices).long().to(queries.device)


class SearchCache:
    """One :class:`NearestNeighbours` per named bank of a model, built on first use and rebuilt whenever the
    bank or its centroids were replaced (a fit or a load)."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple, NearestNeighbours]] = {}

    def search(
        self, name: str, bank: torch.Tensor, centroids: torch.Tensor, queries: torch.Tensor, k: int, nprobe: int = 16,
        exclude: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances (Q, k) and indices (Q, k) of ``queries`` in ``bank``, searched as :class:`NearestNeighbours`
        (``exclude``: bank indices left out of the search)."""
        key = (bank.data_ptr(), tuple(bank.shape), centroids.data_ptr(), tuple(centroids.shape), nprobe)
        entry = self._entries.get(name)
        if entry is None or entry[0] != key:
            entry = self._entries[name] = (key, NearestNeighbours(bank, centroids, nprobe))
        return entry[1].search(queries, k, exclude)
