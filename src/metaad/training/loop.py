"""The one training loop of every gradient-trained method (``metaad.types.TrainableModel``).

A method defines ``training_loss(batch)`` and ``training_settings()``; this loop owns the rest:

- the training images, decoded once and kept in memory (as uint8 when that is lossless), or a frozen network's
  maps of them (``metaad.components.feature_cache.FrozenFeatures``, for a method that trains on those: each batch
  is then the list of its maps);
- the optimiser (Adam, AdamW or SGD), a step schedule (``lr_milestones`` × ``lr_gamma``) and gradient clipping
  (``gradient_clip_norm``, of the averaged gradient);
- a seeded order per epoch, and the global RNG re-seeded at each epoch's start, so that a method's random
  augmentations repeat too;
- a progress bar with loss and ETA; ``train_log.jsonl`` (one JSON line per epoch) and ``loss_curve.png``;
- a checkpoint after every epoch (``checkpoint.safetensors``, the format of ``metaad.training.checkpoint``:
  weights, optimiser, schedule, RNG states and progress in one atomically written file; ``checkpoint.json``
  is a readable copy), and ``resume=True`` continues from it and ends bit-identical to an uninterrupted run,
  wherever the interruption fell;
- data parallelism under ``torchrun``: each process computes the gradient of its share of every batch and
  the gradients are averaged with an all-reduce (what ``DistributedDataParallel`` does, without wrapping the
  module, so that a method's loss may call any of its parts). gloo on CPUs, NCCL on GPUs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from metaad.components.feature_cache import FrozenFeatures
from metaad.io import atomic_write
from metaad.training.checkpoint import load_training_checkpoint, save_training_checkpoint
from metaad.training.data import TrainImages
from metaad.types import EpochEnd, TrainableModel, TrainData, TrainingSettings, get_config

CHECKPOINT = "checkpoint.safetensors"
PROGRESS = "checkpoint.json"
LOSS_LOG = "train_log.jsonl"
LOSS_CURVE = "loss_curve.png"


def distributed_context() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train_model(
    model: TrainableModel,
    train: TrainData,
    *,
    progress: bool = False,
    workdir: str | Path | None = None,
    resume: bool = False,
    on_epoch_end: EpochEnd | None = None,
) -> TrainableModel:
    """Train ``model`` on defect-free images with its own settings; returns it in eval mode.

    ``workdir`` receives the checkpoint and the loss log (None: nothing is written and ``resume`` is an
    error). ``resume`` continues from ``workdir``'s checkpoint, which must come from the same model config.
    ``on_epoch_end(epoch, model)`` is called after each epoch (1-based), e.g. to validate along one training;
    the model is back in train mode afterwards.
    """
    needed = ("training_loss", "training_settings")  # what the loop calls (not the whole method contract)
    if not isinstance(model, nn.Module) or not all(callable(getattr(model, name, None)) for name in needed):
        raise TypeError(f"{type(model).__name__} is not a trainable metaad model (training_loss, training_settings)")
    settings = model.training_settings()
    if settings.epochs < 0 or settings.batch_size < 1:
        raise ValueError(f"epochs must be >= 0 and batch_size >= 1, got {settings.epochs} and {settings.batch_size}")
    if settings.gradient_clip_norm is not None and not settings.gradient_clip_norm > 0:
        raise ValueError(f"gradient_clip_norm must be positive or None, got {settings.gradient_clip_norm}")
    workdir = Path(workdir) if workdir is not None else None
    if resume and workdir is None:
        raise ValueError("resume=True needs the workdir of the interrupted training")
    rank, world = distributed_context()
    if workdir is not None and rank == 0:
        workdir.mkdir(parents=True, exist_ok=True)
    images = train if isinstance(train, FrozenFeatures) else TrainImages.from_data(train)
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    optimizer = _optimizer(parameters, settings)
    milestones = sorted({max(1, round(f * settings.epochs)) for f in settings.lr_milestones})
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, settings.lr_gamma)
    fingerprint = _fingerprint(model, settings, len(images))
    start, history = 0, []
    parts = {"modules": {"model": model}, "optimizers": {"optimizer": optimizer},  # what a checkpoint holds
             "schedulers": {"schedule": schedule}}
    if resume and workdir is not None and (workdir / CHECKPOINT).is_file():
        start, history = load_training_checkpoint(
            workdir / CHECKPOINT, identity=fingerprint, readable_copy=workdir / PROGRESS, **parts
        )
        if rank == 0:  # lines logged after the checkpoint (a kill in between) are trained again: drop them
            lines = "".join(json.dumps(record) + "\n" for record in history)
            atomic_write(workdir / LOSS_LOG, lambda tmp: tmp.write_text(lines, encoding="utf-8"))
    elif workdir is not None and rank == 0:
        (workdir / LOSS_LOG).unlink(missing_ok=True)
    device = next(iter(parameters)).device
    epochs = range(start, settings.epochs)
    bar = tqdm(epochs, desc=f"{type(model).__name__} training", unit="epoch", disable=not progress or rank != 0,
               initial=start, total=settings.epochs)
    model.train()
    for epoch in bar:
        tic = time.perf_counter()
        # a method's own randomness (augmentation) repeats on resume; each process draws its own
        torch.manual_seed(_epoch_seed(settings.seed, epoch) + rank)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(_epoch_seed(settings.seed, epoch)))
        total, count = 0.0, 0
        for batch_index in _batches(order, settings.batch_size):
            share = batch_index.tensor_split(world)[rank]
            loss = model.training_loss(_to_device(images[share], device)) if len(share) else None
            optimizer.zero_grad(set_to_none=True)
            if loss is not None:
                (loss * len(share) / len(batch_index) * world).backward()
            _average_gradients(parameters, world)
            if settings.gradient_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(parameters, settings.gradient_clip_norm)
            optimizer.step()
            if loss is not None:
                total += float(loss.detach()) * len(share)
                count += len(share)
        schedule.step()
        epoch_loss = _all_mean(total, count, world)
        record = {"epoch": epoch + 1, "loss": epoch_loss, "lr": optimizer.param_groups[0]["lr"],
                  "seconds": round(time.perf_counter() - tic, 3)}
        history.append(record)
        bar.set_postfix(loss=f"{epoch_loss:.4g}")
        if workdir is not None and rank == 0:
            with open(workdir / LOSS_LOG, "a", encoding="utf-8") as log:
                log.write(json.dumps(record) + "\n")
            save_training_checkpoint(workdir / CHECKPOINT, epoch=epoch + 1, identity=fingerprint, history=history,
                                     readable_copy=workdir / PROGRESS, **parts)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, model)
            model.train()
    model.eval()
    if workdir is not None and rank == 0 and history:
        plot_loss_curve(history, workdir / LOSS_CURVE, title=type(model).__name__)
    return model


def _to_device(batch: torch.Tensor | list[torch.Tensor], device: torch.device) -> torch.Tensor | list[torch.Tensor]:
    return [m.to(device) for m in batch] if isinstance(batch, list) else batch.to(device)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**63)


def _batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Batches of the epoch's order; a last batch of one image joins the one before it (batch norm needs two)."""
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def _optimizer(parameters: list[nn.Parameter], settings: TrainingSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "adam":
        return torch.optim.Adam(parameters, settings.lr, betas=settings.betas, weight_decay=settings.weight_decay)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(parameters, settings.lr, betas=settings.betas, weight_decay=settings.weight_decay)
    if settings.optimizer == "sgd":
        return torch.optim.SGD(parameters, settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    raise ValueError(f"optimizer must be 'adam', 'adamw' or 'sgd', got {settings.optimizer!r}")


def _average_gradients(parameters: list[nn.Parameter], world: int) -> None:
    """Average the gradients over the processes (each computed its share of the batch)."""
    if world == 1:
        return
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.flatten() for p in parameters])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in parameters:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def _all_mean(total: float, count: int, world: int) -> float:
    if world > 1:
        pair = torch.tensor([total, float(count)], dtype=torch.float64)
        dist.all_reduce(pair)
        total, count = float(pair[0]), int(pair[1])
    return total / max(count, 1)


