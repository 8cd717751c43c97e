"""report.html: self-contained (no network; thumbnails inline, each a link to its full-size file in report_files/),
thumbnails at the image's own aspect, heat maps under a colour bar, readable histogram axes, one way of writing
the threshold, and a real headless browser shows it without console errors and with content on the screen."""

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metaad.runs.evaluation import Predictions
from metaad.runs.html_report import THUMB
from metaad.runs.report import write_report

SIZE = 64
WIDTH = 96  # the image files are 96 x 64; the model saw them squashed to SIZE x SIZE


def _predictions(folder, width: int = WIDTH) -> Predictions:
    """12 good and 8 defective images of two types, with masks, scored by a fake model that mostly sees them;
    the files ``width`` x SIZE, their maps and masks SIZE x SIZE."""
    rng = np.random.default_rng(0)
    paths, labels, defects, scores, maps, masks = [], [], [], [], [], []
    for i in range(20):
        label = int(i >= 12)
        image = (rng.random((SIZE, SIZE, 3)) * 60 + 100).astype(np.uint8)
        mask = np.zeros((SIZE, SIZE), np.uint8)
        anomaly_map = rng.random((SIZE, SIZE)).astype(np.float32) * 0.3
        if label:
            y, x = rng.integers(8, 40, 2)
            mask[y : y + 16, x : x + 16] = 1
            image[mask == 1] = (200, 40, 40)
            anomaly_map[mask == 1] += 1.0
        path = folder / "images" / f"{'bad' if label else 'good'}_{i:02d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(image).resize((width, SIZE), Image.NEAREST).save(path)
        paths.append(str(path))
        labels.append(label)
        defects.append(("crack" if i % 2 else "stain") if label else "good")
        scores.append(float(anomaly_map.max()) + (0.5 if i in (3, 15) else 0) - (0.9 if i == 12 else 0))
        maps.append(anomaly_map)
        masks.append(mask)
    return Predictions(paths, np.array(labels), defects, np.array(scores), np.stack(maps), np.stack(masks), 5.0, 7.0)


PIXEL_THRESHOLD = 0.6


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    predictions = _predictions(folder)
    metrics = {"image_auroc": 0.95, "pixel_auroc": 0.9, "pro": 0.8, "image_f1_max": 0.9}
    (folder / "config.json").write_text('{"model": "patchcore", "data": {"format": "mtd", "root": "x"}}')
    write_report(folder, predictions, metrics, threshold=1.1, pixel_threshold=PIXEL_THRESHOLD)
    return folder / "report.html"


def test_report_is_self_contained(report):
    page = report.read_text(encoding="utf-8")
    for section in ("Metrics", "Image ROC", "PRO curve", "Score histogram", "per defect type", "False alarms",
                    "Misses", "Lowest-margin detections", "threshold 1.1"):
        assert section in page, section
    assert "Metaformer (Wu et al., ICCV 2021)" in page and "0.993" in page  # the paper's figure beside ours
    assert "crack" in page and "stain" in page
    # nothing fetched: no script, no external URL except SVG's namespace name; pictures inline, links to files here
    assert "<script" not in page
    assert set(re.findall(r"\w+://[^'\" >]*", page)) == {"http://www.w3.org/2000/svg"}
    sources = re.findall(r"src=['\"]?([^'\" >]+)", page)
    assert sources and all(source.startswith("data:image/png;base64,") for source in sources)
    targets = re.findall(r"href=['\"]?([^'\" >]+)", page)
    assert targets and all(target.startswith("report_files/") and (report.parent / target).is_file()
                           for target in targets)
    from metaad.runs.html_report import worst_sections

    shown = sum(len(chosen) for _, chosen in worst_sections(_predictions(report.parent), 1.1, 4))
    assert shown >= 4 and len(re.findall("data:image/png;base64,", page)) == 4 * shown  # 4 pictures an image


def _thumbnails(page: str) -> list[tuple[str, str, Image.Image, int, int]]:
    """(alt, link target, decoded thumbnail, shown width, shown height) of every linked picture in ``page``."""
    import base64
    import io

    found = re.findall(r"<a href='([^']+)'[^>]*><img src='data:image/png;base64,([^']+)' width=(\d+) height=(\d+) "
                       r"alt='([^']+)'></a>", page)
    return [(alt, target, Image.open(io.BytesIO(base64.b64decode(data))), int(width), int(height))
            for target, data, width, height, alt in found]


def test_thumbnails_keep_the_image_aspect_and_link_to_a_larger_picture(report):
    page = report.read_text(encoding="utf-8")
    thumbnails = _thumbnails(page)
    assert len(thumbnails) == len(re.findall("data:image/png;base64,", page))  # every picture is linked
    assert {alt for alt, *_ in thumbnails} == {"image", "ground truth", "heat map", "overlay"}
    for alt, target, thumbnail, width, height in thumbnails:
        assert abs(width / height - WIDTH / SIZE) < 0.02, (alt, width, height)  # 96 x 64, not the square
        assert abs(thumbnail.width / thumbnail.height - WIDTH / SIZE) < 0.02
        with Image.open(report.parent / target) as large:
            assert large.width > width and abs(large.width / large.height - WIDTH / SIZE) < 0.02, target


