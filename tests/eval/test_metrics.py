"""Each metric on constructed inputs with known answers."""

import math

import numpy as np
import pytest

import cfedit.eval.metrics as M

# -- proportions and verdicts -------------------------------------------------------------------

def test_wilson_interval_known_values():
    # textbook: 8 successes out of 10 -> [0.4902, 0.9433] (Wilson 1927; e.g. Agresti & Coull 1998)
    lo, hi = M.wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    # all successes: the upper end is 1 and the lower end n / (n + z^2)
    lo, hi = M.wilson_interval(20, 20)
    assert hi == 1.0 and lo == pytest.approx(20 / (20 + M.Z95 ** 2), abs=1e-12)
    assert M.wilson_interval(0, 0) == (0.0, 1.0)
    # symmetric around 1/2, narrower with more trials
    a = M.wilson_interval(50, 100)
    b = M.wilson_interval(500, 1000)
    assert a[0] == pytest.approx(1 - a[1]) and b[1] - b[0] < a[1] - a[0]


def test_estimate_proportion_treats_samples_of_a_unit_as_a_cluster():
    # K identical samples per unit carry no more information than one: n_eff = units
    unit = np.array([1, 0] * 50, dtype=bool)
    rep = M.estimate_proportion(np.repeat(unit[:, None], 8, axis=1))
    one = M.estimate_proportion(unit)
    assert rep.value == 0.5 and rep.n_eff == pytest.approx(100)
    assert (rep.lower, rep.upper) == pytest.approx((one.lower, one.upper))
    # independent samples within each unit (every unit half hits): the full n * K
    half = np.tile(np.array([True, False] * 4), (100, 1))
    est = M.estimate_proportion(half)
    assert est.n_eff == pytest.approx(800) and est.n_units == 100 and est.n_samples == 8
    assert (est.lower, est.upper) == pytest.approx(M.wilson_interval(400, 800))
    # all hits: value 1, the conservative n_eff (units)
    full = M.estimate_proportion(np.ones((30, 4), dtype=bool))
    assert full.value == 1.0 and full.n_eff == 30 and full.upper == 1.0
    assert full.lower == pytest.approx(30 / (30 + M.Z95 ** 2))
    assert math.isnan(M.estimate_proportion(np.zeros((0, 4), dtype=bool)).value)


def test_verdict_inside_outside_and_gap():
    v = M.verdict(0.93, 1.0, 0.0, 0.3043, value=1.0)  # an estimate of 1 against [0, 0.3043]
    assert not v.inside and v.side == "above"
    assert v.gap == pytest.approx(0.93 - 0.3043) and v.distance == pytest.approx(1 - 0.3043)
    assert v.label.startswith("outside by 0.626")
    below = M.verdict(0.10, 0.20, 0.5691, 1.0, value=0.15)
    assert not below.inside and below.side == "below" and below.gap == pytest.approx(0.3691)
    # the interval meets the bounds: inside, though the point estimate lies outside
    touch = M.verdict(0.25, 0.35, 0.0, 0.3043, value=0.31)
    assert touch.inside and touch.gap == 0 and touch.distance == pytest.approx(0.31 - 0.3043)
    # a point bound (identified query)
    assert M.verdict(0.36, 0.45, 0.4125, 0.4125, value=0.41).inside
    assert not M.verdict(0.47, 0.56, 0.4125, 0.4125).inside
    with pytest.raises(ValueError):
        M.verdict(0.1, 0.2, 0.6, 0.5)
    # a margin tolerates a small gap (e.g. a reader misreading 1 image in 1000 of a point bound at 1)
    tiny_gap = M.verdict(0.993, 0.9996, 1.0, 1.0, value=0.999)
    assert not tiny_gap.inside and tiny_gap.gap == pytest.approx(0.0004)
    tolerated = M.verdict(0.993, 0.9996, 1.0, 1.0, value=0.999, margin=0.01)
    assert tolerated.inside and tolerated.gap == pytest.approx(0.0004) and tolerated.margin == 0.01
    assert not M.verdict(0.93, 1.0, 0.0, 0.3043, margin=0.01).inside


# -- factor metrics ------------------------------------------------------------------------------

