"""The engine: runs plans durably, retries transient errors, undoes on failure, resumes.

For each step it journals the start, runs ``do`` under the step's retry policy
(tenacity; sleep is injectable), then journals the end with the outputs. A failed step
starts a rollback: ``undo`` of every step that began, in reverse, back to the last
irreversible step. A failed ``undo`` stops the rollback: the run is dirty and the
result names each resource and its state. ``resume`` continues a killed run from its
journal; ``rollback`` undoes an unfinished one.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    wait_exponential,
    wait_random,
)

from orchestrator import events
from orchestrator.errors import (
    ChangeoverError,
    FencedError,
    LockedError,
    Paused,
    PreconditionFailed,
)
from orchestrator.guard import MutationGuard
from orchestrator.lanes import LaneScheduler
from orchestrator.log import get_logger
from orchestrator.plan import Outcome, Plan, RunContext, Step, StepResult
from orchestrator.settings import StackConfig
from orchestrator.state import StateStore, open_store
from orchestrator.state.base import Lease, RunRecord, StateUnavailable, StepRecord
from providers.base import Provider

EventSink = Callable[[str, dict[str, Any]], None]


class Heartbeat:
    """Renews the lease from a thread of its own while a run is being driven, so a step
    that waits long (a boot, a snapshot, a bake) never lets the lease lapse."""

    def __init__(self, store: StateStore, lease: Lease, ttl: float) -> None:
        self.store = store  # cloned for the thread: a handle of its own
        self.lease = lease
        self.ttl = ttl
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="changeover-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        store = self.store.clone()
        try:
            while not self._stop.wait(self.ttl / 3):
                try:
                    self.lease = store.renew(self.lease)
                except FencedError as exc:
                    # The main thread's next journal write is refused too; just stop.
                    self.lost = str(exc)
                    return
                except StateUnavailable:
                    continue  # a busy or unreachable store: the next beat is soon enough
        finally:
            store.close()


def new_run_id() -> str:
    """Sortable by time, unique enough to tag cloud resources with."""
    return time.strftime("r%Y%m%d-%H%M%S-", time.gmtime()) + uuid.uuid4().hex[:6]


@dataclass
class RunResult:
    """What a run came to: the outcome, its message, and the JSON summary."""

    run_id: str | None
    outcome: Outcome
    message: str = ""
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return self.outcome.exit_code


class Engine:
    """Runs, resumes and rolls back plans for one stack's provider."""

    def __init__(
        self,
        *,
        state_dir: Path | None = None,
        store: StateStore | None = None,
        provider: Provider,
        config: StackConfig,
        lock_ttl: float = 60.0,
        crash_after_step: int | None = None,
        crash_after_call: str | int | None = None,
        crash_before_call: str | int | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
        on_event: EventSink | None = None,
        window_clock: Callable[[], float] = time.time,
    ) -> None:
        # The journal and the leases: the store the composition root opened (the engine
        # closes it), or the sqlite one in `state_dir`. `journal` and `lock` name its two
        # faces where the engine uses them.
        self.store = store or open_store(None, state_dir, ttl=lock_ttl, clock=clock)
        self.lock_ttl = self.store.ttl
        self.journal = self.lock = self.store
        self.provider = provider
        # What the steps get: the provider behind the lease check and the kill hooks.
        self.guard = MutationGuard(
            provider,
            before=self._before_mutation,
            crash_before_call=crash_before_call,
            crash_after_call=crash_after_call,
        )
        self.config = config
        self.crash_after_step = crash_after_step
        self._lease: Lease | None = None
        self._heartbeat: Heartbeat | None = None
        # The step being done (run id, index, step) and whether its point of no return
        # is journaled: set only while a step's do() runs.
        self._doing: tuple[str, int, Step] | None = None
        self._crossed = False
        self.sleep = sleep
        self.clock = clock
        self.window_clock = window_clock  # what maintenance-window gates read
        self.session = uuid.uuid4().hex[:12]
        self.on_event = on_event or (lambda _k, _p: None)
        self._steps_done_here = 0
        self._last_beat = 0.0
        self._tries = 0  # attempts of the step being run, for the journal

    def close(self) -> None:
        self.store.close()

    # --- entry points ------------------------------------------------------------------
    def ensure_free(self, stack: str) -> None:
        """Raise LockedError if a live lease or an unfinished run holds the stack."""
        self.lock.ensure_free(stack)
        for other in self.journal.unfinished(stack):
            raise self._held_by(stack, other)

    def paused_campaign(self, stack: str, strategy: str) -> RunRecord | None:
        """The stack's paused campaign of this strategy, which the same command continues."""
        for rec in self.journal.unfinished(stack):
            if rec.status == "paused" and rec.strategy == strategy:
                return rec
        return None

    def _held_by(self, stack: str, other: RunRecord) -> LockedError:
        if other.status != "paused":
            return LockedError(stack, other.id, self._lease_left(stack))
        return LockedError(
            stack,
            other.id,
            0,
            detail=f"a paused {other.strategy} campaign",
            advice=f"`changeover {other.strategy} {stack}` continues it in its window, "
            f"`changeover rollback {other.id}` ends it",
        )

    def start(self, plan: Plan, run_id: str | None = None) -> RunResult:
        """Start a new run of `plan`. Raises LockedError if the stack is busy."""
        run_id = run_id or new_run_id()
        for other in self.journal.unfinished(plan.stack):
            raise self._held_by(plan.stack, other)
        lease = self.lock.acquire(plan.stack, run_id)
        get_logger(run=run_id).info(events.LOCK_ACQUIRED, stack_name=plan.stack, token=lease.token)
        self.journal.create_run(run_id, plan.to_dict(), lease)
        get_logger(run=run_id).info(
            events.RUN_STARTED, strategy=plan.strategy, stack_name=plan.stack, steps=len(plan.steps)
        )
        self.on_event("run_started", _started(run_id, plan, resumed=False))
        return self._drive(run_id, plan, lease)

    def resume(self, run_id: str) -> RunResult:
        """Continue an interrupted run from its journal."""
        rec = self._unfinished(run_id, "resume")
        plan = Plan.from_dict(rec.plan)
        lease = self.lock.acquire(rec.stack, rec.id)
        get_logger(run=rec.id).info(events.RUN_RESUMED, status=rec.status, token=lease.token)
        self.journal.event(rec.id, lease, "resumed", detail=rec.status)
        self.on_event("run_started", _started(rec.id, plan, resumed=True))
        records = self.journal.steps(rec.id)
        # A lane that failed past its point of no return (dirty, nothing undone yet) is
        # finished by going forward, like a step of the plan's own sequence.
        lane_forward = (
            rec.status == "dirty"
            and bool(_crossed_lanes(plan, records))
            and not any(r.undo_state for r in records)
        )
        if (
            _barrier(plan, records) is None
            and not lane_forward
            and rec.status in ("rolling_back", "dirty")
        ):
            # A run that began undoing only ever goes on undoing.
            return self._rollback(rec.id, plan, lease, cause="resumed an interrupted rollback")
        # Not rolling back, or past its point of no return: only forward is left.
        return self._drive(rec.id, plan, lease)

    def rollback(self, run_id: str) -> RunResult:
        """Undo an unfinished run: back to the last irreversible step."""
        rec = self._unfinished(run_id, "roll back", also=("dirty",))
        plan = Plan.from_dict(rec.plan)
        records = self.journal.steps(rec.id)
        if all(r.state == "done" for r in records):
            raise PreconditionFailed(
                f"run {rec.id} finished every step; nothing to roll back. "
                f"`changeover resume {rec.id}` records its end"
            )
        if (barrier := _barrier(plan, records)) is not None:
            raise PreconditionFailed(
                f"cannot roll back run {rec.id}: {barrier.key} began what cannot be undone "
                f"({plan.steps[barrier.idx].no_return}); nothing was touched. "
                f"`changeover resume {rec.id}` finishes it"
            )
        lease = self.lock.acquire(rec.stack, rec.id)
        self.journal.event(rec.id, lease, "rollback_requested", detail=rec.status)
        return self._rollback(rec.id, plan, lease, cause="rollback requested by operator")

    # --- driving -----------------------------------------------------------------------
    def _unfinished(self, run_id: str, verb: str, also: tuple[str, ...] = ()) -> RunRecord:
        rec = self.journal.get_run(run_id) or self.journal.find_run(run_id)
        if rec is None:
            raise PreconditionFailed(f"no run {run_id!r} in the journal")
        if rec.finished and rec.status not in also:
            raise PreconditionFailed(
                f"cannot {verb} run {rec.id}: it already ended ({rec.outcome or rec.status})"
            )
        return rec

    def _lease_left(self, stack: str) -> float:
        row = self.lock.holder(stack)
        return row.expires_at - self.clock() if row else 0.0

    def _context(self, run_id: str, plan: Plan, lease: Lease) -> RunContext:
        outputs = {r.key: r.outputs for r in self.journal.steps(run_id) if r.state == "done"}
        # Host keys pinned by an earlier process's gate: a resumed run trusts the same
        # keys (and reads no console again) for the servers it connects to.
        pins = {k: v for out in outputs.values() for k, v in out.get("host_keys", {}).items()}
        if pins:
            self.provider.pin_host_keys(plan.stack, [], pins)
        holder = {"lease": lease}

        def heartbeat() -> None:
            now = time.monotonic()
            if now - self._last_beat >= 1.0:
                holder["lease"] = self.lock.renew(holder["lease"])
                self._last_beat = now

        return RunContext(
            run_id=run_id,
            stack=plan.stack,
            config=self.config,
            provider=cast(Provider, self.guard),
            outputs=outputs,
            log=get_logger(run=run_id, stack_name=plan.stack),
            clock=self.clock,
            sleep=self.sleep,
            heartbeat=heartbeat,
            now=self.window_clock,
            session=self.session,
        )

    def _attempt(self, step: Step, ctx: RunContext, fn: Callable[[], StepResult | None]) -> Any:
        """Run `fn` under the step's retry policy. The caller bound `ctx.waits` to the step
        (_begin_step, or an undo); what is still open of them is closed here."""
        policy = step.policy()

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            # A TransientError that left one of the step's waits is a poll of what it
            # waits for (the wait's progress says so), not a retry after an error.
            polling = ctx.waits.polled(exc)
            log = ctx.log.debug if polling else ctx.log.warning
            log(events.STEP_RETRY, step=step.key, attempt=state.attempt_number, error=str(exc))
            self.on_event(
                "retry", {"step": step.key, "attempt": state.attempt_number, "polling": polling}
            )

        def spent(state: RetryCallState) -> bool:
            # Tenacity's own time since the first attempt, as stop_after_delay reads it.
            elapsed = state.seconds_since_start
            assert elapsed is not None  # set once an attempt has an outcome
            return policy.spent(state.attempt_number, elapsed)

        # policy.gives_up, split as tenacity asks: retry what is transient until spent.
        retrying = Retrying(
            stop=spent,
            # Exponential up to the cap, plus a little jitter: a step's retries poll the
            # world, so full jitter would only double the polls for the same overshoot.
            wait=wait_exponential(multiplier=policy.backoff_initial, max=policy.backoff_max)
            + wait_random(0, policy.backoff_initial),
            retry=retry_if_exception(policy.is_transient),
            sleep=self.sleep,
            before_sleep=before_sleep,
            reraise=True,
        )

        def call() -> StepResult | None:
            self._tries += 1
            ctx.heartbeat()
            if self._tries > 1:
                ctx.first_attempt = False
                ctx.provider.refresh()  # a retry is a poll: it reads the world afresh
            return fn()

        self._tries = 0
        ok = False
        try:
            result = retrying(call)
            ok = True
            return result
        finally:
            ctx.waits.stop(ok=ok)  # a poll's wait still open ends with the step's attempts

    def _held(self, run_id: str, lease: Lease, body: Callable[[], RunResult]) -> RunResult:
        """Run `body` holding `lease`: renewed by a heartbeat, checked before every
        mutating provider call. A lost lease stops the run where it is."""
        self._lease = lease
        try:
            with Heartbeat(self.store, lease, self.lock_ttl) as beat:
                self._heartbeat = beat
                return body()
        except FencedError as exc:
            get_logger(run=run_id).error(events.LOCK_LOST, error=str(exc))
            raise FencedError(
                f"{exc}; this process stopped before its next change. "
                f"`changeover status {run_id}` shows where the run is; the new holder of "
                "the lease drives it from here"
            ) from None
        finally:
            self._heartbeat = None
            self._lease = None
            self._doing = None

    def _before_mutation(self, op: str) -> None:
        """Called by the guard right before every mutating provider call."""
        lease = self._lease
        if lease is None:
            raise FencedError("a mutating provider call outside a run's lease")
        if self._heartbeat is not None and self._heartbeat.lost:
            raise FencedError(self._heartbeat.lost)
        self.lock.check(lease)
        if self._doing is not None and not self._crossed:
            run_id, idx, step = self._doing
            if step.irreversible:
                # Journaled before the call is sent: from here on rollback cannot undo
                # what this step does, and `resume` finishes it (I10).
                self.journal.step_marked(
                    run_id, idx, lease, {"point_of_no_return": op, "at": time.time()}
                )
                get_logger(run=run_id).warning(
                    events.STEP_POINT_OF_NO_RETURN, step=step.key, call=op
                )
                self._crossed = True

    def _drive(self, run_id: str, plan: Plan, lease: Lease) -> RunResult:
        return self._held(run_id, lease, lambda: self._drive_steps(run_id, plan, lease))

    def _drive_steps(self, run_id: str, plan: Plan, lease: Lease) -> RunResult:
        ctx = self._context(run_id, plan, lease)
        records = self.journal.steps(run_id)
        # Did anything change the world yet? Any step begun before (maybe by a killed
        # process) may have; in this process the guard counts the mutating calls.
        touched_before = any(r.state != "pending" for r in records)
        for segment in _segments(plan):
            if plan.steps[segment[0]].lane is not None:
                # A run of lanes (one replacement each): at most plan.in_flight at once.
                lanes = LaneScheduler(self, run_id, plan, lease=lease, ctx=ctx, records=records)
                ended = lanes.drive(segment, touched_before=touched_before)
                if ended is not None:
                    return ended
                continue
            idx = segment[0]
            if records[idx].state == "done":
                continue
            ended = self._drive_one(
                run_id, plan, lease, ctx=ctx, records=records, idx=idx, touched=touched_before
            )
            if ended is not None:
                return ended
        return self._finish(run_id, plan, lease, Outcome.SUCCEEDED, "done")

    def _drive_one(
        self,
        run_id: str,
        plan: Plan,
        lease: Lease,
        *,
        ctx: RunContext,
        records: list[StepRecord],
        idx: int,
        touched: bool,
    ) -> RunResult | None:
        """Run step `idx` to its end under its retry policy; a RunResult if the run ends."""
        step = plan.steps[idx]
        self._crossed = self._begin_step(run_id, plan, lease, ctx=ctx, records=records, idx=idx)
        t0 = time.monotonic()
        self._doing = (run_id, idx, step)
        try:
            result: StepResult = self._attempt(step, ctx, step_call(step.do, ctx))
        except FencedError:
            raise
        except Paused as exc:
            # A campaign's window closes before this batch would end: nothing of the
            # batch has begun. The run waits, holding its stack, for the same command.
            self._doing = None
            self.journal.step_paused(run_id, idx, lease, exc.marks)
            self.journal.event(run_id, lease, "paused", step=step.key, detail=exc.next_window)
            ctx.log.info(events.RUN_PAUSED, step=step.key, next_window=exc.next_window)
            self.on_event("paused", {"step": step.key, "next_window": exc.next_window})
            return self._finish(
                run_id,
                plan,
                lease,
                Outcome.PAUSED,
                str(exc),
                extra={"next_window": exc.next_window, "window": exc.window},
            )
        except Exception as exc:
            self._doing = None
            return self._step_failed(
                run_id, plan, lease, ctx=ctx, idx=idx, exc=exc, tries=self._tries, touched=touched
            )
        self._doing = None
        self._step_done(
            run_id, plan, lease, ctx=ctx, idx=idx, result=result, seconds=time.monotonic() - t0
        )
        return None

    def _begin_step(
        self,
        run_id: str,
        plan: Plan,
        lease: Lease,
        *,
        ctx: RunContext,
        records: list[StepRecord],
        idx: int,
    ) -> bool:
        """Step `idx` begins: journal and announce it, and bind `ctx` (the run's, or a
        lane's own) to it: its marks, its waits, whether it ever began before. Returns
        whether it already crossed its point of no return (in a process that was killed),
        for the caller to keep: the engine's `_crossed`, or the lane's."""
        step = plan.steps[idx]
        rec = records[idx]
        total = len(plan.steps)
        self.journal.step_started(run_id, idx, lease)
        ctx.log.info(events.STEP_STARTED, step=step.key, index=idx + 1, of=total)
        self.on_event("step_started", {"step": step.key, "index": idx, "total": total})
        ctx.first_attempt = rec.state == "pending"
        ctx.marks = dict(rec.outputs)
        ctx.journal_marks = self._marker(run_id, idx, lease)  # RunContext.mark
        ctx.waits.start(step.key, self.on_event)  # closed when its attempts are over
        return rec.outputs.get("point_of_no_return") is not None

    def _step_done(
        self,
        run_id: str,
        plan: Plan,
        lease: Lease,
        *,
        ctx: RunContext,
        idx: int,
        result: StepResult,
        seconds: float,
        tries: int | None = None,
    ) -> None:
        step = plan.steps[idx]
        tries = self._tries if tries is None else tries
        self.journal.step_done(run_id, idx, lease, result.outputs, noop=result.noop, tries=tries)
        ctx.outputs[step.key] = result.outputs
        if result.noop:
            ctx.log.info(events.STEP_NOOP, step=step.key, reason=result.noop)
        else:
            ctx.log.info(events.STEP_DONE, step=step.key, seconds=round(seconds, 3))
        self.on_event(
            "step_done",
            {"step": step.key, "index": idx, "total": len(plan.steps), "noop": result.noop},
        )
        self._maybe_crash(step)

    def _step_failed(
        self,
        run_id: str,
        plan: Plan,
        lease: Lease,
        *,
        ctx: RunContext,
        idx: int,
        exc: Exception,
        tries: int,
        touched: bool,
        crossed: bool | None = None,
        then: str = "",
    ) -> RunResult:
        """Step `idx` failed: journal it, then end the run dirty (past a point of no
        return), refused (nothing touched), or by rolling back. `then` says what the
        rollback does beyond the usual (a lane scheduler's other replacements)."""
        step = plan.steps[idx]
        reason = _reason(exc)
        self.journal.step_failed(run_id, idx, lease, reason, tries=tries)
        ctx.log.error(events.STEP_FAILED, step=step.key, error=reason)
        self.on_event("step_failed", {"step": step.key, "error": reason})
        crossed = self._crossed if crossed is None else crossed
        if crossed or _forward_only(plan, self.journal.steps(run_id), idx):
            advice = step.stopped_advice(run_id, plan.stack) or (
                "The new servers are serving and rollback cannot go back past this "
                f"step; fix the cause, then `changeover resume {run_id}` finishes it"
            )
            return self._finish(
                run_id,
                plan,
                lease,
                Outcome.DIRTY,
                f"{step.key} failed past its point of no return: {reason}. {advice}",
            )
        touched = touched or self.guard.mutations > 0
        if isinstance(exc, PreconditionFailed) and not touched:
            return self._finish(
                run_id, plan, lease, Outcome.PRECONDITION_FAILED, f"{step.key}: {reason}"
            )
        verb = "refused" if isinstance(exc, PreconditionFailed) else "failed"
        return self._undo_steps(run_id, plan, lease, cause=f"{step.key} {verb}: {reason}{then}")

    def _marker(self, run_id: str, idx: int, lease: Lease) -> Callable[[dict[str, Any]], None]:
        """RunContext.mark for step `idx`: merged into what its row holds (a point of no
        return stays), fenced by the lease like every journal write."""

        def mark(marks: dict[str, Any]) -> None:
            held = self.journal.steps(run_id)[idx].outputs
            self.journal.step_marked(run_id, idx, lease, {**held, **marks})

        return mark

    def _maybe_crash(self, step: Step) -> None:
        """Testing hook (CHANGEOVER_CRASH_AFTER_STEP): die like a kill -9 would."""
        self._steps_done_here += 1
        if self.crash_after_step is not None and self._steps_done_here == self.crash_after_step:
            get_logger().warning(events.CRASH_INJECTED, after_step=step.key)
            os.kill(os.getpid(), signal.SIGKILL)

    # --- rollback ------------------------------------------------------------------------
    def _rollback(self, run_id: str, plan: Plan, lease: Lease, *, cause: str) -> RunResult:
        return self._held(run_id, lease, lambda: self._undo_steps(run_id, plan, lease, cause=cause))

    def _undo_steps(self, run_id: str, plan: Plan, lease: Lease, *, cause: str) -> RunResult:
        self.journal.set_status(run_id, "rolling_back", lease, error=cause)
        self.journal.event(run_id, lease, "rollback_started", detail=cause)
        ctx = self._context(run_id, plan, lease)
        ctx.provider.refresh()  # whatever failed may have changed the world: read it anew
        ctx.log.warning(events.RUN_ROLLBACK_STARTED, cause=cause)
        self.on_event("rollback_started", {"cause": cause})
        records = self.journal.steps(run_id)
        if crossed := _crossed_lanes(plan, records):
            # A lane that began destroying its old servers can only go forward: it is
            # finished first (its destroy), then kept, like the lanes that finished.
            lanes = LaneScheduler(self, run_id, plan, lease=lease, ctx=ctx, records=records)
            if (ended := lanes.drive(crossed, touched_before=True)) is not None:
                return ended
            records = self.journal.steps(run_id)
        for rec in _undo_order(plan, records):
            step = plan.steps[rec.idx]
            if rec.undo_state == "done" or not step.has_undo:
                continue
            self.journal.undo_state(run_id, rec.idx, lease, "started")
            self.journal.event(run_id, lease, "undo_started", step=step.key)
            ctx.log.info(events.STEP_UNDO_STARTED, step=step.key)
            self.on_event("undo_started", {"step": step.key})
            ctx.waits.start(step.key, self.on_event)
            try:
                self._attempt(step, ctx, step_call(step.undo, ctx))
            except FencedError:
                raise
            except Exception as exc:
                reason = _reason(exc)
                self.journal.undo_state(run_id, rec.idx, lease, "failed", reason)
                self.journal.event(run_id, lease, "undo_failed", step=step.key, detail=reason)
                ctx.log.error(events.STEP_UNDO_FAILED, step=step.key, error=reason)
                message = (
                    f"{cause}; then undoing {step.key} failed: {reason}. The stack needs an "
                    f"operator: see `changeover status {run_id}`, fix the cause, then "
                    f"`changeover rollback {run_id}` again"
                )
                return self._finish(run_id, plan, lease, Outcome.DIRTY, message)
            self.journal.undo_state(run_id, rec.idx, lease, "done")
            self.journal.event(run_id, lease, "undo_done", step=step.key)
            ctx.log.info(events.STEP_UNDO_DONE, step=step.key)
            self.on_event("undo_done", {"step": step.key})
        ctx.log.warning(events.RUN_ROLLBACK_FINISHED, cause=cause)
        return self._finish(run_id, plan, lease, Outcome.ROLLED_BACK, cause)

    # --- the end ---------------------------------------------------------------------------
    def _finish(
        self,
        run_id: str,
        plan: Plan,
        lease: Lease,
        outcome: Outcome,
        message: str,
        *,
        extra: dict[str, Any] | None = None,
    ) -> RunResult:
        summary = self.summarize(run_id, plan, outcome)
        summary.update(extra or {})
        if outcome == Outcome.DIRTY:
            summary["resources"] = self.resource_report(plan, run_id)
            get_logger(run=run_id).error(events.RUN_DIRTY, message=message)
        summary["message"] = message
        self.journal.set_status(
            run_id,
            outcome.value,
            lease,
            outcome=outcome.value,
            result=summary,
            error=None if outcome in (Outcome.SUCCEEDED, Outcome.PAUSED) else message,
        )
        self.journal.event(run_id, lease, "finished", detail=outcome.value)
        self.lock.release(lease)
        get_logger(run=run_id).info(events.RUN_FINISHED, outcome=outcome.value)
        self.on_event("run_finished", summary)  # notifications (orchestrator/notify.py)
        return RunResult(run_id, outcome, message, summary)

    def summarize(self, run_id: str, plan: Plan, outcome: Outcome) -> dict[str, Any]:
        """The JSON result PRODUCT.md describes, built from the journal."""
        records = self.journal.steps(run_id)
        created: list[str] = []
        destroyed: list[str] = []
        for rec in records:
            created += rec.outputs.get("created", [])
            destroyed += rec.outputs.get("destroyed", [])
            if rec.undo_state == "done" and rec.outputs.get("created"):
                destroyed += rec.outputs["created"]
        entry_after: dict[str, list[str]] = {}
        for ep in self.config.entry_points:
            try:
                entry_after[ep.name] = sorted(self.provider.get_members(plan.stack, ep.name))
            except ChangeoverError:
                entry_after[ep.name] = []
        holder_after = sorted({m for ms in entry_after.values() for m in ms})
        ps = plan.summary
        gen_after = ps.get("generation_after") if outcome == Outcome.SUCCEEDED else None
        return {
            "run_id": run_id,
            "strategy": plan.strategy,
            "stack": plan.stack,
            "outcome": outcome.value,
            "generation": {
                "before": ps.get("generation_before"),
                "after": gen_after if gen_after is not None else ps.get("generation_before"),
            },
            "address": {
                "name": self.config.primary_address,
                "before": ps.get("members_before", []),
                "after": holder_after,
            },
            "entry_points": {
                name: {"before": ps.get("entry_points_before", {}).get(name, []), "after": after}
                for name, after in entry_after.items()
            },
            "servers": {"created": created, "destroyed": sorted(set(destroyed))},
            "timings": {r.key: r.seconds for r in records if r.seconds is not None},
            "api_calls": dict(sorted(self.provider.api_calls.items())),
        }

    def resource_report(self, plan: Plan, run_id: str) -> dict[str, Any]:
        """Each resource the stack has and its state, for an operator to act on."""
        try:
            servers = self.provider.list_servers(plan.stack)
            routes = {
                ep.name: self.provider.get_members(plan.stack, ep.name)
                for ep in self.config.entry_points
            }
        except ChangeoverError as exc:
            return {"error": f"could not read the provider: {exc}"}
        members = {m for ms in routes.values() for m in ms}
        data_role = self.config.data_role
        report: dict[str, Any] = {
            "address_members": sorted(members),
            "entry_points": routes,
            "servers": [],
        }
        for s in servers:
            entry: dict[str, Any] = {
                "id": s.id,
                "role": s.role,
                "generation": s.generation,
                "state": s.state,
                "created_by_this_run": s.run == run_id,
                "serving": s.id in members,
            }
            if s.role == data_role:
                try:
                    entry["write_mode"] = self.provider.data_mode(plan.stack, s.id).get("mode")
                except ChangeoverError as exc:
                    entry["write_mode"] = f"unknown ({exc})"
            report["servers"].append(entry)
        return report


