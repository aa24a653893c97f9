"""eval end to end: the reader, the report on exact (stub) editors with known answers, and a tiny
trained ANCM against its `none` baseline."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

import cfedit.eval as E
from cfedit.eval.run import _kept_ceiling
from cfedit.editor import ANCM
from cfedit.editor.fit import FitOptions, fit_ancm
from cfedit.checkpoint import CheckpointError
from cfedit.data import oracle_bar, oracle_color
from cfedit.features import make_feature_model
from cfedit.causal.graph_file import load_graph
from cfedit.causal.scm import scm_for_graph

TINY_READER = {"n": 3000, "epochs": 2, "width": 16, "hidden": 64, "n_test": 300}


@pytest.fixture(scope="module")
def graph():
    return load_graph("backdoor")


@pytest.fixture(scope="module")
def one_thread():
    """Small models train faster on one thread than on a CPU shared with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reader_and_cache(graph, mnist_root, tmp_path_factory, one_thread):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(cache))
        reader = E.load_or_train_reader(graph, root=mnist_root, **TINY_READER)
        again = E.load_or_train_reader(graph, root=mnist_root, **TINY_READER)
    return reader, again, cache


@pytest.fixture(scope="module")
def reader(reader_and_cache):
    return reader_and_cache[0]


# ----------------------------------------------------------------------------------------------
# An exact editor for color and bar: keeps the ink, moves it to the color's channel, draws or clears
# the bar (a digit intervention keeps the old digit). With it the counterfactual images show exactly
# the counterfactual factors the feature model chose, so every estimate is known.
# ----------------------------------------------------------------------------------------------

class RecolorMechanism:
    def abduct(self, images, factors):
        x = np.asarray(images, dtype=np.float32) / 255.0
        ink = np.maximum(x[:, 0], x[:, 1])
        ink[:, :4] = 0
        return ink

    def decode(self, factors, u):
        f, u = np.asarray(factors), np.asarray(u)
        out = np.zeros((len(u), 3, 28, 28), np.float32)
        out[np.arange(len(u)), np.where(f[:, 1] == 1, 0, 1)] = u
        out[f[:, 2] == 1, 2, :4] = 1.0
        return out

    def edit(self, images, factual, counterfactual):
        return self.decode(counterfactual, self.abduct(images, factual))


class OracleLabeller:
    def predict(self, images):
        return np.stack([np.zeros(len(images), np.int64), oracle_color(images), oracle_bar(images)], 1)


def exact_models(graph):
    pv = scm_for_graph(graph).joint()
    return {f: ANCM(graph, make_feature_model(f, graph).fit(pv), RecolorMechanism(), OracleLabeller(), pv,
                    {"features": f}) for f in ("canonical", "none", "conditional")}


QUERIES = ("recolor_red", "red_bar_effect", "redigit_keeps_color", "recolor_keeps_digit")


@pytest.fixture(scope="module")
def exact_report(graph, reader, mnist_root):
    calls = []
    queries = {k: graph.queries[k] for k in QUERIES}
    queries["two_worlds"] = "P(bar_{color=red}=yes, bar_{color=green}=no | digit=3)"
    rep = E.evaluate(graph, exact_models(graph), n=300, samples=4, queries=queries, reader=reader, pool=3000,
                     n_metrics=150, root=mnist_root, progress=lambda *a: calls.append(a))
    return rep, calls


def by_name(report):
    return {q.name: {r.model: r for r in q.results} for q in report.queries}


# -- the reader ----------------------------------------------------------------------------------

def test_reader_is_cached_and_reads_with_oracles(reader_and_cache, graph, mnist_root):
    reader, again, cache = reader_and_cache
    assert reader.info.source == "trained" and again.info.source == "cache"
    assert reader.info.path and str(cache) in reader.info.path
    assert reader.oracle == ("color", "bar")
    assert reader.info.test_accuracy["color"] == 1.0 and reader.info.test_accuracy["bar"] == 1.0
    assert set(reader.info.classifier_accuracy) == set(graph.names)
    from cfedit.data import BarMNIST

    ds = BarMNIST("backdoor", "test", n=64, seed=11, root=mnist_root)
    assert np.array_equal(reader.read(ds.images), again.read(ds.images))
    f = reader.features(ds.images)
    assert f.shape == (64, reader.info.feature_dim) and np.isfinite(f).all()


