"""The registry of search kinds: ``@register_search_kind`` on a :class:`SearchKind` subclass makes its
``name`` a valid ``index_kind`` (the estimator's parameter takes its choices from ``SEARCH_KINDS``), and
:func:`make_search` builds one, choosing its device by the kind's documented rule and logging the choice."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import numpy as np

    from .base import Devices, SearchKind, SearchSettings

__all__ = ["SEARCH_KINDS", "make_search", "register_search_kind", "search_kind"]

log = logging.getLogger(__name__)

SEARCH_KINDS: dict[str, type[SearchKind]] = {}

K = TypeVar("K", bound="type[SearchKind]")


def register_search_kind(cls: K) -> K:
    """Class decorator: register ``cls`` under ``cls.name`` (a name may be registered once)."""
    name = cls.name
    if name in SEARCH_KINDS and SEARCH_KINDS[name] is not cls:
        raise ValueError(f"search kind {name!r} is already registered by {SEARCH_KINDS[name].__qualname__}")
    SEARCH_KINDS[name] = cls
    return cls


def search_kind(name: str) -> type[SearchKind]:
    """The registered class of kind ``name``; a ValueError naming the known kinds otherwise."""
    if name not in SEARCH_KINDS:
        raise ValueError(f"unknown index kind {name!r}; known: {', '.join(SEARCH_KINDS)}")
    return SEARCH_KINDS[name]


def make_search(kind: str, bank: np.ndarray, settings: SearchSettings, devices: Devices | None = None) -> SearchKind:
    """Build kind ``kind`` over ``bank`` where its :meth:`~SearchKind.place` rule puts it (which may be
    another kind: ``flat`` or ``pruned`` on a CUDA device whose FAISS has no GPU support run as ``torch``);
    the decision is logged at INFO (DEBUG for a plain CPU build of the kind asked for). ``devices``: what is there (None: detected when ``settings.use_gpu``)."""
    from .base import Devices

    if devices is None:
        devices = Devices.detect() if settings.use_gpu else Devices()
    placement = search_kind(kind).place(settings.use_gpu, devices)
    built = search_kind(placement.kind)(bank, settings, placement.device)
    # INFO whenever there was a choice (a GPU was asked for) or the kind changed; a CPU build of the kind
    # asked for is DEBUG, so commands that build an index (predict, update) keep their stderr to what matters.
    level = logging.INFO if settings.use_gpu or placement.kind != kind else logging.DEBUG
    log.log(
        level,
        "nearest-neighbour search: index_kind=%s -> %r on %s, %d rows x %d (%s)",
        kind, placement.kind, placement.device, len(built), built.dim, placement.reason,
    )  # fmt: skip
    return built
