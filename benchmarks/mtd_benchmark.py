"""PatchCore on Magnetic Tile Defects, seed-0 split, default (paper) settings.

    python benchmarks/mtd_patchcore.py [--threads 2] [--search ivf|exact] [--param KEY=VALUE ...] [--name NAME]

Fits on all 762 training images (the papers' protocol: no calibration hold-out), evaluates on the 582 test
images, and records image AUROC, pixel AUROC, PRO, fit seconds, ms per test image and peak memory.
"""

from __future__ import annotations

import argparse
import json

from common import REPO, parse_param, record, require_data
from metaad.engine.run import DataSpec, fit_and_evaluate, set_threads
from metaad.models import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--search", default="ivf", choices=["ivf", "exact"])
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="PatchCore parameter other than its default (JSON or bare string), e.g. border_padding=0")
    parser.add_argument("--preset", default=None, help="a PatchCore preset, e.g. paper (the paper's pipeline)")
    parser.add_argument("--name", default=None, help="results name (default: mtd_patchcore_<search>)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "_work" / "mtd_patchcore"))
    args = parser.parse_args()
    set_threads(args.threads)
    root = require_data("mtd")
    params = dict(parse_param(item) for item in args.param)
    model = create_model("patchcore", args.preset, search=args.search, **params)
    metrics = fit_and_evaluate(model, DataSpec(str(root), "mtd", seed=0), args.out, calibration_fraction=0.0)
    metrics["memory_bank"] = list(model.memory_bank.shape)
    print(json.dumps(metrics, indent=2))
    record(
        args.name or f"mtd_patchcore_{args.search}",
        {"method": "patchcore", "data": "mtd seed-0", "preset": args.preset, "params": params, **metrics},
    )


if __name__ == "__main__":
    main()
