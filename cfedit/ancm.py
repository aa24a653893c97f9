"""The editor (DESIGN §1): feature model + image mechanism + labeller, composed. No maths of its own.

    image ──labeller──▶ v (factual factors)          image ──mechanism.abduct(i, v)──▶ u_I
    v ──feature model: abduct U_V | v, do(X=x′), predict──▶ v′ (counterfactual factors)
    mechanism.decode(v′, u_I) ──▶ counterfactual image

:func:`fit_ancm` trains all three from a graph's data and writes one checkpoint; :class:`ANCM`
loads it and edits. Training is resumable: after every epoch the partial state goes to
``<out>.partial`` (torch tensors and plain values only, read back with ``weights_only=True``).
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from cfedit.checkpoint import Checkpoint, CheckpointError, atomic_write_bytes, load_checkpoint, save_checkpoint
from cfedit.features import FeatureModel, load_feature_model, make_feature_model
from cfedit.graph import CausalGraph
from cfedit.query import Query, Term

Progress = Callable[[str, int, int, dict], None]  # (stage, step, total, metrics)


@dataclass
class EditResult:
    """Factual factors [n, k], counterfactual factors [n, K, k], counterfactual images uint8 [n, K, C, S, S]."""

    factual: np.ndarray
    counterfactual: np.ndarray
    images: np.ndarray
    do: dict[str, int]


@dataclass
class ANCM:
    graph: CausalGraph
    features: FeatureModel
    mechanism: Any  # cfedit.image.ImageMechanism
    labeller: Any  # cfedit.image.Labeller
    pv: np.ndarray  # the observational P(V) the model was fitted to (used for bounds)
    info: dict = field(default_factory=dict)
    # Deep-SCM style residual abduction: the edit is the change decode(v', u) - decode(v, u) applied to
    # the input itself, so the null edit returns the input exactly and detail the decoder cannot draw
    # (faces) survives. Off by default: a plain reconstruction is sharp enough for Colored MNIST.
    residual: bool = False
    _cache: dict = field(default_factory=dict, repr=False)  # extreme models and bounds, per query

    # -- persistence --------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        fconf, farrays = self.features.state()
        tensors: dict[str, Any] = {"pv": self.pv}
        tensors.update({f"features.{k}": v for k, v in farrays.items()})
        tensors.update({f"mechanism.{k}": v for k, v in self.mechanism.state_dict().items()})
        tensors.update({f"labeller.{k}": v for k, v in self.labeller.state_dict().items()})
        config = {"features": fconf, "mechanism": self.mechanism.config(), "labeller": self.labeller.config(),
                  "edit": {"residual": self.residual}}
        return save_checkpoint(path, tensors, self.graph, config, extra=self.info)

    @classmethod
    def load(cls, path: str | Path, graph: CausalGraph | None = None, device: str = "cpu") -> "ANCM":
        ck = load_checkpoint(path)
        if graph is not None:
            ck.check_graph(graph)
        return cls.from_checkpoint(ck, device)

    @classmethod
    def from_checkpoint(cls, ck: Checkpoint, device: str = "cpu") -> "ANCM":
        from cfedit.image import Labeller, mechanism_from_config

        g = ck.graph
        feats = load_feature_model(g, ck.config["features"],
                                   {k: v.numpy() for k, v in ck.section("features").items()})
        mech = ck.module("mechanism", mechanism_from_config)
        lab = ck.module("labeller", Labeller.from_config)
        edit = ck.config.get("edit", {})
        if "gains" in edit or "protect" in edit or "critic" in ck.config:
            raise CheckpointError(f"{ck.path}: this checkpoint edits through a calibrated, guarded decoder "
                                  "(gains, protected factors, a critic), which cfedit no longer has; refit it "
                                  "with cfedit fit")
        return cls(g, feats, mech.to(device).eval(), lab.to(device).eval(), ck.tensors["pv"].numpy(), ck.extra,
                   bool(edit.get("residual", False)))

    # -- editing ------------------------------------------------------------------------------

    def read_factors(self, images: np.ndarray, given: Mapping[str, str | int] | None = None) -> np.ndarray:
        """Factual factors of images: the labeller's reading, overridden by ``given`` values."""
        v = np.asarray(self.labeller.predict(images), dtype=np.int64)
        for k, val in self.graph.value_indices(given).items():
            v[:, self.graph.axis(k)] = val
        return v

    def feature_model_for(self, factual_row: np.ndarray, do: Mapping[str, int], bound: str | None) -> FeatureModel:
        """The default feature model, or the canonical model at a bound of the edit's query."""
        if bound is None:
            return self.features
        query = self.edit_query(factual_row, do)
        if query is None:  # the intervention has no descendant: every model agrees
            return self.features
        key = (str(query), bound)
        if key not in self._cache:
            from cfedit.canonical import CanonicalModel

            self._cache[key] = CanonicalModel.extreme(self.graph, self.pv, query, side=bound)
        return self._cache[key]

    def unit_query(self, factual_row: np.ndarray, do: Mapping[str, int], target: str, value: str) -> Query:
        """P(target_{do}=value | every factual factor of the unit)."""
        g = self.graph
        interventions = tuple((k, g[k].values[v]) for k, v in do.items())
        evidence = tuple(Term(n, g[n].values[int(factual_row[i])]) for i, n in enumerate(g.names))
        return Query((Term(target, value, interventions),), evidence)

    def edit_query(self, factual_row: np.ndarray, do: Mapping[str, int]) -> Query | None:
        """P(Y_{do}=y | all factual factors) for the first descendant Y of the intervention, at its
        last value (``yes`` for a binary factor) — the query ``--bound`` pushes to its bound."""
        desc = [d for d in self.graph.descendants(list(do)) if d not in do]
        if not desc:
            return None
        return self.unit_query(factual_row, do, desc[0], self.graph[desc[0]].values[-1])

    def counterfactual_factors(self, factual: np.ndarray, do: Mapping[str, str | int], n_samples: int = 1,
                               seed: int = 0, bound: str | None = None,
                               unit_keys: Sequence[int] | None = None) -> np.ndarray:
        """Counterfactual factors [n, n_samples, k] of factual factors [n, k] under do(); with
        ``unit_keys`` row i draws from its own stream keyed by (seed, unit_keys[i]) (see
        :func:`cfedit.features.unit_uniforms`), also at a ``bound``."""
        do_idx = self.graph.value_indices(do)
        factual = np.asarray(factual, dtype=np.int64)
        if bound is None:
            return self.features.counterfactual(factual, do_idx, n_samples=n_samples, seed=seed, unit_keys=unit_keys)
        out = np.empty((len(factual), n_samples, factual.shape[1]), dtype=np.int64)
        rows, inverse = np.unique(factual, axis=0, return_inverse=True)
        for r, row in enumerate(rows):
            idx = np.flatnonzero(inverse.ravel() == r)
            model = self.feature_model_for(row, do_idx, bound)
            if unit_keys is None:
                out[idx] = model.counterfactual(factual[idx], do_idx, n_samples=n_samples, seed=seed + r)
            else:
                out[idx] = model.counterfactual(factual[idx], do_idx, n_samples=n_samples, seed=seed,
                                                unit_keys=[unit_keys[i] for i in idx])
        return out

    def edit(self, images: np.ndarray, do: Mapping[str, str | int], given: Mapping[str, str | int] | None = None,
             factual: np.ndarray | None = None, n_samples: int = 1, seed: int = 0,
             bound: str | None = None, residual: bool | None = None,
             unit_keys: Sequence[int] | None = None) -> EditResult:
        """Counterfactual images of uint8 images [n, C, S, S] under do(); K = n_samples per image.

        ``residual`` (default: the model's setting) applies the decoded change to the input instead of
        returning the decoded counterfactual. ``unit_keys`` (one non-negative int per image) gives each
        image its own random stream, so its draws depend on the seed and its key only, not on the
        other images of the call (the image side draws nothing: abduction and decoding are
        deterministic given the factors).
        """
        images = np.asarray(images)
        v = self.read_factors(images, given) if factual is None else np.asarray(factual, dtype=np.int64)
        cf = self.counterfactual_factors(v, do, n_samples=n_samples, seed=seed, bound=bound, unit_keys=unit_keys)
        n, k = len(images), n_samples
        imgs = self.transform(images, v, cf.reshape(n * k, -1), residual=residual).reshape(n, k, *images.shape[1:])
        return EditResult(v, cf, imgs, self.graph.value_indices(do))

    def transform(self, images: np.ndarray, factual: np.ndarray, counterfactual: np.ndarray,
                  residual: bool | None = None) -> np.ndarray:
        """The image side of an edit: uint8 images [n, C, S, S] with factual factors [n, k] redrawn
        with counterfactual factors [n * K, k] (K per image, consecutive); uint8 [n * K, C, S, S].

        Abduction u = abduct(image, factual); the result is decode(counterfactual, u), or with
        ``residual`` (default: the model's setting) image + decode(counterfactual, u) - decode(factual, u),
        whose null edit (counterfactual = factual) is the image itself.
        """
        return redraw(self.mechanism, images, factual, counterfactual, self.residual if residual is None else residual)

    def descendant_bounds(self, factual_row: np.ndarray, do: Mapping[str, int], cf_row: np.ndarray) -> dict:
        """For each descendant Y of the intervention: the optimal bounds of P(Y_{do} = y′ | factual),
        y′ being the value this edit gave it — what the data cannot decide, stated honestly."""
        from cfedit.bounds import BoundsError, compute_bounds

        g = self.graph
        out = {}
        cell = tuple(int(x) for x in factual_row), tuple(sorted((k, int(v)) for k, v in do.items()))
        for y in g.descendants(list(do)):
            if y in do:
                continue
            value = g[y].values[int(cf_row[g.axis(y)])]
            # keyed by the factual cell first: a folder of edits asks the same few questions many times
            key = ("bounds", cell, y, value)
            if key not in self._cache:
                q = self.unit_query(factual_row, do, y, value)
                try:
                    b = compute_bounds(g, self.pv, q)
                    self._cache[key] = {"value": value, "lower": round(b.lower, 6), "upper": round(b.upper, 6),
                                        "query": str(q)}
                except BoundsError as e:  # e.g. factual factors of probability zero in the data
                    self._cache[key] = {"value": value, "lower": None, "upper": None, "query": str(q),
                                        "note": str(e)}
            out[y] = self._cache[key]
        return out