def test_reader_is_never_the_models_labeller(graph, reader, tmp_path):
    pv = scm_for_graph(graph).joint()
    own = ANCM(graph, make_feature_model("none", graph).fit(pv), RecolorMechanism(), reader.classifier, pv, {})
    with pytest.raises(ValueError, match="own labeller"):
        E.evaluate(graph, {"own": own}, n=5, reader=reader, pool=50, general=False)
    import copy

    twin = ANCM(graph, own.features, own.mechanism, copy.deepcopy(reader.classifier), pv, {})
    with pytest.raises(ValueError, match="same weights"):
        reader.check_independent(twin)
    path = E.save_reader(reader, tmp_path / "r.safetensors")
    assert E.load_reader(path, graph).info.test_accuracy == reader.info.test_accuracy
    with pytest.raises(CheckpointError, match="another|differs"):
        E.load_reader(path, load_graph("frontdoor"))


class HalfBlindClassifier:
    """Reads every factor as 1 when the left half of the image is brighter than the right, else 0
    (probabilities 0.9 / 0.1): a mirrored image reads the other way."""

    sizes = (10, 2, 2)

    def eval(self):
        return self

    def predict_proba(self, images):
        x = np.asarray(images, dtype=np.float32)
        left = x[..., : x.shape[-1] // 2].mean(axis=(1, 2, 3)) > x[..., x.shape[-1] // 2:].mean(axis=(1, 2, 3))
        p = np.where(left, 0.9, 0.1)
        out = []
        for s in self.sizes:
            q = np.full((len(x), s), 0.0)
            q[:, 0], q[:, 1] = 1 - p, p
            out.append(q)
        return out

    def predict(self, images):
        return np.stack([q.argmax(1) for q in self.predict_proba(images)], 1)


def test_mirror_reading_averages_an_image_and_its_mirror(graph):
    x = np.zeros((2, 3, 4, 4), np.uint8)
    x[0, :, :, :2] = 200  # left bright: read 1 as is, 0 mirrored
    x[1, :, :, 2:] = 200
    plain, mirror = E.Reader(graph, HalfBlindClassifier()), E.Reader(graph, HalfBlindClassifier(), mirror=True)
    assert plain.read(x)[:, 1].tolist() == [1, 0]
    # averaged, 0.9 + 0.1 against 0.1 + 0.9: a tie, which argmax gives to the first value
    assert mirror.read(x)[:, 1].tolist() == [0, 0]
    assert mirror.read(x[:0]).shape == (0, 3)


def test_reader_options_come_from_the_graph_recipe(graph, tmp_path):
    from dataclasses import replace

    g = replace(graph, reader={"epochs": 9, "mirror": True})
    assert E.reader_options(g) == {"epochs": 9, "mirror": True}
    assert E.reader_options(g, {"epochs": 2}) == {"epochs": 2, "mirror": True}  # the caller's options win
    assert E.reader_cache_path(g, **E.reader_options(g)) != E.reader_cache_path(graph)
    assert E.reader_cache_path(graph, epochs=E.READER_DEFAULTS["epochs"]) == E.reader_cache_path(graph)
    with pytest.raises(ValueError, match="'reader': unknown key 'mirrror'"):
        E.reader_options(replace(graph, reader={"mirrror": True}))


# -- the report on exact editors ---------------------------------------------------------------

def test_report_structure_and_progress(exact_report, graph):
    rep, calls = exact_report
    assert [q.name for q in rep.queries] == [*QUERIES, "two_worlds"]
    assert rep.models == ["canonical", "none", "conditional"] and rep.families["none"] == "none"
    assert rep.bounds_source.startswith("true P(V)") and rep.truth_source
    assert {c[0] for c in calls} == {"queries", "metrics"}
    two = rep.queries[-1]
    assert two.skipped and "several counterfactual worlds" in two.skipped and not two.results
    for q in rep.queries[:-1]:
        assert q.n_used == min(300, q.n_matching) > 0 and len(q.results) == 3
        for r in q.results:
            assert r.n_units == q.n_used and r.n_samples == 4 and r.lower <= r.value <= r.upper
            if q.name != "recolor_keeps_digit":  # targets read by the exact pixel oracles:
                # an exact editor's images show exactly the factors its feature model chose
                assert r.value == pytest.approx(r.features_value)
    d = json.loads(E.report_to_json(rep))
    json.dumps(d, allow_nan=False)
    assert d["queries"][0]["results"][1]["verdict"]["label"].startswith("outside by")
    assert "examples" not in d["queries"][0] and d["reader"]["oracle"] == ["color", "bar"]
    assert "penultimate" in d["realism"]["features"] and "verdict" in d["definitions"]


def test_none_lands_outside_where_the_bounds_say_it_must(exact_report):
    q = by_name(exact_report[0])
    rr = exact_report[0].queries[0]
    assert (rr.lower, rr.upper) == pytest.approx((0.0, 0.3043), abs=1e-4)
    assert rr.truth == pytest.approx(0.2174, abs=1e-4)
    # the pixel oracle reads bar exactly: the bounds as read equal the bounds
    assert (rr.reader_tpr, rr.reader_fpr) == (1.0, 0.0) and rr.reader_lower == rr.lower
    # recolor_red: 'none' keeps bar=yes with probability 1, far above the upper bound 0.3043
    none, canon = q["recolor_red"]["none"], q["recolor_red"]["canonical"]
    assert none.value == 1.0 and not none.verdict.inside and none.verdict.side == "above"
    assert none.verdict.gap == pytest.approx(none.lower - 0.3043, abs=1e-4) and none.verdict.gap > 0.5
    assert canon.verdict.inside and canon.model_value == pytest.approx(0.21, abs=0.01)
    # the identified effect P(bar_{color=red}=yes) = 0.4125: 'none' reports P(bar=yes) instead
    assert not q["red_bar_effect"]["none"].verdict.inside and q["red_bar_effect"]["canonical"].verdict.inside
    # color is not a descendant of digit: conditioning resamples it, the causal models keep it
    assert q["redigit_keeps_color"]["canonical"].value == 1.0
    assert not q["redigit_keeps_color"]["conditional"].verdict.inside


def test_bounds_as_the_reader_shows_them(exact_report):
    # digit is read by the (tiny, poor) classifier: [1, 1] maps to [TPR, TPR]
    kd = next(q for q in exact_report[0].queries if q.name == "recolor_keeps_digit")
    assert (kd.lower, kd.upper) == (1.0, 1.0) and kd.reader_fpr < kd.reader_tpr < 1
    assert kd.reader_lower == pytest.approx(kd.reader_tpr) and kd.reader_upper == pytest.approx(kd.reader_tpr)
    for r in kd.results:
        assert r.verdict_reader is not None


def test_general_metrics_of_an_exact_editor(exact_report):
    rep = exact_report[0]
    m = {mm.model: mm for mm in rep.metrics}
    for mm in m.values():
        assert mm.n_units == 150 and set(mm.composition) == {"1", "10"}
        assert max(mm.composition.values()) < 2e-3  # null edits are exact up to the ink in the bar rows
        v = {vm.variable: vm for vm in mm.variables}
        assert v["color"].effectiveness == 1.0 and v["bar"].effectiveness == 1.0
        assert v["color"].reversibility < 2e-3 and v["bar"].reversibility < 2e-3
        assert v["digit"].gt_mae is None and v["color"].gt_mae is not None
        # where the counterfactual factors equal the true ones, the image is the true image
        assert v["color"].gt_mae_same_factors < 2e-3 and v["bar"].gt_mae_same_factors < 2e-3
        assert v["bar"].agreement is None and v["color"].agreement == 1.0
        assert np.isfinite([mm.fid, mm.kid, mm.fid_null]).all()
        # per new value against real images: the oracles read every real and every edited bar
        assert set(v["bar"].by_value) == {"no", "yes"}
        for ve in v["bar"].by_value.values():
            assert ve.effectiveness == 1.0 and ve.real_rate == 1.0 and ve.ratio == 1.0 and ve.n_units > 0
        assert sum(ve.n_units for ve in v["color"].by_value.values()) == v["color"].n_units
        # kept: each non-descendant, read the same before and after
        assert set(v["digit"].kept) == set(rep_graph_nondesc("digit")) and set(v["bar"].kept) == {"digit", "color"}
        assert 0 <= v["bar"].kept["digit"] <= 1  # (the tiny reader misreads digits on any image)
        # the conditional baseline resamples color on do(bar); the others keep it
        assert (v["bar"].kept["color"] == 1.0) == (mm.model != "conditional")
        # the color oracle reads color the same whatever the bar: a faithful edit could keep it always
        assert v["bar"].kept_ceiling["color"] == 1.0 and set(v["bar"].kept_ceiling) <= {"digit", "color"}
        assert mm.reconstruction < 2e-3
    # the oracles read color and bar the same after a one-pixel shift
    assert rep.realism["reader_shift_kept"]["color"] == 1.0 and rep.realism["reader_shift_kept"]["bar"] == 1.0
    digit = {k: {vm.variable: vm for vm in mm.variables}["digit"] for k, mm in m.items()}
    assert digit["canonical"].preservation == 1.0 and digit["none"].preservation == 1.0
    assert digit["conditional"].preservation < 0.8  # resampled the color


def rep_graph_nondesc(x):
    g = load_graph("backdoor")
    return [z for z in g.names if z != x and z not in g.descendants([x])]


def test_tables_chart_grid_and_json_files(exact_report, tmp_path):
    rep = exact_report[0]
    console = Console(record=True, width=200)
    for t in E.render_tables(rep):
        console.print(t)
    text = console.export_text()
    assert "recolor_red" in text and "outside by 0.6" in text and "inside" in text and "skipped" in text
    assert "penultimate-layer" in text
    paths = E.write_outputs(rep, tmp_path / "out")
    assert json.loads(paths["json"].read_text())["graph"] == "backdoor"
    for key in ("chart", "grid"):
        with Image.open(paths[key]) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 100


# -- a tiny trained model ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, mnist_root, graph, one_thread):
    out = tmp_path_factory.mktemp("ck") / "tiny.safetensors"
    opts = FitOptions(n_train=3000, n_eval=64, epochs=4, labeller_epochs=1, mnist_root=str(mnist_root),
                      mechanism_options={"batch_size": 64, "width": 16, "hidden": 64})
    fit_ancm(graph, out, opts)
    return out


def test_tiny_trained_model_against_its_none_baseline(tiny_checkpoint, graph, reader, mnist_root):
    models = E.load_models([tiny_checkpoint], graph, baselines=["none"])
    assert list(models) == ["tiny", "none"]
    assert models["none"].mechanism is models["tiny"].mechanism  # the baseline reuses the image model
    assert models["none"].features.family == "none" and models["tiny"].features.family == "canonical"
    with pytest.raises(CheckpointError, match="not a cfedit reader"):
        E.load_reader(tiny_checkpoint, graph)
    rep = E.evaluate(graph, models, n=60, samples=4, queries={"recolor_red": graph.queries["recolor_red"]},
                     reader=reader, pool=3000, n_metrics=64, root=mnist_root)
    r = by_name(rep)["recolor_red"]
    assert not r["none"].verdict.inside and r["none"].value > 0.9
    assert r["tiny"].value < r["none"].lower and r["tiny"].verdict.gap < r["none"].verdict.gap
    # the images carry the bar the feature model chose (the oracle reads it)
    assert abs(r["tiny"].value - r["tiny"].features_value) < 0.15
    mm = {m.model: m for m in rep.metrics}
    assert mm["tiny"].composition["1"] < 0.2 and mm["tiny"].effectiveness > 0
    assert json.loads(E.report_to_json(rep))["metrics"][0]["family"] == "canonical"


def test_a_bad_query_fails_before_any_work(graph):
    from cfedit.causal.query import QueryError

    with pytest.raises(QueryError, match="unknown variable 'colour'"):
        E.evaluate(graph, exact_models(graph), queries=["P(bar_{colour=red}=yes)"], pool=10)


def test_kept_ceiling_is_one_minus_the_readers_shift_between_real_strata():
    # factor 0 (intervened) and factor 1 (kept), both binary. The reader reads factor 1 right on every
    # real image except those with factor 0 = 1 and factor 1 = 0, of which it reads 1 in 5 as 1.
    labels = np.array([[0, 0]] * 10 + [[1, 0]] * 10 + [[0, 1]] * 10 + [[1, 1]] * 10)
    read = labels.copy()
    read[10:12, 1] = 1
    factual = np.array([[0, 0]] * 3 + [[0, 1]])
    new = np.array([1, 1, 1, 1])
    assert _kept_ceiling(read, labels, 0, 1, factual, new, 2) == pytest.approx(1 - (3 * 0.2 + 0) / 4)
    # a stratum with no real image on one side is left out; none at all gives None
    assert _kept_ceiling(read[:20], labels[:20], 0, 1, factual, new, 2) == pytest.approx(0.8)
    assert _kept_ceiling(read[:10], labels[:10], 0, 1, factual, new, 2) is None
