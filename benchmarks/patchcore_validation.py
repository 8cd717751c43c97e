"""Choose PatchCore's feature layers for a backbone without test labels: synthetic defects on training images.

    python benchmarks/patchcore_validation.py [--candidates 2,3 1,2 1,2,3] [--name NAME]
    python benchmarks/patchcore_validation.py --candidates "layers=2,3" "layers=2,3;border_padding=16"

A candidate is a stage list ("2,3") or ``;``-separated PatchCore parameters ("layers=2,3;border_padding=16");
Images are loaded at the size the engine would load them for each candidate (``image_size=N`` sets PatchCore's;
compare sizes with ``--native-defects``, so that every size sees the same defects).

The defect-free training split is divided (seeded) into a fit part (80%) and a validation part (20%); every
validation image also gets a copy with a synthetic defect, the kinds taken in turn from ``--defects``:
"perlin" (a Perlin-noise blob filled with a DTD texture, DRAEM §3.3) and metaad.data.synthetic's surface
defects ("scratch", "crack", "hole", "stain": thin and small ones that a large blob does not test; "shading":
a broad low-contrast patch, like an uneven surface). Each
candidate is fitted on the fit part and scored on the validation images. No test image is read.
``--folds K`` repeats this over K folds of the training split (each image validated once) and reports fold
means with standard errors, so that gains smaller than one split's noise can be told apart.
The figures go to ``benchmarks/results/patchcore_validation_<name>.json``.
"""

from __future__ import annotations

import metaad  # noqa: F401  (first: OpenMP passive waiting, hence multi-threaded faiss, needs it before torch)

# isort: split
import argparse
import json
import random
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from common import parse_param, record, require_data
from metaad.components.anomaly_synthesis import paste_anomaly
from metaad.data.datasets import AnomalyDataset, list_images, mtd_records
from metaad.data.source import split_calibration
from metaad.data.synthetic import SURFACE_DEFECTS, draw_surface_defect
from metaad.data.transforms import pil_to_tensor
from metaad.metrics import evaluate
from metaad.models import create_model, get_config
from metaad.runs.fit import loading_size
from metaad.runtime import set_threads


def validation_set(
    records,
    textures,
    image_size: int,
    seed: int,
    defects: tuple[str, ...] = ("perlin",),
    strength: float = 1.0,
    native: bool = False,
):
    """Validation images: each defect-free image as it is, and once with a synthetic defect (kinds in turn);
    ``strength`` < 1 blends the defect with the clean image (clean + strength · (defective − clean)).

    ``native=True`` draws each defect on the image at its own resolution and then resizes the pair to
    ``image_size`` exactly as the data pipeline resizes a photograph (a real defect exists at the camera's
    resolution), so candidates with different input sizes see the same defects; otherwise the defect is
    drawn on the resized image (the first validations' protocol).
    """
    rng = np.random.default_rng(seed)
    images, masks, labels = [], [], []
    for number, item in enumerate(records):
        photo = Image.open(item.path)
        clean = pil_to_tensor(photo, photo.size[::-1] if native else image_size).permute(1, 2, 0).numpy()
        kind = defects[number % len(defects)]
        if kind == "perlin":
            texture_path = textures[int(rng.integers(len(textures)))]
            texture = pil_to_tensor(Image.open(texture_path), clean.shape[:2]).permute(1, 2, 0).numpy()
            defective, mask = paste_anomaly(clean, texture, rng)
        else:
            defective, mask = draw_surface_defect(clean, kind, rng)
        defective = clean + strength * (defective - clean)
        for array, m, label in ((clean, np.zeros(mask.shape, bool), 0), (defective, mask, 1)):
            image = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
            if native:
                image, m = resize_like_pipeline(array, m, image_size)
            images.append(image)
            masks.append(m)
            labels.append(label)
    return torch.stack(images), np.stack(masks).astype(np.uint8), np.array(labels)


def resize_like_pipeline(array: np.ndarray, mask: np.ndarray, size: int) -> tuple[torch.Tensor, np.ndarray]:
    """An (H, W, 3) float image through the data pipeline's 8-bit resize; its mask by nearest neighbour."""
    photo = Image.fromarray(np.round(np.clip(array, 0.0, 1.0) * 255).astype(np.uint8))
    mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)) > 127
    return pil_to_tensor(photo, size), mask


def candidate_params(candidate: str) -> dict:
    """"2,3" -> {"layers": [2, 3]}; "layers=2,3;border_padding=16" -> {"layers": [2, 3], "border_padding": 16}."""
    if "=" not in candidate:
        candidate = f"layers={candidate}"
    return dict(parse_param(item) for item in candidate.split(";"))


