"""``report.html``: one self-contained page per evaluated run (no script, no network; pictures inline).

Metrics beside the papers' figures where they exist, the image ROC and PRO curves, per-defect-type AUROC,
score histograms of good and defective images with the threshold, and the worst false alarms and misses as
image / ground truth / heat map / overlay.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

from metaad.io import atomic_write, read_json
from metaad.metrics import image_auroc, pro_curve, roc_curve
from metaad.runs.evaluation import Predictions

# published figures per data set (image / pixel AUROC, PRO), as the papers report them (../shared/data/README.md)
PAPER_FIGURES: dict[str, dict[str, list[tuple[str, float]]]] = {
    "Magnetic Tile Defects": {
        "image_auroc": [
            ("Metaformer (Wu et al., ICCV 2021)", 0.993),
            ("multi-scale patch (Tsai et al., WACV 2022)", 0.987),
            ("DifferNet (Rudolph et al., WACV 2021)", 0.977),
        ],
        "pixel_auroc": [("multi-scale patch (Tsai et al., WACV 2022)", 0.740)],
    },
}
METRIC_NAMES = {
    "image_auroc": "image AUROC",
    "pixel_auroc": "pixel AUROC",
    "pro": "PRO (FPR ≤ 0.3)",
    "image_f1_max": "image F1-max",
    "pixel_f1_max": "pixel F1-max",
    "accuracy_at_threshold": "accuracy at the threshold",
    "ms_per_image": "ms / image (model)",
    "ms_per_image_end_to_end": "ms / image (with loading)",
    "fit_seconds": "fit time (s)",
}
THUMB = 176


def write_html_report(
    folder: str | Path, predictions: Predictions, metrics: dict, threshold: float | None, n_worst: int = 4,
    image_thresholds: np.ndarray | None = None,
) -> Path:
    """Write ``folder/report.html`` for ``predictions`` and return its path. ``image_thresholds``: each image's
    own threshold (a run of several categories), which then decides; ``threshold`` is the global one."""
    folder = Path(folder)
    config = _config(folder)
    dataset = _dataset_name(predictions.paths, config)
    method = config.get("model", "")
    parts = [
        f"<h1>metaad report{': ' + html.escape(method) if method else ''}</h1>",
        f"<p class=sub>{html.escape(str(folder.resolve()))} · {len(predictions.paths)} test images "
        f"({int((predictions.labels == 1).sum())} defective) · data: {html.escape(dataset or 'unnamed')} · "
        f"threshold: {'none' if threshold is None else f'{threshold:.4g}'}"
        f"{' (global; each category decides at its own)' if image_thresholds is not None else ''}</p>",
        _context(folder, config),
        _metrics_table(metrics, dataset),
        _confusion(predictions, threshold, image_thresholds),
        _per_category(metrics),
        _loss_curve(folder),
    ]
    if len(predictions.paths):
        parts += [
            "<div class=row>",
            _roc_figure(predictions, metrics),
            _pro_figure(predictions, metrics),
            _histogram(predictions, threshold),
            "</div>",
            _per_defect(predictions),
            _worst(predictions, threshold, n_worst, image_thresholds),
        ]
    page = PAGE.format(title=html.escape(f"metaad report {method}".strip()), body="\n".join(p for p in parts if p))
    return atomic_write(folder / "report.html", lambda tmp: tmp.write_text(page, encoding="utf-8"))


def _config(folder: Path) -> dict:
    for candidate in (folder / "config.json", folder.parent / "config.json"):  # RUN or RUN/test
        if candidate.is_file():
            return read_json(candidate)
    return {}


def _dataset_name(paths: list[str], config: dict) -> str | None:
    data = config.get("data") or {}
    if data.get("format") == "mtd" or any(Path(p).parent.parent.name.startswith("MT_") for p in paths[:50]):
        return "Magnetic Tile Defects"
    return data.get("category")


def _metrics_table(metrics: dict, dataset: str | None) -> str:
    """The metrics; beside them the papers' figures on the same data set, a column only where a paper has one."""
    papers = PAPER_FIGURES.get(dataset or "", {})
    rows = []
    for key, label in METRIC_NAMES.items():
        value = metrics.get(key)
        if not isinstance(value, int | float) or not math.isfinite(value):
            continue
        cited = "; ".join(f"{html.escape(name)}: <b>{figure:.3f}</b>" for name, figure in papers.get(key, []))
        rows.append(f"<tr><td>{label}</td><td class=num>{value:.4g}</td>"
                    + (f"<td>{cited or '–'}</td>" if papers else "") + "</tr>")
    header = "<th>metric</th><th>this run</th>" + ("<th>papers (same data set)</th>" if papers else "")
    return f"<h2>Metrics</h2><table><tr>{header}</tr>" + "".join(rows) + "</table>"


