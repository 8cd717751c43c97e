"""Metaformer: Table-1 autoencoder sizes, the three configurations, SSIM, MAML steps, data-parallel meta-training,
checkpoint/resume, meta-tasks, and a tiny adapted model that finds a synthetic defect."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from metaad.components.ssim import global_ssim, ssim, ssim_loss
from metaad.io import load_tensors, save_tensors
from metaad.models.metaformer import maml
from metaad.models.metaformer.maml import (
    MetaTrainConfig,
    WildImages,
    meta_gradient,
    meta_step,
    meta_train,
    metaformer_loss,
    sample_tasks,
    write_universal,
)
from metaad.models.metaformer.model import Metaformer
from metaad.models.metaformer.tasks import build_meta_tasks, list_wild_images

TINY = {"space": "pixel", "width_multiplier": 1 / 16, "image_size": 32, "prior": "center-bias", "init": None,
        "map_type": "l2"}

# Supplementary Table 1: (module name, output H = W, channels) at 256 px.
TABLE1 = [
    ("conv1", 256, 32), ("pool1", 128, 32), ("conv2", 128, 64), ("pool2", 64, 64),
    ("conv3", 64, 128), ("pool3", 32, 128), ("conv4", 32, 256), ("pool4", 16, 256),
    ("conv5", 16, 512), ("pool5", 8, 512), ("avgpool", 2, 512),
    ("up1", 16, 512), ("tconv1", 16, 256), ("up2", 32, 256), ("tconv2", 32, 128),
    ("up3", 64, 128), ("tconv3", 64, 64), ("up4", 128, 64), ("tconv4", 128, 32),
    ("up5", 256, 32), ("tconv5", 256, 3),
]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    """The test machine's 2 cores are shared: one thread avoids OpenMP oversubscription stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random colour gradients in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = torch.rand(n, 3, 1, 1, generator=g) * 0.5 + 0.25
    slope = (torch.rand(n, 3, 2, 1, 1, generator=g) - 0.5) * 0.4
    rgb = base + slope[:, :, 0] * ys + slope[:, :, 1] * xs
    return rgb.clamp(0, 1)


# -- architecture ----------------------------------------------------------------------------------------------


