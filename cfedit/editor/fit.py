"""Training an ANCM: the recipe, the stages (feature model, labeller, image mechanism), resume, summary.

:func:`fit_ancm` trains all three parts from a graph's data and writes one checkpoint. The recipe is
the graph file's ``fit:`` section completed by explicit :class:`FitOptions` (which win). Training is
resumable: after every epoch the partial state goes to ``<out>.partial`` (torch tensors and plain
values only, read back with ``weights_only=True``). With ``keep_state`` the final state stays beside
the checkpoint as ``<out>.state``, and ``resume_from`` continues such a state exactly to more epochs.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from cfedit.causal.graph import CausalGraph
from cfedit.causal.pv import total_variation
from cfedit.causal.recipes import FIT_OPTIONS, MECHANISMS, recipe_problem
from cfedit.editor.model import ANCM
from cfedit.editor.policy import EditPolicy, redraw
from cfedit.features import make_feature_model
from cfedit.errors import CheckpointError, GraphError
from cfedit.files import atomic_write_bytes
from cfedit.progress import Progress


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
    residual: bool | None = None  # edits apply the decoded change to the input (see EditPolicy)
    mechanism: str | None = None  # the image mechanism: "cvae" (default) or "masked" (cfedit.image.editor)
    # a saved model of the same graph to start from: its labeller is kept as trained and its image
    # mechanism (same kind and architecture) trains further for ``epochs`` (a warm start)
    init_from: str | None = None


#: The default schedule when neither ``--epochs`` nor the graph's ``fit:`` recipe gives one: enough
#: epochs for about this many optimizer steps, never fewer than the trainer's default epochs, at most
#: :data:`MAX_DEFAULT_EPOCHS` (60,000 MNIST images: the defaults, 5 and 4; 2,000 images: 32 and 19).
TARGET_STEPS = {"mechanism": 500, "labeller": 300}
MAX_DEFAULT_EPOCHS = 50

#: The summary warns that a model is not usable when its null-edit error (mean absolute pixel error in
#: [0, 1]; a residual model's reconstruction error) is above this (shipped digit models: 0.013; a
#: model whose edits are gray blurs: 0.2) ...
NULL_EDIT_WARN = 0.1
#: ... or when its labeller's accuracy on a factor closes less than this share of the gap between
#: always guessing the factor's most common value and being right every time.
LABELLER_WARN = 0.5


def default_epochs(stage: str, n_train: int, batch_size: int, minimum: int) -> int:
    """Epochs of ``stage`` (``mechanism``, ``labeller``) by dataset size: see :data:`TARGET_STEPS`."""
    steps_per_epoch = max(1, -(-int(n_train) // int(batch_size)))
    return int(min(MAX_DEFAULT_EPOCHS, max(minimum, -(-TARGET_STEPS[stage] // steps_per_epoch))))


def usability_warnings(summary: dict, graph: CausalGraph, test) -> list[str]:
    """What makes a fitted model unusable, in words (empty when nothing does): see :data:`NULL_EDIT_WARN`
    and :data:`LABELLER_WARN`."""
    out = []
    recipe = summary.get("recipe", {})
    mae_key = "reconstruction_mae" if recipe.get("residual") and recipe.get("mechanism") != "masked" else "null_edit_mae"
    mae = summary.get(mae_key)
    if mae is not None and mae > NULL_EDIT_WARN:
        out.append(f"{mae_key} {mae:.3f} is above {NULL_EDIT_WARN}: edits will be blurred; train longer "
                   "(--epochs) or on more images")
    for j, name in enumerate(graph.names):
        acc = summary.get(f"labeller_acc_{name}")
        if acc is None or len(test) == 0:
            continue
        majority = float(np.bincount(test.factors[:, j], minlength=len(graph[name].values)).max() / len(test))
        if majority < 1.0 and acc < majority + LABELLER_WARN * (1.0 - majority):
            out.append(f"labeller accuracy on {name} is {acc:.3f}, near the {majority:.3f} of always guessing its "
                       "most common value: factual factors will be misread; train longer (--labeller-epochs)")
    return out


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
    """``options`` completed from the graph file's ``fit:`` recipe (explicit options win); the recipe
    passes the ``fit:`` schema of its own mechanism (:mod:`cfedit.causal.recipes`), and its mechanism
    options apply only when the options choose that mechanism."""
    from dataclasses import replace

    o = options or FitOptions()
    recipe = dict(graph.fit)
    if o.mechanism is not None and o.mechanism not in MECHANISMS:
        raise GraphError(f"unknown image mechanism {o.mechanism!r} (known: {', '.join(MECHANISMS)})")
    recipe_kind = str(recipe.get("mechanism", "cvae"))
    kind = o.mechanism or recipe_kind
    problem = recipe_problem("fit", {**recipe, "mechanism": recipe_kind}, graph.names)
    if problem:
        raise GraphError(f"{graph.source or graph.name}: {problem[0]}")
    # the recipe's training options are its own mechanism's: another mechanism chosen explicitly
    # keeps only the recipe's common ones (epochs, labeller_epochs, residual)
    mech = {k: v for k, v in recipe.items() if k not in FIT_OPTIONS} if kind == recipe_kind else {}
    mech.update(o.mechanism_options)
    residual = o.residual if o.residual is not None else bool(recipe.get("residual", False))
    labeller_epochs = o.labeller_epochs if o.labeller_epochs is not None else recipe.get("labeller_epochs")
    return replace(o, mechanism=kind, epochs=o.epochs if o.epochs is not None else recipe.get("epochs"),
                   labeller_epochs=labeller_epochs, residual=residual, mechanism_options=mech)


def partial_path(out: str | Path) -> Path:
    return Path(str(out) + ".partial")


def state_path(out: str | Path) -> Path:
    """Where ``keep_state`` leaves a finished fit's training state."""
    return Path(str(out) + ".state")


