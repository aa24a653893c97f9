"""One edit run over image files, as ``cfedit edit`` does it: inputs in, counterfactual PNGs, pairs and the
manifest of JSON records out. The CLI and the benchmarks call :func:`edit_images`; the batching,
resume and shards are :mod:`cfedit.editor.batch`'s.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, Mapping

from cfedit.device import resolve_device
from cfedit.editor.batch import EditRequest, EditSummary, Shard, edit_files, gather_inputs
from cfedit.editor.model import ANCM
from cfedit.editor.shipped import checkpoint_for
from cfedit.errors import BatchEditError


def edit_images(inputs: Iterable[str | Path], do: Mapping[str, str], out: str | Path, *,
                given: Mapping[str, str] | None = None, samples: int = 1, seed: int = 0,
                checkpoint: str | Path | None = None, graph: str | Path | None = None, bound: str | None = None,
                residual: bool | None = None, keep_size: bool = False, batch_size: int | None = None,
                workers: int | None = None, shard: Shard | None = None, resume: bool = False, force: bool = False,
                device: str = "cpu", stdin=None, on_line: Callable[[str], None] | None = None,
                on_problem: Callable[[str], None] | None = None, on_note: Callable[[Path, str], None] | None = None,
                progress: Callable[[int, int], None] | None = None) -> EditSummary:
    """Edit image files (paths, folders searched recursively, ``-`` for paths on ``stdin``) under
    do(``do``) and write ``<name>.cf<k>.png``, ``<name>.pair<k>.png`` and the manifest under ``out``.

    The model is ``checkpoint``, else the shipped one whose graph has the ``do`` and ``given`` variables
    (``graph`` picks among several, and a ``checkpoint`` must have been trained on it). ``shard``
    defaults to the torchrun rank and world size (or the whole run), and under torchrun ``device="cuda"``
    means the process's local GPU. Inputs that cannot be found or read are reported through
    ``on_problem`` and counted in the summary's ``problems`` and ``failed``; everything else as
    :func:`cfedit.editor.batch.edit_files`.
    """
    given = dict(given or {})
    if not do:
        raise BatchEditError("--set: give at least one intervention, e.g. --set color=red")
    if bound not in (None, "lower", "upper"):
        raise BatchEditError(f"--bound: expected lower or upper, not {bound!r}")
    if resume and force:
        raise BatchEditError("--resume keeps what an earlier run wrote and --force overwrites it: choose one")
    part = shard or Shard.from_torchrun() or Shard()
    path = checkpoint_for(checkpoint, graph, list(do) + list(given))
    dev = resolve_device(device)
    if dev == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process of a node
        dev = f"cuda:{os.environ['LOCAL_RANK']}"
    model = ANCM.load(path, device=dev)
    for k, v in list(do.items()) + list(given.items()):
        model.graph[k].index(v)  # validates name and value against the checkpoint's graph
    own: list[Path] = []
    units, problems = gather_inputs([str(x) for x in inputs], exclude=Path(out), stdin=stdin, skipped=own)
    if own and on_note:
        on_note(own[0], f"skipped {len(own)} file(s) that cfedit wrote (edits, pairs, grids: *.cf<k>.png, "
                        "*.pair<k>.png, grid.png, chart.png) in the folders given; name a file to edit it")
    for p in problems:
        if on_problem:
            on_problem(p)
    request = EditRequest(dict(do), given, samples, seed, bound, residual, keep_size)
    summary = edit_files(model, units, out, request, source=str(path), batch_size=batch_size, shard=part,
                         resume=resume, force=force, workers=workers, on_line=on_line, on_problem=on_problem,
                         on_note=on_note, progress=progress)
    return replace(summary, problems=tuple(problems))
