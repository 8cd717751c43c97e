"""Tiling on high-resolution images with defects of a few pixels: a run with ``--tile`` against one without.

    python benchmarks/tiling_benchmark.py [--model patchcore] [--size 1024] [--tile 256]

A synthetic set is generated under ``benchmarks/_work/`` in MVTec layout: metaad's three texture categories
(weave, grain, leather) rendered at ``--size`` px, their defective test images carrying one low-contrast
defect drawn at that resolution (``metaad.data.synthetic.draw_surface_defect``): pits 4-14 px across or
hairline scratches 1-2 px wide. Each category is fitted twice through ``metaad.runs.fit.fit_and_evaluate`` (the
path of ``metaad fit``), untiled (images loaded at ``--size``, shrunk by the model to its working size) and
tiled (``--tile`` px tiles of the ``--size`` px image, each at the model's working size), and evaluated on the
same test images; then ``metaad predict``'s path writes the default outputs for the test images at their own
size, timed end to end against the model's own time. Figures: ``benchmarks/results/tiling_<model>.json``.
"""

from __future__ import annotations

import metaad  # noqa: F401  (first: OpenMP passive waiting must be set before torch)

# isort: split
import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import REPO, parse_param, record
from metaad.data.source import DataSpec
from metaad.data.synthetic import IMAGE_MODES, TEXTURE_CATEGORIES, draw_surface_defect, generate_image
from metaad.data.tiles import Tiling
from metaad.deploy.predict import predict_images
from metaad.models import create_model
from metaad.runs.fit import fit_and_evaluate
from metaad.runtime import set_threads

DEFECTS = ("pit", "fine_scratch")


def make_set(root: Path, size: int, n_train: int, n_good: int, n_per_defect: int) -> None:
    """The high-resolution set, written once (a finished category folder is kept)."""
    for category in TEXTURE_CATEGORIES:
        target = root / category
        if target.is_dir():
            continue
        tmp = Path(tempfile.mkdtemp(dir=root.parent if root.is_dir() else None))
        grey = IMAGE_MODES[category] == "L"
        for i in range(n_train):
            _save(generate_image(category, i, None, size, 0, "train")[0], tmp / "train/good" / f"{i:03d}.png")
        for i in range(n_good):
            _save(generate_image(category, i, None, size, 0, "test")[0], tmp / "test/good" / f"{i:03d}.png")
        for d, defect in enumerate(DEFECTS):
            rng = np.random.default_rng(1000 + d)
            for i in range(n_per_defect):
                clean = generate_image(category, n_good + d * n_per_defect + i, None, size, 0, "test")[0]
                rgb = np.repeat(clean[..., None], 3, -1) if grey else clean
                drawn, mask = draw_surface_defect(rgb.astype(np.float32) / 255.0, defect, rng)
                image = np.rint(drawn * 255).astype(np.uint8)
                _save(image[..., 0] if grey else image, tmp / "test" / defect / f"{i:03d}.png")
                _save(mask.astype(np.uint8) * 255, tmp / "ground_truth" / defect / f"{i:03d}_mask.png")
        root.mkdir(parents=True, exist_ok=True)
        tmp.rename(target)


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="patchcore")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--size", type=int, default=1024, help="side of the generated images")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--n-train", type=int, default=40)
    parser.add_argument("--n-test-good", type=int, default=20)
    parser.add_argument("--n-test-per-defect", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    params = dict(parse_param(item) for item in args.param)
    work = REPO / "benchmarks" / "_work"
    root = work / f"tiling_{args.size}px_{args.n_train}_{args.n_test_good}_{args.n_test_per_defect}"
    tic = time.perf_counter()
    make_set(root, args.size, args.n_train, args.n_test_good, args.n_test_per_defect)
    print(f"data set ready in {time.perf_counter() - tic:.0f} s: {root}", flush=True)
    table: dict[str, dict] = {}
    for category in TEXTURE_CATEGORIES:
        for name, tiling in (("untiled", None), ("tiled", Tiling(args.tile, args.overlap))):
            out = work / f"tiling_run_{args.model}_{category}_{name}"
            shutil.rmtree(out, ignore_errors=True)
            metrics = fit_and_evaluate(
                create_model(args.model, args.preset, **params), DataSpec(str(root), "mvtec", category), out,
                image_size=args.size, progress=False, preset=args.preset, tiling=tiling,
            )
            test_images = sorted((root / category / "test").rglob("*.png"))
            tic = time.perf_counter()
            summary = predict_images(out, test_images, Path(tempfile.mkdtemp()) / "p", progress=False)
            end_to_end = 1000 * (time.perf_counter() - tic) / len(test_images)
            table.setdefault(category, {})[name] = {
                "image_auroc": metrics["image_auroc"], "pixel_auroc": metrics.get("pixel_auroc"),
                "pro": metrics.get("pro"), "fit_seconds": metrics["fit_seconds"],
                "ms_per_image": metrics["ms_per_image"], "n_train_tiles": metrics.get("n_train_tiles"),
                "predict_ms_per_image_end_to_end": end_to_end, "predict_images_per_second": summary.images_per_second,
            }
            print(category, name, {k: round(v, 3) if isinstance(v, float) else v
                                   for k, v in table[category][name].items()}, flush=True)
    means = {name: {key: float(np.mean([table[c][name][key] for c in table]))
                    for key in ("image_auroc", "pixel_auroc", "pro", "ms_per_image", "predict_ms_per_image_end_to_end")}
             for name in ("untiled", "tiled")}
    print("mean", means)
    record(f"tiling_{args.model}", {"size": args.size, "tile": args.tile, "overlap": args.overlap,
                                    "defects": list(DEFECTS), "per_category": table, "mean": means})


if __name__ == "__main__":
    main()
