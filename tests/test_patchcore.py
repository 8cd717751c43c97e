import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from metaad.components.coreset import greedy_coreset
from metaad.components.smoothing import gaussian_blur
from metaad.data.datasets import AnomalyDataset, mvtec_records
from metaad.data.transforms import EXPOSURE_VARIATION_LIMIT, exposure_variation
from metaad.io import load_tensors, read_json, save_tensors, write_json
from metaad.metrics import image_auroc
from metaad.models import create_model
from metaad.models.patchcore import PatchCore
from metaad.models.persistence import load_model, save_model
from metaad.runs.fit import loading_size
from metaad.types import NotFittedError


def _exact_greedy(points: np.ndarray, n: int, start: int) -> list[int]:
    chosen = [start]
    dist = ((points - points[start]) ** 2).sum(1)
    for _ in range(n - 1):
        nxt = int(dist.argmax())
        chosen.append(nxt)
        dist = np.minimum(dist, ((points - points[nxt]) ** 2).sum(1))
    return sorted(chosen)


def test_greedy_coreset_matches_a_plain_implementation():
    points = torch.randn(300, 5, generator=torch.Generator().manual_seed(3))
    selected = greedy_coreset(points, 20, shards=1, seed=0)
    start = int(torch.randint(300, (1,), generator=_generator_after_permutation(300, 0)).item())
    start_id = int(torch.randperm(300, generator=torch.Generator().manual_seed(0))[start])
    assert selected.tolist() == _exact_greedy(points.numpy(), 20, start_id)


def _generator_after_permutation(n: int, seed: int) -> torch.Generator:
    generator = torch.Generator().manual_seed(seed)
    torch.randperm(n, generator=generator)
    return generator


def test_sharded_coreset_covers_points_nearly_as_well_as_exact():
    points = torch.randn(4000, 8, generator=torch.Generator().manual_seed(1))

    def radius(idx):
        return torch.cdist(points, points[idx]).min(dim=1).values.max().item()

    exact = greedy_coreset(points, 200, shards=1)
    sharded = greedy_coreset(points, 200, shards=8)
    assert len(set(sharded.tolist())) == 200
    random = torch.randperm(4000, generator=torch.Generator().manual_seed(0))[:200]
    assert radius(exact) <= radius(sharded) < radius(random)
    assert radius(sharded) < 1.5 * radius(exact)


def test_gaussian_blur_preserves_mass_and_smooths():
    impulse = torch.zeros(1, 1, 41, 41)
    impulse[0, 0, 20, 20] = 1.0
    blurred = gaussian_blur(impulse, sigma=4.0)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5)
    profile = blurred[0, 0, 20]
    # a discrete Gaussian of sigma 4: value at offset 4 is exp(-0.5) of the peak
    assert (profile[24] / profile[20]).item() == pytest.approx(math.exp(-0.5), rel=2e-2)


@pytest.fixture(scope="module")
def fitted(synthetic_root):
    train = AnomalyDataset(mvtec_records(synthetic_root, "weave", "train"), image_size=64)
    test = AnomalyDataset(mvtec_records(synthetic_root, "weave", "test"), image_size=64)
    model = PatchCore(image_size=64, coreset_ratio=0.25, search="exact")
    model.fit(DataLoader(train, batch_size=8), progress=False)
    batch = next(iter(DataLoader(test, batch_size=len(test))))
    return model, batch


def test_patchcore_separates_synthetic_defects_and_localises_them(fitted):
    model, batch = fitted
    prediction = model.predict(batch["image"])
    assert prediction.scores.shape == (len(batch["label"]),)
    assert prediction.maps.shape == (len(batch["label"]), 64, 64)
    assert image_auroc(batch["label"].numpy(), prediction.scores.numpy()) > 0.9
    masks = batch["mask"][:, 0] > 0
    inside = prediction.maps[masks].mean()
    outside = prediction.maps[~masks].mean()
    assert inside > outside
    assert model.memory_bank.shape[0] == round(16 * 8 * 8 * 0.25)


def test_saved_and_loaded_model_gives_identical_scores(fitted, tmp_path):
    model, batch = fitted
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    before, after = model.predict(batch["image"]), loaded.predict(batch["image"])
    assert torch.equal(before.scores, after.scores) and torch.equal(before.maps, after.maps)


