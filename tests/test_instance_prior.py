"""Instance-prior GAN (Metaformer §3.2): editor, collapse guard, G / D, data, metrics, baselines, training."""

from __future__ import annotations

import argparse
import copy
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import shared_data
from metaad.data.datasets import DataError
from metaad.data.saliency import disjoint_split, list_saliency_folder, load_square_masks
from metaad.data.transforms import normalize
from metaad.io import load_checkpoint_file, load_tensors
from metaad.metrics.saliency import SaliencyMetrics, f_measure_curves, mae, max_f_measure
from metaad.models.metaformer.instance_prior import (
    SHIPPED_WEIGHTS,
    Discriminator,
    Generator,
    apply_color_selectivo,
    collapse_guard,
    load_instance_prior,
    luminance_context,
    make_effect_images,
    to_gray,
)
from metaad.models.metaformer.prior_training import (
    PriorTrainingConfig,
    _build_banks,
    _Data,
    _train_epoch,
    coloured_area_range,
    train_instance_prior,
)
from metaad.models.metaformer.saliency_baselines import CenterBiasGaussian, SpectralResidual

TINY = {
    "image_size": 32,
    "batch_size": 8,
    "decoder_channels": (8, 8, 8, 8, 4),
    "d_channels": (8, 16, 16, 16),
    "effect_fraction": 0.45,
    "val_fraction": 0.1,
    "lr": 2e-3,
    "ema_decay": 0.5,
}


def _scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A colourful smooth background with one disc of another colour; returns (RGB uint8, mask uint8)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    phase = rng.uniform(0, 2 * np.pi, 3)
    background = 0.5 + 0.25 * np.sin(2 * np.pi * (xx[..., None] * rng.uniform(0.5, 2) + yy[..., None]) + phase)
    cy, cx, radius = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
    image = np.where(mask[..., None], rng.uniform(0, 1, 3), background)
    return (image * 255).astype(np.uint8), (mask * 255).astype(np.uint8)


