"""The command line: a thin Typer shell over the library. Parses, calls, prints.

Every error a user can cause (a :class:`cfedit.errors.CfeditError`, a usage error, a path the user
can fix) is printed as one line ``cfedit: error: <what and where>`` on stderr with exit status 2;
anything else is a bug in cfedit: exit status 1, one line, and a request to report it. Set
CFEDIT_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Callable, List, NoReturn, Optional

import typer
import typer.core
from rich.console import Console
from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError  # typer's own copy of click

from cfedit.errors import CfeditError, UsageFailure  # UsageFailure re-exported: ``from cfedit.cli import UsageFailure``


class OneLineUsage(typer.core.TyperGroup):
    """Usage errors (a bad option value, a missing argument, an unknown command) as one line in the
    project's format with exit status 2, instead of Typer's framed box."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except UsageError as e:
            usage_error(e)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UsageError as e:
            usage_error(e)


HELP = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    cls=OneLineUsage, add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
    context_settings=HELP, help="Causal counterfactual image editing with optimal bounds (the ANCM method).",
)
graph_app = typer.Typer(no_args_is_help=True, context_settings=HELP, help="Inspect causal graph files.")
data_app = typer.Typer(no_args_is_help=True, context_settings=HELP,
                       help="Generate datasets with known causal ground truth.")
app.add_typer(graph_app, name="graph")
app.add_typer(data_app, name="data")

# Piped output is not cut to 80 columns: tables of queries stay one row per query.
out = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

#: errno values of an OSError that the user can fix (a path, a permission, a full disk): exit 2.
USER_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.EROFS,
               errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG, errno.ELOOP, errno.EFBIG, errno.ENXIO}


# ----------------------------------------------------------------------------------------------
# choices: enums, so that --help lists them and a wrong value is a one-line usage error
# ----------------------------------------------------------------------------------------------


class GraphFormat(str, Enum):
    text = "text"
    mermaid = "mermaid"
    dot = "dot"
    json = "json"


class Setting(str, Enum):
    backdoor = "backdoor"
    frontdoor = "frontdoor"


class Split(str, Enum):
    train = "train"
    test = "test"


class Method(str, Enum):
    exact = "exact"
    ncm = "ncm"


class Bound(str, Enum):
    lower = "lower"
    upper = "upper"


class Mechanism(str, Enum):
    cvae = "cvae"
    masked = "masked"


class Features(str, Enum):  # cfedit.features.FAMILIES (a test keeps the two equal)
    canonical = "canonical"
    ncm = "ncm"
    none = "none"
    conditional = "conditional"
    markovian = "markovian"


