"""Tiling as an option of the run (``metaad fit --tile``): fit on tiles, and test, predict, export and serve
through the same tiles, as recorded in ``config.json``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metaad.data.tiles import TiledDataset, Tiling, tile_starts, tiled_image_size

SIDE, TILE = 256, 64  # images loaded at 256 px, tiles of 64 px: the tiny preset's 64 px working size


def cli(*args) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "metaad.cli.main", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_tiles_cover_the_image_with_the_overlap_asked():
    tiling = Tiling(64, 0.25)
    boxes = tiling.boxes(200, 130)
    covered = np.zeros((200, 130), int)
    for y, x, h, w in boxes:
        assert (h, w) == (64, 64)
        covered[y : y + h, x : x + w] += 1
    assert covered.min() >= 1
    assert tile_starts(200, 64, 0.25)[-1] == 200 - 64
    steps = np.diff(tile_starts(200, 64, 0.25))
    assert steps.max() <= 48  # at least a quarter of a tile shared with the next
    assert tiling.boxes(40, 300)[0][2] == 40  # a side shorter than the tile is one tile of that side


@pytest.mark.parametrize(("tile", "overlap", "phrase"), [(4, 0.25, "at least 8"), (64, 1.0, "[0, 1)"),
                                                         ("64", 0.25, "integer")])
def test_a_bad_tiling_is_refused(tile, overlap, phrase):
    with pytest.raises(ValueError, match=phrase.replace("[", r"\[").replace(")", r"\)")):
        Tiling(tile, overlap)


def test_tiled_dataset_yields_every_tile_of_every_image_in_order():
    images = torch.rand(2, 3, 128, 128)
    samples = [{"image": image, "mask": torch.zeros(1, 128, 128), "path": f"{i}.png"} for i, image in enumerate(images)]
    tiled = TiledDataset(samples, Tiling(64, 0.0), 128)
    assert len(tiled) == 8
    fifth = tiled[5]  # second image, second tile (top right)
    assert fifth["path"] == "1.png"
    assert torch.equal(fifth["image"], images[1][:, 0:64, 64:128])
    with pytest.raises(IndexError):
        tiled[8]


def test_default_tiled_size_is_the_median_long_side_capped(tmp_path):
    paths = []
    for k, (w, h) in enumerate([(300, 200), (500, 400), (2000, 1500)]):
        paths.append(tmp_path / f"{k}.png")
        Image.new("L", (w, h)).save(paths[-1])
    assert tiled_image_size(paths, Tiling(64)) == 500
    assert tiled_image_size(paths[2:], Tiling(64)) == 1024


def _texture(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    phase = rng.uniform(0, 2 * np.pi, 2)
    pattern = 0.5 + 0.2 * np.sin(2 * np.pi * x / 16 + phase[0]) * np.sin(2 * np.pi * y / 16 + phase[1])
    return (np.clip(pattern + rng.normal(0, 0.02, pattern.shape), 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def small_defects(tmp_path_factory) -> Path:
    """An MVTec-layout category of 256 px textures whose defects are 6 x 6 px dark spots: about 1.5 px at the
    tiny preset's 64 px working size without tiles."""
    root = tmp_path_factory.mktemp("tiling") / "data"
    for folder in ("texture/train/good", "texture/test/good", "texture/test/spot", "texture/ground_truth/spot"):
        (root / folder).mkdir(parents=True)
    for k in range(12):
        Image.fromarray(_texture(k)).save(root / f"texture/train/good/{k:02d}.png")
    rng = np.random.default_rng(0)
    for k in range(6):
        Image.fromarray(_texture(100 + k)).save(root / f"texture/test/good/{k:02d}.png")
        image, mask = _texture(200 + k), np.zeros((SIDE, SIDE), np.uint8)
        cy, cx = rng.integers(20, SIDE - 20, 2)
        image[cy - 3 : cy + 3, cx - 3 : cx + 3] = 40
        mask[cy - 3 : cy + 3, cx - 3 : cx + 3] = 255
        Image.fromarray(image).save(root / f"texture/test/spot/{k:02d}.png")
        Image.fromarray(mask).save(root / f"texture/ground_truth/spot/{k:02d}_mask.png")
    return root


@pytest.fixture(scope="module")
def tiled_run(small_defects, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiled") / "run"
    result = cli("fit", "--data", small_defects, "--category", "texture", "--preset", "tiny", "--image-size", SIDE,
                 "--tile", TILE, "--tile-overlap", "0.25", "--calibration-fraction", "0.25", "--out", out,
                 "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_fit_records_the_tiling_and_trains_on_tiles(tiled_run):
    config = json.loads((tiled_run / "config.json").read_text())
    assert config["tiling"] == {"tile": TILE, "overlap": 0.25}
    assert config["image_size"] == SIDE
    assert config["n_train_tiles"] == config["n_train"] * 25  # 5 x 5 tiles of 64 px at 25 % overlap over 256 px


def test_tiles_find_defects_the_untiled_model_cannot_see(tiled_run, small_defects, tmp_path):
    tiled = json.loads((tiled_run / "metrics.json").read_text())
    untiled_out = tmp_path / "untiled"
    result = cli("fit", "--data", small_defects, "--category", "texture", "--preset", "tiny", "--image-size", SIDE,
                 "--calibration-fraction", "0.25", "--out", untiled_out, "--no-progress")
    assert result.returncode == 0, result.stderr
    untiled = json.loads((untiled_out / "metrics.json").read_text())
    assert tiled["image_auroc"] >= 0.9
    assert tiled["image_auroc"] > untiled["image_auroc"] + 0.1


def test_test_predict_and_export_tile_as_the_fit_did(tiled_run, small_defects, tmp_path):
    fitted = json.loads((tiled_run / "metrics.json").read_text())
    result = cli("test", "--run", tiled_run, "--out", tmp_path / "test", "--no-progress")
    assert result.returncode == 0, result.stderr
    tested = json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert tested["image_auroc"] == pytest.approx(fitted["image_auroc"])  # the same tiles, the same scores

    import metaad

    run = metaad.load_run(tiled_run)
    spot = small_defects / "texture/test/spot/00.png"
    result = run.predict(spot)[0]
    mask = np.asarray(Image.open(small_defects / "texture/ground_truth/spot/00_mask.png")) > 0
    peak = np.unravel_index(np.argmax(result.map), result.map.shape)
    centre = np.argwhere(mask).mean(0)
    assert np.abs(np.asarray(peak) - centre).max() < 12  # the map's peak is on the 6 px spot
    with pytest.raises(ValueError, match="fitted on 64 px tiles"):
        run.predict(spot, tile=128)

    from metaad.data.transforms import pil_to_tensor
    from metaad.deploy.export import export_run, onnx_session, run_onnx

    metadata = export_run(tiled_run, tmp_path / "model.onnx")
    assert json.loads(metadata["tiling"]) == {"tile": TILE, "overlap": 0.25}
    image = pil_to_tensor(Image.open(spot), SIDE)[None].numpy()
    scores, maps = run_onnx(onnx_session(tmp_path / "model.onnx"), image)
    assert scores[0] == pytest.approx(result.score, rel=1e-3)
    assert maps.shape == (1, SIDE, SIDE)


def test_fit_refuses_a_bad_tile_at_once(small_defects, tmp_path):
    result = cli("fit", "--data", small_defects, "--category", "texture", "--tile", "4", "--out", tmp_path / "r")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "tile must be an integer of at least 8 pixels" in result.stderr
