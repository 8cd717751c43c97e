"""Aspect-preserving resizing (``metaad fit --resize pad``): the model sees each image letterboxed, maps are
evaluated on the stretched grid of the masks and come back at the image's own size and aspect."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from metaad.data.datasets import AnomalyDataset, ImageRecord
from metaad.data.transforms import content_box, letterbox
from metaad.runs.scoring import Scorer
from metaad.types import AnomalyPrediction


def test_letterbox_keeps_the_aspect_and_centres_the_image():
    assert content_box(768, 576, 256) == (32, 0, 192, 256)  # landscape 4:3
    assert content_box(576, 768, 256) == (0, 32, 256, 192)  # portrait
    assert content_box(5000, 10, 64) == (31, 0, 1, 64)  # never thinner than a pixel
    image = np.zeros((60, 120), np.uint8)
    image[:, 60:] = 255  # right half white
    canvas, (y, x, h, w) = letterbox(Image.fromarray(image), 64)
    assert canvas.shape == (3, 64, 64) and (y, x, h, w) == (16, 0, 32, 64)
    assert canvas[:, :16].max() == 0 and canvas[:, 48:].max() == 0  # black bands above and below
    assert canvas[0, 32, 10] < 0.1 and canvas[0, 32, 54] > 0.9  # the halves stay halves: not stretched


class _Brightness(torch.nn.Module):
    """A stand-in model: the map is the image's first channel, the score its maximum."""

    def predict(self, images):
        return AnomalyPrediction(images[:, 0].flatten(1).amax(1), images[:, 0])


def test_a_letterboxed_map_comes_back_on_the_masks_grid(tmp_path):
    image = np.zeros((40, 80), np.uint8)
    image[10:20, 60:70] = 255  # a bright square in the right half
    mask = (image > 0).astype(np.uint8) * 255
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray(mask).save(tmp_path / "a_mask.png")
    record = ImageRecord(tmp_path / "a.png", 1, "spot", tmp_path / "a_mask.png")
    sample = AnomalyDataset([record], 32, resize="pad")[0]
    assert sample["content"].tolist() == [8, 0, 16, 32]
    prediction = Scorer(_Brightness(), 32).predict(sample["image"][None], sample["content"][None])
    assert prediction.maps.shape == (1, 32, 32)
    on = prediction.maps[0] > 0.5
    assert (on & (sample["mask"][0] > 0)).sum() >= 0.5 * (sample["mask"][0] > 0).sum()  # the map lies on the mask
    with pytest.raises(ValueError, match="resize must be one of stretch, pad"):
        AnomalyDataset([record], 32, resize="crop")


def test_fit_with_pad_records_it_and_predict_maps_at_the_image_size(synthetic_root, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "metaad.cli.main", "fit", "--data", synthetic_root, "--category", "weave",
               "--preset", "tiny", "--resize", "pad", "--out", out, "--no-progress"]
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["resize"] == "pad"
    import metaad

    wide = np.asarray(Image.open(synthetic_root / "weave/test/good/000.png").convert("L").resize((128, 48)))
    run = metaad.load_run(out)
    assert run.resize == "pad"
    result = run.predict(wide)[0]
    assert result.map.shape == (48, 128) and np.isfinite(result.score)
