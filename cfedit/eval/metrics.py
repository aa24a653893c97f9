"""Evaluation metrics as pure functions over arrays (no models, no I/O): used by :mod:`cfedit.eval.run`.

Factors are value indices ``[..., k]`` in ``graph.names`` order; images are uint8 (0-255) or float in
[0, 1], ``[n, C, H, W]``; pixel errors are always in [0, 1] units.

Query estimates
    :func:`wilson_interval`      Wilson score interval of a binomial proportion (``n`` may be fractional).
    :func:`estimate_proportion`  estimate + 95 % interval from hits ``[units, K]`` (K edits per unit),
                                 with the K draws of a unit treated as a cluster (effective sample size).
    :func:`verdict`              the estimate against the bounds ``[l, u]``: inside, or outside by the gap
                                 (optionally with a small tolerated ``margin``).

Edit metrics
    :func:`effectiveness`  intervened factors read as their new values
    :func:`preservation`   chosen factors (non-descendants) read as their factual values
    :func:`agreement`      chosen factors (descendants) read as the model's counterfactual values
    :func:`mae`, :func:`composition`, :func:`reversibility`  pixel errors of null edits and round trips

Realism
    :func:`frechet_distance`  Fréchet distance of Gaussians fitted to two feature sets (FID's formula)
    :func:`kernel_distance`   unbiased squared MMD with the cubic polynomial kernel (KID's formula)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # the 97.5 % standard-normal quantile: two-sided 95 %


# ----------------------------------------------------------------------------------------------
# Proportions and verdicts
# ----------------------------------------------------------------------------------------------

def wilson_interval(successes: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval ``(lower, upper)`` of ``successes`` out of ``n`` trials.

    ``n`` may be an effective (fractional) sample size; ``n <= 0`` gives the vacuous ``(0, 1)``.
    """
    n = float(n)
    if n <= 0:
        return 0.0, 1.0
    p = min(max(float(successes) / n, 0.0), 1.0)
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # at p = 0 (p = 1) the lower (upper) end is exactly 0 (1); keep rounding from moving it
    return (0.0 if p == 0 else max(0.0, centre - half)), (1.0 if p == 1 else min(1.0, centre + half))


@dataclass(frozen=True)
class Estimate:
    """A proportion estimated from ``n_units`` units with ``n_samples`` edits each.

    ``lower``/``upper``: the Wilson interval at the effective sample size ``n_eff`` (between
    ``n_units`` and ``n_units * n_samples``; see :func:`estimate_proportion`).
    """

    value: float
    lower: float
    upper: float
    n_units: int
    n_samples: int
    n_eff: float


def estimate_proportion(hits, z: float = Z95) -> Estimate:
    """Estimate P(hit) from a boolean array ``[units, K]`` (K edits of each unit; ``[units]`` = K 1).

    The estimate is the mean of all hits. The K edits of a unit share its image noise and factual
    factors, so they are not independent draws: the variance of the estimate is taken from the
    spread of the per-unit means m_i (``Var = var(m) / units``, the cluster/ratio estimator), turned
    into an effective sample size ``n_eff = p(1-p) / Var`` (Kish's design effect), clipped to
    ``[units, units*K]``, and the Wilson interval is computed at ``n_eff``. K = 1 gives the plain
    Wilson interval over units. When every hit is equal (p = 0 or 1) the within-unit correlation
    cannot be estimated and ``n_eff = units`` (the conservative end).
    """
    h = np.asarray(hits, dtype=bool)
    if h.ndim == 1:
        h = h[:, None]
    if h.ndim != 2:
        raise ValueError(f"hits must be [units] or [units, samples], got shape {h.shape}")
    units, k = h.shape
    if units == 0 or k == 0:
        return Estimate(float("nan"), 0.0, 1.0, int(units), int(k), 0.0)
    m = h.mean(axis=1)
    p = float(m.mean())
    var_m = float(m.var())
    pq = p * (1 - p)
    if pq <= 0:
        n_eff = float(units)
    elif var_m <= 0:
        n_eff = float(units * k)
    else:
        n_eff = float(np.clip(units * pq / var_m, units, units * k))
    lo, hi = wilson_interval(p * n_eff, n_eff, z)
    return Estimate(p, lo, hi, int(units), int(k), n_eff)


