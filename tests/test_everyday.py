"""Everyday use, as a user sees it: the ``metaad`` command line and ``metaad.load_run``.

One good-images-only run (tiny PatchCore) is fitted once, in a subprocess, and shared by the tests of this
module; predicting on a folder runs in a subprocess too. The other commands call ``metaad.cli.main.main``
in-process (exit code, stdout and stderr as a user sees them) because each new process spends 5-15 s
importing torch on 2 shared cores. ``tests/test_readme.py`` runs the whole path through the ``metaad`` entry
point.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def cli(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "metaad.cli.main", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=600)


def in_process(capsys, *args) -> subprocess.CompletedProcess:
    """``metaad ARGS`` run by its ``main`` in this process, as a CompletedProcess."""
    from metaad.cli.main import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result


def failed(result: subprocess.CompletedProcess, *phrases: str) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr
    return result.stderr


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def folders(synthetic_root, tmp_path_factory) -> Path:
    """good/ (defect-free only), bad/ + bad_masks/ (labelled defects), incoming/ (new images: an MTD-style
    photograph with its mask beside it, an NAME_mask.png, a wide image, a corrupt file)."""
    base = tmp_path_factory.mktemp("everyday")
    category = synthetic_root / "weave"
    shutil.copytree(category / "train" / "good", base / "good")
    for folder in ("bad", "bad_masks", "incoming"):
        (base / folder).mkdir()
    for defect in ("scratch", "hole"):
        for image in sorted((category / "test" / defect).glob("*.png")):
            shutil.copy(image, base / "bad" / f"{defect}_{image.name}")
            shutil.copy(category / "ground_truth" / defect / f"{image.stem}_mask.png",
                        base / "bad_masks" / f"{defect}_{image.stem}_mask.png")
    Image.open(category / "test" / "scratch" / "000.png").convert("RGB").save(base / "incoming" / "part_1.jpg")
    shutil.copy(category / "ground_truth" / "scratch" / "000_mask.png", base / "incoming" / "part_1.png")
    shutil.copy(category / "test" / "hole" / "001.png", base / "incoming" / "part_3.png")
    shutil.copy(category / "ground_truth" / "hole" / "001_mask.png", base / "incoming" / "part_3_mask.png")
    Image.open(category / "test" / "good" / "000.png").resize((96, 48)).save(base / "incoming" / "wide.png")
    (base / "incoming" / "broken.png").write_bytes(b"not an image")
    (base / "incoming" / "notes.txt").write_text("shift 2, line 4")  # not an image: left out, and counted
    return base


@pytest.fixture(scope="module")
def good_run(folders) -> tuple[Path, subprocess.CompletedProcess]:
    run = folders / "runs" / "parts"
    result = cli("fit", "--format", "folder", "--data", folders / "good", "--out", run, "--preset", "tiny",
                    "--no-progress")
    return run, result


def test_fit_on_good_images_only_writes_a_run_and_says_why_it_was_not_evaluated(good_run):
    run, result = good_run
    ok(result)
    assert "no evaluation" in result.stdout and "defect-free images only" in result.stdout
    for name in ("config.json", "threshold.json", "model/model.json", "model/model.safetensors"):
        assert (run / name).is_file(), name
    thresholds = json.loads((run / "threshold.json").read_text())
    assert thresholds["n_calibration_images"] >= 3 and thresholds["pixel_threshold"] > 0
    assert "evaluation_skipped" in json.loads((run / "metrics.json").read_text())
    assert "it/s" not in result.stderr and "batch/s" not in result.stderr  # --no-progress


def test_predict_scores_a_folder_reports_bad_files_and_leaves_out_masks(good_run, folders):
    run, _ = good_run
    out = folders / "predictions"
    result = ok(cli("predict", "--run", run, folders / "incoming", "--out", out, "--no-progress"))
    rows = {r["name"]: r for r in read_csv(out / "predictions.csv")}
    assert set(rows) == {"part_1", "part_3", "wide", "broken"}  # part_1.png and part_3_mask.png are masks
    assert "left out 2 mask file(s)" in result.stdout
    assert "left out 1 file(s) that are not images (by extension), e.g." in result.stdout
    assert rows["broken"]["error"] and rows["broken"]["decision"] == "error" and not rows["broken"]["score"]
    assert "broken.png" in result.stderr
    threshold = json.loads((run / "threshold.json").read_text())["threshold"]
    for name in ("part_1", "part_3", "wide"):
        row = rows[name]
        assert not row["error"] and row["decision"] in ("good", "anomalous")
        assert (row["decision"] == "anomalous") == (float(row["score"]) > threshold)
        assert (row["decision"] == "anomalous") == (float(row["normalized_score"]) > 0.5)
    # the normalised score keeps the raw scores' order (not clipped at 0 or 1)
    scored = sorted((float(rows[n]["score"]), float(rows[n]["normalized_score"])) for n in ("part_1", "part_3", "wide"))
    assert [b for _, b in scored] == sorted(b for _, b in scored) and len({b for _, b in scored}) == 3
    n_anomalous = sum(r["decision"] == "anomalous" for r in rows.values())
    assert f"scored 3 of 4 images: {n_anomalous} anomalous" in result.stdout
    assert str(out / "predictions.csv") in result.stdout and str(out / "heatmaps") in result.stdout
    # maps, masks and overlays at each image's own size and aspect
    assert Image.open(out / "heatmaps" / "wide.png").size == (96, 48)
    assert Image.open(out / "masks" / "wide.png").size == (96, 48)
    assert Image.open(out / "heatmaps" / "part_1.png").size == (64, 64)
    assert Image.open(out / "overlays" / "wide.png").size == (96, 48)  # the overlay at the image's own size
    assert not (out / "figures").exists()  # the two-panel figure only when asked for
    assert "images/s end to end" in result.stdout


def test_predict_writes_only_the_outputs_asked_for(good_run, folders, tmp_path):
    run, _ = good_run
    out = tmp_path / "chosen"
    ok(cli("predict", "--run", run, folders / "incoming", "--out", out, "--no-progress", "--outputs", "figures"))
    assert (out / "predictions.csv").is_file() and (out / "figures" / "wide.png").is_file()
    assert not (out / "heatmaps").exists() and not (out / "overlays").exists() and not (out / "masks").exists()
    width, height = Image.open(out / "figures" / "wide.png").size
    assert width > 2 * height  # the image beside its overlay, with a colour bar
    wrong = cli("predict", "--run", run, folders / "incoming", "--out", out, "--outputs", "csv,pictures")
    assert wrong.returncode == 2 and "expected a comma-separated choice of" in wrong.stderr


def test_predict_fails_only_when_nothing_could_be_scored(good_run, folders, tmp_path, capsys):
    run, _ = good_run
    failed(in_process(capsys, "predict", "--run", run, folders / "incoming" / "broken.png", "--out", tmp_path / "p"),
           "none of the 1 images could be scored")


def test_out_must_be_a_folder_and_a_run_is_not_overwritten_by_accident(good_run, folders, tmp_path, capsys):
    run, _ = good_run
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    failed(in_process(capsys, "fit", "--format", "folder", "--data", folders / "good", "--out", a_file), "is a file")
    failed(in_process(capsys, "predict", "--run", run, folders / "incoming", "--out", a_file), "is a file")
    failed(in_process(capsys, "fit", "--format", "folder", "--data", folders / "good", "--out", run), "--overwrite")


def test_test_takes_the_data_from_the_run_and_writes_a_report_folder(good_run, folders, capsys):
    run, _ = good_run
    report = folders / "report"
    # --data, --format and --seed come from the run: the same held-out good images, plus labelled defects
    result = ok(in_process(capsys, "test", "--run", run, "--abnormal-dir", folders / "bad",
                           "--mask-dir", folders / "bad_masks", "--out", report, "--quiet"))
    assert result.stdout == ""
    metrics = json.loads((report / "metrics.json").read_text())
    assert 0 <= metrics["image_auroc"] <= 1 and 0 <= metrics["pro"] <= 1 and metrics["n_images"] == 3 + 6
    worst = sorted(p.name for p in (report / "worst").glob("*.png"))
    assert worst and any("_scratch_" in n or "_hole_" in n for n in worst)
    result = ok(in_process(capsys, "test", "--run", run, "--no-progress"))
    assert "report folder:" in result.stdout and "run folder" not in result.stdout
    assert "no evaluation" in result.stdout and (run / "test" / "metrics.json").is_file()


def test_fit_config_refits_the_same_way_with_flags_overriding(good_run, folders, capsys):
    run, _ = good_run
    again = folders / "runs" / "again"
    result = ok(in_process(capsys, "fit", "--config", run / "config.json", "--out", again,
                           "--param", "coreset_ratio=0.5", "--quiet"))
    assert result.stdout == "" and "batch/s" not in result.stderr
    first, second = (json.loads((r / "config.json").read_text()) for r in (run, again))
    assert second["data"] == first["data"] and second["model"] == first["model"] == "patchcore"
    assert second["params"] == {**first["params"], "coreset_ratio": 0.5}
    assert second["preset"] == "tiny" and second["image_size"] == first["image_size"]


def test_labels_only_mvtec_category_is_evaluated_on_images_and_bad_files_get_one_line(
    synthetic_root, tmp_path, capsys
):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "weave", root / "weave", ignore=shutil.ignore_patterns("ground_truth"))
    (root / "weave" / "train" / "good" / "zz_broken.png").write_bytes(b"\x89PNG truncated")
    result = ok(in_process(capsys, "fit", "--data", root, "--category", "weave", "--out", tmp_path / "run",
                           "--preset", "tiny", "--skip-bad-files", "--no-progress"))
    assert "pixel metrics skipped" in result.stdout and "no ground-truth mask" in result.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0 <= metrics["image_auroc"] <= 1 and "pro" not in metrics and "pixel_metrics_skipped" in metrics
    assert "metaad: warning: skipped 1 of" in result.stderr and "UserWarning" not in result.stderr
    assert "warnings.warn" not in result.stderr


def test_a_mask_missing_where_other_masks_exist_stays_an_error(synthetic_root, tmp_path):
    from metaad.data.datasets import DataError, mvtec_records

    shutil.copytree(synthetic_root / "weave", tmp_path / "weave")
    (tmp_path / "weave" / "ground_truth" / "hole" / "001_mask.png").unlink()
    with pytest.raises(DataError, match="has no mask"):
        mvtec_records(tmp_path, "weave", "test")


def test_python_api_scores_paths_pil_images_and_arrays_at_their_own_size(good_run, folders):
    import metaad

    run_folder, _ = good_run
    run = metaad.load_run(run_folder)
    assert run.threshold == json.loads((run_folder / "threshold.json").read_text())["threshold"]
    photo = folders / "incoming" / "part_1.jpg"
    rgba = Image.open(photo).convert("RGBA")
    gray16 = (np.asarray(Image.open(folders / "good" / "000.png").convert("L")).astype(np.uint16) * 257)[:50, :30]
    floats = np.asarray(Image.open(photo).convert("RGB"), np.float32) / 255
    results = run.predict([str(photo), rgba, gray16, floats])
    assert [r.map.shape for r in results] == [(64, 64), (64, 64), (50, 30), (64, 64)]
    for result in results:
        assert np.isfinite(result.score) and isinstance(result.anomalous, bool)
        assert result.anomalous == (result.score > run.threshold) and result.mask.shape == result.map.shape
    assert abs(results[0].score - results[1].score) < 1e-4  # RGBA: the alpha channel is dropped
    assert abs(results[0].score - results[3].score) < 1e-3  # a float array in [0, 1] is the same image
    # the same score as the command line's predict for the same file
    rows = {r["name"]: r for r in read_csv(folders / "predictions" / "predictions.csv")} if (
        folders / "predictions" / "predictions.csv").is_file() else {}
    if "part_1" in rows:
        assert float(rows["part_1"]["score"]) == pytest.approx(results[0].score, rel=1e-5)
    with pytest.raises(ValueError, match=r"broken\.png"):
        run.predict(folders / "incoming" / "broken.png")
    reported = run.predict([folders / "incoming" / "broken.png"], on_error="report")[0]
    assert reported.error and np.isnan(reported.score)


def test_torch_imported_before_metaad_gives_one_clear_warning():
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    code = "import torch, metaad; print(metaad.OPENMP_PASSIVE)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False" and "Import metaad before torch" in out.stderr
    env["OMP_WAIT_POLICY"] = "PASSIVE"  # chosen in the environment: torch read it, nothing is lost
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "True" and "OpenMPWarning" not in out.stderr


def _texture(height: int, width: int, seed: int) -> np.ndarray:
    """A fine, regular grey texture with sensor noise (uint8, H x W)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 2)
    pattern = 0.5 + 0.2 * np.sin(2 * np.pi * x / 8 + phase[0]) * np.sin(2 * np.pi * y / 8 + phase[1])
    pattern += rng.normal(0, 0.02, pattern.shape)
    return (np.clip(pattern, 0, 1) * 255).astype(np.uint8)