def test_a_defective_images_overlay_outlines_the_prediction_and_the_maps_have_a_colour_bar(report):
    page = report.read_text(encoding="utf-8")
    sections = [part for part in page.split("<h2>") if "<table class=worst>" in part]
    assert sections and all(part.count("<svg class=colourbar") == 1 for part in sections)
    bar = re.search(r"<svg class=colourbar width=(\d+).*?</svg>", page)
    assert int(bar.group(1)) > 2 * THUMB  # beside a heat map it spans the heat map and the overlay
    assert bar.group(0).count("<stop ") > 10 and f"pixel threshold {PIXEL_THRESHOLD:.4g}" in bar.group(0)
    ticks = [float(t) for t in re.findall(r"text-anchor=middle>([-\d.e]+)</text>", bar.group(0))]
    assert len(ticks) >= 3
    target = next(t for alt, t, *_ in _thumbnails(page) if alt == "overlay" and "bad_" in t)
    with Image.open(report.parent / target) as overlay:
        pixels = np.asarray(overlay.convert("RGB")).astype(int)
    assert (pixels.min(axis=2) > 235).sum() > 20  # the white outline of the map above the pixel threshold


def test_the_histogram_has_labelled_axes_and_threshold(report):
    page = report.read_text(encoding="utf-8")
    histogram = page[page.index("Score histogram"):]
    histogram = histogram[: histogram.index("</svg>")]
    labels = re.findall(r">([^<>]+)</text>", histogram)
    assert "image score" in labels and "images" in labels and "threshold 1.1" in labels
    numbers = [float(label) for label in labels if re.fullmatch(r"[-\d.e]+", label)]
    counts = [n for n in numbers if n.is_integer()]
    assert len(numbers) >= 6 and 0 in counts  # x ticks (scores) and y ticks (counts from 0)
    n_good = int(np.histogram(_predictions(report.parent).scores[:12], 30)[0].max())
    assert max(counts) >= n_good  # the count axis reaches the highest bar
    assert re.search(r"svg text \{ font: 1[2-9]px", page)  # readable at the size it is shown


def test_the_threshold_is_written_one_way_everywhere(tmp_path):
    import json

    predictions = _predictions(tmp_path)
    threshold, pixel_threshold = 1.0123456, 0.6123456
    (tmp_path / "config.json").write_text(json.dumps({"model": "patchcore", "data": {"format": "mvtec"}}))
    (tmp_path / "threshold.json").write_text(json.dumps(
        {"threshold": threshold, "pixel_threshold": pixel_threshold, "n_calibration_images": 12}))
    write_report(tmp_path, predictions, {"image_auroc": 0.9}, threshold=threshold, pixel_threshold=pixel_threshold)
    page = (tmp_path / "report.html").read_text()
    assert set(re.findall(r"1\.012\d*", page)) == {"1.012"}
    assert set(re.findall(r"0\.612\d*", page)) == {"0.6123"}
    # the heading, the counts' heading, the run table, the histogram, the caption of each hard image
    assert page.count("1.012") >= 4 + len(re.findall("<td class=cap>[^<]*<br>", page))
    assert "<td>image threshold</td><td>1.012</td>" in page and "threshold 1.012</text>" in page
    assert "pixel threshold 0.6123" in page and "<td>pixel threshold</td><td>0.6123</td>" in page