def _folder(root: Path, count: int, size: int = 48, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        image, mask = _scene(rng, size)
        Image.fromarray(image).save(root / "images" / f"{i:03d}.jpg", quality=95)
        Image.fromarray(mask).save(root / "masks" / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def saliency_root(tmp_path_factory) -> Path:
    return _folder(tmp_path_factory.mktemp("saliency"), 40)


# -- editor, guard, G and D ---------------------------------------------------------------------------------


def test_editor_only_moves_saturation() -> None:
    images = torch.rand(2, 3, 8, 8)
    assert torch.allclose(apply_color_selectivo(images, torch.ones(2, 1, 8, 8)), images)  # all-ones: unedited
    gray = apply_color_selectivo(images, torch.zeros(2, 1, 8, 8))  # all-zeros: fully gray
    assert torch.allclose(gray, to_gray(images).expand(-1, 3, -1, -1))
    response = torch.rand(2, 1, 8, 8, requires_grad=True)
    edited = apply_color_selectivo(images, response)
    assert torch.allclose(to_gray(edited), to_gray(images), atol=1e-6)  # luminance never changes
    edited.sum().backward()  # dE/dR = I - gray(I): differentiable, zero where the image is gray
    assert torch.allclose(response.grad, (images - to_gray(images)).sum(1, keepdim=True), atol=1e-5)
    with pytest.raises(ValueError, match="response"):
        apply_color_selectivo(images, torch.ones(2, 1, 4, 4))


def test_collapse_guard_is_high_for_degenerate_maps_and_zero_for_a_plausible_one() -> None:
    ones, zeros, flat = torch.ones(4, 1, 16, 16), torch.zeros(4, 1, 16, 16), torch.full((4, 1, 16, 16), 0.5)
    plausible = torch.zeros(4, 1, 16, 16)
    plausible[..., 4:12, 4:12] = 1  # a binary object covering 25% of the frame
    assert collapse_guard(ones)["area"].item() == pytest.approx(1.0)
    assert collapse_guard(zeros)["area"].item() == pytest.approx(1.0)
    assert collapse_guard(flat)["binary"].item() == pytest.approx(1.0)
    assert collapse_guard(plausible)["area"].item() == 0.0
    assert collapse_guard(plausible)["binary"].item() == 0.0
    with pytest.raises(ValueError, match="area_range"):
        collapse_guard(ones, (0.6, 0.2))


def test_discriminator_sees_chroma_and_a_luminance_context_that_edits_cannot_change() -> None:
    torch.manual_seed(0)
    generator = Generator(decoder_channels=(8, 8, 8, 8, 4)).load_encoder_weights()
    discriminator = Discriminator((8, 16, 16, 16), tuple(generator.skip_channels[2:]))
    images = torch.rand(3, 3, 32, 32)
    context = luminance_context(generator, images)
    assert [tuple(c.shape) for c in context] == [(3, 40, 4, 4), (3, 112, 2, 2)]
    edited = apply_color_selectivo(images, (torch.rand(3, 1, 32, 32) > 0.5).float())
    for before, after in zip(context, luminance_context(generator, edited), strict=True):
        assert torch.allclose(before, after, atol=1e-4)  # gray(E(I, R)) = gray(I): the context is E's own
    assert discriminator(edited, context).shape == (3, 1, 2, 2)
    first = discriminator.convs[0]
    assert first.weight_orig.shape[1] == 4 and hasattr(first, "weight_u")  # RGB + chroma, spectral norm


def test_generator_shapes_frozen_encoder_and_working_size() -> None:
    torch.manual_seed(0)
    generator = Generator(decoder_channels=(8, 8, 8, 8, 4), working_size=32)
    assert not generator.bn1.training  # the frozen encoder's batch-norm statistics never update
    generator.eval()
    images = torch.rand(2, 3, 48, 40)  # [0, 1] RGB: P normalises inside
    response = generator(images)
    assert response.shape == (2, 1, 48, 40)
    assert response.min() >= 0 and response.max() <= 1
    assert all(not p.requires_grad for m in generator.encoder_modules() for p in m.parameters())
    generator.train()
    assert not generator.blocks.training and generator.up1.training
    assert generator.respond(normalize(torch.rand(1, 3, 32, 32))).shape == (1, 1, 32, 32)


# -- data -----------------------------------------------------------------------------------------------------


def test_saliency_folder_reader_and_its_errors(tmp_path: Path) -> None:
    root = _folder(tmp_path / "ok", 3, size=16)
    (root / "images" / "000.jpg").rename(root / "images" / "000.JPG")  # extensions are case-insensitive
    samples = list_saliency_folder(root)
    assert [s.stem for s in samples] == ["000", "001", "002"]
    (root / "masks" / "002.png").unlink()
    with pytest.raises(DataError, match="no mask"):
        list_saliency_folder(root)
    assert list_saliency_folder(root, require_masks=False)[2].mask is None
    Image.new("L", (16, 16)).save(root / "masks" / "zzz.png")
    (root / "images" / "002.jpg").unlink()
    with pytest.raises(DataError, match="no image"):
        list_saliency_folder(root)
    with pytest.raises(DataError, match="images"):
        list_saliency_folder(tmp_path / "absent")


def test_disjoint_split_is_seeded_and_disjoint() -> None:
    items = list(range(100))
    a, b, c = disjoint_split(items, [0.45, 0.1, 0.45], seed=3)
    assert (len(a), len(b), len(c)) == (45, 10, 45)
    assert not set(a) & set(b) and not set(a) & set(c) and not set(b) & set(c)
    assert set(a) | set(b) | set(c) == set(items)
    assert disjoint_split(items, [0.45, 0.1, 0.45], seed=3) == [a, b, c]
    assert disjoint_split(items, [0.45, 0.1, 0.45], seed=4) != [a, b, c]
    with pytest.raises(ValueError, match="fractions"):
        disjoint_split(items, [0.7, 0.7])


def test_effect_images_keep_the_object_in_colour_and_the_background_gray(saliency_root: Path) -> None:
    sample = list_saliency_folder(saliency_root)[0]
    image = torch.from_numpy(np.asarray(Image.open(sample.image).convert("RGB")).copy()).permute(2, 0, 1)
    mask = load_square_masks([sample.mask], 48)
    effect = make_effect_images(image[None], mask)
    chroma = (effect - to_gray(effect)).abs().amax(1)[0]
    inside, outside = mask[0, 0] == 255, mask[0, 0] == 0
    assert chroma[outside].max() < 1e-6
    assert chroma[inside].mean() > 0.05


def test_area_prior_comes_from_the_effect_photos() -> None:
    masks = torch.zeros(4, 1, 10, 10, dtype=torch.uint8)
    for i, rows in enumerate((1, 2, 3, 4)):  # coloured areas 0.1, 0.2, 0.3, 0.4
        masks[i, 0, :rows] = 255
    low, high = coloured_area_range(masks)
    assert low == pytest.approx(0.1075, abs=1e-4) and high == pytest.approx(0.3925, abs=1e-4)


# -- metrics and baselines -------------------------------------------------------------------------------------


def test_mae_and_max_f_measure_known_values() -> None:
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert mae(mask, mask) == 0.0 and max_f_measure(mask, mask) == pytest.approx(1.0)
    assert mae(1 - mask, mask) == 1.0
    pred = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # t >= 1: P = R = 1/2, F = 1/2; t = 0: P = 1/2, R = 1
    curve = f_measure_curves(pred, mask)[0]
    assert curve[255].item() == pytest.approx(0.5, abs=1e-6)
    assert curve[0].item() == pytest.approx(1.3 * 0.5 / (0.3 * 0.5 + 1), abs=1e-6)
    assert max_f_measure(pred, mask) == pytest.approx(0.65 / 1.15, abs=1e-6)
    metrics = SaliencyMetrics().update(mask, mask).update(torch.zeros(1, 1, 3, 5), torch.ones(1, 1, 3, 5))
    assert metrics.compute()["mae"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mae(mask * 2, mask)


def test_baselines_center_bias_and_spectral_residual() -> None:
    center = CenterBiasGaussian(0.25)(torch.zeros(1, 3, 33, 33))
    assert center.shape == (1, 1, 33, 33) and center[0, 0, 16, 16] == center.max()
    assert torch.allclose(center, center.flip(-1))
    corner = (0.5 / 33 - 0.5) ** 2 * 2  # squared distance of the corner pixel's centre, in sides
    assert center[0, 0, 0, 0].item() == pytest.approx(np.exp(-corner / (2 * 0.25**2)), rel=1e-5)
    generator = torch.Generator().manual_seed(0)
    gray = (0.5 + 0.1 * torch.randn(1, 1, 128, 128, generator=generator)).expand(1, 3, -1, -1).clone()
    gray[..., 40:56, 80:96] = 1.0  # one bright square pops out of a noisy background
    saliency = SpectralResidual()(gray)
    assert saliency.shape == (1, 1, 128, 128) and saliency.min() >= 0 and saliency.max() <= 1
    inside = torch.zeros(128, 128, dtype=torch.bool)
    inside[40:56, 80:96] = True
    assert saliency[0, 0][inside].mean() > 3 * saliency[0, 0][~inside].mean()


# -- training --------------------------------------------------------------------------------------------------


def _train(root: Path, out: Path, **overrides) -> Generator:
    config = PriorTrainingConfig(**{**TINY, **overrides})
    return train_instance_prior([root], out, config, progress=False, **({"resume": True} if out.exists() else {}))


def test_training_logs_checkpoints_exports_and_resumes_exactly(saliency_root: Path, tmp_path: Path) -> None:
    straight = _train(saliency_root, tmp_path / "straight", epochs=2, max_steps_per_epoch=2)
    log = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    assert log[0]["event"] == "start" and log[0]["splits"] == {"effect": 18, "generator": 18, "val": 4}
    assert [r["epoch"] for r in log[1:]] == [1, 2] and {"loss_d", "mean_r", "val"} <= set(log[1])

    (tmp_path / "resumed").mkdir()
    _train(saliency_root, tmp_path / "resumed", epochs=1, max_steps_per_epoch=2)  # "killed" after epoch 1
    resumed = _train(saliency_root, tmp_path / "resumed", epochs=2, max_steps_per_epoch=2)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    exported = load_instance_prior(str(tmp_path / "resumed" / "instance_prior.safetensors"))
    assert torch.equal(exported.head.weight, resumed.head.weight)
    config = json.loads((tmp_path / "resumed" / "instance_prior.json").read_text())
    assert [r["epoch"] for r in config["training"]["log"]] == [1, 2]

    with pytest.raises(FileExistsError, match="resume"):
        train_instance_prior([saliency_root], tmp_path / "resumed", PriorTrainingConfig(**TINY), progress=False)
    with pytest.raises(ValueError, match=r"another training \(config.lr: saved 0.002, now 0.0001;"):
        _train(saliency_root, tmp_path / "resumed", epochs=3, lr=1e-4)


_PACED_TRAINING = """
import json, sys, time
from metaad.models.metaformer import prior_training

epoch = prior_training._train_epoch
def paced(*args):  # a pause after each epoch, so that the kill lands mid-training
    record = epoch(*args)
    time.sleep(0.3)
    return record

prior_training._train_epoch = paced
config = prior_training.PriorTrainingConfig(**json.loads(sys.argv[3]))
prior_training.train_instance_prior([sys.argv[1]], sys.argv[2], config, progress=False)
"""


def test_train_prior_killed_by_sigkill_and_resumed_is_bit_identical(saliency_root: Path, tmp_path: Path) -> None:
    """A training process SIGKILLed wherever it is after epoch 2's log line, resumed in this one: the averaged
    G, G, D and both Adam states end as if it had never stopped."""
    settings = {**TINY, "epochs": 6, "max_steps_per_epoch": 2}
    straight = _train(saliency_root, tmp_path / "straight", **settings)
    killed, errors = tmp_path / "killed", tmp_path / "stderr.txt"
    with open(errors, "wb") as stderr:
        child = subprocess.Popen([sys.executable, "-c", _PACED_TRAINING, str(saliency_root), str(killed),
                                  json.dumps(settings)], stdout=subprocess.DEVNULL, stderr=stderr)
    log, deadline = killed / "log.jsonl", time.time() + 120
    while time.time() < deadline and child.poll() is None:
        if (killed / "checkpoint.safetensors").is_file() and log.is_file() and '"epoch": 2' in log.read_text():
            break
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL, errors.read_text()[-2000:]
    done = int(load_checkpoint_file(killed / "checkpoint.safetensors")[1]["epoch"])
    assert 1 <= done < 6, "the kill must land mid-training"
    resumed = _train(saliency_root, killed, **settings)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    expected, got = (
        {k: v for k, v in load_tensors(out / "checkpoint.safetensors").items() if not k.startswith("rng.")}
        for out in (tmp_path / "straight", killed)
    )
    assert expected.keys() == got.keys() and {k.split(".")[0] for k in got} == {
        "generator", "discriminator", "average", "optim_g", "optim_d"}
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    epochs = [r["epoch"] for r in map(json.loads, log.read_text().splitlines()) if "epoch" in r]
    assert epochs == [1, 2, 3, 4, 5, 6]


def _synthetic_data(count: int, size: int) -> _Data:
    rng = np.random.default_rng(1)
    scenes = [_scene(rng, size) for _ in range(2 * count)]
    images = torch.from_numpy(np.stack([s[0] for s in scenes])).permute(0, 3, 1, 2).contiguous()
    masks = torch.from_numpy(np.stack([s[1] for s in scenes]))[:, None].contiguous()
    return _Data(images[:count], masks[:count], images[count:], images[:4], masks[:4], "synthetic", {}, (0.05, 0.6))


def _areas_after_training(head_bias: float, area_weight: float) -> torch.Tensor:
    """Per-image mean R after 48 steps on 32-px synthetic scenes, starting from a head bias of ``head_bias``."""
    config = PriorTrainingConfig(**{**TINY, "lr": 3e-3, "max_steps_per_epoch": 4, "area_weight": area_weight})
    data = _synthetic_data(16, 32)
    torch.manual_seed(0)
    generator = Generator(config.encoder, config.decoder_channels, 32).load_encoder_weights()
    torch.nn.init.constant_(generator.head.bias, head_bias)
    discriminator = Discriminator(config.d_channels, tuple(generator.skip_channels[2:]))
    optimizers = {
        "optim_g": torch.optim.Adam([p for p in generator.parameters() if p.requires_grad], config.lr, config.betas),
        "optim_d": torch.optim.Adam(discriminator.parameters(), config.lr, config.betas),
    }
    banks = _build_banks(generator, data, "cpu", False)
    average = copy.deepcopy(generator)
    for epoch in range(1, 13):
        _train_epoch(epoch, generator, average, discriminator, optimizers, data, banks, config, "cpu", False)
    with torch.no_grad():
        return generator.eval().respond(normalize(data.generator_images.float() / 255)).flatten(1).mean(1)


def test_short_training_from_all_ones_collapse_recovers_only_with_the_guard() -> None:
    guarded, unguarded = _areas_after_training(4.0, 1.0), _areas_after_training(4.0, 0.0)  # start: R ≈ 0.98
    assert guarded.mean() < 0.7 and guarded.max() < 0.9 and guarded.min() > 0.05
    assert unguarded.mean() > 0.9  # the control: without the area hinge it stays (near) all-ones


def test_short_training_from_all_zeros_collapse_recovers_only_with_the_guard() -> None:
    guarded, unguarded = _areas_after_training(-5.0, 1.0), _areas_after_training(-5.0, 0.0)  # start: R ≈ 0.007
    assert guarded.min() > 0.1 and guarded.max() < 0.6
    assert unguarded.min() < 0.03  # the control: some images stay (near) all-zeros


def test_cli_registers_train_prior_and_runs_a_step(saliency_root: Path, tmp_path: Path) -> None:
    from metaad.cli.instance_prior import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli"
    argv = ["train-prior", "--data", str(saliency_root), "--out", str(out), "--epochs", "1", "--batch-size", "4"]
    args = parser.parse_args([*argv, "--max-steps-per-epoch", "1", "--no-progress"])
    assert args.preset == "cpu" and not args.resume
    assert args.handler(args) == 0
    assert load_instance_prior(str(out / "instance_prior.safetensors")).working_size == 144


# -- the shipped generator ----------------------------------------------------------------------------------


def test_load_instance_prior_errors_name_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors"):
        load_instance_prior(str(tmp_path / "missing.safetensors"))


def test_shipped_generator_loads_offline_frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    if not SHIPPED_WEIGHTS.is_file():
        pytest.skip(f"{SHIPPED_WEIGHTS} not trained yet (metaad train-prior ... --export that path)")

    def no_network(*args, **kwargs):
        raise AssertionError("load_instance_prior tried to open a network connection")

    monkeypatch.setattr(socket, "socket", no_network)
    prior = load_instance_prior()
    assert not prior.training and not any(p.requires_grad for p in prior.parameters())
    images = torch.rand(2, 3, 64, 64)
    response = prior(images)
    assert response.shape == (2, 1, 64, 64) and response.min() >= 0 and response.max() <= 1
    with torch.no_grad():  # [0, 1] in; what it runs on is the ImageNet-normalised image (its decoder's input)
        small = F.interpolate(normalize(images), size=(prior.working_size,) * 2, mode="bilinear", antialias=True)
        expected = F.interpolate(prior.respond(small), size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.equal(response, expected.clamp(0, 1))


def test_real_saliency_folders_are_complete() -> None:
    ecssd = list_saliency_folder(shared_data("saliency/ecssd"))
    duts = list_saliency_folder(shared_data("saliency/duts_tr"))
    assert len(ecssd) == 1000 and len(duts) == 3000
    assert all(s.mask is not None for s in ecssd + duts)
