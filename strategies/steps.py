"""The shared VerbObject steps that strategies compose into plans.

Each step does one job, checks real state first (so a resumed step repeats nothing),
and reads earlier steps' outputs by key. Steps never sleep or retry on their own: they
raise TransientError and the engine retries them under their policy.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from typing import Any

from orchestrator import events, hooks
from orchestrator.errors import (
    GuardRefused,
    ResourceGone,
    StepFailed,
    TransientError,
    VerificationFailed,
)
from orchestrator.models import TAG_TOKEN, Server
from orchestrator.plan import NO_RETRY, RetryPolicy, RunContext, Step, StepResult
from orchestrator.waits import some
from strategies.drain import TIMED_OUT, drain_poll
from strategies.drain import drain as _drain
from strategies.watch import watch_through

# Address changes wait for the cloud (an ELB marks targets healthy after its checks pass,
# typically 30 s to a few minutes), so they retry patiently rather than fail the run.
# Polls back off exponentially up to POLL_CAP: a cap bounds both the overshoot past the
# moment a wait is over (fleet time) and the number of describe calls (API economy).
POLL_CAP = 3.0
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
            fresh=ctx.first_attempt,
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
        guard_destroy(ctx, mine)
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
        deadline = self.policy().deadline
        with ctx.waiting(f"boot of {len(ids)} server(s): {some(ids)}", deadline=deadline):
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
    and is retried until `timeout`; a check that failed fails the gate at once.

    Before any SSH connection the provider pins the servers' host keys (from their
    console: providers/hostkeys.py), or a known_hosts file must list them; they are
    never trusted on first use. The pins go to the journal with the facts
    (`host_keys`), and pins already journaled (`ctx.outputs`, of this step or an earlier
    one) are handed back to the provider, so a run resumed in a new process checks the
    same keys without reading the console again. A console that shows no keys yet is
    transient, polled until `timeout`."""

    name = "VerifyServers"

    def policy(self) -> RetryPolicy:
        timeout = float(self.params.get("timeout", 120.0))
        return RetryPolicy(
            attempts=10_000, deadline=timeout, backoff_initial=0.2, backoff_max=POLL_CAP
        )

    def _journaled_pins(self, ctx: RunContext) -> dict[str, list[str]]:
        """Host keys earlier outputs recorded, by server id: this step's own first."""
        known: dict[str, list[str]] = {}
        outputs = [ctx.output(self.key), *(o for k, o in ctx.outputs.items() if k != self.key)]
        for out in outputs:
            pins = out.get("host_keys") if isinstance(out, dict) else None
            for server_id, keys in (pins if isinstance(pins, dict) else {}).items():
                if isinstance(keys, list) and keys:
                    known.setdefault(str(server_id), [str(k) for k in keys])
        return known

    def do(self, ctx: RunContext) -> StepResult:
        ids = ids_from(ctx, self.params)
        what = f"health gate on {len(ids)} server(s): {some(ids)}"
        with ctx.waiting(what, deadline=self.policy().deadline):
            return self._gate(ctx, ids)

    def _gate(self, ctx: RunContext, ids: list[str]) -> StepResult:
        found = servers_by_id(ctx, ids)
        failed = [f"{i}: gone" for i in ids if i not in found]
        checks = {name: role.health for name, role in ctx.config.roles.items()}
        batch = [found[i] for i in ids if i in found]
        running = [s for s in batch if s.state == "running"]
        host_keys = ctx.provider.pin_host_keys(ctx.stack, running, self._journaled_pins(ctx))
        reports = {}
        for report in ctx.provider.verify_servers(batch, checks, ctx.config.hygiene):
            reports[report.server_id] = report.to_dict()
            if not report.passed:
                failed.append(f"{report.server_id}: {'; '.join(report.reasons)}")
        if failed:
            ctx.log.error(events.VERIFY_FAILED, failures=failed)
            raise VerificationFailed("verification failed: " + " | ".join(failed))
        return StepResult({"passed": ids, "reports": reports, "host_keys": host_keys})


class CopyData(Step):
    """Copy the data to the new data server while the old one still takes writes."""

    name = "CopyData"

    def do(self, ctx: RunContext) -> StepResult:
        dst = ctx.output(self.params["dst_from"])["created"][0]
        src = self.params["src"]
        # On a cloud this is a snapshot, polled until it completes.
        with ctx.waiting(f"live copy of the data {src} -> {dst}"):
            out = ctx.provider.data_copy_live(ctx.stack, src, dst)
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
        what = f"final sync of the data {src} -> {dst} (writes held)"
        with ctx.waiting(what):
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


