"""Render ``benchmarks/RESULTS.md`` from the JSON records the benchmark scripts write to ``benchmarks/results/``.

    python benchmarks/render_results.py [--results DIR] [--out FILE] [--notes FILE]

The page opens with one table per data set, one row per method: the figures of the method's default run
(the record of its shipped settings, named in ``DEFAULT_RUNS``) and its best recorded run (highest image
AUROC). Every figure links to the record it came from; each record holds the command, machine, date and load
that produced it and has one line in the list of records below the tables. ``benchmarks/NOTES.md`` follows
as written. The papers' figures are quoted beside ours for comparison only. The output depends on the
records alone (sorted by name): rendering twice gives the same page.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common import RESULTS
from metaad.io import atomic_write
from metaad.models import MODELS

PLANNED = ("uniad",)  # methods the project means to add; shown as "not built" until they are registered
METHODS = (*MODELS, *(name for name in PLANNED if name not in MODELS))

# The run of each method's shipped settings, per data set, chosen from NOTES.md: several records were made
# with "the defaults" of their day, so the latest figure of the current defaults is named here by hand.
# Change an entry when a default changes and is measured again.
DEFAULT_RUNS = {
    "mtd": {
        # NOTES: "mtd_patchcore_ivf (default)"; mtd_patchcore_ivf_contract re-measured the same settings after
        # the model-contract refactor at load 9-12 (quality only), see the line under the table
        "patchcore": "mtd_patchcore_ivf",
        "reverse_distillation": "mtd_reverse_distillation_lite0",  # decoder 64/128/256, stride-16 loss+map, 12 ep
        "fastflow": "mtd_fastflow_lite0",  # hidden ratio 4, 3x3-only subnets (issue 25's validation)
        "draem": "mtd_draem_grid",  # 128 px, 16 / 16, 34 epochs, auto / mixed simulator (issue 29 grid)
        # unet_autoencoder: its defaults of 2026-12-04 (width 32, 21 epochs) are not measured on MTD yet (NOTES)
        "multiscale_patch": "mtd_multiscale_patch",  # standardize_images="auto"; the paper preset is an option
        "glance": "mtd_glance_dense",  # dense Local-Net pass on the 4 px grid, luma stains
        "metaformer": "mtd_kshot_metaformer_feature_min_epochs10_seeds0-1-2",  # feature space, A, 10 passes
        "uniad": "mtd_uniad",
    },
    "synthetic": {
        "patchcore": "patchcore_synthetic",  # today's defaults through synthetic_benchmark.py, as the others
        "reverse_distillation": "reverse_distillation_synthetic_lite0",
        "fastflow": "fastflow_synthetic_lite0",
        "draem": "draem_synthetic_grid_defaults",  # 16 / 16, 34 epochs, auto / mixed (issue 29 grid)
        "unet_autoencoder": "unet_autoencoder_synthetic_grid_defaults",  # width 32, 21 epochs (issue 29 grid)
        "multiscale_patch": "multiscale_patch_synthetic",
        "glance": "glance_synthetic_validated",
        "metaformer": "metaformer_synthetic_metaformer_synthetic_feature_default",  # feature space, A
        "uniad": "uniad_synthetic",
    },
    "kshot": {
        "patchcore": "mtd_kshot_patchcore_seeds0-1-2",
        "metaformer": "mtd_kshot_metaformer_feature_default_seeds0-1-2",  # feature space, A, 30 steps (k <= 16)
    },
    "one_class": {"glance": "glance_one_class_validated"},
}

PAPERS_MTD = (
    "Papers' figures on Magnetic Tile Defects (image AUROC unless noted), for comparison only: Metaformer 0.993 "
    "(Wu et al. 2021); multi-scale patch 0.987 detection / 0.740 segmentation AUROC (Tsai et al. 2022); "
    "DifferNet 0.977."
)
SHOTS = ("1", "2", "4", "8", "16")
DROPPED_OPTIONS = ("--out", "--name", "--model", "--run", "--threads", "--shots", "--seeds")


@dataclass(frozen=True, eq=False)  # runs compare by identity
class Run:
    """One scored configuration: a whole record, or one candidate (or shot count) inside a record."""

    id: str  # the record's name, or "record: candidate"
    record: dict
    method: str
    figures: dict  # image_auroc, pixel_auroc, pro, ms_per_image, fit_seconds (k-shot runs: per k)
    options: str  # what the run set other than the defaults, as its command (or candidate) says
    note: str = ""


# ------------------------------------------------------------------------------------------ formatting
def score(value) -> str:
    return "—" if value is None else f"{value:.4f}"


def seconds(value) -> str:
    return "—" if value is None else f"{value:.1f}"


def options_of(command: str) -> str:
    """The command's options that change the settings: not where it writes, its threads, shots or seeds
    (the tables show those apart). A dropped option takes its values with it, up to the next option."""
    kept, dropping = [], False
    for word in shlex.split(command)[2:]:  # after "python script.py"
        if word.startswith("--"):
            dropping = word in DROPPED_OPTIONS
        if not dropping:
            kept.append(word)
    return " ".join(kept)


def threads_of(record: dict) -> str:
    """The thread count its command asked for (the default of every script in the tables is 2)."""
    match = re.search(r"--threads (\d+)", record["command"])
    return match.group(1) if match else "2"


def load_of(record: dict) -> str:
    return str(record["load_average_at_end"]) if "load_average_at_end" in record else "not recorded"


def method_of(record: dict) -> str:
    if "method" in record:
        return record["method"]
    match = re.search(r"--model (\S+)", record["command"])
    if match:
        return match.group(1)
    return next((m for m in METHODS if record["name"].startswith(m)), "?")


# ------------------------------------------------------------------------------------------ the runs
def mtd_runs(records: list[dict]) -> list[Run]:
    """Every run on the whole MTD seed-0 training split, the k-shot records' "all" included."""
    runs = []
    for r in records:
        options = options_of(r["command"])
        if r.get("data") == "mtd seed-0" and "image_auroc" in r:
            runs.append(Run(r["name"], r, method_of(r), r, options))
        elif r.get("data", "").startswith("k-shot") and "all" in r.get("results", {}):
            runs.append(Run(r["name"], r, method_of(r), r["results"]["all"], options, "all 762 images"))
        elif r.get("data", "").startswith("k-shot") and "all" in r.get("summary", {}):
            figures = {m: v["mean"] for m, v in r["summary"]["all"].items()}
            runs.append(Run(r["name"], r, method_of(r), figures, options,
                            f"all 762 images, mean of {len(r['seeds'])} seeds"))
    return runs


