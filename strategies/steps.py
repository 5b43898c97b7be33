"""The shared VerbObject steps that strategies compose into plans.

Each step does one job, checks real state first (so a resumed step repeats nothing),
and reads earlier steps' outputs by key. Steps never sleep or retry on their own: they
raise TransientError and the engine retries them under their policy.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from orchestrator import events
from orchestrator.errors import (
    GuardRefused,
    ResourceGone,
    StepFailed,
    TransientError,
    VerificationFailed,
)
from orchestrator.models import TAG_TOKEN, Server
from orchestrator.plan import NO_RETRY, RetryPolicy, RunContext, Step, StepResult

# Address changes wait for the cloud (an ELB marks targets healthy after its checks pass,
# typically 30 s to a few minutes), so they retry patiently rather than fail the run.
# Polls back off exponentially up to POLL_CAP: a cap bounds both the overshoot past the
# moment a wait is over (fleet time) and the number of describe calls (API economy).
POLL_CAP = 3.0
DRAIN_POLL_MIN, DRAIN_POLL_MAX = 0.05, POLL_CAP  # seconds between in-flight reads while draining
ADDRESS_RETRY = RetryPolicy(
    attempts=1_000, deadline=600.0, backoff_initial=0.25, backoff_max=POLL_CAP
)
# Probes through the address per server behind it, when verifying a cutover.
PROBES_PER_MEMBER = 3


def ids_from(ctx: RunContext, params: dict[str, Any], field: str = "sources") -> list[str]:
    """Server ids given literally (`ids`) or created by earlier steps (`sources`)."""
    ids: list[str] = list(params.get("ids", []))
    for key in params.get(field, []):
        ids += ctx.output(key).get("created", [])
    return ids


def servers_by_id(ctx: RunContext, ids: list[str]) -> dict[str, Server]:
    return {s.id: s for s in ctx.provider.describe_servers(ctx.stack, ids)}


class CreateServers(Step):
    """Create `count` servers of a role in the new generation (idempotent by key)."""

    name = "CreateServers"
    retry = RetryPolicy(attempts=6, deadline=60.0)

    def _token(self, ctx: RunContext) -> str:
        # Only [a-z0-9.-]: cloud tag filters treat other characters as patterns.
        return f"{ctx.run_id}.{hashlib.sha256(self.key.encode()).hexdigest()[:12]}"

    def _db(self, ctx: RunContext) -> dict[str, str]:
        if self.params.get("db"):
            return {"db": self.params["db"]}
        if self.params.get("db_from"):
            return {"db": ctx.output(self.params["db_from"])["created"][0]}
        return {}

    def do(self, ctx: RunContext) -> StepResult:
        p = self.params
        role_cfg = ctx.config.roles[p["role"]]
        servers = ctx.provider.create_servers(
            stack=ctx.stack,
            role=p["role"],
            generation=p["generation"],
            run_id=ctx.run_id,
            count=p["count"],
            image=role_cfg.image,
            size=role_cfg.size,
            idempotency_key=self._token(ctx),
            links=self._db(ctx),
        )
        return StepResult({"created": [s.id for s in servers]})

    def undo(self, ctx: RunContext) -> StepResult:
        token = self._token(ctx)
        mine = [
            s.id for s in ctx.provider.list_servers(ctx.stack) if s.tags.get(TAG_TOKEN) == token
        ]
        mine += [i for i in ctx.output(self.key).get("created", []) if i not in mine]
        if not mine:
            return StepResult(noop="no servers of this step exist")
        members = set(ctx.provider.get_members(ctx.stack, ctx.config.address))
        if serving := members & set(mine):
            raise GuardRefused(f"will not destroy servers the address still routes to: {serving}")
        destroyed = ctx.provider.destroy_servers(ctx.stack, mine)
        return StepResult({"destroyed": destroyed})


class WaitRunning(Step):
    """Wait until every new server is running (one batched describe per poll)."""

    name = "WaitRunning"

    def policy(self) -> RetryPolicy:
        timeout = float(self.params.get("timeout", 120.0))
        return RetryPolicy(
            attempts=100_000, deadline=timeout, backoff_initial=0.05, backoff_max=POLL_CAP
        )

    def do(self, ctx: RunContext) -> StepResult:
        ids = ids_from(ctx, self.params)
        found = servers_by_id(ctx, ids)
        dead = [i for i in ids if i in found and found[i].state in ("stopped", "terminated")]
        if dead:
            raise StepFailed(f"servers died while booting: {', '.join(dead)}")
        # Not found yet is eventual consistency right after a launch: keep polling.
        pending = [i for i in ids if i not in found or found[i].state != "running"]
        if pending:
            raise TransientError(f"{len(pending)} of {len(ids)} servers still booting")
        return StepResult({"running": ids})


class VerifyServers(Step):
    """The health gate: running, app health check, host hygiene. Records the facts.

    A check that is not settled yet (EC2 status `initializing`) raises TransientError
    and is retried until `timeout`; a check that failed fails the gate at once."""

    name = "VerifyServers"

    def policy(self) -> RetryPolicy:
        timeout = float(self.params.get("timeout", 120.0))
        return RetryPolicy(
            attempts=10_000, deadline=timeout, backoff_initial=0.2, backoff_max=POLL_CAP
        )

    def do(self, ctx: RunContext) -> StepResult:
        ids = ids_from(ctx, self.params)
        found = servers_by_id(ctx, ids)
        failed = [f"{i}: gone" for i in ids if i not in found]
        checks = {name: role.health for name, role in ctx.config.roles.items()}
        batch = [found[i] for i in ids if i in found]
        reports = {}
        for report in ctx.provider.verify_servers(batch, checks, ctx.config.hygiene):
            reports[report.server_id] = report.to_dict()
            if not report.passed:
                failed.append(f"{report.server_id}: {'; '.join(report.reasons)}")
        if failed:
            ctx.log.error(events.VERIFY_FAILED, failures=failed)
            raise VerificationFailed("verification failed: " + " | ".join(failed))
        return StepResult({"passed": ids, "reports": reports})


class CopyData(Step):
    """Copy the data to the new data server while the old one still takes writes."""

    name = "CopyData"

    def do(self, ctx: RunContext) -> StepResult:
        dst = ctx.output(self.params["dst_from"])["created"][0]
        out = ctx.provider.data_copy_live(ctx.stack, self.params["src"], dst)
        return StepResult({**out, "dst": dst})


class FreezeWrites(Step):
    """Hold new writes on the old data server; returns once none is in flight."""

    name = "FreezeWrites"

    def do(self, ctx: RunContext) -> StepResult:
        src = self.params["src"]
        mode = ctx.provider.data_mode(ctx.stack, src).get("mode")
        if mode != "normal":
            return StepResult({"mode": mode}, noop=f"writes already {mode}")
        ctx.provider.data_freeze(ctx.stack, src)
        return StepResult({"mode": "frozen"})

    def undo(self, ctx: RunContext) -> StepResult:
        src = self.params["src"]
        if ctx.provider.data_mode(ctx.stack, src).get("mode") != "frozen":
            return StepResult(noop="writes are not frozen")
        ctx.provider.data_unfreeze(ctx.stack, src)
        return StepResult({"mode": "normal"})


class SyncData(Step):
    """Final sync under the freeze, checked by row count and checksum (I3)."""

    name = "SyncData"

    def do(self, ctx: RunContext) -> StepResult:
        src = self.params["src"]
        dst = ctx.output(self.params["dst_from"])["created"][0]
        if ctx.provider.data_mode(ctx.stack, src).get("mode") != "frozen":
            raise GuardRefused(
                "refusing the final sync: writes on the old data server are not frozen"
            )
        summary = ctx.provider.data_final_sync(ctx.stack, src, dst)
        ctx.log.info(events.DATA_SYNCED, rows=summary.count, checksum=summary.checksum[:16])
        return StepResult({"rows": summary.count, "checksum": summary.checksum})


class SwitchWrites(Step):
    """Send writes that reach the old data server on to the new one (and release held ones)."""

    name = "SwitchWrites"

    def do(self, ctx: RunContext) -> StepResult:
        src = self.params["src"]
        dst = ctx.output(self.params["dst_from"])["created"][0]
        if ctx.provider.data_mode(ctx.stack, src).get("mode") == "switched":
            return StepResult({"switched_to": dst}, noop="writes already switched")
        ctx.provider.data_switch(ctx.stack, src, dst)
        return StepResult({"switched_to": dst})

    def undo(self, ctx: RunContext) -> StepResult:
        """Copy back what the new side acknowledged, then write locally again."""
        src = self.params["src"]
        dst = ctx.output(self.params["dst_from"])["created"][0]
        if ctx.provider.data_mode(ctx.stack, src).get("mode") == "normal":
            return StepResult(noop="writes already local")
        return StepResult(ctx.provider.data_switch_back(ctx.stack, src, dst))


def _refuse(ctx: RunContext, reason: str) -> GuardRefused:
    ctx.log.warning(events.CUTOVER_REFUSED, reason=reason)
    return GuardRefused(f"cutover refused: {reason}")


def _guard_verified(ctx: RunContext, targets: list[str], verified_from: str) -> None:
    """I1: only servers whose latest verification passed, and still running, may serve."""
    passed = set(ctx.output(verified_from).get("passed", []))
    if missing := [t for t in targets if t not in passed]:
        raise _refuse(ctx, f"not verified: {', '.join(missing)}")
    found = servers_by_id(ctx, targets)
    if down := [t for t in targets if t not in found or found[t].state != "running"]:
        raise _refuse(ctx, f"not running: {', '.join(down)}")


def _fit(ctx: RunContext, targets: list[str]) -> list[str]:
    """An elastic IP holds one server; a load balancer or proxy holds them all."""
    capacity = ctx.provider.address_capacity(ctx.stack, ctx.config.address)
    return targets if capacity is None else targets[:capacity]


class RepointAddress(Step):
    """Cutover: make the new, verified servers the address's members. Guarded."""

    name = "RepointAddress"
    retry = ADDRESS_RETRY

    def do(self, ctx: RunContext) -> StepResult:
        targets = _fit(ctx, ids_from(ctx, self.params))
        address = ctx.config.address
        current = ctx.provider.get_members(ctx.stack, address)
        if sorted(current) == sorted(targets):
            ctx.log.info(events.CUTOVER_SKIPPED, reason="address already points at the new servers")
            return StepResult(
                {"members": targets}, noop="address already points at the new servers"
            )
        _guard_verified(ctx, targets, self.params["verified_from"])
        ctx.provider.set_members(ctx.stack, address, targets)
        ctx.log.info(events.CUTOVER_DONE, address=address, members=targets)
        return StepResult({"members": targets, "previous": current})

    def undo(self, ctx: RunContext) -> StepResult:
        """Point the address back, then wait until the new servers have finished the
        requests already sent to them: only then may the data move back (I3)."""
        previous: list[str] = self.params["previous"]
        address = ctx.config.address
        current = ctx.provider.get_members(ctx.stack, address)
        new = ctx.output(self.key).get("members") or _fit(ctx, ids_from(ctx, self.params))
        leaving = sorted({*current, *new} - set(previous))
        if sorted(current) == sorted(previous):
            _drain(ctx, leaving)  # a resumed rollback may have been killed mid-drain
            return StepResult(noop="address already points at the old servers")
        found = servers_by_id(ctx, previous)
        if gone := [
            f"{i} ({found[i].state if i in found else 'gone'})"
            for i in previous
            if i not in found or found[i].state in ("stopped", "terminated")
        ]:
            # No cloud brings these back: fail now rather than retry for minutes.
            raise ResourceGone(f"cannot point the address back at {', '.join(gone)}")
        ctx.provider.set_members(ctx.stack, address, previous)
        _drain(ctx, leaving)
        return StepResult({"members": previous, "drained": leaving})


