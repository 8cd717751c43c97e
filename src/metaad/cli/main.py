"""metaad: visual anomaly detection for industrial inspection, trained on defect-free images only, offline.

Building the parser imports no torch (``metaad --help`` answers at once); each command imports what it needs."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

DESCRIPTION = """metaad: visual anomaly detection for industrial inspection, trained on defect-free images only.

Fit a model on good images (metaad fit), score new images (metaad predict), evaluate a run on a labelled
test split (metaad test), or compare methods (metaad benchmark). 'metaad models' lists the methods and
their presets; 'metaad demo' runs the whole path on a built-in synthetic data set."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    from metaad.runtime import set_threads

    set_threads(getattr(args, "threads", None))
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return int(args.handler(args) or 0)
        except (OSError, ValueError) as error:  # metaad's DataError is a ValueError
            print(f"metaad {args.command}: error: {error}", file=sys.stderr)
            return 2


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """metaad's own warnings (about the user's data) as one line on stderr; others as Python shows them."""
    if category.__module__.startswith("metaad"):
        print(f"metaad: warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


class Parser(argparse.ArgumentParser):
    """argparse, answering a usage error in one line that points to ``--help`` (not the whole usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    from metaad.cli import commands, deploy, instance_prior, metaformer

    parser = Parser(prog="metaad", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.register(subparsers)
    metaformer.register(subparsers)
    instance_prior.register(subparsers)
    deploy.register(subparsers)
    return parser


def _version() -> str:
    from metaad import runtime

    return f"metaad {runtime.__version__}"


if __name__ == "__main__":
    raise SystemExit(main())
