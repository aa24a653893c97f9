"""cfedit.progress: one display for every long command — plain periodic lines off a terminal, bars that
fit 80 columns on one."""

import io

from rich.console import Console

from cfedit.progress import ProgressView, format_info, format_seconds


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_info_is_words_never_a_dict():
    assert format_info({"epoch": 2, "loss": 0.012345678, "query": "recolor", "nested": {"a": 1}, "x": None}) \
        == "epoch=2 loss=0.01235 query=recolor"
    assert format_seconds(42) == "42 s" and format_seconds(185) == "3 min 05 s" and format_seconds(float("nan")) == "?"


def test_plain_lines_when_not_a_terminal():
    buf, clock = io.StringIO(), Clock()
    view = ProgressView(Console(file=buf, width=80), units={"edit": "files"}, every=10, terminal=False, clock=clock)
    with view:
        view("mechanism", 0, 100, {"epoch": 1})  # a stage's start: one line
        for step in range(1, 100):
            clock.t = step * 0.5  # 2 steps/s: a line every 10 s = every 20 steps
            view("mechanism", step, 100, {"epoch": 1 + step // 50, "loss": 0.5})
        clock.t = 50.0
        view("mechanism", 100, 100, {"epoch": 2, "loss": 0.25})
        view("edit", 3, 3, None)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "mechanism: 0/100 steps (0%)  epoch=1"
    assert lines[1].startswith("mechanism: 20/100 steps (20%), 2 steps/s, ETA 40 s  epoch=1 loss=0.5")
    assert lines[-2] == "mechanism: 100/100 steps (100%), done in 50 s  epoch=2 loss=0.25"
    assert lines[-1] == "edit: 3/3 files (100%), done in 0 s"
    assert len(lines) == 2 + 4 + 1  # start, every 10 s, the end of each stage: periodic, not per step
    assert all(len(line) <= 80 for line in lines)


def test_a_stage_that_runs_again_starts_its_rate_afresh():
    buf, clock = io.StringIO(), Clock()
    view = ProgressView(Console(file=buf, width=80), terminal=False, clock=clock)
    view("ncm max", 10, 10, {"query": "a"})
    clock.t = 100.0
    view("ncm max", 0, 10, {"query": "b"})  # the next query's training
    assert buf.getvalue().splitlines()[-1] == "ncm max: 0/10 steps (0%)  query=b"


def test_bars_fit_80_columns_and_keep_the_stage_name():
    buf = io.StringIO()
    console = Console(file=buf, width=80, force_terminal=True, color_system=None)
    with ProgressView(console, terminal=True) as view:
        view("labeller", 30, 400, {"epoch": 3, "loss": 0.123456, "acc_digit": 0.98, "acc_color": 1.0,
                                   "acc_bar": 0.99, "kl": 3.14159})
    last = [line for line in buf.getvalue().splitlines() if "labeller" in line][-1]
    assert "labeller" in last and "30/400" in last and "{" not in last