class VerifyAddress(Step):
    """Check through the address itself that the new servers answer."""

    name = "VerifyAddress"
    retry = RetryPolicy(attempts=5, deadline=20.0)

    def do(self, ctx: RunContext) -> StepResult:
        expect = set(_fit(ctx, ids_from(ctx, self.params)))
        path = ctx.config.roles[self.params["role"]].health.path
        seen: set[str] = set()
        for _ in range(max(4, PROBES_PER_MEMBER * len(expect))):
            status, backend = ctx.provider.probe_address(ctx.stack, ctx.config.address, path)
            if status != 200:
                raise TransientError(f"through the address: HTTP {status} ({backend})")
            if backend not in expect:
                raise VerificationFailed(f"address answered from {backend}, not a new server")
            seen.add(backend)
        return StepResult({"answered_by": sorted(seen)})


class Bake(Step):
    """Keep checking through the address for `seconds`; a failure rolls back."""

    name = "Bake"
    retry = NO_RETRY

    def do(self, ctx: RunContext) -> StepResult:
        seconds = float(self.params["seconds"])
        if seconds <= 0:
            return StepResult(noop="bake time is 0")
        expect = _fit(ctx, ids_from(ctx, self.params))
        path = ctx.config.roles[self.params["role"]].health.path
        interval = min(1.0, max(seconds / 5, 0.1))
        end = ctx.clock() + seconds
        checks = 0
        while True:
            checks += 1
            status, backend = ctx.provider.probe_address(ctx.stack, ctx.config.address, path)
            found = servers_by_id(ctx, expect)
            down = [i for i in expect if i not in found or found[i].state != "running"]
            ctx.log.debug(events.BAKE_CHECK, status=status, backend=backend, down=down)
            if status != 200 or backend not in expect or down:
                ctx.log.error(events.BAKE_FAILED, status=status, backend=backend, down=down)
                raise VerificationFailed(
                    f"bake failed after {checks} checks: HTTP {status} from {backend}"
                    + (f"; servers down: {', '.join(down)}" if down else "")
                )
            if ctx.clock() >= end:
                return StepResult({"checks": checks})
            ctx.wait(min(interval, max(end - ctx.clock(), 0)))


