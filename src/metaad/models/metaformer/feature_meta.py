"""Meta-training of Metaformer in feature space: first-order MAML (or Reptile) on cached wild-image features.

The meta-tasks are §3.1.1's (``tasks.py``: fine groups of wild images). The frozen backbone's grid of every
wild image (and P's R on it) is computed once and kept (``metaad.components.feature_cache``, float16, in the
output folder, so a resumed run reads it). A task draws a support set of k images (k from ``shots``) and a
query set from one group; the features are standardised on the support set, as adaptation standardises them
on the training images; the inner loop is ``feature_space.inner_loop`` with the model's own ``adapt_steps``,
``lr``, ``adapt_optimizer`` and ``batch_size`` (so meta-training optimises the init for exactly the
adaptation that ``fit`` runs); the outer step (Adam at ``outer_lr``) follows the query loss's gradient at the
adapted weights (first-order MAML) or the adapted weights themselves (Reptile). Every epoch is checkpointed
atomically and a run resumes from it.
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from metaad.components.feature_cache import FrozenFeatures, frozen_part_key, weights_digest
from metaad.data.transforms import pil_to_tensor
from metaad.io import save_tensors
from metaad.models.metaformer.feature_space import channel_statistics, inner_loop
from metaad.models.metaformer.model import UNIVERSAL_FORMAT, FrozenParts, Metaformer, architecture_args
from metaad.training.checkpoint import load_training_checkpoint, save_training_checkpoint
from metaad.training.data import TrainImages
from metaad.types import device_of

ALGORITHMS = ("fomaml", "reptile")
CHECKPOINT, PROGRESS, UNIVERSAL = "checkpoint.safetensors", "progress.json", "universal.safetensors"
INNER_LOOP_ARGS = ("adapt_steps", "lr", "adapt_optimizer", "batch_size", "prior_weight")  # = the adaptation


@dataclass
class FeatureMetaConfig:
    """The outer loop; the inner loop is the model's adaptation (``adapt_steps``, ``lr``, ``adapt_optimizer``,
    ``batch_size``). An epoch visits every fine group ``tasks_per_group`` times."""

    epochs: int = 20
    tasks_per_step: int = 4  # meta-batch
    tasks_per_group: int = 4
    shots: tuple[int, ...] = (1, 2, 4, 8)  # support sizes, drawn at random per task
    query: int = 8
    outer_lr: float = 1e-3
    algorithm: str = "fomaml"
    seed: int = 0

    PRESETS: ClassVar[dict[str, dict]] = {
        "cpu": {"epochs": 10, "tasks_per_group": 2},  # ~60 outer steps an epoch on ~6,000 wild images
        "tiny": {"epochs": 1, "tasks_per_group": 1, "query": 2},
    }

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if not self.shots or min(self.shots) < 1:
            raise ValueError(f"shots must list support sizes of at least 1, got {self.shots}")
        self.shots = tuple(self.shots)


@dataclass
class Task:
    support: list[int]
    query: list[int] = field(default_factory=list)


def sample_tasks(groups: Sequence[Sequence[int]], epoch: int, config: FeatureMetaConfig) -> list[list[Task]]:
    """The outer steps of ``epoch``: tasks (support and query drawn disjointly from one group), seeded by
    (seed, epoch), in meta-batches of ``tasks_per_step``."""
    rng = random.Random(config.seed * 100_003 + epoch)
    tasks = []
    for _ in range(config.tasks_per_group):
        for group in rng.sample(range(len(groups)), len(groups)):
            members = list(groups[group])
            if len(members) < 2:
                continue
            k = min(rng.choice(config.shots), len(members) - 1)
            chosen = rng.sample(members, min(len(members), k + config.query))
            tasks.append(Task(chosen[:k], chosen[k:]))
    rng.shuffle(tasks)
    return [tasks[i : i + config.tasks_per_step] for i in range(0, len(tasks), config.tasks_per_step)]


def task_update(model: Metaformer, learner: Metaformer, features: FrozenFeatures, task: Task,
                config: FeatureMetaConfig, generator: torch.Generator) -> tuple[dict[str, torch.Tensor], float]:
    """One task: ``learner`` starts at ``model``'s weights, standardises on the support set, runs the inner
    loop, and returns the outer direction (a gradient per parameter) and the query loss after adaptation."""
    device = device_of(model)
    for part in ("autoencoder", "transformer"):
        if getattr(model, part) is not None:
            getattr(learner, part).load_state_dict(getattr(model, part).state_dict())
    support = [m.to(device) for m in features[torch.tensor(task.support)]]
    mean, std = channel_statistics(support[0])
    learner.feature_mean.copy_(mean)
    learner.feature_std.copy_(std)
    inner_loop(learner, lambda index: learner.grid_loss([m[index] for m in support]), len(task.support),
               model.adapt_steps, model.lr, model.batch_size, model.adapt_optimizer, generator)
    query = [m.to(device) for m in features[torch.tensor(task.query)]]
    learner.zero_grad(set_to_none=True)
    loss = learner.grid_loss(query)
    value = float(loss.detach())
    if config.algorithm == "fomaml":
        loss.backward()
        return {n: p.grad.detach().clone() for n, p in learner.named_parameters() if p.grad is not None}, value
    mine = dict(model.named_parameters())
    return {n: (mine[n] - p).detach() for n, p in learner.named_parameters()}, value


def wild_features(model: Metaformer, paths: Sequence[str], out: Path, progress: bool) -> FrozenFeatures:
    """The feature maps of every wild image at the model's size, float16, kept under ``out/features``."""
    images = []
    for path in tqdm(paths, desc="loading wild images", unit="img", disable=not progress):
        with Image.open(path) as image:
            images.append((pil_to_tensor(image, model.image_size) * 255).round().to(torch.uint8))
    train = TrainImages(torch.stack(images))
    model.backbone.load_weights()
    model.preprocess.measure(train.batches())
    key = frozen_part_key(model.backbone, model.preprocess)
    if model.configuration != "A":
        key["prior"] = weights_digest(model.prior_module)
    return FrozenFeatures(model, model.feature_maps, train, key, device=device_of(model), directory=out / "features",
                          float16=True, progress=progress)