@dataclass(frozen=True)
class Verdict:
    """An estimate's interval [a, b] against the bounds [l, u].

    ``gap``: the distance between the two intervals (``l - b`` when the interval lies below the
    bounds, ``a - u`` when above, 0 when they meet). ``inside`` when ``gap <= margin`` (``margin`` 0:
    the interval meets the bounds, so the data cannot tell the estimate from a ctf-consistent value);
    otherwise *outside*, by ``gap``. ``distance``: the distance of the point estimate itself from
    [l, u] (0 when it lies in it) — the size of the violation, ``gap`` being the part of it the
    confidence interval cannot explain. ``side``: "inside", "below" or "above".
    """

    inside: bool
    gap: float
    distance: float
    side: str
    margin: float = 0.0

    @property
    def label(self) -> str:
        return "inside" if self.inside else f"outside by {self.gap:.3f}"


def verdict(ci_lower: float, ci_upper: float, lower: float, upper: float, value: float | None = None,
            margin: float = 0.0, tol: float = 1e-9) -> Verdict:
    """:class:`Verdict` of an estimate with interval ``[ci_lower, ci_upper]`` against bounds
    ``[lower, upper]``; ``margin``: a gap this small still counts as inside (a practical tolerance,
    e.g. for a reader that misreads a few images)."""
    if lower > upper + tol:
        raise ValueError(f"empty bounds [{lower}, {upper}]")
    if ci_lower > ci_upper + tol:
        raise ValueError(f"empty interval [{ci_lower}, {ci_upper}]")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    below = lower - ci_upper
    above = ci_lower - upper
    point = 0.0
    if value is not None and not math.isnan(value):
        point = max(lower - value, value - upper, 0.0)
    gap = max(below, above, 0.0)
    if gap <= margin + tol:
        return Verdict(True, float(gap if gap > tol else 0.0), float(point), "inside", float(margin))
    return Verdict(False, float(gap), float(point), "below" if below > above else "above", float(margin))


# ----------------------------------------------------------------------------------------------
# Factor metrics
# ----------------------------------------------------------------------------------------------

def _match(read, reference, axes: Sequence[int]) -> float:
    """Fraction of ``read[..., axes] == reference[..., axes]`` (reference may lack the sample axis)."""
    read = np.asarray(read)
    ref = np.asarray(reference)
    axes = list(axes)
    if not axes or read.size == 0:
        return float("nan")
    while ref.ndim < read.ndim:
        ref = np.expand_dims(ref, -2)
    return float((read[..., axes] == ref[..., axes]).mean())


def effectiveness(read, do: Mapping[int, int | np.ndarray]) -> float:
    """Fraction of intervened factors read as their new values.

    ``read``: factors read off the edited images, ``[n, k]`` or ``[n, K, k]``; ``do``: factor axis ->
    new value index (an int, or one per unit ``[n]``).
    """
    read = np.asarray(read)
    if not do or read.size == 0:
        return float("nan")
    hits = []
    for axis, value in do.items():
        v = np.asarray(value)
        while v.ndim and v.ndim < read.ndim - 1:
            v = v[..., None]
        hits.append((read[..., int(axis)] == v).ravel())
    return float(np.concatenate(hits).mean())


def preservation(read, factual, axes: Sequence[int]) -> float:
    """Fraction of the factors ``axes`` (the non-descendants of the intervention) read as their
    factual values. ``read`` ``[n, k]`` or ``[n, K, k]``; ``factual`` ``[n, k]``. NaN without axes."""
    return _match(read, factual, axes)


def agreement(read, counterfactual, axes: Sequence[int]) -> float:
    """Fraction of the factors ``axes`` (the descendants of the intervention) read as the values the
    model's feature model chose (``counterfactual``, same shape as ``read``). NaN without axes."""
    return _match(read, counterfactual, axes)


# ----------------------------------------------------------------------------------------------
# Pixel metrics
# ----------------------------------------------------------------------------------------------

def as_unit_float(images) -> np.ndarray:
    """float32 images in [0, 1] from uint8 (0-255) or float images (numpy or torch)."""
    arr = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return arr.astype(np.float32, copy=False)


def mae(a, b) -> float:
    """Mean absolute pixel error in [0, 1] units (uint8 and float images may be mixed)."""
    x, y = as_unit_float(a), as_unit_float(b)
    if x.shape != y.shape:
        raise ValueError(f"image shapes differ: {x.shape} vs {y.shape}")
    if x.size == 0:
        return float("nan")
    return float(np.abs(x - y).mean())


