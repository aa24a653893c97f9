"""Discrete structural causal models with explicit mechanisms and enumerable exogenous noise.

Ground truth for everything else: exact P(V), sampling, do(), and exact counterfactual
probabilities by enumerating the exogenous values. A continuous uniform noise that mechanisms only
compare with fixed thresholds is enumerated over the cells between those thresholds (each cell with
its width as probability, the cell's midpoint as representative) — exact, not an approximation.

Mechanisms are vectorised: they take the values of the other factors (value indices) and the
exogenous draws as numpy arrays and return value indices.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from cfedit.causal.graph import CausalGraph
from cfedit.causal.graph_file import load_graph
from cfedit.causal.query import Query, QueryError


@dataclass(frozen=True)
class Exogenous:
    """One exogenous variable.

    kind ``categorical``: values 0..k-1 with probabilities ``probs``;
    kind ``uniform``: Uniform(0, 1), enumerated over the cells between ``cuts``.
    A Bernoulli(p) bit is categorical with probs (1 - p, p).
    """

    name: str
    kind: str
    probs: tuple[float, ...] = ()
    cuts: tuple[float, ...] = ()

    @staticmethod
    def bernoulli(name: str, p: float) -> "Exogenous":
        return Exogenous(name, "categorical", probs=(1.0 - p, p))

    @staticmethod
    def categorical(name: str, probs: tuple[float, ...]) -> "Exogenous":
        return Exogenous(name, "categorical", probs=tuple(probs))

    @staticmethod
    def uniform(name: str, cuts: tuple[float, ...]) -> "Exogenous":
        return Exogenous(name, "uniform", cuts=tuple(sorted(cuts)))

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "uniform":
            return rng.random(n)
        return rng.choice(len(self.probs), size=n, p=np.asarray(self.probs))

    def cells(self) -> tuple[np.ndarray, np.ndarray]:
        """Representative values and their probabilities, for exact enumeration."""
        if self.kind == "uniform":
            edges = np.array([0.0, *self.cuts, 1.0])
            return (edges[:-1] + edges[1:]) / 2, np.diff(edges)
        return np.arange(len(self.probs)), np.asarray(self.probs, dtype=float)


Mechanism = Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray]], np.ndarray]


@dataclass
class SCM:
    """A discrete SCM over ``graph``'s factors. ``mechanisms[v](values, noise)`` → value indices."""

    graph: CausalGraph
    exogenous: tuple[Exogenous, ...]
    mechanisms: dict[str, Mechanism]
    _enumeration: tuple[dict[str, np.ndarray], np.ndarray] | None = field(default=None, repr=False)

    # -- sampling and evaluation --------------------------------------------------------------

    def sample_exogenous(self, n: int, seed: int | np.random.Generator = 0) -> dict[str, np.ndarray]:
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        return {e.name: e.sample(rng, n) for e in self.exogenous}

    def evaluate(self, noise: Mapping[str, np.ndarray], do: Mapping[str, int | str] | None = None) -> np.ndarray:
        """Values (indices, shape [n, len(graph.names)]) of every factor for given exogenous draws."""
        do = self.graph.value_indices(do)
        n = len(next(iter(noise.values())))
        values: dict[str, np.ndarray] = {}
        for v in self.graph.names:
            if v in do:
                values[v] = np.full(n, do[v], dtype=np.int64)
            else:
                values[v] = np.asarray(self.mechanisms[v](values, noise), dtype=np.int64)
        return np.stack([values[v] for v in self.graph.names], axis=1)

    def sample(self, n: int, seed: int = 0, do: Mapping[str, int | str] | None = None):
        """(noise, values) for n units."""
        noise = self.sample_exogenous(n, seed)
        return noise, self.evaluate(noise, do)

    # -- exact enumeration --------------------------------------------------------------------

    def enumeration(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Every combination of exogenous cells, with its probability."""
        if self._enumeration is None:
            cells = [e.cells() for e in self.exogenous]
            grids = np.meshgrid(*[c[0] for c in cells], indexing="ij")
            probs = np.ones(grids[0].shape)
            for axis, (_, p) in enumerate(cells):
                shape = [1] * len(cells)
                shape[axis] = len(p)
                probs = probs * p.reshape(shape)
            noise = {e.name: g.ravel() for e, g in zip(self.exogenous, grids)}
            self._enumeration = noise, probs.ravel()
        return self._enumeration

    def joint(self, do: Mapping[str, int | str] | None = None) -> np.ndarray:
        """Exact P(V) (or P(V_x)) as an array over ``graph.names`` with shape ``graph.shape``."""
        noise, w = self.enumeration()
        values = self.evaluate(noise, do)
        flat = np.ravel_multi_index(values.T, self.graph.shape)
        return np.bincount(flat, weights=w, minlength=int(np.prod(self.graph.shape))).reshape(self.graph.shape)

    def prob(self, query: Query) -> float:
        """Exact value of a counterfactual query, by enumeration of the exogenous cells."""
        query.validate(self.graph)
        noise, w = self.enumeration()
        worlds: dict[tuple, np.ndarray] = {}

        def holds(term) -> np.ndarray:
            key = tuple(sorted(term.interventions))  # one world per intervention set, whatever the order
            if key not in worlds:
                worlds[key] = self.evaluate(noise, dict(key))
            col = self.graph.axis(term.variable)
            return worlds[key][:, col] == self.graph[term.variable].index(term.value)

        ev = np.ones(len(w), dtype=bool)
        for t in query.evidence:
            ev &= holds(t)
        p_ev = float(w[ev].sum())
        if p_ev <= 0:
            raise QueryError("the evidence has probability zero under the model", str(query))
        tg = ev.copy()
        for t in query.targets:
            tg &= holds(t)
        return float(w[tg].sum()) / p_ev


# --------------------------------------------------------------------------------------------
# The two Colored-MNIST-with-bars settings (color: green = 0, red = 1; bar: no = 0, yes = 1)
# --------------------------------------------------------------------------------------------

# U_C is compared with 0.1·(d + 0.5) (backdoor) or 0.1·(9.5 − d) (frontdoor): the same ten points.
_COLOR_CUTS = tuple(round(0.1 * (d + 0.5), 10) for d in range(10))


def backdoor_scm(graph: CausalGraph | None = None) -> SCM:
    """digit <-> color (through U_D), digit -> bar, color -> bar."""
    graph = graph or load_graph("backdoor")
    exo = (
        Exogenous.categorical("u_digit", (0.1,) * 10),
        Exogenous.uniform("u_color", _COLOR_CUTS),
        Exogenous.bernoulli("n_large", 0.8),
        Exogenous.bernoulli("n_color", 0.9),
        Exogenous.bernoulli("n_keep", 0.75),
    )
    mech = {
        "digit": lambda v, u: u["u_digit"],
        "color": lambda v, u: (u["u_color"] < 0.1 * (u["u_digit"] + 0.5)).astype(np.int64),
        "bar": lambda v, u: (
            (((v["digit"] >= 5).astype(np.int64) ^ u["n_large"]) | (v["color"] ^ u["n_color"])) & u["n_keep"]
        ),
    }
    return SCM(graph, exo, mech)


def frontdoor_scm(graph: CausalGraph | None = None) -> SCM:
    """digit -> color -> bar, digit <-> bar (bar reads U_D, not digit: do(digit) leaves it alone)."""
    graph = graph or load_graph("frontdoor")
    exo = (
        Exogenous.categorical("u_digit", (0.1,) * 10),
        Exogenous.uniform("u_color", _COLOR_CUTS),
        Exogenous.bernoulli("n_small", 0.9),
        Exogenous.bernoulli("n_color", 0.8),
        Exogenous.bernoulli("n_keep", 0.7),
    )
    mech = {
        "digit": lambda v, u: u["u_digit"],
        "color": lambda v, u: (u["u_color"] < 0.1 * (9.5 - v["digit"])).astype(np.int64),
        "bar": lambda v, u: (
            (((u["u_digit"] < 3).astype(np.int64) ^ u["n_small"]) | (v["color"] ^ u["n_color"])) & u["n_keep"]
        ),
    }
    return SCM(graph, exo, mech)


BUILTIN_SCMS: dict[str, Callable[..., SCM]] = {"backdoor": backdoor_scm, "frontdoor": frontdoor_scm}


def builtin_scm(name: str, graph: CausalGraph | None = None) -> SCM:
    """A built-in ground-truth SCM by name, on ``graph`` (default: the shipped graph of that name)."""
    if name not in BUILTIN_SCMS:
        raise KeyError(f"no built-in SCM {name!r} (built in: {', '.join(BUILTIN_SCMS)})")
    return BUILTIN_SCMS[name](graph)


def scm_name(graph: CausalGraph) -> str | None:
    """Name of the built-in SCM a graph's ``data:`` points to (``{barmnist: backdoor}``), if any."""
    data = graph.data or {}
    name = data.get("barmnist") or data.get("scm")
    return None if name is None else str(name)


def scm_for_graph(graph: CausalGraph) -> SCM | None:
    """The ground-truth SCM a graph's ``data:`` points to, if any."""
    name = scm_name(graph)
    return None if name is None else builtin_scm(name, graph)


def all_assignments(graph: CausalGraph) -> np.ndarray:
    """Every joint assignment of the factors, as value indices, in P(V)'s C order."""
    return np.array(list(itertools.product(*[range(s) for s in graph.shape])), dtype=np.int64)
