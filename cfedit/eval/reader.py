"""The independent reader of ``cfedit eval``: reads factors off edited images, never a model's own labeller.

Pixel oracles where the graph's data decides a factor exactly (:func:`cfedit.data.ground_truth`), and
a classifier trained separately from every model's labeller (other seed, other data units and order,
another width) for the rest; its penultimate layer is the feature space of FID/KID. It follows the
graph file's ``reader:`` recipe and is cached per graph and recipe (:func:`load_or_train_reader`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cfedit.causal.graph import CausalGraph
from cfedit.causal.recipes import recipe_problem
from cfedit.errors import GraphError
from cfedit.progress import Progress

#: Defaults of the reader's classifier: another hidden width and seed than the models' labellers
#: (32/128, seed 0), its own BarMNIST units (the training split drawn with this seed), trained longer
#: (then cached; docs/decisions.md has its accuracy when chosen).
READER_DEFAULTS = {"n": 40000, "epochs": 6, "seed": 7919, "width": 32, "hidden": 160, "n_test": 2000}
#: Reader options besides those (a graph file's ``reader:`` recipe may set any of them): ``mirror``
#: reads each image and its left-right mirror and averages the probabilities (faces, never digits),
#: plus the classifier's training options (:data:`cfedit.image.train.LABELLER_DEFAULTS`: flip, shift...).
READER_EXTRA = ("mirror",)
READER_KIND = "cfedit-reader/1"


@dataclass
class ReaderInfo:
    """What the reader is, for the report: which factors the pixel oracles read, the classifier, how it
    was trained, its accuracy on held-out real test images (``test_accuracy``: the reader as used,
    oracles included; ``classifier_accuracy``: the classifier alone), where it came from."""

    oracle: list[str]
    classifier: dict
    train: dict
    test_accuracy: dict[str, float]
    classifier_accuracy: dict[str, float]
    feature_dim: int
    source: str  # "trained", "cache" or "file"
    path: str | None
    seconds: float

    def describe(self) -> str:
        cls = [n for n in self.test_accuracy if n not in self.oracle]
        parts = []
        if self.oracle:
            parts.append(f"pixel oracles for {', '.join(self.oracle)}")
        if cls:
            mirror = ", mirror-averaged" if self.train.get("mirror") else ""
            parts.append(f"classifier (Labeller width {self.classifier.get('width')}, hidden "
                         f"{self.classifier.get('hidden')}, seed {self.train.get('seed')}, "
                         f"{self.train.get('n')} images, {self.train.get('epochs')} epochs{mirror}) "
                         f"for {', '.join(cls)}")
        acc = ", ".join(f"{k} {v:.3f}" for k, v in self.test_accuracy.items())
        return f"{'; '.join(parts)} — test accuracy {acc}"


class Reader:
    """Reads factors off images independently of any model: pixel oracles for ``oracle`` factors, the
    separately trained ``classifier`` (a :class:`cfedit.image.Labeller`) for the others; its
    penultimate layer (the input of the heads) is the feature space of FID/KID. With ``mirror`` the
    classifier reads each image and its left-right mirror and averages the probabilities (for faces:
    fewer readings flip on a borderline face; FID/KID features stay those of the image itself)."""

    def __init__(self, graph: CausalGraph, classifier, oracle: Sequence[str] = (), info: ReaderInfo | None = None,
                 mirror: bool = False):
        self.graph = graph
        self.classifier = classifier.eval()
        self.oracle = tuple(o for o in oracle if o in graph)
        self.info = info
        self.mirror = bool(mirror)

    def read(self, images) -> np.ndarray:
        """Factor value indices int64 [n, k] of uint8 images [n, C, S, S]."""
        from cfedit.data import oracle_factors

        images = np.asarray(images)
        if self.mirror:
            both = zip(self.classifier.predict_proba(images),
                       self.classifier.predict_proba(np.ascontiguousarray(images[..., ::-1])))
            v = np.stack([np.asarray(a + b).argmax(1) for a, b in both], 1).astype(np.int64)
        else:
            v = np.asarray(self.classifier.predict(images), dtype=np.int64)
        if self.oracle and len(images):
            for name, val in oracle_factors(images, self.graph).items():
                if name in self.oracle:
                    v[:, self.graph.axis(name)] = np.asarray(val)
        return v

    def features(self, images, batch_size: int = 1024) -> np.ndarray:
        """Penultimate-layer features float64 [n, d] of the classifier (the input of its heads)."""
        captured: list = []
        head = self.classifier.heads[0]
        handle = head.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach().float().cpu()))
        try:
            self.classifier.predict(np.asarray(images), batch_size=batch_size)
        finally:
            handle.remove()
        if not captured:
            return np.zeros((0, head.in_features))
        import torch

        return torch.cat(captured).numpy().astype(np.float64)

    def check_independent(self, model, name: str = "model") -> None:
        """Refuse to measure a model with its own labeller (the same object or the same weights)."""
        lab = getattr(model, "labeller", None)
        if lab is not None:
            self._check_not(lab, f"{name}'s own labeller")

    def _check_not(self, lab, what: str) -> None:
        if lab is self.classifier:
            raise ValueError(f"the reader's classifier is {what}; eval needs an independent reader")
        try:
            same_cfg = lab.config() == self.classifier.config()
        except AttributeError:
            same_cfg = False
        if same_cfg:
            a, b = lab.state_dict(), self.classifier.state_dict()
            if a.keys() == b.keys() and all(a[k].shape == b[k].shape and bool((a[k] == b[k]).all()) for k in a):
                raise ValueError(f"the reader's classifier has the same weights as {what}; "
                                 "eval needs an independently trained reader")


def _oracle_names(graph: CausalGraph, oracle: bool | None) -> tuple[str, ...]:
    """The factors pixel oracles read: those the graph's data decides exactly, unless ``oracle`` is False
    (None: automatic; True: on wherever the data has them)."""
    from cfedit.data import ground_truth

    return ground_truth(graph).oracle_factors if oracle is not False else ()


def _accuracy(pred: np.ndarray, true: np.ndarray, graph: CausalGraph) -> dict[str, float]:
    return {n: round(float((pred[:, j] == true[:, j]).mean()), 6) for j, n in enumerate(graph.names)}


def train_reader(graph: CausalGraph, n: int = READER_DEFAULTS["n"], epochs: int = READER_DEFAULTS["epochs"],
                 seed: int = READER_DEFAULTS["seed"], data: str | Path | None = None, root: str | Path | None = None,
                 device: str = "cpu", progress: Progress | None = None, n_test: int = READER_DEFAULTS["n_test"],
                 oracle: bool | None = None, width: int = READER_DEFAULTS["width"],
                 hidden: int = READER_DEFAULTS["hidden"], mirror: bool = False, **labeller_options) -> Reader:
    """Train the independent reader of a graph: a classifier on ``n`` training-split images drawn with
    ``seed`` (other units and another order than a model's fit), plus pixel oracles (``oracle``:
    None = automatic, on for Colored-MNIST graphs); ``mirror``: see :class:`Reader`. Its accuracy on
    ``n_test`` real test images goes into ``reader.info``."""
    from cfedit.data import dataset_for_graph
    from cfedit.image import train_labeller

    t0 = time.perf_counter()
    train = dataset_for_graph(graph, "train", n, seed, data, root)
    report = progress or (lambda *a: None)
    clf, _ = train_labeller(train, graph, epochs=epochs, device=device, seed=seed, width=width, hidden=hidden,
                            progress=lambda s, t, m: report("reader", s, t, m), **labeller_options)
    clf = clf.to("cpu").eval()
    reader = Reader(graph, clf, _oracle_names(graph, oracle), mirror=mirror)
    test = dataset_for_graph(graph, "test", n_test, seed + 1, data, root)
    cfg = {"n": len(train), "epochs": epochs, "seed": seed, "data": str(data) if data else (graph.data or None),
           "options": dict(labeller_options), **({"mirror": True} if mirror else {})}
    reader.info = ReaderInfo(
        oracle=list(reader.oracle), classifier=clf.config(), train=cfg,
        test_accuracy=_accuracy(reader.read(test.images), test.factors, graph),
        classifier_accuracy=_accuracy(np.asarray(clf.predict(test.images)), test.factors, graph),
        feature_dim=int(clf.heads[0].in_features), source="trained", path=None,
        seconds=round(time.perf_counter() - t0, 2))
    return reader


def save_reader(reader: Reader, path: str | Path) -> Path:
    """Write a reader as a safetensors checkpoint (graph, classifier config, accuracy; atomic)."""
    from cfedit.checkpoint import save_checkpoint

    info = reader.info
    tensors = {f"classifier.{k}": v for k, v in reader.classifier.state_dict().items()}
    config = {"kind": READER_KIND, "classifier": reader.classifier.config(), "oracle": list(reader.oracle),
              "mirror": reader.mirror}
    extra = {} if info is None else {"train": info.train, "test_accuracy": info.test_accuracy,
                                     "classifier_accuracy": info.classifier_accuracy, "seconds": info.seconds}
    return save_checkpoint(path, tensors, reader.graph, config, extra)


def load_reader(path: str | Path, graph: CausalGraph | None = None) -> Reader:
    """Read a reader written by :func:`save_reader`; refuses another graph or a model checkpoint."""
    from cfedit.checkpoint import CheckpointError, load_checkpoint
    from cfedit.image import Labeller

    ck = load_checkpoint(path)
    if ck.config.get("kind") != READER_KIND:
        raise CheckpointError(f"{path}: not a cfedit reader checkpoint (a model checkpoint's labeller is "
                              "never used as the reader; train one with train_reader)")
    g = graph or ck.graph
    ck.check_graph(g)
    clf = ck.module("classifier", Labeller.from_config)
    reader = Reader(g, clf, ck.config.get("oracle", ()), mirror=bool(ck.config.get("mirror", False)))
    ex = ck.extra
    reader.info = ReaderInfo(list(reader.oracle), clf.config(), ex.get("train", {}), ex.get("test_accuracy", {}),
                             ex.get("classifier_accuracy", {}), int(clf.heads[0].in_features), "file", str(path),
                             float(ex.get("seconds", 0.0)))
    return reader


def reader_options(graph: CausalGraph, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The graph file's ``reader:`` recipe overridden by ``config``, as the ``reader:`` schema allows."""
    merged = {**graph.reader, **(config or {})}
    problem = recipe_problem("reader", merged)
    if problem:
        raise GraphError(f"{graph.source or graph.name}: {problem[0]}")
    return merged


