"""Edits at dataset scale: a folder of images in, a folder of counterfactuals and a manifest out.

A folder of edits is used as a sample of the counterfactual distribution (augmentation, fairness
audits), so a run keeps four promises:

- **Independent, reproducible draws.** Every input is a :class:`Unit` with a stable key, its path
  relative to the inputs' common folder. Its draws come from its own stream, keyed by the run's seed
  and that key (``unit_keys`` of :meth:`cfedit.editor.fit.ANCM.edit`), so images with the same factual
  factors draw independently, ``--samples K`` draws K times per image, and an image's draws never
  depend on the other images of its batch. The image side draws nothing: abduction and decoding are
  deterministic given the factors.
- **Results that do not depend on how the run is cut.** A model's arithmetic depends in its last
  bits (so, now and then, in a uint8 pixel) on the batch an image is computed in, so the batches
  are fixed: consecutive runs of ``batch_size`` units of the sorted input list. A shard edits every
  N-th batch and a resumed run redoes unfinished batches whole, so a sharded or resumed run writes
  the bytes an uninterrupted one writes (with the same batch size, which ``--resume`` checks).
- **Outputs that never collide.** Outputs mirror each input's place under the common folder; two
  inputs that would write one file are refused before anything is written.
- **A manifest that is always whole.** ``edits.jsonl`` (one record per output, the lines printed on
  stdout) is rewritten atomically after every batch, in batch order, so it always holds exactly the
  finished batches. Shard I of N writes ``edits-I-of-N.jsonl``; the shards' manifests concatenate
  (sorted) to the single run's. ``<manifest stem>.run.json`` holds the run's settings for ``--resume``.

Decoding runs in DataLoader worker processes, the model on the calling thread, PNG encoding and
writing on a writer thread. Bounds are computed once per factual cell (``ANCM.descendant_bounds``
caches them on the model).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from cfedit.errors import BatchEditError  # re-exported: ``from cfedit.editor.batch import BatchEditError``
from cfedit.files import atomic_write_bytes
from cfedit.imageio import IMAGE_SUFFIXES, ImageReadError, apply_change, png_bytes, read_image, read_original, side_by_side

MANIFEST = "edits.jsonl"
#: The labeller is *unsure* about an input when its probability for the value it reads is below this
#: for some factor (not given with ``--given``): the run warns that the image may lie outside the
#: model's domain (in-domain test images: above 0.99 nearly always).
LOW_CONFIDENCE = 0.8
#: Files that cfedit itself writes next to images (edits, pairs, data-set and eval grids and charts):
#: skipped when a folder is searched, edited when named as a file.
OWN_OUTPUTS = re.compile(r".+\.(cf|pair)\d+\.png|grid\.png|chart\.png", re.IGNORECASE)
#: Values per batch the default batch size aims at (28x28 RGB digits: 256 a batch; 64x64 faces: 32).
BATCH_VALUES = 2 ** 19


@dataclass(frozen=True)
class Unit:
    """One input image: ``path`` as given, ``key`` its path relative to the inputs' common folder
    (POSIX), which orders the inputs, names its outputs and keys its random stream."""

    path: Path
    key: str

    @property
    def stream_key(self) -> int:
        """The key of the unit's random stream: 64 bits of the SHA-256 of ``key`` (the same on every
        machine and in every run, whatever else is edited with it)."""
        return int.from_bytes(hashlib.sha256(self.key.encode()).digest()[:8], "big")

    def outputs(self, out_dir: Path, samples: int) -> list[tuple[Path, Path]]:
        """(counterfactual, side-by-side pair) per sample: ``<key without suffix>.cf<k>.png`` and
        ``.pair<k>.png`` under ``out_dir``."""
        stem = out_dir / PurePosixPath(self.key).with_suffix("")
        return [(stem.with_name(f"{stem.name}.cf{k}.png"), stem.with_name(f"{stem.name}.pair{k}.png"))
                for k in range(samples)]


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: every ``count``-th batch of the run, starting at batch ``index``."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """``I/N`` with 0 <= I < N (``--shard``)."""
        try:
            i, n = (int(x) for x in text.split("/"))
        except ValueError:
            raise BatchEditError(f"--shard: expected I/N such as 0/2, not {text!r}") from None
        if not 0 <= i < n:
            raise BatchEditError(f"--shard {text}: need 0 <= I < N")
        return cls(i, n)

    @classmethod
    def from_torchrun(cls, env: Mapping[str, str] = os.environ) -> "Shard | None":
        """The shard of this process under torchrun (``RANK`` of ``WORLD_SIZE``), None outside it."""
        if int(env.get("WORLD_SIZE", "1")) <= 1:
            return None
        return cls(int(env["RANK"]), int(env["WORLD_SIZE"]))

    def owns(self, batch: int) -> bool:
        return batch % self.count == self.index

    @property
    def manifest_name(self) -> str:
        return MANIFEST if self.count == 1 else f"edits-{self.index}-of-{self.count}.jsonl"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class EditRequest:
    """What a run asks of every input: the intervention and the options of ``cfedit edit``."""

    do: Mapping[str, str]
    given: Mapping[str, str] = field(default_factory=dict)
    samples: int = 1
    seed: int = 0
    bound: str | None = None
    residual: bool | None = None
    keep_size: bool = False


@dataclass(frozen=True)
class EditSummary:
    """What a run did: ``inputs`` of this shard, of which ``edited`` now, ``resumed`` (finished by an
    earlier run) and ``failed`` (unreadable, skipped); ``outputs`` counterfactual images written;
    ``problems``: the inputs that could not be gathered (missing paths, folders without images)."""

    inputs: int
    edited: int
    resumed: int
    failed: int
    outputs: int
    seconds: float
    manifest: Path | None
    problems: tuple[str, ...] = ()


# ----------------------------------------------------------------------------------------------
# Inputs and outputs
# ----------------------------------------------------------------------------------------------


def gather_inputs(args: Iterable[str], exclude: Path | None = None, stdin=None,
                  skipped: list[Path] | None = None) -> tuple[list[Unit], list[str]]:
    """Units for files, folders (their images, recursively; hidden entries skipped) and ``-`` (paths on
    stdin, one per line), sorted by key; and the problems (missing paths, folders without images).

    Keys are paths relative to the deepest folder holding every argument (a folder argument counts as
    itself, a file as its folder): one folder's tree is mirrored as it is, and same-named files of
    different folders stay apart. A file named twice is one unit. ``exclude`` (the output folder) is
    skipped where it lies inside a folder argument, so a rerun does not edit its own outputs; so are
    files that cfedit writes (:data:`OWN_OUTPUTS`) found in a folder, which go to ``skipped``.
    """
    import sys

    files: dict[str, Path] = {}  # absolute path -> the path as given
    roots: list[str] = []
    problems: list[str] = []
    skip = os.path.abspath(exclude) if exclude is not None else None

    def add_file(p: Path) -> None:
        files.setdefault(os.path.abspath(p), p)
        roots.append(os.path.dirname(os.path.abspath(p)))

    for a in args:
        if a == "-":
            for line in stdin or sys.stdin:
                if line.strip():
                    add_file(Path(line.strip()))
            continue
        p = Path(a)
        if p.is_dir():
            top = os.path.abspath(p)
            found = _images_under(p, None if skip == top else skip)
            own = [q for q in found if OWN_OUTPUTS.fullmatch(q.name)]
            found = [q for q in found if not OWN_OUTPUTS.fullmatch(q.name)]
            if skipped is not None:
                skipped += own
            if not found:
                problems.append(f"{p}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            for q in found:
                files.setdefault(os.path.abspath(q), q)
            roots.append(top)
        elif p.exists():
            add_file(p)
        else:
            problems.append(f"{p}: no such file or folder")
    if not files:
        return [], problems
    root = os.path.commonpath(roots)
    keyed = sorted((Path(os.path.relpath(a, root)).as_posix(), p) for a, p in files.items())
    return [Unit(p, key) for key, p in keyed], problems


def _images_under(folder: Path, skip: str | None) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and os.path.abspath(os.path.join(dirpath, d)) != skip)
        out += [Path(dirpath) / f for f in sorted(filenames)
                if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return out


def check_outputs(units: Sequence[Unit], out_dir: Path, samples: int) -> None:
    """Refuse, before anything is written, two inputs that would write one file, or an output that
    would overwrite an input."""
    inputs = {os.path.abspath(u.path) for u in units}
    owner: dict[str, Unit] = {}
    for u in units:
        for pair in u.outputs(out_dir, samples):
            for p in pair:
                a = os.path.abspath(p)
                if a in owner:
                    raise BatchEditError(f"{owner[a].path} and {u.path} would both write {p}; "
                                         "rename one of them or edit them in separate runs")
                if a in inputs:
                    raise BatchEditError(f"{p}, an output of {u.path}, is itself an input; choose another --out")
                owner[a] = u


def default_batch_size(graph) -> int:
    """A power of two near BATCH_VALUES / (values per image), between 8 and 512."""
    values = graph.image.channels * graph.image.size ** 2
    return int(min(512, max(8, 2 ** round(math.log2(BATCH_VALUES / values)))))


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def edit_files(model, units: Sequence[Unit], out_dir: str | Path, request: EditRequest, *, source: str,
               batch_size: int | None = None, shard: Shard = Shard(), resume: bool = False, force: bool = False,
               workers: int | None = None, on_line: Callable[[str], None] | None = None,
               on_problem: Callable[[str], None] | None = None, on_note: Callable[[Path, str], None] | None = None,
               progress: Callable[[int, int], None] | None = None) -> EditSummary:
    """Edit ``units`` (from :func:`gather_inputs`, all of the run's, whatever the shard) with ``model``
    (an :class:`cfedit.editor.fit.ANCM`) and write their outputs and the manifest under ``out_dir``.

    ``source`` names the checkpoint in the records. ``shard`` picks the batches this process edits;
    ``resume`` finishes the run an earlier process began (its settings must match); ``force``
    overwrites existing outputs. ``workers`` decoding processes (default: one per spare core, none for
    a single batch). Callbacks: ``on_line(json)`` per record once its batch is committed (writer
    thread), ``on_problem(message)`` per unreadable input, ``on_note(path, note)`` per converted input,
    ``progress(done, total)`` after every batch, counting the shard's units (writer thread).
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    batch_size = batch_size or default_batch_size(model.graph)
    if batch_size < 1:
        raise BatchEditError(f"--batch-size must be at least 1, not {batch_size}")
    if not units:
        return EditSummary(0, 0, 0, 0, 0, time.perf_counter() - t0, None)
    check_outputs(units, out_dir, request.samples)
    batches = [list(units[i:i + batch_size]) for i in range(0, len(units), batch_size)]
    mine = [b for b in range(len(batches)) if shard.owns(b)]
    total = sum(len(batches[b]) for b in mine)
    manifest = out_dir / shard.manifest_name
    settings = _settings(request, source, batch_size, shard, units)
    run_file = manifest.with_suffix(".run.json")
    finished: dict[int, list[str]] = {}
    if resume and manifest.exists():
        _check_resumable(run_file, settings)
        finished = _finished_batches(manifest, batches, mine, out_dir, request.samples)
    elif not force:
        _refuse_existing(manifest, [batches[b] for b in mine], out_dir, request.samples)
    atomic_write_bytes(run_file, (json.dumps(settings, indent=1) + "\n").encode())
    _commit(manifest, finished)
    pending = [b for b in mine if b not in finished]
    resumed = sum(len(batches[b]) for b in finished)
    writer = _Writer(model.graph, manifest, finished, request, source, out_dir, on_line,
                     (lambda done: progress(resumed + done, total)) if progress else None)
    if progress:
        progress(resumed, total)
    failed = edited = 0
    writer.start()
    try:
        for b, items in zip(pending, _decoded_batches(model.graph, [batches[b] for b in pending],
                                                      request.keep_size, workers)):
            good = [it for it in items if it.error is None]
            for it in items:
                if it.error is not None:
                    failed += 1
                    if on_problem:
                        on_problem(f"{it.error} (skipped)")
                elif it.note and on_note:
                    on_note(it.unit.path, it.note)
            job = _edit_batch(model, b, len(items), good, request)
            for i, name, p in job.unsure:
                if on_note:
                    on_note(good[i].unit.path, f"warning: the labeller is unsure of this image ({name} read with "
                            f"probability {p:.2f} < {LOW_CONFIDENCE}); it may lie outside the model's domain")
            writer.put(job)
            edited += len(good)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    return EditSummary(total, edited, resumed, failed, edited * request.samples, time.perf_counter() - t0, manifest)


def _settings(request: EditRequest, source: str, batch_size: int, shard: Shard, units: Sequence[Unit]) -> dict:
    """What a resumed run must share with the run it finishes for the two to write the same bytes."""
    keys = hashlib.sha256("\n".join(u.key for u in units).encode()).hexdigest()
    return {"checkpoint": source, "do": dict(request.do), "given": dict(request.given), "samples": request.samples,
            "seed": request.seed, "bound": request.bound, "residual": request.residual,
            "keep_size": request.keep_size, "batch_size": batch_size, "shard": str(shard),
            "inputs": len(units), "inputs_sha256": keys}


def _check_resumable(run_file: Path, settings: dict) -> None:
    try:
        before = json.loads(run_file.read_text())
    except (OSError, ValueError):
        raise BatchEditError(f"--resume: {run_file} is missing or unreadable, so the earlier run's settings "
                             "are unknown; start afresh with --force") from None
    for k, v in settings.items():
        if before.get(k) != v:
            what = "the inputs" if k.startswith("inputs") else k
            raise BatchEditError(f"--resume: the run in {run_file.parent} had {what} {before.get(k)!r}, this one "
                                 f"{v!r}; resume with the same command and inputs, or start afresh with --force")


def _finished_batches(manifest: Path, batches: list[list[Unit]], mine: list[int], out_dir: Path,
                      samples: int) -> dict[int, list[str]]:
    """The manifest's lines of the batches whose every unit has all its records and output files."""
    lines: dict[str, list[tuple[int, str]]] = {}
    for line in manifest.read_text().splitlines(keepends=True):
        try:
            rec = json.loads(line)
            lines.setdefault(rec["key"], []).append((int(rec["sample"]), line))
        except (ValueError, KeyError, TypeError):
            raise BatchEditError(f"--resume: {manifest} holds a line that is not an edit record; "
                                 "start afresh with --force") from None
    done = {}
    for b in mine:
        if all(sorted(s for s, _ in lines.get(u.key, [])) == list(range(samples))
               and all(p.is_file() and p.stat().st_size > 0 for pair in u.outputs(out_dir, samples) for p in pair)
               for u in batches[b]):
            done[b] = [line for u in batches[b] for _, line in sorted(lines[u.key])]
    return done


def _commit(manifest: Path, lines: dict[int, list[str]]) -> None:
    """The manifest: the finished batches' records in batch order, replaced atomically."""
    atomic_write_bytes(manifest, "".join(x for b in sorted(lines) for x in lines[b]).encode())


def _refuse_existing(manifest: Path, batches: list[list[Unit]], out_dir: Path, samples: int) -> None:
    hint = "pass --resume to finish that run, --force to overwrite, or --out another folder"
    if manifest.exists():
        raise BatchEditError(f"{manifest} exists; {hint}")
    for units in batches:
        for u in units:
            for pair in u.outputs(out_dir, samples):
                for p in pair:
                    if p.exists():
                        raise BatchEditError(f"{p} exists; {hint}")


# ----------------------------------------------------------------------------------------------
# Decoding (DataLoader workers), editing (this thread), writing (a writer thread)
# ----------------------------------------------------------------------------------------------


@dataclass
class _Decoded:
    unit: Unit
    image: np.ndarray | None = None  # uint8 [C, S, S], the model's input
    original: np.ndarray | None = None  # uint8 [C, H, W] at the file's own size (--keep-size)
    note: str | None = None
    error: str | None = None


class _DecodeFiles:
    """The inputs of the pending batches as a map-style dataset (a picklable class: DataLoader workers)."""

    def __init__(self, units: list[Unit], size: int, channels: int, keep_size: bool):
        self.units, self.size, self.channels, self.keep_size = units, size, channels, keep_size

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, i: int) -> _Decoded:
        u = self.units[i]
        try:
            img, note = read_image(u.path, self.size, self.channels)
            original = read_original(u.path, self.channels) if self.keep_size else None
        except ImageReadError as e:
            return _Decoded(u, error=str(e))
        return _Decoded(u, img, original, note)


