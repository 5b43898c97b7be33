"""Start, probe and stop the long-lived processes of the embedded local cloud.

Also home of :func:`atomic_write_text`, the small-file handshake every such process uses.

The local provider's servers and its elastic address are real OS processes that must
outlive the changeover run that created them, exactly like cloud instances outlive the
API call that launched them. :func:`spawn_detached` therefore detaches them completely:

    caller --subprocess.run--> helper (``python -I -S -c _HELPER``) --posix_spawn+setsid--> target

The helper prints the target's pid and exits at once, so the caller reaps the helper
straight away and never owns the target: no zombie is left behind in the caller, and
the target is re-parented to init (or the nearest subreaper) in its own session. The
helper imports nothing but ``os`` and ``sys`` (no ``site`` either): it costs a few
milliseconds of CPU rather than the tens a helper importing ``subprocess`` and
``argparse`` did, CPU that every server start took from the servers already serving.

Because the target is not our child, we cannot ``waitpid`` it. Its reaper may also be
slow or absent (a container's pid 1), so :func:`pid_alive` treats a zombie as dead.

Only the standard library is used: this module is imported by the local cloud's
processes, which must start fast.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["SpawnError", "atomic_write_text", "kill_pid", "pid_alive", "spawn_detached"]

# How long the caller waits for the helper; the helper only forks and execs, so a
# slow answer means something is badly wrong on the host.
SPAWN_HELPER_TIMEOUT = 30.0

# How often kill_pid re-checks a process it has signalled.
_KILL_POLL_INTERVAL = 0.02


class SpawnError(RuntimeError):
    """The detached process could not be started (bad argv, unwritable log, ...)."""


# The spawn helper: argv is LOG CWD TARGET...; CWD may be empty. Its fds 0-2 come from the
# caller; what it opens is close-on-exec (PEP 446), so the target inherits only its
# stdin (/dev/null) and stdout/stderr (the log).
_HELPER = """\
import os, sys
log, cwd, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
try:
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    null = os.open(os.devnull, os.O_RDONLY)
    if cwd:
        os.chdir(cwd)
    try:
        fds = [(os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, out, 1)]
        fds.append((os.POSIX_SPAWN_DUP2, out, 2))
        pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=fds, setsid=True)
    except (AttributeError, NotImplementedError):  # no posix_spawn setsid here
        import subprocess
        pid = subprocess.Popen(argv, stdin=null, stdout=out, stderr=out,
                               start_new_session=True).pid
except OSError as exc:
    import errno
    name = errno.errorcode.get(exc.errno or 0, "?")
    sys.stderr.write(f"{exc.strerror or exc} ({name})\\n")
    sys.exit(1)
sys.stdout.write(f"{pid}\\n")
sys.stdout.flush()
os._exit(0)  # the target now belongs to init: nothing to wait for or warn about
"""


def spawn_detached(
    argv: list[str],
    *,
    log_path: Path,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> int:
    """Start ``argv`` detached from the caller and return the pid of the long-lived process.

    stdin is /dev/null; stdout and stderr are appended to ``log_path`` (its parent
    directories are created). ``env`` replaces the environment when given, as with
    :class:`subprocess.Popen`.
    """
    if not argv:
        raise SpawnError("argv must not be empty")
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    helper = [
        sys.executable,
        # -I: the helper must not be disturbed by PYTHON* variables meant for the target,
        # nor pick up modules from the caller's cwd; -S: it needs no site-packages.
        "-I",
        "-S",
        "-c",
        _HELPER,
        str(log_path.resolve()),
        str(Path(cwd).resolve()) if cwd is not None else "",
        *argv,
    ]
    try:
        done = subprocess.run(
            helper,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=SPAWN_HELPER_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise SpawnError(f"could not run the spawn helper for {argv[0]!r}: {exc}") from exc
    if done.returncode != 0:
        reason = done.stderr.strip() or f"exit status {done.returncode}"
        raise SpawnError(f"could not start {argv[0]!r}: {reason}")
    try:
        return int(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise SpawnError(f"spawn helper printed no pid: {done.stdout!r}") from exc


def _proc_state(pid: int) -> str | None:
    """Return the one-letter state from /proc/PID/stat, or None if there is no such pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return "?"
    # The command name (field 2) may contain spaces and parentheses; the state follows
    # the last ')'.
    rest = stat[stat.rfind(")") + 1 :].split()
    return rest[0] if rest else "?"


def pid_alive(pid: int) -> bool:
    """Return True if ``pid`` is a running (non-zombie) process."""
    if pid <= 0:
        return False
    if Path("/proc/self/stat").exists():
        state = _proc_state(pid)
        # 'Z' zombie and 'X' dead: the process has exited but nobody reaped it yet.
        return state is not None and state not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap_if_child(pid: int) -> None:
    """Reap ``pid`` if it happens to be our own child, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def kill_pid(pid: int, *, grace: float = 2.0) -> None:
    """Send SIGTERM, wait up to ``grace`` seconds, then SIGKILL; a missing process is fine."""
    if not pid_alive(pid):
        _reap_if_child(pid)
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap_if_child(pid)
        if not pid_alive(pid):
            return
        time.sleep(_KILL_POLL_INTERVAL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    # SIGKILL is not instantaneous; wait briefly so callers can rely on the pid being gone.
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        _reap_if_child(pid)
        if not pid_alive(pid):
            return
        time.sleep(_KILL_POLL_INTERVAL)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see either the old or the whole new content.

    The local cloud's processes announce readiness through small files (pid, port) that
    other processes poll, so a reader must never see a half-written one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
