"""The pruned greedy loop: certified bound, same picks as the straightforward loop, same coverage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patchcore.engine.coreset import (
    covering_radius,
    greedy_select,
    prefix_bound_data,
    reference_greedy_select,
    start_distances,
)


def clustered(n: int, dim: int, clusters: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(clusters, dim))
    scales = rng.uniform(0.3, 1.5, size=(clusters, 1))
    labels = rng.integers(clusters, size=n)
    data = centres[labels] + rng.normal(size=(n, dim)) * scales[labels]
    return torch.from_numpy(data.astype(np.float32))


def reference_float_distances(z: torch.Tensor, i: int) -> np.ndarray:
    """The reference's float32 formula for the distances of all points to point i."""
    sq = (z * z).sum(1)
    return (-2 * (z @ z[i]) + sq + sq[i]).clamp(min=0).sqrt().numpy()


@pytest.mark.parametrize("seed", range(3))
def test_prefix_bound_never_exceeds_the_reference_distance(seed):
    z = clustered(3000, 48, 12, seed)
    bound = prefix_bound_data(z, prefix_dim=8)
    levels = np.concatenate([bound["q_head"].T, bound["q_tail"]], axis=1)
    dequantised = levels.astype(np.float64) * bound["scale"].astype(np.float64)
    for i in np.random.default_rng(seed).choice(len(z), 20, replace=False):
        prefix_distance = np.linalg.norm(dequantised - dequantised[i], axis=1)
        # T >= P - e_j - e_i, and the float formula's square is at least T^2 - (cn_j + cn_i).
        lower = np.maximum(prefix_distance - bound["slack"] - bound["slack"][i], 0.0)
        lower_squared = lower**2 - bound["cn"].astype(np.float64) - float(bound["cn"][i])
        actual = reference_float_distances(z, int(i)).astype(np.float64)
        assert np.all(lower_squared <= actual**2), "the certified bound exceeded a distance"


def test_pruning_computes_only_a_fraction_of_the_distances():
    z = clustered(20000, 64, 40, seed=3)
    stats: dict = {}
    start = np.random.default_rng(0).choice(len(z), 10, replace=False)
    greedy_select(z, 500, start_distances(z, start), method="pruned", stats=stats)
    assert stats["method"] == "pruned"
    assert 0.0 < stats["exact_fraction"] < 0.5


@pytest.mark.parametrize("seed", range(2))
def test_pruned_and_fused_loops_cover_equally_well_on_larger_inputs(seed):
    # Large inputs can flip near-ties (distances equal to float32 precision) and the sequences then
    # diverge: compare quality (covering radius) and how many leading picks agree.
    z = clustered(40000, 128, 60, seed)
    start = np.random.default_rng(seed).choice(len(z), 10, replace=False)
    pruned = greedy_select(z, 2000, start_distances(z, start), method="pruned")
    fused = greedy_select(z, 2000, start_distances(z, start), method="fused")
    assert len(set(pruned.tolist())) == 2000
    agree = int(np.argmax(pruned != fused)) if (pruned != fused).any() else len(pruned)
    assert agree >= 100
    radius_pruned = covering_radius(z.numpy(), pruned)
    radius_fused = covering_radius(z.numpy(), fused)
    assert abs(radius_pruned - radius_fused) <= 0.005 * radius_fused


def test_pruned_loop_matches_the_reference_loop_on_medium_inputs():
    z = clustered(3000, 32, 10, seed=7)
    start = np.random.default_rng(1).choice(len(z), 10, replace=False)
    np.testing.assert_array_equal(
        greedy_select(z, 300, start_distances(z, start), method="pruned"),
        reference_greedy_select(z, 300, start),
    )


def test_greedy_select_rejects_unknown_methods():
    z = torch.zeros((4, 2))
    with pytest.raises(ValueError, match="unknown greedy method"):
        greedy_select(z, 1, torch.zeros(4), method="fast")


def test_pruned_loop_with_a_two_level_prefix_matches_the_reference_loop():
    # 96 dims: a 64-dim prefix whose last 32 coordinates are read only where the 32-dim head cannot exclude.
    import patchcore.engine.coreset as coreset

    z = clustered(3000, 96, 10, seed=11)
    bound = prefix_bound_data(z)
    assert bound["q_head"].shape == (coreset.HEAD_DIM, 3000) and bound["q_tail"].shape[1] > 0
    start = np.random.default_rng(2).choice(len(z), 10, replace=False)
    stats: dict = {}
    np.testing.assert_array_equal(
        greedy_select(z, 300, start_distances(z, start), method="pruned", stats=stats),
        reference_greedy_select(z, 300, start),
    )
    assert stats["exact_fraction"] < 0.5