def write_universal(path: Path, model: Metaformer, config: FeatureMetaConfig, extra: dict) -> None:
    """The universal checkpoint ``Metaformer(init=path)`` adapts from: A's (and T's) weights, JSON metadata."""
    metadata = {
        "format": UNIVERSAL_FORMAT,
        "model": json.dumps({name: getattr(model, name) for name in architecture_args("feature")}),
        "adaptation": json.dumps({n: getattr(model, n) for n in INNER_LOOP_ARGS}),
        "meta_train": json.dumps({**asdict(config), **extra}),
    }
    weights = {name: value for name, value in model.state_dict().items()  # the backbone is read at fit
               if name != "fitted" and not name.startswith("backbone.")}
    save_tensors(path, weights, metadata=metadata)


def meta_train_features(
    model: Metaformer, features: FrozenFeatures, groups: Sequence[Sequence[int]], out: str | Path,
    config: FeatureMetaConfig, resume: bool = False, progress: bool = True,
) -> Path:
    """The outer loop for ``config.epochs`` epochs over ``groups`` (indices into ``features``); returns the
    universal checkpoint's path."""
    out = Path(out)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.outer_lr)
    identity = {"model": json.loads(json.dumps({n: getattr(model, n) for n in architecture_args("feature")})),
                "inner_loop": {n: getattr(model, n) for n in INNER_LOOP_ARGS},  # a resume may not change it
                "config": {k: v for k, v in json.loads(json.dumps(asdict(config))).items() if k != "epochs"}}
    parts = {"modules": {"model": model}, "optimizers": {"optimizer": optimizer}}
    start, history = 0, []
    if resume and (out / CHECKPOINT).is_file():
        start, history = load_training_checkpoint(out / CHECKPOINT, identity=identity, **parts)
    frozen, backbone = model.frozen, model.backbone  # P and the backbone are shared, never copied
    model.frozen, model.backbone = FrozenParts(), nn.Identity()
    learner = copy.deepcopy(model)
    model.frozen, model.backbone = frozen, backbone
    learner.frozen, learner.backbone = frozen, backbone
    for epoch in range(start, config.epochs):
        began = time.perf_counter()
        generator = torch.Generator().manual_seed(config.seed * 7919 + epoch)
        losses = []
        steps = sample_tasks(groups, epoch, config)
        bar = tqdm(steps, desc=f"meta-train epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False)
        for step in bar:
            total: dict[str, torch.Tensor] = {}
            for task in step:
                direction, loss = task_update(model, learner, features, task, config, generator)
                for name, value in direction.items():
                    total[name] = total[name] + value if name in total else value
                losses.append(loss)
            for name, p in model.named_parameters():
                p.grad = total[name] / len(step) if name in total else None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        history.append({"epoch": epoch + 1, "query_loss": sum(losses) / max(1, len(losses)),
                        "tasks": len(losses), "seconds": round(time.perf_counter() - began, 2)})
        save_training_checkpoint(out / CHECKPOINT, epoch=epoch + 1, identity=identity, history=history,
                                 readable_copy=out / PROGRESS, **parts)
        if progress:
            tqdm.write(f"epoch {epoch + 1}/{config.epochs}: query loss after adaptation "
                       f"{history[-1]['query_loss']:.4f}, {history[-1]['seconds']:.1f} s")
    path = out / UNIVERSAL
    write_universal(path, model, config, {"prior": model.prior, "epochs_done": config.epochs})
    return path


def run_feature_meta_training(
    wild: Sequence[str], out: str, preset: str = "cpu", configuration: str | None = None, resume: bool = False,
    epochs: int | None = None, algorithm: str | None = None, model_params: dict | None = None,
    prior: str | None = None, backbone: str = "tf_efficientnet_lite0", backbone_weights: str | None = None,
    group_size: int = 200, seed: int = 0, device: str | None = None, progress: bool = True,
) -> Path:
    """The ``metaad meta-train --space feature`` pipeline: meta-tasks (§3.1.1) → cached wild features → the
    outer loop. ``model_params`` are Metaformer arguments (its architecture and its adaptation)."""
    from metaad.models.metaformer.tasks import build_meta_tasks, list_wild_images

    if preset not in FeatureMetaConfig.PRESETS:
        raise ValueError(f"unknown meta-train preset {preset!r} for the feature space; expected one of "
                         f"{sorted(FeatureMetaConfig.PRESETS)}")
    overrides = {"seed": seed, **({"epochs": epochs} if epochs is not None else {}),
                 **({"algorithm": algorithm} if algorithm is not None else {})}
    config = FeatureMetaConfig(**{**FeatureMetaConfig.PRESETS[preset], **overrides})
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = list_wild_images(wild)
    groups_paths = build_meta_tasks(paths, group_size=group_size, seed=seed, backbone=backbone,
                                    weights=backbone_weights, cache_dir=out_dir, progress=progress)
    used = sorted({p for g in groups_paths for p in g})
    position = {p: i for i, p in enumerate(used)}
    groups = [[position[p] for p in g] for g in groups_paths]
    model = Metaformer(space="feature", configuration=configuration, prior=prior, init=None, seed=seed,
                       **(model_params or {}))
    if device is not None:
        model.to(device)
    features = wild_features(model, used, out_dir, progress)
    if progress:
        tqdm.write(f"meta-training on {len(used)} wild images in {len(groups)} fine groups, {config.epochs} "
                   f"epochs, {config.algorithm}, configuration {model.configuration!r}, inner loop "
                   f"{model.adapt_steps} × {model.adapt_optimizer} at lr {model.lr}")
    model.train()
    return meta_train_features(model, features, groups, out_dir, config, resume=resume, progress=progress)
