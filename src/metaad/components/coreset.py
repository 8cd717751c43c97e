"""Greedy k-center coreset selection (PatchCore §3.2, Alg. 1), vectorised for CPUs.

Exact greedy k-center over N points costs N·k·d and streams all N points once per selected centre: for
PatchCore's ~780k patches and a 10% coreset that is ~10^5 passes over 400 MB. metaad therefore runs the
greedy selection independently on ``shards`` random, equal parts of the points, each small enough to stay in
cache, all shards advanced together by one batched matrix-vector product per step. The union of per-part
greedy coresets is a composable coreset for k-center (its covering radius is at most the largest per-part
radius), and the total work drops by the number of shards.
"""

from __future__ import annotations

import math

import torch


def random_projection(features: torch.Tensor, dim: int, seed: int = 0) -> torch.Tensor:
    """Johnson-Lindenstrauss projection to ``dim`` dimensions (PatchCore §3.2; identity if already smaller)."""
    if features.shape[1] <= dim:
        return features
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(features.shape[1], dim, generator=generator) / math.sqrt(dim)
    return features @ matrix.to(features.dtype)


def greedy_coreset(
    features: torch.Tensor,
    n_select: int,
    shards: int = 1,
    seed: int = 0,
    chunk_rows: int = 65536,
) -> torch.Tensor:
    """Indices of ``n_select`` rows chosen by greedy k-center (farthest-point) selection.

    ``shards > 1`` selects ``n_select / shards`` points in each of ``shards`` random parts (see module
    docstring). Each part starts from one seeded random point; the fewer than ``shards`` points left over by the
    equal split are never selected. Returns a sorted int64 index tensor.
    """
    n_points = features.shape[0]
    if not 0 < n_select <= n_points:
        raise ValueError(f"n_select must be in [1, {n_points}], got {n_select}")
    shards = max(1, min(shards, n_select))
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same selection on every device
    device = features.device
    order = torch.randperm(n_points, generator=generator).to(device)
    per_shard = n_points // shards
    parts = order[: per_shard * shards].view(shards, per_shard)
    quota = torch.full((shards,), n_select // shards, dtype=torch.long)
    quota[: n_select % shards] += 1
    if int(quota.max()) > per_shard:
        shards, parts, quota = 1, order.view(1, -1), torch.tensor([n_select])
    points = features[parts].float()  # (S, n, d)
    norms = points.square().sum(-1)  # (S, n)
    start = torch.randint(points.shape[1], (shards,), generator=generator).to(device)
    steps = int(quota.max())
    chosen = torch.empty(shards, steps, dtype=torch.long, device=device)
    chosen[:, 0] = start
    min_dist = _squared_distances(points, norms, start)
    rows = torch.arange(shards, device=device)
    for step in range(1, steps):
        farthest = min_dist.argmax(dim=1)
        chosen[:, step] = farthest
        torch.minimum(min_dist, _squared_distances(points, norms, farthest), out=min_dist)
        min_dist[rows, farthest] = -1.0  # never pick a point twice, even among exact duplicates
    selected = [parts[s, chosen[s, : int(quota[s])]] for s in range(shards)]
    return torch.cat(selected).sort().values


def _squared_distances(points: torch.Tensor, norms: torch.Tensor, centre_ids: torch.Tensor) -> torch.Tensor:
    """Squared distances (S, n) from every point of each shard to that shard's centre."""
    centres = points[torch.arange(points.shape[0], device=points.device), centre_ids]  # (S, d)
    cross = torch.bmm(points, centres.unsqueeze(-1)).squeeze(-1)  # (S, n)
    return (norms + norms.gather(1, centre_ids[:, None]) - 2.0 * cross).clamp_(min=0.0)
