"""Causal graphs over an image's discrete factors: loading, validation and derived structure.

A graph file (DESIGN §3) names discrete variables with labelled values, directed edges ``a -> b``,
bidirected edges ``a <-> b`` (an unobserved common cause), the image node, and optionally where the
data comes from, a few named queries and the training recipes. Every section is validated when the
file is loaded; everything a user can get wrong is reported as a :class:`GraphError` whose message
names the file, the line where known, and the offending key. Loading is linear in the file, which is
read only when it is a regular file of at most :data:`MAX_GRAPH_BYTES`.

This module imports nothing of torch, so ``cfedit bounds`` starts instantly.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import networkx as nx
import yaml

from cfedit.errors import GraphError, QueryError  # GraphError re-exported: ``from cfedit.causal.graph import GraphError``
from cfedit.files import read_regular
from cfedit.causal.query import parse_query  # (query needs the graph only for type hints: no import circle)

#: Largest graph file read: far above any real graph, small enough to parse at once.
MAX_GRAPH_BYTES = 1 << 20
#: Most values one variable may have. P(V) and the feature models grow with the product of the
#: domain sizes, so a larger domain is a mistake rather than a graph.
MAX_DOMAIN = 1024
#: Most nodes that YAML aliases may add to a graph file when expanded (refuses "billion laughs").
MAX_ALIAS_NODES = 10_000
#: Deepest nesting of lists and mappings in a graph file (a real one nests four deep).
MAX_DEPTH = 32
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


def graph_name_problem(name: Any) -> str | None:
    """Why ``name`` cannot name a graph (it becomes part of file names), or None when it can."""
    if isinstance(name, str) and GRAPH_NAME.fullmatch(name):
        return None
    return (f"graph name {name!r} must be letters, digits, '_', '-' and '.', not starting with '.' or '-' "
            f"(it names files such as runs/<name>-canonical.safetensors)")


# --------------------------------------------------------------------------------------------
# The recipes: options of ``fit:`` and ``reader:``, checked at load
# --------------------------------------------------------------------------------------------

# Kinds of option values: a count (whole number >= 1), a whole number (>= 0), a number (>= 0), a
# fraction (0..1), a flag (true/false), or a tuple of the words allowed.
COUNT, WHOLE, NUMBER, FRACTION, FLAG = "count", "whole", "number", "fraction", "flag"

# They mirror the trainers' defaults (cfedit.image.train, cfedit.image.masked_training,
# cfedit.eval.run), which import torch; tests/test_graph.py keeps the two in step.
MECHANISM_OPTIONS: dict[str, dict[str, Any]] = {
    "cvae": {"epochs": COUNT, "batch_size": COUNT, "lr": NUMBER, "lr_decay": FLAG, "width": COUNT,
             "latent": COUNT, "hidden": COUNT, "beta": NUMBER, "attr_weight": NUMBER, "swap_p": FRACTION,
             "attr_residual": FLAG, "attr_shift": WHOLE, "attr_flip": FLAG, "adv_weight": NUMBER, "skip": WHOLE},
    "masked": {"epochs": COUNT, "batch_size": COUNT, "lr": NUMBER, "beta1": FRACTION, "lr_decay": FLAG,
               "width": COUNT, "blocks": COUNT, "head_width": COUNT, "swap_p": FRACTION, "cls_g": NUMBER,
               "cls_d": NUMBER, "cycle": NUMBER, "mask": NUMBER, "smooth": NUMBER, "d_width": COUNT,
               "save_every": COUNT},
}
#: ``fit:`` options besides those of the chosen mechanism (``mechanism:``, default cvae).
FIT_OPTIONS: dict[str, Any] = {"epochs": COUNT, "labeller_epochs": COUNT, "residual": FLAG,
                               "mechanism": tuple(MECHANISM_OPTIONS)}
#: ``reader:`` options: the independent reader's own and its classifier's training options.
READER_OPTIONS: dict[str, Any] = {"n": COUNT, "epochs": COUNT, "seed": WHOLE, "width": COUNT, "hidden": COUNT,
                                  "n_test": COUNT, "mirror": FLAG, "batch_size": COUNT, "lr": NUMBER,
                                  "lr_decay": FLAG, "shift": WHOLE, "flip": FLAG}


def option_problem(kind: Any, value: Any) -> str | None:
    """Why ``value`` is not an option value of ``kind``, or None when it is."""
    if isinstance(kind, tuple):
        return None if isinstance(value, str) and value in kind else f"must be one of {', '.join(kind)}"
    if kind == FLAG:
        return None if isinstance(value, bool) else "must be true or false"
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind in (COUNT, WHOLE):
        least = 1 if kind == COUNT else 0
        return None if is_int and value >= least else f"must be a whole number of at least {least}"
    ok = (is_int or isinstance(value, float)) and math.isfinite(value) and value >= 0
    if kind == FRACTION:
        return None if ok and value <= 1 else "must be a number from 0 to 1"
    return None if ok else "must be a number of at least 0"


# --------------------------------------------------------------------------------------------
# Loading from YAML with line numbers
# --------------------------------------------------------------------------------------------

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_LABEL = re.compile(r"[A-Za-z0-9_.+\-]+")
_EDGE = re.compile(rf"^\s*({_NAME})\s*->\s*({_NAME})\s*$")
_BIDIRECTED = re.compile(rf"^\s*({_NAME})\s*<->\s*({_NAME})\s*$")
_TOP_KEYS = ("name", "description", "variables", "edges", "confounders", "image", "data", "queries", "fit",
             "reader")
_DATA_KEYS = ("barmnist", "folder", "labels", "images")
_YAML = "tag:yaml.org,2002:"
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when present: 6x faster
_SCALAR_TAGS = {_YAML + t for t in ("str", "int", "float", "bool", "null", "timestamp")}


class _Marks:
    """Where each YAML node was written (its line) and, for scalars, the text as written.

    Keyed by the path of keys and indices from the document's root. The text matters for labels and
    codes: YAML reads ``off`` as false and ``0x10`` as 16, but a label is the word the user wrote.
    """

    def __init__(self) -> None:
        self.lines: dict[tuple, int] = {}
        self.texts: dict[tuple, str] = {}

    def line(self, *path: Any) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None


def _tag_name(tag: str) -> str:
    return "!!" + tag[len(_YAML):] if tag.startswith(_YAML) else tag


def _check_shape(root: yaml.Node, source: str) -> None:
    """Refuse, before anything is built, nesting deeper than :data:`MAX_DEPTH`, and aliases that
    refer to themselves or expand the document by more than :data:`MAX_ALIAS_NODES` nodes. Sizes of
    shared nodes are memoised, so this is linear in the composed (unexpanded) document."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        where = f"{source}:{node.start_mark.line + 1}"
        if key in on_path:
            raise GraphError(f"{where}: a YAML alias refers to the node that contains it")
        if depth > MAX_DEPTH:
            raise GraphError(f"{where}: nested deeper than {MAX_DEPTH} levels, which no graph file needs")
        on_path.add(key)
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        total = 1
        for child in children:
            total += size(child, depth + 1)
        on_path.discard(key)
        sizes[key] = total
        return total

    added = size(root, 0) - len(sizes)
    if added > MAX_ALIAS_NODES:
        raise GraphError(f"{source}: YAML aliases expand the file by {added:,} nodes, over the limit of "
                         f"{MAX_ALIAS_NODES:,} (a graph file needs no more)")


