"""The run folder, in one place: what ``metaad fit`` writes and everything else reads.

::

    RUN/config.json      what was run (model, parameters, data, seeds)
    RUN/model/           model.json + model.safetensors (metaad.models.persistence)
    RUN/training/        trained methods: checkpoint, train_log.jsonl, loss_curve.png (metaad.training)
    RUN/threshold.json   the decision thresholds (image score, map value) and how they were set
    RUN/metrics.json, report.html, roc.png, pro.png, scores.csv, worst/   the report on the test split
    RUN/report_files/    the full-size pictures report.html's thumbnails open
    RUN/test/            the report of a later ``metaad test`` (by default)
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from metaad.data.transforms import DEFAULT_IMAGE_SIZE
from metaad.io import read_json

CONFIG_FILE = "config.json"
THRESHOLD_FILE = "threshold.json"
METRICS_FILE = "metrics.json"
REPORT_PAGE = "report.html"
MODEL_DIR = "model"
TRAINING_DIR = "training"
WORST_DIR = "worst"
TEST_DIR = "test"
REPORT_PICTURES_DIR = "report_files"
REPORT_FILES = (METRICS_FILE, REPORT_PAGE, "roc.png", "pro.png", "scores.csv")
RUN_FILES = (CONFIG_FILE, THRESHOLD_FILE, *REPORT_FILES)
RUN_FOLDERS = (MODEL_DIR, TRAINING_DIR, WORST_DIR, TEST_DIR, REPORT_PICTURES_DIR)


def check_out_folder(out: Path, what: str) -> None:
    """``out`` may be written as a folder (it is one, or does not exist yet)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, but {what} is a folder; choose another path")


def prepare_run_folder(out: str | Path, overwrite: bool, resume: bool) -> Path:
    """Refuse to write into a non-empty folder unless ``overwrite`` (which clears a run's files first) or
    ``resume`` (which continues the fit there)."""
    out = Path(out)
    check_out_folder(out, "a run")
    if not out.is_dir() or not any(out.iterdir()) or resume:
        return out
    if not overwrite:
        raise ValueError(
            f"--out {out}: folder exists and is not empty (an earlier run?); pass --overwrite to replace it, "
            "--resume to continue an interrupted fit there, or choose another --out"
        )
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    return out


def read_config(run: str | Path) -> dict[str, Any]:
    """A run's ``config.json`` (what was fitted, on which data), or an empty dict for a bare model folder."""
    path = Path(run) / CONFIG_FILE
    return read_json(path) if path.is_file() else {}


def read_run_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a run (``path`` is the run folder or the file itself), checked to be one."""
    config_path = Path(path) / CONFIG_FILE if Path(path).is_dir() else Path(path)
    config = read_json(config_path)
    if not isinstance(config, dict) or "model" not in config or "data" not in config:
        raise ValueError(f"{config_path}: not a run's config.json (expected the keys 'model' and 'data')")
    return config


def read_thresholds(run: str | Path) -> dict[str, Any]:
    """A run's ``threshold.json`` (see :func:`metaad.runs.calibration.threshold_record`; older runs hold the
    image threshold only), or an empty dict when the run has no threshold."""
    path = Path(run) / THRESHOLD_FILE
    return read_json(path) if path.is_file() else {}


def read_threshold(run: str | Path) -> float | None:
    """The calibrated threshold of a run folder, or None if it has none."""
    return read_thresholds(run).get("threshold")


def read_metrics(run: str | Path) -> dict[str, Any]:
    """A run's ``metrics.json``, or an empty dict when it was not evaluated."""
    path = Path(run) / METRICS_FILE
    return read_json(path) if path.is_file() else {}


def run_image_size(run: str | Path, requested: int | None = None) -> int:
    """The side a run's model was fitted and evaluated at (its ``config.json``), unless ``requested``."""
    if requested is not None:
        return checked_size(requested)
    return int(read_config(run).get("image_size", DEFAULT_IMAGE_SIZE))


def checked_size(requested: int) -> int:
    if requested < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {requested}")
    return int(requested)
