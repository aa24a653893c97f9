"""The common interface of feature-level causal models (the factor half of the ANCM).

Every family — the neural causal model (:mod:`cfedit.features.ncm`), the exact canonical model
(:mod:`cfedit.features.canonical`) and the baselines — implements :class:`FeatureModel`, so the editor and
``eval`` never care which one they hold. Factors are value indices in ``graph.names`` order.
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


def unit_uniforms(seed: int, unit_keys: Sequence[int], shape: tuple[int, ...]) -> np.ndarray:
    """Uniforms in [0, 1), [len(unit_keys), *shape]: row i from its own stream
    ``np.random.default_rng([seed, unit_keys[i]])``.

    Why: a folder of edits is a sample of the counterfactual distribution only if every unit draws
    independently, and it is reproducible piecewise (a batch, a shard, a resumed run) only if a unit's
    draws depend on the run's seed and its own key, never on which other units share the call.
    """
    if seed < 0 or any(int(k) < 0 for k in unit_keys):
        raise ValueError("the seed and the unit keys must be non-negative integers")
    rows = [np.random.default_rng([int(seed), int(k)]).random(shape) for k in unit_keys]
    return np.stack(rows) if rows else np.zeros((0, *shape))


def categorical(p: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Draws from the distribution ``p`` (over outcomes 0..len(p)-1) by inverse CDF of uniforms ``u``
    (any shape): with :func:`unit_uniforms`, a categorical draw per unit from its own stream."""
    cdf = np.cumsum(np.asarray(p, dtype=np.float64))
    return np.minimum(np.searchsorted(cdf / cdf[-1], u, side="right"), len(cdf) - 1)


def check_unit_keys(unit_keys: Sequence[int] | None, n: int) -> None:
    """Refuse unit keys that are not one per factual row (a silent mismatch would pair draws wrongly)."""
    if unit_keys is not None and len(unit_keys) != n:
        raise ValueError(f"{len(unit_keys)} unit keys for {n} factual rows (need one per row)")


FAMILIES = ("ncm", "canonical", "none", "conditional", "markovian")


def make_feature_model(family: str, graph: CausalGraph) -> FeatureModel:
    """An unfitted feature model of a family (``--features``)."""
    if family == "ncm":
        from cfedit.features.ncm import NCM

        return NCM(graph)
    if family == "canonical":
        from cfedit.features.canonical import CanonicalModel

        return CanonicalModel(graph)
    if family == "markovian":
        from cfedit.features.canonical import CanonicalModel

        return MarkovianModel(graph, CanonicalModel(graph.markovian_version()))
    if family in ("none", "conditional"):
        from cfedit.features.baselines import ConditionalModel, NoCausalModel

        return (NoCausalModel if family == "none" else ConditionalModel)(graph)
    raise ValueError(f"unknown feature-model family {family!r} ({', '.join(FAMILIES)})")


def load_feature_model(graph: CausalGraph, config: Mapping[str, Any], arrays: Mapping[str, Any]) -> FeatureModel:
    """Rebuild a feature model from what :meth:`FeatureModel.state` returned."""
    family = config.get("family")
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    if family == "markovian":
        from cfedit.features.canonical import CanonicalModel

        inner = CanonicalModel.from_state(graph.markovian_version(), config["inner"], arrays)
        return MarkovianModel(graph, inner)
    model = make_feature_model(family, graph)
    return type(model).from_state(graph, config, arrays)


class MarkovianModel:
    """DEAR's assumption: the graph with its bidirected edges oriented along the topological order,
    fitted as a Markovian canonical model. Queries and edits are asked in the original graph's terms
    (same variables, same value indices), answered by the Markovian model."""

    family = "markovian"

    def __init__(self, graph: CausalGraph, inner: FeatureModel):
        self.graph, self.inner = graph, inner

    def fit(self, pv: np.ndarray, seed: int = 0) -> "MarkovianModel":
        self.inner.fit(pv, seed=seed)
        return self

    def joint(self) -> np.ndarray:
        return self.inner.joint()

    def counterfactual(self, factual, do, n_samples: int = 1, seed: int = 0,
                       unit_keys: Sequence[int] | None = None) -> np.ndarray:
        return self.inner.counterfactual(factual, do, n_samples=n_samples, seed=seed, unit_keys=unit_keys)

    def prob(self, query: Query) -> float:
        return self.inner.prob(query)

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        config, arrays = self.inner.state()
        return {"family": "markovian", "inner": config}, arrays
