"""Exact k-nearest-neighbour search with a certified principal-component bound (``kind="pruned"``).

The distance over the first m principal components of the bank is a lower bound of the full distance (an
orthogonal rotation preserves distances; dropping coordinates can only shrink them). On PatchCore
features the first 192 of 1024 components hold most of the variance, so for a test patch only a fraction of
a percent of the bank vectors have a bound below the true nearest-neighbour distance. Per query: the prefix
dot products with the whole bank come from one matrix product (m/D of a brute-force search's work); the
exact distance of the prefix-nearest vector (k = 1; the 4 nearest for larger k) gives an upper bound u on
the k-th nearest distance; every vector whose certified lower bound is <= u is screened by a second
certified bound from a bfloat16 copy of the bank (half the bytes of a float32 row: this step is bound by
memory traffic), and what that cannot exclude gets its exact distance (float64 sum of squared
differences); the k smallest are the answer, ranked in float64 (ties: the smaller bank index).

The prefix has 192 dimensions, chosen by measurement (NOTES.md, "Exactness of the pruned coreset"): fewer
let more candidates through, more make the products larger.

The matrix product runs in bfloat16 where the CPU multiplies bf16 natively (AMX or AVX512-BF16: oneDNN,
2.5-4x float32's speed) and in float32 otherwise (``precision``). In bf16 the bound widens by what the
reduced precision can cost, computed per query and per bank vector (see :class:`PrunedExactSearch`); the
answer is the same in both modes, only the number of exact distances computed differs.
"""

from __future__ import annotations

import functools
import logging
import sys

import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from ..principal import principal_basis
from .base import GrowableRows

log = logging.getLogger(__name__)

PREFIX_DIM = 192
SEEDS = 4  # prefix-nearest candidates whose exact distances seed the upper bound
QUERY_BLOCK = 512
QUERY_CHUNKS = 16  # parallel work units per block of queries
TILE = 256  # bank rows per tile: every query of a chunk meets one tile before the next (kept in L1)
BASIS_ROWS = 8192  # rows the principal basis is computed from (an evenly strided sample)
BUILD_ROWS = 16384  # bank rows per chunk when the index is built (bounds the float64 temporaries)
RELATIVE_MARGIN = 1e-3  # float-error allowance of the float32 prefix bound, relative to the centred norms
PRECISIONS = ("auto", "bf16", "fp32")
BF16_UNIT_ROUNDOFF = 2.0**-8  # bfloat16 keeps 8 significand bits: |fl(x) - x| <= 2^-8 |x|
FP32_UNIT_ROUNDOFF = 2.0**-24


# Reassociation lets LLVM vectorise the float64 sums; no 'nnan'/'ninf' (the kernel uses inf sentinels).
_FAST = {"reassoc", "contract", "nsz", "arcp"}


BF16_FEATURES = ("amx_bf16", "avx512_bf16")  # CPU flags that make oneDNN's bf16 products fast, preferred first
DETECT = "detect"  # cpu_feature=DETECT: read this machine's flags (cpu_bf16_matmul)


