"""The embedded state store: one SQLite file in the state dir (the default).

``changeover.db`` holds the journal (runs, steps, run events), the leases with their
fencing counters, and the recorded component versions and audit facts. Fenced writes
check the lease inside the same ``BEGIN IMMEDIATE`` transaction as the write, so a
holder whose lease was broken or taken over cannot record another step.

:class:`LeaseLock` and :class:`Journal` are the two halves; :class:`SqliteStore` is both
behind the :class:`~orchestrator.state.base.StateStore` Protocol, plus the recorded
versions and facts. Tests and tools may read the file directly: its schema is stable.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from orchestrator.redact import redact_text
from orchestrator.state.base import (
    UNFINISHED,
    VERIFY_STEP,
    FactsRecord,
    Holder,
    Lease,
    LeaseRules,
    Observed,
    RunEvent,
    RunRecord,
    StateStore,
    StateUnavailable,
    StepRecord,
    VerifiedReport,
    VersionRecord,
    dumps,
)

DB_NAME = "changeover.db"
DIR_MODE = 0o700  # the journal, the lock and the local cloud's files: the owner's only
FILE_MODE = 0o600

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    strategy TEXT NOT NULL,
    stack TEXT NOT NULL,
    status TEXT NOT NULL,
    outcome TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    plan_json TEXT NOT NULL,
    result_json TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS runs_stack ON runs(stack, created_at);
CREATE TABLE IF NOT EXISTS steps (
    run_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    key TEXT NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    started_at REAL,
    ended_at REAL,
    outputs_json TEXT,
    noop TEXT,
    error TEXT,
    undo_state TEXT,
    undo_error TEXT,
    PRIMARY KEY (run_id, idx)
);
CREATE TABLE IF NOT EXISTS locks (
    stack TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    token INTEGER NOT NULL,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    acquired_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS fencing (
    stack TEXT PRIMARY KEY,
    last_token INTEGER NOT NULL
);
-- What each audit read of each server's components (history). A run's own record of
-- them is its VerifyServers step's outputs; drift is measured against that.
CREATE TABLE IF NOT EXISTS component_versions (
    stack TEXT NOT NULL,
    server_id TEXT NOT NULL,
    component TEXT NOT NULL,
    version TEXT,
    recorded_at REAL NOT NULL,
    source TEXT NOT NULL,
    run_id TEXT
);
CREATE INDEX IF NOT EXISTS component_versions_server
    ON component_versions(stack, server_id, recorded_at);
-- What happened to a run between and around its steps (a resume, a rollback, each
-- undo, the end), with its time: what a report's timeline draws besides the steps.
CREATE TABLE IF NOT EXISTS run_events (
    run_id TEXT NOT NULL,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    step TEXT,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS run_events_run ON run_events(run_id, at);
"""