def test_map_image_score_is_the_maximum_of_the_map_and_still_separates(fitted):
    model, batch = fitted
    model.image_score = "map"
    try:
        prediction = model.predict(batch["image"])
    finally:
        model.image_score = "patch"
    assert torch.equal(prediction.scores, prediction.maps.flatten(1).amax(1))
    assert image_auroc(batch["label"].numpy(), prediction.scores.numpy()) > 0.9
    with pytest.raises(ValueError, match="image_score"):
        PatchCore(image_score="mean")


def test_ivf_search_is_stored_and_close_to_exact(synthetic_root, tmp_path):
    train = AnomalyDataset(mvtec_records(synthetic_root, "weave", "train"), image_size=64)
    images = torch.stack([train[i]["image"] for i in range(len(train))])
    # num_neighbors=1: the image score is the largest nearest-neighbour distance, which an approximate search
    # can only overestimate (eq. 7's re-weighting depends on which neighbour is found and has no such bound)
    model = PatchCore(image_size=64, coreset_ratio=1.0, ivf_min_bank=100, nprobe=8, num_neighbors=1)
    model.fit(images, progress=False)
    assert model.ivf_centroids.shape[0] == int(4 * math.sqrt(model.memory_bank.shape[0]))
    exact = PatchCore(image_size=64, coreset_ratio=1.0, search="exact", num_neighbors=1).fit(images, progress=False)
    noise = torch.randn(images[:4].shape, generator=torch.Generator().manual_seed(0))
    probe = images[:4] + 0.3 * noise
    approx_scores, exact_scores = model.predict(probe).scores, exact.predict(probe).scores
    assert torch.all(approx_scores >= exact_scores - 1e-4)  # an approximate neighbour is never nearer
    assert torch.allclose(approx_scores, exact_scores, rtol=0.1)
    save_model(model, tmp_path)
    assert torch.equal(load_model(tmp_path).predict(probe).scores, approx_scores)


def test_unfitted_model_says_so():
    with pytest.raises(NotFittedError, match="not fitted"):
        PatchCore().predict(torch.zeros(1, 3, 64, 64))


def test_border_padding_keeps_the_grid_and_reduces_zero_padding_artefacts():
    """On a flat grey image every patch should look alike; the backbone's zero padding makes border patches
    differ, and reflected border padding must cut that spread while returning the same feature grid."""
    flat = torch.full((1, 3, 128, 128), 0.5)

    def spread(model: PatchCore) -> tuple[torch.Size, float]:
        model.feature_extractor.load_weights()  # what fit does first
        features = model.embed(flat)[0]
        return features.shape, float((features - features.mean((1, 2), keepdim=True)).norm(dim=0).max())

    plain_shape, plain_spread = spread(PatchCore(image_size=None, border_padding=0))
    padded_shape, padded_spread = spread(PatchCore(image_size=None, border_padding=32))
    assert padded_shape == plain_shape == (152, 16, 16)
    assert padded_spread < 0.6 * plain_spread
    with pytest.raises(ValueError, match="multiple of the deepest stride 16"):
        PatchCore(border_padding=8)


def _reexposed(images: torch.Tensor, gain: float, offset: float) -> torch.Tensor:
    return images * gain + offset


def test_auto_standardization_follows_the_training_exposure_and_makes_scores_exposure_invariant(synthetic_root):
    train = AnomalyDataset(mvtec_records(synthetic_root, "weave", "train"), image_size=64)
    images = torch.stack([train[i]["image"] for i in range(len(train))])
    gains = torch.linspace(0.5, 1.2, len(images)).view(-1, 1, 1, 1)  # shots of varying exposure
    varied = images * gains
    steady = PatchCore(image_size=64, coreset_ratio=0.5, search="exact").fit(images, progress=False)
    assert float(steady.preprocess.exposure_variation) < EXPOSURE_VARIATION_LIMIT
    assert not steady.preprocess.standardizing
    adaptive = PatchCore(image_size=64, coreset_ratio=0.5, search="exact")
    adaptive.fit(iter([varied]), progress=False)  # a one-shot iterable
    assert float(adaptive.preprocess.exposure_variation) == pytest.approx(exposure_variation([varied]))
    assert float(adaptive.preprocess.exposure_variation) > EXPOSURE_VARIATION_LIMIT
    assert adaptive.preprocess.standardizing
    probe = images[:3]
    darker = _reexposed(probe, 0.6, 0.02)
    assert torch.allclose(adaptive.predict(darker).scores, adaptive.predict(probe).scores, rtol=1e-3)
    assert not torch.allclose(steady.predict(darker).scores, steady.predict(probe).scores, rtol=0.05)
    with pytest.raises(ValueError, match="standardize_images"):
        PatchCore(standardize_images=True)


