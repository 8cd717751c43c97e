"""Training of the instance-prior generator P as a Visual-Effect GAN (Metaformer §3.2 and §4, after [8]).

G's encoder is frozen, so its features are computed once for the generator part's images (and their
mirror images); one epoch is one pass over those images. Per step, with batch B:

1. B generator-part images (randomly mirrored) → G's decoder → R → edited E(I, R);
2. B effect-part images and masks → real effect images E(I', M') and mismatched ones E(I', M'')
   (another image's mask: object-shaped colour in the wrong place, labelled fake);
3. D step (hinge loss) on random ``crop_size`` crops + flips: real vs edited and mismatched;
4. G step: −D(edited crops) + ``area_weight``·area hinge + ``binary_weight``·binarisation (see
   :func:`metaad.models.instance_prior.collapse_guard`).

Adam (β = 0.5, 0.999) at ``lr`` decayed by 10% every ``lr_step_epochs`` epochs (§4: 2e-4, every 50 epochs,
200 epochs, batch 64). Seeded: each epoch draws its order, mirrors and crops from its own generator, so a
run resumed from the checkpoint written atomically after every epoch continues exactly as if never stopped.
Each epoch adds a JSON line to ``log.jsonl``, with the MAE / max F of R on the validation part (masks used
for logging only). At the end the generator is exported (weights + JSON config with the command and log).
"""

from __future__ import annotations

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
from safetensors import safe_open
from tqdm.auto import tqdm

from metaad.data.saliency import (
    disjoint_split,
    list_saliency_folder,
    load_square_images,
    load_square_masks,
)
from metaad.data.transforms import normalize
from metaad.engine.io import atomic_write, save_tensors
from metaad.metrics.saliency import SaliencyMetrics
from metaad.models.instance_prior import (
    Discriminator,
    Generator,
    apply_color_selectivo,
    collapse_guard,
    export_generator,
)
from metaad.models.saliency_baselines import CenterBiasGaussian

CHECKPOINT = "checkpoint.safetensors"
LOG = "log.jsonl"
EXPORT = "instance_prior.safetensors"
CHECKPOINT_FORMAT = "metaad-instance-prior-checkpoint"
_RESUMABLE_CHANGES = ("epochs",)  # fields that may differ between a checkpoint and the run resuming it


