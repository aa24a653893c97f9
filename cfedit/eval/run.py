"""``cfedit eval``, the library side: how ctf-consistent are editors, measured on their images.

For every query ``P(Y_{X=x}=y | evidence)`` of a graph, :func:`evaluate` takes test units whose
factual factors match the evidence, edits each with do(X=x) K times with every model, reads the
counterfactual factors off the *generated images* with an independent :class:`Reader`, and estimates
the query with a 95 % interval. It sets the estimate next to the optimal bounds [l, u] (from the true
P(V) when the data is a known SCM) and the true value, and gives a verdict (``metrics.verdict``:
inside when the interval meets [l, u], else outside by the gap between them).

It also measures each model's edits in general (on test units, one intervention per factor with a
random new value per unit): effectiveness, preservation of non-descendants, agreement of
descendants with the model's own counterfactual factors, composition (repeated null edits),
reversibility (edit and edit back), pixel error to the ground-truth counterfactual image where one
exists (Colored MNIST, do(color) and do(bar): the handwriting exemplar is kept), and realism as
Fréchet / kernel distances in the penultimate-layer feature space of the reader's classifier.

The reader is never a model's own labeller: pixel oracles where the pixels decide a factor exactly
(color and bar on Colored MNIST) and a classifier trained separately (other seed, other data units
and order, another width) for the rest; it is cached per graph (:func:`load_or_train_reader`).

Baselines reuse a checkpoint's image mechanism and labeller with another feature model
(:func:`with_features`), so canonical / NCM checkpoints are compared with ``none``,
``conditional`` and ``markovian`` without retraining any image model.

Outputs: :class:`EvalReport` (typed), :func:`report_to_json`, :func:`render_tables` (rich),
:func:`write_chart` and :func:`write_grid` (PNG, drawn with PIL), :func:`write_outputs` (all of them).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cfedit.causal.pv import cells
from cfedit.eval import metrics as M
from cfedit.causal.graph import CausalGraph
from cfedit.causal.query import Query, QueryError, parse_query

Progress = Callable[[str, int, int, dict], None]  # (stage, step, total, info), as in cfedit.editor.fit

COMPOSITION_CYCLES = (1, 10)
#: Cells per side of the grid of ``by_value.change_grid``: the first of these that divides the image side.
CHANGE_GRID = (8, 7, 4, 2, 1)
REALISM_NOTE = ("FID/KID computed in the penultimate-layer feature space of the independent reader's "
                "classifier (no Inception network, nothing downloaded); comparable between models of one "
                "report, not with published FIDs. Reference: real test images; 'floor' = a second set of "
                "real test images of the same size.")


# ==============================================================================================
# The independent reader
# ==============================================================================================

#: Defaults of the reader's classifier: another hidden width and seed than the models' labellers
#: (32/128, seed 0), its own BarMNIST units (the training split drawn with this seed), trained longer
#: (digit accuracy about 0.986 on Colored MNIST; about a minute on one CPU thread, then cached).
READER_DEFAULTS = {"n": 40000, "epochs": 6, "seed": 7919, "width": 32, "hidden": 160, "n_test": 2000}
#: Reader options besides those (a graph file's ``reader:`` recipe may set any of them): ``mirror``
#: reads each image and its left-right mirror and averages the probabilities (faces, never digits),
#: plus the classifier's training options (:data:`cfedit.image.train.LABELLER_DEFAULTS`: flip, shift...).
READER_EXTRA = ("mirror",)
READER_KIND = "cfedit-reader/1"


@dataclass
class ReaderInfo:
    """What the reader is, for the report: which factors the pixel oracles read, the classifier, how it
    was trained, its accuracy on held-out real test images (``test_accuracy``: the reader as used,
    oracles included; ``classifier_accuracy``: the classifier alone), where it came from."""

    oracle: list[str]
    classifier: dict
    train: dict
    test_accuracy: dict[str, float]
    classifier_accuracy: dict[str, float]
    feature_dim: int
    source: str  # "trained", "cache" or "file"
    path: str | None
    seconds: float

    def describe(self) -> str:
        cls = [n for n in self.test_accuracy if n not in self.oracle]
        parts = []
        if self.oracle:
            parts.append(f"pixel oracles for {', '.join(self.oracle)}")
        if cls:
            mirror = ", mirror-averaged" if self.train.get("mirror") else ""
            parts.append(f"classifier (Labeller width {self.classifier.get('width')}, hidden "
                         f"{self.classifier.get('hidden')}, seed {self.train.get('seed')}, "
                         f"{self.train.get('n')} images, {self.train.get('epochs')} epochs{mirror}) "
                         f"for {', '.join(cls)}")
        acc = ", ".join(f"{k} {v:.3f}" for k, v in self.test_accuracy.items())
        return f"{'; '.join(parts)} — test accuracy {acc}"


class Reader:
    """Reads factors off images independently of any model: pixel oracles for ``oracle`` factors, the
    separately trained ``classifier`` (a :class:`cfedit.image.Labeller`) for the others; its
    penultimate layer (the input of the heads) is the feature space of FID/KID. With ``mirror`` the
    classifier reads each image and its left-right mirror and averages the probabilities (for faces:
    fewer readings flip on a borderline face; FID/KID features stay those of the image itself)."""

    def __init__(self, graph: CausalGraph, classifier, oracle: Sequence[str] = (), info: ReaderInfo | None = None,
                 mirror: bool = False):
        self.graph = graph
        self.classifier = classifier.eval()
        self.oracle = tuple(o for o in oracle if o in graph)
        self.info = info
        self.mirror = bool(mirror)

    def read(self, images) -> np.ndarray:
        """Factor value indices int64 [n, k] of uint8 images [n, C, S, S]."""
        from cfedit.data import oracle_factors

        images = np.asarray(images)
        if self.mirror:
            both = zip(self.classifier.predict_proba(images),
                       self.classifier.predict_proba(np.ascontiguousarray(images[..., ::-1])))
            v = np.stack([np.asarray(a + b).argmax(1) for a, b in both], 1).astype(np.int64)
        else:
            v = np.asarray(self.classifier.predict(images), dtype=np.int64)
        if self.oracle and len(images):
            for name, val in oracle_factors(images, self.graph).items():
                if name in self.oracle:
                    v[:, self.graph.axis(name)] = np.asarray(val)
        return v

    def features(self, images, batch_size: int = 1024) -> np.ndarray:
        """Penultimate-layer features float64 [n, d] of the classifier (the input of its heads)."""
        captured: list = []
        head = self.classifier.heads[0]
        handle = head.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach().float().cpu()))
        try:
            self.classifier.predict(np.asarray(images), batch_size=batch_size)
        finally:
            handle.remove()
        if not captured:
            return np.zeros((0, head.in_features))
        import torch

        return torch.cat(captured).numpy().astype(np.float64)

    def check_independent(self, model, name: str = "model") -> None:
        """Refuse to measure a model with its own labeller (the same object or the same weights)."""
        lab = getattr(model, "labeller", None)
        if lab is not None:
            self._check_not(lab, f"{name}'s own labeller")

    def _check_not(self, lab, what: str) -> None:
        if lab is self.classifier:
            raise ValueError(f"the reader's classifier is {what}; eval needs an independent reader")
        try:
            same_cfg = lab.config() == self.classifier.config()
        except AttributeError:
            same_cfg = False
        if same_cfg:
            a, b = lab.state_dict(), self.classifier.state_dict()
            if a.keys() == b.keys() and all(a[k].shape == b[k].shape and bool((a[k] == b[k]).all()) for k in a):
                raise ValueError(f"the reader's classifier has the same weights as {what}; "
                                 "eval needs an independently trained reader")


def _oracle_names(graph: CausalGraph, oracle: bool | None) -> tuple[str, ...]:
    """The factors pixel oracles read: those the graph's data decides exactly, unless ``oracle`` is False
    (None: automatic; True: on wherever the data has them)."""
    from cfedit.data import ground_truth

    return ground_truth(graph).oracle_factors if oracle is not False else ()


def _accuracy(pred: np.ndarray, true: np.ndarray, graph: CausalGraph) -> dict[str, float]:
    return {n: round(float((pred[:, j] == true[:, j]).mean()), 6) for j, n in enumerate(graph.names)}


def train_reader(graph: CausalGraph, n: int = READER_DEFAULTS["n"], epochs: int = READER_DEFAULTS["epochs"],
                 seed: int = READER_DEFAULTS["seed"], data: str | Path | None = None, root: str | Path | None = None,
                 device: str = "cpu", progress: Progress | None = None, n_test: int = READER_DEFAULTS["n_test"],
                 oracle: bool | None = None, width: int = READER_DEFAULTS["width"],
                 hidden: int = READER_DEFAULTS["hidden"], mirror: bool = False, **labeller_options) -> Reader:
    """Train the independent reader of a graph: a classifier on ``n`` training-split images drawn with
    ``seed`` (other units and another order than a model's fit), plus pixel oracles (``oracle``:
    None = automatic, on for Colored-MNIST graphs); ``mirror``: see :class:`Reader`. Its accuracy on
    ``n_test`` real test images goes into ``reader.info``."""
    from cfedit.data import dataset_for_graph
    from cfedit.image import train_labeller

    t0 = time.perf_counter()
    train = dataset_for_graph(graph, "train", n, seed, data, root)
    report = progress or (lambda *a: None)
    clf, _ = train_labeller(train, graph, epochs=epochs, device=device, seed=seed, width=width, hidden=hidden,
                            progress=lambda s, t, m: report("reader", s, t, m), **labeller_options)
    clf = clf.to("cpu").eval()
    reader = Reader(graph, clf, _oracle_names(graph, oracle), mirror=mirror)
    test = dataset_for_graph(graph, "test", n_test, seed + 1, data, root)
    cfg = {"n": len(train), "epochs": epochs, "seed": seed, "data": str(data) if data else (graph.data or None),
           "options": dict(labeller_options), **({"mirror": True} if mirror else {})}
    reader.info = ReaderInfo(
        oracle=list(reader.oracle), classifier=clf.config(), train=cfg,
        test_accuracy=_accuracy(reader.read(test.images), test.factors, graph),
        classifier_accuracy=_accuracy(np.asarray(clf.predict(test.images)), test.factors, graph),
        feature_dim=int(clf.heads[0].in_features), source="trained", path=None,
        seconds=round(time.perf_counter() - t0, 2))
    return reader


def save_reader(reader: Reader, path: str | Path) -> Path:
    """Write a reader as a safetensors checkpoint (graph, classifier config, accuracy; atomic)."""
    from cfedit.checkpoint import save_checkpoint

    info = reader.info
    tensors = {f"classifier.{k}": v for k, v in reader.classifier.state_dict().items()}
    config = {"kind": READER_KIND, "classifier": reader.classifier.config(), "oracle": list(reader.oracle),
              "mirror": reader.mirror}
    extra = {} if info is None else {"train": info.train, "test_accuracy": info.test_accuracy,
                                     "classifier_accuracy": info.classifier_accuracy, "seconds": info.seconds}
    return save_checkpoint(path, tensors, reader.graph, config, extra)


def load_reader(path: str | Path, graph: CausalGraph | None = None) -> Reader:
    """Read a reader written by :func:`save_reader`; refuses another graph or a model checkpoint."""
    from cfedit.checkpoint import CheckpointError, load_checkpoint
    from cfedit.image import Labeller

    ck = load_checkpoint(path)
    if ck.config.get("kind") != READER_KIND:
        raise CheckpointError(f"{path}: not a cfedit reader checkpoint (a model checkpoint's labeller is "
                              "never used as the reader; train one with train_reader)")
    g = graph or ck.graph
    ck.check_graph(g)
    clf = ck.module("classifier", Labeller.from_config)
    reader = Reader(g, clf, ck.config.get("oracle", ()), mirror=bool(ck.config.get("mirror", False)))
    ex = ck.extra
    reader.info = ReaderInfo(list(reader.oracle), clf.config(), ex.get("train", {}), ex.get("test_accuracy", {}),
                             ex.get("classifier_accuracy", {}), int(clf.heads[0].in_features), "file", str(path),
                             float(ex.get("seconds", 0.0)))
    return reader


def reader_options(graph: CausalGraph, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The graph file's ``reader:`` recipe overridden by ``config``, checked against the known options."""
    from cfedit.image.train import LABELLER_DEFAULTS

    merged = {**graph.reader, **(config or {})}
    known = tuple(READER_DEFAULTS) + READER_EXTRA + tuple(k for k in LABELLER_DEFAULTS if k not in READER_DEFAULTS)
    unknown = sorted(set(merged) - set(known))
    if unknown:
        raise ValueError(f"{graph.source or graph.name}: 'reader' has unknown option {unknown[0]!r} "
                         f"(known: {', '.join(known)})")
    return merged


