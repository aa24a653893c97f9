"""Neural causal model (NCM) over the discrete factors: the method's own feature model.

Following Xia et al. (2021, 2023) and Pan & Bareinboim (2024), the model has

* one **shared noise** ``U_C ~ Uniform[0,1]^d`` per maximal bidirected clique ``C`` of the graph
  (:meth:`CausalGraph.bidirected_cliques`), and one **own noise** ``U_V ~ Uniform[0,1]^(d+1)`` per
  factor ``V``;
* one **neural mechanism** per factor, ``V = f_V(pa_V, U_cliques(V), U_V)``, whose inputs are exactly
  the factor's parents in G (one-hot) and its noises: an MLP ``g_V`` maps ``(pa_V, U_cliques(V),
  U_V[:d])`` to logits over V's values, and the last coordinate ``e_V = U_V[d]`` picks the value by
  the inverse CDF of ``softmax(g_V)``:  ``V = min{v : F_V(v | pa_V, u) > e_V}``.

Why the inverse-CDF ("quantile") mechanism rather than Gumbel-max with the own noise: both make the
mechanism deterministic given all noises and both give ``P(V=v | pa, u) = softmax(g_V)[v]`` exactly,
so the likelihood only needs Monte-Carlo over the continuous noises. The quantile form has two more
exact properties the method needs:

1. abduction of ``e_V`` given the factual value is a uniform draw on ``[F(v-1), F(v))``;
2. the joint of one factor's values in several worlds that share its noise (factual and
   counterfactual) is the length of the *intersection* of those intervals — exact, differentiable
   almost everywhere and valid for any number of values and worlds (Gumbel-max has a closed form only
   for two values). Counterfactual probabilities, and hence the query term of the extreme training,
   are therefore computed exactly given the continuous noises, with no relaxed estimator.

The quantile noise is read on a circle, rotated by a learned ``r_V(pa_V, u)``: value ``v`` takes the
arc ``[r + F(v-1), r + F(v)) mod 1``, so ``V = min{v : F_V(v | pa_V, u) > (e_V - r) mod 1}``. With
``r = 0`` the coupling across parent values given ``u`` is comonotone in the value order; mixing
over the continuous noises reaches any distribution of response functions only in the limit of
saturated mechanisms (conditionals near 0 or 1 on regions of the noise). A query whose extreme
needs a counter-monotone coupling (e.g. backdoor ``redigit_bar``, P(bar_{digit=8}=yes | digit=3,
color=green, bar=no), whose maximum 1 needs bar=no at digit 3 to imply bar=yes at digit 8 while
P(bar=no | 8, green) = 0.31 > P(bar=no | 3, green) = 0.265) was then out of reach: the query term
found it only by bending P(V), and the annealed data term pulled it back to 0.17. A rotation makes
such couplings one smooth parameter away (disjoint arcs), with no saturation. ``r`` has a network of
its own (P(V) does not depend on it, so fitting never moves it) with a zero output layer: a fitted
model starts at ``r = 0``, and a state saved before rotations loads with ``r = 0``.

Fitting is maximum likelihood on P(V) (full batch over the support of P(V), weighted by it), with
the integral over the continuous noises estimated by a fresh block of scrambled Sobol points each
step. Maximum likelihood rather than the adversarial (GAN) route: with discrete factors the
likelihood is tractable and exact given the noise, its gradient is low-variance, and there is no
critic to balance. The model's own quantities (:meth:`NCM.joint`, :meth:`NCM.prob`) integrate over
a fixed set of ``2**eval_log2`` scrambled Sobol points (quasi-Monte-Carlo), so they are
deterministic; counterfactual sampling abducts the continuous noises by importance resampling
(weights ``prod_V softmax_V(v_V | pa_V, u)``; the acceptance rate reported is the effective sample
size over the number of candidates) and the quantile noises exactly.

**Query-extreme training** (:func:`fit_extreme`): starting from the fitted model, minimise
``KL(P(V) || P_model(V)) -/+ lambda_t * P_model(query)`` with ``lambda_t`` held high for a while
and then annealed geometrically to a small value, as in the NCM papers; the query term is the
model's exact-given-noise query probability on the training noise block, with the exact gradient
of intersections of arcs and a softplus gradient for empty ones (see :meth:`NCM._arcs`), and the
gradient norm clipped at 1. The max and min
models give the NCM's interval (:func:`ncm_bounds`). Every model fits P(V) and respects G, so its
value lies inside the optimal bounds up to fit and quadrature error; the extreme models push toward
the bounds. The interval is an inner one found by local optimisation: it is never certified.
"""

from __future__ import annotations

from cfedit.errors import CfeditError

import contextlib
import copy
import functools
import hashlib
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from cfedit.causal.bounds import Bounds
from cfedit.causal.pv import total_variation
from cfedit.features.streams import categorical, check_unit_keys, unit_uniforms
from cfedit.causal.graph import CausalGraph
from cfedit.causal.query import Query, QueryError, parse_query

FAMILY = "ncm"
# Tags the per-cell candidate streams of keyed counterfactuals (seed, tag, cell) apart from the unit
# streams (seed, key) of cfedit.features.unit_uniforms.
_CELL_STREAM = 2**32 - 1


class NCMError(CfeditError, ValueError):
    """The NCM cannot do what was asked (bad input, not fitted, a state that does not match)."""


