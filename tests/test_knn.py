"""The nearest-neighbour search: exact search against brute force, IVF recall, the index cache."""

import pytest
import torch

from metaad.components.knn import SearchCache, exact_search, search_centroids


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("chunk", [7, 1000])  # several chunks (merged) and one
def test_exact_search_matches_brute_force(k, chunk):
    generator = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(50, 8, generator=generator), torch.randn(20, 8, generator=generator)
    distances, indices = exact_search(queries, bank, k, chunk)
    expected_distances, expected_indices = torch.cdist(queries, bank).topk(k, dim=1, largest=False)
    assert distances.shape == indices.shape == (20, k)
    torch.testing.assert_close(distances, expected_distances, rtol=1e-4, atol=1e-5)
    assert torch.equal(indices, expected_indices)


def test_exact_search_finds_a_bank_row_at_distance_zero_and_caps_k():
    bank = torch.randn(5, 4)
    distances, indices = exact_search(bank[[3, 1]], bank, k=10)
    assert indices.shape == (2, 5)  # k capped at the bank's size
    assert indices[:, 0].tolist() == [3, 1]
    assert distances[:, 0].abs().max() < 1e-3


def test_search_centroids_exact_below_the_minimum_bank():
    bank = torch.randn(300, 4)
    assert search_centroids(bank, min_bank=1000).shape == (0, 4)
    assert search_centroids(bank, exact=True, min_bank=10).shape == (0, 4)
    assert search_centroids(bank, min_bank=100).shape[0] > 0


def test_ivf_search_finds_most_exact_neighbours_and_the_cache_follows_a_new_bank():
    generator = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(2000, 16, generator=generator), torch.randn(100, 16, generator=generator)
    centroids = search_centroids(bank, min_bank=100)
    cache = SearchCache()
    _, ivf = cache.search("bank", bank, centroids, queries, 1, nprobe=64)
    _, exact = exact_search(queries, bank)
    assert (ivf == exact).float().mean() > 0.9
    replaced = bank + 100.0  # a refit or a load: same shape, new tensor, so the cache must rebuild
    empty = replaced.new_empty(0, 16)
    distances, _ = cache.search("bank", replaced, empty, queries, 1)
    torch.testing.assert_close(distances, exact_search(queries, replaced)[0])