def reader_cache_path(graph: CausalGraph, data: str | Path | None = None, oracle: bool | None = None,
                      **config) -> Path:
    """``<user cache>/readers/<graph>-<structure hash>-<config hash>.safetensors``; the config hash
    covers the reader's recipe and the data's *content* (:func:`cfedit.data.sources.data_fingerprint`:
    the label file and the image list), never the folder's path."""
    from cfedit.data import default_cache_dir
    from cfedit.data.sources import data_fingerprint

    generated = data is None and "barmnist" in (graph.data or {})  # (the key of the readers cached so far)
    cfg = {**READER_DEFAULTS, **config, "data": graph.data if generated else data_fingerprint(graph, data),
           "oracle": list(_oracle_names(graph, oracle))}
    key = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return default_cache_dir() / "readers" / f"{graph.name}-{graph.structure_hash()[:12]}-{key}.safetensors"


def load_or_train_reader(graph: CausalGraph, path: str | Path | None = None, cache: bool = True,
                         data: str | Path | None = None, root: str | Path | None = None, device: str = "cpu",
                         progress: Progress | None = None, oracle: bool | None = None, **config) -> Reader:
    """The reader at ``path`` (``--reader``: loaded when it exists, else trained and written there),
    else the cached one of this graph and config, trained and cached on first use (``cache=False``:
    train without writing). ``config`` overrides the graph file's ``reader:`` recipe."""
    config = reader_options(graph, config)
    target = Path(path) if path is not None else (reader_cache_path(graph, data, oracle, **config) if cache else None)
    if target is not None and target.exists():
        reader = load_reader(target, graph)
        if path is None and reader.info is not None:
            reader.info.source = "cache"
        return reader
    reader = train_reader(graph, data=data, root=root, device=device, progress=progress, oracle=oracle, **config)
    if target is not None:
        save_reader(reader, target)
        reader.info.path = str(target)
    return reader
