"""``report.html``: one page per evaluated run (no script, no network; thumbnails inline, each a link to the
picture at full size in ``report_files/`` beside it).

Metrics beside the papers' figures where they exist, the image ROC and PRO curves, per-defect-type AUROC,
score histograms of good and defective images with the threshold, and the worst false alarms and misses as
image / ground truth / heat map / overlay at the image's own aspect, under a colour bar of the maps' scale.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image

from metaad.io import atomic_write, read_json
from metaad.metrics import image_auroc, pro_curve, roc_curve
from metaad.runs.evaluation import Predictions
from metaad.runs.layout import REPORT_PICTURES_DIR
from metaad.runs.rendering import heat_colours, map_scale, overlay

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
THUMB = 176  # a thumbnail's long side (px)
FILES = REPORT_PICTURES_DIR  # the full-size pictures the thumbnails link to
LARGE = 1024  # their long side: the original's, at most this, at least twice a thumbnail's (a click enlarges)
PICTURES = ("image", "ground truth", "heat map", "overlay")


def number(value: float) -> str:
    """How the report writes a threshold or a score, everywhere alike."""
    return f"{value:.4g}"


def file_part(text: str) -> str:
    """``text`` as part of a file name: letters, digits, '-' and '.' kept, anything else '_'."""
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text) or "x"


def write_html_report(
    folder: str | Path, predictions: Predictions, metrics: dict, threshold: float | None, n_worst: int = 4,
    image_thresholds: np.ndarray | None = None, pixel_threshold: float | None = None,
) -> Path:
    """Write ``folder/report.html`` (and the full-size pictures in ``folder/report_files``) for ``predictions``
    and return its path. ``image_thresholds``: each image's own threshold (a run of several categories), which
    then decides; ``threshold`` is the global one. ``pixel_threshold`` sets the heat maps' colour scale
    (:func:`metaad.runs.rendering.map_scale`) and the predicted defect outlined on the overlays."""
    folder = Path(folder)
    for old in (folder / FILES).glob("[0-9][0-9][0-9][0-9][0-9]_*.*"):  # pictures of an earlier report
        if old.suffix in (".png", ".jpg"):
            old.unlink()
    config = _config(folder)
    dataset = _dataset_name(predictions.paths, config)
    method = config.get("model", "")
    parts = [
        f"<h1>metaad report{': ' + html.escape(method) if method else ''}</h1>",
        f"<p class=sub>{html.escape(str(folder.resolve()))} · {len(predictions.paths)} test images "
        f"({int((predictions.labels == 1).sum())} defective) · data: {html.escape(dataset or 'unnamed')} · "
        f"threshold: {'none' if threshold is None else number(threshold)}"
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
            _worst(folder, predictions, threshold, n_worst, image_thresholds, pixel_threshold),
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
        f"<h2>At the threshold ({'each category its own' if image_thresholds is not None else number(threshold)})"
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
             ("image threshold", number(thresholds["threshold"]) if thresholds.get("threshold") is not None else None),
             ("pixel threshold", number(thresholds["pixel_threshold"])
              if thresholds.get("pixel_threshold") is not None else None),
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
    w, h, left, bottom = 330, 260, 54, 36
    pw, ph = w - left - 12, h - bottom - 12

    def sx(x):
        return left + pw * np.asarray(x) / xmax

    def sy(y):
        return 12 + ph * (1 - np.asarray(y))

    out = [f"<svg width={w} height={h} viewBox='0 0 {w} {h}' xmlns='http://www.w3.org/2000/svg'>",
           f"<rect x={left} y=12 width={pw} height={ph} fill='#fff' stroke='#444'/>"]
    for t in (0.25, 0.5, 0.75):
        out.append(f"<line x1={left} x2={left + pw} y1={sy(t):.1f} y2={sy(t):.1f} stroke='#ddd'/>")
        out.append(f"<text x={left - 6} y={sy(t) + 4:.1f} text-anchor=end>{t:g}</text>")
    for t in (0, xmax / 2, xmax):
        out.append(f"<text x={sx(t):.1f} y={h - bottom + 16} text-anchor=middle>{t:g}</text>")
    out.append(f"<text x={left + pw / 2} y={h - 4} text-anchor=middle>{xlabel}</text>")
    middle = 12 + ph / 2
    out.append(f"<text x=14 y={middle} transform='rotate(-90 14 {middle})' text-anchor=middle>{ylabel}</text>")
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


def _ticks(low: float, high: float, n: int = 5, integer: bool = False) -> list[float]:
    """Round values for an axis from ``low`` to ``high``, about ``n`` of them, those inside it."""
    from matplotlib.ticker import MaxNLocator

    slack = 1e-9 * (high - low)
    values = MaxNLocator(n, integer=integer).tick_values(low, high)
    return [float(t) for t in values if low - slack <= t <= high + slack]


def _count_ticks(most: int) -> list[int]:
    """Round counts from 0 up to the first at or above ``most`` (the axis ends on a tick)."""
    from matplotlib.ticker import MaxNLocator

    values = [int(t) for t in MaxNLocator(5, integer=True).tick_values(0, most) if t >= 0]
    return [t for t in values if t < most] + [min(t for t in values if t >= most)]


def _histogram(predictions: Predictions, threshold: float | None, bins: int = 30) -> str:
    """Counts of good and defective images per score bin, both axes labelled, the threshold a labelled line."""
    scores = predictions.scores
    low, high = float(scores.min()), float(scores.max())
    if threshold is not None:
        low, high = min(low, threshold), max(high, threshold)
    high = high if high > low else low + 1.0
    edges = np.linspace(low, high, bins + 1)
    good = np.histogram(scores[predictions.labels == 0], edges)[0]
    bad = np.histogram(scores[predictions.labels == 1], edges)[0]
    w, h, left, bottom, above = 380, 280, 50, 44, 26
    pw, ph = w - left - 16, h - bottom - above
    counts = _count_ticks(max(1, int(max(good.max(initial=0), bad.max(initial=0)))))
    top = counts[-1]

    def sx(x: float) -> float:
        return left + pw * (x - low) / (high - low)

    def sy(count: float) -> float:
        return above + ph * (1 - count / top)

    out = [f"<svg width={w} height={h} viewBox='0 0 {w} {h}' xmlns='http://www.w3.org/2000/svg'>",
           f"<rect x={left} y={above} width={pw} height={ph} fill='#fff' stroke='#444'/>"]
    for count in counts:
        out.append(f"<line x1={left - 4} x2={left + pw} y1={sy(count):.1f} y2={sy(count):.1f} stroke='#ddd'/>")
        out.append(f"<text x={left - 7} y={sy(count) + 4:.1f} text-anchor=end>{count}</text>")
    for counts_, colour in ((good, "#2e8b57"), (bad, "#d35400")):
        for i, count in enumerate(counts_):
            if count:
                out.append(f"<rect x={sx(edges[i]):.1f} y={sy(count):.1f} width={pw / bins:.1f} "
                           f"height={ph * count / top:.1f} fill='{colour}' fill-opacity='0.55'/>")
    for tick in _ticks(low, high, 5):
        out.append(f"<line x1={sx(tick):.1f} x2={sx(tick):.1f} y1={above + ph} y2={above + ph + 5} stroke='#444'/>")
        out.append(f"<text x={sx(tick):.1f} y={above + ph + 18} text-anchor=middle>{number(tick)}</text>")
    out.append(f"<text x={left + pw / 2} y={h - 6} text-anchor=middle>image score</text>")
    middle = above + ph / 2
    out.append(f"<text x=14 y={middle} transform='rotate(-90 14 {middle})' text-anchor=middle>images</text>")
    if threshold is not None:
        x = sx(threshold)
        anchor = "start" if x < left + 0.25 * pw else "end" if x > left + 0.75 * pw else "middle"
        out.append(f"<line x1={x:.1f} x2={x:.1f} y1={above - 4} y2={above + ph} stroke='#000' stroke-width=2 "
                   "stroke-dasharray='5 3'/>")
        out.append(f"<text x={x:.1f} y={above - 8} text-anchor={anchor}>threshold {number(threshold)}</text>")
    out.append("</svg>")
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


def _worst(folder: Path, predictions: Predictions, threshold: float | None, n_worst: int,
           image_thresholds: np.ndarray | None = None, pixel_threshold: float | None = None) -> str:
    scale = map_scale(predictions.maps, pixel_threshold)
    sections = []
    for section, (title, chosen) in enumerate(worst_sections(predictions, threshold, n_worst, image_thresholds)):
        if not chosen:
            sections.append(f"<h2>{title}</h2><p>none</p>")
            continue
        rows = []
        for i in chosen:
            own = float(image_thresholds[i]) if image_thresholds is not None else threshold
            score = float(predictions.scores[i])
            decision = "" if own is None else (
                f" &gt; {number(own)} · anomalous" if score > own else f" ≤ {number(own)} · good")
            cells = "".join(
                f"<td><a href='{html.escape(quote(f'{FILES}/{name}'))}' target=_blank><img "
                f"src='data:image/png;base64,{thumbnail}' width={size[0]} height={size[1]} alt='{kind}'></a></td>"
                for kind, name, thumbnail, size in _pictures(folder / FILES, predictions, i, scale, pixel_threshold))
            rows.append(f"<tr><td class=cap>{html.escape(Path(predictions.paths[i]).name)}<br>"
                        f"{html.escape(predictions.defects[i])}<br>score {number(score)}{decision}</td>{cells}</tr>")
        outlined = "; white outline: above the pixel threshold" if pixel_threshold is not None else ""
        sections.append(
            f"<h2>{title}</h2><table class=worst><tr><th></th><th>image</th><th>ground truth</th>"
            "<th>heat map</th><th>overlay</th></tr>"
            f"<tr><td class=cap>colour: anomaly map value, one scale for every map{outlined}; a click on a "
            f"picture enlarges it</td><td colspan=2></td><td colspan=2>"
            f"{_colour_bar(scale, pixel_threshold, f'jet{section}')}</td></tr>" + "".join(rows) + "</table>")
    return "".join(sections)


def _colour_bar(scale: tuple[float, float], pixel_threshold: float | None, name: str) -> str:
    """The heat maps' colours against anomaly map values as inline SVG, the pixel threshold marked."""
    low, high = scale
    w, h, pad, top = 2 * THUMB + 17, 58, 14, 20
    bar = w - 2 * pad
    offsets = np.linspace(0, 1, 33)
    stops = "".join(f"<stop offset='{t:.4f}' stop-color='rgb({r},{g},{b})'/>"
                    for t, (r, g, b) in zip(offsets, heat_colours(offsets, (0.0, 1.0)).tolist(), strict=True))

    def sx(value: float) -> float:
        return pad + bar * (value - low) / (high - low)

    out = [f"<svg class=colourbar width={w} height={h} viewBox='0 0 {w} {h}' xmlns='http://www.w3.org/2000/svg'>"
           f"<defs><linearGradient id={name}>{stops}</linearGradient></defs>",
           f"<rect x={pad} y={top} width={bar} height=14 fill='url(#{name})' stroke='#444'/>"]
    for tick in _ticks(low, high, 5):
        out.append(f"<line x1={sx(tick):.1f} x2={sx(tick):.1f} y1={top + 14} y2={top + 19} stroke='#444'/>")
        out.append(f"<text x={sx(tick):.1f} y={top + 32} text-anchor=middle>{number(tick)}</text>")
    if pixel_threshold is not None and low <= pixel_threshold <= high:
        x = sx(pixel_threshold)
        out.append(f"<line x1={x:.1f} x2={x:.1f} y1={top - 4} y2={top + 14} stroke='#000' stroke-width='2'/>")
        out.append(f"<text x={x:.1f} y={top - 7} text-anchor=middle>pixel threshold {number(pixel_threshold)}</text>")
    out.append("</svg>")
    return "".join(out)


