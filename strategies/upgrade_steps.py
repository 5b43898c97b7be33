"""The steps of `changeover upgrade`: in-place upgrades, one batch of servers at a time.

For each batch, in order::

    DrainForUpgrade  out of every entry point of its role (keeping min-healthy serving),
                     then wait until its requests in flight have finished
    UpgradePackages  apt/dnf upgrade on the drained servers. Irreversible: packages stay
                     upgraded; its point of no return is the first upgrade call
    RebootServers    when reboot-required says so (`auto`), `always` or `never`; waits
                     until each server is back
    VerifyUpgraded   the health gate of a fresh server, facts journaled
    ReturnServers    back behind every entry point of the role (guarded: verified and
                     running), then checked through each entry point

A role that no entry point names (every role of a static stack) has nothing to drain
or return: DrainForUpgrade only checks that min-healthy of the role's servers stay
running, ReturnServers only that the batch passed its gate, and both are no-ops that
say so; changeover routes no traffic to such servers, so they are upgraded (and
rebooted) where they run.

What rollback means: before a batch's first upgrade call, rollback puts its drained
servers back (they are unchanged and were serving). From that call on the batch only
goes forward (RebootServers, VerifyUpgraded and ReturnServers are forward-only): an
upgraded server serves again only once it passed the gate (I1), so a failure leaves it
drained with the rest serving, and the run dirty (exit 3) for `changeover resume` once
the cause is fixed; `rollback` refuses. Batches already returned stay upgraded.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from orchestrator import hooks
from orchestrator.errors import GuardRefused, TransientError
from orchestrator.plan import RetryPolicy, RunContext, Step, StepResult
from orchestrator.waits import some
from strategies.drain import TIMED_OUT, drain
from strategies.steps import (
    ADDRESS_RETRY,
    POLL_CAP,
    PROBES_PER_MEMBER,
    VerifyServers,
    _guard_verified,
    _health_path,
    _serving,
    servers_by_id,
)

# How long one batch's package upgrade may take, across retries (apt on a slow mirror).
UPGRADE_DEADLINE = 900.0
UPGRADE_NO_RETURN = (
    "packages of drained servers are being upgraded; they serve again only once rebooted "
    "and verified"
)
REBOOT_MODES = ("auto", "never", "always")


def min_serving(pct: int, total: int, *, routed: bool) -> int:
    """How many of a role's `total` servers must stay in service: min-healthy percent,
    rounded up. Behind an entry point at least one (draining the last one empties it);
    a role nothing routes to may go down to none when `--min-healthy 0` says so."""
    need = math.ceil(pct * total / 100)
    return max(need, 1) if routed else need


def _role(ctx: RunContext, params: dict[str, Any]) -> str:
    return str(params.get("role") or ctx.config.serving_roles[0])


def _unrouted(role: str) -> str:
    return f"no entry point serves role {role!r} (changeover routes no traffic to it)"


def _behind(ctx: RunContext, role: str, ids: list[str]) -> dict[str, list[str]]:
    """Of these servers, those some entry point of the role routes to, by entry point."""
    out: dict[str, list[str]] = {}
    for address in _serving(ctx, role):
        if found := sorted(set(ctx.provider.get_members(ctx.stack, address)) & set(ids)):
            out[address] = found
    return out


class _BatchStep(Step):
    """A step of one upgrade batch: says which servers are left drained when it stops."""

    no_return = UPGRADE_NO_RETURN

    def stopped_advice(self, run_id: str, stack: str) -> str | None:
        ids = ", ".join(self.params.get("ids", []))
        return (
            f"Server(s) {ids} are left drained (out of every entry point); the rest serve. "
            f"`changeover status {run_id}` shows them; fix the cause, then "
            f"`changeover resume {run_id}` goes on with the same servers. To replace them "
            f"instead, `changeover rebuild {stack}` builds a fresh generation once this run "
            "has ended"
        )


class DrainForUpgrade(_BatchStep):
    """Take a batch out of every entry point of its role, keeping at least min-healthy
    percent of the role's serving count serving, then wait for its requests in flight."""

    name = "DrainForUpgrade"
    retry = ADDRESS_RETRY

    def do(self, ctx: RunContext) -> StepResult:
        ids = list(self.params["ids"])
        role = _role(ctx, self.params)
        if not _serving(ctx, role):
            self._check_running(ctx, role, ids)
            # Nothing routes to them here, but whatever does (your own load balancer)
            # may take them out in a pre_drain hook.
            ran = hooks.run_hooks(ctx, "pre_drain", ids)
            return StepResult(
                {"removed": {}, "drained": [], **hooks.outputs(ctx)},
                noop=None if ran else f"nothing to drain: {_unrouted(role)}",
            )
        removed: dict[str, list[str]] = {}
        for address in _serving(ctx, role):
            current = ctx.provider.get_members(ctx.stack, address)
            if not set(ids) & set(current):
                continue
            remaining = [m for m in current if m not in ids]
            found = servers_by_id(ctx, remaining)
            healthy = sum(1 for m in remaining if m in found and found[m].state == "running")
            total, pct = self.params["total"], self.params["min_healthy"]
            if healthy < max(math.ceil(pct * total / 100), 1):
                raise GuardRefused(
                    f"draining {', '.join(ids)} from {address} would leave {healthy} healthy "
                    f"of {total}, below min-healthy {pct}%"
                )
            ctx.provider.set_members(ctx.stack, address, remaining)
            removed[address] = sorted(set(ids) & set(current))
        ran = hooks.run_hooks(ctx, "pre_drain", ids)
        # A resumed step may have been killed mid-drain: it drains again.
        cut = drain(ctx, ids, on_timeout=ctx.config.defaults.on_drain_timeout)
        out = {"drained": ids, **hooks.outputs(ctx), **({TIMED_OUT: cut} if cut else {})}
        if not removed:
            return StepResult(
                {"removed": {}, **out}, noop=None if ran else "already out of every entry point"
            )
        return StepResult({"removed": removed, **out})

    def _check_running(self, ctx: RunContext, role: str, ids: list[str]) -> None:
        """A role nothing routes to: at least min-healthy percent of its servers must
        stay running while the batch upgrades (the plan checked it; the world may have
        changed since)."""
        others = [
            s
            for s in ctx.provider.list_servers(ctx.stack)
            if s.role == role and s.id not in ids and s.state == "running"
        ]
        total, pct = self.params["total"], self.params["min_healthy"]
        if len(others) < min_serving(pct, total, routed=False):
            raise GuardRefused(
                f"upgrading {', '.join(ids)} would leave {len(others)} {role} server(s) "
                f"running of {total}, below min-healthy {pct}%"
            )

    def undo(self, ctx: RunContext) -> StepResult:
        """Put the batch back: undone only before its upgrade began, so the servers are
        as they were when they served."""
        ids = list(self.params["ids"])
        found = servers_by_id(ctx, ids)
        running = [i for i in ids if i in found and found[i].state == "running"]
        added: dict[str, list[str]] = {}
        for address in _serving(ctx, _role(ctx, self.params)):
            current = ctx.provider.get_members(ctx.stack, address)
            if back := [i for i in running if i not in current]:
                ctx.provider.set_members(ctx.stack, address, current + back)
                added[address] = back
        if not added:
            return StepResult(noop="nothing to put back")
        return StepResult({"added": added})


