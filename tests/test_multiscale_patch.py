"""Multi-scale patch representation learning: dense shapes, the k-means term, bank sizes, bit-identical resume."""

import torch

from metaad.models import create_model
from metaad.models.multiscale_patch import kmeans_labels


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_dense_embeddings_one_per_patch_position():
    model = create_model("multiscale_patch", "tiny")
    maps = model(_images(2))
    assert [tuple(z.shape) for z in maps] == [(2, 64, 8, 8), (2, 64, 16, 16)]  # strides 8 and 4 at 64 px
    three = create_model("multiscale_patch", image_size=128)
    assert [tuple(z.shape[-2:]) for z in three(_images(1))] == [(8, 8), (16, 16), (32, 32)]


def test_kmeans_finds_separated_clusters():
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(50, 2) for c in centres])
    found = kmeans_labels(points, 3, iterations=20)
    assert torch.cdist(centres, found).amin(1).max() < 0.5


def test_kmeans_term_carries_a_gradient():
    model = create_model("multiscale_patch", "tiny", lambda_svdd=0.0)
    model.train()
    torch.manual_seed(0)
    with_kmeans = model.training_loss(_images(2))
    with_kmeans.backward()
    assert all(p.grad is not None for p in model.encoders.parameters())
    model.lambda_kmeans = 0.0
    torch.manual_seed(0)
    assert model.training_loss(_images(2)) < with_kmeans


def test_fit_banks_and_maps(tmp_path):
    model = create_model("multiscale_patch", "tiny", coreset_ratio=0.5).fit(_images(4), workdir=tmp_path)
    assert model.bank_0.shape == (4 * 64 // 2, 64) and model.bank_1.shape == (4 * 256 // 2, 64)
    prediction = model.predict(_images(3, 1)[..., :48, :])
    assert prediction.maps.shape == (3, 48, 64) and (prediction.maps >= 0).all()


def test_resume_is_bit_identical(tmp_path):
    train = _images(6)
    straight = create_model("multiscale_patch", "tiny", epochs=3).fit(train, workdir=tmp_path / "a")
    create_model("multiscale_patch", "tiny", epochs=1).fit(train, workdir=tmp_path / "b")
    resumed = create_model("multiscale_patch", "tiny", epochs=3).fit(train, workdir=tmp_path / "b", resume=True)
    torch.testing.assert_close(resumed.state_dict(), straight.state_dict(), rtol=0, atol=0, equal_nan=True)
