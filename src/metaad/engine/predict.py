"""Score new images with a fitted run: per-image score and decision, heat maps, overlays and a CSV."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from metaad.data.datasets import AnomalyDataset, ImageRecord
from metaad.engine.checkpoint import load_model
from metaad.engine.report import save_overlay
from metaad.engine.run import read_threshold, run_image_size
from metaad.io import atomic_write


def predict_images(
    run: str | Path,
    records: list[ImageRecord],
    out: Path,
    threshold: float | None = None,
    image_size: int | None = None,
    batch_size: int = 16,
) -> list[dict]:
    """Write ``predictions.csv`` (path, name, score, decision, threshold), ``heatmaps/NAME.png`` (16-bit,
    scaled to the run's score range) and ``overlays/NAME.png`` for every image; returns the rows of the CSV."""
    model = load_model(run)
    if threshold is None:
        threshold = read_threshold(run)
    dataset = AnomalyDataset(records, run_image_size(run, image_size))
    rows, scale = [], None
    for batch in tqdm(DataLoader(dataset, batch_size=batch_size), desc="predict", unit="batch"):
        prediction = model.predict(batch["image"])
        maps = prediction.maps.float().numpy()
        if scale is None:  # one fixed colour scale for all images of this call
            high = threshold if threshold is not None else float(np.percentile(maps, 99.9))
            scale = (float(maps.min()), max(high * 1.5, float(maps.min()) + 1e-6))
        for path, score, anomaly_map in zip(batch["path"], prediction.scores.tolist(), maps, strict=True):
            stem = _unique_stem(Path(path), rows)
            decision = "" if threshold is None else ("anomalous" if score > threshold else "good")
            _save_heatmap(out / "heatmaps" / f"{stem}.png", anomaly_map, scale)
            image = np.asarray(Image.open(path).convert("RGB"))
            save_overlay(
                out / "overlays" / f"{stem}.png",
                image,
                anomaly_map,
                scale,
                title=f"score {score:.3f} {decision}",
            )
            rows.append({"path": path, "name": stem, "score": score, "decision": decision})
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")  # quotes paths that contain commas
    writer.writerow(["path", "name", "score", "decision", "threshold"])
    for r in rows:
        writer.writerow(
            [r["path"], r["name"], f"{r['score']:.6g}", r["decision"], "" if threshold is None else f"{threshold:.6g}"]
        )
    text = table.getvalue()
    atomic_write(out / "predictions.csv", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return rows


def _unique_stem(path: Path, rows: list[dict]) -> str:
    """The output name of an image: its stem, or ``<folder>_<stem>`` when another image had that stem (as the
    same file names in an MVTec ``test/<defect>/`` folder do), then numbered."""
    taken = {r["name"] for r in rows}
    base = path.stem if path.stem not in taken else f"{path.parent.name}_{path.stem}"
    stem, n = base, 1
    while stem in taken:
        stem, n = f"{base}_{n}", n + 1
    return stem


def _save_heatmap(path: Path, anomaly_map: np.ndarray, scale: tuple[float, float]) -> None:
    low, high = scale
    scaled = np.clip((anomaly_map - low) / (high - low), 0.0, 1.0)
    image = Image.fromarray((scaled * 65535).astype(np.uint16))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
