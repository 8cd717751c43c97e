"""Choose a method's settings without test labels: validate it, along one training run for a trained method.

    python benchmarks/epoch_validation.py --model fastflow --epochs 30 --every 2 [--preset P] [--param K=V ...]
    python benchmarks/epoch_validation.py --model patchcore --defects subtle --native    # a method without epochs

``--defects subtle`` is the low-contrast suite (``metaad.data.synthetic.SUBTLE_DEFECTS``: hairline cracks and
scratches, pits of a few pixels, faint stains and shading at 2-12% of the full scale), drawn on each validation
image at its camera resolution with ``--native``: the validation whose ranking of methods is compared with
their MTD test ranking in ``benchmarks/NOTES.md``.

Generic over the registry: any gradient-trained method (``metaad.types.TrainableModel``). The defect-free MTD
training split is divided (seeded, ``patchcore_validation``'s protocol) into a fit part (80%) and a validation
part (20%); every validation image is scored as it is and once with a synthetic defect (``--defects``, used in
turn). The model is fitted once on the fit part with its own ``fit`` (the shared loop), and every
``--every``-th epoch (and the last) of its last training stage it scores the validation images: image AUROC,
pixel AUROC, PRO per epoch, with the training loss and the seconds spent training. No test image is read. The
figures go to ``benchmarks/results/epoch_validation_<model>[_<name>].json`` (rewritten after every validated epoch).
"""

from __future__ import annotations

import metaad  # noqa: F401  (first: OpenMP passive waiting must be set before torch)

# isort: split
import argparse
import copy
import json
import random
import statistics
import time

import torch
from PIL import Image

