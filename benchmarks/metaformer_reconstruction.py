"""Where Metaformer's reconstruction error goes on Magnetic Tile Defects: good tiles, defects, around them.

    python benchmarks/metaformer_reconstruction.py [--runs NAME ...]

Loads adapted models from the run folders that ``mtd_kshot.py`` writes (``benchmarks/_work/kshot_<run>_all``)
and measures, on the seed-0 test split at the model's input size, the mean squared gap |Î − I|² (channel
mean, before smoothing) on good images, inside defect masks and outside them on defective images. For
scale, the same gap for a Gaussian blur of the input (σ = 1 px), a "reconstruction" that keeps everything
but the finest detail. Writes ``benchmarks/results/metaformer_reconstruction.json``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from common import REPO, record, require_data
from metaad.components.smoothing import gaussian_blur
from metaad.data.datasets import AnomalyDataset, mtd_records
from metaad.models.persistence import load_model
from metaad.runtime import set_threads


@torch.no_grad()
def gaps(model, loader) -> dict[str, float]:
    sums = {"good": [0.0, 0], "defect_inside_mask": [0.0, 0], "defect_outside_mask": [0.0, 0], "blur_good": [0.0, 0]}
    for batch in loader:
        images = model._resize(batch["image"])
        target = images
        gap = (model(images) - target).pow(2).mean(1)
        blur = gaussian_blur(target.flatten(0, 1)[:, None], 1.0).view_as(target)
        blur_gap = (blur - target).pow(2).mean(1)
        mask = F.interpolate(batch["mask"].float(), size=gap.shape[-2:], mode="area")[:, 0] > 0.5
        good = batch["label"] == 0
        for key, values in (
            ("good", gap[good]),
            ("blur_good", blur_gap[good]),
            ("defect_inside_mask", gap[~good][mask[~good]]),
            ("defect_outside_mask", gap[~good][~mask[~good]]),
        ):
            sums[key][0] += float(values.sum())
            sums[key][1] += values.numel()
    return {key: total / max(count, 1) for key, (total, count) in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", nargs="+", default=["metaformer_cpu_universal-cpu", "metaformer_cpu_random-init"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    root = require_data("mtd")
    loader = DataLoader(AnomalyDataset(mtd_records(root, "test", seed=0)), batch_size=32)
    results = {}
    for run in args.runs:
        folder = REPO / "benchmarks" / "_work" / f"kshot_{run}_all"
        if not (folder / "model").is_dir():
            print(f"skipping {run}: no adapted model in {folder} (run mtd_kshot.py first)")
            continue
        results[run] = gaps(load_model(folder).eval(), loader)
        print(run, results[run], flush=True)
    columns = ["good", "defect_inside_mask", "defect_outside_mask", "blur_good"]
    table = [
        "Mean squared reconstruction gap on the MTD test split (all training images adapted; [0, 1] RGB)",
        "",
        "| run | " + " | ".join(columns) + " | inside / outside |",
        "|---" * (len(columns) + 2) + "|",
    ]
    table += [
        f"| {run} | " + " | ".join(f"{r[c]:.5f}" for c in columns)
        + f" | {r['defect_inside_mask'] / r['defect_outside_mask']:.2f} |"
        for run, r in results.items()
    ]
    print("\n".join(table))
    record("metaformer_reconstruction", {"data": "mtd seed-0 test split, reconstruction gaps", "results": results,
                                         "table": table})


if __name__ == "__main__":
    main()
