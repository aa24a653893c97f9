"""Where a graph's data comes from: its data set, its P(V) (one rule), and what else the data can tell.

- :func:`dataset_for_graph`: the images and factors a graph trains and evaluates on.
- :func:`observational_pv`: the P(V) that bounds are computed from — the one rule that ``cfedit
  bounds``, ``cfedit edit`` (the bounds in each JSON line) and ``cfedit eval`` follow.
- :func:`ground_truth`: what a data source knows beyond images and labels (factors its pixels decide
  exactly, interventions whose counterfactual image is known pixelwise), for ``eval``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cfedit.causal.graph import CausalGraph
from cfedit.causal.pv import as_pv
from cfedit.causal.scm import scm_for_graph, scm_name
from cfedit.data.barmnist import EXACT_COUNTERFACTUALS, ORACLE_FACTORS, BarMNIST
from cfedit.data.folder import ImageFolderDataset, folder_paths, heldout_split, load_labels, read_label_table
from cfedit.errors import DataError


def dataset_for_graph(graph: CausalGraph, split: str = "train", n: int | None = None, seed: int = 0,
                      data: str | Path | None = None, root: str | Path | None = None,
                      size: int | None = None, disk_cache: bool = False):
    """The data set a graph trains or evaluates on: a folder given by ``data``, else the graph's
    ``data:`` entry — ``{barmnist: backdoor}`` (generated; ``root`` is the MNIST root), or
    ``{folder: path}`` / ``{images: path, labels: path}`` (relative to the graph file; environment
    variables such as ``$CFEDIT_DATA`` are expanded).

    For folders, ``split`` picks :func:`heldout_split`'s rows and ``n`` a seeded subset of them.
    """
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r} (use train or test)")
    spec = dict(graph.data or {})
    if data is None and "barmnist" in spec:
        return BarMNIST(str(spec["barmnist"]), split, n or (60000 if split == "train" else 10000), seed,
                        root, graph=graph)
    images, labels = data_paths(graph, data)
    train, test = heldout_split(len(read_label_table(labels)))
    rows = train if split == "train" else test
    if n is not None and n < len(rows):
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(rows, size=int(n), replace=False))
    return ImageFolderDataset(graph, images, labels, size=size, indices=rows, disk_cache=disk_cache)


def data_paths(graph: CausalGraph, data: str | Path | None = None) -> tuple[Path, Path]:
    """(images, labels) of a labelled folder: ``data``, else the graph's ``data:`` folder entry."""
    spec = dict(graph.data or {})
    if data is not None:
        images, labels = folder_paths(data)
    elif "folder" in spec or "labels" in spec:
        base = Path(graph.source).parent if graph.source and Path(graph.source).is_file() else Path.cwd()
        def rel(x) -> Path:  # $VARIABLES and ~ expand (e.g. $CFEDIT_DATA/faces/celebahq64)
            text = os.path.expandvars(str(x))
            if "$" in text:
                raise DataError(f"{graph.source or graph.name}: data path {x!r} names an environment variable "
                                f"that is not set; set it or pass --data FOLDER")
            p = Path(os.path.expanduser(text))
            return p if p.is_absolute() else base / p
        if "folder" in spec:
            images, labels = folder_paths(rel(spec["folder"]))
        else:
            labels = rel(spec["labels"])
            images = rel(spec["images"]) if "images" in spec else folder_paths(labels)[0]
    else:
        raise DataError(f"graph {graph.name!r} names no data (no 'data:' entry); pass --data FOLDER "
                        f"with images and a labels.csv")
    return images, labels


def data_fingerprint(graph: CausalGraph, data: str | Path | None = None) -> str:
    """What a graph's data *is*, not where it lies: the SHA-256 of its label file's bytes and of its
    image list (names and sizes; a zip's members), or the graph's ``data:`` entry for generated data. Two
    folders with the same files share it; a changed label or an added image changes it."""
    import hashlib
    import zipfile

    spec = dict(graph.data or {})
    if data is None and "barmnist" in spec:
        return str(graph.data)
    images, labels = data_paths(graph, data)
    h = hashlib.sha256(Path(labels).read_bytes())
    if Path(images).is_file() and zipfile.is_zipfile(images):
        with zipfile.ZipFile(images) as z:
            listing = sorted(f"{i.filename}:{i.file_size}" for i in z.infolist() if not i.is_dir())
    else:
        listing = sorted(f"{f.relative_to(images).as_posix()}:{f.stat().st_size}" for f in Path(images).rglob("*")
                         if f.is_file() and f.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))
    h.update("\n".join(listing).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class ObservationalPV:
    """A P(V) with where it came from: ``source`` for people, ``exact`` when it is a known SCM's own."""

    pv: np.ndarray
    source: str
    exact: bool = False


def observational_pv(graph: CausalGraph, labels: str | Path | None = None, *, data: str | Path | None = None,
                     root: str | Path | None = None, fitted: np.ndarray | None = None) -> ObservationalPV:
    """The P(V) of a graph that bounds are computed from, by one rule, first match wins:

    1. ``labels`` (a label file): the empirical P(V) of its rows;
    2. the graph's own data (no ``data`` folder given) is a known SCM (Colored MNIST): its exact P(V);
    3. ``fitted`` (the P(V) a model was fitted to, i.e. of its training data): that, without reading
       the data again;
    4. the empirical P(V) of the training split of ``data`` (a folder) or of the graph's ``data:``.
    """
    if labels is not None:
        return ObservationalPV(as_pv(graph, load_labels(graph, labels)), f"empirical, {labels}")
    scm = scm_for_graph(graph) if data is None else None
    if scm is not None:
        return ObservationalPV(scm.joint(), f"exact, from the built-in SCM '{scm_name(graph)}'", exact=True)
    if fitted is not None:
        return ObservationalPV(np.asarray(fitted), "empirical, the training data the model was fitted to")
    if data is None and not graph.data:
        raise DataError(f"{graph.source or graph.name}: the graph has no 'data:' entry; give --data labels.csv")
    ds = dataset_for_graph(graph, split="train", data=data, root=root)
    return ObservationalPV(ds.pv(), f"empirical, {len(ds)} training rows of the graph's data")


@dataclass(frozen=True)
class GroundTruth:
    """What a data source knows beyond images and labels.

    ``oracle_factors``: factors its pixels decide exactly (read by pixel oracles instead of a
    classifier); ``exact_counterfactuals``: factors whose intervention has a known ground-truth
    counterfactual image (the data set's ``counterfactual(units, do)``)."""

    oracle_factors: tuple[str, ...] = ()
    exact_counterfactuals: tuple[str, ...] = ()


def ground_truth(graph: CausalGraph, data: str | Path | None = None) -> GroundTruth:
    """The :class:`GroundTruth` of the graph's own data (a ``data`` folder given instead has none)."""
    if data is None and "barmnist" in (graph.data or {}):
        return GroundTruth(tuple(n for n in ORACLE_FACTORS if n in graph),
                           tuple(n for n in EXACT_COUNTERFACTUALS if n in graph))
    return GroundTruth()