def _plain(node: yaml.Node, path: tuple, marks: _Marks, source: str,
           constructor: yaml.constructor.SafeConstructor) -> Any:
    """A composed YAML node as plain Python, recording lines and texts; refuses duplicate keys, keys
    that are not plain words, and every tag but those of plain values, lists and mappings."""
    line = node.start_mark.line + 1
    marks.lines[path] = line
    if isinstance(node, yaml.MappingNode) and node.tag == _YAML + "map":
        out: dict[str, Any] = {}
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode) or k.tag not in _SCALAR_TAGS:
                shown = _tag_name(k.tag) if isinstance(k, yaml.ScalarNode) else "a list or mapping"
                raise GraphError(f"{source}:{k.start_mark.line + 1}: a key must be a plain word, not {shown}")
            if k.value in out:
                raise GraphError(f"{source}:{k.start_mark.line + 1}: duplicate key {k.value!r}")
            out[k.value] = _plain(v, path + (k.value,), marks, source, constructor)
            marks.lines[path + (k.value,)] = k.start_mark.line + 1  # the key's line, where the value may follow
        return out
    if isinstance(node, yaml.SequenceNode) and node.tag == _YAML + "seq":
        return [_plain(v, path + (i,), marks, source, constructor) for i, v in enumerate(node.value)]
    if isinstance(node, yaml.ScalarNode) and node.tag in _SCALAR_TAGS:
        marks.texts[path] = node.value
        try:
            return constructor.construct_object(node)
        except (yaml.YAMLError, ValueError) as e:  # e.g. the date 2024-13-45
            raise GraphError(f"{source}:{line}: cannot read {node.value!r} "
                             f"({' '.join(str(getattr(e, 'problem', None) or e).split())})") from None
    raise GraphError(f"{source}:{line}: the YAML tag {_tag_name(node.tag)} is not allowed in a graph file "
                     f"(plain values, lists and mappings only)")