def change_map(before, after) -> np.ndarray:
    """Mean absolute pixel change [H, W] (pixels in [0, 1]) from images ``before`` to ``after`` [n, C, H, W],
    averaged over images and channels."""
    a, b = as_unit_float(before), as_unit_float(after)
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"change_map needs two [n, C, H, W] image sets of one shape, got {a.shape} and {b.shape}")
    if not len(a):
        return np.zeros(a.shape[-2:])
    return np.abs(b - a).mean(axis=(0, 1)).astype(np.float64)


def change_share(change: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """The share of a change map's total inside ``box`` = (x0, y0, x1, y1), half-open pixel bounds
    (0 when nothing changed)."""
    x0, y0, x1, y1 = (int(b) for b in box)
    total = float(change.sum())
    return float(change[y0:y1, x0:x1].sum()) / total if total > 0 else 0.0


def pooled_shares(change: np.ndarray, cells: int) -> list[list[float]]:
    """A change map's shares per cell of a ``cells`` x ``cells`` grid (rows top to bottom; sums to 1,
    all 0 when nothing changed). The image side must be a multiple of ``cells``."""
    h, w = change.shape
    if h % cells or w % cells:
        raise ValueError(f"a {h}x{w} change map does not divide into a {cells}x{cells} grid")
    pooled = change.reshape(cells, h // cells, cells, w // cells).sum(axis=(1, 3))
    total = pooled.sum()
    shares = pooled / total if total > 0 else pooled * 0.0
    return [[round(float(x), 6) for x in row] for row in shares]


def composition(original, iterates: Sequence) -> list[float]:
    """MAE to ``original`` after each of a sequence of repeated null edits (``iterates[t]`` = the
    image after t + 1 null edits). A perfect editor leaves the image unchanged: all zeros."""
    return [mae(it, original) for it in iterates]


def reversibility(original, restored) -> float:
    """MAE between the input and the image edited with do(X=x′) and then back to its factual x."""
    return mae(restored, original)


# ----------------------------------------------------------------------------------------------
# Realism: distances between feature sets
# ----------------------------------------------------------------------------------------------

def _features(x) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or len(arr) < 2:
        raise ValueError(f"features must be [n >= 2, d], got shape {arr.shape}")
    return arr


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a, b) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` [n, d] and ``b`` [m, d]:
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`` (FID's formula, computed with
    symmetric eigendecompositions, so it is real and >= 0). Biased upwards for small n: compare
    values computed at equal sample sizes."""
    a, b = _features(a), _features(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ra = _sqrt_psd(sa)
    cross = np.linalg.eigvalsh((ra @ sb @ ra + (ra @ sb @ ra).T) / 2)
    value = mu @ mu + np.trace(sa) + np.trace(sb) - 2 * np.sqrt(np.clip(cross, 0, None)).sum()
    return float(max(value, 0.0))


def kernel_distance(a, b, subsets: int = 10, subset_size: int = 1000, degree: int = 3,
                    coef0: float = 1.0, seed: int = 0) -> float:
    """KID: the unbiased estimate of MMD^2 with the polynomial kernel ``(x.y / d + coef0)^degree``,
    averaged over ``subsets`` random subsets of ``subset_size`` rows of each set (the whole sets,
    once, when either is smaller). About 0 for two samples of one distribution (it can be slightly
    negative: it is unbiased), > 0 when they differ. This is the estimator of Bińkowski et al. (2018)
    as FID tools compute it (the cross term averages every pair): for two *identical* sets it is
    -2 (mean k(x,x) - mean k(x,x')) / m, of order 1/m, not exactly 0."""
    a, b = _features(a), _features(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    d = a.shape[1]
    m = min(len(a), len(b), int(subset_size))
    rng = np.random.default_rng(seed)
    whole = m >= len(a) and m >= len(b)
    values = []
    for _ in range(1 if whole else int(subsets)):
        x = a if m >= len(a) else a[rng.choice(len(a), m, replace=False)]
        y = b if m >= len(b) else b[rng.choice(len(b), m, replace=False)]
        kxx = (x @ x.T / d + coef0) ** degree
        kyy = (y @ y.T / d + coef0) ** degree
        kxy = (x @ y.T / d + coef0) ** degree
        nx, ny = len(x), len(y)
        values.append((kxx.sum() - np.trace(kxx)) / (nx * (nx - 1))
                      + (kyy.sum() - np.trace(kyy)) / (ny * (ny - 1))
                      - 2 * kxy.mean())
    return float(np.mean(values))