def test_effectiveness_of_a_known_edit():
    rng = np.random.default_rng(0)
    factual = rng.integers(0, 2, size=(50, 3))
    new = 1 - factual[:, 1]
    read = factual.copy()
    read[:, 1] = new  # the edit did exactly what was asked
    assert M.effectiveness(read, {1: new}) == 1.0
    assert M.effectiveness(factual, {1: new}) == 0.0  # nothing changed
    # with K samples per unit and a constant target
    read_k = np.repeat(read[:, None, :], 4, axis=1)
    read_k[:, :, 1] = 1
    assert M.effectiveness(read_k, {1: 1}) == 1.0
    read_k[:10, 0, 1] = 0
    assert M.effectiveness(read_k, {1: 1}) == pytest.approx(1 - 10 / 200)
    assert math.isnan(M.effectiveness(read, {}))


def test_preservation_and_agreement():
    factual = np.array([[3, 1, 1], [7, 0, 1], [2, 0, 0], [5, 1, 0]])
    cf = np.repeat(factual[:, None, :], 2, axis=1)
    cf[:, :, 1] = 0  # do(color=green)
    cf[:, 0, 2] = 0  # the model changed bar in the first sample
    read = cf.copy()
    assert M.preservation(read, factual, [0]) == 1.0  # digit kept
    read[0, :, 0] = 8
    assert M.preservation(read, factual, [0]) == pytest.approx(6 / 8)
    assert M.agreement(read, cf, [2]) == 1.0
    read[1, 1, 2] = 1 - read[1, 1, 2]
    assert M.agreement(read, cf, [2]) == pytest.approx(7 / 8)
    assert math.isnan(M.preservation(read, factual, []))


# -- pixel metrics -------------------------------------------------------------------------------

def test_mae_composition_and_reversibility():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(5, 3, 8, 8), dtype=np.uint8)
    assert M.composition(x, [x, x.copy(), x]) == [0.0, 0.0, 0.0]  # identical images
    assert M.reversibility(x, x) == 0.0
    # uint8 and float images mix; errors are in [0, 1] units
    assert M.mae(x, x.astype(np.float32) / 255) == pytest.approx(0.0, abs=1e-7)
    y = x.astype(np.int32)
    y[:, 0] = np.clip(y[:, 0] + 51, 0, 255)
    expected = np.abs(y.astype(np.float32) - x) .mean() / 255
    assert M.mae(y.astype(np.uint8), x) == pytest.approx(expected, rel=1e-6)
    assert M.composition(x, [x, y.astype(np.uint8)])[1] == pytest.approx(expected, rel=1e-6)
    assert M.mae(np.zeros((1, 1, 2, 2)), np.ones((1, 1, 2, 2))) == 1.0
    with pytest.raises(ValueError):
        M.mae(np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 3)))


# -- realism -------------------------------------------------------------------------------------

def test_frechet_distance():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(400, 16))
    assert M.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # a mean shift of s in every coordinate adds d * s^2 (same covariance)
    assert M.frechet_distance(a, a + 0.5) == pytest.approx(16 * 0.25, rel=1e-6)
    # two Gaussians with known parameters: N(0, I) vs N(0, 4 I): d * (1 + 4 - 2 * 2) = d
    b = rng.normal(size=(20000, 4))
    c = 2 * rng.normal(size=(20000, 4))
    assert M.frechet_distance(b, c) == pytest.approx(4.0, rel=0.05)


def test_kernel_distance():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(300, 16))
    same = M.kernel_distance(a, a)
    other = M.kernel_distance(a, rng.normal(size=(300, 16)))  # same distribution
    shifted = M.kernel_distance(a, a + 1.0)
    # unbiased: about 0 for one distribution (identical sets: of order 1/m, see the docstring)
    assert abs(same) < 0.01 * shifted and abs(other) < 0.01 * shifted
    assert abs(other) < 0.01 and shifted > 1.0
    # subsets: deterministic for a seed, close to the full-set value
    big_a, big_b = rng.normal(size=(1500, 8)), rng.normal(size=(1500, 8)) + 0.3
    k1 = M.kernel_distance(big_a, big_b, subsets=5, subset_size=500, seed=0)
    assert k1 == M.kernel_distance(big_a, big_b, subsets=5, subset_size=500, seed=0)
    assert k1 == pytest.approx(M.kernel_distance(big_a, big_b, subset_size=5000), rel=0.2)
