"""Training of the instance-prior generator P as a Visual-Effect GAN (Metaformer §3.2 and §4, after [8]).

G's encoder is frozen, so its outputs are computed once: G's skip features of the generator part's images
and D's luminance context of both parts (each also for the mirror images). One epoch is one pass over the
generator part. Per step, with batch B (images randomly mirrored):

1. B generator-part images → G's decoder → R → edited images E(I, R);
2. B effect-part images and masks → real effect photos E(I', M') and mismatched ones E(I', M'') (another
   image's mask: object-shaped colour in the wrong place, labelled fake);
3. D step, hinge loss: real vs edited (weight 1 − ``mismatch_weight``) and mismatched (``mismatch_weight``);
4. G step: −D(edited) + ``area_weight``·area hinge + ``binary_weight``·binarisation (see
   :func:`metaad.models.metaformer.instance_prior.collapse_guard`); then the moving average of G is updated.

Adam (β = 0.5, 0.999) at ``lr`` decayed by 10% every ``lr_step_epochs`` epochs (§4: 2e-4, every 50 epochs,
200 epochs, batch 64). Seeded: each epoch draws its order and mirrors from its own generator, so a run
resumed from the checkpoint written atomically after every epoch (the format of
``metaad.training.checkpoint``) continues exactly as if never stopped.
Each epoch adds a JSON line to ``log.jsonl``, with the MAE / max F of R on the validation part (its masks
are used for this log only). At the end the averaged G is exported (weights + JSON config, command, log).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from metaad.data.saliency import (
    disjoint_split,
    list_saliency_folder,
    load_square_images,
    load_square_masks,
)
from metaad.data.transforms import normalize
from metaad.io import atomic_write
from metaad.metrics.saliency import SaliencyMetrics
from metaad.models.metaformer.instance_prior import (
    Discriminator,
    Generator,
    apply_color_selectivo,
    collapse_guard,
    export_generator,
    luminance_context,
)
from metaad.models.metaformer.saliency_baselines import CenterBiasGaussian
from metaad.training.checkpoint import load_training_checkpoint, save_training_checkpoint

CHECKPOINT = "checkpoint.safetensors"
LOG = "log.jsonl"
EXPORT = "instance_prior.safetensors"


@dataclass
class PriorTrainingConfig:
    """Settings of the Visual-Effect GAN. Defaults = the paper's schedule (§4); ``PRESETS["cpu"]`` fits 2 cores.

    Images are resized to ``image_size`` squares, the side at which G and D train (G's ``working_size``).
    Splits (seeded by ``seed``): ``effect_fraction`` of the images make real effect photos, ``val_fraction``
    only measure progress, the rest train G. ``area_range`` bounds the mean of R per image (collapse guard);
    None takes the 2.5th and 97.5th percentiles of the coloured area of the real effect photos.
    ``ema_decay``: the exported G is an exponential moving average of the trained one (steadier GAN output;
    the decay ramps up as (1 + t) / (10 + t) over the first steps).
    ``bf16`` runs G's decoder and D under bfloat16 autocast (channels-last), 4-5x faster on CPUs with AMX.
    CPU preset: 144-px images, a narrower decoder and D, batch 32, 40 epochs at lr 5e-4 decayed every 10,
    bf16 (see ``benchmarks/RESULTS.md`` for its duration on 2 cores).
    """

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {},
        "cpu": {
            "epochs": 40,
            "batch_size": 32,
            "lr": 5e-4,
            "lr_step_epochs": 10,
            "image_size": 144,
            "decoder_channels": (48, 32, 24, 16, 8),
            "d_channels": (16, 32, 64, 128),
            "bf16": True,
        },
    }

    epochs: int = 200
    batch_size: int = 64
    lr: float = 2e-4
    lr_decay: float = 0.9
    lr_step_epochs: int = 50
    betas: tuple[float, float] = (0.5, 0.999)
    image_size: int = 256
    encoder: str = "tf_efficientnet_lite0"
    encoder_weights: str | None = None
    decoder_channels: tuple[int, ...] = (64, 48, 32, 16, 8)
    d_channels: tuple[int, ...] = (64, 128, 256, 256)
    effect_fraction: float = 0.475
    val_fraction: float = 0.05
    area_range: tuple[float, float] | None = None
    area_weight: float = 1.0
    binary_weight: float = 0.1
    mismatch_weight: float = 0.5
    ema_decay: float = 0.995
    bf16: bool = False
    max_steps_per_epoch: int | None = None
    seed: int = 0

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> PriorTrainingConfig:
        """The preset's settings with ``overrides`` (None values are ignored)."""
        if preset not in cls.PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(cls.PRESETS)}")
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown training setting(s) {unknown}")
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls(**{**cls.PRESETS[preset], **given})

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def check(self) -> None:
        if self.image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16 (encoder stride), got {self.image_size}")
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError(f"need epochs >= 1 and batch_size >= 2, got {self.epochs}, {self.batch_size}")
        if not 0 <= self.mismatch_weight <= 1:
            raise ValueError(f"mismatch_weight must lie in [0, 1], got {self.mismatch_weight}")


