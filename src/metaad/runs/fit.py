"""A run: fit a model on defect-free images, set its thresholds, evaluate it, write the run folder
(:mod:`metaad.runs.layout`); and ``test``, a fitted run evaluated again on a labelled split.

A test split without defective images (a folder of good images only) is no obstacle: its defect-free
images join the held-out ones that set the threshold, the run is written, and ``metrics.json`` says why it
was not evaluated (``evaluation_skipped``).
"""

from __future__ import annotations

import math
import resource
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from torch.utils.data import DataLoader

from metaad import runtime
from metaad.data.datasets import AnomalyDataset, DataWarning
from metaad.data.source import DataSpec, run_split
from metaad.data.synthetic import CATEGORIES, make_synthetic_dataset
from metaad.data.tiles import TiledDataset, Tiling, tiled_image_size
from metaad.data.transforms import DEFAULT_IMAGE_SIZE
from metaad.device import on_device, select_device
from metaad.io import write_json
from metaad.models import create_model, get_config, registered_name
from metaad.models.persistence import load_model, save_model
from metaad.runs import layout
from metaad.runs.calibration import parse_target, threshold_for_target, unified_threshold_record
from metaad.runs.evaluation import (
    Predictions,
    add_category_metrics,
    add_threshold_outcome,
    compute_metrics,
    image_thresholds,
    predict_dataset,
)
from metaad.runs.report import write_report


