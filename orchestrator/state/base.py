"""The state store's contract: what the engine, the CLI, audits and reports keep.

A state store holds three things, behind one Protocol (:class:`StateStore`):

- **leases**: one per stack, with a TTL and a strictly increasing fencing token (I5);
- **the journal**: runs, their steps and their events. Every write made on behalf of a
  run carries its lease and is refused (:class:`FencedError`) once that lease is gone,
  checked in the same transaction (SQLite) or the same conditional write (DynamoDB);
- **recorded versions and facts**: component versions each audit read, the facts of
  the last audit of each server, and the health-gate reports runs journaled.

Backends: ``sqlite`` (orchestrator/state/sqlite.py, the embedded default, one file in
the state dir) and ``dynamodb`` (orchestrator/state/dynamodb.py, for teams whose jobs run
on several machines). One contract suite (tests/state/test_contract.py) runs against both.

The lease rules are the same for every backend and live here (:class:`LeaseRules`):

- a live holder on this host keeps its lease, whatever the clocks say;
- the same run may take its lease back at once when its holding process is dead here;
- another run waits for the lease to expire (a crashed run's unfinished journal still
  holds the stack: it must be resumed or rolled back);
- a lease held from another host that looks expired is taken only after half a TTL
  passes with no renewal ("observe"), so a wrong or jumping clock does not give two
  drivers.

Errors a store raises besides those of orchestrator/errors.py::

    BadInput
    └── StateMissing        exit 2: the DynamoDB table does not exist (`state init`)
    TransientError
    └── StateUnavailable    the store did not answer (busy, throttled, unreachable)
"""

from __future__ import annotations

import abc
import json
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from orchestrator.errors import BadInput, FencedError, LockedError, TransientError
from orchestrator.redact import redact

# A dirty run still holds its stack: an operator fixes the cause and rolls it back again.
# A paused campaign holds it too, until the same command continues it in its next window.
UNFINISHED = ("running", "rolling_back", "dirty", "paused")

# The step whose outputs carry each new server's health-gate report, facts included:
# what audits measure drift against and `plan --only-if-needed` decides from.
VERIFY_STEP = "VerifyServers"


class StateMissing(BadInput):
    """The store is not there yet (a DynamoDB table nobody created). Nothing touched."""


class StateUnavailable(TransientError):
    """The store did not answer in time: busy, throttled or unreachable."""


@dataclass(frozen=True)
class Lease:
    """A held lease."""

    stack: str
    run_id: str
    token: int
    expires_at: float


@dataclass(frozen=True)
class Holder:
    """Who holds a stack's lease, as the store has it."""

    stack: str
    run_id: str
    token: int
    pid: int
    host: str
    acquired_at: float
    expires_at: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StepRecord:
    """One step in the journal."""

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
    """One run in the journal."""

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
# finished (detail: the outcome). "finished" is always a run's last event.
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


@dataclass(frozen=True)
class VersionRecord:
    """One component version an audit read on one server."""

    server_id: str
    component: str
    version: str | None
    recorded_at: float
    source: str = "audit"
    run_id: str | None = None


@dataclass(frozen=True)
class FactsRecord:
    """The facts the last audit read of one server (``Facts.to_dict()``, redacted)."""

    server_id: str
    recorded_at: float
    source: str
    facts: dict[str, Any]


# (run id, recorded at, server id, gate report) of a finished VerifyServers step.
VerifiedReport = tuple[str, float, str, dict[str, Any]]


def dumps(value: Any) -> str:
    """JSON for the journal, secrets masked (I9)."""
    return json.dumps(redact(value))


