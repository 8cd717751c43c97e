"""ONNX export against metaad on the Magnetic Tile Defects test split, for any method's MTD run folder.

    python benchmarks/export_parity.py                       # PatchCore (below)
    python benchmarks/export_parity.py --run benchmarks/_work/mtd_draem

Exports the run, scores the test split with metaad and with onnxruntime, and reports the largest relative
score difference, the decisions at the run's threshold (a run fitted without a calibration hold-out has none:
then at the F1-max threshold of metaad's scores), the map difference and ms/image for each (``--threads``
cores, batches of ``--batch`` images), in ``results/export_parity_<method>.json``. A method whose banks are
searched with IVF (``ivf*`` buffers: multiscale_patch's large banks) is compared as PatchCore is: the export's
exact search against metaad's exact search, the as-fitted IVF search beside it.

PatchCore (``results/export_parity.json``) needs a run folder with a threshold (``metaad fit --model patchcore
--data ../shared/data/mtd --param search=exact --out benchmarks/_work/mtd_patchcore_exact_export``); metaad
scores it with exact search, as the export does, and with the default IVF search over the same bank; then the
exported exact search is timed for larger banks (the run's bank tiled with noise), to see where it stops being
practical.
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
from metaad.data.source import DataSpec
from metaad.deploy.export import export_onnx, export_run, onnx_session, run_onnx
from metaad.metrics import f1_max, image_auroc
from metaad.models.persistence import load_model
from metaad.runs.layout import read_config, read_threshold, run_image_size
from metaad.runtime import set_threads


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
    method = read_config(run)["model"]
    threshold = read_threshold(run)
    if threshold is None and method == "patchcore":
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

    patchcore = method == "patchcore"
    as_fitted = None
    if not patchcore and _ivf_buffers(model):  # the export searches exactly: compare with metaad's exact search
        as_fitted = _metaad(model, images, args.batch, exact=None)
        _empty_ivf_buffers(model)
    exact_scores, exact_maps, exact_ms = _metaad(model, images, args.batch, exact=True if patchcore else None)
    session = onnx_session(onnx_path, args.threads)
    onnx_scores, onnx_maps, onnx_ms = _onnx(session, images.numpy(), args.batch)
    threshold_source = "the run's threshold.json"
    if threshold is None:
        threshold, threshold_source = _f1_max_threshold(labels, exact_scores), "F1-max of metaad's scores"
    relative = np.abs(onnx_scores - exact_scores) / np.maximum(np.abs(exact_scores), 1e-12)
    results = {
        "method": method,
        "run": os.path.relpath(run, REPO),
        "n_images": len(images),
        "threshold": threshold,
        "threshold_source": threshold_source,
        "export_seconds": export_seconds,
        "onnx_megabytes": os.path.getsize(onnx_path) / 2**20,
        "export_check": metadata["export_check"],
        "onnx_vs_metaad": {
            "max_relative_score_difference": float(relative.max()),
            "median_relative_score_difference": float(np.median(relative)),
            "images_over_1e-4": int(np.sum(relative > 1e-4)),
            "worst_image": str(data.records[int(relative.argmax())].path),
            "identical_decisions": bool(np.array_equal(onnx_scores > threshold, exact_scores > threshold)),
            "decisions_differing": int(np.sum((onnx_scores > threshold) != (exact_scores > threshold))),
            "max_map_difference": float(np.abs(onnx_maps - exact_maps).max()),
            "map_range": float(exact_maps.max() - exact_maps.min()),
            "image_auroc_onnx": image_auroc(labels, onnx_scores),
            "image_auroc_metaad": image_auroc(labels, exact_scores),
        },
        "ms_per_image": {"onnxruntime": onnx_ms, "metaad": exact_ms},
        "threads": args.threads,
        "batch": args.batch,
    }
    if as_fitted is not None:
        ivf_scores, _, ivf_ms = as_fitted
        relative_ivf = np.abs(ivf_scores - exact_scores) / np.maximum(np.abs(exact_scores), 1e-12)
        results["metaad_search"] = "exact (the IVF centroids emptied, as the export searches)"
        results["ms_per_image"]["metaad_ivf"] = ivf_ms
        results["ivf_vs_exact"] = {
            "max_relative_score_difference": float(relative_ivf.max()),
            "median_relative_score_difference": float(np.median(relative_ivf)),
            "decisions_differing": int(np.sum((ivf_scores > threshold) != (exact_scores > threshold))),
            "image_auroc_ivf": image_auroc(labels, ivf_scores),
        }
    if not patchcore:
        print(results)
        record(f"export_parity_{method}", results)
        return
    ivf_scores, _, ivf_ms = _metaad(model, images, args.batch, exact=False)
    results.update({
        "memory_bank": list(model.memory_bank.shape),
        "ivf_vs_exact": {
            "max_relative_score_difference": float((np.abs(ivf_scores - exact_scores) / np.abs(exact_scores)).max()),
            "median_relative_score_difference": float(np.median(np.abs(ivf_scores - exact_scores) / exact_scores)),
            "decisions_differing": int(np.sum((ivf_scores > threshold) != (exact_scores > threshold))),
            "image_auroc_ivf": image_auroc(labels, ivf_scores),
        },
        "ms_per_image": {"onnxruntime": onnx_ms, "metaad_exact": exact_ms, "metaad_ivf": ivf_ms},
        "bank_sweep": _bank_sweep(model, images[: args.bank_images], size, args),
    })
    print(results)
    record("export_parity", results)


def _metaad(model, images, batch, exact: bool | None):
    """metaad's scores and maps and ms/image (the model alone); for PatchCore (``exact`` not None) with exact or
    IVF search over the same bank."""
    if exact is not None:
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


def _ivf_buffers(model) -> list[str]:
    """Names of the model's non-empty IVF centroid buffers (``ivf*``; empty means exact search)."""
    return [name for name, buffer in model.named_buffers() if name.rsplit(".", 1)[-1].startswith("ivf") and
            buffer.numel()]


def _empty_ivf_buffers(model) -> None:
    """Empty every IVF centroid buffer: the model then searches its banks exactly, as the export does."""
    for name in _ivf_buffers(model):
        owner, _, attribute = name.rpartition(".")
        module = model.get_submodule(owner)
        centroids = getattr(module, attribute)
        setattr(module, attribute, centroids.new_empty(0, centroids.shape[1]))


def _f1_max_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The F1-max threshold, moved half-way to the next lower score so that no image sits exactly on it."""
    _, threshold = f1_max(labels, scores)
    below = scores[scores < threshold]
    return float((threshold + below.max()) / 2) if len(below) else float(threshold)


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
