"""Plans: an ordered list of named steps, each with ``do`` and, where it makes sense, ``undo``.

A strategy composes a plan; the engine runs it. Steps carry their parameters as JSON data
so the journal can store a plan and a new process can rebuild it to resume or roll back.
Each step is idempotent: it checks real state first, then acts or records a no-op.
"""

from __future__ import annotations

import abc
import enum
import importlib
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from orchestrator.errors import TransientError
from orchestrator.waits import Wait, Waits

if TYPE_CHECKING:
    from orchestrator.settings import StackConfig
    from providers.base import Provider


class Outcome(enum.StrEnum):
    """How a run ended. Outcomes are values, not exceptions."""

    SUCCEEDED = "succeeded"
    NOOP = "noop"
    ROLLED_BACK = "rolled_back"
    DIRTY = "dirty"
    PRECONDITION_FAILED = "precondition_failed"
    LOCKED = "locked"
    RUNNING = "running"
    PAUSED = "paused"  # a campaign waiting for its next maintenance window

    @property
    def exit_code(self) -> int:
        return {
            Outcome.SUCCEEDED: 0,
            Outcome.NOOP: 0,
            Outcome.ROLLED_BACK: 1,
            Outcome.PRECONDITION_FAILED: 2,
            Outcome.DIRTY: 3,
            Outcome.LOCKED: 4,
            Outcome.RUNNING: 3,
            Outcome.PAUSED: 0,
        }[self]


@dataclass(frozen=True)
class RetryPolicy:
    """How the engine retries a step: data, applied with tenacity by the engine."""

    attempts: int = 5
    deadline: float = 60.0  # seconds, across all attempts
    backoff_initial: float = 0.1
    backoff_max: float = 2.0
    transient: tuple[type[BaseException], ...] = (TransientError,)

    # The one retry rule, for the engine's tenacity loop and the lanes' polls alike.
    def is_transient(self, exc: BaseException) -> bool:
        """Is `exc` worth another attempt (the world not ready yet), not a failure?"""
        return isinstance(exc, self.transient)

    def spent(self, attempts: int, elapsed: float) -> bool:
        """Are the step's attempts over: as many as it may make, or past its deadline?"""
        return attempts >= self.attempts or elapsed >= self.deadline

    def gives_up(self, exc: BaseException, attempts: int, elapsed: float) -> bool:
        """After a failed attempt: does the step fail (a real error, or its attempts are
        spent) rather than try again?"""
        return not self.is_transient(exc) or self.spent(attempts, elapsed)


NO_RETRY = RetryPolicy(attempts=1)


@dataclass
class StepResult:
    """What a step did: outputs for later steps, or a no-op with its reason."""

    outputs: dict[str, Any] = field(default_factory=dict)
    noop: str | None = None


@dataclass
class RunContext:
    """What a step may use: the provider, the stack, earlier outputs, clock and sleep."""

    run_id: str
    stack: str
    config: StackConfig
    provider: Provider
    outputs: dict[str, dict[str, Any]]
    log: Any
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    heartbeat: Callable[[], None] = lambda: None
    # What the step being run waits for, as events (`waiting`); the engine binds it.
    waits: Waits = field(default_factory=Waits)
    # The step being run never began before (not retried, not resumed): nothing it
    # creates exists yet, so a provider may skip its look-up for earlier attempts.
    first_attempt: bool = False
    # The wall clock the maintenance-window gates read (a test injects its own), and the
    # step's own journaled marks from an earlier attempt (a paused gate's measurements).
    now: Callable[[], float] = time.time
    marks: dict[str, Any] = field(default_factory=dict)
    # This engine's process: a gate compares it with the one that opened the last batch.
    session: str = ""
    # Journals marks of the step being run (merged into its journaled outputs, fenced by
    # the lease); the engine binds it per step. Steps call `mark`, not this.
    journal_marks: Callable[[dict[str, Any]], None] = lambda _m: None

    def mark(self, **marks: Any) -> None:
        """Record progress inside the step being run, durably, before going on: what a
        resumed attempt must not repeat (a lifecycle hook that passed) and what `status`
        shows while the step waits (a drain, a held hook). An attempt of the same step in
        a new process finds them in `marks`; a key set to None is cleared."""
        self.marks.update(marks)
        self.journal_marks(marks)

    def output(self, step_key: str) -> dict[str, Any]:
        return self.outputs.get(step_key, {})

    def wait(self, seconds: float) -> None:
        """Sleep in short slices, renewing our lease, so long waits keep the lock."""
        end = self.clock() + seconds
        while (left := end - self.clock()) > 0:
            self.heartbeat()
            self.sleep(min(left, 1.0))
        if seconds > 0:
            self.provider.refresh()  # what was read before the wait is stale now

    def waiting(
        self, what: str, *, deadline: float | None = None, duration: float | None = None
    ) -> AbstractContextManager[Wait]:
        """Say what the step waits for while the block runs (`boot of 2 server(s): ...`):
        wait_started / wait_progress / wait_done events with the seconds waited, shown as
        a live line on a terminal. A TransientError leaving the block is a poll: the next
        attempt's same wait goes on with it (orchestrator/waits.py)."""
        return self.waits.waiting(what, clock=self.clock, deadline=deadline, duration=duration)


