"""The image mechanism (conditional VAE), the labeller and their training loops.

Fast tests use a synthetic world: a square of one of two sizes, drawn in the red or the green
channel at a random position (the image noise). Tiny models, a few hundred images, seconds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cfedit.checkpoint import load_checkpoint, save_checkpoint
from cfedit.causal.graph_file import graph_from_dict
from cfedit.image import ImageMechanism, Labeller, train_image_mechanism, train_labeller

TINY_LAB = {"width": 8, "hidden": 32}
TINY_MECH = {"width": 8, "hidden": 32, "latent": 4}


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead (and nondeterminism of timing)
    yield
    torch.set_num_threads(old)


def square_graph(channels: int = 3, size: int = 16):
    return graph_from_dict({
        "name": "squares",
        "variables": {"color": ["green", "red"], "big": ["no", "yes"]},
        "edges": ["color -> big"],
        "image": {"channels": channels, "size": size},
    })


class Squares:
    """Images uint8 [n, 3, 16, 16]: a 3x3 or 6x6 square in channel red (color=1) or green (0)."""

    def __init__(self, n: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.graph = square_graph()
        self.factors = rng.integers(0, 2, (n, 2)).astype(np.int64)
        self.pos = rng.integers(0, 10, (n, 2))
        self.images = self.render(self.factors, self.pos)

    @staticmethod
    def render(factors, pos):
        out = np.zeros((len(factors), 3, 16, 16), dtype=np.uint8)
        for i, ((color, big), (y, x)) in enumerate(zip(factors, pos)):
            s = 6 if big else 3
            out[i, 0 if color else 1, y:y + s, x:x + s] = 255
        return out

    def __len__(self):
        return len(self.factors)

    def __getitem__(self, i):
        return torch.from_numpy(self.images[i] / 255.0).float(), torch.from_numpy(self.factors[i])


class ItemsOnly:
    """A data set without array attributes: exercises the generic __getitem__ batching path."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


@pytest.fixture(scope="module")
def squares():
    return Squares(384, seed=0)


@pytest.fixture(scope="module")
def trained(squares):
    torch.set_num_threads(1)
    lab, lab_metrics = train_labeller(squares, squares.graph, epochs=6, seed=0, batch_size=32, **TINY_LAB)
    mech, mech_metrics = train_image_mechanism(squares, squares.graph, lab, epochs=8, seed=0, batch_size=32,
                                               lr=3e-3, **TINY_MECH)
    return lab, mech, lab_metrics, mech_metrics


