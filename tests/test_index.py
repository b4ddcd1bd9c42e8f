"""The memory-bank index: exact flat search and the approximate IVF / HNSW kinds with their recall."""

from __future__ import annotations

import numpy as np
import pytest

from patchcore.engine.index import INDEX_KINDS, MIN_CHUNK_ROWS, MemoryBankIndex, blas_min_rows, ivf_nlist


@pytest.fixture(autouse=True)
def restore_faiss_threads():
    """``threads=1`` (deterministic HNSW graphs) sets FAISS's process-wide thread count: put it back."""
    import faiss

    before = faiss.omp_get_max_threads()
    yield
    faiss.omp_set_num_threads(before)


def clustered(n: int, dim: int = 64, clusters: int = 50, seed: int = 0) -> np.ndarray:
    """Points around random cluster centres (the structure patch features have), float32."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, size=(clusters, dim))
    labels = rng.integers(clusters, size=n)
    return (centres[labels] + rng.normal(0.0, 0.3, size=(n, dim))).astype(np.float32)


@pytest.fixture(scope="module")
def bank() -> np.ndarray:
    return clustered(5000, seed=0)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return clustered(1000, seed=1)


def brute_force(bank: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    q, b = queries.astype(np.float64), bank.astype(np.float64)
    squared = (q * q).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * q @ b.T  # float64: exact enough
    order = np.argsort(squared, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(squared, order, axis=1), order


def test_flat_search_equals_brute_force_squared_distances(bank, queries):
    distances, indices = MemoryBankIndex(bank).search(queries[:200], k=3)
    expected_distances, expected_indices = brute_force(bank, queries[:200], 3)
    np.testing.assert_allclose(distances, expected_distances, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(indices, expected_indices)
    assert distances.dtype == np.float32 and indices.dtype == np.int64


def test_flat_results_do_not_depend_on_the_chunking(bank, queries):
    many = np.concatenate([queries] * 5)
    chunked_index = MemoryBankIndex(bank, chunk_rows=MIN_CHUNK_ROWS)
    # Chunks are raised to what FAISS computes with BLAS; a short tail joins the chunk before it.
    assert chunked_index.chunk_rows == max(MIN_CHUNK_ROWS, blas_min_rows(bank.shape[1]))
    bounds = list(chunked_index.searcher.chunks(len(many)))
    assert bounds[0] == (0, chunked_index.chunk_rows) and bounds[-1][1] == len(many) and len(bounds) > 1
    assert all(stop - start >= blas_min_rows(bank.shape[1]) for start, stop in bounds)
    whole = MemoryBankIndex(bank, chunk_rows=1 << 20).search(many, 2)
    chunked = chunked_index.search(many, 2)
    np.testing.assert_array_equal(whole[1], chunked[1])
    np.testing.assert_allclose(whole[0], chunked[0], rtol=1e-5, atol=1e-5)


def test_flat_recall_is_one(bank, queries):
    assert MemoryBankIndex(bank).recall(queries) == 1.0
    assert MemoryBankIndex(bank).recall(queries, k=5) == 1.0


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_recall_is_high_on_clustered_data(bank, queries, kind):
    index = MemoryBankIndex(bank, kind=kind)
    assert index.recall(queries) >= 0.9
    assert index.recall(queries, k=5) >= 0.9


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_distances_are_never_below_exact(bank, queries, kind):
    """Catches an approximate kind that reports distances below the true ones (scores must only go up) or
    rows it did not measure; and, through the strictly-above check, a 'low setting' that is not approximate."""
    exact, _ = MemoryBankIndex(bank).search(queries, 3)
    index = MemoryBankIndex(bank, kind=kind, nprobe=1, ef_search=4)
    approximate, indices = index.search(queries, 3)
    assert (indices >= 0).all() and (indices < len(bank)).all()
    assert (approximate >= exact * (1 - 1e-4) - 1e-6).all()
    assert (approximate[:, 0] > exact[:, 0] * (1 + 1e-3)).mean() > 0.1  # it did miss neighbours
    # The distances are those of the bank vectors returned.
    true = ((queries[:, None, :].astype(np.float64) - bank[indices]) ** 2).sum(axis=2)
    np.testing.assert_allclose(approximate, true, rtol=1e-4, atol=1e-4)


def test_low_nprobe_lowers_ivf_recall(bank, queries):
    """5,000 rows: 128 cells, so nprobe decides how much is searched. Measured here: recall@1 0.547 at
    nprobe 1, 0.742 at 2, 0.974 at 8, 1.0 at 32. Catches nprobe being ignored (or clamped to the cell
    count of a tiny bank) and a flat index behind the 'ivf' name (recall 1.0 at every nprobe)."""
    recalls = {}
    for nprobe in (1, 2, 8, 128):
        index = MemoryBankIndex(bank, kind="ivf", nprobe=nprobe)
        assert index.nlist == ivf_nlist(len(bank)) == 128
        recalls[nprobe] = index.recall(queries)
    assert recalls[1] < recalls[2] < recalls[8] <= recalls[128]
    assert recalls[1] < 0.75 and recalls[8] > 0.9
    assert recalls[128] == 1.0  # every cell probed: exhaustive


def test_small_ef_search_lowers_hnsw_recall(bank, queries):
    """Measured here (one thread): recall@1 0.27 at ef_search 1, 0.81 at 16, 0.97 at 64. Catches ef_search
    being ignored and an exhaustive search behind the 'hnsw' name."""
    recalls = {ef: MemoryBankIndex(bank, kind="hnsw", ef_search=ef, threads=1).recall(queries) for ef in (1, 16, 128)}
    assert recalls[1] < recalls[16] < recalls[128]
    assert recalls[1] < 0.6 and recalls[128] > 0.95


def test_ivf_builds_are_deterministic(bank, queries):
    first = MemoryBankIndex(bank, kind="ivf", nprobe=2).search(queries, 4)
    second = MemoryBankIndex(bank, kind="ivf", nprobe=2).search(queries, 4)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


def test_ivf_cell_count_follows_the_bank_size():
    assert ivf_nlist(1) == 1
    assert ivf_nlist(5000) == 5000 // 39  # 4 sqrt(5000) = 283 cells would have < 39 points each
    assert ivf_nlist(1_000_000) == 4000
    assert MemoryBankIndex(clustered(500), kind="ivf").nlist == 500 // 39


@pytest.mark.parametrize("kind", INDEX_KINDS)
def test_k_nearest_shapes(bank, queries, kind):
    distances, indices = MemoryBankIndex(bank, kind=kind).search(queries[:7], k=4)
    assert distances.shape == indices.shape == (7, 4)
    assert (np.diff(distances, axis=1) >= 0).all()
    assert (distances >= 0).all()


@pytest.mark.parametrize("kind", INDEX_KINDS)
def test_k_larger_than_the_bank_is_clamped(kind):
    small = clustered(40, seed=2)
    distances, indices = MemoryBankIndex(small, kind=kind).search(clustered(5, seed=3), k=100)
    assert distances.shape == indices.shape == (5, 40)
    for row in indices:  # every bank vector, each once
        assert sorted(row.tolist()) == list(range(40))


def test_ivf_query_with_too_few_candidates_is_answered_exactly():
    bank = clustered(400, clusters=10, seed=4)
    index = MemoryBankIndex(bank, kind="ivf", nlist=10, nprobe=1)
    distances, indices = index.search(bank[:20], k=200)  # one cell holds fewer than 200 vectors
    exact_distances, exact_indices = MemoryBankIndex(bank).search(bank[:20], k=200)
    assert (indices >= 0).all()
    np.testing.assert_allclose(distances, exact_distances, rtol=1e-4, atol=1e-4)


def test_search_clamps_tiny_negative_distances_to_zero(bank):
    distances, indices = MemoryBankIndex(bank).search(bank[:100], 1)
    assert (distances >= 0).all()
    np.testing.assert_array_equal(indices[:, 0], np.arange(100))


def test_unknown_kind_is_refused_with_the_known_kinds(bank):
    with pytest.raises(ValueError, match=", ".join(INDEX_KINDS)):
        MemoryBankIndex(bank, kind="lsh")


@pytest.mark.parametrize("options", [{"nprobe": 0}, {"ef_search": 0}, {"threads": 0}, {"nlist": 0}])
def test_bad_search_parameters_are_refused(bank, options):
    with pytest.raises(ValueError):
        MemoryBankIndex(bank, kind="hnsw" if "ef_search" in options else "ivf", **options)


def test_bad_queries_and_banks_are_refused(bank):
    index = MemoryBankIndex(bank)
    with pytest.raises(ValueError, match="queries"):
        index.search(np.zeros((3, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="k must be"):
        index.search(bank[:2], k=0)
    with pytest.raises(ValueError, match="non-empty"):
        MemoryBankIndex(np.zeros((0, 4), dtype=np.float32))


def test_threads_sets_the_faiss_thread_count(bank):
    faiss = pytest.importorskip("faiss")
    before = faiss.omp_get_max_threads()
    try:
        MemoryBankIndex(bank[:100], threads=1)
        assert faiss.omp_get_max_threads() == 1
    finally:
        faiss.omp_set_num_threads(before)


@pytest.mark.parametrize("k", [1, 3])
def test_pruned_exact_search_finds_the_true_nearest_neighbours(k):
    # A decaying spectrum, as patch features have: most variance in the leading components.
    spectrum = (0.97 ** np.arange(256)).astype(np.float32)
    bank = clustered(4000, dim=256, clusters=40, seed=5) * spectrum
    rng = np.random.default_rng(6)
    queries = bank[rng.choice(4000, 600)] + (rng.normal(0, 0.3, size=(600, 256)) * spectrum).astype(
        np.float32
    )
    index = MemoryBankIndex(bank, kind="pruned")
    distances, indices = index.search(queries, k)
    true_squared, true_indices = brute_force(bank, queries, k)
    np.testing.assert_allclose(distances, true_squared, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(indices, true_indices)
    assert index.exact and index.recall(queries, k) == 1.0
    assert index.searcher.kernel.last_exact_fraction < 0.5  # the bound did prune


def test_pruned_search_with_duplicate_bank_vectors_returns_the_smaller_index_first():
    base = clustered(300, dim=160, clusters=5, seed=7)
    bank = np.concatenate([base, base])  # every vector twice: exact ties
    distances, indices = MemoryBankIndex(bank, kind="pruned").search(base[:50] + 1e-3, k=2)
    np.testing.assert_array_equal(indices[:, 0], np.arange(50))
    np.testing.assert_array_equal(indices[:, 1], np.arange(50) + 300)
    np.testing.assert_allclose(distances[:, 0], distances[:, 1], rtol=1e-6)


def test_pruned_search_handles_features_with_tiny_values():
    # Tiny differences square to float32 subnormals; the kernel sums in float64 and stays exact.
    bank = clustered(2000, dim=192, seed=8) * np.float32(1e-20)
    queries = bank[:100] * np.float32(1.0 + 1e-3)
    _, indices = MemoryBankIndex(bank, kind="pruned").search(queries, 1)
    np.testing.assert_array_equal(indices[:, 0], np.arange(100))