def redraw(mechanism, images: np.ndarray, factual: np.ndarray, counterfactual: np.ndarray,
           residual: bool = False) -> np.ndarray:
    """:meth:`ANCM.transform` for a bare image mechanism (also used before the ANCM exists)."""
    from cfedit.imageio import to_uint8

    images = np.asarray(images)
    factual = np.asarray(factual, dtype=np.int64)
    counterfactual = np.asarray(counterfactual, dtype=np.int64)
    n = len(images)
    if n == 0:
        return np.zeros((0, *images.shape[1:]), dtype=np.uint8)
    if len(counterfactual) % n:
        raise ValueError(f"{len(counterfactual)} counterfactual rows for {n} images (need a multiple)")
    k = len(counterfactual) // n
    u = np.asarray(mechanism.abduct(images, factual))
    unit = np.repeat(np.arange(n), k)  # counterfactual row -> its image
    out = np.asarray(mechanism.decode(counterfactual, u[unit]))
    if residual:
        rec = np.asarray(mechanism.decode(factual, u))
        x = images.astype(np.float32) / 255.0
        out = np.clip((x - rec)[unit] + out, 0.0, 1.0)
    return to_uint8(out)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


@dataclass
class FitOptions:
    features: str = "canonical"
    epochs: int | None = None  # mechanism epochs (labeller: its own default) — None: the defaults
    labeller_epochs: int | None = None
    n_train: int | None = None
    n_eval: int = 2000
    device: str = "cpu"
    seed: int = 0
    data: str | None = None
    mnist_root: str | None = None
    mechanism_options: dict = field(default_factory=dict)
    residual: bool | None = None  # edits apply the decoded change to the input (see ANCM.residual)
    mechanism: str | None = None  # the image mechanism: "cvae" (default) or "masked" (cfedit.image.editor)
    # a saved model of the same graph to start from: its labeller is kept as trained and its image
    # mechanism (same kind and architecture) trains further for ``epochs`` (a warm start)
    init_from: str | None = None


