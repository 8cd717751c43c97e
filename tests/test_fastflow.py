import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_resume_is_bit_identical
from metaad.data.datasets import mvtec_records
from metaad.data.transforms import pil_to_tensor
from metaad.models import create_model
from metaad.models.fastflow import FastFlow
from metaad.models.persistence import load_model, save_model

TINY = FastFlow.PRESETS["tiny"]


def weave(root, split: str) -> tuple[torch.Tensor, list[int]]:
    """The synthetic category's images in [0, 1] at 64 px, and their labels."""
    records = mvtec_records(root, "weave", split)
    images = torch.stack([pil_to_tensor(Image.open(r.path), 64) for r in records])
    return images, [r.label for r in records]


def with_blob(images: torch.Tensor, seed: int) -> torch.Tensor:
    """A bright square pasted at a random place of each image."""
    generator = torch.Generator().manual_seed(seed)
    out = images.clone()
    for image in out:
        top, left = torch.randint(4, images.shape[-1] - 16, (2,), generator=generator).tolist()
        image[:, top : top + 12, left : left + 12] = 1.0
    return out


def test_shapes_any_input_size_and_the_contract():
    model = FastFlow(**TINY)
    assert model.PRESETS.keys() >= {"paper", "cpu", "tiny"}
    assert json.dumps(model.training_settings().__dict__, default=list)
    for (z, log_jac_det), norm in zip(model.encode(torch.rand(2, 3, 50, 90)), model.norms, strict=True):
        assert z.shape[1:] == norm.normalized_shape and log_jac_det.shape == (2,)
    model.fitted.fill_(True)  # shapes and the map's form only: untrained flows
    prediction = model.predict(torch.rand(3, 3, 50, 70))
    assert prediction.scores.shape == (3,) and prediction.maps.shape == (3, 50, 70)
    assert torch.isfinite(prediction.maps).all() and (prediction.maps >= 0).all() and (prediction.maps <= 1).all()
    assert torch.equal(prediction.scores, prediction.maps.flatten(1).amax(1))
    model.map_form = "negative"  # the reference code's −p: the same order, shifted by 1
    negative = model.predict(torch.rand(3, 3, 50, 70, generator=torch.Generator().manual_seed(0)))
    model.map_form = "complement"
    complement = model.predict(torch.rand(3, 3, 50, 70, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(complement.maps, negative.maps + 1, rtol=0, atol=1e-6)
    assert (negative.maps <= 0).all() and (negative.maps < 0).any()
    with pytest.raises(ValueError, match="map_form"):
        FastFlow(**{**TINY, "map_form": "log"})
    with pytest.raises(ValueError, match="image_size"):
        FastFlow(**{**TINY, "image_size": None})


def test_the_seed_fixes_the_initial_weights_and_permutations():
    first, second = FastFlow(**TINY), FastFlow(**TINY)
    same, other = second.state_dict(), FastFlow(**{**TINY, "seed": 1}).state_dict()
    def equal(a, b):  # the unfitted exposure_variation is NaN
        return torch.allclose(a.float(), b.float(), rtol=0, atol=0, equal_nan=True)

    assert all(equal(same[k], v) for k, v in first.state_dict().items())
    assert not all(equal(other[k], v) for k, v in first.state_dict().items())
    # FrEIA draws permutations from numpy's global generator: building a model leaves it as it was
    np.random.seed(5)
    expected = np.random.rand()
    np.random.seed(5)
    FastFlow(**TINY)
    assert np.random.rand() == expected


def test_every_fitted_tensor_is_in_the_state_dict():
    model = FastFlow(**TINY)
    state = model.state_dict()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable <= set(state)
    assert any(name.endswith("w_perm") for name in state)  # the flows' fixed permutations travel too


def test_loss_decreases_a_defect_scores_above_good_images_and_a_loaded_model_scores_identically(
    synthetic_root, tmp_path
):
    train, _ = weave(synthetic_root, "train")
    test, labels = weave(synthetic_root, "test")
    good = test[[i for i, label in enumerate(labels) if label == 0]]
    model = create_model("fastflow", "tiny", epochs=8, flow_steps=4)
    model.fit(train, workdir=tmp_path / "training")
    log = (tmp_path / "training" / "train_log.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in log]
    assert len(losses) == 8 and losses[-1] < losses[0]
    images = torch.cat([good, with_blob(good, 0)])
    prediction = model.predict(images)
    assert prediction.scores[len(good) :].min() > prediction.scores[: len(good)].max()
    save_model(model, tmp_path / "model")
    again = load_model(tmp_path / "model").predict(images)
    assert torch.equal(again.scores, prediction.scores) and torch.equal(again.maps, prediction.maps)


def test_interrupted_and_resumed_training_ends_bit_identical(tmp_path):
    images = torch.rand(10, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert_resume_is_bit_identical(lambda: FastFlow(**{**TINY, "epochs": 3, "batch_size": 4}), images, tmp_path)


def test_the_log_likelihood_score_is_minus_log_of_one_minus_the_complement_score():
    model = FastFlow(**{**TINY, "layers": (3,)}).eval()  # one stage: no mean over stages in between
    model.fitted.fill_(True)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    complement = model.predict(images)
    model.map_form = "log_likelihood"
    energy = model.predict(images)
    assert (energy.maps >= 0).all()
    # a bilinear map's maximum lies next to a node of the stage's grid, where the forms are −log(1 − x) of each other
    torch.testing.assert_close(energy.scores, -torch.log1p(-complement.scores), rtol=2e-3, atol=1e-4)
    assert not torch.allclose(energy.maps, complement.maps)
    with pytest.raises(ValueError, match="map_form must be one of"):
        FastFlow(**TINY, map_form="probability")
