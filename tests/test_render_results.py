"""``benchmarks/render_results.py`` on fabricated records: one row per method, best run marked, records linked."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def render_results():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its neighbour ``common``
    try:
        spec = importlib.util.spec_from_file_location("render_results", BENCHMARKS / "render_results.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def _mtd_record(method: str, command: str, image_auroc: float) -> dict:
    return {
        "command": command,
        "machine": "2 CPU cores (x86_64, Linux), no GPU",
        "date": "2026-12-01",
        "load_average_at_end": 1.5,
        "method": method,
        "data": "mtd seed-0",
        "preset": None,
        "params": {},
        "image_auroc": image_auroc,
        "pixel_auroc": 0.8,
        "pro": 0.7,
        "fit_seconds": 40.0,
        "ms_per_image": 42.0,
    }


RECORDS = {  # names of DEFAULT_RUNS' MTD entries for patchcore and draem, and a better PatchCore run
    "mtd_patchcore_ivf": _mtd_record("patchcore", "python benchmarks/mtd_benchmark.py --model patchcore", 0.91),
    "mtd_patchcore_exact": _mtd_record(
        "patchcore", "python benchmarks/mtd_benchmark.py --model patchcore --search exact --name x", 0.95
    ),
    "mtd_draem_grid": _mtd_record("draem", "python benchmarks/mtd_benchmark.py --model draem --threads 1", 0.97),
}


def _mtd_rows(page: str) -> dict[str, str]:
    """The MTD table's rows by method (the first cell)."""
    section = page.split("## Magnetic Tile Defects, seed-0 split")[1].split("\n\n")[1]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]  # without the header
    methods = [row.split("|")[1].strip() for row in rows]
    assert len(methods) == len(set(methods)), f"a method has more than one row: {methods}"
    return dict(zip(methods, rows, strict=True))


def test_render_results_on_fabricated_records(render_results, tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    for name, record in RECORDS.items():
        (results / f"{name}.json").write_text(json.dumps(record))
    (tmp_path / "NOTES.md").write_text("## Notes on the figures\n\nA note kept as written.\n")
    monkeypatch.setattr(sys, "argv", ["render_results.py", "--results", str(results)])
    render_results.main()
    page = (tmp_path / "RESULTS.md").read_text()

    rows = _mtd_rows(page)
    assert set(rows) == {"patchcore", "draem"}
    assert list(rows) == ["draem", "patchcore"]  # highest image AUROC of the default runs first
    # PatchCore: the default run's figures, and the better exact-search run marked as its best
    assert "[0.9100](results/mtd_patchcore_ivf.json)" in rows["patchcore"]
    assert "★ [0.9500](results/mtd_patchcore_exact.json) `mtd_patchcore_exact`" in rows["patchcore"]
    assert "`--search exact`" in rows["patchcore"]  # its options, without --model / --name
    # DRAEM's only run is its default and its best
    assert "★ the default" in rows["draem"] and "| 1 / 1.5 |" in rows["draem"]
    # methods without a record are named, not given empty rows
    others = [m for m in render_results.METHODS if m not in rows and m in render_results.MODELS]
    assert f"No record on this data set: {', '.join(others)}." in page
    if "uniad" not in render_results.MODELS:
        assert "Not built yet, so not measured: uniad." in page
    for name, record in RECORDS.items():
        assert f"[{name}](results/{name}.json)" in page  # its line in the list of records...
        assert f"`{record['command']}`" in page  # ...with its command
    assert page.rstrip().endswith("A note kept as written.")
    assert render_results.render(render_results.load_records(results), notes=(tmp_path / "NOTES.md").read_text()) \
        == page


def test_links_are_relative_to_the_page(render_results, tmp_path, monkeypatch):
    results = tmp_path / "records"
    results.mkdir()
    (results / "mtd_draem_grid.json").write_text(json.dumps(RECORDS["mtd_draem_grid"]))
    out = tmp_path / "site" / "page.md"
    monkeypatch.setattr(sys, "argv", ["render_results.py", "--results", str(results), "--out", str(out)])
    render_results.main()
    assert "](../records/mtd_draem_grid.json)" in out.read_text()


def test_unified_and_separate_records_pair_up_in_their_own_table(render_results):
    def record(name, protocol, image):
        return {"name": name, "command": f"python benchmarks/synthetic_benchmark.py --model uniad {protocol}",
                "method": "uniad", "data": "metaad synthetic data set, 128 px: 60 train",
                "protocol": "unified: one model" if protocol else "separate: one model per category",
                "mean": {"image_auroc": image, "pixel_auroc": 0.9, "pro": 0.8}}

    records = [record("uniad_synthetic", "", 0.97), record("uniad_synthetic_unified", "--unified", 0.955)]
    rows = render_results.unified_table(records, lambda name: f"results/{name}.json")
    assert len(rows) == 3 and rows[2].startswith("| uniad | [0.9550](results/uniad_synthetic_unified.json) / "
                                                 "[0.9700](results/uniad_synthetic.json)")
    assert rows[2].endswith("| -0.0150 |")
    # the unified record is not one of the method's ordinary synthetic runs
    assert [run.id for run in render_results.synthetic_runs(records)] == ["uniad_synthetic"]
