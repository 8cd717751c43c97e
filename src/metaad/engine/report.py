"""The report of a run: metrics JSON, ROC and PRO curves, heat-map overlays of the worst test images."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from metaad.engine.evaluation import Predictions
from metaad.io import atomic_write, write_json
from metaad.metrics import pro_curve, roc_curve


def write_report(
    folder: str | Path,
    predictions: Predictions,
    metrics: dict[str, float],
    threshold: float | None,
    n_worst: int = 8,
) -> Path:
    """Write ``metrics.json``, ``roc.png``, ``pro.png`` (when masks exist), ``scores.csv`` and ``worst/``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(
        folder / "metrics.json",
        {
            **metrics,
            "threshold": threshold,
            "ms_per_image": predictions.ms_per_image,
            "n_images": len(predictions.paths),
        },
    )
    _write_scores_csv(folder / "scores.csv", predictions, threshold)
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
    if predictions.masks.any():
        fpr, pro = pro_curve(predictions.masks, predictions.maps, fpr_limit=0.3)
        _plot_curve(
            folder / "pro.png",
            fpr,
            pro,
            "false positive rate",
            "per-region overlap",
            f"PRO curve, FPR <= 0.3 (AUPRO {metrics.get('pro', float('nan')):.3f})",
        )
    write_worst_overlays(folder / "worst", predictions, n_worst)
    return folder


def write_worst_overlays(folder: Path, predictions: Predictions, n_worst: int) -> None:
    """Overlays of the images the model gets most wrong: lowest-scored defective, highest-scored good.

    Overlays that an earlier report wrote into ``folder`` are removed first, so the folder shows this run only.
    """
    for kind in ("missed_defect", "false_alarm"):
        for old in folder.glob(f"[0-9][0-9]_{kind}_*.png"):
            old.unlink()
    order = np.argsort(predictions.scores)
    defective = [i for i in order if predictions.labels[i] == 1][: n_worst // 2]
    good = [i for i in order[::-1] if predictions.labels[i] == 0][: n_worst - len(defective)]
    vmin, vmax = np.percentile(predictions.maps, [1, 99.9])
    for rank, index in enumerate(defective + good):
        kind = "missed_defect" if predictions.labels[index] == 1 else "false_alarm"
        name = f"{rank:02d}_{kind}_{Path(predictions.paths[index]).stem}.png"
        image = np.asarray(Image.open(predictions.paths[index]).convert("RGB"))
        save_overlay(
            folder / name,
            image,
            predictions.maps[index],
            (vmin, vmax),
            mask=predictions.masks[index],
            title=f"score {predictions.scores[index]:.3f}",
        )


def save_overlay(
    path: Path,
    image: np.ndarray,
    anomaly_map: np.ndarray,
    value_range: tuple[float, float],
    mask: np.ndarray | None = None,
    title: str = "",
) -> None:
    """Image, heat map on top of it, and the ground-truth contour when given, side by side."""
    height, width = anomaly_map.shape
    shown = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    figure, axes = plt.subplots(1, 2, figsize=(6, 3.2))
    axes[0].imshow(shown)
    axes[0].set_title("image")
    axes[1].imshow(shown)
    axes[1].imshow(anomaly_map, cmap="jet", alpha=0.45, vmin=value_range[0], vmax=value_range[1])
    if mask is not None and mask.any():
        axes[1].contour(mask, levels=[0.5], colors="white", linewidths=0.8)
    axes[1].set_title(title)
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


def _write_scores_csv(path: Path, predictions: Predictions, threshold: float | None) -> None:
    lines = ["path,label,defect,score,decision"]
    for p, label, defect, score in zip(
        predictions.paths, predictions.labels, predictions.defects, predictions.scores, strict=True
    ):
        decision = "" if threshold is None else ("anomalous" if score > threshold else "good")
        lines.append(f"{_csv(p)},{int(label)},{_csv(defect)},{score:.6g},{decision}")
    text = "\n".join(lines) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _csv(value: str) -> str:
    return f'"{value.replace(chr(34), chr(34) * 2)}"' if any(c in value for c in ',"\n') else value
