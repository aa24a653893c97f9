"""Sharp bounds of counterfactual queries (cfedit.causal.bounds)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.optimize import linprog

from cfedit.causal.bounds import Bounds, BoundsError, compute_bounds, effect_bounds, q_factors
from cfedit.causal.pv import as_pv
from cfedit.causal.graph_file import graph_from_dict, load_graph
from cfedit.causal.query import QueryError, parse_query
from cfedit.causal.scm import builtin_scm

KNOWN = [
    ("backdoor", "P(bar_{color=green}=yes | digit=3, color=red, bar=yes)", 0.5691, 1.0000, 0.9756),
    ("backdoor", "P(bar_{color=red}=yes | digit=7, color=green, bar=yes)", 0.0000, 0.3043, 0.2174),
    ("frontdoor", "P(color_{digit=3}=red | digit=2, color=red, bar=yes)", 0.5333, 0.8667, 0.8667),
    ("frontdoor", "P(bar_{digit=3}=yes | digit=2, color=red, bar=yes)", 0.5333, 1.0000, 0.9143),
]

# Queries beyond the named ones: unobserved ancestors, counterfactual evidence, several worlds.
EXTRA = {
    "backdoor": [
        "P(bar_{color=green}=yes | bar_{color=red}=yes)",
        "P(bar_{color=green}=yes | color=red, bar=yes)",
        "P(bar_{color=green}=yes, bar_{digit=1}=no | digit=3, color=red)",
        "P(bar=yes | bar_{color=red}=yes, bar_{color=green}=no, digit=3)",
    ],
    "frontdoor": [
        "P(bar_{digit=3}=yes | bar_{digit=5}=no)",
        "P(bar_{digit=3}=yes | color=red, bar=yes)",
        "P(bar_{digit=3}=yes, color_{digit=3}=green | bar=yes)",
    ],
}


@pytest.fixture(scope="module")
def settings():
    out = {}
    for name in ("backdoor", "frontdoor"):
        scm = builtin_scm(name)
        out[name] = (load_graph(name), scm, scm.joint())
    return out


@pytest.mark.parametrize("name,query,lower,upper,true", KNOWN)
def test_known_bounds(settings, name, query, lower, upper, true):
    g, scm, pv = settings[name]
    b = compute_bounds(g, pv, query)
    assert isinstance(b, Bounds)
    assert (round(b.lower, 4), round(b.upper, 4)) == (lower, upper)
    assert b.certified
    assert b.query == query
    t = scm.prob(parse_query(query))
    assert round(t, 4) == true
    assert b.lower - 1e-9 <= t <= b.upper + 1e-9


def test_frontdoor_bilinear_query_is_certified(settings):
    g, _, pv = settings["frontdoor"]
    b = compute_bounds(g, pv, KNOWN[3][1])
    assert b.method == "multilinear" and b.certified
    assert abs(b.inner_lower - b.lower) <= 1e-7 and abs(b.inner_upper - b.upper) <= 1e-7


@pytest.mark.parametrize("name", ["backdoor", "frontdoor"])
def test_every_query_contains_the_truth(settings, name):
    g, scm, pv = settings[name]
    for text in list(g.queries.values()) + EXTRA[name]:
        b = compute_bounds(g, pv, text)
        t = scm.prob(parse_query(text))
        assert b.lower - 1e-7 <= t <= b.upper + 1e-7, (text, b, t)
        assert 0.0 <= b.lower <= b.upper <= 1.0
        assert b.certified, text


def test_identifiable_queries_are_points(settings):
    g, scm, pv = settings["backdoor"]
    b = compute_bounds(g, pv, "P(bar_{color=red}=yes)")
    assert b.method == "point" and b.is_point and round(b.lower, 4) == 0.4125
    g, scm, pv = settings["frontdoor"]
    q = g.queries["bar_effect"]
    b = compute_bounds(g, pv, q)
    assert b.is_point and abs(b.lower - scm.prob(parse_query(q))) < 1e-9
    # non-descendants of the intervention keep their factual value
    b = compute_bounds(g, pv, "P(digit_{color=green}=2 | digit=2, color=red, bar=yes)")
    assert b.lower == b.upper == 1.0


def test_counterfactual_evidence_by_charnes_cooper(settings):
    g, scm, pv = settings["backdoor"]
    q = "P(bar=yes | bar_{color=red}=yes, bar_{color=green}=no, digit=3)"
    b = compute_bounds(g, pv, q)
    assert b.method == "lp-fractional"
    # bar = [color = red] for such units, and color is independent of bar's response: P(red | 3)
    assert abs(b.lower - 0.35) < 1e-7 and abs(b.upper - 0.35) < 1e-7
    assert abs(scm.prob(parse_query(q)) - 0.35) < 1e-9


def test_query_object_and_validation(settings):
    g, _, pv = settings["backdoor"]
    q = parse_query(KNOWN[0][1])
    assert compute_bounds(g, pv, q).lower == compute_bounds(g, pv, KNOWN[0][1]).lower
    with pytest.raises(QueryError):
        compute_bounds(g, pv, "P(bar_{color=blue}=yes)")
    with pytest.raises(QueryError):
        compute_bounds(g, pv, "P(bar_{colour=red}=yes)")
    with pytest.raises(BoundsError, match="shape"):
        compute_bounds(g, np.ones(5) / 5, "P(bar=yes)")


def test_q_factors_reproduce_pv(settings):
    for name in ("backdoor", "frontdoor"):
        g, _, pv = settings[name]
        qs = q_factors(g, pv)
        assert set(qs) == set(g.c_components())
        prod = np.ones(g.shape)
        for f in qs.values():
            shape = [g[n].size if n in f.axes else 1 for n in g.names]
            prod = prod * f.table.reshape(shape)
        assert np.abs(prod - pv).max() < 1e-12


# -- Fréchet bounds ---------------------------------------------------------------------------


def test_frechet_bounds_of_two_binary_counterfactuals():
    g = graph_from_dict({"name": "xy", "variables": {"x": [0, 1], "y": [0, 1]}, "edges": ["x -> y"]})
    rng = np.random.default_rng(1)
    for _ in range(5):
        px = rng.uniform(0.1, 0.9)
        p1, p0 = rng.uniform(size=2)  # P(y=1 | x=1), P(y=1 | x=0)
        pv = np.array([[(1 - px) * (1 - p0), (1 - px) * p0], [px * (1 - p1), px * p1]])
        b = compute_bounds(g, pv, "P(y_{x=1}=1, y_{x=0}=1)")
        assert abs(b.lower - max(0.0, p1 + p0 - 1)) < 1e-9
        assert abs(b.upper - min(p1, p0)) < 1e-9
        # the factual unit pins one of the two: P(y_{x=0}=1 | x=1, y=1) is Fréchet over p1
        b = compute_bounds(g, pv, "P(y_{x=0}=1 | x=1, y=1)")
        assert abs(b.lower - max(0.0, p1 + p0 - 1) / p1) < 1e-9
        assert abs(b.upper - min(p1, p0) / p1) < 1e-9


# -- Balke–Pearl bounds of the ATE in the binary IV graph ----------------------------------------

IV = {"name": "iv", "variables": {"z": [0, 1], "x": [0, 1], "y": [0, 1]},
      "edges": ["z -> x", "x -> y"], "confounders": ["x <-> y"]}
FUNCS = list(itertools.product([0, 1], [0, 1]))  # a binary function as (f(0), f(1))


def iv_pv(pz: float, q: np.ndarray) -> np.ndarray:
    """P(z, x, y) of an IV SCM with z ~ Bern(pz) and a joint q over (r_x, r_y) response types."""
    pv = np.zeros((2, 2, 2))
    for z in (0, 1):
        for i, rx in enumerate(FUNCS):
            for j, ry in enumerate(FUNCS):
                pv[z, rx[z], ry[rx[z]]] += (pz if z else 1 - pz) * q[i, j]
    return pv


def balke_pearl(pv: np.ndarray) -> tuple[float, float]:
    """Closed-form ATE bounds (Balke & Pearl 1997); p['yx.z'] = P(y, x | z)."""
    p = {f"{y}{x}.{z}": pv[z, x, y] / pv[z].sum() for y in (0, 1) for x in (0, 1) for z in (0, 1)}
    lower = max(
        p["11.1"] + p["00.0"] - 1, p["11.0"] + p["00.1"] - 1,
        p["11.0"] - p["11.1"] - p["10.1"] - p["01.0"] - p["10.0"],
        p["11.1"] - p["11.0"] - p["10.0"] - p["01.1"] - p["10.1"],
        -p["01.1"] - p["10.1"], -p["01.0"] - p["10.0"],
        p["00.1"] - p["01.1"] - p["10.1"] - p["01.0"] - p["00.0"],
        p["00.0"] - p["01.0"] - p["10.0"] - p["01.1"] - p["00.1"])
    upper = min(
        1 - p["01.1"] - p["10.0"], 1 - p["01.0"] - p["10.1"],
        -p["01.0"] + p["01.1"] + p["00.1"] + p["11.0"] + p["00.0"],
        -p["01.1"] + p["11.1"] + p["00.1"] + p["01.0"] + p["00.0"],
        p["11.1"] + p["00.1"], p["11.0"] + p["00.0"],
        -p["10.1"] + p["11.1"] + p["00.1"] + p["11.0"] + p["10.0"],
        -p["10.0"] + p["11.0"] + p["00.0"] + p["11.1"] + p["10.1"])
    return lower, upper


def brute_force_ate(pv: np.ndarray) -> tuple[float, float]:
    """Independent check: an LP over all 4 x 4 (r_x, r_y) response types."""
    c = np.array([ry[1] - ry[0] for rx in FUNCS for ry in FUNCS], dtype=float)
    A, b = [], []
    for z, x, y in itertools.product((0, 1), repeat=3):
        A.append([float(rx[z] == x and ry[x] == y) for rx in FUNCS for ry in FUNCS])
        b.append(pv[z, x, y] / pv[z].sum())
    lo = linprog(c, A_eq=A, b_eq=b, bounds=(0, None), method="highs").fun
    hi = -linprog(-c, A_eq=A, b_eq=b, bounds=(0, None), method="highs").fun
    return lo, hi


def test_balke_pearl_ate_bounds():
    g = graph_from_dict(IV)
    rng = np.random.default_rng(0)
    for _ in range(8):
        pv = iv_pv(rng.uniform(0.2, 0.8), rng.dirichlet(np.full(16, 0.5)).reshape(4, 4))
        b = effect_bounds(g, pv, [(1.0, "P(y_{x=1}=1, y_{x=0}=0)"), (-1.0, "P(y_{x=1}=0, y_{x=0}=1)")])
        assert b.method == "lp" and b.certified
        lo, hi = balke_pearl(pv)
        assert abs(b.lower - lo) < 1e-7 and abs(b.upper - hi) < 1e-7
        blo, bhi = brute_force_ate(pv)
        assert abs(lo - blo) < 1e-7 and abs(hi - bhi) < 1e-7


def test_effect_needs_shared_evidence():
    g = graph_from_dict(IV)
    pv = iv_pv(0.5, np.full((4, 4), 1 / 16))
    with pytest.raises(BoundsError, match="same evidence"):
        effect_bounds(g, pv, [(1.0, "P(y_{x=1}=1 | z=0)"), (-1.0, "P(y_{x=0}=1)")])


def test_incompatible_pv_is_refused():
    g = graph_from_dict(IV)
    pv = np.zeros((2, 2, 2))
    pv[0, 0, 0] = pv[1, 0, 1] = 0.5  # violates the instrumental inequality
    with pytest.raises(BoundsError, match="not compatible"):
        compute_bounds(g, pv, "P(y_{x=1}=1)")


# -- errors and robustness --------------------------------------------------------------------


def test_zero_probability_evidence():
    g = graph_from_dict({"name": "xy", "variables": {"x": [0, 1], "y": [0, 1]}, "edges": ["x -> y"]})
    pv = np.array([[0.3, 0.7], [0.0, 0.0]])
    with pytest.raises(BoundsError, match="probability zero"):
        compute_bounds(g, pv, "P(y_{x=0}=1 | x=1)")
    # a parent configuration of probability zero leaves its coordinate free, not an error
    b = compute_bounds(g, pv, "P(y_{x=1}=1 | x=0, y=1)")
    assert (b.lower, b.upper) == (0.0, 1.0)


def test_zero_probability_evidence_is_its_own_error():
    from cfedit.causal.bounds import ZeroEvidenceBoundsError

    g = graph_from_dict({"name": "xy", "variables": {"x": [0, 1], "y": [0, 1]}, "edges": ["x -> y"]})
    pv = np.array([[0.3, 0.7], [0.0, 0.0]])
    with pytest.raises(ZeroEvidenceBoundsError, match="probability zero under P"):
        compute_bounds(g, pv, "P(y_{x=0}=1 | x=1)")
    assert issubclass(ZeroEvidenceBoundsError, BoundsError)


def _labels_without_digit_7(tmp_path):
    """A labels file of the backdoor graph in which no unit has digit 7 (so recolor_red's evidence,
    digit=7, color=green, bar=yes, has probability zero) but every other named query is defined."""
    _, values = builtin_scm("backdoor").sample(4000, seed=1)
    g = load_graph("backdoor")
    rows = ["image_id,digit,color,bar"]
    for i, v in enumerate(values):
        if int(v[g.axis("digit")]) == 7:
            continue
        labels = [g[name].values[int(v[g.axis(name)])] for name in g.names]
        rows.append(f"{i:06d}.png," + ",".join(str(x) for x in labels))
    path = tmp_path / "labels.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_cli_reports_zero_evidence_rows_as_undefined(tmp_path):
    """One query with zero-probability evidence does not abort the table or --json (issue 18)."""
    import json

    from typer.testing import CliRunner

    from cfedit.cli import app

    labels = _labels_without_digit_7(tmp_path)
    runner = CliRunner()
    r = runner.invoke(app, ["bounds", "--graph", "backdoor", "--data", str(labels), "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads(r.stdout)["bounds"]}
    assert set(rows) == set(load_graph("backdoor").queries)
    bad = rows["recolor_red"]
    assert bad["lower"] is None and bad["upper"] is None
    assert "probability zero" in bad["undefined"] and "digit=7" in bad["undefined"]
    for name, row in rows.items():
        if name != "recolor_red":
            assert "undefined" not in row, name
            assert 0.0 <= row["lower"] <= row["upper"] <= 1.0, name
    r = runner.invoke(app, ["bounds", "--graph", "backdoor", "--data", str(labels)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    line = next(x for x in r.stdout.splitlines() if "recolor_red" in x)
    assert "undefined" in line and "probability zero" in line
    assert "red_bar_effect" in r.stdout
    # with --method ncm an undefined row trains nothing and says why
    q = load_graph("backdoor").queries["recolor_red"]
    r = runner.invoke(app, ["bounds", "--graph", "backdoor", "--data", str(labels), "--method", "ncm",
                            "-q", q, "--json"])
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.stdout)["bounds"]
    assert row["ncm_lower"] is None and row["ncm_upper"] is None and "probability zero" in row["undefined"]


def test_too_large_component_fails_fast():
    g = graph_from_dict({"name": "big", "variables": {"a": [str(i) for i in range(20)], "b": ["no", "yes"]},
                         "edges": ["a -> b"], "confounders": ["a <-> b"]})
    pv = np.full(g.shape, 1.0 / np.prod(g.shape))
    with pytest.raises(BoundsError, match=r"c-component \{a, b\}.*max_types"):
        compute_bounds(g, pv, "P(b_{a=0}=yes | a=1, b=no)")
    g, pv = load_graph("frontdoor"), builtin_scm("frontdoor").joint()
    with pytest.raises(BoundsError, match="max_types=10"):
        compute_bounds(g, pv, KNOWN[3][1], max_types=10)


@pytest.mark.parametrize("name", ["backdoor", "frontdoor"])
def test_empirical_pv_with_noise(settings, name):
    g, scm, pv = settings[name]
    _, values = scm.sample(20_000, seed=3)
    emp = as_pv(g, values)
    noisy = pv * np.random.default_rng(0).uniform(0.95, 1.05, size=pv.shape)
    noisy /= noisy.sum()
    for p in (emp, noisy):
        for text in list(g.queries.values()) + EXTRA[name]:
            exact = compute_bounds(g, pv, text)
            b = compute_bounds(g, p, text)
            assert 0.0 <= b.lower <= b.upper <= 1.0
            assert abs(b.lower - exact.lower) < 0.1 and abs(b.upper - exact.upper) < 0.1, (text, b, exact)


def test_consistency_holds_when_the_data_break_the_graphs_independences():
    """P(b_{a=x}=y | a=x, b=y, c) = 1 by consistency, even where P(V) is not Markov to the graph
    (here c is a lone root but correlated with b): numerator and P(evidence) must come from the same
    factorisation of P(V)."""
    from cfedit.causal.graph_file import graph_from_dict

    g = graph_from_dict({"name": "misfit", "variables": {"a": [0, 1], "b": [0, 1], "c": [0, 1]},
                         "edges": ["a -> b"]})
    pv = np.random.default_rng(3).dirichlet(np.ones(8)).reshape(2, 2, 2)  # c depends on a and b
    for a, b, c in itertools.product((0, 1), repeat=3):
        q = f"P(b_{{a={a}}}={b} | a={a}, b={b}, c={c})"
        r = compute_bounds(g, pv, q)
        assert r.lower == pytest.approx(1.0) and r.upper == pytest.approx(1.0), q
