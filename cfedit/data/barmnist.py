"""Colored MNIST with a bar on top: the image mechanism of the ground-truth world.

An image is 3x28x28 uint8, made from the factors (digit, color, bar) and an image noise U_I:

- U_I ~ Uniform[0, 1) picks the handwriting exemplar: the k-th MNIST image of the digit's class in
  the split, k = floor(U_I * n_class). The same U_I thus gives a definite exemplar for *every* digit,
  so the ground-truth counterfactual image exists even when the digit is intervened on.
- The ink goes in the red channel when color = red and in the green channel when color = green; the
  other channels stay 0, except that bar = yes sets the blue channel of rows 0-3 to 255.

Because the world is this simple, color and bar have exact pixel oracles (:func:`oracle_color`,
:func:`oracle_bar`), used to label generated images and to check edits.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from cfedit.errors import DataError
from cfedit.data.mnist import load_mnist
from cfedit.causal.pv import as_pv
from cfedit.progress import Progress
from cfedit.files import atomic_write_bytes, read_regular
from cfedit.imageio import image_grid, png_bytes
from cfedit.causal.graph import CausalGraph
from cfedit.causal.graph_file import load_graph
from cfedit.causal.scm import SCM, builtin_scm

SETTINGS = ("backdoor", "frontdoor")
SPLITS = ("train", "test")
BAR_ROWS = 4  # rows 0..3 carry the bar
#: Factors the pixels decide exactly (:func:`oracle_factors` reads them).
ORACLE_FACTORS = ("color", "bar")
#: Factors whose intervention keeps the handwriting exemplar (a digit intervention draws another
#: class's exemplar), so the ground-truth counterfactual image is comparable pixelwise.
EXACT_COUNTERFACTUALS = ("color", "bar")
# color and bar value indices in the shipped graphs: color [green, red], bar [no, yes]
GREEN, RED = 0, 1
NO, YES = 0, 1
#: Most units of one data set: its images are held in memory (2.3 KiB each, 2.2 GiB at the cap).
MAX_IMAGES = 1_000_000


# --------------------------------------------------------------------------------------------
# Rendering and pixel oracles
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Exemplars:
    """One MNIST split grouped by class: ``order[start[c] + k]`` is the k-th image of class c."""

    images: np.ndarray  # [N, 28, 28] uint8
    order: np.ndarray   # [N] indices into images, grouped by class, split order within a class
    start: np.ndarray   # [10]
    count: np.ndarray   # [10]

    @staticmethod
    def of(images: np.ndarray, labels: np.ndarray) -> "_Exemplars":
        order = np.argsort(labels, kind="stable")
        count = np.bincount(labels, minlength=10)
        start = np.concatenate([[0], np.cumsum(count)[:-1]])
        return _Exemplars(images, order, start, count)

    def index(self, digit: np.ndarray, u_image: np.ndarray) -> np.ndarray:
        """MNIST index of the exemplar: the floor(u * n_class)-th image of class ``digit``."""
        digit = np.asarray(digit, dtype=np.int64)
        n = self.count[digit]
        k = np.minimum(np.floor(np.asarray(u_image, dtype=np.float64) * n).astype(np.int64), n - 1)
        return self.order[self.start[digit] + k]


def render_barmnist(digit: np.ndarray, color: np.ndarray, bar: np.ndarray, u_image: np.ndarray,
                    mnist_images: np.ndarray, mnist_labels: np.ndarray) -> np.ndarray:
    """Images uint8 [n, 3, 28, 28] from digit classes (0-9), color (0 green, 1 red), bar (0/1)."""
    ex = _Exemplars.of(mnist_images, mnist_labels)
    return _render(ex, np.asarray(digit), np.asarray(color), np.asarray(bar), np.asarray(u_image))


def _render(ex: _Exemplars, digit, color, bar, u_image) -> np.ndarray:
    n = len(digit)
    out = np.zeros((n, 3, 28, 28), dtype=np.uint8)
    ink = ex.images[ex.index(digit, u_image)]
    channel = np.where(np.asarray(color) == RED, 0, 1)
    out[np.arange(n), channel] = ink
    out[np.asarray(bar) == YES, 2, :BAR_ROWS, :] = 255
    return out


def _scale(images) -> float:
    """255 for uint8 images, 1 for float images in [0, 1]."""
    dt = getattr(images, "dtype", None)
    return 255.0 if str(dt).endswith("uint8") else 1.0


def oracle_color(images):
    """Color index (0 green, 1 red) of each image [n, 3, H, W]: the channel holding more ink.

    Vectorised; numpy or torch, uint8 or float in [0, 1]; returns int64 of the same library.
    """
    if _is_torch(images):
        x = images.float()
        return (x[:, 0].sum((1, 2)) > x[:, 1].sum((1, 2))).long()
    x = np.asarray(images, dtype=np.float32)
    return (x[:, 0].sum((1, 2)) > x[:, 1].sum((1, 2))).astype(np.int64)


def oracle_bar(images):
    """Bar index (0 no, 1 yes) of each image [n, 3, H, W]: the blue channel of the top rows is lit."""
    half = _scale(images) / 2
    if _is_torch(images):
        return (images[:, 2, :BAR_ROWS].float().mean((1, 2)) > half).long()
    x = np.asarray(images)
    return (x[:, 2, :BAR_ROWS].astype(np.float32).mean((1, 2)) > half).astype(np.int64)


def oracle_factors(images, graph: CausalGraph) -> dict[str, Any]:
    """The factors the pixels determine exactly ({"color": ..., "bar": ...}), as value indices."""
    out = {}
    if "color" in graph:
        out["color"] = oracle_color(images)
    if "bar" in graph:
        out["bar"] = oracle_bar(images)
    return out


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


# --------------------------------------------------------------------------------------------
# The data set
# --------------------------------------------------------------------------------------------

class BarMNIST:
    """Colored MNIST with bars, sampled from a ground-truth SCM: factors, noise and images.

    Units are drawn deterministically from ``seed`` (and the split, so train and test units differ):
    exogenous u_V from the SCM, then U_I. Attributes: ``graph``, ``scm``, ``factors`` (int64 [n, k]
    in ``graph.names`` order), ``noise`` (the SCM's exogenous arrays plus ``"u_image"``), ``images``
    (uint8 [n, 3, 28, 28]). Items are ``(float image in [0, 1], long factors)`` for a DataLoader.
    """

    def __init__(self, setting: str = "backdoor", split: str = "train", n: int = 60000, seed: int = 0,
                 root: str | Path | None = None, graph: CausalGraph | None = None):
        if setting not in SETTINGS:
            raise DataError(f"unknown BarMNIST setting {setting!r} (use {' or '.join(SETTINGS)})")
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r} (use train or test)")
        if not 1 <= int(n) <= MAX_IMAGES:
            raise DataError(f"the number of images must be from 1 to {MAX_IMAGES:,}, got {n}")
        self.setting, self.split, self.n, self.seed = setting, split, int(n), int(seed)
        self.graph = graph or load_graph(setting)
        _check_graph(self.graph)
        self.scm: SCM = builtin_scm(setting, self.graph)
        mnist_images, mnist_labels = load_mnist(split, root)
        self._ex = _Exemplars.of(mnist_images, mnist_labels)
        ss = np.random.SeedSequence([self.seed, SPLITS.index(split)])
        rng_v, rng_i = (np.random.default_rng(s) for s in ss.spawn(2))
        self.noise: dict[str, np.ndarray] = self.scm.sample_exogenous(self.n, rng_v)
        self.noise["u_image"] = rng_i.random(self.n)
        self.factors: np.ndarray = self.scm.evaluate(self._u_v(slice(None)))
        self.images: np.ndarray = self.render(self.factors, self.noise["u_image"])

    # -- the image mechanism ------------------------------------------------------------------

    def render(self, factors: np.ndarray, u_image: np.ndarray) -> np.ndarray:
        """Images uint8 [m, 3, 28, 28] of factor value indices [m, k] with image noise [m]."""
        factors = np.asarray(factors, dtype=np.int64).reshape(-1, len(self.graph.names))
        g = self.graph
        digit = np.asarray([int(v) for v in g["digit"].values])[factors[:, g.axis("digit")]]
        color = factors[:, g.axis("color")]
        bar = factors[:, g.axis("bar")]
        return _render(self._ex, digit, color, bar, np.asarray(u_image, dtype=np.float64).reshape(-1))

    def exemplar_index(self, digit: np.ndarray, u_image: np.ndarray) -> np.ndarray:
        """Index into the MNIST split of the handwriting exemplar for digit classes and U_I."""
        return self._ex.index(np.asarray(digit), np.asarray(u_image))

    def counterfactual(self, indices, do: Mapping[str, int | str]) -> tuple[np.ndarray, np.ndarray]:
        """The exact ground-truth counterfactual of units ``indices`` under ``do``.

        Same u_V and U_I as the factual units, with do() applied: (factors [m, k], images uint8).
        Values in ``do`` are labels (``"red"``) or value indices.
        """
        idx = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        try:
            factors = self.scm.evaluate(self._u_v(idx), do)
        except (ValueError, KeyError) as e:  # GraphError is a ValueError
            raise DataError(f"bad intervention {dict(do)!r}: {e}") from None
        return factors, self.render(factors, self.noise["u_image"][idx])

    def _u_v(self, idx) -> dict[str, np.ndarray]:
        return {k: v[idx] for k, v in self.noise.items() if k != "u_image"}

    # -- data-set interface -------------------------------------------------------------------

    def pv(self) -> np.ndarray:
        """Empirical P(V) of the units, over ``graph.names``."""
        return as_pv(self.graph, self.factors)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        import torch

        return (torch.from_numpy(self.images[i].astype(np.float32) / 255.0),
                torch.from_numpy(np.array(self.factors[i], dtype=np.int64)))

    def __repr__(self) -> str:
        return f"BarMNIST(setting={self.setting!r}, split={self.split!r}, n={self.n}, seed={self.seed})"


def _check_graph(graph: CausalGraph) -> None:
    want = {"digit": [str(d) for d in range(10)], "color": ["green", "red"], "bar": ["no", "yes"]}
    for name, values in want.items():
        if name not in graph or list(graph[name].values) != values:
            raise DataError(
                f"graph {graph.name!r} does not fit BarMNIST: it needs {name}: [{', '.join(values)}]"
            )


# --------------------------------------------------------------------------------------------
# Writing a data set to disk
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WriteSummary:
    out: Path
    setting: str
    split: str
    n: int
    seed: int
    labels: Path
    exogenous: Path
    grid: Path
    seconds: float
    kept: int = 0  # images an interrupted run had written, kept by ``resume``


#: Written first into a data folder: what the run makes, so that ``resume`` finishes that run exactly.
RUN_FILE = ".cfedit-barmnist.json"
_FILES = r"\d{6,}\.png|labels\.csv|exogenous\.csv|grid\.png"
_TEMP = re.compile(rf"^\.({_FILES}|{re.escape(RUN_FILE)})\.[A-Za-z0-9_]+\.tmp$")  # atomic writes' temp files
_OURS = re.compile(rf"^({_FILES}|{re.escape(RUN_FILE)})$")
_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the chunk that ends every PNG


def write_barmnist(setting: str, n: int, split: str = "train", seed: int = 0, out: str | Path = "barmnist",
                   force: bool = False, root: str | Path | None = None, resume: bool = False,
                   progress: Progress | None = None) -> WriteSummary:
    """Write a BarMNIST data set as a labelled image folder.

    ``out`` gets :data:`RUN_FILE` first (setting, split, n, seed), then ``000000.png ...``, each written
    atomically, ``exogenous.csv`` (image_id and every u of the unit), ``grid.png`` (the first <= 64
    images) and, last, ``labels.csv`` (image_id and one column per factor, values as labels): a folder
    with a labels.csv is complete, and an interrupted one (Ctrl-C, a full disk) holds whole PNGs only.

    A non-empty ``out`` is refused unless ``force`` (only files this function writes are replaced) or
    ``resume``: an interrupted run with the same arguments is finished, its PNGs kept and the rest
    written, which gives the files an uninterrupted run writes.
    """
    t0 = time.perf_counter()
    if force and resume:
        raise DataError("--force starts afresh and --resume keeps an earlier run: choose one")
    out = Path(out)
    run = {"setting": setting, "split": split, "n": int(n), "seed": int(seed)}
    try:
        _check_destination(out, run, force, resume)
        ds = BarMNIST(setting, split, n, seed, root)
        if force or resume:
            _clear(out, keep_pngs=resume)
        atomic_write_bytes(out / RUN_FILE, json.dumps(run).encode())
        width = max(6, len(str(ds.n - 1)))
        ids = [f"{i:0{width}d}.png" for i in range(ds.n)]
        kept = 0
        report = progress or (lambda *a: None)
        for i, name in enumerate(ids):
            if i % 256 == 0:
                report("images", i, ds.n, {})
            if resume and _is_whole_png(out / name):
                kept += 1
                continue
            # not flushed one by one (milliseconds each): the durable labels.csv, written last, completes the set
            atomic_write_bytes(out / name, png_bytes(ds.images[i]), durable=False)
        atomic_write_bytes(out / "grid.png", png_bytes(image_grid(ds.images[:64])))
        atomic_write_bytes(out / "exogenous.csv", _exogenous_csv(ds, ids))
        atomic_write_bytes(out / "labels.csv", _labels_csv(ds, ids))
        report("images", ds.n, ds.n, {})
    except OSError as e:
        raise DataError(f"{e.filename or out}: cannot write the data set ({e.strerror or e})") from None
    return WriteSummary(out, setting, split, ds.n, seed, out / "labels.csv", out / "exogenous.csv",
                        out / "grid.png", time.perf_counter() - t0, kept)


def _check_destination(out: Path, run: dict, force: bool, resume: bool) -> None:
    """Refuse a folder this run may not write into."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a folder")
    if force or not out.is_dir() or not any(out.iterdir()):
        return
    earlier = _read_run(out)
    if resume:
        if earlier is None:
            raise DataError(f"{out}: no interrupted run to resume (no {RUN_FILE}); pass --force to overwrite it")
        if earlier != run:
            shown = ", ".join(f"{k} {earlier.get(k)}" for k in run)
            raise DataError(f"{out} holds a run of {shown}; resume it with the same arguments, or pass --force")
    elif earlier is not None and not (out / "labels.csv").exists():
        raise DataError(f"{out} holds an interrupted run (no labels.csv); pass --resume to finish it or --force "
                        f"to start afresh")
    else:
        raise DataError(f"{out} is not empty; choose another folder or pass --force to overwrite")


