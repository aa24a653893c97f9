"""``cfedit eval``, the run: how ctf-consistent are editors, measured on their images.

For every query ``P(Y_{X=x}=y | evidence)`` of a graph, :func:`evaluate` takes test units whose
factual factors match the evidence, edits each with do(X=x) K times with every model, reads the
counterfactual factors off the *generated images* with an independent reader
(:mod:`cfedit.eval.reader`), and estimates the query with a 95 % interval. It sets the estimate next
to the optimal bounds [l, u] (from :func:`cfedit.data.observational_pv`) and the true value where the
data is a known SCM, and gives a verdict (``metrics.verdict``: inside when the interval meets
[l, u], else outside by the gap between them).

It also measures each model's edits in general (on test units, one intervention per factor with a
random new value per unit): effectiveness, preservation of non-descendants, agreement of
descendants with the model's own counterfactual factors, composition (repeated null edits),
reversibility (edit and edit back), pixel error to the ground-truth counterfactual image where the
data has one (:func:`cfedit.data.ground_truth`), and realism as Fréchet / kernel distances in the
penultimate-layer feature space of the reader's classifier. The result is an
:class:`~cfedit.eval.report.EvalReport`.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cfedit.causal.graph import CausalGraph
from cfedit.causal.pv import cells
from cfedit.causal.query import Query, QueryError, parse_query
import cfedit.eval.metrics as M
from cfedit.eval.reader import Reader, _accuracy, load_or_train_reader
from cfedit.eval.report import (REALISM_NOTE, EvalReport, ModelMetrics, QueryEstimate, QueryReport, ValueEffect,
                                VariableMetrics)
from cfedit.progress import Progress

COMPOSITION_CYCLES = (1, 10)
#: Cells per side of the grid of ``by_value.change_grid``: the first of these that divides the image side.
CHANGE_GRID = (8, 7, 4, 2, 1)


@dataclass
class _Edits:
    factual: np.ndarray  # [m, k]
    counterfactual: np.ndarray  # [m, K, k]
    images: np.ndarray  # [m, K, C, S, S]
    ok: np.ndarray  # [n] bool: which of the input units were edited


def _edit(model, images: np.ndarray, factual: np.ndarray, do: Mapping[str, Any], k: int, seed: int) -> _Edits:
    """model.edit on all units; when some factual units cannot be edited (probability zero under the
    model), edit the others group by group and leave those out."""
    n = len(images)
    try:
        r = model.edit(images, do, factual=factual, n_samples=k, seed=seed)
        return _Edits(r.factual, r.counterfactual, r.images, np.ones(n, dtype=bool))
    except ValueError:
        pass
    ok = np.zeros(n, dtype=bool)
    cf = np.zeros((n, k, factual.shape[1]), dtype=np.int64)
    imgs = np.zeros((n, k, *images.shape[1:]), dtype=np.uint8)
    for r_i, _, idx in cells(factual):
        try:
            r = model.edit(images[idx], do, factual=factual[idx], n_samples=k, seed=seed + 7919 * (r_i + 1))
        except ValueError:
            continue
        ok[idx] = True
        cf[idx], imgs[idx] = r.counterfactual, r.images
    return _Edits(factual[ok], cf[ok], imgs[ok], ok)


def _factual_of(model, images: np.ndarray, labels: np.ndarray, mode: str) -> np.ndarray:
    return np.asarray(labels, dtype=np.int64) if mode == "labels" else np.asarray(model.read_factors(images))


def _target_hits(graph: CausalGraph, q: Query, v: np.ndarray) -> np.ndarray:
    hit = np.ones(v.shape[:-1], dtype=bool)
    for t in q.targets:
        hit &= v[..., graph.axis(t.variable)] == graph[t.variable].index(t.value)
    return hit


def _evidence_mask(graph: CausalGraph, q: Query, factors: np.ndarray) -> np.ndarray:
    mask = np.ones(len(factors), dtype=bool)
    for t in q.evidence:
        mask &= factors[:, graph.axis(t.variable)] == graph[t.variable].index(t.value)
    return mask


def _unsupported(q: Query) -> str | None:
    if not q.evidence_is_factual:
        return "counterfactual evidence is not measurable on test units (eval needs factual evidence)"
    worlds = {t.interventions for t in q.targets}
    if () in worlds:
        return "a factual target term; eval measures counterfactual targets"
    if len(worlds) > 1:
        return "targets in several counterfactual worlds (a joint multi-world edit is not available)"
    return None


def _as_queries(graph: CausalGraph, queries) -> dict[str, str]:
    if queries is None:
        return dict(graph.queries)
    if isinstance(queries, Mapping):
        return {str(k): str(v) for k, v in queries.items()}
    return {f"query{i + 1}": str(q) for i, q in enumerate(queries)}


def _nanmean(xs) -> float | None:
    vals = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(vals)) if vals else None


def _opt(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def evaluate(graph: CausalGraph, models: Mapping[str, Any], n: int = 2000, samples: int = 4,
             queries: Mapping[str, str] | Sequence[str] | None = None, seed: int = 0,
             reader: Reader | None = None, progress: Progress | None = None, *, pool: int = 10000,
             pool_seed: int = 0, n_metrics: int = 500, factual: str = "labels",
             data: str | Path | None = None, root: str | Path | None = None, examples: int = 6,
             general: bool = True, margin: float = 0.01) -> EvalReport:
    """Evaluate ``models`` (name -> :class:`cfedit.editor.fit.ANCM`) on ``graph``'s queries.

    - ``queries``: name -> text (or a list of texts); default: the graph's named queries.
    - ``n``: units per query, the first ``n`` of the ``pool`` test units (drawn with ``pool_seed``)
      matching its evidence — all of them when fewer match (``QueryReport.n_used``/``n_matching``);
      raise ``pool`` for rare evidence. ``samples``: edits per unit (K).
    - ``factual``: ``"labels"`` gives each model the test units' true factual factors (the query's
      evidence holds exactly); ``"labeller"`` lets each model read them with its own labeller.
    - ``n_metrics``: units for the general metrics (and realism); ``general=False`` skips them.
    - ``margin``: a gap between the estimate's interval and the bounds up to this size still counts
      as inside (:func:`cfedit.eval.metrics.verdict`); 0 for the strict reading.
    - ``reader``: the independent reader (default: :func:`load_or_train_reader`, cached per graph).
    - ``progress(stage, step, total, info)``: stages ``reader``, ``queries``, ``metrics``.
    """
    from cfedit.causal.scm import scm_for_graph
    from cfedit.data import dataset_for_graph, ground_truth, observational_pv

    t0 = time.perf_counter()
    if factual not in ("labels", "labeller"):
        raise ValueError(f"factual must be 'labels' or 'labeller', not {factual!r}")
    if not models:
        raise ValueError("no model to evaluate")
    if n < 1 or samples < 1:
        raise ValueError("n and samples must be at least 1")
    report = progress or (lambda *a: None)
    for name, m in models.items():
        if m.graph.structure_hash() != graph.structure_hash():
            raise ValueError(f"model {name!r} was trained on graph {m.graph.name!r}, not {graph.name!r}")
    # parse every query first: a bad one fails here (QueryError), before any training or editing
    parsed = {name: parse_query(text).validate(graph) for name, text in _as_queries(graph, queries).items()}
    reader = reader or load_or_train_reader(graph, data=data, root=root, progress=progress)
    for name, m in models.items():
        reader.check_independent(m, name)

    ds = dataset_for_graph(graph, "test", pool, pool_seed, data, root)
    # a user's folder (``data``) has its own P(V), not the built-in SCM's
    observed = observational_pv(graph, data=data, root=root, fitted=next(iter(models.values())).pv)
    run = _Run(graph, models, reader, ds, np.asarray(ds.images), np.asarray(ds.factors, dtype=np.int64),
               scm_for_graph(graph) if observed.exact else None, observed.pv,
               ground_truth(graph, data).exact_counterfactuals, samples, seed, factual, margin, examples)
    bounds_source = (f"true P(V) of the {scm_name_of(graph)} SCM" if observed.exact
                     else f"P(V) model {next(iter(models))!r} was fitted to")
    read_real = reader.read(run.images) if parsed else None

    query_reports: list[QueryReport] = []
    total_q = len(parsed) * len(models)
    for qi, (qname, q) in enumerate(parsed.items()):
        def step(info: dict, done: int = len(models), _base=len(query_reports) * len(models)) -> None:
            report("queries", _base + done, total_q, {"query": qname, **info})
        query_reports.append(_query_report(run, qi, qname, q, n, read_real, step))

    metrics: list[ModelMetrics] = []
    realism: dict = {"features": REALISM_NOTE, "dim": reader.info.feature_dim if reader.info else None}
    if general:
        metrics, realism = _general_metrics(run, n_metrics, report, realism)
    return EvalReport(
        graph=graph.name, models=list(models), families={k: m.features.family for k, m in models.items()},
        n=n, samples=samples, seed=seed, pool=len(run.labels), factual=factual, margin=margin,
        bounds_source=bounds_source,
        truth_source=(f"the {scm_name_of(graph)} SCM" if run.scm is not None else None),
        reader=reader.info, queries=query_reports, metrics=metrics, realism=realism,
        seconds=round(time.perf_counter() - t0, 2))


@dataclass
class _Run:
    """What one evaluation works on: the models, the reader, the test pool and the reference P(V)."""

    graph: CausalGraph
    models: Mapping[str, Any]
    reader: Reader
    ds: Any
    images: np.ndarray  # the test pool, uint8 [n, C, S, S]
    labels: np.ndarray  # its factors [n, k]
    scm: Any  # the known SCM of the data (true values), or None
    pv_ref: np.ndarray  # the P(V) of the bounds (cfedit.data.observational_pv)
    exact_cf: tuple[str, ...]  # interventions with ground-truth counterfactual images
    samples: int
    seed: int
    factual: str
    margin: float
    examples: int
    bounds_cache: dict = field(default_factory=dict)

    def bounds_of(self, pv: np.ndarray, q: Query):
        """The bounds of ``q`` under ``pv`` (cached), or the exception that says why there are none."""
        from cfedit.causal.bounds import BoundsError, compute_bounds

        key = (hashlib.sha1(np.ascontiguousarray(pv, dtype=np.float64).tobytes()).hexdigest(), str(q))
        if key not in self.bounds_cache:
            try:
                self.bounds_cache[key] = compute_bounds(self.graph, pv, q)
            except (BoundsError, QueryError, ValueError) as e:
                self.bounds_cache[key] = e
        return self.bounds_cache[key]


def _query_report(run: _Run, qi: int, qname: str, q: Query, n: int, read_real: np.ndarray,
                  step: Callable[..., None]) -> QueryReport:
    """One query: its bounds, true value and reader rates, and each model's estimate on its units."""
    graph, labels, images = run.graph, run.labels, run.images
    why = _unsupported(q)
    do = dict(q.targets[0].interventions) if not why else {}
    qr = QueryReport(qname, str(q), do, None, None, None, None, None, 0, 0, None, None)
    if why:
        qr.skipped = why
        step({"skipped": why})
        return qr
    b = run.bounds_of(run.pv_ref, q)
    if isinstance(b, Exception):
        qr.note = f"no bounds: {b}"
    else:
        qr.lower, qr.upper, qr.method, qr.certified = float(b.lower), float(b.upper), b.method, bool(b.certified)
    if run.scm is not None:
        try:
            qr.truth = float(run.scm.prob(q))
        except (QueryError, ValueError) as e:
            qr.note = (qr.note + "; " if qr.note else "") + f"no true value: {e}"
    _reader_rates(qr, _target_hits(graph, q, labels), _target_hits(graph, q, read_real))
    match = np.flatnonzero(_evidence_mask(graph, q, labels))
    qr.n_matching = len(match)
    idx = match[:n]
    qr.n_used = len(idx)
    if len(idx) == 0:
        qr.skipped = f"no test unit among {len(labels)} matches the evidence (draw a larger pool)"
        step({"skipped": qr.skipped})
        return qr
    ex = idx[:run.examples]
    qr.examples = {"factual": images[ex], "models": {}}
    if run.exact_cf:
        qr.examples["truth"] = run.ds.counterfactual(ex, do)[1]
    for i, (name, m) in enumerate(run.models.items()):
        result, shown = _model_estimate(run, qr, q, name, m, idx, len(ex), run.seed + 101 * qi)
        qr.results.append(result)
        qr.examples["models"][name] = shown
        step({"model": name}, done=i + 1)
    return qr