from common import REPO, parse_param, record, require_data
from metaad.data.datasets import list_images, mtd_records
from metaad.data.source import split_calibration
from metaad.data.synthetic import SUBTLE_DEFECTS, SURFACE_DEFECTS
from metaad.data.transforms import denormalize, pil_to_tensor
from metaad.metrics import evaluate
from metaad.models import create_model, get_config
from metaad.runs.fit import loading_size
from metaad.runtime import set_threads
from metaad.types import NotFittedError, TrainableModel, model_params
from patchcore_validation import validation_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="a registered, gradient-trained method, e.g. fastflow")
    parser.add_argument("--preset", default=None, help="one of the method's presets (default: its defaults)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="a constructor argument other than its default (JSON or bare string)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of the one training run (default: the method's own; none for a method without)")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="instead of --epochs: as many epochs as fit in this many minutes of training, "
                        "from the time of a few timed training steps (candidates compared at equal CPU time)")
    parser.add_argument("--epochs-param", default="epochs",
                        help="the method's constructor argument that sets its epoch count (default: epochs)")
    parser.add_argument("--every", type=int, default=1, help="validate after every N-th epoch (and the last)")
    parser.add_argument("--fraction", type=float, default=0.2, help="share of the training split held out")
    parser.add_argument("--defects", nargs="+", default=["perlin"],
                        choices=["perlin", "subtle", *SURFACE_DEFECTS, *SUBTLE_DEFECTS],
                        help="synthetic defect kinds, used in turn ('subtle': all of SUBTLE_DEFECTS)")
    parser.add_argument("--native", action="store_true",
                        help="draw each defect at the image's own resolution, then resize as the pipeline does")
    parser.add_argument("--score-variant", action="append", default=[], metavar="KEY=VALUE[;KEY=VALUE]",
                        help="also score the same trained model with these attributes changed (settings that act "
                        "on scoring only, e.g. map_stages=[2]); repeatable")
    parser.add_argument("--seed", type=int, default=0, help="seeds the split and the synthetic defects")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default=None, help="suffix of the results name")
    args = parser.parse_args()
    set_threads(args.threads)
    root, dtd = require_data("mtd"), require_data("dtd")

    defects = tuple(d for kind in args.defects for d in (SUBTLE_DEFECTS if kind == "subtle" else (kind,)))
    params = dict(parse_param(item) for item in args.param)
    variants = [dict(parse_param(item) for item in text.split(";")) for text in args.score_variant]
    if args.epochs is not None:
        params[args.epochs_param] = args.epochs
    model = create_model(args.model, args.preset, **params)
    trained = isinstance(model, TrainableModel) and args.epochs_param in model_params(type(model))
    if args.epochs is not None and not trained:
        raise SystemExit(f"{args.model} is not trained by the shared loop with an {args.epochs_param!r} argument")
    epochs = getattr(model, args.epochs_param) if trained else 0
    size = loading_size(model)

    textures = sorted(p for folder in sorted((dtd / "train").iterdir()) for p in list_images(folder))
    random.Random(args.seed).shuffle(textures)
    fit_records, val_records = split_calibration(mtd_records(root, "train", seed=0), args.fraction, args.seed)
    images, masks, labels = validation_set(val_records, textures, size, args.seed, defects, native=args.native)
    if images.min() < 0:  # the harness predates the [0, 1] contract and still ImageNet-normalises
        images = denormalize(images).clamp_(0, 1)
    fit_images = torch.stack([pil_to_tensor(Image.open(r.path), size) for r in fit_records])
    if args.budget_minutes is not None and trained:
        params[args.epochs_param] = epochs = epochs_in_budget(model, fit_images, args.budget_minutes)
        model = create_model(args.model, args.preset, **params)  # fresh initial weights, the budget's epochs
        print(f"{epochs} epochs fit in {args.budget_minutes} minutes", flush=True)
    print(f"fit {len(fit_images)} images, validate {len(images)} ({int(labels.sum())} with defects) at {size} px",
          flush=True)

    run_name = f"epoch_validation_{args.model}" + (f"_{args.name}" if args.name else "")
    workdir = REPO / "benchmarks" / "_work" / run_name
    workdir.mkdir(parents=True, exist_ok=True)
    curve: list[dict] = []
    start = time.perf_counter()

    def validate(epoch: int, fitted: TrainableModel) -> None:
        if epoch % args.every and epoch != epochs:
            return
        train_seconds = time.perf_counter() - start - sum(c["validation_seconds"] for c in curve)
        log_file = workdir / "train_log.jsonl"
        log = log_file.read_text().splitlines() if trained and log_file.is_file() else []
        loss = json.loads(log[-1])["loss"] if log else None
        for variant in [{}, *variants]:  # settings that change only the scoring, on the same trained weights
            tic = time.perf_counter()
            before = {key: getattr(fitted, key) for key in variant}
            for key, value in variant.items():
                setattr(fitted, key, tuple(value) if isinstance(value, list) else value)
            try:
                prediction = fitted.predict(images)
            except NotFittedError:  # an earlier stage (Glance), or a bank built after training (multiscale)
                return
            finally:
                for key, value in before.items():
                    setattr(fitted, key, value)
            metrics = evaluate(labels, prediction.scores.numpy(), masks, prediction.maps.numpy())
            curve.append({"epoch": epoch, **({"variant": variant} if variant else {}), **metrics, "loss": loss,
                          "train_seconds": round(train_seconds, 1),
                          "validation_seconds": round(time.perf_counter() - tic, 1)})
            print(json.dumps(curve[-1]), flush=True)
        save(fitted)

    def save(fitted: TrainableModel) -> None:
        best = max(curve, key=lambda c: c["image_auroc"])
        record(f"epoch_validation_{args.model}" + (f"_{args.name}" if args.name else ""), {
            "model": args.model, "preset": args.preset, "params": params, "config": get_config(fitted),
            "data": f"validation: MTD training split only ({1 - args.fraction:.0%} fit: {len(fit_images)} images; "
            f"{args.fraction:.0%} validation: {len(val_records)} images, each also with a synthetic defect: "
            f"{', '.join(defects)}{' drawn at native resolution' if args.native else ''}), {size} px, "
            f"seed {args.seed}",
            "best_epoch_by_image_auroc": best["epoch"], "best_variant": best.get("variant", {}),
            "budget_minutes": args.budget_minutes, "epochs": epochs, "epochs_done": curve[-1]["epoch"] == epochs,
            "curve": curve,
        })

    if trained:
        model.fit(fit_images, workdir=workdir, on_epoch_end=validate)  # every stage's epochs, as fit trains them
    else:
        model.fit(fit_images)
    if not curve or curve[-1]["epoch"] != epochs:
        validate(epochs, model)  # a method whose fit ends with more than training


def epochs_in_budget(model: TrainableModel, images: torch.Tensor, minutes: float, steps: int = 4) -> int:
    """How many epochs of ``model``'s training on ``images`` fit in ``minutes``: the median of ``steps`` timed
    optimiser steps (after one untimed) times the steps of an epoch. The timed copy is thrown away."""
    probe = copy.deepcopy(model).train()
    settings = probe.training_settings()
    optimizer = torch.optim.Adam(probe.parameters(), lr=settings.lr)
    times = []
    for step in range(steps + 1):
        batch = images[torch.randperm(len(images))[: settings.batch_size]]
        tic = time.perf_counter()
        optimizer.zero_grad()
        probe.training_loss(batch).backward()
        optimizer.step()
        if step:
            times.append(time.perf_counter() - tic)
    per_epoch = statistics.median(times) * -(-len(images) // settings.batch_size)
    return max(1, int(minutes * 60 / per_epoch))


if __name__ == "__main__":
    main()
