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
        self, conn: sqlite3.Connection, ttl: float = 60.0, clock: Callable[[], float] = time.time
    ) -> None:
        self.conn = conn
        self.ttl = ttl
        self.clock = clock
        self.host = socket.gethostname()

    def holder(self, stack: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.conn.execute(
            "SELECT * FROM locks WHERE stack=?", (stack,)
        ).fetchone()
        return row

    def acquire(self, stack: str, run_id: str) -> Lease:
        now = self.clock()
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            row = self.holder(stack)
            if row is not None:
                dead = row["host"] == self.host and not pid_alive(row["pid"])
                same_run = row["run_id"] == run_id
                # Another run's lease blocks until it expires, even if that process
                # died: its run is unfinished and must be resumed or rolled back first.
                if not same_run and row["expires_at"] > now:
                    raise LockedError(stack, row["run_id"], row["expires_at"] - now)
                if same_run and not dead and row["pid"] != os.getpid() and row["expires_at"] > now:
                    raise LockedError(stack, row["run_id"], row["expires_at"] - now)
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
