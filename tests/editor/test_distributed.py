"""Data-parallel ``cfedit fit`` on CPU with gloo: 2 processes started by the test (torchrun, or two
plain processes with torchrun's environment and no agent), on a tiny model and 256 BarMNIST images.

Each multi-process run is bounded by a timeout, so a hang fails the test instead of blocking it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cfedit.editor import ANCM, FitOptions, fit_ancm
from cfedit.editor.fit import partial_path
from cfedit.checkpoint import load_checkpoint
from cfedit.data import BarMNIST
from cfedit.causal.graph_file import load_graph

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "editor" / "dist_worker.py"
RECIPE = "fit: {epochs: 1, labeller_epochs: 1, batch_size: 64, width: 8, hidden: 32}\n"
N = 256
TIMEOUT = 240  # seconds for a whole multi-process run (they take ~20 s here)


def tiny_graph(folder: Path, recipe: str = RECIPE) -> Path:
    path = folder / "tiny.yaml"
    path.write_text((REPO / "graphs" / "backdoor.yaml").read_text() + recipe)
    return path


def env(**extra) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    e.pop("CFEDIT_DEBUG", None)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def fit_args(graph: Path, out: Path, mnist_root: Path, *more: str) -> list[str]:
    return ["fit", "--graph", str(graph), "--n-train", str(N), "--device", "cpu", "--mnist-root", str(mnist_root),
            "--out", str(out), *more]


def torchrun(args: list[str], **extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), *args]
    return subprocess.run(cmd, env=env(**extra), capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def without_agent(args: list[str], kill_after: list[int] | None = None, **extra) -> list[tuple[int, str]]:
    """Two worker processes with torchrun's environment but no torchrun agent to kill the survivors:
    (exit status, output) per rank. With ``kill_after``: once those ranks have ended, kill the others
    (a hung rank; their status is then None)."""
    port = free_port()
    procs = []
    for r in range(2):
        e = env(RANK=r, LOCAL_RANK=r, WORLD_SIZE=2, LOCAL_WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                **extra)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), *args], env=e, cwd=REPO, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        if kill_after is not None:
            for r in kill_after:
                procs[r].wait(timeout=TIMEOUT)
            ended = []
            for p in procs:
                hung = p.poll() is None
                if hung:
                    p.kill()
                    p.wait()
                ended.append((None if hung else p.returncode, p.stdout.read()))
            return ended
        return [(p.wait(timeout=TIMEOUT), p.stdout.read()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def recorded(folder: Path, rank: int) -> list[list[int]]:
    return [json.loads(line) for line in (folder / f"rank{rank}.jsonl").read_text().splitlines()]


def test_torchrun_fit_on_two_processes_matches_one(tmp_path, mnist_root):
    graph = tiny_graph(tmp_path)
    out_dir, rec = tmp_path / "out", tmp_path / "rec"
    out_dir.mkdir(), rec.mkdir()
    r = torchrun(fit_args(graph, out_dir / "two.safetensors", mnist_root), CFEDIT_TEST_RECORD=rec)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote ") == 1  # rank 0 alone reports
    assert sorted(p.name for p in out_dir.iterdir()) == ["two.safetensors"]  # one checkpoint, no .partial

    model = ANCM.load(out_dir / "two.safetensors", graph=load_graph(graph))
    ds = BarMNIST("backdoor", "test", n=4, seed=1, root=mnist_root)
    res = model.edit(ds.images, {"color": "red"}, n_samples=2, seed=0)
    assert res.images.shape == (4, 2, 3, 28, 28) and (res.counterfactual[..., 1] == 1).all()
    info = load_checkpoint(out_dir / "two.safetensors").extra["distributed"]
    assert info["world_size"] == 2 and info["backend"] == "gloo"
    assert info["samples_per_rank"] == {"labeller": [N // 2, N // 2], "mechanism": [N // 2, N // 2]}
    assert info["global_batch"] == {"labeller": 128, "mechanism": 64}

    # the ranks saw disjoint shards of every global batch, and together the whole data set once per stage
    b0, b1 = recorded(rec, 0), recorded(rec, 1)
    assert [len(b) for b in b0] == [len(b) for b in b1] == [64, 64] + [32] * 4  # labeller 2 steps, mechanism 4
    for stage in (slice(0, 2), slice(2, 6)):
        s0, s1 = sum(b0[stage], []), sum(b1[stage], [])
        assert not set(s0) & set(s1)
        assert sorted(s0 + s1) == list(range(N))

    # the same samples through one process: the training losses agree (the random draws differ)
    _, one = fit_ancm(load_graph(graph), tmp_path / "one.safetensors",
                      FitOptions(n_train=N, n_eval=64, mnist_root=str(mnist_root)))
    two = load_checkpoint(out_dir / "two.safetensors").extra
    assert one["distributed"]["world_size"] == 1 and one["distributed"]["samples_per_rank"]["mechanism"] == [N]
    for k in ("train_loss_labeller", "train_loss_mechanism"):
        assert two[k] == pytest.approx(one[k], rel=0.02), k


def test_a_failing_rank_ends_the_job_with_one_line(tmp_path, mnist_root):
    # no torchrun agent here to stop the survivor: it must notice on its own, promptly, and stay quiet
    graph = tiny_graph(tmp_path)
    results = without_agent(fit_args(graph, tmp_path / "x.safetensors", mnist_root), CFEDIT_TEST_FAIL="1:3")
    (rc0, out0), (rc1, out1) = results
    assert rc1 == 2 and rc0 == 1, (out0[-2000:], out1[-2000:])
    lines = [line for line in (out0 + out1).splitlines() if "error" in line.lower()]
    assert lines == ["cfedit: error: injected failure on rank 1 at batch 3"], lines
    assert "Traceback" not in out0 + out1
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.slow
def test_a_failing_rank_zero_ends_the_job_with_one_line(tmp_path, mnist_root):
    graph = tiny_graph(tmp_path)
    (rc0, out0), (rc1, out1) = without_agent(fit_args(graph, tmp_path / "x.safetensors", mnist_root),
                                             CFEDIT_TEST_FAIL="0:4")
    assert rc0 == 2 and rc1 == 1, (out0[-2000:], out1[-2000:])
    lines = [line for line in (out0 + out1).splitlines() if "error" in line.lower()]
    assert lines == ["cfedit: error: injected failure on rank 0 at batch 4"], lines


def test_a_fit_on_two_processes_resumes_on_one(tmp_path, mnist_root):
    recipe = RECIPE.replace("epochs: 1, labeller", "epochs: 2, labeller")
    graph = tiny_graph(tmp_path, recipe)
    out = tmp_path / "r.safetensors"
    # rank 1 fails at its first batch of the mechanism's second epoch (2 labeller + 4 mechanism batches before)
    r = torchrun(fit_args(graph, out, mnist_root), CFEDIT_TEST_FAIL="1:7")
    assert r.returncode != 0 and partial_path(out).exists() and not out.exists()
    assert r.stderr.count("cfedit: error:") == 1
    from cfedit.checkpoint import load_state_file

    saved = load_state_file(partial_path(out))
    assert saved["runs"] == [{"world_size": 2, "backend": "gloo"}]
    assert saved["mechanism"]["epoch"] == 1 and saved["mechanism"]["step"] == 4

    model, summary = fit_ancm(load_graph(graph), out, FitOptions(n_train=N, n_eval=64, mnist_root=str(mnist_root)),
                              resume=True)
    assert out.exists() and not partial_path(out).exists()
    d = summary["distributed"]
    assert d["world_size"] == 1 and d["earlier_runs"] == [{"world_size": 2, "backend": "gloo"}]
    assert d["samples_per_rank"]["mechanism"] == [N]  # the second epoch only, on one process
    assert d["samples_per_rank"]["labeller"] == [0]  # trained on two processes, kept as it was
    for k, v in saved["labeller"]["model"].items():
        assert np.array_equal(v.numpy(), model.labeller.state_dict()[k].numpy()), k
    assert np.isfinite(summary["train_loss_mechanism"])


@pytest.mark.slow  # waits out a 15 s group timeout
def test_a_rank_that_stops_answering_ends_the_job_after_the_timeout(tmp_path, mnist_root):
    graph = tiny_graph(tmp_path)
    (rc0, out0), _ = without_agent(fit_args(graph, tmp_path / "x.safetensors", mnist_root), kill_after=[0],
                                   CFEDIT_TEST_HANG="1:3", CFEDIT_DIST_TIMEOUT=15)
    assert rc0 == 1, out0[-2000:]
    lines = [line for line in out0.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("cfedit: error: another process of this 2-process training job "
                                                   "failed or stopped answering"), lines


@pytest.mark.slow
def test_a_fit_on_one_process_resumes_on_two(tmp_path, mnist_root):
    recipe = RECIPE.replace("epochs: 1, labeller", "epochs: 2, labeller")
    graph = tiny_graph(tmp_path, recipe)
    out = tmp_path / "r.safetensors"

    class Stop(Exception):
        pass

    def interrupt(stage, step, total, metrics):
        if stage == "mechanism" and metrics.get("epoch") == 2:
            raise Stop

    with pytest.raises(Stop):
        fit_ancm(load_graph(graph), out, FitOptions(n_train=N, n_eval=64, mnist_root=str(mnist_root)),
                 progress=interrupt)
    assert partial_path(out).exists()
    r = torchrun(fit_args(graph, out, mnist_root, "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    d = load_checkpoint(out).extra["distributed"]
    assert d["world_size"] == 2 and d["earlier_runs"] == [{"world_size": 1, "backend": None}]
    assert d["samples_per_rank"]["mechanism"] == [N // 2, N // 2]