@dataclass
class _Data:
    effect_images: torch.Tensor  # (N, 3, S, S) uint8
    effect_masks: torch.Tensor  # (N, 1, S, S) uint8
    generator_images: torch.Tensor  # (N, 3, S, S) uint8; their masks are never read
    val_images: torch.Tensor
    val_masks: torch.Tensor
    fingerprint: str
    sizes: dict[str, int]
    area_range: tuple[float, float]  # 2.5th / 97.5th percentile of the effect photos' coloured area


def _load_data(folders: Sequence[str | Path], config: PriorTrainingConfig, progress: bool) -> _Data:
    samples = [s for folder in folders for s in list_saliency_folder(folder, require_masks=True)]
    if len(samples) < 3 * config.batch_size:
        raise ValueError(f"{len(samples)} images in {[str(f) for f in folders]}: too few for batch {config.batch_size}")
    fractions = [config.effect_fraction, config.val_fraction, 1 - config.effect_fraction - config.val_fraction]
    effect, val, gen = disjoint_split(samples, fractions, config.seed)
    names = "\n".join(f"{s.image.parent.parent.name}/{s.stem}" for s in effect + val + gen)
    size = config.image_size
    effect_masks = load_square_masks([s.mask for s in effect], size, progress)
    return _Data(
        effect_images=load_square_images([s.image for s in effect], size, progress),
        effect_masks=effect_masks,
        generator_images=load_square_images([s.image for s in gen], size, progress),
        val_images=load_square_images([s.image for s in val], size, progress),
        val_masks=load_square_masks([s.mask for s in val], size, progress),
        fingerprint=hashlib.sha256(names.encode()).hexdigest()[:16],
        sizes={"effect": len(effect), "generator": len(gen), "val": len(val)},
        area_range=coloured_area_range(effect_masks),
    )


def coloured_area_range(masks: torch.Tensor, quantiles: tuple[float, float] = (0.025, 0.975)) -> tuple[float, float]:
    """Percentiles of the coloured fraction of effect photos (uint8 masks), kept within [0.01, 0.9]."""
    area = masks.float().div(255).flatten(1).mean(1)
    low, high = torch.quantile(area, torch.tensor(quantiles)).tolist()
    low = min(max(low, 0.01), 0.5)
    return round(low, 4), round(min(max(high, low + 0.05), 0.9), 4)


@torch.no_grad()
def _encode_all(
    generator: Generator,
    images: torch.Tensor,
    device: str,
    progress: bool,
    mirrors: Sequence[bool] = (False, True),
    context: bool = False,
) -> list[list[torch.Tensor]]:
    """Per mirror state, frozen-encoder features (float16, CPU) of uint8 ``images``: G's four skip levels,
    or with ``context`` D's luminance context (:func:`~metaad.models.metaformer.instance_prior.luminance_context`)."""
    out: list[list[torch.Tensor]] = []
    desc = "discriminator context" if context else "encoder features"
    for mirrored in mirrors:
        chunks: list[list[torch.Tensor]] = []
        for start in tqdm(range(0, len(images), 32), desc=desc, disable=not progress, leave=False):
            batch = images[start : start + 32].to(device).float().div(255)
            batch = _channels_last(batch.flip(-1) if mirrored else batch)
            levels = luminance_context(generator, batch) if context else generator.encode(normalize(batch))
            chunks.append([f.half().contiguous().cpu() for f in levels])
        out.append([torch.cat(level) for level in zip(*chunks, strict=True)])
    return out