def test_model_saved_before_standardization_loads_with_the_settings_it_was_fitted_with(fitted, tmp_path):
    """A save without ``image_size``, ``standardize_images``, ``border_padding`` and the exposure buffer (metaad
    before they existed) must load as it was fitted, not with today's defaults."""
    model, _ = fitted
    save_model(model, tmp_path)
    config = read_json(tmp_path / "model.json")
    for key in ("image_size", "standardize_images", "border_padding"):
        del config["params"][key]
    write_json(tmp_path / "model.json", config)
    state = load_tensors(tmp_path / "model.safetensors")
    del state["preprocess.exposure_variation"]
    save_tensors(tmp_path / "model.safetensors", state)
    loaded = load_model(tmp_path)
    assert loaded.standardize_images == "never" and loaded.border_padding == 0
    assert not loaded.preprocess.standardizing
    assert loaded.image_size is None  # it took its images as they came


def test_a_save_with_the_exposure_buffer_of_its_old_name_loads_it(fitted, tmp_path):
    """metaad kept ``exposure_variation`` on the method itself before the preprocessing module held it."""
    model, batch = fitted
    model.preprocess.exposure_variation.fill_(0.25)  # "auto" standardises above 0.1
    try:
        expected = model.predict(batch["image"][:4])
        save_model(model, tmp_path)
    finally:
        model.preprocess.exposure_variation.fill_(float("nan"))
    state = load_tensors(tmp_path / "model.safetensors")
    state["exposure_variation"] = state.pop("preprocess.exposure_variation")
    save_tensors(tmp_path / "model.safetensors", state)
    loaded = load_model(tmp_path)
    assert float(loaded.preprocess.exposure_variation) == 0.25 and loaded.preprocess.standardizing
    assert torch.equal(loaded.predict(batch["image"][:4]).scores, expected.scores)


def test_backbone_weights_are_read_by_fit_once_and_never_by_load_model(fitted, tmp_path, monkeypatch):
    import metaad.backbones.registry as registry

    reads = []
    original = registry.load_pretrained
    monkeypatch.setattr(registry, "load_pretrained", lambda *a, **k: reads.append(a) or original(*a, **k))
    model, batch = fitted
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    assert reads == []  # the frozen backbone's weights come from the state dict
    assert torch.equal(loaded.predict(batch["image"]).scores, model.predict(batch["image"]).scores)
    PatchCore(image_size=64, coreset_ratio=0.25, search="exact").fit(batch["image"][:4])
    assert len(reads) == 1