def test_autoencoder_matches_supplementary_table1():
    with torch.device("meta"):
        model = Metaformer(space="pixel", configuration="A", width_multiplier=1.0, image_size=256)
        sizes = {}
        modules = dict(model.autoencoder.encoder.named_children()) | dict(model.autoencoder.decoder.named_children())
        for name, _, _ in TABLE1:
            modules[name].register_forward_hook(lambda m, i, o, name=name: sizes.__setitem__(name, tuple(o.shape)))
        output = model.autoencoder(torch.empty(2, 3, 256, 256))
    for name, side, channels in TABLE1:
        assert sizes[name] == (2, channels, side, side), name
    assert output.shape == (2, 3, 256, 256)
    kernels = [m.kernel_size for m in model.autoencoder.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
    assert kernels == [(5, 5)] * 10


@pytest.mark.parametrize("configuration", ["A", "A+P", "A+P+T"])
def test_configurations_forward_loss_predict(configuration):
    torch.manual_seed(0)
    model = Metaformer(configuration=configuration, **TINY)
    images = _images(3)
    output = model(images)
    assert output.shape == (3, 3, 32, 32)
    assert output.min() >= 0 and output.max() <= 1
    reconstruction = model.autoencoder(images)
    prior = model.compute_prior(images)
    if configuration == "A":
        assert prior is None and model.transformer is None
        torch.testing.assert_close(output, reconstruction)
    elif configuration == "A+P":
        assert model.transformer is None
        torch.testing.assert_close(output, reconstruction * prior)
    else:
        weights = model.transformer(prior, reconstruction)
        assert weights.shape == (3, 1, 32, 32) and not torch.allclose(weights, prior)
        torch.testing.assert_close(output, reconstruction * weights)
    loss = model.loss(images)
    assert loss.ndim == 0 and loss > 0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    model.fitted.fill_(True)  # shapes only: untrained weights
    prediction = model.predict(torch.nn.functional.interpolate(images, size=(40, 48), mode="bilinear"))
    assert prediction.scores.shape == (3,) and prediction.maps.shape == (3, 40, 48)
    state = [k for k in model.state_dict() if k != "fitted"]
    assert all(k.startswith(("autoencoder.", "transformer.")) for k in state)  # P is stored apart


def test_configuration_and_size_are_checked():
    with pytest.raises(ValueError, match="configuration"):
        Metaformer(configuration="A+T")
    with pytest.raises(ValueError, match="multiple of 32"):
        Metaformer(image_size=100)


def test_feature_map_keeps_the_state_dict_and_sees_a_feature_gap():
    plain = Metaformer(space="pixel", configuration="A", width_multiplier=1 / 16, image_size=32, init=None,
                       map_type="l2")
    feature = Metaformer(space="pixel", configuration="A", width_multiplier=1 / 16, image_size=32, init=None,
                         map_type="feature")
    assert plain.state_dict().keys() == feature.state_dict().keys()  # the frozen backbone is kept apart
    images = _images(2)
    feature.fitted.fill_(True)  # the map's shape and form only: untrained weights
    maps = feature.predict(images).maps
    assert maps.shape == (2, *images.shape[-2:]) and torch.isfinite(maps).all()

    class Exact(nn.Module):  # Î = I: no gap anywhere
        def __init__(self):
            super().__init__()
            self.unused = nn.Parameter(torch.zeros(()))

        def forward(self, images):
            return images

    feature.autoencoder = Exact()
    assert feature.predict(images).scores.abs().max() < 1e-4
    with pytest.raises(ValueError, match="map_type"):
        Metaformer(map_type="ssim")


def test_injected_prior_is_used():
    model = Metaformer(space="pixel", configuration="A+P", width_multiplier=1 / 16, image_size=32, init=None)

    class Half(nn.Module):
        def forward(self, images):
            return torch.full_like(images[:, :1], 0.5)

    images = _images(2)
    model.set_prior(Half())
    torch.testing.assert_close(model(images), 0.5 * model.autoencoder(images))


# -- SSIM ------------------------------------------------------------------------------------------------------


def test_ssim_matches_scikit_image():
    structural_similarity = pytest.importorskip("skimage.metrics").structural_similarity
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 40, 48, generator=g)
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    ours = ssim(x, y)
    for b in range(2):
        reference = structural_similarity(
            x[b].double().numpy(),
            y[b].double().numpy(),
            channel_axis=0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
        )
        assert ours[b].item() == pytest.approx(reference, abs=1e-5)
    assert ssim_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)


def test_global_ssim_is_equation_1():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    y = torch.tensor([[2.0, 2.0, 4.0, 4.0]])
    mx, my, vx, vy, cxy = 2.5, 3.0, 1.25, 1.0, 1.0
    expected = 4 * mx * my * cxy / ((mx**2 + my**2) * (vx + vy))
    assert global_ssim(x, y).item() == pytest.approx(expected, rel=1e-6)
    assert global_ssim(x, x).item() == pytest.approx(1.0)
    assert global_ssim(x, 5 - x).item() == pytest.approx(-1.0)  # same mean and contrast, inverted structure


# -- MAML ------------------------------------------------------------------------------------------------------


def _scalar_loss(model):
    def loss_fn(params, buffers, batch):
        return ((functional_call(model, (params, buffers), batch) - batch[0]) ** 2).mean()

    return loss_fn


@pytest.mark.parametrize("inner_steps", [1, 2])
@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_matches_hand_unrolled_scalar_model(first_order, inner_steps):
    """L(w) = mean((w x − x)²) = (w − 1)² a: every step and derivative in closed form."""
    model = nn.Linear(1, 1, bias=False)
    w, alpha = 0.3, 0.05
    support, query = torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0], [-1.0], [0.5]])
    a_s, a_q = (support**2).mean().item(), (query**2).mean().item()
    shrink = 1 - 2 * alpha * a_s  # dw'/dw of one inner step
    w_adapted = 1 + (w - 1) * shrink**inner_steps
    expected_loss = (w_adapted - 1) ** 2 * a_q
    expected = 2 * (w_adapted - 1) * a_q * (1 if first_order else shrink**inner_steps)
    grads, loss = meta_gradient(
        _scalar_loss(model), {"weight": torch.tensor([[w]])}, {}, (support,), (query,), alpha, inner_steps, first_order
    )
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    assert grads["weight"].item() == pytest.approx(expected, rel=1e-5)


