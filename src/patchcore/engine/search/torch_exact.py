"""``torch``: exact k-nearest-neighbour search by torch matrix products (the CUDA path of ``flat`` when
FAISS has no GPU build, and of ``pruned``; on the CPU when asked for by name).

Candidates come from ||q||^2 + ||b||^2 - 2 q.b in the device's float32 matrix product (which may run in
TF32 on NVIDIA GPUs: 10-bit mantissa), then the candidates are re-ranked by float64 sums of squared
differences. The float32 estimate (on vectors centred on the bank mean) errs by at most
``RELATIVE_ERROR * (||q|| + ||b||_max)^2`` (centred norms; TF32 input
rounding 2 * 2^-11 relative on the product plus the float32 accumulation, with margin), so once the
(k + extra)-th estimate minus that allowance exceeds the k-th exact distance no bank vector outside the
candidates can be nearer; a query where that does not hold is searched by float64 brute force. Same answer
(neighbours, float64-ranked, ties to the smaller index) as :class:`PrunedExactSearch` and float64 brute force.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Devices, GrowableRows, Placement, SearchKind, SearchSettings
from .registry import register_search_kind

__all__ = ["TorchExactSearch", "TorchSearch", "squared_distances"]

RELATIVE_ERROR = 2.0**-9  # > 2 * 2^-11 (TF32 rounding of both factors) + float32 accumulation over D terms
EXTRA = 8  # candidates beyond k re-ranked in float64
CHUNK_ROWS = 1024  # queries per product; the float64 re-ranking gathers (rows, k + extra, D)


def squared_distances(
    queries: torch.Tensor, bank_t: torch.Tensor, bank_sq: torch.Tensor, query_sq: torch.Tensor | None = None
) -> torch.Tensor:
    """(R, D) queries and a (D, M) bank, both centred on the bank mean (small norms: small rounding), with
    the bank's squared norms (M,) -> (R, M) squared Euclidean distances ||q||^2 + ||b||^2 - 2 q.b by one
    matrix product: the float32 estimate this search ranks its candidates with, and the distance of the
    exported graph (``patchcore.engine.graph``). May dip below 0 by rounding. ``query_sq`` (R,): the
    queries' squared norms if already known (this search sums them in float64)."""
    if query_sq is None:
        query_sq = (queries * queries).sum(1)
    estimate = torch.addmm(bank_sq.unsqueeze(0), queries, bank_t, beta=1, alpha=-2)
    estimate += query_sq.to(estimate.dtype).unsqueeze(1)
    return estimate


