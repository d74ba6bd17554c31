"""Progress of long CLI jobs: a rich bar on a terminal, plain timed lines otherwise.

`describe-tags` or `build-tags` run for tens of minutes, often under nohup, in CI or in a
Kubernetes Job, where stderr is no terminal and a bar would either be hidden or flood the
log. There a line like `describing: 120/3015 (4%), 1m35s elapsed, ~36m left` every
`interval` seconds (and one at the end) says the job is alive and when it will finish.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.console import Console


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


@dataclass
class _Task:
    description: str
    total: float | None
    start: float
    stage_start: float  # the ETA of a multi-stage job counts from its stage's start
    last: float
    completed: float = 0
    # done when the stage was first heard of: a stage is often first reported with its
    # first step already done, whose time is unknown, so the rate counts from there
    stage_done: float = 0
    last_printed: float | None = None


class LineProgress:
    """The subset of `rich.progress.Progress` the CLI uses, written as log lines."""

    def __init__(
        self,
        label: str,
        console: Console,
        *,
        interval: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.console = console
        self.interval = interval
        self.clock = clock
        self._tasks: list[_Task] = []

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            for t in self._tasks:
                if t.completed and t.last_printed != t.completed:
                    self._print(t)

    def add_task(self, description: str, total: float | None = None, **_: Any) -> int:
        now = self.clock()
        self._tasks.append(_Task(self.label, total, start=now, stage_start=now, last=now))
        return len(self._tasks) - 1

    def update(
        self,
        task_id: int,
        *,
        completed: float | None = None,
        total: float | None = None,
        description: str | None = None,
        **_: Any,
    ) -> None:
        t = self._tasks[task_id]
        new_stage = description is not None and description != t.description
        if total is not None:
            t.total = total
        if completed is not None:
            t.completed = completed
        if new_stage:
            t.description = description or t.description
            t.stage_start = self.clock()
            t.stage_done = t.completed
            t.last = -float("inf")  # a new stage: say so at once
        now = self.clock()
        finished = t.total is not None and t.completed >= t.total > 0
        if now - t.last >= self.interval or (finished and t.last_printed != t.completed):
            self._print(t)
            t.last = now

    def _print(self, t: _Task) -> None:
        done, total = t.completed, t.total
        now = self.clock()
        elapsed, in_stage = now - t.start, now - t.stage_start
        parts = [f"{t.description}: {int(done)}"]
        if total:
            parts[0] += f"/{int(total)} ({100 * done / total:.0f}%)"
        parts.append(f"{_duration(elapsed)} elapsed")
        if total and t.stage_done < done < total and in_stage > 0:
            rate = (done - t.stage_done) / in_stage
            parts.append(f"~{_duration((total - done) / rate)} left")
        self.console.print(", ".join(parts), highlight=False, soft_wrap=True)
        t.last_printed = done


def progress(label: str, console: Console, *, interval: float = 30.0) -> Any:
    """A rich bar when `console` writes to a terminal, else `LineProgress`."""
    if console.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        return Progress(
            f"[bold]{label}[/]",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
    return LineProgress(label, console, interval=interval)