class RemoveMembers(Step):
    """Take servers out of the address, keeping at least min-healthy percent serving."""

    name = "RemoveMembers"
    retry = ADDRESS_RETRY

    def do(self, ctx: RunContext) -> StepResult:
        ids = set(ids_from(ctx, self.params))
        address = ctx.config.address
        current = ctx.provider.get_members(ctx.stack, address)
        if not ids & set(current):
            return StepResult({"removed": []}, noop="servers already out of the address")
        remaining = [m for m in current if m not in ids]
        found = servers_by_id(ctx, remaining)
        healthy = sum(1 for m in remaining if m in found and found[m].state == "running")
        need = math.ceil(self.params["min_healthy"] * self.params["total"] / 100)
        if healthy < max(need, 1):
            raise GuardRefused(
                f"removing {len(ids)} would leave {healthy} healthy of {self.params['total']}, "
                f"below min-healthy {self.params['min_healthy']}%"
            )
        ctx.provider.set_members(ctx.stack, address, remaining)
        return StepResult({"removed": sorted(ids & set(current)), "members": remaining})

    def undo(self, ctx: RunContext) -> StepResult:
        ids = ids_from(ctx, self.params)
        address = ctx.config.address
        current = ctx.provider.get_members(ctx.stack, address)
        found = servers_by_id(ctx, ids)
        back = [i for i in ids if i not in current and i in found and found[i].state == "running"]
        if not back:
            return StepResult(noop="nothing to put back")
        ctx.provider.set_members(ctx.stack, address, current + back)
        return StepResult({"added": back})


