"""One check run against every registered method: the registry is the test matrix (STYLE.md §3)."""

import socket

import pytest
import torch
from torch.utils.data import DataLoader

from metaad.data.datasets import AnomalyDataset, mvtec_records
from metaad.engine.checkpoint import load_model, save_model
from metaad.models import MODELS, create_model

TINY = {
    "metaformer": {
        "width_multiplier": 0.125,
        "image_size": 64,
        "adapt_epochs": 1,
        "batch_size": 4,
        "prior": "center-bias",
    },
    "patchcore": {"image_size": 64, "coreset_ratio": 0.1, "search": "exact"},
}


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("metaad tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_method_conforms(name, synthetic_root, tmp_path, no_network):
    assert name in TINY, f"add tiny settings for {name!r} to the conformance matrix"
    train = AnomalyDataset(mvtec_records(synthetic_root, "weave", "train")[:8], image_size=64)
    test = AnomalyDataset(mvtec_records(synthetic_root, "weave", "test")[:4], image_size=64)
    model = create_model(name, **TINY[name])
    assert model.fit(DataLoader(train, batch_size=4)) is model
    images = next(iter(DataLoader(test, batch_size=4)))["image"]
    prediction = model.eval().predict(images)
    assert prediction.scores.shape == (4,) and prediction.maps.shape == (4, 64, 64)
    assert torch.isfinite(prediction.scores).all() and torch.isfinite(prediction.maps).all()
    save_model(model, tmp_path)
    again = load_model(tmp_path).predict(images)
    assert torch.allclose(again.scores, prediction.scores) and torch.allclose(again.maps, prediction.maps)


def test_unknown_parameter_is_an_error_not_ignored():
    with pytest.raises(ValueError, match="unknown parameter"):
        create_model("patchcore", coreset_ration=0.1)
    with pytest.raises(ValueError, match="no preset"):
        create_model("patchcore", preset="huge")
