"""Issue 27's validation of Metaformer in feature space: k-shot draws from MTD's training split, no test image.

    python benchmarks/metaformer_feature_validation.py --candidate F1 '{"taps": [2, 3]}' --candidate F2 ... \\
        [--shots 8] [--draws 3] [--steps 30] [--synthetic] --name NAME

Protocol (``benchmarks/NOTES.md``, "Issue 27: the decision rule"): the defect-free MTD training split is divided
as ``epoch_validation.py`` divides it (80% fit, 20% held out, seed 0); each held-out image is scored clean and
once with a low-contrast defect (``SUBTLE_DEFECTS``, drawn at native resolution). For every candidate (a
Metaformer's constructor arguments; ``init`` null unless given), every k in ``--shots`` and every step count in
``--steps``, k support images are drawn from the fit part (seeded by the draw, the same draws for every
candidate), the model adapts on them and scores the held-out images. ``--synthetic`` also fits each of metaad's
synthetic categories on k of its training images (same draws) and scores its test split. Reported: image
AUROC, pixel AUROC, PRO (means over draws and their spread), adaptation seconds, scoring ms an image, model MB.
Written to ``benchmarks/results/metaformer_feature_validation_<name>.json`` after every candidate.
"""

from __future__ import annotations

import metaad  # noqa: F401  (first: OpenMP passive waiting must be set before torch)

# isort: split
import argparse
import io
import json
import random
import statistics
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from common import REPO, record, require_data
from metaad.data.datasets import AnomalyDataset, mtd_records, mvtec_records
from metaad.data.source import split_calibration
from metaad.data.synthetic import CATEGORIES, SUBTLE_DEFECTS, make_synthetic_dataset
from metaad.data.transforms import pil_to_tensor
from metaad.metrics import evaluate
from metaad.models import create_model
from metaad.runtime import set_threads
from patchcore_validation import validation_set

SIZE = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--candidate", nargs=2, action="append", required=True, metavar=("NAME", "JSON"),
                        help="a candidate's name and its Metaformer constructor arguments as JSON")
    parser.add_argument("--shots", type=int, nargs="+", default=[8])
    parser.add_argument("--steps", type=int, nargs="+", default=[None],
                        help="adaptation step counts to score (default: the candidate's own adapt_steps)")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--synthetic", action="store_true", help="also metaad's synthetic categories")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", required=True)
    args = parser.parse_args()
    set_threads(args.threads)
    root = require_data("mtd")

    fit_records, val_records = split_calibration(mtd_records(root, "train", seed=0), 0.2, 0)
    val_images, val_masks, val_labels = validation_set(val_records, [], SIZE, 0, SUBTLE_DEFECTS, native=True)
    fit_images = torch.stack([pil_to_tensor(Image.open(r.path), SIZE) for r in fit_records])
    print(f"fit part {len(fit_images)} images; validation {len(val_images)} ({int(val_labels.sum())} with defects)",
          flush=True)
    synthetic = synthetic_sets() if args.synthetic else {}
    results: dict = {"candidates": {}}
    feature_cache: dict = {}  # the validation images' frozen features, shared by every row that sees the same
    for name, text in args.candidate:
        params = {"init": None, **json.loads(text)}
        rows = []
        for k in args.shots:
            for steps in args.steps:
                row = {"shots": k, "steps": steps, **evaluate_candidate(
                    params, steps, k, args.draws, fit_images, (val_images, val_masks, val_labels), synthetic,
                    feature_cache)}
                rows.append(row)
                print(name, json.dumps(row), flush=True)
        results["candidates"][name] = {"params": params, "rows": rows}
        record(f"metaformer_feature_validation_{args.name}", {
            "data": f"MTD training split only: k of {len(fit_images)} fit images ({args.draws} seeded draws), "
            f"{len(val_records)} held-out images clean and each with one of {', '.join(SUBTLE_DEFECTS)} drawn at "
            f"native resolution, {SIZE} px" + ("; synthetic categories: k of each training split, its test split"
                                               if synthetic else ""),
            **results,
        })