# The last facts an audit read of each server: created by the first audit that records.
FACTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS server_facts (
    stack TEXT NOT NULL,
    server_id TEXT NOT NULL,
    recorded_at REAL NOT NULL,
    source TEXT NOT NULL,
    facts_json TEXT NOT NULL,
    PRIMARY KEY (stack, server_id)
);
"""


def secure_state_dir(state_dir: Path) -> Path:
    """Create the state dir 0700, or tighten an existing one of ours that is open to the
    group or others (an older changeover made it 0755). One owned by someone else is
    left alone: chmod would fail, and it is not ours to change."""
    state_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    st = state_dir.stat()
    if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077:
        with contextlib.suppress(PermissionError):
            state_dir.chmod(DIR_MODE)
    return state_dir


def _owner_only(path: Path) -> None:
    """0600 for a file of ours (SQLite creates files 0644 under the usual umask)."""
    with contextlib.suppress(FileNotFoundError, PermissionError):
        if stat.S_IMODE(path.stat().st_mode) != FILE_MODE:
            path.chmod(FILE_MODE)


def connect(state_dir: Path) -> sqlite3.Connection:
    """Open (and create) the state database. Autocommit; callers open transactions.

    The state dir is 0700 and the database files 0600. The -wal and -shm files SQLite
    creates take the main file's mode, which is made 0600 before WAL mode is switched on.
    """
    secure_state_dir(state_dir)
    path = state_dir / DB_NAME
    if not path.exists():
        # Create it empty and owner-only first: no moment where another user can open it.
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, FILE_MODE)
        os.close(fd)
    _owner_only(path)
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    try:
        conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc):
            raise
        _wal_when_free(conn)
    conn.execute("PRAGMA synchronous=FULL")  # a journal entry must survive a power cut
    conn.executescript(SCHEMA)
    for suffix in ("-wal", "-shm"):  # made by an older changeover, or under another umask
        _owner_only(path.with_name(DB_NAME + suffix))
    return conn


def _wal_when_free(conn: sqlite3.Connection) -> None:
    """Switch to WAL mode, retried: SQLite answers "database is locked" at once, without
    waiting `timeout`, when the connection opens the WAL while another one holds it for
    a moment (a checkpoint, a recovery). tenacity is imported only here, on that rare
    path: `status` opens the store and starts without it."""
    from tenacity import (  # noqa: PLC0415 - see the docstring
        Retrying,
        retry_if_exception,
        stop_after_delay,
        wait_exponential,
    )

    for attempt in Retrying(
        stop=stop_after_delay(10.0),
        wait=wait_exponential(multiplier=0.01, max=0.5),
        retry=retry_if_exception(
            lambda e: isinstance(e, sqlite3.OperationalError) and "locked" in str(e)
        ),
        reraise=True,
    ):
        with attempt:
            conn.execute("PRAGMA journal_mode=WAL")


# --------------------------------------------------------------------------------------
# Leases
# --------------------------------------------------------------------------------------


def _holder(row: sqlite3.Row) -> Holder:
    return Holder(
        stack=row["stack"],
        run_id=row["run_id"],
        token=int(row["token"]),
        pid=int(row["pid"]),
        host=row["host"],
        acquired_at=float(row["acquired_at"]),
        expires_at=float(row["expires_at"]),
    )


class LeaseLock(LeaseRules):
    """Acquire, renew, release and break per-stack leases in the `locks` table; tokens
    come from the `fencing` counter, both changed in one transaction."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        ttl: float = 60.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        *,
        host: str | None = None,
        pid: int | None = None,
    ) -> None:
        self.conn = conn
        self._init_rules(ttl, clock, sleep, host, pid)

    def holder(self, stack: str) -> Holder | None:
        row = self.conn.execute("SELECT * FROM locks WHERE stack=?", (stack,)).fetchone()
        return _holder(row) if row is not None else None

    def _take(self, stack: str, run_id: str, observed: Observed | None) -> Lease | Observed:
        now = self.clock()
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            row = self.holder(stack)
            decision = self.decide(row, run_id, now, observed)
            if isinstance(decision, tuple):
                self.conn.execute("ROLLBACK")
                return decision
            if row is not None and decision is not None:
                raise self.refusal(row, decision, now)
            token = self._next_token(stack)
            self.conn.execute(
                "INSERT OR REPLACE INTO locks VALUES (?,?,?,?,?,?,?)",
                (stack, run_id, token, self.pid, self.host, now, now + self.ttl),
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
        return int(token)

    def check(self, lease: Lease) -> None:
        row = self.holder(lease.stack)
        if row is None or row.token != lease.token:
            raise self.fenced(lease)

    def renew(self, lease: Lease) -> Lease:
        expires = self.clock() + self.ttl
        try:
            cur = self.conn.execute(
                "UPDATE locks SET expires_at=? WHERE stack=? AND token=?",
                (expires, lease.stack, lease.token),
            )
        except sqlite3.OperationalError as exc:  # busy past the timeout
            raise StateUnavailable(f"state database busy: {exc}") from None
        if cur.rowcount != 1:
            raise self.fenced(lease, "was lost")
        return Lease(lease.stack, lease.run_id, lease.token, expires)

    def release(self, lease: Lease) -> None:
        self.conn.execute("DELETE FROM locks WHERE stack=? AND token=?", (lease.stack, lease.token))

    def break_lock(self, stack: str) -> str | None:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            row = self.holder(stack)
            self.conn.execute("DELETE FROM locks WHERE stack=?", (stack,))
            self._next_token(stack)
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        return row.run_id if row else None


# --------------------------------------------------------------------------------------
# The journal
# --------------------------------------------------------------------------------------


class Journal:
    """Read and write runs, steps and run events; writes fenced by `lock`."""

    def __init__(self, conn: sqlite3.Connection, lock: LeaseLock) -> None:
        self.conn = conn
        self.lock = lock

    # --- writes (fenced) -------------------------------------------------------------
    def _fenced(self, lease: Lease | None, sql: str, args: tuple[Any, ...]) -> None:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            if lease is not None:
                self.lock.check(lease)
            self.conn.execute(sql, args)
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    def create_run(self, run_id: str, plan: dict[str, Any], lease: Lease) -> None:
        now = time.time()
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.lock.check(lease)
            self.conn.execute(
                "INSERT INTO runs (id, strategy, stack, status, created_at, updated_at, "
                "plan_json) VALUES (?,?,?,?,?,?,?)",
                (run_id, plan["strategy"], plan["stack"], "running", now, now, dumps(plan)),
            )
            for idx, step in enumerate(plan["steps"]):
                self.conn.execute(
                    "INSERT INTO steps (run_id, idx, key, name, state) VALUES (?,?,?,?,?)",
                    (run_id, idx, step["key"], step["name"], "pending"),
                )
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    def set_status(
        self,
        run_id: str,
        status: str,
        lease: Lease | None,
        *,
        outcome: str | None = None,
        result: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        self._fenced(
            lease,
            "UPDATE runs SET status=?, outcome=COALESCE(?, outcome), "
            "result_json=COALESCE(?, result_json), error=?, updated_at=? WHERE id=?",
            (
                status,
                outcome,
                dumps(result) if result is not None else None,
                redact_text(error) if error else error,
                time.time(),
                run_id,
            ),
        )

    def step_started(self, run_id: str, idx: int, lease: Lease) -> None:
        self._fenced(
            lease,
            "UPDATE steps SET state='started', "
            "started_at=COALESCE(started_at, ?), error=NULL WHERE run_id=? AND idx=?",
            (time.time(), run_id, idx),
        )

    def step_marked(self, run_id: str, idx: int, lease: Lease, marker: dict[str, Any]) -> None:
        self._fenced(
            lease,
            "UPDATE steps SET outputs_json=? WHERE run_id=? AND idx=? AND state='started'",
            (dumps(marker), run_id, idx),
        )

    def step_paused(self, run_id: str, idx: int, lease: Lease, marks: dict[str, Any]) -> None:
        self._fenced(
            lease,
            "UPDATE steps SET state='pending', started_at=NULL, ended_at=NULL, "
            "outputs_json=?, attempts=attempts+1 WHERE run_id=? AND idx=?",
            (dumps(marks), run_id, idx),
        )

    def step_done(
        self,
        run_id: str,
        idx: int,
        lease: Lease,
        outputs: dict[str, Any],
        *,
        noop: str | None = None,
        tries: int = 1,
    ) -> None:
        """`tries`: attempts this time (retries and polls included), added to the total."""
        self._fenced(
            lease,
            "UPDATE steps SET state='done', ended_at=?, outputs_json=?, noop=?, "
            "attempts=attempts+? WHERE run_id=? AND idx=?",
            (time.time(), dumps(outputs), noop, tries, run_id, idx),
        )

    def step_failed(self, run_id: str, idx: int, lease: Lease, error: str, tries: int = 1) -> None:
        self._fenced(
            lease,
            "UPDATE steps SET state='failed', ended_at=?, error=?, attempts=attempts+? "
            "WHERE run_id=? AND idx=?",
            (time.time(), redact_text(error), tries, run_id, idx),
        )

    def undo_state(
        self, run_id: str, idx: int, lease: Lease, state: str, error: str | None = None
    ) -> None:
        self._fenced(
            lease,
            "UPDATE steps SET undo_state=?, undo_error=? WHERE run_id=? AND idx=?",
            (state, redact_text(error) if error else error, run_id, idx),
        )

    def event(
        self,
        run_id: str,
        lease: Lease | None,
        kind: str,
        *,
        step: str | None = None,
        detail: str | None = None,
    ) -> None:
        """Record a RunEvent now (fenced like every write made for a run)."""
        self._fenced(
            lease,
            "INSERT INTO run_events (run_id, at, kind, step, detail) VALUES (?,?,?,?,?)",
            (run_id, time.time(), kind, step, redact_text(detail) if detail else detail),
        )

    # --- reads -----------------------------------------------------------------------
    def events(self, run_id: str) -> list[RunEvent]:
        rows = self.conn.execute(
            "SELECT at, kind, step, detail FROM run_events WHERE run_id=? ORDER BY at, rowid",
            (run_id,),
        ).fetchall()
        return [RunEvent(r["at"], r["kind"], r["step"], r["detail"]) for r in rows]

    def get_run(self, run_id: str) -> RunRecord | None:
        row = self.conn.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
        return _run(row) if row else None

    def find_run(self, prefix: str) -> RunRecord | None:
        """A run by id or unique id prefix."""
        rows = self.conn.execute(
            "SELECT * FROM runs WHERE id LIKE ? ORDER BY created_at DESC LIMIT 2",
            (prefix.replace("%", "") + "%",),
        ).fetchall()
        return _run(rows[0]) if len(rows) == 1 else None

    def runs(self, stack: str | None = None, limit: int = 20) -> list[RunRecord]:
        if stack:
            rows = self.conn.execute(
                "SELECT * FROM runs WHERE stack=? ORDER BY created_at DESC LIMIT ?",
                (stack, limit),
            ).fetchall()
        else:
            rows = self.conn.execute(
                "SELECT * FROM runs ORDER BY created_at DESC LIMIT ?", (limit,)
            ).fetchall()
        return [_run(r) for r in rows]

    def unfinished(self, stack: str) -> list[RunRecord]:
        rows = self.conn.execute(
            f"SELECT * FROM runs WHERE stack=? AND status IN ({','.join('?' * len(UNFINISHED))})",
            (stack, *UNFINISHED),
        ).fetchall()
        return [_run(r) for r in rows]

    def steps(self, run_id: str) -> list[StepRecord]:
        rows = self.conn.execute(
            "SELECT * FROM steps WHERE run_id=? ORDER BY idx", (run_id,)
        ).fetchall()
        return [
            StepRecord(
                idx=r["idx"],
                key=r["key"],
                name=r["name"],
                state=r["state"],
                attempts=r["attempts"],
                started_at=r["started_at"],
                ended_at=r["ended_at"],
                outputs=json.loads(r["outputs_json"]) if r["outputs_json"] else {},
                noop=r["noop"],
                error=r["error"],
                undo_state=r["undo_state"],
                undo_error=r["undo_error"],
            )
            for r in rows
        ]


def _run(row: sqlite3.Row) -> RunRecord:
    return RunRecord(
        id=row["id"],
        strategy=row["strategy"],
        stack=row["stack"],
        status=row["status"],
        outcome=row["outcome"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        plan=json.loads(row["plan_json"]),
        result=json.loads(row["result_json"]) if row["result_json"] else {},
        error=row["error"],
    )


# --------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------


class SqliteStore(Journal, LeaseLock):
    """The journal, the leases and the recorded versions in the state dir's database
    (or on a connection the caller owns)."""

    def __init__(
        self,
        state_dir: Path | None = None,
        *,
        conn: sqlite3.Connection | None = None,
        ttl: float = 60.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        host: str | None = None,
        pid: int | None = None,
    ) -> None:
        if conn is None and state_dir is None:
            raise ValueError("a state dir or a connection")
        self._owns = conn is None
        self._conn = conn
        self.state_dir = state_dir
        self._init_rules(ttl, clock, sleep, host, pid)  # the lease half
        self.lock = self  # the journal half fences its writes with our leases

    @property
    def conn(self) -> sqlite3.Connection:
        """The database, opened (and created) on first use: a command refused for bad
        input before it reads or writes any state leaves no state dir behind."""
        if self._conn is None:
            assert self.state_dir is not None
            self._conn = connect(self.state_dir)
        return self._conn

    @conn.setter
    def conn(self, value: sqlite3.Connection | None) -> None:
        self._conn = value

    @property
    def where(self) -> str:
        return f"sqlite {self.state_dir / DB_NAME}" if self.state_dir else "sqlite"

    def clone(self) -> StateStore:
        if self.state_dir is None:
            raise ValueError("a store on a borrowed connection cannot be cloned")
        return SqliteStore(
            self.state_dir,
            ttl=self.ttl,
            clock=self.clock,
            sleep=self.sleep,
            host=self.host,
            pid=self.pid,
        )

    def close(self) -> None:
        if self._owns and self._conn is not None:
            self._conn.close()
            self._conn = None

    # --- recorded versions and facts ---------------------------------------------------
    def record_versions(self, stack: str, rows: list[VersionRecord]) -> None:
        if not rows:
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.executemany(
                "INSERT INTO component_versions (stack, server_id, component, version, "
                "recorded_at, source, run_id) VALUES (?,?,?,?,?,?,?)",
                [
                    (stack, r.server_id, r.component, r.version, r.recorded_at, r.source, r.run_id)
                    for r in rows
                ],
            )
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    def versions(
        self, stack: str, server_id: str, *, after: float, until: float
    ) -> list[VersionRecord]:
        rows = self.conn.execute(
            "SELECT component, version, recorded_at, source, run_id FROM component_versions "
            "WHERE stack=? AND server_id=? AND recorded_at>? AND recorded_at<=? "
            "ORDER BY recorded_at",
            (stack, server_id, after, until),
        ).fetchall()
        return [
            VersionRecord(
                server_id, r["component"], r["version"], r["recorded_at"], r["source"], r["run_id"]
            )
            for r in rows
        ]

    def record_facts(
        self,
        stack: str,
        facts: Mapping[str, dict[str, Any]],
        at: float,
        *,
        existing: list[str] | None = None,
    ) -> None:
        self.conn.executescript(FACTS_SCHEMA)
        keep = set(existing) if existing is not None else None
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.executemany(
                "INSERT OR REPLACE INTO server_facts (stack, server_id, recorded_at, source, "
                "facts_json) VALUES (?,?,?,?,?)",
                [(stack, sid, at, "audit", dumps(f)) for sid, f in facts.items()],
            )
            if keep is not None:
                gone = [
                    row[0]
                    for row in self.conn.execute(
                        "SELECT server_id FROM server_facts WHERE stack=?", (stack,)
                    ).fetchall()
                    if row[0] not in keep
                ]
                self.conn.executemany(
                    "DELETE FROM server_facts WHERE stack=? AND server_id=?",
                    [(stack, sid) for sid in gone],
                )
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    def audit_facts(self, stack: str) -> list[FactsRecord]:
        has_table = self.conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='server_facts'"
        ).fetchone()
        if not has_table:
            return []
        out = []
        for server_id, recorded_at, source, facts_json in self.conn.execute(
            "SELECT server_id, recorded_at, source, facts_json FROM server_facts WHERE stack=?",
            (stack,),
        ):
            try:
                facts = json.loads(facts_json)
            except ValueError:
                continue
            out.append(FactsRecord(str(server_id), float(recorded_at), str(source), facts))
        return out

    def verified_reports(self, stack: str, limit: int) -> Iterator[VerifiedReport]:
        rows = self.conn.execute(
            "SELECT s.run_id, s.ended_at, s.outputs_json FROM steps s JOIN runs r "
            "ON r.id = s.run_id WHERE r.stack=? AND s.name=? AND s.state='done' "
            "ORDER BY s.ended_at DESC LIMIT ?",
            (stack, VERIFY_STEP, limit),
        )
        for run_id, ended_at, outputs_json in rows:
            try:
                reports = json.loads(outputs_json or "{}").get("reports", {})
            except (AttributeError, ValueError):
                continue
            for server_id, report in reports.items():
                yield str(run_id), float(ended_at or 0.0), str(server_id), report or {}
