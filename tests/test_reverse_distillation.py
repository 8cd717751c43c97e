import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from metaad.backbones import Backbone
from metaad.metrics import image_auroc
from metaad.models import create_model
from metaad.models.persistence import load_model, save_model
from metaad.models.reverse_distillation import ReverseDistillation
from metaad.types import NotFittedError

TINY = {k: v for k, v in ReverseDistillation.PRESETS["tiny"].items() if k != "epochs"}


def texture(n: int, seed: int, size: int = 64) -> torch.Tensor:
    """Diagonal stripes with a random phase and a little noise: one synthetic 'good' texture, in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    phase = torch.rand(n, 1, 1, generator=generator) * 6.28
    stripes = 0.5 + 0.25 * torch.sin((x + y)[None] * 0.6 + phase)
    images = stripes[:, None].repeat(1, 3, 1, 1) * torch.tensor([1.0, 0.8, 0.6]).view(1, 3, 1, 1)
    images = images + 0.03 * torch.randn(images.shape, generator=generator)
    return images.clamp(0, 1)


def with_blob(images: torch.Tensor, seed: int) -> torch.Tensor:
    """A bright square pasted at a random place of each image."""
    generator = torch.Generator().manual_seed(seed)
    out = images.clone()
    size = images.shape[-1]
    for image in out:
        top, left = torch.randint(4, size - 16, (2,), generator=generator).tolist()
        image[:, top : top + 12, left : left + 12] = 1.0
    return out


def test_shapes_any_input_size_and_the_contract():
    model = ReverseDistillation(**TINY, epochs=1)
    assert model.PRESETS.keys() >= {"paper", "cpu", "tiny"}
    assert json.dumps(model.training_settings().__dict__, default=list)
    teacher, student = model(torch.rand(2, 3, 64, 64))
    for t, s, stride in zip(teacher, student, (4, 8, 16), strict=True):
        assert t.shape == s.shape and t.shape[-1] == 64 // stride
    model.fit(texture(4, 0))
    prediction = model.predict(torch.rand(3, 3, 50, 70))
    assert prediction.scores.shape == (3,) and prediction.maps.shape == (3, 50, 70)
    assert torch.isfinite(prediction.maps).all()
    assert torch.equal(prediction.scores, prediction.maps.flatten(1).amax(1))


def test_teacher_stays_frozen_and_same_seed_same_weights():
    a, b = ReverseDistillation(**TINY, epochs=1, seed=3), ReverseDistillation(**TINY, epochs=1, seed=3)
    other = ReverseDistillation(**TINY, epochs=1, seed=4)
    torch.testing.assert_close(a.state_dict(), b.state_dict(), rtol=0, atol=0, equal_nan=True)
    assert not torch.equal(a.decoder.heads[0].weight, other.decoder.heads[0].weight)
    pretrained = Backbone(a.backbone, a.layers).load_weights().state_dict()  # what fit loads, once
    a.train()
    assert not a.teacher.training and not any(p.requires_grad for p in a.teacher.parameters())
    a.fit(texture(4, 1))
    assert all(torch.equal(v, a.teacher.state_dict()[k]) for k, v in pretrained.items())


def test_untrained_model_refuses_to_predict_and_bad_settings_fail():
    with pytest.raises(NotFittedError, match="not fitted"):
        ReverseDistillation(**TINY, epochs=1).predict(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="loss"):
        ReverseDistillation(**TINY, loss="l2")
    with pytest.raises(ValueError, match="multiple of 32"):
        ReverseDistillation(**{**TINY, "image_size": 80})


def test_loss_decreases_and_a_defect_scores_above_good_images(tmp_path):
    model = ReverseDistillation(**TINY, epochs=10)
    model.fit(texture(8, 0), workdir=tmp_path)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 10 and losses[-1] < 0.5 * losses[0]
    good = texture(8, 100)
    bad = with_blob(texture(8, 200), seed=1)
    scores = model.predict(torch.cat([good, bad])).scores
    assert image_auroc([0] * 8 + [1] * 8, scores.numpy()) >= 0.9
    # the map points at the blob
    maps = model.predict(bad).maps
    blobs = (bad == 1.0).all(1)
    assert (maps[blobs].mean() > maps[~blobs].mean() * 1.5).item()


def test_the_two_loss_forms():
    model = ReverseDistillation(**TINY, epochs=1, loss="local", loss_stages=None).eval()
    images = texture(2, 0)
    teacher, student = model(images)
    per_location = sum((1 - F.cosine_similarity(t, s, dim=1)).mean() for t, s in zip(teacher, student, strict=True))
    assert torch.allclose(model.training_loss(model.teacher_maps(images)), per_location)
    model.loss = "flat"
    pairs = zip(teacher, student, strict=True)
    whole = sum((1 - F.cosine_similarity(t.flatten(1), s.flatten(1))).mean() for t, s in pairs)
    assert torch.allclose(model.training_loss(model.teacher_maps(images)), whole)


def test_save_and_load_give_identical_scores(tmp_path):
    model = create_model("reverse_distillation", preset="tiny").fit(texture(8, 0))
    images = with_blob(texture(4, 5), seed=2)
    before = model.predict(images)
    save_model(model, tmp_path)
    again = load_model(tmp_path).predict(images)
    assert torch.equal(before.scores, again.scores) and torch.equal(before.maps, again.maps)


def test_training_killed_mid_epoch_resumes_bit_identical(tmp_path):
    train = texture(10, 0)  # batches of 4, 4, 2: three steps an epoch
    straight = ReverseDistillation(**TINY, epochs=3).fit(train, workdir=tmp_path / "straight")
    killed = ReverseDistillation(**TINY, epochs=3)
    steps = iter(range(5))  # the process dies in the second step of epoch 2

    def dies(images):
        if next(steps, None) is None:
            raise KeyboardInterrupt
        return ReverseDistillation.training_loss(killed, images)

    killed.training_loss = dies
    with pytest.raises(KeyboardInterrupt):
        killed.fit(train, workdir=tmp_path / "killed")
    resumed = ReverseDistillation(**TINY, epochs=3).fit(train, workdir=tmp_path / "killed", resume=True)
    torch.testing.assert_close(resumed.state_dict(), straight.state_dict(), rtol=0, atol=0, equal_nan=True)
    log = (tmp_path / "killed" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [1, 2, 3]


def test_fit_accepts_a_data_loader_of_samples(synthetic_root):
    from metaad.data.datasets import AnomalyDataset, mvtec_records

    data = AnomalyDataset(mvtec_records(synthetic_root, "weave", "train")[:6], image_size=64)
    model = create_model("reverse_distillation", preset="tiny", epochs=1).fit(DataLoader(data, batch_size=3))
    assert model.predict(next(iter(DataLoader(data, batch_size=2)))["image"]).maps.shape == (2, 64, 64)


def test_decoder_widths_and_the_stages_of_loss_and_map():
    wide = ReverseDistillation(**TINY, decoder_channels=(16, 32, 48), loss_stages=None, map_stages=None).eval()
    assert [head.out_channels for head in wide.decoder.heads] == [112, 40, 24]  # back to the teacher's channels
    assert [head.in_channels for head in wide.decoder.heads] == [48, 32, 16]
    images = texture(2, 0)
    teacher = wide.teacher_maps(images)
    student = wide.decoder(wide.bottleneck(teacher))
    deepest = (1 - F.cosine_similarity(teacher[2].flatten(1), student[2].flatten(1))).mean()
    wide.loss_stages = (2,)
    assert torch.allclose(wide.training_loss(teacher), deepest)
    wide.fitted.fill_(True)
    every = wide.predict(images).maps
    wide.map_stages = (0, 1, 2)
    assert torch.equal(wide.predict(images).maps, every)
    wide.map_stages = (2,)
    assert not torch.allclose(wide.predict(images).maps, every)
    with pytest.raises(ValueError, match="one width per teacher layer"):
        ReverseDistillation(**TINY, decoder_channels=(16, 32))
    with pytest.raises(ValueError, match="map_stages must list positions"):
        ReverseDistillation(**TINY, map_stages=(3,))
