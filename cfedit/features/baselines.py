"""Baseline feature models: ablations of the causal assumptions (same data, same image mechanism).

- ``none``: no causal model. The edit changes only the intervened factor's label, as conditional-VAE
  editing does (the paper's CVAE baseline; at the factor level also CGN's independent mechanisms).
- ``conditional``: conditioning instead of intervening. The other factors are resampled from
  P(V | X = x′): the spurious-correlation failure ("older → more often male").
- ``markovian`` (:class:`MarkovianModel`): the graph with every bidirected edge oriented along the
  topological order (DEAR's no-confounding assumption), then a canonical model of that graph fitted
  to P(V).

All implement :class:`cfedit.features.FeatureModel`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from cfedit.features.base import FeatureModel
from cfedit.features.streams import categorical, check_unit_keys, unit_uniforms
from cfedit.causal.graph import CausalGraph
from cfedit.causal.query import Query, QueryError
from cfedit.causal.scm import all_assignments


class _TableModel:
    """Shared parts of the two model-free baselines: they hold P(V) and nothing else."""

    family = "?"

    def __init__(self, graph: CausalGraph):
        self.graph = graph
        self.pv: np.ndarray | None = None
        self.assignments = all_assignments(graph)

    def fit(self, pv: np.ndarray, seed: int = 0):
        self.pv = np.asarray(pv, dtype=float)
        return self

    def joint(self) -> np.ndarray:
        return self.pv

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"family": self.family}, {"pv": self.pv}

    @classmethod
    def from_state(cls, graph: CausalGraph, config: Mapping[str, Any], arrays: Mapping[str, Any]):
        return cls(graph).fit(np.asarray(arrays["pv"], dtype=float))

    def _do(self, do: Mapping[str, int | str]) -> dict[int, int]:
        return {self.graph.axis(k): i for k, i in self.graph.value_indices(do).items()}

    def _world_probs(self, factual: np.ndarray, do: Mapping[str, str]) -> np.ndarray:
        """P(counterfactual world = each full assignment | factual unit): [n_assignments]."""
        raise NotImplementedError

    def prob(self, query: Query) -> float:
        query.validate(self.graph)
        assign = self.assignments
        weights = self.pv.ravel()
        num = den = 0.0
        for v, w in zip(assign, weights):
            if w <= 0:
                continue
            p_ev = self._terms_prob(v, query.evidence, assign)
            if p_ev == 0:
                continue
            den += w * p_ev
            num += w * self._terms_prob(v, query.evidence + query.targets, assign)
        if den <= 0:
            raise QueryError("the evidence has probability zero under the model", str(query))
        return num / den

    def _terms_prob(self, v: np.ndarray, terms, assign: np.ndarray) -> float:
        """Probability that every term holds, given the factual unit v (worlds independent given v)."""
        p = 1.0
        worlds: dict[tuple, list] = {}
        for t in terms:
            worlds.setdefault(t.interventions, []).append(t)
        for key, ts in worlds.items():
            if not key:
                ok = all(v[self.graph.axis(t.variable)] == self.graph[t.variable].index(t.value) for t in ts)
                p *= float(ok)
                continue
            probs = self._world_probs(v, dict(key))
            mask = np.ones(len(assign), dtype=bool)
            for t in ts:
                mask &= assign[:, self.graph.axis(t.variable)] == self.graph[t.variable].index(t.value)
            p *= float(probs[mask].sum())
        return p

    def counterfactual(self, factual: np.ndarray, do: Mapping[str, int | str], n_samples: int = 1,
                       seed: int = 0, unit_keys: Sequence[int] | None = None) -> np.ndarray:
        """[n, n_samples, k]; with ``unit_keys`` each row draws from its own stream
        (:func:`cfedit.features.unit_uniforms`)."""
        factual = np.asarray(factual, dtype=np.int64)
        check_unit_keys(unit_keys, len(factual))
        rng = np.random.default_rng(seed)
        per_unit = None if unit_keys is None else unit_uniforms(seed, unit_keys, (n_samples,))
        assign = self.assignments
        out = np.empty((len(factual), n_samples, factual.shape[1]), dtype=np.int64)
        for i, v in enumerate(factual):
            probs = self._world_probs(v, do)
            if per_unit is None:
                idx = rng.choice(len(assign), size=n_samples, p=probs / probs.sum())
            else:
                idx = categorical(probs, per_unit[i])
            out[i] = assign[idx]
        return out


class NoCausalModel(_TableModel):
    """The edit changes the intervened factors' labels and nothing else."""

    family = "none"

    def _world_probs(self, factual: np.ndarray, do: Mapping[str, int | str]) -> np.ndarray:
        v = factual.copy()
        for axis, value in self._do(do).items():
            v[axis] = value
        probs = np.zeros(int(np.prod(self.graph.shape)))
        probs[np.ravel_multi_index(tuple(v), self.graph.shape)] = 1.0
        return probs


class ConditionalModel(_TableModel):
    """Every other factor is redrawn from P(V | X = x′), ignoring the unit and the causal order."""

    family = "conditional"

    def _world_probs(self, factual: np.ndarray, do: Mapping[str, int | str]) -> np.ndarray:
        fixed = self._do(do)
        assign = self.assignments
        mask = np.ones(len(assign), dtype=bool)
        for axis, value in fixed.items():
            mask &= assign[:, axis] == value
        probs = np.where(mask, self.pv.ravel(), 0.0)
        if probs.sum() <= 0:
            raise QueryError(f"P({', '.join(f'{k}={v}' for k, v in do.items())}) is zero in the data: "
                             "the conditional baseline cannot condition on it")
        return probs / probs.sum()


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