def reader_cache_path(graph: CausalGraph, data: str | Path | None = None, oracle: bool | None = None,
                      **config) -> Path:
    """``<user cache>/readers/<graph>-<structure hash>-<config hash>.safetensors``."""
    from cfedit.data import default_cache_dir

    cfg = {**READER_DEFAULTS, **config, "data": str(data) if data else graph.data,
           "oracle": list(_oracle_names(graph, oracle))}
    key = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return default_cache_dir() / "readers" / f"{graph.name}-{graph.structure_hash()[:12]}-{key}.safetensors"


def load_or_train_reader(graph: CausalGraph, path: str | Path | None = None, cache: bool = True,
                         data: str | Path | None = None, root: str | Path | None = None, device: str = "cpu",
                         progress: Progress | None = None, oracle: bool | None = None, **config) -> Reader:
    """The reader at ``path`` (``--reader``: loaded when it exists, else trained and written there),
    else the cached one of this graph and config, trained and cached on first use (``cache=False``:
    train without writing). ``config`` overrides the graph file's ``reader:`` recipe."""
    config = reader_options(graph, config)
    target = Path(path) if path is not None else (reader_cache_path(graph, data, oracle, **config) if cache else None)
    if target is not None and target.exists():
        reader = load_reader(target, graph)
        if path is None and reader.info is not None:
            reader.info.source = "cache"
        return reader
    reader = train_reader(graph, data=data, root=root, device=device, progress=progress, oracle=oracle, **config)
    if target is not None:
        save_reader(reader, target)
        reader.info.path = str(target)
    return reader


