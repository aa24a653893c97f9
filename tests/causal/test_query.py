"""Query parsing, printing back, validation with positions."""

import pytest

from cfedit.causal.graph_file import load_graph
from cfedit.causal.query import QueryError, Term, parse_assignments, parse_query

ROUND_TRIP = [
    "P(bar_{color=green}=yes | digit=3, color=red, bar=yes)",
    "P(bar_{color=red,digit=5}=yes, color_{digit=5}=red | digit=3)",
    "P(bar_{color=red}=yes)",
    "P(gray_hair_{age=old}=yes | age=young, gray_hair=no)",
    "P(bar_{color=red}=yes | bar_{color=green}=no, digit=3)",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(text):
    q = parse_query(text)
    assert str(q) == text
    assert parse_query(str(q)) == q


def test_structure_and_spacing_tolerance():
    q = parse_query("P( bar_{ color = red , digit=5 } = yes|digit=3 )")
    assert q.targets == (Term("bar", "yes", (("color", "red"), ("digit", "5"))),)
    assert q.evidence == (Term("digit", "3"),)
    assert str(q) == "P(bar_{color=red,digit=5}=yes | digit=3)"
    assert q.interventions == ({"color": "red", "digit": "5"},)
    assert q.evidence_is_factual


def test_underscored_names():
    q = parse_query("P(gray_hair_{age=old}=yes)")
    assert q.targets[0].variable == "gray_hair" and q.targets[0].do == {"age": "old"}


@pytest.mark.parametrize("text,column,message", [
    ("Q(bar=yes)", 1, "starts with 'P('"),
    ("P(bar=yes", 10, "expected ')'"),
    ("P(bar_{color=red=yes)", 17, "expected"),
    ("P(bar=yes) x", 12, "after the closing"),
    ("P(bar==yes)", 7, "expected a name"),
    ("P(bar=yes | )", 13, "expected a name"),
    ("P(bar_{color=red,color=green}=yes)", 18, "intervened on twice"),
    ("P(bar=yes ; digit=3)", 11, "unexpected character"),
])
def test_syntax_errors_point_at_position(text, column, message):
    with pytest.raises(QueryError) as e:
        parse_query(text)
    assert e.value.column == column, str(e.value)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_validation_against_graph():
    g = load_graph("backdoor")
    parse_query("P(bar_{color=green}=yes | digit=3, color=red, bar=yes)").validate(g)
    with pytest.raises(QueryError, match=r"unknown variable 'colour' .*column 8"):
        parse_query("P(bar_{colour=green}=yes)").validate(g)
    with pytest.raises(QueryError, match=r"'purple' is not a value of 'color'.*column 19"):
        parse_query("P(bar=yes | color=purple)").validate(g)
    with pytest.raises(QueryError, match="intervenes on its own variable"):
        parse_query("P(bar_{bar=yes}=yes)").validate(g)
    with pytest.raises(QueryError, match="two values in the same world"):
        parse_query("P(bar=yes | bar=no)").validate(g)


def test_assignments():
    assert parse_assignments("color=red, digit=3") == {"color": "red", "digit": "3"}
    with pytest.raises(QueryError, match="expected name=value"):
        parse_assignments("color")
    with pytest.raises(QueryError, match="given twice"):
        parse_assignments("a=1,a=2")
