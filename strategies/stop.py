"""Stop conditions for `rotate`: before each batch creates a server, `CheckStopConditions#n`
decides whether the run may go on. Like Cluster API's MachineHealthCheck `maxUnhealthy`, a
run that sees too many of its own new servers fail stops instead of replacing more.

- **The meltdown stop** (`--max-unhealthy PCT`, default 34). A new server that fails its
  health gate (`VerifyServers`) never serves: its batch rolls back and the run ends there,
  whatever the budget. The servers of the batches already replaced are checked again here,
  before each later batch: running, and (every `HEALTH_RECHECK` seconds, and whenever a
  process resumed the run) passing their role's app health check. Each that
  failed (now or at an earlier check of this run) counts. When they are more than PCT
  percent of the new servers this run created, the run stops before creating more
  (exit 1), naming them; the batches already replaced stay as they are. Within the budget
  the run goes on and leaves them where they are, named in the log (`stop.unhealthy`) and
  in the check's journaled output: the next `rotate --only-if-needed` replaces a serving
  server that fails its health check. (An entry point that refuses a member that is not
  running, as the local cloud's proxy does, makes a later batch fail and roll back while
  a dead one is still behind it.) `--max-unhealthy 100` never stops.
- **min-healthy**: a stack whose serving count would fall under `--min-healthy` if this
  batch's servers were replaced (the count `RemoveMembers` guards: serving members of each
  entry point of the role that holds several, i.e. running ones, or on a target group
  its healthy targets) is not touched further: the run stops before
  creating the batch's servers. Before the first batch nothing was touched (exit 2); later,
  the batches done stay (exit 1).
"""

from __future__ import annotations

import math

from orchestrator import events
from orchestrator.errors import PreconditionFailed, VerificationFailed
from orchestrator.plan import RunContext, Step, StepResult
from orchestrator.waits import some
from strategies.canary import unhealthy
from strategies.steps import servers_by_id, serving_members

CREATED = "CreateServers#"  # the key of batch k's create step is CreateServers#k
CHECKED = "CheckStopConditions#"
ADDED = "AddMembers#"
# Seconds between two app health checks of the run's new servers (their running state is
# read before every batch, from the describe the batch makes anyway). A check costs a call
# per batch on some clouds (EC2 status checks, target health), and a rotate of small
# batches would pay it per server; a process that resumed a run checks at once.
HEALTH_RECHECK = 30.0


def _pct(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


class CheckStopConditions(Step):
    """Before batch n creates anything: stop the run if too many of its new servers fail
    (--max-unhealthy) or if replacing this batch would leave fewer than --min-healthy
    serving. Makes no change."""

    name = "CheckStopConditions"

    def do(self, ctx: RunContext) -> StepResult:
        p = self.params
        n = int(p["batch"])
        # The run's new servers that serve: of the batches (or lanes) before this one,
        # those whose servers were put in service (lanes still in flight are not yet).
        fresh = [
            i
            for k in range(1, n)
            if f"{ADDED}{k}" in ctx.outputs
            for i in ctx.output(f"{CREATED}{k}").get("created", [])
        ]
        earlier: dict[str, str] = {}
        for k in range(1, n):
            earlier |= ctx.output(f"{CHECKED}{k}").get("unhealthy", {})
        role = p["role"]
        addresses = [
            ep.name
            for ep in ctx.config.entry_points
            if role in ep.roles and ctx.provider.address_capacity(ctx.stack, ep.name) != 1
        ]
        members = {a: ctx.provider.get_members(ctx.stack, a) for a in addresses}
        everyone = list(dict.fromkeys([*fresh, *(m for ms in members.values() for m in ms)]))
        found = servers_by_id(ctx, everyone) if everyone else {}

        # The meltdown stop: the run's new servers, checked again.
        last = next(
            (o for k in range(n - 1, 0, -1) if "health_at" in (o := ctx.output(f"{CHECKED}{k}"))),
            {},
        )
        app = bool(fresh) and (
            not last
            or last.get("session") != ctx.session
            or ctx.clock() - float(last["health_at"]) >= HEALTH_RECHECK
        )
        failing = {**earlier, **unhealthy(ctx, fresh, found, app=app)} if fresh else {}
        share = _pct(len(failing), len(fresh))
        limit = int(p["max_unhealthy"])
        if failing:
            shown = "; ".join(f"{i}: {why}" for i, why in sorted(failing.items()))
            if share > limit:
                ctx.log.error(events.STOP_FIRED, condition="max_unhealthy", unhealthy=failing)
                raise VerificationFailed(
                    f"meltdown stop before batch {n}: {len(failing)} of {len(fresh)} new "
                    f"servers ({share:.0f}%) failed verification, above --max-unhealthy "
                    f"{limit}%: stopped before creating more ({shown}). The {n - 1} "
                    "batch(es) already replaced stay as they are; find out why the new "
                    "servers fail before rotating again"
                )
            ctx.log.warning(
                events.STOP_UNHEALTHY, unhealthy=failing, share=round(share), limit=limit
            )

        # min-healthy: the count RemoveMembers guards, before anything of the batch begins.
        replacing = list(p.get("replacing", []))
        total = int(p["total"])
        need = max(math.ceil(int(p["min_healthy"]) * total / 100), 1)
        serving: dict[str, int] = {}
        for address, current in members.items():
            running = serving_members(ctx, address, current, found)
            serving[address] = len(running)
            left = len(running) - len(set(running) & set(replacing)) + int(p["count"])
            if left < need:
                ctx.log.error(events.STOP_FIRED, condition="min_healthy", address=address)
                down = [m for m in current if m not in running]
                raise PreconditionFailed(
                    f"stopped before batch {n}: {address} has {len(running)} serving "
                    f"server(s) of {total}"
                    + (f" ({some(down)} not serving)" if down else "")
                    + f", and replacing {some(replacing)} would leave {left}, below "
                    f"--min-healthy {p['min_healthy']}% ({need}). Nothing of batch {n} was "
                    "begun. Bring the stack back to health first (`rotate --only-if-needed` "
                    "replaces failing servers), or lower --min-healthy"
                )
        return StepResult(
            {
                "batch": n,
                "new_servers": len(fresh),
                "unhealthy": failing,
                "unhealthy_pct": round(share, 1),
                "serving": serving,
                **({"health_at": ctx.clock(), "session": ctx.session} if app else {}),
            }
        )
