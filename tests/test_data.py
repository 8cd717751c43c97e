import numpy as np
import pytest
import torch
from PIL import Image

from metaad.data.datasets import (
    AnomalyDataset,
    DataError,
    folder_records,
    mtd_records,
    mvtec_records,
)
from metaad.data.transforms import exposure_variation, standardize_intensity


def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _mvtec(root, mask_size=(32, 32)):
    rng = np.random.default_rng(0)
    for i in range(3):
        _write(root / "cat" / "train" / "good" / f"{i:03d}.PNG", rng.integers(0, 255, (32, 32, 3), np.uint8))
    _write(root / "cat" / "test" / "good" / "000.jpg", rng.integers(0, 255, (32, 32), np.uint8))
    _write(root / "cat" / "test" / "scratch" / "000.bmp", rng.integers(0, 255, (32, 32, 3), np.uint8))
    mask = np.zeros(mask_size, np.uint8)
    mask[4:8, 4:8] = 255
    _write(root / "cat" / "ground_truth" / "scratch" / "000_mask.png", mask)


def test_mvtec_layout_reads_all_extensions_case_insensitively(tmp_path):
    _mvtec(tmp_path)
    train = mvtec_records(tmp_path, "cat", "train")
    test = mvtec_records(tmp_path, "cat", "test")
    assert len(train) == 3
    assert [(r.label, r.defect) for r in test] == [(0, "good"), (1, "scratch")]
    sample = AnomalyDataset(test, image_size=16)[1]
    assert sample["image"].shape == (3, 16, 16)  # grayscale and colour both become 3 channels
    assert sample["mask"].shape == (1, 16, 16) and sample["mask"].sum() == 4  # 4x4 of 32 px -> 2x2 of 16 px


def test_missing_mask_names_the_image(tmp_path):
    _mvtec(tmp_path)
    (tmp_path / "cat" / "ground_truth" / "scratch" / "000_mask.png").unlink()
    with pytest.raises(DataError, match=r"000\.bmp: defective test image has no mask"):
        mvtec_records(tmp_path, "cat", "test")


def test_mask_of_other_size_names_the_mask(tmp_path):
    _mvtec(tmp_path, mask_size=(16, 32))
    with pytest.raises(DataError, match=r"000_mask\.png: mask is 32x16"):
        AnomalyDataset(mvtec_records(tmp_path, "cat", "test"))


def test_truncated_image_raises_or_is_skipped_with_a_count(tmp_path):
    _mvtec(tmp_path)
    bad = tmp_path / "cat" / "train" / "good" / "001.PNG"
    bad.write_bytes(bad.read_bytes()[:60])
    records = mvtec_records(tmp_path, "cat", "train")
    with pytest.raises(DataError, match=r"001\.PNG: unreadable or truncated"):
        AnomalyDataset(records)[1]
    with pytest.warns(UserWarning, match="skipped 1 of 3"):
        dataset = AnomalyDataset(records, on_error="skip")
    assert len(dataset) == 2 and dataset.skipped[0][0] == bad


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "cat" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        mvtec_records(tmp_path, "cat", "train")
    with pytest.raises(DataError, match="category folder not found"):
        mvtec_records(tmp_path, "nope", "train")


def test_folder_dataset_splits_normals_and_matches_masks(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(10):
        _write(tmp_path / "ok" / f"n{i}.png", rng.integers(0, 255, (8, 8), np.uint8))
    _write(tmp_path / "bad" / "b0.png", rng.integers(0, 255, (8, 8), np.uint8))
    _write(tmp_path / "masks" / "b0_mask.png", np.full((8, 8), 255, np.uint8))
    train = folder_records(tmp_path / "ok", "train", seed=1)
    test = folder_records(tmp_path / "ok", "test", tmp_path / "bad", tmp_path / "masks", seed=1)
    assert len(train) == 8 and len(test) == 3
    assert {r.path for r in train}.isdisjoint(r.path for r in test)
    assert test[-1].mask_path == tmp_path / "masks" / "b0_mask.png"


def test_magnetic_tile_protocol(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(10):
        _write(tmp_path / "MT_Free" / "Imgs" / f"f{i}.jpg", rng.integers(0, 255, (20, 30), np.uint8))
        _write(tmp_path / "MT_Free" / "Imgs" / f"f{i}.png", np.zeros((20, 30), np.uint8))
    _write(tmp_path / "MT_Crack" / "Imgs" / "c0.jpg", rng.integers(0, 255, (20, 30), np.uint8))
    _write(tmp_path / "MT_Crack" / "Imgs" / "c0.png", np.full((20, 30), 255, np.uint8))
    train = mtd_records(tmp_path, "train", seed=0)
    test = mtd_records(tmp_path, "test", seed=0)
    assert len(train) == 8 and len(test) == 3  # 20% of 10 free images held out, plus the defect
    assert test[-1].defect == "crack" and test[-1].mask_path.suffix == ".png"
    assert {r.path for r in train}.isdisjoint(r.path for r in test)
    assert mtd_records(tmp_path, "test", seed=0) == test  # seeded
    assert mtd_records(tmp_path, "test", seed=1) != test


def test_real_magnetic_tile_split_sizes():
    from conftest import shared_data

    root = shared_data("mtd")
    assert len(mtd_records(root, "train")) == 762
    test = mtd_records(root, "test")
    assert len(test) == 582 and sum(r.label for r in test) == 392


def test_standardize_intensity_removes_exposure_and_contrast():
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.2
    darker = pixels * 0.4 + 0.05  # another shot: lower exposure and contrast
    out, out_darker = standardize_intensity(pixels), standardize_intensity(darker)
    assert torch.allclose(out, out_darker, atol=1e-4)
    restored = out
    assert torch.allclose(restored.mean((1, 2, 3)), torch.full((2,), 0.449), atol=1e-4)
    assert torch.allclose(restored.std((1, 2, 3)), torch.full((2,), 0.226), atol=1e-4)
    flat = standardize_intensity(torch.full((1, 3, 4, 4), 0.7))  # no spread: uniform grey, finite
    assert torch.allclose(flat, torch.full((1, 3, 4, 4), 0.449), atol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        standardize_intensity(torch.zeros(3, 4, 4))


def test_exposure_variation_is_the_coefficient_of_variation_of_mean_brightness():
    shots = torch.stack([torch.full((3, 4, 4), 0.2), torch.full((3, 4, 4), 0.6)])
    assert exposure_variation([shots[:1], shots[1:]]) == pytest.approx(0.5, abs=1e-5)  # std 0.2 / mean 0.4
    assert exposure_variation([torch.full((3, 3, 4, 4), 0.3)]) == pytest.approx(0.0, abs=1e-6)
