"""Tests of patchcore.metrics against hand-computed values and slow reference implementations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from patchcore.evaluation.metrics import (
    SaturationSpec,
    au_pro,
    au_spro,
    compute_metrics,
    f1_max,
    image_auroc,
    pixel_auroc,
    pro_curve,
    spro_curve,
    trapezoid_area_to_limit,
)

# ----------------------------------------------------------------------------------------------------------
# Slow, obviously-correct references (one Python iteration per threshold)
# ----------------------------------------------------------------------------------------------------------


def _dedupe(points: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    kept = [points[0]]
    for p in points[1:]:
        if not np.allclose(p, kept[-1], rtol=0, atol=1e-12):
            kept.append(p)
    arr = np.array(kept)
    return arr[:, 0], arr[:, 1]


def reference_pro_curve(masks, maps):
    regions = []
    for mask, amap in zip(masks, maps, strict=True):
        lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(amap, lab == k) for k in range(1, n + 1)]
    num_neg = sum(int((~m.astype(bool)).sum()) for m in masks)
    points = [(0.0, 0.0)]
    for t in np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]:
        fp = sum(int(((a >= t) & ~m.astype(bool)).sum()) for m, a in zip(masks, maps, strict=True))
        pro = np.mean([((a >= t) & r).sum() / r.sum() for a, r in regions])
        points.append((fp / num_neg, pro))
    return _dedupe(points)


def reference_spro_curve(maps, channel_masks, saturations):
    negatives, channels = [], []
    for amap, chans, sats in zip(maps, channel_masks, saturations, strict=True):
        union = np.zeros(amap.shape, dtype=bool)
        for g, spec in zip(chans, sats, strict=True):
            union |= g
            size = int(g.sum())
            s = int(spec.threshold * size) if spec.relative else min(spec.threshold, size)
            channels.append((amap, g, s))
        negatives.append((amap, ~union))
    num_neg = sum(int(n.sum()) for _, n in negatives)
    points = [(0.0, 0.0)]
    for t in np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]:
        fp = sum(int(((a >= t) & n).sum()) for a, n in negatives)
        values = []
        for a, g, s in channels:
            tp = int(((a >= t) & g).sum())
            values.append((1.0 if tp > 0 else 0.0) if s == 0 else min(tp / s, 1.0))
        points.append((fp / num_neg, float(np.mean(values))))
    return _dedupe(points)


# ----------------------------------------------------------------------------------------------------------
# Image-level metrics
# ----------------------------------------------------------------------------------------------------------


def test_image_auroc_hand_case():
    # Pairs (defect, good): (0.35, 0.1) ok, (0.35, 0.4) wrong, (0.8, *) ok -> 3 / 4.
    assert image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_image_auroc_is_none_with_one_class():
    assert image_auroc([0, 0, 0], [0.1, 0.2, 0.3]) is None
    assert image_auroc([1, 1], [0.1, 0.2]) is None


def test_f1_max_hand_case():
    # Threshold 0.4: tp=3, fp=1, fn=0 -> P=3/4, R=1, F1=6/7 (best; 0.8 gives P=1, R=2/3, F1=0.8).
    assert f1_max([0, 0, 1, 1, 1], [0.1, 0.6, 0.4, 0.8, 0.9]) == pytest.approx(6 / 7)


def test_f1_max_is_none_without_defects():
    assert f1_max([0, 0], [0.1, 0.2]) is None


def test_image_metrics_reject_nan_and_length_mismatch():
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="2 labels but 3 scores"):
        f1_max([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="0 \\(good\\) or 1"):
        image_auroc([0, 2], [0.1, 0.2])


# ----------------------------------------------------------------------------------------------------------
# Pixel AUROC
# ----------------------------------------------------------------------------------------------------------


def test_pixel_auroc_full_and_anomalous_only_match_sklearn():
    good_map, good_mask = np.array([[0.6, 0.1, 0.2]]), np.zeros((1, 3), dtype=bool)
    bad_map, bad_mask = np.array([[0.55, 0.3, 0.5]]), np.array([[1, 0, 0]], dtype=np.uint8)
    maps, masks = [good_map, bad_map], [good_mask, bad_mask]
    full = pixel_auroc(masks, maps)
    # 0.55 beats 4 of the 5 good pixels overall, and both good pixels of the defective image.
    assert full == pytest.approx(0.8)
    assert full == pytest.approx(roc_auc_score([0, 0, 0, 1, 0, 0], [0.6, 0.1, 0.2, 0.55, 0.3, 0.5]))
    assert pixel_auroc(masks, maps, anomalous_only=True) == pytest.approx(1.0)
    assert pixel_auroc(masks, maps, labels=[0, 1], anomalous_only=True) == pytest.approx(1.0)
    assert pixel_auroc(np.stack([good_mask, bad_mask]), np.stack(maps)) == pytest.approx(0.8)


def test_pixel_auroc_is_none_without_anomalous_or_good_pixels():
    maps = [np.array([[0.1, 0.2]]), np.array([[0.3, 0.4]])]
    assert pixel_auroc([np.zeros((1, 2)), np.zeros((1, 2))], maps) is None
    assert pixel_auroc([None, None], maps) is None
    assert pixel_auroc([np.ones((1, 2)), np.ones((1, 2))], maps) is None
    assert pixel_auroc([np.zeros((1, 2)), np.zeros((1, 2))], maps, anomalous_only=True) is None


def test_mask_shape_mismatch_names_the_image():
    maps = [np.zeros((2, 2)), np.zeros((2, 3))]
    masks = [np.zeros((2, 2)), np.zeros((3, 2))]
    with pytest.raises(ValueError, match=r"masks\[1\] has shape \(3, 2\) but maps\[1\] has shape \(2, 3\)"):
        pixel_auroc(masks, maps)


def test_inputs_are_validated():
    with pytest.raises(ValueError, match="1 masks but 2 maps"):
        au_pro([np.zeros((2, 2))], [np.zeros((2, 2)), np.zeros((2, 2))])
    with pytest.raises(ValueError, match=r"maps\[0\] contains NaN"):
        au_pro([np.eye(2)], [np.array([[np.nan, 0.0], [0.0, 0.0]])])
    with pytest.raises(ValueError, match="not binary"):
        pixel_auroc([np.array([[0, 255]])], [np.zeros((1, 2))])


# ----------------------------------------------------------------------------------------------------------
# PRO / AU-PRO
# ----------------------------------------------------------------------------------------------------------

# Image 0: region A (2 pixels, scores 0.9 and 0.6); image 1: region B (1 pixel, 0.4, tied with a good pixel).
# Good pixels: 0.8, 0.2, 0.1 (image 0) and 0.4, 0.3 (image 1): 5 in all, so each one adds 0.2 to the FPR.
PRO_MAPS = [np.array([[0.9, 0.6, 0.8, 0.2, 0.1]]), np.array([[0.4, 0.3, 0.4]])]
PRO_MASKS = [np.array([[1, 1, 0, 0, 0]], dtype=bool), np.array([[0, 0, 1]], dtype=bool)]


def test_pro_curve_two_regions_of_different_sizes():
    fpr, pro = pro_curve(PRO_MASKS, PRO_MAPS)
    # t=0.9: A half covered -> (0.5 + 0) / 2; t=0.8: one FP; t=0.6: A full -> 0.5;
    # t=0.4: B and a good pixel together -> (0.4, 1); then only good pixels.
    np.testing.assert_allclose(fpr, [0.0, 0.0, 0.2, 0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(pro, [0.0, 0.25, 0.25, 0.5, 1.0, 1.0, 1.0, 1.0])


def test_au_pro_interpolates_at_the_fpr_limit():
    # Area to 0.3: 0.2 * 0.25 + trapezoid from (0.2, 0.5) to (0.3, 0.75) = 0.05 + 0.0625 = 0.1125.
    assert au_pro(PRO_MASKS, PRO_MAPS) == pytest.approx(0.1125 / 0.3)
    assert au_pro(PRO_MASKS, PRO_MAPS, fpr_limit=0.2) == pytest.approx(0.25)
    # Full area: 0.05 + 0.5 * (0.5 + 1) * 0.2 + 0.6 = 0.8.
    assert au_pro(PRO_MASKS, PRO_MAPS, fpr_limit=1.0) == pytest.approx(0.8)


def test_pro_tied_scores_collapse_into_one_step():
    amap = np.array([[0.5, 0.5, 0.5, 0.2]])
    mask = np.array([[1, 1, 0, 0]], dtype=bool)
    fpr, pro = pro_curve([mask], [amap])
    # Both region pixels and one good pixel share 0.5: a single step, no intermediate points.
    np.testing.assert_allclose(fpr, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(pro, [0.0, 1.0, 1.0])
    assert au_pro([mask], [amap], fpr_limit=0.5) == pytest.approx(0.5)


def test_pro_regions_use_8_connectivity():
    mask = np.zeros((3, 5), dtype=bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: one region of 2 pixels
    mask[0, 4] = True  # a separate region of 1 pixel
    amap = np.full((3, 5), 0.5)
    amap[0, 0] = 0.9
    amap[1, 1] = amap[0, 4] = 0.1
    fpr, pro = pro_curve([mask], [amap])
    # 8-connectivity: (1/2 + 0) / 2 = 0.25 at the first threshold; 4-connectivity would give 1/3.
    assert (fpr[1], pro[1]) == pytest.approx((0.0, 0.25))


def test_pro_matches_slow_reference_on_random_data_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        shapes = [(6, 7), (5, 5), (4, 8)]
        maps = [np.round(rng.random(s), 1) for s in shapes]
        masks = [rng.random(s) > 0.7 for s in shapes]
        masks[1][:] = False  # a good image
        fpr, pro = pro_curve(masks, maps)
        ref_fpr, ref_pro = reference_pro_curve(masks, maps)
        np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
        np.testing.assert_allclose(pro, ref_pro, atol=1e-12)
        for limit in (0.05, 0.3, 1.0):
            expected = trapezoid_area_to_limit(ref_fpr, ref_pro, limit)
            assert au_pro(masks, maps, fpr_limit=limit) == pytest.approx(expected)


def test_au_pro_is_none_without_regions():
    assert au_pro([np.zeros((2, 2))], [np.ones((2, 2))]) is None
    with pytest.raises(ValueError, match="region"):
        pro_curve([np.zeros((2, 2))], [np.ones((2, 2))])


def test_trapezoid_area_to_limit():
    x = np.array([0.0, 0.5, 1.0])
    y = np.array([0.0, 1.0, 1.0])
    assert trapezoid_area_to_limit(x, y, 0.25) == pytest.approx(0.5 * 0.25 * 0.5 / 0.25)
    assert trapezoid_area_to_limit(x, y, 0.5) == pytest.approx(0.5)
    assert trapezoid_area_to_limit(x, y, 1.0) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        trapezoid_area_to_limit(x, y, 0.0)


# ----------------------------------------------------------------------------------------------------------
# sPRO / AUC-sPRO
# ----------------------------------------------------------------------------------------------------------


def _spro_case():
    # Image 0 (defective): channel c0 = pixels 0-3, relative 0.5 -> s = 2;
    # channel c1 = pixels 3-5 (overlaps c0 at pixel 3), absolute 2 -> s = min(2, 3) = 2.
    # Negatives: pixels 6-9 of image 0 plus the 6 pixels of the good image 1: 10 in all.
    defect = np.array([[0.9, 0.6, 0.1, 0.7, 0.5, 0.1, 0.5, 0.3, 0.2, 0.0]])
    good = np.array([[0.8, 0.3, 0.2, 0.1, 0.0, 0.0]])
    c0 = np.zeros((1, 10), dtype=bool)
    c0[0, 0:4] = True
    c1 = np.zeros((1, 10), dtype=bool)
    c1[0, 3:6] = True
    maps = [defect, good]
    channels = [[c0, c1], []]
    saturations = [[SaturationSpec(0.5, relative=True), SaturationSpec(2, relative=False)], []]
    return maps, channels, saturations


def test_spro_curve_with_overlapping_channels_and_a_good_image():
    maps, channels, saturations = _spro_case()
    fpr, spro = spro_curve(maps, channels, saturations)
    # t=0.9: c0 1/2 -> mean 0.25; t=0.8: FP in the good image; t=0.7: pixel 3 saturates c0 and half fills
    # c1 -> 0.75; t=0.6: c0 already saturated (no new point); t=0.5: c1 saturated together with one FP.
    np.testing.assert_allclose(fpr, [0.0, 0.0, 0.1, 0.1, 0.2, 0.4, 0.6, 0.7, 1.0])
    np.testing.assert_allclose(spro, [0.0, 0.25, 0.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0])


def test_au_spro_at_all_limits():
    maps, channels, saturations = _spro_case()
    result = au_spro(maps, channels, saturations)
    # Area to 0.3: 0.1 * 0.25 + 0.5 * (0.75 + 1) * 0.1 + 0.1 = 0.2125; to 1.0: 0.025 + 0.0875 + 0.8.
    expected = {0.01: 0.25, 0.05: 0.25, 0.1: 0.25, 0.3: 0.2125 / 0.3, 1.0: 0.9125}
    assert result.keys() == expected.keys()
    for limit, value in expected.items():
        assert result[limit] == pytest.approx(value)
    # Interpolation inside the sloped segment (0.1, 0.75) -> (0.2, 1.0): y(0.15) = 0.875.
    assert au_spro(maps, channels, saturations, fpr_limits=(0.15,))[0.15] == pytest.approx(
        (0.025 + 0.5 * (0.75 + 0.875) * 0.05) / 0.15
    )


SPRO_SINGLE_MAP = np.array([[0.9, 0.8, 0.7, 0.85, 0.1]])  # channel: pixels 0-2; negatives: 0.85, 0.1
SPRO_SINGLE_MASK = np.array([[1, 1, 1, 0, 0]], dtype=bool)


@pytest.mark.parametrize(
    ("spec", "expected_fpr", "expected_spro"),
    [
        # relative 0.5 of 3 pixels: s = int(1.5) = 1, saturated by the first pixel
        (SaturationSpec(0.5, relative=True), [0, 0, 0.5, 1], [0, 1, 1, 1]),
        # relative 1.0: s = 3
        (SaturationSpec(1.0, relative=True), [0, 0, 0.5, 0.5, 0.5, 1], [0, 1 / 3, 1 / 3, 2 / 3, 1, 1]),
        # absolute 10 larger than the region: s = min(10, 3) = 3
        (SaturationSpec(10, relative=False), [0, 0, 0.5, 0.5, 0.5, 1], [0, 1 / 3, 1 / 3, 2 / 3, 1, 1]),
        # absolute 2: s = 2
        (SaturationSpec(2, relative=False), [0, 0, 0.5, 0.5, 1], [0, 0.5, 0.5, 1, 1]),
        # s == 0 (int(0.2 * 3) = 0, or absolute 0): saturated as soon as one pixel is detected
        (SaturationSpec(0.2, relative=True), [0, 0, 0.5, 1], [0, 1, 1, 1]),
        (SaturationSpec(0, relative=False), [0, 0, 0.5, 1], [0, 1, 1, 1]),
    ],
)
def test_spro_saturation_relative_and_absolute(spec, expected_fpr, expected_spro):
    fpr, spro = spro_curve([SPRO_SINGLE_MAP], [[SPRO_SINGLE_MASK]], [[spec]])
    np.testing.assert_allclose(fpr, expected_fpr)
    np.testing.assert_allclose(spro, expected_spro)


def test_spro_good_images_only_change_the_fpr():
    spec = [[SaturationSpec(2, relative=False)]]
    base_fpr, base_spro = spro_curve([SPRO_SINGLE_MAP], [[SPRO_SINGLE_MASK]], spec)
    good = np.zeros((1, 2))  # two more negatives, below every other score
    fpr, spro = spro_curve([SPRO_SINGLE_MAP, good], [[SPRO_SINGLE_MASK], []], spec + [[]])
    np.testing.assert_allclose(fpr, [0, 0, 0.25, 0.25, 0.5, 1.0])
    np.testing.assert_allclose(spro, [0, 0.5, 0.5, 1, 1, 1])
    np.testing.assert_allclose(base_fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(base_spro, [0, 0.5, 0.5, 1, 1])


def test_spro_ignores_empty_channels():
    spec = SaturationSpec(2, relative=False)
    with_empty = spro_curve([SPRO_SINGLE_MAP], [[SPRO_SINGLE_MASK, np.zeros((1, 5), bool)]], [[spec, spec]])
    without = spro_curve([SPRO_SINGLE_MAP], [[SPRO_SINGLE_MASK]], [[spec]])
    np.testing.assert_allclose(with_empty[0], without[0])
    np.testing.assert_allclose(with_empty[1], without[1])


def test_au_spro_is_none_without_channels():
    assert au_spro([np.ones((2, 2))], [[]], [[]]) is None
    with pytest.raises(ValueError, match="channel"):
        spro_curve([np.ones((2, 2))], [[]], [[]])


def test_spro_validates_channel_shapes_and_counts():
    spec = SaturationSpec(1, relative=False)
    with pytest.raises(ValueError, match=r"channel_masks\[0\]\[0\] has shape"):
        spro_curve([np.zeros((2, 2))], [[np.zeros((3, 2), bool)]], [[spec]])
    with pytest.raises(ValueError, match="1 channel masks but 2 saturation specs"):
        spro_curve([np.zeros((2, 2))], [[np.eye(2, dtype=bool)]], [[spec, spec]])
    with pytest.raises(ValueError):
        SaturationSpec(-1, relative=False)


def test_spro_matches_slow_reference_on_random_data_with_ties():
    rng = np.random.default_rng(1)
    for _ in range(5):
        shapes = [(6, 7), (5, 5), (4, 8)]
        maps = [np.round(rng.random(s), 1) for s in shapes]
        channels = [
            [rng.random(shapes[0]) > 0.7, rng.random(shapes[0]) > 0.8],
            [],
            [rng.random(shapes[2]) > 0.6],
        ]
        saturations = [
            [SaturationSpec(0.3, relative=True), SaturationSpec(4, relative=False)],
            [],
            [SaturationSpec(1.0, relative=True)],
        ]
        fpr, spro = spro_curve(maps, channels, saturations)
        ref_fpr, ref_spro = reference_spro_curve(maps, channels, saturations)
        np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
        np.testing.assert_allclose(spro, ref_spro, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# compute_metrics
# ----------------------------------------------------------------------------------------------------------


def test_compute_metrics_reports_all_keys():
    maps, channels, saturations = _spro_case()
    masks = [np.any(channels[0], axis=0), None]
    result = compute_metrics(
        [1, 0],
        [0.9, 0.8],
        maps,
        masks,
        spro_channel_masks=channels,
        spro_saturations=saturations,
    )
    assert result["image_auroc"] == pytest.approx(1.0)
    assert result["image_f1_max"] == pytest.approx(1.0)
    assert result["pixel_auroc"] == pytest.approx(pixel_auroc(masks, maps))
    assert result["pixel_auroc_anomalous"] == pytest.approx(pixel_auroc(masks, maps, anomalous_only=True))
    assert result["au_pro"] == pytest.approx(au_pro(masks, maps))
    spro = au_spro(maps, channels, saturations)
    for key, limit in [("0.01", 0.01), ("0.05", 0.05), ("0.1", 0.1), ("0.3", 0.3), ("1", 1.0)]:
        assert result[f"au_spro@{key}"] == pytest.approx(spro[limit])


def test_compute_metrics_missing_ground_truth_is_none():
    result = compute_metrics([0, 0], [0.1, 0.2])
    assert result == {
        "image_auroc": None,
        "image_f1_max": None,
        "pixel_auroc": None,
        "pixel_auroc_anomalous": None,
        "au_pro": None,
    }
    maps = [np.zeros((2, 2)), np.ones((2, 2))]
    result = compute_metrics(
        [0, 1], [0.1, 0.2], maps, [None, None], spro_channel_masks=[[], []], spro_saturations=[[], []]
    )
    assert result["image_auroc"] == pytest.approx(1.0)
    assert result["pixel_auroc"] is None and result["au_pro"] is None
    assert all(result[f"au_spro@{limit:g}"] is None for limit in (0.01, 0.05, 0.1, 0.3, 1.0))
