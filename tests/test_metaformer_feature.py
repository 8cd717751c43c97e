"""Metaformer in feature space: its parts, the one inner loop, adaptation, meta-training and the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from metaad.models import create_model
from metaad.models.metaformer.feature_space import (
    FEATURE_TAPS,
    FeatureAutoencoder,
    GridTransformer,
    channel_statistics,
    feature_grid,
    inner_loop,
    prior_weights,
    weighted_loss,
)
from metaad.models.metaformer.model import Metaformer

TINY = {"image_size": 64, "init": None, "bottleneck": 8, "hidden": 16, "prior": "center-bias", "taps": (2, 3)}


def _texture(n: int, seed: int, size: int = 64) -> torch.Tensor:
    """A fine grey grain with noise in [0, 1], the same pattern in every image."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    pattern = 0.5 + 0.15 * torch.sin(xs / 1.3) * torch.cos(ys / 1.7)
    noise = 0.03 * torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed))
    return (pattern + noise).clamp(0, 1).expand(n, 3, size, size).contiguous()


def test_feature_grid_upsamples_coarser_taps_onto_the_finest():
    grid = feature_grid([torch.ones(2, 3, 8, 8), torch.full((2, 5, 4, 4), 2.0)])
    assert grid.shape == (2, 8, 8, 8)
    assert torch.equal(grid[:, :3], torch.ones(2, 3, 8, 8)) and torch.allclose(grid[:, 3:], torch.tensor(2.0))


