"""The editor end to end on a tiny model: fit → checkpoint → load → edit, resume, and the CLI."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cfedit.causal.bounds import compute_bounds
from cfedit.causal.query import parse_query
from cfedit.data import observational_pv
from cfedit.editor import ANCM
from cfedit.editor.fit import FitOptions, fit_ancm, partial_path, state_path
from cfedit.checkpoint import CheckpointError, load_checkpoint
from cfedit.cli import app
from cfedit.data import BarMNIST
from cfedit.causal.graph_file import load_graph

TINY = dict(n_train=256, n_eval=64, epochs=1, labeller_epochs=1,
            mechanism_options={"batch_size": 64, "width": 8, "hidden": 32})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, mnist_root):
    out = tmp_path_factory.mktemp("ck") / "tiny.safetensors"
    model, summary = fit_ancm(load_graph("backdoor"), out, FitOptions(mnist_root=str(mnist_root), **TINY))
    return out, model, summary


def test_fit_writes_a_checkpoint_with_summary(tiny):
    out, model, summary = tiny
    assert out.exists() and not partial_path(out).exists()
    assert summary["tv_pv"] < 1e-9  # the canonical model fits P(V) exactly
    assert 0 <= summary["null_edit_mae"] <= 1 and "labeller_acc_digit" in summary
    ck = load_checkpoint(out)
    assert ck.config["features"]["family"] == "canonical"
    assert ck.graph.structure_hash() == load_graph("backdoor").structure_hash()


def test_checkpoint_round_trip_gives_identical_edits(tiny, mnist_root):
    out, model, _ = tiny
    ds = BarMNIST("backdoor", "test", n=16, seed=3, root=mnist_root)
    a = model.edit(ds.images, {"color": "red"}, n_samples=3, seed=5)
    b = ANCM.load(out).edit(ds.images, {"color": "red"}, n_samples=3, seed=5)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.counterfactual, b.counterfactual)
    assert a.images.shape == (16, 3, 3, 28, 28)
    # intervened factor takes its value; the non-descendant digit keeps the factual reading
    assert (a.counterfactual[..., 1] == 1).all()
    assert (a.counterfactual[..., 0] == a.factual[:, None, 0]).all()


def test_checkpoint_refuses_another_graph(tiny):
    with pytest.raises(CheckpointError, match="differs"):
        ANCM.load(tiny[0], graph=load_graph("frontdoor"))


def test_bound_edits_use_the_extreme_models(tiny, mnist_root):
    _, model, _ = tiny
    factual = np.array([[3, 1, 1]] * 400)  # digit 3, red, bar: the recolor_green query's unit
    lo = model.counterfactual_factors(factual, {"color": "green"}, bound="lower", seed=0)
    hi = model.counterfactual_factors(factual, {"color": "green"}, bound="upper", seed=0)
    # the bounds of P(bar_{color=green}=yes | digit=3, red, yes) under the P(V) the model was fitted to
    # (the tiny training set's; with exact P(V) they would be [0.5691, 1])
    exact = compute_bounds(model.graph, model.pv, "P(bar_{color=green}=yes | digit=3, color=red, bar=yes)")
    assert exact.upper - exact.lower > 0.2
    assert abs((hi[..., 2] == 1).mean() - exact.upper) < 0.08
    assert abs((lo[..., 2] == 1).mean() - exact.lower) < 0.08
    # the bounds an edit reports follow the one rule for P(V) (cfedit.data.observational_pv): here the
    # exact P(V) of the backdoor SCM, as `cfedit bounds` prints them, not the tiny training set's
    b = model.descendant_bounds(factual[0], {"color": 0}, np.array([3, 0, 1]))
    assert (b["bar"]["lower"], b["bar"]["upper"]) == (0.569106, 1.0)
    shown = compute_bounds(model.graph, observational_pv(model.graph).pv, parse_query(b["bar"]["query"]))
    assert b["bar"]["lower"] == pytest.approx(shown.lower, abs=1e-6)


def test_resume_continues_an_interrupted_fit(tmp_path, mnist_root):
    g = load_graph("backdoor")
    opts = FitOptions(mnist_root=str(mnist_root), **dict(TINY, epochs=2))
    straight, _ = fit_ancm(g, tmp_path / "a.safetensors", opts)

    class Stop(Exception):
        pass

    def interrupt(stage, step, total, metrics):
        if stage == "mechanism" and metrics.get("epoch") == 2:
            raise Stop

    with pytest.raises(Stop):
        fit_ancm(g, tmp_path / "b.safetensors", opts, progress=interrupt)
    assert partial_path(tmp_path / "b.safetensors").exists()
    resumed, _ = fit_ancm(g, tmp_path / "b.safetensors", opts, resume=True)
    for k, v in straight.mechanism.state_dict().items():
        assert np.allclose(v.numpy(), resumed.mechanism.state_dict()[k].numpy(), atol=1e-6), k


def test_a_kept_state_continues_exactly_to_more_epochs(tmp_path, mnist_root):
    from dataclasses import replace

    g = load_graph("backdoor")
    opts = FitOptions(mnist_root=str(mnist_root), **dict(TINY, epochs=2))
    straight, _ = fit_ancm(g, tmp_path / "a.safetensors", opts)
    assert not state_path(tmp_path / "a.safetensors").exists()  # kept only when asked
    fit_ancm(g, tmp_path / "one.safetensors", replace(opts, epochs=1), keep_state=True)
    kept = state_path(tmp_path / "one.safetensors")
    assert kept.exists() and not partial_path(tmp_path / "one.safetensors").exists()
    continued, summary = fit_ancm(g, tmp_path / "two.safetensors", opts, resume_from=kept)
    for k, v in straight.mechanism.state_dict().items():
        assert np.allclose(v.numpy(), continued.mechanism.state_dict()[k].numpy(), atol=1e-6), k
    assert len(summary["distributed"]["earlier_runs"]) == 1  # the run it continued
    with pytest.raises(CheckpointError, match="trained the image mechanism 1 epoch already; pass --epochs above 1"):
        fit_ancm(g, tmp_path / "x.safetensors", replace(opts, epochs=1), resume_from=kept)
    with pytest.raises(CheckpointError, match="not a warm start"):
        fit_ancm(g, tmp_path / "x.safetensors", replace(opts, init_from=str(tmp_path / "a.safetensors")),
                 resume_from=kept)
    with pytest.raises(CheckpointError, match="another graph"):
        fit_ancm(load_graph("frontdoor"), tmp_path / "x.safetensors", opts, resume_from=kept)
    with pytest.raises(CheckpointError, match="no such training state"):
        fit_ancm(g, tmp_path / "x.safetensors", opts, resume_from=tmp_path / "missing.state")
    with pytest.raises(CheckpointError, match="not a training state"):
        fit_ancm(g, tmp_path / "x.safetensors", opts, resume_from=tmp_path / "a.safetensors")


def test_a_warm_start_state_needs_its_labeller_again(tmp_path, mnist_root):
    from dataclasses import replace

    g = load_graph("backdoor")
    opts = FitOptions(mnist_root=str(mnist_root), n_train=128, n_eval=32, epochs=1, labeller_epochs=1,
                      mechanism="masked", mechanism_options={"batch_size": 32, "width": 8, "blocks": 1, "d_width": 8,
                                                          "d_warmup": 0})
    fit_ancm(g, tmp_path / "first.safetensors", opts)
    warm = replace(opts, init_from=str(tmp_path / "first.safetensors"))
    straight, _ = fit_ancm(g, tmp_path / "two.safetensors", replace(warm, epochs=2))
    fit_ancm(g, tmp_path / "one.safetensors", warm, keep_state=True)
    kept = state_path(tmp_path / "one.safetensors")
    with pytest.raises(CheckpointError, match="continues a warm start from .*first.safetensors; pass --init-from"):
        fit_ancm(g, tmp_path / "x.safetensors", replace(opts, epochs=2), resume_from=kept)
    continued, _ = fit_ancm(g, tmp_path / "cont.safetensors", replace(warm, epochs=2), resume_from=kept)
    for k, v in straight.mechanism.state_dict().items():
        assert np.allclose(v.numpy(), continued.mechanism.state_dict()[k].numpy(), atol=1e-6), k


def test_edit_cli_writes_pairs_and_json_lines(tiny, tmp_path, mnist_root):
    from cfedit.data import write_barmnist

    write_barmnist("backdoor", 3, split="test", out=tmp_path / "in", root=mnist_root)
    (tmp_path / "in" / "broken.png").write_bytes(b"not an image")
    runner = CliRunner()
    args = ["edit", str(tmp_path / "in"), "--set", "color=red", "--samples", "2", "-c", str(tiny[0]),
            "--out", str(tmp_path / "out")]
    r = runner.invoke(app, args)
    assert r.exit_code == 2  # one unreadable image: an input error, reported and skipped, the rest edited
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 3 * 2  # three digits; the grid.png written beside them is cfedit's own: skipped
    assert "skipped 1 file(s) that cfedit wrote" in r.stderr
    rec = lines[0]
    assert rec["counterfactual"]["color"] == "red" and "bar" in rec["bounds"]
    assert (tmp_path / "out" / "000000.pair1.png").exists()
    assert "broken.png" in r.stderr
    r = runner.invoke(app, args)  # outputs exist: refused without --force
    assert r.exit_code == 2 and "--force" in r.stderr
    r = runner.invoke(app, args[:2] + ["--set", "colour=red", "-c", str(tiny[0])])
    assert r.exit_code == 2 and "no variable 'colour'" in r.stderr


def test_residual_edits_return_the_input_on_the_null_edit(tiny, mnist_root, tmp_path):
    out, model, _ = tiny
    ds = BarMNIST("backdoor", "test", n=32, seed=4, root=mnist_root)
    null = {"color": model.graph["color"].values[0]}
    keep = ds.factors[:, 1] == 0  # green units: do(color=green) is their null edit
    plain = model.edit(ds.images[keep], null, factual=ds.factors[keep])
    resid = model.edit(ds.images[keep], null, factual=ds.factors[keep], residual=True)
    err = lambda r: np.abs(r.images[:, 0].astype(int) - ds.images[keep].astype(int)).max()  # noqa: E731
    assert err(resid) <= 1 < err(plain)  # exact up to uint8 rounding; the tiny decoder alone is far off
    # a real edit still moves the ink: the red channel gains what the green one loses
    moved = model.edit(ds.images[keep], {"color": "red"}, factual=ds.factors[keep], residual=True).images[:, 0]
    assert moved[:, 0].astype(int).sum() > ds.images[keep][:, 0].astype(int).sum()
    # the setting travels with the checkpoint
    model.residual = True
    try:
        model.save(tmp_path / "r.safetensors")
    finally:
        model.residual = False
    assert ANCM.load(tmp_path / "r.safetensors").residual is True


def test_fit_recipe_of_the_graph_file_and_its_overrides():
    from dataclasses import replace

    from cfedit.editor.fit import resolve_options

    g = load_graph("celeba")
    o = resolve_options(g)
    assert o.mechanism == "masked" and o.epochs == g.fit["epochs"] and o.labeller_epochs == g.fit["labeller_epochs"]
    assert "mechanism" not in o.mechanism_options
    # explicit options win over the recipe
    o = resolve_options(g, FitOptions(epochs=2, mechanism="cvae", residual=True, mechanism_options={"latent": 8}))
    assert (o.epochs, o.mechanism, o.residual, o.mechanism_options["latent"]) == (2, "cvae", True, 8)
    assert o.mechanism_options == {"latent": 8}  # the recipe's masked-editor options are not the cvae's
    assert resolve_options(g).mechanism_options["d_project"] is True
    o = resolve_options(load_graph("backdoor"))
    assert o.mechanism_options == {} and o.mechanism == "cvae"
    bad = replace(g, fit={"epochs": 3, "latnet": 4})
    with pytest.raises(ValueError, match="unknown key 'latnet'"):
        resolve_options(bad)
    # the options a recipe may set are those of its mechanism
    with pytest.raises(ValueError, match=r"\(mechanism masked\): unknown key 'latent'"):
        resolve_options(replace(g, fit={"mechanism": "masked", "latent": 4}))
    with pytest.raises(ValueError, match="'fit' mechanism must be one of cvae, masked"):
        resolve_options(replace(g, fit={"mechanism": "gan"}))


def test_residual_fit_trains_and_reports_the_residual_null_edit(tmp_path, mnist_root):
    out = tmp_path / "res.safetensors"
    model, summary = fit_ancm(load_graph("backdoor"), out, FitOptions(mnist_root=str(mnist_root), residual=True, **TINY))
    assert model.residual is True and ANCM.load(out).residual is True
    assert summary["recipe"]["residual"] is True
    # the editor's null edit is the input up to uint8 rounding; the tiny decoder alone is far off
    assert summary["null_edit_mae"] < 1e-3 < summary["reconstruction_mae"]
    ds = BarMNIST("backdoor", "test", n=16, seed=5, root=mnist_root)
    same = model.transform(ds.images, ds.factors, ds.factors)
    assert np.abs(same.astype(int) - ds.images.astype(int)).max() <= 1
    twice = model.transform(ds.images, ds.factors, np.repeat(ds.factors, 2, axis=0))
    assert twice.shape == (32, *ds.images.shape[1:]) and (twice[0::2] == twice[1::2]).all()


def test_a_checkpoint_of_the_calibrated_guarded_editor_is_refused(tiny, tmp_path):
    from cfedit.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    ck = load_checkpoint(tiny[0])
    config = dict(ck.config, edit={"residual": True, "gains": {"color": [1.0, 2.0]}})
    save_checkpoint(tmp_path / "old.safetensors", ck.tensors, ck.graph, config, extra=ck.extra)
    with pytest.raises(CheckpointError, match="calibrated, guarded decoder"):
        ANCM.load(tmp_path / "old.safetensors")


def test_a_warm_start_keeps_the_labeller_and_trains_the_masked_editor_further(tiny, tmp_path, mnist_root):
    from dataclasses import replace

    g = load_graph("backdoor")
    opts = FitOptions(mnist_root=str(mnist_root), n_train=128, n_eval=32, epochs=1, labeller_epochs=1,
                      mechanism="masked", mechanism_options={"batch_size": 32, "width": 8, "blocks": 1, "d_width": 8,
                                                          "d_warmup": 0})
    first, _ = fit_ancm(g, tmp_path / "first.safetensors", opts)
    second, summary = fit_ancm(g, tmp_path / "second.safetensors",
                               replace(opts, init_from=str(tmp_path / "first.safetensors")))
    assert summary["init_from"]["path"] == str(tmp_path / "first.safetensors")
    for k, v in first.labeller.state_dict().items():
        assert np.array_equal(v.numpy(), second.labeller.state_dict()[k].numpy()), k
    assert not np.array_equal(first.mechanism.state_dict()["head.weight"].numpy(),
                              second.mechanism.state_dict()["head.weight"].numpy())
    with pytest.raises(ValueError, match="warm start continues a masked editor"):
        fit_ancm(g, tmp_path / "third.safetensors", replace(opts, mechanism="cvae", init_from=str(tiny[0])))