def test_a_moved_image_leaves_its_map_at_the_maps_aspect(tmp_path):
    predictions = _predictions(tmp_path, width=SIZE)
    for path in predictions.paths:
        Path(path).unlink()
    from metaad.runs.html_report import write_html_report

    page = write_html_report(tmp_path, predictions, {}, 1.1, pixel_threshold=PIXEL_THRESHOLD).read_text()
    assert {(width, height) for *_, width, height in _thumbnails(page)} == {(THUMB, THUMB)}


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(page, png, tmp_path, height: int = 2000) -> str:
    """Headless chromium renders ``page`` to ``png`` (1200 px wide, ``height`` tall); returns its stderr
    (console messages)."""
    command = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr", "--v=0", "--hide-scrollbars", f"--screenshot={png}", f"--window-size=1200,{height}",
        page.resolve().as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0 and png.is_file(), result.stderr[-2000:]
    return result.stderr


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (.ci/run installs Debian's package)")
def test_browser_shows_the_report_without_console_errors(report, tmp_path):
    png = tmp_path / "report.png"
    log = screenshot(report, png, tmp_path)
    console = [line for line in log.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    assert not [line for line in log.splitlines() if "Failed to load resource" in line or "net::ERR" in line]
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape[:2] == (2000, 1200)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 500  # text, curves, heat maps: not blank


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (.ci/run installs Debian's package)")
def test_browser_shows_the_hard_images_heat_maps_and_colour_bars(report, tmp_path):
    png = tmp_path / "whole.png"
    log = screenshot(report, png, tmp_path, height=4400)  # down to the last section of hard images
    assert not [line for line in log.splitlines() if "Failed to load resource" in line or "net::ERR" in line]
    image = np.asarray(Image.open(png).convert("RGB")).astype(int)
    red, green, blue = image[..., 0], image[..., 1], image[..., 2]
    jet_blue = (blue > 150) & (red < 40) & (green < 60)  # the heat maps' low end: nothing else on the page is
    edges = np.flatnonzero(np.diff(np.r_[0, jet_blue.any(axis=1).astype(int), 0]))
    aspects = []  # of each band of rows that shows a heat map thumbnail (a colour bar is a thinner band)
    for top, bottom in zip(edges[::2], edges[1::2], strict=True):
        if bottom - top > THUMB / 3:
            columns = np.flatnonzero(jet_blue[top:bottom].any(axis=0))
            aspects.append((columns.max() - columns.min() + 1) / (bottom - top))
    assert len(aspects) == len(_thumbnails(report.read_text(encoding="utf-8"))) // 4  # every hard image's map
    assert all(abs(aspect - WIDTH / SIZE) < 0.05 for aspect in aspects), aspects  # shown at the image's aspect


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (.ci/run installs Debian's package)")
def test_console_errors_would_be_seen(tmp_path):
    """The check above can fail: a page with a script error shows up in the browser's log."""
    page = tmp_path / "bad.html"
    page.write_text("<html><body>x<script>undefinedFunction();</script></body></html>", encoding="utf-8")
    log = screenshot(page, tmp_path / "bad.png", tmp_path)
    assert any("CONSOLE" in line and "undefinedFunction" in line for line in log.splitlines())


def test_sections_of_hard_images_hold_what_their_titles_say(tmp_path):
    from metaad.runs.html_report import worst_sections

    predictions = _predictions(tmp_path)
    scores, labels = predictions.scores, predictions.labels
    threshold = 1.1
    sections = dict(worst_sections(predictions, threshold, n_worst=20))
    misses = sections["Misses (defective images scored at or below the threshold)"]
    alarms = sections["False alarms (good images scored above the threshold)"]
    detected = sections["Lowest-margin detections (defective images just above the threshold)"]
    assert misses and all(labels[i] == 1 and scores[i] <= threshold for i in misses)  # image 12, pushed down
    assert all(labels[i] == 0 and scores[i] > threshold for i in alarms)
    assert all(labels[i] == 1 and scores[i] > threshold for i in detected)
    assert list(scores[detected]) == sorted(scores[detected])  # the closest call first
    # a threshold under every score: nothing is missed, and the report says "none" under the misses' title
    everything = dict(worst_sections(predictions, float(scores.min()) - 1, n_worst=4))
    assert everything["Misses (defective images scored at or below the threshold)"] == []
    write_report(tmp_path, predictions, {"image_auroc": 0.9}, threshold=float(scores.min()) - 1)
    page = (tmp_path / "report.html").read_text()
    assert "<h2>Misses (defective images scored at or below the threshold)</h2><p>none</p>" in page
    assert "Worst misses" not in page


def test_the_report_gives_counts_context_and_training_and_no_empty_papers_column(tmp_path):
    import json

    from metaad.training.loop import plot_loss_curve

    predictions = _predictions(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(
        {"model": "fastflow", "preset": "cpu", "n_train": 40, "params": {"hidden_ratio": 4.0},
         "data": {"format": "mvtec", "category": "cable"}, "metaad_version": "9.9", "date": "2026-12-03"}))
    (tmp_path / "threshold.json").write_text(json.dumps(
        {"threshold": 1.1, "pixel_threshold": 0.5, "n_calibration_images": 12}))
    (tmp_path / "training").mkdir()
    plot_loss_curve([{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.0}], tmp_path / "training" / "loss_curve.png")
    write_report(tmp_path, predictions, {"image_auroc": 0.9}, threshold=1.1)
    page = (tmp_path / "report.html").read_text()
    flagged = predictions.scores > 1.1
    escapes = int(np.sum((predictions.labels == 1) & ~flagged))
    rejects = int(np.sum((predictions.labels == 0) & flagged))
    assert f"{escapes} escapes" in page and f"{rejects} false rejects" in page
    assert "<td>method</td><td>fastflow</td>" in page and "hidden_ratio=4.0" in page
    assert "12 held-out good images" in page and "<td>trained on</td><td>40 images</td>" in page
    assert "alt='training loss per epoch'" in page
    assert "papers (same data set)" not in page  # no paper reports this data set
