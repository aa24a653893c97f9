"""Safe checkpoints: one safetensors file per trained model, JSON metadata, atomic writes.

Loading never runs code from the file (safetensors holds tensors and a string table only). The
metadata carries the graph (as a dict) and its structure hash, the configuration and the versions;
a checkpoint used with a different graph is refused with a clear message.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from cfedit import __version__
from cfedit.graph import CausalGraph, GraphError, graph_from_dict

FORMAT = "cfedit-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not belong to the graph it is used with."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file so that a reader (or a crash) never sees half of it: temp file + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | Path, tensors: Mapping[str, Any], graph: CausalGraph,
                    config: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> Path:
    """Save tensors (torch tensors or numpy arrays) with the graph and config, atomically."""
    import torch
    from safetensors.torch import save

    flat = {}
    for k, v in tensors.items():
        t = v if isinstance(v, torch.Tensor) else torch.as_tensor(np.ascontiguousarray(v))
        flat[k] = t.detach().cpu().contiguous()
    meta = {
        "format": FORMAT,
        "graph": json.dumps(graph.to_dict()),
        "graph_hash": graph.structure_hash(),
        "config": json.dumps(dict(config or {})),
        "extra": json.dumps(dict(extra or {})),
        "versions": json.dumps({"cfedit": __version__, "torch": torch.__version__}),
    }
    atomic_write_bytes(path, save(flat, metadata=meta))
    return Path(path)


class Checkpoint:
    """A loaded checkpoint: ``tensors`` (torch, CPU), ``graph``, ``config``, ``extra``."""

    def __init__(self, path: Path, tensors: dict, meta: dict):
        self.path = path
        self.tensors = tensors
        self.meta = meta
        try:
            self.graph = graph_from_dict(json.loads(meta["graph"]), source=f"{path} (embedded graph)")
            self.config = json.loads(meta.get("config", "{}"))
            self.extra = json.loads(meta.get("extra", "{}"))
        except (KeyError, json.JSONDecodeError, GraphError) as e:
            raise CheckpointError(f"{path}: damaged checkpoint metadata ({e})") from None

    def section(self, prefix: str) -> dict:
        """Tensors under ``prefix.`` with the prefix removed."""
        p = prefix + "."
        return {k[len(p):]: v for k, v in self.tensors.items() if k.startswith(p)}

    def check_graph(self, graph: CausalGraph) -> None:
        if graph.structure_hash() != self.meta.get("graph_hash"):
            raise CheckpointError(
                f"{self.path} was trained on graph {self.graph.name!r}, which differs from {graph.name!r} "
                f"(variables, values or edges); refit with --graph {graph.source or graph.name}"
            )


def load_checkpoint(path: str | Path) -> Checkpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({e.strerror})") from None
    try:
        tensors = load(data)
        from safetensors import safe_open  # metadata only; no code is executed

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a cfedit checkpoint (safetensors could not read it: {e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a cfedit checkpoint (format {meta.get('format')!r})")
    return Checkpoint(path, tensors, meta)


def read_checkpoint_graph(path: str | Path) -> CausalGraph:
    """The graph stored in a checkpoint, reading only its header (cheap: no tensors are loaded)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return graph_from_dict(json.loads(meta["graph"]), source=f"{path} (embedded graph)")
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: not a cfedit checkpoint ({e})") from None
