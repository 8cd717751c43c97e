"""Epoch time with and without the frozen-feature cache, on MTD's 762 training images (seed-0 split).

    python benchmarks/feature_cache_timing.py [--models reverse_distillation fastflow] [--epochs 2]

Each method, at its defaults, is fitted twice for ``--epochs`` epochs: with the cache (the backbone runs once,
before the first epoch) and with ``METAAD_FEATURE_CACHE=off`` (the backbone runs on every batch of every epoch,
as before the cache). Records each epoch's seconds (the loop's ``train_log.jsonl``), the fit's total and the
extraction's share in ``benchmarks/results/feature_cache_timing.json``. No test image is read.
"""

from __future__ import annotations

import metaad  # noqa: F401  (first: OpenMP passive waiting must be set before torch)

# isort: split
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from common import parse_param, record, require_data
from metaad.components import feature_cache
from metaad.data.datasets import mtd_records
from metaad.data.transforms import pil_to_tensor
from metaad.models import create_model, get_config
from metaad.runs.fit import loading_size
from metaad.runtime import set_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["reverse_distillation", "fastflow"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    root = require_data("mtd")
    params = dict(parse_param(item) for item in args.param)
    results = {}
    for name in args.models:
        size = loading_size(create_model(name, **params))
        images = torch.stack([pil_to_tensor(Image.open(r.path), size) for r in mtd_records(root, "train", seed=0)])
        results[name] = {}
        for cached in (True, False):
            os.environ[feature_cache.ENV_DIRECTORY] = "" if cached else "off"
            model = create_model(name, **{**params, "epochs": args.epochs})
            with tempfile.TemporaryDirectory() as workdir:
                tic = time.perf_counter()
                model.fit(images, workdir=workdir)
                total = time.perf_counter() - tic
                log = [json.loads(line) for line in (Path(workdir) / "train_log.jsonl").read_text().splitlines()]
            epochs = [r["seconds"] for r in log]
            results[name]["cached" if cached else "uncached"] = {
                "epoch_seconds": epochs, "fit_seconds": round(total, 1),
                "seconds_outside_epochs": round(total - sum(epochs), 1),  # weights, exposure pass, extraction
                "config": get_config(model),
            }
            print(name, "cached" if cached else "uncached", results[name], flush=True)
    record("feature_cache_timing", {"data": f"MTD seed-0 training split ({len(images)} images)", "params": params,
                                    "epochs": args.epochs, "results": results})


if __name__ == "__main__":
    main()