def _same_params(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- shapes and types ----------------------------------------------------------------------------

@pytest.mark.parametrize("channels,size", [(3, 28), (1, 28), (3, 64), (1, 16)])
def test_shapes(channels, size):
    g = square_graph(channels, size)
    mech = ImageMechanism.for_graph(g, **TINY_MECH)
    lab = Labeller.for_graph(g, **TINY_LAB)
    x = np.random.default_rng(0).integers(0, 256, (5, channels, size, size)).astype(np.uint8)
    v = np.array([[0, 1], [1, 0], [1, 1], [0, 0], [1, 0]])
    p = lab.predict(x)
    assert p.shape == (5, 2) and p.dtype == np.int64
    assert all(len(q) == 5 for q in lab.predict_proba(x))
    u = mech.abduct(x, v)
    assert u.shape == (5, 4) and isinstance(u, np.ndarray)
    y = mech.decode(v, u)
    assert y.shape == (5, channels, size, size) and y.dtype == np.float32
    assert 0.0 <= y.min() and y.max() <= 1.0
    # torch in, torch out; float images in [0, 1] are read like uint8 ones
    xt = torch.from_numpy(x)
    assert torch.equal(lab.predict(xt), torch.from_numpy(p))
    assert torch.allclose(mech.abduct(xt.float() / 255, torch.from_numpy(v)), torch.from_numpy(u), atol=1e-5)
    assert mech.edit(xt, torch.from_numpy(v), torch.from_numpy(v)).shape == (5, channels, size, size)
    assert mech.sample(v, generator=torch.Generator().manual_seed(0)).shape == (5, channels, size, size)


def test_empty_batches():
    g = square_graph()
    mech, lab = ImageMechanism.for_graph(g, **TINY_MECH), Labeller.for_graph(g, **TINY_LAB)
    x, v = np.zeros((0, 3, 16, 16), np.uint8), np.zeros((0, 2), np.int64)
    assert lab.predict(x).shape == (0, 2)
    assert mech.decode(v, mech.abduct(x, v)).shape == (0, 3, 16, 16)


def test_bad_inputs_are_refused():
    g = square_graph()
    mech, lab = ImageMechanism.for_graph(g, **TINY_MECH), Labeller.for_graph(g, **TINY_LAB)
    x = np.zeros((2, 3, 16, 16), np.uint8)
    with pytest.raises(ValueError, match="factors must be"):
        mech.abduct(x, np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match="out of range"):
        mech.decode(np.array([[0, 2], [0, 0]]), np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="images must be"):
        lab.predict(np.zeros((2, 1, 16, 16), np.uint8))
    with pytest.raises(ValueError, match="cannot be halved"):
        ImageMechanism(["a"], [2], 3, 7)
    with pytest.raises(TypeError, match="unknown training option"):
        train_labeller(Squares(8), square_graph(), epochs=1, widht=3)


# -- configuration and state round trip ----------------------------------------------------------

def test_config_state_round_trip(tmp_path, trained, squares):
    lab, mech, _, _ = trained
    for model, cls in ((lab, Labeller), (mech, ImageMechanism)):
        cfg = json.loads(json.dumps(model.config()))
        path = save_checkpoint(tmp_path / f"{cls.__name__}.safetensors", model.state_dict(), squares.graph, cfg)
        ck = load_checkpoint(path)
        again = cls.from_config(ck.config)
        again.load_state_dict(ck.tensors)
        assert _same_params(model, again)
    x, v = squares.images[:16], squares.factors[:16]
    again_mech = ImageMechanism.from_config(mech.config())
    again_mech.load_state_dict(mech.state_dict())
    np.testing.assert_array_equal(again_mech.decode(v, again_mech.abduct(x, v)), mech.decode(v, mech.abduct(x, v)))
    with pytest.raises(ValueError, match="unknown image mechanism kind"):
        ImageMechanism.from_config({**mech.config(), "kind": "gan"})


# -- determinism and resume ----------------------------------------------------------------------

def test_same_seed_same_model_other_seed_other_model(squares):
    small = Squares(96, seed=3)
    a, _ = train_labeller(small, small.graph, epochs=1, seed=5, batch_size=32, **TINY_LAB)
    b, _ = train_labeller(small, small.graph, epochs=1, seed=5, batch_size=32, **TINY_LAB)
    c, _ = train_labeller(small, small.graph, epochs=1, seed=6, batch_size=32, **TINY_LAB)
    assert _same_params(a, b) and not _same_params(a, c)
    m1, _ = train_image_mechanism(small, small.graph, a, epochs=1, seed=5, batch_size=32, **TINY_MECH)
    m2, _ = train_image_mechanism(small, small.graph, a, epochs=1, seed=5, batch_size=32, **TINY_MECH)
    assert _same_params(m1, m2)


@pytest.mark.parametrize("which", ["labeller", "mechanism"])
def test_resume_equals_uninterrupted(which, tmp_path):
    ds = Squares(96, seed=4)
    lab, _ = train_labeller(ds, ds.graph, epochs=1, seed=0, batch_size=32, **TINY_LAB)

    def run(epochs, state=None, on_epoch=None):
        if which == "labeller":
            return train_labeller(ds, ds.graph, epochs=epochs, seed=1, batch_size=32, state=state,
                                  on_epoch=on_epoch, **TINY_LAB)
        return train_image_mechanism(ds, ds.graph, lab, epochs=epochs, seed=1, batch_size=32, state=state,
                                     on_epoch=on_epoch, **TINY_MECH)

    full, full_metrics = run(3)
    states = []

    class Killed(Exception):
        pass

    def checkpoint_then_die(state):  # the run is interrupted right after its first checkpoint
        states.append(state)
        raise Killed

    with pytest.raises(Killed):
        run(3, on_epoch=checkpoint_then_die)
    assert len(states) == 1 and states[0]["epoch"] == 1 and states[0]["step"] == 3
    # the state survives a safe save/load (no pickled code)
    torch.save(states[0], tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    resumed, resumed_metrics = run(3, state=state)
    assert _same_params(full, resumed)
    assert resumed_metrics["steps"] == full_metrics["steps"] == 9
    assert resumed_metrics["loss"] == pytest.approx(full_metrics["loss"])


def test_resume_refuses_another_config():
    ds = Squares(32)
    states = []
    train_labeller(ds, ds.graph, epochs=1, seed=0, on_epoch=states.append, **TINY_LAB)
    with pytest.raises(ValueError, match="cannot resume"):
        train_labeller(ds, ds.graph, epochs=2, seed=0, state=states[0], width=4, hidden=32)


def test_progress_and_item_path():
    ds = Squares(70, seed=1)
    seen = []
    _, metrics = train_labeller(ItemsOnly(ds), ds.graph, epochs=2, seed=0, batch_size=32,
                                progress=lambda s, t, m: seen.append((s, t, m)), **TINY_LAB)
    assert seen and seen[-1][0] == seen[-1][1] == 6 == metrics["steps"]
    assert {"epoch", "loss", "acc_color", "acc_big"} <= set(seen[-1][2])
    # the generic path gives the same model as the array fast path
    a, _ = train_labeller(ds, ds.graph, epochs=2, seed=0, batch_size=32, **TINY_LAB)
    b, _ = train_labeller(ItemsOnly(ds), ds.graph, epochs=2, seed=0, batch_size=32, **TINY_LAB)
    assert _same_params(a, b)


# -- it learns -----------------------------------------------------------------------------------

def test_labeller_learns_separable_task(trained):
    lab, _, metrics, _ = trained
    fresh = Squares(256, seed=11)
    acc = (lab.predict(fresh.images) == fresh.factors).mean(0)
    assert acc.min() >= 0.95, acc
    assert metrics["acc_color"] > 0.9 and metrics["seconds"] > 0


def test_conditioning_moves_the_ink(trained):
    """Editing color must move the square to the other channel, not keep it where the latent says."""
    _, mech, _, _ = trained
    fresh = Squares(128, seed=12)
    cf = fresh.factors.copy()
    cf[:, 0] = 1 - cf[:, 0]
    out = mech.edit(fresh.images, fresh.factors, cf)
    red, green = out[:, 0].sum((1, 2)), out[:, 1].sum((1, 2))
    moved = np.where(cf[:, 0] == 1, red > green, green > red)
    assert moved.mean() >= 0.95
    # the null edit keeps the ink where it was and roughly reproduces the input
    null = mech.edit(fresh.images, fresh.factors, fresh.factors)
    assert np.abs(null - fresh.images / 255.0).mean() < 0.1


# -- the real data (slow) ------------------------------------------------------------------------

@pytest.mark.slow
def test_labeller_on_barmnist(mnist_root):
    from cfedit.data import BarMNIST

    train = BarMNIST("backdoor", "train", n=20000, seed=0, root=mnist_root)
    test = BarMNIST("backdoor", "test", n=1000, seed=0, root=mnist_root)
    lab, _ = train_labeller(train, train.graph, epochs=2, seed=0)
    acc = (lab.predict(test.images) == test.factors).mean(0)
    assert acc[train.graph.axis("digit")] > 0.95 and acc.min() > 0.95, acc


def test_adversarial_option_trains_a_discriminator_and_resumes_exactly(tmp_path):
    """adv_weight > 0: the discriminator trains alongside, is saved in the resume state, and an
    interrupted run resumed from that state equals the uninterrupted one."""
    import torch

    from cfedit.causal.graph_file import graph_from_dict
    from cfedit.image import train_image_mechanism

    g = graph_from_dict({"name": "sq", "variables": {"a": ["x", "y"]}, "edges": [],
                         "image": {"channels": 3, "size": 16}})
    rng = np.random.default_rng(0)

    class DS:
        factors = rng.integers(0, 2, (64, 1))
        images = (rng.random((64, 3, 16, 16)) * 255).astype(np.uint8)

        def __len__(self):
            return 64

    opts = dict(batch_size=32, width=8, hidden=16, latent=4, adv_weight=5.0, attr_weight=0.0)
    states = []
    full, m = train_image_mechanism(DS(), g, None, epochs=2, seed=3, on_epoch=states.append, **opts)
    assert "aux" in states[0] and "d_loss" in m and "g_adv" in m
    first = torch.load(_roundtrip(states[0], tmp_path), weights_only=True)
    resumed, _ = train_image_mechanism(DS(), g, None, epochs=2, seed=3, state=first, **opts)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def _roundtrip(state, tmp_path):
    import torch

    p = tmp_path / "s.pt"
    torch.save(state, p)
    return p