def test_second_order_meta_gradient_matches_autograd_on_metaformer():
    torch.manual_seed(0)
    model = Metaformer(**TINY)
    loss_fn = metaformer_loss(model)
    support = (_images(2, seed=1), model.compute_prior(_images(2, seed=1)))
    query = (_images(2, seed=2), model.compute_prior(_images(2, seed=2)))
    params = dict(model.named_parameters())
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    grads, _ = meta_gradient(loss_fn, params, buffers, support, query, inner_lr=0.1)

    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    with sdpa_kernel([SDPBackend.MATH]):  # the reference needs double backward through attention too
        inner = torch.autograd.grad(loss_fn(leaves, buffers, support), list(leaves.values()), create_graph=True)
        adapted = {k: v - 0.1 * g for (k, v), g in zip(leaves.items(), inner, strict=True)}
        reference = torch.autograd.grad(loss_fn(adapted, buffers, query), list(leaves.values()))
    for (name, value), expected in zip(grads.items(), reference, strict=True):
        torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-6, msg=name)
    first, _ = meta_gradient(loss_fn, params, buffers, support, query, inner_lr=0.1, first_order=True)
    assert not torch.allclose(first["autoencoder.encoder.conv1.weight"], grads["autoencoder.encoder.conv1.weight"])


def _tiny_tasks(model, n_tasks=4, batch=2):
    out = []
    for t in range(n_tasks):
        s, q = _images(batch, seed=10 + t), _images(batch, seed=50 + t)
        out.append(((s, model.compute_prior(s)), (q, model.compute_prior(q))))
    return out


def _one_meta_step(first_order: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = Metaformer(**TINY)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    config = MetaTrainConfig(inner_lr=0.1, first_order=first_order)
    meta_step(model, optimizer, metaformer_loss(model), _tiny_tasks(model), config)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _distributed_worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        save_tensors(f"{out}.{rank}", _one_meta_step(first_order=False))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_take_the_same_step_as_one(tmp_path):
    single = _one_meta_step(first_order=False)
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "state")), nprocs=2, join=True)
    initial = Metaformer(**TINY).state_dict()
    for rank in range(2):
        state = load_tensors(tmp_path / f"state.{rank}")
        for name, value in single.items():
            # Adam's first step is about ±lr (1e-2) per weight; summation order moves it by < 2e-4
            torch.testing.assert_close(state[name], value, rtol=1e-4, atol=5e-4, msg=name)
    assert not torch.allclose(single["autoencoder.encoder.conv1.weight"], initial["autoencoder.encoder.conv1.weight"])


# -- meta-training runs, checkpoints, universal models ----------------------------------------------------------


def _write_images(folder: Path, n: int, size: int = 40, seed: int = 0, kind: str = "gradient") -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        if kind == "gradient":
            rgb = rng.uniform(0.2, 0.8, 3) + np.stack([ys, xs, ys * xs], -1) * rng.uniform(-0.2, 0.2, 3)
        else:  # stripes
            rgb = 0.5 + 0.4 * np.sin(2 * np.pi * (4 + i % 3) * ys)[..., None] * np.ones(3)
        Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8)).save(folder / "images" / f"{i:03d}.JPG")
        Image.fromarray(np.zeros((size, size), np.uint8)).save(folder / "masks" / f"{i:03d}.png")


