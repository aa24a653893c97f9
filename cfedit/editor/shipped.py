"""The models that ship with cfedit (``checkpoints/*.safetensors``), and the one rule that picks one.

:func:`shipped_checkpoint` is how ``cfedit edit``, ``cfedit eval`` and :func:`cfedit.load` find a
model when none is given: among the shipped checkpoints, those trained on the asked graph (same
structure, else same name), then those whose graph has every asked variable; exactly one must remain.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from cfedit.causal.graph import CausalGraph
from cfedit.causal.graph_file import load_graph, shipped_dir
from cfedit.checkpoint import read_checkpoint_graph
from cfedit.errors import CheckpointError


def shipped_checkpoints() -> list[tuple[Path, CausalGraph]]:
    """Every shipped checkpoint with the graph it was trained on, by file name."""
    return [(p, read_checkpoint_graph(p)) for p in sorted(shipped_dir("checkpoints").glob("*.safetensors"))]


def shipped_checkpoint(graph: str | Path | CausalGraph | None = None, variables: Iterable[str] = ()) -> Path:
    """The shipped checkpoint trained on ``graph`` (a name, a graph file or a graph) whose graph defines
    all of ``variables``: unique, else a :class:`CheckpointError` saying what there is."""
    variables = list(variables)
    graphs = shipped_checkpoints()
    if graph is not None:
        want = graph if isinstance(graph, CausalGraph) else load_graph(graph)
        graphs = [(p, g) for p, g in graphs if g.structure_hash() == want.structure_hash()] or [
            (p, g) for p, g in graphs if g.name == want.name]
        if not graphs:
            raise CheckpointError(f"no shipped checkpoint for graph {want.name!r}; pass --checkpoint PATH "
                                  "(see cfedit fit)")
    match = [p for p, g in graphs if all(v in g for v in variables)]
    listing = ", ".join(f"{p.name} ({', '.join(g.names)})" for p, g in graphs) or "none"
    if not match:
        raise CheckpointError(f"no shipped checkpoint has the variable(s) {', '.join(variables)} "
                              f"(shipped: {listing}); pass --checkpoint PATH")
    if len(match) > 1:
        raise CheckpointError(f"several shipped checkpoints have {', '.join(variables) or 'these variables'}: "
                              f"{', '.join(p.name for p in match)}; pick one with --graph NAME or --checkpoint PATH")
    return match[0]


def checkpoint_for(checkpoint: str | Path | None, graph: str | Path | None = None,
                   variables: Iterable[str] = ()) -> Path:
    """The checkpoint to use: ``checkpoint``, refused when ``graph`` names another graph than the one it
    was trained on; else :func:`shipped_checkpoint`."""
    if checkpoint is None:
        return shipped_checkpoint(graph, variables)
    if graph is not None:
        want, have = load_graph(graph), read_checkpoint_graph(checkpoint)
        if want.structure_hash() != have.structure_hash():
            raise CheckpointError(f"{checkpoint} was trained on graph {have.name!r}, which differs from --graph "
                                  f"{graph} ({want.name!r}); pass a checkpoint of that graph, or drop --graph")
    return Path(checkpoint)