# ==============================================================================================
# Models: checkpoints and baselines that share their image parts
# ==============================================================================================

def with_features(model, family: str, seed: int = 0, fitted=None):
    """The same editor (image mechanism, labeller, P(V)) with another feature model: ``family`` from
    :data:`cfedit.features.FAMILIES` fitted to ``model.pv`` (or an already fitted ``fitted``)."""
    from cfedit.editor import ANCM
    from cfedit.features import make_feature_model

    feats = fitted if fitted is not None else make_feature_model(family, model.graph).fit(model.pv, seed=seed)
    info = {**dict(model.info or {}), "features": feats.family, "derived_from": model.info.get("features")}
    return ANCM(model.graph, feats, model.mechanism, model.labeller, model.pv, info, model.policy)


def load_models(checkpoints: Sequence[str | Path], graph: CausalGraph | None = None,
                baselines: Sequence[str] = (), device: str = "cpu") -> dict[str, Any]:
    """``{name: ANCM}`` for eval: each checkpoint (named by its file stem) and, for each family in
    ``baselines``, the first checkpoint with that feature model (named by the family)."""
    from cfedit.editor import ANCM

    models: dict[str, Any] = {}
    for p in checkpoints:
        name = base = Path(p).stem
        i = 2
        while name in models:
            name, i = f"{base}-{i}", i + 1
        models[name] = ANCM.load(p, graph=graph, device=device)
    if baselines and not models:
        raise ValueError("baselines need a checkpoint to borrow the image mechanism from")
    first = next(iter(models.values()), None)
    for fam in baselines:
        name = fam if fam not in models else f"baseline-{fam}"
        models[name] = with_features(first, fam)
    return models


# ==============================================================================================
# The report
# ==============================================================================================

@dataclass
class QueryEstimate:
    """One model on one query: the estimate read off its images, with its 95 % interval and verdict.

    ``features_value``: the same proportion computed on the model's counterfactual *factors* for these
    units (what its feature model decided; the gap to ``value`` is the image side's error).
    ``model_value``: the feature model's exact value of the query. ``verdict_reader``: the verdict
    against the bounds as the reader would show them (``QueryReport.reader_lower/upper``). ``own_lower/own_upper``: the
    bounds under the P(V) the model was fitted to. ``n_skipped``: units it could not edit (factual
    factors of probability zero under the model)."""

    model: str
    value: float
    lower: float
    upper: float
    n_units: int
    n_samples: int
    n_eff: float
    verdict: M.Verdict | None
    verdict_reader: M.Verdict | None
    features_value: float
    model_value: float | None
    own_lower: float | None
    own_upper: float | None
    n_skipped: int = 0
    note: str | None = None


@dataclass
class QueryReport:
    """One query: its bounds (``lower``/``upper``, None when they cannot be computed), the true value
    (``truth``, when the data is a known SCM), the units used, and each model's estimate.

    ``reader_tpr``/``reader_fpr``: how often the reader reads the target event on real test images
    where it holds / does not hold — the ceiling and floor the reader alone puts on an estimate;
    ``reader_lower/upper`` = FPR + (TPR - FPR) * bound: the bounds as read by this reader, if it
    erred on edited images as on real ones (equal to the bounds where pixel oracles read the target)."""

    name: str
    query: str
    do: dict[str, str]
    lower: float | None
    upper: float | None
    method: str | None
    certified: bool | None
    truth: float | None
    n_matching: int
    n_used: int
    reader_tpr: float | None
    reader_fpr: float | None
    reader_lower: float | None = None
    reader_upper: float | None = None
    results: list[QueryEstimate] = field(default_factory=list)
    skipped: str | None = None
    note: str | None = None
    # example images for write_grid (not in the JSON): factual [m, C, S, S], models {name: [m, ...]}, truth
    examples: dict = field(default_factory=dict, repr=False, metadata={"json": False})


@dataclass
class VariableMetrics:
    """Edits do(X = x′) with a random x′ ≠ x per unit, for one factor X.

    ``preservation`` over X's non-descendants and ``agreement`` over its descendants (None when there
    are none); ``reversibility``: MAE to the input after editing back (mechanism.edit with the
    factual factors); ``gt_mae``: MAE to the ground-truth counterfactual image, and
    ``gt_mae_same_factors`` the same on the units whose counterfactual factors equal the true ones
    (the image side alone; ``gt_factor_match`` is their fraction)."""

    variable: str
    n_units: int
    effectiveness: float
    preservation: float | None
    agreement: float | None
    reversibility: float
    gt_mae: float | None = None
    gt_mae_same_factors: float | None = None
    gt_factor_match: float | None = None
    n_skipped: int = 0
    by_value: dict[str, "ValueEffect"] = field(default_factory=dict)
    kept: dict[str, float] = field(default_factory=dict)
    kept_ceiling: dict[str, float] = field(default_factory=dict)


