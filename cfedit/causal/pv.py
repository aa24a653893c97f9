"""P(V), the observational distribution over a graph's factors: building it, checking it, comparing it.

P(V) is a dense float array with one axis per factor in ``graph.names`` order (``graph.shape``),
summing to 1. Where it comes from for a given graph (an SCM, a labels file, a dataset) is decided in
one place, :func:`cfedit.data.observational_pv`; this module only handles the array.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np

from cfedit.causal.graph import CausalGraph
from cfedit.errors import BoundsError
from cfedit.files import human_size

#: Most joint configurations of the factors: the bounds work on P(V) as a dense table over them
#: (2^24 cells are 128 MiB of float64; 30 binary factors would need 8 GiB).
MAX_PV_CELLS = 1 << 24


def as_pv(graph: CausalGraph, data: Any) -> np.ndarray:
    """P(V) from an array of that shape, or from samples [n, k] of value indices (empirical)."""
    arr = np.asarray(data)
    if arr.shape == graph.shape and np.issubdtype(arr.dtype, np.floating):
        total = arr.sum()
        if not np.isclose(total, 1.0, atol=1e-6) or (arr < 0).any():
            raise ValueError("P(V) must be non-negative and sum to 1")
        return arr / total
    if arr.ndim == 2 and arr.shape[1] == len(graph.names):
        flat = np.ravel_multi_index(arr.T.astype(np.int64), graph.shape)
        counts = np.bincount(flat, minlength=int(np.prod(graph.shape))).astype(float)
        return (counts / counts.sum()).reshape(graph.shape)
    raise ValueError(f"expected P(V) of shape {graph.shape} or samples of shape [n, {len(graph.names)}]")


def check_pv_size(graph: CausalGraph) -> None:
    """Refuse, before any table is built, a graph whose dense P(V) would exceed :data:`MAX_PV_CELLS`."""
    cells = math.prod(graph.shape)
    if cells > MAX_PV_CELLS:
        raise BoundsError(
            f"graph {graph.name!r} has {cells:,} joint configurations ({' x '.join(map(str, graph.shape))}); "
            f"bounds need P(V) over all of them, {human_size(8 * cells)}, over the limit of {MAX_PV_CELLS:,} "
            f"configurations ({human_size(8 * MAX_PV_CELLS)}): ask on a graph of fewer or smaller factors")


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """Total variation distance between two distributions of the same shape."""
    return float(0.5 * np.abs(np.asarray(p, dtype=np.float64) - np.asarray(q, dtype=np.float64)).sum())


def cells(factual: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Units grouped by their factual cell of P(V): ``(r, row, unit indices)`` for each distinct row of
    ``factual`` [n, k], in sorted row order (``r`` counts the cells, for per-cell seeds)."""
    rows, inverse = np.unique(np.asarray(factual), axis=0, return_inverse=True)
    inverse = np.asarray(inverse).ravel()
    for r, row in enumerate(rows):
        yield r, row, np.flatnonzero(inverse == r)