class _Checker:
    """Validation of one graph description: errors carry file and line, scalars come back as written."""

    def __init__(self, source: str, marks: _Marks):
        self.source, self.marks = source, marks

    def error(self, message: str, *path: Any) -> GraphError:
        line = self.marks.line(*path)
        return GraphError(f"{self.source}:{line}: {message}" if line else f"{self.source}: {message}")

    def known_keys(self, mapping: Mapping[str, Any], known: Iterable[str], what: str, *path: Any) -> None:
        known = tuple(known)
        unknown = [k for k in mapping if k not in known]
        if unknown:
            raise self.error(f"{what}: unknown key {unknown[0]!r} (known: {', '.join(known)})", *path, unknown[0])

    def word(self, value: Any, what: str, *path: Any) -> str:
        """A scalar as the user wrote it: the YAML text, else Python's spelling (booleans as yes/no)."""
        if value is None or isinstance(value, (list, dict)):
            shown = "nothing" if value is None else "a list" if isinstance(value, list) else "a mapping"
            raise self.error(f"{what} must be a word or a number, not {shown}", *path)
        if path in self.marks.texts:
            return self.marks.texts[path]
        if isinstance(value, bool):
            return "yes" if value else "no"
        return str(value)

    def mapping(self, value: Any, what: str, example: str, *path: Any) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(f"'{what}' must be a mapping, e.g. {example}", *path)
        return value


