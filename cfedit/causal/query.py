"""Counterfactual queries in Pearl's notation, ASCII.

    P(bar_{color=green}=yes | digit=3, color=red, bar=yes)
    P(bar_{color=red,digit=5}=yes, color_{digit=5}=red | digit=3)

A query is a list of target terms and a list of evidence terms; each term is ``Y_{X=x,...}=y`` or a
factual ``Y=y``. :func:`parse_query` reads one, :meth:`Query.validate` checks it against a graph, and
``str(query)`` prints it back in the canonical spelling (parse → print → parse is the identity).
Errors are :class:`QueryError` with the position (1-based column) of the offending token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cfedit.causal.graph import CausalGraph
from cfedit.errors import QueryError  # re-exported: ``from cfedit.causal.query import QueryError``


@dataclass(frozen=True)
class Term:
    """``variable_{interventions}=value``; no interventions means a factual term."""

    variable: str
    value: str
    interventions: tuple[tuple[str, str], ...] = ()
    # Where each part was written (1-based columns), for error messages; not part of equality:
    # the variable, the value, and (variable, value) of each intervention.
    column: int = 0
    value_column: int = 0
    intervention_columns: tuple[tuple[int, int], ...] = ()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Term):
            return NotImplemented
        return (self.variable, self.value, self.interventions) == (other.variable, other.value, other.interventions)

    def __hash__(self) -> int:
        return hash((self.variable, self.value, self.interventions))

    @property
    def is_factual(self) -> bool:
        return not self.interventions

    @property
    def do(self) -> dict[str, str]:
        return dict(self.interventions)

    def __str__(self) -> str:
        sub = ""
        if self.interventions:
            sub = "_{" + ",".join(f"{x}={v}" for x, v in self.interventions) + "}"
        return f"{self.variable}{sub}={self.value}"


@dataclass(frozen=True)
class Query:
    targets: tuple[Term, ...]
    evidence: tuple[Term, ...] = ()
    text: str = field(default="", compare=False)  # as the user wrote it (error positions refer to it)

    def __str__(self) -> str:
        inner = ", ".join(map(str, self.targets))
        if self.evidence:
            inner += " | " + ", ".join(map(str, self.evidence))
        return f"P({inner})"

    @property
    def interventions(self) -> tuple[dict[str, str], ...]:
        """The distinct counterfactual worlds named by the query (factual world excluded)."""
        seen: list[dict[str, str]] = []
        for t in self.targets + self.evidence:
            if t.interventions and dict(t.interventions) not in seen:
                seen.append(dict(t.interventions))
        return tuple(seen)

    @property
    def evidence_is_factual(self) -> bool:
        return all(t.is_factual for t in self.evidence)

    def validate(self, graph: "CausalGraph") -> "Query":
        """Check names, values and consistency against ``graph``; return self for chaining."""
        text = self.text or str(self)

        def check(var: str, value: str, column: int, value_column: int) -> None:
            if var not in graph:
                raise QueryError(f"unknown variable {var!r} (known: {', '.join(graph.names)})", text, column)
            if value not in graph[var].values:
                raise QueryError(
                    f"{value!r} is not a value of {var!r} ({', '.join(graph[var].values)})", text, value_column
                )

        for t in self.targets + self.evidence:
            check(t.variable, t.value, t.column, t.value_column)
            cols = t.intervention_columns or ((t.column, t.column),) * len(t.interventions)
            for (x, v), (cx, cv) in zip(t.interventions, cols):
                check(x, v, cx, cv)
            if t.variable in t.do:
                raise QueryError(f"term {t} intervenes on its own variable", text, t.column)
        seen: dict[tuple, str] = {}
        for t in self.targets + self.evidence:
            key = (t.variable, t.interventions)
            if key in seen and seen[key] != t.value:
                raise QueryError(f"{t.variable} is given two values in the same world", text, t.column)
            seen[key] = t.value
        return self


_SPACE = re.compile(r"\s*")
_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z0-9_.+\-]+)|(?P<sym>_\{|[(){}|,=]))")


def parse_query(text: str) -> Query:
    """Parse ``P(Y_{X=x}=y, ... | E=e, ...)``. Raises :class:`QueryError` pointing at the problem."""
    if not isinstance(text, str) or not text.strip():
        raise QueryError("empty query; expected P(Y_{X=x}=y | evidence)", str(text or ""))
    tokens: list[tuple[str, str, int]] = []  # (kind, text, column)
    pos, end = 0, len(text.rstrip())  # (no slicing per token: parsing stays linear in the text)
    while pos < end:
        m = _TOKEN.match(text, pos)
        if not m:
            col = _SPACE.match(text, pos).end() + 1
            raise QueryError(f"unexpected character {text[col - 1]!r}", text, col)
        kind = "name" if m.group("name") is not None else "sym"
        tok = m.group(kind)
        col = m.start(kind) + 1
        if kind == "name" and tok.endswith("_") and text.startswith("{", m.end()):
            # 'bar_{' : the underscore belongs to the subscript, not the name
            tokens.append(("name", tok[:-1], col))
            tokens.append(("sym", "_{", col + len(tok) - 1))
            pos = m.end() + 1
            continue
        tokens.append((kind, tok, col))
        pos = m.end()
    tokens.append(("end", "", len(text) + 1))

    i = 0

    def peek() -> tuple[str, str, int]:
        return tokens[i]

    def take(expected: str | None = None, kind: str = "sym") -> tuple[str, str, int]:
        nonlocal i
        k, t, c = tokens[i]
        if expected is not None and (k != kind or t != expected):
            what = "the end of the query" if k == "end" else repr(t)
            raise QueryError(f"expected {expected!r} but found {what}", text, c)
        if expected is None and k != kind:
            what = "the end of the query" if k == "end" else repr(t)
            raise QueryError(f"expected a {'name' if kind == 'name' else kind} but found {what}", text, c)
        i += 1
        return k, t, c

    def assignment() -> tuple[str, str, int, int]:
        _, var, col = take(kind="name")
        take("=")
        _, val, vcol = take(kind="name")
        return var, val, col, vcol

    def term() -> Term:
        _, var, col = take(kind="name")
        interventions: list[tuple[str, str]] = []
        columns: list[tuple[int, int]] = []
        if peek()[:2] == ("sym", "_{"):
            take("_{")
            while True:
                x, v, c, vc = assignment()
                if any(x == y for y, _ in interventions):
                    raise QueryError(f"{x!r} is intervened on twice", text, c)
                interventions.append((x, v))
                columns.append((c, vc))
                if peek()[:2] == ("sym", ","):
                    take(",")
                    continue
                take("}")
                break
        take("=")
        _, val, vcol = take(kind="name")
        return Term(var, val, tuple(interventions), col, vcol, tuple(columns))

    def term_list() -> list[Term]:
        out = [term()]
        while peek()[:2] == ("sym", ","):
            take(",")
            out.append(term())
        return out

    k, t, c = peek()
    if (k, t) != ("name", "P"):
        raise QueryError("a query starts with 'P('", text, c)
    take("P", kind="name")
    take("(")
    targets = term_list()
    evidence: list[Term] = []
    if peek()[:2] == ("sym", "|"):
        take("|")
        evidence = term_list()
    take(")")
    k, t, c = peek()
    if k != "end":
        raise QueryError(f"unexpected {t!r} after the closing parenthesis", text, c)
    return Query(tuple(targets), tuple(evidence), text)


def parse_assignments(text: str, what: str = "--set") -> dict[str, str]:
    """Parse ``color=red,digit=3`` (the CLI's --set / --given) into an ordered mapping."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in re.split(r"[,\s]+", text or ""))):
        if part.count("=") != 1 or not all(part.split("=")):
            raise QueryError(f"{what}: expected name=value, got {part!r}")
        k, v = part.split("=")
        if k in out:
            raise QueryError(f"{what}: {k!r} given twice")
        out[k] = v
    return out
