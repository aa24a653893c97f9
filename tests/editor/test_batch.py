"""Batched file-level editing (cfedit.editor.batch): a folder of edits is a sample of the counterfactual
distribution, reproducible byte for byte however the run is cut (batches, shards, resume), and its
outputs never collide. Inputs are made from the shipped examples; the model is the shipped backdoor one."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import binom
from typer.testing import CliRunner

from cfedit.editor import ANCM
from cfedit.editor.batch import EditRequest, Shard, Unit, edit_files, gather_inputs
from cfedit.cli import app
from cfedit.causal.query import parse_query

REPO = Path(__file__).resolve().parents[2]
CHECKPOINT = REPO / "checkpoints" / "backdoor.safetensors"
DIGITS = sorted((REPO / "examples").glob("digit*.png"))
runner = CliRunner()


@pytest.fixture(scope="module")
def model():
    return ANCM.load(CHECKPOINT)


def cli(*args):
    return runner.invoke(app, ["edit", *[str(a) for a in args], "-c", str(CHECKPOINT)])


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def folder_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def copies(folder: Path, n: int, source: Path = DIGITS[-1]) -> Path:
    """``n`` byte-identical copies of one image: units that differ only by their key."""
    folder.mkdir(parents=True)
    data = source.read_bytes()
    for i in range(n):
        (folder / f"copy{i:04d}.png").write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """80 distinct digit images in nested folders (the examples with a little pixel noise)."""
    root = tmp_path_factory.mktemp("tree") / "in"
    rng = np.random.default_rng(0)
    for i in range(80):
        base = np.asarray(Image.open(DIGITS[i % len(DIGITS)]).convert("RGB"), dtype=np.int16)
        noisy = np.clip(base + rng.integers(-12, 13, base.shape), 0, 255).astype(np.uint8)
        sub = root / ("a" if i % 2 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy).save(sub / f"img{i:03d}.png")
    return root


def test_one_factual_cell_gives_independent_draws_at_the_models_probability(tmp_path, model, monkeypatch):
    """The issue's case: green 8s with a bar recoloured red. Every copy draws on its own, so the share of
    kept bars is a binomial sample of the model's own probability (not 0 or 1 for the whole folder)."""
    n = 400
    inputs = copies(tmp_path / "in", n)
    monkeypatch.chdir(tmp_path)  # --out relative: records name outputs alike in every folder
    given = ["--given", "digit=8,color=green,bar=yes", "--set", "color=red"]
    q = parse_query("P(bar_{color=red}=yes | digit=8, color=green, bar=yes)").validate(model.graph)
    p = model.features.prob(q)
    assert 0.05 < p < 0.95
    lo, hi = binom.interval(0.99, n, p)
    r = cli(inputs, *given, "--out", "s0")
    assert r.exit_code == 0, r.output
    recs = [json.loads(line) for line in r.stdout.splitlines()]  # stdout: JSON lines only
    assert len(recs) == n and recs == records(tmp_path / "s0" / "edits.jsonl")
    kept = [rec["counterfactual"]["bar"] == "yes" for rec in recs]
    assert lo <= sum(kept) <= hi, (sum(kept), lo, hi, p)
    b = recs[0]["bounds"]["bar"]  # the model's probability lies inside the bounds every record states
    assert b["lower"] <= (p if b["value"] == "yes" else 1 - p) <= b["upper"]

    # the same seed: byte-identical folder; another seed: another, equally valid sample
    (tmp_path / "again").mkdir()
    monkeypatch.chdir(tmp_path / "again")
    assert cli(inputs, *given, "--out", "s0").exit_code == 0
    assert folder_bytes(tmp_path / "s0") == folder_bytes(tmp_path / "again" / "s0")
    r = cli(inputs, *given, "--seed", 1, "--samples", 2, "--out", tmp_path / "s1")
    assert r.exit_code == 0, r.output
    draws = np.array([rec["counterfactual"]["bar"] == "yes" for rec in records(tmp_path / "s1" / "edits.jsonl")])
    draws = draws.reshape(n, 2)
    assert (draws[:, 0] != np.array(kept)).any()
    for k in range(2):  # K samples: K independent draws per image, each a binomial sample
        assert lo <= draws[:, k].sum() <= hi
    assert (draws[:, 0] != draws[:, 1]).any()

    # at a bound: the draws follow the model at that bound
    r = cli(inputs, *given, "--bound", "upper", "--out", tmp_path / "up")
    assert r.exit_code == 0, r.output
    up = records(tmp_path / "up" / "edits.jsonl")
    b = up[0]["bounds"]["bar"]
    upper = b["upper"] if b["value"] == "yes" else 1 - b["lower"]
    assert upper > p + 0.05
    lo, hi = binom.interval(0.99, n, upper)
    assert lo <= sum(rec["counterfactual"]["bar"] == "yes" for rec in up) <= hi


