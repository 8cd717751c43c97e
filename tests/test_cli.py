import csv
import json

import pytest
import torch

from metaad.cli.main import main


def test_fit_test_predict_end_to_end(synthetic_root, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(
        [
            "fit",
            "--model",
            "patchcore",
            "--data",
            str(synthetic_root),
            "--category",
            "weave",
            "--out",
            str(run),
            "--image-size",
            "64",
            "--param",
            "image_size=64",
            "--param",
            "coreset_ratio=0.2",
            "--param",
            'search="exact"',
            "--device",
            "auto",
        ]
    )
    assert code == 0
    # auto: the GPU where torch sees one, else the CPU; the run records where it was fitted
    fitted_on = json.loads((run / "config.json").read_text())["device"]
    assert fitted_on == ("cuda" if torch.cuda.is_available() else "cpu")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["image_auroc"] > 0.8 and 0 <= metrics["pro"] <= 1
    fitted = metrics["fitted"]  # the synthetic shots are evenly lit: "auto" leaves them unstandardised
    assert fitted["exposure_variation"] < 0.1 and fitted["standardizing"] is False and fitted["memory_bank_size"] > 0
    for name in (
        "config.json",
        "model/model.json",
        "model/model.safetensors",
        "threshold.json",
        "roc.png",
        "pro.png",
        "scores.csv",
    ):
        assert (run / name).is_file(), name
    assert len(list((run / "worst").glob("*.png"))) == 8

    assert (
        main(
            [
                "test",
                "--run",
                str(run),
                "--data",
                str(synthetic_root),
                "--category",
                "weave",
            ]
        )
        == 0
    )
    # without --image-size, test loads the images at the size the run was fitted at (64 px, from config.json)
    tested = json.loads((run / "test" / "metrics.json").read_text())
    assert tested["image_auroc"] == metrics["image_auroc"] and tested["pro"] == metrics["pro"]
    data = ["--data", str(synthetic_root), "--category", "weave"]
    assert main(["test", "--run", str(run), *data, "--device", "auto", "--out", str(tmp_path / "auto")]) == 0
    on_auto = json.loads((tmp_path / "auto" / "metrics.json").read_text())
    assert on_auto["image_auroc"] == metrics["image_auroc"]
    if not torch.cuda.is_available():
        capsys.readouterr()
        assert main(["test", "--run", str(run), *data, "--device", "cuda", "--out", str(tmp_path / "cuda")]) != 0
        assert "torch sees no CUDA device" in capsys.readouterr().err
        fit_cuda = ["fit", "--model", "patchcore", *data, "--out", str(tmp_path / "fit_cuda"), "--device", "cuda"]
        assert main(fit_cuda) != 0
        assert "torch sees no CUDA device" in capsys.readouterr().err

    out = tmp_path / "pred"
    assert (
        main(
            ["predict", "--run", str(run), str(synthetic_root / "weave" / "test" / "good"), "--out", str(out)]
        )
        == 0
    )
    with open(out / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and all(r["decision"] in ("good", "anomalous") for r in rows)
    assert len(list((out / "heatmaps").glob("*.png"))) == 6
    assert len(list((out / "overlays").glob("*.png"))) == 6

    everything = tmp_path / "pred_all"  # a folder of sub-folders whose images share file names
    assert main(["predict", "--run", str(run), str(synthetic_root / "weave" / "test"), "--out", str(everything)]) == 0
    with open(everything / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    n_images = sum(1 for p in (synthetic_root / "weave" / "test").rglob("*.png"))
    assert len(rows) == n_images > 6 and len({r["name"] for r in rows}) == n_images
    assert len(list((everything / "heatmaps").glob("*.png"))) == n_images


def test_bad_input_gives_a_clear_error(tmp_path, capsys):
    assert main(["fit", "--data", str(tmp_path), "--category", "nothing", "--out", str(tmp_path / "r")]) == 2
    assert "category folder not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", "--model", "no-such-model", "--data", str(tmp_path), "--out", str(tmp_path)])


def test_param_values_parse_as_json_and_null_means_none():
    """``--param init=null`` is how a user asks Metaformer for random initialisation (README)."""
    import argparse

    from metaad.cli.commands import _model_params
    from metaad.models import create_model

    args = argparse.Namespace(param=["init=null", "epochs=3", "texture_dir=dtd/images", 'search="exact"'], init=None)
    params = _model_params(args)
    assert params == {"init": None, "epochs": 3, "texture_dir": "dtd/images", "search": "exact"}
    assert create_model("metaformer", init=params["init"], image_size=32).init is None
    assert create_model("metaformer").init == "universal-feature"  # the default adapts the shipped model
    with pytest.raises(ValueError, match="expected NAME=VALUE"):
        _model_params(argparse.Namespace(param=["epochs"], init=None))


def test_k_shot_draws_depend_on_shots_seed_and_are_recorded(synthetic_root, tmp_path):
    from metaad.io import load_tensors

    def fit(name: str, *extra: str) -> tuple[dict, dict]:
        run = tmp_path / name
        assert main(["fit", "--model", "patchcore", "--preset", "tiny", "--data", str(synthetic_root),
                     "--category", "weave", "--out", str(run), "--image-size", "32", "--param", "image_size=32",
                     "--shots", "3", "--calibration-fraction", "0", "--quiet", *extra]) == 0
        return json.loads((run / "config.json").read_text()), load_tensors(run / "model" / "model.safetensors")

    default, default_weights = fit("default")
    first, first_weights = fit("one", "--shots-seed", "1")
    second, second_weights = fit("two", "--shots-seed", "2")
    assert default["shots_seed"] == default["data"]["seed"] and first["shots_seed"] == 1
    assert first["n_train"] == second["n_train"] == 3
    banks = [weights["memory_bank"] for weights in (default_weights, first_weights, second_weights)]
    assert not torch.equal(banks[1], banks[2]) and not torch.equal(banks[0], banks[1])


@pytest.mark.parametrize("target", ["miss-rate=0", "false-alarm-rate=0"])
def test_a_threshold_set_from_labelled_images_is_used_by_predict(synthetic_root, tmp_path, target):
    import subprocess
    import sys

    def metaad(*args):
        result = subprocess.run([sys.executable, "-m", "metaad.cli.main", *map(str, args)], capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        return result

    run = tmp_path / "run"
    metaad("fit", "--model", "patchcore", "--preset", "tiny", "--data", synthetic_root, "--category", "weave",
           "--out", run, "--image-size", "64", "--quiet", "--threads", "1")
    calibrated = json.loads((run / "threshold.json").read_text())["threshold"]
    result = metaad("test", "--run", run, "--set-threshold", target, "--no-progress", "--threads", "1")
    thresholds = json.loads((run / "threshold.json").read_text())
    assert thresholds["calibrated_threshold"] == calibrated and "threshold set to" in result.stdout
    with open(run / "test" / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    decisions = {(int(r["label"]), r["decision"]) for r in rows}
    if target == "miss-rate=0":  # every defective image above it: the report decides with it
        assert (1, "good") not in decisions and thresholds["set_from_labelled"]["misses"] == 0
    else:  # no good image above it
        assert (0, "anomalous") not in decisions and thresholds["set_from_labelled"]["false_alarms"] == 0
    assert thresholds["threshold"] != calibrated
    metaad("predict", "--run", run, synthetic_root / "weave" / "test" / "good", "--out", tmp_path / "p",
           "--no-progress", "--threads", "1")
    with open(tmp_path / "p" / "predictions.csv", newline="") as handle:
        used = [float(r["threshold"]) for r in csv.DictReader(handle)]
    assert used and all(u == pytest.approx(thresholds["threshold"], rel=1e-5) for u in used)


def test_a_malformed_threshold_target_is_a_one_line_error(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "metaad.cli.main", "test", "--run", str(tmp_path),
                             "--set-threshold", "miss=0.1"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "expected miss-rate=R or false-alarm-rate=R" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_fit_prints_its_counts_and_threshold_and_warns_when_calibration_is_too_small(synthetic_root, tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "metaad.cli.main", "fit", "--model", "patchcore", "--preset", "tiny", "--data",
         str(synthetic_root), "--category", "weave", "--out", str(tmp_path / "run"), "--image-size", "64",
         "--no-progress", "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    thresholds = json.loads((tmp_path / "run" / "threshold.json").read_text())
    assert thresholds["n_calibration_images"] == 2  # 10 % of 16
    assert "metaad: warning: the threshold comes from 2 held-out good images" in result.stderr
    lines = {line.split(":")[0].strip(): line.split(":", 1)[1].strip() for line in result.stdout.splitlines()
             if ":" in line}
    assert lines["n_train"] == "14" and lines["n_calibration_images"] == "2"
    assert float(lines["threshold"]) == pytest.approx(thresholds["threshold"], rel=1e-3)


def test_out_of_fold_calibration_uses_every_good_image(synthetic_root, tmp_path):
    import subprocess
    import sys

    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "metaad.cli.main", "fit", "--model", "patchcore", "--preset", "tiny", "--data",
         str(synthetic_root), "--category", "weave", "--out", str(run), "--image-size", "64", "--calibration",
         "out-of-fold", "--no-progress", "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    config = json.loads((run / "config.json").read_text())
    thresholds = json.loads((run / "threshold.json").read_text())
    assert config["n_train"] == 16 and config["calibration"] == "out-of-fold"
    assert thresholds["n_calibration_images"] == 16 and "out-of-fold" in thresholds["method"]
    assert thresholds["threshold"] > 0  # in-sample scores of a bank's own images would be near 0
    refused = subprocess.run(
        [sys.executable, "-m", "metaad.cli.main", "fit", "--model", "fastflow", "--preset", "tiny", "--data",
         str(synthetic_root), "--category", "weave", "--out", str(tmp_path / "ff"), "--calibration",
         "out-of-fold"], capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "cannot score its training images out of fold" in refused.stderr


def test_out_of_fold_scores_match_those_of_unseen_good_images():
    import metaad  # noqa: F401
    from metaad.models import create_model

    ys, xs = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    pattern = 0.5 + 0.2 * torch.sin(xs / 3.0) * torch.cos(ys / 4.0)

    def texture(n, seed):
        noise = torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
        return (pattern.expand(n, 3, 64, 64) + 0.02 * noise).clamp(0, 1)

    train, unseen = texture(10, 0), texture(6, 1)
    model = create_model("patchcore", "tiny", coreset_ratio=1.0).fit(train)
    in_sample = model.predict(train).scores
    out_of_fold = model.out_of_fold(train).scores
    fresh = model.predict(unseen).scores
    assert float(in_sample.max()) == 0.0  # every patch is in the bank
    assert abs(float(out_of_fold.mean() - fresh.mean())) < 0.25 * float(fresh.mean())
    with pytest.raises(ValueError, match="got 9 images"):
        model.out_of_fold(train[:9])