class ZeroEvidenceError(QueryError):
    """The evidence of a query or a factual unit has probability zero under the model."""


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NCMConfig:
    noise_dim: int = 2          # d: size of each clique noise and of the network part of own noise
    hidden: int = 64            # width of each mechanism's MLP
    layers: int = 2             # hidden layers of each mechanism's MLP
    # The networks see gain * (2u - 1). A gain > 1 makes the mechanisms vary with the noise from the
    # start; fitting P(V) leaves that variation alone (it only constrains averages over the noise),
    # and the extreme training needs it: from a model whose conditionals hardly depend on the noise
    # the query term has the same gradient at every noise point and cannot break the symmetry.
    noise_gain: float = 4.0
    fit_steps: int = 600        # maximum-likelihood steps of the default fit
    lr: float = 1e-2            # Adam learning rate (cosine-decayed to lr / 100)
    batch_log2: int = 10        # 2**batch_log2 Sobol noise points per training step
    eval_log2: int = 15         # 2**eval_log2 fixed Sobol points for joint() and prob()
    abduction_log2: int = 13    # 2**abduction_log2 candidate noises per factual unit
    # query-extreme training
    extreme_steps: int = 800
    extreme_lr: float = 5e-3
    lambda_hold: float = 0.25   # fraction of the steps at lambda_high before the annealing starts
    lambda_high: float = 0.2    # then lambda_t = lambda_high * (lambda_low / lambda_high) ** frac
    # lambda_low must be small: a conditional query's sensitivity to P(V) is 1 / P(evidence), so a
    # residual lambda buys a bias of about lambda / P(evidence) by bending the fit near the evidence.
    lambda_low: float = 1e-5
    tau_high: float = 0.1       # temperature of the smoothed interval intersection (gradient only),
    tau_low: float = 0.01       # annealed like lambda
    extreme_batch_log2: int = 10
    # An extreme model must still fit P(V). Holding lambda high finds the couplings of harder
    # (multilinear) queries, but on a query whose evidence is rare the query term can instead bend
    # P(V) so far that the annealing does not bring it back. So: train with the hold; when the
    # result's TV to P(V) exceeds extreme_tv_tol, train again without it and keep the better fit.
    extreme_tv_tol: float = 0.01
    # torch threads while the NCM computes (restored afterwards; 0 = leave torch's setting). The
    # networks are tiny: one thread is as fast, and on a busy machine several OpenMP workers spin
    # and get descheduled, making training many times slower (measured: > 8 min instead of ~1 min).
    threads: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> NCMConfig:
        known = {f for f in NCMConfig.__dataclass_fields__}
        return NCMConfig(**{k: v for k, v in d.items() if k in known})


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    if n and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n and n != before:
            torch.set_num_threads(before)