def kshot_runs(records: list[dict]) -> list[Run]:
    """k-shot runs on MTD: per k, the figures of seed 0, or their mean over the record's seeds."""
    runs = []
    for r in records:
        if not r.get("data", "").startswith("k-shot"):
            continue
        if "summary" in r:
            figures = {k: {m: v["mean"] for m, v in entry.items()} for k, entry in r["summary"].items()}
            note = f"mean of {len(r['seeds'])} seeds"
        else:
            figures = {k: v for k, v in r["results"].items() if k != "all"}
            note = "seed 0"
        if figures:
            runs.append(Run(r["name"], r, method_of(r), figures, options_of(r["command"]), note))
    return runs


def synthetic_runs(records: list[dict]) -> list[Run]:
    """Means over metaad's six synthetic categories at 128 px; PatchCore's records compare candidates."""
    runs = []
    for r in records:
        if not r.get("data", "").startswith("metaad synthetic data set, 128 px"):
            continue
        if r.get("protocol", "").startswith("unified"):  # its own table: unified against separate
            continue
        if "method" in r:
            runs.append(Run(r["name"], r, r["method"], r["mean"], options_of(r["command"])))
            continue
        for candidate, figures in r["mean"].items():
            runs.append(Run(f"{r['name']}: {candidate}", r, method_of(r), figures, ""))
    return runs


