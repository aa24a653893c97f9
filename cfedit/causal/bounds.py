"""Optimal (sharp) bounds of counterfactual queries from (G, P(V)) with canonical models.

The method (Balke & Pearl; Zhang, Tian & Bareinboim, "Partial counterfactual identification"):

* **Response types.** Every factor V has a response function r_V from its parents' configurations to
  its values; one *coordinate* r_V(pa) per parent configuration ``pa`` (a :data:`Coord` is
  ``(variable, flat parent index)``). The variables of one c-component share one joint distribution
  q_C over their types; different c-components are independent.
* **Observational constraints** are linear per c-component: Q[C](c | pa(C)) = sum of q_C over the
  types that produce c under pa(C). Q[C] is identified from P(V) by Tian's formula
  (:func:`q_factors`).
* **The query** is expanded into disjoint *monomials*: each is a conjunction of coordinate equalities
  r_V(pa_V^w) = v^w over the worlds of the query (factual + one per intervention set), obtained by
  enumerating the unobserved ancestors in every world (:func:`event_monomials`). P(event) is then
  sum over monomials of prod over c-components of q_C(monomial restricted to C).
* **Projection.** A single-variable c-component's constraints are per-coordinate marginals, so its
  type space is built over the coordinates the query touches only (bar in the backdoor graph has
  2^20 types; a query touches two or three coordinates). A multi-variable c-component is enumerated
  over all coordinates of its variables, up to ``max_types``.
* **Solving.** Factors that the constraints fix (the monomial's indicator lies in the row space of the
  component's constraints) are constants. With no varying component the query is identified
  (method ``point``); with one it is a linear program solved by HiGHS (``lp``; counterfactual evidence
  by the Charnes–Cooper transform, ``lp-fractional``); with several it is multilinear
  (``multilinear``): an inner value by block-coordinate ascent from several starts and a valid outer
  value by a level-1 Sherali–Adams/RLT relaxation; certified when the two meet.

Nothing here imports torch: ``cfedit bounds`` starts instantly.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import networkx as nx
import numpy as np
import scipy.sparse as sp
from scipy.optimize import linprog

from cfedit.errors import BoundsError  # re-exported: ``from cfedit.causal.bounds import BoundsError``
from cfedit.causal.graph import CausalGraph
from cfedit.causal.query import Query, Term, parse_query

Coord = tuple[str, int]  # (variable, flat index of its parents' configuration)
Monomial = dict  # Coord -> value index

CERTIFY_TOL = 1e-7
_ZERO = 1e-15
_MAX_MONOMIALS = 500_000
_DENSE_LIMIT = 20_000_000  # entries of a dense constraint matrix for the row-space test


class ZeroEvidenceBoundsError(BoundsError):
    """The query is undefined: its evidence has probability zero (under P(V), under the graph's
    model of P(V), or under every compatible model). The message says which; other queries on the
    same graph and P(V) may still be answered."""


@dataclass(frozen=True)
class Bounds:
    """The interval [lower, upper] of a query over all models compatible with G and P(V).

    ``method``: ``point`` (identified), ``lp``, ``lp-fractional`` (counterfactual evidence) or
    ``multilinear``. ``certified``: the interval is the exact sharp one. When a multilinear problem is
    not certified, ``lower``/``upper`` are the valid outer bounds and ``inner_lower``/``inner_upper``
    the values attained by actual models (the sharp bounds lie between them).
    """

    lower: float
    upper: float
    method: str
    certified: bool
    seconds: float
    query: str
    inner_lower: float | None = None
    inner_upper: float | None = None

    @property
    def width(self) -> float:
        return self.upper - self.lower

    @property
    def is_point(self) -> bool:
        return self.upper - self.lower <= 1e-9

    def __contains__(self, x: object) -> bool:
        return isinstance(x, (int, float)) and self.lower - 1e-9 <= float(x) <= self.upper + 1e-9


# ----------------------------------------------------------------------------------------------
# Coordinates
# ----------------------------------------------------------------------------------------------


def n_parent_configs(graph: CausalGraph, var: str) -> int:
    return int(np.prod([graph[p].size for p in graph.parents(var)], dtype=np.int64))


def parent_index(graph: CausalGraph, var: str, values) -> int | np.ndarray:
    """Flat index of ``var``'s parent configuration; ``values`` maps names to indices (or arrays)."""
    idx = 0
    for p in graph.parents(var):
        idx = idx * graph[p].size + values[p]
    return idx


# ----------------------------------------------------------------------------------------------
# Tian's Q-factors
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QFactor:
    """Q[C](c | pa(C)) identified from P(V).

    ``table`` has one axis per name in ``axes`` (C ∪ Pa(C), graph order) and holds NaN where the
    value is not identified (a conditioning configuration of probability zero).
    """

    variables: tuple[str, ...]
    parents: tuple[str, ...]
    axes: tuple[str, ...]
    table: np.ndarray

    def matrix(self) -> np.ndarray:
        """The table as [parent configurations, C configurations] (both in graph order, C order)."""
        order = [self.axes.index(n) for n in self.parents + self.variables]
        t = np.transpose(self.table, order)
        n_pa = int(np.prod(t.shape[: len(self.parents)], dtype=np.int64))
        return t.reshape(n_pa, -1)


