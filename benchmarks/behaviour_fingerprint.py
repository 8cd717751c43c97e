"""Behaviour fingerprint: every registered method's "tiny" preset fitted on fixed images, its scores and maps
saved, and its saved model kept, so that code moved between versions can be checked to score bit-identically
(and that a model saved by the older code still loads and scores the same).

    python benchmarks/behaviour_fingerprint.py --out FOLDER            # fit, save models and scores
    python benchmarks/behaviour_fingerprint.py --compare FOLDER        # refit + reload FOLDER's models, compare
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import metaad  # noqa: F401  (before torch)

# isort: split
import torch

try:  # the layout after the house issue, else the one before it
    from metaad.models.persistence import load_model, save_model
except ImportError:  # pragma: no cover
    from metaad.engine.checkpoint import load_model, save_model
from metaad.models import REGISTRY, create_model

SIZE = 64


def images(n: int, seed: int, vary_exposure: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    pattern = 0.5 + 0.2 * torch.sin(xs / 3.0) * torch.cos(ys / 4.0)
    batch = pattern.expand(n, 3, SIZE, SIZE) + 0.02 * torch.randn(n, 3, SIZE, SIZE, generator=generator)
    if vary_exposure:  # brightness varying by ~20% so that exposure standardisation switches on
        batch = batch * torch.linspace(0.7, 1.3, n).view(n, 1, 1, 1)
    return batch.clamp(0, 1)


def test_images() -> torch.Tensor:
    good = images(4, 1, False)
    bad = good.clone()
    bad[:, :, 20:36, 24:40] = torch.tensor([0.95, 0.1, 0.1]).view(1, 3, 1, 1)
    return torch.cat([good, bad, images(2, 2, True)])


def fit(name: str, vary: bool, workdir: Path):
    torch.manual_seed(0)
    model = create_model(name, "tiny")
    model.fit(images(12, 0, vary), workdir=workdir)
    return model.eval()


@torch.no_grad()
def predict(model, test):
    return model.predict(test)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--compare")
    parser.add_argument("--models", nargs="*", default=sorted(REGISTRY))
    args = parser.parse_args()
    torch.set_num_threads(1)
    test = test_images()
    report = {}
    for name in args.models:
        for vary in (False, True):
            key = f"{name}{'_varied' if vary else ''}"
            if args.out:
                folder = Path(args.out) / key
                model = fit(name, vary, folder / "training")
                save_model(model, folder / "model")
                prediction = predict(model, test)
                torch.save({"scores": prediction.scores, "maps": prediction.maps}, folder / "prediction.pt")
                print(key, [round(float(s), 5) for s in prediction.scores], flush=True)
            else:
                folder = Path(args.compare) / key
                old = torch.load(folder / "prediction.pt")
                loaded = predict(load_model(folder / "model"), test)
                refit_model = fit(name, vary, Path(tempfile.mkdtemp(prefix="fingerprint_")) / key)
                refit = predict(refit_model, test)
                result = {
                    "loaded_scores_equal": torch.equal(loaded.scores, old["scores"]),
                    "loaded_max_abs": float((loaded.scores - old["scores"]).abs().max()),
                    "loaded_maps_max_abs": float((loaded.maps - old["maps"]).abs().max()),
                    "refit_scores_equal": torch.equal(refit.scores, old["scores"]),
                    "refit_max_abs": float((refit.scores - old["scores"]).abs().max()),
                    "refit_maps_max_abs": float((refit.maps - old["maps"]).abs().max()),
                }
                report[key] = result
                print(key, result, flush=True)
    if args.compare:
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