def test_export_forward_is_predict_with_an_exact_search(fitted):
    """Eq. 7 is one function; the export path's exact search in tensor operations agrees with faiss's."""
    model, batch = fitted
    images = batch["image"][:6]
    scores, maps = model.export_forward(images)
    prediction = model.predict(images)
    torch.testing.assert_close(scores, prediction.scores, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(maps, prediction.maps, rtol=1e-4, atol=1e-4)


def test_working_size_resizes_any_input_and_returns_maps_at_the_input_size(fitted):
    """``image_size`` is the side the backbone sees: a larger input gives the same patch grid, the scores of
    the input resized to the working size, and a map of the input's own size."""
    model, batch = fitted
    large = F.interpolate(batch["image"][:6], size=(128, 128), mode="bilinear", align_corners=False)
    resized = F.interpolate(large, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
    assert model.embed(large).shape == (6, 152, 8, 8)
    from_large, from_resized = model.predict(large), model.predict(resized)
    assert from_large.maps.shape == (6, 128, 128) and from_resized.maps.shape == (6, 64, 64)
    assert torch.equal(from_large.scores, from_resized.scores)
    with pytest.raises(ValueError, match="image_size"):
        PatchCore(image_size=16)


def test_images_are_loaded_at_the_working_size_when_it_exceeds_the_papers_256():
    assert loading_size(PatchCore()) == 256  # the papers' preprocessing
    assert loading_size(PatchCore(image_size=320)) == 320  # resized once, straight to the working size
    assert loading_size(PatchCore(image_size=128)) == 256  # downsized inside the model, evaluated at 256
    assert loading_size(PatchCore(image_size=None)) == 256
    assert loading_size(create_model("patchcore", "paper", image_size=320), 96) == 96  # an explicit size wins


@pytest.fixture(scope="module")
def weave_images(synthetic_root):
    train = AnomalyDataset(mvtec_records(synthetic_root, "weave", "train"), image_size=64)
    return torch.stack([train[i]["image"] for i in range(len(train))])


def test_out_of_fold_score_is_the_score_of_a_fit_without_the_images_fold(weave_images):
    """Each fold's bank is the bank that a fit on the other folds alone builds (same coreset, same seed), so an
    image's out-of-fold score and map are exactly what that model predicts for it, in the input's order
    (batch_size=1: the backbone sees each image alone in both)."""
    settings = {"coreset_ratio": 0.25, "batch_size": 1, "out_of_fold_folds": 4}
    model = create_model("patchcore", "tiny", **settings).fit(weave_images)
    assert not model.preprocess.standardizing  # the one setting the fit decides from all images: not at play
    result = model.out_of_fold(weave_images)
    folds = model.folds(len(weave_images))
    assert result.scores.shape == (16,) and result.maps.shape == (16, 64, 64)
    assert sorted(np.bincount(folds).tolist()) == [4, 4, 4, 4]
    for fold in (0, 3):
        held_out = torch.from_numpy(folds == fold)
        without = create_model("patchcore", "tiny", **settings).fit(weave_images[~held_out])
        expected = without.predict(weave_images[held_out])
        assert torch.equal(result.scores[held_out], expected.scores)
        assert torch.equal(result.maps[held_out], expected.maps)


def test_out_of_fold_scores_are_not_below_in_bank_scores(weave_images):
    whole = create_model("patchcore", "tiny", coreset_ratio=1.0, out_of_fold_folds=4).fit(weave_images)
    in_bank, out_of_fold = whole.predict(weave_images), whole.out_of_fold(weave_images)
    assert float(in_bank.scores.max()) == 0.0  # every patch is in the bank
    assert torch.all(out_of_fold.scores > 0)
    assert torch.all(out_of_fold.maps >= in_bank.maps)  # a fold's bank is a part of the whole bank
    coreset = create_model("patchcore", "tiny", coreset_ratio=0.25, out_of_fold_folds=4).fit(weave_images)
    assert coreset.out_of_fold(weave_images).scores.mean() > coreset.predict(weave_images).scores.mean()


def test_own_entry_exclusion_is_leave_one_out_when_the_bank_keeps_every_patch(weave_images):
    """``out_of_fold_folds=0`` leaves an image's own entries out of the fitted bank: without a coreset that is
    the bank of the other images, as one fold per image builds it; with one, the coreset is what differs."""
    one_per_image = create_model("patchcore", "tiny", coreset_ratio=1.0, out_of_fold_folds=16).fit(weave_images)
    excluding = create_model("patchcore", "tiny", coreset_ratio=1.0, out_of_fold_folds=0).fit(weave_images)
    expected, got = one_per_image.out_of_fold(weave_images), excluding.out_of_fold(weave_images)
    torch.testing.assert_close(got.scores, expected.scores, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got.maps, expected.maps, rtol=1e-5, atol=1e-4)


def test_out_of_fold_refuses_other_images_a_loaded_model_and_a_single_fold(weave_images, tmp_path):
    model = create_model("patchcore", "tiny", coreset_ratio=0.25, out_of_fold_folds=4).fit(weave_images)
    with pytest.raises(ValueError, match="got 15 images; the bank was built from 16"):
        model.out_of_fold(weave_images[:15])
    with pytest.raises(ValueError, match="more images than the 16"):
        model.out_of_fold(torch.cat([weave_images, weave_images[:1]]))
    save_model(model, tmp_path)
    with pytest.raises(NotFittedError, match="not a loaded model"):
        load_model(tmp_path).out_of_fold(weave_images)
    with pytest.raises(NotFittedError):
        PatchCore().out_of_fold(weave_images)
    for folds in (0, 4):
        one = create_model("patchcore", "tiny", out_of_fold_folds=folds).fit(weave_images[:1])
        with pytest.raises(ValueError, match="at least 2 fitted images"):
            one.out_of_fold(weave_images[:1])
    with pytest.raises(ValueError, match="out_of_fold_folds"):
        PatchCore(out_of_fold_folds=1)