def _read_run(out: Path) -> dict | None:
    try:
        run = json.loads(read_regular(out / RUN_FILE, 4096, DataError, "run record"))
    except ValueError:  # missing, not a regular file, or not JSON (DataError is a ValueError)
        return None
    return run if isinstance(run, dict) else None


def _clear(out: Path, keep_pngs: bool) -> None:
    """Remove what an earlier run wrote (labels first, so the folder never looks complete); temp files
    of interrupted writes always go, whole PNGs stay when ``keep_pngs``."""
    if not out.is_dir():
        return
    (out / "labels.csv").unlink(missing_ok=True)
    for p in out.iterdir():
        ours = _OURS.match(p.name) and not (keep_pngs and p.suffix == ".png")
        if p.is_file() and (_TEMP.match(p.name) or ours):
            p.unlink()


def _is_whole_png(path: Path) -> bool:
    """A regular file ending in the PNG end chunk: written whole (an atomic write never leaves less;
    a writer without temp files could)."""
    try:
        if not path.is_file() or path.stat().st_size < len(_IEND) + 8:
            return False
        with open(path, "rb") as f:
            f.seek(-len(_IEND), 2)
            return f.read() == _IEND
    except OSError:
        return False


def _exogenous_csv(ds: BarMNIST, ids: list[str]) -> bytes:
    keys = [k for k in ds.noise if k != "u_image"] + ["u_image"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image_id", *keys])
    cols = [ds.noise[k] for k in keys]
    for i, name in enumerate(ids):
        w.writerow([name, *(_fmt(c[i]) for c in cols)])
    return buf.getvalue().encode()


def _labels_csv(ds: BarMNIST, ids: list[str]) -> bytes:
    g = ds.graph
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image_id", *g.names])
    labels = [np.asarray(g[v].values, dtype=object)[ds.factors[:, j]] for j, v in enumerate(g.names)]
    for i, name in enumerate(ids):
        w.writerow([name, *(lab[i] for lab in labels)])
    return buf.getvalue().encode()


def _fmt(x) -> str:
    if isinstance(x, (float, np.floating)):
        return repr(float(x))
    return str(int(x))