def test_an_images_draws_do_not_depend_on_the_others_of_its_batch(model):
    from cfedit.features.baselines import ConditionalModel
    from cfedit.features.canonical import CanonicalModel
    from cfedit.features.baselines import MarkovianModel
    from cfedit.features.ncm import NCM, NCMConfig

    g = model.graph
    factual = np.array([[8, 0, 1]] * 30 + [[3, 1, 0]] * 30)
    keys = list(range(1000, 1060))
    do = g.value_indices({"color": "red"})
    families = [model.features, ConditionalModel(g).fit(model.pv),
                MarkovianModel(g, CanonicalModel(g.markovian_version())).fit(model.pv),
                NCM(g, NCMConfig(fit_steps=10, abduction_log2=8)).fit(model.pv)]
    for fm in families:
        whole = fm.counterfactual(factual, do, n_samples=3, seed=7, unit_keys=keys)
        part = fm.counterfactual(factual[25:35][::-1], do, n_samples=3, seed=7, unit_keys=keys[25:35][::-1])
        assert np.array_equal(whole[25:35][::-1], part), fm.family
        assert not np.array_equal(whole, fm.counterfactual(factual, do, n_samples=3, seed=8, unit_keys=keys))
    bounded = model.counterfactual_factors(factual, do, bound="lower", seed=7, unit_keys=keys)
    assert np.array_equal(bounded[:10], model.counterfactual_factors(factual[:10], do, bound="lower", seed=7,
                                                                     unit_keys=keys[:10]))


def test_a_resumed_run_ends_byte_identical_to_an_uninterrupted_one(tmp_path, tree, model, monkeypatch):
    opts = ["--set", "color=red", "--samples", "2", "--batch-size", "16"]
    (tmp_path / "straight").mkdir()
    monkeypatch.chdir(tmp_path / "straight")
    assert cli(tree, *opts, "--out", "out").exit_code == 0

    class Interrupted(Exception):
        pass

    def stop_after_two_batches(done, total):
        if done >= 32:
            raise Interrupted

    (tmp_path / "resumed").mkdir()
    monkeypatch.chdir(tmp_path / "resumed")
    units, _ = gather_inputs([str(tree)], exclude=Path("out"))
    with pytest.raises(Interrupted):
        edit_files(model, units, Path("out"), EditRequest({"color": "red"}, samples=2), source=str(CHECKPOINT),
                   batch_size=16, progress=stop_after_two_batches)
    assert len(records(Path("out/edits.jsonl"))) == 2 * 32  # the finished batches, whole
    r = cli(tree, *opts, "--out", "out")  # neither resumed nor forced: refused
    assert r.exit_code == 2 and "--resume" in r.stderr
    r = cli(tree, *opts, "--seed", "3", "--out", "out", "--resume")
    assert r.exit_code == 2 and "seed" in r.stderr
    r = cli(tree, *opts, "--out", "out", "--resume")
    assert r.exit_code == 0, r.output
    assert len(r.stdout.splitlines()) == 2 * (80 - 32)  # only what the first run left
    assert folder_bytes(tmp_path / "straight") == folder_bytes(tmp_path / "resumed")


def test_shards_edit_disjoint_parts_whose_manifests_concatenate_to_the_single_run(tmp_path, tree, monkeypatch):
    opts = ["--set", "color=red", "--batch-size", "16"]
    (tmp_path / "single").mkdir()
    monkeypatch.chdir(tmp_path / "single")
    assert cli(tree, *opts, "--out", "out").exit_code == 0
    (tmp_path / "sharded").mkdir()
    monkeypatch.chdir(tmp_path / "sharded")
    r0 = cli(tree, *opts, "--out", "out", "--shard", "0/2")
    r1 = cli(tree, *opts, "--out", "out", "--shard", "1/2")
    assert r0.exit_code == 0 and r1.exit_code == 0, r0.output + r1.output
    lines0 = Path("out/edits-0-of-2.jsonl").read_text().splitlines()
    lines1 = Path("out/edits-1-of-2.jsonl").read_text().splitlines()
    assert len(lines0) == 48 and len(lines1) == 32  # batches 0, 2, 4 and 1, 3 of five
    single = (tmp_path / "single" / "out" / "edits.jsonl").read_text().splitlines()
    assert sorted(lines0 + lines1) == sorted(single)
    images = {k: v for k, v in folder_bytes(Path("out")).items() if k.endswith(".png")}
    assert images == {k: v for k, v in folder_bytes(tmp_path / "single" / "out").items() if k.endswith(".png")}

    # under torchrun the rank and world size choose the shard
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert Shard.from_torchrun() == Shard(1, 2)
    r = cli(tree, *opts, "--out", "torchrun")
    assert r.exit_code == 0, r.output
    assert Path("torchrun/edits-1-of-2.jsonl").read_text().replace("torchrun/", "out/").splitlines() == lines1


