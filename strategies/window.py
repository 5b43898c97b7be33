"""Maintenance windows for campaigns (`upgrade`, `rotate`): a gate before every batch.

`EnterWindow#n` comes right before batch n's first step. It lets the batch start only if
the batch's expected duration fits before the open window closes. The expectation is the
slowest batch of this campaign so far, or, before any batch was timed, the configured
estimate (`[stacks.NAME.windows] batch_estimate`). Otherwise the campaign pauses (outcome
`paused`, exit 0) with nothing of the batch begun, every server serving, and the next
window's start in the result; the same command run again continues it (orchestrator/cli.py
finds the paused campaign), and its gate asks again.

A batch's duration is measured on the window clock from its gate to the next gate, by the
same process only: a batch a crash interrupted is not timed (its time would include the
time nobody ran it). Batches start one after the other, so when a window opens the
campaign spreads its work by the batch size rather than firing everything at once.
"""

from __future__ import annotations

from typing import Any

from orchestrator.errors import Paused, PreconditionFailed
from orchestrator.plan import NO_RETRY, Plan, RunContext, Step, StepResult
from orchestrator.windows import Schedule, iso

DEFAULT_BATCH_ESTIMATE = 600.0  # seconds a batch is expected to take before one is timed


def _span(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 1:
        return f"{seconds:.0f}s"
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"


class EnterWindow(Step):
    """Start the next batch only if it ends before the open window closes; else pause."""

    name = "EnterWindow"
    retry = NO_RETRY

    def do(self, ctx: RunContext) -> StepResult:
        p = self.params
        schedule = Schedule.parse(p["windows"])
        now = ctx.now()
        previous = ctx.output(p["previous"]) if p.get("previous") else {}
        timed = [float(x) for x in previous.get("batch_seconds", [])]
        last = ctx.marks.get("last_batch_seconds")
        if last is None and previous.get("session") == ctx.session and previous.get("opened_at"):
            last = max(now - float(previous["opened_at"]), 0.0)
        if last is not None:
            timed.append(float(last))
        estimate = max(timed) if timed else float(p["estimate"])
        basis = (
            f"the slowest of {len(timed)} batch(es) so far"
            if timed
            else "the configured batch_estimate"
        )
        where = f"batch {p['batch']} of {p['of']}"
        if estimate > schedule.longest:
            raise PreconditionFailed(
                f"{where} needs about {_span(estimate)} ({basis}), longer than the longest "
                f"window ({_span(schedule.longest)}): it would never start. Widen a window "
                "or use a smaller --batch/--max-surge"
            )
        open_now = schedule.open_now(now)
        if open_now is not None and now + estimate <= open_now[1]:
            window, closes = open_now
            return StepResult(
                {
                    "opened_at": now,
                    "session": ctx.session,
                    "window": window.spec,
                    "closes_at": iso(closes, window.tz),
                    "estimate": round(estimate, 3),
                    "batch_seconds": [round(x, 3) for x in timed],
                }
            )
        nxt, opens = schedule.next_open(now)
        why = (
            f"window {open_now[0].spec!r} closes at {iso(open_now[1], open_now[0].tz)}"
            if open_now is not None
            else "no window is open"
        )
        marks: dict[str, Any] = {} if last is None else {"last_batch_seconds": round(last, 3)}
        raise Paused(
            f"paused before {where}: it needs about {_span(estimate)} ({basis}) and {why}. "
            f"The next window ({nxt.spec!r}) opens {iso(opens, nxt.tz)}: run the same "
            f"command again then (a cron job can) to continue this campaign; "
            f"`changeover status {ctx.run_id}` shows it, `changeover rollback "
            f"{ctx.run_id}` ends it where it is",
            next_window=iso(opens, nxt.tz),
            window=nxt.spec,
            marks=marks,
        )


def with_windows(
    steps: list[Step], *, first_of_batch: str, windows: list[str], estimate: float
) -> list[Step]:
    """The campaign's steps with a window gate before each batch (whose first step's key
    starts with `first_of_batch`). No windows: the steps unchanged."""
    if not windows:
        return steps
    Schedule.parse(windows)  # a bad spec is bad input (exit 2) before anything runs
    starts = [i for i, s in enumerate(steps) if s.key.startswith(first_of_batch)]
    out: list[Step] = []
    for i, step in enumerate(steps):
        if i in starts:
            n = starts.index(i) + 1
            out.append(
                EnterWindow(
                    key=f"EnterWindow#{n}",
                    windows=list(windows),
                    estimate=estimate,
                    batch=n,
                    of=len(starts),
                    previous=f"EnterWindow#{n - 1}" if n > 1 else None,
                )
            )
        out.append(step)
    return out


# The first step of each batch, by campaign strategy (a rotate batch first checks its
# stop conditions: after the gate, so a campaign continued later checks them then).
BATCH_STARTS = {"upgrade": "DrainForUpgrade#", "rotate": "CheckStopConditions#"}


def windowed(plan: Plan, windows: list[str], estimate: float) -> Plan:
    """The plan as a campaign across maintenance windows (no windows: unchanged)."""
    if not windows:
        return plan
    plan.steps = with_windows(
        plan.steps, first_of_batch=BATCH_STARTS[plan.strategy], windows=windows, estimate=estimate
    )
    plan.params["windows"] = list(windows)
    plan.summary["windows"] = {"open": list(windows), "batch_estimate": estimate}
    return plan
