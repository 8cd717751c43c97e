"""Every fenced example of README.md runs, in order, in one folder: bash blocks through the ``metaad`` entry point
on tiny synthetic images, python blocks executed. A block that cannot run here is marked on the line before
its fence with ``<!-- readme-test: skip: REASON -->``.

The walk-through ("From good images to predictions") is the end-to-end test of the command line: fit on good
images only, predict on a folder with a corrupt image and masks beside images, test, report.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(
    r"^(?:<!-- readme-test: skip:(?P<reason>[^>]*)-->\n)?```(?P<lang>[^\n]*)\n(?P<body>.*?)^```\s*$",
    re.MULTILINE | re.DOTALL,
)
RUNNABLE = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python"}
# the walk-through's settings for a laptop, made tiny for the test (the commands are otherwise as written)
SUBSTITUTIONS = {
    "--preset cpu": "--preset tiny",
    'create_model("patchcore", "cpu")': 'create_model("patchcore", "tiny")',
    "--tile 256": "--tile 32",  # the walk-through's images are 64 px
}


def examples() -> list[tuple[str, str, str | None]]:
    """(language, code, skip reason or None) of every fenced block, in order."""
    return [(m["lang"].strip(), m["body"], m["reason"]) for m in FENCE.finditer(README.read_text(encoding="utf-8"))]


def test_every_fenced_example_runs_or_says_why_not():
    found = examples()
    assert any(lang == "bash" and "metaad predict" in code for lang, code, _ in found)
    for lang, code, reason in found:
        head = code.splitlines()[0] if code.strip() else "(empty)"
        if reason is not None:
            assert reason.strip(), f"README block {head!r}: a skip needs a reason"
        else:
            assert lang in RUNNABLE, f"README block {head!r}: language {lang!r} cannot be run; mark it skipped"


@pytest.fixture()
def walkthrough_folder(synthetic_root, tmp_path) -> Path:
    """The walk-through's folders: good/, incoming/ (MTD-style masks beside photographs, a corrupt file),
    bad/ + bad_masks/."""
    category = synthetic_root / "weave"
    shutil.copytree(category / "train" / "good", tmp_path / "good")
    for name in ("incoming", "bad", "bad_masks"):
        (tmp_path / name).mkdir()
    for k, (defect, stem) in enumerate([("scratch", "000"), ("hole", "001")], start=1):
        photo = Image.open(category / "test" / defect / f"{stem}.png").convert("RGB")
        photo.save(tmp_path / "incoming" / f"part_{k}.jpg")
        shutil.copy(category / "ground_truth" / defect / f"{stem}_mask.png", tmp_path / "incoming" / f"part_{k}.png")
    shutil.copy(category / "test" / "good" / "000.png", tmp_path / "incoming" / "part_3.png")
    (tmp_path / "incoming" / "part_4.jpg").write_bytes(b"\xff\xd8 a corrupt JPEG")
    for defect in ("scratch", "crack"):
        for image in sorted((category / "test" / defect).glob("*.png")):
            shutil.copy(image, tmp_path / "bad" / f"{defect}_{image.name}")
            mask = category / "ground_truth" / defect / f"{image.stem}_mask.png"
            shutil.copy(mask, tmp_path / "bad_masks" / f"{defect}_{image.stem}_mask.png")
    return tmp_path


def test_readme_examples_run(walkthrough_folder, monkeypatch, capsys):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    monkeypatch.chdir(walkthrough_folder)
    for lang, code, reason in examples():
        if reason is not None:
            continue
        for old, new in SUBSTITUTIONS.items():
            code = code.replace(old, new)
        if RUNNABLE[lang] == "bash":
            result = subprocess.run(["bash", "-euo", "pipefail", "-c", code],
                                    capture_output=True, text=True, env=env, timeout=600)
            assert result.returncode == 0, f"{code}\n{result.stdout}\n{result.stderr}"
            assert "Traceback" not in result.stderr, result.stderr
            print(result.stdout)
        else:
            exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    output = capsys.readouterr().out

    # fit on good images only: a run folder, no evaluation, and why
    assert "no evaluation" in output and (walkthrough_folder / "runs/parts/model/model.json").is_file()
    assert json.loads((walkthrough_folder / "runs/parts/config.json").read_text())["params"]["image_size"] == 64
    # predict: the corrupt file has an error row, the masks beside the photographs are left out
    with open(walkthrough_folder / "predictions/predictions.csv", newline="") as handle:
        rows = {row["name"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"part_1", "part_2", "part_3", "part_4"} and rows["part_4"]["error"]
    assert "left out 2 mask file(s)" in output and "scored 3 of 4 images" in output
    # regions: the header and a row of the defective photograph
    assert "path,name,region,area,x,y,width,height,peak" in output
    # tiling: recorded in the run, and the tiled run scored the same images
    tiled = json.loads((walkthrough_folder / "runs/parts_tiled/config.json").read_text())
    assert tiled["tiling"] == {"tile": 32, "overlap": 0.25} and tiled["image_size"] == 64
    with open(walkthrough_folder / "predictions_tiled/predictions.csv", newline="") as handle:
        assert {row["name"] for row in csv.DictReader(handle) if not row["error"]} == {"part_1", "part_2", "part_3"}
    # the miss-rate threshold was written into the run
    set_from = json.loads((walkthrough_folder / "runs/parts/threshold.json").read_text())["set_from_labelled"]
    assert set_from["target"].startswith("miss-rate")
    # test: a report folder with image and pixel metrics
    metrics = json.loads((walkthrough_folder / "reports/parts/metrics.json").read_text())
    assert 0 <= metrics["image_auroc"] <= 1 and 0 <= metrics["pro"] <= 1
    assert "report folder: reports/parts" in output
    assert any((walkthrough_folder / "reports/parts/worst").glob("*_scratch_*.png"))
    # every method's example fitted and evaluated a run
    for run in ("rd", "fastflow", "draem", "ssim_ae", "multiscale", "glance", "metaformer"):
        metrics = json.loads((walkthrough_folder / "runs" / run / "metrics.json").read_text())
        assert 0 <= metrics["image_auroc"] <= 1 and 0 <= metrics["pro"] <= 1, run
    assert json.loads((walkthrough_folder / "runs/ssim_ae/config.json").read_text())["params"]["map_type"] == "ssim"
    # the Python example printed a line per image and the thresholds
    assert "incoming/part_1.jpg" in output and "<array 2>" in output and "pixel threshold" in output