def _confusion(predictions: Predictions, threshold: float | None, image_thresholds: np.ndarray | None = None
               ) -> str:
    """The counts at the threshold: escapes (defective judged good) and false rejects (good judged defective)."""
    if threshold is None or not len(predictions.labels):
        return ""
    flagged = predictions.scores > (image_thresholds if image_thresholds is not None else threshold)
    defective = predictions.labels == 1
    cells = {(truth, decided): int(np.sum((defective == truth) & (flagged == decided)))
             for truth in (True, False) for decided in (True, False)}
    return (
        f"<h2>At the threshold ({'each category its own' if image_thresholds is not None else f'{threshold:.4g}'})"
        "</h2><table><tr><th></th><th>judged defective</th>"
        "<th>judged good</th></tr>"
        f"<tr><td>defective</td><td class=num>{cells[True, True]}</td><td class=num>{cells[True, False]} "
        "escapes</td></tr>"
        f"<tr><td>good</td><td class=num>{cells[False, True]} false rejects</td><td class=num>"
        f"{cells[False, False]}</td></tr></table>"
    )


def _context(folder: Path, config: dict) -> str:
    """What produced the run: method, preset and settings, counts, thresholds, metaad version and date."""
    if not config:
        return ""
    run = folder if (folder / "config.json").is_file() else folder.parent
    thresholds = read_json(run / "threshold.json") if (run / "threshold.json").is_file() else {}
    items = [("method", config.get("model")), ("preset", config.get("preset") or "the defaults"),
             ("trained on", f"{config.get('n_train')} images" if config.get("n_train") is not None else None),
             ("thresholds from", f"{thresholds['n_calibration_images']} held-out good images"
              if "n_calibration_images" in thresholds else None),
             ("image threshold", f"{thresholds['threshold']:.4g}" if "threshold" in thresholds else None),
             ("pixel threshold", f"{thresholds['pixel_threshold']:.4g}" if "pixel_threshold" in thresholds else None),
             ("metaad", config.get("metaad_version")), ("fitted", config.get("date"))]
    settings = ", ".join(f"{k}={v}" for k, v in (config.get("params") or {}).items())
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in items if v)
    return (f"<h2>Run</h2><table>{rows}<tr><td>settings</td><td class=small>{html.escape(settings)}</td></tr>"
            "</table>")


def _loss_curve(folder: Path) -> str:
    """A trained method's loss per epoch, inline ('' for a method that does not train)."""
    run = folder if (folder / "training").is_dir() else folder.parent
    curve = run / "training" / "loss_curve.png"
    if not curve.is_file():
        return ""
    picture = base64.b64encode(curve.read_bytes()).decode("ascii")
    return f"<h2>Training</h2><img src='data:image/png;base64,{picture}' alt='training loss per epoch'>"


def _per_category(metrics: dict) -> str:
    """A run of several categories (the unified protocol): each category's metrics, decided at its own
    threshold, and their mean ('' for a run of one)."""
    per_category = metrics.get("per_category")
    if not per_category:
        return ""
    keys = ("image_auroc", "pixel_auroc", "pro", "accuracy_at_threshold")
    header = "".join(f"<th>{METRIC_NAMES.get(k, k.replace('_', ' '))}</th>" for k in keys)

    def cells(values: dict) -> str:
        return "".join(
            f"<td class=num>{values[k]:.4g}</td>" if isinstance(values.get(k), int | float) else "<td>–</td>"
            for k in keys
        )

    rows = [f"<tr><td>{html.escape(name)}</td>{cells(values)}</tr>" for name, values in per_category.items()]
    rows.append(f"<tr><td><b>mean over categories</b></td>{cells(metrics.get('category_mean', {}))}</tr>")
    return (
        "<h2>Per category</h2><p class=sub>one model for all of them; each category's accuracy at its own "
        f"threshold</p><table><tr><th>category</th>{header}</tr>{''.join(rows)}</table>"
    )


