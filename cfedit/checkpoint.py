"""Safe checkpoints: one safetensors file per trained model, JSON metadata, atomic writes.

Loading never runs code from the file (safetensors holds tensors and a string table only) and reads
only regular files of at most :data:`MAX_CHECKPOINT_BYTES`; the header is checked before a tensor is
loaded. The metadata carries the graph (as a dict) and its structure hash, the configuration and the
versions; a checkpoint used with a different graph is refused with a clear message. A damaged or
tampered file is always a one-line :class:`CheckpointError`: a missing section or tensor, a config
that does not match the stored tensor shapes (checked before any layer is allocated, see
:meth:`Checkpoint.module`).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import IO, Any, Callable, Mapping

import numpy as np

from cfedit._version import __version__
from cfedit.errors import CheckpointError, GraphError  # CheckpointError re-exported
from cfedit.files import atomic_write_bytes, open_regular, read_regular
from cfedit.causal.graph import CausalGraph
from cfedit.causal.graph_file import graph_from_dict

FORMAT = "cfedit-checkpoint/1"
#: Largest checkpoint (or training-state file) read; the shipped models are under 20 MiB.
MAX_CHECKPOINT_BYTES = 1 << 30
#: Largest safetensors header read: the tensor table and cfedit's metadata, a few KiB in practice.
MAX_HEADER_BYTES = 16 << 20


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


class Entries(dict):
    """A mapping read from a checkpoint (its config, its tensors): a key that is missing means a
    damaged or foreign file, so looking it up raises a one-line CheckpointError, not a KeyError."""

    def __init__(self, path: Path, what: str, items: Mapping[str, Any]):
        super().__init__(items)
        self.path, self.what = path, what

    def __missing__(self, key: str) -> Any:
        raise CheckpointError(f"{self.path}: damaged checkpoint: no {self.what} {key!r}")


class Checkpoint:
    """A loaded checkpoint: ``tensors`` (torch, CPU), ``graph``, ``config``, ``extra``."""

    def __init__(self, path: Path, tensors: dict, meta: dict):
        self.path = path
        self.tensors = Entries(path, "tensor", tensors)
        self.meta = meta
        self.graph = _graph(path, meta)
        self.config = Entries(path, "config section", _json_object(path, meta, "config"))
        self.extra = _json_object(path, meta, "extra")

    def section(self, prefix: str) -> dict:
        """Tensors under ``prefix.`` with the prefix removed."""
        p = prefix + "."
        return {k[len(p):]: v for k, v in self.tensors.items() if k.startswith(p)}

    def module(self, section: str, build: Callable[[Any], Any]):
        """The torch module ``build(config[section])`` makes, loaded with the tensors of ``section``.

        It is built on torch's meta device first (no memory) and its tensor names and shapes are
        compared with the file's, so a tampered config cannot allocate layers the file does not hold,
        and a mismatch is one line naming the tensor rather than torch's page-long RuntimeError.
        """
        import torch

        config = self.config[section]
        stored = self.section(section)
        try:
            with torch.device("meta"):
                skeleton = build(config)
        except (TypeError, ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{self.path}: damaged checkpoint: its {section!r} config cannot be built "
                                  f"({' '.join(str(e).split())[:200]})") from None
        expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in stored.items()}
        missing = [k for k in expected if k not in found]
        if missing:
            raise CheckpointError(f"{self.path}: damaged checkpoint: no tensor '{section}.{missing[0]}' "
                                  f"({len(missing)} missing)")
        unexpected = [k for k in found if k not in expected]
        if unexpected:
            raise CheckpointError(f"{self.path}: damaged checkpoint: tensor '{section}.{unexpected[0]}' does not "
                                  f"belong to its {section!r} config")
        for k, shape in expected.items():
            if found[k] != shape:
                raise CheckpointError(f"{self.path}: damaged checkpoint: tensor '{section}.{k}' has shape "
                                      f"{list(found[k])}, but its {section!r} config makes {list(shape)}")
        model = build(config)
        model.load_state_dict(stored)
        return model

    def check_graph(self, graph: CausalGraph) -> None:
        if graph.structure_hash() != self.meta.get("graph_hash"):
            raise CheckpointError(
                f"{self.path} was trained on graph {self.graph.name!r}, which differs from {graph.name!r} "
                f"(variables, values or edges); refit with --graph {graph.source or graph.name}"
            )


def _metadata(path: Path, f: IO[bytes]) -> dict[str, str]:
    """The metadata of a safetensors file from its header alone; refuses any file cfedit did not write
    before a tensor is read."""
    head = f.read(8)
    size = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < size <= MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: not a cfedit checkpoint (no safetensors header)")
    try:
        header = json.loads(f.read(size))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a cfedit checkpoint (its safetensors header is damaged)") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: not a cfedit checkpoint (format {found!r})")
    if not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: damaged checkpoint metadata (values must be text)")
    return meta


def _graph(path: Path, meta: Mapping[str, str]) -> CausalGraph:
    if "graph" not in meta:
        raise CheckpointError(f"{path}: damaged checkpoint metadata (no graph)")
    try:
        return graph_from_dict(json.loads(meta["graph"]), source=f"{path} (embedded graph)", recipes_current=False)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: damaged checkpoint metadata (graph: {e})") from None
    except GraphError as e:
        raise CheckpointError(f"{path}: damaged checkpoint metadata ({e})") from None


def _json_object(path: Path, meta: Mapping[str, str], key: str) -> dict:
    try:
        value = json.loads(meta.get(key, "{}"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: damaged checkpoint metadata ({key}: {e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: damaged checkpoint metadata ({key} must be a JSON object)")
    return value


def load_checkpoint(path: str | Path) -> Checkpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    data = read_regular(path, MAX_CHECKPOINT_BYTES, CheckpointError, "checkpoint")
    meta = _metadata(path, io.BytesIO(data))
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: damaged checkpoint (safetensors could not read it: "
                              f"{' '.join(str(e).split())[:200]})") from None
    return Checkpoint(path, tensors, meta)


def read_checkpoint_graph(path: str | Path) -> CausalGraph:
    """The graph stored in a checkpoint, reading only its header (cheap: no tensors are loaded)."""
    path = Path(path)
    with open_regular(path, MAX_CHECKPOINT_BYTES, CheckpointError, "checkpoint") as f:
        return _graph(path, _metadata(path, f))


def load_state_file(path: str | Path, what: str = "training state") -> dict:
    """A ``torch.save``'d state (such as the ``.partial`` file of an interrupted fit), read with
    ``weights_only=True``: tensors and plain containers only, never code. A file holding anything
    else, or damaged, is one CheckpointError line (never torch's advice to load it unsafely)."""
    import warnings

    import torch

    data = read_regular(path, MAX_CHECKPOINT_BYTES, CheckpointError, what)
    try:
        with warnings.catch_warnings():  # (its notes on odd pickle protocols: the error below says it all)
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - the weights-only unpickler runs no code: any failure is a bad file
        raise CheckpointError(f"{path}: not a {what} file cfedit wrote (damaged, or holding more than tensors "
                              f"and plain values); delete it to start afresh") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a {what} file cfedit wrote; delete it to start afresh")
    return state