def _reader_rates(qr: QueryReport, truth_e: np.ndarray, read_e: np.ndarray) -> None:
    """The reader's TPR / FPR of the target event on real test images, and the bounds as it shows them."""
    qr.reader_tpr = _opt(float(read_e[truth_e].mean()) if truth_e.any() else float("nan"))
    qr.reader_fpr = _opt(float(read_e[~truth_e].mean()) if (~truth_e).any() else float("nan"))
    if qr.lower is not None:
        tpr = 1.0 if qr.reader_tpr is None else qr.reader_tpr
        fpr = 0.0 if qr.reader_fpr is None else qr.reader_fpr
        if tpr > fpr:
            qr.reader_lower, qr.reader_upper = fpr + (tpr - fpr) * qr.lower, fpr + (tpr - fpr) * qr.upper


def _model_estimate(run: _Run, qr: QueryReport, q: Query, name: str, m, idx: np.ndarray, n_ex: int,
                    seed: int) -> tuple[QueryEstimate, np.ndarray]:
    """One model's estimate of a query on units ``idx``, and its first edit of the first ``n_ex`` units."""
    graph, images, samples, margin = run.graph, run.images, run.samples, run.margin
    v = _factual_of(m, images[idx], run.labels[idx], run.factual)
    e = _edit(m, images[idx], v, qr.do, samples, seed)
    if e.ok.any():
        k_read = run.reader.read(e.images.reshape(-1, *images.shape[1:])).reshape(*e.counterfactual.shape)
        est = M.estimate_proportion(_target_hits(graph, q, k_read))
        feat_value = float(_target_hits(graph, q, e.counterfactual).mean())
    else:
        est = M.Estimate(float("nan"), 0.0, 1.0, 0, samples, 0.0)
        feat_value = float("nan")
    ver = ver_r = None
    if qr.lower is not None and e.ok.any():
        ver = M.verdict(est.lower, est.upper, qr.lower, qr.upper, est.value, margin)
        if qr.reader_lower is not None:
            ver_r = M.verdict(est.lower, est.upper, qr.reader_lower, qr.reader_upper, est.value, margin)
    try:
        model_value = float(m.features.prob(q))
    except (QueryError, ValueError, RuntimeError, NotImplementedError, AttributeError):
        model_value = None
    own = run.bounds_of(m.pv, q)
    own_l, own_u = (None, None) if isinstance(own, Exception) else (float(own.lower), float(own.upper))
    note = None if e.ok.all() else (f"{int((~e.ok).sum())} of {len(idx)} units have factual factors of "
                                    "probability zero under the model and were not edited")
    result = QueryEstimate(name, est.value, est.lower, est.upper, est.n_units, est.n_samples, est.n_eff, ver, ver_r,
                           feat_value, model_value, own_l, own_u, int((~e.ok).sum()), note)
    ok_ex = e.ok[:n_ex]
    pos = np.cumsum(e.ok) - 1
    shown = np.zeros((n_ex, *images.shape[1:]), dtype=np.uint8)
    shown[ok_ex] = e.images[pos[:n_ex][ok_ex], 0]
    return result, shown