@dataclass
class ValueEffect:
    """Edits to one new value x′ of the intervened factor: how often the reader reads x′ on them
    (``effectiveness``) and on real test images whose label is x′ (``real_rate``: the most an edit can
    show through this reader); ``ratio`` = effectiveness / real_rate."""

    n_units: int
    effectiveness: float
    real_rate: float | None
    ratio: float | None
    # realism toward the new value: FID / KID of the edits, and of their unedited inputs, against the
    # real pool images labelled x' (n_reference of them), in the reader's feature space
    fid: float | None = None
    kid: float | None = None
    fid_input: float | None = None
    kid_input: float | None = None
    n_reference: int = 0
    # where the edits change the image: mean absolute pixel change, and its share per cell of a
    # regular grid over the image (CHANGE_GRID) (rows top to bottom; the shares sum to 1)
    change: float | None = None
    change_grid: list | None = None
    change_map: Any = field(default=None, repr=False, metadata={"json": False})  # [S, S] mean |edit - input|


@dataclass
class ModelMetrics:
    """General metrics of one model (means over the factors' :class:`VariableMetrics`)."""

    model: str
    family: str
    n_units: int
    effectiveness: float
    preservation: float | None
    agreement: float | None
    composition: dict[str, float]  # MAE after t null edits, keyed by str(t)
    reconstruction: float  # MAE of the decoder's own reconstruction (= composition '1' unless residual)
    reversibility: float
    gt_mae: float | None
    fid: float
    kid: float
    fid_null: float
    kid_null: float
    labeller_accuracy: dict[str, float]
    variables: list[VariableMetrics]


@dataclass
class EvalReport:
    graph: str
    models: list[str]
    families: dict[str, str]
    n: int
    samples: int
    seed: int
    pool: int
    factual: str
    margin: float
    bounds_source: str
    truth_source: str | None
    reader: ReaderInfo
    queries: list[QueryReport]
    metrics: list[ModelMetrics]
    realism: dict
    seconds: float
    definitions: dict = field(default_factory=lambda: dict(DEFINITIONS))


DEFINITIONS = {
    "estimate": "fraction of (unit, sample) edits whose counterfactual image the reader reads with every "
                "target term true; units: test units whose factual factors match the evidence",
    "interval": "95% Wilson interval at the effective sample size n_eff = p(1-p)/Var, Var = var(per-unit "
                "means)/units, clipped to [units, units*K] (the K samples of a unit are one cluster)",
    "verdict": "gap = distance between the 95% interval and [lower, upper] (0 when they meet); inside when "
               "gap <= margin, otherwise outside by the gap; distance = distance of the point estimate from "
               "[lower, upper]",
    "verdict_reader": "the same against [reader_lower, reader_upper] = FPR + (TPR - FPR) * [lower, upper], the "
                      "bounds as the reader shows them given its error rates on real test images",
    "effectiveness": "intervened factor read as its new value",
    "preservation": "non-descendants of the intervened factor read as their factual values",
    "agreement": "descendants read as the model's counterfactual factor values",
    "composition": "pixel MAE (in [0,1]) to the input after t repeated null edits (the model's editor: "
                   "residual models return the input)",
    "reconstruction": "pixel MAE of decode(v, abduct(x, v)) to the input x: the decoder alone",
    "by_value": "per new value x': effectiveness on the edits to x', the reader's rate of reading x' on real "
                "test images labelled x', and their ratio",
    "by_value.fid/kid": "FID / KID of the edits to x' (fid, kid) and of their unedited inputs (fid_input, "
                        "kid_input) against the real pool images labelled x', in the reader's feature space: an "
                        "edit that brings images toward real images of x' has kid < kid_input",
    "by_value.change": "mean absolute pixel change of the edits to x' (pixels in [0, 1]); change_grid: the "
                       "share of that change in each cell of a regular grid over the image, rows top to bottom",
    "kept": "per non-descendant factor: the reader reads the same value on the edited image as on the input "
            "(realism.reader_shift_kept: the same after a one-pixel shift of the input, the reader's own ceiling)",
    "kept_ceiling": "per non-descendant factor Z: the most 'kept' can be if each edit were read like real test "
                    "images with its new value of the intervened factor and its own value of Z: 1 - the mean "
                    "total variation between the reader's readings of Z on real images before and after "
                    "(below 1 where the reader's reading of Z depends on the intervened factor, e.g. gender on age)",
    "reversibility": "pixel MAE to the input after do(X=x') and the edit back to the factual factors",
    "gt_mae": "pixel MAE to the ground-truth counterfactual image (Colored MNIST, do(color) and do(bar))",
    "realism": REALISM_NOTE,
}