def test_outputs_mirror_the_inputs_folders_and_collisions_are_refused_before_writing(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "digit.png").write_bytes(DIGITS[0].read_bytes())
    r = cli(tmp_path / "a" / "digit.png", tmp_path / "b" / "digit.png", "--set", "digit=5", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert [json.loads(x)["key"] for x in r.stdout.splitlines()] == ["a/digit.png", "b/digit.png"]
    assert (tmp_path / "o" / "a" / "digit.cf0.png").exists() and (tmp_path / "o" / "b" / "digit.pair0.png").exists()

    Image.open(DIGITS[0]).convert("RGB").save(tmp_path / "a" / "digit.jpg")
    r = cli(tmp_path / "a", "--set", "digit=5", "--out", tmp_path / "o2")
    assert r.exit_code == 2 and "would both write" in r.stderr and "digit.cf0.png" in r.stderr
    assert len([line for line in r.stderr.splitlines() if line.strip()]) == 1
    assert not (tmp_path / "o2").exists()  # refused before anything was written


def test_gathering_keys_inputs_by_their_place_and_skips_the_output_folder(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for p in ("in/x.png", "in/sub/y.png", "in/.hidden.png", "in/notes.txt"):
        (tmp_path / p).write_bytes(b"")
    (tmp_path / "in" / "out").mkdir()
    (tmp_path / "in" / "out" / "x.cf0.png").write_bytes(b"")
    units, problems = gather_inputs([str(tmp_path / "in")], exclude=tmp_path / "in" / "out")
    assert [u.key for u in units] == ["sub/y.png", "x.png"] and not problems
    units, problems = gather_inputs(["-", str(tmp_path / "nope")],
                                    stdin=[f"{tmp_path}/in/x.png\n", f"{tmp_path}/in/sub/y.png\n", "\n"])
    assert [u.key for u in units] == ["sub/y.png", "x.png"] and "no such file" in problems[0]
    assert Unit(Path("a/b.png"), "a/b.png").outputs(Path("o"), 2)[1] == (Path("o/a/b.cf1.png"), Path("o/a/b.pair1.png"))
    assert len({u.stream_key for u in units}) == 2
    with pytest.raises(ValueError, match="I/N"):
        Shard.parse("2")
    with pytest.raises(ValueError, match="0 <= I < N"):
        Shard.parse("2/2")


def test_an_unreadable_file_is_reported_and_the_rest_still_edited(tmp_path):
    inputs = copies(tmp_path / "in", 5)
    (inputs / "copy0002.png").write_bytes(b"not a png")
    r = cli(inputs, "--set", "color=red", "--out", tmp_path / "o")
    assert r.exit_code == 2  # an input error; the others are edited
    errors = [line for line in r.stderr.splitlines() if line.startswith("cfedit: error:")]
    assert len(errors) == 1 and "copy0002.png" in errors[0]
    assert [json.loads(x)["key"] for x in r.stdout.splitlines()] == [f"copy000{i}.png" for i in (0, 1, 3, 4)]
    assert len(records(tmp_path / "o" / "edits.jsonl")) == 4


def test_folders_skip_what_cfedit_wrote_and_unsure_readings_are_flagged(tmp_path):
    from cfedit.editor.batch import LOW_CONFIDENCE, read_with_confidence

    d = tmp_path / "in"
    d.mkdir()
    for name in ("a.png", "a.cf0.png", "a.pair3.png", "grid.png", "chart.png", "cfg.png"):
        Image.new("RGB", (28, 28)).save(d / name)
    skipped = []
    units, problems = gather_inputs([str(d)], skipped=skipped)
    assert [u.key for u in units] == ["a.png", "cfg.png"] and not problems
    assert sorted(p.name for p in skipped) == ["a.cf0.png", "a.pair3.png", "chart.png", "grid.png"]
    units, _ = gather_inputs([str(d / "grid.png")])  # named as a file: edited
    assert [u.key for u in units] == ["grid.png"]

    class Labeller:
        def predict_proba(self, images):
            return [np.array([[0.05] * 9 + [0.55], [0.0] * 9 + [1.0]]), np.array([[0.99, 0.01], [0.1, 0.9]]),
                    np.array([[1.0, 0.0], [0.0, 1.0]])]

    from cfedit.causal.graph_file import load_graph

    fake = type("M", (), {"graph": load_graph("backdoor"), "labeller": Labeller()})()
    v, unsure = read_with_confidence(fake, np.zeros((2, 3, 28, 28), np.uint8), {})
    assert v.tolist() == [[9, 0, 0], [9, 1, 1]] and unsure == [(0, "digit", 0.55)] and 0.55 < LOW_CONFIDENCE
    v, unsure = read_with_confidence(fake, np.zeros((2, 3, 28, 28), np.uint8), {"digit": "3"})
    assert v[:, 0].tolist() == [3, 3] and unsure == []  # a given factor is not read