class AddMembers(Step):
    """Put new, verified servers behind the address next to the old ones. Guarded.

    An address that holds one server (an elastic IP) cannot hold both: there, adding
    is an atomic swap to the new server, and undo swaps back to the old one."""

    name = "AddMembers"
    retry = ADDRESS_RETRY

    def do(self, ctx: RunContext) -> StepResult:
        ids = ids_from(ctx, self.params)
        address = ctx.config.address
        current = ctx.provider.get_members(ctx.stack, address)
        new = [i for i in ids if i not in current]
        if new:
            _guard_verified(ctx, new, self.params["verified_from"])
        capacity = ctx.provider.address_capacity(ctx.stack, address)
        members = (current + new)[-capacity:] if capacity else current + new
        # Even with nothing new, set again: it is idempotent, and a load balancer's
        # set_members is also where a retried step waits for its targets to be healthy.
        ctx.provider.set_members(ctx.stack, address, members)
        if not new:
            return StepResult({"added": []}, noop="servers already behind the address")
        return StepResult({"added": new, "previous": current})

    def undo(self, ctx: RunContext) -> StepResult:
        ids = set(ids_from(ctx, self.params))
        address = ctx.config.address
        current = ctx.provider.get_members(ctx.stack, address)
        if not ids & set(current):
            return StepResult(noop="servers already out of the address")
        remaining = [m for m in current if m not in ids]
        if not remaining:
            # A one-server address: point it back at what it held before.
            remaining = ctx.output(self.key).get("previous", [])
            if not remaining:
                raise GuardRefused("cannot empty the address and nothing to point it back to")
        ctx.provider.set_members(ctx.stack, address, remaining)
        _drain(ctx, sorted(ids))
        return StepResult({"removed": sorted(ids)})


