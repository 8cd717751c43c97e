"""The report of a run: metrics JSON, ROC and PRO curves, heat-map overlays of the worst test images."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from metaad.io import atomic_write, write_json
from metaad.metrics import pro_curve, roc_curve
from metaad.runs import html_report
from metaad.runs.evaluation import Predictions
from metaad.runs.rendering import map_scale


def write_report(
    folder: str | Path,
    predictions: Predictions,
    metrics: dict,
    threshold: float | None,
    n_worst: int = 8,
    pixel_threshold: float | None = None,
    image_thresholds: np.ndarray | None = None,
) -> Path:
    """Write ``metrics.json``, ``roc.png`` (both classes present), ``pro.png`` (when pixel metrics were
    computed), ``scores.csv`` and ``worst/`` (see :func:`write_worst_overlays`). ``image_thresholds``: one
    threshold per image (a run of several categories decides each with its category's); ``threshold`` is
    then the global one, shown as such."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(
        folder / "metrics.json",
        {
            **metrics,
            "threshold": threshold,
            "pixel_threshold": pixel_threshold,
            "ms_per_image": predictions.ms_per_image,
            "n_images": len(predictions.paths),
        },
    )
    _write_scores_csv(folder / "scores.csv", predictions, threshold, image_thresholds)
    if len(set(predictions.labels.tolist())) == 2:
        fpr, tpr, _ = roc_curve(predictions.labels, predictions.scores)
        _plot_curve(
            folder / "roc.png",
            fpr,
            tpr,
            "false positive rate",
            "true positive rate",
            f"Image ROC (AUROC {metrics.get('image_auroc', float('nan')):.3f})",
            diagonal=True,
        )
    if "pro" in metrics and predictions.masks.any():
        fpr, pro = pro_curve(predictions.masks, predictions.maps, fpr_limit=0.3)
        _plot_curve(
            folder / "pro.png",
            fpr,
            pro,
            "false positive rate",
            "per-region overlap",
            f"PRO curve, FPR <= 0.3 (AUPRO {metrics.get('pro', float('nan')):.3f})",
        )
    write_worst_overlays(folder / "worst", predictions, n_worst, threshold, pixel_threshold, image_thresholds)
    html_report.write_html_report(folder, predictions, metrics, threshold,  # report.html and report_files/
                                  image_thresholds=image_thresholds, pixel_threshold=pixel_threshold)
    return folder


OVERLAY_KINDS = ("missed_defect", "false_alarm", "detected_defect", "correct_good")