@runtime_checkable
class StateStore(Protocol):
    """The journal, the leases and the recorded versions of one team or machine.

    Writes that take a ``lease`` are fenced: they raise FencedError, and change nothing,
    unless that lease is still the stack's current one. ``lease=None`` (only where the
    signature allows it) writes unfenced."""

    ttl: float
    clock: Callable[[], float]

    @property
    def where(self) -> str:
        """Where the state lives, for messages: a file, or a table and its region."""
        ...

    def clone(self) -> StateStore:
        """Another handle on the same store, for another thread (the heartbeat)."""
        ...

    def close(self) -> None: ...

    # --- leases ------------------------------------------------------------------------
    def holder(self, stack: str) -> Holder | None: ...

    def ensure_free(self, stack: str) -> None:
        """Raise LockedError if a live holder or an unexpired lease holds `stack`."""
        ...

    def acquire(self, stack: str, run_id: str) -> Lease:
        """Take the stack's lease with a new, higher token, or raise LockedError."""
        ...

    def check(self, lease: Lease) -> None:
        """Raise FencedError unless `lease` is still the current holder."""
        ...

    def renew(self, lease: Lease) -> Lease: ...

    def release(self, lease: Lease) -> None: ...

    def break_lock(self, stack: str) -> str | None:
        """Force the lease off (`unlock --force`); the old holder is fenced from now on.
        Returns the run that held it."""
        ...

    # --- journal writes ----------------------------------------------------------------
    def create_run(self, run_id: str, plan: dict[str, Any], lease: Lease) -> None: ...

    def set_status(
        self,
        run_id: str,
        status: str,
        lease: Lease | None,
        *,
        outcome: str | None = None,
        result: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> None: ...

    def step_started(self, run_id: str, idx: int, lease: Lease) -> None: ...

    def step_marked(self, run_id: str, idx: int, lease: Lease, marker: dict[str, Any]) -> None:
        """Record progress inside a started step (its point of no return), durably,
        before the call that crosses it is sent."""
        ...

    def step_paused(self, run_id: str, idx: int, lease: Lease, marks: dict[str, Any]) -> None:
        """A window gate stopped the campaign before its batch: the step is pending again,
        keeping what it measured for its next attempt."""
        ...

    def step_done(
        self,
        run_id: str,
        idx: int,
        lease: Lease,
        outputs: dict[str, Any],
        *,
        noop: str | None = None,
        tries: int = 1,
    ) -> None: ...

    def step_failed(
        self, run_id: str, idx: int, lease: Lease, error: str, tries: int = 1
    ) -> None: ...

    def undo_state(
        self, run_id: str, idx: int, lease: Lease, state: str, error: str | None = None
    ) -> None: ...

    def event(
        self,
        run_id: str,
        lease: Lease | None,
        kind: str,
        *,
        step: str | None = None,
        detail: str | None = None,
    ) -> None: ...

    # --- journal reads -----------------------------------------------------------------
    def events(self, run_id: str) -> list[RunEvent]: ...

    def get_run(self, run_id: str) -> RunRecord | None: ...

    def find_run(self, prefix: str) -> RunRecord | None:
        """A run by id or unique id prefix."""
        ...

    def runs(self, stack: str | None = None, limit: int = 20) -> list[RunRecord]:
        """The newest runs, of one stack or of all."""
        ...

    def unfinished(self, stack: str) -> list[RunRecord]: ...

    def steps(self, run_id: str) -> list[StepRecord]: ...

    # --- recorded versions and facts ---------------------------------------------------
    def record_versions(self, stack: str, rows: list[VersionRecord]) -> None:
        """Append what an audit read: versions recorded regularly, not only by runs."""
        ...

    def versions(
        self, stack: str, server_id: str, *, after: float, until: float
    ) -> list[VersionRecord]:
        """What audits recorded of a server in (after, until], oldest first."""
        ...

    def record_facts(
        self,
        stack: str,
        facts: Mapping[str, dict[str, Any]],
        at: float,
        *,
        existing: list[str] | None = None,
    ) -> None:
        """Keep the facts an audit read, one record per server (the newest). `existing`:
        every server the stack has now; the records of the others are dropped."""
        ...

    def audit_facts(self, stack: str) -> list[FactsRecord]: ...

    def verified_reports(self, stack: str, limit: int) -> Iterator[VerifiedReport]:
        """The stack's finished VerifyServers steps' reports, newest first, scanning at
        most `limit` steps."""
        ...


# --------------------------------------------------------------------------------------
# The lease rules, shared by every backend
# --------------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


Why = Literal["alive", "held", "observe"]
Observed = tuple[int, float]  # (token, expires_at) of a lease being watched


class LeaseRules(abc.ABC):
    """Acquisition rules over a backend's `holder` and `_take` (see the module doc).

    `host` and `pid` say who this store acts for: this process, unless a test poses as
    another process or host."""

    ttl: float
    clock: Callable[[], float]
    sleep: Callable[[float], None]

    def _init_rules(
        self,
        ttl: float,
        clock: Callable[[], float],
        sleep: Callable[[float], None],
        host: str | None,
        pid: int | None,
    ) -> None:
        self.ttl = ttl
        self.clock = clock
        self.sleep = sleep
        self.host = host or socket.gethostname()
        self.pid = pid or os.getpid()

    @abc.abstractmethod
    def holder(self, stack: str) -> Holder | None:
        """The stack's lease as stored, or None (each backend reads its own)."""

    @abc.abstractmethod
    def _take(self, stack: str, run_id: str, observed: Observed | None) -> Lease | Observed:
        """Take the lease, or raise LockedError; or, for a lease to watch first (and
        nothing `observed` yet), return what it looks like now."""

    def blocker(self, row: Holder, run_id: str, now: float) -> Why | None:
        """Why the lease in `row` may not be taken by `run_id` now (None: it may be).
        "observe" means: held from another host and expired by our clock, which may be
        wrong, so first watch it for a heartbeat."""
        same_run = row.run_id == run_id
        expired = row.expires_at <= now
        if row.host == self.host:
            if row.pid == self.pid:
                # This very process (an in-process resume): only the clock can tell.
                return None if same_run or expired else "held"
            if pid_alive(row.pid):
                # A live holder keeps its lease, whatever the clocks say.
                return "alive"
            # Another run's lease blocks until it expires, even if that process died:
            # its run is unfinished and must be resumed or rolled back first.
            return None if same_run or expired else "held"
        return "observe" if expired else "held"

    def decide(
        self, row: Holder | None, run_id: str, now: float, observed: Observed | None
    ) -> Why | Observed | None:
        """What `_take` should do about the lease in `row`: None to take it; the lease
        as seen now to watch it first; or why it is refused (raise `refusal`)."""
        if row is None:
            return None
        why = self.blocker(row, run_id, now)
        if why == "observe":
            seen = (row.token, row.expires_at)
            if observed is None:
                return seen
            return None if seen == observed else why  # unchanged: dead; renewed: alive
        return why

    @staticmethod
    def refusal(row: Holder, why: Why, now: float) -> LockedError:
        detail = ""
        if why == "alive":
            detail = f"held by live process {row.pid} on this host"
        elif why == "observe":
            detail = f"its holder on {row.host} is still renewing it"
        return LockedError(row.stack, row.run_id, row.expires_at - now, detail)

    def ensure_free(self, stack: str) -> None:
        row = self.holder(stack)
        if row is None:
            return
        now = self.clock()
        # As a new run would see it; an expired lease from another host is for
        # `acquire` to watch.
        if (why := self.blocker(row, "", now)) in ("alive", "held"):
            assert why is not None
            raise self.refusal(row, why, now)

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

    def fenced(self, lease: Lease, what: str = "was broken or taken over") -> FencedError:
        return FencedError(f"lease on {lease.stack!r} for run {lease.run_id} {what}")
