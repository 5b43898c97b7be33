"""Canaries for `rotate`: the first batch serves, watched, before any other server moves.

With `--canary N` a rotate's first batch replaces N servers, and `WatchCanary#1` then
watches them serve for `--canary-watch` seconds, like BOSH's `canary_watch_time`:

- about once a second, a request through every entry point of the role must answer 200;
- on the first check, every few seconds and on the last: the canaries must be running
  and pass their app health check, and the stack's alarm gates (orchestrator/gates.py)
  must pass.

The watch comes after the canary batch's `DrainServers` and before its `DestroyServers`:
the servers the canaries replace are out of service but still exist. So a failed watch
rolls back like a failed bake: the canaries leave the entry points and are destroyed,
the old servers serve again, and the run ends rolled back (exit 1) before any other
server was touched. The reason names the canaries and what failed (a gate by its name).
"""

from __future__ import annotations

from orchestrator import events
from orchestrator.errors import GuardRefused, VerificationFailed
from orchestrator.models import Server
from orchestrator.plan import RetryPolicy, RunContext, Step, StepResult
from orchestrator.settings import HygienePolicy
from orchestrator.waits import some
from strategies.drain import drain
from strategies.steps import ids_from, servers_by_id
from strategies.watch import watch_through

# The canary's app health check only: host hygiene was the gate before it served, and on
# a cloud it costs a command per server (SSM); this policy asks the provider for none.
APP_HEALTH_ONLY = HygienePolicy(pending="ignore", reboot_required_fails=False)


def unhealthy(
    ctx: RunContext, ids: list[str], found: dict[str, Server] | None = None, *, app: bool = True
) -> dict[str, str]:
    """Of these servers, those that are gone, not running, or (with `app`) fail their
    role's app health check now: server id -> why. One batched describe (unless `found`
    has them already), then the health checks."""
    found = servers_by_id(ctx, ids) if found is None else found
    failing = {i: "gone" for i in ids if i not in found}
    failing |= {i: found[i].state for i in ids if i in found and found[i].state != "running"}
    running = [found[i] for i in ids if i in found and found[i].state == "running"]
    if running and app:
        checks = {name: role.health for name, role in ctx.config.roles.items()}
        for report in ctx.provider.verify_servers(running, checks, APP_HEALTH_ONLY):
            if not (report.running and report.app_ok):
                failing[report.server_id] = "; ".join(report.reasons) or "health check failed"
    return failing


class WatchCanary(Step):
    """Watch the canaries serve for `seconds`, through every entry point of their role,
    with the stack's alarm gates; a failure rolls the canary batch back and stops the run."""

    name = "WatchCanary"

    def policy(self) -> RetryPolicy:
        # A transient provider error restarts the watch (longer is safe, never shorter).
        seconds = float(self.params.get("seconds", 0.0))
        return RetryPolicy(attempts=3, deadline=3 * seconds + 60.0)

    def do(self, ctx: RunContext) -> StepResult:
        ids = ids_from(ctx, self.params)
        seconds = float(self.params["seconds"])
        if seconds <= 0:
            return StepResult({"canaries": ids}, noop="canary watch time is 0")
        role = self.params["role"]
        path = ctx.config.roles[role].health.path
        addresses = [ep.name for ep in ctx.config.entry_points if role in ep.roles]
        replacing = list(self.params.get("replacing", []))
        label = f"canary {some(ids)}"
        back = f"{some(replacing)} serves" if len(replacing) == 1 else "the old servers serve"
        then = f". The canary is rolled back: {back} again, and no other server was touched"
        start = ctx.clock()

        def failed(checks: int, what: str) -> VerificationFailed:
            ctx.log.error(events.CANARY_FAILED, canaries=ids, error=what)
            watched = ctx.clock() - start
            return VerificationFailed(
                f"{label} failed its watch after {checks} checks ({watched:.0f} s of "
                f"{seconds:.0f} s): {what}{then}"
            )

        def probe(checks: int) -> None:
            for address in addresses:
                status, backend = ctx.provider.probe_address(ctx.stack, address, path)
                ctx.log.debug(events.CANARY_CHECK, address=address, status=status, backend=backend)
                if status != 200:
                    raise failed(checks, f"HTTP {status} from {backend} through {address}")

        def deep(checks: int) -> None:
            if failing := unhealthy(ctx, ids):
                shown = "; ".join(f"{i}: {why}" for i, why in sorted(failing.items()))
                raise failed(checks, shown)

        what = f"canary watch of {some(ids)} through {', '.join(addresses) or 'no entry point'}"
        watched = watch_through(
            ctx,
            what=what,
            label=f"{label} watch",
            seconds=seconds,
            probe=probe,
            deep=deep,
            then=then,
        )
        return StepResult({"canaries": ids, "seconds": seconds, **watched})

    def undo(self, ctx: RunContext) -> StepResult:
        """Roll the canary batch's traffic back in one move per entry point: the canaries
        out, the servers they replaced back in. The watch itself changed nothing, but the
        canary may have died while watched, and an entry point refuses a member that is
        not running: undoing RemoveMembers (old back, next to the dead canary) then
        AddMembers would fail. Done here first, those undos find nothing left to do."""
        ids = ids_from(ctx, self.params)
        role = self.params["role"]
        replacing = list(self.params.get("replacing", []))
        found = servers_by_id(ctx, [*ids, *replacing])
        back = [i for i in replacing if i in found and found[i].state == "running"]
        moved: dict[str, list[str]] = {}
        for ep in ctx.config.entry_points:
            if role not in ep.roles:
                continue
            current = ctx.provider.get_members(ctx.stack, ep.name)
            if ctx.provider.address_capacity(ctx.stack, ep.name) == 1:
                want = back[:1] if set(current) & set(ids) and back else current
            else:
                kept = [m for m in current if m not in ids]
                want = kept + [i for i in back if i not in kept]
            if not want:
                raise GuardRefused(
                    f"cannot take the canaries out of {ep.name}: none of {some(replacing)} "
                    "it would be pointed back to is running"
                )
            if sorted(want) != sorted(current):
                ctx.provider.set_members(ctx.stack, ep.name, want)
                moved[ep.name] = want
        if not moved:
            return StepResult(noop="the canaries' entry points already route as before")
        drain(ctx, [i for i in ids if i in found and found[i].state == "running"])
        return StepResult({"members": moved})