def unified_table(records: list[dict], link: Callable[[str], str]) -> list[str]:
    """Rows of methods with both a unified and a separate synthetic record of the same options (the unified
    record's name ends ``_synthetic_unified[...]``, the separate one's is the same without ``_unified``)."""
    by_name = {r["name"]: r for r in records}
    rows = []
    for name, record in sorted(by_name.items()):
        if "_synthetic_unified" not in name or "mean" not in record:
            continue
        separate = by_name.get(name.replace("_synthetic_unified", "_synthetic"))
        if separate is None or "mean" not in separate:
            continue
        cells = []
        for key in ("image_auroc", "pixel_auroc", "pro"):
            u, v = record["mean"].get(key), separate["mean"].get(key)
            cells.append(f"[{score(u)}]({link(name)}) / [{score(v)}]({link(separate['name'])})")
        gap = record["mean"]["image_auroc"] - separate["mean"]["image_auroc"]
        rows.append(f"| {record.get('method', name)} | " + " | ".join(cells) + f" | {gap:+.4f} |")
    if not rows:
        return []
    return ["| method | image AUROC unified / separate | pixel AUROC | PRO | unified − separate (image) |",
            "|---|---|---|---|---|", *rows]


def one_class_runs(records: list[dict]) -> list[Run]:
    """The one-class protocol on DTD's 47 classes (Glance's supplementary C.2)."""
    return [
        Run(r["name"], r, r["method"], {"image_auroc": r["mean_image_auroc"], "classes": r["classes_done"]},
            options_of(r["command"]))
        for r in records
        if "DTD" in r.get("protocol", "")
    ]


def best_run(runs: list[Run], key: Callable[[Run], float | None], default: Run | None) -> Run | None:
    """The run with the highest ``key``; on a tie the default, else the first by name."""
    scored = [run for run in runs if key(run) is not None]
    if not scored:
        return None
    top = max(key(run) for run in scored)
    tied = [run for run in scored if key(run) == top]
    return default if default in tied else tied[0]


# ------------------------------------------------------------------------------------------ tables
@dataclass(frozen=True)
class Column:
    header: str
    value: Callable[[Run], float | None]
    text: Callable[[float | None], str] = score


def figure(name: str, shots: str | None = None) -> Callable[[Run], float | None]:
    if shots is None:
        return lambda run: run.figures.get(name)
    return lambda run: run.figures.get(shots, {}).get(name)


def method_table(
    dataset: str, runs: list[Run], columns: list[Column], link: Callable[[str], str], rank_by: int = 0
) -> list[str]:
    """One row per method with a record: its default run's figures, then its best run by ``columns[rank_by]``
    (the rows ordered by that figure of what they show); then the methods without one, in a sentence."""
    by_method = {m: [run for run in runs if run.method == m] for m in METHODS}
    defaults = {run.method: run for run in runs if DEFAULT_RUNS[dataset].get(run.method) == run.id}
    rank = columns[rank_by].value

    def cell(run: Run, column: Column) -> str:
        value = column.value(run)
        return "—" if value is None else f"[{column.text(value)}]({link(run.record['name'])})"

    def describe(run: Run) -> str:
        parts = [f"`{run.id}`", run.record["date"]]
        if run.options:
            parts.append(f"`{run.options}`")
        elif run is not defaults.get(run.method) and run.id == run.record["name"]:
            parts.append("the defaults of its date")
        return ", ".join(parts + ([run.note] if run.note else []))

    def order(method: str) -> tuple:
        shown = defaults.get(method) or best_run(by_method[method], rank, None)
        return (-(rank(shown) or 0.0), METHODS.index(method))

    best_header = f"★ best run by {columns[rank_by].header}"
    headers = ["method", *(c.header for c in columns), "threads / load", "default run", best_header]
    lines = ["| " + " | ".join(headers) + " |", "|---" * len(headers) + "|"]
    measured = [m for m in METHODS if best_run(by_method[m], rank, None)]
    for method in sorted(measured, key=order):
        default = defaults.get(method)
        best = best_run(by_method[method], rank, default)
        shown = default or best
        cells = [cell(shown, c) for c in columns]
        load = f"{threads_of(shown.record)} / {load_of(shown.record)}"
        described = describe(default) if default else "none recorded; figures of the best run"
        marked = "★ the default" if best is default else f"★ {cell(best, columns[rank_by])} {describe(best)}"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {load} | {described} | {marked} |")
    missing = [m for m in METHODS if m not in measured and m in MODELS]
    unbuilt = [m for m in METHODS if m not in MODELS]
    lines.append("")
    if missing:
        lines.append(f"No record on this data set: {', '.join(missing)}.")
    if unbuilt:
        lines.append(f"Not built yet, so not measured: {', '.join(unbuilt)}.")
    return lines


