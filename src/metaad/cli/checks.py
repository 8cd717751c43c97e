"""The command line's checks on the file system, made before anything heavy is imported (torch takes seconds):
a missing folder, a file where a folder belongs or a misspelt category answers at once, in one line."""

from __future__ import annotations

import argparse
from pathlib import Path


def check_run_flag(args: argparse.Namespace) -> None:
    """``--run`` checked on the file system before torch loads: a missing folder answers at once."""
    run = getattr(args, "run", None)
    if run is not None and not Path(run).is_dir():
        kind = "is a file" if Path(run).exists() else "no such folder"
        raise ValueError(f"--run {run}: {kind}; expected a run folder (the --out folder of metaad fit)")


def check_data_flags(args: argparse.Namespace) -> None:
    """The data flags checked on the file system before anything heavy is imported (torch takes seconds), so
    that a missing folder or a misspelt category answers at once."""
    import difflib

    if getattr(args, "tile", None) is not None or getattr(args, "tile_overlap", None) is not None:
        from metaad.data.tiles import Tiling

        Tiling(args.tile if args.tile is not None else 256, 0.25 if args.tile_overlap is None else args.tile_overlap)
    if getattr(args, "data", None) is None:
        return
    root = Path(args.data)
    if not root.exists():
        raise ValueError(f"--data {root}: no such folder")
    if not root.is_dir():
        raise ValueError(f"--data {root}: is a file; expected the folder of a data set (MVTec layout, MTD, images)")
    category = getattr(args, "category", None)
    if category is None or category.strip() == "all" or getattr(args, "format", None) in ("mtd", "folder"):
        return
    found = sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())
    for name in (n.strip() for n in category.split(",")):
        if name and not (root / name).is_dir():
            close = difflib.get_close_matches(name, found, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"--category {name}: category folder not found ({root / name}); {hint}categories under "
                             f"{root}: "
                             f"{', '.join(found) or 'none (no NAME/train/good folder)'}")