#: Keys of a graph file's ``fit:`` recipe that are not image-mechanism options.
RECIPE_KEYS = ("epochs", "labeller_epochs", "residual", "mechanism")
#: The image mechanisms ``fit`` can train, by the name a recipe or ``--mechanism`` gives.
MECHANISMS = ("cvae", "masked")


def mechanism_defaults(kind: str) -> dict:
    """The training options (and their defaults) of the image mechanism ``kind``."""
    if kind == "masked":
        from cfedit.image.masked_training import MASKED_DEFAULTS

        return MASKED_DEFAULTS
    if kind == "cvae":
        from cfedit.image.train import MECHANISM_DEFAULTS

        return MECHANISM_DEFAULTS
    raise ValueError(f"unknown image mechanism {kind!r} (known: {', '.join(MECHANISMS)})")


def resolve_options(graph: CausalGraph, options: FitOptions | None = None) -> FitOptions:
    """``options`` completed from the graph file's ``fit:`` recipe (explicit options win)."""
    from dataclasses import replace

    o = options or FitOptions()
    recipe = dict(graph.fit)
    kind = o.mechanism or str(recipe.get("mechanism", "cvae"))
    if kind not in MECHANISMS:
        raise ValueError(f"{graph.source or graph.name}: unknown image mechanism {kind!r} "
                         f"(known: {', '.join(MECHANISMS)})")
    defaults = mechanism_defaults(kind)
    unknown = sorted(set(recipe) - set(RECIPE_KEYS) - set(defaults))
    if unknown:
        raise ValueError(f"{graph.source or graph.name}: 'fit' has unknown option {unknown[0]!r} (known: "
                         f"{', '.join(RECIPE_KEYS + tuple(k for k in defaults if k not in RECIPE_KEYS))})")
    mech = {k: v for k, v in recipe.items() if k not in RECIPE_KEYS}
    mech.update(o.mechanism_options)
    residual = o.residual if o.residual is not None else bool(recipe.get("residual", False))
    labeller_epochs = o.labeller_epochs if o.labeller_epochs is not None else recipe.get("labeller_epochs")
    return replace(o, mechanism=kind, epochs=o.epochs if o.epochs is not None else recipe.get("epochs"),
                   labeller_epochs=labeller_epochs, residual=residual, mechanism_options=mech)


