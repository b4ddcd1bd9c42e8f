"""The histogram sPRO of evaluation/spro.py equals the exact float sPRO of evaluation/metrics.py on 16-bit maps."""

from __future__ import annotations

import numpy as np
import pytest

from patchcore.evaluation.metrics import SaturationSpec, au_spro
from patchcore.evaluation.spro import Channel, NativeSproAccumulator

LIMITS = (0.01, 0.05, 0.1, 0.3, 1.0)


def _random_case(seed: int):
    rng = np.random.default_rng(seed)
    maps, channels, labels = [], [], []
    for i in range(9):
        # Few distinct levels, so ties are many: both implementations must collapse them the same way.
        levels = rng.integers(0, 300, (20, 30)).astype(np.uint16) * 200
        chans = []
        if i % 3:
            for j in range(1 + i % 2):
                mask = np.zeros((20, 30), dtype=bool)
                top, left = rng.integers(0, 15), rng.integers(0, 22)
                mask[top : top + rng.integers(2, 6), left : left + rng.integers(2, 9)] = True
                levels[mask] += np.uint16(15000)
                spec = (
                    SaturationSpec(0.5, True) if j == 0 else SaturationSpec(float(rng.integers(1, 40)), False)
                )
                chans.append(Channel(mask, spec))
        maps.append(levels)
        channels.append(chans)
        labels.append("good" if not chans else ("a" if i % 3 == 1 else "b"))
    return maps, channels, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_histogram_curve_equals_the_exact_float_curve(seed):
    maps, channels, labels = _random_case(seed)
    accumulator = NativeSproAccumulator()
    for levels, chans, label in zip(maps, channels, labels, strict=True):
        accumulator.add(label, levels, chans)
    exact = au_spro(
        [m.astype(np.float64) for m in maps],
        [[c.mask for c in chans] for chans in channels],
        [[c.saturation for c in chans] for chans in channels],
        LIMITS,
    )
    ours = accumulator.auc_spro(LIMITS)
    for limit in LIMITS:
        assert ours[limit] == pytest.approx(exact[limit], abs=1e-12)
    # Per type: that type's images plus every good image.
    keep = [i for i, label in enumerate(labels) if label in ("a", "good")]
    exact_a = au_spro(
        [maps[i].astype(np.float64) for i in keep],
        [[c.mask for c in channels[i]] for i in keep],
        [[c.saturation for c in channels[i]] for i in keep],
        LIMITS,
    )
    assert accumulator.per_type_auc_spro(LIMITS)["a"] == pytest.approx(exact_a, abs=1e-12)


def test_an_image_added_without_pixels_counts_at_image_level_only():
    maps, channels, labels = _random_case(0)
    with_it, without = NativeSproAccumulator(), NativeSproAccumulator()
    for levels, chans, label in zip(maps, channels, labels, strict=True):
        with_it.add(label, levels, chans)
        without.add(label, levels, chans)
    without.add("a", np.zeros((20, 30), dtype=np.uint16), [], pixels=False)  # a missed defect
    assert without.auc_spro(LIMITS) == with_it.auc_spro(LIMITS)
    assert without.image_aurocs()["a"] < with_it.image_aurocs()["a"]
