"""The durable run journal.

Every step is recorded before it starts and after it ends, with its outputs, so a new
process can resume or roll back a run whose process was killed at any point. Writes made
on behalf of a run carry its lease, and are refused once that lease is gone (fencing).

The records are defined with the state store's Protocol (:mod:`orchestrator.state.base`);
the SQLite journal is :class:`orchestrator.state.sqlite.Journal`. This module keeps the
names callers and tests import.
"""

from __future__ import annotations

from orchestrator.state.base import EVENT_KINDS, UNFINISHED, RunEvent, RunRecord, StepRecord
from orchestrator.state.sqlite import Journal

__all__ = ["EVENT_KINDS", "UNFINISHED", "Journal", "RunEvent", "RunRecord", "StepRecord"]
