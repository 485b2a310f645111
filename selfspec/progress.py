"""The one progress report of every long step (loading, training, bench, search, datastores) on
stderr: a live rich bar on a terminal; when stderr is a pipe or a file, plain lines, flushed, one
when the step starts, then at most one every `every` seconds, and one at the end, so a log never
shows a silent wait and never floods either.

    with Bar("training", total=300, fields="loss {loss:.3f}", loss=float("nan")) as bar:
        bar.advance(loss=...)
"""
from __future__ import annotations

import sys
import time


class Bar:
    """`label`: what runs; `total`: steps (None: unknown); `fields`: a format string over the
    keyword values given at start and on each update; `enabled=False`: reports nothing;
    `delay`: show nothing unless the step is still running after that many seconds (at an
    update), so that steps that are usually quick (a cached load) stay quiet."""

    def __init__(self, label: str, total: int | None = None, *, enabled: bool = True, fields: str = "",
                 completed: int = 0, every: float = 5.0, delay: float = 0.0, **values) -> None:
        self.label, self.total, self.enabled, self.fields = label, total, enabled, fields
        self.completed, self.values, self.every, self.delay = completed, values, every, delay
        self._rich = self._task = None
        self._t0 = self._last = 0.0
        self._shown = False

    def __enter__(self) -> Bar:
        self._t0 = time.perf_counter()
        if self.enabled and self.delay <= 0:
            self._show()
        return self

    _live = None  # the rich Progress on the terminal: a bar started inside another joins it as a row

    def _show(self) -> None:
        self._shown = True
        if sys.stderr.isatty():
            self._owner = Bar._live is None  # else nested (a load inside a search): one more row
            if self._owner:
                from rich.console import Console
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                           TimeRemainingColumn)

                Bar._live = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[text]}"), TimeElapsedColumn(), TextColumn("eta"),
                                     TimeRemainingColumn(), console=Console(stderr=True))
                Bar._live.start()
            self._rich = Bar._live
            self._task = self._rich.add_task(self.label, total=self.total, completed=self.completed, text=self._text())
        else:
            self._line(force=True)

    def __exit__(self, *exc) -> None:
        if self._rich is not None and not self._owner:
            self._rich.remove_task(self._task)
        elif self._rich is not None:
            self._rich.stop()
            Bar._live = None
        elif self.enabled and self._shown:
            self._line(force=True, end="done" if exc[0] is None else "stopped")

    def update(self, advance: int = 0, *, completed: int | None = None, total: int | None = None,
               label: str | None = None, **values) -> None:
        """Move the bar (`advance` steps, or to `completed`) and/or change its label, total or fields."""
        self.completed = self.completed + advance if completed is None else completed
        self.total = total if total is not None else self.total
        self.label = label or self.label
        self.values.update(values)
        if self.enabled and not self._shown:
            if time.perf_counter() - self._t0 < self.delay:
                return
            self._show()
        if self._rich is not None:
            self._rich.update(self._task, completed=self.completed, total=self.total, description=self.label,
                              text=self._text())
        elif self.enabled:
            self._line()

    def advance(self, n: int = 1, **values) -> None:
        self.update(n, **values)

    def note(self, text: str) -> None:
        """A line of its own (above the bar on a terminal)."""
        if self._rich is not None:
            self._rich.console.print(text)
        elif self.enabled:  # a note is shown whatever the delay
            print(text, file=sys.stderr, flush=True)

    def _text(self) -> str:
        return self.fields.format(**self.values) if self.fields else ""

    def _line(self, force: bool = False, end: str = "") -> None:
        now = time.perf_counter()
        if not force and now - self._last < self.every:
            return
        self._last = now
        # a step without a count (a conversion that reports nothing until it ends) shows no "0"
        count = f"{self.completed}/{self.total}" if self.total else f"{self.completed}" if self.completed else ""
        parts = [f"{self.label}: {count}" if count else self.label, self._text(), f"{now - self._t0:.0f} s"]
        if self.total and 0 < self.completed < self.total and not end:
            parts.append(f"eta {(now - self._t0) / self.completed * (self.total - self.completed):.0f} s")
        print(", ".join(p for p in parts if p) + (f" ({end})" if end else ""), file=sys.stderr, flush=True)
