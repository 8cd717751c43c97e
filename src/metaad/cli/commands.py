"""The core sub-commands: ``fit``, ``test``, ``predict``, ``benchmark``, ``models`` and ``demo``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from metaad.models import MODELS, REGISTRY


def register(subparsers: argparse._SubParsersAction) -> None:
    fit = subparsers.add_parser(
        "fit", help="fit a model on defect-free images, then evaluate it and write a run folder"
    )
    _add_model_args(fit)
    _add_data_args(fit)
    fit.add_argument("--out", required=True, help="run folder to write")
    fit.add_argument("--shots", type=int, default=None, help="k-shot protocol: fit on k defect-free images")
    fit.add_argument(
        "--calibration-fraction",
        type=float,
        default=0.1,
        help="share of defect-free training images held out to set the decision threshold",
    )
    fit.add_argument(
        "--false-alarm-rate",
        type=float,
        default=0.01,
        help="threshold = this upper quantile of held-out defect-free scores",
    )
    fit.add_argument(
        "--resume", action="store_true", help="continue an interrupted fit from RUN/training (trained methods)"
    )
    fit.set_defaults(handler=run_fit)

    test = subparsers.add_parser("test", help="evaluate a fitted run on a test split")
    test.add_argument("--run", required=True, help="run folder written by 'metaad fit'")
    _add_data_args(test)
    test.add_argument("--out", default=None, help="report folder (default: RUN/test)")
    test.set_defaults(handler=run_test)

    predict = subparsers.add_parser(
        "predict", help="score images: per-image score, decision, heat map, overlay, CSV"
    )
    predict.add_argument("--run", required=True, help="run folder written by 'metaad fit'")
    predict.add_argument("inputs", nargs="+", help="image files or folders of images (searched recursively)")
    predict.add_argument("--out", required=True, help="folder for predictions.csv, heatmaps/ and overlays/")
    predict.add_argument(
        "--threshold", type=float, default=None, help="override the run's calibrated threshold"
    )
    predict.add_argument("--image-size", type=int, default=None)
    predict.add_argument("--threads", type=int, default=None)
    predict.set_defaults(handler=run_predict)

    bench = subparsers.add_parser("benchmark", help="fit and evaluate several models on one data set")
    bench.add_argument("--models", nargs="+", default=["patchcore"], choices=sorted(MODELS))
    bench.add_argument("--preset", default=None)
    _add_data_args(bench)
    bench.add_argument("--out", required=True)
    bench.set_defaults(handler=run_benchmark)

    models = subparsers.add_parser("models", help="list the methods: paper, presets, whether they train")
    models.set_defaults(handler=run_models)

    demo = subparsers.add_parser(
        "demo", help="generate the built-in synthetic data set, fit PatchCore, write a report"
    )
    demo.add_argument("--out", default="runs/demo", help="folder for the data set and the run")
    demo.add_argument("--category", default=None, help="synthetic category (default: the first)")
    demo.add_argument("--preset", default="cpu")
    demo.add_argument("--threads", type=int, default=None)
    demo.set_defaults(handler=run_demo, command="demo")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="patchcore", choices=sorted(MODELS), metavar="MODEL",
        help=f"method to fit: {', '.join(sorted(MODELS))} (default: patchcore; see 'metaad models')",
    )
    parser.add_argument(
        "--preset", default=None,
        help="named settings of the method: paper (the paper's), cpu (trains on 2 cores), tiny (tests); "
        "default: the method's defaults",
    )
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="a model constructor argument, e.g. --param coreset_ratio=0.01 (repeatable)",
    )
    parser.add_argument(
        "--init", default=None, help="initial weights, for models that take them (metaformer)"
    )


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", required=True, help="data root (MVTec layout, Magnetic Tile Defects, or a folder)"
    )
    parser.add_argument("--format", default="auto", choices=["auto", "mvtec", "mtd", "folder"])
    parser.add_argument("--category", default=None, help="category folder of an MVTec-layout root")
    parser.add_argument("--abnormal-dir", default=None, help="folder format: defective images")
    parser.add_argument("--mask-dir", default=None, help="folder format: masks of the defective images")
    parser.add_argument("--seed", type=int, default=0, help="seed of data splits (MTD's 20%% test split)")
    parser.add_argument(
        "--image-size", type=int, default=None,
        help="side images are resized to (default: 256, or the model's larger working size; for test, the run's)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--skip-bad-files",
        action="store_true",
        help="skip unreadable images and bad masks with a warning instead of stopping",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")


def _data_spec(args: argparse.Namespace):
    from metaad.engine.run import DataSpec

    return DataSpec(args.data, args.format, args.category, args.abnormal_dir, args.mask_dir, args.seed)


def _model_params(args: argparse.Namespace) -> dict:
    params = {}
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--param {item!r}: expected NAME=VALUE")
        try:
            params[name] = json.loads(value)
        except json.JSONDecodeError:
            params[name] = value
    if args.init is not None:
        params["init"] = args.init
    return params


def run_fit(args: argparse.Namespace) -> int:
    from metaad.engine.run import fit_and_evaluate
    from metaad.models import create_model

    model = create_model(args.model, args.preset, **_model_params(args))
    metrics = fit_and_evaluate(
        model,
        _data_spec(args),
        args.out,
        image_size=args.image_size,
        shots=args.shots,
        calibration_fraction=args.calibration_fraction,
        false_alarm_rate=args.false_alarm_rate,
        batch_size=args.batch_size,
        on_error="skip" if args.skip_bad_files else "raise",
        resume=args.resume,
    )
    _print_metrics(metrics, Path(args.out))
    return 0


def run_models(args: argparse.Namespace) -> int:
    from metaad.models import model_class

    for name, entry in REGISTRY.items():
        presets = ", ".join(model_class(name).PRESETS)
        print(f"{name:22} {entry.paper}\n{'':22} presets: {presets}; {'trained' if entry.trains else 'not trained'}")
    return 0


def run_test(args: argparse.Namespace) -> int:
    from metaad.data.datasets import AnomalyDataset
    from metaad.engine.checkpoint import load_model
    from metaad.engine.evaluation import compute_metrics, predict_dataset
    from metaad.engine.report import write_report
    from metaad.engine.run import read_threshold, run_image_size

    model = load_model(args.run)
    dataset = AnomalyDataset(
        _data_spec(args).records("test"), run_image_size(args.run, args.image_size),
        "skip" if args.skip_bad_files else "raise",
    )
    predictions = predict_dataset(model, dataset, args.batch_size)
    metrics = compute_metrics(predictions)
    metrics["ms_per_image"] = predictions.ms_per_image
    out = Path(args.out) if args.out else Path(args.run) / "test"
    write_report(out, predictions, metrics, read_threshold(args.run))
    _print_metrics(metrics, out)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from metaad.engine.predict import predict_images

    files = _expand_inputs(args.inputs)
    predict_images(args.run, files, Path(args.out), args.threshold, args.image_size)
    return 0


def run_benchmark(args: argparse.Namespace) -> int:
    from metaad.engine.run import fit_and_evaluate
    from metaad.io import write_json
    from metaad.models import create_model

    results = {}
    for name in args.models:
        model = create_model(name, args.preset)
        results[name] = fit_and_evaluate(
            model,
            _data_spec(args),
            Path(args.out) / name,
            image_size=args.image_size,
            batch_size=args.batch_size,
            calibration_fraction=0.0,
            on_error="skip" if args.skip_bad_files else "raise",
        )
    write_json(Path(args.out) / "benchmark.json", results)
    columns = ["image_auroc", "pixel_auroc", "pro", "fit_seconds", "ms_per_image", "peak_rss_mb"]
    print("| model | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, metrics in results.items():
        print(f"| {name} | " + " | ".join(_fmt(metrics.get(c)) for c in columns) + " |")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from metaad.data.synthetic import CATEGORIES, make_synthetic_dataset
    from metaad.engine.run import DataSpec, fit_and_evaluate
    from metaad.models import create_model

    out = Path(args.out)
    category = args.category or CATEGORIES[0]
    root = out / "data"
    if not (root / category).is_dir():
        print(f"writing the synthetic data set '{category}' to {root}")
        make_synthetic_dataset(root, categories=[category])
    model = create_model("patchcore", args.preset)
    metrics = fit_and_evaluate(model, DataSpec(str(root), "mvtec", category), out / "run")
    _print_metrics(metrics, out / "run")
    return 0


def _expand_inputs(inputs: list[str]):
    from metaad.data.datasets import IMAGE_EXTENSIONS, ImageRecord, list_images

    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():  # every image below it, sub-folders included (e.g. an MVTec test/ folder)
            files += list_images(path, recursive=True)
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise ValueError(f"{path}: not an image file (expected {', '.join(IMAGE_EXTENSIONS)})")
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    if not files:
        raise ValueError(f"no images found in {', '.join(inputs)}")
    return [ImageRecord(p, 0) for p in files]


def _print_metrics(metrics: dict, out: Path | None, prefix: str = "") -> None:
    for key, value in metrics.items():
        if isinstance(value, dict):
            _print_metrics(value, None, f"{prefix}{key}.")
        else:
            print(f"{prefix + key:>32}: {_fmt(value)}")
    if out is not None:
        print(f"run folder: {out}")


def _fmt(value) -> str:
    return "—" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