def _drain(ctx: RunContext, ids: list[str]) -> None:
    timeout = ctx.config.defaults.drain_timeout
    end = ctx.clock() + timeout
    interval = DRAIN_POLL_MIN
    while True:
        inflight = ctx.provider.inflight(ctx.stack, ctx.config.address)
        busy = {i: n for i in ids if (n := inflight.get(i, 0)) > 0}
        if not busy:
            return
        if ctx.clock() >= end:
            raise StepFailed(f"servers did not drain within {timeout:.0f}s: {busy}")
        ctx.log.debug(events.DRAIN_WAIT, busy=busy)
        # Local requests drain in milliseconds, an ELB in minutes: poll fast, then less.
        ctx.wait(min(interval, max(end - ctx.clock(), 0.0)))
        interval = min(interval * 2, DRAIN_POLL_MAX)


class DrainServers(Step):
    """Wait until requests in flight to servers that left the address have finished."""

    name = "DrainServers"

    def do(self, ctx: RunContext) -> StepResult:
        ids = ids_from(ctx, self.params)
        members = set(ctx.provider.get_members(ctx.stack, ctx.config.address))
        if serving := members & set(ids):
            raise GuardRefused(f"cannot drain servers still behind the address: {serving}")
        _drain(ctx, ids)
        return StepResult({"drained": ids})


class DestroyServers(Step):
    """Destroy servers that no longer serve. Irreversible: rollback stops here (I2)."""

    name = "DestroyServers"
    irreversible = True

    def do(self, ctx: RunContext) -> StepResult:
        ids = ids_from(ctx, self.params)
        members = set(ctx.provider.get_members(ctx.stack, ctx.config.address))
        if serving := members & set(ids):
            raise GuardRefused(f"will not destroy servers the address still routes to: {serving}")
        for server_id in self.params.get("data_ids", []):
            mode = ctx.provider.data_mode(ctx.stack, server_id)
            if int(mode.get("inflight", 0)) > 0:
                raise TransientError(f"data server {server_id} still has writes in flight")
        destroyed = ctx.provider.destroy_servers(ctx.stack, ids)
        if not destroyed:
            return StepResult({"destroyed": []}, noop="servers already destroyed")
        return StepResult({"destroyed": destroyed})


class RetireServers(Step):
    """After `retain` seconds, drain and destroy the old generation. Irreversible."""

    name = "RetireServers"
    irreversible = True
    retry = RetryPolicy(attempts=20, deadline=60.0)

    def do(self, ctx: RunContext) -> StepResult:
        ids = ids_from(ctx, self.params)
        alive = [
            s.id for s in ctx.provider.describe_servers(ctx.stack, ids) if s.state != "terminated"
        ]
        if not alive:
            return StepResult({"destroyed": []}, noop="old generation already gone")
        members = set(ctx.provider.get_members(ctx.stack, ctx.config.address))
        if serving := members & set(ids):
            raise GuardRefused(f"will not retire servers the address still routes to: {serving}")
        ctx.wait(float(self.params.get("retain", 0)))
        _drain(ctx, alive)
        destroy = DestroyServers(key=self.key, ids=alive, data_ids=self.params.get("data_ids", []))
        return destroy.do(ctx)