def _svg_curve(points: list[tuple[np.ndarray, np.ndarray, str, str]], xlabel: str, ylabel: str, xmax: float,
               diagonal: bool = False) -> str:
    """A small line chart as inline SVG: ``points`` = (x, y, colour, legend) series, axes [0, xmax] x [0, 1]."""
    w, h, left, bottom = 320, 260, 44, 36
    pw, ph = w - left - 12, h - bottom - 12

    def sx(x):
        return left + pw * np.asarray(x) / xmax

    def sy(y):
        return 12 + ph * (1 - np.asarray(y))

    out = [f"<svg width={w} height={h} viewBox='0 0 {w} {h}' xmlns='http://www.w3.org/2000/svg'>",
           f"<rect x={left} y=12 width={pw} height={ph} fill='#fff' stroke='#444'/>"]
    for t in (0.25, 0.5, 0.75):
        out.append(f"<line x1={left} x2={left + pw} y1={sy(t):.1f} y2={sy(t):.1f} stroke='#ddd'/>")
        out.append(f"<text x={left - 4} y={sy(t) + 4:.1f} text-anchor=end>{t:g}</text>")
    for t in (0, xmax / 2, xmax):
        out.append(f"<text x={sx(t):.1f} y={h - bottom + 16} text-anchor=middle>{t:g}</text>")
    out.append(f"<text x={left + pw / 2} y={h - 4} text-anchor=middle>{xlabel}</text>")
    middle = 12 + ph / 2
    out.append(f"<text x=12 y={middle} transform='rotate(-90 12 {middle})' text-anchor=middle>{ylabel}</text>")
    if diagonal:
        out.append(f"<line x1={sx(0)} y1={sy(0)} x2={sx(xmax)} y2={sy(1)} stroke='#999' stroke-dasharray='4 3'/>")
    for i, (x, y, colour, legend) in enumerate(points):
        if len(x) > 800:  # a PRO curve has a point per pixel threshold: 800 are plenty for 300 px
            keep = np.unique(np.linspace(0, len(x) - 1, 800).round().astype(int))
            x, y = np.asarray(x)[keep], np.asarray(y)[keep]
        coords = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(sx(x), sy(y), strict=True))
        out.append(f"<polyline fill=none stroke='{colour}' stroke-width=2 points='{coords}'/>")
        out.append(
            f"<text x={left + pw - 6} y={sy(0) - 8 - 14 * i:.1f} text-anchor=end fill='{colour}'>{legend}</text>"
        )
    out.append("</svg>")
    return "".join(out)


def _roc_figure(predictions: Predictions, metrics: dict) -> str:
    if len(set(predictions.labels.tolist())) != 2:
        return ""
    fpr, tpr, _ = roc_curve(predictions.labels, predictions.scores)
    auroc = metrics.get("image_auroc", image_auroc(predictions.labels, predictions.scores))
    svg = _svg_curve([(fpr, tpr, "#1f5fbf", f"AUROC {auroc:.3f}")], "false positive rate", "true positive rate", 1.0,
                     diagonal=True)
    return f"<figure><figcaption>Image ROC</figcaption>{svg}</figure>"


def _pro_figure(predictions: Predictions, metrics: dict) -> str:
    if "pro" not in metrics or not predictions.masks.any():
        return ""
    keep = np.ones(len(predictions.paths), bool) if predictions.has_masks is None else predictions.has_masks
    fpr, pro = pro_curve(predictions.masks[keep], predictions.maps[keep], fpr_limit=0.3)
    svg = _svg_curve([(fpr, pro, "#c0392b", f"AUPRO {metrics['pro']:.3f}")], "false positive rate",
                     "per-region overlap", 0.3)
    return f"<figure><figcaption>PRO curve (FPR ≤ 0.3)</figcaption>{svg}</figure>"


