"""The core sub-commands: ``fit``, ``test``, ``predict``, ``benchmark``, ``models`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from metaad.cli.checks import check_data_flags, check_run_flag
from metaad.cli.deploy import DEVICES
from metaad.models import MODELS, REGISTRY


def register(subparsers: argparse._SubParsersAction) -> None:
    fit = subparsers.add_parser(
        "fit", help="fit a model on defect-free images, then evaluate it and write a run folder"
    )
    _add_model_args(fit)
    _add_data_args(fit, data_help="data root (MVTec layout, Magnetic Tile Defects, or a folder of good images)")
    fit.add_argument("--out", required=True, help="run folder to write")
    fit.add_argument(
        "--config", default=None, metavar="RUN/config.json",
        help="refit as a run's config.json says (model, parameters, data, sizes); flags given override it",
    )
    fit.add_argument(
        "--overwrite", action="store_true", help="replace the run folder --out when it exists and is not empty"
    )
    fit.add_argument("--shots", type=int, default=None, help="k-shot protocol: fit on k defect-free images")
    fit.add_argument(
        "--shots-seed", type=int, default=None,
        help="seed of the k-image draw (default: the split's --seed); vary it to repeat a k-shot run on other "
        "subsets of the same split",
    )
    fit.add_argument(
        "--calibration-fraction",
        type=float,
        default=None,
        help=f"share of defect-free training images held out to set the decision threshold "
        f"(default {FIT_DEFAULTS['calibration_fraction']})",
    )
    fit.add_argument(
        "--calibration", default=None, choices=["held-out", "out-of-fold"],
        help="how the thresholds are set: held-out (default: --calibration-fraction of the good images kept out "
        "of the fit) or out-of-fold (every good image fits, and each is scored without its own contribution; "
        "PatchCore)",
    )
    fit.add_argument(
        "--false-alarm-rate",
        type=float,
        default=None,
        help="threshold = this upper quantile of held-out defect-free scores "
        f"(default {FIT_DEFAULTS['false_alarm_rate']})",
    )
    fit.add_argument(
        "--tile", type=int, default=None, metavar="SIZE",
        help="fit and score on overlapping SIZE x SIZE px tiles of the images loaded at --image-size (default "
        "with tiles: the training images' median long side, up to 1024), each tile at the model's working size; "
        "recorded in the run, so test, predict, export and serve tile the same way (for small defects in "
        "high-resolution images)",
    )
    fit.add_argument(
        "--resize", default=None, choices=["stretch", "pad"],
        help="how images become the model's square: stretch (default, each side to the size, as the papers do) or "
        "pad (the long side to the size, the aspect kept, black around); recorded in the run",
    )
    fit.add_argument(
        "--tile-overlap", type=float, default=None, metavar="F",
        help="share of a tile its neighbours overlap (default 0.25)",
    )
    fit.add_argument(
        "--resume", action="store_true", help="continue an interrupted fit from RUN/training (trained methods)"
    )
    fit.add_argument(
        "--device", default="cpu", choices=DEVICES,
        help="where the model fits and scores (default cpu; auto: cuda when torch sees one)",
    )
    _add_output_args(fit)
    fit.set_defaults(handler=run_fit)

    test = subparsers.add_parser(
        "test", help="evaluate a fitted run on a labelled test split and write a report folder"
    )
    test.add_argument("--run", required=True, help="run folder written by 'metaad fit'")
    _add_data_args(test, data_help="data root (default: the data the run was fitted on, from RUN/config.json)")
    test.add_argument("--out", default=None, help="report folder (default: RUN/test)")
    test.add_argument("--device", default="cpu", choices=DEVICES, help="where the model runs (default cpu)")
    test.add_argument(
        "--set-threshold", default=None, metavar="miss-rate=R|false-alarm-rate=R",
        help="set the run's image threshold from these labelled images for a target miss or false-alarm rate "
        "and write it into RUN/threshold.json (predict, export and serve then use it)",
    )
    _add_output_args(test)
    test.set_defaults(handler=run_test)

    predict = subparsers.add_parser(
        "predict", help="score images: per-image score, decision, heat map, mask, overlay, CSV"
    )
    predict.add_argument("--run", required=True, help="run folder written by 'metaad fit'")
    predict.add_argument(
        "inputs", nargs="+",
        help="image files or folders of images (searched recursively; masks beside their images are left out)",
    )
    predict.add_argument("--out", required=True, help="folder for predictions.csv, heatmaps/, masks/ and overlays/")
    predict.add_argument(
        "--threshold", type=float, default=None, help="override the run's calibrated threshold"
    )
    predict.add_argument("--image-size", type=int, default=None, help="side the model sees (default: the run's)")
    predict.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    predict.add_argument(
        "--tile", type=int, default=None, metavar="SIZE",
        help="for a run fitted without --tile: split each image at its own resolution into overlapping SIZE x "
        "SIZE tiles and blend their maps; the image score is the highest tile score (a run fitted with --tile "
        "always uses its own tiles)",
    )
    predict.add_argument(
        "--tile-overlap", type=float, default=0.25, metavar="F", help="share of a tile its neighbours overlap"
    )
    predict.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    predict.add_argument(
        "--category", default=None,
        help="a run of several categories: whose threshold decides (default: the global one, with a note)",
    )
    predict.add_argument(
        "--outputs", default=None, metavar="LIST",
        help="what to write besides predictions.csv: a comma-separated choice of maps, masks, overlays, figures "
        "(default maps,masks,overlays; figures: the image beside its overlay with a colour bar)",
    )
    predict.add_argument(
        "--min-region-area", type=int, default=1, metavar="PIXELS",
        help="predicted defect regions smaller than this are dropped from masks and regions.csv (default 1)",
    )
    predict.add_argument("--device", default="cpu", choices=DEVICES, help="where the model runs (default cpu)")
    _add_output_args(predict)
    predict.set_defaults(handler=run_predict)

    bench = subparsers.add_parser("benchmark", help="fit and evaluate several models on one data set")
    bench.add_argument("--models", nargs="+", default=["patchcore"], type=model_name, metavar="MODEL",
                       help=f"methods to fit and evaluate, each in its own run folder: {', '.join(sorted(MODELS))}")
    bench.add_argument("--preset", default=None, help="one preset for every method (paper, cpu, tiny)")
    _add_data_args(bench)
    bench.add_argument("--out", required=True, help="folder for the run folders and benchmark.json")
    bench.add_argument("--device", default="cpu", choices=DEVICES, help="where the models fit and score (default cpu)")
    bench.set_defaults(handler=run_benchmark)

    models = subparsers.add_parser(
        "models", help="list the methods (paper, presets, whether they train); NAME: every setting of one"
    )
    models.add_argument("name", nargs="?", type=model_name, metavar="NAME",
                        help="a method: its settings, their defaults, what each preset changes and what each means")
    models.set_defaults(handler=run_models)

    demo = subparsers.add_parser(
        "demo", help="generate the built-in synthetic data set, fit PatchCore, write a report"
    )
    demo.add_argument("--out", default="runs/demo", help="folder for the data set and the run")
    demo.add_argument("--category", default=None, help="synthetic category (default: the first)")
    demo.add_argument("--preset", default="cpu", help="PatchCore preset (default: cpu, for a CPU)")
    demo.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    _add_output_args(demo)
    demo.set_defaults(handler=run_demo, command="demo")


FIT_DEFAULTS = {
    "model": "patchcore",
    "format": "auto",
    "seed": 0,
    "batch_size": 16,
    "calibration_fraction": 0.1,
    "calibration": "held-out",
    "false_alarm_rate": 0.01,
    "skip_bad_files": False,
    "resize": "stretch",
}
"""Defaults of the flags that ``fit --config`` (and ``test``, from the run) can fill in: their parser default
is None, meaning 'not given'."""



def model_name(name: str) -> str:
    """``--model``'s type: a registered name, else an error with the closest name ("did you mean")."""
    import difflib

    if name in MODELS:
        return name
    close = difflib.get_close_matches(name, MODELS, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise argparse.ArgumentTypeError(f"unknown model {name!r}; {hint}available: {', '.join(sorted(MODELS))}")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, type=model_name, metavar="MODEL",
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


def _add_data_args(
    parser: argparse.ArgumentParser, data_help: str = "data root (MVTec layout, Magnetic Tile Defects, or a folder)"
) -> None:
    parser.add_argument("--data", default=None, help=data_help)
    parser.add_argument(
        "--format", default=None, choices=["auto", "mvtec", "mtd", "folder"], help="data layout (default: auto)"
    )
    parser.add_argument(
        "--category", default=None,
        help="category folder of an MVTec-layout root; several, comma-separated, or 'all' train one model on "
        "all of them (the unified protocol: thresholds and metrics per category)",
    )
    parser.add_argument("--abnormal-dir", default=None, help="folder format: defective images")
    parser.add_argument("--mask-dir", default=None, help="folder format: masks of the defective images")
    parser.add_argument("--seed", type=int, default=None, help="seed of data splits (MTD's 20%% test split; default 0)")
    parser.add_argument(
        "--image-size", type=int, default=None,
        help="side images are resized to (default: 256, or the model's larger working size; for test, the run's)",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="images per batch (default 16)")
    parser.add_argument(
        "--skip-bad-files",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="skip unreadable images and bad masks with a warning instead of stopping",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")


def _add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--quiet", action="store_true", help="no progress bars and no report on stdout")


def _setting(args: argparse.Namespace, name: str, recorded: dict):
    """A flag's value: as given, else as ``recorded`` (a run's config.json), else its default."""
    value = getattr(args, name, None)
    if value is not None:
        return value
    return recorded[name] if recorded.get(name) is not None else FIT_DEFAULTS.get(name)


def _data_spec(args: argparse.Namespace, recorded: dict | None = None):
    """Where the data is: the data flags, else ``recorded`` (the ``data`` of a run's config.json)."""
    from metaad.data.source import DataSpec

    recorded = recorded or {}
    root = args.data if args.data is not None else recorded.get("root")
    if root is None:
        raise ValueError(f"'metaad {args.command}' needs --data (the folder of images to use)")
    return DataSpec(
        root,
        _setting(args, "format", recorded),
        args.category if args.category is not None else recorded.get("category"),
        args.abnormal_dir if args.abnormal_dir is not None else recorded.get("abnormal_dir"),
        args.mask_dir if args.mask_dir is not None else recorded.get("mask_dir"),
        _setting(args, "seed", recorded),
    )


def _model_params(args: argparse.Namespace) -> dict:
    """``--param NAME=VALUE`` flags (values as JSON, else as strings), and fit's ``--init``."""
    params = {}
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--param {item!r}: expected NAME=VALUE")
        try:
            params[name] = json.loads(value)
        except json.JSONDecodeError:
            params[name] = value
    if getattr(args, "init", None) is not None:  # fit's --init; meta-train has none
        params["init"] = args.init
    return params


def run_fit(args: argparse.Namespace) -> int:
    check_data_flags(args)
    if args.model is not None:  # names and types of --param, answered before torch loads
        from metaad.models import check_params

        check_params(args.model, {k: v for k, v in _model_params(args).items() if k != "init"})
    from metaad.models import create_model
    from metaad.runs.fit import fit_and_evaluate
    from metaad.runs.layout import prepare_run_folder, read_run_config

    recorded = read_run_config(args.config) if args.config else {}
    name = args.model or recorded.get("model") or FIT_DEFAULTS["model"]
    params = _model_params(args)
    as_recorded = name == recorded.get("model") and args.preset is None
    preset = args.preset if args.preset is not None else (recorded.get("preset") if as_recorded else None)
    if as_recorded:  # the recorded parameters already include the preset's; --param overrides them
        params = {**recorded.get("params", {}), **params}
    image_size = args.image_size
    if image_size is None and as_recorded and not args.param:
        image_size = recorded.get("image_size")
    data = _data_spec(args, recorded.get("data"))
    tiling = _tiling(args, recorded.get("tiling"))
    out = prepare_run_folder(args.out, args.overwrite, args.resume)
    model = create_model(name, preset, **params)
    progress = not (args.quiet or args.no_progress)
    metrics = fit_and_evaluate(
        model,
        data,
        out,
        image_size=image_size,
        shots=args.shots if args.shots is not None else recorded.get("shots"),
        shots_seed=args.shots_seed if args.shots_seed is not None else recorded.get("shots_seed"),
        calibration_fraction=_setting(args, "calibration_fraction", recorded),
        calibration=_setting(args, "calibration", recorded),
        false_alarm_rate=_setting(args, "false_alarm_rate", recorded),
        batch_size=_setting(args, "batch_size", recorded),
        on_error="skip" if _setting(args, "skip_bad_files", recorded) else "raise",
        progress=progress,
        resume=args.resume,
        preset=preset,
        device=args.device,
        tiling=tiling,
        resize=_setting(args, "resize", recorded),
    )
    if not args.quiet:
        _print_evaluation(metrics, out, "run folder")
        print(f"next: metaad predict --run {out} IMAGES_OR_FOLDERS --out PREDICTIONS_FOLDER")
    return 0


def _tiling(args: argparse.Namespace, recorded: dict | None):
    """``--tile``/``--tile-overlap``, else the tiling a refitted run's config records, else None."""
    from metaad.data.tiles import Tiling

    recorded_tiling = Tiling.from_config(recorded)
    if args.tile is None:
        if args.tile_overlap is not None and recorded_tiling is None:
            raise ValueError("--tile-overlap needs --tile SIZE (the tiles' side in pixels)")
        if recorded_tiling is None:
            return None
        return Tiling(recorded_tiling.tile, recorded_tiling.overlap if args.tile_overlap is None else args.tile_overlap)
    return Tiling(args.tile, 0.25 if args.tile_overlap is None else args.tile_overlap)


def run_models(args: argparse.Namespace) -> int:
    """The registry, or one method's settings, read from the source (no torch import: answers at once)."""
    import textwrap

    from metaad.models import describe

    if args.name is None:
        for name, entry in REGISTRY.items():
            presets = ", ".join(describe(name)[0])
            trained = "trained" if entry.trains else "not trained"
            print(f"{name:22} {entry.paper}\n{'':22} presets: {presets}; {trained}")
        print("metaad models NAME: one method's settings and presets")
        return 0
    entry = REGISTRY[args.name]
    presets, settings = describe(args.name)
    print(f"{args.name}: {entry.paper}; {'trained' if entry.trains else 'not trained'}; presets: {', '.join(presets)}")
    print("settings (--param NAME=VALUE), default, then what each preset sets:")
    for setting in settings:
        changed = "; ".join(f"{preset}: {value}" for preset, value in setting.presets.items())
        print(f"  {setting.name} = {setting.default}" + (f"   [{changed}]" if changed else ""))
        meaning = " ".join(setting.meaning.replace("``", "").split())
        for line in textwrap.wrap(meaning, 100):
            print(f"      {line}")
    return 0


def run_test(args: argparse.Namespace) -> int:
    check_data_flags(args)
    check_run_flag(args)
    if args.set_threshold is not None:
        from metaad.runs.calibration import parse_target

        parse_target(args.set_threshold)  # a malformed target answers before the model loads
    from metaad.runs.fit import test_run
    from metaad.runs.layout import TEST_DIR, read_config

    recorded = read_config(args.run)
    out = Path(args.out) if args.out else Path(args.run) / TEST_DIR
    metrics = test_run(
        args.run,
        _data_spec(args, recorded.get("data")),
        out,
        image_size=args.image_size,
        batch_size=args.batch_size or FIT_DEFAULTS["batch_size"],
        on_error="skip" if _setting(args, "skip_bad_files", recorded) else "raise",
        progress=not (args.quiet or args.no_progress),
        device=args.device,
        set_threshold=args.set_threshold,
    )
    if not args.quiet:
        _print_evaluation(metrics, out, "report folder")
        if args.set_threshold:
            chosen = metrics["threshold_set"]
            print(f"threshold set to {chosen['threshold']:.6g} for {chosen['target']} ({chosen['misses']} of "
                  f"{chosen['n_defective']} defective missed, {chosen['false_alarms']} of {chosen['n_good']} good "
                  f"flagged on these images); written to {Path(args.run) / 'threshold.json'}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from metaad.deploy.outputs import parse_outputs

    parse_outputs(args.outputs)  # a wrong list, a missing run or input answers before torch loads
    check_run_flag(args)
    for item in args.inputs:
        if not Path(item).exists():
            raise ValueError(f"{item}: no such file or folder")
    from metaad.data.source import expand_inputs
    from metaad.deploy.predict import predict_images
    from metaad.runs.layout import check_out_folder

    out = Path(args.out)
    check_out_folder(out, "the predictions' output")
    files, masks, others = expand_inputs(args.inputs)
    quiet = args.quiet
    if masks and not quiet:
        print(
            f"left out {len(masks)} mask file(s) beside their images (NAME.png beside NAME.jpg, NAME_mask.*), "
            f"e.g. {masks[0]}"
        )
    if others and not quiet:
        print(f"left out {len(others)} file(s) that are not images (by extension), e.g. {others[0]}")
    summary = predict_images(
        args.run, files, out, args.threshold, args.image_size, args.batch_size, args.tile, args.tile_overlap,
        progress=not (quiet or args.no_progress), device=args.device, category=args.category,
        min_region_area=args.min_region_area, outputs=args.outputs,
    )
    for path, error in summary.errors:
        print(f"metaad predict: could not score {error if str(path) in error else f'{path}: {error}'}", file=sys.stderr)
    if summary.n_scored == 0:
        print(f"metaad predict: error: none of the {summary.n_images} images could be scored", file=sys.stderr)
        return 2
    if not quiet:
        _print_predict_summary(summary)
    return 0


def _print_predict_summary(summary) -> None:
    if summary.threshold is None:
        decided = "no threshold in the run (fitted without held-out images): scores only"
    else:
        decided = (
            f"{summary.n_anomalous} anomalous, {summary.n_scored - summary.n_anomalous} good "
            f"at threshold {summary.threshold:.4g}"
        )
    print(f"scored {summary.n_scored} of {summary.n_images} images: {decided} "
          f"({summary.images_per_second:.3g} images/s end to end)")
    if summary.note:
        print(f"note: {summary.note}")
    if summary.errors:
        print(f"{len(summary.errors)} image(s) could not be read: see the 'error' column of the CSV")
    print(f"predictions: {summary.csv}")
    if summary.regions_csv is not None:
        print(f"{'regions:':>12} {summary.regions_csv} (one row per predicted defect region)")
    for name, folder in summary.folders.items():
        print(f"{name + ':':>12} {folder}/")


def run_benchmark(args: argparse.Namespace) -> int:
    check_data_flags(args)
    from metaad.runs.fit import benchmark

    results = benchmark(
        args.models,
        _data_spec(args),
        args.out,
        preset=args.preset,
        image_size=args.image_size,
        batch_size=_setting(args, "batch_size", {}),
        on_error="skip" if args.skip_bad_files else "raise",
        device=args.device,
    )
    columns = ["image_auroc", "pixel_auroc", "pro", "fit_seconds", "ms_per_image", "peak_rss_mb"]
    print("| model | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, metrics in results.items():
        print(f"| {name} | " + " | ".join(_fmt(metrics.get(c)) for c in columns) + " |")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from metaad.runs.fit import demo

    out = Path(args.out)
    say = (lambda *_: None) if args.quiet else print
    metrics = demo(out, args.category, args.preset, say=say, progress=not (args.quiet or args.no_progress))
    if not args.quiet:
        _print_evaluation(metrics, out / "run", "run folder")
    return 0


def _print_evaluation(metrics: dict, out: Path, folder_kind: str) -> None:
    """The metrics, first saying what could not be evaluated and why."""
    shown = dict(metrics)
    skipped = shown.pop("evaluation_skipped", None)
    if skipped:
        print(f"no evaluation: {skipped}.")
        print(
            "  To evaluate, give defective images too: --abnormal-dir BAD_DIR [--mask-dir MASKS] "
            "(folder format) or an MVTec-layout test/ folder, e.g. with 'metaad test'."
        )
        if "false_alarms_at_threshold" in shown:
            print(
                f"  The threshold flags {shown.pop('false_alarms_at_threshold')} of "
                f"{shown.pop('n_test_images')} defect-free images."
            )
        elif folder_kind == "run folder":
            print("  The held-out defect-free images set the decision threshold (see threshold.json).")
    pixel_skipped = shown.pop("pixel_metrics_skipped", None)
    if pixel_skipped:
        print(f"pixel metrics skipped: {pixel_skipped}.")
    _print_metrics(shown, out, folder_kind)


def _print_metrics(metrics: dict, out: Path | None, folder_kind: str = "run folder", prefix: str = "") -> None:
    for key, value in metrics.items():
        if isinstance(value, dict):
            _print_metrics(value, None, folder_kind, f"{prefix}{key}.")
        else:
            print(f"{prefix + key:>32}: {_fmt(value)}")
    if out is not None:
        print(f"{folder_kind}: {out}")


def _fmt(value) -> str:
    return "—" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
