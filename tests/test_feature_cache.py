"""The frozen-feature cache: maps computed once, the same training with or without it, never for augmentation."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from metaad.components import feature_cache
from metaad.components.feature_cache import FrozenFeatures
from metaad.models import create_model
from metaad.training.data import TrainImages


class Calls(nn.Module):
    """A stand-in frozen part: two maps of a fixed random convolution, counting the images it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.seen = 0

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        self.seen += len(images)
        first = self.conv(images)
        return [first, first[:, :2, ::2, ::2] * 2]


def _images(n: int, seed: int = 0) -> TrainImages:
    return TrainImages(torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)))


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch):
    for name in (feature_cache.ENV_DIRECTORY, feature_cache.ENV_MEMORY, feature_cache.ENV_FLOAT16):
        monkeypatch.delenv(name, raising=False)


def test_in_memory_maps_equal_the_frozen_part_and_are_computed_once():
    part, images = Calls(), _images(7)
    features = FrozenFeatures(nn.Module(), part, images, {"part": "calls"}, batch_size=3)
    seen = part.seen
    index = torch.tensor([5, 0, 3])
    batch = features[index]
    expected = part(images[index])
    assert [m.shape for m in batch] == [(3, 4, 8, 8), (3, 2, 4, 4)]
    for got, want in zip(batch, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    features[index]
    assert features.location is None and seen == 7 + 2  # the images once, and a two-image probe of the shapes


def test_above_the_memory_limit_maps_are_memory_mapped_and_reused_by_key(tmp_path):
    part, images = Calls(), _images(5)
    first = FrozenFeatures(nn.Module(), part, images, {"part": "calls"}, directory=tmp_path, memory_limit=0)
    assert first.computed and (first.location / "key.json").is_file() and (first.location / "map0.npy").is_file()
    index = torch.tensor([4, 1])
    again = FrozenFeatures(nn.Module(), part, images, {"part": "calls"}, directory=tmp_path, memory_limit=0)
    assert not again.computed and again.location == first.location
    for a, b in zip(first[index], again[index], strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(again[index][0], part(images[index])[0], rtol=1e-5, atol=1e-6)
    other_images = FrozenFeatures(nn.Module(), part, _images(5, seed=1), {"part": "calls"}, directory=tmp_path,
                                  memory_limit=0)
    other_key = FrozenFeatures(nn.Module(), part, images, {"part": "other"}, directory=tmp_path, memory_limit=0)
    assert other_images.computed and other_key.computed
    assert len({first.location, other_images.location, other_key.location}) == 3


def test_a_half_written_folder_is_computed_again(tmp_path):
    part, images = Calls(), _images(4)
    first = FrozenFeatures(nn.Module(), part, images, {"part": "calls"}, directory=tmp_path, memory_limit=0)
    (first.location / "key.json").unlink()  # a fit killed before the key file was written
    assert FrozenFeatures(nn.Module(), part, images, {"part": "calls"}, directory=tmp_path, memory_limit=0).computed


def test_a_temporary_folder_is_removed_with_the_cache(monkeypatch):
    features = FrozenFeatures(nn.Module(), Calls(), _images(3), {"part": "calls"}, memory_limit=0)
    folder = features.location.parent
    assert folder.is_dir()
    del features
    gc.collect()
    assert not folder.exists()


def test_float16_storage_and_switching_the_cache_off(monkeypatch):
    part, images = Calls(), _images(4)
    index = torch.tensor([2, 3])
    half = FrozenFeatures(nn.Module(), part, images, {"part": "calls"}, float16=True)
    assert half.maps[0].dtype == torch.float16 and half[index][0].dtype == torch.float32
    torch.testing.assert_close(half[index][0], part(images[index])[0], rtol=2e-3, atol=2e-3)
    monkeypatch.setenv(feature_cache.ENV_DIRECTORY, "off")
    seen = part.seen
    off = FrozenFeatures(nn.Module(), part, images, {"part": "calls"})
    assert not off.enabled and part.seen == seen  # nothing computed ahead
    off[index]
    assert part.seen == seen + 2


@pytest.mark.parametrize("name", ["reverse_distillation", "fastflow"])
def test_a_cached_fit_trains_the_same_weights_as_an_uncached_one(name, monkeypatch):
    images = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    cached = create_model(name, "tiny", epochs=2).fit(images)
    monkeypatch.setenv(feature_cache.ENV_DIRECTORY, "off")
    uncached = create_model(name, "tiny", epochs=2).fit(images)
    torch.testing.assert_close(cached.state_dict(), uncached.state_dict(), rtol=1e-4, atol=1e-5)
    probe = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(cached.predict(probe).scores, uncached.predict(probe).scores, rtol=1e-4, atol=1e-5)


def test_a_method_that_augments_its_inputs_never_uses_the_cache(monkeypatch):
    draem = create_model("draem", "tiny", epochs=1)
    with pytest.raises(ValueError, match="augments its training images"):
        FrozenFeatures(draem, Calls(), _images(2), {})

    def refuse(*args, **kwargs):
        raise AssertionError("FrozenFeatures built")

    for module in ("metaad.models.draem", "metaad.models.reverse_distillation", "metaad.models.fastflow"):
        if hasattr(__import__(module, fromlist=["_"]), "FrozenFeatures"):
            monkeypatch.setattr(f"{module}.FrozenFeatures", refuse)
    draem.fit(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)))  # trains without one
    with pytest.raises(AssertionError, match="FrozenFeatures built"):  # and the guard sees a method that does
        create_model("reverse_distillation", "tiny", epochs=1).fit(torch.rand(4, 3, 64, 64))