def _past_no_return(plan: Plan, rec: StepRecord) -> bool:
    """Did this irreversible step reach its point of no return (or finish)?"""
    if not plan.steps[rec.idx].irreversible or rec.state == "pending":
        return False
    return rec.state == "done" or rec.outputs.get("point_of_no_return") is not None


def _forward_only(plan: Plan, records: list[StepRecord], idx: int) -> bool:
    """Is step `idx` forward-only now: the nearest irreversible step before it (in its
    own lane, if it has one) crossed its point of no return?"""
    if not plan.steps[idx].forward_only:
        return False
    lane = plan.steps[idx].lane
    for rec in reversed(records[:idx]):
        if lane is not None and plan.steps[rec.idx].lane != lane:
            continue
        if plan.steps[rec.idx].irreversible:
            return _past_no_return(plan, rec)
    return False


def _barrier(plan: Plan, records: list[StepRecord]) -> StepRecord | None:
    """An irreversible step past its point of no return that has not finished, or an
    unfinished step that is forward-only behind one: the run can only go forward from
    here. Not a lane's: a rollback finishes such a lane first (_finish_crossed_lanes)."""
    for rec in records:
        if plan.steps[rec.idx].lane is not None:
            continue
        if rec.state in ("started", "failed") and _past_no_return(plan, rec):
            return rec
        if rec.state != "done" and _forward_only(plan, records, rec.idx):
            return rec
    return None


