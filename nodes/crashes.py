"""What a model process leaves behind when it crashes, and the record of a death.

llama.cpp runs inside the replica's process, so a fault in native code (a
segfault in a CPU kernel, an abort on a failed assertion) kills the process
with no Python exception for anyone to catch. Two things survive it:

* a **crash note**: each replica process arms Python's ``faulthandler`` to write
  into a file of its own (``<dir>/<pid>.crash``) before it loads anything. On a
  fatal signal the file receives the signal's name and the stack of every
  thread; a process that stops gracefully deletes its note. The next replica of
  the same placement (Serve starts one at once) collects the notes of processes
  that are gone and reports them: that is how the controller learns *why*.
* the **death** the caller sees: Ray fails the calls of a dead actor with an
  error that names the process (``pid: N``); the ingress reports that too, so
  the controller counts deaths even when no note was written (SIGKILL, OOM).

Both become a ``ProcessDeath``, keyed by pid, so the two reports of one crash
count once.
"""

from __future__ import annotations

import faulthandler
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import psutil

NOTE_SUFFIX = ".crash"
# How many innermost frames of the crashing thread a crash's summary names.
FRAMES_SHOWN = 3

_FATAL = re.compile(r"Fatal Python error: (?P<what>[^\n]+)")
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<func>\S+)')
_PID = re.compile(r"\bpid[:=]\s*(\d+)")
# faulthandler's words for the signals it handles, as ``kill -l`` names them.
_SIGNALS = {
    "Segmentation fault": "SIGSEGV",
    "Aborted": "SIGABRT",
    "Bus error": "SIGBUS",
    "Floating-point exception": "SIGFPE",
    "Floating point exception": "SIGFPE",
    "Illegal instruction": "SIGILL",
}


@dataclass(frozen=True, slots=True)
class ProcessDeath:
    """One model process that died while it should have been serving."""

    pid: int | None  # None when the reporter could not tell which process it was
    at: float  # when (seconds since the epoch; the note's time, or when it was seen)
    detail: str  # one line for people: the signal and where, or what Ray said
    source: Literal["note", "caller"]  # its own crash note, or a caller that saw it die


def notes_dir(app: str, root: Path | None = None) -> Path:
    """Where the replicas of Serve application ``app`` keep their notes on this box."""
    base = root or Path(tempfile.gettempdir()) / f"corral-crashes-{os.getuid()}"
    return base / re.sub(r"[^A-Za-z0-9._-]+", "-", app)


class CrashNotes:
    """The crash notes of one placement's replicas on this box (see module docstring)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._file: IO[str] | None = None

    def arm(self, pid: int | None = None) -> Path:
        """Have a fatal signal in this process write its note; returns the note's path."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{pid or os.getpid()}{NOTE_SUFFIX}"
        self._file = open(path, "w")  # noqa: SIM115 - held open for the process's life
        faulthandler.enable(file=self._file, all_threads=True)
        return path

    def disarm(self) -> None:
        """A graceful end: no note to leave."""
        if self._file is None:
            return
        faulthandler.disable()
        path = Path(self._file.name)
        self._file.close()
        self._file = None
        path.unlink(missing_ok=True)

    def collect(self, alive=None) -> list[ProcessDeath]:
        """The deaths that notes of gone processes tell of, oldest first; their notes are
        removed. A gone process's empty note (killed without a fatal signal, or stopped
        too hard to clean up) is removed without a report: the caller that saw it die
        reports that death, if it happened while serving."""
        alive = alive or psutil.pid_exists
        deaths = []
        for path in sorted(self.directory.glob(f"*{NOTE_SUFFIX}")):
            try:
                pid = int(path.stem)
            except ValueError:
                continue
            if pid == os.getpid() or alive(pid):
                continue
            try:
                text, at = path.read_text(errors="replace"), path.stat().st_mtime
            except OSError:
                continue
            path.unlink(missing_ok=True)
            if text.strip():
                deaths.append(ProcessDeath(pid, at, describe_fault(text), "note"))
        return sorted(deaths, key=lambda d: d.at)


def describe_fault(text: str) -> str:
    """One line from faulthandler's dump: the signal and the innermost Python frames.

    >>> describe_fault('Fatal Python error: Segmentation fault\\n\\nCurrent thread 0x1 '
    ...     '(most recent call first):\\n  File "/x/engine.py", line 9 in decode\\n')
    'SIGSEGV (Segmentation fault) in decode (engine.py:9)'
    """
    fatal = _FATAL.search(text)
    what = fatal.group("what").strip() if fatal else "a fatal error"
    name = _SIGNALS.get(what)
    head = f"{name} ({what})" if name else what
    # The crashing thread is the one faulthandler calls "Current thread"; frames are listed
    # most recent first.
    current = text.split("Current thread", 1)[1] if "Current thread" in text else text
    current = current.split("\n\n", 1)[0]
    frames = [
        f"{m['func']} ({Path(m['file']).name}:{m['line']})" for m in _FRAME.finditer(current)
    ][:FRAMES_SHOWN]
    return f"{head} in {' < '.join(frames)}" if frames else head


def death_from_error(error: BaseException | str, at: float | None = None) -> ProcessDeath:
    """The death a caller saw as Ray's actor-died error (which names the process)."""
    text = str(error)
    pid = _PID.search(text)
    return ProcessDeath(
        pid=int(pid.group(1)) if pid else None,
        at=time.time() if at is None else at,
        detail=_ray_reason(text),
        source="caller",
    )


def _ray_reason(text: str) -> str:
    """The informative part of Ray's actor-death message."""
    for marker in ("Worker exit detail:", "The actor is dead because", "The actor died"):
        if marker in text:
            rest = text.split(marker, 1)[1].strip()
            line = rest.split(". ", 1)[0].strip().rstrip(".")
            return f"its process died ({line})" if line else "its process died"
    return "its process died"
