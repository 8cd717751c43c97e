"""Choose a trained method's epoch count without test labels: validate along one training run.

    python benchmarks/epoch_validation.py --model fastflow --epochs 30 --every 2 [--preset P] [--param K=V ...]

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
import json
import random
import time

import torch
from PIL import Image

from common import REPO, parse_param, record, require_data
from metaad.data.datasets import list_images, mtd_records
from metaad.data.source import split_calibration
from metaad.data.synthetic import SURFACE_DEFECTS
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
    parser.add_argument("--epochs", type=int, required=True, help="epochs of the one training run")
    parser.add_argument("--epochs-param", default="epochs",
                        help="the method's constructor argument that sets its epoch count (default: epochs)")
    parser.add_argument("--every", type=int, default=1, help="validate after every N-th epoch (and the last)")
    parser.add_argument("--fraction", type=float, default=0.2, help="share of the training split held out")
    parser.add_argument("--defects", nargs="+", default=["perlin"], choices=["perlin", *SURFACE_DEFECTS],
                        help="synthetic defect kinds, used in turn")
    parser.add_argument("--seed", type=int, default=0, help="seeds the split and the synthetic defects")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default=None, help="suffix of the results name")
    args = parser.parse_args()
    set_threads(args.threads)
    root, dtd = require_data("mtd"), require_data("dtd")

    params = dict(parse_param(item) for item in args.param)
    model = create_model(args.model, args.preset, **{args.epochs_param: args.epochs}, **params)
    if not isinstance(model, TrainableModel) or args.epochs_param not in model_params(type(model)):
        raise SystemExit(f"{args.model} is not trained by the shared loop with an {args.epochs_param!r} argument")
    size = loading_size(model)

    textures = sorted(p for folder in sorted((dtd / "train").iterdir()) for p in list_images(folder))
    random.Random(args.seed).shuffle(textures)
    fit_records, val_records = split_calibration(mtd_records(root, "train", seed=0), args.fraction, args.seed)
    images, masks, labels = validation_set(val_records, textures, size, args.seed, tuple(args.defects))
    if images.min() < 0:  # the harness predates the [0, 1] contract and still ImageNet-normalises
        images = denormalize(images).clamp_(0, 1)
    fit_images = torch.stack([pil_to_tensor(Image.open(r.path), size) for r in fit_records])
    print(f"fit {len(fit_images)} images, validate {len(images)} ({int(labels.sum())} with defects) at {size} px",
          flush=True)

    workdir = REPO / "benchmarks" / "_work" / f"epoch_validation_{args.model}"
    workdir.mkdir(parents=True, exist_ok=True)
    curve: list[dict] = []
    start = time.perf_counter()

    def validate(epoch: int, trained: TrainableModel) -> None:
        if epoch % args.every and epoch != args.epochs:
            return
        train_seconds = time.perf_counter() - start - sum(c["validation_seconds"] for c in curve)
        tic = time.perf_counter()
        try:
            prediction = trained.predict(images)
        except NotFittedError:  # an earlier stage (Glance), or a bank built after training (multiscale)
            return
        metrics = evaluate(labels, prediction.scores.numpy(), masks, prediction.maps.numpy())
        log = (workdir / "train_log.jsonl").read_text().splitlines()
        loss = json.loads(log[-1])["loss"] if log else None
        curve.append({"epoch": epoch, **metrics, "loss": loss, "train_seconds": round(train_seconds, 1),
                      "validation_seconds": round(time.perf_counter() - tic, 1)})
        print(json.dumps(curve[-1]), flush=True)
        save(trained)

    def save(trained: TrainableModel) -> None:
        best = max(curve, key=lambda c: c["image_auroc"])
        record(f"epoch_validation_{args.model}" + (f"_{args.name}" if args.name else ""), {
            "model": args.model, "preset": args.preset, "params": params, "config": get_config(trained),
            "data": f"validation: MTD training split only ({1 - args.fraction:.0%} fit: {len(fit_images)} images; "
            f"{args.fraction:.0%} validation: {len(val_records)} images, each also with a synthetic defect: "
            f"{', '.join(args.defects)}), {size} px, seed {args.seed}",
            "best_epoch_by_image_auroc": best["epoch"], "curve": curve,
        })

    model.fit(fit_images, workdir=workdir, on_epoch_end=validate)  # every stage's epochs, as fit trains them
    if not curve or curve[-1]["epoch"] != args.epochs:
        validate(args.epochs, model)  # a method whose fit ends with more than training


if __name__ == "__main__":
    main()
