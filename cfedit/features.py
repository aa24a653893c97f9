"""The common interface of feature-level causal models (the factor half of the ANCM).

Every family — the neural causal model (:mod:`cfedit.ncm`), the exact canonical model
(:mod:`cfedit.canonical`) and the baselines — implements :class:`FeatureModel`, so the editor and
``eval`` never care which one they hold. Factors are value indices in ``graph.names`` order.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable

import numpy as np

from cfedit.graph import CausalGraph
from cfedit.query import Query


@runtime_checkable
class FeatureModel(Protocol):
    graph: CausalGraph
    family: str  # "ncm", "canonical", "none", "conditional", "markovian"

    def fit(self, pv: np.ndarray, seed: int = 0) -> "FeatureModel":
        """Fit to P(V): an array over ``graph.names`` with shape ``graph.shape`` summing to 1."""

    def joint(self) -> np.ndarray:
        """The model's own P(V), same layout as the input of :meth:`fit`."""

    def counterfactual(self, factual: np.ndarray, do: Mapping[str, int], n_samples: int = 1,
                       seed: int = 0) -> np.ndarray:
        """Abduct from factual factors [n, k], act do(X=x), predict: [n, n_samples, k] value indices.

        Intervened factors hold their new values; non-descendants of the intervened factors keep
        their factual values in every sample.
        """

    def prob(self, query: Query) -> float:
        """The model's value of a counterfactual query."""

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able config, named arrays) for the checkpoint; :func:`load_feature_model` inverts it."""


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
