"""Draining: waiting until the requests in flight to servers that left every entry point
have ended, before they are destroyed or upgraded, bounded by `drain_timeout`.

Drains that never end are the top complaint about tools like this one, so the end of the
wait is a choice made per stack, `on_drain_timeout` in `[stacks.NAME.defaults]`:

- ``"fail"`` (the default, the safe one): the step fails naming each server and its
  requests still in flight; the run rolls back, so nothing is cut off.
- ``"proceed"``: log `drain.timed_out` and go on; the step's outputs record what was
  still in flight (`drain_timed_out`), and those requests are cut off.

A rollback's own drains (the servers leaving an entry point that is pointed back, before
the data may move back: I3) always wait as "fail" does.

While a drain waits it journals what it waits on in its step's marks (RunContext.mark):
the requests in flight per server, since when, and the timeout, rewritten whenever the
counts change. `changeover status RUN` shows it (`describe_drain`):
"draining srv-1: 3 request(s) in flight for 42 s (timeout 330 s)".
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Literal

from orchestrator import events
from orchestrator.errors import StepFailed, TransientError
from orchestrator.plan import RunContext
from orchestrator.waits import some

DrainEnd = Literal["fail", "proceed"]

POLL_MIN, POLL_MAX = 0.05, 3.0  # seconds between in-flight reads: local fast, an ELB slow
DRAIN_MARK = "draining"  # marks: what the drain waits on now (None: it is not waiting)
TIMED_OUT = "drain_timed_out"  # outputs: server -> requests cut off ("proceed")


def inflight(ctx: RunContext, ids: list[str]) -> dict[str, int]:
    """Requests in flight to these servers, over every entry point."""
    want = set(ids)
    busy: dict[str, int] = {}
    for ep in ctx.config.entry_points:
        for i, n in ctx.provider.inflight(ctx.stack, ep.name).items():
            if i in want and n > 0:
                busy[i] = busy.get(i, 0) + n
    return busy


def in_flight_text(busy: Mapping[str, int]) -> str:
    """`srv-1: 3 request(s) in flight, srv-2: 1 request(s) in flight`."""
    return ", ".join(f"{i}: {n} request(s) in flight" for i, n in sorted(busy.items()))


def drain(ctx: RunContext, ids: list[str], *, on_timeout: DrainEnd = "fail") -> dict[str, int]:
    """Wait until nothing is in flight to `ids`, up to the stack's drain_timeout. Returns
    {} when drained, or (on_timeout "proceed") the requests still in flight when it gave
    up; with "fail" it raises StepFailed naming them."""
    if not ids:
        return {}
    timeout = ctx.config.defaults.drain_timeout
    end = ctx.clock() + timeout
    interval = POLL_MIN
    busy = inflight(ctx, ids)
    if not busy:
        return {}
    since = time.time()  # wall clock: `status` reads it from another process
    marked: dict[str, int] | None = None
    try:
        with ctx.waiting(f"drain of {some(ids)}", deadline=timeout) as waiting:
            while busy:
                if ctx.clock() >= end:
                    return _timed_out(ctx, busy, timeout, on_timeout)
                waiting.update(f"{sum(busy.values())} request(s) in flight")
                if busy != marked:
                    ctx.mark(**{DRAIN_MARK: {"inflight": busy, "since": since, "timeout": timeout}})
                    marked = dict(busy)
                ctx.log.debug(events.DRAIN_WAIT, busy=busy)
                ctx.wait(min(interval, max(end - ctx.clock(), 0.0)))
                interval = min(interval * 2, POLL_MAX)
                busy = inflight(ctx, ids)
    finally:
        if marked is not None:
            ctx.mark(**{DRAIN_MARK: None})
    return {}


def drain_poll(ctx: RunContext, ids: list[str], *, on_timeout: DrainEnd = "fail") -> dict[str, int]:
    """One look at a drain, for a step that polls (DrainServers: a lane of a sliding
    window must not hold the others while its old server drains). {} when drained;
    while requests are in flight, TransientError (the engine polls again after its
    backoff), up to `drain_timeout` from the first look, which the step's marks keep (so
    a resumed run does not start the clock again); then as `drain` ends."""
    if not ids:
        return {}
    busy = inflight(ctx, ids)
    held = ctx.marks.get(DRAIN_MARK) or {}
    if not busy:
        if held:
            ctx.mark(**{DRAIN_MARK: None})
        return {}
    timeout = ctx.config.defaults.drain_timeout
    began = float(held.get("began", ctx.clock()))
    if ctx.clock() - began >= timeout:
        ctx.mark(**{DRAIN_MARK: None})
        return _timed_out(ctx, busy, timeout, on_timeout)
    if busy != held.get("inflight"):
        since = float(held.get("since", time.time()))  # wall clock: `status` reads it
        ctx.mark(
            **{DRAIN_MARK: {"inflight": busy, "since": since, "timeout": timeout, "began": began}}
        )
    ctx.log.debug(events.DRAIN_WAIT, busy=busy)
    with ctx.waiting(f"drain of {some(ids)}", deadline=timeout) as waiting:
        waiting.update(f"{sum(busy.values())} request(s) in flight")
        raise TransientError(f"{in_flight_text(busy)}")


def _timed_out(
    ctx: RunContext, busy: dict[str, int], timeout: float, on_timeout: DrainEnd
) -> dict[str, int]:
    if on_timeout == "proceed":
        ctx.log.warning(
            events.DRAIN_TIMED_OUT, in_flight=busy, timeout=timeout, on_drain_timeout=on_timeout
        )
        return busy
    raise StepFailed(
        f"servers did not drain within drain_timeout {timeout:.0f} s: {in_flight_text(busy)} "
        '(on_drain_timeout = "fail"); raise drain_timeout, or set on_drain_timeout = '
        '"proceed" to cut such requests off'
    )


def describe_drain(marks: Mapping[str, Any], now: float) -> str | None:
    """For `status`: what a step's drain waits on now, from its journaled marks."""
    draining = marks.get(DRAIN_MARK)
    if not isinstance(draining, dict) or not draining.get("inflight"):
        return None
    elapsed = max(now - float(draining.get("since", now)), 0.0)
    busy = {str(k): int(v) for k, v in draining["inflight"].items()}
    return (
        f"draining {in_flight_text(busy)} for {elapsed:.0f} s "
        f"(timeout {float(draining.get('timeout') or 0):.0f} s)"
    )
