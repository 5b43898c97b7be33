"""Per-stack lease lock with a TTL and a fencing token (I5).

The lease rules live in :mod:`orchestrator.state.base` (shared by every state store);
the SQLite lease table in :mod:`orchestrator.state.sqlite`. This module keeps the names
callers and tests import.
"""

from __future__ import annotations

from orchestrator.state.base import Holder, Lease, pid_alive
from orchestrator.state.sqlite import LeaseLock

__all__ = ["Holder", "Lease", "LeaseLock", "pid_alive"]
