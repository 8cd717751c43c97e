"""The deployment sub-commands: ``export`` (a run to one ONNX graph) and ``serve`` (a run behind HTTP)."""

from __future__ import annotations

import argparse
import json

from metaad.cli.checks import check_run_flag

DEVICES = ("cpu", "cuda", "auto")


def register(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export",
        help="export a run's model as one ONNX graph (normalisation, backbone, scorer, maps; threshold in metadata)",
    )
    export.add_argument("--run", required=True, help="run folder written by 'metaad fit'")
    export.add_argument("--format", default="onnx", choices=["onnx"], help="graph format (onnx, the only one)")
    export.add_argument("--out", required=True, help="file to write, e.g. model.onnx")
    export.add_argument("--device", default="cpu", choices=DEVICES, help="where to trace the model (default cpu)")
    export.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    export.set_defaults(handler=run_export)

    serve = subparsers.add_parser(
        "serve", help="serve a run over HTTP: POST /predict, GET /health, GET /model, docs at /docs"
    )
    serve.add_argument("--run", required=True, help="run folder written by 'metaad fit'")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    serve.add_argument("--device", default="cpu", choices=DEVICES, help="where the model runs (default cpu)")
    serve.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    serve.add_argument(
        "--category", default=None,
        help="a run of several categories: whose threshold decides by default (a request's 'category' form "
        "field picks another; without either, the global threshold, with a note)",
    )
    serve.add_argument(
        "--min-region-area", type=int, default=1, metavar="PIXELS",
        help="predicted defect regions smaller than this are left out of masks and 'regions' (default 1)",
    )
    serve.set_defaults(handler=run_serve)


def run_export(args: argparse.Namespace) -> int:
    check_run_flag(args)
    from metaad.deploy.export import export_run

    try:
        metadata = export_run(args.run, args.out, args.device)
    except RuntimeError as error:  # the method's graph does not reproduce it: say so without a traceback
        raise ValueError(str(error)) from error
    print(json.dumps({"out": str(args.out), **{k: v for k, v in metadata.items() if k != "params"}}, indent=2))
    return 0


def run_serve(args: argparse.Namespace) -> int:
    check_run_flag(args)
    try:
        from metaad.deploy.serve import serve
    except ImportError as error:
        raise ValueError(f"metaad serve needs the 'serve' extra: pip install 'metaad[serve]' ({error})") from error
    serve(args.run, args.host, args.port, args.device, args.category, args.min_region_area)
    return 0