@dataclass
class _Banks:
    """Precomputed frozen-encoder outputs, indexed [mirrored][level] → (N, C, h, w) float16."""

    features: list[list[torch.Tensor]]  # G's skips, generator part
    context: list[list[torch.Tensor]]  # D's luminance context, generator part
    effect_context: list[list[torch.Tensor]]  # D's luminance context, effect part
    val_features: list[torch.Tensor]  # G's skips, validation part (not mirrored)


def _build_banks(generator: Generator, data: _Data, device: str, progress: bool) -> _Banks:
    return _Banks(
        features=_encode_all(generator, data.generator_images, device, progress),
        context=_encode_all(generator, data.generator_images, device, progress, context=True),
        effect_context=_encode_all(generator, data.effect_images, device, progress, context=True),
        val_features=_encode_all(generator, data.val_images, device, progress, mirrors=(False,))[0],
    )


def _pick(bank: list[list[torch.Tensor]], index: torch.Tensor, mirrored: torch.Tensor, device: str) -> list:
    """Per level, the rows ``index`` of the mirrored bank where ``mirrored`` else of the plain one."""
    pick = mirrored[:, None, None, None]
    return [
        _channels_last(torch.where(pick, flipped[index], plain[index]).to(device))
        for plain, flipped in zip(*bank, strict=True)
    ]


@torch.no_grad()
def _evaluate_decoder(
    generator: Generator, features: list[torch.Tensor], data: _Data, device: str, bf16: bool
) -> dict[str, float]:
    """MAE / max F of R on the validation part, from its precomputed encoder features."""
    was_training = generator.training
    generator.eval()
    metrics = SaliencyMetrics()
    for start in range(0, len(data.val_images), 32):
        images = _channels_last(data.val_images[start : start + 32].to(device).float().div(255))
        skips = [_channels_last(f[start : start + 32].to(device)) for f in features]
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            logits = generator.decode(skips, normalize(images))
        metrics.update(torch.sigmoid(logits.float()).cpu(), (data.val_masks[start : start + 32] >= 128).float())
    generator.train(was_training)
    return metrics.compute()


@torch.no_grad()
def _update_average(average: Generator, generator: Generator, decay: float) -> None:
    """average ← decay·average + (1 − decay)·generator for the decoder's weights; buffers copied."""
    for mean, current in zip(average.parameters(), generator.parameters(), strict=True):
        if current.requires_grad:
            mean.lerp_(current, 1 - decay)
    for mean, current in zip(average.buffers(), generator.buffers(), strict=True):
        mean.copy_(current)


def _mirror(batch: torch.Tensor, mirrored: torch.Tensor, device: str) -> torch.Tensor:
    """uint8 (B, C, H, W) → float in [0, 1] on ``device``, mirrored where ``mirrored``."""
    batch = torch.where(mirrored[:, None, None, None], batch.flip(-1), batch)
    return _channels_last(batch.to(device).float().div(255))


def _decode(
    generator: Generator, bank: list, index: torch.Tensor, mirrored: torch.Tensor, images: torch.Tensor, autocast
) -> torch.Tensor:
    """G's logits (float32) from precomputed skips."""
    skips = _pick(bank, index, mirrored, images.device.type)
    with autocast:
        return generator.decode(skips, normalize(images)).float()


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def _read_log(path: Path, last_epoch: int) -> list[dict]:
    """The log's records up to ``last_epoch`` (a run killed after logging an epoch it did not checkpoint)."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in records if r.get("epoch", 0) <= last_epoch]


def _write_log(path: Path, records: list[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@torch.no_grad()
def evaluate_prior(
    model: torch.nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    device: str = "cpu",
    batch_size: int = 32,
) -> dict:
    """MAE and max F of ``model``'s R on uint8 images (N, 3, S, S) against uint8 masks (N, 1, S, S)."""
    metrics = SaliencyMetrics()
    for start in range(0, len(images), batch_size):
        batch = normalize(images[start : start + batch_size].float().div(255)).to(device)
        response = model(batch).float().cpu()
        metrics.update(response, (masks[start : start + batch_size] >= 128).float())
    return metrics.compute()