def test_tiling_finds_a_small_defect_in_a_large_image(tmp_path, capsys):
    good = tmp_path / "good"
    good.mkdir()
    for k in range(24):  # the training images are tiles at the scale of the large image
        Image.fromarray(_texture(64, 64, k)).save(good / f"{k:02d}.png")
    ok(in_process(capsys, "fit", "--format", "folder", "--data", good, "--out", tmp_path / "run", "--preset", "tiny",
              "--image-size", "64", "--no-progress"))
    large = _texture(768, 1024, 100)
    cy, cx = 500, 700
    large[cy - 5 : cy + 5, cx - 5 : cx + 5] = 20  # a 10 x 10 px dark spot: under 1 px at 64 px without tiles
    Image.fromarray(large).save(tmp_path / "large.png")
    out = tmp_path / "tiled"
    result = ok(in_process(capsys, "predict", "--run", tmp_path / "run", tmp_path / "large.png", "--out", out,
                       "--tile", "64", "--tile-overlap", "0.25", "--no-progress"))
    assert "1 anomalous" in result.stdout
    heatmap = np.asarray(Image.open(out / "heatmaps" / "large.png"))
    assert heatmap.shape == (768, 1024)
    peak_y, peak_x = np.unravel_index(np.argmax(heatmap), heatmap.shape)
    assert abs(peak_y - cy) < 24 and abs(peak_x - cx) < 24
    assert np.asarray(Image.open(out / "masks" / "large.png"))[cy, cx] == 255


