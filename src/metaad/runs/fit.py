"""A run: pick the data, fit a model on defect-free images, set a threshold, evaluate, write the run folder.

Run folder layout::

    RUN/config.json      what was run (model, parameters, data, seeds)
    RUN/model/           model.json + model.safetensors (see checkpoint.py)
    RUN/training/        trained methods: checkpoint, train_log.jsonl, loss_curve.png (see metaad.training)
    RUN/threshold.json   the decision thresholds (image score, map value) and how they were set
    RUN/metrics.json, roc.png, pro.png, scores.csv, worst/   the report on the test split

A test split without defective images (a folder of good images only) is no obstacle: its defect-free
images join the held-out ones that set the threshold, the run is written, and ``metrics.json`` says why it
was not evaluated (``evaluation_skipped``).
"""

from __future__ import annotations

import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from metaad.data.datasets import (
    AnomalyDataset,
    DataError,
    ImageRecord,
    folder_records,
    mtd_records,
    mvtec_categories,
    mvtec_records,
    seeded_split,
)
from metaad.data.transforms import DEFAULT_IMAGE_SIZE
from metaad.device import on_device, select_device
from metaad.io import read_json, write_json
from metaad.models import get_config, registered_name
from metaad.models.persistence import save_model
from metaad.runs.evaluation import compute_metrics, predict_dataset
from metaad.runs.report import write_report

THRESHOLD_FILE = "threshold.json"


@dataclass
class DataSpec:
    """Where the data is: ``format`` is "mvtec" (root + category), "mtd" (root) or "folder"."""

    root: str
    format: str = "auto"
    category: str | None = None
    abnormal_dir: str | None = None
    mask_dir: str | None = None
    seed: int = 0

    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        root = Path(self.root)
        if (root / "MT_Free").is_dir():
            return "mtd"
        if self.category is not None or mvtec_categories(root):
            return "mvtec"
        return "folder"

    def records(self, split: str) -> list[ImageRecord]:
        fmt = self.resolved_format()
        if fmt == "mtd":
            return mtd_records(self.root, split, seed=self.seed)
        if fmt == "mvtec":
            if self.category is None:
                raise DataError(
                    f"{self.root}: MVTec-layout data needs --category; found: {', '.join(mvtec_categories(self.root))}"
                )
            return mvtec_records(self.root, self.category, split)
        if fmt == "folder":
            return folder_records(self.root, split, self.abnormal_dir, self.mask_dir, seed=self.seed)
        raise ValueError(f"unknown data format {fmt!r}: expected auto, mvtec, mtd or folder")


def split_calibration(records: list[ImageRecord], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a seeded ``fraction`` of the defect-free training images to set the threshold."""
    if fraction <= 0:
        return list(records), []
    n_held = max(1, round(len(records) * fraction)) if len(records) > 1 else 0
    return seeded_split(records, n_held, seed)


def loading_size(model: nn.Module, requested: int | None = None) -> int:
    """The side images are loaded at: ``requested`` if given; else the model's working size (its
    ``image_size``) when that is larger than the papers' 256 px, so a photograph is resized once instead of
    down to 256 and up again; else 256. Metrics are computed at this size."""
    if requested is not None:
        return _checked_size(requested)
    return max(DEFAULT_IMAGE_SIZE, getattr(model, "image_size", None) or 0)


def _checked_size(requested: int) -> int:
    if requested < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {requested}")
    return int(requested)


def select_shots(records: list[ImageRecord], shots: int | None, seed: int) -> list[ImageRecord]:
    """The k-shot protocol: a seeded random subset of k defect-free training images (all when None)."""
    if shots is None or shots >= len(records):
        return list(records)
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    return random.Random(seed).sample(list(records), shots)


def calibrate_threshold(good_scores: np.ndarray, false_alarm_rate: float = 0.01) -> float:
    """The (1 - false_alarm_rate) quantile of held-out defect-free scores: no test label is looked at."""
    if good_scores.size == 0:
        raise ValueError("no held-out defect-free images to set a threshold from")
    return float(np.quantile(good_scores, 1.0 - false_alarm_rate, method="higher"))


def calibrate_pixel_threshold(good_maps: np.ndarray, false_alarm_rate: float = 0.01) -> float:
    """The map value above which a pixel is predicted defective: the (1 - false_alarm_rate) quantile of the
    held-out defect-free images' map maxima, so that share of good images has no predicted defect pixel."""
    if good_maps.size == 0:
        raise ValueError("no held-out defect-free images to set a pixel threshold from")
    return calibrate_threshold(good_maps.reshape(len(good_maps), -1).max(axis=1), false_alarm_rate)


def threshold_record(calibration, false_alarm_rate: float) -> dict[str, Any]:
    """What ``threshold.json`` holds, from the held-out defect-free images' :class:`Predictions`."""
    return {
        "threshold": calibrate_threshold(calibration.scores, false_alarm_rate),
        "false_alarm_rate": false_alarm_rate,
        "n_calibration_images": len(calibration.scores),
        "method": "quantile of held-out defect-free training images' scores",
        "score_low": float(np.min(calibration.scores)),
        "pixel_threshold": calibrate_pixel_threshold(calibration.maps, false_alarm_rate),
        "pixel_method": "the same quantile of held-out defect-free training images' map maxima",
        "map_low": float(np.percentile(calibration.maps, 1)),
    }


