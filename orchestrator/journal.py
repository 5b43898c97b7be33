"""The durable run journal (SQLite in the state dir).

Every step is recorded before it starts and after it ends, with its outputs, so a new
process can resume or roll back a run whose process was killed at any point. Writes made
on behalf of a run carry its lease, and are refused once that lease is gone (fencing).
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from orchestrator.lock import Lease, LeaseLock
from orchestrator.redact import redact, redact_text

# A dirty run still holds its stack: an operator fixes the cause and rolls it back again.
# A paused campaign holds it too, until the same command continues it in its next window.
UNFINISHED = ("running", "rolling_back", "dirty", "paused")


@dataclass
class StepRecord:
    """One step's row in the journal."""

    idx: int
    key: str
    name: str
    state: str  # pending | started | done | failed
    attempts: int
    started_at: float | None
    ended_at: float | None
    outputs: dict[str, Any]
    noop: str | None
    error: str | None
    undo_state: str | None  # None | started | done | failed
    undo_error: str | None

    @property
    def seconds(self) -> float | None:
        if self.started_at is None or self.ended_at is None:
            return None
        return round(self.ended_at - self.started_at, 3)


@dataclass
class RunRecord:
    """One run's row in the journal."""

    id: str
    strategy: str
    stack: str
    status: str
    outcome: str | None
    created_at: float
    updated_at: float
    plan: dict[str, Any]
    result: dict[str, Any]
    error: str | None

    @property
    def finished(self) -> bool:
        return self.status not in UNFINISHED


@dataclass
class RunEvent:
    """Something that happened to a run besides a step's start and end: it was resumed,
    a rollback began, a step was undone, the run ended. Kinds are in EVENT_KINDS."""

    at: float
    kind: str
    step: str | None
    detail: str | None


# resumed / rollback_requested: a new process took the run over (detail: the status it
# found); rollback_started (detail: the cause); undo_started / undo_done / undo_failed
# (step: the step undone); paused (step: the window gate; detail: the next window);
# finished (detail: the outcome).
EVENT_KINDS = (
    "resumed",
    "rollback_requested",
    "rollback_started",
    "undo_started",
    "undo_done",
    "undo_failed",
    "paused",
    "finished",
)


def _dumps(value: Any) -> str:
    """JSON for the journal, secrets masked (I9)."""
    return json.dumps(redact(value))


class Journal:
    """Read and write runs and steps."""

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
                (run_id, plan["strategy"], plan["stack"], "running", now, now, _dumps(plan)),
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
                _dumps(result) if result is not None else None,
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
        """Record progress inside a started step (its point of no return), durably, before
        the call that crosses it is sent."""
        self._fenced(
            lease,
            "UPDATE steps SET outputs_json=? WHERE run_id=? AND idx=? AND state='started'",
            (_dumps(marker), run_id, idx),
        )

    def step_paused(self, run_id: str, idx: int, lease: Lease, marks: dict[str, Any]) -> None:
        """A window gate stopped the campaign before its batch: the step is pending again
        (not begun), keeping what it measured for its next attempt."""
        self._fenced(
            lease,
            "UPDATE steps SET state='pending', started_at=NULL, ended_at=NULL, "
            "outputs_json=?, attempts=attempts+1 WHERE run_id=? AND idx=?",
            (_dumps(marks), run_id, idx),
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
            (time.time(), _dumps(outputs), noop, tries, run_id, idx),
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
