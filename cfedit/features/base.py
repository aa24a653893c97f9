"""The common interface of feature-level causal models (the factor half of the ANCM).

Every family — the neural causal model (:mod:`cfedit.features.ncm`), the exact canonical model
(:mod:`cfedit.features.canonical`) and the baselines (:mod:`cfedit.features.baselines`) — implements
:class:`FeatureModel`, so the editor and ``eval`` never care which one they hold. Factors are value
indices in ``graph.names`` order.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from cfedit.causal.graph import CausalGraph
from cfedit.causal.query import Query


@runtime_checkable
class FeatureModel(Protocol):
    graph: CausalGraph
    family: str  # "ncm", "canonical", "none", "conditional", "markovian"

    def fit(self, pv: np.ndarray, seed: int = 0) -> "FeatureModel":
        """Fit to P(V): an array over ``graph.names`` with shape ``graph.shape`` summing to 1."""

    def joint(self) -> np.ndarray:
        """The model's own P(V), same layout as the input of :meth:`fit`."""

    def counterfactual(self, factual: np.ndarray, do: Mapping[str, int], n_samples: int = 1,
                       seed: int = 0, unit_keys: Sequence[int] | None = None) -> np.ndarray:
        """Abduct from factual factors [n, k], act do(X=x), predict: [n, n_samples, k] value indices.

        Intervened factors hold their new values; non-descendants of the intervened factors keep
        their factual values in every sample. With ``unit_keys`` (one non-negative int per row) row i
        draws only from its own stream (:func:`unit_uniforms`), so its samples do not depend on the
        other rows of the call; without, the call draws from one stream seeded by ``seed``.
        """

    def prob(self, query: Query) -> float:
        """The model's value of a counterfactual query."""

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able config, named arrays) for the checkpoint; :func:`load_feature_model` inverts it."""
