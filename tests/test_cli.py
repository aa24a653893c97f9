"""The CLI shell: exit codes, one-line errors, JSON output, subcommands."""

import json
import subprocess
from pathlib import Path
import sys

from typer.testing import CliRunner

from cfedit.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_graph_show_text_and_exports():
    r = run("graph", "show", "backdoor")
    assert r.exit_code == 0, r.output
    assert "c-components: {digit, color}  {bar}" in r.output
    r = run("graph", "show", "graphs/frontdoor.yaml", "--format", "mermaid")
    assert r.exit_code == 0 and r.output.startswith("graph TD")
    r = run("graph", "show", "frontdoor", "--format", "json")
    assert json.loads(r.output)["derived"]["c_components"] == [["digit", "bar"], ["color"]]


def test_bad_graph_is_one_line_exit_2(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("variables:\n  a: [x, y]\nedges:\n  - a -> b\n")
    r = run("graph", "show", p)
    assert r.exit_code == 2
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cfedit: error: ") and "unknown variable 'b'" in lines[0]
    r = run("graph", "show", p, "--format", "svg")
    assert r.exit_code == 2


def test_eval_without_a_checkpoint_says_what_to_do(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("name: mine\nvariables:\n  a: [x, y]\n  b: [x, y]\nedges:\n  - a -> b\n")
    r = run("eval", "--graph", p)
    assert r.exit_code == 2 and "no shipped checkpoint for graph 'mine'" in r.output
    r = run("eval", "--graph", "backdoor", "--baselines", "cvae")
    assert r.exit_code == 2 and "unknown family 'cvae'" in r.output


def test_python_dash_m_works():
    r = subprocess.run([sys.executable, "-m", "cfedit", "graph", "show", "backdoor", "--format", "dot"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith('digraph "backdoor"')


def test_bounds_from_generated_files_approach_exact(tmp_path, mnist_root):
    """cfedit data barmnist → labels.csv → cfedit bounds --data: empirical bounds near the exact ones."""
    r = run("data", "barmnist", "backdoor", "--n", "20000", "--out", tmp_path / "d", "--mnist-root", mnist_root)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "d" / "grid.png").exists() and (tmp_path / "d" / "exogenous.csv").exists()
    exact = json.loads(run("bounds", "-g", "backdoor", "--json").output)["bounds"]
    r = run("bounds", "-g", "backdoor", "--data", tmp_path / "d" / "labels.csv", "--json")
    assert r.exit_code == 0, r.output
    emp = json.loads(r.output)["bounds"]
    assert [e["name"] for e in emp] == [x["name"] for x in exact]
    for e, x in zip(emp, exact):
        assert abs(e["lower"] - x["lower"]) < 0.08 and abs(e["upper"] - x["upper"]) < 0.08, e["name"]
    r = run("data", "barmnist", "backdoor", "--n", "5", "--out", tmp_path / "d", "--mnist-root", mnist_root)
    assert r.exit_code == 2 and "--force" in r.output


def test_fit_cli_writes_checkpoint_and_refuses_overwrite(tmp_path, mnist_root):
    out = tmp_path / "m.safetensors"
    args = ["fit", "--graph", "frontdoor", "--out", out, "--n", "256", "--epochs", "1", "--labeller-epochs", "1",
            "--device", "cpu", "--mnist-root", mnist_root]
    r = run(*args, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)  # --json: the summary alone on stdout
    assert out.exists() and summary["checkpoint"] == str(out) and "tv_pv" in summary and "null_edit_mae" in summary
    assert isinstance(summary["warnings"], list) and summary["recipe"]["epochs"] == 1
    r = run(*args)
    assert r.exit_code == 2 and "--force" in r.output
    r = run(*args[:-2], "--features", "gan")
    assert r.exit_code == 2 and "'gan' is not one of 'canonical', 'ncm'" in r.output
    example = Path(__file__).resolve().parents[1] / "examples" / "digit2_red_nobar.png"
    r = run("edit", example, "--set", "digit=7", "-c", out, "--out", tmp_path / "e")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.splitlines()[-1])["counterfactual"]["digit"] == "7"


def test_edit_keep_size_writes_the_inputs_size(tmp_path):
    import numpy as np
    from PIL import Image

    example = Path(__file__).resolve().parents[1] / "examples" / "digit3_red_bar.png"
    big = tmp_path / "digit3_big.png"
    with Image.open(example) as im:
        im.convert("RGB").resize((84, 56), Image.Resampling.BICUBIC).save(big)
    args = ["edit", big, "--set", "color=green", "--graph", "backdoor"]
    r = run(*args, "--out", tmp_path / "k", "--keep-size")
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout.splitlines()[-1])
    assert rec["size"] == [84, 56]
    assert (tmp_path / "k" / "edits.jsonl").read_text() == r.stdout  # the manifest holds the same records
    with Image.open(rec["image"]) as cf, Image.open(big) as src:
        assert cf.size == (84, 56)
        cf_arr, src_arr = np.asarray(cf.convert("RGB")), np.asarray(src.convert("RGB"))
    # outside the 56x56 center square (columns 14..69) the input is untouched; inside the colour changed
    assert np.array_equal(cf_arr[:, :14], src_arr[:, :14]) and np.array_equal(cf_arr[:, 70:], src_arr[:, 70:])
    assert np.abs(cf_arr[:, 14:70].astype(int) - src_arr[:, 14:70].astype(int)).max() > 50
    with Image.open(rec["pair"]) as pair:
        assert pair.size == (2 * 84 + 3 * 2, 56 + 2 * 2)
    r = run(*args, "--out", tmp_path / "m")
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout.splitlines()[-1])
    assert rec["size"] == [28, 28]
    with Image.open(rec["image"]) as cf:
        assert cf.size == (28, 28)


