"""The run report: worst overlays named by outcome and defect type, true detections included, one colour scale
that shows the maps, and a second report into the same folder shows only its own images."""

from __future__ import annotations

import numpy as np
from PIL import Image

from metaad.runs.evaluation import Predictions
from metaad.runs.report import map_scale, save_overlay, write_worst_overlays


def _predictions(tmp_path, names: list[str], scores: list[float], labels: list[int], defects=None) -> Predictions:
    paths = []
    for name in names:
        path = tmp_path / f"{name}.png"
        Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(path)
        paths.append(str(path))
    n = len(names)
    masks = np.zeros((n, 16, 16), np.uint8)
    masks[np.array(labels) == 1, 4:8, 4:8] = 1
    return Predictions(
        paths, np.array(labels), defects or ["good" if y == 0 else "scratch" for y in labels],
        np.array(scores, float), np.random.default_rng(0).random((n, 16, 16)), masks, 0.0, 0.0,
    )


def test_worst_overlays_replace_those_of_an_earlier_report(tmp_path):
    folder = tmp_path / "worst"
    folder.mkdir()
    (folder / "notes.png").write_bytes(b"kept: not written by the report")
    first = _predictions(tmp_path, ["a", "b", "c", "d"], [0.9, 0.1, 0.2, 0.8], [0, 1, 0, 1])
    write_worst_overlays(folder, first, n_worst=2)
    names = sorted(p.name for p in folder.glob("0*.png"))
    assert names == ["00_missed_defect_scratch_b.png", "01_false_alarm_good_a.png"]
    second = _predictions(tmp_path, ["e", "f", "g", "h"], [0.9, 0.1, 0.2, 0.8], [1, 0, 1, 0])
    write_worst_overlays(folder, second, n_worst=2)
    expected = ["00_missed_defect_scratch_g.png", "01_false_alarm_good_h.png", "notes.png"]
    assert sorted(p.name for p in folder.glob("*.png")) == expected


def test_overlays_are_named_by_the_decision_at_the_threshold_and_include_detections(tmp_path):
    names = [f"i{k}" for k in range(10)]
    scores = [0.1, 0.2, 0.9, 0.3, 0.95, 0.6, 0.7, 0.8, 0.4, 0.5]
    labels = [0, 0, 0, 1, 1, 1, 1, 1, 1, 0]
    defects = ["good", "good", "good", "crack", "hole", "hole", "crack", "stain", "crack", "good"]
    folder = tmp_path / "worst"
    write_worst_overlays(folder, _predictions(tmp_path, names, scores, labels, defects), 8, threshold=0.55,
                         pixel_threshold=0.9)
    written = sorted(p.name for p in folder.glob("*.png"))
    assert len(written) == 8
    assert "00_missed_defect_crack_i3.png" in written  # lowest-scored defective, below the threshold
    assert "02_detected_defect_hole_i5.png" in written  # a worst defective one that is above the threshold
    assert any("_false_alarm_good_i2" in n for n in written)  # the highest-scored good image
    assert any("_correct_good_" in n for n in written)
    assert any(n.startswith("06_detected_defect_hole_i4") for n in written)  # the clearest detection


def test_the_colour_scale_shows_the_maps_with_the_pixel_threshold_in_the_middle():
    rng = np.random.default_rng(0)
    maps = rng.random((4, 32, 32)).astype(np.float32)
    maps[0, 10:12, 10:12] = 100.0  # one strong defect would leave every other map at the bottom of the scale
    low, high = map_scale(maps, pixel_threshold=1.0)
    assert abs((1.0 - low) / (high - low) - 0.5) < 1e-6
    assert (np.median(maps) - low) / (high - low) > 0.2  # the background is not all one colour


def test_overlay_keeps_the_image_aspect(tmp_path):
    image = np.zeros((40, 120, 3), np.uint8)
    anomaly_map = np.zeros((40, 120), np.float32)
    anomaly_map[10:20, 50:60] = 1.0
    path = tmp_path / "o.png"
    save_overlay(path, image, anomaly_map, (0.0, 1.0), title="t", predicted=anomaly_map > 0.5, pixel_threshold=0.5)
    width, height = Image.open(path).size
    assert width > 2.5 * height


def test_a_second_report_replaces_the_pictures_of_the_first(tmp_path):
    from metaad.runs.report import write_report

    folder = tmp_path / "run"
    write_report(folder, _predictions(tmp_path, ["a", "b", "c", "d"], [0.9, 0.1, 0.2, 0.8], [0, 1, 0, 1]),
                 {"image_auroc": 0.5}, threshold=0.5, pixel_threshold=0.5)
    files = folder / "report_files"
    (files / "notes.png").write_bytes(b"kept: not written by the report")
    first = {p.name for p in files.iterdir()}
    assert len(first) == 4 * 4 + 1 and any("_a_overlay" in name for name in first)
    write_report(folder, _predictions(tmp_path, ["e", "f"], [0.9, 0.1], [1, 0]), {}, threshold=0.5)
    second = {p.name for p in files.iterdir()}
    assert len(second) == 2 * 4 + 1 and "notes.png" in second and not any("_a_" in name for name in second)
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert all(f"report_files/{name}" in page for name in second - {"notes.png"})
