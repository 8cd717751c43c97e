"""Seconds per MAML outer step, first against second order, for an equal-wall-time comparison.

    python benchmarks/maml_order_timing.py [--image-size 64] [--width 0.125] [--repeats 6] [--threads 1]

One outer step of ``metaad meta-train``'s cpu preset (4 tasks, support and query batches of 16, A+P+T, one
inner SGD step) on random images and cached priors, first and second order interleaved so that both see the
same machine load; the first step of each is warm-up. The ratio of the medians sets how many first-order
epochs match the second-order schedule's wall time. No data is read.
"""

from __future__ import annotations

import metaad  # noqa: F401  (first: OpenMP passive waiting must be set before torch)

# isort: split
import argparse
import statistics
import time

import torch

from common import record
from metaad.models.metaformer.maml import MetaTrainConfig, meta_step, metaformer_loss
from metaad.models.metaformer.model import Metaformer
from metaad.runtime import set_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)
    model = Metaformer(init=None, prior="center-bias", image_size=args.image_size, width_multiplier=args.width)
    loss_fn = metaformer_loss(model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    preset = MetaTrainConfig.PRESETS["cpu"]
    side = args.image_size

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.rand(preset["batch_size"], 3, side, side), torch.rand(preset["batch_size"], 1, side, side)

    tasks = [(batch(), batch()) for _ in range(MetaTrainConfig.tasks_per_step)]
    seconds: dict[str, list[float]] = {"first_order": [], "second_order": []}
    for _ in range(args.repeats):
        for order in seconds:
            config = MetaTrainConfig(**{**preset, "first_order": order == "first_order"})
            began = time.perf_counter()
            meta_step(model, optimizer, loss_fn, tasks, config)
            seconds[order].append(round(time.perf_counter() - began, 3))
    medians = {order: statistics.median(values[1:]) for order, values in seconds.items()}
    results = {
        "image_size": side,
        "width_multiplier": args.width,
        "threads": args.threads,
        "seconds_per_step": seconds,
        "median_seconds_per_step": medians,
        "second_over_first": round(medians["second_order"] / medians["first_order"], 3),
    }
    print(results)
    record("maml_order_timing", results)


if __name__ == "__main__":
    main()