def unfinished_barrier(plan: dict[str, Any], records: list[StepRecord]) -> str | None:
    """The key of the step a run is stuck past the point of no return of, if any: such a
    run can only be resumed (`status` says so)."""
    rec = _barrier(Plan.from_dict(plan), records)
    return rec.key if rec else None


def _undo_order(plan: Plan, records: list[StepRecord]) -> list[StepRecord]:
    """Steps that began, newest first, stopping at the last irreversible step that
    crossed its point of no return. Lanes (replacements run side by side) are undone
    one by one, the last first, each newest step first; a lane whose irreversible step
    crossed its point of no return is finished and kept whole, and the plan's own
    steps before the lanes are undone after them."""
    out: list[StepRecord] = []
    kept: set[int] = set()  # lanes past their point of no return
    for rec in reversed(records):
        lane = plan.steps[rec.idx].lane
        if rec.state == "pending" or lane in kept:
            continue
        if _past_no_return(plan, rec):
            if lane is None:
                break
            kept.add(lane)
            continue
        out.append(rec)
    return out


def _crossed_lanes(plan: Plan, records: list[StepRecord]) -> list[int]:
    """The steps of every lane that crossed a point of no return and has not finished."""
    lanes = {
        lane
        for rec in records
        if (lane := plan.steps[rec.idx].lane) is not None
        and rec.state != "done"
        and _past_no_return(plan, rec)
    }
    return [rec.idx for rec in records if plan.steps[rec.idx].lane in lanes]


def _segments(plan: Plan) -> list[list[int]]:
    """The plan's steps in the order they are driven: each step of the plan's own
    sequence alone, and each run of consecutive lane steps together."""
    out: list[list[int]] = []
    for idx, step in enumerate(plan.steps):
        if step.lane is not None and out and plan.steps[out[-1][0]].lane is not None:
            out[-1].append(idx)
        else:
            out.append([idx])
    return out


def step_call(
    fn: Callable[[RunContext], StepResult | None], ctx: RunContext
) -> Callable[[], StepResult | None]:
    """Bind a step method to its context (a closure per step, not per loop variable)."""
    return lambda: fn(ctx)


def _started(run_id: str, plan: Plan, *, resumed: bool) -> dict[str, Any]:
    """The `run_started` event: which run, and the generations its plan goes between."""
    return {
        "run_id": run_id,
        "stack": plan.stack,
        "strategy": plan.strategy,
        "steps": len(plan.steps),
        "generation": {
            "before": plan.summary.get("generation_before"),
            "after": plan.summary.get("generation_after"),
        },
        "resumed": resumed,
    }


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, ChangeoverError) else f"{type(exc).__name__}: {text}"
