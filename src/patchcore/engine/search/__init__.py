"""Nearest-neighbour search over the memory bank: one module per kind, behind one protocol and a registry.

=========  ======  ==============================================================================
kind       exact   module
=========  ======  ==============================================================================
flat       yes     :mod:`.flat`: FAISS ``IndexFlatL2`` (the reference's); GPU where FAISS has one
pruned     yes     :mod:`.pruned`: certified principal-component bound, numba kernel (:mod:`.pruned_kernel`)
ivf        no      :mod:`.ivf`: FAISS ``IndexIVFFlat``, ``nprobe`` of ``nlist`` cells
hnsw       no      :mod:`.hnsw`: FAISS ``IndexHNSWFlat``, ``ef_search`` candidates
torch      yes     :mod:`.torch_exact`: torch products + float64 re-ranking (the CUDA path of flat/pruned)
=========  ======  ==============================================================================

Every kind follows :class:`~.base.SearchKind`: ``search(queries, k)`` -> (squared distances (n, k) float32,
indices (n, k) int64), ``add(rows)`` appends in place, ``truncate(n)`` drops the last rows, ``len()``,
``exact``, ``recall``. A new kind is one module with a ``@register_search_kind`` class, imported below.
"""

from __future__ import annotations

# isort: off
# Importing a kind's module registers it; this order is the order of SEARCH_KINDS (and of the CLI's choices).
from . import flat  # noqa: F401
from . import pruned  # noqa: F401
from . import ivf  # noqa: F401
from . import hnsw  # noqa: F401
from . import torch_exact  # noqa: F401

# isort: on
from .base import Devices, GrowableRows, Placement, SearchKind, SearchSettings
from .registry import SEARCH_KINDS, make_search, register_search_kind, search_kind

__all__ = [
    "SEARCH_KINDS",
    "Devices",
    "GrowableRows",
    "Placement",
    "SearchKind",
    "SearchSettings",
    "make_search",
    "register_search_kind",
    "search_kind",
]