def _union(groups: Iterable[list[str]]) -> list[str]:
    return list(dict.fromkeys(i for g in groups for i in g))


def _fit(ctx: RunContext, address: str, targets: list[str]) -> list[str]:
    """An elastic IP holds one server; a load balancer or proxy holds them all."""
    capacity = ctx.provider.address_capacity(ctx.stack, address)
    return targets if capacity is None else targets[:capacity]


def _serving(ctx: RunContext, role: str) -> list[str]:
    """The entry points that serve a role."""
    return [ep.name for ep in ctx.config.entry_points if role in ep.roles]


def entry_targets(ctx: RunContext, params: dict[str, Any]) -> dict[str, list[str]]:
    """For each entry point, the new servers it routes to after cutover: the servers
    created for the roles it serves (`roles_from`: role -> CreateServers step), as many
    as it holds."""
    by_role = {r: ctx.output(key).get("created", []) for r, key in params["roles_from"].items()}
    out: dict[str, list[str]] = {}
    for ep in ctx.config.entry_points:
        if ids := [i for r in ep.roles for i in by_role.get(r, [])]:
            out[ep.name] = _fit(ctx, ep.name, ids)
    return out


class RepointAddress(Step):
    """Cutover: make the new, verified servers the members of every entry point. Guarded.

    Entry points move one after the other, in the config's order; a retry or a resume
    skips those already moved, and undo points each one back at what it held."""

    name = "RepointAddress"
    retry = ADDRESS_RETRY

    def do(self, ctx: RunContext) -> StepResult:
        targets = entry_targets(ctx, self.params)
        before: dict[str, list[str]] = {}
        moved: list[str] = []
        for address, want in targets.items():
            current = ctx.provider.get_members(ctx.stack, address)
            before[address] = current
            if sorted(current) == sorted(want):
                continue
            if not moved:  # I1, checked again on every attempt that moves something
                _guard_verified(ctx, _union(targets.values()), self.params["verified_from"])
            ctx.provider.set_members(ctx.stack, address, want)
            ctx.log.info(events.CUTOVER_DONE, address=address, members=want)
            moved.append(address)
        # Each new server serves now: its post_cutover hook (once, also on a resume).
        ran = hooks.run_hooks(ctx, "post_cutover", _union(targets.values()))
        if not moved:
            reason = "every entry point already routes to the new servers"
            ctx.log.info(events.CUTOVER_SKIPPED, reason=reason)
            return StepResult(
                {"members": targets, **hooks.outputs(ctx)}, noop=None if ran else reason
            )
        out = {"members": targets, "previous": before, "moved": moved}
        return StepResult({**out, **hooks.outputs(ctx)})

    def undo(self, ctx: RunContext) -> StepResult:
        """Point every entry point back, then wait until the servers leaving them have
        finished the requests already sent to them: only then may the data move back
        (I3)."""
        previous: dict[str, list[str]] = self.params["previous"]
        new: dict[str, list[str]] = ctx.output(self.key).get("members") or entry_targets(
            ctx, self.params
        )
        current = {a: ctx.provider.get_members(ctx.stack, a) for a in previous}
        leaving = sorted(
            set(_union([*current.values(), *new.values()])) - set(_union(previous.values()))
        )
        back = {a: p for a, p in previous.items() if sorted(current[a]) != sorted(p)}
        if not back:
            _drain(ctx, leaving)  # a resumed rollback may have been killed mid-drain
            return StepResult(noop="every entry point already routes to the old servers")
        wanted = _union(back.values())
        found = servers_by_id(ctx, wanted)
        if gone := [
            f"{i} ({found[i].state if i in found else 'gone'})"
            for i in wanted
            if i not in found or found[i].state in ("stopped", "terminated")
        ]:
            # No cloud brings these back: fail now rather than retry for minutes.
            raise ResourceGone(f"cannot point the address back at {', '.join(gone)}")
        for address, members in back.items():
            ctx.provider.set_members(ctx.stack, address, members)
        _drain(ctx, leaving)
        return StepResult({"members": back, "drained": leaving})


def _health_path(ctx: RunContext, address: str) -> str:
    return ctx.config.roles[ctx.config.entry_point(address).roles[0]].health.path


