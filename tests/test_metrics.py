"""metaad.metrics: hand-computed small cases, ties, agreement with sklearn and a brute-force PRO."""

from __future__ import annotations

import math
import time
import tracemalloc
from bisect import bisect

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from metaad.metrics import (
    PRO_FPR_LIMIT,
    aupro,
    evaluate,
    f1_max,
    image_auroc,
    pixel_auroc,
    pro_curve,
    roc_curve,
)
from metaad.metrics._ranking import _sort_carrying

# 1x4x4 hand case. Components (8-connected): A = {(0,0), (0,1), (1,0)} scores .9 .8 .3 and
# B = {(2,2), (3,3)} (diagonal neighbours) scores .7 .2; 11 negatives: .6 .5 .3 (tied with A) and eight 0s.
HAND_MASK = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.uint8)[None]
HAND_MAP = np.array(
    [[[0.9, 0.8, 0.6, 0.5], [0.3, 0.3, 0.0, 0.0], [0.0, 0.0, 0.7, 0.0], [0.0, 0.0, 0.0, 0.2]]]
)


def naive_pro_area(masks: np.ndarray, maps: np.ndarray, limit: float) -> float:
    """Brute force: one pass over the pixels per distinct threshold, reference-style integration."""
    regions = []
    for mask, amap in zip(masks, maps, strict=True):
        labelled, n = ndimage.label(mask != 0, structure=np.ones((3, 3)))
        regions += [amap[labelled == k] for k in range(1, n + 1)]
    negatives = maps[masks == 0]
    fpr, pro = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fpr.append(float(np.mean(negatives >= t)))
        pro.append(float(np.mean([np.mean(r >= t) for r in regions])))
    return reference_area(np.array(fpr), np.array(pro), limit)


def sorted_cumsum_pro_area(masks: np.ndarray, maps: np.ndarray, limit: float) -> float:
    """The MVTec AD reference approach: one argsort of all pixels, per-pixel FP and 1/|region| steps."""
    fp_step, pro_step, n_regions = np.zeros(maps.shape), np.zeros(maps.shape), 0
    for i, mask in enumerate(masks):
        labelled, n = ndimage.label(mask != 0, structure=np.ones((3, 3)))
        fp_step[i][labelled == 0] = 1.0
        for k in range(1, n + 1):
            pro_step[i][labelled == k] = 1.0 / np.sum(labelled == k)
        n_regions += n
    order = np.argsort(maps.ravel())[::-1]
    ranked = maps.ravel()[order]
    fpr = np.cumsum(fp_step.ravel()[order]) / fp_step.sum()
    pro = np.cumsum(pro_step.ravel()[order]) / n_regions
    last_of_tie = np.append(np.diff(ranked) != 0, True)
    return reference_area(np.r_[0.0, fpr[last_of_tie]], np.r_[0.0, pro[last_of_tie]], limit)


def reference_area(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area up to ``limit`` with linear interpolation there, normalised, as in the reference."""
    correction = 0.0
    if limit not in x:
        i = bisect(list(x), limit)
        y_lim = y[i - 1] + (y[i] - y[i - 1]) * (limit - x[i - 1]) / (x[i] - x[i - 1])
        correction = 0.5 * (y_lim + y[i - 1]) * (limit - x[i - 1])
    keep = x <= limit
    x, y = x[keep], y[keep]
    return (float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x))) + correction) / limit


def random_case(seed: int, n: int = 4, size: int = 12, levels: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """Masks with a few blobs (some images good) and quantised maps, so that ties are frequent."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(1, n):
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, size - 3, 2)
            h, w = rng.integers(1, 4, 2)
            masks[i, r : r + h, c : c + w] = 1
    maps = (rng.integers(0, levels, masks.shape) + 2 * masks * rng.integers(0, 3, masks.shape)) / levels
    return masks, maps


# --- PRO -----------------------------------------------------------------------------------------