def loading_size(model: nn.Module, requested: int | None = None) -> int:
    """The side images are loaded at: ``requested`` if given; else the model's working size (its
    ``image_size``) when that is larger than the papers' 256 px, so a photograph is resized once instead of
    down to 256 and up again; else 256. Metrics are computed at this size."""
    if requested is not None:
        return layout.checked_size(requested)
    return max(DEFAULT_IMAGE_SIZE, model.image_size or 0)


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
    calibration: str = "held-out",
    tiling: Tiling | None = None,
    resize: str = "stretch",
) -> dict[str, Any]:
    """Fit ``model`` on the training split, save it, set the thresholds, evaluate on the test split.

    ``calibration``: "held-out" sets the thresholds on ``calibration_fraction`` of the good training images
    kept out of the fit; "out-of-fold" fits on every good image and sets them on each image scored as if it
    had been held out (the method's ``out_of_fold``; PatchCore: the bank without that image's own patches), so
    that every good image both trains and calibrates.

    Images are loaded at ``image_size``, by default at :func:`loading_size` of the model. With ``tiling``
    (:mod:`metaad.data.tiles`) the model fits on the tiles of the training images, every image is scored through
    its tiles, and ``config.json`` records it for every later command; so it does ``resize`` ("stretch" or
    "pad": :class:`metaad.data.datasets.AnomalyDataset`); images are then loaded by default at
    the training images' median long side (:func:`metaad.data.tiles.tiled_image_size`). Trained methods
    checkpoint into ``out/training`` every epoch; ``resume`` continues an interrupted fit from there.
    ``shots`` draws a k-image subset with ``shots_seed`` (default: the split's seed), so that repeated
    k-shot runs over several subsets keep the same split. ``preset`` is only recorded in ``config.json`` (the
    model's parameters already include it). ``device`` ("cpu", "cuda" or "auto",
    :func:`metaad.device.select_device`) is where the model fits and scores; images are decoded on the
    CPU and each method moves its batches to its own device; the model is saved from the CPU and left there.
    """
    target = select_device(device)
    out = Path(out)
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {', '.join(CALIBRATIONS)}, got {calibration!r}")
    out_of_fold = calibration == "out-of-fold"
    if out_of_fold and not callable(getattr(model, "out_of_fold", None)):
        raise ValueError(f"{registered_name(model)} cannot score its training images out of fold; use "
                         "--calibration held-out")
    if out_of_fold and tiling is not None:
        raise ValueError("--calibration out-of-fold scores whole training images; with --tile use --calibration "
                         "held-out")
    split = run_split(data, 0.0 if out_of_fold else calibration_fraction, shots, shots_seed)
    if tiling is not None and image_size is None:
        image_size = tiled_image_size([record.path for record in split.fit], tiling)
    image_size = loading_size(model, image_size)
    train_set = AnomalyDataset(split.fit, image_size, on_error, resize)
    fit_set = train_set if tiling is None else TiledDataset(train_set, tiling, image_size)
    test_set = AnomalyDataset(split.test, image_size, on_error, resize)
    write_json(
        out / layout.CONFIG_FILE,
        {
            "model": registered_name(model),
            "preset": preset,
            "params": get_config(model),
            "data": vars(data),
            "categories": data.categories() if data.unified else None,
            "image_size": image_size,
            "resize": resize,
            "tiling": None if tiling is None else tiling.to_config(),
            "shots": shots,
            "shots_seed": data.seed if shots_seed is None else shots_seed,
            "calibration": calibration,
            "calibration_fraction": None if out_of_fold else calibration_fraction,
            "false_alarm_rate": false_alarm_rate,
            "batch_size": batch_size,
            "skip_bad_files": on_error == "skip",
            "n_train": len(train_set),
            "n_train_tiles": None if tiling is None else len(fit_set),
            "n_test": len(test_set),
            "device": str(target),
            "metaad_version": runtime.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        },
    )
    tic = time.perf_counter()
    model.to(target)
    model.fit(
        DataLoader(fit_set, batch_size=batch_size, shuffle=False),
        progress=progress,
        workdir=out / layout.TRAINING_DIR,
        resume=resume,
    )
    fit_seconds = time.perf_counter() - tic
    save_model(model.eval(), out / layout.MODEL_DIR)  # tensors are copied to the CPU as they are written
    fitted = model
    model = on_device(fitted, device)  # already there: no move
    thresholds: dict[str, Any] = {}
    (out / layout.THRESHOLD_FILE).unlink(missing_ok=True)  # a refit without calibration must not keep an old one
    held = None
    if out_of_fold:
        held = out_of_fold_predictions(fitted, train_set, batch_size)
    elif split.calibration:
        calibration_set = AnomalyDataset(split.calibration, image_size, on_error, resize)
        held = predict_dataset(model, calibration_set, batch_size, progress, desc="calibrate", tiling=tiling)
    if held is not None:
        calibration = held
        thresholds = unified_threshold_record(calibration, false_alarm_rate)
        if out_of_fold:
            thresholds["method"] = (
                "quantile of every good training image's out-of-fold score (each scored without its own "
                "contribution to the model)" + ("; per category under 'categories'" if "categories" in thresholds
                                                else "")
            )
        write_json(out / layout.THRESHOLD_FILE, thresholds)
        needed = math.ceil(1 / false_alarm_rate) if false_alarm_rate > 0 else 0
        if len(calibration.scores) < needed:
            warnings.warn(
                f"the threshold comes from {len(calibration.scores)} held-out good images: the "
                f"{1 - false_alarm_rate:.0%} quantile of so few scores is their maximum, not a {false_alarm_rate:g} "
                f"false-alarm rate (that needs {needed} or more); hold out more with --calibration-fraction, or set "
                "the threshold on labelled images with 'metaad test --set-threshold'",
                DataWarning, stacklevel=2,
            )
    predictions = predict_dataset(model, test_set, batch_size, progress, desc="evaluate", tiling=tiling)
    metrics = compute_metrics(predictions)
    decided_at = image_thresholds(predictions, thresholds)
    if "evaluation_skipped" not in metrics:  # else its images set the threshold
        add_threshold_outcome(metrics, predictions, decided_at)
    add_category_metrics(metrics, predictions, thresholds)
    metrics.update(
        fit_seconds=fit_seconds,
        ms_per_image=predictions.ms_per_image,
        ms_per_image_end_to_end=predictions.ms_per_image_end_to_end,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    metrics["fitted"] = fitted.fit_summary()  # decisions the fit took from the data, e.g. PatchCore's standardisation
    metrics["n_train"] = len(train_set)
    if tiling is not None:
        metrics["n_train_tiles"] = len(fit_set)
    if thresholds:
        metrics["threshold"] = thresholds["threshold"]
        metrics["n_calibration_images"] = thresholds["n_calibration_images"]
    write_report(
        out, predictions, metrics, thresholds.get("threshold"), pixel_threshold=thresholds.get("pixel_threshold"),
        image_thresholds=decided_at if isinstance(decided_at, np.ndarray) else None,
    )
    fitted.cpu()  # the caller's model comes back where it was saved from, whatever device scored it
    return metrics


CALIBRATIONS = ("held-out", "out-of-fold")


def out_of_fold_predictions(model: nn.Module, train_set: AnomalyDataset, batch_size: int) -> Predictions:
    """The model's out-of-fold scores and maps of the images it was just fitted on, as :class:`Predictions`."""
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=False)
    prediction = model.out_of_fold(loader)
    records = train_set.records
    n = len(records)
    return Predictions(
        [str(r.path) for r in records], np.zeros(n, dtype=int), ["good"] * n, prediction.scores.float().numpy(),
        prediction.maps.float().numpy(), np.zeros((n, 1, 1), np.uint8), 0.0, 0.0, np.ones(n, bool),
        [r.category for r in records],
    )