def _variables(check: _Checker, raw: Any) -> list[Variable]:
    if not isinstance(raw, dict) or not raw:
        raise check.error("'variables' must be a non-empty mapping of name: [values]", "variables")
    variables = []
    for vname, spec in raw.items():
        p: tuple = ("variables", vname)
        if not re.fullmatch(_NAME, vname):
            raise check.error(f"variable name {vname!r} must be letters, digits and '_' (not starting with a digit)", *p)
        column = raw_codes = None
        values_path = p
        if isinstance(spec, dict):
            check.known_keys(spec, ("values", "column", "codes"), f"variable {vname!r}", *p)
            values_path = p + ("values",)
            values = spec.get("values")
            if "column" in spec:
                column = check.word(spec["column"], f"variable {vname!r}: column", *p, "column")
            raw_codes = spec.get("codes")
        else:
            values = spec
        if not isinstance(values, list):
            raise check.error(f"variable {vname!r}: values must be a list such as [no, yes]", *values_path)
        if not values:
            raise check.error(f"variable {vname!r} has an empty domain", *values_path)
        if len(values) > MAX_DOMAIN:
            raise check.error(f"variable {vname!r} has {len(values):,} values, over the limit of {MAX_DOMAIN:,}",
                              *values_path)
        labels: list[str] = []
        seen: set[str] = set()
        for i, x in enumerate(values):
            label = check.word(x, f"variable {vname!r}: value {i + 1}", *values_path, i)
            if not _LABEL.fullmatch(label):
                raise check.error(f"variable {vname!r}: value {label!r} must be letters, digits, '_', '.', '+' or '-'",
                                  *values_path, i)
            if label in seen:
                raise check.error(f"variable {vname!r}: duplicate value {label!r}", *values_path, i)
            seen.add(label)
            labels.append(label)
        codes = None if raw_codes is None else _codes(check, vname, labels, raw_codes, *p, "codes")
        variables.append(Variable(vname, tuple(labels), column, codes))
    return variables


def _codes(check: _Checker, vname: str, labels: list[str], raw: Any, *path: Any) -> tuple[tuple[str, str], ...]:
    """``codes:`` as (label, code) pairs in value order; a code is compared with label-file cells, so it
    is the text as written: a word or a whole number, never a float, a list or nothing."""
    if not isinstance(raw, dict):
        raise check.error(f"variable {vname!r}: codes must map each value to its code in the data", *path)
    known = set(labels)
    by_label: dict[str, str] = {}
    for label, code in raw.items():
        if label not in known:
            raise check.error(f"variable {vname!r}: codes name {label!r}, which is not one of its values", *path, label)
        if isinstance(code, float):
            raise check.error(f"variable {vname!r}: the code of {label!r} must be a whole number or a word as the "
                              f"label file writes it, not the fraction {code!r}", *path, label)
        text = check.word(code, f"variable {vname!r}: the code of {label!r}", *path, label)
        if not text or text != text.strip():
            raise check.error(f"variable {vname!r}: the code of {label!r} is empty or starts or ends with a space",
                              *path, label)
        by_label[label] = text
    missing = [label for label in labels if label not in by_label]
    if missing:
        raise check.error(f"variable {vname!r}: codes lack value(s) {', '.join(missing)}", *path)
    if len(set(by_label.values())) != len(by_label):
        raise check.error(f"variable {vname!r}: two values share one code", *path)
    return tuple((label, by_label[label]) for label in labels)


