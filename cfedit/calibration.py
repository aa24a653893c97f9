"""Edit calibration: how strongly each factor's part of an edit is drawn, and which factors it may not move.

An edit that changes factors v -> v' draws the change one factor at a time, in the graph's
topological order (v = v0 -> v1 -> ... -> v' with vk = v(k-1) with factor k set to v'_k):

    change = sum_k gain[k][v'_k] * protect(decode(vk, u) - decode(v(k-1), u))

With every gain 1 and nothing protected the sum telescopes to decode(v', u) - decode(v, u), the plain
edit. A gain scales what the decoder draws for one factor's new value. ``protect`` removes, per image,
the part of that step which moves the image along the decoder's own direction toward another value of
a factor the edit keeps (decode(v with that factor changed, u) - decode(v, u)); only the part that moves
toward it, so a step that pushes a kept factor further into its own value is left alone.

Why, as measured on CelebA-HQ (the shipped face model; reader on held-out faces):

- the mechanism learns each factor's change at the strength its labeller needed in training, not the
  strength an independent classifier needs: age changes overshoot (young faces edited to old are read
  as old 1.34x as often as real old faces) while gray hair undershoots (0.44x);
- the decoder's age change carries a smile: of 2,395 young faces aged, 231 non-smiling ones were read
  as smiling afterwards and 5 smiling ones as not. Removing the part of the age change along the
  decoder's own smile direction (1% of the change's norm) leaves 51 and 55, a symmetric residue.
  Protecting every kept factor is wrong, though: gray hair's change moves along the decoder's age
  direction, and removing that erases the gray (read as gray 1.17x -> 0.37x).

So both are calibrated (:func:`calibrate_edits`) against a *critic*: a classifier trained on the
training split with another seed, which never trains the mechanism. Per factor and value, single-factor
edits of training images lacking the value are drawn at the gain the plain change needs (below); a kept
factor is protected when that raises the share of edits on which the critic's reading of it stays the
same by at least ``PROTECT_MARGIN`` and the edit without that part can still be made effective at some
gain of the grid. The gain is the smallest in :data:`GAIN_GRID` at which the critic reads the
(protected) edits as the new value at least ``TARGET`` (0.95) times as often as it reads real training
images having it. The null edit is unchanged (no factor
changes, no change drawn).

A fixed direction per factor cannot catch every face, so a model may also ship its critic as a *guard*
(:func:`guard_kept`): per edited image, a kept factor the critic no longer reads as on the input is
stepped back along the decoder's own direction for it, by the smallest multiple that restores the
reading.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from cfedit.graph import CausalGraph

#: The gains tried, smallest first (the smallest that reaches the target wins). Up to 2: a larger gain
#: extrapolates the decoder's change past twice what it draws itself. Measured on CelebA-HQ with a
#: critic that asked gray hair for 2.5: the gray edit painted colour blotches, and young faces aged
#: with gray hair kept gender 0.957 / smiles 0.921 through the eval reader against 0.973 / 0.942 at 2.
GAIN_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 1.75, 2.0)
#: How much more often the critic must read a kept factor unchanged for it to be protected.
PROTECT_MARGIN = 0.01
#: The gain is the smallest at which the critic reads the edits as the new value at least this often
#: relative to real images having it. Measured on CelebA-HQ: 1.0 drove the gain of age=young to 2 (the
#: critic reads 95% of real young faces as young, so de-aged faces had to be read so almost always) and
#: the doubled change flipped gender in 26% of de-aged faces; 0.9 left glasses at a gain the critic
#: accepts and an independent reader does not (0.78 of the real rate).
TARGET = 0.95
#: The guard's corrections, smallest first, in units of the decoder's own change of the kept factor.
GUARD_GRID = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
#: The guard holds a kept factor when the critic reads the edit as it reads the input and at least
#: min(its probability on the input, this) surely. Chosen on 3,000 *training* faces with the eval
#: reader's recipe (the held-out faces were not used): 0.5 (the plain reading) kept gender in 96.0% of
#: age edits and smiles in 96.5%, 0.85 in 96.5% / 97.1%, 0.95 in 96.8% / 97.0%; effectiveness of aging
#: 1.12 -> 1.10 of the real rate.
GUARD_CONFIDENCE = 0.95


def gain_columns(graph: CausalGraph, gains: Mapping[str, Sequence[float]] | None) -> list[np.ndarray] | None:
    """``{factor: [gain per value]}`` as one array per column of the factor table (1 where absent);
    None when every gain is 1 (the plain edit)."""
    if not gains:
        return None
    unknown = sorted(set(gains) - set(graph.names))
    if unknown:
        raise ValueError(f"edit gains name unknown factor {unknown[0]!r} (factors: {', '.join(graph.names)})")
    cols = []
    for name in graph.names:
        g = np.asarray(gains.get(name, [1.0] * graph[name].size), dtype=np.float32)
        if g.shape != (graph[name].size,) or not np.all(np.isfinite(g)) or np.any(g < 0):
            raise ValueError(f"edit gains for {name!r}: need {graph[name].size} finite non-negative values, got {list(gains[name])}")
        cols.append(g)
    return None if all(np.all(c == 1.0) for c in cols) else cols


def protect_columns(graph: CausalGraph, protect: Mapping[str, Sequence[Sequence[str]]] | None) -> list | None:
    """``{factor: [[kept factors protected when it is set to value c] per value c]}`` as column indices,
    ``[j][c] -> [k, ...]``; None when nothing is protected."""
    if not protect:
        return None
    cols: list[list[list[int]]] = []
    for name in graph.names:
        per_value = protect.get(name, [[] for _ in graph[name].values])
        if len(per_value) != graph[name].size:
            raise ValueError(f"edit protection for {name!r}: need a list per value ({graph[name].size}), got {len(per_value)}")
        row = []
        for kept in per_value:
            bad = [k for k in kept if k not in graph.names or k == name]
            if bad:
                raise ValueError(f"edit protection for {name!r} names {bad[0]!r}, not another factor of the graph")
            row.append([graph.axis(k) for k in kept])
        cols.append(row)
    return None if not any(any(r) for r in cols) else cols


class _Directions:
    """Per image, the decoder's unit directions from decode(v, u) toward each other value of a factor
    (computed once per factor, on first use)."""

    def __init__(self, mechanism, u, factual, start, sizes):
        self.mechanism, self.u, self.factual, self.start, self.sizes = mechanism, u, factual, start, sizes
        self._cache: dict[int, list[np.ndarray]] = {}

    def toward_others(self, k: int) -> list[np.ndarray]:
        if k not in self._cache:
            n = len(self.factual)
            dirs = []
            for c in range(self.sizes[k]):
                rows = np.flatnonzero(self.factual[:, k] != c)
                if not len(rows):
                    continue
                moved = self.factual[rows].copy()
                moved[:, k] = c
                d = np.zeros((n, int(np.prod(self.start.shape[1:]))), np.float32)
                d[rows] = (np.asarray(self.mechanism.decode(moved, self.u[rows]), dtype=np.float32)
                           - self.start[rows]).reshape(len(rows), -1)
                norm = np.linalg.norm(d, axis=1, keepdims=True)
                dirs.append(np.where(norm > 1e-6, d / np.maximum(norm, 1e-6), 0.0).astype(np.float32))
            self._cache[k] = dirs
        return self._cache[k]


def remove_toward(step: np.ndarray, directions: Sequence[np.ndarray]) -> np.ndarray:
    """``step`` [n, ...] without its positive component along each unit direction [n, d] in turn."""
    flat = step.reshape(len(step), -1).copy()
    for e in directions:
        flat -= np.maximum((flat * e).sum(1, keepdims=True), 0.0) * e
    return flat.reshape(step.shape)


def gained_change(mechanism, u: np.ndarray, factual: np.ndarray, counterfactual: np.ndarray,
                  columns: Sequence[np.ndarray] | None, start: np.ndarray | None = None,
                  protect: Sequence | None = None, unit: np.ndarray | None = None) -> np.ndarray:
    """The change ``sum_k gain_k * protect(decode(vk, u) - decode(v(k-1), u))`` per counterfactual row
    (float32, the decoder's layout); ``columns``: :func:`gain_columns` (None: every gain 1), ``protect``:
    :func:`protect_columns`. ``u``, ``factual`` and ``start`` (decode(factual, u), when the caller has it)
    are per image; ``unit`` gives each counterfactual row's image (default: row i is image i), so several
    samples of one image share its decodes and its protected directions."""
    factual = np.asarray(factual, dtype=np.int64)
    counterfactual = np.asarray(counterfactual, dtype=np.int64)
    unit = np.arange(len(counterfactual)) if unit is None else np.asarray(unit)
    start = np.asarray(mechanism.decode(factual, u) if start is None else start, dtype=np.float32)
    dirs = _Directions(mechanism, u, factual, start, [len(p) for p in protect]) if protect else None
    prev_dec = start[unit]
    change = np.zeros_like(prev_dec)
    current = factual[unit]
    for j in range(factual.shape[1]):
        rows = np.flatnonzero(current[:, j] != counterfactual[:, j])
        if not len(rows):
            continue
        current[rows, j] = counterfactual[rows, j]
        dec = np.asarray(mechanism.decode(current[rows], u[unit[rows]]), dtype=np.float32)
        step = dec - prev_dec[rows]
        if protect is not None:
            for c in np.unique(counterfactual[rows, j]):
                for k in protect[j][c]:
                    # only where the whole edit keeps factor k
                    at = np.flatnonzero((counterfactual[rows, j] == c)
                                        & (counterfactual[rows, k] == factual[unit[rows], k]))
                    if len(at):
                        step[at] = remove_toward(step[at], [d[unit[rows[at]]] for d in dirs.toward_others(k)])
        gain = 1.0 if columns is None else columns[j][counterfactual[rows, j]][:, None, None, None]
        change[rows] += gain * step
        prev_dec[rows] = dec
    return change


def calibrate_edits(mechanism, critic, dataset, graph: CausalGraph, residual: bool, n: int = 800,
                    target: float = TARGET, grid: Sequence[float] = GAIN_GRID, seed: int = 0) -> tuple[dict, dict, dict]:
    """Per factor and value: the kept factors to protect and the gain, from single-factor edits of up to
    ``n`` training images lacking that value, read by ``critic`` (see the module's docstring). The gain is
    the smallest in ``grid`` at which the edits are read as the new value at ``target`` times the rate
    at which real images having it are (the first gain at the largest ratio when none reaches the target;
    1 when the data have no image with, or none without, the value, or the critic reads no real image as
    having it).

    Returns ``(gains, protect, table)``: ``{factor: [gain per value]}``, ``{factor: [[protected factors]
    per value]}`` and, per ``factor=value``, the real read rate, the critic's kept rates with and without
    protecting each factor, the ratio at each gain tried and the choices.
    """
    from cfedit.imageio import to_uint8

    rng = np.random.default_rng(seed)
    names, sizes = graph.names, [graph[k].size for k in graph.names]
    x_all = np.asarray(dataset.images)
    v_all = np.asarray(dataset.factors, dtype=np.int64)
    read_all = None
    gains = {k: [1.0] * graph[k].size for k in names}
    protect: dict[str, list[list[str]]] = {k: [[] for _ in range(graph[k].size)] for k in names}
    table: dict[str, dict] = {}
    for j, name in enumerate(names):
        for c in range(sizes[j]):
            have, lack = np.flatnonzero(v_all[:, j] == c), np.flatnonzero(v_all[:, j] != c)
            key = f"{name}={graph[name].values[c]}"
            if not len(have) or not len(lack):
                table[key] = {"gain": 1.0, "note": "no image " + ("with" if not len(have) else "without") + " this value"}
                continue
            if read_all is None:
                read_all = np.asarray(critic.predict(x_all), dtype=np.int64)
            real = float((read_all[have, j] == c).mean())
            if real == 0:
                table[key] = {"gain": 1.0, "real_rate": 0.0, "note": "the critic never reads real images as this value"}
                continue
            pick = np.sort(rng.choice(lack, size=min(n, len(lack)), replace=False))
            x, v = x_all[pick], v_all[pick]
            cf = v.copy()
            cf[:, j] = c
            u = np.asarray(mechanism.abduct(x, v))
            start = np.asarray(mechanism.decode(v, u), dtype=np.float32)
            raw = np.asarray(mechanism.decode(cf, u), dtype=np.float32) - start
            base = x.astype(np.float32) / 255.0 if residual else start
            before = read_all[pick]

            def read(change, gain=1.0):
                return np.asarray(critic.predict(to_uint8(np.clip(base + gain * change, 0.0, 1.0))), dtype=np.int64)

            def search(change):
                ratios = {}
                for s in grid:
                    ratios[s] = float((read(change, s)[:, j] == c).mean()) / real
                    if ratios[s] >= target:
                        return s, ratios
                return max(ratios, key=ratios.get), ratios

            # protection is judged where the edit will be drawn: at the plain change's own gain
            plain_gain, _ = search(raw)
            plain = read(raw, plain_gain)
            dirs = _Directions(mechanism, u, v, start, sizes)
            kept, candidates = {}, []
            for k, other in enumerate(names):
                if k == j:
                    continue
                trial = read(remove_toward(raw, dirs.toward_others(k)), plain_gain)
                kept[other] = [round(float((plain[:, k] == before[:, k]).mean()), 4),
                               round(float((trial[:, k] == before[:, k]).mean()), 4)]
                if kept[other][1] >= kept[other][0] + PROTECT_MARGIN:
                    candidates.append(other)
            # a candidate is protected if the edit, without that part, can still be made effective
            change = raw
            for other in candidates:
                trial_change = remove_toward(change, dirs.toward_others(graph.axis(other)))
                gain, ratios = search(trial_change)
                if ratios[gain] >= target:
                    change = trial_change
                    protect[name][c].append(other)
            chosen, ratios = search(change)
            gains[name][c] = float(chosen)
            table[key] = {"real_rate": round(real, 4), "plain_gain": float(plain_gain), "kept": kept,
                          "protect": list(protect[name][c]),
                          "ratios": {str(k): round(r, 4) for k, r in ratios.items()}, "gain": float(chosen)}
    return gains, {k: p for k, p in protect.items() if any(p)}, table


def guard_kept(mechanism, critic, images: np.ndarray, edited: np.ndarray, u: np.ndarray, factual: np.ndarray,
               counterfactual: np.ndarray, unit: np.ndarray | None = None,
               grid: Sequence[float] = GUARD_GRID, confidence: float = GUARD_CONFIDENCE) -> np.ndarray:
    """The guard: edits (float [m, C, S, S] in [0, 1]) on which ``critic`` reads a factor the edit keeps
    (counterfactual = factual) otherwise than on the input image are moved back along the decoder's own
    direction for that factor, decode(v' with the input's reading) - decode(v' with the edit's reading)
    at the counterfactual v', by the smallest multiple in ``grid`` after which the critic reads the
    input's value again, at least min(its probability on the input, ``confidence``) surely, and still
    reads every change of the edit it read before; rows where no multiple does are left as drawn.
    ``images``, ``u`` and ``factual`` are per image; ``unit`` maps each edit to its image (default: row
    i is image i). Rows whose edit changes nothing are never touched, so the null edit stays the input.

    Why: the calibrated change still moves kept factors on some images in ways no single direction
    removes for all of them (measured on CelebA-HQ, with an independent reader: de-aging flipped
    gender on 12% of old faces; gray hair on 20%); the critic sees where, per image, and the correction
    stays on the decoder's own path between two faces rather than a pixel-level adversarial one.
    """
    from cfedit.imageio import to_uint8

    factual = np.asarray(factual, dtype=np.int64)
    counterfactual = np.asarray(counterfactual, dtype=np.int64)
    unit = np.arange(len(counterfactual)) if unit is None else np.asarray(unit)
    out = np.array(edited, dtype=np.float32, copy=True)
    changed = np.flatnonzero((counterfactual != factual[unit]).any(1))
    if not len(changed):
        return out

    def probs(imgs) -> list[np.ndarray]:
        return [np.asarray(p, dtype=np.float64) for p in critic.predict_proba(imgs)]

    p_in = probs(np.asarray(images))
    before = np.stack([p.argmax(1) for p in p_in], 1)[unit]
    # the edit must be read as the input is, and about as surely: at least min(input's, confidence)
    need = np.minimum(np.stack([p.max(1) for p in p_in], 1)[unit], confidence)
    p_now = [np.zeros((len(unit), p.shape[1])) for p in p_in]
    for j, p in enumerate(probs(to_uint8(out[changed]))):
        p_now[j][changed] = p

    def held(pk, rows, k):  # read as the input is, and at least that surely
        return (pk.argmax(1) == before[rows, k]) & (pk[np.arange(len(rows)), before[rows, k]] >= need[rows, k] - 1e-9)

    # the changes the critic reads on the edit: a correction may not undo any of them. Gray hair is read
    # as age too, and stepping back along the age direction took the gray away with it: on 3,000
    # training faces, gray edits were read as gray 0.73 of the real rate when a correction could undo
    # it, 0.96 with this rule.
    made = np.zeros_like(before, dtype=bool)
    made[changed] = (counterfactual[changed] != factual[unit[changed]]) & (
        np.stack([p[changed].argmax(1) for p in p_now], 1) == counterfactual[changed])

    def still_made(read, rows):
        now_read = np.stack([p.argmax(1) for p in read], 1)
        return ~(made[rows] & (now_read != counterfactual[rows])).any(1)

    for k in range(factual.shape[1]):
        keep = changed[counterfactual[changed, k] == factual[unit[changed], k]]
        bad = keep[~held(p_now[k][keep], keep, k)]
        if not len(bad):
            continue
        toward, away = counterfactual[bad].copy(), counterfactual[bad].copy()
        toward[:, k] = before[bad, k]
        other = p_now[k][bad].copy()
        other[np.arange(len(bad)), before[bad, k]] = -1
        away[:, k] = other.argmax(1)
        back = (np.asarray(mechanism.decode(toward, u[unit[bad]]), dtype=np.float32)
                - np.asarray(mechanism.decode(away, u[unit[bad]]), dtype=np.float32))
        todo = np.arange(len(bad))
        for c in grid:
            trial = np.clip(out[bad[todo]] + c * back[todo], 0.0, 1.0)
            read = probs(to_uint8(trial))
            ok = held(read[k], bad[todo], k) & still_made(read, bad[todo])
            out[bad[todo[ok]]] = trial[ok]
            for j in range(len(p_now)):
                p_now[j][bad[todo[ok]]] = read[j][ok]
            todo = todo[~ok]
            if not len(todo):
                break
    return out