def _fitted(size: tuple[int, int], long_side: int) -> tuple[int, int]:
    """(width, height) of a ``size`` picture scaled to ``long_side``, its aspect kept."""
    scale = long_side / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _resized(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``pixels`` (a float map or uint8 RGB) at ``size`` = (width, height): bilinear, nearest when enlarging
    a picture (its pixels stay visible)."""
    if pixels.shape[1::-1] == size:
        return pixels
    grows = pixels.ndim == 3 and size[0] > pixels.shape[1]
    picture = Image.fromarray(pixels if pixels.ndim == 3 else pixels.astype(np.float32))
    return np.asarray(picture.resize(size, Image.NEAREST if grows else Image.BILINEAR))


def _pictures(files: Path, predictions: Predictions, index: int, scale: tuple[float, float],
              pixel_threshold: float | None) -> list[tuple[str, str, str, tuple[int, int]]]:
    """The image, ground truth, heat map and overlay of image ``index`` at the original image's aspect (the maps
    were evaluated squashed to a square): each written into ``files`` at full size, and its thumbnail
    (kind, file name, base64 PNG, (width, height))."""
    anomaly_map = predictions.maps[index]
    path = Path(predictions.paths[index])
    try:
        with Image.open(path) as handle:  # the header gives the size: the image's aspect
            original = handle.size
            large = _fitted(original, max(min(max(original), LARGE), 2 * THUMB))
            handle.draft("RGB", large)  # a large JPEG decodes at a fraction of its size, no smaller than needed
            image = _resized(np.asarray(handle.convert("RGB")), large)
    except OSError:  # the image moved since evaluation: show the map alone, at its own aspect
        original = large = _fitted(anomaly_map.shape[::-1], 2 * THUMB)
        image = np.full((large[1], large[0], 3), 128, np.uint8)
    shown = _fitted(original, THUMB)  # on the page; a small image's thumbnail is stored at its own size
    small = shown if max(original) > THUMB else original
    drawn = {size: _drawn(_resized(image, size), anomaly_map, predictions.masks[index], scale, pixel_threshold)
             for size in (large, small)}
    out = []
    for kind in PICTURES:
        form = "png" if kind == "ground truth" else "jpg"  # a photograph's size as JPEG, 10x faster to write
        name = f"{index:05d}_{file_part(path.stem)}_{kind.replace(' ', '_')}.{form}"
        picture = Image.fromarray(drawn[large][kind])
        atomic_write(files / name, lambda tmp, picture=picture, form=form: picture.save(
            tmp, format="PNG" if form == "png" else "JPEG", **({} if form == "png" else {"quality": 92})))
        out.append((kind, name, _png(drawn[small][kind]), shown))
    return out


def _drawn(image: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray, scale: tuple[float, float],
           pixel_threshold: float | None) -> dict[str, np.ndarray]:
    """The four pictures (uint8 RGB) at ``image``'s size, the map and mask resized to it; the overlay outlines
    the map above ``pixel_threshold`` (:func:`metaad.runs.rendering.overlay`)."""
    size = image.shape[1::-1]
    shown = _resized(anomaly_map, size)
    truth = _resized(mask.astype(np.float32), size) > 0.5
    return {
        "image": image,
        "ground truth": np.repeat(truth[..., None], 3, axis=2).astype(np.uint8) * 255,
        "heat map": heat_colours(shown, scale),
        "overlay": overlay(image, shown, scale, None if pixel_threshold is None else shown > pixel_threshold),
    }


def _png(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=True)
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
svg text {{ font: 12px system-ui, sans-serif; }}
.bar {{ height: 12px; background: #1f5fbf; }}
table.worst img {{ display: block; image-rendering: pixelated; }}
table.worst a {{ display: block; cursor: zoom-in; }}
td.cap {{ max-width: 180px; font-size: 12px; overflow-wrap: anywhere; }}
</style></head>
<body>
{body}
</body></html>
"""
