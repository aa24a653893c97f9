"""The exact canonical feature model (cfedit.features.canonical)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cfedit.causal.bounds import compute_bounds
from cfedit.features.canonical import CanonicalModel
from cfedit.features import FeatureModel
from cfedit.causal.graph_file import graph_from_dict, load_graph
from cfedit.causal.query import parse_query
from cfedit.causal.scm import builtin_scm

from tests.causal.test_bounds import EXTRA, KNOWN

NAMES = ("backdoor", "frontdoor")
POINTS = ("independent", "comonotone")


@pytest.fixture(scope="module")
def settings():
    out = {}
    for name in NAMES:
        scm = builtin_scm(name)
        g = load_graph(name)
        pv = scm.joint()
        queries = list(g.queries.values()) + [q for n, q, *_ in KNOWN if n == name] + EXTRA[name]
        out[name] = (g, scm, pv, queries, {q: compute_bounds(g, pv, q) for q in queries})
    return out


def tv(a: np.ndarray, b: np.ndarray) -> float:
    return 0.5 * float(np.abs(a - b).sum())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("point", POINTS)
def test_fit_reproduces_pv_and_stays_inside_bounds(settings, name, point):
    g, _, pv, queries, bounds = settings[name]
    m = CanonicalModel(g, point=point).fit(pv)
    assert isinstance(m, FeatureModel) and m.family == "canonical"
    assert tv(m.joint(), pv) <= 1e-9
    for q in queries:
        b = bounds[q]
        try:
            value = m.prob(q)
        except ValueError:  # counterfactual evidence this coupling rules out (comonotone)
            assert not parse_query(q).evidence_is_factual and point == "comonotone"
            continue
        assert b.lower - 1e-9 <= value <= b.upper + 1e-9, (q, value, b)


def test_identifiable_queries_match_the_truth(settings):
    for name in NAMES:
        g, scm, pv, _, _ = settings[name]
        m = CanonicalModel(g).fit(pv)
        for q in g.queries.values():
            if compute_bounds(g, pv, q).is_point:
                assert abs(m.prob(q) - scm.prob(parse_query(q))) < 1e-9


def test_lazy_for_wide_mechanisms(settings):
    g, _, pv, _, _ = settings["backdoor"]
    config, arrays = CanonicalModel(g).fit(pv).state()
    assert sum(a.size for a in arrays.values()) < 200  # bar's 2^20 types are never built


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("side", ["lower", "upper"])
def test_extreme_models_sit_on_the_bounds(settings, name, side):
    g, _, pv, queries, bounds = settings[name]
    for q in queries:
        m = CanonicalModel.extreme(g, pv, q, side=side)
        assert abs(m.prob(q) - getattr(bounds[q], side)) <= 1e-6, (q, side)
        assert tv(m.joint(), pv) <= 1e-9


def test_counterfactual_structure_and_consistency(settings):
    g, _, pv, _, _ = settings["backdoor"]
    m = CanonicalModel(g).fit(pv)
    fact = np.array([[3, 1, 1], [7, 0, 1], [0, 0, 0]] * 50)
    cf = m.counterfactual(fact, {"color": 0}, n_samples=4, seed=0)
    assert cf.shape == (150, 4, 3) and cf.dtype.kind == "i"
    assert (cf[:, :, g.axis("digit")] == fact[:, None, g.axis("digit")]).all()  # not a descendant
    assert (cf[:, :, g.axis("color")] == 0).all()
    assert np.array_equal(cf, m.counterfactual(fact, {"color": "green"}, n_samples=4, seed=0))
    # do() of the factual value changes nothing
    same = m.counterfactual(fact, {"color": 1}, n_samples=2)
    red = fact[:, g.axis("color")] == 1
    assert (same[red] == fact[red][:, None, :]).all()
    # an empty intervention is the identity
    assert (m.counterfactual(fact, {}, n_samples=2) == fact[:, None, :]).all()


@pytest.mark.parametrize("name,factual,do,query", [
    ("backdoor", [3, 1, 1], {"color": 0}, "P(bar_{color=green}=yes | digit=3, color=red, bar=yes)"),
    ("frontdoor", [2, 1, 1], {"digit": 3},
     "P(color_{digit=3}=red, bar_{digit=3}=yes | digit=2, color=red, bar=yes)"),
])
@pytest.mark.parametrize("point", POINTS)
def test_counterfactual_samples_follow_prob(settings, name, factual, do, query, point):
    g, _, pv, _, _ = settings[name]
    m = CanonicalModel(g, point=point).fit(pv)
    q = parse_query(query)
    cf = m.counterfactual(np.array([factual] * 20_000), do, n_samples=1, seed=5)[:, 0]
    hit = np.ones(len(cf), dtype=bool)
    for t in q.targets:
        hit &= cf[:, g.axis(t.variable)] == g[t.variable].index(t.value)
    assert abs(hit.mean() - m.prob(q)) < 0.015
    # an extreme model's samples follow its own (extreme) value
    lo = CanonicalModel.extreme(g, pv, query, side="upper", point=point)
    cf = lo.counterfactual(np.array([factual] * 20_000), do, seed=6)[:, 0]
    hit = np.ones(len(cf), dtype=bool)
    for t in q.targets:
        hit &= cf[:, g.axis(t.variable)] == g[t.variable].index(t.value)
    assert abs(hit.mean() - lo.prob(q)) < 0.015


def test_zero_probability_is_a_clear_error():
    g = graph_from_dict({"name": "xy", "variables": {"x": [0, 1], "y": [0, 1]}, "edges": ["x -> y"]})
    pv = np.array([[0.3, 0.7], [0.0, 0.0]])
    m = CanonicalModel(g).fit(pv)
    assert tv(m.joint(), pv) <= 1e-12
    with pytest.raises(ValueError, match="probability zero"):
        m.prob("P(y_{x=0}=1 | x=1)")
    with pytest.raises(ValueError, match="probability zero"):
        m.counterfactual(np.array([[1, 0]]), {"x": 0})
    cf = m.counterfactual(np.array([[0, 1]]), {"x": 1}, n_samples=3)
    assert np.isfinite(cf).all() and (cf[..., 0] == 1).all()


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trip(settings, name):
    g, _, pv, queries, _ = settings[name]
    fact = np.array([[2, 1, 1], [3, 0, 0], [7, 1, 1]] * 10)
    do = {"digit": 5} if name == "frontdoor" else {"color": 0}
    for m in (CanonicalModel(g, point="comonotone").fit(pv), CanonicalModel.extreme(g, pv, queries[1], "upper")):
        config, arrays = m.state()
        json.dumps(config)
        assert all(isinstance(a, np.ndarray) for a in arrays.values())
        back = CanonicalModel.from_state(g, json.loads(json.dumps(config)), {k: a.copy() for k, a in arrays.items()})
        assert back.point == m.point
        assert np.array_equal(back.joint(), m.joint())
        for q in queries:
            if parse_query(q).evidence_is_factual:
                assert back.prob(q) == m.prob(q)
        assert np.array_equal(back.counterfactual(fact, do, 3, seed=1), m.counterfactual(fact, do, 3, seed=1))
    other = load_graph("frontdoor" if name == "backdoor" else "backdoor")
    with pytest.raises(ValueError, match="different graph"):
        CanonicalModel.from_state(other, config, arrays)


def test_bad_arguments():
    g = load_graph("backdoor")
    with pytest.raises(ValueError, match="point"):
        CanonicalModel(g, point="median")
    m = CanonicalModel(g)
    with pytest.raises(RuntimeError, match="fit"):
        m.joint()
    m.fit(builtin_scm("backdoor").joint())
    with pytest.raises(ValueError, match="shape"):
        m.counterfactual(np.zeros((2, 2), dtype=int), {"color": 0})
    with pytest.raises(ValueError, match="side"):
        CanonicalModel.extreme(g, builtin_scm("backdoor").joint(), "P(bar=yes)", side="middle")