def test_pro_curve_hand_computed() -> None:
    fpr, pro = pro_curve(HAND_MASK, HAND_MAP, 0.3)
    # Thresholds .9 .8 .7 climb to PRO (2/3 + 1/2) / 2 = 7/12 at FPR 0; .6 .5 are negatives only; .3 is a
    # tie of one negative and A's last pixel (diagonal step); .2 completes B; the curve is cut at 0.3.
    np.testing.assert_allclose(fpr, [0, 0, 2 / 11, 3 / 11, 3 / 11, 0.3])
    np.testing.assert_allclose(pro, [0, 7 / 12, 7 / 12, 3 / 4, 1, 1])
    # Area: 7/12 * 2/11 + (7/12 + 3/4) / 2 * 1/11 + 1 * (0.3 - 3/11) = 32/165; divided by 0.3.
    assert aupro(HAND_MASK, HAND_MAP) == pytest.approx(64 / 99, abs=1e-12)


def test_pro_uses_eight_connectivity() -> None:
    # With 4-connectivity B would be two components and PRO at threshold .7 would be (2/3 + 1 + 0) / 3.
    fpr, pro = pro_curve(HAND_MASK, HAND_MAP, 1.0)
    assert pro[1] == pytest.approx(7 / 12)
    assert fpr[-1] == 1.0 and pro[-1] == 1.0


def test_pro_weights_components_equally() -> None:
    masks = np.zeros((1, 8, 8), dtype=bool)
    masks[0, 1:4, 1:4] = True  # 9 pixels
    masks[0, 6, 6] = True  # 1 pixel
    maps = np.full((1, 8, 8), 0.5)
    big_found, small_found = maps.copy(), maps.copy()
    big_found[0, 1:4, 1:4], big_found[0, 6, 6] = 1.0, 0.0
    small_found[0, 1:4, 1:4], small_found[0, 6, 6] = 0.0, 1.0
    # Either way one of two components is found at FPR 0 and the other only at FPR 1: PRO 0.5 throughout.
    assert aupro(masks, big_found) == pytest.approx(0.5)
    assert aupro(masks, small_found) == pytest.approx(0.5)
    assert pixel_auroc(masks, big_found) != pytest.approx(pixel_auroc(masks, small_found))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0])
def test_aupro_matches_brute_force(seed: int, limit: float) -> None:
    masks, maps = random_case(seed)
    assert aupro(masks, maps, limit) == pytest.approx(naive_pro_area(masks, maps, limit), abs=1e-12)


@pytest.mark.parametrize("quantise", [False, True])
def test_aupro_matches_reference_on_larger_float32_case(quantise: bool) -> None:
    masks, _ = random_case(11, n=12, size=40)
    maps = np.random.default_rng(1).random(masks.shape).astype(np.float32) + 0.4 * masks
    if quantise:
        maps = np.round(maps * 20) / 20
    maps = maps.astype(np.float32)
    for limit in (0.02, 0.3):
        expected = sorted_cumsum_pro_area(masks, maps, limit)
        assert aupro(masks, maps, limit) == pytest.approx(expected, abs=1e-9)


def test_aupro_perfect_and_inverted() -> None:
    masks, _ = random_case(0)
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    assert aupro(masks, -masks.astype(float)) == pytest.approx(0.0)


def test_aupro_invariant_under_monotone_transform() -> None:
    masks, maps = random_case(3)
    base = aupro(masks, maps)
    assert aupro(masks, np.exp(3.0 * maps) - 7.0) == pytest.approx(base, abs=1e-12)
    assert aupro(masks, (maps * 10.0) ** 3) == pytest.approx(base, abs=1e-12)
    assert aupro(masks, maps.astype(np.float32)) == pytest.approx(base, abs=1e-12)


def test_float32_fast_path_matches_float64() -> None:
    # float32 maps take a packed-key sort; it must order negatives, -0.0/0.0 and infinities like argsort.
    masks, maps = random_case(9)
    signed = (maps - 0.5) * 4.0
    signed[0, 0, :3] = [-0.0, 0.0, -np.inf]
    signed[3, 0, :2] = [np.inf, -0.0]
    for limit in (0.1, 0.3, 1.0):
        expected = naive_pro_area(masks, signed, limit)
        assert aupro(masks, signed.astype(np.float32), limit) == pytest.approx(expected, abs=1e-12)
        assert aupro(masks, signed, limit) == pytest.approx(expected, abs=1e-12)
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(size=500), [0.0, -0.0, np.inf, -np.inf, 1e-40, -1e-40]])
    scores = scores.astype(np.float32)
    ids = np.arange(scores.size, dtype=np.uint32)
    values, carried = _sort_carrying(scores, ids)
    np.testing.assert_array_equal(values, np.sort(scores))
    np.testing.assert_array_equal(scores[carried], values)  # each id still sits with its own score


