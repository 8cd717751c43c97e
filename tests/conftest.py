"""Shared fixtures: tiny synthetic MVTec-layout data, and the real data folder when it is present."""

from __future__ import annotations

from pathlib import Path

import metaad  # noqa: F401  (before torch: OpenMP passive waiting, so faiss keeps its threads)

# isort: split
import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic category at 64 px: 16 train, 6 good test, 3 per defect type."""
    from metaad.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(
        root, categories=["weave"], n_train=16, n_test_good=6, n_test_per_defect=3, size=64
    )
    return root


def shared_data(name: str) -> Path:
    """A folder of ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data not available: {path} is absent (needs ../shared/data beside the repo)")
    return path


def assert_resume_is_bit_identical(build, images: torch.Tensor, tmp_path: Path) -> None:
    """A method built by ``build()``, its fit interrupted after the first epoch's checkpoint and resumed, ends
    with the weights of an uninterrupted fit (the shared loop's promise, checked per method)."""
    from metaad.io import read_json

    straight = build().fit(images, workdir=tmp_path / "straight")

    class StopTrainingError(Exception):
        pass

    def interrupt(epoch, model):
        raise StopTrainingError

    with pytest.raises(StopTrainingError):
        build().fit(images, workdir=tmp_path / "resumed", on_epoch_end=interrupt)
    assert read_json(tmp_path / "resumed" / "checkpoint.json")["epoch"] == 1
    resumed = build().fit(images, workdir=tmp_path / "resumed", resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