MTD_COLUMNS = [
    Column("image AUROC", figure("image_auroc")),
    Column("pixel AUROC", figure("pixel_auroc")),
    Column("PRO", figure("pro")),
    Column("ms / image", figure("ms_per_image"), seconds),
    Column("fit s", figure("fit_seconds"), seconds),
]
SYNTHETIC_COLUMNS = MTD_COLUMNS[:3]
KSHOT_COLUMNS = [  # the best run is ranked by k = 8 (KSHOT_RANK)
    *(Column(f"k = {k}", figure("image_auroc", k)) for k in SHOTS),
    Column("PRO, k = 8", figure("pro", "8")),
]
KSHOT_RANK = SHOTS.index("8")
ONE_CLASS_COLUMNS = [
    Column("mean image AUROC", figure("image_auroc")),
    Column("classes", figure("classes"), str),
]


def export_table(records: list[dict], link: Callable[[str], str]) -> list[str]:
    """ONNX against metaad on the MTD test split, one row per exported method."""
    rows = [r for r in records if r["name"].startswith("export_parity")]
    lines = [
        "| method | exported run | max relative score difference | images over 1e-4 | decisions identical "
        "| ms / image onnxruntime | ms / image metaad (default search) | threads / load |",
        "|---" * 8 + "|",
    ]
    for r in sorted(rows, key=lambda r: METHODS.index(r["method"]) if r["method"] in METHODS else len(METHODS)):
        parity, ms, url = r["onnx_vs_metaad"], r["ms_per_image"], link(r["name"])
        cells = [
            f"{parity['max_relative_score_difference']:.1e}",
            f"{parity['images_over_1e-4']} of {r['n_images']}",
            "yes" if parity["identical_decisions"] else "no",
            seconds(ms["onnxruntime"]),
            seconds(ms.get("metaad_ivf", ms.get("metaad"))),
        ]
        run = r["run"].rsplit("/", 1)[-1]
        linked = " | ".join(f"[{text}]({url})" for text in cells)
        lines.append(f"| {r['method']} | `{run}` | {linked} | {r['threads']} / {load_of(r)} |")
    return lines


ABLATION_RUNS = {  # Table 3 of the Metaformer paper: each configuration meta-trained the same way
    "A": "mtd_kshot_metaformer_cpu_A_universal",
    "A+P": "mtd_kshot_metaformer_cpu_A+P_universal",
    "A+P+T": "mtd_kshot_metaformer_cpu_universal-cpu",
}


def ablation_section(records: list[dict], link: Callable[[str], str]) -> list[str]:
    """Metaformer's Table 3 on MTD from the k-shot runs of the three meta-trained configurations."""
    by_name = {r["name"]: r for r in records}
    if not all(name in by_name for name in ABLATION_RUNS.values()):
        return []
    lines = [
        "## Metaformer ablation (Table 3), CPU preset, each configuration meta-trained the same way",
        "",
        "Same wild images and meta-tasks, 200 epochs, then adapted for 30 epochs (the former default map, `l2`).",
        "",
        "| configuration | shots | image AUROC | pixel AUROC | PRO |",
        "|---|---|---|---|---|",
    ]
    for configuration, name in ABLATION_RUNS.items():
        for shots in ("8", "all"):
            values = by_name[name]["results"][shots]
            row = [f"[{score(values[c])}]({link(name)})" for c in ("image_auroc", "pixel_auroc", "pro")]
            lines.append(f"| {configuration} | {shots} | " + " | ".join(row) + " |")
    note = (
        "The paper's Table 3 is per-category PRO on MVTec AD (every category gains from A to A+P+T, "
        "e.g. leather 0.901 → 0.940 → 0.959); it has no ablation on MTD, where its A+P+T reaches 0.993 image AUROC."
    )
    return [*lines, "", note, ""]


