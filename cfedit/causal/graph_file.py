"""Graph files: YAML loading with line numbers, validation of every section, shipped graphs.

A graph file (see the README) names discrete variables with labelled values, directed edges,
bidirected edges, the image node, and optionally where the data comes from, a few named queries and
the training recipes. Every section is validated when the file is loaded; everything a user can get
wrong is reported as a :class:`GraphError` whose message names the file, the line where known, and
the offending key. Loading is linear in the file, which is read only when it is a regular file of at
most :data:`MAX_GRAPH_BYTES`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from cfedit.causal.graph import GRAPH_NAME, MAX_DOMAIN, CausalGraph, ImageSpec, Variable, graph_name_problem
from cfedit.causal.query import parse_query
from cfedit.causal.recipes import DATA_KEYS, data_problem, recipe_problem
from cfedit.errors import GraphError, QueryError
from cfedit.files import read_text

#: Largest graph file read: far above any real graph, small enough to parse at once.
MAX_GRAPH_BYTES = 1 << 20
#: Most nodes that YAML aliases may add to a graph file when expanded (refuses "billion laughs").
MAX_ALIAS_NODES = 10_000
#: Deepest nesting of lists and mappings in a graph file (a real one nests four deep).
MAX_DEPTH = 32


# --------------------------------------------------------------------------------------------
# Loading from YAML with line numbers
# --------------------------------------------------------------------------------------------

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_LABEL = re.compile(r"[A-Za-z0-9_.+\-]+")
_EDGE = re.compile(rf"^\s*({_NAME})\s*->\s*({_NAME})\s*$")
_BIDIRECTED = re.compile(rf"^\s*({_NAME})\s*<->\s*({_NAME})\s*$")
_TOP_KEYS = ("name", "description", "variables", "edges", "confounders", "image", "data", "queries", "fit",
             "reader")
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
    check.known_keys(data, DATA_KEYS, "'data'", "data")
    out = {k: check.word(v, f"'data' {k}", "data", k) for k, v in data.items()}
    problem = data_problem(out)
    if problem:
        message, key = problem
        raise check.error(message, "data", *([key] if key else []))
    return out


def _recipe(check: _Checker, raw: Any, key: str, example: str, options_known: bool,
            variables: list[str]) -> dict[str, Any]:
    recipe = check.mapping(raw, key, example, key)
    if options_known:
        problem = recipe_problem(key, recipe, variables)
        if problem:
            message, name = problem
            raise check.error(message, key, *([name] if name else []))
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
    fit = _recipe(check, d.get("fit"), "fit", "{epochs: 10, residual: true}", recipes_current, known)
    reader = _recipe(check, d.get("reader"), "reader", "{epochs: 15, flip: true}", recipes_current, known)

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
    text = read_text(p, MAX_GRAPH_BYTES, GraphError, "graph file", source)
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
