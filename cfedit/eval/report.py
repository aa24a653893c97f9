"""The report of ``cfedit eval``: typed results, the definitions of every figure, and the JSON form.

:class:`EvalReport` holds one :class:`QueryReport` per query (bounds, truth, each model's
:class:`QueryEstimate`) and one :class:`ModelMetrics` per model (with :class:`VariableMetrics` per
intervened factor and :class:`ValueEffect` per new value). :data:`DEFINITIONS` travels with every
report, so the JSON explains itself. Adding a metric: a field here, its definition, its computation
in :mod:`cfedit.eval.run`, and a column in :mod:`cfedit.eval.render` if people should see it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

import cfedit.eval.metrics as M
from cfedit.eval.reader import ReaderInfo

REALISM_NOTE = ("FID/KID computed in the penultimate-layer feature space of the independent reader's "
                "classifier (no Inception network, nothing downloaded); comparable between models of one "
                "report, not with published FIDs. Reference: real test images; 'floor' = a second set of "
                "real test images of the same size.")


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
