"""Graph files: loading, validation errors that name file/line/key, derived structure."""

import textwrap

import pytest

from cfedit.causal.graph import GraphError
from cfedit.causal.graph_file import graph_from_dict, load_graph, shipped_graphs

GOOD = """\
name: tiny
variables:
  a: [x, y]
  b: {values: [young, old], column: Young, codes: {young: 1, old: 0}}
  c: [no, yes]
edges:
  - a -> c
  - b -> c
confounders:
  - a <-> b
"""


def write(tmp_path, text):
    p = tmp_path / "g.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_shipped_graphs_load_and_have_queries():
    names = {p.stem for p in shipped_graphs()}
    assert {"backdoor", "frontdoor"} <= names
    for name in ("backdoor", "frontdoor"):
        g = load_graph(name)
        assert g.names == ("digit", "color", "bar")
        assert len(g.queries) >= 4
        assert g.data == {"barmnist": name}


def test_backdoor_structure():
    g = load_graph("graphs/backdoor.yaml")
    assert g.parents("bar") == ("digit", "color")
    assert g.descendants("color") == ("bar",)
    assert g.ancestors("bar") == ("digit", "color")
    assert g.c_components() == (("digit", "color"), ("bar",))
    assert g.bidirected_cliques() == (("digit", "color"),)
    assert g.shape == (10, 2, 2)


def test_frontdoor_structure():
    g = load_graph("frontdoor")
    assert g.descendants("digit") == ("color", "bar")
    assert g.descendants("color") == ("bar",)
    assert g.c_components() == (("digit", "bar"), ("color",))


def test_topological_order_and_mapping_form(tmp_path):
    g = load_graph(write(tmp_path, GOOD))
    assert g.names.index("c") == 2
    b = g["b"]
    assert b.values == ("young", "old") and b.data_column == "Young"
    assert b.code_to_index("1") == 0 and b.code_to_index("0") == 1 and b.code_to_index("7") is None
    assert g["c"].values == ("no", "yes")  # YAML booleans are read back as the words written


def test_cliques_of_a_triangle_and_a_pair():
    d = {"variables": {k: [0, 1] for k in "abcde"},
         "confounders": ["a <-> b", "b <-> c", "a <-> c", "d <-> e"]}
    g = graph_from_dict(d)
    assert g.bidirected_cliques() == (("a", "b", "c"), ("d", "e"))
    assert g.c_components() == (("a", "b", "c"), ("d", "e"))


def test_structure_hash_ignores_names_and_queries():
    d = {"variables": {"a": [0, 1], "b": [0, 1]}, "edges": ["a -> b"]}
    h1 = graph_from_dict(dict(d, name="one")).structure_hash()
    h2 = graph_from_dict(dict(d, name="two", queries={"q": "P(b_{a=1}=1)"})).structure_hash()
    h3 = graph_from_dict({"variables": {"a": [0, 1], "b": [0, 1]}}).structure_hash()
    assert h1 == h2 != h3


def test_markovian_version_orients_confounders():
    g = load_graph("backdoor").markovian_version()
    assert not g.confounders and ("digit", "color") in g.edges


def test_exports():
    g = load_graph("frontdoor")
    assert "digit --> color" in g.to_mermaid() and "<-.->" in g.to_mermaid()
    assert '"digit" -> "bar" [dir=both' in g.to_dot()


BAD = [
    ("variables:\n  a: [x, y]\nedges:\n  - a -> z\n", "unknown variable 'z'", 4),
    ("variables:\n  a: [x, y]\n  b: [x, y]\nedges:\n  - a -> b\n  - b -> a\n", "cycle", None),
    ("variables:\n  a: [x, y]\nedges:\n  - a -> a\n", "self-loop", 4),
    ("variables:\n  a: [x, y]\n  a: [x, z]\n", "duplicate key 'a'", 3),
    ("variables:\n  a: [x, x]\n", "duplicate value 'x'", 2),
    ("variables:\n  a: []\n", "empty domain", 2),
    ("variables:\n  a: [x, y]\nconfounders:\n  - a <-> q\n", "unknown variable 'q'", 4),
    ("variables:\n  a: [x, y]\n  b: [x, y]\nedges:\n  - a => b\n", "malformed", 5),
    ("variables:\n  a: [x, y]\nqueries:\n  q1: P(b=x)\n", "unknown variable 'b'", 4),
    ("variables:\n  a: [x, y]\nqueries:\n  q1: P(a=z)\n", "'z' is not a value of 'a'", 4),
    ("variables:\n  a: [x, y]\nedgez: []\n", "unknown key 'edgez'", 3),
    ("variables:\n  a: {values: [x, y], codes: {x: 1}}\n", "codes lack value(s) y", 2),
    ("variables: [\n", "not valid YAML", None),
    ("variables:\n  a: [x, y]\nfit: [10]\n", "'fit' must be a mapping", 3),
    ("variables:\n  a: [x, y]\nfit: {epochs: [1, 2]}\n", "'fit' epochs must be a whole number", 3),
    ("variables:\n  a: [x, y]\nreader: {flip: [1]}\n", "'reader' flip must be true or false", 3),
    ("", "empty", None),
]