def test_meta_tasks_group_by_structure_are_cached_and_never_read_masks(tmp_path):
    _write_images(tmp_path / "a", 12, kind="gradient")
    _write_images(tmp_path / "b", 12, kind="stripes")
    paths = list_wild_images([tmp_path / "a", tmp_path / "b"])
    assert len(paths) == 24 and all("/images/" in p for p in paths)

    def embed(images):  # high-frequency energy separates stripes from smooth gradients
        energy = images.diff(dim=2).abs().mean(dim=(1, 2, 3))
        return torch.stack([10 * energy, torch.ones_like(energy)], 1)

    groups = build_meta_tasks(
        paths, group_size=10, n_groups=2, min_group_size=5, embedder=embed, cache_dir=tmp_path / "cache", progress=False
    )
    assert sorted(len(g) for g in groups) == [10, 10]
    for group in groups:
        assert len({Path(p).parts[-3] for p in group}) == 1  # one family per group
    assert len(list((tmp_path / "cache").glob("meta_tasks_*.json"))) == 1

    def fail(images):
        raise AssertionError("cache not used")

    assert (
        build_meta_tasks(
            paths,
            group_size=10,
            n_groups=2,
            min_group_size=5,
            embedder=fail,
            cache_dir=tmp_path / "cache",
            progress=False,
        )
        == groups
    )
    with pytest.raises(ValueError, match="no images found"):
        list_wild_images([tmp_path / "cache"])


def test_sample_tasks_is_seeded_and_disjoint():
    groups = [list(range(0, 10)), list(range(10, 30)), list(range(30, 36))]
    config = MetaTrainConfig(batch_size=4, tasks_per_step=2)
    steps = sample_tasks(groups, epoch=3, config=config)
    assert [len(s) for s in steps] == [2, 1]
    for support, query in (task for step in steps for task in step):
        assert len(support) == len(query) and not set(support.tolist()) & set(query.tolist())
    again = sample_tasks(groups, epoch=3, config=config)
    assert all(
        torch.equal(a[0], b[0]) for sa, sb in zip(steps, again, strict=True) for a, b in zip(sa, sb, strict=True)
    )


def _tiny_run(tmp_path: Path, epochs: int, out: Path, resume: bool = False, inner_lr: float = 0.1) -> Metaformer:
    """Meta-training on 16 wild images in 4 groups: 2 outer steps of 2 tasks an epoch, lr decayed every epoch."""
    torch.manual_seed(0)
    model = Metaformer(**TINY)
    paths = list_wild_images([tmp_path / "wild"])
    data = WildImages(paths, model, progress=False)
    config = MetaTrainConfig(
        epochs=epochs, batch_size=2, tasks_per_step=2, inner_lr=inner_lr, outer_lr=1e-2, decay_every=1
    )
    groups = [list(range(start, start + 4)) for start in range(0, 16, 4)]
    meta_train(model, data, groups, out, config, resume=resume, progress=False)
    return model


def test_wild_priors_are_cached_and_read_back_instead_of_computed(tmp_path, monkeypatch):
    _write_images(tmp_path / "wild", 6)
    paths = list_wild_images([tmp_path / "wild"])
    model = Metaformer(**TINY)
    first = WildImages(paths, model, progress=False, cache_dir=tmp_path / "out")
    assert len(list((tmp_path / "out").glob("wild_priors_*.safetensors"))) == 1
    assert first.priors.shape == (6, 1, 32, 32) and first.priors.dtype == torch.uint8

    def must_not_run(self, images):
        raise AssertionError("the cached priors should have been read")

    monkeypatch.setattr(Metaformer, "compute_prior", must_not_run)
    again = WildImages(paths, Metaformer(**TINY), progress=False, cache_dir=tmp_path / "out")
    assert torch.equal(again.priors, first.priors)
    assert torch.equal(WildImages(paths, model, progress=False, cache_dir=tmp_path / "out").priors, first.priors)
    injected = Metaformer(**TINY).set_prior(nn.Identity())  # a module, not a file: never read from the cache
    with pytest.raises(AssertionError, match="cached priors"):
        WildImages(paths, injected, progress=False, cache_dir=tmp_path / "out")
    with pytest.raises(AssertionError, match="cached priors"):  # another size is another cache entry
        WildImages(paths, Metaformer(**{**TINY, "image_size": 64}), progress=False, cache_dir=tmp_path / "out")


class KilledError(Exception):
    """Stands for a kill: the process ends there, its objects are never used again."""