def _marginal(pv: np.ndarray, graph: CausalGraph, keep: Iterable[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    keep = set(keep)
    axes = tuple(n for n in graph.names if n in keep)
    drop = tuple(i for i, n in enumerate(graph.names) if n not in keep)
    return pv.sum(axis=drop), axes


def _broadcast(arr: np.ndarray, axes: tuple[str, ...], target: tuple[str, ...]) -> np.ndarray:
    shape = [arr.shape[axes.index(n)] if n in axes else 1 for n in target]
    return arr.reshape(shape)


def q_factors(graph: CausalGraph, pv: np.ndarray) -> dict[tuple[str, ...], QFactor]:
    """Tian's Q[C] for every c-component C, keyed by C's variables.

    Q[C] = prod over V_i in C of P(v_i | pa+_i), with pa+_i = (T_i ∪ Pa(T_i)) \\ {V_i} where T_i is
    the c-component of V_i in the prefix graph G[V_1..V_i]; this equals P(v_i | v^(i-1)) under G and
    depends on C ∪ Pa(C) only, also for an empirical P(V). A factor whose conditioning configuration
    has probability zero is undefined (NaN) unless an earlier factor of the product is already 0.
    """
    pv = _check_pv(graph, pv)
    names = graph.names
    out: dict[tuple[str, ...], QFactor] = {}
    for comp in graph.c_components():
        parents = tuple(n for n in names if n not in comp and any(n in graph.parents(v) for v in comp))
        axes = tuple(n for n in names if n in comp or n in parents)
        prod = np.ones([graph[n].size for n in axes])
        for v in comp:
            i = names.index(v)
            prefix = nx.Graph()
            prefix.add_nodes_from(names[: i + 1])
            prefix.add_edges_from((a, b) for a, b in graph.confounders if a in prefix and b in prefix)
            t_i = nx.node_connected_component(prefix, v)
            pa_plus = (set(t_i) | {p for t in t_i for p in graph.parents(t)}) - {v}
            marg, m_axes = _marginal(pv, graph, pa_plus | {v})
            denom = marg.sum(axis=m_axes.index(v), keepdims=True)
            with np.errstate(invalid="ignore", divide="ignore"):
                cond = np.where(denom > 0, marg / np.where(denom > 0, denom, 1.0), np.nan)
            f = _broadcast(cond, m_axes, axes)
            prod = np.where(prod == 0, 0.0, prod * f)
        out[tuple(comp)] = QFactor(tuple(comp), parents, axes, prod)
    return out


def _check_pv(graph: CausalGraph, pv) -> np.ndarray:
    arr = np.asarray(pv, dtype=float)
    if arr.shape != graph.shape:
        raise BoundsError(f"P(V) has shape {arr.shape}, but graph {graph.name!r} needs {graph.shape} "
                          f"(axes {', '.join(graph.names)})")
    if not np.isfinite(arr).all() or (arr < 0).any() or not np.isclose(arr.sum(), 1.0, atol=1e-6):
        raise BoundsError("P(V) must be finite, non-negative and sum to 1")
    return arr / arr.sum()


# ----------------------------------------------------------------------------------------------
# Query events as monomials over coordinates
# ----------------------------------------------------------------------------------------------


def event_monomials(graph: CausalGraph, terms: Sequence[Term]) -> list[Monomial]:
    """The event "all terms hold" as disjoint conjunctions of coordinate equalities.

    Worlds are the factual one and one per distinct intervention set. In each world, the observed
    variables and their non-intervened ancestors are enumerated in topological order; a coordinate
    already fixed by an earlier world forces the value (no branching), a clash drops the branch.
    An empty list means the event is impossible; ``[{}]`` means it always holds.
    """
    worlds: dict[frozenset, dict[str, int]] = {}
    for t in terms:
        do = frozenset((x, graph[x].index(v)) for x, v in t.interventions)
        obs = worlds.setdefault(do, {})
        val = graph[t.variable].index(t.value)
        if obs.get(t.variable, val) != val:
            return []
        obs[t.variable] = val
    slots: list[tuple[int, int, str]] = []
    keys = list(worlds)
    for w, key in enumerate(keys):
        do = dict(key)
        rel: set[str] = set()
        stack = list(worlds[key])
        while stack:
            v = stack.pop()
            if v in rel or v in do:
                continue
            rel.add(v)
            stack.extend(graph.parents(v))
        slots += [(graph.names.index(v), w, v) for v in rel]
    slots.sort()
    values = [dict(key) for key in keys]
    observed = [worlds[key] for key in keys]
    sizes = {n: graph[n].size for n in graph.names}
    out: list[Monomial] = []
    assign: dict[Coord, int] = {}

    def rec(i: int) -> None:
        if len(out) > _MAX_MONOMIALS:
            raise BoundsError(f"the query expands into more than {_MAX_MONOMIALS} response-type events; "
                              "give more evidence or fewer unobserved ancestors")
        if i == len(slots):
            out.append(dict(assign))
            return
        _, w, v = slots[i]
        vals = values[w]
        coord = (v, int(parent_index(graph, v, vals)))
        obs = observed[w].get(v)
        if coord in assign:
            x = assign[coord]
            if obs is not None and obs != x:
                return
            vals[v] = x
            rec(i + 1)
            del vals[v]
            return
        for x in ([obs] if obs is not None else range(sizes[v])):
            assign[coord] = x
            vals[v] = x
            rec(i + 1)
            del vals[v]
            del assign[coord]

    rec(0)
    return out


# ----------------------------------------------------------------------------------------------
# Per-component type spaces and constraints
# ----------------------------------------------------------------------------------------------


@dataclass
class ComponentSpace:
    """The response types of one c-component over ``coords`` and its observational constraints.

    ``types`` [n, len(coords)] lists the live types (those not forced to probability zero);
    ``A q = b`` (``A`` sparse, normalisation rows first) are the constraints on q over them.
    ``full``: every coordinate of the component's variables is present (multi-variable components);
    otherwise the space is the exact projection of a single-variable component onto ``coords``,
    split into *blocks*. Coordinates that some monomial reads together form a cluster; clusters are
    independent (exact: the constraints are per-coordinate marginals). Inside a cluster, when the
    coordinate sets the monomials read form an acyclic hypergraph, each maximal set is a block with
    its own joint and adjacent blocks of a join tree agree on their separator (exact: locally
    consistent marginals on a join tree always come from a global joint); otherwise the cluster is
    one block. A type of block k has -1 on the coordinates outside block k; ``block`` gives each
    type's block, ``block_sets`` each block's coordinates, ``trees`` the blocks of each cluster with
    the join-tree edges, and ``unit`` the indicator of block 0 (unit · q = 1: the factor of an event
    that reads nothing of C).
    ``partitions`` (full spaces): per parent configuration of the component, the cell (C value)
    each type produces and the identified targets (NaN: not identified).
    """

    index: int
    variables: tuple[str, ...]
    coords: list[Coord]
    sizes: list[int]
    types: np.ndarray
    A: sp.csr_matrix
    b: np.ndarray
    full: bool
    partitions: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    block: np.ndarray | None = None
    trees: list[tuple[list[int], list[tuple[int, int]]]] | None = None
    _dense: np.ndarray | None = None
    _echelon: tuple | None = None

    def __post_init__(self) -> None:
        self.col = {c: j for j, c in enumerate(self.coords)}
        if self.block is None:
            self.block = np.zeros(len(self.types), dtype=np.int64)
        self.unit = (self.block == 0).astype(float)
        first = [np.flatnonzero(self.block == k)[0] for k in range(self.n_blocks)]
        self.block_sets = [frozenset(c for c, x in zip(self.coords, self.types[i]) if x >= 0) for i in first]
        if self.trees is None:
            self.trees = [([k], []) for k in range(self.n_blocks)]

    @property
    def n(self) -> int:
        return len(self.types)

    @property
    def n_blocks(self) -> int:
        return int(self.block.max()) + 1 if len(self.block) else 0


    def indicator(self, event: Monomial) -> np.ndarray:
        """1.0 for the types satisfying every coordinate equality of ``event`` (restricted to C)."""
        if not event:
            return self.unit.copy()
        keys = set(event)
        k = next((k for k, bs in enumerate(self.block_sets) if keys <= bs), None)
        if k is None:
            raise KeyError(f"no block of c-component {self.variables} reads {sorted(keys)} together")
        mask = self.block == k
        for c, v in event.items():
            mask &= self.types[:, self.col[c]] == v
        return mask.astype(float)

    def dense(self) -> np.ndarray:
        if self._dense is None:
            self._dense = self.A.toarray()
        return self._dense


def _mixed_radix(sizes: Sequence[int]) -> np.ndarray:
    n = int(np.prod(sizes, dtype=np.int64)) if sizes else 1
    out = np.empty((n, len(sizes)), dtype=np.int16 if max(sizes, default=1) > 127 else np.int8)
    stride = n
    ar = np.arange(n)
    for j, s in enumerate(sizes):
        stride //= s
        out[:, j] = (ar // stride) % s
    return out


def _join_tree(sets: Iterable[frozenset]) -> tuple[list[frozenset], list[tuple[int, int]]]:
    """Maximal sets and a join tree over them, or the union as one set when the hypergraph is cyclic.

    A maximum-weight spanning tree of the intersection graph is a join tree exactly when its weight
    equals sum over coordinates of (number of sets holding it - 1).
    """
    sets = [s for s in set(sets) if s]
    maximal = sorted({s for s in sets if not any(s < t for t in sets)}, key=lambda s: sorted(s))
    if len(maximal) <= 1:
        return maximal or [frozenset()], []
    h = nx.Graph()
    h.add_nodes_from(range(len(maximal)))
    for i, j in itertools.combinations(range(len(maximal)), 2):
        w = len(maximal[i] & maximal[j])
        if w:
            h.add_edge(i, j, weight=w)
    tree = nx.maximum_spanning_tree(h)
    weight = sum(d["weight"] for _, _, d in tree.edges(data=True))
    need = sum(sum(c in s for s in maximal) - 1 for c in set().union(*maximal))
    if weight != need or not nx.is_connected(tree):
        return [frozenset().union(*maximal)], []
    return maximal, sorted(tuple(sorted(e)) for e in tree.edges())


class CanonicalProblem:
    """Q-factors and type spaces of a graph and a P(V): the shared machinery of bounds and models."""

    def __init__(self, graph: CausalGraph, pv: np.ndarray, max_types: int = 200_000):
        self.graph = graph
        self.pv = _check_pv(graph, pv)
        self.max_types = int(max_types)
        self.q = q_factors(graph, self.pv)
        self.components = list(graph.c_components())
        self.comp_of = {v: i for i, c in enumerate(self.components) for v in c}
        self._full: dict[int, ComponentSpace] = {}

    # -- helpers ------------------------------------------------------------------------------

    def conditional(self, var: str) -> np.ndarray:
        """P(var | parents) as [parent configurations, values]; NaN rows where not identified."""
        return self.q[(var,)].matrix()

    def all_coords(self, comp: int) -> list[Coord]:
        return [(v, p) for v in self.components[comp] for p in range(n_parent_configs(self.graph, v))]

    def n_full_types(self, comp: int) -> int:
        return math.prod(self.graph[v].size ** n_parent_configs(self.graph, v) for v in self.components[comp])

    def label(self, comp: int) -> str:
        return "{" + ", ".join(self.components[comp]) + "}"

    # -- spaces -------------------------------------------------------------------------------

    def space(self, comp: int, clusters: Iterable[Iterable[frozenset]] = ()) -> ComponentSpace:
        """The type space of component ``comp``: all coordinates for a multi-variable component;
        for a single-variable one, the blocks of the touched coordinates (``clusters``: per cluster,
        the coordinate sets read together)."""
        if len(self.components[comp]) > 1:
            return self.full_space(comp)
        return self._projected_space(comp, [[frozenset(x) for x in c] for c in clusters])

    def full_space(self, comp: int) -> ComponentSpace:
        if comp in self._full:
            return self._full[comp]
        g = self.graph
        variables = self.components[comp]
        n = self.n_full_types(comp)
        if n > self.max_types:
            raise BoundsError(
                f"c-component {self.label(comp)} has {n:.3g} response types, more than max_types="
                f"{self.max_types}; raise max_types or simplify the graph")
        coords = self.all_coords(comp)
        sizes = [g[v].size for v, _ in coords]
        types = _mixed_radix(sizes)
        offset = {}
        for j, (v, p) in enumerate(coords):
            offset.setdefault(v, j)
        qf = self.q[tuple(variables)]
        qm = qf.matrix()
        c_sizes = [g[v].size for v in variables]
        rows, cols, targets, partitions = [], [], [], []
        ar = np.arange(n)
        ext_sizes = [g[p].size for p in qf.parents]
        for e, ext in enumerate(itertools.product(*[range(s) for s in ext_sizes])):
            vals: dict[str, np.ndarray | int] = dict(zip(qf.parents, ext))
            for v in variables:
                pa = parent_index(g, v, vals)
                vals[v] = types[ar, offset[v] + pa].astype(np.int64)
            cell = np.ravel_multi_index([vals[v] for v in variables], c_sizes)
            tgt = qm[e]
            partitions.append((cell, tgt))
            defined = ~np.isnan(tgt)
            row_of = np.full(len(tgt), -1)
            row_of[defined] = np.arange(defined.sum()) + len(targets) + 1
            keep = defined[cell]
            rows.append(row_of[cell[keep]])
            cols.append(ar[keep])
            targets.extend(tgt[defined])
        b = np.array([1.0] + targets)
        rows = np.concatenate([np.zeros(n, dtype=np.int64)] + rows)
        cols = np.concatenate([ar] + cols)
        A = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(b), n))
        space = self._finish(comp, coords, sizes, types, A, b, full=True, partitions=partitions)
        if space.n == 0 or not _feasible(space):
            raise BoundsError(f"P(V) is not compatible with graph {g.name!r}: no response-type "
                              f"distribution of c-component {self.label(comp)} reproduces it")
        self._full[comp] = space
        return space

    def _projected_space(self, comp: int, clusters: list[list[frozenset]]) -> ComponentSpace:
        """Blocks for the touched coordinates of a single-variable component.

        ``clusters``: per cluster, the coordinate sets that monomials read together.
        """
        g = self.graph
        (var,) = self.components[comp]
        k = g[var].size
        blocks: list[list[Coord]] = []
        trees: list[tuple[list[int], list[tuple[int, int]]]] = []
        for sets in clusters:
            sets_, edges = _join_tree(sets)
            base = len(blocks)
            blocks += [sorted(x) for x in sets_]
            trees.append((list(range(base, len(blocks))), [(base + i, base + j) for i, j in edges]))
        if not blocks:
            blocks, trees = [[]], [([0], [])]
        coords = sorted({c for bl in blocks for c in bl})
        col = {c: j for j, c in enumerate(coords)}
        total = sum(k ** len(bl) for bl in blocks)
        if total > self.max_types:
            big = max(blocks, key=len)
            raise BoundsError(
                f"the query reads {len(big)} response coordinates of {var!r} jointly ({k ** len(big):.3g} "
                f"joint types, more than max_types={self.max_types})")
        types = np.full((total, len(coords)), -1, dtype=np.int8 if k <= 127 else np.int16)
        block = np.empty(total, dtype=np.int64)
        cond = self.conditional(var)
        norm_rows, rows, b = [], [], []
        span = []
        start = 0
        for kb, bl in enumerate(blocks):
            sub = _mixed_radix([k] * len(bl))
            stop = start + len(sub)
            types[start:stop, [col[c] for c in bl]] = sub
            block[start:stop] = kb
            span.append((start, stop))
            r = np.zeros(total)
            r[start:stop] = 1.0
            norm_rows.append(r)
            for j, (_, pa) in enumerate(bl):
                if np.isnan(cond[pa]).any():
                    continue
                for x in range(k):
                    r = np.zeros(total)
                    r[start:stop] = sub[:, j] == x
                    rows.append(r)
                    b.append(cond[pa, x])
            start = stop
        for _, edges in trees:  # join-tree neighbours agree on their separator
            for i, j in edges:
                sep = sorted(set(blocks[i]) & set(blocks[j]))
                for xs in itertools.product(range(k), repeat=len(sep)):
                    r = np.zeros(total)
                    for kb, sign in ((i, 1.0), (j, -1.0)):
                        lo, hi = span[kb]
                        m = np.ones(hi - lo, dtype=bool)
                        for c, x in zip(sep, xs):
                            m &= types[lo:hi, col[c]] == x
                        r[lo:hi] = sign * m
                    rows.append(r)
                    b.append(0.0)
        A = sp.csr_matrix(np.array(norm_rows + rows))
        b = np.array([1.0] * len(norm_rows) + b)
        return self._finish(comp, coords, [k] * len(coords), types, A, b, full=False, block=block, trees=trees)

    def _finish(self, comp, coords, sizes, types, A, b, full, partitions=(), block=None,
                trees=None) -> ComponentSpace:
        """Drop the types that a zero-probability constraint forces to zero, and empty rows."""
        A = sp.csr_matrix(A)
        nonneg = np.asarray((A < 0).sum(axis=1)).ravel() == 0
        zero_rows = np.flatnonzero((b <= _ZERO) & nonneg)
        dead = np.zeros(A.shape[1], dtype=bool)
        if len(zero_rows):
            dead = np.asarray(A[zero_rows].sum(axis=0)).ravel() > 0
        alive = ~dead
        A = A[:, alive]
        keep_rows = (np.diff(A.indptr) > 0) | (b > _ZERO)
        A, b = A[keep_rows], b[keep_rows]
        parts = [(cell[alive], tgt) for cell, tgt in partitions]
        return ComponentSpace(comp, self.components[comp], list(coords), list(sizes), types[alive],
                              sp.csr_matrix(A), b, full, parts, None if block is None else block[alive], trees)

    def spaces_for(self, monomial_sets: Iterable[list[Monomial]]) -> dict[int, ComponentSpace]:
        """The spaces of every component touched by the given monomials (single-variable ones split
        into clusters and join-tree blocks of the coordinates read together)."""
        touched: dict[int, tuple[nx.Graph, set]] = {}
        for monos in monomial_sets:
            for m in monos:
                by_comp: dict[int, list[Coord]] = {}
                for c in m:
                    by_comp.setdefault(self.comp_of[c[0]], []).append(c)
                for ci, cs in by_comp.items():
                    h, sets = touched.setdefault(ci, (nx.Graph(), set()))
                    h.add_nodes_from(cs)
                    h.add_edges_from(zip(cs, cs[1:]))
                    sets.add(frozenset(cs))
        out = {}
        for ci, (h, sets) in sorted(touched.items()):
            clusters = [[s for s in sets if s <= cc] for cc in map(frozenset, nx.connected_components(h))]
            out[ci] = self.space(ci, clusters)
        return out

    def check_compatible(self) -> None:
        """Feasibility of every multi-variable component small enough to enumerate."""
        for ci, comp in enumerate(self.components):
            if len(comp) > 1 and self.n_full_types(ci) <= self.max_types:
                self.full_space(ci)


# ----------------------------------------------------------------------------------------------
# Linear programming
# ----------------------------------------------------------------------------------------------

_HIGHS = {"presolve": True, "primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10}


def _lp(c: np.ndarray, A, b: np.ndarray, maximize: bool) -> tuple[float, np.ndarray]:
    res = linprog(-c if maximize else c, A_eq=A, b_eq=b, bounds=(0, None), method="highs", options=_HIGHS)
    if res.status == 2:
        raise _Infeasible()
    if res.status != 0:
        raise BoundsError(f"the linear program failed ({res.message})")
    val = float(c @ res.x)
    return val, res.x


class _Infeasible(Exception):
    pass


def _feasible(space: ComponentSpace) -> bool:
    try:
        _lp(np.zeros(space.n), space.A, space.b, False)
    except _Infeasible:
        return False
    return True


def _component_lp(space: ComponentSpace, c: np.ndarray, maximize: bool) -> tuple[float, np.ndarray]:
    try:
        return _lp(c, space.A, space.b, maximize)
    except _Infeasible:
        raise BoundsError(f"P(V) is not compatible with the graph: no response-type distribution of "
                          f"c-component {{{', '.join(space.variables)}}} reproduces it") from None


def _row_echelon(A: np.ndarray, b: np.ndarray, tol: float = 1e-10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reduced row echelon form of [A | b]: rows R, pivot columns P (R[:, P] = I) and rhs.

    Written with element-wise numpy only: LAPACK's threads stall behind HiGHS's spinning workers.
    """
    M = np.array(A, dtype=float)
    rhs = np.array(b, dtype=float)
    rows, pivots, out_rhs = [], [], []
    for i in range(M.shape[0]):
        r = M[i]
        for k, p in enumerate(pivots):  # eliminate earlier pivots (rows kept reduced below)
            if r[p] != 0.0:
                rhs[i] -= r[p] * out_rhs[k]
                r = r - r[p] * rows[k]
        j = int(np.argmax(np.abs(r)))
        if abs(r[j]) <= tol:
            continue
        rhs_i = rhs[i] / r[j]
        r = r / r[j]
        for k in range(len(rows)):  # keep earlier rows reduced in the new pivot column
            f = rows[k][j]
            if f != 0.0:
                rows[k] = rows[k] - f * r
                out_rhs[k] -= f * rhs_i
        rows.append(r)
        pivots.append(j)
        out_rhs.append(rhs_i)
    R = np.array(rows).reshape(len(rows), M.shape[1])
    return R, np.array(pivots, dtype=np.int64), np.array(out_rhs)


def _determined(space: ComponentSpace, F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row a of F: is a·q the same for every feasible q, and its value.

    Exact test: a lies in the row space of the constraints (then a·q = y·b). Spaces too large for
    the elimination fall back to two LPs per row.
    """
    if len(F) == 0:
        return np.zeros(0, dtype=bool), np.zeros(0)
    m = space.A.shape[0]
    if m * m * space.n <= _DENSE_LIMIT * 10:
        if space._echelon is None:
            space._echelon = _row_echelon(space.dense(), space.b)
        R, P, r = space._echelon
        C = F[:, P]
        res = F.copy()
        for k in range(len(P)):
            res -= C[:, k:k + 1] * R[k]
        ok = np.abs(res).max(axis=1) <= 1e-8
        return ok, (C * r).sum(axis=1)
    ok, vals = np.zeros(len(F), dtype=bool), np.zeros(len(F))
    for i, a in enumerate(F):
        lo, _ = _component_lp(space, a, False)
        hi, _ = _component_lp(space, a, True)
        ok[i], vals[i] = hi - lo <= 1e-12, (lo + hi) / 2
    return ok, vals


# ----------------------------------------------------------------------------------------------
# Polynomials: sums of coefficient × product over components of q_C(event_C)
# ----------------------------------------------------------------------------------------------


@dataclass
class _Poly:
    """coef[t] * const[t] * prod over varying components i of F[i][t] · q_i."""

    coef: np.ndarray
    const: np.ndarray
    F: dict[int, np.ndarray]  # component -> [T, n_i] indicator rows (ones where the factor is constant)

    def value(self, q: dict[int, np.ndarray]) -> float:
        prod = self.coef * self.const
        for i, Fi in self.F.items():
            prod = prod * (Fi @ q[i])
        return float(prod.sum())

    def gradient(self, q: dict[int, np.ndarray], i: int) -> np.ndarray:
        w = self.coef * self.const
        for j, Fj in self.F.items():
            if j != i:
                w = w * (Fj @ q[j])
        return self.F[i].T @ w

    def tensor(self, order: list[int], n: dict[int, int]) -> np.ndarray:
        """The objective as a vector over the product space of ``order`` (C order, flattened)."""
        out = np.zeros(int(np.prod([n[i] for i in order])))
        w = self.coef * self.const
        for t in range(len(w)):
            if w[t] == 0:
                continue
            v = np.array([w[t]])
            for i in order:
                v = np.kron(v, self.F[i][t])
            out += v
        return out


def _polynomial(problem: CanonicalProblem, spaces: dict[int, ComponentSpace],
                weighted: list[tuple[float, list[Monomial]]]) -> _Poly:
    coef, per_comp = [], {ci: [] for ci in spaces}
    for w, monos in weighted:
        for m in monos:
            coef.append(w)
            split: dict[int, Monomial] = {}
            for c, v in m.items():
                split.setdefault(problem.comp_of[c[0]], {})[c] = v
            for ci in spaces:
                per_comp[ci].append(split.get(ci))
    T = len(coef)
    const = np.ones(T)
    F: dict[int, np.ndarray] = {}
    for ci, space in spaces.items():
        events = per_comp[ci]
        rows = np.array([space.indicator(e or {}) for e in events]).reshape(T, space.n)
        touched = np.array([e is not None and len(e) > 0 for e in events], dtype=bool)
        det = np.ones(T, dtype=bool)
        vals = np.ones(T)
        if touched.any():
            uniq, inv = np.unique(rows[touched], axis=0, return_inverse=True)
            ok, v = _determined(space, uniq)
            det[touched] = ok[inv.ravel()]
            vals[touched] = v[inv.ravel()]
        const *= np.where(det, vals, 1.0)
        if not det.all():
            Fi = rows.copy()
            Fi[det] = space.unit
            F[ci] = Fi
    return _Poly(np.array(coef, dtype=float), const, F)


# ----------------------------------------------------------------------------------------------
# Solving
# ----------------------------------------------------------------------------------------------


@dataclass
class BoundsSolution:
    """Everything a bounds computation found, including the optimal type distributions.

    ``solutions[side]`` maps component index → q over ``spaces[component].types`` at the model that
    attains ``inner_lower``/``inner_upper`` (empty for a point: every feasible model attains it).
    """

    bounds: Bounds
    spaces: dict[int, ComponentSpace]
    solutions: dict[str, dict[int, np.ndarray]]
    problem: CanonicalProblem


def _as_query(graph: CausalGraph, query: Query | str) -> Query:
    q = parse_query(query) if isinstance(query, str) else query
    if not isinstance(q, Query):
        raise BoundsError(f"expected a query string or Query, got {type(query).__name__}")
    return q.validate(graph)


def _describe(terms: Sequence[tuple[float, Query]]) -> str:
    if len(terms) == 1 and terms[0][0] == 1.0:
        return str(terms[0][1])
    parts = []
    for k, (w, q) in enumerate(terms):
        sign = "-" if w < 0 else ("+" if k else "")
        parts.append(f"{sign} {abs(w):g}*{q}" if k else f"{sign}{abs(w):g}*{q}")
    return " ".join(parts)


def solve_bounds(graph: CausalGraph, pv: np.ndarray, terms: Sequence[tuple[float, Query | str]], *,
                 max_types: int = 200_000, n_starts: int = 4, seed: int = 0,
                 problem: CanonicalProblem | None = None) -> BoundsSolution:
    """Bounds of sum_k w_k P(targets_k | evidence) (one shared evidence) with the optimal models."""
    t0 = time.perf_counter()
    if not terms:
        raise BoundsError("no query given")
    queries = [(float(w), _as_query(graph, q)) for w, q in terms]
    evidence = set(queries[0][1].evidence)
    if any(set(q.evidence) != evidence for _, q in queries):
        raise BoundsError("all queries of a linear combination must share the same evidence")
    evidence_terms = queries[0][1].evidence
    problem = problem or CanonicalProblem(graph, pv, max_types)
    problem.check_compatible()
    text = _describe(queries)

    num = [(w, event_monomials(graph, q.targets + q.evidence)) for w, q in queries]
    factual_ev = all(t.is_factual for t in evidence_terms)
    den_monos = event_monomials(graph, evidence_terms)
    spaces = problem.spaces_for([m for _, m in num] + [den_monos])
    N = _polynomial(problem, spaces, num)

    if factual_ev:
        if _factual_prob(graph, problem.pv, evidence_terms) <= 0:
            raise ZeroEvidenceBoundsError(f"the evidence of {text} has probability zero under P(V)")
        # P(evidence) under the graph's factorisation of P(V) (Tian's Q-factors), the same one the
        # numerator uses: where the data break the graph's independences the empirical P(evidence)
        # differs, and their ratio would violate consistency (P(Y_x = y | X = x, Y = y, ...) < 1).
        D = _polynomial(problem, spaces, [(1.0, den_monos)])
        p_e = float((D.coef * D.const).sum()) if not D.F else _factual_prob(graph, problem.pv, evidence_terms)
        if p_e <= 1e-15:
            raise ZeroEvidenceBoundsError(f"the evidence of {text} has probability zero under the graph's model of P(V)")
        D = None
    else:
        D = _polynomial(problem, spaces, [(1.0, den_monos)])
        if not D.F:
            p_e = float((D.coef * D.const).sum())
            if p_e <= 1e-15:
                raise ZeroEvidenceBoundsError(f"the evidence of {text} has probability zero under every model")
            D = None

    varying = sorted(set(N.F) | (set(D.F) if D is not None else set()))
    single = len(queries) == 1
    sols: dict[str, dict[int, np.ndarray]] = {"lower": {}, "upper": {}}

    if D is not None:
        if len(varying) > 1:
            raise BoundsError("counterfactual evidence is not supported by bounds yet "
                              "(the query couples several c-components)")
        (ci,) = varying
        lo, hi, sols = _fractional(spaces[ci], N, D, ci)
        method, certified, inner = "lp-fractional", True, (lo, hi)
    elif not varying:
        v = float((N.coef * N.const).sum()) / p_e
        lo = hi = v
        method, certified, inner = "point", True, (v, v)
    elif len(varying) == 1:
        (ci,) = varying
        c = N.gradient({}, ci)
        lo, x_lo = _component_lp(spaces[ci], c, False)
        hi, x_hi = _component_lp(spaces[ci], c, True)
        lo, hi = lo / p_e, hi / p_e
        sols = {"lower": {ci: x_lo}, "upper": {ci: x_hi}}
        method, certified, inner = "lp", True, (lo, hi)
    else:
        (lo, hi), inner, sols = _multilinear(spaces, N, varying, p_e, problem, n_starts, seed)
        if single:  # a probability: the relaxation may stray outside [0, 1]
            lo, hi = max(lo, 0.0), min(hi, 1.0)
        certified = abs(lo - inner[0]) <= CERTIFY_TOL and abs(hi - inner[1]) <= CERTIFY_TOL
        method = "multilinear"
        if certified:
            lo, hi = inner

    if single:  # a probability: clip, and snap rounding noise at 0 and 1
        lo, hi, il, iu = (_snap(min(max(x, 0.0), 1.0)) for x in (lo, hi, *inner))
        inner = (il, iu)
    if lo > hi:  # numerical noise on a point
        lo = hi = (lo + hi) / 2
    b = Bounds(float(lo), float(hi), method, bool(certified), time.perf_counter() - t0, text,
               float(inner[0]), float(inner[1]))
    return BoundsSolution(b, spaces, sols, problem)


def _snap(x: float) -> float:
    return float(round(x)) if abs(x - round(x)) <= 1e-12 else x


def _factual_prob(graph: CausalGraph, pv: np.ndarray, terms: Sequence[Term]) -> float:
    idx: list = [slice(None)] * len(graph.names)
    for t in terms:
        idx[graph.axis(t.variable)] = graph[t.variable].index(t.value)
    return float(pv[tuple(idx)].sum())


def _fractional(space: ComponentSpace, N: _Poly, D: _Poly, ci: int):
    """Charnes–Cooper: extremes of (n·q)/(d·q) over the component polytope as one LP each."""
    c_n = N.gradient({}, ci) if ci in N.F else float((N.coef * N.const).sum()) * space.unit
    c_d = D.gradient({}, ci)
    n = space.n
    A = sp.vstack([sp.hstack([space.A, -space.b.reshape(-1, 1)]),
                   sp.csr_matrix(np.append(c_d, 0.0).reshape(1, -1))]).tocsr()
    rhs = np.append(np.zeros(space.A.shape[0]), 1.0)
    out, sols = [], {}
    for side, maximize in (("lower", False), ("upper", True)):
        try:
            val, x = _lp(np.append(c_n, 0.0), A, rhs, maximize)
        except _Infeasible:
            raise BoundsError("the counterfactual evidence has probability zero under every model "
                              "(or P(V) is not compatible with the graph)") from None
        t = x[n]
        if t <= 1e-12:
            raise ZeroEvidenceBoundsError("the counterfactual evidence has probability zero under every model")
        out.append(val)
        sols[side] = {ci: x[:n] / t}
    return out[0], out[1], sols


_RLT_STRONG_LIMIT = 20_000_000  # rows x columns of the pairwise block of the relaxation


def _rlt_constraints(spaces: dict[int, ComponentSpace], order: list[int]):
    """Level-1 RLT (Sherali–Adams) constraints on a joint mu over the product of the type spaces.

    (a) products of one constraint row per component: kron(rows) · mu = prod(rhs) (normalisation
    rows included, so each marginal of mu meets its component's constraints), and (b) for each pair
    (i, j) and each type r_j: the conditional of mu given r_j meets component i's constraints,
    i.e. sum over mu(·, r_j) (a_i - b_i) = 0. Both hold for every product mu = q_1 ⊗ ... ⊗ q_k.
    (b) is left out when it would be too large (the relaxation is then looser, still valid).
    """
    blocks, rhs = [], []
    mats = [spaces[i].A for i in order]
    vecs = [spaces[i].b for i in order]
    M, r = mats[0], vecs[0]
    for A, b in zip(mats[1:], vecs[1:]):
        M, r = sp.kron(M, A, format="csr"), np.kron(r, b)
    blocks.append(M)
    rhs.append(r)
    cols = math.prod(spaces[i].n for i in order)
    strong_rows = sum(spaces[i].A.shape[0] * spaces[j].n for i in order for j in order if i != j)
    if strong_rows * cols > _RLT_STRONG_LIMIT:  # too big: products of constraints only
        return M, r
    for ii, i in enumerate(order):
        centred = sp.csr_matrix(spaces[i].A - sp.csr_matrix(spaces[i].b.reshape(-1, 1)) @ sp.csr_matrix(spaces[i].unit.reshape(1, -1)))
        for jj, j in enumerate(order):
            if i == j:
                continue
            parts = []
            for kk, k in enumerate(order):
                if k == i:
                    parts.append(centred)
                elif k == j:
                    parts.append(sp.identity(spaces[k].n, format="csr"))
                else:
                    parts.append(sp.csr_matrix(spaces[k].unit.reshape(1, -1)))
            P = parts[0]
            for Q in parts[1:]:
                P = sp.kron(P, Q, format="csr")
            blocks.append(P)
            rhs.append(np.zeros(P.shape[0]))
    return sp.vstack(blocks).tocsr(), np.concatenate(rhs)


def _marginals(mu: np.ndarray, order: list[int], spaces) -> dict[int, np.ndarray]:
    """Marginals of mu per component (other components summed over their block 0: unit · q = 1)."""
    t = mu.reshape([spaces[i].n for i in order])
    out = {}
    for k, i in enumerate(order):
        m = t
        for a in reversed(range(len(order))):
            if a != k:
                m = (np.moveaxis(m, a, -1) * spaces[order[a]].unit).sum(axis=-1)
        out[i] = np.clip(m, 0, None)
    return out


def _multilinear(spaces, N: _Poly, varying: list[int], p_e: float, problem: CanonicalProblem,
                 n_starts: int, seed: int):
    n = {i: spaces[i].n for i in varying}
    size = math.prod(n.values())
    if size > problem.max_types:
        raise BoundsError(
            f"the query couples c-components {', '.join(problem.label(i) for i in varying)}: the relaxation "
            f"has {size} joint types, more than max_types={problem.max_types}")
    A, b = _rlt_constraints(spaces, varying)
    obj = N.tensor(varying, n)
    rng = np.random.default_rng(seed)
    outer, inner, sols = [], [], {}
    for side, maximize in (("lower", False), ("upper", True)):
        try:
            val, mu = _lp(obj, A, b, maximize)
        except _Infeasible:
            raise BoundsError("P(V) is not compatible with the graph (the relaxation is infeasible)") from None
        outer.append(val / p_e)
        starts = [_marginals(mu, varying, spaces)]
        for _ in range(n_starts):
            starts.append({i: _component_lp(spaces[i], rng.standard_normal(n[i]), False)[1] for i in varying})
        best, best_q = None, None
        for q in starts:
            v, q = _block_ascent(spaces, N, varying, q, maximize)
            if best is None or (v > best if maximize else v < best):
                best, best_q = v, q
            if abs(best / p_e - outer[-1]) <= CERTIFY_TOL / 10:
                break
        inner.append(best / p_e)
        sols[side] = best_q
    return (outer[0], outer[1]), (inner[0], inner[1]), sols


def _block_ascent(spaces, N: _Poly, varying: list[int], q: dict[int, np.ndarray], maximize: bool,
                  max_rounds: int = 100):
    q = dict(q)
    val = N.value(q)
    for _ in range(max_rounds):
        before = val
        for i in varying:
            c = N.gradient(q, i)
            v, x = _component_lp(spaces[i], c, maximize)
            if (v > val + 1e-13) if maximize else (v < val - 1e-13):
                q[i], val = x, v
        if abs(val - before) <= 1e-13:
            break
    return N.value(q), q


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------


def effect_bounds(graph: CausalGraph, pv: np.ndarray, terms: Sequence[tuple[float, Query | str]], *,
                  max_types: int = 200_000) -> Bounds:
    """Sharp bounds of a linear combination sum_k w_k P(targets_k | e) with one shared evidence e.

    E.g. the average causal effect as [(1, "P(y_{x=1}=1, y_{x=0}=0)"), (-1, "P(y_{x=1}=0, y_{x=0}=1)")].
    """
    return solve_bounds(graph, pv, terms, max_types=max_types).bounds


def compute_bounds(graph: CausalGraph, pv: np.ndarray, query: Query | str, *,
                   max_types: int = 200_000) -> Bounds:
    """Sharp bounds [lower, upper] of a counterfactual query given the graph and P(V)."""
    return solve_bounds(graph, pv, [(1.0, query)], max_types=max_types).bounds
