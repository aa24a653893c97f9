"""The exact canonical feature model: a response-function model fitted to P(V) (a FeatureModel).

Each factor V has response types r_V (one coordinate r_V(pa) per parent configuration); the
variables of one c-component share a joint distribution over their types, c-components are
independent (the same parametrisation as :mod:`cfedit.causal.bounds`, whose Q-factors, coordinates and
constraints this module reuses).

**Which model in the feasible set (``point``).** P(V) fixes only part of the type distribution. The
default point is the *maximum-entropy* one:

* single-variable c-component: the coordinates r_V(pa) are independent, each with its identified
  marginal P(v | pa) (``point="independent"``, the max-entropy coupling of fixed marginals), or
  comonotone (``point="comonotone"``): one shared uniform U per component, each coordinate the
  quantile of P(· | pa) at U — the tightest coupling, where units keep their rank across parent
  configurations. Both are lazy: a coordinate nobody asks about is never materialised (bar in the
  backdoor graph has 2^20 types). A parent configuration of probability zero gets the uniform
  distribution;
* multi-variable c-component: all its types are enumerated (up to ``max_types``) and q_C is the
  maximum-entropy distribution satisfying the Q[C] constraints (iterative proportional fitting over
  the per-parent-configuration partitions — the I-projection of the uniform distribution; polished
  by a small LP onto the constraints if IPF stalls). It commits to nothing beyond what P(V) says.

Every point is a model compatible with G and P(V), so its counterfactuals lie inside the sharp
bounds. :meth:`CanonicalModel.extreme` gives instead the model at the LP optimum of a query: its
``prob(query)`` is the lower or upper bound.

**Counterfactuals** are exact: abduction is the posterior over the response coordinates the edit
reads, given the factual unit (per c-component, P_C(factual ∧ counterfactual coordinates) /
P_C(factual)); the counterfactual values are then enumerated in topological order and sampled.
Non-descendants of the intervened factors keep their factual values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linprog

from cfedit.causal.bounds import (
    BoundsError,
    CanonicalProblem,
    ComponentSpace,
    Coord,
    event_monomials,
    n_parent_configs,
    parent_index,
    solve_bounds,
)
from cfedit.causal.pv import as_pv, cells
from cfedit.features.streams import categorical, check_unit_keys, unit_uniforms
from cfedit.causal.graph import CausalGraph
from cfedit.causal.query import Query, parse_query

POINTS = ("independent", "comonotone")


Block = tuple[list[Coord], np.ndarray, np.ndarray]  # coordinates, types [n, len], probabilities [n]


@dataclass
class _Dist:
    """The type distribution of one c-component.

    ``blocks``: independent explicit joints, each over its own coordinates. For a single-variable
    component the coordinates in no block come from ``table`` (P(v | pa), [parent configs, values]),
    coupled by ``point`` among themselves and independent of the blocks; for a multi-variable
    component one block holds every coordinate.
    """

    variables: tuple[str, ...]
    blocks: list[Block]
    table: np.ndarray | None
    point: str

    def __post_init__(self) -> None:
        self.where = {c: (k, j) for k, (cs, _, _) in enumerate(self.blocks) for j, c in enumerate(cs)}
        if self.table is not None:
            self.cdf = np.cumsum(self.table, axis=1)

    def prob(self, event: Mapping[Coord, int]) -> float:
        """P(every coordinate in ``event`` takes its value)."""
        masks: dict[int, np.ndarray] = {}
        rest = []
        for c, v in event.items():
            kj = self.where.get(c)
            if kj is None:
                rest.append((c[1], v))
                continue
            k, j = kj
            m = self.blocks[k][1][:, j] == v
            masks[k] = masks[k] & m if k in masks else m
        p = 1.0
        for k, m in masks.items():
            p *= float(self.blocks[k][2][m].sum())
            if p == 0.0:
                return 0.0
        if not rest:
            return p
        if self.table is None:
            raise KeyError(f"coordinates {rest} are not part of c-component {self.variables}")
        if self.point == "independent" or len(rest) == 1:
            for pa, v in rest:
                p *= float(self.table[pa, v])
            return p
        hi = min(float(self.cdf[pa, v]) for pa, v in rest)
        lo = max(float(self.cdf[pa, v] - self.table[pa, v]) for pa, v in rest)
        return p * max(0.0, hi - lo)


def _blocks_of(space: ComponentSpace, q: np.ndarray, max_types: int) -> list[Block]:
    """Explicit joints from an optimal q over a space: one per cluster (join-tree blocks glued by
    p = prod of block joints / prod of separator marginals)."""
    q = np.clip(q, 0.0, None)
    q = q / (q * space.unit).sum()
    out: list[Block] = []
    for members, edges in space.trees:
        tables = {}
        for k in members:
            cs = sorted(space.block_sets[k])
            rows = np.flatnonzero(space.block == k)
            sizes = [space.sizes[space.col[c]] for c in cs]
            t = np.zeros(int(np.prod(sizes, dtype=np.int64)) if cs else 1)
            idx = np.ravel_multi_index(space.types[rows][:, [space.col[c] for c in cs]].T.astype(np.int64), sizes) if cs else np.zeros(len(rows), dtype=np.int64)
            np.add.at(t, idx, q[rows])
            tables[k] = (cs, t.reshape(sizes) if cs else t)
        if len(members) == 1:
            cs, t = tables[members[0]]
            flat = t.ravel()
            keep = np.flatnonzero(flat > 0)
            types = np.array(np.unravel_index(keep, t.shape)).T if cs else np.zeros((len(keep), 0), dtype=np.int64)
            out.append((cs, types.astype(np.int64), flat[keep]))
            continue
        coords = sorted(set().union(*(space.block_sets[k] for k in members)))
        sizes = [space.sizes[space.col[c]] for c in coords]
        n = int(np.prod(sizes, dtype=np.int64))
        if n > max_types:
            raise BoundsError(f"the extreme model would need a joint of {n} types over {len(coords)} "
                              f"coordinates of {space.variables[0]!r} (more than max_types={max_types})")
        grid = _all(sizes)
        p = np.ones(n)
        for k in members:
            cs, t = tables[k]
            p *= t[tuple(grid[:, coords.index(c)] for c in cs)]
        for i, j in edges:
            cs_i, t_i = tables[i]
            sep = sorted(set(cs_i) & space.block_sets[j])
            m = t_i.sum(axis=tuple(a for a, c in enumerate(cs_i) if c not in sep))
            d = m[tuple(grid[:, coords.index(c)] for c in sep)]
            p = np.where(d > 0, p / np.where(d > 0, d, 1.0), 0.0)
        keep = p > 0
        out.append((coords, grid[keep], p[keep] / p[keep].sum()))
    return out


def _all(sizes: list[int]) -> np.ndarray:
    n = int(np.prod(sizes, dtype=np.int64))
    return np.array(np.unravel_index(np.arange(n), sizes), dtype=np.int64).T.reshape(n, len(sizes))


class CanonicalModel:
    """Exact discrete causal model over response types, fitted to P(V) (see the module notes)."""

    family = "canonical"

    def __init__(self, graph: CausalGraph, point: str = "independent", max_types: int = 200_000):
        if point not in POINTS:
            raise ValueError(f"unknown point {point!r} (choose from {', '.join(POINTS)})")
        self.graph = graph
        self.point = point
        self.max_types = int(max_types)
        self.components = list(graph.c_components())
        self.comp_of = {v: i for i, c in enumerate(self.components) for v in c}
        self._dists: list[_Dist] | None = None
        self.extreme_of: dict[str, Any] | None = None

    # -- fitting ------------------------------------------------------------------------------

    def fit(self, pv: np.ndarray, seed: int = 0, problem: CanonicalProblem | None = None) -> "CanonicalModel":
        """Fit to P(V) (deterministic: ``seed`` is accepted for the interface and unused)."""
        pv = as_pv(self.graph, pv)
        problem = problem or CanonicalProblem(self.graph, pv, self.max_types)
        dists = []
        for ci, comp in enumerate(self.components):
            if len(comp) == 1:
                table = problem.conditional(comp[0]).copy()
                bad = np.isnan(table).any(axis=1)
                table[bad] = 1.0 / table.shape[1]
                dists.append(_Dist(comp, [], table, self.point))
            else:
                space = problem.full_space(ci)
                q = _max_entropy(space)
                keep = q > 0
                dists.append(_Dist(comp, [(list(space.coords), space.types[keep].astype(np.int64), q[keep])],
                                   None, self.point))
        self._dists = dists
        self.extreme_of = None
        return self

    @classmethod
    def extreme(cls, graph: CausalGraph, pv: np.ndarray, query: Query | str, side: str = "lower",
                point: str = "independent", max_types: int = 200_000) -> "CanonicalModel":
        """The model at the optimum of ``query``'s bounds: ``prob(query)`` is the lower or upper bound.

        (For a multilinear query that is not certified, it is the best model found, i.e. the inner
        bound.) Components the query does not move keep the default ``point``.
        """
        if side not in ("lower", "upper"):
            raise ValueError(f"side must be 'lower' or 'upper', not {side!r}")
        model = cls(graph, point=point, max_types=max_types)
        problem = CanonicalProblem(graph, as_pv(graph, pv), max_types)
        sol = solve_bounds(graph, pv, [(1.0, query)], max_types=max_types, problem=problem)
        model.fit(pv, problem=problem)
        for ci, q in sol.solutions[side].items():
            space: ComponentSpace = sol.spaces[ci]
            model._dists[ci] = _Dist(space.variables, _blocks_of(space, q, max_types), model._dists[ci].table, point)
        b = sol.bounds
        model.extreme_of = {"query": b.query, "side": side,
                            "value": b.inner_lower if side == "lower" else b.inner_upper,
                            "certified": b.certified}
        return model

    def _require_fit(self) -> list[_Dist]:
        if self._dists is None:
            raise RuntimeError("the canonical model is not fitted; call fit(pv) first")
        return self._dists

    # -- probabilities ------------------------------------------------------------------------

    def _split(self, event: Mapping[Coord, int]) -> dict[int, dict[Coord, int]]:
        out: dict[int, dict[Coord, int]] = {}
        for c, v in event.items():
            out.setdefault(self.comp_of[c[0]], {})[c] = v
        return out

    def _event_prob(self, monomials: list[dict]) -> float:
        dists = self._require_fit()
        total = 0.0
        for m in monomials:
            p = 1.0
            for ci, ev in self._split(m).items():
                p *= dists[ci].prob(ev)
                if p == 0.0:
                    break
            total += p
        return total

    def joint(self) -> np.ndarray:
        """The model's P(V) (equals the fitted P(V) up to rounding)."""
        dists = self._require_fit()
        g = self.graph
        out = np.zeros(g.shape)
        cache: list[dict] = [{} for _ in dists]
        for idx in np.ndindex(*g.shape):
            vals = dict(zip(g.names, idx))
            p = 1.0
            for ci, comp in enumerate(self.components):
                ev = tuple(((v, int(parent_index(g, v, vals))), vals[v]) for v in comp)
                if ev not in cache[ci]:
                    cache[ci][ev] = dists[ci].prob(dict(ev))
                p *= cache[ci][ev]
                if p == 0.0:
                    break
            out[idx] = p
        return out

    def prob(self, query: Query | str) -> float:
        """The model's exact value of a counterfactual query."""
        q = (parse_query(query) if isinstance(query, str) else query).validate(self.graph)
        den = self._event_prob(event_monomials(self.graph, q.evidence)) if q.evidence else 1.0
        if den <= 0.0:
            raise ValueError(f"the evidence of {q} has probability zero under the model")
        num = self._event_prob(event_monomials(self.graph, q.targets + q.evidence))
        return float(min(max(num / den, 0.0), 1.0))

    # -- counterfactuals ----------------------------------------------------------------------

    def _outcomes(self, row: tuple[int, ...], do: dict[str, int], order: list[str]):
        """Exact distribution of the counterfactual values of ``order`` given a factual unit."""
        g, dists = self.graph, self._require_fit()
        fact = dict(zip(g.names, row))
        events: list[dict[Coord, int]] = [{} for _ in dists]
        for v in g.names:
            events[self.comp_of[v]][(v, int(parent_index(g, v, fact)))] = fact[v]
        current = [d.prob(e) for d, e in zip(dists, events)]
        if min(current) <= 0.0:
            labels = ", ".join(f"{v}={g[v].values[fact[v]]}" for v in g.names)
            raise ValueError(f"the factual unit ({labels}) has probability zero under the model; "
                             "its counterfactual is undefined")
        vals = {**fact, **do}
        outcomes: list[list[int]] = []
        weights: list[float] = []

        def rec(i: int, w: float) -> None:
            if i == len(order):
                outcomes.append([vals[v] for v in order])
                weights.append(w)
                return
            v = order[i]
            ci = self.comp_of[v]
            coord = (v, int(parent_index(g, v, vals)))
            ev = events[ci]
            if coord in ev:  # the factual unit already reveals this coordinate
                vals[v] = ev[coord]
                rec(i + 1, w)
                return
            before = current[ci]
            for x in range(g[v].size):
                ev[coord] = x
                p = dists[ci].prob(ev)
                if p > 0.0:
                    vals[v] = x
                    current[ci] = p
                    rec(i + 1, w * p / before)
            current[ci] = before
            del ev[coord]

        rec(0, 1.0)
        w = np.array(weights)
        return np.array(outcomes, dtype=np.int64).reshape(len(w), len(order)), w / w.sum()

    def counterfactual(self, factual: np.ndarray, do: Mapping[str, int | str], n_samples: int = 1,
                       seed: int = 0, unit_keys: Sequence[int] | None = None) -> np.ndarray:
        """Abduct (exact posterior over response types), act do(X=x), predict: [n, n_samples, k].

        With ``unit_keys`` each row draws from its own stream (:func:`cfedit.features.unit_uniforms`)."""
        self._require_fit()
        check_unit_keys(unit_keys, len(factual))
        g = self.graph
        fact = np.asarray(factual)
        if fact.ndim != 2 or fact.shape[1] != len(g.names):
            raise ValueError(f"factual factors must have shape [n, {len(g.names)}] ({', '.join(g.names)})")
        fact = fact.astype(np.int64)
        for j, n in enumerate(g.names):
            if len(fact) and (fact[:, j].min() < 0 or fact[:, j].max() >= g[n].size):
                raise ValueError(f"factual values of {n!r} must be indices 0..{g[n].size - 1}")
        do_idx = self.graph.value_indices(do)
        out = np.repeat(fact[:, None, :], n_samples, axis=1)
        for k, v in do_idx.items():
            out[:, :, g.axis(k)] = v
        order = [v for v in g.descendants(list(do_idx)) if v not in do_idx]
        if not order or len(fact) == 0:
            return out
        cols = [g.axis(v) for v in order]
        rng = np.random.default_rng(seed)
        per_unit = None if unit_keys is None else unit_uniforms(seed, unit_keys, (n_samples,))
        for _, row, units in cells(fact):
            outcomes, p = self._outcomes(tuple(int(x) for x in row), do_idx, order)
            if per_unit is None:
                draw = rng.choice(len(p), size=(len(units), n_samples), p=p)
            else:
                draw = categorical(p, per_unit[units])
            out[np.ix_(units, np.arange(n_samples), cols)] = outcomes[draw]
        return out

    # -- checkpoints --------------------------------------------------------------------------

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        dists = self._require_fit()
        comps, arrays = [], {}
        for ci, d in enumerate(dists):
            comps.append({"variables": list(d.variables),
                          "blocks": [[[v, int(p)] for v, p in cs] for cs, _, _ in d.blocks]})
            for k, (_, types, probs) in enumerate(d.blocks):
                arrays[f"c{ci}_b{k}_types"] = np.ascontiguousarray(types, dtype=np.int32)
                arrays[f"c{ci}_b{k}_probs"] = np.ascontiguousarray(probs, dtype=np.float64)
            if d.table is not None:
                arrays[f"c{ci}_table"] = np.ascontiguousarray(d.table, dtype=np.float64)
        config = {"family": self.family, "point": self.point, "max_types": self.max_types,
                  "structure_hash": self.graph.structure_hash(), "components": comps,
                  "extreme_of": self.extreme_of}
        return config, arrays

    @classmethod
    def from_state(cls, graph: CausalGraph, config: Mapping[str, Any],
                   arrays: Mapping[str, np.ndarray]) -> "CanonicalModel":
        if config.get("family") != cls.family:
            raise ValueError(f"not a canonical model state (family {config.get('family')!r})")
        if config.get("structure_hash") not in (None, graph.structure_hash()):
            raise ValueError(f"the canonical model was fitted on a different graph than {graph.name!r}")
        model = cls(graph, point=config.get("point", "independent"), max_types=config.get("max_types", 200_000))
        comps = config["components"]
        if [tuple(c["variables"]) for c in comps] != [tuple(c) for c in model.components]:
            raise ValueError(f"the canonical model's c-components do not match graph {graph.name!r}")
        dists = []
        for ci, c in enumerate(comps):
            blocks = []
            for k, cs in enumerate(c["blocks"]):
                coords = [(str(v), int(p)) for v, p in cs]
                for v, p in coords:
                    if v not in c["variables"] or not 0 <= p < n_parent_configs(graph, v):
                        raise ValueError(f"canonical model state: coordinate {v}[{p}] does not fit the graph")
                blocks.append((coords, np.asarray(arrays[f"c{ci}_b{k}_types"], dtype=np.int64).reshape(-1, len(coords)),
                               np.asarray(arrays[f"c{ci}_b{k}_probs"], dtype=np.float64)))
            table = arrays.get(f"c{ci}_table")
            if table is None and len(c["variables"]) == 1:
                raise ValueError("canonical model state: a single-variable component lacks its table")
            dists.append(_Dist(tuple(c["variables"]), blocks,
                               None if table is None else np.asarray(table, dtype=np.float64), model.point))
        model._dists = dists
        model.extreme_of = config.get("extreme_of")
        return model