def test_meta_train_killed_mid_epoch_and_resumed_is_bit_identical_then_adapts_from_it(tmp_path, monkeypatch):
    """Killed after the first outer step of epoch 2 (taken, never checkpointed), resumed from epoch 1's
    checkpoint by a new model: weights, Adam state and history as if it had never stopped."""
    _write_images(tmp_path / "wild", 16)
    straight = _tiny_run(tmp_path, 3, tmp_path / "straight")
    steps_taken, meta_step = [], maml.meta_step

    def step_then_die(*args) -> float:
        steps_taken.append(meta_step(*args))
        if len(steps_taken) == 3:
            raise KilledError
        return steps_taken[-1]

    with monkeypatch.context() as patch:
        patch.setattr(maml, "meta_step", step_then_die)
        with pytest.raises(KilledError):
            _tiny_run(tmp_path, 3, tmp_path / "resumed")
    assert json.loads((tmp_path / "resumed/progress.json").read_text())["epoch"] == 1
    with pytest.raises(ValueError, match=r"another training \(config.inner_lr: saved 0.1, now 0.2\)"):
        _tiny_run(tmp_path, 3, tmp_path / "resumed", resume=True, inner_lr=0.2)
    resumed = _tiny_run(tmp_path, 3, tmp_path / "resumed", resume=True)
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    a, b = (
        load_tensors(tmp_path / "straight/checkpoint.safetensors"),
        load_tensors(tmp_path / "resumed/checkpoint.safetensors"),
    )
    a, b = ({k: v for k, v in t.items() if not k.startswith("rng.")} for t in (a, b))
    assert a.keys() == b.keys() and any(k.endswith("exp_avg_sq") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    progress = json.loads((tmp_path / "resumed/progress.json").read_text())
    assert [r["epoch"] for r in progress["history"]] == [1, 2, 3]

    universal = tmp_path / "straight/universal.safetensors"
    adapted = Metaformer(**{**TINY, "init": str(universal)}, adapt_epochs=0).fit(_images(2))
    for name, value in load_tensors(universal).items():
        torch.testing.assert_close(adapted.state_dict()[name], value, msg=name)
    with pytest.raises(ValueError, match="meta-trained with"):
        Metaformer(**{**TINY, "configuration": "A", "init": str(universal)}).fit(_images(2))


@pytest.mark.parametrize("shots", [1, 4])
def test_write_universal_then_fit_adapts_from_it_with_k_shots(tmp_path, shots):
    torch.manual_seed(0)
    model = Metaformer(**TINY)
    write_universal(tmp_path / "u.safetensors", model, MetaTrainConfig(), {})
    adapted = Metaformer(**{**TINY, "init": str(tmp_path / "u.safetensors")}, adapt_epochs=2, lr=1e-2, batch_size=4)
    adapted.fit(_images(shots))
    changed = adapted.state_dict()["autoencoder.encoder.conv1.weight"]
    assert not torch.equal(changed, model.state_dict()["autoencoder.encoder.conv1.weight"])
    assert not adapted.training and adapted.predict(_images(2)).scores.isfinite().all()
    shipped = "no such universal checkpoint; shipped ones: universal-feature, universal-cpu, "
    with pytest.raises(FileNotFoundError, match=shipped):
        Metaformer(**{**TINY, "init": str(tmp_path / "missing.safetensors")}).fit(_images(1))


# -- detection -------------------------------------------------------------------------------------------------


def _texture(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """A fine sinusoidal texture with noise in [0, 1], the same pattern in every image."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    pattern = 0.5 + 0.2 * torch.sin(xs / 1.5) * torch.cos(ys / 2.0)
    noise = 0.03 * torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return (pattern.expand(n, 3, size, size) + noise).clamp(0, 1)


def test_default_feature_map_finds_a_bright_square_on_a_texture():
    torch.manual_seed(0)
    settings = {**TINY, "map_type": "feature", "width_multiplier": 1 / 8}
    model = Metaformer(**settings, adapt_epochs=40, lr=1e-2, batch_size=8)
    model.fit(_texture(32, seed=0))
    defective = _texture(8, seed=2)
    defective[:, :, 12:19, 14:21] = 1.0
    prediction = model.predict(torch.cat([_texture(8, seed=1), defective]))
    assert prediction.scores[8:].min() > prediction.scores[:8].max()
    peak = prediction.maps[8:].flatten(1).argmax(1)
    assert ((peak // 32 - 15).abs() <= 5).all() and ((peak % 32 - 17).abs() <= 5).all()


@pytest.mark.parametrize("configuration", ["A", "A+P+T"])
def test_adapted_model_scores_a_bright_square_above_good_images(configuration):
    torch.manual_seed(0)
    model = Metaformer(
        space="pixel",
        configuration=configuration,
        map_type="l2",
        width_multiplier=1 / 8,
        image_size=32,
        init=None,
        prior="center-bias",
        adapt_epochs=40,
        lr=1e-2,
        batch_size=8,
    )
    model.fit(_images(32, seed=0))
    good = _images(8, seed=1)
    defective = _images(8, seed=2)
    defective[:, :, 12:19, 14:21] = 1.0
    prediction = model.predict(torch.cat([good, defective]))
    scores = prediction.scores
    assert scores[8:].min() > scores[:8].max()
    peak = prediction.maps[8:].flatten(1).argmax(1)
    assert ((peak // 32 - 15).abs() <= 5).all() and ((peak % 32 - 17).abs() <= 5).all()


def test_cli_registers_meta_train():
    from metaad.cli.metaformer import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["meta-train", "--wild", "a", "b", "--out", "o", "--configuration", "A+P", "--resume", "--first-order"]
    )
    assert args.wild == ["a", "b"] and args.first_order and args.resume and args.preset == "cpu"
    assert parser.parse_args(["meta-train", "--wild", "a", "--out", "o"]).first_order is None  # the preset's
    assert parser.parse_args(["meta-train", "--wild", "a", "--out", "o", "--second-order"]).first_order is False
    with pytest.raises(SystemExit):
        parser.parse_args(["meta-train", "--wild", "a", "--out", "o", "--first-order", "--second-order"])
    assert callable(args.handler)


def test_shipped_universal_model_loads_offline_and_adapts():
    from metaad.models import create_model
    from metaad.models.metaformer.model import SHIPPED_UNIVERSAL

    if not SHIPPED_UNIVERSAL["universal-cpu"].is_file():
        pytest.skip("the universal model has not been meta-trained and shipped yet")
    model = create_model("metaformer", space="pixel", adapt_epochs=1)  # pixel space adapts its shipped model
    assert model.init == "universal-cpu" and model.image_size == 64
    assert create_model("metaformer", "paper").init is None and create_model("metaformer", "paper").image_size == 256
    assert model.map_type == "feature" and create_model("metaformer", "paper").map_type == "l2"  # the paper's map
    assert create_model("metaformer", "paper").space == "pixel"
    previous = create_model("metaformer", space="pixel").load_universal("universal-cpu-second-order").state_dict()
    model.load_universal("universal-cpu")
    universal = {k: v.clone() for k, v in model.state_dict().items()}
    assert previous.keys() == universal.keys() and any(not torch.equal(previous[k], v) for k, v in universal.items())
    images = torch.rand(4, 3, 64, 64)
    prediction = model.fit(images).predict(images)
    assert prediction.scores.shape == (4,) and torch.isfinite(prediction.maps).all()
    assert any(not torch.equal(universal[k], v) for k, v in model.state_dict().items())  # adaptation moved θ


@pytest.mark.parametrize("side", [1, 2, 3, 8, 9])
def test_fixed_average_pool_equals_the_adaptive_one_of_table_1(side):
    from metaad.models.metaformer.model import _average_pool_to_2x2

    features = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(side))
    torch.testing.assert_close(_average_pool_to_2x2(side)(features), torch.nn.AdaptiveAvgPool2d(2)(features))


def test_a_save_from_before_the_fitted_flag_loads_as_fitted(tmp_path):
    from metaad.models.persistence import load_model, save_model

    model = Metaformer(**TINY, adapt_epochs=1, batch_size=2).fit(_images(4))
    expected = model.predict(_images(2, seed=1))
    save_model(model, tmp_path)
    state = load_tensors(tmp_path / "model.safetensors")
    del state["fitted"]  # what metaad wrote before the flag existed
    save_tensors(tmp_path / "model.safetensors", state)
    again = load_model(tmp_path).predict(_images(2, seed=1))
    assert torch.equal(again.scores, expected.scores)
    with pytest.raises(Exception, match="not fitted"):
        Metaformer(**TINY).predict(_images(2))

    config = json.loads((tmp_path / "model.json").read_text())
    del config["params"]["map_type"]  # saved before the map was a parameter: it was the paper's
    (tmp_path / "model.json").write_text(json.dumps(config))
    assert Metaformer().map_type == "feature" and load_model(tmp_path).map_type == "l2"
    assert torch.equal(load_model(tmp_path).predict(_images(2, seed=1)).scores, expected.scores)
    del config["params"]["space"]  # saved before the feature space existed: pixel space
    (tmp_path / "model.json").write_text(json.dumps(config))
    assert Metaformer().space == "feature" and load_model(tmp_path).space == "pixel"
    assert torch.equal(load_model(tmp_path).predict(_images(2, seed=1)).scores, expected.scores)


@pytest.mark.slow
def test_meta_train_command_at_another_size_then_fit_adapts_from_it(tmp_path, synthetic_root):
    """As the README says: meta-train with --image-size/--width, then fit with the matching --param."""
    import json
    import os
    import subprocess
    import sys

    _write_images(tmp_path / "wild", 40)
    out = tmp_path / "universal"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cli = [sys.executable, "-m", "metaad.cli.main"]
    subprocess.run([*cli, "meta-train", "--space", "pixel", "--wild", str(tmp_path / "wild"), "--out", str(out),
                    "--image-size", "32",
                    "--width", "0.0625", "--epochs", "1", "--group-size", "20", "--prior", "center-bias",
                    "--threads", "1", "--second-order"], check=True, capture_output=True, env=env)
    universal = out / "universal.safetensors"
    assert universal.is_file() and json.loads((out / "progress.json").read_text())["epoch"] == 1
    fit = [*cli, "fit", "--model", "metaformer", "--data", str(synthetic_root), "--category", "weave",
           "--image-size", "32", "--shots", "4", "--calibration-fraction", "0", "--quiet",
           "--param", f"init={json.dumps(str(universal))}", "--param", "prior=center-bias", "--param", "adapt_epochs=1",
           "--param", "space=pixel"]
    mismatch = subprocess.run([*fit, "--out", str(tmp_path / "wrong")], capture_output=True, text=True, env=env)
    assert mismatch.returncode != 0 and "meta-trained with" in mismatch.stderr and "Traceback" not in mismatch.stderr
    subprocess.run([*fit, "--out", str(tmp_path / "run"), "--param", "image_size=32",
                    "--param", "width_multiplier=0.0625"], check=True, capture_output=True, env=env)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["params"]["init"] == str(universal)
    with pytest.raises(ValueError, match="width_multiplier"):
        Metaformer(width_multiplier=0, init=None)


def test_mixed_precision_and_channels_last_keep_the_meta_gradient():
    """The GPU path's numerics (bf16 autocast, float32 loss; channels-last batches) agree with float32."""
    torch.manual_seed(0)
    model = Metaformer(**TINY)
    support = (_images(2, seed=1), model.compute_prior(_images(2, seed=1)))
    query = (_images(2, seed=2), model.compute_prior(_images(2, seed=2)))
    params = dict(model.named_parameters())
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    exact, exact_loss = meta_gradient(metaformer_loss(model), params, buffers, support, query, 0.1, first_order=True)
    mixed, mixed_loss = meta_gradient(metaformer_loss(model, mixed_precision=True), params, buffers, support, query,
                                      0.1, first_order=True)
    assert mixed_loss.dtype == torch.float32 and abs(float(mixed_loss) - float(exact_loss)) < 0.05 * float(exact_loss)
    flat = torch.cat([g.flatten() for g in exact.values()])
    flat_mixed = torch.cat([g.flatten() for g in mixed.values()])
    assert torch.nn.functional.cosine_similarity(flat, flat_mixed, dim=0) > 0.95
    layout = tuple(t.contiguous(memory_format=torch.channels_last) for t in support)
    torch.testing.assert_close(metaformer_loss(model)(params, buffers, layout),
                               metaformer_loss(model)(params, buffers, support))
