"""Per-defect-type image AUROC of finished MTD runs, and how large the defects are at a given input size.

    python benchmarks/mtd_per_defect.py

Reads the ``scores.csv`` of the run folders that ``mtd_benchmark.py`` and ``mtd_kshot.py`` write under
``benchmarks/_work/`` (each defect type against all good test images), and measures the area of every test
defect mask after resizing to 64 and 256 px. Writes ``benchmarks/results/mtd_per_defect.json``.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict

import numpy as np
from PIL import Image

from common import REPO, record, require_data
from metaad.data.datasets import mtd_records
from metaad.metrics import image_auroc

RUNS = (
    "mtd_patchcore",
    "mtd_patchcore_patch1",
    "mtd_patchcore_320px",
    "mtd_patchcore_border_only",
    "mtd_patchcore_paper",
    "mtd_patchcore_paper_256px",
    "kshot_metaformer_cpu_universal-cpu_all",
    "kshot_metaformer_cpu_A_universal_all",
    "kshot_metaformer_cpu_A+P_universal_all",
)


def per_defect_auroc(scores_csv) -> dict[str, float]:
    with open(scores_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    labels = np.array([int(r["label"]) for r in rows])
    scores = np.array([float(r["score"]) for r in rows])
    defects = np.array([r["defect"] for r in rows])
    good = labels == 0
    return {
        defect: float(image_auroc(labels[good | (defects == defect)], scores[good | (defects == defect)]))
        for defect in sorted(set(defects[~good]))
    }


def mask_areas(root, sizes: tuple[int, ...]) -> dict[str, dict[str, float]]:
    """Median defect area (pixels) and the share of masks under 4 pixels, per defect type and input size."""
    areas = defaultdict(list)
    for item in mtd_records(root, "test", seed=0):
        if item.label != 1:
            continue
        with Image.open(item.mask_path) as mask:
            binary = Image.fromarray((np.asarray(mask.convert("L")) > 127).astype(np.uint8) * 255)
        for size in sizes:
            resized = np.asarray(binary.resize((size, size), Image.BILINEAR), dtype=np.float64) / 255
            areas[(item.defect, size)].append(resized.sum())
    return {
        f"{defect}@{size}px": {"median_area": float(np.median(v)), "share_under_4px": float(np.mean(np.array(v) < 4))}
        for (defect, size), v in sorted(areas.items())
    }


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    root = require_data("mtd")
    runs = {}
    for run in RUNS:
        path = REPO / "benchmarks" / "_work" / run / "scores.csv"
        if path.is_file():
            runs[run] = per_defect_auroc(path)
        else:
            print(f"skipping {run}: {path} not found (run its benchmark first)")
    areas = mask_areas(root, (64, 256))
    defects = sorted({d for result in runs.values() for d in result})
    table = ["| run | " + " | ".join(defects) + " |", "|---" * (len(defects) + 1) + "|"]
    table += [f"| {run} | " + " | ".join(f"{r[d]:.3f}" for d in defects) + " |" for run, r in runs.items()]
    table += ["", "| defect @ size | median area (px) | share of masks under 4 px |", "|---|---|---|"]
    table += [f"| {k} | {v['median_area']:.1f} | {v['share_under_4px']:.2f} |" for k, v in areas.items()]
    print("\n".join(table))
    record("mtd_per_defect", {"data": "per defect type: mtd seed-0 test split", "runs": runs, "mask_areas": areas,
                              "table": ["Image AUROC per defect type (each against all good test images)", "",
                                        *table]})


if __name__ == "__main__":
    main()