# ----------------------------------------------------------------------------------------------
# Maximum entropy inside the Q[C] constraints
# ----------------------------------------------------------------------------------------------


def _max_entropy(space: ComponentSpace, tol: float = 1e-14, max_sweeps: int = 20_000) -> np.ndarray:
    """Iterative proportional fitting from the uniform distribution over the live types.

    For each parent configuration of the component the types are partitioned by the value of C
    they produce; IPF rescales the cells to their identified Q[C] (cells that are not identified
    share what is left). The limit is the max-entropy feasible point. A final LP moves the result
    onto the constraints (minimal L1 change) if IPF has not converged to ``tol``.
    """
    n = space.n
    q = np.full(n, 1.0 / n)
    for _ in range(max_sweeps):
        err = 0.0
        for cell, tgt in space.partitions:
            mass = np.bincount(cell, weights=q, minlength=len(tgt))
            defined = ~np.isnan(tgt)
            err = max(err, float(np.abs(mass[defined] - tgt[defined]).max(initial=0.0)))
            factor = np.ones(len(tgt))
            with np.errstate(divide="ignore", invalid="ignore"):
                factor[defined] = np.where(mass[defined] > 0, tgt[defined] / mass[defined], 0.0)
                free = ~defined
                rest = mass[free].sum()
                if free.any() and rest > 0:
                    factor[free] = max(0.0, 1.0 - tgt[defined].sum()) / rest
            q = q * factor[cell]
        if err <= tol:
            break
    resid = np.abs(space.A @ q - space.b).max()
    if resid > 1e-12:
        q = _polish(space, q)
    return q / q.sum()


def _polish(space: ComponentSpace, q0: np.ndarray) -> np.ndarray:
    """The feasible q closest to q0 in L1 (one LP)."""
    n = space.n
    eye = sp.identity(n, format="csr")
    A_ub = sp.vstack([sp.hstack([eye, -eye]), sp.hstack([-eye, -eye])]).tocsr()
    b_ub = np.concatenate([q0, -q0])
    A_eq = sp.hstack([space.A, sp.csr_matrix((space.A.shape[0], n))]).tocsr()
    res = linprog(np.concatenate([np.zeros(n), np.ones(n)]), A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=space.b,
                  bounds=(0, None), method="highs")
    if res.status != 0:
        raise BoundsError(f"P(V) is not compatible with the graph: no response-type distribution of "
                          f"c-component {{{', '.join(space.variables)}}} reproduces it")
    return np.clip(res.x[:n], 0.0, None)