def train_instance_prior(
    data: Sequence[str | Path],
    out_dir: str | Path,
    config: PriorTrainingConfig | None = None,
    resume: bool = False,
    export: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
    command: str | None = None,
) -> Generator:
    """Train G on saliency folders ``data`` (each ``images/`` + ``masks/``), checkpointing in ``out_dir``.

    ``resume`` continues from ``out_dir/checkpoint.safetensors`` (a fresh start if there is none); without it
    an existing checkpoint is an error. The generator is exported to ``out_dir/instance_prior.safetensors``
    and, if given, to ``export``. Returns the trained generator (eval mode, on the CPU).
    """
    config = config or PriorTrainingConfig()
    config.check()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint, log_path = out / CHECKPOINT, out / LOG
    if checkpoint.exists() and not resume:
        raise FileExistsError(f"{checkpoint}: a checkpoint exists; pass --resume (resume=True) or another out_dir")
    dataset = _load_data(data, config, progress)

    torch.manual_seed(config.seed)
    generator = Generator(config.encoder, config.decoder_channels, config.image_size)
    if config.encoder_weights != "none":  # "none": random encoder, for tests only
        generator.load_encoder_weights(config.encoder_weights)
    discriminator = Discriminator(config.d_channels, tuple(generator.skip_channels[2:]))
    average = copy.deepcopy(generator).requires_grad_(False)
    average.to(device, memory_format=torch.channels_last)
    generator.to(device, memory_format=torch.channels_last)
    discriminator.to(device, memory_format=torch.channels_last)
    decoder_parameters = [p for p in generator.parameters() if p.requires_grad]
    optimizers = {
        "optim_g": torch.optim.Adam(decoder_parameters, config.lr, config.betas),
        "optim_d": torch.optim.Adam(discriminator.parameters(), config.lr, config.betas),
    }
    models = {"generator": generator, "discriminator": discriminator, "average": average}
    config_json = config.to_json()
    # what a resumed run must share with the checkpoint: the settings (but the epoch count) and the data split
    identity = {"config": {k: v for k, v in config_json.items() if k != "epochs"}, "data": dataset.fingerprint}
    start_epoch = 0
    if resume and checkpoint.exists():
        start_epoch, _ = load_training_checkpoint(checkpoint, identity=identity, modules=models, optimizers=optimizers)
    records = _read_log(log_path, start_epoch)
    if start_epoch == 0:
        baseline = evaluate_prior(CenterBiasGaussian(), dataset.val_images, dataset.val_masks)
        records = [
            {
                "event": "start",
                "splits": dataset.sizes,
                "area_range": config.area_range or dataset.area_range,
                "config": config_json,
                "val_center_bias": baseline,
            }
        ]
    else:
        records.append({"event": "resume", "from_epoch": start_epoch})
    _write_log(log_path, records)
    banks = _build_banks(generator, dataset, device, progress) if start_epoch < config.epochs else None

    started = time.perf_counter()
    for epoch in range(start_epoch + 1, config.epochs + 1):
        lr = config.lr * config.lr_decay ** ((epoch - 1) // config.lr_step_epochs)
        for optimizer in optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = lr
        record = _train_epoch(
            epoch, generator, average, discriminator, optimizers, dataset, banks, config, device, progress
        )
        record.update(lr=lr, val=_evaluate_decoder(average, banks.val_features, dataset, device, config.bf16))
        records.append(record)
        _write_log(log_path, records)  # log first: a kill before the checkpoint is trimmed on resume
        save_training_checkpoint(checkpoint, epoch=epoch, identity=identity, modules=models, optimizers=optimizers)

    generator = average.eval().cpu()
    provenance = {
        "command": command,
        "data": [str(d) for d in data],
        "splits": dataset.sizes,
        "split_fingerprint": dataset.fingerprint,
        "config": config_json,
        "log": [r for r in records if "epoch" in r],
        "seconds_last_session": round(time.perf_counter() - started, 1),
    }
    export_generator(generator, out / EXPORT, provenance)
    if export is not None:
        export_generator(generator, export, provenance)
    return generator


def _train_epoch(
    epoch: int,
    generator: Generator,
    average: Generator,
    discriminator: Discriminator,
    optimizers: dict[str, torch.optim.Optimizer],
    data: _Data,
    banks: _Banks,
    config: PriorTrainingConfig,
    device: str,
    progress: bool,
) -> dict:
    rng = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    n_gen, n_effect, batch = len(data.generator_images), len(data.effect_images), config.batch_size
    gen_order = torch.randperm(n_gen, generator=rng)
    effect_order = torch.randperm(n_effect, generator=rng)
    steps = max(1, n_gen // batch)
    if config.max_steps_per_epoch is not None:
        steps = min(steps, config.max_steps_per_epoch)
    generator.train()
    discriminator.train()
    sums: dict[str, float] = {}
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=config.bf16)
    begin = time.perf_counter()
    bar = tqdm(range(steps), desc=f"epoch {epoch}/{config.epochs}", disable=not progress, leave=False)
    for step in bar:
        gen_index = gen_order[(step * batch + torch.arange(batch)) % n_gen]
        effect_index = effect_order[(step * batch + torch.arange(batch)) % n_effect]
        gen_mirrored = torch.rand(batch, generator=rng) < 0.5
        effect_mirrored = torch.rand(batch, generator=rng) < 0.5
        images = _mirror(data.generator_images[gen_index], gen_mirrored, device)
        response = torch.sigmoid(_decode(generator, banks.features, gen_index, gen_mirrored, images, autocast))
        edited = apply_color_selectivo(images, response)
        context = _pick(banks.context, gen_index, gen_mirrored, device)

        effect_rgb = _mirror(data.effect_images[effect_index], effect_mirrored, device)
        effect_mask = _mirror(data.effect_masks[effect_index], effect_mirrored, device)
        effect_context = _pick(banks.effect_context, effect_index, effect_mirrored, device)
        real = apply_color_selectivo(effect_rgb, effect_mask)
        mismatched = apply_color_selectivo(effect_rgb, effect_mask.roll(1, dims=0))  # gray(E) unchanged

        # D step: real effect photos vs edited (and mismatched) ones, hinge loss.
        discriminator.requires_grad_(True)
        all_context = [torch.cat([e, g, e]) for e, g in zip(effect_context, context, strict=True)]
        with autocast:
            d_out = discriminator(_channels_last(torch.cat([real, edited.detach(), mismatched])), all_context)
        d_real, d_fake, d_mismatch = d_out.float().split(batch)
        loss_d = (
            F.relu(1 - d_real).mean()
            + (1 - config.mismatch_weight) * F.relu(1 + d_fake).mean()
            + config.mismatch_weight * F.relu(1 + d_mismatch).mean()
        )
        optimizers["optim_d"].zero_grad(set_to_none=True)
        loss_d.backward()
        optimizers["optim_d"].step()

        # G step: fool D, kept off the degenerate maps by the collapse guard.
        discriminator.requires_grad_(False)
        with autocast:
            adversarial = -discriminator(_channels_last(edited), context).float().mean()
        guard = collapse_guard(response, config.area_range or data.area_range)
        loss_g = adversarial + config.area_weight * guard["area"] + config.binary_weight * guard["binary"]
        optimizers["optim_g"].zero_grad(set_to_none=True)
        loss_g.backward()
        optimizers["optim_g"].step()
        done = (epoch - 1) * steps + step  # EMA warm-up: early averages follow the generator closely
        _update_average(average, generator, min(config.ema_decay, (1 + done) / (10 + done)))

        area = response.detach().flatten(1).mean(1)
        values = {
            "loss_d": loss_d.item(),
            "loss_g_adv": adversarial.item(),
            "guard_area": guard["area"].item(),
            "guard_binary": guard["binary"].item(),
            "d_real": d_real.mean().item(),
            "d_fake": d_fake.mean().item(),
            "d_mismatch": d_mismatch.mean().item(),
            "mean_r": area.mean().item(),
            "degenerate_fraction": ((area < 0.01) | (area > 0.95)).float().mean().item(),
        }
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value
        bar.set_postfix(d=f"{values['loss_d']:.2f}", g=f"{values['loss_g_adv']:.2f}", r=f"{values['mean_r']:.2f}")
    record: dict[str, Any] = {"epoch": epoch, "steps": steps}
    record.update({key: round(total / steps, 5) for key, total in sums.items()})
    record["seconds"] = round(time.perf_counter() - begin, 1)
    return record
