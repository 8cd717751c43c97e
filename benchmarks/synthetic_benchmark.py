"""Any registered method on metaad's built-in synthetic categories: the general case beside MTD.

    python benchmarks/synthetic_benchmark.py --model reverse_distillation [--preset P] [--param KEY=VALUE ...]
    python benchmarks/synthetic_benchmark.py --model uniad --unified

The synthetic data set (all six categories, textures and objects) is generated under ``benchmarks/_work/``
at ``--size``; the model (its defaults unless ``--param`` says otherwise) is fitted on each category's
training images and tested on its test images (maps and metrics at the generated size): the separate
protocol. ``--unified``: one model fitted on the union of the six categories' training images, then tested on
each category's test images (the unified protocol, UniAD's). Needs no real data. The figures go to
``benchmarks/results/<model>_synthetic[_unified][_<name>].json``.
"""

from __future__ import annotations

import metaad  # noqa: F401  (first: OpenMP passive waiting must be set before torch)

# isort: split
import argparse
import json
import time

import numpy as np
from torch.utils.data import DataLoader

from common import REPO, parse_param, record
from metaad.data.datasets import AnomalyDataset, mvtec_records
from metaad.data.synthetic import CATEGORIES, make_synthetic_dataset
from metaad.metrics import evaluate
from metaad.models import MODELS, create_model, get_config
from metaad.runtime import set_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--preset", default=None)
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--size", type=int, default=128, help="image size of the generated data set")
    parser.add_argument("--n-train", type=int, default=60)
    parser.add_argument("--n-test-good", type=int, default=30)
    parser.add_argument("--n-test-per-defect", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--unified", action="store_true", help="one model for all six categories")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    set_threads(args.threads)
    params = dict(parse_param(item) for item in args.param)
    root = REPO / "benchmarks" / "_work" / (
        f"synthetic_{args.size}px_{args.n_train}_{args.n_test_good}_{args.n_test_per_defect}"
    )
    if not root.is_dir():
        make_synthetic_dataset(root, None, args.n_train, args.n_test_good, args.n_test_per_defect, args.size)
    table: dict[str, dict] = {}
    unified_fit_seconds = None
    if args.unified:
        train = AnomalyDataset([r for c in CATEGORIES for r in mvtec_records(root, c, "train")], image_size=args.size)
        model = create_model(args.model, args.preset, **params)
        tic = time.perf_counter()
        model.fit(DataLoader(train, batch_size=16))
        unified_fit_seconds = round(time.perf_counter() - tic, 1)
        print("unified fit", unified_fit_seconds, "s", flush=True)
    for category in CATEGORIES:
        test = AnomalyDataset(mvtec_records(root, category, "test"), image_size=args.size)
        batch = next(iter(DataLoader(test, batch_size=len(test))))
        fit_seconds = 0.0
        if not args.unified:
            train = AnomalyDataset(mvtec_records(root, category, "train"), image_size=args.size)
            model = create_model(args.model, args.preset, **params)
            tic = time.perf_counter()
            model.fit(DataLoader(train, batch_size=16))
            fit_seconds = time.perf_counter() - tic
        prediction = model.predict(batch["image"])
        masks = batch["mask"][:, 0].numpy().astype(np.uint8)
        metrics = evaluate(batch["label"].numpy(), prediction.scores.numpy(), masks, prediction.maps.numpy())
        table[category] = {**metrics, **({} if args.unified else {"fit_seconds": round(fit_seconds, 1)})}
        print(category, json.dumps(table[category]), flush=True)
    mean = {key: float(np.mean([table[c][key] for c in CATEGORIES])) for key in ("image_auroc", "pixel_auroc", "pro")}
    print("mean", json.dumps(mean), flush=True)
    protocol = "_unified" if args.unified else ""
    record(f"{args.model}_synthetic{protocol}" + (f"_{args.name}" if args.name else ""), {
        "data": f"metaad synthetic data set, {args.size} px: {args.n_train} train, {args.n_test_good} good test and "
        f"{args.n_test_per_defect} test per defect type in each of {len(CATEGORIES)} categories",
        "protocol": "unified: one model for all categories" if args.unified else "separate: one model per category",
        "method": args.model, "preset": args.preset, "params": params, "config": get_config(model),
        "categories": table, "mean": mean,
        **({"fit_seconds": unified_fit_seconds} if args.unified else {}),
    })


if __name__ == "__main__":
    main()
