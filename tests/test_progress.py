"""Progress lines for long jobs when stderr is no terminal (nohup, CI, a Job's log)."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import Progress

from consumer.tools.progress import LineProgress, progress


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=False, width=200), buf


def test_lines_every_interval_with_eta_and_one_at_the_end() -> None:
    console, buf = _console()
    clock = Clock()
    with LineProgress("describing", console, interval=30, clock=clock) as bar:
        task = bar.add_task("describe", total=100)
        for done in range(1, 101):
            clock.now = done * 2.0  # 2 s per step
            bar.update(task, completed=done)
    lines = buf.getvalue().splitlines()
    # a line each 30 s of a 200 s job, then the final one
    assert lines[0] == "describing: 15/100 (15%), 30s elapsed, ~2m50s left"
    assert lines[-1] == "describing: 100/100 (100%), 3m20s elapsed"
    assert len(lines) == 7


def test_stage_changes_are_said_at_once_and_unknown_totals_work() -> None:
    console, buf = _console()
    clock = Clock()
    with LineProgress("embedding", console, interval=30, clock=clock) as bar:
        task = bar.add_task("embed", total=None)  # total not known yet
        clock.now = 40
        bar.update(task, completed=256)
        bar.update(task, description="proposals", completed=0, total=10)
        clock.now = 45
        bar.update(task, completed=3)  # within the interval: quiet
        clock.now = 50
        bar.update(task, completed=4)
    # the exit says where it stopped
    assert buf.getvalue().splitlines() == [
        "embedding: 256, 40s elapsed",
        "proposals: 0/10 (0%), 40s elapsed",
        "proposals: 4/10 (40%), 50s elapsed, ~15s left",
    ]


def test_a_stage_first_heard_of_with_a_step_done_gives_no_eta_until_it_has_a_rate() -> None:
    # build-tags reports a stage when its first LLM answer is back: that step's duration is
    # unknown, so the first line says no "~0s left", and the rate counts from it
    console, buf = _console()
    clock = Clock()
    with LineProgress("building", console, interval=30, clock=clock) as bar:
        task = bar.add_task("build", total=None)
        clock.now = 2
        bar.update(task, description="asking the LLM", completed=1, total=1200)
        clock.now = 32
        bar.update(task, completed=31)  # 30 steps in 30 s since the first line
    assert buf.getvalue().splitlines() == [
        "asking the LLM: 1/1200 (0%), 2s elapsed",
        "asking the LLM: 31/1200 (3%), 32s elapsed, ~19m29s left",
    ]


def test_a_terminal_gets_a_bar_anything_else_lines() -> None:
    console, _ = _console()
    assert isinstance(progress("x", console), LineProgress)
    assert isinstance(progress("x", Console(file=io.StringIO(), force_terminal=True)), Progress)
