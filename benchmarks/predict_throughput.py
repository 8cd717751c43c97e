"""``metaad predict`` end to end against the model's own time, on one run and one folder of images.

    python benchmarks/predict_throughput.py RUN IMAGES [--glob PATTERN] [--limit 40] [--repeats 3] [--name NAME]

Three times an image, each the median of ``--repeats`` passes over the same images after one warm-up batch:

- *model*: the fitted model scoring tensors already decoded at the run's size (what ``metaad test`` reports as
  ``ms_per_image``; tiled runs through their tiles);
- *scoring*: ``Run.iter_predict``, decoding each file, scoring, resizing the map to the image and finding its
  defect regions, writing nothing;
- *end to end*: ``predict_images`` (the path of ``metaad predict``) with the default outputs (CSV, regions,
  heat maps, masks, overlays) into a fresh folder.

The issue's bar is end to end ≤ 2x the model. Figures: ``benchmarks/results/predict_throughput_<name>.json``.
"""

from __future__ import annotations

import metaad  # noqa: F401  (first: OpenMP passive waiting must be set before torch)

# isort: split
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import record
from metaad.data.datasets import list_images, open_image
from metaad.data.transforms import pil_to_tensor
from metaad.deploy.inference import Run
from metaad.deploy.predict import predict_images
from metaad.runtime import set_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder written by metaad fit")
    parser.add_argument("images", type=Path, help="a folder of images (searched recursively)")
    parser.add_argument("--glob", default=None, help="only files matching this pattern (MTD: '*.jpg', not its masks)")
    parser.add_argument("--limit", type=int, default=40, help="the first N images (sorted by path)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--name", default=None, help="the result's name (default: the run folder's)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    set_threads(args.threads)
    paths = [path for path in list_images(args.images, recursive=True) if not args.glob or path.match(args.glob)]
    paths = paths[: args.limit]
    if not paths:
        raise SystemExit(f"no images under {args.images}")
    run = Run(args.run)
    side = run.image_size
    tensors = torch.stack([pil_to_tensor(open_image(path), side) for path in paths])
    batches = list(torch.split(tensors, args.batch_size))
    run.scorer.predict(batches[0][:4])  # warm-up: first-call allocations and thread start
    list(run.iter_predict(paths[:4], batch_size=args.batch_size))

    def model_pass() -> None:
        for batch in batches:
            run.scorer.predict(batch)

    def scoring_pass() -> None:
        for _ in run.iter_predict(paths, batch_size=args.batch_size):
            pass

    def end_to_end_pass() -> None:
        predict_images(run, paths, Path(tempfile.mkdtemp()) / "predict", batch_size=args.batch_size, progress=False)

    timings = {}
    for name, one_pass in (("model", model_pass), ("scoring", scoring_pass), ("end_to_end", end_to_end_pass)):
        seconds = []
        for _ in range(args.repeats):
            tic = time.perf_counter()
            one_pass()
            seconds.append(time.perf_counter() - tic)
        timings[f"{name}_ms_per_image"] = 1000 * statistics.median(seconds) / len(paths)
        print(f"{name}: {timings[f'{name}_ms_per_image']:.1f} ms an image "
              f"(passes: {', '.join(f'{s:.2f}' for s in seconds)} s)", flush=True)
    ratio = timings["end_to_end_ms_per_image"] / timings["model_ms_per_image"]
    sizes = sorted({open_image(path).size for path in paths})
    print(f"end to end / model = {ratio:.2f} (bar: 2.0); {len(paths)} images of {sizes[:3]} px")
    record(f"predict_throughput_{args.name or args.run.name}", {
        "run": str(args.run), "images": str(args.images), "n_images": len(paths),
        "image_sizes": [list(size) for size in sizes[:5]], "run_image_size": side,
        "tiled": run.tiling is not None, "repeats": args.repeats, **timings,
        "end_to_end_over_model": ratio, "images_per_second_end_to_end": 1000 / timings["end_to_end_ms_per_image"],
    })


if __name__ == "__main__":
    main()
