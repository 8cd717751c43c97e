"""The unified protocol: one model fitted on several categories' good images (``--category a,b`` or ``all``),
held-out images and thresholds per category, metrics per category and their mean; predict and serve pick a
category's threshold and fall back to the global one with a note."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from metaad.data.datasets import DataError
from metaad.data.source import DataSpec, run_split, split_calibration

CATEGORIES = ["weave", "grain"]


@pytest.fixture(scope="module")
def two_categories(tmp_path_factory) -> Path:
    from metaad.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("unified")
    make_synthetic_dataset(root, categories=CATEGORIES, n_train=20, n_test_good=4, n_test_per_defect=2, size=64)
    return root


@pytest.fixture(scope="module")
def unified_run(two_categories, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "unified"
    result = subprocess.run(
        [sys.executable, "-m", "metaad.cli.main", "fit", "--model", "patchcore", "--data", str(two_categories),
         "--category", "all", "--out", str(run), "--image-size", "64", "--param", "image_size=64",
         "--param", "coreset_ratio=0.2", "--param", 'search="exact"', "--calibration-fraction", "0.2",
         "--threads", "1", "--quiet"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return run


def test_categories_parse_and_bad_names_are_clear_errors(two_categories):
    assert DataSpec(str(two_categories), "mvtec", "all").categories() == sorted(CATEGORIES)
    assert DataSpec(str(two_categories), "mvtec", "weave, grain").categories() == ["weave", "grain"]
    assert DataSpec(str(two_categories), "mvtec", "all").unified
    assert not DataSpec(str(two_categories), "mvtec", "weave").unified
    with pytest.raises(DataError, match="empty name"):
        DataSpec(str(two_categories), "mvtec", "weave,,grain").categories()
    with pytest.raises(DataError, match="named twice"):
        DataSpec(str(two_categories), "mvtec", "weave,weave").categories()
    with pytest.raises(DataError, match="category folder not found"):
        DataSpec(str(two_categories), "mvtec", "weave,leather").records("train")


def test_each_category_holds_out_its_own_calibration_images(two_categories):
    split = run_split(DataSpec(str(two_categories), "mvtec", "all"), 0.2)
    for name in CATEGORIES:
        assert sum(r.category == name for r in split.calibration) == 4  # 20 % of each category's 20
        assert sum(r.category == name for r in split.fit) == 16
    # one category: the same split as before categories were recorded (one group, the same seeded draw)
    single = DataSpec(str(two_categories), "mvtec", "weave")
    assert run_split(single, 0.2).calibration == split_calibration(single.records("train"), 0.2, 0)[1]
    # k shots are drawn per category
    shots = run_split(DataSpec(str(two_categories), "mvtec", "all"), 0.2, shots=3)
    assert sorted(r.category for r in shots.fit) == sorted(CATEGORIES * 3)


def test_a_unified_fit_writes_thresholds_and_metrics_per_category(unified_run):
    config = json.loads((unified_run / "config.json").read_text())
    assert config["categories"] == sorted(CATEGORIES) and config["n_train"] == 32
    thresholds = json.loads((unified_run / "threshold.json").read_text())
    assert thresholds["n_calibration_images"] == 8
    assert set(thresholds["categories"]) == set(CATEGORIES)
    for record in thresholds["categories"].values():
        assert record["n_calibration_images"] == 4 and record["threshold"] <= thresholds["threshold"]
    assert "few_calibration_images" in thresholds  # 4 images cannot give a 1 % false-alarm quantile
    metrics = json.loads((unified_run / "metrics.json").read_text())
    per_category = metrics["per_category"]
    assert set(per_category) == set(CATEGORIES)
    for key in ("image_auroc", "pixel_auroc", "pro"):
        assert metrics["category_mean"][key] == pytest.approx(np.mean([per_category[c][key] for c in CATEGORIES]))
    assert all("accuracy_at_threshold" in r for r in per_category.values())
    page = (unified_run / "report.html").read_text()
    assert "Per category" in page and all(f"<td>{name}</td>" in page for name in CATEGORIES)
    assert "(global; each category decides at its own)" in page
    with open(unified_run / "scores.csv", newline="") as handle:  # each image decided at its category's
        for row in csv.DictReader(handle):
            name = next(c for c in CATEGORIES if f"/{c}/" in row["path"])
            own = thresholds["categories"][name]["threshold"]
            score = float(row["score"])
            if abs(score - own) > 1e-4 * abs(own):
                assert row["decision"] == ("anomalous" if score > own else "good"), row


def test_predict_decides_with_the_named_categorys_threshold(unified_run, two_categories, tmp_path):
    thresholds = json.loads((unified_run / "threshold.json").read_text())
    images = str(two_categories / "weave" / "test" / "good")

    def predict(*extra) -> tuple[subprocess.CompletedProcess, list[dict]]:
        out = tmp_path / ("named" if extra else "unnamed")
        result = subprocess.run(
            [sys.executable, "-m", "metaad.cli.main", "predict", "--run", str(unified_run), images, "--out",
             str(out), "--threads", "1", "--no-progress", *extra],
            capture_output=True, text=True, timeout=600,
        )
        assert result.returncode == 0, result.stderr
        with open(out / "predictions.csv", newline="") as handle:
            return result, list(csv.DictReader(handle))

    result, rows = predict("--category", "weave")
    assert float(rows[0]["threshold"]) == pytest.approx(thresholds["categories"]["weave"]["threshold"], rel=1e-5)
    assert "note:" not in result.stdout
    result, rows = predict()
    assert float(rows[0]["threshold"]) == pytest.approx(thresholds["threshold"], rel=1e-5)
    assert "no category was named, so the global threshold decides" in result.stdout


def test_serve_takes_the_category_as_a_form_field(unified_run, two_categories):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from metaad.deploy.serve import create_app

    thresholds = json.loads((unified_run / "threshold.json").read_text())
    client = TestClient(create_app(unified_run))
    image = next((two_categories / "grain" / "test" / "good").iterdir()).read_bytes()
    named = client.post("/predict", files={"image": ("a.png", image, "image/png")}, data={"category": "grain"})
    assert named.status_code == 200, named.text
    assert named.json()["threshold"] == pytest.approx(thresholds["categories"]["grain"]["threshold"])
    assert named.json()["category"] == "grain" and named.json()["note"] is None
    unknown = client.post("/predict", files={"image": ("a.png", image, "image/png")}, data={"category": "cap"})
    assert unknown.json()["threshold"] == pytest.approx(thresholds["threshold"])
    assert "'cap' has no threshold of its own" in unknown.json()["note"]
    assert client.get("/model").json()["categories"] == sorted(CATEGORIES)


def test_an_exported_unified_run_carries_each_categorys_threshold(unified_run, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from metaad.deploy.export import export_run

    metadata = export_run(unified_run, tmp_path / "model.onnx")
    thresholds = json.loads((unified_run / "threshold.json").read_text())
    exported = json.loads(metadata["category_thresholds"])
    assert {name: r["threshold"] for name, r in exported.items()} == {
        name: r["threshold"] for name, r in thresholds["categories"].items()
    }


def test_predict_writes_regions_and_drops_small_ones(unified_run, two_categories, tmp_path):
    images = str(two_categories / "weave" / "test")

    def predict(out: Path, *extra) -> tuple[list[dict], list[dict]]:
        result = subprocess.run(
            [sys.executable, "-m", "metaad.cli.main", "predict", "--run", str(unified_run), images, "--out",
             str(out), "--threads", "1", "--no-progress", "--category", "weave", *extra],
            capture_output=True, text=True, timeout=600,
        )
        assert result.returncode == 0, result.stderr
        assert "regions.csv" in result.stdout
        with open(out / "predictions.csv", newline="") as a, open(out / "regions.csv", newline="") as b:
            return list(csv.DictReader(a)), list(csv.DictReader(b))

    rows, regions = predict(tmp_path / "all")
    assert regions, "the defective test images should give predicted regions"
    for row in rows:  # each image's region count is its number of rows in regions.csv
        assert int(row["n_regions"]) == sum(r["name"] == row["name"] for r in regions)
    for region in regions:
        assert int(region["area"]) <= int(region["width"]) * int(region["height"]) and float(region["peak"]) > 0
    largest = max(int(r["area"]) for r in regions)
    rows, regions = predict(tmp_path / "large", "--min-region-area", str(largest + 1))
    assert regions == [] and all(row["n_regions"] == "0" for row in rows)


def test_serve_answers_with_regions(unified_run, two_categories):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from metaad.deploy.serve import create_app

    defective = next(p for p in (two_categories / "weave" / "test").iterdir() if p.name != "good")
    image = next(defective.iterdir()).read_bytes()
    answer = TestClient(create_app(unified_run)).post(
        "/predict", files={"image": ("a.png", image, "image/png")}, data={"category": "weave"}).json()
    assert isinstance(answer["regions"], list)
    for region in answer["regions"]:
        assert set(region) == {"area", "x", "y", "width", "height", "peak"} and region["area"] >= 1


def test_serve_draws_the_overlay_predict_writes(unified_run, two_categories, tmp_path):
    pytest.importorskip("fastapi")
    import base64
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from metaad.deploy.serve import create_app

    defective = next(p for p in sorted((two_categories / "weave" / "test").iterdir()) if p.name != "good")
    path = sorted(defective.iterdir())[0]
    subprocess.run([sys.executable, "-m", "metaad.cli.main", "predict", "--run", str(unified_run), str(path),
                    "--out", str(tmp_path / "p"), "--category", "weave", "--quiet", "--threads", "1"],
                   check=True, timeout=600)
    answer = TestClient(create_app(unified_run)).post(
        "/predict", params={"overlay": "true", "mask": "true"}, files={"image": ("a.png", path.read_bytes())},
        data={"category": "weave"}).json()
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["overlay"]))))
    written = np.asarray(Image.open(tmp_path / "p" / "overlays" / f"{path.stem}.png"))
    assert served.shape == written.shape and np.abs(served.astype(int) - written.astype(int)).max() <= 1
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["mask"]))))
    assert np.array_equal(mask > 0, np.asarray(Image.open(tmp_path / "p" / "masks" / f"{path.stem}.png")) > 0)