class UpgradePackages(_BatchStep):
    """Upgrade the packages of a drained batch. Irreversible: packages stay upgraded.

    Refuses while an entry point still routes to one of them. Each call is idempotent (a
    second upgrade finds nothing newer), so a resumed step simply calls again; it records
    the boot each server was in, which RebootServers compares against."""

    name = "UpgradePackages"
    irreversible = True
    retry = RetryPolicy(attempts=10, deadline=UPGRADE_DEADLINE, backoff_max=POLL_CAP)

    def do(self, ctx: RunContext) -> StepResult:
        ids = list(self.params["ids"])
        if serving := _behind(ctx, _role(ctx, self.params), ids):
            raise GuardRefused(f"will not upgrade servers that still serve: {serving}")
        servers: dict[str, Any] = {}
        for server_id in ids:
            servers[server_id] = ctx.provider.upgrade_packages(
                ctx.stack,
                server_id,
                security_only=bool(self.params["security_only"]),
                dist_upgrade=bool(self.params["dist_upgrade"]),
            )
        boot_ids = {i: str(r.get("boot_id")) for i, r in servers.items()}
        out = {"servers": servers, "boot_ids": boot_ids}
        if not any(r.get("upgraded") for r in servers.values()):
            return StepResult(out, noop="nothing to upgrade")
        return StepResult(out)