def partial_path(out: str | Path) -> Path:
    return Path(str(out) + ".partial")


def _save_partial(out: Path, state: dict) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(partial_path(out), buf.getvalue())


def _load_partial(out: Path) -> dict | None:
    from cfedit.checkpoint import load_state_file

    p = partial_path(out)
    if not p.exists():
        return None
    return load_state_file(p)  # tensors and plain containers only; a partial file can never run code


def fit_ancm(graph: CausalGraph, out: str | Path, options: FitOptions | None = None, resume: bool = False,
             progress: Progress | None = None) -> tuple[ANCM, dict]:
    """Train feature model, labeller and image mechanism; write the checkpoint ``out`` atomically.

    With ``resume``, continue from ``<out>.partial`` (written after every epoch). Returns the model
    and a summary: fit of P(V) (total variation), labeller accuracy and null-edit error on the test
    split, and the seconds per stage.
    """
    import torch

    from dataclasses import replace

    from cfedit.data import dataset_for_graph
    from cfedit.distributed import agree_seed, broadcast_object, is_main, job_info
    from cfedit.image import train_image_mechanism, train_labeller
    from cfedit.image.masked_training import train_masked_editor

    o = resolve_options(graph, options)
    o = replace(o, seed=agree_seed(o.seed))  # under torchrun: every rank draws from rank 0's seed
    out = Path(out)
    device = torch.device(o.device)
    # under torchrun rank 0 reads the resume state and hands it to the others (no shared disk needed);
    # the state does not depend on the world size, so a run may resume on another number of processes
    state = broadcast_object((_load_partial(out) if resume and is_main() else None) or {})
    if state and state.get("graph_hash") != graph.structure_hash():
        raise ValueError(f"{partial_path(out)} belongs to another graph; delete it or fit without --resume")
    state["graph_hash"] = graph.structure_hash()
    seconds = dict(state.get("seconds", {}))
    earlier_runs = list(state.get("runs", []))  # how the earlier (resumed) runs were trained
    state["runs"] = earlier_runs + [job_info()]
    report = progress or (lambda *a: None)

    train = dataset_for_graph(graph, "train", o.n_train, o.seed, o.data, o.mnist_root)
    test = dataset_for_graph(graph, "test", o.n_eval, o.seed, o.data, o.mnist_root)
    pv = train.pv()

    t = time.perf_counter()
    report("features", 0, 1, {})
    features = make_feature_model(o.features, graph).fit(pv, seed=o.seed)
    seconds["features"] = time.perf_counter() - t
    report("features", 1, 1, {})

    def checkpoint_stage(name: str) -> Callable[[dict], None]:
        def on_epoch(s: dict) -> None:  # the trainers call it on rank 0 only
            state[name] = s
            state["seconds"] = seconds
            _save_partial(out, state)
        return on_epoch

    start = _warm_start(graph, o) if o.init_from else None
    lab_metrics: dict = {}
    if start is not None:
        labeller = start.labeller.to(device)
        seconds.setdefault("labeller", 0.0)
    else:
        labeller, lab_metrics = train_labeller(
            train, graph, epochs=o.labeller_epochs, device=device, seed=o.seed,
            progress=lambda s, n, m: report("labeller", s, n, m), state=state.get("labeller"),
            on_epoch=checkpoint_stage("labeller"))
        seconds["labeller"] = lab_metrics.get("seconds", 0.0)

    mech_progress = dict(progress=lambda s, n, m: report("mechanism", s, n, m), state=state.get("mechanism"),
                         on_epoch=checkpoint_stage("mechanism"))
    if o.mechanism == "masked":  # trains against its own discriminator; the labeller only reads inputs
        init = start.mechanism.state_dict() if start is not None else None
        mech, mech_metrics = train_masked_editor(train, graph, epochs=o.epochs, device=device, seed=o.seed + 1,
                                                 init=init, **mech_progress, **o.mechanism_options)
    else:
        mech, mech_metrics = train_image_mechanism(train, graph, labeller, epochs=o.epochs, device=device,
                                                   seed=o.seed + 1, **mech_progress, **o.mechanism_options)
    seconds["mechanism"] = mech_metrics.get("seconds", 0.0)

    if _rank() != 0:  # under torchrun only rank 0 measures and writes; the others are done
        return ANCM(graph, features, mech.eval(), labeller.eval(), pv, {}), {}
    report("summary", 0, 1, {})
    labeller.to("cpu")
    mech.to("cpu")
    summary = {
        "features": o.features,
        "tv_pv": float(0.5 * np.abs(features.joint() - pv).sum()),
        **{f"labeller_acc_{k}": v for k, v in labeller_accuracy(labeller, test, graph).items()},
        "null_edit_mae": null_edit_error(mech, test, residual=o.residual),
        "reconstruction_mae": null_edit_error(mech, test),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "n_train": len(train),
        "n_test": len(test),
        "seed": o.seed,
        "device": str(device),
        "recipe": {"mechanism": o.mechanism, "epochs": o.epochs, "labeller_epochs": o.labeller_epochs, "residual": o.residual,
                   **o.mechanism_options},
        **({"init_from": {"path": str(o.init_from), "info": dict(start.info)}} if start is not None else {}),
        **{f"train_loss_{k}": float(m["loss"]) for k, m in (("labeller", lab_metrics), ("mechanism", mech_metrics))
           if "loss" in m},
        # how it was trained: processes, backend, the global batch (split over the ranks), samples per rank
        "distributed": {**job_info(),
                        "global_batch": {"labeller": _batch_size("labeller", lab_metrics, o),
                                         "mechanism": _batch_size("mechanism", mech_metrics, o)},
                        "samples_per_rank": {k: m.get("samples_per_rank", []) for k, m in
                                             (("labeller", lab_metrics), ("mechanism", mech_metrics))},
                        **({"earlier_runs": earlier_runs} if earlier_runs else {})},
    }
    model = ANCM(graph, features, mech.eval(), labeller.eval(), pv, summary, residual=o.residual)
    model.save(out)
    partial_path(out).unlink(missing_ok=True)
    report("summary", 1, 1, {})
    return model, summary


