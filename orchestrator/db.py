"""The state dir's SQLite database: one file shared by the journal and the lock."""

from __future__ import annotations

import sqlite3
from pathlib import Path

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
"""


def connect(state_dir: Path) -> sqlite3.Connection:
    """Open (and create) the state database. Autocommit; callers open transactions."""
    state_dir.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(
        state_dir / "changeover.db", timeout=30.0, isolation_level=None, check_same_thread=False
    )
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # a journal entry must survive a power cut
    conn.executescript(SCHEMA)
    return conn