# ------------------------------------------------------------------------------------------ the record list
SECTIONS = (  # (title, test) in the order of the list; a record goes to the first section whose test holds
    ("Magnetic Tile Defects, whole training split", lambda r: r.get("data") == "mtd seed-0"),
    ("Magnetic Tile Defects, k-shot", lambda r: r.get("data", "").startswith("k-shot")),
    ("Synthetic categories", lambda r: "synthetic data set" in r.get("data", "")),
    ("DTD one-class", lambda r: "DTD" in r.get("protocol", "")),
    ("Export parity (ONNX against metaad, MTD test split)", lambda r: r["name"].startswith("export_parity")),
    ("Saliency (instance prior)", lambda r: r.get("data", "").startswith("ECSSD")),
    ("Validations on the MTD training split (no test image)",
     lambda r: "validation" in r["name"] or r.get("data", "").startswith("validation")),
    ("Other measurements", lambda r: True),
)


def record_list(records: list[dict], link: Callable[[str], str]) -> list[str]:
    machines = Counter(r["machine"] for r in records)
    usual = machines.most_common(1)[0][0] if machines else ""
    lines = [
        "## Records",
        "",
        f"One line per file in `results/`: name (link), date, 1-minute load average when it ended, command. "
        f"Machine: {usual}, unless the line says otherwise. The scripts run 2 threads unless the command says "
        "`--threads` (`maml_order_timing.py`: 1).",
        "",
    ]
    placed: set[str] = set()
    for title, belongs in SECTIONS:
        members = [r for r in records if r["name"] not in placed and belongs(r)]
        if not members:
            continue
        lines += [f"### {title}", ""]
        for r in members:
            placed.add(r["name"])
            machine = "" if r["machine"] == usual else f" · {r['machine']}"
            lines.append(f"- [{r['name']}]({link(r['name'])}) · {r['date']} · load {load_of(r)}{machine} · "
                         f"`{r['command']}`")
        lines.append("")
    return lines


# ------------------------------------------------------------------------------------------ the page
def load_records(folder: Path) -> list[dict]:
    records = []
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        record["name"] = path.stem
        records.append(record)
    return records