def _histogram(predictions: Predictions, threshold: float | None, bins: int = 30) -> str:
    scores = predictions.scores
    low, high = float(scores.min()), float(scores.max())
    if threshold is not None:
        low, high = min(low, threshold), max(high, threshold)
    high = high if high > low else low + 1.0
    edges = np.linspace(low, high, bins + 1)
    good = np.histogram(scores[predictions.labels == 0], edges)[0]
    bad = np.histogram(scores[predictions.labels == 1], edges)[0]
    w, h, left, bottom = 360, 260, 36, 36
    pw, ph = w - left - 12, h - bottom - 12
    top = max(1, int(max(good.max(initial=0), bad.max(initial=0))))
    bar = pw / bins
    out = [f"<svg width={w} height={h} viewBox='0 0 {w} {h}' xmlns='http://www.w3.org/2000/svg'>",
           f"<rect x={left} y=12 width={pw} height={ph} fill='#fff' stroke='#444'/>"]
    for counts, colour in ((good, "#2e8b57"), (bad, "#d35400")):
        for i, count in enumerate(counts):
            if count:
                height = ph * count / top
                out.append(f"<rect x={left + i * bar:.1f} y={12 + ph - height:.1f} width={bar:.1f} "
                           f"height={height:.1f} fill='{colour}' fill-opacity='0.55'/>")
    if threshold is not None:
        x = left + pw * (threshold - low) / (high - low)
        out.append(f"<line x1={x:.1f} x2={x:.1f} y1=12 y2={12 + ph} stroke='#000' stroke-width=2 "
                   "stroke-dasharray='5 3'/>")
        out.append(f"<text x={x + 4:.1f} y=26>threshold {threshold:.4g}</text>")
    out.append(f"<text x={left} y={h - bottom + 16}>{low:.3g}</text>")
    out.append(f"<text x={left + pw} y={h - bottom + 16} text-anchor=end>{high:.3g}</text>")
    out.append(f"<text x={left + pw / 2} y={h - 4} text-anchor=middle>image score</text>")
    out.append(f"<text x={left - 4} y=22 text-anchor=end>{top}</text></svg>")
    legend = (f"<span style='color:#2e8b57'>good ({int((predictions.labels == 0).sum())})</span>, "
              f"<span style='color:#d35400'>defective ({int((predictions.labels == 1).sum())})</span>")
    return f"<figure><figcaption>Score histogram: {legend}</figcaption>{''.join(out)}</figure>"


def _per_defect(predictions: Predictions) -> str:
    good = predictions.labels == 0
    if not good.any():
        return ""
    rows = []
    for defect in sorted({d for d, label in zip(predictions.defects, predictions.labels, strict=True) if label == 1}):
        chosen = np.array([d == defect for d in predictions.defects]) & (predictions.labels == 1)
        keep = good | chosen
        auroc = image_auroc(predictions.labels[keep], predictions.scores[keep])
        share = f"{auroc:.3f}"
        width = max(0.0, min(1.0, auroc)) * 160
        rows.append(f"<tr><td>{html.escape(defect)}</td><td class=num>{int(chosen.sum())}</td><td class=num>{share}"
                    f"</td><td><div class=bar style='width:{width:.0f}px'></div></td></tr>")
    if not rows:
        return ""
    return ("<h2>Image AUROC per defect type</h2><p class=sub>each defect type against all good test images</p>"
            "<table><tr><th>defect</th><th>images</th><th>AUROC</th><th></th></tr>" + "".join(rows) + "</table>")


def worst_sections(predictions: Predictions, threshold: float | None, n_worst: int,
                   image_thresholds: np.ndarray | None = None) -> list[tuple[str, list[int]]]:
    """The report's sections of hardest images, each titled by what it holds: with a threshold, the misses
    (defective images at or below it) and false alarms (good images above it), an empty list where there are
    none, then the closest calls on the right side of it (lowest-margin detections, highest-scored good
    images below it); without a threshold, the lowest-scored defective and highest-scored good images."""
    order = np.argsort(predictions.scores, kind="stable")
    defective = [i for i in order if predictions.labels[i] == 1]  # lowest score first
    good = [i for i in order[::-1] if predictions.labels[i] == 0]  # highest score first
    if threshold is None:
        return [("Highest-scored good images", good[:n_worst]),
                ("Lowest-scored defective images", defective[:n_worst])]
    own = np.broadcast_to(image_thresholds if image_thresholds is not None else threshold,
                          predictions.scores.shape)
    misses = [i for i in defective if predictions.scores[i] <= own[i]]
    alarms = [i for i in good if predictions.scores[i] > own[i]]
    detected = [i for i in defective if predictions.scores[i] > own[i]]
    passed = [i for i in good if predictions.scores[i] <= own[i]]
    return [
        ("False alarms (good images scored above the threshold)", alarms[:n_worst]),
        ("Misses (defective images scored at or below the threshold)", misses[:n_worst]),
        ("Lowest-margin detections (defective images just above the threshold)", detected[:n_worst]),
        ("Closest good images (highest-scored good images at or below the threshold)", passed[:n_worst]),
    ]