def test_pro_curve_ends_exactly_at_limit() -> None:
    masks, maps = random_case(1)
    for limit in (0.01, 0.3, 0.77):
        fpr, pro = pro_curve(masks, maps, limit)
        assert fpr[0] == 0.0 and fpr[-1] == limit
        assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)
        assert np.all((pro >= 0) & (pro <= 1))


def test_pro_errors() -> None:
    with pytest.raises(ValueError, match="no image has a defect"):
        aupro(np.zeros((2, 4, 4)), np.random.default_rng(0).random((2, 4, 4)))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(HAND_MASK, HAND_MAP, 0.0)


# --- AUROC, ROC curve, F1 ------------------------------------------------------------------------


def test_image_auroc_known_values() -> None:
    labels, scores = [0, 0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4, 0.5]
    assert image_auroc(labels, scores) == pytest.approx(5 / 6)  # positives beat 2 and 3 of 3 negatives
    assert image_auroc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]) == pytest.approx(3.5 / 4)  # one tie counts 1/2
    assert image_auroc([0, 0, 1, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert image_auroc([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8]) == 1.0
    assert image_auroc([0, 1, 0, 1], [0.9, 0.1, 0.8, 0.2]) == 0.0


def test_auroc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 300)
    scores = rng.integers(0, 10, 300) + labels * rng.integers(0, 4, 300)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    masks, maps = random_case(5, n=5, size=16)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    assert pixel_auroc(masks, masks) == 1.0 and pixel_auroc(masks, 1 - masks) == 0.0


def test_roc_curve_lies_on_sklearn_curve() -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 200)
    scores = rng.integers(0, 12, 200) + 3 * labels
    fpr, tpr, thresholds = roc_curve(labels, scores)
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(labels, scores, drop_intermediate=False)
    assert (fpr[0], tpr[0], thresholds[0]) == (0.0, 0.0, np.inf)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(thresholds) < 0)
    for f, t, th in zip(fpr[1:], tpr[1:], thresholds[1:], strict=True):
        at = np.flatnonzero(sk_thr == th)
        assert at.size == 1 and sk_fpr[at[0]] == pytest.approx(f) and sk_tpr[at[0]] == pytest.approx(t)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_f1_max_known_value_and_sklearn() -> None:
    # Threshold .5: F1 = 2*1 / (1 + 0 + 2) = 2/3; threshold .3: F1 = 2*2 / (2 + 1 + 2) = 0.8.
    assert f1_max([0, 0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4, 0.5]) == pytest.approx((0.8, 0.3))
    masks, maps = random_case(4)
    best, threshold = f1_max(masks, maps)  # pixel level, same function
    precision, recall, _ = precision_recall_curve(masks.ravel(), maps.ravel())
    with np.errstate(invalid="ignore", divide="ignore"):
        sk_best = np.nanmax(2 * precision * recall / (precision + recall))
    assert best == pytest.approx(sk_best, abs=1e-12)
    predicted = maps.ravel() >= threshold
    tp = np.sum(predicted & (masks.ravel() == 1))
    assert 2 * tp / (predicted.sum() + masks.sum()) == pytest.approx(best)
    with pytest.raises(ValueError, match="no sample is defective"):
        f1_max([0, 0], [0.1, 0.2])


# --- inputs and evaluate -------------------------------------------------------------------------


def test_single_class_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="every image is good"):
        image_auroc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="every image is defective"):
        evaluate([1, 1], [0.1, 0.2])


