"""The state dir's SQLite database: one file shared by the journal and the lock."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
from pathlib import Path

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
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # a journal entry must survive a power cut
    conn.executescript(SCHEMA)
    for suffix in ("-wal", "-shm"):  # made by an older changeover, or under another umask
        _owner_only(path.with_name(DB_NAME + suffix))
    return conn