def write_worst_overlays(
    folder: Path,
    predictions: Predictions,
    n_worst: int,
    threshold: float | None = None,
    pixel_threshold: float | None = None,
    image_thresholds: np.ndarray | None = None,
) -> None:
    """Overlays of the lowest-scored defective images, the highest-scored good ones and (when there is room,
    a quarter of ``n_worst``) the highest-scored defective ones, the model's clearest detections.

    A file is named ``<rank>_<kind>_<defect>_<stem>.png``; the kind says what the decision at ``threshold``
    was (``missed_defect``, ``detected_defect``, ``false_alarm``, ``correct_good``; without a threshold the
    lowest-scored defective images count as missed and the highest-scored good ones as false alarms).
    All overlays share one colour scale (see :func:`map_scale`). Overlays an earlier report wrote into
    ``folder`` are removed first, so the folder shows this run only.
    """
    for kind in OVERLAY_KINDS:
        for old in folder.glob(f"[0-9][0-9]_{kind}_*.png"):
            old.unlink()
    order = np.argsort(predictions.scores, kind="stable")
    labels = np.asarray(predictions.labels)
    n_defective, n_good = int(np.sum(labels == 1)), int(np.sum(labels == 0))
    n_best = n_worst // 4 if n_defective > n_worst // 2 and n_good else 0
    worst_defective = [i for i in order if labels[i] == 1][: (n_worst - n_best) // 2 if n_good else n_worst]
    worst_good = [i for i in order[::-1] if labels[i] == 0][: n_worst - n_best - len(worst_defective)]
    best_defective = [i for i in order[::-1] if labels[i] == 1 and i not in worst_defective][:n_best]
    scale = map_scale(predictions.maps, pixel_threshold)
    for rank, index in enumerate(worst_defective + worst_good + best_defective):
        score, defective = float(predictions.scores[index]), labels[index] == 1
        own = float(image_thresholds[index]) if image_thresholds is not None else threshold
        flagged = score > own if own is not None else not defective
        kind = ("detected_defect" if flagged else "missed_defect") if defective else (
            "false_alarm" if flagged else "correct_good"
        )
        defect = predictions.defects[index] if defective else "good"
        name = f"{rank:02d}_{kind}_{html_report.file_part(defect)}_{Path(predictions.paths[index]).stem}.png"
        decision = "" if own is None else (" > " if flagged else " <= ") + f"threshold {html_report.number(own)}"
        anomaly_map = predictions.maps[index]
        save_overlay(
            folder / name,
            np.asarray(Image.open(predictions.paths[index]).convert("RGB")),
            anomaly_map,
            scale,
            mask=predictions.masks[index] if defective else None,
            title=f"{defect}: score {html_report.number(score)}{decision} ({kind.replace('_', ' ')})",
            predicted=None if pixel_threshold is None else anomaly_map > pixel_threshold,
            pixel_threshold=pixel_threshold,
        )


def save_overlay(
    path: Path,
    image: np.ndarray,
    anomaly_map: np.ndarray,
    value_range: tuple[float, float],
    mask: np.ndarray | None = None,
    title: str = "",
    predicted: np.ndarray | None = None,
    pixel_threshold: float | None = None,
) -> None:
    """The image with its ground-truth outline (green) beside the heat map laid over it, with a colour bar
    (the pixel threshold marked on it) and the predicted defect outline (white), at the map's size."""
    height, width = anomaly_map.shape
    shown = image if image.shape[:2] == (height, width) else np.asarray(
        Image.fromarray(image).resize((width, height), Image.BILINEAR)
    )
    aspect = width / height
    figure, axes = plt.subplots(1, 2, figsize=(min(2 * 3.2 * aspect + 1.4, 16), 3.6))
    axes[0].imshow(shown)
    axes[0].set_title("image" + (", ground truth" if mask is not None and mask.any() else ""), fontsize=9)
    axes[1].imshow(shown)
    heat = axes[1].imshow(anomaly_map, cmap="jet", alpha=0.5, vmin=value_range[0], vmax=value_range[1])
    if mask is not None and mask.any():
        for axis in axes:
            axis.contour(mask, levels=[0.5], colors="lime", linewidths=1.0)
    if predicted is not None and predicted.any() and not predicted.all():
        axes[1].contour(predicted.astype(np.uint8), levels=[0.5], colors="white", linewidths=1.0)
    bar = figure.colorbar(heat, ax=axes[1], fraction=0.046, pad=0.04)
    bar.set_label("anomaly map", fontsize=8)
    if pixel_threshold is not None:
        bar.ax.axhline(pixel_threshold, color="white", lw=1.5)
    figure.suptitle(title, fontsize=9)
    axes[1].set_title("map" + (", predicted defect (white)" if predicted is not None else ""), fontsize=9)
    for axis in axes:
        axis.axis("off")
    figure.tight_layout()
    _save_figure(figure, path)


def _plot_curve(
    path: Path, x: np.ndarray, y: np.ndarray, xlabel: str, ylabel: str, title: str, diagonal: bool = False
) -> None:
    figure, axis = plt.subplots(figsize=(4, 4))
    axis.plot(x, y, lw=1.5)
    if diagonal:
        axis.plot([0, 1], [0, 1], "--", color="gray", lw=0.8)
    axis.set(xlabel=xlabel, ylabel=ylabel, title=title, ylim=(0, 1.01))
    figure.tight_layout()
    _save_figure(figure, path)


def _save_figure(figure: plt.Figure, path: Path) -> None:
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)


def _write_scores_csv(path: Path, predictions: Predictions, threshold: float | None,
                      image_thresholds: np.ndarray | None = None) -> None:
    lines = ["path,label,defect,score,decision"]
    for i, (p, label, defect, score) in enumerate(zip(
        predictions.paths, predictions.labels, predictions.defects, predictions.scores, strict=True
    )):
        own = float(image_thresholds[i]) if image_thresholds is not None else threshold
        decision = "" if own is None else ("anomalous" if score > own else "good")
        lines.append(f"{_csv(p)},{int(label)},{_csv(defect)},{score:.6g},{decision}")
    text = "\n".join(lines) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _csv(value: str) -> str:
    return f'"{value.replace(chr(34), chr(34) * 2)}"' if any(c in value for c in ',"\n') else value