def _pairs(check: _Checker, raw: Any, key: str, pattern: re.Pattern, arrow: str,
           known: list[str]) -> list[tuple[str, str]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise check.error(f"'{key}' must be a list of strings like 'a {arrow} b'", key)
    names = set(known)
    out: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for i, s in enumerate(raw):
        m = pattern.match(s) if isinstance(s, str) else None
        if not m:
            raise check.error(f"{key}[{i}]: malformed entry {s!r}; expected 'a {arrow} b'", key, i)
        a, b = m.groups()
        for v in (a, b):
            if v not in names:
                raise check.error(f"{key}[{i}] '{s}': unknown variable {v!r} (known: {', '.join(known)})", key, i)
        if a == b:
            raise check.error(f"{key}[{i}] '{s}': self-loop on {a!r}", key, i)
        pair = (a, b) if arrow == "->" else tuple(sorted((a, b)))
        if pair in seen:
            raise check.error(f"{key}[{i}] '{s}': duplicate entry", key, i)
        seen.add(pair)  # type: ignore[arg-type]
        out.append(pair)  # type: ignore[arg-type]
    return out


def _image(check: _Checker, raw: Any) -> ImageSpec:
    im = check.mapping(raw, "image", "{channels: 3, size: 28}", "image")
    check.known_keys(im, ("channels", "size"), "'image'", "image")
    spec = {}
    for key, default in (("channels", 3), ("size", 28)):
        value = im.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise check.error(f"'image' {key} must be a whole number, not {value!r}", "image", key)
        spec[key] = value
    image = ImageSpec(spec["channels"], spec["size"])
    if image.channels not in (1, 3) or not 4 <= image.size <= 1024:
        raise check.error("'image' needs channels 1 or 3 and a size from 4 to 1024", "image")
    return image


def _data(check: _Checker, raw: Any) -> dict[str, str] | None:
    """``data:`` is one source: ``{barmnist: backdoor}``, ``{folder: path}`` or ``{labels: file, images: path}``."""
    if raw is None:
        return None
    data = check.mapping(raw, "data", "{barmnist: backdoor} or {folder: path/to/images}", "data")
    check.known_keys(data, _DATA_KEYS, "'data'", "data")
    if "images" in data and "labels" not in data:
        raise check.error("'data': images go with labels (the label file naming each image)", "data", "images")
    if sum(k in data for k in ("barmnist", "folder", "labels")) != 1:
        raise check.error("'data' must name exactly one source: barmnist, folder, or labels (with images)", "data")
    out = {k: check.word(v, f"'data' {k}", "data", k) for k, v in data.items()}
    if "barmnist" in out and not re.fullmatch(_NAME, out["barmnist"]):
        raise check.error(f"'data' barmnist must name a setting such as backdoor, not {out['barmnist']!r}",
                          "data", "barmnist")
    return out


def _recipe(check: _Checker, raw: Any, key: str, example: str, options_known: bool) -> dict[str, Any]:
    recipe = check.mapping(raw, key, example, key)
    if not options_known:
        return dict(recipe)
    if key == "fit":
        mechanism = recipe.get("mechanism", "cvae")
        problem = option_problem(FIT_OPTIONS["mechanism"], mechanism)
        if problem:
            raise check.error(f"'fit' mechanism {problem}", "fit", "mechanism")
        options = {**MECHANISM_OPTIONS[mechanism], **FIT_OPTIONS}
        what = f"'fit' (mechanism {mechanism})"
    else:
        options, what = READER_OPTIONS, f"'{key}'"
    check.known_keys(recipe, options, what, key)
    for name, value in recipe.items():
        problem = option_problem(options[name], value)
        if problem:
            raise check.error(f"'{key}' {name} {problem}, not {value!r}", key, name)
    return dict(recipe)


def graph_from_dict(d: Any, source: str = "<graph>", marks: _Marks | None = None,
                    recipes_current: bool = True) -> CausalGraph:
    """Validate a plain-Python graph description (as read from YAML or stored in a checkpoint) and
    build the graph. Every section is checked here, so a typo fails at load, with file, line and key.

    ``recipes_current=False`` (a graph stored in a checkpoint) keeps the ``fit:`` and ``reader:``
    options unchecked: they record how that model was trained, with the options of their time.
    """
    check = _Checker(source, marks or _Marks())
    if not isinstance(d, dict):
        raise check.error("a graph file must be a mapping with keys 'variables', 'edges', ...")
    check.known_keys(d, _TOP_KEYS, "the graph file")
    if d.get("name") is not None:
        name = check.word(d["name"], "'name'", "name")
        problem = graph_name_problem(name)
        if problem:
            raise check.error(problem, "name")
    else:  # named after the file: made a valid name rather than refused
        name = re.sub(r"[^A-Za-z0-9_.\-]+", "_", Path(source).stem).lstrip(".-") or "graph"
    description = d.get("description")
    if description is not None and not isinstance(description, str):
        raise check.error("'description' must be text", "description")
    if description and any(not c.isprintable() and c not in "\n\t" for c in description):
        raise check.error("'description' holds a control character (such as a terminal escape)", "description")

    variables = _variables(check, d.get("variables"))
    known = [v.name for v in variables]
    edges = _pairs(check, d.get("edges"), "edges", _EDGE, "->", known)
    confounders = _pairs(check, d.get("confounders"), "confounders", _BIDIRECTED, "<->", known)
    image = _image(check, d.get("image"))
    data = _data(check, d.get("data"))
    queries = check.mapping(d.get("queries"), "queries", 'recolor: "P(bar_{color=red}=yes)"', "queries")
    for qname, text in queries.items():
        if not GRAPH_NAME.fullmatch(qname):
            raise check.error(f"query name {qname!r} must be letters, digits, '_', '-' and '.'", "queries", qname)
        if not isinstance(text, str):
            raise check.error(f"query {qname!r} must be text such as \"P(y_{{x=1}}=1)\"", "queries", qname)
    fit = _recipe(check, d.get("fit"), "fit", "{epochs: 10, residual: true}", recipes_current)
    reader = _recipe(check, d.get("reader"), "reader", "{epochs: 15, flip: true}", recipes_current)

    try:
        graph = CausalGraph(
            name=name, variables=tuple(variables), edges=tuple(edges), confounders=tuple(confounders),
            image=image, description=description or "", data=data, queries=dict(queries), source=source,
            fit=fit, reader=reader,
        )
    except GraphError as e:
        raise check.error(str(e).split(": ", 1)[1], "edges") from None

    # Named queries must make sense on this graph.
    for qname, text in queries.items():
        try:
            parse_query(text).validate(graph)
        except QueryError as e:
            raise check.error(f"query {qname!r}: {e}", "queries", qname) from None
    return graph


def load_graph(path: str | Path) -> CausalGraph:
    """Load a graph file, or a shipped graph by name (``backdoor`` or ``backdoor.yaml``)."""
    p = resolve_graph_path(path)
    source = str(path)
    data = read_regular(p, MAX_GRAPH_BYTES, GraphError, "graph file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise GraphError(f"{source}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                         f"save the graph file as UTF-8") from None
    try:
        node = yaml.compose(text, Loader=_YAML_LOADER)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f"{source}:{mark.line + 1}" if mark else source
        raise GraphError(f"{loc}: not valid YAML ({' '.join(str(getattr(e, 'problem', None) or e).split())})") from None
    except RecursionError:  # (the pure-Python parser; libyaml has its own depth limit)
        raise GraphError(f"{source}: nested too deeply to be a graph file") from None
    if node is None:
        raise GraphError(f"{source}: the file is empty")
    _check_shape(node, source)
    marks = _Marks()
    d = _plain(node, (), marks, source, yaml.constructor.SafeConstructor())
    return graph_from_dict(d, source=source, marks=marks)

def shipped_dir(kind: str) -> Path:
    """Folder of the shipped ``graphs`` or ``checkpoints``: the repository's when running from a
    checkout or an editable install, else the copy installed inside the package."""
    here = Path(__file__).resolve().parents[1]  # the cfedit package
    repo = here.parent / kind
    if repo.is_dir():
        return repo
    return here / kind


def shipped_graphs() -> list[Path]:
    return sorted(shipped_dir("graphs").glob("*.yaml"))


def resolve_graph_path(path: str | Path) -> Path:
    p = Path(path)
    if p.is_file() or (p.exists() and not p.is_dir()):  # a pipe or device: refused by load_graph, unread
        return p
    stem = p.name[:-5] if p.name.endswith(".yaml") else p.name
    candidate = shipped_dir("graphs") / f"{stem}.yaml"
    if candidate.is_file() and (p.parent == Path(".") or p.parent.name == "graphs"):
        return candidate
    names = ", ".join(g.stem for g in shipped_graphs()) or "none"
    raise GraphError(f"{path}: no such graph file, and no shipped graph of that name (shipped: {names})")
