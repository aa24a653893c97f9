"""The front door: ``import cfedit`` gives graphs, bounds and models, and edits return what they got."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cfedit

REPO = Path(__file__).resolve().parents[1]


def test_importing_cfedit_and_its_causal_core_imports_no_torch():
    code = ("import sys, cfedit, cfedit.causal, cfedit.causal.graph_file, cfedit.causal.bounds, cfedit.causal.scm, "
            "cfedit.causal.pv, cfedit.causal.query, cfedit.causal.recipes\n"
            "g = cfedit.load_graph('backdoor')\n"
            "b = cfedit.bounds(g, 'P(bar_{color=green}=yes | digit=3, color=red, bar=yes)')\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "print(round(b.lower, 4), b.upper)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0.5691", "1.0"]


def test_the_readme_python_example_runs():
    graph = cfedit.load_graph("backdoor")
    b = cfedit.bounds(graph, "P(bar_{color=green}=yes | digit=3, color=red, bar=yes)")
    assert (round(b.lower, 4), b.upper) == (0.5691, 1.0)
    model = cfedit.load("backdoor")
    digit = Image.open(REPO / "examples" / "digit3_red_bar.png")
    green = model.apply(digit, {"color": "green"})
    assert isinstance(green, Image.Image) and green.size == digit.size
    arr = np.asarray(green).astype(int)
    assert arr[..., 1].sum() > arr[..., 0].sum()  # the ink went to the green channel


def test_apply_returns_the_type_it_was_given(mnist_root):
    model = cfedit.load(REPO / "checkpoints" / "backdoor.safetensors")
    from cfedit.data import BarMNIST

    x = BarMNIST("backdoor", "test", n=4, seed=3, root=mnist_root).images  # uint8 [4, 3, 28, 28]
    do = {"color": "red"}
    as_uint8 = model.apply(x, do, seed=1)
    assert as_uint8.dtype == np.uint8 and as_uint8.shape == x.shape
    ref = model.edit(x, do, seed=1, unit_keys=range(4)).images[:, 0]
    assert np.array_equal(as_uint8, ref)
    t = torch.from_numpy(x.astype(np.float32) / 255.0).double()
    as_tensor = model.apply(t, do, seed=1, samples=2)
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.dtype == torch.float64
    assert as_tensor.shape == (4, 2, 3, 28, 28)
    assert np.array_equal((as_tensor[:, 0].numpy() * 255).round().astype(np.uint8), ref)
    pics = [Image.fromarray(a.transpose(1, 2, 0)).resize((56, 40)) for a in x[:2]]
    out = model.apply(pics, do, samples=3)
    assert len(out) == 2 and all(len(o) == 3 and o[0].size == (56, 40) for o in out)
    with pytest.raises(ValueError, match=r"\[n, 3, 28, 28\]"):
        model.apply(np.zeros((1, 3, 32, 32), dtype=np.float32), do)


def test_load_by_unknown_name_is_a_user_error():
    with pytest.raises(cfedit.CfeditError):
        cfedit.load("no-such-graph")