def _worst(predictions: Predictions, threshold: float | None, n_worst: int,
           image_thresholds: np.ndarray | None = None) -> str:
    low, high = (float(v) for v in np.percentile(predictions.maps, [1, 99.9]))
    high = max(high, low + 1e-6)
    sections = []
    for title, chosen in worst_sections(predictions, threshold, n_worst, image_thresholds):
        if not chosen:
            sections.append(f"<h2>{title}</h2><p>none</p>")
            continue
        rows = []
        for i in chosen:
            own = float(image_thresholds[i]) if image_thresholds is not None else threshold
            decision = "" if own is None else (" · anomalous" if predictions.scores[i] > own else " · good")
            cells = "".join(f"<td><img src='data:image/png;base64,{picture}' alt='{name}'></td>"
                            for name, picture in _pictures(predictions, i, low, high))
            rows.append(f"<tr><td class=cap>{html.escape(Path(predictions.paths[i]).name)}<br>"
                        f"{html.escape(predictions.defects[i])}<br>score {predictions.scores[i]:.4g}{decision}</td>"
                        f"{cells}</tr>")
        sections.append(f"<h2>{title}</h2><table class=worst><tr><th></th><th>image</th><th>ground truth</th>"
                        "<th>heat map</th><th>overlay</th></tr>" + "".join(rows) + "</table>")
    return "".join(sections)


def _pictures(predictions: Predictions, index: int, low: float, high: float) -> list[tuple[str, str]]:
    from matplotlib import colormaps

    anomaly_map = predictions.maps[index]
    size = anomaly_map.shape[::-1]
    try:
        with Image.open(predictions.paths[index]) as handle:
            image = np.asarray(handle.convert("RGB").resize(size, Image.BILINEAR), dtype=np.float32)
    except OSError:  # the image moved since evaluation: show the map alone
        image = np.full((*anomaly_map.shape, 3), 128, np.float32)
    heat = colormaps["jet"](np.clip((anomaly_map - low) / (high - low), 0, 1))[..., :3] * 255
    truth = np.repeat((predictions.masks[index] > 0)[..., None] * 255.0, 3, axis=2)
    overlay = 0.55 * image + 0.45 * heat
    return [(name, _png(pixels)) for name, pixels in
            (("image", image), ("ground truth", truth), ("heat map", heat), ("overlay", overlay))]


def _png(pixels: np.ndarray) -> str:
    image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))
    image.thumbnail((THUMB, THUMB), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; background: #f6f7f9; }}
h1 {{ margin: 0 0 4px; }} h2 {{ margin: 24px 0 8px; font-size: 18px; }}
.sub {{ color: #666; margin: 0 0 12px; }}
table {{ border-collapse: collapse; background: #fff; }}
td, th {{ border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: middle; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
td.small {{ font-size: 12px; max-width: 60em; word-break: break-word; }}
.row {{ display: flex; flex-wrap: wrap; gap: 16px; margin-top: 16px; }}
figure {{ margin: 0; background: #fff; border: 1px solid #ddd; padding: 8px; }}
figcaption {{ font-weight: 600; margin-bottom: 4px; }}
svg text {{ font: 11px system-ui, sans-serif; }}
.bar {{ height: 12px; background: #1f5fbf; }}
table.worst img {{ display: block; width: {thumb}px; height: auto; image-rendering: pixelated; }}
td.cap {{ max-width: 180px; font-size: 12px; word-break: break-all; }}
</style></head>
<body>
{body}
</body></html>
""".replace("{thumb}", str(THUMB))
