"""The search kinds behind one protocol: the registry, the device rule, and growing / shrinking the bank in
place (``add`` / ``truncate``) with exact kinds staying exact (float64 brute force as the oracle)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from patchcore.engine.index import INDEX_KINDS, MemoryBankIndex
from patchcore.engine.params import param
from patchcore.engine.search import (
    SEARCH_KINDS,
    Devices,
    GrowableRows,
    SearchKind,
    SearchSettings,
    make_search,
    register_search_kind,
    search_kind,
)
from patchcore.engine.search.pruned_kernel import PREFIX_DIM, PrunedExactSearch

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(autouse=True)
def restore_faiss_threads():
    """``threads=1`` (deterministic HNSW graphs) sets FAISS's process-wide thread count: put it back."""
    import faiss

    before = faiss.omp_get_max_threads()
    yield
    faiss.omp_set_num_threads(before)

DIM = 256  # above the pruned kernel's 192-dim prefix, so its bound is a real (partial) one
U32 = 2.0**-24  # float32 unit roundoff
U64 = 2.0**-53

# (index kind, search_precision): every exact kind, the pruned one in both product precisions.
EXACT = [("flat", "auto"), ("pruned", "fp32"), ("pruned", "bf16"), ("torch", "auto")]


def patch_like(n: int, seed: int, dim: int = DIM, offset: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """Clustered rows with a decaying spectrum (most variance in the leading components), as patch features."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, size=(max(2, n // 100), dim))
    points = centres[rng.integers(len(centres), size=n)] + rng.normal(0.0, 0.3, size=(n, dim))
    return (points * 0.97 ** np.arange(dim) * scale + offset).astype(np.float32)


def off_basis(n: int, seed: int) -> np.ndarray:
    """Rows whose energy lies in the trailing coordinates, which the build bank's principal prefix drops:
    the worst case for a basis fixed at build time (its prefix sees almost nothing of them)."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(0.0, 0.01, size=(n, DIM))
    rows[:, PREFIX_DIM:] += rng.normal(0.0, 3.0, size=(n, DIM - PREFIX_DIM))
    return rows.astype(np.float32)


def float64_distances(bank: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Sums of squared differences in float64 (no expansion: near-ties keep their order)."""
    b = bank.astype(np.float64)
    return np.stack([((b - q) ** 2).sum(1) for q in queries.astype(np.float64)])


def float64_knn(bank: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    distances = float64_distances(bank, queries)
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]  # ties: the smaller index
    return np.take_along_axis(distances, order, axis=1), order


def grown_bank(seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """A build bank and three batches to add: new rows, duplicates of held rows plus near-ties, off-basis rows."""
    bank = patch_like(1500, seed)
    rng = np.random.default_rng(seed + 1)
    fresh = patch_like(300, seed + 2)
    duplicates = bank[:40].copy()  # exact ties with rows 0..39, across the build / add boundary
    near = bank[40:80] * np.float32(1 + 1e-6)  # within 1e-6 relative of rows 40..79
    far = off_basis(200, seed + 3)
    return bank, [fresh, np.concatenate([duplicates, near, fresh[:10]]), far + rng.normal(0, 0.1, (1, DIM)).astype(np.float32)]


def queries_for(bank: np.ndarray, seed: int, n: int = 150) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picked = bank[rng.choice(len(bank), n, replace=False)]
    return picked + rng.normal(0.0, 0.05, size=picked.shape).astype(np.float32)


def assert_exact_answer(kind: str, index: MemoryBankIndex, bank: np.ndarray, queries: np.ndarray, k: int) -> None:
    """Exact kinds against float64 brute force over the whole (grown) bank.

    pruned and torch rank in float64 (ties: the smaller index) and store float64 sums as float32: the same
    indices, distances within 2^-24 (float32 rounding) + 2 D 2^-53 (the two float64 sums) relative. flat is
    FAISS's float32 ||q||^2 + ||b||^2 - 2 q.b: each distance errs by at most gamma (|q| + |b|)^2,
    gamma = (D + 2) 2^-24 (dot products and norms of D terms, Higham's gamma_n bound), so a neighbour may
    swap only with one whose true distance lies within twice that: the found rows' float64 distances must
    equal the true k smallest within that tolerance.
    """
    distances, indices = index.search(queries, k)
    true_d, true_i = float64_knn(bank, queries, k)
    assert distances.dtype == np.float32 and indices.dtype == np.int64
    if kind == "flat":
        norms = np.linalg.norm(bank.astype(np.float64), axis=1).max() + np.linalg.norm(queries.astype(np.float64), axis=1)
        tolerance = ((DIM + 2) * U32 * norms**2)[:, None]
        found = np.take_along_axis(float64_distances(bank, queries), indices, axis=1)
        assert np.all(np.abs(found - true_d) <= 2 * tolerance)
        assert np.all(np.abs(distances - true_d) <= tolerance)
        assert all(len(set(row)) == k for row in indices.tolist())
    else:
        np.testing.assert_array_equal(indices, true_i)
        assert np.all(np.abs(distances - true_d) <= (U32 + 2 * DIM * U64) * true_d)


# --------------------------------------------------------------------------- registry and device rule


def test_the_registry_lists_every_kind_and_the_parameter_takes_its_choices_from_it():
    """Catches a kind list written twice (the parameter accepting a kind the registry lacks, or not one it has)."""
    assert INDEX_KINDS == tuple(SEARCH_KINDS) == ("flat", "pruned", "ivf", "hnsw", "torch")
    index_kind = param("index_kind")
    assert all(index_kind.constraint.test(name) for name in SEARCH_KINDS)
    assert not index_kind.constraint.test("lsh")
    assert {name for name, cls in SEARCH_KINDS.items() if cls.exact} == {"flat", "pruned", "torch"}
    for name, cls in SEARCH_KINDS.items():
        assert issubclass(cls, SearchKind) and cls.name == name


def test_a_new_kind_is_one_registered_class():
    """A kind defined outside the package (a float64 brute force) is built by name through the facade,
    grows and answers; registering a second class under a taken name is refused."""

    class BruteForce(SearchKind):
        name = "test_brute_force"
        exact = True

        def __init__(self, bank, settings, device="cpu"):
            self._rows = GrowableRows(bank)

        @property
        def bank(self):
            return self._rows.view

        def search(self, queries, k):
            distances, indices = float64_knn(self.bank, queries, k)
            return distances.astype(np.float32), indices

        def add(self, rows):
            self._rows.append(rows)

        def truncate(self, n_rows):
            self._rows.truncate(n_rows)

    register_search_kind(BruteForce)
    try:
        bank = patch_like(200, 1, dim=16)
        index = MemoryBankIndex(bank, kind="test_brute_force")
        index.add(bank[:5] + 1)
        assert len(index) == 205 and index.searcher.name == "test_brute_force"
        _, indices = index.search(bank[:5] + 1, 1)
        np.testing.assert_array_equal(indices[:, 0], np.arange(200, 205))

        class Impostor(BruteForce):
            pass

        with pytest.raises(ValueError, match="already registered"):
            register_search_kind(Impostor)
    finally:
        del SEARCH_KINDS["test_brute_force"]
    with pytest.raises(ValueError, match="unknown index kind 'test_brute_force'"):
        search_kind("test_brute_force")


@pytest.mark.parametrize(
    "kind, devices, expected",
    [
        ("flat", Devices(torch_cuda=True, faiss_gpu=True), ("flat", "cuda")),
        ("flat", Devices(torch_cuda=True, faiss_gpu=False), ("torch", "cuda")),
        ("flat", Devices(), ("flat", "cpu")),
        ("pruned", Devices(torch_cuda=True, faiss_gpu=True), ("torch", "cuda")),
        ("pruned", Devices(), ("pruned", "cpu")),
        ("ivf", Devices(torch_cuda=True, faiss_gpu=True), ("ivf", "cuda")),
        ("ivf", Devices(torch_cuda=True, faiss_gpu=False), ("ivf", "cpu")),
        ("hnsw", Devices(torch_cuda=True, faiss_gpu=True), ("hnsw", "cpu")),
        ("torch", Devices(torch_cuda=True), ("torch", "cuda")),
        ("torch", Devices(), ("torch", "cpu")),
    ],
)
def test_the_device_rule_on_a_cuda_model(kind, devices, expected):
    """The documented rule, kind by kind (today's behaviour: flat -> FAISS GPU, else torch on CUDA; pruned
    -> torch on CUDA; ivf -> FAISS GPU or CPU; hnsw -> CPU); without use_gpu every kind stays itself on the CPU."""
    placement = search_kind(kind).place(True, devices)
    assert (placement.kind, placement.device) == expected
    assert placement.reason
    assert (search_kind(kind).place(False, devices).kind, search_kind(kind).place(False, devices).device) == (
        kind,
        "cpu",
    )


def test_the_kind_that_runs_is_logged_at_info(caplog):
    """The decision is never silent: the log names the kind asked, the kind built, the device and the reason."""
    bank = patch_like(300, 2, dim=32)
    with caplog.at_level(logging.INFO, logger="patchcore.engine.search"):
        searcher = make_search("pruned", bank, SearchSettings(use_gpu=True), Devices(torch_cuda=False))
    assert searcher.name == "pruned"
    assert "index_kind=pruned -> 'pruned' on cpu" in caplog.text
    assert "no CUDA device visible to torch" in caplog.text


def test_a_plain_cpu_build_of_the_kind_asked_for_is_logged_at_debug_only(caplog):
    """Catches an INFO line on every index build (it would land on the stderr of predict / update, where a
    refusal must be one line), and a DEBUG line that no longer names the decision."""
    bank = patch_like(300, 2, dim=32)
    with caplog.at_level(logging.INFO, logger="patchcore.engine.search"):
        make_search("flat", bank, SearchSettings(use_gpu=False), Devices())
    assert "nearest-neighbour search" not in caplog.text
    with caplog.at_level(logging.DEBUG, logger="patchcore.engine.search"):
        make_search("flat", bank, SearchSettings(use_gpu=False), Devices())
    assert "index_kind=flat -> 'flat' on cpu" in caplog.text


# --------------------------------------------------------------------------- add


@pytest.mark.parametrize("kind, precision", EXACT)
def test_exact_kinds_stay_exact_after_several_adds(kind, precision):
    """After three adds (new rows; duplicates of held rows and 1e-6 near-ties; rows off the build basis) the
    answer over the whole grown bank is float64 brute force's. Catches an add that forgets a per-row array
    (the prefix, its bf16 copy, norms, residuals), projects on a re-fitted basis without re-projecting the
    bank, or offsets the new indices."""
    bank, batches = grown_bank()
    index = MemoryBankIndex(bank, kind=kind, search_precision=precision)
    grown = bank
    for batch in batches:
        index.add(batch)
        grown = np.concatenate([grown, batch])
        assert len(index) == len(grown)
        np.testing.assert_array_equal(index.bank, grown)
    queries = np.concatenate([queries_for(grown, 3), batches[1][:40] + np.float32(1e-3), batches[2][:50]])
    for k in (1, 3):
        assert_exact_answer(kind, index, grown, queries, k)
    if kind != "flat":  # duplicates: row j and its copy 1500 + 300 + j tie exactly; the smaller index first
        _, indices = index.search(bank[:40] + np.float32(1e-3), 2)
        np.testing.assert_array_equal(indices, np.stack([np.arange(40), np.arange(40) + 1800], 1))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_pruned_bounds_stay_certified_for_rows_off_the_build_basis(precision):
    """The basis is fixed at build time; rows added later, whose energy lies where the prefix does not look,
    still get first- and second-level bounds <= their float64 distance, for every (query, row) pair (the
    kernel's own bound code). Catches an add that reuses the build bank's margins or a stale centre."""
    bank = patch_like(800, 4, offset=5.0)
    search = PrunedExactSearch(bank, precision=precision)
    basis = search.basis
    far = off_basis(300, 5) + np.float32(5.0)
    search.add(far[:150])
    search.add(far[150:])
    assert search.basis is basis and len(search) == 1100  # not re-fitted
    grown = np.concatenate([bank, far])
    rng = np.random.default_rng(6)
    queries = np.concatenate([grown[rng.choice(len(grown), 60)], far[:20] + np.float32(1e-3), far[20:40] * 2])
    exact = float64_distances(grown, queries)
    assert np.all(search.first_level_bounds(queries) <= exact)
    for query, row in zip(queries[::7], exact[::7], strict=True):
        assert np.all(search.reduced_lower_bounds(query) <= row * (1 + 1e-9))
    distances, indices = search.search(queries, 2)
    true_d, true_i = float64_knn(grown, queries, 2)
    np.testing.assert_array_equal(indices, true_i)
    np.testing.assert_allclose(distances, true_d, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_kinds_after_adds_never_score_below_exact(kind):
    """Added rows are found (each added row is its own nearest neighbour at distance ~0) and no distance
    is below the float64 exact one: the rows returned are real rows."""
    bank, batches = grown_bank(seed=10)
    index = MemoryBankIndex(bank, kind=kind, nprobe=4, ef_search=32, threads=1)
    nlist = index.nlist
    faiss_index = index.searcher.index
    grown = bank
    for batch in batches:
        index.add(batch)
        grown = np.concatenate([grown, batch])
    assert index.searcher.index is faiss_index and index.nlist == nlist  # grown in place, cells not retrained
    queries = np.concatenate([queries_for(grown, 11), batches[0][:50], batches[2][:50]])
    distances, indices = index.search(queries, 3)
    true_d, _ = float64_knn(grown, queries, 3)
    assert (indices >= 0).all() and (indices < len(grown)).all()
    assert np.all(distances >= true_d * (1 - (DIM + 2) * U32 * 4) - 1e-6)
    found = np.take_along_axis(float64_distances(grown, queries), indices, axis=1)
    np.testing.assert_allclose(distances, found, rtol=1e-4, atol=1e-4)
    # An added row queried as it is: IVF probes the cell it was filed in (its nearest centroid) first, so
    # every one finds itself; HNSW's greedy walk almost always does on clustered rows (not on the isotropic
    # noise of the off-basis batch, where a graph built in one go misses about half too).
    added = np.concatenate([batches[0][10:], batches[2]]) if kind == "ivf" else batches[0][10:]
    own, _ = index.search(added, 1)
    assert np.mean(own[:, 0] <= 1e-4) >= (1.0 if kind == "ivf" else 0.9)


def test_add_refuses_rows_of_the_wrong_width_or_with_nan_and_ignores_none():
    bank = patch_like(300, 12, dim=32)
    index = MemoryBankIndex(bank, kind="pruned")
    with pytest.raises(ValueError, match=r"rows to add must have shape \(n, 32\)"):
        index.add(np.zeros((2, 31), dtype=np.float32))
    with pytest.raises(ValueError, match="NaN or infinite"):
        index.add(np.full((2, 32), np.nan, dtype=np.float32))
    index.add(np.zeros((0, 32), dtype=np.float32))
    assert len(index) == 300


# --------------------------------------------------------------------------- truncate


@pytest.mark.parametrize("kind, precision", [*EXACT, ("ivf", "auto")])
def test_truncate_answers_as_before_the_rows_were_added_bit_for_bit(kind, precision):
    """Undo: after two adds, truncating to the size after the first add (then to the build size) gives the
    answers of an index that saw only those rows, bit for bit; the caller's bank array is never written."""
    bank, batches = grown_bank(seed=20)
    original = bank.copy()
    queries = queries_for(np.concatenate([bank, *batches]), 21)
    reference = MemoryBankIndex(bank, kind=kind, search_precision=precision, nprobe=2, threads=1)
    before = reference.search(queries, 3)
    reference.add(batches[0])
    after_first = reference.search(queries, 3)

    index = MemoryBankIndex(bank, kind=kind, search_precision=precision, nprobe=2, threads=1)
    index.add(batches[0])
    index.add(batches[1])
    assert not np.array_equal(index.search(queries, 3)[1], after_first[1])  # the second add changed answers
    index.truncate(len(bank) + len(batches[0]))
    for got, want in zip(index.search(queries, 3), after_first, strict=True):
        np.testing.assert_array_equal(got, want)
    index.truncate(len(bank))
    for got, want in zip(index.search(queries, 3), before, strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(index.bank, bank)
    index.add(batches[2])  # growing again after a truncation writes into the index's own buffer
    np.testing.assert_array_equal(bank, original)
    assert len(index) == len(bank) + len(batches[2])


def test_hnsw_truncate_rebuilds_a_graph_over_the_kept_rows():
    bank, batches = grown_bank(seed=30)
    index = MemoryBankIndex(bank, kind="hnsw", threads=1)
    index.add(batches[0])
    index.truncate(len(bank))
    assert len(index) == len(bank) and index.searcher.index.ntotal == len(bank)
    _, indices = index.search(queries_for(bank, 31), 2)
    assert (indices >= 0).all() and (indices < len(bank)).all()


@pytest.mark.parametrize("n_rows", [0, 301])
def test_truncate_refuses_sizes_outside_the_bank(n_rows):
    index = MemoryBankIndex(patch_like(300, 13, dim=32))
    with pytest.raises(ValueError, match=r"n_rows must be in \[1, 300\]"):
        index.truncate(n_rows)


def test_growable_rows_grow_geometrically_and_never_write_the_callers_array():
    initial = np.arange(12, dtype=np.float32).reshape(6, 2)
    rows = GrowableRows(initial)
    assert rows.view.base is initial or rows.view is initial or np.shares_memory(rows.view, initial)
    rows.truncate(4)
    rows.append(np.full((1, 2), -1, dtype=np.float32))
    np.testing.assert_array_equal(initial, np.arange(12, dtype=np.float32).reshape(6, 2))
    reallocations = 0
    for _ in range(5000):
        data = rows._data
        rows.append(np.zeros((1, 2), dtype=np.float32))
        reallocations += rows._data is not data
    assert len(rows) == 5005 and reallocations < 20  # amortised: not one copy per append
    assert rows.view.flags["C_CONTIGUOUS"] and rows.view.ctypes.data % 64 == 0