def fit_and_evaluate(
    model: nn.Module,
    data: DataSpec,
    out: str | Path,
    image_size: int | None = None,
    shots: int | None = None,
    calibration_fraction: float = 0.1,
    false_alarm_rate: float = 0.01,
    batch_size: int = 16,
    on_error: str = "raise",
    progress: bool = True,
    resume: bool = False,
    preset: str | None = None,
    device: str = "cpu",
    shots_seed: int | None = None,
) -> dict[str, Any]:
    """Fit ``model`` on the training split, save it, set the thresholds, evaluate on the test split.

    Images are loaded at ``image_size``, by default at :func:`loading_size` of the model. Trained methods
    checkpoint into ``out/training`` every epoch; ``resume`` continues an interrupted fit from there.
    ``shots`` draws a k-image subset with ``shots_seed`` (default: the split's seed), so that repeated
    k-shot runs over several subsets keep the same split. ``preset`` is only recorded in ``config.json`` (the
    model's parameters already include it). ``device`` ("cpu", "cuda" or "auto",
    :func:`metaad.device.select_device`) is where the model fits and scores; images are decoded on the
    CPU and each method moves its batches to its own device; the model is saved from the CPU and left there.
    """
    target = select_device(device)
    out = Path(out)
    image_size = loading_size(model, image_size)
    train_records = data.records("train")
    test_records = data.records("test")
    fit_records, calibration_records = split_calibration(train_records, calibration_fraction, data.seed)
    shots_seed = data.seed if shots_seed is None else shots_seed
    fit_records = select_shots(fit_records, shots, shots_seed)
    if calibration_records and not any(r.label for r in test_records):  # nothing to evaluate: calibrate on all
        calibration_records = calibration_records + test_records
    train_set = AnomalyDataset(fit_records, image_size, on_error)
    test_set = AnomalyDataset(test_records, image_size, on_error)
    write_json(
        out / "config.json",
        {
            "model": registered_name(model),
            "preset": preset,
            "params": get_config(model),
            "data": vars(data),
            "image_size": image_size,
            "shots": shots,
            "shots_seed": shots_seed,
            "calibration_fraction": calibration_fraction,
            "false_alarm_rate": false_alarm_rate,
            "batch_size": batch_size,
            "skip_bad_files": on_error == "skip",
            "n_train": len(train_set),
            "n_test": len(test_set),
            "device": str(target),
        },
    )
    tic = time.perf_counter()
    model.to(target)
    model.fit(
        DataLoader(train_set, batch_size=batch_size, shuffle=False),
        progress=progress,
        workdir=out / "training",
        resume=resume,
    )
    fit_seconds = time.perf_counter() - tic
    model.eval().cpu()
    save_model(model, out / "model")
    fitted = model
    model = on_device(fitted, device)
    threshold = pixel_threshold = None
    (out / THRESHOLD_FILE).unlink(missing_ok=True)  # a refit without calibration must not keep an old one
    if calibration_records:
        calibration_set = AnomalyDataset(calibration_records, image_size, on_error)
        calibration = predict_dataset(model, calibration_set, batch_size, progress, desc="calibrate")
        record = threshold_record(calibration, false_alarm_rate)
        threshold, pixel_threshold = record["threshold"], record["pixel_threshold"]
        write_json(out / THRESHOLD_FILE, record)
    predictions = predict_dataset(model, test_set, batch_size, progress, desc="evaluate")
    metrics = compute_metrics(predictions)
    if threshold is not None and "evaluation_skipped" not in metrics:  # else its images set the threshold
        decided = predictions.scores > threshold
        metrics["accuracy_at_threshold"] = float(np.mean(decided == (predictions.labels == 1)))
    metrics.update(
        fit_seconds=fit_seconds,
        ms_per_image=predictions.ms_per_image,
        ms_per_image_end_to_end=predictions.ms_per_image_end_to_end,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    if hasattr(fitted, "fit_summary"):  # decisions the fit took from the data, e.g. PatchCore's standardisation
        metrics["fitted"] = fitted.fit_summary()
    write_report(out, predictions, metrics, threshold, pixel_threshold=pixel_threshold)
    fitted.cpu()  # the caller's model comes back where it was saved from, whatever device scored it
    return metrics


def run_image_size(run: str | Path, requested: int | None = None) -> int:
    """The side a run's model was fitted and evaluated at (its ``config.json``), unless ``requested``."""
    if requested is not None:
        return _checked_size(requested)
    config_path = Path(run) / "config.json"
    if not config_path.is_file():
        return DEFAULT_IMAGE_SIZE
    return int(read_json(config_path).get("image_size", DEFAULT_IMAGE_SIZE))


def read_threshold(run: str | Path) -> float | None:
    """The calibrated threshold of a run folder, or None if it has none."""
    return read_thresholds(run).get("threshold")


def read_thresholds(run: str | Path) -> dict[str, Any]:
    """A run's ``threshold.json`` (see :func:`threshold_record`; older runs hold the image threshold only),
    or an empty dict when the run has no threshold."""
    path = Path(run) / THRESHOLD_FILE
    return read_json(path) if path.is_file() else {}


def read_config(run: str | Path) -> dict[str, Any]:
    """A run's ``config.json`` (what was fitted, on which data), or an empty dict for a bare model folder."""
    path = Path(run) / "config.json"
    return read_json(path) if path.is_file() else {}


def set_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads in torch and faiss (default: all cores)."""
    if threads:
        torch.set_num_threads(threads)
        import faiss

        faiss.omp_set_num_threads(threads)
