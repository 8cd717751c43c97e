"""Instance prior P on held-out ECSSD: MAE and max F-measure of R against the masks, and ms per image.

    python benchmarks/instance_prior.py [--weights PATH] [--limit N]

Compares the trained generator (metaad's shipped weights unless ``--weights``) with two training-free
baselines scored the same way: a centre-bias Gaussian (σ = 1/4 of each side, the same stand-in prior that
Metaformer offers as "center-bias") and spectral residual (Hou & Zhang 2007). ECSSD is never used in
training (the generator is trained on DUTS-TR). Each image is resized to 256×256 (metaad's preprocessing);
R is resized back to the mask's own size for scoring. Timing: one 256×256 image, 2 threads, median of 20.
An all-zeros map is listed as the MAE floor that an empty prediction reaches. Prints a markdown table,
writes ``benchmarks/results/instance_prior.json`` and the docs figure ``docs/figures/instance_prior_grid.png``
(held-out ECSSD and Magnetic Tile images, their R and ground truth).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from common import REPO, SHARED_DATA, record, require_data
from metaad.data.saliency import list_saliency_folder
from metaad.data.transforms import mask_to_tensor, pil_to_tensor
from metaad.metrics.saliency import SaliencyMetrics
from metaad.models.metaformer.instance_prior import SHIPPED_WEIGHTS, load_instance_prior
from metaad.models.metaformer.saliency_baselines import CenterBiasGaussian, SpectralResidual

FIGURE = REPO / "docs" / "figures" / "instance_prior_grid.png"


class _Zeros(nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.new_zeros(images.shape[0], 1, *images.shape[-2:])


def _load(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        return pil_to_tensor(image, 256)


def evaluate(methods: dict[str, nn.Module], samples: list, batch_size: int = 16) -> dict[str, dict]:
    metrics = {name: SaliencyMetrics() for name in methods}
    with torch.inference_mode():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            images = torch.stack([_load(s.image) for s in chunk])
            masks = []
            for sample in chunk:
                with Image.open(sample.mask) as mask:
                    masks.append(mask_to_tensor(mask, (mask.height, mask.width)))
            for name, method in methods.items():
                responses = method(images).float()
                for response, mask in zip(responses, masks, strict=True):
                    resized = F.interpolate(response[None], size=mask.shape[-2:], mode="bilinear", align_corners=False)
                    metrics[name].update(resized.clamp(0, 1), mask[None])
            print(f"\r{start + len(chunk)}/{len(samples)} images", end="", flush=True)
    print()
    return {name: m.compute() for name, m in metrics.items()}


def time_ms(method: nn.Module, runs: int = 20) -> float:
    image = torch.rand(1, 3, 256, 256)
    with torch.inference_mode():
        for _ in range(3):
            method(image)
        times = []
        for _ in range(runs):
            begin = time.perf_counter()
            method(image)
            times.append((time.perf_counter() - begin) * 1000)
    return statistics.median(times)


def render_figure(prior: nn.Module, ecssd: list, path: Path, seed: int = 0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(s.image, s.mask, f"ECSSD {s.stem}") for s in random.Random(seed).sample(ecssd, 6)]
    mtd = SHARED_DATA / "mtd"
    for kind in ("MT_Blowhole", "MT_Crack", "MT_Uneven"):
        images = sorted((mtd / kind / "Imgs").glob("*.jpg"))
        if images:
            image = random.Random(seed).choice(images)
            rows.append((image, image.with_suffix(".png"), f"Magnetic Tile {kind[3:]}"))
    figure, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.5 * len(rows)))
    for row, (image_path, mask_path, title) in zip(axes, rows, strict=True):
        with Image.open(image_path) as image:
            shown = pil_to_tensor(image, 256)
        with torch.inference_mode():
            response = prior(shown[None])[0, 0]
        with Image.open(mask_path) as mask:
            truth = mask_to_tensor(mask, 256)[0]
        panels = (shown.permute(1, 2, 0), response, truth)
        for axis, panel, name in zip(row, panels, ("image", "R = P(I)", "ground truth"), strict=True):
            axis.imshow(panel.numpy(), cmap=None if name == "image" else "gray", vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_title(f"{title}: {name}" if name == "image" else name, fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=64)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help=f"generator .safetensors (default: the shipped {SHIPPED_WEIGHTS.name})")
    parser.add_argument("--limit", type=int, help="evaluate the first N ECSSD images only (quick checks)")
    parser.add_argument("--no-figure", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    samples = list_saliency_folder(require_data("saliency/ecssd"))
    if args.limit:
        samples = samples[: args.limit]
    prior = load_instance_prior(args.weights)
    methods = {
        "instance prior P (colour-selectivo GAN generator)": prior,
        "centre-bias Gaussian (σ = 0.25 side)": CenterBiasGaussian(0.25),
        "spectral residual (Hou & Zhang 2007)": SpectralResidual(),
        "all zeros (MAE floor of an empty map)": _Zeros(),
    }
    scores = evaluate(methods, samples)
    for name, method in methods.items():
        scores[name]["ms_per_image"] = time_ms(method)
    lines = [
        f"Held-out ECSSD ({len(samples)} images, never used in training), 256×256 input, scored at mask size.",
        "",
        "| method | MAE ↓ | max F (β² = 0.3) ↑ | ms / 256×256 image (2 threads) |",
        "|---|---|---|---|",
    ]
    for name, score in scores.items():
        lines.append(f"| {name} | {score['mae']:.4f} | {score['max_f']:.4f} | {score['ms_per_image']:.1f} |")
    print("\n".join(lines))
    weights = Path(args.weights) if args.weights else SHIPPED_WEIGHTS
    record(
        "instance_prior",
        {
            "data": f"ECSSD, {len(samples)} images",
            "weights": str(weights.resolve().relative_to(REPO) if weights.resolve().is_relative_to(REPO) else weights),
            "results": scores,
            "table": lines,
        },
    )
    if not args.no_figure:
        render_figure(prior, list_saliency_folder(SHARED_DATA / "saliency" / "ecssd"), FIGURE)
        print(f"figure: {FIGURE.relative_to(REPO)}")


if __name__ == "__main__":
    main()
