"""The k-shot protocol on Magnetic Tile Defects (Metaformer Fig. 4): fit on k defect-free images, test on all.

    python benchmarks/mtd_kshot.py --model patchcore
    python benchmarks/mtd_kshot.py --model metaformer --preset cpu --init universal-cpu
    python benchmarks/mtd_kshot.py --model metaformer --preset cpu --init none  # random init, same budget
    python benchmarks/mtd_kshot.py --model metaformer --preset cpu --init universal-cpu --param map_type=feature \
        --name metaformer_cpu_universal-cpu_feature
    python benchmarks/mtd_kshot.py --model metaformer --preset cpu --configuration A \
        --init benchmarks/_work/metaformer_universal_cpu_A/universal.safetensors --name metaformer_cpu_A_meta

The k images are a seeded random subset of the seed-0 training split (the same subset for every model);
the test split is the full seed-0 test split. ``--seeds 0 1 2`` repeats every k with the k-image draw and
the model's own seed (initial weights, batch order) set to each seed in turn, and reports the mean and the
spread (max − min) per k. Writes ``benchmarks/results/mtd_kshot_<run>.json``.
"""

from __future__ import annotations

import argparse
import inspect

from common import REPO, parse_param, record, require_data
from metaad.data.source import DataSpec
from metaad.models import create_model, model_class
from metaad.runs.fit import fit_and_evaluate
from metaad.runtime import set_threads


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
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="repeat with these seeds (k-image draw and model seed); default: one run, seed 0")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    root = require_data("mtd")
    params = {"init": None if args.init == "none" else args.init} if args.init else {}
    if args.configuration:
        params["configuration"] = args.configuration
    params.update(parse_param(item) for item in args.param)
    run = args.name or "_".join(filter(None, [args.model, args.preset, _init_tag(args.model, args.preset, params)]))
    if args.seeds:
        run += "_seeds" + "-".join(map(str, args.seeds))
    seeds = args.seeds or [None]
    per_seed: dict[str, dict[str, dict]] = {}
    for seed in seeds:
        results = per_seed.setdefault(str(seed if seed is not None else 0), {})
        for shots in args.shots:
            k = None if shots == "all" else int(shots)
            model = create_model(args.model, args.preset, **params, **({"seed": seed} if seed is not None else {}))
            metrics = fit_and_evaluate(
                model,
                DataSpec(str(root), "mtd", seed=0),
                REPO / "benchmarks" / "_work" / f"kshot_{run}_{shots}" / ("" if seed is None else f"seed{seed}"),
                shots=k,
                shots_seed=seed,
                calibration_fraction=0.0,
                progress=False,
            )
            results[shots] = {
                key: metrics[key] for key in ("image_auroc", "pixel_auroc", "pro", "fit_seconds", "ms_per_image")
            }
            print(f"seed {seed}, k = {shots}", results[shots], flush=True)
    first = per_seed[next(iter(per_seed))]
    columns = list(first[args.shots[0]])
    if len(per_seed) == 1:
        header = "| k | " + " | ".join(columns) + " |"
        table = [f"k-shot on MTD seed-0 split, {run}", "", header, "|---" * (len(columns) + 1) + "|"]
        table += [
            f"| {k} | " + " | ".join(f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}" for v in r.values()) + " |"
            for k, r in first.items()
        ]
        record(f"mtd_kshot_{run}", {"data": "k-shot: mtd seed-0", "results": first, "table": table})
    else:
        table = [f"k-shot on MTD seed-0 split, {run}: mean (spread = max − min) over seeds {', '.join(per_seed)}",
                 "", "| k | image AUROC | pixel AUROC | PRO |", "|---|---|---|---|"]
        summary = {}
        for shots in args.shots:
            summary[shots] = {}
            for key in ("image_auroc", "pixel_auroc", "pro"):
                values = [r[shots][key] for r in per_seed.values()]
                summary[shots][key] = {"mean": sum(values) / len(values), "spread": max(values) - min(values),
                                       "values": values}
            table.append(f"| {shots} | " + " | ".join(
                f"{summary[shots][key]['mean']:.4f} ({summary[shots][key]['spread']:.4f})"
                for key in ("image_auroc", "pixel_auroc", "pro")) + " |")
        record(f"mtd_kshot_{run}", {"data": "k-shot: mtd seed-0 split, k-image draws seeded by each seed",
                                    "seeds": per_seed, "summary": summary, "table": table})
    print("\n".join(table))


if __name__ == "__main__":
    main()