def bf16_feature(cpuinfo: str) -> str | None:
    """The native bf16 feature named in a /proc/cpuinfo text: the first of ``BF16_FEATURES`` (``amx_bf16``
    before ``avx512_bf16``) among the flags of its first ``flags`` line; None when it has neither, or no
    ``flags`` line (non-x86 kernels write ``Features``)."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split()) if ":" in line else set()
            for feature in BF16_FEATURES:
                if feature in flags:
                    return feature
            return None
    return None


@functools.cache
def cpu_bf16_matmul() -> str | None:
    """This CPU's native bf16 feature (:func:`bf16_feature` of /proc/cpuinfo), or None.

    Linux with oneDNN (mkldnn) only; elsewhere None, so the search stays in float32 (always exact, and bf16
    emulated in software would be slower than float32).
    """
    if not sys.platform.startswith("linux") or not torch.backends.mkldnn.is_available():
        return None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            return bf16_feature(handle.read())
    except OSError:
        return None


def resolve_precision(precision: str, device: torch.device | str = "cpu", cpu_feature: str | None = DETECT) -> str:
    """``auto`` -> ``bf16`` on a CUDA device or a CPU with native bf16 products (``cpu_feature``, by default
    this machine's :func:`cpu_bf16_matmul`), else ``fp32``."""
    if precision not in PRECISIONS:
        raise ValueError(f"search precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if torch.device(device).type == "cuda":
        return "bf16"  # pragma: no cover - no GPU here
    feature = cpu_bf16_matmul() if cpu_feature == DETECT else cpu_feature
    return "bf16" if feature is not None else "fp32"


@njit(inline="always", fastmath=_FAST)
def _squared_distance(a: np.ndarray, b: np.ndarray) -> float:
    # Sum of squared differences in float64: exact differences, no cancellation, and no float32
    # subnormals (tiny squared differences would underflow to subnormals, which are ~100x slower).
    total = 0.0
    for i in range(a.shape[0]):
        d = np.float64(a[i]) - np.float64(b[i])
        total += d * d
    return total


@njit(inline="always")
def _insert(values: np.ndarray, labels: np.ndarray, value, label: int) -> None:
    """Insert into an ascending top-k list (ties: the smaller bank index first)."""
    k = values.shape[0]
    if value > values[k - 1] or (value == values[k - 1] and label >= labels[k - 1]):
        return
    position = k - 1
    while position > 0 and (
        values[position - 1] > value or (values[position - 1] == value and labels[position - 1] > label)
    ):
        values[position] = values[position - 1]
        labels[position] = labels[position - 1]
        position -= 1
    values[position] = value
    labels[position] = label


@intrinsic
def _float32_from_bits(typingctx, bits):
    """Reinterpret a uint32 as the float32 with those bits (one LLVM bitcast, vectorisable)."""
    signature = types.float32(types.uint32)

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return signature, codegen


@njit(inline="always", fastmath=_FAST)
def _reduced_lower_bound(centred_query: np.ndarray, reduced_row: np.ndarray, residual: float) -> float:
    """A certified lower bound of ||q - b||^2 from b's bfloat16 copy b~ (centred): (||q_c - b~|| - ||b_c - b~||)^2.

    Reads 2 bytes per coordinate instead of 4; sums in float64."""
    total = 0.0
    for i in range(centred_query.shape[0]):
        # bfloat16 is the high half of a float32: widening is exact.
        bits = np.uint32(reduced_row[i]) << np.uint32(16)
        d = centred_query[i] - np.float64(_float32_from_bits(bits))  # type: ignore[call-arg]  # numba intrinsic
        total += d * d
    # (1 - 1e-12) covers the float64 error of the sum and the root; the subtraction is exact where it cancels.
    lower = np.sqrt(total) * (1.0 - 1e-12) - residual
    return lower * lower if lower > 0.0 else 0.0


def _product(row, j):  # pragma: no cover - compiled through the overload below
    raise NotImplementedError


@overload(_product, inline="always")
def _product_overload(row, j):
    """row[j] as float32: float32 products as they are, uint16 bfloat16 bits widened exactly."""
    if row.dtype == types.uint16:
        return lambda row, j: _float32_from_bits(np.uint32(row[j]) << np.uint32(16))  # type: ignore[call-arg]  # numba intrinsic
    return lambda row, j: row[j]


@njit(inline="always", fastmath=_FAST)
def _tile_estimates(row, start, n, bank_sq, limit, out) -> int:
    """Estimated prefix distances (minus the query's constant) of bank rows start..start+n into ``out``;
    returns how many are < ``limit``. One loop LLVM vectorises (an integer count is a reduction it can
    vectorise; a float min is not, in numba). ``row``: float32 products or the uint16 bits of bf16 ones."""
    products = row[start : start + n]
    squares = bank_sq[start : start + n]
    below = 0
    for i in range(n):
        estimate = squares[i] - np.float32(2.0) * _product(products, i)
        out[i] = estimate
        below += estimate < limit
    return below


@njit(inline="always", fastmath=_FAST)
def _tile_lower_bounds(row, start, n, query_part, two_r_q, two_n_q, bank_sq, margin_b, cross0, cross1, limit, out) -> int:  # fmt: skip
    """Certified lower bounds of ||q - b_j||^2 for bank rows start..start+n into ``out``; returns how many are
    <= ``limit`` (vectorised, as :func:`_tile_estimates`).

    query_part = |p_q|^2 - the query's allowance; the rest is per row: |p_b|^2 - 2 p_q.p_b - the row's
    allowance - 2 (r_q n_b + n_q r'_b) (``cross0``/``cross1``: the tile's two columns of cross_b). In float32:
    its rounding (a few ulps of |p_q|^2 + |p_b|^2) is far inside the 1e-3 relative margins."""
    products = row[start : start + n]
    squares = bank_sq[start : start + n]
    margins = margin_b[start : start + n]
    within = 0
    for i in range(n):
        bound = (
            query_part + squares[i] - np.float32(2.0) * _product(products, i) - margins[i]
            - (two_r_q * cross0[i] + two_n_q * cross1[i])
        )  # fmt: skip
        out[i] = bound
        within += bound <= limit
    return within


@njit(inline="always", fastmath=_FAST)
def _query_constants(query_sq, margin_q, cross_q, q):
    """(query_part, 2 r_q, 2 n_q) of query q for :func:`_tile_lower_bounds`."""
    return (
        np.float32(query_sq[q] - margin_q[q]),
        np.float32(2.0 * cross_q[q, 0]),
        np.float32(2.0 * cross_q[q, 1]),
    )


@njit(inline="always")
def _tile_columns(cross_b, start, n, cross0, cross1) -> None:
    for i in range(n):
        cross0[i] = cross_b[start + i, 0]
        cross1[i] = cross_b[start + i, 1]


@njit(inline="always")
def _is_seed(seed_labels, j) -> bool:
    for s in range(seed_labels.shape[0]):
        if seed_labels[s] == j:
            return True
    return False


@njit(parallel=True, cache=True, nogil=True, fastmath=_FAST)
def pruned_knn(
    queries: np.ndarray,  # (B, D) float32
    bank: np.ndarray,  # (M, D) float32
    dots: np.ndarray,  # (B, M) float32 prefix dot products, or uint16: the bits of bfloat16 products
    query_sq: np.ndarray,  # (B,) float32: squared prefix norms of the queries
    bank_sq: np.ndarray,  # (M,) float32: squared prefix norms of the bank vectors
    margin_q: np.ndarray,  # (B,) float32: per-query allowance on the prefix distance
    margin_b: np.ndarray,  # (M,) float32: per-bank-vector allowance
    cross_q: np.ndarray,  # (B, 2) float32: (r_q, n_q) of the reduced-precision allowance (zeros in fp32)
    cross_b: np.ndarray,  # (M, 2) float32: (n_b, r'_b); allowance 2 (r_q n_b + n_q r'_b)
    k: int,
    out_d2: np.ndarray,  # (B, k) float32
    out_index: np.ndarray,  # (B, k) int64
    computed: np.ndarray,  # (B,) int64: exact distances computed per query
    mean: np.ndarray,  # (D,) float32: the centre of the bfloat16 copy
    reduced: np.ndarray,  # (M, D) uint16: bfloat16 bits of the centred bank vectors
    residual: np.ndarray,  # (M,) float64: ||b_c - b~||, rounded up
    screened: np.ndarray,  # (B,) int64, out: candidates the bfloat16 copy excluded per query
) -> None:
    """Each query's k nearest bank rows, exact (float64 distances, ties to the smaller index).

    Per chunk of queries (one parallel work unit), the bank is walked in tiles of ``TILE`` rows, every query
    of the chunk against one tile before the next (the tile's per-row data stays in the L1 cache; only the
    products stream from memory), in two passes:
    1. seeds: the ``seeds`` smallest estimated prefix distances (k = 1: the smallest); their exact
       distances give each query an upper bound of its k-th nearest distance;
    2. every row whose certified lower bound is <= the query's current k-th distance: screened by the
       bfloat16 copy's bound (strictly above the k-th distance with a 1e-9 margin: it cannot enter, not
       even on a tie), else its exact distance. A tile with no bound at or below it is skipped whole.
    The answer does not depend on the order: any row that can be among the k nearest (by distance, then
    index) is never excluded, so the result is the float64 brute force's."""
    n_queries, n_bank = dots.shape
    dim = queries.shape[1]
    seeds = min(max(SEEDS, k), n_bank) if k > 1 else 1
    per_chunk = (n_queries + QUERY_CHUNKS - 1) // QUERY_CHUNKS
    for c in prange(QUERY_CHUNKS):
        first = c * per_chunk
        n_chunk = min(per_chunk, n_queries - first)
        if n_chunk <= 0:
            continue
        buffer = np.empty(TILE, dtype=np.float32)
        cross0 = np.empty(TILE, dtype=np.float32)
        cross1 = np.empty(TILE, dtype=np.float32)
        seed_values = np.full((n_chunk, seeds), np.inf, dtype=np.float32)
        seed_labels = np.full((n_chunk, seeds), n_bank, dtype=np.int64)
        # 1. Seeds. A later row never displaces an equal estimate (ties: the smaller index, as _insert).
        for start in range(0, n_bank, TILE):
            n = min(TILE, n_bank - start)
            for i in range(n_chunk):
                row = dots[first + i]
                if _tile_estimates(row, start, n, bank_sq, seed_values[i, seeds - 1], buffer) > 0:
                    for t in range(n):
                        if buffer[t] < seed_values[i, seeds - 1]:
                            _insert(seed_values[i], seed_labels[i], buffer[t], start + t)
        best = np.full((n_chunk, k), np.inf, dtype=np.float64)
        best_labels = np.full((n_chunk, k), n_bank, dtype=np.int64)
        centred = np.empty((n_chunk, dim), dtype=np.float64)
        for i in range(n_chunk):
            q = first + i
            for s in range(seeds):
                j = seed_labels[i, s]
                _insert(best[i], best_labels[i], _squared_distance(queries[q], bank[j]), j)
            computed[q] = seeds
            screened[q] = 0
            for d in range(dim):
                centred[i, d] = np.float64(queries[q, d]) - np.float64(mean[d])  # exact, or within 2^-53
        # 2. Candidates: the certified bound, then the bfloat16 screen, then the exact distance.
        for start in range(0, n_bank, TILE):
            n = min(TILE, n_bank - start)
            _tile_columns(cross_b, start, n, cross0, cross1)
            for i in range(n_chunk):
                q = first + i
                query_part, two_r_q, two_n_q = _query_constants(query_sq, margin_q, cross_q, q)
                if not _tile_lower_bounds(
                    dots[q], start, n, query_part, two_r_q, two_n_q, bank_sq, margin_b, cross0, cross1,
                    best[i, k - 1], buffer,
                ):  # fmt: skip
                    continue
                for t in range(n):
                    if buffer[t] <= best[i, k - 1]:
                        j = start + t
                        if _is_seed(seed_labels[i], j):
                            continue
                        if _reduced_lower_bound(centred[i], reduced[j], residual[j]) > best[i, k - 1] * (1 + 1e-9):
                            screened[q] += 1
                            continue
                        computed[q] += 1
                        _insert(best[i], best_labels[i], _squared_distance(queries[q], bank[j]), j)
        for i in range(n_chunk):
            for s in range(k):
                out_d2[first + i, s] = best[i, s]
                out_index[first + i, s] = best_labels[i, s]


class PrunedExactSearch:
    """Exact L2 k-NN over a bank, pruned by a principal-component prefix bound; grows in place.

    ``precision``: ``auto`` (bf16 where the CPU multiplies it natively, see :func:`cpu_bf16_matmul`),
    ``bf16`` or ``fp32``; the result is the same, only the speed differs. ``cpu_feature``: the CPU's native
    bf16 feature as :func:`bf16_feature` names it (None: none); by default read from this machine.

    The bf16 allowance. With p, b the float32 prefixes and p~, b~ their bf16 roundings, the product returns
    fl(p~.b~) (float32 accumulation of exact bf16 products, then rounded to bf16), and
    |p.b - fl(p~.b~)| <= |p - p~| |b| + |p~| |b - b~| + (gamma + u_bf16 (1 + gamma)) |p~| |b~|
    (Cauchy-Schwarz; gamma = 2m u_fp32 covers the accumulation, u_bf16 = 2^-8 the output rounding). Every
    factor is a per-vector norm, computed in float64 and rounded up, so the allowance on the squared distance,
    2 (r_q n_b + n_q r'_b) with r'_b = r_b + (gamma + u_bf16(1 + gamma)) n_b, is a certified one.

    Growing (:meth:`add`). Every per-row quantity (the prefix, its bf16 copy, the bf16 copy of the centred
    row and its residual, the margins) depends on that row and on the mean and basis fixed at build time,
    nothing else; added rows are projected on that basis. The bound needs no more: for any orthonormal
    basis and any centre, the distance over a subset of the rotated coordinates is at most the full
    distance, whether or not the basis is the principal one of the rows it is applied to (a basis that fits
    the added rows less well only prunes less). :meth:`truncate` drops the last rows; what stays is what the
    index held before they were added, bit for bit.
    """

    def __init__(
        self, bank: np.ndarray, prefix_dim: int = PREFIX_DIM, precision: str = "auto", cpu_feature: str | None = DETECT
    ):
        feature = cpu_bf16_matmul() if cpu_feature == DETECT else cpu_feature
        self.precision = resolve_precision(precision, cpu_feature=feature)
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        # The basis from an evenly strided sample of at most BASIS_ROWS rows: any orthonormal basis and any
        # centre give a certified bound (see the class doc), and a sample's principal directions prune
        # almost as well (measured, NOTES.md issue 22) at a fraction of the float64 covariance's cost.
        sample = bank[:: max(1, -(-len(bank) // BASIS_ROWS))]
        self._mean64, basis = principal_basis(torch.from_numpy(sample), prefix_dim)
        self._basis64 = basis
        self.basis = basis.float().contiguous()
        self.mean32 = self._mean64.float()
        self.mean_np = self.mean32.numpy()
        self._mean_of_32 = self.mean32.double()
        n, dim = bank.shape
        self.dim = basis.shape[1]
        unit = FP32_UNIT_ROUNDOFF
        gamma = dim * unit / (1 - dim * unit)
        self.projection_error = (np.sqrt(self.dim) * (gamma + unit) + unit) * (1 + 1e-6)
        self._bank = GrowableRows(bank)
        # Per-row data, one buffer each (filled chunk by chunk: float64 temporaries stay one chunk).
        fields = {
            "prefix": ((self.dim,), np.float32),
            "prefix_sq": ((), np.float32),
            "margin": ((), np.float32),
            "reduced": ((dim,), np.uint16),
            "residual": ((), np.float64),
            "cross": ((2,), np.float32),
        }
        if self.precision == "bf16":
            fields["prefix_bf16"] = ((self.dim,), np.uint16)
        self._rows = {name: GrowableRows.allocate(n, shape, dtype) for name, (shape, dtype) in fields.items()}
        for start in range(0, n, BUILD_ROWS):
            data = self._row_data(bank[start : start + BUILD_ROWS])
            for name, values in data.items():
                self._rows[name].view[start : start + len(values)] = values
        log.info(
            "exact search: %s prefix products (CPU bf16 support: %s%s), float64 re-ranking of what the "
            "certified bound cannot exclude",
            self.precision,
            feature or "none",
            "" if precision == "auto" else f"; precision={precision} asked",
        )
        self.last_exact_fraction = 0.0
        self.last_screened_fraction = 0.0

    def _row_data(self, rows32: np.ndarray) -> dict[str, np.ndarray]:
        """The per-row quantities of float32 ``rows32`` (one chunk), as the search reads them."""
        rows = torch.from_numpy(rows32).double()
        centred = rows - self._mean64
        prefix = (centred @ self._basis64).float()
        # The bank's prefix is computed in float64: its float32 rounding, and the float32 products and sums
        # of the squared-distance formula, err by far less than 1e-3 of the centred squared norms (the
        # query's float32 projection has its own worst-case allowance, see search).
        margin = (RELATIVE_MARGIN * (centred**2).sum(1) + 1e-6).float()
        # A bfloat16 copy of the centred bank screens the candidates the prefix bound leaves: half the bytes
        # of a float32 row per candidate (the search is bound by memory traffic there). Its residual
        # ||b_c - b~|| is exact in float64 (float32 inputs), rounded up; centring at the float32 mean.
        centred_exact = rows - self._mean_of_32
        reduced = centred_exact.to(torch.bfloat16)
        residual = torch.linalg.vector_norm(centred_exact - reduced.double(), dim=1) * (1 + 1e-9)
        data = {
            "prefix": prefix.numpy(),
            "prefix_sq": (prefix.double() ** 2).sum(1).float().numpy(),
            "margin": margin.numpy(),
            "reduced": reduced.view(torch.uint16).numpy(),
            "residual": residual.numpy(),
        }
        if self.precision == "bf16":
            prefix_bf16 = prefix.to(torch.bfloat16)
            data["prefix_bf16"] = prefix_bf16.view(torch.uint16).numpy()
            data["cross"] = _cross_terms(prefix, prefix_bf16, self.dim, bank_side=True)
        else:
            # (|p_b|, 0): the per-pair term of the projection allowance; no bf16 rounding in float32.
            norms = torch.linalg.vector_norm(prefix.double(), dim=1) * (1 + 1e-6)
            data["cross"] = torch.stack([norms, torch.zeros_like(norms)], dim=1).float().numpy()
        return data

    # The per-row data, as the kernel reads it (views of the first len(self) rows).
    @property
    def bank(self) -> np.ndarray:
        return self._bank.view

    @property
    def bank_prefix(self) -> torch.Tensor:
        return torch.from_numpy(self._rows["prefix"].view)

    @property
    def bank_prefix_bf16(self) -> torch.Tensor | None:
        if "prefix_bf16" not in self._rows:
            return None
        return torch.from_numpy(self._rows["prefix_bf16"].view).view(torch.bfloat16)

    @property
    def bank_prefix_sq(self) -> np.ndarray:
        return self._rows["prefix_sq"].view

    @property
    def margin_bank(self) -> np.ndarray:
        return self._rows["margin"].view

    @property
    def reduced_bank(self) -> np.ndarray:
        return self._rows["reduced"].view

    @property
    def reduced_residual(self) -> np.ndarray:
        return self._rows["residual"].view

    @property
    def cross_bank(self) -> np.ndarray:
        return self._rows["cross"].view

    def __len__(self) -> int:
        return len(self._bank)

    def add(self, rows: np.ndarray) -> None:
        """Append float32 (n, D) rows: projected on the build-time basis, the rows already held untouched."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.bank.shape[1]:
            raise ValueError(f"rows must have shape (n, {self.bank.shape[1]}), got {rows.shape}")
        for start in range(0, len(rows), BUILD_ROWS):
            chunk = rows[start : start + BUILD_ROWS]
            for name, values in self._row_data(chunk).items():
                self._rows[name].append(values)
            self._bank.append(chunk)

    def truncate(self, n_rows: int) -> None:
        """Keep the first ``n_rows`` rows (O(1): the buffers keep their capacity)."""
        if not 1 <= n_rows <= len(self):
            raise ValueError(f"n_rows must be in [1, {len(self)}], got {n_rows}")
        self._bank.truncate(n_rows)
        for buffer in self._rows.values():
            buffer.truncate(n_rows)

    def _block_inputs(self, block: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The kernel's per-query inputs for a block of float32 queries: (dots, query_sq, margin_q, cross_q)."""
        centred = block - self.mean32
        prefix = centred @ self.basis
        prefix_sq = (prefix.double() ** 2).sum(1)
        query_sq = prefix_sq.float().numpy()
        centred_sq = (centred.double() ** 2).sum(1)
        # The float32 projection errs by at most E_q = |q_c| (sqrt(m) (gamma_D + u) + u) (the centring,
        # the basis' float32 rounding and a D-term dot product per coordinate, worst case); the squared
        # prefix distance then by at most 2 E_q (|p_q| + |p_b|): the |p_q| part joins the query's
        # allowance, the |p_b| part the per-pair term through cross_q[:, 0] x |p_b| (cross_bank[:, 0]).
        error = torch.sqrt(centred_sq) * self.projection_error
        margin_q = (RELATIVE_MARGIN * centred_sq + 1e-6 + 2 * error * torch.sqrt(prefix_sq)).float().numpy()
        bank_prefix_bf16 = self.bank_prefix_bf16
        if bank_prefix_bf16 is not None:
            reduced = prefix.to(torch.bfloat16)
            dots = (reduced @ bank_prefix_bf16.T).view(torch.uint16).numpy()
            cross_q = _cross_terms(prefix, reduced, self.dim, bank_side=False)
        else:
            dots = (prefix @ self.bank_prefix.T).numpy()
            cross_q = np.zeros((len(block), 2), dtype=np.float32)
        cross_q[:, 0] += (error * (1 + 1e-6)).float().numpy()
        return dots, query_sq, margin_q, cross_q

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(int(k), len(self.bank))
        n = len(queries)
        out_d2 = np.empty((n, k), dtype=np.float32)
        out_index = np.empty((n, k), dtype=np.int64)
        computed = np.empty(n, dtype=np.int64)
        screened = np.empty(n, dtype=np.int64)
        for start in range(0, n, QUERY_BLOCK):
            block = torch.from_numpy(queries[start : start + QUERY_BLOCK])
            dots, query_sq, margin_q, cross_q = self._block_inputs(block)
            stop = start + len(block)
            pruned_knn(
                block.numpy(), self.bank, dots, query_sq, self.bank_prefix_sq, margin_q, self.margin_bank,
                cross_q, self.cross_bank, k,
                out_d2[start:stop], out_index[start:stop], computed[start:stop], self.mean_np,
                self.reduced_bank, self.reduced_residual, screened[start:stop],
            )  # fmt: skip
        self.last_exact_fraction = float(computed.sum()) / max(1, n * len(self.bank))
        self.last_screened_fraction = float(screened.sum()) / max(1, n * len(self.bank))
        return out_d2, out_index

    def first_level_bounds(self, queries: np.ndarray) -> np.ndarray:
        """(n, M) float32: the certified lower bound of ||q - b||^2 that the kernel's first pass computes for
        every (query, bank row) pair, by the kernel's own code (:func:`prefix_lower_bounds`). For tests and
        diagnostics: every entry must be <= the exact squared distance."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        out = np.empty((len(queries), len(self.bank)), dtype=np.float32)
        for start in range(0, len(queries), QUERY_BLOCK):
            block = torch.from_numpy(queries[start : start + QUERY_BLOCK])
            dots, query_sq, margin_q, cross_q = self._block_inputs(block)
            prefix_lower_bounds(
                dots, query_sq, self.bank_prefix_sq, margin_q, self.margin_bank, cross_q, self.cross_bank,
                out[start : start + len(block)],
            )  # fmt: skip
        return out

    def reduced_lower_bounds(self, query: np.ndarray) -> np.ndarray:
        """(M,) float64: the second-level bound (||q_c - b~|| - ||b_c - b~||)^2 from the bfloat16 copy, for one
        query and every bank row, by the kernel's own code. Every entry must be <= the exact squared distance."""
        centred = np.asarray(query, dtype=np.float32).astype(np.float64) - self.mean_np.astype(np.float64)
        return _reduced_lower_bounds(centred, self.reduced_bank, self.reduced_residual)


@njit(cache=True, nogil=True, fastmath=_FAST)
def prefix_lower_bounds(dots, query_sq, bank_sq, margin_q, margin_b, cross_q, cross_b, out) -> None:  # fmt: skip
    """The first-level bounds of :func:`pruned_knn` (its :func:`_tile_lower_bounds`) for every query, into out (B, M)."""
    n_bank = bank_sq.shape[0]
    cross0 = np.empty(TILE, dtype=np.float32)
    cross1 = np.empty(TILE, dtype=np.float32)
    for start in range(0, n_bank, TILE):
        n = min(TILE, n_bank - start)
        _tile_columns(cross_b, start, n, cross0, cross1)
        for q in range(dots.shape[0]):
            query_part, two_r_q, two_n_q = _query_constants(query_sq, margin_q, cross_q, q)
            _tile_lower_bounds(
                dots[q], start, n, query_part, two_r_q, two_n_q, bank_sq, margin_b, cross0, cross1, np.inf,
                out[q, start : start + n],
            )  # fmt: skip


@njit(cache=True, fastmath=_FAST)
def _reduced_lower_bounds(centred_query, reduced, residual):  # fmt: skip
    out = np.empty(reduced.shape[0], dtype=np.float64)
    for j in range(reduced.shape[0]):
        out[j] = _reduced_lower_bound(centred_query, reduced[j], residual[j])
    return out


def _cross_terms(prefix: torch.Tensor, reduced: torch.Tensor, dim: int, bank_side: bool) -> np.ndarray:
    """Per-vector factors of the bf16 allowance, rounded up: queries (r_q, n_q); bank vectors (n_b, r'_b)."""
    exact = prefix.double()
    rounded = reduced.double()
    residual = torch.linalg.vector_norm(exact - rounded, dim=1)
    norm = torch.maximum(torch.linalg.vector_norm(exact, dim=1), torch.linalg.vector_norm(rounded, dim=1))
    up = 1 + 1e-6  # float64 norms and the float32 storage below: round the factors up
    if not bank_side:
        return (torch.stack([residual, norm], dim=1) * up).float().numpy()
    gamma = 2 * dim * FP32_UNIT_ROUNDOFF / (1 - 2 * dim * FP32_UNIT_ROUNDOFF)
    product = gamma + BF16_UNIT_ROUNDOFF * (1 + gamma)
    return (torch.stack([norm, residual + product * norm], dim=1) * up).float().numpy()


__all__ = [
    "BF16_FEATURES",
    "DETECT",
    "PRECISIONS",
    "PrunedExactSearch",
    "bf16_feature",
    "cpu_bf16_matmul",
    "prefix_lower_bounds",
    "pruned_knn",
    "resolve_precision",
]
