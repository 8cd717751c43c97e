"""The k-shot protocol on Magnetic Tile Defects (Metaformer Fig. 4): fit on k defect-free images, test on all.

    python benchmarks/mtd_kshot.py --model patchcore
    python benchmarks/mtd_kshot.py --model metaformer --preset cpu --init universal-cpu
    python benchmarks/mtd_kshot.py --model metaformer --preset cpu --init none  # random init, same budget
    python benchmarks/mtd_kshot.py --model metaformer --preset cpu --init universal-cpu --param map_type=feature \
        --name metaformer_cpu_universal-cpu_feature
    python benchmarks/mtd_kshot.py --model metaformer --preset cpu --configuration A \
        --init benchmarks/_work/metaformer_universal_cpu_A/universal.safetensors --name metaformer_cpu_A_meta

The k images are a seeded random subset of the seed-0 training split (the same subset for every model);
the test split is the full seed-0 test split. Writes ``benchmarks/results/mtd_kshot_<run>.json``.
"""

from __future__ import annotations

import argparse
import inspect

from common import REPO, parse_param, record, require_data
from metaad.engine.run import DataSpec, fit_and_evaluate, set_threads
from metaad.models import create_model, model_class


def _init_tag(model: str, preset: str | None, params: dict) -> str | None:
    """Metaformer: what it adapts from (the universal model's name or path, or "random-init"); else None."""
    if model != "metaformer":
        return None
    cls = model_class(model)
    default = inspect.signature(cls).parameters["init"].default
    init = params.get("init", cls.PRESETS.get(preset, {}).get("init", default) if preset else default)
    return init if init is not None else "random-init"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="patchcore")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--init", default=None,
                        help="metaformer: universal checkpoint, shipped name, or none (random init); default: the "
                        "model's (the shipped universal model)")
    parser.add_argument("--shots", nargs="+", default=["1", "2", "4", "8", "16", "all"])
    parser.add_argument("--configuration", default=None, help="metaformer: Table 3 variant (A, A+P, A+P+T)")
    parser.add_argument("--name", default=None, help="run name (default: built from model, preset and init)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="another constructor argument, e.g. map_type=feature (name the run with --name)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    root = require_data("mtd")
    params = {"init": None if args.init == "none" else args.init} if args.init else {}
    if args.configuration:
        params["configuration"] = args.configuration
    params.update(parse_param(item) for item in args.param)
    run = args.name or "_".join(filter(None, [args.model, args.preset, _init_tag(args.model, args.preset, params)]))
    results = {}
    for shots in args.shots:
        k = None if shots == "all" else int(shots)
        model = create_model(args.model, args.preset, **params)
        metrics = fit_and_evaluate(
            model,
            DataSpec(str(root), "mtd", seed=0),
            REPO / "benchmarks" / "_work" / f"kshot_{run}_{shots}",
            shots=k,
            calibration_fraction=0.0,
            progress=False,
        )
        results[shots] = {
            key: metrics[key] for key in ("image_auroc", "pixel_auroc", "pro", "fit_seconds", "ms_per_image")
        }
        print(shots, results[shots], flush=True)
    header = "| k | " + " | ".join(results[args.shots[0]]) + " |"
    table = [f"k-shot on MTD seed-0 split, {run}", "", header, "|---" * (len(results[args.shots[0]]) + 1) + "|"]
    table += [
        f"| {k} | " + " | ".join(f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}" for v in r.values()) + " |"
        for k, r in results.items()
    ]
    print("\n".join(table))
    record(f"mtd_kshot_{run}", {"data": "k-shot: mtd seed-0", "results": results, "table": table})


if __name__ == "__main__":
    main()