def scm_name_of(graph: CausalGraph) -> str:
    from cfedit.causal.scm import scm_name

    return scm_name(graph) or graph.name


def _kept_ceiling(read_pool: np.ndarray, labels: np.ndarray, j: int, z: int, factual: np.ndarray,
                  new: np.ndarray, size: int) -> float | None:
    """1 - the mean, over the edited units, of the total variation between the reader's readings of
    factor z on real images labelled (x_j = old, z = g) and on those labelled (x_j = new, z = g): an edit
    whose results are read like real images with the new value keeps z no more often, since two readings
    with those distributions disagree at least that often (an edit held to its input's reading, as a
    held to its input's reading can exceed it). None when no unit has real images on both sides."""
    total, weight = 0.0, 0
    strata, counts = np.unique(np.stack([factual[:, j], new, factual[:, z]], 1), axis=0, return_counts=True)
    for (old, to, g), count in zip(strata, counts):
        a = read_pool[(labels[:, j] == old) & (labels[:, z] == g), z]
        b = read_pool[(labels[:, j] == to) & (labels[:, z] == g), z]
        if not len(a) or not len(b):
            continue
        tv = 0.5 * np.abs(np.bincount(a, minlength=size) / len(a) - np.bincount(b, minlength=size) / len(b)).sum()
        total += count * tv
        weight += count
    return 1.0 - total / weight if weight else None