def test_channel_statistics_in_chunks_equal_those_of_the_whole():
    grid = torch.randn(10, 4, 5, 5, generator=torch.Generator().manual_seed(0)) * torch.tensor([1, 2, 3, 4.0])[
        :, None, None] + 7
    mean, std = channel_statistics(grid, eps=0)
    torch.testing.assert_close(mean, grid.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(std, grid.std(dim=(0, 2, 3), unbiased=False))
    chunked = channel_statistics(iter(grid.split(3)), eps=0)
    torch.testing.assert_close(chunked[0], mean)
    torch.testing.assert_close(chunked[1], std)
    with pytest.raises(ValueError, match="at least one"):
        channel_statistics(iter([]))


def test_transformer_starts_as_the_identity_and_prior_weights_never_drop_a_location():
    transformer = GridTransformer(6)
    rebuilt = torch.randn(2, 6, 8, 8)
    torch.testing.assert_close(transformer(torch.rand(2, 1, 8, 8), rebuilt), torch.ones(2, 1, 8, 8))
    with pytest.raises(ValueError, match="multiple"):
        transformer(torch.rand(2, 1, 6, 6), torch.randn(2, 6, 6, 6))
    assert torch.equal(prior_weights(torch.zeros(1, 1, 8, 8), 1.0), torch.ones(1, 1, 8, 8))  # P off: A alone
    torch.testing.assert_close(prior_weights(torch.full((1, 1, 8, 8), 0.5), 2.0), torch.full((1, 1, 8, 8), 2.0))
    assert prior_weights(None, 1.0) is None and prior_weights(torch.ones(1, 1, 8, 8), 0) is None
    errors = torch.tensor([[[[1.0, 3.0]]]])
    assert weighted_loss(errors, torch.tensor([[[[1.0, 3.0]]]])) == pytest.approx(10 / 4)
    assert weighted_loss(errors, None) == pytest.approx(2.0)


def test_inner_loop_lowers_the_loss_with_either_optimiser_and_checks_its_name():
    generator = torch.Generator().manual_seed(0)
    code = torch.randn(4, 2, 8, 8, generator=generator)  # features of rank 2: what a 2-channel code can rebuild
    grid = torch.einsum("bkhw,kc->bchw", code, torch.randn(2, 6, generator=generator))
    for optimizer, lr in (("adam", 1e-2), ("sgd", 5e-2)):
        torch.manual_seed(0)
        model = FeatureAutoencoder(6, 2, 8)
        losses = inner_loop(model, lambda index, model=model: (model(grid[index]) - grid[index]).pow(2).mean(),
                            4, 60, lr, 4, optimizer)
        assert len(losses) == 60 and losses[-1] < 0.8 * losses[0], optimizer
    seen = []
    inner_loop(FeatureAutoencoder(6, 2, 8), lambda index: seen.append(index) or torch.zeros((), requires_grad=True),
               10, 3, 0.1, 4, "sgd", torch.Generator().manual_seed(0))
    assert [len(index) for index in seen] == [4, 4, 4] and len({tuple(i.tolist()) for i in seen}) > 1
    with pytest.raises(ValueError, match="optimizer"):
        inner_loop(FeatureAutoencoder(6, 2, 8), lambda index: torch.zeros(()), 1, 1, 0.1, 1, "lbfgs")


def test_default_is_the_feature_space_and_the_paper_preset_is_pixel_space():
    model = create_model("metaformer")
    assert (model.space, model.image_size, model.init) == ("feature", 256, "universal-feature")
    assert model.taps == FEATURE_TAPS and model.configuration == "A"
    paper = create_model("metaformer", "paper")
    assert (paper.space, paper.image_size, paper.init, paper.map_type) == ("pixel", 256, None, "l2")
    assert create_model("metaformer", space="pixel").image_size == 64
    assert create_model("metaformer", space="pixel").init == "universal-cpu"
    with pytest.raises(ValueError, match="space"):
        Metaformer(space="latent")
    with pytest.raises(ValueError, match="adapt_optimizer"):
        Metaformer(adapt_optimizer="rmsprop")
    state = [k for k in model.state_dict() if k != "fitted"]  # P is kept apart; the frozen backbone is saved
    parts = ("autoencoder.", "transformer.", "feature_mean", "feature_std", "preprocess.", "backbone.")
    assert all(k.startswith(parts) for k in state)


@pytest.mark.parametrize("configuration", ["A", "A+P", "A+P+T"])
def test_adapted_feature_model_finds_a_faint_pit_on_a_grain(configuration):
    torch.manual_seed(0)
    model = Metaformer(**TINY, configuration=configuration, adapt_steps=150, lr=3e-3, batch_size=16)
    model.fit(_texture(16, seed=0))
    good, defective = _texture(6, seed=1), _texture(6, seed=2)
    defective[:, :, 28:34, 36:42] -= 0.25  # a dark pit, 6 px across
    prediction = model.predict(torch.cat([good, defective]))
    assert prediction.maps.shape == (12, 64, 64)
    assert prediction.scores[6:].min() > prediction.scores[:6].max(), configuration
    peak = prediction.maps[6:].flatten(1).argmax(1)
    assert ((peak // 64 - 31).abs() <= 8).all() and ((peak % 64 - 39).abs() <= 8).all()
    summary = model.fit_summary()
    assert summary["adapt_steps"] == 150 and summary["adapt_loss_last"] < summary["adapt_loss_first"]


def test_a_saved_feature_model_scores_the_same_after_loading(tmp_path):
    from metaad.models.persistence import load_model, save_model

    model = Metaformer(**TINY, adapt_steps=3).fit(_texture(4, seed=0))
    images = _texture(3, seed=5)
    expected = model.predict(images)
    save_model(model, tmp_path)
    again = load_model(tmp_path)
    assert again.space == "feature"
    torch.testing.assert_close(again.predict(images).scores, expected.scores)
    torch.testing.assert_close(again.feature_std, model.feature_std)


def _write_wild(folder, n: int) -> None:
    (folder / "images").mkdir(parents=True)
    generator = torch.Generator().manual_seed(1)
    for i in range(n):
        colour = (torch.rand(3, generator=generator) * 255).to(torch.uint8)
        pixels = colour.view(1, 1, 3).expand(48, 48, 3).clone()
        pixels[8 + i % 20 : 20 + i % 20, 10:30] = 255 - colour
        Image.fromarray(pixels.numpy()).save(folder / "images" / f"{i:03d}.png")


def test_meta_train_command_writes_a_universal_model_that_fit_adapts_from(tmp_path):
    """The command as a user runs it (a subprocess), then adaptation from its output; a mismatch is explained."""
    _write_wild(tmp_path / "wild", 24)
    out = tmp_path / "universal"
    command = [sys.executable, "-m", "metaad.cli.main", "meta-train", "--wild", str(tmp_path / "wild"), "--out",
               str(out), "--preset", "tiny", "--configuration", "A", "--group-size", "20", "--threads", "1",
               "--param", "image_size=64", "--param", "bottleneck=8", "--param", "hidden=16", "--param", "taps=[2, 3]",
               "--param", "adapt_steps=2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    universal = out / "universal.safetensors"
    assert done.stdout.strip().endswith(str(universal)) and (out / "features").is_dir()
    progress = json.loads((out / "progress.json").read_text())
    assert progress["epoch"] == 1 and progress["history"][0]["tasks"] >= 1
    settings = {**TINY, "configuration": "A", "init": str(universal), "adapt_steps": 0}
    adapted = Metaformer(**settings).fit(_texture(2, seed=0))
    from metaad.io import load_tensors

    meta_trained = load_tensors(universal)
    for name, value in adapted.autoencoder.state_dict().items():
        assert torch.equal(value, meta_trained[f"autoencoder.{name}"])  # zero steps: the meta-learned init itself
    with pytest.raises(ValueError, match="meta-trained with"):
        Metaformer(**{**settings, "bottleneck": 4}).fit(_texture(2, seed=0))
    again = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=env)
    assert again.returncode == 0 and "epoch 1/1" not in again.stderr  # resumed after its last epoch
    wrong = subprocess.run([*command[:-2], "--param", "adapt_stpes=2"], capture_output=True, text=True, env=env)
    assert wrong.returncode != 0 and "adapt_stpes" in wrong.stderr and "Traceback" not in wrong.stderr
    pixel_flag = subprocess.run([*command, "--width", "0.5"], capture_output=True, text=True, env=env)
    assert pixel_flag.returncode != 0 and "--space pixel" in pixel_flag.stderr


def test_shipped_feature_universal_model_loads_offline_adapts_and_says_how_it_was_made():
    from metaad.io import load_tensors
    from metaad.models.metaformer.model import SHIPPED_UNIVERSAL

    path = SHIPPED_UNIVERSAL["universal-feature"]
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["command"].startswith("metaad meta-train") and path.stat().st_size < 20 * 2**20
    model = create_model("metaformer", adapt_steps=0)
    model.fit(_texture(2, seed=0, size=256))
    shipped = load_tensors(path)
    assert all(torch.equal(v, shipped[f"autoencoder.{k}"]) for k, v in model.autoencoder.state_dict().items())
    assert record["inner_loop"]["adapt_steps"] == create_model("metaformer").adapt_steps  # adaptation = inner loop
    moved = create_model("metaformer", adapt_steps=2).fit(_texture(2, seed=0, size=256))
    assert any(not torch.equal(v, shipped[f"autoencoder.{k}"]) for k, v in moved.autoencoder.state_dict().items())


def test_a_large_support_set_adapts_for_at_least_adapt_min_epochs_passes():
    model = Metaformer(**TINY, adapt_steps=3, adapt_min_epochs=2, batch_size=4)
    assert model.adaptation_steps(4) == 3  # a few images: the inner loop unchanged
    assert model.adaptation_steps(10) == 5  # ⌈2 · 10 / 4⌉ passes' worth of steps
    model.fit(_texture(10, seed=0))
    assert model.fit_summary()["adapt_steps"] == 5
    with pytest.raises(ValueError, match="adapt_min_epochs"):
        Metaformer(**TINY, adapt_min_epochs=-1)


def test_a_save_from_before_adapt_min_epochs_loads_adapting_as_it_did(tmp_path):
    from metaad.models.persistence import CONFIG_FILE, load_model, save_model

    model = Metaformer(**TINY, adapt_steps=2).fit(_texture(4, seed=0))
    save_model(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    del config["params"]["adapt_min_epochs"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    again = load_model(tmp_path)
    assert again.adapt_min_epochs == 0.0 and Metaformer(**TINY).adapt_min_epochs == 10.0
    torch.testing.assert_close(again.predict(_texture(2, seed=3)).scores, model.predict(_texture(2, seed=3)).scores)
