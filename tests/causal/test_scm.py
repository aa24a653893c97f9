"""Ground-truth SCMs: exact P(V), sampling, do(), exact counterfactuals (known answers)."""

import numpy as np
import pytest

from cfedit.causal.graph_file import load_graph
from cfedit.causal.query import QueryError, parse_query
from cfedit.causal.scm import Exogenous, builtin_scm


@pytest.mark.parametrize("name,query,true", [
    ("backdoor", "P(bar_{color=green}=yes | digit=3, color=red, bar=yes)", 0.9756),
    ("backdoor", "P(bar_{color=red}=yes | digit=7, color=green, bar=yes)", 0.2174),
    ("frontdoor", "P(color_{digit=3}=red | digit=2, color=red, bar=yes)", 0.8667),
    ("frontdoor", "P(bar_{digit=3}=yes | digit=2, color=red, bar=yes)", 0.9143),
])
def test_known_counterfactuals(name, query, true):
    assert builtin_scm(name).prob(parse_query(query)) == pytest.approx(true, abs=5e-5)


def test_backdoor_marginals_by_hand():
    pv = builtin_scm("backdoor").joint()
    assert pv.sum() == pytest.approx(1.0)
    p_digit = pv.sum(axis=(1, 2))
    assert np.allclose(p_digit, 0.1)
    # P(red | digit=d) = 0.1 (d + 0.5)
    p_red = pv[:, 1, :].sum(axis=1) / p_digit
    assert np.allclose(p_red, 0.1 * (np.arange(10) + 0.5))
    # bar = (t1 or t2) and t3: digit 3, red: t1 = 0 xor B(.8), t2 = 1 xor B(.9)
    p = 0.75 * (1 - (1 - 0.8) * (1 - 0.1))
    assert pv[3, 1, 1] / pv[3, 1].sum() == pytest.approx(p)


def test_sampling_matches_exact_joint():
    scm = builtin_scm("frontdoor")
    _, v = scm.sample(200_000, seed=1)
    emp = np.bincount(np.ravel_multi_index(v.T, scm.graph.shape), minlength=40).reshape(10, 2, 2) / len(v)
    assert np.abs(emp - scm.joint()).max() < 0.005


def test_do_and_seed_determinism():
    scm = builtin_scm("backdoor")
    u1, v1 = scm.sample(1000, seed=3)
    u2, v2 = scm.sample(1000, seed=3)
    assert np.array_equal(v1, v2)
    vdo = scm.evaluate(u1, {"color": "red"})
    assert (vdo[:, 1] == 1).all() and np.array_equal(vdo[:, 0], v1[:, 0])  # digit is a non-descendant
    # frontdoor: do(digit) leaves the bar's own use of U_D alone
    fd = builtin_scm("frontdoor")
    u, v = fd.sample(1000, seed=0)
    assert np.array_equal(fd.evaluate(u, {"digit": 5, "color": "red"})[:, 2],
                          fd.evaluate(u, {"color": "red"})[:, 2])


def test_interventional_distribution_differs_from_conditional():
    scm = builtin_scm("backdoor")
    p_do = scm.joint({"color": "red"})[:, 1, 1].sum()
    assert p_do == pytest.approx(scm.prob(parse_query("P(bar_{color=red}=yes)")))
    pv = scm.joint()
    p_cond = pv[:, 1, 1].sum() / pv[:, 1, :].sum()
    assert abs(p_do - p_cond) > 0.01


def test_uniform_cells_are_exact():
    vals, probs = Exogenous.uniform("u", (0.25, 0.5)).cells()
    assert np.allclose(vals, [0.125, 0.375, 0.75]) and np.allclose(probs, [0.25, 0.25, 0.5])


def test_zero_probability_evidence():
    g = load_graph("backdoor")
    scm = builtin_scm("backdoor", g)
    with pytest.raises(QueryError, match="probability zero"):
        scm.prob(parse_query("P(bar_{color=red}=yes | digit=3, bar_{digit=3}=yes, bar_{digit=3}=yes, digit_{color=red}=4)"))
