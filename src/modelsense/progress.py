"""Progress bars for long loops (rich), silenced globally by `--quiet` or per call."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_QUIET = False


def set_quiet(quiet: bool) -> None:
    """Silence (or restore) every progress bar of this process."""
    global _QUIET
    _QUIET = bool(quiet)


def is_quiet() -> bool:
    """Whether progress bars are off (`set_quiet`)."""
    return _QUIET


class _Task:
    def __init__(self, progress: Progress | None, task_id: int | None) -> None:
        self._progress, self._id = progress, task_id

    def advance(self, n: float = 1, **fields: object) -> None:
        if self._progress is not None:
            desc = fields.pop("description", None)
            self._progress.update(self._id, advance=n, **({"description": desc} if desc else {}))
            if fields:
                self._progress.update(self._id, info=_fmt(fields))

    def set_info(self, **fields: object) -> None:
        if self._progress is not None:
            self._progress.update(self._id, info=_fmt(fields))

    def set_total(self, total: float) -> None:
        """Change the total, e.g. to the steps done when a loop stops early (the bar then ends full)."""
        if self._progress is not None:
            self._progress.update(self._id, total=total)


def _fmt(fields: dict[str, object]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())


@contextlib.contextmanager
def progress_bar(total: float, description: str, enabled: bool = True) -> Iterator[_Task]:
    """A progress bar on stderr; a no-op when disabled or when the process is quiet.

    Example:
        >>> with progress_bar(10, "epochs") as bar:
        ...     for _ in range(10):
        ...         bar.advance(loss=0.1)
    """
    if not enabled or _QUIET:
        yield _Task(None, None)
        return
    from rich.console import Console

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns, console=Console(file=sys.stderr), transient=False) as progress:
        task_id = progress.add_task(description, total=total, info="")
        yield _Task(progress, task_id)
