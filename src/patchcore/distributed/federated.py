"""Federated memory banks: clients build local coresets where their images are; a server merges them.

A client holds its images (paths on its own machine) and runs the same reduction as a shard
(``sharded.reduce_shard``): patch features stay on the client, only the local coreset vectors and the counts
(images, patches) are sent. The server reduces the union with one greedy pass to the global bank size,
optionally weighting each vector by its client's share of all training patches, and installs it in an
ordinary estimator.

Optional privacy: each shared vector is clipped to L2 norm ``clip`` and Gaussian noise of standard deviation
``sigma = 2 clip sqrt(2 ln(1.25 / delta)) / epsilon`` is added to every coordinate (the Gaussian mechanism
with L2 sensitivity 2 clip, Dwork & Roth Thm. A.1, valid for epsilon < 1). The guarantee is per shared
vector: whatever patch a vector was, an observer of the noisy vector learns it only up to (epsilon, delta).
It is not an image-level guarantee (an image contributes several vectors; composition over them applies).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..engine.model import PatchCore
from .ray_runner import RayOptions, check_task_fits, ray_session, run_local
from .sharded import LocalCoreset, ShardError, ShardTask, install_bank, merge_local_coresets, reduce_shard

__all__ = [
    "ClientSpec",
    "NoiseSpec",
    "add_gaussian_noise",
    "client_bank",
    "federated_fit",
    "gaussian_sigma",
    "run_clients",
]


@dataclass(frozen=True)
class NoiseSpec:
    """Gaussian mechanism on shared vectors: clip to ``clip`` (L2), then noise for (epsilon, delta)."""

    epsilon: float
    delta: float
    clip: float

    def __post_init__(self) -> None:
        if not 0 < self.epsilon < 1:
            raise ValueError(
                f"noise epsilon must be in (0, 1) for the Gaussian mechanism, got {self.epsilon}"
            )
        if not 0 < self.delta < 1:
            raise ValueError(f"noise delta must be in (0, 1), got {self.delta}")
        if self.clip <= 0:
            raise ValueError(f"noise clip must be > 0, got {self.clip}")


@dataclass
class ClientSpec:
    """One client: its name and its images (paths valid where the client runs)."""

    name: str
    images: Any
    index: int = 0


def gaussian_sigma(noise: NoiseSpec) -> float:
    return 2.0 * noise.clip * math.sqrt(2.0 * math.log(1.25 / noise.delta)) / noise.epsilon


def add_gaussian_noise(vectors: np.ndarray, noise: NoiseSpec, rng: np.random.Generator) -> np.ndarray:
    """Clip every row to L2 norm ``noise.clip`` and add N(0, sigma^2) to every coordinate."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    clipped = vectors * np.minimum(1.0, noise.clip / np.maximum(norms, 1e-12))
    noisy = clipped + rng.normal(0.0, gaussian_sigma(noise), size=vectors.shape)
    return noisy.astype(np.float32)


def client_bank(
    model: PatchCore, client: ClientSpec, fraction: float, noise: NoiseSpec | None = None
) -> LocalCoreset:
    """What a client computes and sends: its local coreset (noised if asked) and its counts."""
    local = reduce_shard(ShardTask(model, client.images, fraction, client.index, client.name))
    if noise is not None:
        rng = np.random.default_rng([model.seed, client.index, 7])
        local.vectors = add_gaussian_noise(local.vectors, noise, rng)
    return local


class _ClientActor:
    """A client as a Ray actor: created with its images where it is scheduled, asked for its bank."""

    def __init__(self, client: ClientSpec):
        self.client = client

    def bank(self, model: PatchCore, fraction: float, noise: NoiseSpec | None) -> LocalCoreset:
        return client_bank(model, self.client, fraction, noise)


def _client_task(args: tuple[PatchCore, ClientSpec, float, NoiseSpec | None]) -> LocalCoreset:
    model, client, fraction, noise = args
    return client_bank(model, client, fraction, noise)


def run_clients(
    model: PatchCore,
    clients: Sequence[ClientSpec],
    fraction: float,
    noise: NoiseSpec | None = None,
    ray_options: RayOptions | None = None,
) -> list[LocalCoreset]:
    """Every client's local bank: as Ray actors (``ray_options`` given), else one after another here."""
    if ray_options is None:
        outcomes = run_local(_client_task, [(model, c, fraction, noise) for c in clients])
        failed = [o for o in outcomes if not o.ok]
        if failed:
            raise ShardError(f"client {clients[failed[0].item].name} failed: {failed[0].error}")
        return [o.value for o in outcomes]
    with ray_session(ray_options) as ray:
        check_task_fits(ray, ray_options)
        actor_class = ray.remote(num_cpus=ray_options.num_cpus, num_gpus=ray_options.num_gpus)(_ClientActor)
        actors = [actor_class.remote(c) for c in clients]
        try:
            refs = [a.bank.remote(model, fraction, noise) for a in actors]
            banks = []
            for client, ref in zip(clients, refs, strict=True):
                try:
                    banks.append(ray.get(ref))
                except ray.exceptions.RayError as exc:
                    cause = getattr(exc, "cause", None) or exc
                    raise ShardError(f"client {client.name} failed: {cause}") from exc
            return banks
        finally:
            for actor in actors:
                ray.kill(actor)


def federated_fit(
    model: PatchCore,
    banks: Sequence[LocalCoreset],
    bank_size: int | None = None,
    weighted: bool = False,
) -> PatchCore:
    """The server: merge the clients' banks into ``model`` (fitted on return).

    ``bank_size`` None: ``percentage`` of all clients' patches (what one central fit would keep).
    ``weighted``: each vector's greedy priority is its distance times its client's share of all patches
    relative to an equal share (1 for equal clients), so a larger client's patches are covered first.
    """
    from ..engine.coreset import coreset_size

    total = sum(b.n_patches for b in banks)
    if bank_size is None:
        bank_size = coreset_size(total, model.percentage)
    else:
        bank_size = min(int(bank_size), total)
        # The model records its bank as a fraction of the patches (a model file is checked against it):
        # the fraction whose floor gives exactly this size.
        model.percentage = min(1.0, (bank_size + 0.5) / total)
    weights = None
    if weighted:
        shares = [len(banks) * b.n_patches / total for b in banks]
        weights = np.concatenate(
            [np.full(len(b.vectors), s, dtype=np.float32) for b, s in zip(banks, shares, strict=True)]
        )
    bank, stats = merge_local_coresets(model, banks, bank_size, weights)
    stats.update(
        clients=len(banks),
        client_images=[b.n_images for b in banks],
        client_bank_sizes=[len(b.vectors) for b in banks],
        extract_seconds=round(sum(b.extract_seconds for b in banks), 4),
        coreset_seconds=stats["merge_seconds"],
    )
    return install_bank(model, bank, banks[0].meta, stats)