STEP_TYPES: dict[str, type[Step]] = {}
# Modules whose Step subclasses a journaled plan may name; imported on demand to rebuild one.
STEP_MODULES = (
    "strategies.steps",
    "strategies.upgrade_steps",
    "strategies.window",
    "strategies.canary",
    "strategies.stop",
)


class Step(abc.ABC):
    """One step of a plan. Subclasses are named VerbObject and do one job."""

    name: ClassVar[str] = ""
    retry: ClassVar[RetryPolicy] = RetryPolicy()
    # Past an irreversible step, rollback cannot go: it undoes only what came after.
    irreversible: ClassVar[bool] = False
    # What an irreversible step's point of no return means, for the operator.
    no_return: ClassVar[str] = (
        "servers of the old generation are being destroyed, so the new servers are serving"
    )
    # Once the nearest irreversible step before it crossed its point of no return, this
    # step only goes forward (an upgraded server is rebooted and verified before it may
    # serve again): its failure ends the run dirty for `resume`, and `rollback` refuses
    # while it is unfinished.
    forward_only: ClassVar[bool] = False

    def __init__(self, key: str | None = None, **params: Any) -> None:
        self.key = key or self.name
        self.params = params

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            STEP_TYPES[cls.name] = cls

    @property
    def lane(self) -> int | None:
        """The replacement this step belongs to, in a plan of lanes (a sliding-window
        rotate: orchestrator/lanes.py); None for a step of the plan's own sequence."""
        lane = self.params.get("lane")
        return None if lane is None else int(lane)

    def policy(self) -> RetryPolicy:
        """The retry policy for this instance; steps with a configured deadline override."""
        return self.retry

    @abc.abstractmethod
    def do(self, ctx: RunContext) -> StepResult:
        """Check real state, then act or return a no-op. Raise to fail the step."""

    def undo(self, ctx: RunContext) -> StepResult | None:
        """Undo what do() did. None means there is nothing to undo for this step."""
        return None

    def stopped_advice(self, run_id: str, stack: str) -> str | None:
        """What the operator should do when this step stops a run dirty past a point of
        no return; None: the engine's own words."""
        return None

    @property
    def has_undo(self) -> bool:
        return type(self).undo is not Step.undo

    def describe(self) -> str:
        """One line for `plan`."""
        shown = ", ".join(f"{k}={v}" for k, v in self.params.items() if not k.startswith("_"))
        return f"{self.key}({shown})"

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "name": self.name, "params": self.params}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Step:
        for module in STEP_MODULES:
            importlib.import_module(module)
        cls = STEP_TYPES[d["name"]]
        return cls(key=d["key"], **d["params"])


@dataclass
class Plan:
    """An ordered list of steps for one strategy on one stack."""

    strategy: str
    stack: str
    steps: list[Step]
    params: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def in_flight(self) -> int:
        """How many lanes may be in flight at once (1: one after the other)."""
        return max(int(self.params.get("in_flight", 1)), 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "stack": self.stack,
            "params": self.params,
            "summary": self.summary,
            "steps": [s.to_dict() for s in self.steps],
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Plan:
        return Plan(
            strategy=d["strategy"],
            stack=d["stack"],
            steps=[Step.from_dict(s) for s in d["steps"]],
            params=d.get("params", {}),
            summary=d.get("summary", {}),
        )