def test_edit_refuses_a_checkpoint_used_with_another_graph(tmp_path):
    example = Path(__file__).resolve().parents[1] / "examples" / "digit3_red_bar.png"
    ck = Path(__file__).resolve().parents[1] / "checkpoints" / "backdoor.safetensors"
    r = run("edit", example, "--set", "color=green", "-c", ck, "--graph", "frontdoor", "--out", tmp_path / "o")
    assert r.exit_code == 2
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cfedit: error: ")
    assert "trained on graph 'backdoor'" in lines[0] and "frontdoor" in lines[0]
    assert not (tmp_path / "o").exists()
    r = run("edit", example, "--set", "color=green", "-c", ck, "--graph", "backdoor", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output


def test_conventions_help_version_choices_and_completion():
    from cfedit.cli import Features
    from cfedit.features import FAMILIES

    assert sorted(f.value for f in Features) == sorted(FAMILIES)
    r = run("-h")
    assert r.exit_code == 0 and "--install-completion" in r.output and "--version" in r.output
    r = run("--version")
    assert r.exit_code == 0 and r.output.startswith("cfedit ")
    r = run("fit", "-h")
    assert r.exit_code == 0 and "canonical" in r.output and "masked" in r.output  # the choices are listed
    import typer.main

    def commands(group):
        for name, c in group.commands.items():
            yield from (commands(c) if hasattr(c, "commands") else [(name, c)])

    for name, command in commands(typer.main.get_command(app)):
        for p in command.params:
            assert getattr(p, "help", None), f"{name} {p.name}: no help text"
            assert "its default" not in p.help, f"{name} {p.name}"
        if name in ("fit", "edit", "eval"):
            assert {p.name: p.default for p in command.params}["device"] == "auto", name
    fit = dict(commands(typer.main.get_command(app)))["fit"]
    assert "about 500 optimizer steps" in {p.name: p.help for p in fit.params}["epochs"]
    r = run("bounds", "-g", "backdoor", "--method", "lp")
    assert r.exit_code == 2 and "'lp' is not one of 'exact', 'ncm'" in r.output


def test_a_missing_input_is_exit_2(tmp_path):
    r = run("edit", tmp_path / "nothing.png", "--set", "color=red", "-g", "backdoor", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "nothing.png: no such file or folder" in r.output


def test_strict_names_the_models_outside_the_bounds():
    from types import SimpleNamespace as NS

    from cfedit.cli import strict_misses
    from cfedit.eval.metrics import verdict

    def est(model, lo, hi, reader_inside=False):
        return NS(model=model, value=(lo + hi) / 2, lower=lo, upper=hi, verdict=verdict(lo, hi, 0.5, 0.6),
                  verdict_reader=verdict(0.0, 1.0, 0.0, 1.0) if reader_inside else None)

    q = NS(name="q", lower=0.5, upper=0.6, results=[est("mine", 0.1, 0.2), est("none", 0.1, 0.2),
                                                     est("ok", 0.55, 0.58), est("read", 0.1, 0.2, True)])
    misses = strict_misses(NS(queries=[q]), ["mine", "ok", "read"])
    assert len(misses) == 1 and misses[0].startswith("mine on q")  # a baseline is not held to it; ✓ᴿ counts