def _save_state(path: Path, state: dict) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_state(p: Path) -> dict | None:
    from cfedit.checkpoint import load_state_file

    if not p.exists():
        return None
    return load_state_file(p)  # tensors and plain containers only; a state file can never run code


def _continued_state(out: Path, o: FitOptions, resume: bool, resume_from: str | Path | None) -> dict:
    """The training state a fit continues (empty: a fresh fit), checked against the options."""
    if resume_from is None:
        return (_load_state(partial_path(out)) if resume else None) or {}
    src = Path(resume_from)
    if not src.is_file():
        raise CheckpointError(f"--resume-from {src}: no such training state")
    state = _load_state(src)
    if not isinstance(state, dict) or "graph_hash" not in state:
        raise CheckpointError(f"--resume-from {src}: not a training state of cfedit fit")
    done = (state.get("mechanism") or {}).get("epoch")
    if o.epochs is not None and done is not None and int(done) >= o.epochs:
        n = int(done)
        raise CheckpointError(f"--resume-from {src}: it has trained the image mechanism {n} epoch{'s' * (n != 1)} "
                              f"already; pass --epochs above {n} to continue it")
    warm = state.get("init_from")
    if warm is not None and o.init_from is None:
        raise CheckpointError(f"--resume-from {src}: it continues a warm start from {warm}; pass --init-from "
                              "with that model (the labeller it kept)")
    if warm is None and o.init_from is not None:
        raise CheckpointError(f"--resume-from {src}: it is not a warm start, so --init-from has nothing to give it")
    return state


