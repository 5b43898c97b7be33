"""The state store: the journal, the leases and the recorded versions, behind one Protocol.

    base.py      the StateStore Protocol, the records, the lease rules
    sqlite.py    the embedded default: changeover.db in the state dir
    dynamodb.py  a DynamoDB table shared by a team's machines (boto3, imported lazily)
    url.py       the `state` setting: `sqlite` or `dynamodb://TABLE?region=...`

The composition roots (the CLI, the rehearsal runner) open a store with
:func:`open_store` and hand it to the engine, audits and reports; nothing below them
opens a database itself.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.state.base import (
    UNFINISHED,
    Holder,
    Lease,
    RunEvent,
    RunRecord,
    StateMissing,
    StateStore,
    StateUnavailable,
    StepRecord,
)
from orchestrator.state.url import StateSpec, parse_state

if TYPE_CHECKING:
    from orchestrator.settings import Settings

__all__ = [
    "UNFINISHED",
    "Holder",
    "Lease",
    "RunEvent",
    "RunRecord",
    "StateMissing",
    "StateSpec",
    "StateStore",
    "StateUnavailable",
    "StepRecord",
    "as_store",
    "init_state",
    "open_store",
    "parse_state",
]

DEFAULT_TTL = 60.0  # seconds a lease lives without renewal (Settings.lock_ttl's default)


def _spec_of(source: Settings | StateSpec | str | None) -> tuple[StateSpec, Path | None, Any]:
    if source is None:
        return StateSpec("sqlite"), None, None
    if isinstance(source, StateSpec):
        return source, None, None
    if isinstance(source, str):
        return parse_state(source), None, None
    return parse_state(source.state), source.state_path, source.lock_ttl


def open_store(
    source: Settings | StateSpec | str | None,
    state_dir: Path | None = None,
    *,
    ttl: float | None = None,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> StateStore:
    """The store a `state` setting names (Settings, a parsed spec, a URL, or None for
    sqlite). Settings also give the state dir and the lease TTL; `state_dir` and `ttl`
    override them. SQLite opens (and creates) the file now; DynamoDB connects lazily,
    and a missing table is reported at its first use (StateMissing, exit 2)."""
    spec, settings_dir, settings_ttl = _spec_of(source)
    state_dir = state_dir or settings_dir
    ttl = ttl or settings_ttl or DEFAULT_TTL
    if spec.backend == "sqlite":
        from orchestrator.state.sqlite import SqliteStore  # noqa: PLC0415

        if state_dir is None:
            raise ValueError("the sqlite store needs a state dir")
        return SqliteStore(state_dir, ttl=ttl, clock=clock, sleep=sleep)
    from orchestrator.state.dynamodb import DynamoStore  # noqa: PLC0415 (boto3 when used)

    return DynamoStore(spec, ttl=ttl, clock=clock, sleep=sleep)


def as_store(source: StateStore | sqlite3.Connection) -> StateStore:
    """A store over an open SQLite connection (which stays the caller's to close), or
    the store itself."""
    if isinstance(source, sqlite3.Connection):
        from orchestrator.state.sqlite import SqliteStore  # noqa: PLC0415

        return SqliteStore(conn=source)
    return source


def init_state(spec: StateSpec, state_dir: Path) -> dict[str, Any]:
    """`changeover state init`: create what the store needs (the DynamoDB table), or
    say that nothing is needed (sqlite). Idempotent."""
    if spec.backend == "sqlite":
        from orchestrator.state.sqlite import DB_NAME  # noqa: PLC0415

        return {
            "backend": "sqlite",
            "path": str(state_dir / DB_NAME),
            "created": False,
            "message": f"state: sqlite at {state_dir / DB_NAME}; nothing to create (the "
            "file is made on first use). A team whose jobs run on several machines sets "
            "state = dynamodb://TABLE?region=REGION and runs `changeover state init`",
        }
    from orchestrator.state.dynamodb import create_table  # noqa: PLC0415

    return create_table(spec)