class VerifyAddress(Step):
    """Check through each entry point itself that the new servers answer."""

    name = "VerifyAddress"
    retry = RetryPolicy(attempts=5, deadline=20.0)

    def do(self, ctx: RunContext) -> StepResult:
        answered: dict[str, list[str]] = {}
        for address, targets in entry_targets(ctx, self.params).items():
            expect = set(targets)
            path = _health_path(ctx, address)
            seen: set[str] = set()
            for _ in range(max(4, PROBES_PER_MEMBER * len(expect))):
                status, backend = ctx.provider.probe_address(ctx.stack, address, path)
                if status != 200:
                    raise TransientError(f"through {address}: HTTP {status} ({backend})")
                if backend not in expect:
                    raise VerificationFailed(f"{address} answered from {backend}, not a new server")
                seen.add(backend)
            answered[address] = sorted(seen)
        return StepResult({"answered_by": answered})


class Bake(Step):
    """Keep checking through every entry point for `seconds`, and the stack's alarm
    gates (orchestrator/gates.py) every few seconds; a failure rolls back."""

    name = "Bake"
    retry = NO_RETRY

    def do(self, ctx: RunContext) -> StepResult:
        seconds = float(self.params["seconds"])
        if seconds <= 0:
            return StepResult(noop="bake time is 0")
        targets = entry_targets(ctx, self.params)
        expect = _union(targets.values())

        def probe(checks: int) -> None:
            found = servers_by_id(ctx, expect)
            down = [i for i in expect if i not in found or found[i].state != "running"]
            for address, members in targets.items():
                path = _health_path(ctx, address)
                status, backend = ctx.provider.probe_address(ctx.stack, address, path)
                ctx.log.debug(events.BAKE_CHECK, status=status, backend=backend, down=down)
                if status != 200 or backend not in members or down:
                    ctx.log.error(events.BAKE_FAILED, status=status, backend=backend, down=down)
                    raise VerificationFailed(
                        f"bake failed after {checks} checks: HTTP {status} from {backend} "
                        f"through {address}"
                        + (f"; servers down: {', '.join(down)}" if down else "")
                    )

        what = f"bake through {', '.join(targets)}"
        return StepResult(watch_through(ctx, what=what, label="bake", seconds=seconds, probe=probe))


class RemoveMembers(Step):
    """Take servers out of every entry point of their role, keeping at least min-healthy
    percent serving in each. An entry point that holds one server was moved off them
    when their replacements were added (AddMembers)."""

    name = "RemoveMembers"
    retry = ADDRESS_RETRY

    def _addresses(self, ctx: RunContext) -> list[str]:
        role = self.params.get("role") or ctx.config.serving_roles[0]
        return [a for a in _serving(ctx, role) if ctx.provider.address_capacity(ctx.stack, a) != 1]

    def do(self, ctx: RunContext) -> StepResult:
        ids = set(ids_from(ctx, self.params))
        removed: dict[str, list[str]] = {}
        for address in self._addresses(ctx):
            current = ctx.provider.get_members(ctx.stack, address)
            if not ids & set(current):
                continue
            remaining = [m for m in current if m not in ids]
            healthy = len(serving_members(ctx, address, remaining))
            need = math.ceil(self.params["min_healthy"] * self.params["total"] / 100)
            if healthy < max(need, 1):
                raise GuardRefused(
                    f"removing {len(ids)} from {address} would leave {healthy} healthy of "
                    f"{self.params['total']}, below min-healthy {self.params['min_healthy']}%"
                )
            if callable(remove := getattr(ctx.provider, "ex_remove_members", None)):
                remove(ctx.stack, address, sorted(ids & set(current)))
            else:
                ctx.provider.set_members(ctx.stack, address, remaining)
            removed[address] = sorted(ids & set(current))
        if not removed:
            return StepResult({"removed": {}}, noop="servers already out of every entry point")
        return StepResult({"removed": removed})

    def undo(self, ctx: RunContext) -> StepResult:
        ids = ids_from(ctx, self.params)
        found = servers_by_id(ctx, ids)
        running = [i for i in ids if i in found and found[i].state == "running"]
        added: dict[str, list[str]] = {}
        for address in self._addresses(ctx):
            current = ctx.provider.get_members(ctx.stack, address)
            if back := [i for i in running if i not in current]:
                if callable(add := getattr(ctx.provider, "ex_add_members", None)):
                    add(ctx.stack, address, back)
                else:
                    # A member that is not running any more (a new server that died)
                    # would make an entry point that refuses such members (the local
                    # cloud's proxy) refuse the whole set: it serves nothing, so it is
                    # left out (AddMembers' undo takes it out anyway).
                    alive = servers_by_id(ctx, current)
                    kept = [m for m in current if m in alive and alive[m].state == "running"]
                    ctx.provider.set_members(ctx.stack, address, kept + back)
                added[address] = back
        if not added:
            return StepResult(noop="nothing to put back")
        return StepResult({"added": added})