@pytest.mark.parametrize("text,message,line", BAD)
def test_bad_files_give_one_line_errors(tmp_path, text, message, line):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(GraphError) as e:
        load_graph(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg and message in msg
    if line is not None:
        assert f"{p}:{line}:" in msg


def test_missing_graph_lists_shipped():
    with pytest.raises(GraphError, match="shipped: .*backdoor"):
        load_graph("no_such_graph")


def test_celeba_graph_maps_attribute_columns():
    g = load_graph("celeba")
    assert g["age"].data_column == "Young" and g["age"].code_to_index("1") == g["age"].index("young")
    assert g["beard"].code_to_index("1") == g["beard"].index("no")  # No_Beard = 1 means no beard
    assert "gender" not in g.descendants("age") and "smiling" not in g.descendants("age")
    assert "eyeglasses" not in g.descendants("age")
    assert set(g.descendants("age")) == {"gray_hair", "bald"}
    assert g.image.size == 64 and len(g.queries) >= 4
    assert g.fit["mechanism"] == "masked" and g.fit["epochs"] >= 1  # the training recipe of `cfedit fit`


def test_fit_recipe_is_not_structure(tmp_path):
    g = load_graph("celeba")
    p = tmp_path / "g.yaml"
    import yaml

    d = g.to_dict()
    d["fit"] = {"epochs": 1}
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    g2 = load_graph(p)
    d["reader"] = {"epochs": 3, "mirror": False}
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    g2 = load_graph(p)
    assert g2.fit == {"epochs": 1} and g2.structure_hash() == g.structure_hash()
    assert g2.reader == {"epochs": 3, "mirror": False} and load_graph(p).to_dict()["reader"] == g2.reader


def test_recipe_options_match_the_trainers_defaults():
    """recipes.py describes fit:/reader: without importing torch; its schemas must name exactly the
    options the trainers take, with kinds that fit their defaults."""
    from cfedit.causal.recipes import MECHANISM_OPTIONS, READER_OPTIONS, option_problem
    from cfedit.eval import reader
    from cfedit.image.masked_training import MASKED_DEFAULTS
    from cfedit.image.train import LABELLER_DEFAULTS, MECHANISM_DEFAULTS

    reader_defaults = {**LABELLER_DEFAULTS, **reader.READER_DEFAULTS, "mirror": False}
    assert set(reader_defaults) == set(reader.READER_DEFAULTS) | set(reader.READER_EXTRA) | set(LABELLER_DEFAULTS)
    for options, defaults in ((MECHANISM_OPTIONS["cvae"], MECHANISM_DEFAULTS),
                              (MECHANISM_OPTIONS["masked"], MASKED_DEFAULTS), (READER_OPTIONS, reader_defaults)):
        assert set(options) == set(defaults)
        for key, value in defaults.items():
            assert option_problem(options[key], value) is None, (key, value)


def test_data_settings_match_the_built_in_scms():
    from cfedit.causal.recipes import BARMNIST_SETTINGS
    from cfedit.causal.scm import BUILTIN_SCMS
    from cfedit.data.barmnist import SETTINGS

    assert set(BARMNIST_SETTINGS) == set(BUILTIN_SCMS) == set(SETTINGS)


@pytest.mark.parametrize("section, error", [
    ("data: {barmnist: sideways}", "'data' barmnist must name a setting (backdoor, frontdoor), not 'sideways'"),
    ("data: {folder: ''}", "'data' folder must be a path"),
    ("fit: {skip: 1}", "'fit' (mechanism cvae): unknown key 'skip'"),
    ("fit: {mechanism: masked, lr_decay: true}", "'fit' (mechanism masked): unknown key 'lr_decay'"),
    ("reader: {epochs: 0}", "'reader' epochs must be a whole number of at least 1, not 0"),
    ("fit: {mechanism: masked, diffuse_exclude: [b]}", "'fit' diffuse_exclude names 'b', which is no variable (variables: a)"),
    ("fit: {mechanism: masked, diffuse_exclude: a}", "'fit' diffuse_exclude must be a list of variable names"),
    ("fit: {mechanism: masked, diffuse_exclude: [a, a]}", "'fit' diffuse_exclude names a variable twice"),
])
def test_sections_are_checked_at_load_with_file_line_and_key(tmp_path, section, error):
    p = tmp_path / "g.yaml"
    p.write_text("name: g\nvariables:\n  a: [x, y]\n" + section + "\n")
    with pytest.raises(GraphError) as e:
        load_graph(p)
    assert str(e.value).startswith(f"{p}:4: ") and error in str(e.value)
