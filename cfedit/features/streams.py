"""Per-unit random streams: every unit (image, sample) of an edit draws from its own stream.

A folder of edits is a sample of the counterfactual distribution only if every unit draws
independently, and it is reproducible piecewise (a batch, a shard, a resumed run) only if a unit's
draws depend on the run's seed and its own key, never on which other units share the call.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def unit_uniforms(seed: int, unit_keys: Sequence[int], shape: tuple[int, ...]) -> np.ndarray:
    """Uniforms in [0, 1), [len(unit_keys), *shape]: row i from its own stream
    ``np.random.default_rng([seed, unit_keys[i]])``.

    Why: a folder of edits is a sample of the counterfactual distribution only if every unit draws
    independently, and it is reproducible piecewise (a batch, a shard, a resumed run) only if a unit's
    draws depend on the run's seed and its own key, never on which other units share the call.
    """
    if seed < 0 or any(int(k) < 0 for k in unit_keys):
        raise ValueError("the seed and the unit keys must be non-negative integers")
    rows = [np.random.default_rng([int(seed), int(k)]).random(shape) for k in unit_keys]
    return np.stack(rows) if rows else np.zeros((0, *shape))


def categorical(p: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Draws from the distribution ``p`` (over outcomes 0..len(p)-1) by inverse CDF of uniforms ``u``
    (any shape): with :func:`unit_uniforms`, a categorical draw per unit from its own stream."""
    cdf = np.cumsum(np.asarray(p, dtype=np.float64))
    return np.minimum(np.searchsorted(cdf / cdf[-1], u, side="right"), len(cdf) - 1)


def check_unit_keys(unit_keys: Sequence[int] | None, n: int) -> None:
    """Refuse unit keys that are not one per factual row (a silent mismatch would pair draws wrongly)."""
    if unit_keys is not None and len(unit_keys) != n:
        raise ValueError(f"{len(unit_keys)} unit keys for {n} factual rows (need one per row)")