def summarize_folds(folds: list[dict], reference: list[dict]) -> dict:
    """One fold: its figures as they are. Several: the fold means, the standard error of the image AUROC, and
    the mean paired gain over the reference candidate (the first) with its standard error."""
    if len(folds) == 1:
        return folds[0]
    summary = {key: float(np.mean([f[key] for f in folds])) for key, value in folds[0].items()
               if isinstance(value, float)}
    aurocs = np.array([f["image_auroc"] for f in folds])
    gains = aurocs - np.array([f["image_auroc"] for f in reference])

    def se(values: np.ndarray) -> float:
        return float(values.std(ddof=1) / np.sqrt(len(values)))

    return {**summary, "image_auroc_se": se(aurocs), "image_auroc_gain": float(gains.mean()),
            "image_auroc_gain_se": se(gains), "memory_bank": folds[0]["memory_bank"], "params": folds[0]["params"],
            "folds": folds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--candidates", nargs="+", default=["2,3", "1,2", "1,2,3"])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--defects", nargs="+", default=["perlin"], choices=["perlin", *SURFACE_DEFECTS],
        help="synthetic defect kinds, used in turn (default: perlin, the first validation's protocol)",
    )
    parser.add_argument("--strength", type=float, default=1.0, help="defect contrast (1: as drawn; 0.3: subtle)")
    parser.add_argument(
        "--image-size", type=int, default=None,
        help="load images at this size and give it to candidates that set no image_size (default: the model's)",
    )
    parser.add_argument(
        "--native-defects", action="store_true",
        help="draw each synthetic defect at the photograph's own resolution, then resize (needed to compare input "
        "sizes: a candidate may set image_size=N)",
    )
    parser.add_argument("--name", default=None, help="results name (default: the backbone)")
    parser.add_argument(
        "--folds", type=int, default=1,
        help="1: one seeded 80/20 split; K > 1: K-fold cross-validation over the training split, reporting fold "
        "means, their standard error and each candidate's paired gain over the first candidate",
    )
    args = parser.parse_args()
    set_threads(args.threads)
    root = require_data("mtd")
    dtd = require_data("dtd")
    textures = sorted(p for folder in sorted((dtd / "train").iterdir()) for p in list_images(folder))
    random.Random(args.seed).shuffle(textures)
    train_records = mtd_records(root, "train", seed=0)
    if args.folds == 1:  # the original protocol: one seeded 80/20 split
        splits = [split_calibration(train_records, 0.2, args.seed)]
    else:
        order = list(range(len(train_records)))
        random.Random(args.seed).shuffle(order)
        held = [set(order[fold :: args.folds]) for fold in range(args.folds)]
        splits = [
            ([r for i, r in enumerate(train_records) if i not in part], [train_records[i] for i in sorted(part)])
            for part in held
        ]
    per_fold: dict[str, list[dict]] = {candidate: [] for candidate in args.candidates}
    for fold, (fit_records, val_records) in enumerate(splits):
        sets: dict[int, tuple] = {}  # input size -> validation images, masks, labels (same defects each size)
        for candidate in args.candidates:
            params = {"backbone": args.backbone, **({"image_size": args.image_size} if args.image_size else {})}
            model = create_model("patchcore", **{**params, **candidate_params(candidate)})
            image_size = loading_size(model, args.image_size)
            if image_size not in sets:
                sets[image_size] = validation_set(
                    val_records, textures, image_size, args.seed + fold, tuple(args.defects), args.strength,
                    native=args.native_defects,
                )
            images, masks, labels = sets[image_size]
            fit_set = AnomalyDataset(fit_records, image_size=image_size)
            tic = time.perf_counter()
            model.fit(DataLoader(fit_set, batch_size=16))
            fit_seconds = time.perf_counter() - tic
            tic = time.perf_counter()
            prediction = model.predict(images)
            ms = 1000 * (time.perf_counter() - tic) / len(images)
            metrics = evaluate(labels, prediction.scores.numpy(), masks, prediction.maps.numpy())
            per_fold[candidate].append({**metrics, "fit_seconds": fit_seconds, "ms_per_image": ms,
                                        "memory_bank": list(model.memory_bank.shape), "params": get_config(model)})
            print(fold, candidate, json.dumps(per_fold[candidate][-1]), flush=True)
    results = {candidate: summarize_folds(folds, per_fold[args.candidates[0]]) for candidate, folds in per_fold.items()}
    size_text = f"{args.image_size} px" if args.image_size else "images loaded at each candidate's size"
    split_text = "80% fit / 20% validation" if args.folds == 1 else f"{args.folds}-fold cross-validation"
    record(f"patchcore_validation_{args.name or args.backbone}", {
        "data": f"validation: MTD training split only ({split_text}, each validation image also with a synthetic "
        f"defect: {', '.join(args.defects)}; strength {args.strength}"
        f"{'; drawn at native resolution' if args.native_defects else ''}), {size_text}",
        "candidates": results,
    })


if __name__ == "__main__":
    main()