def serving_members(
    ctx: RunContext, address: str, members: list[str], found: dict[str, Server] | None = None
) -> list[str]:
    """The members that serve, as min-healthy counts them: those the entry point finds
    healthy where it checks health itself (a target group: a provider's
    `ex_healthy_members`, from the target health already read), else those running
    (`found`: the members as described already, if at hand)."""
    healthy_of = getattr(ctx.provider, "ex_healthy_members", None)
    listed = healthy_of(ctx.stack, address) if callable(healthy_of) else None
    if listed is not None:
        healthy = set(listed)
        return [m for m in members if m in healthy]
    if found is None:
        found = servers_by_id(ctx, members)
    return [m for m in members if m in found and found[m].state == "running"]


class AddMembers(Step):
    """Put new, verified servers behind every entry point of their role, next to the old
    ones. Guarded.

    An entry point that holds one server (an elastic IP) cannot hold both: there, adding
    is an atomic swap to a new server when it holds one being replaced (`replacing`),
    and undo swaps it back."""

    name = "AddMembers"
    retry = ADDRESS_RETRY

    def do(self, ctx: RunContext) -> StepResult:
        ids = ids_from(ctx, self.params)
        replacing = set(self.params.get("replacing", []))
        role = self.params.get("role") or ctx.config.serving_roles[0]
        added: dict[str, list[str]] = {}
        previous: dict[str, list[str]] = {}
        guarded = False
        for address in _serving(ctx, role):
            current = ctx.provider.get_members(ctx.stack, address)
            capacity = ctx.provider.address_capacity(ctx.stack, address)
            if capacity == 1:
                if set(current) & set(ids) or (current and current[0] not in replacing):
                    continue  # already on a new server, or on one this batch keeps
                members = ids[:1]
            else:
                # Even with nothing new, set again: it is idempotent, and a load
                # balancer's set_members is where a retried step waits for health.
                members = current + [i for i in ids if i not in current]
            if (new := [i for i in members if i not in current]) and not guarded:
                _guard_verified(ctx, ids, self.params["verified_from"])
                guarded = True
            add = getattr(ctx.provider, "ex_add_members", None)
            if capacity != 1 and callable(add):
                add(ctx.stack, address, ids)  # waits on these servers' health only
            else:
                ctx.provider.set_members(ctx.stack, address, members)
            previous[address] = current
            if new:
                added[address] = new
        # The new servers serve now: their post_cutover hook (once, also on a resume).
        ran = hooks.run_hooks(ctx, "post_cutover", ids)
        if not added:
            return StepResult(
                {"added": {}, **hooks.outputs(ctx)},
                noop=None if ran else "servers already behind every entry point",
            )
        return StepResult({"added": added, "previous": previous, **hooks.outputs(ctx)})

    def undo(self, ctx: RunContext) -> StepResult:
        ids = set(ids_from(ctx, self.params))
        role = self.params.get("role") or ctx.config.serving_roles[0]
        previous: dict[str, list[str]] = ctx.output(self.key).get("previous", {})
        replacing = self.params.get("replacing", [])
        removed: dict[str, list[str]] = {}
        for address in _serving(ctx, role):
            current = ctx.provider.get_members(ctx.stack, address)
            if not ids & set(current):
                continue
            remaining = [m for m in current if m not in ids]
            if not remaining:
                # A one-server address: point it back at what it held before.
                remaining = previous.get(address) or _running(ctx, replacing)[:1]
                if not remaining:
                    raise GuardRefused(
                        f"cannot empty {address} and no old server is left to point it back to"
                    )
            ctx.provider.set_members(ctx.stack, address, remaining)
            removed[address] = sorted(ids & set(current))
        if not removed:
            return StepResult(noop="servers already out of every entry point")
        _drain(ctx, sorted(ids))
        return StepResult({"removed": removed})