def synthetic_sets() -> dict[str, tuple[torch.Tensor, dict]]:
    """metaad's six synthetic categories at 256 px: (training images, test batch) each."""
    root = REPO / "benchmarks" / "_work" / f"synthetic_{SIZE}px_60_30_10"
    if not root.is_dir():
        make_synthetic_dataset(root, None, 60, 30, 10, SIZE)
    sets = {}
    for category in CATEGORIES:
        train = AnomalyDataset(mvtec_records(root, category, "train"), image_size=SIZE)
        test = AnomalyDataset(mvtec_records(root, category, "test"), image_size=SIZE)
        images = next(iter(DataLoader(train, batch_size=len(train))))["image"]
        sets[category] = (images, next(iter(DataLoader(test, batch_size=len(test)))))
    return sets


def evaluate_candidate(params, steps, k, draws, fit_images, validation, synthetic, feature_cache) -> dict:
    """Mean and spread over ``draws`` of the MTD validation's metrics (and the synthetic mean) for one setting."""
    val_images, val_masks, val_labels = validation
    per_draw, synthetic_means, adapt_seconds = [], [], []
    model = None
    for draw in range(draws):
        support = fit_images[sorted(random.Random(draw).sample(range(len(fit_images)), k))]
        model = create_model("metaformer", None, **params, **({"adapt_steps": steps} if steps is not None else {}))
        tic = time.perf_counter()
        model.fit(support)
        adapt_seconds.append(time.perf_counter() - tic)
        scores, maps = score(model, val_images, feature_cache)
        per_draw.append(evaluate(val_labels, scores, val_masks, maps))
        if synthetic:
            aurocs = []
            for category, (train, test) in synthetic.items():
                chosen = train[sorted(random.Random(draw).sample(range(len(train)), min(k, len(train))))]
                fitted = create_model("metaformer", None, **params,
                                      **({"adapt_steps": steps} if steps is not None else {})).fit(chosen)
                prediction = fitted.predict(test["image"])
                masks = test["mask"][:, 0].numpy().astype(np.uint8)
                aurocs.append(evaluate(test["label"].numpy(), prediction.scores.numpy(), masks,
                                       prediction.maps.numpy())["image_auroc"])
                del category
            synthetic_means.append(float(np.mean(aurocs)))
    row = {}
    for key in ("image_auroc", "pixel_auroc", "pro"):
        values = [d[key] for d in per_draw]
        row[key] = statistics.mean(values)
        row[f"{key}_draws"] = values
    if synthetic_means:
        row["synthetic_image_auroc"] = statistics.mean(synthetic_means)
        row["synthetic_image_auroc_draws"] = synthetic_means
    row["adapt_seconds"] = round(statistics.median(adapt_seconds), 2)
    row["score_ms_per_image"] = round(scoring_ms(model, val_images[:16]), 1)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    row["model_mb"] = round(buffer.tell() / 2**20, 2)
    return row


@torch.no_grad()
def score(model, images: torch.Tensor, cache: dict) -> tuple[np.ndarray, np.ndarray]:
    """Image scores and 256 px maps; the frozen features of the validation images computed once per setting
    that changes them (standardisation decided at fit, configuration with or without P)."""
    key = (model.taps, model.image_size, model.preprocess.standardizing, model.configuration != "A", model.prior)
    if key not in cache:
        cache[key] = [model.feature_maps(chunk) for chunk in images.split(32)]
    maps = torch.cat([model.map_from_features(chunk) for chunk in cache[key]])
    return maps.flatten(1).amax(1).numpy(), maps.numpy()


def scoring_ms(model, images: torch.Tensor) -> float:
    """Milliseconds an image of ``predict`` (backbone included) on 16 images, best of 3 after a warm-up."""
    model.predict(images[:2])
    best = float("inf")
    for _ in range(3):
        tic = time.perf_counter()
        model.predict(images)
        best = min(best, time.perf_counter() - tic)
    return 1000 * best / len(images)


if __name__ == "__main__":
    main()
