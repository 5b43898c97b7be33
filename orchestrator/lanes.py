"""Lanes: replacements run side by side, at most `Plan.in_flight` at once.

A sliding-window rotate gives each server it replaces a lane of its own: the same guarded
steps as a batch (check, create, wait, verify, add, remove, drain, destroy), each step
journaled as usual. The scheduler keeps up to `in_flight` lanes going and starts the next
one as soon as one finishes, so one slow boot holds up only its own lane (Kubernetes
Deployments, Nomad and EC2 instance refresh treat max surge the same way: a cap on
replacements in flight, not a batch size).

It drives them in one thread, a poll at a time. A step that is not ready raises
TransientError, as in a batch; here that is no retry loop of its own but the lane's turn
ending: the lane is due again later. How much later keeps API calls per replaced server
low (at most 10 on AWS, bench/fleet_efficiency.py) at little cost in time:

- a wait is polled again after PACE times as long as it has lasted (at least its step's
  own backoff): the time lost past the moment it was ready is about PACE / 2 of the wait;
- a step of a kind that already waited in this run is first polled when the shortest
  wait of that kind so far is over (the same image boots alike, a target group's health
  checks and deregistration delay take the same time for every server);
- a poll gathers the lanes: it comes when the first lane is due, or a little later if
  others fall due just after it, and every lane due by then goes in it, after one
  `refresh()` and one `ex_prefetch` of all the servers in flight, so it reads each kind of
  thing once for all of them, whatever stage each lane is in;
- lanes not due yet ride along when they wait in a step of a kind the poll looked at
  again: with a provider that shares its reads (ex_prefetch) their look costs no call,
  and a boot that ended early is seen then rather than at its own poll.

Failure: a lane's step that fails (its server fails verification, a drain that will not
end) stops the scheduler from starting new lanes. The other lanes in flight are undone with
it, not finished: a replacement that failed may fail the others for the same reason (one
image, one config), and none of them has passed its point of no return, so undoing them
costs only time and leaves their old servers serving. A lane already past its point of no
return (its destroy began) can only go forward and is finished first. Lanes that finished
stay. The engine's rollback then undoes lane by lane (engine._undo_order).

After a kill, `resume` picks up every lane that began and did not finish, and goes on;
`rollback` undoes them and keeps the finished ones.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from orchestrator import events
from orchestrator.errors import FencedError
from orchestrator.plan import Plan, RetryPolicy, RunContext, Step
from orchestrator.state.base import Lease, StepRecord
from orchestrator.waits import Waits

if TYPE_CHECKING:
    from orchestrator.engine import Engine, RunResult

# Lanes due within this many seconds of the one that is due go in the same poll: their
# reads are shared, so polling them a little early costs no call and saves one later.
SHARE = 4.0
# A wait that has lasted t seconds is polled again after PACE x t (at least the step's
# own backoff, at most MAX_POLL): a boot that took a minute is not looked at every 3 s,
# and the time past the moment it was ready stays about PACE / 2 of the wait.
PACE = 0.3
MAX_POLL = 30.0
# A step of a kind that already finished in this run is first polled again after EARLY
# times the shortest wait of that kind so far (the same image boots alike); for a kind
# whose waits begin unseen (status checks begin as a boot ends, seen a poll later), the
# wait at this quantile of those so far.
EARLY = 1.0
UNSURE = 0.25


def backoff(policy: RetryPolicy, attempts: int) -> float:
    """Seconds until a step that was not ready is polled again (exponential, capped)."""
    return float(min(policy.backoff_initial * 2 ** max(attempts - 1, 0), policy.backoff_max))


@dataclass
class Lane:
    """One replacement: its steps (plan indexes, in order) and where it stands."""

    number: int
    idxs: list[int]
    ctx: RunContext
    pos: int = 0  # the index into idxs of the step it is at
    attempts: int = 0  # attempts of that step in this process
    began: float = 0.0  # run clock when that step's first attempt here began
    t0: float = 0.0  # monotonic, ditto, for the journal's timings
    due: float = 0.0  # run clock when it is to be polled next
    crossed: bool = False  # that step journaled its point of no return
    # The last step it finished waited (was polled until ready): the step after it began
    # as that wait ended, so what that step waits on began unseen, a poll earlier.
    waited: bool = False

    @property
    def finished(self) -> bool:
        return self.pos >= len(self.idxs)


class LaneScheduler:
    """Drives one segment of lane steps for the engine (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        run_id: str,
        plan: Plan,
        *,
        lease: Lease,
        ctx: RunContext,
        records: list[StepRecord],
    ) -> None:
        self.engine = engine
        self.run_id = run_id
        self.plan = plan
        self.lease = lease
        self.ctx = ctx
        self.records = records
        self.done = {r.idx for r in records if r.state == "done"}
        self.waits: dict[str, list[float]] = {}  # step name -> how long its waits took
        self.unsure: set[str] = set()  # step names whose waits began unseen

    # --- the loop ----------------------------------------------------------------------
    def drive(self, segment: list[int], *, touched_before: bool) -> RunResult | None:
        """Run every lane of `segment` to its end; a RunResult if the run ends here."""
        lanes = self._lanes(segment)
        for lane in lanes:
            self._skip_done(lane)
        begun = [
            lane
            for lane in lanes
            if not lane.finished and any(self.records[i].state != "pending" for i in lane.idxs)
        ]
        waiting = deque(lane for lane in lanes if not lane.finished and lane not in begun)
        in_flight: list[Lane] = list(begun)  # a resumed run goes on with what had begun
        clock = self.engine.clock
        while True:
            while waiting and len(in_flight) < self.plan.in_flight:
                lane = waiting.popleft()
                lane.due = clock()
                in_flight.append(lane)
            if not in_flight:
                return None
            now = clock()
            tick = self._next_tick(in_flight)
            if tick > now:
                self._sleep(tick - now)
                continue
            due = [lane for lane in in_flight if lane.due <= now]
            self._poll(in_flight)
            looked: set[int] = set()  # lanes this poll advanced
            kinds: set[str] = set()  # the steps they were waiting in, looked at again
            while due:
                for lane in due:
                    looked.add(lane.number)
                    if lane.attempts:  # a look again at a wait: it read what the wait reads
                        kinds.add(self.plan.steps[lane.idxs[lane.pos]].name)
                    ended = self._advance(lane)
                    if ended is not None:
                        return self._failed(lane, in_flight, lanes, ended, touched_before)
                    if lane.finished:
                        in_flight.remove(lane)
                # A slot that came free starts its next lane in this same poll.
                due = []
                while waiting and len(in_flight) < self.plan.in_flight:
                    due.append(lane := waiting.popleft())
                    in_flight.append(lane)
                if not due:
                    due = self._riders(in_flight, looked, kinds)

    def _riders(self, in_flight: list[Lane], looked: set[int], kinds: set[str]) -> list[Lane]:
        """Lanes not due yet that wait in a step of a kind this poll already looked at
        again: the provider keeps what the poll read, for every server in flight
        (ex_prefetch), so their look reads nothing new, and a boot that ended early is
        seen now rather than at the lane's own poll (which it then does not need). Only
        for providers that share their reads so (ex_prefetch); elsewhere a look may cost
        a request."""
        if not kinds or not callable(getattr(self.ctx.provider, "ex_prefetch", None)):
            return []
        return [
            lane
            for lane in in_flight
            if lane.number not in looked
            and lane.attempts > 0
            and self.plan.steps[lane.idxs[lane.pos]].name in kinds
        ]

    @staticmethod
    def _next_tick(in_flight: list[Lane]) -> float:
        """When to poll next: when the first lane is due, or, if others fall due soon
        after it, when the last of those does. Soon is PACE times as long as that first
        lane has waited (at most SHARE seconds): each such gathering saves a poll, for a
        delay in proportion to the wait (a local boot of 0.2 s is not held up by 3 s)."""
        first = min(in_flight, key=lambda lane: lane.due)
        window = min(SHARE, PACE * max(first.due - first.began, 0.0))
        tick = first.due
        for due in sorted(lane.due for lane in in_flight):
            if first.due < due <= first.due + window:
                tick = due
        return tick

    def _lanes(self, segment: list[int]) -> list[Lane]:
        by_number: dict[int, list[int]] = {}
        for idx in segment:
            lane = self.plan.steps[idx].lane
            assert lane is not None
            by_number.setdefault(lane, []).append(idx)
        return [
            Lane(number, idxs, dataclasses.replace(self.ctx, waits=Waits(), marks={}))
            for number, idxs in by_number.items()
        ]

    def _skip_done(self, lane: Lane) -> None:
        while not lane.finished and lane.idxs[lane.pos] in self.done:
            lane.pos += 1

    def _sleep(self, seconds: float) -> None:
        """Wait for the next lane that is due, in slices that keep the lease."""
        end = self.engine.clock() + seconds
        while (left := end - self.engine.clock()) > 0:
            self.ctx.heartbeat()
            self.engine.sleep(min(left, 1.0))

    def _poll(self, in_flight: list[Lane]) -> None:
        """One fresh read of the world for every lane that goes now: forget what was
        kept, and tell the provider every server in flight, so that the first read of a
        kind asks about all of them at once."""
        provider = self.ctx.provider
        provider.refresh()
        prefetch = getattr(provider, "ex_prefetch", None)
        if callable(prefetch):
            prefetch(self.plan.stack, self._servers(in_flight))

    def _servers(self, lanes: list[Lane]) -> list[str]:
        ids: list[str] = []
        for lane in lanes:
            for idx in lane.idxs:
                step = self.plan.steps[idx]
                ids += step.params.get("ids", [])
                ids += self.ctx.outputs.get(step.key, {}).get("created", [])
        return list(dict.fromkeys(ids))

    # --- one lane's turn -------------------------------------------------------------------
    def _advance(self, lane: Lane) -> Exception | None:
        """Run the lane's steps until one is not ready (TransientError within its
        policy) or the lane finishes. Returns the exception of a step that failed."""
        e = self.engine
        while not lane.finished:
            idx = lane.idxs[lane.pos]
            step = self.plan.steps[idx]
            if lane.attempts == 0:
                self._begin(lane, idx)
            else:
                lane.ctx.first_attempt = False
            lane.attempts += 1
            policy = step.policy()
            e._doing = (self.run_id, idx, step)
            e._crossed = lane.crossed
            try:
                lane.ctx.heartbeat()
                result = step.do(lane.ctx)
            except FencedError:
                raise
            except Exception as exc:
                lane.crossed = e._crossed
                e._doing = None
                if not policy.gives_up(exc, lane.attempts, e.clock() - lane.began):
                    self._not_ready(lane, step, exc, policy)
                    return None
                lane.ctx.waits.stop(ok=False)
                return exc
            lane.crossed = e._crossed
            e._doing = None
            lane.ctx.waits.stop(ok=True)
            if lane.attempts > 1:  # it waited: how long a step of its kind may take
                self.waits.setdefault(step.name, []).append(e.clock() - lane.began)
                if lane.waited:  # and its wait began as the step before ended its own
                    self.unsure.add(step.name)
            lane.waited = lane.attempts > 1
            e._step_done(
                self.run_id,
                self.plan,
                self.lease,
                ctx=lane.ctx,
                idx=idx,
                result=result,
                seconds=time.monotonic() - lane.t0,
                tries=lane.attempts,
            )
            self.done.add(idx)
            lane.pos += 1
            lane.attempts = 0
            self._skip_done(lane)
        return None

    def _begin(self, lane: Lane, idx: int) -> None:
        """The lane's step `idx` begins as any step does (Engine._begin_step), on the
        lane's own context; its clocks start with its first attempt in this process."""
        e = self.engine
        lane.crossed = e._begin_step(
            self.run_id, self.plan, self.lease, ctx=lane.ctx, records=self.records, idx=idx
        )
        lane.began = e.clock()
        lane.t0 = time.monotonic()

    def _not_ready(self, lane: Lane, step: Step, exc: Exception, policy: RetryPolicy) -> None:
        polling = lane.ctx.waits.polled(exc)
        log = lane.ctx.log.debug if polling else lane.ctx.log.warning
        log(events.STEP_RETRY, step=step.key, attempt=lane.attempts, error=str(exc))
        self.engine.on_event(
            "retry", {"step": step.key, "attempt": lane.attempts, "polling": polling}
        )
        now = self.engine.clock()
        waited = now - lane.began
        pause = max(backoff(policy, lane.attempts), min(PACE * waited, MAX_POLL))
        lane.due = now + pause
        if step.name in self.waits:
            lane.due = max(lane.due, lane.began + EARLY * self._soonest(step.name))

    def _soonest(self, name: str) -> float:
        """How long a wait of this kind takes at the least, from the waits so far: the
        shortest, or, for waits that began unseen, a low quantile (UNSURE): a server
        whose boot was seen late began its status checks well before its VerifyServers,
        and taking that short wait for the rule would look at every later lane early."""
        waits = sorted(self.waits[name])
        if name not in self.unsure:
            return waits[0]
        return waits[int(UNSURE * (len(waits) - 1))]

    # --- a failure ---------------------------------------------------------------------------
    def _failed(
        self,
        lane: Lane,
        in_flight: list[Lane],
        lanes: list[Lane],
        exc: Exception,
        touched_before: bool,
    ) -> RunResult:
        """Lane `lane` failed: finish the lanes that can only go forward, then end the
        run as the engine does (a rollback, which undoes the lanes still in flight)."""
        e = self.engine
        idx = lane.idxs[lane.pos]
        others = [other for other in in_flight if other is not lane]
        forward = [other for other in others if other.crossed]
        for other in forward:
            while not other.finished:
                if (failed := self._advance(other)) is not None:
                    return e._step_failed(
                        self.run_id,
                        self.plan,
                        self.lease,
                        ctx=other.ctx,
                        idx=other.idxs[other.pos],
                        exc=failed,
                        tries=other.attempts,
                        touched=True,
                        crossed=other.crossed,
                    )
                if not other.finished:
                    self._sleep(max(other.due - e.clock(), 0.0))
                    self._poll([other])
        undone = [other.number for other in others if not other.finished]
        kept = sum(1 for other in lanes if other.finished)
        return e._step_failed(
            self.run_id,
            self.plan,
            self.lease,
            ctx=lane.ctx,
            idx=idx,
            exc=exc,
            tries=lane.attempts,
            touched=touched_before,
            crossed=lane.crossed,
            then=_then(undone, kept, [other.number for other in forward]),
        )


def _then(undone: list[int], kept: int, finished: list[int]) -> str:
    """What the rollback does with the other replacements, and why."""
    parts: list[str] = []
    if undone:
        parts.append(
            f"replacement(s) {_numbers(undone)} were in flight too and are undone with it "
            "(none had passed its point of no return, and what failed this one may fail "
            "them: their old servers serve again)"
        )
    if finished:
        parts.append(
            f"replacement(s) {_numbers(finished)} had begun destroying their old servers "
            "and were finished first"
        )
    if kept:
        parts.append(f"the {kept} replacement(s) that finished stay")
    return (". " + "; ".join(parts)) if parts else ""


def _numbers(numbers: list[int]) -> str:
    return ", ".join(f"#{n}" for n in numbers)