def _shift_one_pixel(images: np.ndarray) -> np.ndarray:
    """Images [n, C, H, W] moved one pixel to the right, the left column repeated."""
    return np.concatenate([images[..., :1], images[..., :-1]], axis=-1)


@dataclass
class _Pool:
    """The units of the general metrics and what the reader makes of the whole test pool."""

    units: np.ndarray  # the first n_m units: the edited ones
    ref: np.ndarray  # the next n_m (else the same): the reference set of FID/KID
    x0: np.ndarray  # their images
    v_true: np.ndarray  # their factors
    new_values: dict[str, np.ndarray]  # per factor: a random new value per unit
    f_pool: np.ndarray  # reader features of the whole pool
    read_pool: np.ndarray  # reader readings of the whole pool
    real_rate: dict  # (factor axis, value) -> how often real images with that value are read as it


def _general_metrics(run: _Run, n_metrics: int, report, realism) -> tuple[list[ModelMetrics], dict]:
    graph, reader, images, labels = run.graph, run.reader, run.images, run.labels
    n_all = len(labels)
    n_m = int(min(n_metrics, n_all))
    units = np.arange(n_m)
    ref = np.arange(n_m, min(2 * n_m, n_all)) if n_all >= 2 * n_m else units
    x0, v_true = images[units], labels[units]
    rng = np.random.default_rng([run.seed, 1])
    new_values = {}
    for j, name in enumerate(graph.names):
        s = graph[name].size
        new_values[name] = (v_true[:, j] + rng.integers(1, s, size=n_m)) % s if s > 1 else v_true[:, j].copy()
    f_pool = reader.features(images)
    f_ref, f_real = f_pool[ref], f_pool[units]
    read_pool = reader.read(images)
    read_x0 = read_pool[units]
    real_rate = {(j, val): _opt(float((read_pool[labels[:, j] == val, j] == val).mean()))
                 if (labels[:, j] == val).any() else None
                 for j, name in enumerate(graph.names) for val in range(graph[name].size)}
    pool = _Pool(units, ref, x0, v_true, new_values, f_pool, read_pool, real_rate)
    realism = {**realism, "n": n_m, "reference_units": len(ref),
               "fid_floor": None if ref is units else M.frechet_distance(f_ref, f_real),
               "kid_floor": None if ref is units else M.kernel_distance(f_ref, f_real),
               # the ceiling of "kept": how often the reader reads the same value after a change that
               # keeps every factor (the input moved by one pixel, edge repeated)
               "reader_shift_kept": {n: float((r == read_x0[:, j]).mean()) for j, (n, r) in
                                     enumerate(zip(graph.names, reader.read(_shift_one_pixel(x0)).T))}}
    total = len(run.models) * (len(graph.names) + 1)
    step = 0
    out = []
    for mname, m in run.models.items():
        v = _factual_of(m, x0, v_true, run.factual)
        per_var: list[VariableMetrics] = []
        mix = np.zeros_like(x0)  # unit i shows its edit of factor (i mod k), for realism
        mix_ok = np.zeros(n_m, dtype=bool)
        for j, xname in enumerate(graph.names):
            vm, cf_i, ok = _variable_metrics(run, pool, m, v, j, xname)
            per_var.append(vm)
            pick = ok & (np.arange(n_m) % len(graph.names) == j)
            mix[pick], mix_ok[pick] = cf_i[pick], True
            step += 1
            report("metrics", step, total, {"model": mname, "variable": xname})
        # composition: repeated null edits through the model's editor (uint8 between cycles)
        xs, x = [], x0
        for _ in range(max(COMPOSITION_CYCLES)):
            x = m.transform(x, v, v)
            xs.append(x)
        comp = M.composition(x0, xs)
        f_cf = reader.features(mix[mix_ok]) if mix_ok.sum() >= 2 else None
        f_null = reader.features(xs[0])
        lab_pred = np.asarray(m.labeller.predict(x0)) if getattr(m, "labeller", None) is not None else None
        out.append(ModelMetrics(
            model=mname, family=m.features.family, n_units=n_m,
            effectiveness=_nanmean(vm.effectiveness for vm in per_var),
            preservation=_nanmean(vm.preservation for vm in per_var),
            agreement=_nanmean(vm.agreement for vm in per_var),
            composition={str(t): comp[t - 1] for t in COMPOSITION_CYCLES},
            reconstruction=M.mae(x0, m.transform(x0, v, v, residual=False)),
            reversibility=_nanmean(vm.reversibility for vm in per_var),
            gt_mae=_nanmean(vm.gt_mae for vm in per_var),
            fid=M.frechet_distance(f_ref, f_cf) if f_cf is not None else float("nan"),
            kid=M.kernel_distance(f_ref, f_cf) if f_cf is not None else float("nan"),
            fid_null=M.frechet_distance(f_ref, f_null), kid_null=M.kernel_distance(f_ref, f_null),
            labeller_accuracy=_accuracy(lab_pred, v_true, graph) if lab_pred is not None else {},
            variables=per_var))
        step += 1
        report("metrics", step, total, {"model": mname, "variable": "composition"})
    return out, realism