def _warm_start(graph: CausalGraph, o: FitOptions) -> "ANCM":
    """The saved model ``o.init_from`` a fit starts from, checked against the graph and the mechanism."""
    start = ANCM.load(o.init_from)
    if start.graph.structure_hash() != graph.structure_hash():
        raise ValueError(f"--init-from {o.init_from}: that model was trained for another graph "
                         f"({start.graph.name!r}, not {graph.name!r})")
    kind = start.mechanism.config().get("kind", "cvae")
    if kind != o.mechanism or o.mechanism != "masked":
        raise ValueError(f"--init-from {o.init_from}: a warm start continues a masked editor; that model's "
                         f"image mechanism is {kind!r} and this fit trains {o.mechanism!r}")
    return start


def _batch_size(stage: str, metrics: dict, o: FitOptions) -> int | None:
    """The global batch size a stage trained with (None: the stage did not train in this run)."""
    if not metrics:
        return None
    if stage == "labeller":
        from cfedit.image.train import LABELLER_DEFAULTS

        return int(LABELLER_DEFAULTS["batch_size"])
    return int(o.mechanism_options.get("batch_size", mechanism_defaults(o.mechanism)["batch_size"]))


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def labeller_accuracy(labeller, dataset, graph: CausalGraph) -> dict[str, float]:
    pred = np.asarray(labeller.predict(dataset.images))
    return {n: float((pred[:, j] == dataset.factors[:, j]).mean()) for j, n in enumerate(graph.names)}


def null_edit_error(mechanism, dataset, residual: bool = False) -> float:
    """Mean absolute pixel error (pixels in [0, 1]) of the null edit against x: the reconstruction
    decode(v, abduct(x, v)), or with ``residual`` the residual editor's output (uint8, as written)."""
    x = dataset.images
    if residual:
        out = redraw(mechanism, x, dataset.factors, dataset.factors, residual=True)
        return float(np.abs(out.astype(np.float32) - x.astype(np.float32)).mean() / 255.0)
    rec = np.asarray(mechanism.edit(x, dataset.factors, dataset.factors))
    return float(np.abs(rec - x.astype(np.float32) / 255.0).mean())
