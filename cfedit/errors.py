"""The errors a user can cause and fix, as one hierarchy; the CLI maps it to exit status 2 in one place.

Every message is one line that names the file, the line or the key at fault, ready to be printed as
``cfedit: error: <message>``. Anything else that escapes a command is a bug in cfedit (exit 1).

Each class also derives from ``ValueError``, as the per-module classes it replaces did, so code that
catches ``ValueError`` keeps working; the modules that raise them re-export them
(``from cfedit.causal.graph import GraphError`` still works). This module imports nothing, so every layer,
the torch-free ones included, can raise these.
"""

from __future__ import annotations


class CfeditError(Exception):
    """Bad input the user can fix: a file, an argument, a destination. One line; exit status 2."""


class UsageFailure(CfeditError):
    """A bad command-line input found by the CLI itself."""


class GraphError(CfeditError, ValueError):
    """A graph file or graph definition is invalid."""


class QueryError(CfeditError, ValueError):
    """A query cannot be parsed or does not fit the graph. ``column`` is 1-based (0: the whole query)."""

    def __init__(self, message: str, text: str = "", column: int = 0):
        self.message, self.text, self.column = message, text, column
        where = f" at column {column}" if column else ""
        shown = text if len(text) <= 200 else text[:200] + "..."  # a pasted page stays one short line
        shown = f' in "{shown}"' if text else ""
        super().__init__(f"{message}{where}{shown}")


class BoundsError(CfeditError, ValueError):
    """Bounds cannot be computed for this graph, P(V) and query."""


class CheckpointError(CfeditError, ValueError):
    """A checkpoint cannot be read, is damaged, or does not belong to the graph it is used with."""


class DataError(CfeditError, ValueError):
    """A data set cannot be found, read or written, or does not fit the graph."""


class ImageReadError(CfeditError, ValueError):
    """An input image cannot be read."""


class DestinationError(CfeditError, ValueError):
    """An output path cannot be written: read-only, full, missing, or not a folder."""


class DeviceError(CfeditError, ValueError):
    """A device that is not known or not available here (``--device``)."""


class BatchEditError(CfeditError, ValueError):
    """A batch edit run that cannot start as asked: colliding outputs, existing outputs, a bad shard, a
    resume that does not match the run it would finish."""
