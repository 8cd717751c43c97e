"""Render ``benchmarks/RESULTS.md`` from the JSON files the benchmark scripts write to ``benchmarks/results/``.

    python benchmarks/render_results.py

Every figure in RESULTS.md comes from one of those files, each with the command, machine and date that
produced it; the papers' figures are quoted beside them for comparison only.
"""

from __future__ import annotations

import json

from common import RESULTS
from metaad.io import atomic_write

PAPERS_MTD = (
    "Papers' figures on Magnetic Tile Defects (image AUROC unless noted): Metaformer 0.993 (Wu et al. 2021); "
    "multi-scale patch 0.987 detection / 0.740 segmentation AUROC (Tsai et al. 2022); DifferNet 0.977."
)


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def mtd_section(results: list[dict]) -> list[str]:
    lines = ["## Magnetic Tile Defects, seed-0 split (762 train / 582 test images)", "", PAPERS_MTD, ""]
    columns = [
        "image_auroc",
        "pixel_auroc",
        "pro",
        "image_f1_max",
        "fit_seconds",
        "ms_per_image",
        "ms_per_image_end_to_end",
        "peak_rss_mb",
        "load_average_at_end",
    ]
    lines.append("| run | " + " | ".join(columns) + " | machine | date |")
    lines.append("|---" * (len(columns) + 3) + "|")
    for result in results:
        row = [_fmt(result.get(c)) for c in columns]
        lines.append(f"| {result['name']} | " + " | ".join(row) + f" | {result['machine']} | {result['date']} |")
    lines.append("")
    lines.append("Commands:")
    lines += [f"- {result['name']}: `{result['command']}`" for result in results]
    lines.append("")
    return lines


def validation_section(result: dict) -> list[str]:
    """A table of the candidates that a ``patchcore_validation`` run compared (no test image read)."""
    columns = ["image_auroc", "pixel_auroc", "pro", "fit_seconds", "ms_per_image"]
    lines = [f"Validation data: {result['data']}", ""]
    if "note" in result:
        lines += [result["note"], ""]
    lines.append("| candidate | " + " | ".join(columns) + " | memory bank |")
    lines.append("|---" * (len(columns) + 2) + "|")
    for candidate, values in result["candidates"].items():
        row = [_fmt(values.get(c)) for c in columns] + [" × ".join(map(str, values.get("memory_bank", [])))]
        if "image_auroc_se" in values:  # K-fold: mean ± standard error, and the paired gain over the first
            row[0] += f" ± {values['image_auroc_se']:.4f} (gain {values['image_auroc_gain']:+.4f} ± "
            row[0] += f"{values['image_auroc_gain_se']:.4f})"
        lines.append(f"| `{candidate}` | " + " | ".join(row) + " |")
    return [*lines, ""]


def synthetic_section(result: dict) -> list[str]:
    """Image AUROC / PRO of each candidate per synthetic category (``patchcore_synthetic``)."""
    candidates = list(result["mean"])
    lines = [f"Data: {result['data']}", ""]
    if "note" in result:
        lines += [result["note"], ""]
    lines.append("| category | exposure variation | " + " | ".join(f"`{c}`" for c in candidates) + " |")
    lines.append("|---" * (len(candidates) + 2) + "|")
    for category, entry in result["categories"].items():
        cells = [
            f"{entry['candidates'][c]['image_auroc']:.3f} / {entry['candidates'][c]['pro']:.3f}" for c in candidates
        ]
        lines.append(f"| {category} | {entry['exposure_variation']:.3f} | " + " | ".join(cells) + " |")
    means = [f"{result['mean'][c]['image_auroc']:.3f} / {result['mean'][c]['pro']:.3f}" for c in candidates]
    lines.append("| mean | | " + " | ".join(means) + " |")
    return [*lines, "", "Cells: image AUROC / PRO.", ""]


ABLATION_RUNS = {  # Table 3 of the Metaformer paper: each configuration meta-trained the same way
    "A": "mtd_kshot_metaformer_cpu_A_universal",
    "A+P": "mtd_kshot_metaformer_cpu_A+P_universal",
    "A+P+T": "mtd_kshot_metaformer_cpu_universal-cpu",
}


def ablation_section(results: list[dict]) -> list[str]:
    """Metaformer's Table 3 on MTD from the k-shot runs of the three meta-trained configurations."""
    by_name = {r["name"]: r for r in results}
    if not all(name in by_name for name in ABLATION_RUNS.values()):
        return []
    lines = [
        "## Metaformer ablation (Table 3), CPU preset, each configuration meta-trained the same way",
        "",
        "Same wild images and meta-tasks, 200 epochs, then adapted for 30 epochs; from the k-shot runs below.",
        "",
        "| configuration | shots | image_auroc | pixel_auroc | pro |",
        "|---|---|---|---|---|",
    ]
    for configuration, name in ABLATION_RUNS.items():
        for shots in ("8", "all"):
            values = by_name[name]["results"][shots]
            row = [_fmt(values[c]) for c in ("image_auroc", "pixel_auroc", "pro")]
            lines.append(f"| {configuration} | {shots} | " + " | ".join(row) + " |")
    note = (
        "The paper's Table 3 is per-category PRO on MVTec AD (every category gains from A to A+P+T, "
        "e.g. leather 0.901 → 0.940 → 0.959); it has no ablation on MTD, where its A+P+T reaches 0.993 image AUROC."
    )
    return [*lines, "", note, ""]


def main() -> None:
    files = sorted(RESULTS.glob("*.json"))
    results = []
    for path in files:
        data = json.loads(path.read_text())
        data["name"] = path.stem
        results.append(data)
    lines = [
        "# Benchmark results",
        "",
        "Generated by `python benchmarks/render_results.py` from `benchmarks/results/*.json`; every figure",
        "was measured on this project's machines by the command listed with it. `ms_per_image` times the",
        "model alone (features, search, maps); `ms_per_image_end_to_end` adds image decoding and resizing.",
        "",
    ]
    mtd = [r for r in results if r.get("data", "").startswith("mtd") and "image_auroc" in r]
    if mtd:
        lines += mtd_section(mtd)
    lines += ablation_section(results)
    others = [r for r in results if r not in mtd]
    for result in others:
        provenance = f"Command: `{result['command']}` on {result['machine']}, {result['date']}"
        if "load_average_at_end" in result:
            provenance += f" (load average at the end: {result['load_average_at_end']})"
        lines += [f"## {result['name']}", "", provenance, ""]
        if "table" in result:
            lines += [*result["table"], ""]
            continue
        if result["name"].startswith("patchcore_validation"):
            lines += validation_section(result)
            continue
        if result["name"].startswith("patchcore_synthetic"):
            lines += synthetic_section(result)
            continue
        body = {k: v for k, v in result.items() if k not in ("command", "machine", "date", "name")}
        lines += ["```json", json.dumps(body, indent=2), "```", ""]
    notes = RESULTS.parent / "NOTES.md"
    if notes.is_file():
        lines += ["", notes.read_text(encoding="utf-8")]
    text = "\n".join(lines)
    atomic_write(RESULTS.parent / "RESULTS.md", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    print(text)


if __name__ == "__main__":
    main()
