"""Glancing at the Patch, one-class protocol (supp. C.2) on the Describable Textures classes.

    python benchmarks/glance_one_class.py [--classes 0001 0002 ...] [--pretrain-epochs 1] [--param K=V ...]

One class is normal, all others abnormal. The Local-Net is distilled once on the general image folders
(``../shared/data/saliency/*/images``, C.2: "the same as C.1", there ImageNet); then, per class, it is
fine-tuned on that class's ``train`` images (the whole image resized to 33×33 is the patch, lr 1e-5) and the
Global-Net + DAD head are trained (lr 1e-5 both: ``dad_lr_ratio=1``). The test set is DTD's labelled ``val``
split of every class (``dtd/test`` has no class labels here): the class's images normal, the rest abnormal.
Records per-class image AUROC and the mean in ``benchmarks/results/glance_one_class[_<name>].json``
(rewritten after every class, so an interrupted run keeps what it has).
"""

from __future__ import annotations

import metaad  # noqa: F401  (first: OpenMP passive waiting must be set before torch)

# isort: split
import argparse
import time

import torch

from common import REPO, SHARED_DATA, parse_param, record, require_data
from metaad.data.datasets import list_images, open_image
from metaad.data.transforms import pil_to_tensor
from metaad.metrics import image_auroc
from metaad.models import create_model
from metaad.runtime import set_threads

ONE_CLASS = {"one_class": True, "local_lr": 1e-5, "global_lr": 1e-5, "dad_lr_ratio": 1.0}


def load(folder, side: int) -> torch.Tensor:
    return torch.stack([pil_to_tensor(open_image(p), side) for p in list_images(folder)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--classes", nargs="*", default=None, help="normal classes to run (default: all 47)")
    parser.add_argument("--pretrain-epochs", type=int, default=1)
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    set_threads(args.threads)
    dtd = require_data("dtd")
    params = {**ONE_CLASS, **dict(parse_param(item) for item in args.param)}
    classes = sorted(p.name for p in (dtd / "train").iterdir() if p.is_dir())
    chosen = args.classes or classes
    side = create_model("glance", **params).image_size

    tic = time.perf_counter()
    folders = [str(f) for f in sorted((SHARED_DATA / "saliency").glob("*/images"))]
    teacher = create_model("glance", **{**params, "pretrain_folders": folders, "pretrain_epochs": args.pretrain_epochs,
                                        "local_epochs": 0, "global_epochs": 0})
    teacher.fit(torch.rand(2, 3, 64, 64), workdir=REPO / "benchmarks" / "_work" / "glance_one_class" / "pretrain")
    distilled = {k: v for k, v in teacher.state_dict().items() if k.startswith(("local_net.", "decoder."))}
    pretrain_seconds = time.perf_counter() - tic

    test_images, test_classes = [], []
    for name in classes:
        images = load(dtd / "val" / name, side)
        test_images.append(images)
        test_classes += [name] * len(images)
    test = torch.cat(test_images)
    results: dict[str, dict] = {}
    for name in chosen:
        tic = time.perf_counter()
        model = create_model("glance", **params)
        model.load_state_dict(distilled, strict=False)
        model.fit(load(dtd / "train" / name, side))
        fit_seconds = time.perf_counter() - tic
        scores = torch.cat([model.predict(batch).scores for batch in test.split(64)])
        labels = torch.tensor([c != name for c in test_classes])
        results[name] = {"image_auroc": image_auroc(labels, scores), "fit_seconds": round(fit_seconds, 1)}
        print(name, results[name], flush=True)
        mean = sum(r["image_auroc"] for r in results.values()) / len(results)
        record(f"glance_one_class{'_' + args.name if args.name else ''}", {
            "method": "glance", "protocol": "supp. C.2 one-class, DTD train -> val", "params": params,
            "pretrain_folders": folders, "pretrain_epochs": args.pretrain_epochs,
            "pretrain_seconds": round(pretrain_seconds, 1), "classes_done": len(results),
            "classes_total": len(chosen), "mean_image_auroc": mean, "per_class": results,
        })


if __name__ == "__main__":
    main()
