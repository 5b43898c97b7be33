"""Per-stack lease lock with a TTL and a fencing token (I5).

The lease lives in the state database. Each acquisition takes a fresh, strictly
increasing token; the journal refuses writes carrying an older token, so a run whose
lease was broken (`unlock --force`) or taken over cannot record another step.
A crashed run keeps its lease until resumed or rolled back: the same run may take it
back at once when the holding process is dead.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator.errors import FencedError, LockedError


@dataclass(frozen=True)
class Lease:
    """A held lease."""

    stack: str
    run_id: str
    token: int
    expires_at: float


def pid_alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


class LeaseLock:
    """Acquire, renew, release and break per-stack leases."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        ttl: float = 60.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.conn = conn
        self.ttl = ttl
        self.clock = clock
        self.sleep = sleep
        self.host = socket.gethostname()

    def holder(self, stack: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.conn.execute(
            "SELECT * FROM locks WHERE stack=?", (stack,)
        ).fetchone()
        return row

    def _blocker(self, row: sqlite3.Row, run_id: str, now: float) -> str | None:
        """Why the lease in `row` may not be taken by `run_id` now (None: it may be).
        "observe" means: held from another host and expired by our clock, which may be
        wrong, so first watch it for a heartbeat."""
        same_run = row["run_id"] == run_id
        expired = row["expires_at"] <= now
        if row["host"] == self.host:
            if row["pid"] == os.getpid():
                # This very process (an in-process resume): only the clock can tell.
                return None if same_run or expired else "held"
            if pid_alive(row["pid"]):
                # A live holder keeps its lease, whatever the clocks say.
                return "alive"
            # Another run's lease blocks until it expires, even if that process died:
            # its run is unfinished and must be resumed or rolled back first.
            return None if same_run or expired else "held"
        return "observe" if expired else "held"

    def _refuse(self, row: sqlite3.Row, why: str, now: float) -> LockedError:
        detail = ""
        if why == "alive":
            detail = f"held by live process {row['pid']} on this host"
        elif why == "observe":
            detail = f"its holder on {row['host']} is still renewing it"
        return LockedError(row["stack"], row["run_id"], row["expires_at"] - now, detail)

    def ensure_free(self, stack: str) -> None:
        """Raise LockedError if a live holder or an unexpired lease holds `stack`."""
        row = self.holder(stack)
        if row is None:
            return
        now = self.clock()
        # As a new run would see it; an expired lease from another host is for
        # `acquire` to watch.
        if (why := self._blocker(row, "", now)) in ("alive", "held"):
            raise self._refuse(row, why, now)

    def acquire(self, stack: str, run_id: str) -> Lease:
        taken = self._take(stack, run_id, observed=None)
        if isinstance(taken, Lease):
            return taken
        # Held from another host and expired by our clock. A holder renews every ttl/3 on
        # its own monotonic schedule; half a TTL without a renewal means it is gone,
        # whatever either wall clock says.
        self.sleep(self.ttl / 2)
        taken = self._take(stack, run_id, observed=taken)
        assert isinstance(taken, Lease), "the second look always decides"
        return taken

    def _take(
        self, stack: str, run_id: str, observed: tuple[int, float] | None
    ) -> Lease | tuple[int, float]:
        """Take the lease, or raise LockedError; or, for a lease to watch first (and
        nothing `observed` yet), return what it looks like now."""
        now = self.clock()
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            row = self.holder(stack)
            why = None if row is None else self._blocker(row, run_id, now)
            if row is not None and why == "observe":
                seen = (int(row["token"]), float(row["expires_at"]))
                if observed is None:
                    self.conn.execute("ROLLBACK")
                    return seen
                why = None if seen == observed else why  # unchanged: dead; renewed: alive
            if row is not None and why is not None:
                raise self._refuse(row, why, now)
            token = self._next_token(stack)
            self.conn.execute(
                "INSERT OR REPLACE INTO locks VALUES (?,?,?,?,?,?,?)",
                (stack, run_id, token, os.getpid(), self.host, now, now + self.ttl),
            )
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        return Lease(stack, run_id, token, now + self.ttl)

    def _next_token(self, stack: str) -> int:
        row = self.conn.execute("SELECT last_token FROM fencing WHERE stack=?", (stack,)).fetchone()
        token = (row["last_token"] if row else 0) + 1
        self.conn.execute("INSERT OR REPLACE INTO fencing VALUES (?,?)", (stack, token))
        return token

    def check(self, lease: Lease) -> None:
        """Raise FencedError unless `lease` is still the current holder."""
        row = self.holder(lease.stack)
        if row is None or row["token"] != lease.token:
            raise FencedError(
                f"lease on {lease.stack!r} for run {lease.run_id} was broken or taken over"
            )

    def renew(self, lease: Lease) -> Lease:
        expires = self.clock() + self.ttl
        cur = self.conn.execute(
            "UPDATE locks SET expires_at=? WHERE stack=? AND token=?",
            (expires, lease.stack, lease.token),
        )
        if cur.rowcount != 1:
            raise FencedError(f"lease on {lease.stack!r} for run {lease.run_id} was lost")
        return Lease(lease.stack, lease.run_id, lease.token, expires)

    def release(self, lease: Lease) -> None:
        self.conn.execute("DELETE FROM locks WHERE stack=? AND token=?", (lease.stack, lease.token))

    def break_lock(self, stack: str) -> str | None:
        """Force the lease off (`unlock --force`). The old holder is fenced from now on."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            row = self.holder(stack)
            self.conn.execute("DELETE FROM locks WHERE stack=?", (stack,))
            self._next_token(stack)
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        return row["run_id"] if row else None