def render(records: list[dict], results_link: str = "results", notes: str = "") -> str:
    """The page for ``records``; figures link to ``<results_link>/<name>.json``."""

    def link(name: str) -> str:
        return f"{results_link}/{name}.json"

    dates = sorted(r["date"] for r in records)
    span = f"{dates[0]} to {dates[-1]}" if dates else "none yet"
    lines = [
        "# Benchmark results",
        "",
        "Generated by `python benchmarks/render_results.py` from `benchmarks/results/*.json` (do not edit by hand);",
        f"{len(records)} records, measured {span} on this project's machines. Every figure links to the JSON",
        "record it came from; each record's command, machine, date and load are in the list of records below.",
        "",
        "How to read the tables:",
        "- One row per method, highest image AUROC first. The figures are those of the method's **default run**:",
        "  the record of its shipped settings (`DEFAULT_RUNS` in `render_results.py`).",
        "- **★ best run**: the method's highest image AUROC among all its recorded runs on that data set, with",
        "  any settings (\"the defaults of its date\": run without options before the default run was made);",
        "  \"★ the default\" when it is the default run.",
        "- `ms / image` times the model alone (features, search, maps), batches of its own size; `fit s` is",
        "  the whole fit. The machine has 2 cores: with a load above about 2, timings are inflated (see NOTES).",
        "- An option in a record's command (`--param`, `--preset`, `--init`, ...) is a setting other than the",
        "  default; \"threads / load\": the threads the run used / the load average when it ended.",
        "",
    ]
    runs = mtd_runs(records)
    if runs:
        lines += ["## Magnetic Tile Defects, seed-0 split (762 train / 582 test images)", ""]
        lines += method_table("mtd", runs, MTD_COLUMNS, link)
        lines += ["", PAPERS_MTD, ""]
        by_id = {run.id: run for run in runs}
        if "mtd_patchcore_ivf_contract" in by_id:
            rerun = by_id["mtd_patchcore_ivf_contract"]
            lines += [
                f"PatchCore's defaults were measured again after the model-contract refactor "
                f"(`mtd_patchcore_ivf_contract`): image AUROC [{score(rerun.figures['image_auroc'])}]"
                f"({link(rerun.id)}), PRO [{score(rerun.figures['pro'])}]({link(rerun.id)}), at load "
                f"{load_of(rerun.record)}: its timings are not comparable, so the row keeps the quiet-machine run.",
                "",
            ]
        lines += ["Metaformer's row is its k-shot protocol with all 762 training images (`--shots all`).", ""]
    runs = kshot_runs(records)
    if runs:
        lines += [
            "## Magnetic Tile Defects, k-shot (k training images drawn from the seed-0 split)",
            "",
            "Image AUROC per k, then PRO at k = 8; a record over several seeds gives the mean (each seed draws",
            "its own k images). Best run: highest image AUROC at k = 8, from a seed-0 record or a mean over seeds.",
            "",
            *method_table("kshot", runs, KSHOT_COLUMNS, link, KSHOT_RANK),
            "",
        ]
    runs = synthetic_runs(records)
    if runs:
        lines += [
            "## Synthetic categories (metaad's generator, 128 px: weave, grain, leather, cap, screw, board)",
            "",
            "Means over the six categories (60 training images each); per-category figures and fit times are in",
            "the records. PatchCore's records compare candidate settings inside one record.",
            "",
            *method_table("synthetic", runs, SYNTHETIC_COLUMNS, link),
            "",
        ]
    unified = unified_table(records, link)
    if unified:
        lines += [
            "## Unified against separate (one model for the six synthetic categories, or one per category)",
            "",
            "The same categories, test images and settings; means over the six categories. The unified protocol",
            "fits one model on the union of the categories' training images (`synthetic_benchmark.py --unified`).",
            "",
            *unified,
            "",
        ]
    lines += [
        "## Held-out real object category",
        "",
        "No records: no benchmark has yet been run on a real object category.",
        "",
    ]
    runs = one_class_runs(records)
    if runs:
        lines += [
            "## DTD one-class (Glance's supplementary C.2: one class of 47 is normal, the others anomalous)",
            "",
            *method_table("one_class", runs, ONE_CLASS_COLUMNS, link),
            "",
        ]
    if any(r["name"].startswith("export_parity") for r in records):
        lines += [
            "## Export parity (ONNX graph against metaad, MTD test split; bar: difference ≤ 1e-4)",
            "",
            *export_table(records, link),
            "",
        ]
    prior = next((r for r in records if r.get("data", "").startswith("ECSSD") and "table" in r), None)
    if prior:
        lines += [
            "## Saliency of the instance prior (not an anomaly method)",
            "",
            f"From [{prior['name']}]({link(prior['name'])}): {prior['table'][0]}",
            "",
            *prior["table"][2:],
            "",
        ]
    lines += ablation_section(records, link)
    lines += record_list(records, link)
    if notes:
        lines += [notes.rstrip("\n"), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the JSON records")
    parser.add_argument("--out", type=Path, default=None, help="the page (default: RESULTS.md beside --results)")
    parser.add_argument("--notes", type=Path, default=None, help="notes appended (default: NOTES.md beside it)")
    args = parser.parse_args()
    out = args.out or args.results.parent / "RESULTS.md"
    notes_path = args.notes or args.results.parent / "NOTES.md"
    notes = notes_path.read_text(encoding="utf-8") if notes_path.is_file() else ""
    results_link = Path(os.path.relpath(args.results.resolve(), out.resolve().parent)).as_posix()
    text = render(load_records(args.results), results_link, notes)
    atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    print(f"wrote {out}: {text.count(chr(10)) + 1} lines from {len(load_records(args.results))} records")


if __name__ == "__main__":
    main()