def test_run(
    run: str | Path,
    data: DataSpec,
    out: str | Path | None = None,
    image_size: int | None = None,
    batch_size: int = 16,
    on_error: str = "raise",
    progress: bool = True,
    device: str = "cpu",
    set_threshold: str | None = None,
) -> dict[str, Any]:
    """Evaluate a fitted run folder on ``data``'s test split; the report goes to ``out`` (default RUN/test).

    ``set_threshold`` ("miss-rate=R" or "false-alarm-rate=R") sets the run's image threshold from these
    labelled images instead (each category's own in a run of several) and writes it into the run's
    ``threshold.json``, so that ``predict``, ``export`` and ``serve`` use it; the calibrated one is kept
    there as ``calibrated_threshold``."""
    target = parse_target(set_threshold) if set_threshold is not None else None
    out = Path(out) if out is not None else Path(run) / layout.TEST_DIR
    layout.check_out_folder(out, "a report")
    model = on_device(load_model(run), device)
    config = layout.read_config(run)
    dataset = AnomalyDataset(data.records("test"), layout.run_image_size(run, image_size), on_error,
                             config.get("resize", "stretch"))
    tiling = Tiling.from_config(config.get("tiling"))  # the fit's tiles
    predictions = predict_dataset(model, dataset, batch_size, progress, tiling=tiling)
    metrics = compute_metrics(predictions)
    metrics["ms_per_image"] = predictions.ms_per_image
    thresholds = layout.read_thresholds(run)
    if target is not None:
        thresholds = set_target_threshold(run, thresholds, predictions, *target)
        metrics["threshold_set"] = thresholds["set_from_labelled"]
    decided_at = image_thresholds(predictions, thresholds)
    add_threshold_outcome(metrics, predictions, decided_at)
    add_category_metrics(metrics, predictions, thresholds)
    threshold, pixel_threshold = thresholds.get("threshold"), thresholds.get("pixel_threshold")
    write_report(out, predictions, metrics, threshold, pixel_threshold=pixel_threshold,
                 image_thresholds=decided_at if isinstance(decided_at, np.ndarray) else None)
    return metrics


test_run.__test__ = False  # a library function, not a pytest test


def set_target_threshold(run: str | Path, thresholds: dict, predictions, kind: str, rate: float) -> dict:
    """``threshold.json`` of ``run`` with its image threshold(s) set for a target on labelled predictions
    (:func:`metaad.runs.calibration.threshold_for_target`), written back atomically and returned."""
    updated = dict(thresholds)
    chosen = threshold_for_target(predictions.labels, predictions.scores, kind, rate)
    updated.setdefault("calibrated_threshold", thresholds.get("threshold"))
    updated["threshold"] = chosen["threshold"]
    updated["set_from_labelled"] = chosen
    updated["method"] = f"set on {len(predictions.labels)} labelled images for {chosen['target']} (metaad test)"
    groups = predictions.by_category()
    if thresholds.get("categories") and groups:
        categories = {}
        for name, record in thresholds["categories"].items():
            record = dict(record)
            if name in groups:
                own = threshold_for_target(groups[name].labels, groups[name].scores, kind, rate)
                record.setdefault("calibrated_threshold", record.get("threshold"))
                record.update(threshold=own["threshold"], set_from_labelled=own)
            categories[name] = record
        updated["categories"] = categories
    write_json(Path(run) / layout.THRESHOLD_FILE, updated)
    return updated


def benchmark(
    models: list[str],
    data: DataSpec,
    out: str | Path,
    preset: str | None = None,
    image_size: int | None = None,
    batch_size: int = 16,
    on_error: str = "raise",
    device: str = "cpu",
) -> dict[str, dict[str, Any]]:
    """Fit and evaluate each of ``models`` on ``data`` (every training image fitted, no threshold), one run
    folder each under ``out``, and ``out/benchmark.json`` with all their metrics."""
    results = {}
    for name in models:
        results[name] = fit_and_evaluate(
            create_model(name, preset),
            data,
            Path(out) / name,
            image_size=image_size,
            batch_size=batch_size,
            calibration_fraction=0.0,
            on_error=on_error,
            preset=preset,
            device=device,
        )
    write_json(Path(out) / "benchmark.json", results)
    return results


def demo(out: str | Path, category: str | None = None, preset: str | None = "cpu", say=print,
         progress: bool = True) -> dict[str, Any]:
    """The built-in synthetic data set written to ``out/data`` (once), PatchCore fitted on it, ``out/run``."""
    out = Path(out)
    category = category or CATEGORIES[0]
    root = out / "data"
    if not (root / category).is_dir():
        say(f"writing the synthetic data set '{category}' to {root}")
        make_synthetic_dataset(root, categories=[category])
    if preset == "cpu":
        say("fitting PatchCore with its CPU preset (--preset cpu; --preset paper for the paper's settings)")
    model = create_model("patchcore", preset)
    return fit_and_evaluate(model, DataSpec(str(root), "mvtec", category), out / "run", preset=preset,
                            progress=progress)