@dataclass
class PriorTrainingConfig:
    """Settings of the Visual-Effect GAN. Defaults = the paper's schedule (§4); ``PRESETS["cpu"]`` fits 2 cores.

    Images are resized to ``image_size`` squares, the side G is trained and run at (its ``working_size``);
    D sees random ``crop_size`` crops. Splits (seeded by ``seed``): ``effect_fraction`` of the images make real
    effect photos, ``val_fraction`` only measure progress, the rest train G.
    ``bf16`` runs G's decoder and D under bfloat16 autocast (channels-last), 4-5x faster on CPUs with AMX.
    CPU preset: 144-px images, 128-px crops for D, a narrower decoder and D, batch 32, 40 epochs with the lr
    decayed every 10 epochs, bf16 (see ``benchmarks/RESULTS.md`` for its duration on 2 cores).
    """

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {},
        "cpu": {
            "epochs": 40,
            "batch_size": 32,
            "lr_step_epochs": 10,
            "image_size": 144,
            "crop_size": 128,
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
    crop_size: int = 224
    encoder: str = "tf_efficientnet_lite0"
    encoder_weights: str | None = None
    decoder_channels: tuple[int, ...] = (64, 48, 32, 16, 8)
    d_channels: tuple[int, ...] = (64, 128, 256, 256)
    effect_fraction: float = 0.475
    val_fraction: float = 0.05
    area_range: tuple[float, float] = (0.05, 0.6)
    area_weight: float = 1.0
    binary_weight: float = 0.1
    mismatch_weight: float = 0.5
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
        if self.crop_size > self.image_size:
            raise ValueError(f"crop_size {self.crop_size} exceeds image_size {self.image_size}")
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


def _load_data(folders: Sequence[str | Path], config: PriorTrainingConfig, progress: bool) -> _Data:
    samples = [s for folder in folders for s in list_saliency_folder(folder, require_masks=True)]
    if len(samples) < 3 * config.batch_size:
        raise ValueError(f"{len(samples)} images in {[str(f) for f in folders]}: too few for batch {config.batch_size}")
    fractions = [config.effect_fraction, config.val_fraction, 1 - config.effect_fraction - config.val_fraction]
    effect, val, gen = disjoint_split(samples, fractions, config.seed)
    names = "\n".join(f"{s.image.parent.parent.name}/{s.stem}" for s in effect + val + gen)
    size = config.image_size
    return _Data(
        effect_images=load_square_images([s.image for s in effect], size, progress),
        effect_masks=load_square_masks([s.mask for s in effect], size, progress),
        generator_images=load_square_images([s.image for s in gen], size, progress),
        val_images=load_square_images([s.image for s in val], size, progress),
        val_masks=load_square_masks([s.mask for s in val], size, progress),
        fingerprint=hashlib.sha256(names.encode()).hexdigest()[:16],
        sizes={"effect": len(effect), "generator": len(gen), "val": len(val)},
    )


@torch.no_grad()
def _encode_all(
    generator: Generator, images: torch.Tensor, device: str, progress: bool, mirrors: Sequence[bool] = (False, True)
) -> list[list[torch.Tensor]]:
    """Per mirror state, the frozen encoder's features (float16, CPU) of uint8 ``images``."""
    out: list[list[torch.Tensor]] = []
    for mirrored in mirrors:
        chunks: list[list[torch.Tensor]] = []
        for start in tqdm(range(0, len(images), 32), desc="encoder features", disable=not progress, leave=False):
            batch = images[start : start + 32].to(device).float().div(255)
            batch = _channels_last(batch.flip(-1) if mirrored else batch)
            chunks.append([f.half().contiguous().cpu() for f in generator.encode(normalize(batch))])
        out.append([torch.cat(level) for level in zip(*chunks, strict=True)])
    return out


@torch.no_grad()
def _evaluate_decoder(
    generator: Generator, features: list[torch.Tensor], data: _Data, device: str, bf16: bool
) -> dict[str, float]:
    """MAE / max F of R on the validation part, from its precomputed encoder features."""
    generator.eval()
    metrics = SaliencyMetrics()
    for start in range(0, len(data.val_images), 32):
        images = _channels_last(data.val_images[start : start + 32].to(device).float().div(255))
        skips = [_channels_last(f[start : start + 32].to(device)) for f in features]
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            logits = generator.decode(skips, normalize(images))
        metrics.update(torch.sigmoid(logits.float()).cpu(), (data.val_masks[start : start + 32] >= 128).float())
    generator.train()
    return metrics.compute()


def _crops(batch: torch.Tensor, crop: int, rng: torch.Generator) -> torch.Tensor:
    """Random ``crop``-px crops and horizontal flips, one per image, of a (B, C, S, S) batch (differentiable)."""
    size = batch.shape[-1]
    ys = torch.randint(0, size - crop + 1, (len(batch),), generator=rng).tolist()
    xs = torch.randint(0, size - crop + 1, (len(batch),), generator=rng).tolist()
    flips = (torch.rand(len(batch), generator=rng) < 0.5).to(batch.device)
    out = torch.stack([b[:, y : y + crop, x : x + crop] for b, y, x in zip(batch, ys, xs, strict=True)])
    return torch.where(flips[:, None, None, None], out.flip(-1), out)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def _flatten_optimizer(optimizer: torch.optim.Optimizer, prefix: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"{prefix}.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            index, key = name[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def _save_checkpoint(path: Path, epoch: int, models: dict, optimizers: dict, config: dict, data: _Data) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name, model in models.items():
        tensors.update({f"{name}.{k}": v for k, v in model.state_dict().items()})
    for name, optimizer in optimizers.items():
        tensors.update(_flatten_optimizer(optimizer, name))
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "epoch": str(epoch),
        "config": json.dumps(config),
        "data": data.fingerprint,
    }
    save_tensors(path, tensors, metadata=metadata)


def _load_checkpoint(path: Path, models: dict, optimizers: dict, config: dict, data: _Data) -> int:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open API)
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an instance-prior training checkpoint")
    saved = json.loads(metadata["config"])
    changed = sorted(
        k for k in set(saved) | set(config) if saved.get(k) != config.get(k) and k not in _RESUMABLE_CHANGES
    )
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in changed)
        raise ValueError(f"{path}: cannot resume, the settings differ from the checkpoint's ({details})")
    if metadata.get("data") != data.fingerprint:
        raise ValueError(f"{path}: cannot resume, the data split differs from the checkpoint's (other --data?)")
    for name, model in models.items():
        prefix = name + "."
        model.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    for name, optimizer in optimizers.items():
        _restore_optimizer(optimizer, tensors, name)
    return int(metadata["epoch"])


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
    discriminator = Discriminator(config.d_channels)
    generator.to(device, memory_format=torch.channels_last)
    discriminator.to(device, memory_format=torch.channels_last)
    decoder_parameters = [p for p in generator.parameters() if p.requires_grad]
    optimizers = {
        "optim_g": torch.optim.Adam(decoder_parameters, config.lr, config.betas),
        "optim_d": torch.optim.Adam(discriminator.parameters(), config.lr, config.betas),
    }
    models = {"generator": generator, "discriminator": discriminator}
    config_json = config.to_json()
    start_epoch = 0
    if resume and checkpoint.exists():
        start_epoch = _load_checkpoint(checkpoint, models, optimizers, config_json, dataset)
    records = _read_log(log_path, start_epoch)
    if start_epoch == 0:
        baseline = evaluate_prior(CenterBiasGaussian(), dataset.val_images, dataset.val_masks)
        records = [{"event": "start", "splits": dataset.sizes, "config": config_json, "val_center_bias": baseline}]
    else:
        records.append({"event": "resume", "from_epoch": start_epoch})
    _write_log(log_path, records)
    features, val_features = [], []
    if start_epoch < config.epochs:
        features = _encode_all(generator, dataset.generator_images, device, progress)
        val_features = _encode_all(generator, dataset.val_images, device, progress, mirrors=(False,))[0]

    started = time.perf_counter()
    for epoch in range(start_epoch + 1, config.epochs + 1):
        lr = config.lr * config.lr_decay ** ((epoch - 1) // config.lr_step_epochs)
        for optimizer in optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = lr
        record = _train_epoch(epoch, generator, discriminator, optimizers, dataset, features, config, device, progress)
        record.update(lr=lr, val=_evaluate_decoder(generator, val_features, dataset, device, config.bf16))
        records.append(record)
        _write_log(log_path, records)  # log first: a kill before the checkpoint is trimmed on resume
        _save_checkpoint(checkpoint, epoch, models, optimizers, config_json, dataset)

    generator.eval().cpu()
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
    discriminator: Discriminator,
    optimizers: dict[str, torch.optim.Optimizer],
    data: _Data,
    features: list[list[torch.Tensor]],
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
        mirrored = torch.rand(batch, generator=rng) < 0.5
        pick = mirrored[:, None, None, None]
        images = data.generator_images[gen_index]
        images = _channels_last(torch.where(pick, images.flip(-1), images).to(device).float().div(255))
        skips = [
            _channels_last(torch.where(pick, f[1][gen_index], f[0][gen_index]).to(device))
            for f in zip(*features, strict=True)
        ]
        with autocast:
            logits = generator.decode(skips, normalize(images))
        response = torch.sigmoid(logits.float())
        edited = _crops(apply_color_selectivo(images, response), config.crop_size, rng)

        pairs = torch.cat([data.effect_images[effect_index], data.effect_masks[effect_index]], 1)
        pairs = _crops(pairs, config.crop_size, rng).to(device).float().div(255)
        effect_rgb, effect_mask = pairs[:, :3], pairs[:, 3:]
        real = apply_color_selectivo(effect_rgb, effect_mask)
        mismatched = apply_color_selectivo(effect_rgb, effect_mask.roll(1, dims=0))

        # D step: real effect photos vs edited (and mismatched) ones, hinge loss.
        discriminator.requires_grad_(True)
        with autocast:
            d_out = discriminator(_channels_last(torch.cat([real, edited.detach(), mismatched])))
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
            adversarial = -discriminator(_channels_last(edited)).float().mean()
        guard = collapse_guard(response, config.area_range)
        loss_g = adversarial + config.area_weight * guard["area"] + config.binary_weight * guard["binary"]
        optimizers["optim_g"].zero_grad(set_to_none=True)
        loss_g.backward()
        optimizers["optim_g"].step()

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
