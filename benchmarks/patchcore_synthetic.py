"""PatchCore settings on metaad's built-in synthetic categories: a check of the general case beside MTD.

    python benchmarks/patchcore_synthetic.py --candidates standardize_images=never standardize_images=always

A candidate is ``;``-separated PatchCore parameters, as in ``patchcore_validation.py``. The synthetic data set
(all six categories, textures and objects, evenly lit) is generated under ``benchmarks/_work/`` with the
given sizes; every candidate is fitted and tested on each category, at the generated size unless it sets
``image_size`` (the model then resizes; maps and metrics stay at the generated size). Needs no real data. The
figures go to ``benchmarks/results/patchcore_synthetic_<name>.json``.
"""

from __future__ import annotations

import metaad  # noqa: F401  (first: OpenMP passive waiting, hence multi-threaded faiss, needs it before torch)

# isort: split
import argparse
import json

import numpy as np
from torch.utils.data import DataLoader

from common import REPO, record
from metaad.data.datasets import AnomalyDataset, mvtec_records
from metaad.data.synthetic import CATEGORIES, make_synthetic_dataset
from metaad.data.transforms import exposure_variation
from metaad.metrics import evaluate
from metaad.models import create_model, get_config
from metaad.runtime import set_threads
from patchcore_validation import candidate_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--candidates", nargs="+", default=["standardize_images=never", "standardize_images=always"])
    parser.add_argument("--size", type=int, default=128, help="image size of the generated data set")
    parser.add_argument("--n-train", type=int, default=60)
    parser.add_argument("--n-test-good", type=int, default=30)
    parser.add_argument("--n-test-per-defect", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="standardization")
    args = parser.parse_args()
    set_threads(args.threads)
    root = REPO / "benchmarks" / "_work" / (
        f"synthetic_{args.size}px_{args.n_train}_{args.n_test_good}_{args.n_test_per_defect}"
    )
    if not root.is_dir():
        make_synthetic_dataset(root, None, args.n_train, args.n_test_good, args.n_test_per_defect, args.size)
    table: dict[str, dict] = {}
    for category in CATEGORIES:
        train = AnomalyDataset(mvtec_records(root, category, "train"), image_size=args.size)
        test = AnomalyDataset(mvtec_records(root, category, "test"), image_size=args.size)
        batch = next(iter(DataLoader(test, batch_size=len(test))))
        variation = exposure_variation(part["image"] for part in DataLoader(train, batch_size=16))
        table[category] = {"exposure_variation": variation, "candidates": {}}
        for candidate in args.candidates:
            model = create_model("patchcore", **{"image_size": args.size, **candidate_params(candidate)})
            model.fit(DataLoader(train, batch_size=16), progress=False)
            prediction = model.predict(batch["image"])
            masks = batch["mask"][:, 0].numpy().astype(np.uint8)
            metrics = evaluate(batch["label"].numpy(), prediction.scores.numpy(), masks, prediction.maps.numpy())
            table[category]["candidates"][candidate] = {**metrics, "params": get_config(model)}
            print(category, candidate, json.dumps({k: round(v, 4) for k, v in metrics.items()}), flush=True)
    means = {
        candidate: {
            key: float(np.mean([table[c]["candidates"][candidate][key] for c in CATEGORIES]))
            for key in ("image_auroc", "pixel_auroc", "pro")
        }
        for candidate in args.candidates
    }
    print("mean", json.dumps(means), flush=True)
    record(f"patchcore_synthetic_{args.name}", {
        "data": f"metaad synthetic data set, {args.size} px: {args.n_train} train, {args.n_test_good} good test and "
        f"{args.n_test_per_defect} test per defect type in each of {len(CATEGORIES)} categories",
        "categories": table,
        "mean": means,
    })


if __name__ == "__main__":
    main()
