"""Causal graphs over an image's discrete factors: loading, validation and derived structure.

A graph file (DESIGN §3) names discrete variables with labelled values, directed edges ``a -> b``,
bidirected edges ``a <-> b`` (an unobserved common cause), the image node, and optionally where the
data comes from and a few named queries. Everything a user can get wrong is reported as a
:class:`GraphError` whose message names the file, the line where known, and the offending key.

This module imports nothing of torch, so ``cfedit bounds`` starts instantly.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import networkx as nx
import yaml


class GraphError(ValueError):
    """A graph file or graph definition is invalid. The message is one line, ready for the user."""


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

    @property
    def size(self) -> int:
        return len(self.values)

    @property
    def data_column(self) -> str:
        return self.column or self.name

    def index(self, label: str) -> int:
        try:
            return self.values.index(str(label))
        except ValueError:
            raise GraphError(
                f"value {label!r} is not in the domain of {self.name!r} ({', '.join(self.values)})"
            ) from None

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
        if self.codes is None:
            return self.values.index(code) if code in self.values else None
        for label, c in self.codes:
            if c == code:
                return self.values.index(label)
        return None

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
        where = self.source or self.name
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

    def c_component(self, name: str) -> tuple[str, ...]:
        return next(c for c in self.c_components() if name in c)

    def bidirected_cliques(self) -> tuple[tuple[str, ...], ...]:
        """Maximal cliques of the bidirected part with at least two members: one shared noise each."""
        g = nx.Graph()
        g.add_nodes_from(self.names)
        g.add_edges_from(self.confounders)
        cliques = [tuple(n for n in self.names if n in c) for c in nx.find_cliques(g) if len(c) > 1]
        return tuple(sorted(cliques, key=lambda c: [self.names.index(n) for n in c]))

    def is_markovian(self) -> bool:
        return not self.confounders

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


# --------------------------------------------------------------------------------------------
# Loading from YAML with line numbers
# --------------------------------------------------------------------------------------------

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_EDGE = re.compile(rf"^\s*({_NAME})\s*->\s*({_NAME})\s*$")
_BIDIRECTED = re.compile(rf"^\s*({_NAME})\s*<->\s*({_NAME})\s*$")
_TOP_KEYS = {"name", "description", "variables", "edges", "confounders", "image", "data", "queries", "fit", "reader"}


class _Lines:
    """Line numbers of the YAML nodes, keyed by their path of keys and indices."""

    def __init__(self) -> None:
        self.at: dict[tuple, int] = {}

    def of(self, *path: Any) -> int | None:
        while path:
            if path in self.at:
                return self.at[path]
            path = path[:-1]
        return None


def _plain(node: yaml.Node, path: tuple, lines: _Lines, where: str) -> Any:
    """Convert a composed YAML node to plain Python, recording line numbers and refusing duplicates."""
    lines.at[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for k, v in node.value:
            key = yaml.safe_load(yaml.serialize(k)) if not isinstance(k, yaml.ScalarNode) else k.value
            key = str(key)
            if key in out:
                raise GraphError(f"{where}:{k.start_mark.line + 1}: duplicate key {key!r}")
            lines.at[path + (key,)] = k.start_mark.line + 1
            out[key] = _plain(v, path + (key,), lines, where)
            lines.at[path + (key,)] = k.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_plain(v, path + (i,), lines, where) for i, v in enumerate(node.value)]
    return yaml.safe_load(yaml.serialize(node))


def _label(x: Any) -> str:
    if isinstance(x, bool):
        # YAML reads yes/no/true/false as booleans; a value label means the word the user wrote.
        return "yes" if x else "no"
    return str(x)


def graph_from_dict(d: Any, source: str = "<graph>", lines: _Lines | None = None) -> CausalGraph:
    """Validate a plain-Python graph description (as read from YAML) and build the graph."""
    lines = lines or _Lines()

    def err(msg: str, *path: Any) -> GraphError:
        line = lines.of(*path)
        loc = f"{source}:{line}" if line else source
        return GraphError(f"{loc}: {msg}")

    if not isinstance(d, dict):
        raise err("a graph file must be a mapping with keys 'variables', 'edges', ...")
    unknown = sorted(set(d) - _TOP_KEYS)
    if unknown:
        raise err(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(_TOP_KEYS))})", unknown[0])
    name = str(d.get("name") or Path(source).stem)
    raw_vars = d.get("variables")
    if not isinstance(raw_vars, dict) or not raw_vars:
        raise err("'variables' must be a non-empty mapping of name: [values]", "variables")

    variables = []
    for vname, spec in raw_vars.items():
        p = ("variables", vname)
        if not re.fullmatch(_NAME, vname):
            raise err(f"variable name {vname!r} must be letters, digits and '_' (not starting with a digit)", *p)
        column = codes = None
        if isinstance(spec, dict):
            extra = sorted(set(spec) - {"values", "column", "codes"})
            if extra:
                raise err(f"variable {vname!r}: unknown key {extra[0]!r} (known: values, column, codes)", *p, extra[0])
            values = spec.get("values")
            column = spec.get("column")
            if column is not None:
                column = str(column)
            raw_codes = spec.get("codes")
        else:
            values, raw_codes = spec, None
        if not isinstance(values, list):
            raise err(f"variable {vname!r}: values must be a list such as [no, yes]", *p)
        if not values:
            raise err(f"variable {vname!r} has an empty domain", *p)
        labels = [_label(x) for x in values]
        for i, lab in enumerate(labels):
            if not re.fullmatch(r"[A-Za-z0-9_.+\-]+", lab):
                raise err(f"variable {vname!r}: value {lab!r} must be letters, digits, '_', '.', '+' or '-'", *p)
            if lab in labels[:i]:
                raise err(f"variable {vname!r}: duplicate value {lab!r}", *p)
        if raw_codes is not None:
            if not isinstance(raw_codes, dict):
                raise err(f"variable {vname!r}: codes must map each value to its code in the data", *p, "codes")
            rc = {_label(k): v for k, v in raw_codes.items()}
            missing = [lab for lab in labels if lab not in rc]
            stray = [k for k in rc if k not in labels]
            if stray:
                raise err(f"variable {vname!r}: codes name {stray[0]!r}, which is not one of its values", *p, "codes")
            if missing:
                raise err(f"variable {vname!r}: codes lack value(s) {', '.join(missing)}", *p, "codes")
            code_strs = [str(int(v)) if isinstance(v, bool) else str(v) for v in (rc[lab] for lab in labels)]
            if len(set(code_strs)) != len(code_strs):
                raise err(f"variable {vname!r}: two values share one code", *p, "codes")
            codes = tuple(zip(labels, code_strs))
        variables.append(Variable(vname, tuple(labels), column, codes))

    known = {v.name for v in variables}

    def parse_pairs(key: str, pattern: re.Pattern, arrow: str) -> list[tuple[str, str]]:
        raw = d.get(key) or []
        if not isinstance(raw, list):
            raise err(f"'{key}' must be a list of strings like 'a {arrow} b'", key)
        out: list[tuple[str, str]] = []
        for i, s in enumerate(raw):
            m = pattern.match(s) if isinstance(s, str) else None
            if not m:
                raise err(f"{key}[{i}]: malformed entry {s!r}; expected 'a {arrow} b'", key, i)
            a, b = m.groups()
            for v in (a, b):
                if v not in known:
                    raise err(f"{key}[{i}] '{s}': unknown variable {v!r} (known: {', '.join(known_sorted)})", key, i)
            if a == b:
                raise err(f"{key}[{i}] '{s}': self-loop on {a!r}", key, i)
            pair = (a, b) if arrow == "->" else tuple(sorted((a, b)))
            if pair in out:
                raise err(f"{key}[{i}] '{s}': duplicate entry", key, i)
            out.append(pair)  # type: ignore[arg-type]
        return out

    known_sorted = [v.name for v in variables]
    edges = parse_pairs("edges", _EDGE, "->")
    confounders = parse_pairs("confounders", _BIDIRECTED, "<->")

    image = ImageSpec()
    if d.get("image") is not None:
        im = d["image"]
        if not isinstance(im, dict) or set(im) - {"channels", "size"}:
            raise err("'image' must be a mapping {channels: C, size: S}", "image")
        try:
            image = ImageSpec(int(im.get("channels", 3)), int(im.get("size", 28)))
        except (TypeError, ValueError):
            raise err("'image' channels and size must be whole numbers", "image") from None
        if image.channels not in (1, 3) or not 4 <= image.size <= 1024:
            raise err("'image' needs channels 1 or 3 and a size from 4 to 1024", "image")

    data = d.get("data")
    if data is not None and not isinstance(data, dict):
        raise err("'data' must be a mapping, e.g. {barmnist: backdoor}", "data")

    queries = d.get("queries") or {}
    if not isinstance(queries, dict):
        raise err("'queries' must be a mapping of name: \"P(...)\"", "queries")
    queries = {str(k): str(v) for k, v in queries.items()}

    recipes = {}
    for key, example in (("fit", "{epochs: 10, residual: true}"), ("reader", "{epochs: 15, flip: true}")):
        recipe = d.get(key) or {}
        if not isinstance(recipe, dict) or not all(isinstance(v, (bool, int, float, str)) for v in recipe.values()):
            raise err(f"'{key}' must be a mapping of training options to numbers, booleans or words, "
                      f"e.g. {example}", key)
        recipes[key] = dict(recipe)

    try:
        graph = CausalGraph(
            name=name, variables=tuple(variables), edges=tuple(edges), confounders=tuple(confounders),
            image=image, description=str(d.get("description") or ""), data=data, queries=queries,
            source=source, fit=recipes["fit"], reader=recipes["reader"],
        )
    except GraphError as e:
        raise err(str(e).split(": ", 1)[1], "edges") from None

    # Named queries must make sense on this graph.
    from cfedit.query import QueryError, parse_query  # local: query imports graph

    for qname, text in queries.items():
        try:
            parse_query(text).validate(graph)
        except QueryError as e:
            raise err(f"query {qname!r}: {e}", "queries", qname) from None
    return graph


def load_graph(path: str | Path) -> CausalGraph:
    """Load a graph file, or a shipped graph by name (``backdoor`` or ``backdoor.yaml``)."""
    p = resolve_graph_path(path)
    source = str(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise GraphError(f"{source}: cannot read graph file ({e.strerror})") from None
    try:
        node = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f"{source}:{mark.line + 1}" if mark else source
        raise GraphError(f"{loc}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if node is None:
        raise GraphError(f"{source}: the file is empty")
    lines = _Lines()
    d = _plain(node, (), lines, source)
    return graph_from_dict(d, source=source, lines=lines)


def shipped_dir(kind: str) -> Path:
    """Folder of the shipped ``graphs`` or ``checkpoints``: the repository's when running from a
    checkout or an editable install, else the copy installed inside the package."""
    here = Path(__file__).resolve().parent
    repo = here.parent / kind
    if repo.is_dir():
        return repo
    return here / kind


def shipped_graphs() -> list[Path]:
    return sorted(shipped_dir("graphs").glob("*.yaml"))


def resolve_graph_path(path: str | Path) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    stem = p.name[:-5] if p.name.endswith(".yaml") else p.name
    candidate = shipped_dir("graphs") / f"{stem}.yaml"
    if candidate.is_file() and (p.parent == Path(".") or p.parent.name == "graphs"):
        return candidate
    names = ", ".join(g.stem for g in shipped_graphs()) or "none"
    raise GraphError(f"{path}: no such graph file, and no shipped graph of that name (shipped: {names})")