def test_demo_takes_no_progress(tmp_path):
    result = ok(cli("demo", "--preset", "tiny", "--out", tmp_path / "demo", "--no-progress", "--threads", "1"))
    assert "image_auroc" in result.stdout and "it/s" not in result.stderr and "batch/s" not in result.stderr


def test_every_flag_of_every_command_says_what_it_does():
    import argparse

    from metaad.cli.main import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    silent = [f"metaad {name} {action.option_strings[0]}" for name, command in commands.items()
              for action in command._actions if action.option_strings and not action.help]
    assert silent == []
    assert {"serve", "predict", "export", "demo", "fit", "test"} <= set(commands)


@pytest.mark.parametrize(
    ("param", "words"),
    [("coreset_ratio=abc", "coreset_ratio='abc' is not a valid value: expected float"),
     ("layers=3", "layers=3 is not a valid value: expected tuple[int, ...]"),
     ("image_size=1.5", "image_size=1.5 is not a valid value")],
)
def test_a_wrong_typed_param_is_a_one_line_error(tmp_path, param, words):
    result = cli("fit", "--model", "patchcore", "--data", tmp_path, "--param", param, "--out", tmp_path / "run")
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [(["fit", "--model", "patchcor", "--data", ".", "--out", "x"], "did you mean 'patchcore'?"),
     (["fit", "--data", "MISSING", "--out", "x"], "--data MISSING: no such folder"),
     (["fit", "--data", "notes.txt", "--out", "x"], "is a file; expected the folder of a data set"),
     (["fit", "--data", "root", "--category", "wevae", "--out", "x"], "did you mean 'weave'?"),
     (["benchmark", "--models", "fastflw", "--data", "root", "--out", "x"], "did you mean 'fastflow'?"),
     (["fit", "--model", "patchcore", "--data", "root", "--param", "coreset_ratio=abc", "--out", "x"],
      "coreset_ratio='abc' is not a valid value: expected float"),
     (["fit", "--model", "patchcore", "--data", "root", "--param", "coreset_ration=0.1", "--out", "x"],
      "has no parameter 'coreset_ration'; did you mean 'coreset_ratio'?"),
     (["predict", "--run", "MISSING", "root", "--out", "x"], "--run MISSING: no such folder"),
     (["predict", "--run", "root", "NOWHERE", "--out", "x"], "NOWHERE: no such file or folder"),
     (["export", "--run", "notes.txt", "--out", "x.onnx"], "--run notes.txt: is a file"),
     (["test", "--run", "MISSING", "--out", "x"], "--run MISSING: no such folder")],
)
def test_usage_errors_answer_in_one_line_before_torch_loads(tmp_path, args, words):
    (tmp_path / "notes.txt").write_text("not a data set")
    (tmp_path / "root" / "weave" / "train" / "good").mkdir(parents=True)
    probe = (
        "import sys\nfrom metaad.cli.main import main\n"
        "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as exit:\n    code = exit.code\n"
        "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded')\nsys.exit(code)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, cwd=tmp_path,
                            timeout=120)
    assert result.returncode == 2 and "torch not loaded" in result.stdout, result.stdout + result.stderr
    assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_models_lists_and_describes_methods_without_torch():
    probe = (
        "import sys\nfrom metaad.cli.main import main\ncode = main(sys.argv[1:])\n"
        "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded')\nsys.exit(code)\n"
    )
    listing = subprocess.run([sys.executable, "-c", probe, "models"], capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0 and "torch not loaded" in listing.stdout
    from metaad.models import REGISTRY

    assert all(name in listing.stdout for name in REGISTRY)
    one = subprocess.run([sys.executable, "-c", probe, "models", "patchcore"], capture_output=True, text=True,
                         timeout=60)
    assert one.returncode == 0 and "torch not loaded" in one.stdout
    assert "coreset_ratio = " in one.stdout and "paper: " in one.stdout


@pytest.mark.parametrize("name", sorted(__import__("metaad.models", fromlist=["REGISTRY"]).REGISTRY))
def test_every_settings_type_is_checked_before_torch(name):
    """Each annotation read from the source evaluates without the class, so the command line checks every
    --param's type before torch loads."""
    from metaad.models import describe
    from metaad.param_types import annotation_from_text

    unread = [s.name for s in describe(name)[1] if s.annotation and annotation_from_text(s.annotation) is None]
    assert not unread, f"{name}: annotations the torch-free check cannot read: {unread}"


@pytest.mark.parametrize("name", sorted(__import__("metaad.models", fromlist=["REGISTRY"]).REGISTRY))
def test_the_settings_read_from_source_are_the_classs_own(name):
    import ast
    import inspect

    from metaad.models import describe, model_class

    cls = model_class(name)
    presets, settings = describe(name)
    assert presets == list(cls.PRESETS)
    signature = inspect.signature(cls.__init__).parameters
    assert [s.name for s in settings] == [p for p in signature if p != "self"]
    for setting in settings:
        assert ast.literal_eval(setting.default) == signature[setting.name].default, setting.name
        for preset, value in setting.presets.items():
            assert ast.literal_eval(value) == cls.PRESETS[preset][setting.name]
        assert setting.meaning, f"{name}.{setting.name} has no meaning in the class docstring"
