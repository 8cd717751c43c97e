"""The shared training loop: seeded order, checkpoint + resume (bit-identical), loss log, data parallelism; the one
checkpoint format of every training loop."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from metaad.io import load_tensors, save_checkpoint_file, save_tensors
from metaad.training import train_model
from metaad.training.checkpoint import load_training_checkpoint, save_training_checkpoint
from metaad.training.data import TrainImages
from metaad.types import AnomalyPrediction, TrainableModel, TrainingSettings


class TinyReconstructor(nn.Module):
    """A minimal trainable method: a 2-layer conv autoencoder with a noise augmentation (global RNG)."""

    PRESETS: ClassVar[dict[str, dict]] = {"paper": {}, "cpu": {}, "tiny": {}}
    SAVED_WITHOUT: ClassVar[dict[str, object]] = {}

    def __init__(
        self, epochs: int = 4, batch_size: int = 4, lr: float = 1e-2, noise: float = 0.05, seed: int = 0,
        noise_source: str = "torch",
    ) -> None:
        super().__init__()
        self.epochs, self.batch_size, self.lr, self.noise, self.seed = epochs, batch_size, lr, noise, seed
        self.noise_source = noise_source  # "torch", or "numpy": numpy's global RNG, which the loop never seeds
        self.image_size = None
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))

    def training_settings(self) -> TrainingSettings:
        return TrainingSettings(self.epochs, self.batch_size, self.lr, lr_milestones=(0.5,), lr_gamma=0.5,
                                seed=self.seed)

    def training_loss(self, images: torch.Tensor) -> torch.Tensor:
        if self.noise_source == "numpy":
            noise = torch.from_numpy(np.random.standard_normal(images.shape)).float()
        else:
            noise = torch.randn_like(images)
        noisy = images + self.noise * noise  # randomness that must repeat on resume
        return (self.net(noisy) - images).pow(2).mean()

    def fit(self, train, *, progress=False, workdir=None, resume=False, on_epoch_end=None):
        return train_model(self, train, progress=progress, workdir=workdir, resume=resume, on_epoch_end=on_epoch_end)

    def export_forward(self, images):
        maps = (self.net(images) - images).pow(2).mean(1)
        return maps.flatten(1).amax(1), maps

    def fit_summary(self):
        return {}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyPrediction:
        maps = (self.net(images) - images).pow(2).mean(1)
        return AnomalyPrediction(maps.flatten(1).amax(1), maps)


def _images(n: int = 10, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_the_contract_is_recognised():
    assert isinstance(TinyReconstructor(), TrainableModel)


def test_training_reduces_the_loss_and_writes_log_and_curve(tmp_path):
    model = TinyReconstructor(epochs=6).fit(_images(), workdir=tmp_path)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert log[-1]["loss"] < log[0]["loss"]
    assert log[2]["lr"] == pytest.approx(5e-3)  # ×0.5 after half of the epochs
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    assert not model.training


def test_on_epoch_end_sees_every_epoch_of_its_fit_only_with_the_model_in_train_mode():
    seen = []

    def look(epoch: int, model: nn.Module) -> None:
        seen.append((epoch, model.training))
        model.eval()  # e.g. to validate: the loop puts it back in train mode

    TinyReconstructor(epochs=3).fit(_images(), on_epoch_end=look)
    TinyReconstructor(epochs=2).fit(_images())
    assert seen == [(1, True), (2, True), (3, True)]


class KilledError(Exception):
    """Stands for a kill: the process ends after the epoch's checkpoint, its objects are never used again."""


def _kill_after(last: int) -> Callable[[int, nn.Module], None]:
    def hook(epoch: int, model: nn.Module) -> None:
        if epoch == last:
            raise KilledError

    return hook


def _trained_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's weights and optimiser state (its RNG states differ with what the test process drew)."""
    return {k: v for k, v in load_tensors(checkpoint).items() if not k.startswith("rng.")}