def _as_list(items: list) -> list:
    """The DataLoader's collate: a batch stays a list (--keep-size originals differ in size)."""
    return items


def _decoded_batches(graph, batches: list[list[Unit]], keep_size: bool, workers: int | None):
    """Each batch's units decoded, in order, by ``workers`` processes (default: the spare cores)."""
    from torch.utils.data import DataLoader

    if workers is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = 0 if len(batches) <= 1 else min(4, max(1, cores - 1))
    flat = [u for units in batches for u in units]
    index, starts = [], 0
    for units in batches:
        index.append(list(range(starts, starts + len(units))))
        starts += len(units)
    data = _DecodeFiles(flat, graph.image.size, graph.image.channels, keep_size)
    return DataLoader(data, batch_sampler=index, num_workers=workers, collate_fn=_as_list)


@dataclass
class _Edited:
    """One batch's results, handed to the writer."""

    batch: int
    size: int  # units in the batch, readable or not
    items: list[_Decoded]  # the readable units
    result: Any  # cfedit.editor.fit.EditResult, or None when no unit was readable
    bounds: list[list[dict]]  # per unit and sample
    unsure: list[tuple[int, str, float]] = field(default_factory=list)  # (item, factor, probability)


def _edit_batch(model, b: int, size: int, good: list[_Decoded], request: EditRequest) -> _Edited:
    if not good:
        return _Edited(b, size, [], None, [])
    x = np.stack([it.image for it in good])
    factual, unsure = read_with_confidence(model, x, request.given)
    res = model.edit(x, request.do, factual=factual,
                     n_samples=request.samples, seed=request.seed, bound=request.bound, residual=request.residual,
                     unit_keys=[it.unit.stream_key for it in good])
    bounds = [[model.descendant_bounds(res.factual[i], res.do, res.counterfactual[i, k])
               for k in range(request.samples)] for i in range(len(good))]
    return _Edited(b, size, good, res, bounds, unsure)


