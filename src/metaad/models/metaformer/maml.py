"""Unsupervised MAML meta-training of Metaformer (Algorithm 1, eqs. 3-5), data-parallel with torch.distributed.

Inner step (eq. 3): θ'ᵢ = θ − α∇L(Tᵢ) on a support batch of group Gᵢ. Outer step (eq. 5): Adam on
∇_θ Σᵢ L(M_θ'ᵢ, query batch of Gᵢ), second order through ``torch.func.grad`` or first order (∇ taken at θ'ᵢ).
BatchNorm uses batch statistics throughout meta-training (running statistics are recalibrated once on wild
images before the universal model is written). Tasks of one outer step are split across ranks and their
gradients all-reduced, so W processes take the same step as one. Every epoch is checkpointed atomically
(``checkpoint.safetensors``, the format of ``metaad.training.checkpoint``; ``progress.json`` is a readable
copy) and a run resumes from it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from PIL import Image
from torch import nn
from torch.func import functional_call, grad, grad_and_value
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from metaad.data.transforms import pil_to_tensor
from metaad.io import load_tensors, save_tensors
from metaad.models.metaformer.instance_prior import SHIPPED_WEIGHTS
from metaad.models.metaformer.model import ARCHITECTURE_ARGS, UNIVERSAL_FORMAT, Metaformer, reconstruction_loss
from metaad.training.checkpoint import load_training_checkpoint, save_training_checkpoint
from metaad.training.loop import distributed_context
from metaad.types import device_of

Tensors = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, ...]
LossFn = Callable[[Tensors, Tensors, Batch], torch.Tensor]

CHECKPOINT = "checkpoint.safetensors"
PROGRESS = "progress.json"
UNIVERSAL = "universal.safetensors"
SPEED_OPTIONS = ("mixed_precision", "channels_last")  # MetaTrainConfig's fields that change speed, not the task


@dataclass
class MetaTrainConfig:
    """Meta-training hyperparameters; the "paper" preset is §4 (α = β = 1e-4, Adam, lr ×0.9 every 20
    epochs, 100 epochs, batch 64). An epoch visits every fine group once as a task."""

    epochs: int = 100
    batch_size: int = 64  # images in a task's support batch, and again in its query batch
    tasks_per_step: int = 4  # meta-batch of tasks per outer step
    inner_lr: float = 1e-4  # α
    outer_lr: float = 1e-4  # β
    inner_steps: int = 1
    lr_decay: float = 0.9  # "decaying 10% every 20 epochs"
    decay_every: int = 20
    first_order: bool = False
    seed: int = 0
    mixed_precision: bool = False  # forward passes under bf16 autocast, the loss in float32 (a GPU's speed)
    channels_last: bool = False  # the model and its batches in channels-last memory layout (a GPU's speed)

    PRESETS: ClassVar[dict[str, dict]] = {
        "paper": {},
        # 64 px, width 1/8 (Metaformer.PRESETS["cpu"]): 1.2-2.2 s an outer step of 4 second-order A+P+T tasks
        # on 2 shared cores; ~4,000 wild images make 20 groups = 5 steps an epoch, 200 epochs ≈ 20-40 min.
        # Larger α, β than §4 so that one SGD inner step and 1,000 outer steps move a from-scratch model.
        "cpu": {"epochs": 200, "batch_size": 16, "inner_lr": 1e-2, "outer_lr": 1e-3, "decay_every": 40},
    }


# -- the algorithm ---------------------------------------------------------------------------------------------


def adapt(
    loss_fn: LossFn,
    params: Tensors,
    buffers: Tensors,
    support: Batch,
    inner_lr: float,
    inner_steps: int = 1,
) -> Tensors:
    """Eq. (3), ``inner_steps`` times: θ' = θ − α∇_θ L(θ; support). Differentiable when called under
    ``torch.func.grad`` (the second-order path)."""
    for _ in range(inner_steps):
        gradients = grad(loss_fn)(params, buffers, support)
        params = {name: value - inner_lr * gradients[name] for name, value in params.items()}
    return params


def meta_gradient(
    loss_fn: LossFn,
    params: Tensors,
    buffers: Tensors,
    support: Batch,
    query: Batch,
    inner_lr: float,
    inner_steps: int = 1,
    first_order: bool = False,
) -> tuple[Tensors, torch.Tensor]:
    """∇_θ L(θ'; query) with θ' = adapt(θ; support), and the query loss. First order drops the
    second-derivative term: the gradient is taken at θ' and applied to θ (FOMAML)."""
    params = {name: value.detach() for name, value in params.items()}
    if first_order:
        adapted = {
            name: value.detach()
            for name, value in adapt(loss_fn, params, buffers, support, inner_lr, inner_steps).items()
        }
        return grad_and_value(loss_fn)(adapted, buffers, query)

    def query_loss(theta: Tensors, state: Tensors) -> torch.Tensor:
        return loss_fn(adapt(loss_fn, theta, state, support, inner_lr, inner_steps), state, query)

    with sdpa_kernel([SDPBackend.MATH]):  # fused attention kernels have no double backward
        return grad_and_value(query_loss)(params, buffers)


def metaformer_loss(model: Metaformer, mixed_precision: bool = False) -> LossFn:
    """Eq. (7) of ``model`` called functionally; a batch is (images,) or (images, prior maps).
    ``mixed_precision``: the forward pass under bfloat16 autocast, the loss computed in float32."""

    def loss_fn(params: Tensors, buffers: Tensors, batch: Batch) -> torch.Tensor:
        with torch.autocast(batch[0].device.type, torch.bfloat16, enabled=mixed_precision):
            output = functional_call(model, (params, buffers), batch)
        return reconstruction_loss(output.float(), batch[0], model.ssim_weight)

    return loss_fn


def meta_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    tasks: Sequence[tuple[Batch, Batch] | None],
    config: MetaTrainConfig,
) -> float:
    """One outer step (eq. 5) over a meta-batch of (support, query) tasks; returns the mean query loss.

    ``tasks`` holds every task of the step; under torch.distributed each rank computes the tasks at its
    positions (rank, rank + W, ...; the others may be None) and the summed gradients are all-reduced.
    """
    rank, world = distributed_context()
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    loss_sum = torch.zeros((), device=next(iter(params.values())).device)
    for task in tasks[rank::world]:
        if task is None:
            raise ValueError(f"rank {rank} was given no data for one of its tasks")
        support, query = task
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}  # batch stats only
        gradients, loss = meta_gradient(
            loss_fn, params, buffers, support, query, config.inner_lr, config.inner_steps, config.first_order
        )
        for name in total:
            total[name] += gradients[name]
        loss_sum += loss.detach()
    flat = torch.cat([g.flatten() for g in total.values()] + [loss_sum.view(1)])
    if world > 1:
        dist.all_reduce(flat)
    flat /= len(tasks)
    offset = 0
    for p in params.values():
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(flat[-1])


