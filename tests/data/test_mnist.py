"""The MNIST source: IDX reading, root resolution, errors for missing or corrupt files."""

import gzip

import numpy as np
import pytest

from cfedit.data import DataError
from cfedit.data.mnist import load_mnist, mnist_root


def test_real_mnist_shapes_and_labels(mnist_root):
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = load_mnist(split, mnist_root)
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (n,) and set(np.unique(labels)) == set(range(10))
        assert not images.flags.writeable
    # cached in-process: the same arrays come back
    assert load_mnist("test", mnist_root)[0] is load_mnist("test", mnist_root)[0]


def test_missing_root_names_the_path(tmp_path):
    where = tmp_path / "nowhere"
    with pytest.raises(DataError) as e:
        load_mnist("train", where)
    msg = str(e.value)
    assert str(where) in msg and "--mnist-root" in msg and "CFEDIT_DATA" in msg
    assert "\n" not in msg
    assert not where.exists()  # an explicit root is never downloaded into


def test_env_var_root(tmp_path, monkeypatch):
    monkeypatch.setenv("CFEDIT_DATA", str(tmp_path))
    assert mnist_root(None)[0] == tmp_path
    with pytest.raises(DataError, match=str(tmp_path)):
        load_mnist("test", download=False)


def _write_idx(path, arr, gz=False):
    header = bytes((0, 0, 8, arr.ndim)) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def test_gz_and_raw_files_and_corruption(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (10000, 28, 28), dtype=np.uint8)
    labs = np.arange(10000) % 10
    _write_idx(raw / "t10k-images-idx3-ubyte", imgs, gz=True)
    _write_idx(raw / "t10k-labels-idx1-ubyte", labs)
    images, labels = load_mnist("test", tmp_path)
    assert np.array_equal(images, imgs) and np.array_equal(labels, labs)

    bad = tmp_path / "bad"
    (bad / "MNIST" / "raw").mkdir(parents=True)
    _write_idx(bad / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", labs)
    (bad / "MNIST" / "raw" / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load_mnist("test", bad)