class TorchExactSearch:
    """Exact L2 k-NN of a bank held on a torch device (CUDA in practice; also runs, and is tested, on CPU).

    :meth:`add` concatenates rows, centred on the build-time mean (any centre keeps the estimate's error
    bound: it is stated in the centred norms, whose maximum grows with the new rows)."""

    def __init__(self, bank: np.ndarray, device: str | torch.device = "cuda", extra: int = EXTRA):
        self.device = torch.device(device)
        self.bank = torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32)).to(self.device)
        # Estimates on centred vectors: the allowance scales with their norms, which are far smaller than
        # the raw ones when features share a large mean (centring rounds each entry once, relative 2^-24).
        self.mean = self.bank.double().mean(0).float()
        self.centred = self.bank - self.mean
        squared = (self.centred.double() ** 2).sum(1)
        self.bank_sq = squared.float()
        self.bank_norm_max = float(torch.sqrt(squared.max()))
        self.extra = int(extra)
        self.last_fallbacks = 0

    def __len__(self) -> int:
        return len(self.bank)

    def add(self, rows: np.ndarray) -> None:
        new = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).to(self.device)
        centred = new - self.mean
        squared = (centred.double() ** 2).sum(1)
        self.bank = torch.cat([self.bank, new])
        self.centred = torch.cat([self.centred, centred])
        self.bank_sq = torch.cat([self.bank_sq, squared.float()])
        if len(new):
            self.bank_norm_max = max(self.bank_norm_max, float(torch.sqrt(squared.max())))

    def truncate(self, n_rows: int) -> None:
        """Keep the first ``n_rows`` rows (slices; the norm bound is recomputed over what stays)."""
        if not 1 <= n_rows <= len(self):
            raise ValueError(f"n_rows must be in [1, {len(self)}], got {n_rows}")
        self.bank = self.bank[:n_rows]
        self.centred = self.centred[:n_rows]
        self.bank_sq = self.bank_sq[:n_rows]
        self.bank_norm_max = float(torch.sqrt((self.centred.double() ** 2).sum(1).max()))

    @torch.no_grad()
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        m = len(self.bank)
        k = min(int(k), m)
        width = min(k + self.extra, m)
        out_d2 = np.empty((len(queries), k), dtype=np.float32)
        out_index = np.empty((len(queries), k), dtype=np.int64)
        self.last_fallbacks = 0
        for start in range(0, len(queries), CHUNK_ROWS):
            q = torch.from_numpy(np.ascontiguousarray(queries[start : start + CHUNK_ROWS], np.float32))
            q = q.to(self.device)
            centred = q - self.mean
            query_sq = (centred.double() ** 2).sum(1)
            estimate = squared_distances(centred, self.centred.T, self.bank_sq, query_sq)
            approx, candidates = torch.topk(estimate, width, dim=1, largest=False, sorted=True)
            exact = ((self.bank[candidates].double() - q.double().unsqueeze(1)) ** 2).sum(2)
            # Float64 ranking; ties to the smaller bank index (sort by index, then stably by distance).
            by_index = torch.argsort(candidates, dim=1)
            candidates = torch.gather(candidates, 1, by_index)
            exact = torch.gather(exact, 1, by_index)
            order = torch.sort(exact, dim=1, stable=True).indices[:, :k]
            best_d = torch.gather(exact, 1, order)
            best_i = torch.gather(candidates, 1, order)
            allowance = RELATIVE_ERROR * (torch.sqrt(query_sq) + self.bank_norm_max) ** 2
            if width < m:
                uncertified = approx[:, -1].double() - allowance <= best_d[:, -1]
                for row in torch.nonzero(uncertified).flatten().tolist():
                    best_d[row], best_i[row] = self._brute_force(q[row], k)
                    self.last_fallbacks += 1
            stop = start + len(q)
            out_d2[start:stop] = best_d.float().cpu().numpy()
            out_index[start:stop] = best_i.cpu().numpy()
        return out_d2, out_index

    def _brute_force(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        distances = torch.cat(
            [
                ((self.bank[s : s + CHUNK_ROWS].double() - query.double()) ** 2).sum(1)
                for s in range(0, len(self.bank), CHUNK_ROWS)
            ]
        )
        order = torch.sort(distances, stable=True).indices[:k]  # stable: ties keep index order
        return distances[order], order


@register_search_kind
class TorchSearch(SearchKind):
    """The ``torch`` kind: :class:`TorchExactSearch` on CUDA when the model is on a CUDA device, else the CPU."""

    name = "torch"
    exact = True

    def __init__(self, bank: np.ndarray, settings: SearchSettings, device: str = "cpu"):
        self.kernel = TorchExactSearch(bank, device)
        self.on_gpu = self.kernel.device.type == "cuda"
        self._host_bank = GrowableRows(np.ascontiguousarray(bank, dtype=np.float32))

    @classmethod
    def place(cls, use_gpu: bool, devices: Devices) -> Placement:
        if use_gpu and devices.torch_cuda:
            return Placement("torch", "cuda", "on CUDA")
        return Placement("torch", "cpu", "on the CPU" if not use_gpu else "no CUDA device visible to torch: the CPU")

    @property
    def bank(self) -> np.ndarray:
        return self._host_bank.view

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.kernel.search(queries, k)

    def add(self, rows: np.ndarray) -> None:
        self.kernel.add(rows)
        self._host_bank.append(rows)

    def truncate(self, n_rows: int) -> None:
        self.kernel.truncate(n_rows)
        self._host_bank.truncate(n_rows)
