"""What the model commands draw: progress lines as ``ollama pull`` draws them, and sizes,
ages and digests in the words ``ollama list`` uses.

Pure functions turn Ollama's progress objects into ``Row``s; ``ProgressView`` is
the one place that draws them (on stderr, so stdout stays the command's answer).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text


@dataclass(frozen=True)
class Row:
    """One line of progress: a bar when ``total`` is known, else a status line."""

    key: str
    label: str
    total: int | None = None
    completed: int = 0


def short_digest(digest: str) -> str:
    """``sha256:0123456789abcdef...`` -> ``0123456789ab``, as Ollama names layers."""
    return digest.removeprefix("sha256:")[:12]


def progress_row(message: dict[str, Any]) -> Row:
    """The line an Ollama progress object updates: its layer's bar, or its status line."""
    status = message.get("status", "")
    digest = message.get("digest")
    if digest and message.get("total"):
        verb = status.split()[0] if status else "pulling"
        label = f"{verb} {short_digest(digest)}"
        return Row(digest, label, int(message["total"]), int(message.get("completed") or 0))
    return Row(status, status)


class _OnBars(ProgressColumn):
    """Shows ``column`` on bar rows only, so status lines stay plain text."""

    def __init__(self, column: ProgressColumn) -> None:
        super().__init__()
        self.column = column

    def render(self, task: Task) -> Any:
        return self.column.render(task) if task.fields["bar"] else Text("")


class ProgressView:
    """Progress lines on stderr in the order they first came, as ``ollama pull`` draws them."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            _OnBars(BarColumn()),
            _OnBars(DownloadColumn()),
            _OnBars(TransferSpeedColumn()),
            _OnBars(TimeRemainingColumn()),
            console=Console(stderr=True),
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> ProgressView:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def show(self, row: Row) -> None:
        """Add ``row`` as a new line, or move the bar of the line with its key."""
        task = self.tasks.get(row.key)
        if task is None:
            self.tasks[row.key] = self.progress.add_task(
                row.label, total=row.total, completed=row.completed, bar=row.total is not None
            )
        else:
            self.progress.update(task, total=row.total, completed=row.completed)


# -- words for sizes and times ----------------------------------------------------


def human_size(n: int) -> str:
    """``4.7 GB``, ``135 MB``: decimal units as ``ollama list`` prints them."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            value = n / scale
            if value < 10 and value != int(value):
                return f"{value:.1f} {unit}"
            return f"{int(value)} {unit}"
    return f"{n} B"


def human_age(seconds: float) -> str:
    """``3 days ago``, ``About an hour ago``: how long ago, as ``ollama list`` says it."""
    s = max(0, int(seconds))
    minutes, hours = s // 60, round(seconds / 3600)
    if s < 1:
        words = "Less than a second"
    elif s < 60:
        words = "1 second" if s == 1 else f"{s} seconds"
    elif minutes < 60:
        words = "About a minute" if minutes == 1 else f"{minutes} minutes"
    elif hours == 1:
        words = "About an hour"
    elif hours < 48:
        words = f"{hours} hours"
    elif hours < 24 * 14:
        words = f"{hours // 24} days"
    elif hours < 24 * 60:
        words = f"{hours // (24 * 7)} weeks"
    elif hours < 24 * 365 * 2:
        words = f"{hours // (24 * 30)} months"
    else:
        words = f"{hours // (24 * 365)} years"
    return f"{words} ago"


def modified(text: str | None, now: datetime) -> str:
    """``modified_at`` (RFC 3339, even with nanoseconds) as an age; ``Never`` when absent."""
    if not text:
        return "Never"
    return human_age((now - datetime.fromisoformat(text)).total_seconds())