def fit_ancm(graph: CausalGraph, out: str | Path, options: FitOptions | None = None, resume: bool = False,
             progress: Progress | None = None, resume_from: str | Path | None = None,
             keep_state: bool = False) -> tuple[ANCM, dict]:
    """Train feature model, labeller and image mechanism; write the checkpoint ``out`` atomically.

    With ``resume``, continue from ``<out>.partial`` (written after every epoch); with ``resume_from``,
    from that training state instead (a ``<out>.state`` that ``keep_state`` left, or a partial), trained
    on to ``epochs`` in all, with the same optimizer and discriminator: a run continued this way equals
    one that was asked for the longer schedule. Returns the model
    and a summary: fit of P(V) (total variation), labeller accuracy and null-edit error on the test
    split, and the seconds per stage.
    """
    from dataclasses import replace

    import torch

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
    state = broadcast_object(_continued_state(out, o, resume, resume_from) if is_main() else {})
    if state and state.get("graph_hash") != graph.structure_hash():
        if resume_from is not None:
            raise CheckpointError(f"--resume-from {resume_from}: that training state belongs to another graph")
        raise CheckpointError(f"{partial_path(out)} belongs to another graph; delete it or fit without --resume")
    state["graph_hash"] = graph.structure_hash()
    if o.init_from is not None:
        state.setdefault("init_from", str(o.init_from))  # so that a continuation knows it needs the labeller
    seconds = dict(state.get("seconds", {}))
    earlier_runs = list(state.get("runs", []))  # how the earlier (resumed) runs were trained
    state["runs"] = earlier_runs + [job_info()]
    report = progress or (lambda *a: None)

    train = dataset_for_graph(graph, "train", o.n_train, o.seed, o.data, o.mnist_root)
    test = dataset_for_graph(graph, "test", o.n_eval, o.seed, o.data, o.mnist_root)
    pv = train.pv()
    from dataclasses import replace

    if o.epochs is None and o.mechanism == "cvae":  # the default schedule, by dataset size
        mech_defaults = {**mechanism_defaults("cvae"), **o.mechanism_options}
        o = replace(o, epochs=default_epochs("mechanism", len(train), mech_defaults["batch_size"],
                                             mech_defaults["epochs"]))
    if o.labeller_epochs is None and o.init_from is None:
        from cfedit.image.train import LABELLER_DEFAULTS

        o = replace(o, labeller_epochs=default_epochs("labeller", len(train), LABELLER_DEFAULTS["batch_size"],
                                                      LABELLER_DEFAULTS["epochs"]))

    t = time.perf_counter()
    report("features", 0, 1, {})
    features = make_feature_model(o.features, graph).fit(pv, seed=o.seed)
    seconds["features"] = time.perf_counter() - t
    report("features", 1, 1, {})

    def checkpoint_stage(name: str) -> Callable[[dict], None]:
        def on_epoch(s: dict) -> None:  # the trainers call it on rank 0 only
            state[name] = s
            state["seconds"] = seconds
            _save_state(partial_path(out), state)
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
    if o.mechanism == "masked":  # trains against its own discriminator (and the labeller, with keep > 0)
        init = start.mechanism.state_dict() if start is not None else None
        mech, mech_metrics = train_masked_editor(train, graph, epochs=o.epochs, device=device, seed=o.seed + 1,
                                                 init=init, labeller=labeller, **mech_progress,
                                                 **o.mechanism_options)
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
        "tv_pv": total_variation(features.joint(), pv),
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
    summary["warnings"] = usability_warnings(summary, graph, test)
    model = ANCM(graph, features, mech.eval(), labeller.eval(), pv, summary, EditPolicy(residual=o.residual))
    model.save(out)
    if keep_state:
        state["seconds"] = seconds
        _save_state(state_path(out), state)
    partial_path(out).unlink(missing_ok=True)
    report("summary", 1, 1, {})
    return model, summary


def _warm_start(graph: CausalGraph, o: FitOptions) -> "ANCM":
    """The saved model ``o.init_from`` a fit starts from, checked against the graph and the mechanism."""
    start = ANCM.load(o.init_from)
    if start.graph.structure_hash() != graph.structure_hash():
        raise CheckpointError(f"--init-from {o.init_from}: that model was trained for another graph "
                         f"({start.graph.name!r}, not {graph.name!r})")
    kind = start.mechanism.config().get("kind", "cvae")
    if kind != o.mechanism or o.mechanism != "masked":
        raise CheckpointError(f"--init-from {o.init_from}: a warm start continues a masked editor; that model's "
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
