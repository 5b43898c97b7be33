"""Watching a change for a while: the loop `Bake` and a rotate's `WatchCanary` share.

Every check (about once a second, five times at least) runs the step's own probe through
the entry points. On the first check, every `GATE_INTERVAL` seconds and on the last, it
also runs the step's deeper (costlier) checks, if any, and evaluates the stack's alarm
gates (orchestrator/gates.py). The first failure fails the step with a reason naming
what failed, so the run rolls back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from orchestrator.errors import VerificationFailed
from orchestrator.gates import GATE_INTERVAL, first_failure
from orchestrator.plan import RunContext


def check_gates(ctx: RunContext, label: str, checks: int, then: str = "") -> int:
    """Evaluate the stack's gates once; raise VerificationFailed naming the first that
    fails (`then` is appended: what happens next). Returns how many were evaluated."""
    gates = ctx.config.gates
    failed = first_failure(
        gates, region=ctx.config.region, endpoint_url=ctx.config.endpoint_url, sleep=ctx.sleep
    )
    if failed is not None:
        raise VerificationFailed(f"{label} failed after {checks} checks: {failed.reason()}{then}")
    return len(gates)


def watch_through(
    ctx: RunContext,
    *,
    what: str,
    label: str,
    seconds: float,
    probe: Callable[[int], None],
    deep: Callable[[int], None] | None = None,
    then: str = "",
) -> dict[str, Any]:
    """Run `probe(check_number)` (it raises to fail) for `seconds`, and `deep` and the
    gates now and then. `what` is the progress line ("bake through demo-eip"); `label`
    starts a gate's failure ("bake", "canary srv-1"), and `then` ends it."""
    interval = min(1.0, max(seconds / 5, 0.1))
    end = ctx.clock() + seconds
    checks = 0
    gated_at: float | None = None
    rounds = 0
    with ctx.waiting(what, duration=seconds) as waiting:
        while True:
            checks += 1
            last = ctx.clock() >= end
            probe(checks)
            if gated_at is None or last or ctx.clock() - gated_at >= GATE_INTERVAL:
                if deep is not None:
                    deep(checks)
                if ctx.config.gates:
                    check_gates(ctx, label, checks, then)
                    rounds += 1
                gated_at = ctx.clock()
            gated = f", gates passed {rounds} time(s)" if rounds else ""
            waiting.update(f"{checks} check(s) passed{gated}")
            if last:
                return {"checks": checks, "gate_rounds": rounds}
            ctx.wait(min(interval, max(end - ctx.clock(), 0)))
