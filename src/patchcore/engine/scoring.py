"""From nearest-neighbour distances to patch scores, image scores and anomaly maps (SPEC section 5)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .index import DISTANCES, MemoryBankIndex

__all__ = ["anomaly_maps", "image_scores", "patch_scores", "reweighted_image_scores"]


def patch_scores(squared_distances: np.ndarray, distance: str = "euclidean") -> np.ndarray:
    """Patch score = mean over the k nearest bank vectors of the distance (Euclidean or squared L2)."""
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; known: {', '.join(DISTANCES)}")
    values = np.sqrt(squared_distances) if distance == "euclidean" else squared_distances
    return values.mean(axis=1, dtype=np.float32) if values.shape[1] > 1 else values[:, 0].copy()


def image_scores(scores: np.ndarray) -> np.ndarray:
    """Image score = max over the image's patch scores; ``scores`` is (B, gh, gw)."""
    return scores.reshape(len(scores), -1).max(axis=1)


def reweighted_image_scores(
    scores: np.ndarray,
    features: np.ndarray,
    nearest: np.ndarray,
    index: MemoryBankIndex,
    neighbourhood: int = 3,
) -> np.ndarray:
    """The paper's Eq. 7: s = (1 - exp||m_test* - m*|| / sum_{m in N_b(m*)} exp||m_test* - m||) * s*.

    m_test* is the image's most anomalous patch, m* its nearest bank vector and N_b(m*) the b nearest bank
    vectors of m* (m* included). Distances are Euclidean; the ratio is a softmax, computed stably.
    ``scores`` (B, P) patch scores, ``features`` (B*P, D) patch vectors, ``nearest`` (B*P,) bank index of
    each patch's nearest neighbour.
    """
    batch, per_image = scores.shape
    worst = scores.argmax(axis=1)
    rows = np.arange(batch) * per_image + worst
    test_vectors = features[rows]
    bank_nearest = nearest[rows]
    _, neighbours = index.search(index.bank[bank_nearest], neighbourhood)
    diffs = index.bank[neighbours] - test_vectors[:, None, :]
    distances = np.sqrt((diffs.astype(np.float64) ** 2).sum(axis=2))  # (B, b)
    # m* is one of its own neighbours; use its distance explicitly in case of duplicate bank vectors.
    own = np.sqrt(((index.bank[bank_nearest] - test_vectors).astype(np.float64) ** 2).sum(axis=1))
    log_denominator = np.logaddexp.reduce(distances, axis=1)
    weight = 1.0 - np.exp(own - log_denominator)
    return (weight * scores[np.arange(batch), worst]).astype(np.float32)


def anomaly_maps(scores: np.ndarray, size: tuple[int, int], sigma: float = 4.0) -> np.ndarray:
    """Patch scores (B, gh, gw) -> maps (B, H, W): bilinear (align_corners=False), then gaussian sigma."""
    upsampled = (
        F.interpolate(
            torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32)).unsqueeze(1),
            size=tuple(size),
            mode="bilinear",
            align_corners=False,
        )
        .squeeze(1)
        .numpy()
    )
    if sigma > 0:
        for i in range(len(upsampled)):
            upsampled[i] = ndimage.gaussian_filter(upsampled[i], sigma=sigma)
    return upsampled
