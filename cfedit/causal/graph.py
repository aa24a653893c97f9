"""Causal graphs over an image's discrete factors: variables, edges, confounders, derived structure.

A :class:`CausalGraph` holds discrete variables with labelled values, directed edges ``a -> b``,
bidirected edges ``a <-> b`` (an unobserved common cause), the image node, and the graph file's
optional sections (``data:``, ``queries:``, ``fit:``, ``reader:``) as validated plain values. Graph
files are read and checked by :mod:`cfedit.causal.graph_file`.

This module imports nothing of torch, so ``cfedit bounds`` starts instantly.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import networkx as nx

from cfedit.errors import GraphError  # re-exported: ``from cfedit.causal.graph import GraphError``

#: Most values one variable may have. P(V) and the feature models grow with the product of the
#: domain sizes, so a larger domain is a mistake rather than a graph.
MAX_DOMAIN = 1024
#: A graph name: it becomes part of file names (``runs/<name>-<features>.safetensors``), so no
#: separators and no leading dot.
GRAPH_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


@dataclass(frozen=True)
class Variable:
    """A discrete factor: its labelled values, and how a labelled dataset codes it.

    ``column`` is the dataset column holding the variable (defaults to its name); ``codes`` maps each
    label to the code as it appears in that column (as a string: CSV cells are strings). Without
    ``codes`` the dataset holds the labels themselves.
    """

    name: str
    values: tuple[str, ...]
    column: str | None = None
    codes: tuple[tuple[str, str], ...] | None = None

    def __post_init__(self) -> None:
        # label -> index and code -> index: lookups stay O(1) for large domains and long label files
        positions = {v: i for i, v in enumerate(self.values)}
        object.__setattr__(self, "_positions", positions)
        object.__setattr__(self, "_by_code", None if self.codes is None else
                           {c: positions[label] for label, c in self.codes})

    @property
    def size(self) -> int:
        return len(self.values)

    @property
    def data_column(self) -> str:
        return self.column or self.name

    def index(self, label: str) -> int:
        i = self._positions.get(str(label))
        if i is None:
            raise GraphError(f"value {label!r} is not in the domain of {self.name!r} ({', '.join(self.values)})")
        return i

    def as_index(self, value: Any) -> int:
        """A value given as its label or as its index (int or numpy integer) → its index."""
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            i = int(value)
            if not 0 <= i < self.size:
                raise GraphError(f"{self.name}={value}: value index out of range 0..{self.size - 1}")
            return i
        return self.index(value)

    def code_to_index(self, code: str) -> int | None:
        """Index of the value a dataset cell stands for, or None when the code is unknown."""
        code = str(code).strip()
        return (self._positions if self._by_code is None else self._by_code).get(code)

    def to_dict(self) -> Any:
        if self.column is None and self.codes is None:
            return list(self.values)
        out: dict[str, Any] = {"values": list(self.values)}
        if self.column is not None:
            out["column"] = self.column
        if self.codes is not None:
            out["codes"] = dict(self.codes)
        return out


@dataclass(frozen=True)
class ImageSpec:
    channels: int = 3
    size: int = 28


@dataclass(frozen=True)
class CausalGraph:
    """Discrete factors, directed edges among them, bidirected (confounded) pairs, and the image.

    ``names`` is a topological order (ties broken by the order of the file); every array over the
    factors in cfedit (P(V), samples of value indices) uses this axis order.
    """

    name: str
    variables: tuple[Variable, ...]
    edges: tuple[tuple[str, str], ...]
    confounders: tuple[tuple[str, str], ...] = ()
    image: ImageSpec = ImageSpec()
    description: str = ""
    data: dict[str, Any] | None = None
    queries: dict[str, str] = field(default_factory=dict)
    source: str | None = None
    # Training recipe for ``cfedit fit`` (epochs, residual, mechanism options such as latent); the
    # command line overrides it. Not part of the structure: it changes how a model is trained, not
    # which models fit the graph.
    fit: dict[str, Any] = field(default_factory=dict)
    # How ``cfedit eval`` trains its independent reader for this graph (epochs, width, augmentation such
    # as flip, mirror reading); command-line and API options override it. Not part of the structure.
    reader: dict[str, Any] = field(default_factory=dict)

    # -- construction ------------------------------------------------------------------------

    def __post_init__(self) -> None:
        where = self.source or "<graph>"
        problem = graph_name_problem(self.name)
        if problem:
            raise GraphError(f"{where}: {problem}")
        names = [v.name for v in self.variables]
        known = set(names)
        for a, b in self.edges:
            for v in (a, b):
                if v not in known:
                    raise GraphError(f"{where}: edge '{a} -> {b}' names unknown variable {v!r}")
            if a == b:
                raise GraphError(f"{where}: edge '{a} -> {b}' is a self-loop")
        for a, b in self.confounders:
            for v in (a, b):
                if v not in known:
                    raise GraphError(f"{where}: confounder '{a} <-> {b}' names unknown variable {v!r}")
            if a == b:
                raise GraphError(f"{where}: confounder '{a} <-> {b}' is a self-loop")
        dag = nx.DiGraph()
        dag.add_nodes_from(names)
        dag.add_edges_from(self.edges)
        if not nx.is_directed_acyclic_graph(dag):
            cycle = nx.find_cycle(dag)
            path = " -> ".join([u for u, _ in cycle] + [cycle[0][0]])
            raise GraphError(f"{where}: the edges contain a cycle: {path}")
        rank = {n: i for i, n in enumerate(names)}
        order = list(nx.lexicographical_topological_sort(dag, key=lambda n: rank[n]))
        by_name = {v.name: v for v in self.variables}
        object.__setattr__(self, "variables", tuple(by_name[n] for n in order))
        # Bidirected pairs are unordered; store each in topological order so printing is stable.
        pos = {n: i for i, n in enumerate(order)}
        object.__setattr__(self, "confounders", tuple(tuple(sorted(p, key=pos.__getitem__)) for p in self.confounders))
        object.__setattr__(self, "_dag", dag)

    # -- basic access ------------------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.variables)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(v.size for v in self.variables)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __getitem__(self, name: str) -> Variable:
        for v in self.variables:
            if v.name == name:
                return v
        raise GraphError(f"graph {self.name!r} has no variable {name!r} (it has {', '.join(self.names)})")

    def value_indices(self, values: Mapping[str, Any] | None) -> dict[str, int]:
        """``{variable: label or index}`` (an intervention, given factors) → ``{variable: index}``."""
        return {k: self[k].as_index(v) for k, v in (values or {}).items()}

    def axis(self, name: str) -> int:
        """Position of a variable in :attr:`names` (the axis of P(V) arrays)."""
        self[name]
        return self.names.index(name)

    # -- derived structure -------------------------------------------------------------------

    def parents(self, name: str) -> tuple[str, ...]:
        ps = set(self._dag.predecessors(name))
        return tuple(n for n in self.names if n in ps)

    def children(self, name: str) -> tuple[str, ...]:
        cs = set(self._dag.successors(name))
        return tuple(n for n in self.names if n in cs)

    def ancestors(self, names: str | Iterable[str], include_self: bool = False) -> tuple[str, ...]:
        names = [names] if isinstance(names, str) else list(names)
        out = set(names) if include_self else set()
        for n in names:
            out |= nx.ancestors(self._dag, n)
        return tuple(n for n in self.names if n in out)

    def descendants(self, names: str | Iterable[str], include_self: bool = False) -> tuple[str, ...]:
        names = [names] if isinstance(names, str) else list(names)
        out = set(names) if include_self else set()
        for n in names:
            out |= nx.descendants(self._dag, n)
        return tuple(n for n in self.names if n in out)

    def spouses(self, name: str) -> tuple[str, ...]:
        """Variables sharing an unobserved cause with ``name``."""
        s = {b for a, b in self.confounders if a == name} | {a for a, b in self.confounders if b == name}
        return tuple(n for n in self.names if n in s)

    def c_components(self) -> tuple[tuple[str, ...], ...]:
        """Maximal sets connected by bidirected edges (Tian's c-components), in topological order."""
        g = nx.Graph()
        g.add_nodes_from(self.names)
        g.add_edges_from(self.confounders)
        comps = [tuple(n for n in self.names if n in c) for c in nx.connected_components(g)]
        return tuple(sorted(comps, key=lambda c: self.names.index(c[0])))

    def bidirected_cliques(self) -> tuple[tuple[str, ...], ...]:
        """Maximal cliques of the bidirected part with at least two members: one shared noise each."""
        g = nx.Graph()
        g.add_nodes_from(self.names)
        g.add_edges_from(self.confounders)
        cliques = [tuple(n for n in self.names if n in c) for c in nx.find_cliques(g) if len(c) > 1]
        return tuple(sorted(cliques, key=lambda c: [self.names.index(n) for n in c]))

    # -- serialisation -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["variables"] = {v.name: v.to_dict() for v in self.variables}
        out["edges"] = [f"{a} -> {b}" for a, b in self.edges]
        out["confounders"] = [f"{a} <-> {b}" for a, b in self.confounders]
        out["image"] = {"channels": self.image.channels, "size": self.image.size}
        if self.data is not None:
            out["data"] = self.data
        if self.queries:
            out["queries"] = dict(self.queries)
        if self.fit:
            out["fit"] = dict(self.fit)
        if self.reader:
            out["reader"] = dict(self.reader)
        return out

    def structure_hash(self) -> str:
        """SHA-256 of what a trained model depends on: variables, values, codes, edges, image.

        Names, descriptions, data paths and queries are left out so a renamed or annotated copy of a
        graph still matches its checkpoints.
        """
        core = {
            "variables": [[v.name, list(v.values)] for v in self.variables],
            "edges": sorted(f"{a}->{b}" for a, b in self.edges),
            "confounders": sorted("<->".join(sorted(p)) for p in self.confounders),
            "image": [self.image.channels, self.image.size],
        }
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()

    def to_mermaid(self) -> str:
        lines = ["graph TD"]
        for v in self.variables:
            lines.append(f"    {v.name}[\"{v.name}: {' | '.join(v.values)}\"]")
        for a, b in self.edges:
            lines.append(f"    {a} --> {b}")
        for a, b in self.confounders:
            lines.append(f"    {a} <-.-> {b}")
        lines.append('    image(["image"])')
        for v in self.variables:
            lines.append(f"    {v.name} --> image")
        return "\n".join(lines) + "\n"

    def to_dot(self) -> str:
        lines = [f'digraph "{self.name}" {{', "    rankdir=TB;"]
        for v in self.variables:
            lines.append(f'    "{v.name}" [label="{v.name}\\n{" | ".join(v.values)}"];')
        lines.append('    "image" [shape=box];')
        for a, b in self.edges:
            lines.append(f'    "{a}" -> "{b}";')
        for a, b in self.confounders:
            lines.append(f'    "{a}" -> "{b}" [dir=both, style=dashed, constraint=false];')
        for v in self.variables:
            lines.append(f'    "{v.name}" -> "image" [color=gray];')
        lines.append("}")
        return "\n".join(lines) + "\n"

    def markovian_version(self) -> "CausalGraph":
        """The graph with every bidirected edge a <-> b replaced by a directed edge along the order.

        DEAR's assumption (no hidden confounding); used by the ``markovian`` baseline.
        """
        pos = {n: i for i, n in enumerate(self.names)}
        extra = [tuple(sorted(p, key=pos.__getitem__)) for p in self.confounders]
        edges = list(self.edges) + [e for e in extra if e not in self.edges]
        return CausalGraph(
            name=f"{self.name}-markovian", variables=self.variables, edges=tuple(edges),
            confounders=(), image=self.image, description=self.description, data=self.data,
            queries=dict(self.queries), source=self.source, fit=dict(self.fit), reader=dict(self.reader),
        )


def graph_name_problem(name: Any) -> str | None:
    """Why ``name`` cannot name a graph (it becomes part of file names), or None when it can."""
    if isinstance(name, str) and GRAPH_NAME.fullmatch(name):
        return None
    return (f"graph name {name!r} must be letters, digits, '_', '-' and '.', not starting with '.' or '-' "
            f"(it names files such as runs/<name>-canonical.safetensors)")
