"""Progress of the library's long runs, and the one way the command line shows it.

The library reports through a plain callback, ``progress(stage, step, total, info)``: ``stage``
names the part that runs (``features``, ``labeller``, ``mechanism``, ``reader``, ``queries``,
``metrics``, ``images``, ``edit``, ...), ``step`` of ``total`` is how far it is, ``info`` a flat dict
of figures (losses, the epoch, the query). The library never prints.

:class:`ProgressView` is such a callback that draws: on a terminal a rich bar per stage (stage,
bar, step/total, the info, elapsed, ETA) laid out to fit 80 columns — the info is cut first, never
the stage's name —, and when stderr is not a terminal (a log file, CI, a pipe) a plain line per
stage start, every ``every`` seconds and at the stage's end::

    mechanism: 120/400 steps (30%), 12.3 steps/s, ETA 23 s  epoch=2 loss=0.0123

Every command of the CLI that can run longer than a second draws through it.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

Progress = Callable[[str, int, int, dict], None]


def format_info(info: Mapping[str, Any] | None) -> str:
    """A flat dict of figures as ``key=value`` words: floats to 4 significant digits, nested values
    and ``None`` left out (a bar never shows a raw Python dict)."""
    words = []
    for k, v in (info or {}).items():
        if v is None or isinstance(v, (dict, list, tuple, set)):
            continue
        if isinstance(v, bool):
            v = "yes" if v else "no"
        elif isinstance(v, float):
            v = f"{v:.4g}"
        words.append(f"{k}={v}")
    return " ".join(words)


def format_seconds(s: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``; ``?`` when unknown."""
    if s != s or s < 0 or s == float("inf"):
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


class _Stage:
    def __init__(self, now: float, step: int):
        self.t0, self.step0 = now, step  # the rate counts from the stage's first report
        self.last_line = None  # when a plain line was last printed
        self.task = None  # the rich task, on a terminal
        self.ended = False


class ProgressView:
    """A :data:`Progress` callback drawing on ``console`` (a rich Console, normally stderr).

    ``units`` names what each stage counts (``{"edit": "files"}``; default ``steps``); ``every`` is
    the seconds between two plain lines of one stage. ``terminal`` overrides the console's own
    detection (tests). Use as a context manager: the bars are live inside it.
    """

    def __init__(self, console, units: Mapping[str, str] | None = None, every: float = 10.0,
                 terminal: bool | None = None, clock: Callable[[], float] = time.perf_counter):
        self.console, self.units, self.every, self.clock = console, dict(units or {}), every, clock
        self.terminal = console.is_terminal if terminal is None else terminal
        self.stages: dict[str, _Stage] = {}
        self.bar = None

    # -- context -------------------------------------------------------------------------------
    def __enter__(self) -> "ProgressView":
        if self.terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn
            from rich.progress import TimeElapsedColumn, TimeRemainingColumn
            from rich.table import Column

            # fixed widths for everything but the info, which takes what is left and is cut with "…":
            # at 80 columns the stage's name and the counts stay whole
            self.bar = RichProgress(
                TextColumn("{task.description}", table_column=Column(no_wrap=True, min_width=9)),
                BarColumn(bar_width=16),
                MofNCompleteColumn(table_column=Column(no_wrap=True)),
                TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
                TimeElapsedColumn(table_column=Column(no_wrap=True)),
                TimeRemainingColumn(table_column=Column(no_wrap=True)),
                console=self.console, transient=False, expand=True)
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    # -- the callback --------------------------------------------------------------------------
    def __call__(self, stage: str, step: int, total: int, info: Mapping[str, Any] | None = None) -> None:
        now = self.clock()
        st = self.stages.get(stage)
        if st is None or step < st.step0 or (st.ended and step < total):
            st = self.stages[stage] = _Stage(now, step) if st is None else self._restart(st, now, step)
        text = format_info(info)
        if self.bar is not None:
            if st.task is None:
                st.task = self.bar.add_task(stage, total=max(total, 1), info=text)
            self.bar.update(st.task, completed=step, total=max(total, 1), info=text)
            return
        done = total > 0 and step >= total
        due = st.last_line is None or now - st.last_line >= self.every or (done and not st.ended)
        if due and not st.ended:
            st.last_line = now
            self.console.print(self.line(stage, step, total, text, now - st.t0, step - st.step0),
                               markup=False, highlight=False, soft_wrap=True)
        st.ended = done

    def _restart(self, st: _Stage, now: float, step: int) -> _Stage:
        new = _Stage(now, step)
        new.task = st.task  # a stage that runs again (the next query's training) reuses its bar
        return new

    def line(self, stage: str, step: int, total: int, info: str, elapsed: float, steps: int) -> str:
        """The plain line: ``stage: step/total unit (pct), rate, ETA  info``."""
        unit = self.units.get(stage, "steps")
        rate = steps / elapsed if elapsed > 0 and steps > 0 else 0.0
        parts = [f"{stage}: {step}/{total} {unit}" + (f" ({100 * step / total:.0f}%)" if total > 0 else "")]
        if step >= total > 0:
            parts.append(f"done in {format_seconds(elapsed)}")
        elif rate > 0:
            parts += [f"{rate:,.3g} {unit}/s", f"ETA {format_seconds((total - step) / rate)}"]
        return ", ".join(parts) + (f"  {info}" if info else "")

    def stage(self, name: str) -> Callable[[int, int], None]:
        """A two-argument ``progress(done, total)`` for one stage (the file-level edit run's form)."""
        return lambda done, total: self(name, done, total, None)
