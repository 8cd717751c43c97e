"""Where PatchCore's inference time goes on Magnetic Tile Defects: backbone, search, whole predict.

    python benchmarks/patchcore_profile.py [--run benchmarks/_work/mtd_patchcore] [--images 64]

Loads the model that ``mtd_benchmark.py`` fitted and saved in its run folder, takes the first ``--images``
test images, and times per image (batches of the model's ``batch_size``, fastest of three passes): the
backbone alone on the padded input, in channels-last memory (as the model runs it) and in the default
contiguous layout; ``embed`` (the backbone plus standardisation, padding and aggregation); the
nearest-neighbour search of those patches at ``nprobe`` 16 and 8; and the whole ``predict``. Writes
``benchmarks/results/patchcore_profile.json``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import metaad  # noqa: F401  (first, as in mtd_benchmark.py: OpenMP passive waiting needs it before torch/faiss)

# isort: split
import torch
import torch.nn.functional as F

from common import REPO, record, require_data
from metaad.components.knn import SearchCache
from metaad.data.datasets import AnomalyDataset, mtd_records
from metaad.models.persistence import load_model
from metaad.runtime import set_threads


def ms_per_image(step: Callable[[torch.Tensor], object], images: torch.Tensor, batch_size: int, passes: int = 3):
    """Milliseconds per image of ``step`` over ``images`` in batches: the fastest of ``passes`` passes, after a
    warm-up batch (the minimum is the least disturbed by whatever else the machine does)."""
    step(images[:batch_size])
    best = float("inf")
    for _ in range(passes):
        tic = time.perf_counter()
        for batch in images.split(batch_size):
            step(batch)
        best = min(best, time.perf_counter() - tic)
    return 1000 * best / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", default=str(REPO / "benchmarks" / "_work" / "mtd_patchcore"))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    root = require_data("mtd")
    model = load_model(args.run)
    test = AnomalyDataset(mtd_records(root, "test", seed=0)[: args.images])
    images = torch.stack([test[i]["image"] for i in range(len(test))])
    size, border = model.batch_size, model.border_padding
    padded = F.pad(images, (border,) * 4, mode="reflect") if border else images
    extractor = model.feature_extractor
    timings: dict[str, float] = {}
    with torch.inference_mode():
        timings["backbone_channels_last"] = ms_per_image(extractor, padded, size)
        extractor.model.to(memory_format=torch.contiguous_format)
        timings["backbone_contiguous"] = ms_per_image(
            lambda x: extractor.model(extractor.normalize(x).contiguous()), padded, size
        )
        extractor.model.to(memory_format=torch.channels_last)
        timings["embed"] = ms_per_image(model.embed, images, size)
        features = torch.cat([model.embed(batch) for batch in images.split(size)])
    queries = features.permute(0, 2, 3, 1).reshape(len(images), -1, features.shape[1])
    for nprobe in (16, 8):
        # a fresh cache: the index for this nprobe is built in ms_per_image's warm-up batch, not in a timed pass
        model.nprobe, model._indexes = nprobe, SearchCache()
        timings[f"search_nprobe{nprobe}"] = ms_per_image(
            lambda q: model._search(q.reshape(-1, q.shape[-1]).contiguous(), k=1), queries, size
        )
    model.nprobe, model._indexes = 16, SearchCache()
    timings["predict"] = ms_per_image(model.predict, images, size)
    for key, value in timings.items():
        print(f"{key:>24}: {value:.1f} ms an image")
    record("patchcore_profile", {
        "data": f"MTD seed-0 test split, first {len(images)} images, {images.shape[-1]} px "
        f"({padded.shape[-1]} px with border padding); model from {args.run}",
        "ms_per_image": timings,
    })


if __name__ == "__main__":
    main()
