"""Shared helpers of the benchmark scripts: where the real data is, and recording a result with its provenance."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

from metaad.io import write_json

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"


def parse_param(item: str) -> tuple[str, Any]:
    """"KEY=VALUE" -> (key, value): VALUE as JSON, else a bare string; ``layers=2,3`` -> [2, 3]."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise SystemExit(f"expected KEY=VALUE, got {item!r}")
    if key == "layers":
        return key, [int(v) for v in value.strip("[]").split(",")]
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def require_data(name: str) -> Path:
    """``../shared/data/<name>``, or exit with a clear reason when it is absent."""
    path = SHARED_DATA / name
    if not path.is_dir():
        print(f"skipped: real data not available: {path} is absent (needs ../shared/data beside the repo)")
        raise SystemExit(0)
    return path


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    return f"{cpus} CPU cores ({cpu}, {platform.system()}), no GPU"


def record(name: str, results: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` with the command, machine and date beside the figures."""
    payload = {
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
        # other work on the machine slows timings: the 1-minute load average when the run ended says how much
        "load_average_at_end": round(os.getloadavg()[0], 2),
        **results,
    }
    return write_json(RESULTS / f"{name}.json", payload)
