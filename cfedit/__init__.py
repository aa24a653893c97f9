"""cfedit: causal counterfactual image editing with optimal bounds (the ANCM method).

The library's front door::

    import cfedit

    graph = cfedit.load_graph("backdoor")                    # a shipped graph by name, or a graph file
    b = cfedit.bounds(graph, "P(bar_{color=green}=yes | digit=3, color=red, bar=yes)")
    b.lower, b.upper                                         # the optimal bounds, from the graph's P(V)

    model = cfedit.load("celeba")                            # a shipped model by graph name, or a checkpoint
    old = model.apply(photo, {"age": "old"})                 # a PIL image in, a PIL image out
    out = model.apply(batch, {"age": "old"}, samples=4)      # float tensors in [0, 1] NCHW work as well

Everything else is in the packages: :mod:`cfedit.causal` (graphs, queries, SCMs, P(V), bounds;
torch-free), :mod:`cfedit.features` (feature models), :mod:`cfedit.image` (image mechanisms,
labeller, training), :mod:`cfedit.data`, :mod:`cfedit.editor` (the ANCM, fit, file-level editing)
and :mod:`cfedit.eval`. Importing ``cfedit`` imports nothing of torch; the names below that need it
load on first use.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cfedit._version import __version__
from cfedit.errors import (BoundsError, CfeditError, CheckpointError, DataError, GraphError, ImageReadError,
                           QueryError)

if TYPE_CHECKING:
    from cfedit.causal.bounds import Bounds
    from cfedit.causal.graph import CausalGraph
    from cfedit.causal.query import Query
    from cfedit.editor.model import ANCM


#: Names served from the packages on first use (``cfedit.ANCM`` imports torch, ``cfedit.load_graph`` does not).
_LAZY = {
    "CausalGraph": "cfedit.causal.graph",
    "load_graph": "cfedit.causal.graph_file",
    "Query": "cfedit.causal.query",
    "parse_query": "cfedit.causal.query",
    "Bounds": "cfedit.causal.bounds",
    "compute_bounds": "cfedit.causal.bounds",
    "observational_pv": "cfedit.data.sources",
    "ANCM": "cfedit.editor.model",
    "EditResult": "cfedit.editor.model",
    "FitOptions": "cfedit.editor.fit",
    "fit_ancm": "cfedit.editor.fit",
    "edit_images": "cfedit.editor.run",
    "evaluate": "cfedit.eval",
}

__all__ = ["__version__", "ANCM", "Bounds", "BoundsError", "CausalGraph", "CfeditError", "CheckpointError", "DataError",
           "EditResult", "FitOptions", "GraphError", "ImageReadError", "Query", "QueryError", "bounds",
           "compute_bounds", "edit_images", "evaluate", "fit_ancm", "load", "load_graph", "observational_pv",
           "parse_query"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cfedit' has no attribute {name!r}")


def bounds(graph: "CausalGraph | str | Path", query: "Query | str", pv=None) -> "Bounds":
    """The optimal bounds of a counterfactual query; ``pv`` defaults to the graph's P(V) by the one
    rule of :func:`cfedit.data.observational_pv` (a known SCM's exact P(V), else its data's)."""
    from cfedit.causal.bounds import compute_bounds
    from cfedit.causal.graph import CausalGraph
    from cfedit.causal.graph_file import load_graph

    g = graph if isinstance(graph, CausalGraph) else load_graph(graph)
    if pv is None:
        from cfedit.data.sources import observational_pv

        pv = observational_pv(g).pv
    return compute_bounds(g, pv, query)


def load(model: "str | Path", device: str = "cpu") -> "ANCM":
    """A trained model: a checkpoint file, or the shipped model of a graph by name (``"celeba"``,
    ``"backdoor"``, ``"frontdoor"``; see :func:`cfedit.editor.shipped.shipped_checkpoint`)."""
    from cfedit.editor.model import ANCM
    from cfedit.editor.shipped import shipped_checkpoint

    path = Path(model)
    if not (path.suffix == ".safetensors" or path.exists()):
        path = shipped_checkpoint(str(model))
    return ANCM.load(path, device=device)
