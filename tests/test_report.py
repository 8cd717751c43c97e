"""The run report: a second report into the same folder shows only its own worst images."""

from __future__ import annotations

import numpy as np
from PIL import Image

from metaad.engine.evaluation import Predictions
from metaad.engine.report import write_worst_overlays


def _predictions(tmp_path, names: list[str], scores: list[float], labels: list[int]) -> Predictions:
    paths = []
    for name in names:
        path = tmp_path / f"{name}.png"
        Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(path)
        paths.append(str(path))
    n = len(names)
    return Predictions(
        paths, np.array(labels), ["x"] * n, np.array(scores, float), np.random.default_rng(0).random((n, 16, 16)),
        np.zeros((n, 16, 16), np.uint8), 0.0, 0.0,
    )


def test_worst_overlays_replace_those_of_an_earlier_report(tmp_path):
    folder = tmp_path / "worst"
    folder.mkdir()
    (folder / "notes.png").write_bytes(b"kept: not written by the report")
    first = _predictions(tmp_path, ["a", "b", "c", "d"], [0.9, 0.1, 0.2, 0.8], [0, 1, 0, 1])
    write_worst_overlays(folder, first, n_worst=2)
    assert sorted(p.name for p in folder.glob("0*.png")) == ["00_missed_defect_b.png", "01_false_alarm_a.png"]
    second = _predictions(tmp_path, ["e", "f", "g", "h"], [0.9, 0.1, 0.2, 0.8], [1, 0, 1, 0])
    write_worst_overlays(folder, second, n_worst=2)
    expected = ["00_missed_defect_g.png", "01_false_alarm_h.png", "notes.png"]
    assert sorted(p.name for p in folder.glob("*.png")) == expected
