"""Tests for providers.local.daemon: detached spawning, liveness, killing."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from providers.local.daemon import (
    SpawnError,
    atomic_write_text,
    kill_pid,
    pid_alive,
    spawn_detached,
)

from .conftest import Runtime

_IGNORE_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"


def test_spawn_detached_returns_long_lived_non_child(runtime: Runtime) -> None:
    """spawn_detached returns the real process: alive, argv in cmdline, own session, no zombie."""
    marker = str(runtime.root / "marker")
    log = runtime.root / "sleeper.log"
    code = "import sys, time; print('started', flush=True); time.sleep(60)"
    pid = runtime.spawn([sys.executable, "-c", code, marker], log)

    assert pid_alive(pid)
    assert marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    # Not our child: nothing for us to reap, so no zombie can ever pile up in the caller.
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    assert os.getsid(pid) == pid != os.getsid(0)
    time.sleep(0.2)
    assert pid_alive(pid)
    assert "started" in log.read_text()


def test_kill_pid_escalates_to_sigkill_and_zombies_count_as_dead(runtime: Runtime) -> None:
    """kill_pid SIGKILLs a process that ignores SIGTERM after the grace period."""
    marker = str(runtime.root / "marker")
    pid = runtime.spawn([sys.executable, "-c", _IGNORE_TERM, marker], runtime.root / "x.log")
    time.sleep(0.3)  # let it install the SIGTERM handler
    started = time.monotonic()
    kill_pid(pid, grace=0.3)
    assert 0.3 <= time.monotonic() - started < 3.0
    # Its reaper may not have collected it yet; a zombie must still read as dead.
    assert not pid_alive(pid)
    kill_pid(pid)  # already gone: no error


def test_spawn_detached_reports_an_unstartable_command(tmp_path: Path) -> None:
    """A command that cannot be executed raises SpawnError instead of returning a pid."""
    with pytest.raises(SpawnError, match="No such file"):
        spawn_detached([str(tmp_path / "missing")], log_path=tmp_path / "x.log")


def test_pid_alive_is_false_for_impossible_pids() -> None:
    """pid_alive never claims a non-positive or unused pid is running."""
    assert not pid_alive(0)
    assert not pid_alive(-1)
    assert not pid_alive(2**22 + 1)  # above the kernel's pid_max ceiling
    assert pid_alive(os.getpid())


def test_atomic_write_text_replaces_whole_file(tmp_path: Path) -> None:
    """atomic_write_text leaves the full new content and no temporary files behind."""
    target = tmp_path / "sub" / "port"
    atomic_write_text(target, "1\n")
    atomic_write_text(target, "12345\n")
    assert target.read_text() == "12345\n"
    assert [p.name for p in target.parent.iterdir()] == ["port"]