def _variable_metrics(run: _Run, pool: _Pool, m, v: np.ndarray, j: int,
                      xname: str) -> tuple[VariableMetrics, np.ndarray, np.ndarray]:
    """One model's edits do(X = x′) of factor ``xname`` (axis ``j``) with each unit's random new value:
    its metrics, the edited images and which units were edited."""
    graph, reader, labels = run.graph, run.reader, run.labels
    x0, v_true, new = pool.x0, pool.v_true, pool.new_values[xname]
    n_m = len(x0)
    desc = [d for d in graph.descendants([xname]) if d != xname]
    nondesc = [graph.axis(z) for z in graph.names if z != xname and z not in desc]
    cf_f = np.zeros((n_m, len(graph.names)), dtype=np.int64)
    cf_i = np.zeros_like(x0)
    ok = np.zeros(n_m, dtype=bool)
    gt_i = np.zeros_like(x0) if xname in run.exact_cf else None
    gt_f = np.zeros_like(cf_f)
    for val in np.unique(new):
        g_idx = np.flatnonzero(new == val)
        e = _edit(m, x0[g_idx], v[g_idx], {xname: int(val)}, 1, run.seed + 31 * j + int(val))
        done = g_idx[e.ok]
        ok[done] = True
        cf_f[done], cf_i[done] = e.counterfactual[:, 0], e.images[:, 0]
        if gt_i is not None:
            gt_f[g_idx], gt_i[g_idx] = run.ds.counterfactual(pool.units[g_idx], {xname: int(val)})
    read = reader.read(cf_i[ok])
    back = m.transform(cf_i[ok], cf_f[ok], v[ok])
    f_edit = reader.features(cf_i[ok]) if ok.any() else None
    by_value = {graph[xname].values[int(val)]: _value_effect(pool, j, int(val), new[ok] == val, read, f_edit,
                                                            x0[ok], cf_i[ok], ok, labels)
                for val in np.unique(new[ok])}
    read_x0 = pool.read_pool[pool.units]
    kept = {graph.names[z]: float((read[:, z] == read_x0[ok][:, z]).mean()) for z in nondesc} if ok.any() else {}
    ceiling = {graph.names[z]: c for z in nondesc
               if (c := _kept_ceiling(pool.read_pool, labels, j, z, v_true[ok], new[ok],
                                      graph[graph.names[z]].size)) is not None}
    vm = VariableMetrics(
        variable=xname, n_units=int(ok.sum()),
        effectiveness=M.effectiveness(read, {j: new[ok]}),
        preservation=_opt(M.preservation(read, v_true[ok], nondesc)),
        agreement=_opt(M.agreement(read, cf_f[ok], [graph.axis(d) for d in desc])),
        reversibility=M.reversibility(x0[ok], back), n_skipped=int((~ok).sum()),
        by_value=by_value, kept=kept, kept_ceiling=ceiling)
    if gt_i is not None and ok.any():
        vm.gt_mae = M.mae(cf_i[ok], gt_i[ok])
        same = ok & (cf_f == gt_f).all(1)
        vm.gt_factor_match = float(same[ok].mean())
        vm.gt_mae_same_factors = M.mae(cf_i[same], gt_i[same]) if same.any() else None
    return vm, cf_i, ok


