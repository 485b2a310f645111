"""A rich progress bar on stderr for the long steps of training (count, extra fields, ETA)."""
from __future__ import annotations

import sys


class Bar:
    """`with Bar("training", total, enabled, "loss {task.fields[loss]:.3f}", loss=0.0) as bar:
    bar.advance(loss=...)`; does nothing when not enabled."""

    def __init__(self, label: str, total: int, enabled: bool, fields: str = "", completed: int = 0, **values) -> None:
        self.label, self.total, self.enabled, self.fields = label, total, enabled, fields
        self.completed, self.values, self.p = completed, values, None

    def __enter__(self) -> "Bar":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            columns = [TextColumn(self.label), BarColumn(), MofNCompleteColumn()]
            if self.fields:
                columns.append(TextColumn(self.fields))
            self.p = Progress(*columns, TimeRemainingColumn(), console=Console(file=sys.stderr))
            self.p.start()
            self.task = self.p.add_task("", total=self.total, completed=self.completed, **self.values)
        return self

    def advance(self, n: int = 1, **values) -> None:
        if self.p is not None:
            self.p.update(self.task, advance=n, **values)

    def __exit__(self, *exc) -> None:
        if self.p is not None:
            self.p.stop()