def sample_tasks(
    groups: Sequence[Sequence[int]], epoch: int, config: MetaTrainConfig
) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Index pairs (support, query) for every outer step of ``epoch``, the same on every rank.

    Each group is one task per epoch, in a shuffled order; support and query are disjoint random draws of
    up to ``batch_size`` images (half the group each when it is smaller). Seeded by (seed, epoch).
    """
    generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    tasks = []
    for g in torch.randperm(len(groups), generator=generator).tolist():
        members = torch.as_tensor(groups[g], dtype=torch.long)
        order = members[torch.randperm(len(members), generator=generator)]
        half = min(config.batch_size, len(members) // 2)
        tasks.append((order[:half], order[half : 2 * half]))
    return [tasks[i : i + config.tasks_per_step] for i in range(0, len(tasks), config.tasks_per_step)]


# -- the training run ------------------------------------------------------------------------------------------


class WildImages:
    """Wild images held in memory as uint8 at the model's size, with their instance priors R (uint8).

    With ``cache_dir``, the priors (the slow part: P on every image) are kept there, keyed by the images,
    the size and P's weights file, so a resumed or repeated run reads them instead of computing them again.
    """

    def __init__(
        self,
        paths: Sequence[str],
        model: Metaformer,
        batch_size: int = 32,
        progress: bool = True,
        cache_dir: str | Path | None = None,
    ) -> None:
        size = model.image_size
        images = []
        for path in tqdm(paths, desc="loading wild images", unit="img", disable=not progress):
            with Image.open(path) as image:
                images.append((pil_to_tensor(image, size) * 255).round().to(torch.uint8))
        self.images = torch.stack(images)
        self.priors = None
        if model.configuration == "A":
            return
        cache = _prior_cache(paths, model, cache_dir)
        if cache is not None and cache.is_file():
            priors = load_tensors(cache).get("priors")
            if priors is not None and priors.shape == (len(paths), 1, size, size):
                self.priors = priors
                return
        device = device_of(model)
        priors = []
        for chunk in tqdm(self.images.split(batch_size), desc="instance priors", disable=not progress):
            prior = model.compute_prior(chunk.to(device).float() / 255)
            priors.append((prior * 255).round().to(torch.uint8).cpu())
        self.priors = torch.cat(priors)
        if cache is not None:
            save_tensors(cache, {"priors": self.priors})

    def to(self, device: torch.device | str) -> WildImages:
        """Keep the decoded images (and priors) on ``device``: a GPU then reads no batch from host memory."""
        self.images = self.images.to(device)
        self.priors = None if self.priors is None else self.priors.to(device)
        return self

    def batch(self, index: torch.Tensor, device: torch.device, channels_last: bool = False) -> Batch:
        layout = torch.channels_last if channels_last else torch.contiguous_format
        images = (self.images[index.to(self.images.device)].to(device).float() / 255).contiguous(memory_format=layout)
        if self.priors is None:
            return (images,)
        priors = self.priors[index.to(self.priors.device)].to(device).float() / 255
        return images, priors.contiguous(memory_format=layout)


def _prior_cache(paths: Sequence[str], model: Metaformer, cache_dir: str | Path | None) -> Path | None:
    """Where ``WildImages`` keeps the priors of ``paths``; None without ``cache_dir`` or for an injected P."""
    from metaad.models.metaformer.tasks import cache_key, file_identity

    if cache_dir is None or model.prior_injected:  # no file describes a module that set_prior gave
        return None
    weights = model.prior if model.prior is not None else str(SHIPPED_WEIGHTS)
    settings = {"image_size": model.image_size, "prior": file_identity(weights), "version": 1}
    return Path(cache_dir) / f"wild_priors_{cache_key(paths, settings)[:16]}.safetensors"


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: WildImages, batch_size: int, batches: int = 16) -> None:
    """Running BatchNorm statistics as the plain average over ``batches`` wild batches at the final θ."""
    device = device_of(model)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data.images), generator=generator)
    for index in order.split(batch_size)[:batches]:
        model(*data.batch(index, device))
    for m in norms:
        m.momentum = 0.1
    model.eval()


def write_universal(path: Path, model: Metaformer, config: MetaTrainConfig, extra: dict[str, Any]) -> None:
    """The universal checkpoint that ``Metaformer(init=path)`` adapts from (state_dict + JSON metadata)."""
    metadata = {
        "format": UNIVERSAL_FORMAT,
        "model": json.dumps({name: getattr(model, name) for name in ARCHITECTURE_ARGS}),
        "meta_train": json.dumps({**asdict(config), **extra}),
    }
    weights = {name: value for name, value in model.state_dict().items() if name != "fitted"}  # not adapted yet
    save_tensors(path, weights, metadata=metadata)


def meta_train(
    model: Metaformer,
    data: WildImages,
    groups: Sequence[Sequence[int]],
    out: str | Path,
    config: MetaTrainConfig,
    resume: bool = False,
    progress: bool = True,
) -> Path:
    """Algorithm 1, lines 3-7, for ``config.epochs`` epochs; returns the universal checkpoint's path.

    ``groups`` index ``data``. Rank 0 writes ``out``; all ranks must pass the same arguments.
    """
    out = Path(out)
    rank, world = distributed_context()
    device = device_of(model)
    loss_fn = metaformer_loss(model, config.mixed_precision)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.outer_lr)
    identity = {  # a resumed run may be given more epochs, and may change how fast the same steps run
        "model": {n: getattr(model, n) for n in ARCHITECTURE_ARGS},
        "config": {k: v for k, v in asdict(config).items() if k not in ("epochs", *SPEED_OPTIONS)},
    }
    parts = {"modules": {"model": model}, "optimizers": {"optimizer": optimizer}}
    start, history = 0, []
    if resume and (out / CHECKPOINT).is_file():
        start, history = load_training_checkpoint(out / CHECKPOINT, identity=identity, **parts)
    model.train()
    for epoch in range(start, config.epochs):
        lr = config.outer_lr * config.lr_decay ** (epoch // config.decay_every)
        for group in optimizer.param_groups:
            group["lr"] = lr
        began = time.perf_counter()
        steps = sample_tasks(groups, epoch, config)
        losses = []
        bar = tqdm(
            steps, desc=f"meta-train epoch {epoch + 1}/{config.epochs}", disable=not progress or rank != 0, leave=False
        )
        for step in bar:
            tasks = [
                (data.batch(s, device, config.channels_last), data.batch(q, device, config.channels_last))
                if i % world == rank else None
                for i, (s, q) in enumerate(step)
            ]
            losses.append(meta_step(model, optimizer, loss_fn, tasks, config))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        history.append(
            {
                "epoch": epoch + 1,
                "loss": sum(losses) / len(losses),
                "lr": lr,
                "seconds": round(time.perf_counter() - began, 2),
            }
        )
        if rank == 0:
            save_training_checkpoint(out / CHECKPOINT, epoch=epoch + 1, identity=identity, history=history,
                                     readable_copy=out / PROGRESS, **parts)
            if progress:
                tqdm.write(
                    f"epoch {epoch + 1}/{config.epochs}: query loss {history[-1]['loss']:.5f}, "
                    f"lr {lr:.2e}, {history[-1]['seconds']:.1f} s"
                )
        if world > 1:
            dist.barrier()
    path = out / UNIVERSAL
    if rank == 0:
        recalibrate_batchnorm(model, data, config.batch_size)
        write_universal(path, model, config, {"world_size": world, "prior": model.prior})
    if world > 1:
        dist.barrier()
    return path


def run_meta_training(
    wild: Sequence[str],
    out: str,
    preset: str = "cpu",
    configuration: str = "A+P+T",
    resume: bool = False,
    first_order: bool | None = None,
    epochs: int | None = None,
    image_size: int | None = None,
    width_multiplier: float | None = None,
    prior: str | None = None,
    backbone: str = "tf_efficientnet_lite0",
    backbone_weights: str | None = None,
    group_size: int = 200,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
    mixed_precision: bool = False,
    channels_last: bool = False,
) -> Path:
    """The ``metaad meta-train`` pipeline: meta-tasks (§3.1.1) → wild images and priors → Algorithm 1.

    ``image_size`` and ``width_multiplier`` override the preset's architecture, ``first_order`` and ``epochs``
    its schedule (None: the preset's); ``mixed_precision`` and ``channels_last`` are the config's. On a GPU
    the decoded wild images are kept on it.
    Launched with torchrun, it joins the process group (gloo on CPU, NCCL on GPUs) and splits tasks by rank.
    """
    from metaad.models.metaformer.tasks import build_meta_tasks, list_wild_images

    if preset not in MetaTrainConfig.PRESETS:
        raise ValueError(f"unknown meta-train preset {preset!r}; expected one of {sorted(MetaTrainConfig.PRESETS)}")
    overrides = {"seed": seed, "mixed_precision": mixed_precision, "channels_last": channels_last,
                 **({"epochs": epochs} if epochs is not None else {})}
    if first_order is not None:
        overrides["first_order"] = first_order
    config = MetaTrainConfig(**{**MetaTrainConfig.PRESETS[preset], **overrides})
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, _ = distributed_context()
    if device is None:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    out_dir = Path(out)
    paths = list_wild_images(wild)
    groups_paths = build_meta_tasks(
        paths,
        group_size=group_size,
        seed=seed,
        backbone=backbone,
        weights=backbone_weights,
        cache_dir=out_dir,
        progress=progress and rank == 0,
    )
    used = sorted({p for g in groups_paths for p in g})
    position = {p: i for i, p in enumerate(used)}
    groups = [[position[p] for p in g] for g in groups_paths]
    architecture = {k: v for k, v in Metaformer.PRESETS[preset].items() if k in ARCHITECTURE_ARGS}
    if image_size is not None:
        architecture["image_size"] = image_size
    if width_multiplier is not None:
        architecture["width_multiplier"] = width_multiplier
    torch.manual_seed(seed)  # identical initial θ on every rank
    model = Metaformer(
        space="pixel",
        configuration=configuration,
        prior=prior,
        init=None,  # meta-training starts from scratch
        seed=seed,
        **architecture,
    )
    model.to(device)
    data = WildImages(used, model, progress=progress and rank == 0, cache_dir=out_dir if rank == 0 else None)
    if torch.device(device).type == "cuda":
        data.to(device)
    if rank == 0 and progress:
        tqdm.write(
            f"meta-training on {len(used)} wild images in {len(groups)} fine groups, "
            f"{config.epochs} epochs, preset {preset!r}, configuration {configuration!r}"
        )
    return meta_train(model, data, groups, out_dir, config, resume=resume, progress=progress)
