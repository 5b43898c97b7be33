"""`upgrade`: upgrade the serving servers in place, one batch at a time.

The seed's second option: "Update the packages yourself through sudo apt-get -y upgrade
or dist-upgrade". Each batch is drained out of every entry point, upgraded, rebooted when
reboot-required says so, verified with the health gate of a fresh server, and put back
(strategies/upgrade_steps.py says what rollback means). Never two batches out at once:
a batch's steps all come before the next batch's.

A role behind an entry point is upgraded as the entry points route to it: its servers
that some entry point holds, drained out of it. A serving role that no entry point names
(every role of a static stack) has nothing to drain: its running servers are taken in
batches all the same, min-healthy counts them, and the Drain/Return steps are no-ops
that say why, while VerifyUpgraded gates each server as usual. The data role is not
upgraded (`rebuild` replaces it); `summary.not_upgraded` lists it with the reason. A
server tagged changeover:do-not-disrupt is not upgraded either (strategies/opt_out.py):
`summary.skipped` lists it, and it counts toward min-healthy as it keeps serving.
"""

from __future__ import annotations

from orchestrator.errors import BadInput, PreconditionFailed
from orchestrator.plan import Plan, Step
from orchestrator.settings import StackConfig
from providers.base import Provider
from strategies.base import inspect_stack
from strategies.opt_out import opted_out
from strategies.upgrade_steps import (
    REBOOT_MODES,
    DrainForUpgrade,
    RebootServers,
    ReturnServers,
    UpgradePackages,
    VerifyUpgraded,
    min_serving,
)

DEFAULT_BATCH = 1  # servers upgraded at a time: the fewest out of service


def check_upgrades(provider: Provider, name: str) -> None:
    """A provider that cannot upgrade in place (aws, libcloud for now) says so here, at
    plan time (CapabilityError, exit 2), before any server is drained."""
    check = getattr(provider, "ex_check_upgrades", None)
    if callable(check):
        check(name)


def _check_min_healthy(
    name: str, role: str, serving: list[str], size: int, pct: int, *, routed: bool
) -> None:
    """Refuse (exit 2) a batch size that would leave fewer than min-healthy in service."""
    total, out = len(serving), min(size, len(serving))
    need = min_serving(pct, total, routed=routed)
    if total - out >= need:
        return
    word = "serving" if routed else "running"
    allowed = 100 * (total - out) // max(total, 1)
    if allowed > 0:
        hint = f"pass --min-healthy {allowed}" + (" or a smaller --batch" if size > 1 else "")
    elif routed:
        hint = f"replace them instead (surge first): `changeover rotate {name}`"
    else:  # nothing routes around these servers: only the operator can accept the gap
        them = "it" if total == 1 else "them"
        hint = (
            f"pass --min-healthy 0 to upgrade {them} anyway (out of service while upgrading "
            "and rebooting)" + (" or a smaller --batch" if out > 1 else "")
        )
    raise PreconditionFailed(
        f"upgrading {out} of the {total} {word} {role} server(s) at a time would leave "
        f"{total - out} {word}, below min-healthy {pct}% ({need}); {hint}"
    )


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
    role, in order (of the servers its entry points route to, or of its running servers
    when no entry point names it). Refuses (exit 2, nothing touched) when a batch cannot
    leave without going below min-healthy, or when an entry point holds only one server."""
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
    skipped: dict[str, str] = {}
    for role in config.serving_roles:
        eps = [ep.name for ep in config.entry_points if role in ep.roles]
        if single := [e for e in eps if provider.address_capacity(name, e) == 1]:
            raise PreconditionFailed(
                f"entry point {', '.join(single)} of role {role!r} holds one server, so "
                "draining it takes the role out of service; replace the servers instead: "
                f"`changeover rotate {name}`"
            )
        if eps:  # the servers its entry points route to
            members = {m for e in eps for m in view.entry_members.get(e, [])}
            serving = [s.id for s in view.role(role) if s.id in members]
        else:  # no entry point names it (a static stack): its running servers serve
            serving = [s.id for s in view.role(role) if s.state == "running"]
        # Opted out (tagged changeover:do-not-disrupt): never upgraded. They keep
        # serving, so they count toward min-healthy like every serving server.
        in_service = set(serving)
        opted = opted_out(s for s in view.role(role) if s.id in in_service)
        skipped.update(opted)
        eligible = [i for i in serving if i not in opted]
        if eligible:
            _check_min_healthy(name, role, serving, min(size, len(eligible)), pct, routed=bool(eps))
        for start in range(0, len(eligible), size):
            ids = eligible[start : start + size]
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
    routed = {r for ep in config.entry_points for r in ep.roles}
    not_upgraded = {
        s.id: f"role {s.role!r} is behind no entry point, so it cannot be drained"
        if s.role not in serving_roles
        else f"{s.state}, not running"
        for s in view.servers
        if s.role not in serving_roles or (s.role not in routed and s.state != "running")
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
            "skipped": skipped,
        },
    )
