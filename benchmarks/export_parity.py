"""ONNX export against metaad on the Magnetic Tile Defects test split, and how large a bank it stays practical for.

Needs a PatchCore run folder with a threshold (``metaad fit --model patchcore --data ../shared/data/mtd
--param search=exact --out benchmarks/_work/mtd_patchcore_exact_export``). Exports it, scores the test split with
metaad (exact search, as the export does; and with the default IVF search over the same bank) and with
onnxruntime, and reports the largest relative score difference, the decisions at the run's threshold, the map
difference and ms/image for each (``--threads`` cores, batches of ``--batch`` images). Then times the exported
exact search for larger banks (the run's bank tiled with noise), to see where it stops being practical.
"""

import metaad  # noqa: F401  (first: OpenMP passive waiting, hence multi-threaded faiss, needs it before torch)

# isort: split
import argparse
import os
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from common import REPO, record, require_data
from metaad.components.knn import train_ivf_centroids
from metaad.data.datasets import AnomalyDataset
from metaad.engine.checkpoint import load_model
from metaad.engine.export import export_onnx, export_run, onnx_session, run_onnx
from metaad.engine.run import DataSpec, read_threshold, run_image_size, set_threads
from metaad.metrics import image_auroc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", default=str(REPO / "benchmarks" / "_work" / "mtd_patchcore_exact_export"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--bank-sizes", type=int, nargs="*", default=[300_000])
    parser.add_argument("--bank-images", type=int, default=4, help="images timed per bank size")
    args = parser.parse_args()
    set_threads(args.threads)
    root = require_data("mtd")
    run = args.run
    threshold = read_threshold(run)
    if threshold is None:
        raise SystemExit(f"{run}: no threshold.json; fit with metaad fit (it holds out images to set one)")
    onnx_path = os.path.join(run, "model.onnx")
    tic = time.perf_counter()
    metadata = export_run(run, onnx_path)
    export_seconds = time.perf_counter() - tic
    model = load_model(run)
    size = run_image_size(run)
    data = AnomalyDataset(DataSpec(str(root), "mtd", seed=0).records("test"), size)
    images, labels = [], []
    for batch in DataLoader(data, batch_size=32):
        images.append(batch["image"])
        labels.append(batch["label"])
    images, labels = torch.cat(images), torch.cat(labels).numpy()

    exact_scores, exact_maps, exact_ms = _metaad(model, images, args.batch, exact=True)
    session = onnx_session(onnx_path, args.threads)
    onnx_scores, onnx_maps, onnx_ms = _onnx(session, images.numpy(), args.batch)
    ivf_scores, _, ivf_ms = _metaad(model, images, args.batch, exact=False)
    relative = np.abs(onnx_scores - exact_scores) / np.abs(exact_scores)
    results = {
        "run": os.path.relpath(run, REPO),
        "n_images": len(images),
        "threshold": threshold,
        "memory_bank": list(model.memory_bank.shape),
        "export_seconds": export_seconds,
        "onnx_megabytes": os.path.getsize(onnx_path) / 2**20,
        "export_check": metadata["export_check"],
        "onnx_vs_exact": {
            "max_relative_score_difference": float(relative.max()),
            "identical_decisions": bool(np.array_equal(onnx_scores > threshold, exact_scores > threshold)),
            "decisions_differing": int(np.sum((onnx_scores > threshold) != (exact_scores > threshold))),
            "max_map_difference": float(np.abs(onnx_maps - exact_maps).max()),
            "map_range": float(exact_maps.max() - exact_maps.min()),
            "image_auroc_onnx": image_auroc(labels, onnx_scores),
            "image_auroc_exact": image_auroc(labels, exact_scores),
        },
        "ivf_vs_exact": {
            "max_relative_score_difference": float((np.abs(ivf_scores - exact_scores) / np.abs(exact_scores)).max()),
            "median_relative_score_difference": float(np.median(np.abs(ivf_scores - exact_scores) / exact_scores)),
            "decisions_differing": int(np.sum((ivf_scores > threshold) != (exact_scores > threshold))),
            "image_auroc_ivf": image_auroc(labels, ivf_scores),
        },
        "ms_per_image": {"onnxruntime": onnx_ms, "metaad_exact": exact_ms, "metaad_ivf": ivf_ms},
        "threads": args.threads,
        "batch": args.batch,
        "bank_sweep": _bank_sweep(model, images[: args.bank_images], size, args),
    }
    print(results)
    record("export_parity", results)


def _metaad(model, images, batch, exact: bool):
    """metaad's scores and maps, exact or IVF search over the same bank, and ms/image (the model alone)."""
    width = model.memory_bank.shape[1]
    model.ivf_centroids = torch.empty(0, width) if exact else train_ivf_centroids(model.memory_bank, model.seed)
    scores, maps = [], []
    tic = time.perf_counter()
    for part in images.split(batch):
        prediction = model.predict(part)
        scores.append(prediction.scores)
        maps.append(prediction.maps)
    ms = 1000 * (time.perf_counter() - tic) / len(images)
    return torch.cat(scores).numpy(), torch.cat(maps).numpy(), ms


def _onnx(session, images: np.ndarray, batch: int):
    scores, maps = [], []
    tic = time.perf_counter()
    for start in range(0, len(images), batch):
        s, m = run_onnx(session, images[start : start + batch])
        scores.append(s)
        maps.append(m)
    return np.concatenate(scores), np.concatenate(maps), 1000 * (time.perf_counter() - tic) / len(images)


def _bank_sweep(model, images, size, args) -> list[dict]:
    """ms/image and file size of the exported exact search as the bank grows (the bank tiled with noise)."""
    bank = model.memory_bank.clone()
    rows = []
    for n in args.bank_sizes:
        generator = torch.Generator().manual_seed(n)
        tiled = bank[torch.arange(n) % bank.shape[0]]
        model.memory_bank = tiled + 0.01 * tiled.std() * torch.randn(tiled.shape, generator=generator)
        path = os.path.join(args.run, f"bank_{n}.onnx")
        export_onnx(model, path, size, check_images=images[:3])
        session = onnx_session(path, args.threads)
        run_onnx(session, images[:1].numpy())  # warm-up
        _, _, ms = _onnx(session, images.numpy(), args.batch)
        rows.append({"bank": n, "ms_per_image": ms, "onnx_megabytes": os.path.getsize(path) / 2**20})
        os.remove(path)
        print(rows[-1], flush=True)
    model.memory_bank = bank
    return rows


if __name__ == "__main__":
    main()
