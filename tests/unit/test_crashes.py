"""Crash notes (``nodes/crashes.py``): what a process that dies by a signal leaves, read back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nodes.crashes import CrashNotes, death_from_error, describe_fault

ROOT = Path(__file__).parents[2]

DUMP = """Fatal Python error: Segmentation fault

Thread 0x00007f01 (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 320 in wait
  File "/srv/deployments/replica.py", line 88 in get

Current thread 0x00007f02 (most recent call first):
  File "/srv/nodes/llamacpp.py", line 190 in generate
  File "/srv/deployments/replica.py", line 245 in work
  File "/usr/lib/python3.11/concurrent/futures/thread.py", line 58 in run
  File "/usr/lib/python3.11/threading.py", line 975 in run

Extension modules: numpy.core._multiarray_umath (total: 1)
"""


@pytest.mark.parametrize(
    ("dump", "said"),
    [
        (
            DUMP,
            "SIGSEGV (Segmentation fault) in generate (llamacpp.py:190) < work (replica.py:245)"
            " < run (thread.py:58)",
        ),
        ("Fatal Python error: Aborted\n\nStack (most recent call first):\n", "SIGABRT (Aborted)"),
        ("Fatal Python error: Illegal instruction\n", "SIGILL (Illegal instruction)"),
        ("Fatal Python error: Something new\n", "Something new"),
        ("garbage", "a fatal error"),
    ],
)
def test_describe_fault_names_the_signal_and_the_crashing_thread(dump, said):
    assert describe_fault(dump) == said


def test_a_process_killed_by_sigsegv_leaves_a_note_its_successor_reads(tmp_path):
    notes = tmp_path / "app"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from nodes.crashes import CrashNotes

        def decode():
            os.kill(os.getpid(), signal.SIGSEGV)

        CrashNotes(Path({str(notes)!r})).arm()
        decode()
        """
    )
    died = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert died.returncode == -signal.SIGSEGV

    deaths = CrashNotes(notes).collect()
    assert len(deaths) == 1
    assert deaths[0].source == "note" and deaths[0].pid is not None
    assert deaths[0].detail.startswith("SIGSEGV (Segmentation fault) in decode (<string>:"), deaths
    assert list(notes.iterdir()) == []  # read once
    assert CrashNotes(notes).collect() == []


def test_a_graceful_end_leaves_no_note_and_live_or_silent_ones_are_not_reported(tmp_path):
    notes = CrashNotes(tmp_path)
    path = notes.arm()
    assert path.exists()
    notes.disarm()
    assert not path.exists()
    # A live process's note stays; a dead process's empty note (SIGKILL) goes, unreported.
    (tmp_path / f"{os.getppid()}.crash").write_text("Fatal Python error: Aborted\n")
    (tmp_path / "999999999.crash").write_text("")
    assert CrashNotes(tmp_path).collect() == []
    assert [p.name for p in tmp_path.iterdir()] == [f"{os.getppid()}.crash"]


def test_death_from_rays_error_keeps_the_pid_and_the_exit_detail():
    text = (
        "The actor died unexpectedly before finishing this task.\n\tclass_name: ServeReplica\n"
        "\tpid: 4242\n\tip: 10.0.0.3\nThe actor is dead because its worker process has died. "
        "Worker exit type: SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a "
        "connection error code 2. End of file."
    )
    death = death_from_error(text, at=5.0)
    assert (death.pid, death.at, death.source) == (4242, 5.0, "caller")
    assert death.detail == (
        "its process died (Worker unexpectedly exits with a connection error code 2)"
    )
    bare = death_from_error("The actor died unexpectedly before finishing this task.", at=1.0)
    assert bare.pid is None and bare.detail.startswith("its process died")