def _running(ctx: RunContext, ids: list[str]) -> list[str]:
    found = servers_by_id(ctx, ids)
    return [i for i in ids if i in found and found[i].state == "running"]


def guard_destroy(ctx: RunContext, ids: list[str]) -> None:
    """I2 from the cloud's own view, right before a destroy: no server that still receives
    traffic (an entry point of the stack, or any elastic IP in the account, even one the
    config does not know) is destroyed. One batched read per kind of entry point."""
    if serving := ctx.provider.routes_to(ctx.stack, ids):
        where = "; ".join(f"{i} through {', '.join(eps)}" for i, eps in sorted(serving.items()))
        ctx.log.error(events.DESTROY_REFUSED, serving=serving)
        raise GuardRefused(
            f"will not destroy servers that still serve: {where}. Move or release that "
            "entry point first"
        )


class DrainServers(Step):
    """Wait until requests in flight to servers that left the address have finished: a
    poll per attempt (strategies/drain.py `drain_poll`), which keeps the drain's timeout
    itself, so a lane waiting on its drain holds up no other lane."""

    name = "DrainServers"

    def policy(self) -> RetryPolicy:
        # drain_timeout (in the step's marks) ends the wait, not the policy.
        return RetryPolicy(
            attempts=10_000_000, deadline=10 * 86_400.0, backoff_initial=0.05, backoff_max=3.0
        )

    def do(self, ctx: RunContext) -> StepResult:
        ids = ids_from(ctx, self.params)
        role = self.params.get("role") or ctx.config.serving_roles[0]
        for address in _serving(ctx, role):
            if serving := set(ctx.provider.get_members(ctx.stack, address)) & set(ids):
                raise GuardRefused(f"cannot drain servers still behind {address}: {serving}")
        hooks.run_hooks(ctx, "pre_drain", ids)
        cut = drain_poll(ctx, ids, on_timeout=ctx.config.defaults.on_drain_timeout)
        out = {"drained": ids, **hooks.outputs(ctx)}
        return StepResult({**out, TIMED_OUT: cut} if cut else out)


class DestroyServers(Step):
    """Destroy servers that no longer serve. Irreversible: rollback stops here (I2)."""

    name = "DestroyServers"
    irreversible = True

    def do(self, ctx: RunContext) -> StepResult:
        ids = ids_from(ctx, self.params)
        for server_id in self.params.get("data_ids", []):
            mode = ctx.provider.data_mode(ctx.stack, server_id)
            if int(mode.get("inflight", 0)) > 0:
                raise TransientError(f"data server {server_id} still has writes in flight")
        alive = [s.id for s in servers_by_id(ctx, ids).values() if s.state != "terminated"]
        if not alive:
            gone = "servers already destroyed"
            return StepResult({"destroyed": [], **hooks.outputs(ctx)}, noop=gone)
        if not _crossed(ctx):
            # Before the first destroy call, so before the point of no return: a hook
            # that fails still rolls the run back with every old server in place.
            hooks.run_hooks(ctx, "pre_terminate", alive)
        guard_destroy(ctx, alive)
        destroyed = ctx.provider.destroy_servers(ctx.stack, alive)
        if not destroyed:
            gone = "servers already destroyed"
            return StepResult({"destroyed": [], **hooks.outputs(ctx)}, noop=gone)
        return StepResult({"destroyed": destroyed, **hooks.outputs(ctx)})


def _crossed(ctx: RunContext) -> bool:
    """Did an earlier attempt of this irreversible step cross its point of no return?
    Every hook of such a step ran (and passed) before it: none runs again."""
    return ctx.marks.get("point_of_no_return") is not None


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
        if (retain := float(self.params.get("retain", 0))) > 0:
            with ctx.waiting(f"retain of {some(alive)} before retiring", duration=retain):
                ctx.wait(retain)
        if not _crossed(ctx):  # past it, every server's hooks passed (before a destroy)
            hooks.run_hooks(ctx, "pre_drain", alive)
        cut = _drain(ctx, alive, on_timeout=ctx.config.defaults.on_drain_timeout)
        destroy = DestroyServers(key=self.key, ids=alive, data_ids=self.params.get("data_ids", []))
        result = destroy.do(ctx)
        if cut:
            result.outputs[TIMED_OUT] = cut
        return result
