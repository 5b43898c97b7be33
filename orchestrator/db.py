"""The state dir's SQLite database, now part of the sqlite state store.

Kept for the callers (and tests) that open the file directly: the schema and the file
are those of :mod:`orchestrator.state.sqlite`.
"""

from __future__ import annotations

from orchestrator.state.sqlite import (
    DB_NAME,
    DIR_MODE,
    FILE_MODE,
    SCHEMA,
    connect,
    secure_state_dir,
)

__all__ = ["DB_NAME", "DIR_MODE", "FILE_MODE", "SCHEMA", "connect", "secure_state_dir"]
