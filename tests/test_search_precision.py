"""The pruned exact search in bf16 and float32: the same neighbours and distances as float64 brute force."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from patchcore.engine.index import MemoryBankIndex
from patchcore.engine.search import pruned_kernel

pytestmark = pytest.mark.usefixtures("single_torch_thread")

PRECISIONS = ["bf16", "fp32"]


def float64_brute_force(bank: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sums of squared differences in float64 (no expansion, so near-ties keep their order); ties: lower index."""
    b = bank.astype(np.float64)
    distances = np.stack([((b - q) ** 2).sum(1) for q in queries.astype(np.float64)])
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(distances, order, axis=1), order


def patch_like(n: int, dim: int, seed: int, offset: float = 0.0) -> np.ndarray:
    """Clustered points with a decaying spectrum (most variance in the leading components), as patch
    features have; ``offset`` moves them far from the origin (large norms, small differences)."""
    rng = np.random.default_rng(seed)
    spectrum = 0.97 ** np.arange(dim)
    centres = rng.normal(0.0, 1.0, size=(max(2, n // 100), dim))
    points = centres[rng.integers(len(centres), size=n)] + rng.normal(0.0, 0.3, size=(n, dim))
    return (points * spectrum + offset).astype(np.float32)


def assert_exact(index: MemoryBankIndex, bank: np.ndarray, queries: np.ndarray, k: int) -> None:
    distances, indices = index.search(queries, k)
    expected_distances, expected_indices = float64_brute_force(bank, queries, k)
    np.testing.assert_array_equal(indices, expected_indices)
    # float32 storage of float64 sums: relative 2^-24 (the 1e-5 with room to spare).
    np.testing.assert_allclose(distances, expected_distances, rtol=1e-6, atol=0)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("dim, offset", [(256, 0.0), (256, 40.0), (64, 3.0)])
def test_pruned_search_equals_float64_brute_force(precision, k, dim, offset):
    # dim 64 < the 128-dim prefix: the bound is the whole distance, so bf16's rounding alone decides
    # which candidates are re-ranked; offset 40 makes the norms large against the distances.
    bank = patch_like(3000, dim, seed=dim, offset=offset)
    rng = np.random.default_rng(1)
    queries = bank[rng.choice(len(bank), 300)] + rng.normal(0, 0.2, size=(300, dim)).astype(np.float32)
    index = MemoryBankIndex(bank, kind="pruned", search_precision=precision)
    assert index.search_precision == precision
    assert_exact(index, bank, queries, k)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_near_ties_are_ranked_as_float64_ranks_them(precision):
    # Bank vectors on spheres around each query whose radii differ by 1e-6 relative: far below what bf16
    # resolves (2^-8), and for some pairs below float32's too.
    rng = np.random.default_rng(2)
    dim = 160
    queries = (rng.normal(0, 1, size=(40, dim)) * 0.98 ** np.arange(dim)).astype(np.float32)
    rows = []
    for query in queries:
        directions = rng.normal(size=(6, dim))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        radii = 0.5 * (1 + 1e-6 * rng.permutation(6))
        rows.append(query + radii[:, None] * directions)
    bank = np.concatenate(rows).astype(np.float32)
    assert_exact(MemoryBankIndex(bank, kind="pruned", search_precision=precision), bank, queries, 3)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_duplicated_bank_rows_return_the_smaller_index_first(precision):
    base = patch_like(400, 200, seed=3)
    bank = np.concatenate([base, base, base[:50]])  # exact ties, two and three deep
    queries = base[:60] + np.float32(1e-3)
    index = MemoryBankIndex(bank, kind="pruned", search_precision=precision)
    distances, indices = index.search(queries, 3)
    np.testing.assert_array_equal(
        indices[:50], np.stack([np.arange(50), np.arange(50) + 400, np.arange(50) + 800], 1)
    )
    assert_exact(index, bank, queries, 3)


def test_auto_precision_falls_back_to_float32_without_native_bf16(caplog):
    bank = patch_like(500, 160, seed=4)
    with caplog.at_level(logging.INFO, logger=pruned_kernel.__name__):
        search = pruned_kernel.PrunedExactSearch(bank, precision="auto", cpu_feature=None)
    assert search.precision == "fp32"
    assert "fp32 prefix products (CPU bf16 support: none)" in caplog.text
    assert_exact(search, bank, bank[:50] + np.float32(0.01), 1)


def test_auto_precision_takes_bf16_where_the_cpu_has_it(caplog):
    with caplog.at_level(logging.INFO, logger=pruned_kernel.__name__):
        search = pruned_kernel.PrunedExactSearch(patch_like(300, 160, seed=5), precision="auto", cpu_feature="amx_bf16")
    assert search.precision == "bf16"
    assert "bf16 prefix products (CPU bf16 support: amx_bf16)" in caplog.text


# Abridged /proc/cpuinfo texts (real flag names; the flags lines of a Sapphire Rapids, a Zen 4, a Skylake-SP).
CPUINFO_HEAD = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: some CPU\n"
SAPPHIRE_RAPIDS = "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8\n"
ZEN4 = "flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 avx512_vbmi2\n"
SKYLAKE = "flags\t\t: fpu sse2 avx2 avx512f avx512cd avx512bw avx512vl\n"


@pytest.mark.parametrize(
    "text, expected",
    [
        (CPUINFO_HEAD + SAPPHIRE_RAPIDS + "bugs\t\t: spectre_v1\n", "amx_bf16"),  # AMX preferred over AVX512-BF16
        (CPUINFO_HEAD + ZEN4, "avx512_bf16"),
        (CPUINFO_HEAD + SKYLAKE, None),  # avx512 without its bf16 extension
        (CPUINFO_HEAD + SKYLAKE + "\n" + CPUINFO_HEAD + ZEN4, None),  # only the first flags line counts
        ("processor\t: 0\nFeatures\t: fp asimd bf16 sve\n", None),  # aarch64 writes 'Features', no x86 flags
        ("flags\t\t: fpu xamx_bf16 avx512_bf16x\n", None),  # whole flag names, not substrings
        ("", None),
    ],
)
def test_bf16_feature_reads_the_cpuinfo_flags_line(text, expected):
    """Catches a parser that matches substrings, ignores AMX's priority, reads every flags line or the
    'Features' line of other architectures."""
    assert pruned_kernel.bf16_feature(text) == expected


def test_this_machines_bf16_detection_is_the_parse_of_its_cpuinfo():
    import sys

    import torch

    if not sys.platform.startswith("linux") or not torch.backends.mkldnn.is_available():
        assert pruned_kernel.cpu_bf16_matmul() is None
        return
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
        assert pruned_kernel.cpu_bf16_matmul() == pruned_kernel.bf16_feature(handle.read())


def test_unknown_search_precision_is_rejected():
    with pytest.raises(ValueError, match="search precision"):
        MemoryBankIndex(patch_like(100, 160, seed=6), kind="pruned", search_precision="int4")


def test_both_precisions_prune_most_of_the_bank():
    bank = patch_like(4000, 256, seed=7)
    queries = bank[:400] + np.random.default_rng(8).normal(0, 0.2, size=(400, 256)).astype(np.float32)
    fractions = {}
    for precision in PRECISIONS:
        index = MemoryBankIndex(bank, kind="pruned", search_precision=precision)
        index.search(queries, 1)
        fractions[precision] = index.searcher.kernel.last_exact_fraction
    # Both bounds prune most of the bank (bf16's allowance is wider, so it may re-rank a few more).
    assert fractions["bf16"] < 0.5 and fractions["fp32"] < 0.5


# --------------------------------------------------------------------------- the torch (GPU) exact search


@pytest.mark.parametrize("k", [1, 3])
def test_torch_matmul_search_equals_float64_brute_force(k):
    # The CUDA path's logic, run on the CPU: float32 products for candidates, float64 re-ranking.
    from patchcore.engine.search.torch_exact import TorchExactSearch

    bank = patch_like(2000, 256, seed=9, offset=20.0)
    rng = np.random.default_rng(10)
    queries = bank[rng.choice(len(bank), 200)] + rng.normal(0, 0.2, size=(200, 256)).astype(np.float32)
    search = TorchExactSearch(bank, "cpu")
    distances, indices = search.search(queries, k)
    assert search.last_fallbacks < len(queries) // 2  # the candidates certify most queries
    expected_distances, expected_indices = float64_brute_force(bank, queries, k)
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_allclose(distances, expected_distances, rtol=1e-6, atol=0)


def test_torch_matmul_search_falls_back_to_brute_force_where_it_cannot_certify():
    from patchcore.engine.search.torch_exact import TorchExactSearch

    base = patch_like(300, 128, seed=11)
    bank = np.concatenate([base, base, base])  # three-deep exact ties: no room beyond k to certify
    queries = base[:40] + np.float32(1e-3)
    search = TorchExactSearch(bank, "cpu", extra=0)
    distances, indices = search.search(queries, 2)
    assert search.last_fallbacks == len(queries)
    np.testing.assert_array_equal(indices, np.stack([np.arange(40), np.arange(40) + 300], 1))
    expected_distances, _ = float64_brute_force(bank, queries, 2)
    np.testing.assert_allclose(distances, expected_distances, rtol=1e-6, atol=0)


@pytest.mark.parametrize("offset", [0.0, 40.0])
def test_bfloat16_screen_never_exceeds_the_float64_distance(offset):
    # The second bound, (||q_c - b~|| - ||b_c - b~||)^2 from the bank's bfloat16 copy, is a lower bound of
    # the exact squared distance for every pair, including near and identical vectors and large norms.
    bank = patch_like(500, 96, seed=5, offset=offset)
    search = pruned_kernel.PrunedExactSearch(bank, precision="fp32")
    rng = np.random.default_rng(3)
    queries = np.concatenate([bank[:20], bank[20:60] + rng.normal(0, 1e-3, size=(40, 96)).astype(np.float32)])
    for query in queries:
        exact = ((bank.astype(np.float64) - query.astype(np.float64)) ** 2).sum(1)
        lower = search.reduced_lower_bounds(query)
        assert np.all(lower <= exact * (1 + 1e-9)), np.flatnonzero(lower > exact * (1 + 1e-9))


def test_bfloat16_screen_spares_most_exact_distances_on_patch_like_data():
    bank = patch_like(4000, 256, seed=8)
    rng = np.random.default_rng(4)
    queries = bank[rng.choice(len(bank), 200)] + rng.normal(0, 0.3, size=(200, 256)).astype(np.float32)
    index = MemoryBankIndex(bank, kind="pruned", search_precision="fp32")
    assert_exact(index, bank, queries, 1)
    search = index.searcher.kernel
    assert search.last_screened_fraction > search.last_exact_fraction


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("offset", [0.0, 40.0])
def test_prefix_pass_bound_never_exceeds_the_exact_distance(precision, offset):
    # The first-level bound of every (query, bank vector) pair, as the kernel computes it from the products
    # (bf16 or float32) and the allowances, is at most the float64 squared distance.
    bank = patch_like(600, 256, seed=12, offset=offset)
    search = pruned_kernel.PrunedExactSearch(bank, precision=precision)
    rng = np.random.default_rng(5)
    queries = bank[rng.choice(len(bank), 40)] + rng.normal(0, 0.05, size=(40, 256)).astype(np.float32)
    lower = search.first_level_bounds(queries)
    exact = ((queries.astype(np.float64)[:, None, :] - bank.astype(np.float64)[None, :, :]) ** 2).sum(2)
    assert np.all(lower <= exact)
    assert np.mean(lower > 0.5 * exact) > 0.5  # and a useful bound, not a trivial one