DEVICE_HELP = "auto (the first GPU when there is one, else cpu) | cpu | cuda | cuda:N"
SEED_HELP = "The run's seed: the same seed gives the same result on the same machine."


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("cfedit")
        except PackageNotFoundError:  # run from a checkout that was never installed
            from cfedit._version import __version__ as v
        typer.echo(f"cfedit {v}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                                       help="Print cfedit's version and exit.")) -> None:
    """Causal counterfactual image editing with optimal bounds (the ANCM method)."""


def progress_view(**units: str):
    """The one progress display of every long command (cfedit.progress): rich bars on a terminal,
    plain periodic lines (stage, step/total, rate, ETA) when stderr is not one."""
    from cfedit.progress import ProgressView

    return ProgressView(err_console, units=units)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``cfedit: error: <message>`` as one line on stderr and exit with ``code``."""
    one_line = " ".join(str(message).split())  # a user never sees a multi-line dump ...
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in one_line)  # ... nor a file's terminal escapes
    err_console.print(f"cfedit: error: {shown}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def usage_error(e: UsageError) -> NoReturn:
    """A usage error as one line naming the option, with where to read the command's help."""
    if isinstance(e, NoArgsIsHelpError):
        raise e  # a command given nothing shows its help
    words = e.ctx.command_path.split()[1:] if e.ctx is not None else []
    fail(f"{e.format_message().rstrip('.')} (see: {' '.join(['cfedit', *words, '--help'])})", 2)


def _os_error_line(e: OSError) -> str:
    where = f"{e.filename} -> {e.filename2}" if e.filename2 else e.filename
    return f"{where}: {e.strerror or e}" if where is not None else str(e.strerror or e)


def _bug_line(e: BaseException) -> str:
    """The exception's name and first sentence (some run for a page, or advise what cfedit must not do)."""
    text = str(e).strip()
    first = text.splitlines()[0].split(". ")[0][:200] if text else ""
    return (f"{type(e).__name__}{': ' + first if first else ''} (a bug in cfedit; please report it, with the "
            f"traceback that CFEDIT_DEBUG=1 shows)")


def handles_errors(fn: Callable) -> Callable:
    """The one place where errors become exit codes: a CfeditError and an OSError the user can fix
    exit 2 with their one-line message; anything else is a bug, exit 1 (see the module docstring)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, ClickException):
            raise  # exit codes, and usage errors (formatted by OneLineUsage)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except Exception as e:  # noqa: BLE001 - the boundary between library and user
            if os.environ.get("CFEDIT_DEBUG"):
                raise
            if isinstance(e, CfeditError):
                fail(str(e), 2)
            if isinstance(e, OSError):
                fail(_os_error_line(e), 2 if e.errno in USER_ERRNOS else 1)
            fail(_bug_line(e), 1)

    return wrapper


# ----------------------------------------------------------------------------------------------
# graph
# ----------------------------------------------------------------------------------------------


@graph_app.command("show")
@handles_errors
def graph_show(
    file: str = typer.Argument(..., help="Graph file, or the name of a shipped graph (backdoor, frontdoor)."),
    format: GraphFormat = typer.Option(GraphFormat.text, "--format", "-f", help="Output format."),
) -> None:
    """Print a graph's variables, edges and derived structure, or export its diagram."""
    from cfedit.causal.graph_file import load_graph

    g = load_graph(file)
    format = format.value
    if format == "mermaid":
        sys.stdout.write(g.to_mermaid())
        return
    if format == "dot":
        sys.stdout.write(g.to_dot())
        return
    if format == "json":
        d = g.to_dict()
        d["derived"] = {
            "topological_order": list(g.names),
            "parents": {v: list(g.parents(v)) for v in g.names},
            "c_components": [list(c) for c in g.c_components()],
            "bidirected_cliques": [list(c) for c in g.bidirected_cliques()],
            "structure_hash": g.structure_hash(),
        }
        sys.stdout.write(json.dumps(d, indent=2) + "\n")
        return
    from rich.markup import escape
    from rich.table import Table

    out.print(f"[bold]{g.name}[/bold]  {escape(g.description)}")  # a description may hold [brackets]
    t = Table(show_header=True, header_style="bold")
    for col in ("variable", "values", "parents", "descendants", "confounded with"):
        t.add_column(col)
    for v in g.variables:
        t.add_row(v.name, ", ".join(v.values), ", ".join(g.parents(v.name)) or "-",
                  ", ".join(g.descendants(v.name)) or "-", ", ".join(g.spouses(v.name)) or "-")
    out.print(t)
    out.print(f"topological order: {' -> '.join(g.names)}")
    out.print("c-components: " + "  ".join("{" + ", ".join(c) + "}" for c in g.c_components()))
    cliques = g.bidirected_cliques()
    out.print("bidirected cliques (one shared noise each): "
              + ("  ".join("{" + ", ".join(c) + "}" for c in cliques) if cliques else "none"))
    out.print(f"image: {g.image.channels}x{g.image.size}x{g.image.size}, child of every factor")
    if g.data:
        out.print(f"data: {json.dumps(g.data)}", markup=False)
    for name, q in g.queries.items():
        out.print(f"query {name}: {q}", markup=False, highlight=False)


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------

MNIST_ROOT_HELP = "Folder with MNIST in torchvision's layout (default: $CFEDIT_DATA, else a user cache, downloaded when missing)."


@data_app.command("barmnist")
@handles_errors
def data_barmnist(
    setting: Setting = typer.Argument(..., help="The ground-truth SCM (the graph of that name)."),
    n: int = typer.Option(1000, "--n", min=1, help="Number of images."),
    split: Split = typer.Option(Split.train, "--split", help="Draw the MNIST exemplars from this split."),
    seed: int = typer.Option(0, "--seed", min=0, help=SEED_HELP),
    out_dir: Path = typer.Option(..., "--out", help="Folder for the PNGs, labels.csv, exogenous.csv, grid.png."),
    force: bool = typer.Option(False, "--force", help="Overwrite what an earlier run wrote into --out."),
    resume: bool = typer.Option(False, "--resume", help="Finish an interrupted run into --out (same arguments): its images are kept."),
    mnist_root: Optional[Path] = typer.Option(None, "--mnist-root", help=MNIST_ROOT_HELP),
) -> None:
    """Write Colored-MNIST-with-bars images with their factors and exogenous noise."""
    from cfedit.data import write_barmnist

    with progress_view(images="images") as progress:
        s = write_barmnist(setting.value, n, split=split.value, seed=seed, out=out_dir, force=force, root=mnist_root,
                           resume=resume, progress=progress)
    kept = f", {s.kept} of them kept from the interrupted run" if s.kept else ""
    typer.echo(f"wrote {s.n} images to {s.out} in {s.seconds:.1f} s{kept} "
               f"({s.labels.name}, {s.exogenous.name}, {s.grid.name})")


# ----------------------------------------------------------------------------------------------
# bounds
# ----------------------------------------------------------------------------------------------


@app.command()
@handles_errors
def bounds(
    graph: str = typer.Option(..., "--graph", "-g", help="Graph file or shipped graph name."),
    query: Optional[List[str]] = typer.Option(None, "--query", "-q", help='A query, e.g. "P(bar_{color=red}=yes | digit=3)". Repeatable. Default: the graph\'s named queries.'),
    data: Optional[Path] = typer.Option(None, "--data", help="labels.csv with one column per variable (empirical P(V))."),
    method: Method = typer.Option(Method.exact, "--method", help="exact: canonical models and LPs; ncm: also train NCM max/min models per query and show both."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed for the NCM route."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Optimal (sharp) bounds of counterfactual queries given the graph and P(V).

    A query whose evidence has probability zero is undefined: its row says so and why (lower and
    upper are null in --json, with the reason under "undefined"), and the other queries are answered.
    """
    from cfedit.causal.bounds import ZeroEvidenceBoundsError, compute_bounds
    from cfedit.causal.graph_file import load_graph
    from cfedit.causal.pv import check_pv_size
    from cfedit.causal.query import parse_query
    from cfedit.causal.scm import scm_for_graph
    from cfedit.data import observational_pv
    from cfedit.errors import QueryError

    method = method.value
    g = load_graph(graph)
    named = [(None, q) for q in query] if query else list(g.queries.items())
    if not named:
        raise UsageFailure(f"{g.source}: the graph names no queries; give --query \"P(...)\"")
    parsed = [(name, parse_query(text).validate(g)) for name, text in named]
    check_pv_size(g)  # before P(V) is built from any source
    observed = observational_pv(g, labels=data)
    pv, pv_source = observed.pv, observed.source
    truth = scm_for_graph(g) if data is None else None

    rows = []
    from contextlib import nullcontext

    with progress_view() if method == "ncm" else nullcontext() as view:
        for i, (name, q) in enumerate(parsed):
            try:
                b = compute_bounds(g, pv, q)
            except ZeroEvidenceBoundsError as e:  # this row is undefined; the others are still answered
                row = {"name": name, "query": str(q), "lower": None, "upper": None, "method": None,
                       "certified": None, "seconds": None, "undefined": str(e)}
                if truth is not None:
                    row["true"] = None
                if method == "ncm":
                    row.update(ncm_lower=None, ncm_upper=None, ncm_seconds=None)
                rows.append(row)
                continue
            row = {"name": name, "query": str(q), "lower": b.lower, "upper": b.upper, "method": b.method,
                   "certified": b.certified, "seconds": b.seconds}
            if truth is not None:
                try:
                    row["true"] = truth.prob(q)
                except QueryError:
                    row["true"] = None
            if method == "ncm":
                from cfedit.features.ncm import ZeroEvidenceError, ncm_bounds

                label = name or f"query {i + 1}"
                try:
                    nb = ncm_bounds(g, pv, q, seed=seed, progress=lambda stage, step, total: view(
                        f"ncm {stage}", step, total, {"query": label, "of": f"{i + 1}/{len(parsed)}"}))
                    row.update(ncm_lower=nb.lower, ncm_upper=nb.upper, ncm_seconds=nb.seconds)
                except ZeroEvidenceError as e:
                    row.update(ncm_lower=None, ncm_upper=None, ncm_seconds=None, ncm_undefined=str(e))
            rows.append(row)

    if as_json:
        sys.stdout.write(json.dumps({"graph": g.name, "pv": pv_source, "bounds": rows}, indent=2) + "\n")
        return
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"Optimal bounds — graph {g.name}, P(V) {escape(pv_source)}", header_style="bold")  # (a path)
    t.add_column("name")
    t.add_column("query", overflow="fold")
    for col in ("lower", "upper") + (("true",) if truth is not None else ()) + (
            ("ncm lower", "ncm upper") if method == "ncm" else ()):
        t.add_column(col, justify="right")
    t.add_column("certified")
    t.add_column("ms", justify="right")
    notes = [r.get("undefined") or r.get("ncm_undefined") for r in rows]
    if any(notes):
        t.add_column("note", overflow="fold")

    def num(x):
        return "undefined" if x is None else f"{x:.4f}"

    for r, note in zip(rows, notes):
        cells = [r["name"] or "-", r["query"], num(r["lower"]), num(r["upper"])]
        if truth is not None:
            cells.append(num(r["true"]))
        if method == "ncm":
            cells += [num(r["ncm_lower"]), num(r["ncm_upper"])]
        if r["certified"] is None:
            cells += ["-", "-"]
        else:
            cells += ["yes" if r["certified"] else "no (outer bound)", f"{1000 * r['seconds']:.1f}"]
        # (the NCM interval is never certified: it is what two trained models reached)
        if any(notes):
            cells.append(escape((note or "").replace(f"the evidence of {r['query']}", "the evidence")))
        t.add_row(*cells)
    out.print(t)


# ----------------------------------------------------------------------------------------------
# commands filled in by later work
# ----------------------------------------------------------------------------------------------


def in_process_group(fn: Callable) -> Callable:
    """Run a command inside torchrun's process group when torchrun started it (cfedit.distributed):
    ``--device`` becomes this local rank's device; a rank that stops because another failed exits 1
    quietly (the failing rank prints the one line)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import cfedit.distributed as distributed
        from cfedit.device import resolve_device

        if not distributed.launched():
            return fn(*args, **kwargs)
        try:
            with distributed.process_group(resolve_device(kwargs.get("device", "auto"))) as job:
                return fn(*args, **{**kwargs, "device": job.device})
        except distributed.PeerFailed as e:
            if not e.quiet:
                fail(str(e), e.code)
            raise typer.Exit(e.code) from None

    return wrapper


@app.command()
@handles_errors
@in_process_group
def fit(
    graph: str = typer.Option(..., "--graph", "-g", help="Graph file or shipped graph name."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Checkpoint to write (default: runs/<graph>-<features>.safetensors)."),
    features: Features = typer.Option(Features.canonical, "--features", help="Feature model: canonical (exact for discrete factors), ncm (neural causal model), or a baseline."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Epochs of the image mechanism (default: the graph's fit recipe, else by dataset size: about 500 optimizer steps, 5 to 50 epochs)."),
    labeller_epochs: Optional[int] = typer.Option(None, "--labeller-epochs", min=1, help="Epochs of the labeller (default: the graph's fit recipe, else by dataset size: about 300 optimizer steps, 4 to 50 epochs)."),
    n: Optional[int] = typer.Option(None, "--n", "--n-train", min=1, help="Training images (default: all of the split; under torchrun spell it --n-train, which torchrun does not take for its own --nnodes)."),
    data: Optional[str] = typer.Option(None, "--data", help="Image folder (or zip) with labels, instead of the graph's data."),
    mnist_root: Optional[Path] = typer.Option(None, "--mnist-root", help=MNIST_ROOT_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    seed: int = typer.Option(0, "--seed", min=0, help=SEED_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted fit from <out>.partial."),
    resume_from: Optional[Path] = typer.Option(None, "--resume-from", help="Continue a finished or interrupted fit exactly from its training state (the <out>.state that --keep-state left, or a .partial) to --epochs in all; a warm start's state needs its --init-from again."),
    keep_state: bool = typer.Option(False, "--keep-state", help="Keep the final training state (optimizer, discriminator, random streams) as <out>.state, so that --resume-from can train it further exactly."),
    residual: Optional[bool] = typer.Option(None, "--residual/--no-residual", help="Edits apply the decoded change to the input (deep-SCM residual abduction): the null edit returns the input exactly. Default: the graph file's fit recipe, else off."),
    mechanism: Optional[Mechanism] = typer.Option(None, "--mechanism", help="Image mechanism: cvae (a conditional VAE) or masked (edits drawn on the photo through an attention mask; faces). Default: the graph file's fit recipe, else cvae."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="A saved model of the same graph to start from: its labeller is kept and its masked editor (the same, or narrower than the recipe's) trains --epochs more (a warm start)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing checkpoint."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of a table."),
) -> None:
    """Train the feature model, image mechanism and labeller; write one checkpoint."""
    from cfedit.device import resolve_device
    from cfedit.distributed import is_main
    from cfedit.editor.fit import FitOptions, fit_ancm, partial_path
    from cfedit.files import check_writable
    from cfedit.causal.graph_file import load_graph

    features = features.value
    mechanism = mechanism.value if mechanism is not None else None
    g = load_graph(graph)
    # a graph's name is validated as a file-name word (cfedit.causal.graph.GRAPH_NAME): the default stays in runs/
    target = out_path or Path("runs") / f"{g.name}-{features}.safetensors"
    if target.exists() and not force:
        raise UsageFailure(f"{target} exists; pass --force to overwrite it or --out another path")
    check_writable(target, "checkpoint")  # before minutes of training, not at the first save
    if resume and resume_from is not None:
        raise UsageFailure("--resume continues <out>.partial and --resume-from another state: choose one")
    if keep_state:
        from cfedit.editor.fit import state_path

        if state_path(target).exists() and not force:
            raise UsageFailure(f"{state_path(target)} exists; pass --force to overwrite it or --out another path")
        check_writable(state_path(target), "training state")
    if resume and is_main() and not partial_path(target).exists():
        err_console.print(f"note: no {partial_path(target)} to resume from; starting afresh", markup=False)
    opts = FitOptions(features=features, epochs=epochs, labeller_epochs=labeller_epochs, n_train=n,
                      device=resolve_device(device), seed=seed, data=data, residual=residual,
                      mnist_root=str(mnist_root) if mnist_root else None, mechanism=mechanism,
                      init_from=str(init_from) if init_from else None)
    with progress_view() as progress:
        _, summary = fit_ancm(g, target, opts, resume=resume, progress=progress if is_main() else None,
                              resume_from=resume_from, keep_state=keep_state)
    if not summary:  # a non-zero rank under torchrun: rank 0 writes and reports
        return
    for w in summary.get("warnings", []):
        err_console.print(f"warning: the model is not usable: {w}", markup=False, highlight=False, soft_wrap=True)
    if as_json:
        sys.stdout.write(json.dumps({"checkpoint": str(target), **summary}, indent=2, default=str) + "\n")
        return
    out.print(f"wrote {target}", markup=False, highlight=False)
    from rich.table import Table

    t = Table(title="fit summary", header_style="bold", show_header=False)
    for k, v in summary.items():
        if isinstance(v, dict):  # seconds per stage, the recipe, the warm start: one row per entry
            for kk, vv in v.items():
                if not isinstance(vv, dict):
                    t.add_row(f"{k}.{kk}", f"{vv:.4g}" if isinstance(vv, float) else str(vv))
        elif isinstance(v, list):
            t.add_row(k, "; ".join(map(str, v)) or "none")
        else:
            t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    out.print(t)


@app.command()
@handles_errors
def edit(
    images: List[str] = typer.Argument(..., help="Image files, folders of images (searched recursively), or - to read paths from stdin."),
    set_: str = typer.Option(..., "--set", help="The intervention, e.g. color=red or color=red,digit=5."),
    given: Optional[str] = typer.Option(None, "--given", help="Factual factors to use instead of the labeller's reading, e.g. digit=3,bar=yes."),
    samples: int = typer.Option(1, "--samples", min=1, help="Counterfactual samples per image (the answer is a distribution)."),
    seed: int = typer.Option(0, "--seed", min=0, help="The run's seed; each image draws from its own stream keyed by the seed and its path."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Checkpoint (default: the shipped one whose graph has the --set variables)."),
    graph: Optional[str] = typer.Option(None, "--graph", "-g", help="Use the shipped checkpoint of this graph (when several have the --set variables); with --checkpoint, the graph it must have been trained on."),
    bound: Optional[Bound] = typer.Option(None, "--bound", help="Use the feature model at that bound of the edit's query (default: the checkpoint's feature model)."),
    out_dir: Path = typer.Option(Path("out"), "--out", help="Folder for the counterfactual PNGs, side-by-side pairs and the manifest edits.jsonl; mirrors the inputs' folders."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing outputs."),
    resume: bool = typer.Option(False, "--resume", help="Finish an interrupted run into the same --out: batches it finished are kept, the rest edited."),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: edit shard I of N (every N-th batch; default under torchrun: RANK/WORLD_SIZE)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per model batch (default: by image size, 256 for 28x28 digits, 32 for 64x64 faces)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Processes decoding the inputs (default: one per spare core; 0 decodes on the main process)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    residual: Optional[bool] = typer.Option(None, "--residual/--no-residual", help="Apply the decoded change to the input (default: as the checkpoint was fitted)."),
    keep_size: bool = typer.Option(False, "--keep-size", help="Write outputs at the input's own size: the model's change is upsampled and added to the original."),
) -> None:
    """Edit images counterfactually, in batches; one JSON line per output on stdout and in <out>/edits.jsonl."""
    from cfedit.causal.query import parse_assignments
    from cfedit.editor.batch import Shard
    from cfedit.editor.run import edit_images

    notes: dict[str, int] = {}

    def note(path: Path, text: str) -> None:  # each kind of conversion once, not once per file
        if text not in notes:
            kind, text_ = ("warning", text[len("warning: "):]) if text.startswith("warning: ") else ("note", text)
            err_console.print(f"{kind}: {path}: {text_}", markup=False, highlight=False, soft_wrap=True)
        notes[text] = notes.get(text, 0) + 1

    def line(text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def problem(message: str) -> None:
        err_console.print(f"cfedit: error: {message}", markup=False, highlight=False)

    part = Shard.parse(shard) if shard else Shard.from_torchrun() or Shard()
    label = "edit" if part.count == 1 else f"edit (shard {part})"
    with progress_view(**{label: "files"}) as view:
        progress = view.stage(label)
        summary = edit_images(images, parse_assignments(set_, "--set"), out_dir,
                              given=parse_assignments(given or "", "--given"), samples=samples, seed=seed,
                              checkpoint=checkpoint, graph=graph, bound=bound.value if bound else None, residual=residual, keep_size=keep_size,
                              batch_size=batch_size, workers=workers, shard=part, resume=resume, force=force,
                              device=device, on_line=line, on_problem=problem, on_note=note, progress=progress)
    repeats = sum(notes.values()) - len(notes)
    if repeats:
        err_console.print(f"note: {repeats} more inputs were converted in the same ways (not listed)", markup=False)
    if summary.manifest is not None:
        rate = summary.edited / max(summary.seconds, 1e-9)
        err_console.print(f"{label}: {summary.edited} files edited ({summary.outputs} outputs) in {summary.seconds:.1f} s, "
                          f"{rate:,.1f} files/s" + (f"; {summary.resumed} finished earlier" if summary.resumed else "")
                          + (f"; {summary.failed} unreadable" if summary.failed else "") + f"; manifest {summary.manifest}",
                          markup=False, highlight=False)
    if summary.problems or summary.failed:
        raise typer.Exit(2)  # missing or unreadable inputs: input errors (the others were edited)


@app.command("eval")
@handles_errors
def evaluate_cmd(
    graph: str = typer.Option(..., "--graph", "-g", help="Graph file or shipped graph name."),
    checkpoint: Optional[List[Path]] = typer.Option(None, "--checkpoint", "-c", help="Checkpoint(s) to compare (default: the shipped one of the graph). Repeatable."),
    baselines: str = typer.Option("none,conditional,markovian", "--baselines", help="Baseline feature models built from the first checkpoint's image mechanism ('' for none)."),
    n: int = typer.Option(2000, "--n", min=1, help="Test units per query (all matching units when fewer match)."),
    samples: int = typer.Option(4, "--samples", min=1, help="Edits per unit."),
    n_metrics: int = typer.Option(500, "--n-metrics", min=2, help="Test units for the general edit metrics (effectiveness, preservation, null edits, realism)."),
    query: Optional[List[str]] = typer.Option(None, "--query", "-q", help="An extra query. Repeatable."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder for report.json, chart.png and grid.png."),
    reader: Optional[Path] = typer.Option(None, "--reader", help="Independent reader checkpoint (default: trained once and cached)."),
    data: Optional[str] = typer.Option(None, "--data", help="Image folder with labels, instead of the graph's data."),
    mnist_root: Optional[Path] = typer.Option(None, "--mnist-root", help=MNIST_ROOT_HELP),
    seed: int = typer.Option(0, "--seed", min=0, help=SEED_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    force: bool = typer.Option(False, "--force", help="Overwrite existing outputs in --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of tables."),
    strict: bool = typer.Option(False, "--strict", help="Exit with status 1 when a model's estimate misses the optimal bounds of a query (for CI); the baselines are not held to it."),
) -> None:
    """Measure ctf-consistency: estimates read off the edited images against the optimal bounds."""
    from cfedit.eval import evaluate, load_models, load_or_train_reader, render_tables, report_to_json, write_outputs
    from cfedit.features import FAMILIES
    from cfedit.causal.graph_file import load_graph
    from cfedit.device import resolve_device
    from cfedit.editor.shipped import shipped_checkpoint
    from cfedit.causal.query import parse_query

    g = load_graph(graph)
    fams = [b.strip() for b in baselines.split(",") if b.strip()]
    for b in fams:
        if b not in FAMILIES:
            raise UsageFailure(f"--baselines: unknown family {b!r} ({', '.join(FAMILIES)})")
    paths = list(checkpoint or []) or [shipped_checkpoint(g)]
    queries = dict(g.queries)
    for i, text in enumerate(query or []):
        parse_query(text).validate(g)
        queries[f"query{i + 1}" if len(query) > 1 else "query"] = text
    if out_dir is not None and not force:
        for name in ("report.json", "chart.png", "grid.png"):
            if (out_dir / name).exists():
                raise UsageFailure(f"{out_dir / name} exists; pass --force to overwrite or --out another folder")
    dev = resolve_device(device)
    models = load_models(paths, g, fams, device=dev)
    with progress_view(queries="queries") as progress:
        rd = load_or_train_reader(g, path=reader, data=data, root=mnist_root, device=dev,
                                  progress=progress)
        report = evaluate(g, models, n=n, samples=samples, queries=queries, seed=seed, reader=rd,
                          progress=progress, data=data, root=mnist_root, n_metrics=n_metrics)
    if out_dir is not None:
        written = write_outputs(report, out_dir)
        for kind, path in written.items():
            err_console.print(f"wrote {kind}: {path}", markup=False, highlight=False)
    if as_json:
        sys.stdout.write(report_to_json(report) + "\n")
    else:
        for table in render_tables(report):
            out.print(table)
    misses = strict_misses(report, list(models)[:len(paths)])
    for m in misses:
        err_console.print(f"outside the bounds: {m}", markup=False, highlight=False, soft_wrap=True)
    if strict and misses:
        raise typer.Exit(1)


def strict_misses(report, checked: List[str]) -> List[str]:
    """The (model, query) pairs of ``checked`` models whose estimate misses the optimal bounds, both as
    they are and as the reader shows them (a ✓ᴿ counts as inside), in words."""
    misses = []
    for q in report.queries:
        for r in q.results:
            v, vr = r.verdict, r.verdict_reader
            if r.model in checked and v is not None and not v.inside and not (vr is not None and vr.inside):
                misses.append(f"{r.model} on {q.name}: {r.value:.3f} [{r.lower:.3f}, {r.upper:.3f}] against "
                              f"[{q.lower:.4f}, {q.upper:.4f}] (out by {v.gap:.3f})")
    return misses


def main() -> None:
    app(prog_name="cfedit")
