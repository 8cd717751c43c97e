"""Does a run's threshold keep the false-alarm rate it was asked for? Magnetic Tile Defects, seed-0 split.

    python benchmarks/calibration_false_alarms.py --calibration held-out      # the default: 10% held out
    python benchmarks/calibration_false_alarms.py --calibration out-of-fold   # every good image calibrates
    python benchmarks/calibration_false_alarms.py --validation                # out-of-fold's bias, no test image

Fits the method (default PatchCore) as ``metaad fit`` does, thresholds set at ``--false-alarm-rate`` (0.01)
from defect-free training images only, then counts on the test split's defect-free images how many the
threshold flags (the realised false-alarm rate) and on its defective ones how many it misses. Records
``benchmarks/results/calibration_<model>_<calibration>.json`` (``--name`` to name it otherwise).

``--validation`` reads no test image: it fits on the run's 90% of the training images, scores the 10% held out
(unseen) and the 90% out of fold, and compares the two (the AUC of unseen against out-of-fold scores is 0.5 when
out-of-fold scores are unbiased); recorded as ``calibration_<model>_validation.json``.
"""

from __future__ import annotations

import metaad  # noqa: F401  (first: OpenMP passive waiting must be set before torch)

# isort: split
import argparse
import csv
import json
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from common import REPO, parse_param, record, require_data
from metaad.data.datasets import AnomalyDataset
from metaad.data.source import DataSpec, run_split
from metaad.models import MODELS, create_model
from metaad.runs.calibration import calibrate_threshold
from metaad.runs.fit import fit_and_evaluate, loading_size
from metaad.runtime import set_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="patchcore", choices=sorted(MODELS))
    parser.add_argument("--calibration", default="held-out", choices=["held-out", "out-of-fold"])
    parser.add_argument("--validation", action="store_true", help="out-of-fold against held-out, training images only")
    parser.add_argument("--false-alarm-rate", type=float, default=0.01)
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--name", default=None, help="the record's name (default: calibration_<model>_<calibration>)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    root = require_data("mtd")
    params = dict(parse_param(item) for item in args.param)
    model = create_model(args.model, **params)
    name = args.name or f"calibration_{args.model}_{'validation' if args.validation else args.calibration}"
    timed = _time_out_of_fold(model)
    figures = validation(model, root, args.false_alarm_rate) if args.validation else test_split(model, root, name, args)
    figures["out_of_fold_seconds"] = timed.get("seconds")
    print(json.dumps(figures, indent=2))
    calibration = "validation" if args.validation else args.calibration
    record(name, {"method": args.model, "data": "mtd seed-0", "calibration": calibration, "params": params, **figures})


def _time_out_of_fold(model: torch.nn.Module) -> dict:
    """Wrap the model's ``out_of_fold`` so that its wall time lands in the returned dict (when it is called)."""
    timed: dict = {}
    method = getattr(model, "out_of_fold", None)
    if callable(method):
        def out_of_fold(train):
            tic = time.perf_counter()
            result = method(train)
            timed["seconds"] = time.perf_counter() - tic
            return result
        model.out_of_fold = out_of_fold
    return timed


def test_split(model: torch.nn.Module, root, name: str, args: argparse.Namespace) -> dict:
    """Fit and threshold as ``metaad fit`` does; the threshold's false alarms and misses on the test split."""
    out = REPO / "benchmarks" / "_work" / name
    metrics = fit_and_evaluate(
        model, DataSpec(str(root), "mtd", seed=0), out,
        false_alarm_rate=args.false_alarm_rate, calibration=args.calibration, progress=False,
    )
    with open(out / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    good = [r for r in rows if r["label"] == "0"]
    defective = [r for r in rows if r["label"] == "1"]
    alarms = sum(r["decision"] == "anomalous" for r in good)
    misses = sum(r["decision"] == "good" for r in defective)
    thresholds = json.loads((out / "threshold.json").read_text())
    return {
        "false_alarm_rate_asked": args.false_alarm_rate,
        "false_alarm_rate_on_test_good": alarms / len(good), "false_alarms": alarms, "n_test_good": len(good),
        "miss_rate_on_test_defective": misses / len(defective), "misses": misses,
        "n_test_defective": len(defective), "threshold": thresholds["threshold"],
        "n_calibration_images": thresholds["n_calibration_images"], "n_train": metrics["n_train"],
        "image_auroc": metrics.get("image_auroc"), "pro": metrics.get("pro"),
        "fit_seconds": metrics.get("fit_seconds"),
    }


def validation(model: torch.nn.Module, root, false_alarm_rate: float) -> dict:
    """Out-of-fold scores of the run's 90% against ``predict``'s scores of its 10% held out, no test image."""
    split = run_split(DataSpec(str(root), "mtd", seed=0), 0.1)
    size = loading_size(model)
    fit_set, held_set = AnomalyDataset(split.fit, size), AnomalyDataset(split.calibration, size)
    tic = time.perf_counter()
    model.fit(DataLoader(fit_set, batch_size=16), progress=False)
    fit_seconds = time.perf_counter() - tic
    unseen = np.concatenate([model.predict(b["image"]).scores.numpy() for b in DataLoader(held_set, batch_size=16)])
    oof = model.out_of_fold(DataLoader(fit_set, batch_size=16)).scores.numpy()
    greater = (unseen[:, None] > oof[None]).mean() + 0.5 * (unseen[:, None] == oof[None]).mean()
    n1, n2 = len(unseen), len(oof)
    figures = {
        "n_fit": n2, "n_unseen": n1, "fit_seconds": fit_seconds,
        "auc_unseen_over_out_of_fold": float(greater),
        "auc_standard_error_if_equal": float(np.sqrt((n1 + n2 + 1) / (12 * n1 * n2))),
        "median_out_of_fold": float(np.median(oof)), "median_unseen": float(np.median(unseen)),
        "mean_out_of_fold": float(oof.mean()), "mean_unseen": float(unseen.mean()),
    }
    levels = (0.5, 0.9, 0.95, 0.99, 1.0)
    figures["quantiles_out_of_fold"] = {f"{q:.0%}": float(np.quantile(oof, q, method="higher")) for q in levels}
    figures["quantiles_unseen"] = {f"{q:.0%}": float(np.quantile(unseen, q, method="higher")) for q in levels}
    for rate in (false_alarm_rate, 0.1):  # the unseen images a threshold set on the out-of-fold scores flags
        threshold = calibrate_threshold(oof, rate)
        figures[f"unseen_flagged_at_out_of_fold_{1 - rate:.0%}_quantile"] = float((unseen > threshold).mean())
    return figures


if __name__ == "__main__":
    main()
