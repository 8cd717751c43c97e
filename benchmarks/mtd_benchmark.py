"""Any registered method on Magnetic Tile Defects, seed-0 split, default settings.

    python benchmarks/mtd_benchmark.py [--model patchcore] [--preset P] [--param KEY=VALUE ...] [--name NAME]
    python benchmarks/mtd_benchmark.py --model patchcore --search exact

Fits on all 762 training images (the papers' protocol: no calibration hold-out), evaluates on the 582 test
images, and records image AUROC, pixel AUROC, PRO, F1-max, fit seconds, ms per test image and peak memory in
``benchmarks/results/mtd_<model>[_<search>].json``. A trained method checkpoints every epoch into
``--out``/training; ``--resume`` continues an interrupted run.
"""

from __future__ import annotations

import argparse
import json

from common import REPO, parse_param, record, require_data
from metaad.data.source import DataSpec
from metaad.models import MODELS, create_model
from metaad.runs.fit import fit_and_evaluate
from metaad.runtime import set_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="patchcore", choices=sorted(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--search", default=None, choices=["ivf", "exact"], help="PatchCore's search (default ivf)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted fit from --out/training")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="a parameter other than its default (JSON or bare string), e.g. border_padding=0")
    parser.add_argument("--preset", default=None, help="a preset, e.g. paper (the paper's pipeline)")
    parser.add_argument("--name", default=None, help="results name (default: mtd_<model>[_<search>])")
    parser.add_argument("--out", default=None, help="run folder (default: benchmarks/_work/mtd_<model>)")
    args = parser.parse_args()
    set_threads(args.threads)
    root = require_data("mtd")
    params = dict(parse_param(item) for item in args.param)
    if args.model == "patchcore":
        params.setdefault("search", args.search or "ivf")
    elif args.search:
        raise SystemExit("--search is PatchCore's option")
    model = create_model(args.model, args.preset, **params)
    out = args.out or str(REPO / "benchmarks" / "_work" / f"mtd_{args.model}")
    metrics = fit_and_evaluate(
        model, DataSpec(str(root), "mtd", seed=0), out, calibration_fraction=0.0, resume=args.resume
    )
    if args.model == "patchcore":
        metrics["memory_bank"] = list(model.memory_bank.shape)
    print(json.dumps(metrics, indent=2))
    default_name = f"mtd_patchcore_{params['search']}" if args.model == "patchcore" else f"mtd_{args.model}"
    record(
        args.name or default_name,
        {"method": args.model, "data": "mtd seed-0", "preset": args.preset, "params": params, **metrics},
    )


if __name__ == "__main__":
    main()