def _value_effect(pool: _Pool, j: int, val: int, sel: np.ndarray, read: np.ndarray, f_edit, x_in: np.ndarray,
                  x_out: np.ndarray, ok: np.ndarray, labels: np.ndarray) -> ValueEffect:
    """Edits to one new value of factor ``j`` (the edited units ``sel``): effectiveness against the real
    rate, realism toward real images of that value, and where the edits change the image."""
    eff = float((read[sel, j] == val).mean())
    rr = pool.real_rate[(j, val)]
    ve = ValueEffect(int(sel.sum()), eff, rr, eff / rr if rr else None)
    f_target = pool.f_pool[labels[:, j] == val]
    ve.n_reference = len(f_target)
    if len(f_target) >= 2 and sel.sum() >= 2:
        ve.fid, ve.kid = M.frechet_distance(f_target, f_edit[sel]), M.kernel_distance(f_target, f_edit[sel])
        f_in = pool.f_pool[pool.units][ok][sel]
        ve.fid_input, ve.kid_input = M.frechet_distance(f_target, f_in), M.kernel_distance(f_target, f_in)
    ve.change_map = M.change_map(x_in[sel], x_out[sel])
    ve.change = float(ve.change_map.mean())
    ve.change_grid = M.pooled_shares(ve.change_map, next(c for c in CHANGE_GRID if ve.change_map.shape[0] % c == 0))
    return ve