# ==============================================================================================
# Evaluation
# ==============================================================================================

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
    from cfedit.causal.bounds import BoundsError, compute_bounds
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
    images, labels = np.asarray(ds.images), np.asarray(ds.factors, dtype=np.int64)
    # a user's folder (``data``) has its own P(V), not the built-in SCM's
    observed = observational_pv(graph, data=data, root=root, fitted=next(iter(models.values())).pv)
    scm = scm_for_graph(graph) if observed.exact else None
    pv_ref = observed.pv
    bounds_source = (f"true P(V) of the {scm_name_of(graph)} SCM" if observed.exact
                     else f"P(V) model {next(iter(models))!r} was fitted to")
    exact_cf = ground_truth(graph, data).exact_counterfactuals
    has_gt = bool(exact_cf)
    read_real = reader.read(images) if parsed else None
    bounds_cache: dict[tuple, Any] = {}

    def bounds_of(pv: np.ndarray, q: Query):
        key = (hashlib.sha1(np.ascontiguousarray(pv, dtype=np.float64).tobytes()).hexdigest(), str(q))
        if key not in bounds_cache:
            try:
                bounds_cache[key] = compute_bounds(graph, pv, q)
            except (BoundsError, QueryError, ValueError) as e:
                bounds_cache[key] = e
        return bounds_cache[key]

    # -- queries --------------------------------------------------------------------------------
    query_reports: list[QueryReport] = []
    total_q = len(parsed) * len(models)
    step = 0
    for qi, (qname, q) in enumerate(parsed.items()):
        why = _unsupported(q)
        do = dict(q.targets[0].interventions) if not why else {}
        qr = QueryReport(qname, str(q), do, None, None, None, None, None, 0, 0, None, None)
        query_reports.append(qr)
        if why:
            qr.skipped = why
            step += len(models)
            report("queries", step, total_q, {"query": qname, "skipped": why})
            continue
        b = bounds_of(pv_ref, q)
        if isinstance(b, Exception):
            qr.note = f"no bounds: {b}"
        else:
            qr.lower, qr.upper, qr.method, qr.certified = float(b.lower), float(b.upper), b.method, bool(b.certified)
        if scm is not None:
            try:
                qr.truth = float(scm.prob(q))
            except (QueryError, ValueError) as e:
                qr.note = (qr.note + "; " if qr.note else "") + f"no true value: {e}"
        truth_e = _target_hits(graph, q, labels)
        read_e = _target_hits(graph, q, read_real)
        qr.reader_tpr = _opt(float(read_e[truth_e].mean()) if truth_e.any() else float("nan"))
        qr.reader_fpr = _opt(float(read_e[~truth_e].mean()) if (~truth_e).any() else float("nan"))
        if qr.lower is not None:
            tpr = 1.0 if qr.reader_tpr is None else qr.reader_tpr
            fpr = 0.0 if qr.reader_fpr is None else qr.reader_fpr
            if tpr > fpr:
                qr.reader_lower, qr.reader_upper = fpr + (tpr - fpr) * qr.lower, fpr + (tpr - fpr) * qr.upper
        match = np.flatnonzero(_evidence_mask(graph, q, labels))
        qr.n_matching = len(match)
        idx = match[:n]
        qr.n_used = len(idx)
        if len(idx) == 0:
            qr.skipped = f"no test unit among {len(labels)} matches the evidence (draw a larger pool)"
            step += len(models)
            report("queries", step, total_q, {"query": qname, "skipped": qr.skipped})
            continue
        ex = idx[:examples]
        qr.examples = {"factual": images[ex], "models": {}}
        if has_gt:
            qr.examples["truth"] = ds.counterfactual(ex, do)[1]
        for name, m in models.items():
            v = _factual_of(m, images[idx], labels[idx], factual)
            e = _edit(m, images[idx], v, do, samples, seed + 101 * qi)
            if e.ok.any():
                k_read = reader.read(e.images.reshape(-1, *images.shape[1:])).reshape(*e.counterfactual.shape)
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
            own = bounds_of(m.pv, q)
            own_l, own_u = (None, None) if isinstance(own, Exception) else (float(own.lower), float(own.upper))
            note = None if e.ok.all() else (f"{int((~e.ok).sum())} of {len(idx)} units have factual factors of "
                                            "probability zero under the model and were not edited")
            qr.results.append(QueryEstimate(name, est.value, est.lower, est.upper, est.n_units, est.n_samples,
                                            est.n_eff, ver, ver_r, feat_value, model_value, own_l, own_u,
                                            int((~e.ok).sum()), note))
            ok_ex = e.ok[:len(ex)]
            pos = np.cumsum(e.ok) - 1
            shown = np.zeros((len(ex), *images.shape[1:]), dtype=np.uint8)
            shown[ok_ex] = e.images[pos[:len(ex)][ok_ex], 0]
            qr.examples["models"][name] = shown
            step += 1
            report("queries", step, total_q, {"query": qname, "model": name})

    # -- general metrics ------------------------------------------------------------------------
    metrics: list[ModelMetrics] = []
    realism: dict = {"features": REALISM_NOTE, "dim": reader.info.feature_dim if reader.info else None}
    if general:
        metrics, realism = _general_metrics(graph, models, reader, ds, images, labels, n_metrics, seed, factual,
                                            exact_cf, report, realism)
    return EvalReport(
        graph=graph.name, models=list(models), families={k: m.features.family for k, m in models.items()},
        n=n, samples=samples, seed=seed, pool=len(labels), factual=factual, margin=margin,
        bounds_source=bounds_source,
        truth_source=(f"the {scm_name_of(graph)} SCM" if scm is not None else None),
        reader=reader.info, queries=query_reports, metrics=metrics, realism=realism,
        seconds=round(time.perf_counter() - t0, 2))


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


def _general_metrics(graph, models, reader: Reader, ds, images, labels, n_metrics, seed, factual, exact_cf,
                     report, realism) -> tuple[list[ModelMetrics], dict]:

    n_all = len(labels)
    n_m = int(min(n_metrics, n_all))
    units = np.arange(n_m)
    ref = np.arange(n_m, min(2 * n_m, n_all)) if n_all >= 2 * n_m else units
    x0, v_true = images[units], labels[units]
    rng = np.random.default_rng([seed, 1])
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
    realism = {**realism, "n": n_m, "reference_units": len(ref),
               "fid_floor": None if ref is units else M.frechet_distance(f_ref, f_real),
               "kid_floor": None if ref is units else M.kernel_distance(f_ref, f_real),
               # the ceiling of "kept": how often the reader reads the same value after a change that
               # keeps every factor (the input moved by one pixel, edge repeated)
               "reader_shift_kept": {n: float((r == read_x0[:, j]).mean()) for j, (n, r) in
                                     enumerate(zip(graph.names, reader.read(_shift_one_pixel(x0)).T))}}
    total = len(models) * (len(graph.names) + 1)
    step = 0
    out = []
    for mname, m in models.items():
        v = _factual_of(m, x0, v_true, factual)
        per_var: list[VariableMetrics] = []
        mix = np.zeros_like(x0)  # unit i shows its edit of factor (i mod k), for realism
        mix_ok = np.zeros(n_m, dtype=bool)
        for j, xname in enumerate(graph.names):
            desc = [d for d in graph.descendants([xname]) if d != xname]
            nondesc = [graph.axis(z) for z in graph.names if z != xname and z not in desc]
            cf_f = np.zeros((n_m, len(graph.names)), dtype=np.int64)
            cf_i = np.zeros_like(x0)
            ok = np.zeros(n_m, dtype=bool)
            gt_i = np.zeros_like(x0) if xname in exact_cf else None
            gt_f = np.zeros_like(cf_f)
            for val in np.unique(new_values[xname]):
                g_idx = np.flatnonzero(new_values[xname] == val)
                e = _edit(m, x0[g_idx], v[g_idx], {xname: int(val)}, 1, seed + 31 * j + int(val))
                done = g_idx[e.ok]
                ok[done] = True
                cf_f[done], cf_i[done] = e.counterfactual[:, 0], e.images[:, 0]
                if gt_i is not None:
                    gt_f[g_idx], gt_i[g_idx] = ds.counterfactual(units[g_idx], {xname: int(val)})
            read = reader.read(cf_i[ok])
            back = m.transform(cf_i[ok], cf_f[ok], v[ok])
            f_edit = reader.features(cf_i[ok]) if ok.any() else None
            by_value = {}
            for val in np.unique(new_values[xname][ok]):
                sel = new_values[xname][ok] == val
                eff = float((read[sel, j] == val).mean())
                rr = real_rate[(j, int(val))]
                ve = ValueEffect(int(sel.sum()), eff, rr, eff / rr if rr else None)
                f_target = f_pool[labels[:, j] == val]
                ve.n_reference = len(f_target)
                if len(f_target) >= 2 and sel.sum() >= 2:
                    ve.fid, ve.kid = M.frechet_distance(f_target, f_edit[sel]), M.kernel_distance(f_target, f_edit[sel])
                    f_in = f_real[ok][sel]
                    ve.fid_input, ve.kid_input = M.frechet_distance(f_target, f_in), M.kernel_distance(f_target, f_in)
                ve.change_map = M.change_map(x0[ok][sel], cf_i[ok][sel])
                ve.change = float(ve.change_map.mean())
                ve.change_grid = M.pooled_shares(ve.change_map, next(c for c in CHANGE_GRID
                                                                     if ve.change_map.shape[0] % c == 0))
                by_value[graph[xname].values[int(val)]] = ve
            kept = {graph.names[z]: float((read[:, z] == read_x0[ok][:, z]).mean()) for z in nondesc} if ok.any() else {}
            ceiling = {graph.names[z]: c for z in nondesc
                       if (c := _kept_ceiling(read_pool, labels, j, z, v_true[ok], new_values[xname][ok],
                                              graph[graph.names[z]].size)) is not None}
            vm = VariableMetrics(
                variable=xname, n_units=int(ok.sum()),
                effectiveness=M.effectiveness(read, {j: new_values[xname][ok]}),
                preservation=_opt(M.preservation(read, v_true[ok], nondesc)),
                agreement=_opt(M.agreement(read, cf_f[ok], [graph.axis(d) for d in desc])),
                reversibility=M.reversibility(x0[ok], back), n_skipped=int((~ok).sum()),
                by_value=by_value, kept=kept, kept_ceiling=ceiling)
            if gt_i is not None and ok.any():
                vm.gt_mae = M.mae(cf_i[ok], gt_i[ok])
                same = ok & (cf_f == gt_f).all(1)
                vm.gt_factor_match = float(same[ok].mean())
                vm.gt_mae_same_factors = M.mae(cf_i[same], gt_i[same]) if same.any() else None
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