def _limit_threads(method):
    """Run an NCM method under ``self.config.threads`` torch threads."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with _threads(self.config.threads):
            return method(self, *args, **kwargs)

    return wrapper


# ----------------------------------------------------------------------------------------------
# Mechanisms
# ----------------------------------------------------------------------------------------------


class _Mechanism(nn.Module):
    """g_V: (one-hot parents, continuous noise) -> logits over V's values.

    The first layer is split into a parent part and a noise part so a table over every parent
    configuration and every noise point costs one small matmul each, broadcast-added.
    """

    def __init__(self, pa_dim: int, noise_in: int, k: int, hidden: int, layers: int, gain: float = 1.0):
        super().__init__()
        self.gain = float(gain)
        self.pa = nn.Linear(pa_dim, hidden, bias=False) if pa_dim else None
        self.noise = nn.Linear(noise_in, hidden)
        body: list[nn.Module] = []
        for _ in range(layers - 1):
            body += [nn.SiLU(), nn.Linear(hidden, hidden)]
        body += [nn.SiLU(), nn.Linear(hidden, k)]
        self.body = nn.Sequential(*body)
        # The rotation r(pa, u) of the quantile noise (see NCM._arcs): a network of its own, so that
        # fitting P(V) (which does not depend on r) never moves it, and an extreme model keeps the
        # coupling its query found while the annealed data term pulls the logits back onto P(V).
        # Zero output layer: a model starts with r = 0, the comonotone coupling; a state saved
        # without it loads with r = 0, its old behaviour exactly.
        # (drawn from a forked generator: the other networks' initialisation stays as it was)
        rh = max(8, hidden // 4)
        with torch.random.fork_rng(devices=[]):
            self.rot_pa = nn.Linear(pa_dim, rh, bias=False) if pa_dim else None
            self.rot_noise = nn.Linear(noise_in, rh)
            self.rot_out = nn.Linear(rh, 1)
        nn.init.zeros_(self.rot_out.weight)
        nn.init.zeros_(self.rot_out.bias)

    def _rot(self, pa: torch.Tensor | None, u: torch.Tensor, table: bool) -> torch.Tensor:
        h = self.rot_noise(self.gain * (2 * u - 1))
        if table:
            h = h[:, None, :]
        if self.rot_pa is not None:
            h = h + (self.rot_pa(pa)[None, :, :] if table else self.rot_pa(pa))
        return self.rot_out(nn.functional.silu(h))[..., 0]

    def table(self, onehots: torch.Tensor, u: torch.Tensor, rot: bool = False):
        """Logits [N, P, k] for every noise point (u: [N, d]) and parent configuration ([P, pa_dim]);
        with ``rot`` also the rotations [N, P]."""
        h = self.noise(self.gain * (2 * u - 1))[:, None, :]
        if self.pa is not None:
            h = h + self.pa(onehots)[None, :, :]
        return (self.body(h), self._rot(onehots, u, True)) if rot else self.body(h)

    def rows(self, onehot_rows: torch.Tensor, u: torch.Tensor, rot: bool = False):
        """Logits [M, k] for paired rows of parents ([M, pa_dim]) and noise ([M, d]); with ``rot``
        also the rotations [M]."""
        h = self.noise(self.gain * (2 * u - 1))
        if self.pa is not None:
            h = h + self.pa(onehot_rows)
        return (self.body(h), self._rot(onehot_rows, u, False)) if rot else self.body(h)


# ----------------------------------------------------------------------------------------------
# Compiled multi-world queries
# ----------------------------------------------------------------------------------------------


@dataclass
class _Spec:
    """An enumeration of the joint values of the factors a set of (world, factor) terms depends on.

    ``copies[V]`` lists, for each world in which V is a kept, non-intervened node, the parent
    configuration index and V's value in every enumerated combination. Given the continuous noises,
    the probability of a combination is prod_V |intersection over V's copies of [F(v-1), F(v))|.
    ``impossible``: the terms contradict each other structurally (probability exactly zero).
    """

    n_combos: int
    copies: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]
    impossible: bool = False
    combos: np.ndarray | None = None
    nodes: list[tuple[int, str]] = field(default_factory=list)



class NCM:
    """A neural causal model over ``graph``'s factors; implements :class:`cfedit.features.FeatureModel`."""

    family = FAMILY

    def __init__(self, graph: CausalGraph, config: NCMConfig | Mapping[str, Any] | None = None, seed: int = 0):
        self.graph = graph
        self.config = config if isinstance(config, NCMConfig) else NCMConfig.from_dict(config or {})
        self.seed = int(seed)
        self.fitted = False
        self.info: dict[str, Any] = {}
        self.last_abduction: dict[str, float] = {}
        self._build(self.seed)

    # -- structure ------------------------------------------------------------------------------

    def _build(self, seed: int) -> None:
        g, d = self.graph, self.config.noise_dim
        self.cliques = g.bidirected_cliques()
        offset = 0
        self._clique_slices: list[slice] = []
        for _ in self.cliques:
            self._clique_slices.append(slice(offset, offset + d))
            offset += d
        self._own: dict[str, slice] = {}
        self._quantile: dict[str, int] = {}
        for v in g.names:
            self._own[v] = slice(offset, offset + d)
            self._quantile[v] = offset + d
            offset += d + 1
        self.noise_total = offset
        self._noise_cols: dict[str, torch.Tensor] = {}
        for v in g.names:
            cols: list[int] = []
            for c, sl in zip(self.cliques, self._clique_slices):
                if v in c:
                    cols += list(range(sl.start, sl.stop))
            cols += list(range(self._own[v].start, self._own[v].stop))
            self._noise_cols[v] = torch.tensor(cols, dtype=torch.long)
        # parent configurations, C order over graph.parents(v)
        self._pa: dict[str, tuple[str, ...]] = {v: g.parents(v) for v in g.names}
        self._pa_sizes: dict[str, tuple[int, ...]] = {v: tuple(g[p].size for p in self._pa[v]) for v in g.names}
        self._onehots: dict[str, torch.Tensor] = {}
        for v in g.names:
            sizes = self._pa_sizes[v]
            configs = list(itertools.product(*[range(s) for s in sizes])) if sizes else [()]
            oh = torch.zeros(len(configs), sum(sizes))
            for i, cfg in enumerate(configs):
                off = 0
                for s, x in zip(sizes, cfg):
                    oh[i, off + x] = 1.0
                    off += s
            self._onehots[v] = oh
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.mech = nn.ModuleDict({
                v: _Mechanism(sum(self._pa_sizes[v]), len(self._noise_cols[v]), g[v].size,
                              self.config.hidden, self.config.layers, self.config.noise_gain)
                for v in g.names
            })
        self._eval_noise: torch.Tensor | None = None

    def _pa_index(self, v: str, parent_values: Sequence[np.ndarray], n: int) -> np.ndarray:
        """Flat index (C order over ``graph.parents(v)``) of the parents' values, for n rows."""
        if not self._pa_sizes[v]:
            return np.zeros(n, dtype=np.int64)
        return np.ravel_multi_index(tuple(np.asarray(x, dtype=np.int64) for x in parent_values), self._pa_sizes[v])

    # -- noise ----------------------------------------------------------------------------------

    def _sobol(self, log2: int, seed: int) -> torch.Tensor:
        eng = torch.quasirandom.SobolEngine(self.noise_total, scramble=True, seed=seed)
        return eng.draw(2 ** log2).float()

    def eval_noise(self) -> torch.Tensor:
        """The fixed quasi-Monte-Carlo points over which joint() and prob() integrate."""
        if self._eval_noise is None:
            self._eval_noise = self._sobol(self.config.eval_log2, seed=self.seed + 7919)
        return self._eval_noise

    # -- tables ---------------------------------------------------------------------------------

    def _logit_tables(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        return {v: self.mech[v].table(self._onehots[v], u[:, self._noise_cols[v]]) for v in self.graph.names}

    def _tables(self, u: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Logit tables [N, P, k] and rotation tables [N, P] of every factor."""
        logits, rots = {}, {}
        for v in self.graph.names:
            logits[v], rots[v] = self.mech[v].table(self._onehots[v], u[:, self._noise_cols[v]], rot=True)
        return logits, rots

    @staticmethod
    def _cdf(logits: torch.Tensor) -> torch.Tensor:
        """[..., k] logits -> [..., k+1] CDF with exact 0 and 1 at the ends."""
        p = torch.softmax(logits, dim=-1)
        c = torch.cumsum(p, dim=-1)
        zero = torch.zeros_like(c[..., :1])
        return torch.cat([zero, c[..., :-1], torch.ones_like(zero)], dim=-1)

    # -- compiling terms ------------------------------------------------------------------------

    def _compile(self, terms: Sequence[tuple[Mapping[str, int], str, int | None]]) -> _Spec:
        """Enumerate what the terms ``(do, variable, value or None for free)`` depend on.

        World 0 is the factual world. A factor that is not a descendant of a world's intervened
        factors is the same random variable as its factual copy (same noise, same parents), so it is
        merged with it: contradicting values then make the spec structurally impossible.
        """
        g = self.graph
        worlds: list[dict[str, int]] = [{}]
        desc: list[set[str]] = [set()]

        def world_of(do: Mapping[str, int]) -> int:
            do = {k: int(x) for k, x in do.items()}
            if do in worlds:
                return worlds.index(do)
            worlds.append(do)
            desc.append(set(g.descendants(list(do))) - set(do))
            return len(worlds) - 1

        def canon(w: int, v: str) -> tuple[int, str]:
            return (w, v) if v in desc[w] else (0, v)

        fixed: dict[tuple[int, str], int] = {}
        todo: list[tuple[int, str]] = []
        impossible = False
        for do, var, val in terms:
            w = world_of(do)
            if var in worlds[w]:
                raise NCMError(f"{var!r} is intervened on in its own term")
            node = canon(w, var)
            todo.append(node)
            if val is not None:
                if node in fixed and fixed[node] != int(val):
                    impossible = True
                fixed[node] = int(val)
        kept: set[tuple[int, str]] = set()
        while todo:
            node = todo.pop()
            if node in kept:
                continue
            kept.add(node)
            w, v = node
            for p in self._pa[v]:
                if p not in worlds[w]:
                    todo.append(canon(w, p))
        order = {v: i for i, v in enumerate(g.names)}
        nodes = sorted(kept, key=lambda n: (order[n[1]], n[0]))
        index = {n: i for i, n in enumerate(nodes)}
        domains = [[fixed[n]] if n in fixed else list(range(g[n[1]].size)) for n in nodes]
        n_combos = int(np.prod([len(x) for x in domains])) if nodes else 1
        if n_combos > 2_000_000:
            raise NCMError(f"the query needs {n_combos} joint values enumerated; too many for the NCM")
        combos = (np.array(list(itertools.product(*domains)), dtype=np.int64).reshape(n_combos, len(nodes))
                  if nodes else np.zeros((1, 0), dtype=np.int64))
        copies: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for n in nodes:
            w, v = n
            pvals = []
            for p in self._pa[v]:
                if p in worlds[w]:
                    pvals.append(np.full(n_combos, worlds[w][p], dtype=np.int64))
                else:
                    pvals.append(combos[:, index[canon(w, p)]])
            pidx = self._pa_index(v, pvals, n_combos)
            copies.setdefault(v, []).append((torch.as_tensor(pidx), torch.as_tensor(combos[:, index[n]])))
        return _Spec(n_combos, copies, impossible, combos, nodes)

    def _query_terms(self, query: Query | str):
        q = parse_query(query) if isinstance(query, str) else query
        q.validate(self.graph)
        g = self.graph

        def conv(t):
            return (g.value_indices(dict(t.interventions)), t.variable, g[t.variable].as_index(t.value))

        return q, [conv(t) for t in q.targets], [conv(t) for t in q.evidence]

    # -- evaluating specs -----------------------------------------------------------------------

    def _spec_probs(self, spec: _Spec, cdfs: Mapping[str, torch.Tensor], tau: float = 0.0,
                    rots: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """[N, C] probability of each enumerated combination given each noise point.

        ``rots`` (v -> [N, P]): the rotations of the quantile noise; value ``x`` of V at parents
        ``pa`` then takes the arc ``[r + F(x-1), r + F(x)) mod 1`` of the circle (``None``: r = 0,
        plain intervals). The joint of several copies of V is the length of the intersection of
        their arcs: each arc is ``([s, e) U [s-1, e-1)) & [0, 1)`` with ``s`` in [0, 1), and the
        pieces of one arc are disjoint, so the length is a sum over the 2**copies choices of piece.

        ``tau > 0`` (training only): the value stays exact but the gradient of an intersection of
        several intervals is that of a smoothed one (soft max of the lower ends, soft min of the
        upper ends, softplus of the length, temperature tau) -- a straight-through estimator. The
        exact intersection has zero gradient wherever one interval end dominates everywhere (e.g.
        a comonotone coupling, which is where a fitted model starts), so the query term could
        never pull the model away from it.
        """
        first = next(iter(cdfs.values()))
        out = torch.ones(first.shape[0], spec.n_combos, dtype=first.dtype)
        if spec.impossible:
            return out * 0
        for v, cps in spec.copies.items():
            cdf = cdfs[v]
            los = [cdf[:, pidx, val] for pidx, val in cps]
            his = [cdf[:, pidx, val + 1] for pidx, val in cps]
            if len(cps) == 1:
                out = out * (his[0] - los[0])
                continue
            if rots is not None:
                out = out * self._arcs(rots[v], cps, los, his, tau)
                continue
            lo, hi = torch.stack(los).amax(0), torch.stack(his).amin(0)
            length = torch.clamp(hi - lo, min=0.0)
            if tau > 0:
                slo = tau * torch.logsumexp(torch.stack(los) / tau, 0)
                shi = -tau * torch.logsumexp(-torch.stack(his) / tau, 0)
                soft = tau * nn.functional.softplus((shi - slo) / tau)
                length = length.detach() + soft - soft.detach()
            out = out * length
        return out

    @staticmethod
    def _arcs(rot: torch.Tensor, cps, los, his, tau: float) -> torch.Tensor:
        """Length of the intersection of the rotated arcs of several copies of one factor."""
        starts, ends = [], []
        for (pidx, _), lo, hi in zip(cps, los, his):
            x = rot[:, pidx] + lo
            start = x - torch.floor(x).detach()  # in [0, 1); the gradient passes through
            starts.append(start)
            ends.append(start + (hi - lo))
        s, e = torch.stack(starts), torch.stack(ends)                     # [n, N, C]
        n = s.shape[0]
        zero, one = torch.zeros_like(s[:1]), torch.ones_like(e[:1])
        exact, soft = 0.0, 0.0
        for choice in itertools.product((0.0, 1.0), repeat=n):
            c = torch.tensor(choice, dtype=s.dtype).view(n, *([1] * (s.dim() - 1)))
            los_c = torch.cat([zero, s - c])
            his_c = torch.cat([one, e - c])
            gap = his_c.amin(0) - los_c.amax(0)
            piece = torch.clamp(gap, min=0.0)
            exact = exact + piece
            if tau > 0:
                # an empty piece gets the gradient of a softplus, which pulls near-misses together
                # (the exact length is flat there); a non-empty one keeps its exact gradient, so the
                # query term's gradient stays that of the exact probability wherever arcs meet
                sp = tau * nn.functional.softplus(gap / tau)
                soft = soft + torch.where(gap > 0, piece, sp - sp.detach())
        return soft if tau > 0 else exact  # the same value; soft carries the training gradient

    @torch.no_grad()
    def _eval_specs(self, specs: Sequence[_Spec], chunk: int = 4096) -> list[np.ndarray]:
        """Per-combination probabilities of each spec, integrated over the fixed Sobol points."""
        u_all = self.eval_noise()
        sums = [torch.zeros(s.n_combos, dtype=torch.float64) for s in specs]
        for start in range(0, u_all.shape[0], chunk):
            u = u_all[start:start + chunk]
            logits, rots = self._tables(u)
            cdfs = {v: self._cdf(t).double() for v, t in logits.items()}
            rots = {v: t.double() for v, t in rots.items()}
            for i, s in enumerate(specs):
                sums[i] += self._spec_probs(s, cdfs, rots=rots).sum(0)
        return [(s / u_all.shape[0]).numpy() for s in sums]

    def _all_spec(self, do: Mapping[str, int] | None = None) -> _Spec:
        do = dict(do or {})
        return self._compile([(do, v, None) for v in self.graph.names if v not in do])

    # -- FeatureModel ---------------------------------------------------------------------------

    @_limit_threads
    def joint(self, do: Mapping[str, int | str] | None = None) -> np.ndarray:
        """The model's P(V) (or P(V_x) with ``do``), over ``graph.names`` with shape ``graph.shape``."""
        g = self.graph
        do_idx = g.value_indices(do)
        spec = self._all_spec(do_idx)
        (probs,) = self._eval_specs([spec])
        out = np.zeros(g.shape)
        cols = [g.axis(v) for _, v in spec.nodes]
        idx = [None] * len(g.names)
        for c, a in enumerate(cols):
            idx[a] = spec.combos[:, c]
        for k, x in do_idx.items():
            idx[g.axis(k)] = np.full(spec.n_combos, x)
        np.add.at(out, tuple(idx), probs)
        return out / out.sum()

    @_limit_threads
    def prob(self, query: Query | str) -> float:
        """The model's value of a counterfactual query (exact given the noise, QMC over the noise)."""
        q, targets, evidence = self._query_terms(query)
        spec_te = self._compile(targets + evidence)
        specs = [spec_te] + ([self._compile(evidence)] if evidence else [])
        probs = self._eval_specs(specs)
        p_te = float(probs[0].sum())
        p_e = float(probs[1].sum()) if evidence else 1.0
        if p_e <= 0.0 or (evidence and specs[1].impossible):
            raise ZeroEvidenceError("the evidence has probability zero under the NCM", str(q))
        return min(1.0, max(0.0, p_te / p_e))

    # -- fitting --------------------------------------------------------------------------------

    def _fit_terms(self, pv: np.ndarray):
        g = self.graph
        pv = np.asarray(pv, dtype=np.float64)
        if pv.shape != g.shape:
            raise NCMError(f"P(V) has shape {pv.shape}; the graph {g.name!r} needs {g.shape}")
        if (pv < 0).any() or not np.isclose(pv.sum(), 1.0, atol=1e-6):
            raise NCMError("P(V) must be non-negative and sum to 1")
        support = np.argwhere(pv > 0)
        weights = torch.as_tensor(pv[tuple(support.T)], dtype=torch.float32)
        gathers = []
        for v in g.names:
            pvals = [support[:, g.axis(p)] for p in self._pa[v]]
            pidx = self._pa_index(v, pvals, len(support))
            gathers.append((v, torch.as_tensor(pidx), torch.as_tensor(support[:, g.axis(v)])))
        entropy = float(-(pv[pv > 0] * np.log(pv[pv > 0])).sum())
        return weights, gathers, entropy

    def _kl(self, logits: Mapping[str, torch.Tensor], weights, gathers, entropy) -> torch.Tensor:
        """KL(P(V) || model) with the noise integral estimated over the rows of ``logits``."""
        total = None
        for v, pidx, val in gathers:
            lp = torch.log_softmax(logits[v], dim=-1)[:, pidx, val]
            total = lp if total is None else total + lp
        n = total.shape[0]
        log_model = torch.logsumexp(total, dim=0) - math.log(n)
        return -(weights * log_model).sum() - entropy

    @_limit_threads
    def fit(self, pv: np.ndarray, seed: int | None = None, steps: int | None = None,
            progress: Any = None) -> NCM:
        """Maximum likelihood on P(V). ``seed`` (default: the constructor's) fixes init and noise."""
        t0 = time.perf_counter()
        if seed is not None and int(seed) != self.seed:
            self.seed = int(seed)
            self._build(self.seed)
        cfg = self.config
        steps = cfg.fit_steps if steps is None else int(steps)
        weights, gathers, entropy = self._fit_terms(pv)
        engine = torch.quasirandom.SobolEngine(self.noise_total, scramble=True, seed=self.seed + 1)
        opt = torch.optim.Adam(self.mech.parameters(), lr=cfg.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=cfg.lr / 100)
        kl = torch.tensor(float("nan"))
        for step in range(steps):
            u = engine.draw(2 ** cfg.batch_log2).float()
            kl = self._kl(self._logit_tables(u), weights, gathers, entropy)
            opt.zero_grad(set_to_none=True)
            kl.backward()
            opt.step()
            sched.step()
            if progress is not None:
                progress(step + 1, steps, float(kl.detach()))
        self.fitted = True
        self._eval_noise = None
        tv = total_variation(self.joint(), pv)
        self.info.update(fit_seconds=time.perf_counter() - t0, fit_steps=steps, fit_kl=float(kl.detach()), fit_tv=tv)
        return self

    # -- counterfactuals ------------------------------------------------------------------------

    @_limit_threads
    @torch.no_grad()
    def counterfactual(self, factual: np.ndarray, do: Mapping[str, int | str], n_samples: int = 1,
                       seed: int = 0, unit_keys: Sequence[int] | None = None) -> np.ndarray:
        """Abduct the noise from factual factors [n, k], act do(X=x), predict: [n, n_samples, k].

        Continuous noises are abducted by importance resampling from 2**abduction_log2 candidates
        (``last_abduction`` holds the acceptance rate = effective sample size / candidates, and the
        evidence probability); each quantile noise is drawn exactly from its posterior. Intervened
        factors take their new values; non-descendants of them keep their factual values.

        With ``unit_keys`` row i resamples the candidates and draws its quantile noises from its own
        stream (:func:`cfedit.features.unit_uniforms`), and each factual cell's candidates come from a
        stream keyed by the seed and the cell, so a row's samples do not depend on the other rows.
        """
        check_unit_keys(unit_keys, len(factual))
        g = self.graph
        fac = np.asarray(factual)
        if fac.ndim != 2 or fac.shape[1] != len(g.names):
            raise NCMError(f"factual factors must have shape [n, {len(g.names)}] (order {', '.join(g.names)})")
        fac = fac.astype(np.int64)
        for i, v in enumerate(g.names):
            if len(fac) and (fac[:, i].min() < 0 or fac[:, i].max() >= g[v].size):
                raise NCMError(f"factual values of {v!r} must be indices 0..{g[v].size - 1}")
        do_idx = g.value_indices(do)
        for k, x in do_idx.items():
            if not 0 <= x < g[k].size:
                raise NCMError(f"do({k}={x}): not a value index of {k!r} (0..{g[k].size - 1})")
        n, m = len(fac), int(n_samples)
        out = np.repeat(fac[:, None, :], m, axis=1)
        if n == 0 or m == 0:
            return out
        gen = torch.Generator().manual_seed(int(seed))
        per_unit = None if unit_keys is None else unit_uniforms(seed, unit_keys, (m, 1 + len(g.names)))
        n_cand = 2 ** self.config.abduction_log2
        uniq, inverse = np.unique(fac, axis=0, return_inverse=True)
        inverse = np.asarray(inverse).reshape(-1)
        u_rows = torch.empty(n, m, self.noise_total)
        eps = torch.empty(n, m, len(g.names), dtype=torch.float64)
        accept, p_ev = [], []
        for j, row in enumerate(uniq):
            if per_unit is not None:
                cell = int(np.ravel_multi_index(tuple(int(x) for x in row), g.shape))
                gen = torch.Generator().manual_seed(int(np.random.SeedSequence([int(seed), _CELL_STREAM, cell])
                                                        .generate_state(1, np.uint64)[0]))
            cand = torch.rand(n_cand, self.noise_total, generator=gen)
            logw = torch.zeros(n_cand, dtype=torch.float64)
            bounds = []
            for v in g.names:
                pidx = int(self._pa_index(v, [np.array([row[g.axis(p)]]) for p in self._pa[v]], 1)[0])
                logits, rot = self.mech[v].rows(self._onehots[v][pidx].expand(n_cand, -1),
                                                cand[:, self._noise_cols[v]], rot=True)
                cdf = self._cdf(logits).double()
                val = int(row[g.axis(v)])
                bounds.append((cdf[:, val], cdf[:, val + 1], rot.double()))
                logw += torch.log_softmax(logits.double(), dim=-1)[:, val]
            if not torch.isfinite(logw).any():
                labels = ", ".join(f"{v}={g[v].values[int(x)]}" for v, x in zip(g.names, row))
                raise ZeroEvidenceError(f"the factual unit ({labels}) has probability zero under the NCM")
            w = torch.softmax(logw, dim=0)
            ess = float(1.0 / (w ** 2).sum())
            accept.append(ess / n_cand)
            p_ev.append(float(torch.exp(torch.logsumexp(logw, 0)) / n_cand))
            rows = np.nonzero(inverse == j)[0]
            if per_unit is None:
                pick = torch.multinomial(w.float(), len(rows) * m, replacement=True, generator=gen).view(len(rows), m)
                r = torch.rand(len(rows), m, len(g.names), generator=gen, dtype=torch.float64)
            else:
                pick = torch.from_numpy(categorical(w.numpy(), per_unit[rows, :, 0]))
                r = torch.from_numpy(per_unit[rows, :, 1:])
            u_rows[rows] = cand[pick]
            for i, (lo, hi, rot) in enumerate(bounds):
                a, b = lo[pick], hi[pick]
                e = rot[pick] + a + (b - a) * r[:, :, i]  # uniform on the value's arc of the circle
                eps[rows, :, i] = e - torch.floor(e)
        self.last_abduction = {
            "acceptance_rate": float(np.mean(accept)), "min_acceptance_rate": float(np.min(accept)),
            "candidates": n_cand, "evidence_prob_min": float(np.min(p_ev)),
        }
        # prediction in the intervened world
        flat_u = u_rows.reshape(n * m, -1)
        flat_eps = eps.reshape(n * m, -1)
        fac_flat = np.repeat(fac, m, axis=0)
        cf = fac_flat.copy()
        changed = set(g.descendants(list(do_idx))) - set(do_idx)
        for i, v in enumerate(g.names):
            if v in do_idx:
                cf[:, i] = do_idx[v]
                continue
            if v not in changed:
                continue  # a non-descendant: same noise, same parents, so its factual value
            pa = self._pa[v]
            pvals = [cf[:, g.axis(p)] for p in pa]
            pidx = self._pa_index(v, pvals, n * m)
            logits, rot = self.mech[v].rows(self._onehots[v][torch.as_tensor(pidx)],
                                            flat_u[:, self._noise_cols[v]], rot=True)
            cdf = self._cdf(logits).double()
            e = flat_eps[:, i:i + 1] - rot.double()[:, None]
            e = e - torch.floor(e)  # the quantile noise, unrotated at the new parents
            new = (cdf[:, 1:-1] <= e).sum(1).numpy()
            same = np.all(np.stack([cf[:, g.axis(p)] == fac_flat[:, g.axis(p)] for p in pa]), axis=0) \
                if pa else np.ones(n * m, dtype=bool)
            cf[:, i] = np.where(same, fac_flat[:, i], new)  # unchanged parents: exactly the factual value
        return cf.reshape(n, m, len(g.names))

    # -- state ----------------------------------------------------------------------------------

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        config = {"family": FAMILY, "graph_hash": self.graph.structure_hash(), "seed": self.seed,
                  "fitted": self.fitted, "ncm": self.config.to_dict(),
                  "info": {k: v for k, v in self.info.items() if isinstance(v, (int, float, str, bool))}}
        arrays = {f"mech.{k}": v.detach().cpu().numpy().copy() for k, v in self.mech.state_dict().items()}
        return config, arrays

    @classmethod
    def from_state(cls, graph: CausalGraph, config: Mapping[str, Any], arrays: Mapping[str, Any]) -> NCM:
        if config.get("family", FAMILY) != FAMILY:
            raise NCMError(f"state is of family {config.get('family')!r}, not {FAMILY!r}")
        if config.get("graph_hash") not in (None, graph.structure_hash()):
            raise NCMError(f"the NCM state was trained on a different graph than {graph.name!r}")
        model = cls(graph, NCMConfig.from_dict(config.get("ncm", {})), seed=int(config.get("seed", 0)))
        sd = {k[len("mech."):]: torch.as_tensor(np.asarray(v)) for k, v in arrays.items() if k.startswith("mech.")}
        # a state saved before the rotation heads: r = 0, the comonotone coupling it was trained with
        for k, v in model.mech.state_dict().items():
            if ".rot_" in k and k not in sd and any(x.startswith(k.split(".rot_")[0] + ".") for x in sd):
                sd[k] = torch.zeros_like(v)
        try:
            model.mech.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise NCMError(f"the NCM state does not match the graph {graph.name!r}: {e}") from None
        model.fitted = bool(config.get("fitted", True))
        model.info = dict(config.get("info", {}))
        return model

    def copy(self) -> NCM:
        other = copy.copy(self)
        other.mech = copy.deepcopy(self.mech)
        other.info = dict(self.info)
        other._eval_noise = self._eval_noise
        return other


# ----------------------------------------------------------------------------------------------
# Module-level helpers
# ----------------------------------------------------------------------------------------------


def _query_prob_torch(model: NCM, spec_te: _Spec, spec_e: _Spec | None, cdfs, tau: float = 0.0,
                      rots=None) -> torch.Tensor:
    p_te = model._spec_probs(spec_te, cdfs, tau, rots).sum(1).mean()
    if spec_e is None:
        return p_te
    p_e = model._spec_probs(spec_e, cdfs, tau, rots).sum(1).mean()
    return p_te / p_e.clamp_min(1e-12)


def fit_extreme(graph: CausalGraph, pv: np.ndarray, query: Query | str, side: str = "max", seed: int = 0,
                base: NCM | None = None, config: NCMConfig | None = None, steps: int | None = None,
                progress: Any = None) -> NCM:
    """Train the NCM that maximises (``side="max"``) or minimises P(query) while fitting P(V).

    Loss ``KL(P(V) || model) -/+ lambda_t * P_model(query)``, lambda_t annealed geometrically from
    ``lambda_high`` to ``lambda_low``: early on the query term dominates and drives the noise
    couplings to the extreme; late the data term dominates and pulls the model back onto P(V),
    where the data term is flat along the models that fit and the query stays at the extreme.
    lambda is held at ``lambda_high`` for the first ``lambda_hold`` of the steps; when the result
    does not fit P(V) (TV > ``extreme_tv_tol``) it is trained again without the hold and the better
    fit is kept (``info["extreme_fit_ok"]`` says whether one fits). Starts from ``base`` (a fitted
    default model; fitted here and cached when not given), which is not modified.
    """
    if side not in ("max", "min"):
        raise NCMError(f"side must be 'max' or 'min', not {side!r}")
    t0 = time.perf_counter()
    base = base if base is not None else _cached_base(graph, pv, seed, config)
    model = base.copy()
    # training settings from ``config``; the architecture is the base model's
    cfg = base.config if config is None else replace(
        config, noise_dim=base.config.noise_dim, hidden=base.config.hidden, layers=base.config.layers,
        noise_gain=base.config.noise_gain)
    model.config = cfg
    steps = cfg.extreme_steps if steps is None else int(steps)
    q, targets, evidence = model._query_terms(query)
    spec_te = model._compile(targets + evidence)
    spec_e = model._compile(evidence) if evidence else None
    if spec_e is not None and spec_e.impossible:
        raise ZeroEvidenceError("the evidence has probability zero under any model", str(q))
    weights, gathers, entropy = model._fit_terms(pv)
    attempts = []
    for hold in dict.fromkeys((cfg.lambda_hold, 0.0)):
        m = model.copy()
        with _threads(cfg.threads):
            _train_extreme(m, replace(cfg, lambda_hold=hold), steps, side, seed, spec_te, spec_e,
                           (weights, gathers, entropy), progress)
        m._eval_noise = None
        tv = total_variation(m.joint(), pv)
        attempts.append((tv, hold, m))
        if tv <= cfg.extreme_tv_tol:
            break
    tv, hold, model = min(attempts, key=lambda a: a[0])
    value = model.prob(q)
    model.info = dict(base.info)
    model.info.update(extreme_side=side, extreme_query=str(q), extreme_value=value, extreme_tv=tv,
                      extreme_seconds=time.perf_counter() - t0, extreme_steps=steps, extreme_hold=hold,
                      extreme_attempts=len(attempts), extreme_fit_ok=tv <= cfg.extreme_tv_tol)
    return model


def _train_extreme(model: NCM, cfg: NCMConfig, steps: int, side: str, seed: int, spec_te: _Spec,
                   spec_e: _Spec | None, fit_terms, progress) -> None:
    weights, gathers, entropy = fit_terms
    sign = -1.0 if side == "max" else 1.0
    engine = torch.quasirandom.SobolEngine(model.noise_total, scramble=True,
                                           seed=seed * 1009 + (17 if side == "max" else 29))
    opt = torch.optim.Adam(model.mech.parameters(), lr=cfg.extreme_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=cfg.extreme_lr / 20)
    for step in range(steps):
        frac = max(0.0, step / max(steps - 1, 1) - cfg.lambda_hold) / (1.0 - cfg.lambda_hold)
        lam = cfg.lambda_high * (cfg.lambda_low / cfg.lambda_high) ** frac
        tau = cfg.tau_high * (cfg.tau_low / cfg.tau_high) ** frac
        u = engine.draw(2 ** cfg.extreme_batch_log2).float()
        logits, rots = model._tables(u)
        kl = model._kl(logits, weights, gathers, entropy)
        cdfs = {v: model._cdf(t) for v, t in logits.items()}
        qv = _query_prob_torch(model, spec_te, spec_e, cdfs, tau, rots)
        loss = kl + sign * lam * qv
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.mech.parameters(), 1.0)
        opt.step()
        sched.step()
        if progress is not None:
            progress(step + 1, steps, float(kl.detach()), float(qv.detach()))


@dataclass(frozen=True, kw_only=True)
class NCMBounds(Bounds):
    """The NCM's interval for a query: the values of its min and max models (``certified`` is False:
    it is what two trained models reached), with the default model's value and the training figures."""

    value: float            # the default model's value
    seconds_max: float
    seconds_min: float
    seconds_base: float
    tv_max: float
    tv_min: float
    tv_base: float


_BASE_CACHE: dict[tuple, NCM] = {}


def _cached_base(graph: CausalGraph, pv: np.ndarray, seed: int, config: NCMConfig | None,
                 progress: Callable[[str, int, int], None] | None = None) -> NCM:
    """The default model for (graph, P(V), seed, config), fitted once per process."""
    cfg = config or NCMConfig()
    key = (graph.structure_hash(), hashlib.sha256(np.ascontiguousarray(pv, dtype=np.float64).tobytes()).hexdigest(),
           int(seed), tuple(sorted(cfg.to_dict().items())))
    if key not in _BASE_CACHE:
        if len(_BASE_CACHE) > 8:
            _BASE_CACHE.clear()
        cb = None if progress is None else (lambda step, total, *_: progress("fit", step, total))
        _BASE_CACHE[key] = NCM(graph, cfg, seed=seed).fit(pv, progress=cb)
    return _BASE_CACHE[key]


def ncm_bounds(graph: CausalGraph, pv: np.ndarray, query: Query | str, seed: int = 0,
               config: NCMConfig | None = None, base: NCM | None = None,
               progress: Callable[[str, int, int], None] | None = None) -> NCMBounds:
    """Train the max and min NCMs of ``query`` and report their values as the NCM's interval.

    The default model (the starting point of both) is ``base`` or fitted once per process and
    cached, so several queries on one P(V) share it. ``seconds`` counts the two extreme trainings
    plus the default fit when it was not cached or given. ``progress(stage, step, total)`` with
    stage ``"fit"``, ``"max"`` or ``"min"`` reports training progress (e.g. for a progress bar).
    Not certified: the interval is inner (each end is attained by a model that fits P(V) up to
    ``tv_max``/``tv_min``), reached by local optimisation.
    """
    t0 = time.perf_counter()
    if base is None:
        base = _cached_base(graph, pv, seed, config, progress)
    t_base = time.perf_counter() - t0

    def stage(name: str):
        return None if progress is None else (lambda step, total, *_: progress(name, step, total))

    hi = fit_extreme(graph, pv, query, "max", seed=seed, base=base, config=config, progress=stage("max"))
    lo = fit_extreme(graph, pv, query, "min", seed=seed, base=base, config=config, progress=stage("min"))
    q = parse_query(query) if isinstance(query, str) else query
    return NCMBounds(
        lower=float(lo.info["extreme_value"]), upper=float(hi.info["extreme_value"]), method="ncm",
        certified=False, seconds=time.perf_counter() - t0, query=str(q), value=base.prob(q),
        seconds_max=float(hi.info["extreme_seconds"]), seconds_min=float(lo.info["extreme_seconds"]),
        seconds_base=t_base, tv_max=float(hi.info["extreme_tv"]), tv_min=float(lo.info["extreme_tv"]),
        tv_base=float(base.info.get("fit_tv", float("nan"))),
    )
