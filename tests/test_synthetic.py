"""The synthetic MVTec-layout data set: layout, masks, determinism, exact defect masks, argument checks."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metaad.data.synthetic import (
    CATEGORIES,
    DEFECT_TYPES,
    IMAGE_MODES,
    SURFACE_DEFECTS,
    draw_surface_defect,
    generate_image,
    generate_pair,
    make_synthetic_dataset,
)

SIZE = 48
COUNTS = {"n_train": 3, "n_test_good": 2, "n_test_per_defect": 2}
ALL_DEFECTS = [(c, d) for c in CATEGORIES for d in DEFECT_TYPES[c]]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), size=SIZE, seed=0, **COUNTS)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_file_counts(dataset: Path) -> None:
    assert sorted(p.name for p in dataset.iterdir()) == sorted(CATEGORIES)  # no temp folders left behind
    for category in CATEGORIES:
        folder = dataset / category
        assert sorted(p.name for p in (folder / "train" / "good").iterdir()) == [
            "000.png",
            "001.png",
            "002.png",
        ]
        assert sorted(p.name for p in (folder / "test").iterdir()) == sorted(
            ("good", *DEFECT_TYPES[category])
        )
        assert len(list((folder / "test" / "good").iterdir())) == 2
        assert sorted(p.name for p in (folder / "ground_truth").iterdir()) == sorted(DEFECT_TYPES[category])
        for defect in DEFECT_TYPES[category]:
            assert sorted(p.name for p in (folder / "test" / defect).iterdir()) == ["000.png", "001.png"]
            masks = sorted(p.name for p in (folder / "ground_truth" / defect).iterdir())
            assert masks == ["000_mask.png", "001_mask.png"]


def test_masks_binary_same_size_and_non_empty(dataset: Path) -> None:
    for category in CATEGORIES:
        for defect in DEFECT_TYPES[category]:
            for i in range(2):
                image = Image.open(dataset / category / "test" / defect / f"{i:03d}.png")
                mask_file = Image.open(dataset / category / "ground_truth" / defect / f"{i:03d}_mask.png")
                assert mask_file.mode == "L"
                assert mask_file.size == image.size == (SIZE, SIZE)
                mask = np.asarray(mask_file)
                assert set(np.unique(mask).tolist()) == {0, 255}, (category, defect, i)


def test_image_modes_and_grayscale(dataset: Path) -> None:
    assert "L" in IMAGE_MODES.values() and "RGB" in IMAGE_MODES.values()
    for category in CATEGORIES:
        for path in (dataset / category).rglob("[0-9][0-9][0-9].png"):
            assert Image.open(path).mode == IMAGE_MODES[category], path
        image, mask = generate_image(category, 0, size=SIZE)
        expected = (SIZE, SIZE) if IMAGE_MODES[category] == "L" else (SIZE, SIZE, 3)
        assert image.shape == expected and image.dtype == np.uint8
        assert mask.shape == (SIZE, SIZE) and mask.dtype == bool and not mask.any()


def test_files_match_generate_image(dataset: Path) -> None:
    for category in ("weave", "board"):
        train = np.asarray(Image.open(dataset / category / "train" / "good" / "001.png"))
        np.testing.assert_array_equal(train, generate_image(category, 1, size=SIZE)[0])
        good = np.asarray(Image.open(dataset / category / "test" / "good" / "001.png"))
        np.testing.assert_array_equal(good, generate_image(category, 1, size=SIZE, split="test")[0])
        defect = DEFECT_TYPES[category][-1]
        image, mask = generate_image(category, 1, defect, size=SIZE)
        np.testing.assert_array_equal(
            np.asarray(Image.open(dataset / category / "test" / defect / "001.png")), image
        )
        saved = np.asarray(Image.open(dataset / category / "ground_truth" / defect / "001_mask.png"))
        np.testing.assert_array_equal(saved > 0, mask)


def test_same_seed_identical_bytes_other_seed_differs(dataset: Path, tmp_path: Path) -> None:
    again = make_synthetic_dataset(tmp_path / "again", size=SIZE, seed=0, **COUNTS)
    assert _files(again) == _files(dataset)
    other = make_synthetic_dataset(tmp_path / "other", categories=["cap"], size=SIZE, seed=1, **COUNTS)
    first, second = _files(dataset / "cap"), _files(other / "cap")
    assert first.keys() == second.keys()
    assert all(first[k] != second[k] for k in first if k.endswith("0.png"))


def test_counts_do_not_reshuffle_images(dataset: Path, tmp_path: Path) -> None:
    bigger = make_synthetic_dataset(
        tmp_path, categories="grain", n_train=5, n_test_good=1, n_test_per_defect=3, size=SIZE
    )
    before, after = _files(dataset / "grain"), _files(bigger / "grain")
    shared = set(before) & set(after)
    assert "train/good/002.png" in shared and "test/crack/001.png" in shared
    assert all(before[k] == after[k] for k in shared)


def test_images_differ_across_categories_indices_and_splits() -> None:
    grain, leather = generate_image("grain", 0, size=SIZE)[0], generate_image("leather", 0, size=SIZE)[0]
    assert np.abs(grain.astype(int) - leather.astype(int)).mean() > 10
    for category in CATEGORIES:
        a = generate_image(category, 0, size=SIZE)[0].astype(int)
        b = generate_image(category, 1, size=SIZE)[0].astype(int)
        c = generate_image(category, 0, size=SIZE, split="test")[0].astype(int)
        assert np.abs(a - b).mean() > 2 and np.abs(a - c).mean() > 2, category  # good images vary


@pytest.mark.parametrize(("category", "defect"), ALL_DEFECTS)
def test_defect_changes_exactly_the_masked_pixels(category: str, defect: str) -> None:
    for index in range(3):
        clean, defective, mask = generate_pair(category, index, defect, size=64)
        assert clean.shape == defective.shape and mask.shape == (64, 64)
        assert mask.sum() >= 3
        diff = np.abs(defective.astype(int) - clean.astype(int))
        diff = diff.max(-1) if diff.ndim == 3 else diff
        assert not diff[~mask].any(), "pixels outside the mask must equal the clean image"
        assert diff[mask].mean() > 20, f"{category}/{defect} #{index} barely visible: {diff[mask].mean():.1f}"
        image, same_mask = generate_image(category, index, defect, size=64)
        np.testing.assert_array_equal(image, defective)
        np.testing.assert_array_equal(same_mask, mask)
        assert not np.array_equal(clean, generate_image(category, index, size=64, split="test")[0])


def test_small_category_is_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    make_synthetic_dataset(
        tmp_path, categories="board", n_train=20, n_test_good=5, n_test_per_defect=2, size=64
    )
    assert time.perf_counter() - start < 5.0  # about 0.3 s when the machine is idle


def test_overwrite_refused_then_allowed(tmp_path: Path) -> None:
    make_synthetic_dataset(tmp_path, categories="cap", size=32, n_train=1, n_test_good=1, n_test_per_defect=1)
    (tmp_path / "cap" / "extra.txt").write_text("stale")
    with pytest.raises(FileExistsError, match=r"cap.*overwrite=True"):
        make_synthetic_dataset(tmp_path, categories="cap", size=32)
    make_synthetic_dataset(
        tmp_path, categories=["cap"], size=32, n_train=2, n_test_good=1, n_test_per_defect=1, overwrite=True
    )
    assert not (tmp_path / "cap" / "extra.txt").exists()
    assert len(list((tmp_path / "cap" / "train" / "good").iterdir())) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["cap"]  # temp and old folders removed
    (tmp_path / "screw").mkdir()  # an empty folder is fine
    make_synthetic_dataset(
        tmp_path, categories="screw", size=32, n_train=1, n_test_good=1, n_test_per_defect=1
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"categories": ["cap", "bottle"]}, r"'bottle'.*weave, grain, leather, cap, screw, board"),
        ({"categories": []}, "at least one"),
        ({"n_train": 0}, "n_train must be an integer >= 1"),
        ({"n_test_good": -1}, "n_test_good"),
        ({"n_test_per_defect": 0}, "n_test_per_defect"),
        ({"size": 0}, "size must be an integer >= 32"),
        ({"size": 2.5}, "size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_dataset_argument_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_synthetic_dataset(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


def test_generate_image_argument_errors() -> None:
    with pytest.raises(ValueError, match="valid categories: weave"):
        generate_image("bottle", 0)
    with pytest.raises(ValueError, match=r"'crack'.*valid defects: scratch, stain, missing_part"):
        generate_image("screw", 0, "crack")
    with pytest.raises(ValueError, match="index"):
        generate_image("cap", -1, size=32)
    with pytest.raises(ValueError, match="size"):
        generate_image("cap", 0, size=8)
    with pytest.raises(ValueError, match="'test' split"):
        generate_image("cap", 0, "hole", split="train")
    with pytest.raises(ValueError, match="split must be"):
        generate_image("cap", 0, split="val")


@pytest.mark.parametrize("defect", SURFACE_DEFECTS)
def test_surface_defect_on_a_real_image_changes_exactly_its_mask(defect):
    rng = np.random.default_rng(0)
    image = np.clip(0.4 + 0.05 * rng.standard_normal((64, 64, 3)), 0, 1).astype(np.float32)
    defective, mask = draw_surface_defect(image, defect, np.random.default_rng(1))
    assert defective.shape == image.shape and mask.shape == (64, 64) and mask.dtype == bool
    assert 0 < mask.sum() < 0.5 * mask.size
    changed = np.abs(defective - image).max(-1) > 0
    assert not changed[~mask].any()
    assert changed[mask].mean() > 0.9
    wide = np.concatenate([image, image[:, :40]], axis=1)[:40]  # (40, 104, 3): drawn as it is, not squashed
    defective, mask = draw_surface_defect(wide, defect, np.random.default_rng(2))
    assert defective.shape == wide.shape and mask.shape == (40, 104) and mask.any()
    assert not (np.abs(defective - wide).max(-1) > 0)[~mask].any()
    with pytest.raises(ValueError, match="at least 8x8"):
        draw_surface_defect(image[:4], defect, rng)