# ==============================================================================================
# Output: JSON, tables, chart, grid
# ==============================================================================================

def _jsonable(x: Any) -> Any:
    if is_dataclass(x) and not isinstance(x, type):
        out = {f.name: _jsonable(getattr(x, f.name)) for f in fields(x) if f.metadata.get("json", True)}
        if isinstance(x, M.Verdict):
            out["label"] = x.label
        return out
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        f = float(x)
        return None if math.isnan(f) or math.isinf(f) else round(f, 6)
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, Path):
        return str(x)
    return x


def report_to_dict(report: EvalReport) -> dict:
    """The report as plain JSON-able values (NaN -> null; example images left out)."""
    return _jsonable(report)


def report_to_json(report: EvalReport, indent: int | None = 2) -> str:
    return json.dumps(report_to_dict(report), indent=indent)


def _f(x: float | None, d: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"


def render_tables(report: EvalReport) -> list:
    """rich Tables: the queries (bounds, truth, each model's estimate and verdict) and the metrics."""
    from rich.table import Table

    tq = Table(title=f"ctf-consistency on {report.graph}: estimates read off the edited images "
                     f"(K={report.samples} edits per unit, 95% Wilson CI)",
               caption=f"bounds from the {report.bounds_source}; inside = the 95% CI is within "
                       f"{report.margin:g} of the bounds; reader: "
                       f"{report.reader.describe() if report.reader else '—'}")
    for col in ("query", "bounds", "true", "model", "estimate [95% CI]", "units", "verdict"):
        tq.add_column(col, justify="right" if col in ("true", "units") else "left", overflow="fold")
    for qr in report.queries:
        qcell = f"[bold]{qr.name}[/bold]\n{qr.query}"
        if (qr.reader_tpr is not None and qr.reader_tpr < 0.995) or (qr.reader_fpr or 0) > 0.005:
            # the reader alone caps what an estimate can show: flag it where it is not exact
            qcell += (f"\n[dim]reader on real test images: reads the target {_f(qr.reader_tpr)} where it "
                      f"holds, {_f(qr.reader_fpr)} where not[/dim]")
        bcell = "—" if qr.lower is None else f"[{qr.lower:.4f}, {qr.upper:.4f}]"
        if qr.skipped or not qr.results:
            tq.add_row(qcell, bcell, _f(qr.truth, 4), "", "", str(qr.n_used),
                       f"[yellow]skipped: {qr.skipped or 'no result'}[/yellow]", end_section=True)
            continue
        for i, r in enumerate(qr.results):
            if r.verdict is None:
                vcell = "[dim]no bounds[/dim]"
            elif r.verdict.inside:
                vcell = "[green]inside[/green]"
            elif r.verdict_reader is not None and r.verdict_reader.inside:
                vcell = f"[yellow]outside by {r.verdict.gap:.3f}[/yellow]\n(within the reader's error)"
            else:
                vcell = f"[red]outside by {r.verdict.gap:.3f}[/red]"
            units = f"{r.n_units}" + (f"/{qr.n_matching}" if i == 0 else "")
            tq.add_row(qcell if i == 0 else "", bcell if i == 0 else "", _f(qr.truth, 4) if i == 0 else "",
                       f"{r.model}", f"{_f(r.value)} [{_f(r.lower)}, {_f(r.upper)}]", units, vcell,
                       end_section=i == len(qr.results) - 1)
    tables = [tq]
    if report.metrics:
        tm = Table(title="edit metrics (general, on test units; pixel errors in [0, 1])",
                   caption=f"{REALISM_NOTE} Floor FID {_f(report.realism.get('fid_floor'), 2)}, "
                           f"KID {_f(report.realism.get('kid_floor'), 4)} (n={report.realism.get('n')}).")
        for col in ("model", "features", "effective", "preserve", "agree", "null edit 1/10", "recon",
                    "reverse", "GT MAE", "FID", "KID", "FID null"):
            tm.add_column(col, justify="left" if col in ("model", "features") else "right")
        for mm in report.metrics:
            tm.add_row(mm.model, mm.family, _f(mm.effectiveness), _f(mm.preservation), _f(mm.agreement),
                       f"{_f(mm.composition.get('1'), 4)}/{_f(mm.composition.get('10'), 4)}",
                       _f(mm.reconstruction, 4), _f(mm.reversibility, 4), _f(mm.gt_mae, 4), _f(mm.fid, 2),
                       _f(mm.kid, 4), _f(mm.fid_null, 2))
        tables.append(tm)
        tv = Table(title="per intervened factor")
        for col in ("model", "do", "units", "effective", "preserve", "agree", "reverse", "GT MAE",
                    "GT MAE (same factors)"):
            tv.add_column(col, justify="left" if col in ("model", "do") else "right")
        for mm in report.metrics:
            for i, vm in enumerate(mm.variables):
                tv.add_row(mm.model if i == 0 else "", vm.variable, str(vm.n_units), _f(vm.effectiveness),
                           _f(vm.preservation), _f(vm.agreement), _f(vm.reversibility, 4), _f(vm.gt_mae, 4),
                           _f(vm.gt_mae_same_factors, 4), end_section=i == len(mm.variables) - 1)
        tables.append(tv)
        te = Table(title="effectiveness per new value against real images, and what each edit kept",
                   caption="edited: read as the new value; real: real test images labelled with that value read "
                           "as it; ratio = edited / real. kept: non-descendants read the same before and after (≤: the most an "
                           "edit read like real faces of the new value can show, see kept_ceiling in the JSON); "
                           "the reader itself keeps its reading under a one-pixel shift for "
                           + ", ".join(f"{k} {v:.3f}" for k, v in report.realism.get("reader_shift_kept", {}).items()))
        for col in ("model", "do", "units", "edited", "real", "ratio", "kept (non-descendants)"):
            te.add_column(col, justify="left" if col in ("model", "do", "kept (non-descendants)") else "right",
                          overflow="fold")
        for mm in report.metrics:
            rows = [(vm, val, ve) for vm in mm.variables for val, ve in vm.by_value.items()]
            for i, (vm, val, ve) in enumerate(rows):
                first = val == next(iter(vm.by_value))
                kept = ", ".join(f"{k} {x:.3f}" + (f" (≤{vm.kept_ceiling[k]:.3f})" if k in vm.kept_ceiling else "")
                                 for k, x in vm.kept.items()) if first else ""
                te.add_row(mm.model if i == 0 else "", f"{vm.variable}={val}", str(ve.n_units), _f(ve.effectiveness),
                           _f(ve.real_rate), _f(ve.ratio), kept, end_section=i == len(rows) - 1)
        tables.append(te)
    return tables


render_table = render_tables  # the name used in the issue


def _font(size: int = 12):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _text_width(draw, text: str, font) -> int:
    l, _, r, _ = draw.textbbox((0, 0), text, font=font)
    return r - l


def _fit_text(draw, text: str, font, width: int) -> str:
    if _text_width(draw, text, font) <= width:
        return text
    while text and _text_width(draw, text + "…", font) > width:
        text = text[:-1]
    return text + "…"


COLORS = {"inside": (30, 140, 60), "outside": (200, 40, 40), "none": (90, 90, 90), "bounds": (190, 215, 240),
          "truth": (0, 0, 0), "grid": (225, 225, 225), "text": (20, 20, 20), "reader": (225, 135, 0)}


def _reader_shifts(q: QueryReport) -> bool:
    """Whether the reader's error moves this query's bounds visibly (not where oracles read it exactly)."""
    return q.reader_lower is not None and q.lower is not None and (
        abs(q.reader_lower - q.lower) > 0.002 or abs(q.reader_upper - q.upper) > 0.002)


def write_chart(report: EvalReport, path: str | Path, width: int = 760) -> Path:
    """A PNG with one panel per query: the bounds as a shaded bar, the true value as a black tick, and
    each model's estimate (dot) with its 95 % interval (line), green when inside, red when outside.
    Where the reader errs, the bounds as the reader shows them are an orange frame, and an estimate
    outside the bounds but inside that frame is orange."""
    from PIL import Image, ImageDraw

    from cfedit.files import atomic_write_bytes

    qrs = [q for q in report.queries if q.results]
    font, small = _font(13), _font(11)
    left, right, row_h, head_h, foot_h, gap = 170, 30, 22, 40, 26, 14
    panel_h = [head_h + row_h * max(1, len(q.results)) + foot_h for q in qrs]
    legend_h = 30
    height = legend_h + sum(panel_h) + gap * (len(qrs) + 1) + (40 if not qrs else 0)
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    x0, x1 = left, width - right

    def X(p: float) -> int:
        return round(x0 + (x1 - x0) * min(max(p, 0.0), 1.0))

    # legend
    lx = 10
    d.rectangle([lx, 10, lx + 24, 22], fill=COLORS["bounds"])
    d.text((lx + 30, 9), "optimal bounds", fill=COLORS["text"], font=small)
    lx += 140
    d.line([lx + 12, 6, lx + 12, 26], fill=COLORS["truth"], width=3)
    d.text((lx + 20, 9), "true value", fill=COLORS["text"], font=small)
    lx += 110
    for key, lab in (("inside", "estimate, 95% CI inside"), ("outside", "outside the bounds")):
        d.line([lx, 16, lx + 24, 16], fill=COLORS[key], width=2)
        d.ellipse([lx + 8, 12, lx + 16, 20], fill=COLORS[key])
        d.text((lx + 30, 9), lab, fill=COLORS["text"], font=small)
        lx += 50 + _text_width(d, lab, small)
    if any(_reader_shifts(q) for q in qrs):
        d.rectangle([lx, 10, lx + 24, 22], outline=COLORS["reader"], width=2)
        d.text((lx + 30, 9), "as the reader shows them", fill=COLORS["text"], font=small)
    if not qrs:
        d.text((10, legend_h + 10), "no query could be evaluated", fill=COLORS["text"], font=font)
    y = legend_h + gap
    for q, h in zip(qrs, panel_h):
        d.rectangle([4, y - 6, width - 4, y + h - 4], outline=COLORS["grid"])
        title = f"{q.name}: {q.query}   (units {q.n_used}/{q.n_matching}, K={report.samples})"
        d.text((10, y), _fit_text(d, title, font, width - 20), fill=COLORS["text"], font=font)
        top, bottom = y + head_h - 14, y + head_h + row_h * len(q.results)
        for t in (0, 0.25, 0.5, 0.75, 1.0):
            d.line([X(t), top, X(t), bottom], fill=COLORS["grid"])
            lab = f"{t:g}"
            d.text((X(t) - _text_width(d, lab, small) // 2, bottom + 4), lab, fill=COLORS["text"], font=small)
        if q.lower is not None:
            d.rectangle([X(q.lower) - (1 if q.upper - q.lower < 0.004 else 0), top,
                         X(q.upper) + (1 if q.upper - q.lower < 0.004 else 0), bottom], fill=COLORS["bounds"])
        if _reader_shifts(q):
            d.rectangle([X(q.reader_lower) - 1, top + 1, X(q.reader_upper) + 1, bottom - 1],
                        outline=COLORS["reader"], width=2)
        if q.truth is not None:
            d.line([X(q.truth), top - 4, X(q.truth), bottom + 2], fill=COLORS["truth"], width=3)
        for i, r in enumerate(q.results):
            cy = y + head_h + row_h * i + row_h // 2
            d.text((10, cy - 7), _fit_text(d, r.model, small, left - 20), fill=COLORS["text"], font=small)
            if r.value is None or math.isnan(r.value):
                continue
            key = "none" if r.verdict is None else ("inside" if r.verdict.inside else "reader" if (
                r.verdict_reader is not None and r.verdict_reader.inside) else "outside")
            col = COLORS[key]
            d.line([X(r.lower), cy, X(r.upper), cy], fill=col, width=2)
            d.line([X(r.lower), cy - 4, X(r.lower), cy + 4], fill=col, width=2)
            d.line([X(r.upper), cy - 4, X(r.upper), cy + 4], fill=col, width=2)
            d.ellipse([X(r.value) - 4, cy - 4, X(r.value) + 4, cy + 4], fill=col)
        y += h + gap
    path = Path(path)
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_grid(report: EvalReport, path: str | Path, scale: int = 2, blocks_per_row: int = 3) -> Path:
    """A PNG with one block per query: a row per example unit showing the factual image, each model's
    counterfactual (first sample) and, where it exists, the ground-truth counterfactual; blocks are
    laid out ``blocks_per_row`` across."""
    from PIL import Image, ImageDraw

    from cfedit.files import atomic_write_bytes

    qrs = [q for q in report.queries if q.examples.get("factual") is not None and len(q.examples["factual"])]
    font, small = _font(13), _font(11)
    blocks = []
    for q in qrs:
        fact = q.examples["factual"]
        cols = ["factual", *report.models] + (["truth"] if "truth" in q.examples else [])
        cell = fact.shape[-1] * scale
        pad, label_h, head_h = 4, 16, 22
        width = max(pad + len(cols) * (cell + pad), 200)
        height = head_h + label_h + len(fact) * (cell + pad) + pad
        img = Image.new("RGB", (width, height), "white")
        d = ImageDraw.Draw(img)
        do = ", ".join(f"{k}={v}" for k, v in q.do.items())
        d.text((pad, 4), _fit_text(d, f"{q.name}: do({do})", font, width - 2 * pad), fill=COLORS["text"], font=font)
        for ci, name in enumerate(cols):
            d.text((pad + ci * (cell + pad), head_h), _fit_text(d, name, small, cell), fill=COLORS["text"], font=small)
        for r in range(len(fact)):
            for ci, name in enumerate(cols):
                if name == "factual":
                    a = fact[r]
                elif name == "truth":
                    a = q.examples["truth"][r]
                else:
                    a = q.examples["models"].get(name, [None] * len(fact))[r]
                if a is None:
                    continue
                a = np.asarray(a)
                arr = a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0))
                tile = Image.fromarray(np.ascontiguousarray(arr)).resize((cell, cell), Image.Resampling.NEAREST)
                img.paste(tile, (pad + ci * (cell + pad), head_h + label_h + r * (cell + pad)))
        blocks.append(img)
    if not blocks:
        sheet = Image.new("RGB", (240, 40), "white")
        ImageDraw.Draw(sheet).text((10, 10), "no examples", fill=COLORS["text"], font=font)
    else:
        per_row = max(1, int(blocks_per_row))
        rows = [blocks[i:i + per_row] for i in range(0, len(blocks), per_row)]
        gap = 12
        width = max(sum(b.width for b in row) + gap * (len(row) + 1) for row in rows)
        height = sum(max(b.height for b in row) for row in rows) + gap * (len(rows) + 1)
        sheet = Image.new("RGB", (width, height), (235, 235, 235))
        y = gap
        for row in rows:
            x = gap
            for b in row:
                sheet.paste(b, (x, y))
                x += b.width + gap
            y += max(b.height for b in row) + gap
    import io

    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def edit_grid(model, images: np.ndarray, factual: np.ndarray, edits: Sequence[tuple[str, str | None]],
              seed: int = 0) -> tuple[list[str], np.ndarray]:
    """(column titles, uint8 [n, 1 + len(edits), C, S, S]): each image, then its edit under each
    ``(factor, value)`` of ``edits`` (value None: the next value of the factor, the other one when binary)
    through the model's causal model (one sample; descendants follow)."""
    g = model.graph
    factual = np.asarray(factual, dtype=np.int64)
    cols, titles = [np.asarray(images)], ["input"]
    for name, value in edits:
        j = g.axis(name)
        out = np.zeros_like(np.asarray(images))
        targets = (factual[:, j] + 1) % g[name].size if value is None else np.full(len(factual), g[name].index(value))
        for t in np.unique(targets):
            idx = np.flatnonzero(targets == t)
            out[idx] = model.edit(images[idx], {name: int(t)}, factual=factual[idx], seed=seed).images[:, 0]
        cols.append(out)
        titles.append(f"{name}={value}" if value is not None else f"{name} flipped")
    return titles, np.stack(cols, 1)


def write_edit_grid(model, images: np.ndarray, factual: np.ndarray, edits: Sequence[tuple[str, str | None]],
                    path: str | Path, scale: int = 3, seed: int = 0) -> Path:
    """:func:`edit_grid` as a PNG, a row per image, magnified ``scale`` times (nearest neighbour)."""
    from PIL import Image, ImageDraw

    from cfedit.files import atomic_write_bytes

    titles, grid = edit_grid(model, images, factual, edits, seed)
    n, k, c, size = grid.shape[0], grid.shape[1], grid.shape[2], grid.shape[-1]
    cell, pad, head = size * scale, 2, 18
    sheet = Image.new("RGB", (k * (cell + pad) + pad, head + n * (cell + pad) + pad), "white")
    d = ImageDraw.Draw(sheet)
    font = _font(11)
    for ci, title in enumerate(titles):
        d.text((pad + ci * (cell + pad), 3), _fit_text(d, title, font, cell), fill=COLORS["text"], font=font)
    for r in range(n):
        for ci in range(k):
            a = grid[r, ci]
            arr = a[0] if c == 1 else np.transpose(a, (1, 2, 0))
            tile = Image.fromarray(np.ascontiguousarray(arr)).resize((cell, cell), Image.Resampling.NEAREST)
            sheet.paste(tile, (pad + ci * (cell + pad), head + r * (cell + pad)))
    import io

    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def write_outputs(report: EvalReport, out: str | Path) -> dict[str, Path]:
    """``out/report.json``, ``out/chart.png``, ``out/grid.png``; returns their paths."""
    from cfedit.files import atomic_write_bytes

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "report.json", (report_to_json(report) + "\n").encode())
    return {"json": out / "report.json", "chart": write_chart(report, out / "chart.png"),
            "grid": write_grid(report, out / "grid.png")}
