"""The MNIST source: IDX files in torchvision's layout, read directly with numpy.

Where MNIST is looked for, in order: an explicit ``root`` (``--mnist-root`` on the command line),
the ``CFEDIT_DATA`` environment variable, then the user cache directory (``$XDG_CACHE_HOME/cfedit``
or ``~/.cache/cfedit``). A root is a torchvision root: the files live in ``<root>/MNIST/raw/``
(``<root>/raw/`` or ``<root>`` itself are accepted too). Each IDX file may be raw or ``.gz``.

Only the user cache directory is downloaded into (via torchvision) when the files are missing: a
root the user named explicitly that lacks the files is more likely a typo than a place to fill.
Decoded arrays are cached in-process, so a second data set over the same split costs nothing.
"""

from __future__ import annotations

import gzip
import os
import threading
from pathlib import Path

import numpy as np

from cfedit.errors import DataError

ENV_VAR = "CFEDIT_DATA"

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}
_CACHE: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
_LOCK = threading.Lock()


def default_cache_dir() -> Path:
    """The user cache directory of cfedit: ``$XDG_CACHE_HOME/cfedit`` or ``~/.cache/cfedit``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cfedit"


def mnist_root(root: str | Path | None = None) -> tuple[Path, str]:
    """(root, where it came from): the explicit root, else ``$CFEDIT_DATA``, else the cache dir."""
    if root is not None:
        return Path(root).expanduser(), "--mnist-root"
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser(), f"${ENV_VAR}"
    return default_cache_dir(), "the user cache directory"


def _raw_dir(root: Path) -> Path | None:
    """The folder under ``root`` that holds the MNIST IDX files, or None."""
    names = [f for img, lab, _ in _FILES.values() for f in (img, lab)]
    for d in (root / "MNIST" / "raw", root / "raw", root):
        if any((d / f).is_file() or (d / (f + ".gz")).is_file() for f in names):
            return d
    return None


def _find(d: Path, name: str) -> Path | None:
    for p in (d / name, d / (name + ".gz")):  # raw first: no decompression
        if p.is_file():
            return p
    return None


def _read_idx(path: Path, ndim: int, count: int) -> np.ndarray:
    """A uint8 IDX array (header ``0 0 8 ndim``, big-endian dims), checked for size."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read MNIST file ({e}); delete it and download again") from None
    header = 4 + 4 * ndim
    if len(data) < header or data[:4] != bytes((0, 0, 8, ndim)):
        raise DataError(f"{path}: not an MNIST IDX file (bad header); delete it and download again")
    dims = tuple(int(x) for x in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims))
    if dims[0] != count or len(data) != expected:
        raise DataError(
            f"{path}: corrupt MNIST file ({len(data)} bytes, dims {dims}; expected {count} items and "
            f"{expected} bytes); delete it and download again"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _download(root: Path) -> None:
    try:
        from torchvision.datasets import MNIST
    except ImportError:  # pragma: no cover - torchvision is a dependency
        raise DataError(f"MNIST not found under {root} and torchvision is not installed to download it") from None
    try:
        for train in (True, False):
            MNIST(str(root), train=train, download=True)
    except Exception as e:  # network errors come in many types
        raise DataError(
            f"MNIST not found under {root} and the download failed ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:200]}); "
            f"pass --mnist-root DIR or set {ENV_VAR}=DIR to a folder holding MNIST/raw/"
        ) from None


def load_mnist(split: str = "train", root: str | Path | None = None,
               download: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 28, 28], labels int64 [n]) of an MNIST split, read-only, cached in-process.

    ``download``: None (default) downloads only into the user cache directory; True downloads into
    any root; False never downloads. A missing or corrupt file raises :class:`DataError`.
    """
    if split not in _FILES:
        raise DataError(f"unknown MNIST split {split!r} (use train or test)")
    base, origin = mnist_root(root)
    if download is None:
        download = origin == "the user cache directory"
    d = _raw_dir(base)
    img_name, lab_name, count = _FILES[split]
    if d is None or _find(d, img_name) is None or _find(d, lab_name) is None:
        if download:
            _download(base)
            d = _raw_dir(base)
        if d is None or _find(d, img_name) is None or _find(d, lab_name) is None:
            raise DataError(
                f"MNIST {split} files not found: looked for {img_name}[.gz] and {lab_name}[.gz] in "
                f"{base / 'MNIST' / 'raw'} (root from {origin}); pass --mnist-root DIR or set "
                f"{ENV_VAR}=DIR to a folder holding MNIST/raw/, or run once with network access to "
                f"download it into {default_cache_dir()}"
            )
    img_path, lab_path = _find(d, img_name), _find(d, lab_name)
    key = (str(img_path.resolve()), split)
    with _LOCK:
        if key not in _CACHE:
            images = _read_idx(img_path, 3, count)
            labels = _read_idx(lab_path, 1, count).astype(np.int64)
            if images.shape[1:] != (28, 28):
                raise DataError(f"{img_path}: MNIST images must be 28x28, got {images.shape[1:]}")
            if labels.max() > 9:
                raise DataError(f"{lab_path}: corrupt MNIST labels (a label above 9)")
            images.flags.writeable = False
            labels.flags.writeable = False
            _CACHE[key] = (images, labels)
        return _CACHE[key]
