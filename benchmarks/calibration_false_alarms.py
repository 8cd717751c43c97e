"""Does a run's threshold keep the false-alarm rate it was asked for? Magnetic Tile Defects, seed-0 split.

    python benchmarks/calibration_false_alarms.py --calibration held-out      # the default: 10% held out
    python benchmarks/calibration_false_alarms.py --calibration out-of-fold   # every good image calibrates

Fits the method (default PatchCore) as ``metaad fit`` does, thresholds set at ``--false-alarm-rate`` (0.01)
from defect-free training images only, then counts on the test split's defect-free images how many the
threshold flags (the realised false-alarm rate) and on its defective ones how many it misses. Records
``benchmarks/results/calibration_<model>_<calibration>.json``.
"""

from __future__ import annotations

import metaad  # noqa: F401  (first: OpenMP passive waiting must be set before torch)

# isort: split
import argparse
import csv
import json

from common import REPO, parse_param, record, require_data
from metaad.data.source import DataSpec
from metaad.models import MODELS, create_model
from metaad.runs.fit import fit_and_evaluate
from metaad.runtime import set_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="patchcore", choices=sorted(MODELS))
    parser.add_argument("--calibration", default="held-out", choices=["held-out", "out-of-fold"])
    parser.add_argument("--false-alarm-rate", type=float, default=0.01)
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    root = require_data("mtd")
    params = dict(parse_param(item) for item in args.param)
    out = REPO / "benchmarks" / "_work" / f"calibration_{args.model}_{args.calibration}"
    metrics = fit_and_evaluate(
        create_model(args.model, **params), DataSpec(str(root), "mtd", seed=0), out,
        false_alarm_rate=args.false_alarm_rate, calibration=args.calibration, progress=False,
    )
    with open(out / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    good = [r for r in rows if r["label"] == "0"]
    defective = [r for r in rows if r["label"] == "1"]
    alarms = sum(r["decision"] == "anomalous" for r in good)
    misses = sum(r["decision"] == "good" for r in defective)
    thresholds = json.loads((out / "threshold.json").read_text())
    figures = {
        "false_alarm_rate_asked": args.false_alarm_rate,
        "false_alarm_rate_on_test_good": alarms / len(good), "false_alarms": alarms, "n_test_good": len(good),
        "miss_rate_on_test_defective": misses / len(defective), "misses": misses,
        "n_test_defective": len(defective), "threshold": thresholds["threshold"],
        "n_calibration_images": thresholds["n_calibration_images"], "n_train": metrics["n_train"],
    }
    print(json.dumps(figures, indent=2))
    record(f"calibration_{args.model}_{args.calibration}", {
        "method": args.model, "data": "mtd seed-0", "calibration": args.calibration, "params": params,
        **figures, "image_auroc": metrics.get("image_auroc"), "pro": metrics.get("pro"),
        "fit_seconds": metrics.get("fit_seconds"),
    })


if __name__ == "__main__":
    main()