def _fingerprint(model: nn.Module, settings: TrainingSettings, n_images: int) -> dict[str, Any]:
    config = json.loads(json.dumps(get_config(model), default=str))
    config.pop("epochs", None)  # a resumed training may be given more epochs
    return {"model": type(model).__name__, "config": config, "n_images": n_images}


def write_loss_log(workdir: str | Path, history: list[dict], title: str = "") -> None:
    """``train_log.jsonl`` (one JSON line a row of ``history``, each with "epoch" and "loss") and
    ``loss_curve.png`` in ``workdir``, both written atomically: for a method whose fit trains outside the loop
    (Metaformer's few-step adaptation in feature space)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(row) + "\n" for row in history)
    atomic_write(workdir / LOSS_LOG, lambda tmp: tmp.write_text(lines, encoding="utf-8"))
    plot_loss_curve(history, workdir / LOSS_CURVE, title=title)


def plot_loss_curve(history: list[dict], path: Path, title: str = "") -> None:
    """The loss per epoch as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.2), dpi=100)
    axis.plot([r["epoch"] for r in history], [r["loss"] for r in history], marker="." if len(history) < 50 else "")
    axis.set_xlabel("epoch")
    axis.set_ylabel("training loss")
    axis.set_title(f"{title} training loss")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)