def read_with_confidence(model, images: np.ndarray, given: Mapping[str, str]) -> tuple[np.ndarray, list]:
    """The factual factors of ``images`` (the labeller's reading, ``given`` values overriding it) and,
    for each image the labeller is unsure about (:data:`LOW_CONFIDENCE`), (index, factor, probability)
    of its least sure factor."""
    g = model.graph
    probs = [np.asarray(p, dtype=np.float64) for p in model.labeller.predict_proba(images)]
    v = np.stack([p.argmax(1) for p in probs], 1).astype(np.int64)
    for k, val in g.value_indices(given).items():
        v[:, g.axis(k)] = val
    read = [j for j, n in enumerate(g.names) if n not in given]
    unsure = []
    for i in range(len(images)):
        if read:
            j = min(read, key=lambda j: probs[j][i].max())
            if probs[j][i].max() < LOW_CONFIDENCE:
                unsure.append((i, g.names[j], float(probs[j][i].max())))
    return v, unsure


class _Writer(threading.Thread):
    """Encodes and writes each batch's PNGs off the model's thread, then commits the batch's records to
    the manifest (one atomic rewrite, batches in order) and reports them."""

    def __init__(self, graph, manifest: Path, finished: dict[int, list[str]], request: EditRequest, source: str,
                 out_dir: Path, on_line, on_batch):
        super().__init__(name="cfedit-png-writer", daemon=True)
        self.graph, self.manifest, self.lines = graph, manifest, dict(finished)
        self.request, self.source, self.out_dir = request, source, out_dir
        self.on_line, self.on_batch = on_line, on_batch
        self.jobs: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.stopping = threading.Event()
        self.done = 0
        self.made_dirs: set[Path] = set()

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None or self.stopping.is_set():
                return
            try:
                self.write(job)
            except BaseException as e:  # handed to the model's thread, which raises it
                self.error = e
                return

    def put(self, job: _Edited) -> None:
        while True:
            self.raise_error()
            try:
                self.jobs.put(job, timeout=0.1)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        self.put(None)
        self.join()
        self.raise_error()

    def abort(self) -> None:
        """Stop after the batch being written (its commit included); drop the queued ones."""
        self.stopping.set()
        while True:
            try:
                self.jobs.get_nowait()
            except queue.Empty:
                break
        try:
            self.jobs.put_nowait(None)
        except queue.Full:
            pass
        self.join()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def write(self, job: _Edited) -> None:
        g, req = self.graph, self.request
        lines = []
        for i, it in enumerate(job.items):
            v = job.result.factual[i]
            factual = {n: g[n].values[int(v[j])] for j, n in enumerate(g.names)}
            factual_from = {n: ("given" if n in req.given else "labeller") for n in g.names}
            for k, (cf_path, pair_path) in enumerate(it.unit.outputs(self.out_dir, req.samples)):
                cf_img, before = job.result.images[i, k], it.image
                if req.keep_size:
                    before, cf_img = it.original, apply_change(it.original, it.image, cf_img)
                self.write_file(cf_path, png_bytes(cf_img))
                self.write_file(pair_path, png_bytes(side_by_side(before, cf_img)))
                row = job.result.counterfactual[i, k]
                record = {
                    "input": str(it.unit.path), "key": it.unit.key, "sample": k, "seed": req.seed, "do": dict(req.do),
                    "factual": factual, "factual_from": factual_from,
                    "counterfactual": {n: g[n].values[int(row[j])] for j, n in enumerate(g.names)},
                    "image": str(cf_path), "pair": str(pair_path),
                    "size": [int(cf_img.shape[2]), int(cf_img.shape[1])],
                    "bounds": job.bounds[i][k], "bound": req.bound, "checkpoint": self.source,
                }
                lines.append(json.dumps(record) + "\n")
        self.lines[job.batch] = lines
        _commit(self.manifest, self.lines)
        if self.on_line:
            for line in lines:
                self.on_line(line.rstrip("\n"))
        self.done += job.size
        if self.on_batch:
            self.on_batch(self.done)

    def write_file(self, path: Path, data: bytes) -> None:
        """Temp file + rename: an interrupted run never leaves half a PNG (no fsync per image: the
        manifest, fsynced, is what says a batch is finished). The temp name is fixed, so the resumed
        run, which redoes the unfinished batch, replaces what a killed one left."""
        if path.parent not in self.made_dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.made_dirs.add(path.parent)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