class RebootServers(_BatchStep):
    """Reboot the upgraded batch as `reboot` says (auto: when reboot-required is set),
    then wait until each server is back. Idempotent: a server whose boot changed since
    its upgrade has rebooted already."""

    name = "RebootServers"
    forward_only = True

    def policy(self) -> RetryPolicy:
        timeout = float(self.params.get("timeout", 120.0))
        return RetryPolicy(
            attempts=100_000, deadline=timeout, backoff_initial=0.05, backoff_max=POLL_CAP
        )

    def do(self, ctx: RunContext) -> StepResult:
        ids = list(self.params["ids"])
        what = f"reboot of {len(ids)} server(s): {some(ids)}"
        with ctx.waiting(what, deadline=self.policy().deadline):
            return self._reboot(ctx, ids)

    def _reboot(self, ctx: RunContext, ids: list[str]) -> StepResult:
        mode = self.params["reboot"]
        upgraded_in = ctx.output(self.params["upgrade_from"]).get("boot_ids", {})
        rebooted: list[str] = []
        kept: dict[str, str] = {}
        waiting: list[str] = []
        for server_id in ids:
            state = ctx.provider.boot_state(ctx.stack, server_id)  # TransientError while down
            if state["boot_id"] != upgraded_in.get(server_id):
                rebooted.append(server_id)
            elif mode == "always" or (mode == "auto" and state["reboot_required"]):
                ctx.provider.reboot_server(ctx.stack, server_id)
                waiting.append(server_id)
            else:
                kept[server_id] = (
                    "--reboot never" if mode == "never" else "no reboot required"
                ) + (
                    f" (required by {', '.join(state['reboot_required_pkgs'])})"
                    if state["reboot_required"]
                    else ""
                )
        if waiting:
            raise TransientError(f"{len(waiting)} of {len(ids)} servers rebooting")
        out = {"rebooted": rebooted, "not_rebooted": kept}
        return StepResult(out, noop=None if rebooted else "no reboot needed")


class VerifyUpgraded(_BatchStep, VerifyServers):
    """The health gate of a fresh server, on the upgraded batch. With `security_only`,
    pending upgrades that are not security upgrades are allowed: they were not asked
    for."""

    name = "VerifyUpgraded"
    forward_only = True

    def do(self, ctx: RunContext) -> StepResult:
        hygiene = ctx.config.hygiene
        if self.params.get("security_only") and hygiene.pending == "none":
            hygiene = hygiene.model_copy(update={"pending": "security"})
            ctx = replace(ctx, config=ctx.config.model_copy(update={"hygiene": hygiene}))
        return VerifyServers.do(self, ctx)


class ReturnServers(_BatchStep):
    """Put the verified batch back behind every entry point of its role (guarded: it
    passed VerifyUpgraded and is running), then check through each entry point that
    every returned server answers."""

    name = "ReturnServers"
    forward_only = True
    retry = ADDRESS_RETRY

    def do(self, ctx: RunContext) -> StepResult:
        ids = list(self.params["ids"])
        role = _role(ctx, self.params)
        if not _serving(ctx, role):
            _guard_verified(ctx, ids, self.params["verified_from"])  # it passed its gate
            return StepResult(
                {"added": {}, "answered_by": {}, "verified": ids},
                noop=f"nothing to return to: {_unrouted(role)}",
            )
        added: dict[str, list[str]] = {}
        answered: dict[str, list[str]] = {}
        guarded = False
        for address in _serving(ctx, role):
            current = ctx.provider.get_members(ctx.stack, address)
            if back := [i for i in ids if i not in current]:
                if not guarded:  # I1, checked again on every attempt that adds
                    _guard_verified(ctx, ids, self.params["verified_from"])
                    guarded = True
                current = current + back
                ctx.provider.set_members(ctx.stack, address, current)
                added[address] = back
            answered[address] = self._probe(ctx, address, ids, len(current))
        out = {"added": added, "answered_by": answered}
        return StepResult(out, noop=None if added else "already behind every entry point")

    def _probe(self, ctx: RunContext, address: str, ids: list[str], members: int) -> list[str]:
        """Through the address (round-robin), until every returned server has answered."""
        path = _health_path(ctx, address)
        seen: set[str] = set()
        for _ in range(max(4, PROBES_PER_MEMBER * members)):
            status, backend = ctx.provider.probe_address(ctx.stack, address, path)
            if status != 200:
                raise TransientError(f"through {address}: HTTP {status} ({backend})")
            seen.add(str(backend))
            if set(ids) <= seen:
                return sorted(seen & set(ids))
        missing = sorted(set(ids) - seen)
        raise TransientError(f"through {address}: no answer yet from {', '.join(missing)}")
