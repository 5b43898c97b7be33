"""`upgrade`: upgrade the serving servers in place, one batch at a time.

The seed's second option: "Update the packages yourself through sudo apt-get -y upgrade
or dist-upgrade". Each batch is drained out of every entry point, upgraded, rebooted when
reboot-required says so, verified with the health gate of a fresh server, and put back
(strategies/upgrade_steps.py says what rollback means). Never two batches out at once:
a batch's steps all come before the next batch's.

Only servers behind an entry point are upgraded: the data role serves no entry point, so
it cannot be drained; `summary.not_upgraded` lists it with that reason.
"""

from __future__ import annotations

import math

from orchestrator.errors import BadInput, PreconditionFailed
from orchestrator.plan import Plan, Step
from orchestrator.settings import StackConfig
from providers.base import Provider
from strategies.base import inspect_stack
from strategies.upgrade_steps import (
    REBOOT_MODES,
    DrainForUpgrade,
    RebootServers,
    ReturnServers,
    UpgradePackages,
    VerifyUpgraded,
)

DEFAULT_BATCH = 1  # servers upgraded at a time: the fewest out of service


def check_upgrades(provider: Provider, name: str) -> None:
    """A provider that cannot upgrade in place (aws, libcloud for now) says so here, at
    plan time (CapabilityError, exit 2), before any server is drained."""
    check = getattr(provider, "ex_check_upgrades", None)
    if callable(check):
        check(name)


def plan_upgrade(
    provider: Provider,
    name: str,
    config: StackConfig,
    *,
    batch: int | None = None,
    security_only: bool = False,
    dist_upgrade: bool = False,
    reboot: str = "auto",
    min_healthy: int | None = None,
) -> Plan:
    """Compose the upgrade plan from read calls only (I8): the batches of each serving
    role, in order. Refuses (exit 2, nothing touched) when a batch cannot leave without
    going below min-healthy, or when an entry point holds only one server."""
    if reboot not in REBOOT_MODES:
        raise BadInput(f"--reboot {reboot!r}: expected one of {', '.join(REBOOT_MODES)}")
    size = batch or DEFAULT_BATCH
    if size < 1:
        raise BadInput(f"--batch {size}: expected 1 or more")
    check_upgrades(provider, name)
    view = inspect_stack(provider, name, config)
    pct = config.defaults.min_healthy if min_healthy is None else min_healthy
    steps: list[Step] = []
    batches: list[list[str]] = []
    for role in config.serving_roles:
        eps = [ep.name for ep in config.entry_points if role in ep.roles]
        if single := [e for e in eps if provider.address_capacity(name, e) == 1]:
            raise PreconditionFailed(
                f"entry point {', '.join(single)} of role {role!r} holds one server, so "
                "draining it takes the role out of service; replace the servers instead: "
                f"`changeover rotate {name}`"
            )
        members = {m for e in eps for m in view.entry_members.get(e, [])}
        serving = [s.id for s in view.role(role) if s.id in members]
        need = max(math.ceil(pct * len(serving) / 100), 1)
        if len(serving) - min(size, len(serving)) < need:
            allowed = 100 * (len(serving) - min(size, len(serving))) // max(len(serving), 1)
            hint = (
                f"pass --min-healthy {allowed}" + (" or a smaller --batch" if size > 1 else "")
                if allowed > 0
                else f"replace them instead (surge first): `changeover rotate {name}`"
            )
            raise PreconditionFailed(
                f"upgrading {min(size, len(serving))} of the {len(serving)} serving {role} "
                f"server(s) at a time would leave {len(serving) - min(size, len(serving))} "
                f"serving, below min-healthy {pct}% ({need}); {hint}"
            )
        for start in range(0, len(serving), size):
            ids = serving[start : start + size]
            n = len(batches) + 1
            batches.append(ids)
            upgrade = f"UpgradePackages#{n}"
            verify = f"VerifyUpgraded#{n}"
            timeout = config.defaults.boot_timeout
            steps += [
                DrainForUpgrade(
                    key=f"DrainForUpgrade#{n}",
                    ids=ids,
                    role=role,
                    min_healthy=pct,
                    total=len(serving),
                ),
                UpgradePackages(
                    key=upgrade,
                    ids=ids,
                    role=role,
                    security_only=security_only,
                    dist_upgrade=dist_upgrade,
                ),
                RebootServers(
                    key=f"RebootServers#{n}",
                    ids=ids,
                    reboot=reboot,
                    upgrade_from=upgrade,
                    timeout=timeout,
                ),
                VerifyUpgraded(key=verify, ids=ids, security_only=security_only, timeout=timeout),
                ReturnServers(key=f"ReturnServers#{n}", ids=ids, role=role, verified_from=verify),
            ]
    serving_roles = set(config.serving_roles)
    not_upgraded = {
        s.id: f"role {s.role!r} is behind no entry point, so it cannot be drained"
        for s in view.servers
        if s.role not in serving_roles
    }
    return Plan(
        strategy="upgrade",
        stack=name,
        steps=steps,
        params={
            "batch": size,
            "security_only": security_only,
            "dist_upgrade": dist_upgrade,
            "reboot": reboot,
            "min_healthy": pct,
        },
        summary={
            "generation_before": view.generation,
            "generation_after": view.generation,
            "members_before": sorted(view.members),
            "entry_points_before": view.entry_members,
            "batches": batches,
            "not_upgraded": not_upgraded,
        },
    )
