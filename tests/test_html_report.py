"""report.html: self-contained (no network, pictures inline), and a real headless browser shows it without
console errors and with content on the screen."""

import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from metaad.runs.evaluation import Predictions
from metaad.runs.report import write_report

SIZE = 64


def _predictions(folder) -> Predictions:
    """12 good and 8 defective images of two types, with masks, scored by a fake model that mostly sees them."""
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
        Image.fromarray(image).save(path)
        paths.append(str(path))
        labels.append(label)
        defects.append(("crack" if i % 2 else "stain") if label else "good")
        scores.append(float(anomaly_map.max()) + (0.5 if i in (3, 15) else 0) - (0.9 if i == 12 else 0))
        maps.append(anomaly_map)
        masks.append(mask)
    return Predictions(paths, np.array(labels), defects, np.array(scores), np.stack(maps), np.stack(masks), 5.0, 7.0)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    predictions = _predictions(folder)
    metrics = {"image_auroc": 0.95, "pixel_auroc": 0.9, "pro": 0.8, "image_f1_max": 0.9}
    (folder / "config.json").write_text('{"model": "patchcore", "data": {"format": "mtd", "root": "x"}}')
    write_report(folder, predictions, metrics, threshold=1.1)
    return folder / "report.html"


def test_report_is_self_contained(report):
    page = report.read_text(encoding="utf-8")
    for section in ("Metrics", "Image ROC", "PRO curve", "Score histogram", "per defect type", "False alarms",
                    "Misses", "Lowest-margin detections", "threshold 1.1"):
        assert section in page, section
    assert "Metaformer (Wu et al., ICCV 2021)" in page and "0.993" in page  # the paper's figure beside ours
    assert "crack" in page and "stain" in page
    # nothing fetched: no script, no external URL except SVG's namespace name
    assert "<script" not in page
    links = re.findall(r"(?:src|href)=['\"]?([^'\" >]+)", page)
    assert links and all(link.startswith("data:image/png;base64,") for link in links), set(links) - {""}
    from metaad.runs.html_report import worst_sections

    shown = sum(len(chosen) for _, chosen in worst_sections(_predictions(report.parent), 1.1, 4))
    assert shown >= 4 and len(re.findall("data:image/png;base64,", page)) == 4 * shown  # 4 pictures an image


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(page, png, tmp_path) -> str:
    """Headless chromium renders ``page`` to ``png``; returns its stderr (console messages)."""
    command = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr", "--v=0", "--hide-scrollbars", f"--screenshot={png}", "--window-size=1200,2000",
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