@pytest.mark.parametrize("noise_source", ["torch", "numpy"])
def test_killed_and_resumed_training_is_bit_identical_to_an_uninterrupted_one(tmp_path, noise_source):
    """Killed after epoch 2 of 4 (where the learning rate halves), resumed as a new process would: other RNG
    states, a new model. Weights, Adam state, schedule and log end as if it had never stopped; with numpy's
    global RNG (never seeded by the loop) only because the checkpoint holds its state."""
    images = _images()
    np.random.seed(0)
    whole = TinyReconstructor(noise_source=noise_source).fit(images, workdir=tmp_path / "whole")
    np.random.seed(0)
    with pytest.raises(KilledError):
        TinyReconstructor(noise_source=noise_source).fit(images, workdir=tmp_path / "killed",
                                                         on_epoch_end=_kill_after(2))
    np.random.seed(1)
    torch.manual_seed(1)
    resumed = TinyReconstructor(noise_source=noise_source).fit(images, workdir=tmp_path / "killed", resume=True)
    for name, value in _state(whole).items():
        assert torch.equal(resumed.state_dict()[name], value), name
    expected = _trained_tensors(tmp_path / "whole" / "checkpoint.safetensors")
    got = _trained_tensors(tmp_path / "killed" / "checkpoint.safetensors")
    assert expected.keys() == got.keys() and any(k.endswith("exp_avg_sq") for k in got)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    log = [json.loads(line) for line in (tmp_path / "killed" / "train_log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in log] == [1e-2, 5e-3, 5e-3, 5e-3]


def test_a_kill_between_checkpoint_writes_neither_repeats_nor_skips_an_epoch(tmp_path):
    """The CI failure this guards: weights of epoch 3 beside a progress record of epoch 2 trained epoch 3 twice."""
    images = _images()
    whole = TinyReconstructor().fit(images, workdir=tmp_path / "whole")
    kill_after = _kill_after
    killed = tmp_path / "killed"
    with pytest.raises(KilledError):
        train_model(TinyReconstructor(), images, workdir=killed, on_epoch_end=kill_after(2))
    progress_at_two = (killed / "checkpoint.json").read_text()
    log_at_two = (killed / "train_log.jsonl").read_text()
    with pytest.raises(KilledError):
        train_model(TinyReconstructor(), images, workdir=killed, resume=True, on_epoch_end=kill_after(3))
    # the kill lands after epoch 3's weights and log line, before its readable progress copy
    (killed / "checkpoint.json").write_text(progress_at_two)
    resumed = TinyReconstructor().fit(images, workdir=killed, resume=True)
    for name, value in _state(whole).items():
        assert torch.equal(resumed.state_dict()[name], value), name
    # a log line written before a kill whose checkpoint never landed is not kept twice
    logged = tmp_path / "logged"
    with pytest.raises(KilledError):
        train_model(TinyReconstructor(), images, workdir=logged, on_epoch_end=kill_after(2))
    with open(logged / "train_log.jsonl", "a", encoding="utf-8") as log:
        log.write(log_at_two.splitlines()[-1].replace('"epoch": 2', '"epoch": 3') + "\n")
    TinyReconstructor().fit(images, workdir=logged, resume=True)
    epochs = [json.loads(line)["epoch"] for line in (logged / "train_log.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]


def test_checkpoints_of_the_loop_before_the_common_format_resume(tmp_path):
    """Two older layouts: the loop's own record (no RNG states), and before it the record in the JSON only."""
    images = _images()
    whole = TinyReconstructor().fit(images, workdir=tmp_path / "whole")
    with pytest.raises(KilledError):
        TinyReconstructor().fit(images, workdir=tmp_path / "old", on_epoch_end=_kill_after(2))
    checkpoint, copy = tmp_path / "old" / "checkpoint.safetensors", tmp_path / "old" / "checkpoint.json"
    new = json.loads(copy.read_text())
    old = {"epoch": 2, "fingerprint": new["identity"], "param_groups": new["optimizers"]["optimizer"],
           "schedule": new["schedulers"]["schedule"], "history": new["history"]}
    save_checkpoint_file(checkpoint, _trained_tensors(checkpoint), old)
    copy.write_text(json.dumps(old))
    resumed = TinyReconstructor().fit(images, workdir=tmp_path / "old", resume=True)
    for name, value in _state(whole).items():
        assert torch.equal(resumed.state_dict()[name], value), name

    with pytest.raises(KilledError):
        TinyReconstructor().fit(images, workdir=tmp_path / "older", on_epoch_end=_kill_after(2))
    checkpoint, copy = tmp_path / "older" / "checkpoint.safetensors", tmp_path / "older" / "checkpoint.json"
    save_tensors(checkpoint, _trained_tensors(checkpoint), metadata={"epoch": "2"})
    copy.write_text(json.dumps(old))
    resumed = TinyReconstructor().fit(images, workdir=tmp_path / "older", resume=True)
    for name, value in _state(whole).items():
        assert torch.equal(resumed.state_dict()[name], value), name
    save_tensors(checkpoint, _trained_tensors(checkpoint), metadata={"epoch": "3"})  # the JSON says 4: torn
    with pytest.raises(ValueError, match="between the two writes"):
        TinyReconstructor().fit(images, workdir=tmp_path / "older", resume=True)


def test_one_checkpoint_restores_every_part_and_rng_and_refuses_another_run_or_format(tmp_path):
    """The pair that the loop, MAML and the GAN training share, on two modules and two optimisers."""

    def parts(seed: int) -> dict:
        torch.manual_seed(seed)
        net, head = nn.Linear(3, 4), nn.Linear(4, 1)
        optimizers = {"optim_net": torch.optim.Adam(net.parameters(), 1e-2),
                      "optim_head": torch.optim.SGD(head.parameters(), 1e-1, momentum=0.9)}
        schedule = torch.optim.lr_scheduler.StepLR(optimizers["optim_net"], 1, 0.5)
        return {"modules": {"net": net, "head": head}, "optimizers": optimizers, "schedulers": {"schedule": schedule}}

    trained = parts(0)
    for _ in range(2):
        loss = trained["modules"]["head"](trained["modules"]["net"](torch.randn(5, 3))).square().mean()
        loss.backward()
        for optimizer in trained["optimizers"].values():
            optimizer.step()
        trained["schedulers"]["schedule"].step()
    identity = {"config": {"lr": 1e-2, "sizes": (3, 4)}, "data": "abc"}
    path = tmp_path / "checkpoint.safetensors"
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    save_training_checkpoint(path, epoch=2, identity=identity, history=[{"epoch": 1}, {"epoch": 2}], **trained)
    draws = torch.rand(3), np.random.rand(3), random.random()
    restored = parts(1)
    assert load_training_checkpoint(path, identity=identity, **restored) == (2, [{"epoch": 1}, {"epoch": 2}])
    assert torch.equal(torch.rand(3), draws[0]) and np.array_equal(np.random.rand(3), draws[1])
    assert random.random() == draws[2]
    for name, module in trained["modules"].items():
        for key, value in module.state_dict().items():
            assert torch.equal(restored["modules"][name].state_dict()[key], value), key
    for name, optimizer in trained["optimizers"].items():
        saved, loaded = optimizer.state_dict(), restored["optimizers"][name].state_dict()
        assert saved["param_groups"] == loaded["param_groups"]
        pairs = [(loaded["state"][i][k], v) for i, state in saved["state"].items() for k, v in state.items()]
        assert pairs and all(torch.equal(a, b) for a, b in pairs)
    assert restored["schedulers"]["schedule"].state_dict() == trained["schedulers"]["schedule"].state_dict()

    with pytest.raises(ValueError, match=r"another training \(config.lr: saved 0.01, now 0.1\)"):
        load_training_checkpoint(path, identity={**identity, "config": {"lr": 0.1, "sizes": [3, 4]}}, **parts(1))
    save_checkpoint_file(path, load_tensors(path), {"epoch": 2, "config": {}, "history": []})  # MAML's before
    with pytest.raises(ValueError, match=r"older metaad .*start afresh"):
        load_training_checkpoint(path, identity=identity, **parts(1))
    save_tensors(path, load_tensors(path), metadata={"format": "metaad-instance-prior-checkpoint", "epoch": "2"})
    with pytest.raises(ValueError, match=r"older metaad.*start afresh"):  # the GAN training's before
        load_training_checkpoint(path, identity=identity, **parts(1))


def test_resume_refuses_a_checkpoint_of_another_training(tmp_path):
    TinyReconstructor(epochs=1).fit(_images(), workdir=tmp_path)
    with pytest.raises(ValueError, match="another training"):
        TinyReconstructor(lr=0.5).fit(_images(), workdir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="needs the workdir"):
        TinyReconstructor().fit(_images(), resume=True)


class _Samples(torch.utils.data.Dataset):
    """A map-style data set of metaad samples."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": 0}


def test_a_dataloader_is_taken_as_it_yields_unless_it_reorders():
    images = _images(7)
    expected = TrainImages(images).images
    in_order = DataLoader(_Samples(images), batch_size=3)
    assert torch.equal(TrainImages.from_data(in_order).images, expected)
    flipped = DataLoader(_Samples(images), batch_size=3,
                         collate_fn=lambda samples: torch.stack([s["image"].flip(-1) for s in samples]))
    assert torch.equal(TrainImages.from_data(flipped).images, expected.flip(-1))  # its own collation is kept
    for reordering in (DataLoader(_Samples(images), batch_size=3, shuffle=True),
                       DataLoader(_Samples(images), batch_size=3, drop_last=True)):
        assert torch.equal(TrainImages.from_data(reordering).images, expected)  # the data set, in index order


def test_training_images_must_be_in_unit_range():
    with pytest.raises(ValueError, match=r"RGB in \[0, 1\]"):
        TrainImages(torch.randn(2, 3, 8, 8) * 3)
    stored = TrainImages(torch.randint(0, 256, (2, 3, 8, 8)).float() / 255)
    assert stored.images.dtype == torch.uint8  # 8-bit photographs are kept losslessly in a quarter the memory


def _distributed_worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = TinyReconstructor(epochs=2, noise=0.0).fit(_images(12))
        save_tensors(f"{out}.{rank}", model.state_dict())
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_train_the_same_weights_as_one(tmp_path):
    single = TinyReconstructor(epochs=2, noise=0.0).fit(_images(12)).state_dict()
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "state")), nprocs=2, join=True)
    for rank in range(2):
        state = load_tensors(tmp_path / f"state.{rank}")
        for name, value in single.items():
            # the same steps up to the order of floating-point sums
            torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert all(torch.equal(load_tensors(tmp_path / "state.0")[k], load_tensors(tmp_path / "state.1")[k])
               for k in single)  # the processes stay in lockstep


@pytest.mark.slow
def test_cli_fit_killed_mid_training_and_resumed_gives_identical_weights(tmp_path):
    """The bar: a 200-image category, a fit killed mid-training (SIGKILL), resumed with --resume."""
    good = tmp_path / "good"
    good.mkdir()
    rng = np.random.default_rng(0)
    for i in range(200):
        Image.fromarray(rng.integers(90, 170, (32, 32, 3), dtype=np.uint8)).save(good / f"{i:03d}.png")
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(bad / f"{i:03d}.png")
    args = ["--model", "reverse_distillation", "--preset", "tiny", "--param", "epochs=6", "--param", "image_size=32",
            "--format", "folder",
            "--data", str(good), "--abnormal-dir", str(bad), "--image-size", "32", "--threads", "1",
            "--calibration-fraction", "0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "metaad.cli.main", "fit", *args]
    subprocess.run([*command, "--out", str(tmp_path / "whole")], check=True, capture_output=True, env=env)
    killed = subprocess.Popen([*command, "--out", str(tmp_path / "killed")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "killed" / "training" / "train_log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not log.is_file() or len(log.read_text().splitlines()) < 2):
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert log.is_file() and 2 <= len(log.read_text().splitlines()) < 6, "the kill must land mid-training"
    subprocess.run([*command, "--out", str(tmp_path / "killed"), "--resume"], check=True, capture_output=True,
                   env=env)
    whole = load_tensors(Path(tmp_path / "whole" / "model" / "model.safetensors"))
    resumed = load_tensors(Path(tmp_path / "killed" / "model" / "model.safetensors"))
    assert whole.keys() == resumed.keys()
    for name, value in whole.items():
        assert torch.equal(resumed[name], value) or (value.isnan().all() and resumed[name].isnan().all()), name


def test_device_of_reads_parameters_then_buffers():
    from metaad.types import device_of

    assert device_of(nn.Linear(2, 2)) == torch.device("cpu")
    bank_only = nn.Module()
    bank_only.register_buffer("bank", torch.empty(0, 3, device="meta"))
    assert device_of(bank_only) == torch.device("meta")  # a method with no parameters: its buffers say
    assert device_of(nn.Identity()) == torch.device("cpu")


class ClippedLinear(nn.Module):
    """One weight vector, a loss with a huge gradient, SGD at lr 1: a step moves the weights by the gradient."""

    def __init__(self, clip: float | None) -> None:
        super().__init__()
        self.clip = clip
        self.weight = nn.Parameter(torch.zeros(8))

    def training_settings(self) -> TrainingSettings:
        return TrainingSettings(epochs=1, batch_size=4, lr=1.0, optimizer="sgd", momentum=0.0,
                                gradient_clip_norm=self.clip)

    def training_loss(self, images: torch.Tensor) -> torch.Tensor:
        return 1000 * (self.weight - images.mean()).pow(2).sum()


@pytest.mark.parametrize("clip", [None, 0.1])
def test_gradient_clipping_bounds_each_step(clip):
    model = ClippedLinear(clip)
    train_model(model, torch.full((4, 3, 8, 8), 0.5))  # one batch: one step
    moved = float(model.weight.detach().norm())
    if clip is None:
        assert moved > 100
    else:
        assert moved == pytest.approx(clip, rel=1e-4)


def test_a_non_positive_clipping_norm_is_an_error():
    with pytest.raises(ValueError, match="gradient_clip_norm"):
        train_model(ClippedLinear(0.0), torch.full((4, 3, 8, 8), 0.5))
