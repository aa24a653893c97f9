"""Colored MNIST with bars: P(V), pixel oracles, exact counterfactuals, writing, determinism."""

import numpy as np
import pytest
from scipy import stats

from cfedit.data import DataError, load_labels
from cfedit.data.barmnist import BarMNIST, oracle_bar, oracle_color, write_barmnist
from cfedit.data.mnist import load_mnist


@pytest.fixture(scope="module", params=["backdoor", "frontdoor"])
def big(request, mnist_root):
    return BarMNIST(request.param, "train", n=60000, seed=0, root=mnist_root)


@pytest.fixture(scope="module")
def small_test(mnist_root):
    return BarMNIST("backdoor", "test", n=5000, seed=1, root=mnist_root)


def test_empirical_pv_matches_scm(big):
    """Chi-square goodness of fit of 60k generated units to the SCM's exact P(V): p > 0.001.

    Seed 0 is fixed, so the test is deterministic; cells of probability zero must stay empty.
    """
    exact = big.scm.joint().ravel()
    observed = np.bincount(np.ravel_multi_index(big.factors.T, big.graph.shape), minlength=exact.size)
    assert observed[exact == 0].sum() == 0
    pos = exact > 0
    expected = exact[pos] * len(big)
    assert expected.min() >= 5  # the chi-square approximation holds
    p = stats.chisquare(observed[pos], expected).pvalue
    assert p > 0.001, p
    assert np.allclose(big.pv().sum(), 1.0)


def test_shapes_and_item(big):
    assert big.images.shape == (60000, 3, 28, 28) and big.images.dtype == np.uint8
    assert big.factors.shape == (60000, 3) and big.factors.dtype == np.int64
    assert len(big) == 60000 and "u_image" in big.noise
    x, y = big[3]
    assert x.shape == (3, 28, 28) and x.dtype.is_floating_point and 0 <= x.min() and x.max() <= 1
    assert y.tolist() == big.factors[3].tolist()


def test_oracles_recover_color_and_bar(big, small_test):
    import torch

    for ds in (big, small_test):
        assert np.array_equal(oracle_color(ds.images), ds.factors[:, ds.graph.axis("color")])
        assert np.array_equal(oracle_bar(ds.images), ds.factors[:, ds.graph.axis("bar")])
    t = torch.from_numpy(small_test.images)
    assert torch.equal(oracle_color(t), torch.from_numpy(small_test.factors[:, 1]))
    assert torch.equal(oracle_bar(t.float() / 255), torch.from_numpy(small_test.factors[:, 2]))


def test_image_mechanism_layout(small_test, mnist_root):
    ds = small_test
    mnist, labels = load_mnist("test", mnist_root)
    ex = ds.exemplar_index(ds.factors[:, 0], ds.noise["u_image"])
    assert np.array_equal(labels[ex], ds.factors[:, 0])  # exemplars of the right class, test split
    for i in range(50):
        d, c, b = ds.factors[i]
        ink_ch, other = (0, 1) if c == 1 else (1, 0)
        assert np.array_equal(ds.images[i, ink_ch], mnist[ex[i]])
        assert not ds.images[i, other].any()
        assert (ds.images[i, 2, :4] == (255 if b else 0)).all() and not ds.images[i, 2, 4:].any()


def test_null_intervention_is_the_factual(small_test):
    idx = np.arange(0, 5000, 7)
    f, im = small_test.counterfactual(idx, {})
    assert np.array_equal(f, small_test.factors[idx])
    assert im.tobytes() == small_test.images[idx].tobytes()


def test_do_color_keeps_the_exemplar(small_test):
    ds = small_test
    idx = np.arange(300)
    f, im = ds.counterfactual(idx, {"color": "red"})
    assert (f[:, 1] == 1).all() and np.array_equal(f[:, 0], ds.factors[idx, 0])
    ink = np.where(ds.factors[idx, 1] == 1, 0, 1)
    factual_ink = ds.images[idx, ink]
    assert np.array_equal(im[:, 0], factual_ink)  # the same pixels, now in the red channel
    assert not im[:, 1].any()
    assert np.array_equal(oracle_bar(im), f[:, 2])


def test_do_digit_uses_the_same_u_image(small_test, mnist_root):
    ds = small_test
    idx = np.arange(300)
    f, im = ds.counterfactual(idx, {"digit": 8})
    assert (f[:, 0] == 8).all()
    assert np.array_equal(f[:, 1], ds.factors[idx, 1])  # color is no descendant of digit (backdoor)
    u = ds.noise["u_image"][idx]
    mnist, labels = load_mnist("test", mnist_root)
    eights = np.flatnonzero(labels == 8)  # the k-th eight of the test split, k = floor(u * n_8)
    expected = mnist[eights[np.floor(u * len(eights)).astype(int)]]
    ch = np.where(f[:, 1] == 1, 0, 1)
    assert np.array_equal(im[np.arange(len(idx)), ch], expected)
    # and it is the rendering of the counterfactual factors with the same noise
    assert np.array_equal(im, ds.render(f, u))
    with pytest.raises(DataError):
        ds.counterfactual(idx, {"color": "blue"})


def test_same_seed_same_data(mnist_root):
    a = BarMNIST("backdoor", "train", 2000, seed=5, root=mnist_root)
    b = BarMNIST("backdoor", "train", 2000, seed=5, root=mnist_root)
    c = BarMNIST("backdoor", "train", 2000, seed=6, root=mnist_root)
    t = BarMNIST("backdoor", "test", 2000, seed=5, root=mnist_root)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.factors, b.factors)
    assert all(np.array_equal(a.noise[k], b.noise[k]) for k in a.noise)
    assert not np.array_equal(a.images, c.images) and not np.array_equal(a.factors, c.factors)
    assert not np.array_equal(a.images, t.images)


def test_bad_arguments(mnist_root):
    with pytest.raises(DataError, match="setting"):
        BarMNIST("sideways", root=mnist_root)
    with pytest.raises(DataError, match="split"):
        BarMNIST("backdoor", "valid", root=mnist_root)


def test_write_barmnist(tmp_path, mnist_root):
    out = tmp_path / "bm"
    s = write_barmnist("frontdoor", 40, "test", seed=3, out=out, root=mnist_root)
    pngs = sorted(out.glob("0*.png"))
    assert len(pngs) == 40 and pngs[0].name == "000000.png"
    assert s.labels.is_file() and s.exogenous.is_file() and s.grid.is_file() and s.n == 40
    ds = BarMNIST("frontdoor", "test", 40, seed=3, root=mnist_root)
    assert np.array_equal(load_labels(ds.graph, s.labels), ds.factors)
    header = s.exogenous.read_text().splitlines()[0].split(",")
    assert header[0] == "image_id" and "u_image" in header and "u_digit" in header
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(pngs[5])).transpose(2, 0, 1), ds.images[5])
    with pytest.raises(DataError, match="not empty"):
        write_barmnist("frontdoor", 10, "test", seed=3, out=out, root=mnist_root)
    s2 = write_barmnist("frontdoor", 10, "test", seed=3, out=out, force=True, root=mnist_root)
    assert len(list(out.glob("0*.png"))) == 10 and len(load_labels(ds.graph, s2.labels)) == 10