def test_input_validation_messages() -> None:
    expected = r"masks shape \(3, 64, 64\) does not match maps shape \(3, 32, 32\)"
    with pytest.raises(ValueError, match=expected):
        pixel_auroc(np.zeros((3, 64, 64)), np.zeros((3, 32, 32)))
    with pytest.raises(ValueError, match=r"scores contains 1 NaN value\(s\) \(first at index \(2,\)\)"):
        image_auroc([0, 1, 1], [0.1, 0.2, np.nan])
    with pytest.raises(ValueError, match="maps contains"):
        aupro(HAND_MASK, np.where(HAND_MASK, np.nan, HAND_MAP))
    with pytest.raises(ValueError, match=r"must have shape \(N, H, W\)"):
        pixel_auroc(np.zeros((2, 3, 4, 4)), np.zeros((2, 3, 4, 4)))
    with pytest.raises(ValueError, match="labels shape"):
        f1_max([0, 1], [0.1, 0.2, 0.3])


def test_torch_inputs_and_channel_axis() -> None:
    masks, maps = random_case(6)
    expected = evaluate(masks.any(axis=(1, 2)), maps.max(axis=(1, 2)), masks, maps)
    got = evaluate(
        torch.from_numpy(masks.any(axis=(1, 2))),
        torch.from_numpy(maps.max(axis=(1, 2))),
        torch.from_numpy(masks).float()[:, None],  # (N, 1, H, W) float {0, 1}, as metaad batches masks
        torch.from_numpy(maps).requires_grad_(),
    )
    assert got == pytest.approx(expected, abs=1e-12)
    assert aupro(torch.from_numpy(masks * 255), torch.from_numpy(maps)) == pytest.approx(aupro(masks, maps))


def test_evaluate_keys_and_values() -> None:
    masks, maps = random_case(8)
    labels = masks.any(axis=(1, 2))
    scores = maps.max(axis=(1, 2)) + labels
    result = evaluate(labels, scores, masks, maps)
    assert set(result) == {"image_auroc", "image_f1_max", "pixel_auroc", "pro", "pixel_f1_max"}
    assert result["image_auroc"] == 1.0 and result["image_f1_max"] == 1.0
    assert result["pixel_auroc"] == pytest.approx(pixel_auroc(masks, maps), abs=1e-12)
    assert result["pro"] == pytest.approx(aupro(masks, maps, PRO_FPR_LIMIT), abs=1e-12)
    assert result["pixel_f1_max"] == pytest.approx(f1_max(masks, maps)[0], abs=1e-12)
    assert set(evaluate(labels, scores)) == {"image_auroc", "image_f1_max"}


def test_evaluate_without_defect_pixels_gives_nan() -> None:
    maps = np.random.default_rng(0).random((3, 8, 8))
    result = evaluate([0, 1, 1], [0.1, 0.5, 0.7], np.zeros((3, 8, 8)), maps)
    assert result["image_auroc"] == 1.0
    assert all(math.isnan(result[k]) for k in ("pixel_auroc", "pro", "pixel_f1_max"))
    with pytest.raises(ValueError, match="maps is None"):
        evaluate([0, 1], [0.1, 0.2], masks=np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="hold 3 images but labels/scores hold 2"):
        evaluate([0, 1], [0.1, 0.2], np.zeros((3, 8, 8)), maps)


@pytest.mark.slow
def test_evaluate_1000_masks_of_256_time_and_memory() -> None:
    """1,000 maps of 256x256 (65.5M pixels): report time and extra memory, bounded at 2 GB."""
    rng = np.random.default_rng(0)
    n, size = 1000, 256
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n // 2, n):
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, size - 40, 2)
            h, w = rng.integers(2, 40, 2)
            masks[i, r : r + h, c : c + w] = 1
    maps = rng.random((n, size, size), dtype=np.float32)
    maps += masks * np.float32(0.6)
    maps[::2] = np.round(maps[::2], 3)  # ties in half of the maps
    labels = masks.any(axis=(1, 2))
    scores = maps.max(axis=(1, 2))
    tracemalloc.start()
    start = time.perf_counter()
    result = evaluate(labels, scores, masks, maps)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"evaluate {n}x{size}x{size}: {seconds:.1f} s, peak extra memory {peak / 2**30:.2f} GiB, {result}")
    assert peak < 2 * 2**30
    assert 0.5 < result["pro"] < 1.0 and 0.5 < result["pixel_auroc"] < 1.0
