"""Principal components of a set of rows, in float64, streamed in chunks (the pruning bounds use them)."""

from __future__ import annotations

import torch

__all__ = ["principal_basis"]


def principal_basis(rows: torch.Tensor, m: int, chunk_rows: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean (D,) and the first ``m`` principal directions (D, m), orthonormal columns, both float64.

    Two chunked passes (mean, then covariance), so memory beyond the (D, D) covariance stays one chunk.
    """
    n, dim = rows.shape
    mean = torch.zeros(dim, dtype=torch.float64)
    for start in range(0, n, chunk_rows):
        mean += rows[start : start + chunk_rows].double().sum(0)
    mean /= n
    covariance = torch.zeros((dim, dim), dtype=torch.float64)
    for start in range(0, n, chunk_rows):
        centred = rows[start : start + chunk_rows].double() - mean
        covariance += centred.T @ centred
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    return mean, eigenvectors[:, torch.argsort(eigenvalues, descending=True)[: min(m, dim)]]
