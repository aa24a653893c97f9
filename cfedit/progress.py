"""The progress callback of the library's long runs: ``progress(stage, step, total, info)``.

``stage`` names the part that runs (``features``, ``labeller``, ``mechanism``, ``reader``,
``queries``, ``metrics``, ...), ``step`` of ``total`` is how far it is, ``info`` a flat dict of
figures (losses, the epoch, the query). The CLI draws bars from it; the library never prints.
"""

from __future__ import annotations

from typing import Callable

Progress = Callable[[str, int, int, dict], None]
