"""Metaformer's anomaly map, diagnosed without test labels: which map separates synthetic defects best.

    python benchmarks/metaformer_map_validation.py [--run benchmarks/_work/kshot_metaformer_cpu_universal-cpu_8]

Takes a fitted k-shot Metaformer run (default: the shipped universal-cpu model adapted on 8 MTD training
images), and validation images from the MTD *training* split that the run did not fit on (seeded, ``--n``),
each as it is and once with a synthetic surface defect (``--defects``, in turn; drawn at the camera's
resolution, then resized as the data pipeline does). The reconstruction Î is computed once; the maps compared:

- ``l2``: the paper's squared pixel gap (Metaformer's map today), Gaussian-smoothed;
- ``ssim``: 1 − local SSIM between I and Î (the MVTec AD paper's SSIM-AE map), smoothed alike;
- ``feature``: 1 − cosine between a frozen EfficientNet-Lite0's stage-2 and stage-3 maps of I and of Î (both
  upsampled to 256 px), upsampled and summed (the gap measured where a backbone sees structure);
- ``l2_standardized``: ``l2`` after both images are standardised for exposure (PatchCore's standardisation);
- ``lowpass_<s>``: the squared gap between I and Î after both are Gaussian-blurred by ``s`` pixels at 256 px
  (scaled with the model's size), then smoothed as ``l2``: the detail a 2×2-bottleneck autoencoder cannot
  rebuild differs on every tile but cancels in the blur, where a defect's darker or brighter region does not.

Image AUROC (map maximum), pixel AUROC and PRO per map, in ``results/metaformer_map_validation.json``.
No test image is read.
"""

from __future__ import annotations

import metaad  # noqa: F401  (first: OpenMP passive waiting must be set before torch)

# isort: split
import argparse
import random

import torch
import torch.nn.functional as F

from common import REPO, record, require_data
from metaad.components.smoothing import gaussian_blur
from metaad.components.ssim import ssim_map
from metaad.data.datasets import list_images
from metaad.data.source import DataSpec, select_shots, split_calibration
from metaad.data.synthetic import SURFACE_DEFECTS
from metaad.data.transforms import standardize_intensity
from metaad.metrics import evaluate
from metaad.models.persistence import load_model
from metaad.runs.layout import read_config
from metaad.runtime import set_threads
from patchcore_validation import validation_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", default=str(REPO / "benchmarks" / "_work" / "kshot_metaformer_cpu_universal-cpu_8"))
    parser.add_argument("--n", type=int, default=120, help="held-out defect-free training images")
    parser.add_argument("--defects", nargs="+", default=list(SURFACE_DEFECTS), choices=list(SURFACE_DEFECTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="metaformer_map_validation", help="result name (another run's)")
    args = parser.parse_args()
    set_threads(args.threads)
    require_data("mtd")
    dtd = require_data("dtd")
    config = read_config(args.run)
    model = load_model(args.run).eval()
    train = DataSpec(**config["data"]).records("train")
    fit, _ = split_calibration(train, config["calibration_fraction"], config["data"]["seed"])
    fitted = {r.path for r in select_shots(fit, config["shots"], config.get("shots_seed", config["data"]["seed"]))}
    held_out = [r for r in train if r.path not in fitted]
    held_out = random.Random(0).sample(held_out, min(args.n, len(held_out)))
    textures = sorted(p for folder in sorted((dtd / "train").iterdir()) for p in list_images(folder))
    images, masks, labels = validation_set(held_out, textures, 256, seed=0, defects=tuple(args.defects), native=True)

    side = model.image_size
    small = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    with torch.inference_mode():
        reconstruction = torch.cat([model(part) for part in small.split(32)])
    sigma = model.smoothing_sigma * side / 256

    def smooth(gap: torch.Tensor) -> torch.Tensor:
        return gaussian_blur(gap, sigma, truncate=3.0) if sigma > 0 else gap

    def up(maps: torch.Tensor) -> torch.Tensor:
        return F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]

    maps = {
        "l2": up(smooth((reconstruction - small).pow(2).mean(1, keepdim=True))),
        "l2_standardized": up(smooth(
            (standardize_intensity(reconstruction) - standardize_intensity(small)).pow(2).mean(1, keepdim=True)
        )),
    }
    for lowpass in (4, 8, 16):
        blur = lowpass * side / 256
        gap = (gaussian_blur(reconstruction.flatten(0, 1)[:, None], blur, truncate=3.0)
               - gaussian_blur(small.flatten(0, 1)[:, None], blur, truncate=3.0)).view_as(small)
        maps[f"lowpass_{lowpass}"] = up(smooth(gap.pow(2).mean(1, keepdim=True)))
    pad = 3
    padded = [F.pad(x, (pad,) * 4, mode="reflect") for x in (small, reconstruction)]
    maps["ssim"] = up(smooth(1 - ssim_map(*padded, window_size=2 * pad + 1).mean(1, keepdim=True)))
    with torch.inference_mode():  # the model's own "feature" map, on the same reconstruction
        feature_maps = [model.feature_gap(a, b) for a, b in zip(small.split(32), reconstruction.split(32), strict=True)]
    maps["feature"] = up(torch.cat(feature_maps)[:, None])

    results = {}
    for name, anomaly in maps.items():
        results[name] = evaluate(labels, anomaly.flatten(1).amax(1).numpy(), masks, anomaly.numpy())
        print(name, {k: round(v, 4) for k, v in results[name].items()}, flush=True)
    record(args.name, {
        "run": str(args.run), "validation": f"{len(held_out)} held-out MTD training images, each clean and with "
        f"one synthetic defect ({', '.join(args.defects)}, in turn)", "maps": results,
    })


if __name__ == "__main__":
    main()
