"""`changeover audit STACK`: host hygiene, component versions and drift, per server.

For each server of the stack this runs the fact script over the stack's transport (the
local cloud's own, SSH, or the provider's, such as SSM), judges the facts with the
stack's `HygienePolicy` (orchestrator/hygiene.py, the same code the verify step uses),
compares component versions with what the last run recorded for that server (its
VerifyServers step in the journal), and recommends replace, patch, reboot or leave,
for each server and for the stack. The audit makes only read calls to the provider and
changes nothing on the servers; it appends what it read to the state database, so that
versions are recorded regularly, not only by runs, and keeps each server's latest facts,
which `plan rotate --only-if-needed` decides from (orchestrator/facts.py).

Exit codes: 0 when every server could be asked (whatever the findings); 2 when a server
refused us (an unknown or changed SSH host key, a rejected login): nothing ran there.
A missing key file or a transport the provider lacks is bad input: exit 2 at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import BadInput, CapabilityError, ChangeoverError, PreconditionFailed
from orchestrator.facts import ago, record_facts
from orchestrator.hygiene import (
    ACTIONS,
    Action,
    Drift,
    Facts,
    Recommendation,
    Verdict,
    below_minimum,
    evaluate,
    fact_script,
    find_drift,
    parse_facts,
    recommend,
    severity,
)
from orchestrator.log import get_logger
from orchestrator.models import Server
from orchestrator.security import SecurityStatus
from orchestrator.security import read_status as read_security
from orchestrator.settings import HygienePolicy, StackConfig
from orchestrator.state import StateStore, open_store
from orchestrator.state.base import VersionRecord

if TYPE_CHECKING:
    from providers.base import Provider
    from providers.transport import Transport

# Log event names.
AUDIT_DONE = "audit.done"
AUDIT_SERVER_FAILED = "audit.server_failed"

WORKERS = 16  # servers asked at once; a fact script is mostly waiting on the server
# Per-server tables shown on a terminal; beyond this the summary table (and --output
# json, which has every server) stands for the rest.
MAX_SERVER_TABLES = 50
# Journal runs scanned for a server's last recorded versions, newest first.
BASELINE_RUNS = 500


# --------------------------------------------------------------------------------------
# Transports and facts: shared with the providers' verify_server
# --------------------------------------------------------------------------------------


def select_transport(provider: Provider, policy: HygienePolicy) -> Transport:
    """The transport a stack's policy asks for. `auto`: the provider's own (its optional
    `ex_transport(policy)`, e.g. SSM on aws; the simulated one on the local cloud), else
    SSH. SSH host keys pinned by the provider (`ex_host_keys(server)`) win over
    known_hosts."""
    kind = policy.transport
    own: Callable[[HygienePolicy], Transport] | None = getattr(provider, "ex_transport", None)
    if kind in ("auto", "ssm") and callable(own):
        transport = own(policy)
        if kind == "auto" or transport.name == "ssm":
            return transport
    if kind == "ssh" and provider.name == "static" and callable(own):
        return own(policy)  # SSH to each listed host at its own port, as its own user
    if kind == "auto":
        kind = "local" if provider.name == "local" else "ssh"
    if kind == "local":
        if provider.name != "local":
            raise CapabilityError(provider.name, "the local transport", "use ssh or ssm")
        # Imported here: the orchestrator does not load a provider it is not using.
        from providers.local.transport import LocalTransport  # noqa: PLC0415

        return LocalTransport()
    if kind == "ssh":
        try:
            from providers.ssh import SshTransport  # noqa: PLC0415 (paramiko only when used)
        except ImportError as exc:
            raise BadInput(
                f"the ssh transport needs: pip install 'changeover[ssh]' ({exc})"
            ) from None
        return SshTransport(policy.ssh, host_keys=getattr(provider, "ex_host_keys", None))
    raise CapabilityError(provider.name, "the ssm transport", "ssm is offered by the aws provider")


def read_facts(
    transport: Transport, server: Server, policy: HygienePolicy, script: str | None = None
) -> Facts:
    """Run the fact script on the server (one round trip) and parse what it printed."""
    result = transport.run(server, script or fact_script(policy), timeout=policy.facts_timeout)
    facts = parse_facts(result.stdout)
    if "script" in facts.errors and not result.ok:
        detail = (result.stderr or result.stdout).strip().splitlines()
        facts.errors["script"] = (
            f"exit {result.exit_status}: {detail[0][:200] if detail else 'no output'}"
        )
    return facts


def check_hygiene(
    transport: Transport, server: Server, policy: HygienePolicy
) -> tuple[Facts, Verdict]:
    """The hygiene part of the health gate, for a provider's verify_server."""
    facts = read_facts(transport, server, policy)
    return facts, evaluate(facts, policy)


# --------------------------------------------------------------------------------------
# The record to measure drift against
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Baseline:
    """A server's component versions as a run's VerifyServers step recorded them."""

    components: dict[str, str]
    probed: list[str]
    recorded_at: float
    run_id: str


def load_baselines(store: StateStore, stack: str, server_ids: Iterable[str]) -> dict[str, Baseline]:
    """The newest run record of each server's components, read from the journal."""
    wanted = set(server_ids)
    found: dict[str, Baseline] = {}
    for run_id, ended_at, server_id, report in store.verified_reports(stack, BASELINE_RUNS):
        if not wanted - found.keys():
            break
        if server_id not in wanted or server_id in found:
            continue
        facts = report.get("facts") or {}
        if "components" not in facts:
            continue  # recorded before facts carried components
        found[server_id] = Baseline(
            components={str(k): str(v) for k, v in facts["components"].items()},
            probed=[str(p) for p in facts.get("probed", [])],
            recorded_at=ended_at,
            run_id=run_id,
        )
    return found


def record_versions(store: StateStore, stack: str, audits: list[ServerAudit], at: float) -> None:
    """Append what this audit read: versions recorded regularly, not only by runs."""
    rows = [
        VersionRecord(a.server.id, comp, version, at, "audit", None)
        for a in audits
        if a.facts is not None
        for comp, version in a.facts.components.items()
    ]
    if rows:
        store.record_versions(stack, rows)


# --------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------


@dataclass(slots=True)
class ServerAudit:
    """One server's audit: its facts, the policy's verdict, drift, a recommendation."""

    server: Server
    serving: bool
    age: float
    facts: Facts | None = None
    verdict: Verdict | None = None
    drift: list[Drift] = field(default_factory=list)
    baseline: Baseline | None = None
    recommendation: Recommendation = field(default_factory=lambda: Recommendation("leave", ""))
    error: str | None = None
    refused: bool = False
    security: SecurityStatus | None = None  # unattended security upgrades (real hosts)

    def to_dict(self, policy: HygienePolicy) -> dict[str, Any]:
        s = self.server
        f = self.facts
        return {
            "id": s.id,
            "role": s.role,
            "generation": s.generation,
            "state": s.state,
            "serving": self.serving,
            "launched_at": s.created_at,
            "age_seconds": round(self.age, 1),
            "uptime_seconds": f.uptime if f else None,
            "os": f.os if f else {},
            "kernel": f.kernel.to_dict() if f else None,
            "pending_count": len(f.actionable) if f and f.pending is not None else None,
            "security_count": len([p for p in f.actionable if p.security])
            if f and f.pending is not None
            else None,
            "reboot_required": f.reboot_required if f else None,
            "reboot_required_pkgs": f.reboot_required_pkgs if f else [],
            "held": f.held if f else [],
            "components": f.components if f else {},
            "below_minimum": below_minimum(f, policy) if f else [],
            "drift": [d.to_dict() for d in self.drift],
            "last_recorded": {"run_id": self.baseline.run_id, "at": self.baseline.recorded_at}
            if self.baseline
            else None,
            "hygiene": self.verdict.to_dict() if self.verdict else None,
            "recommendation": self.recommendation.to_dict(),
            "error": self.error,
            "refused": self.refused,
            "security": self.security.to_dict() if self.security else None,
            "facts": f.to_dict() if f else None,
        }


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


@dataclass(slots=True)
class AuditReport:
    """What `changeover audit` prints: per server and for the stack."""

    stack: str
    provider: str
    transport: str
    generated_at: float
    policy: HygienePolicy
    servers: list[ServerAudit]
    recommendation: Recommendation
    command: str | None
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 2 if any(a.refused for a in self.servers) else 0

    @property
    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = dict.fromkeys(ACTIONS, 0)
        for a in self.servers:
            counts[a.recommendation.action] += 1
        return counts

    def message(self) -> str:
        refused = [a for a in self.servers if a.refused]
        if refused:
            return f"{len(refused)} server(s) refused: {refused[0].error}"
        return f"{self.recommendation.action}: {self.recommendation.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "stack": self.stack,
            "provider": self.provider,
            "transport": self.transport,
            "simulated": self.transport == "local",
            "generated_at": self.generated_at,
            "seconds": round(self.seconds, 3),
            "policy": self.policy.model_dump(mode="json", exclude={"ssh"}),
            "recommendation": {**self.recommendation.to_dict(), "command": self.command},
            "counts": self.counts,
            "servers": [a.to_dict(self.policy) for a in self.servers],
            "exit_code": self.exit_code,
            "message": self.message(),
        }

    # --- text --------------------------------------------------------------------------
    def _facts_rows(self, a: ServerAudit) -> list[list[str]]:
        rows: list[list[str]] = [["state", a.server.state + (", serving" if a.serving else "")]]
        rows.append(["launched", f"{ago(a.age)} ago"])
        f = a.facts
        if a.error:
            rows.append(["error", a.error])
        if f is not None:
            rows.append(["uptime", ago(f.uptime)])
            rows.append(["os", f.os.get("pretty_name", "?")])
            k = f.kernel
            kernel = k.running or "?"
            if k.newest and k.newest != k.running:
                kernel += f" (newest installed {k.newest})"
            rows.append(["kernel", kernel])
            if f.pending is None:
                rows.append(["pending", "unknown"])
            else:
                sec = [p for p in f.actionable if p.security]
                rows.append(["pending", f"{len(f.actionable)} ({len(sec)} security)"])
                for p in f.actionable[:10]:
                    tags = [t for t, on in (("security", p.security), ("held", p.held)) if on]
                    rows.append(
                        [
                            f"  {p.name}",
                            f"{p.installed or '?'} -> {p.candidate}"
                            + (f" [{', '.join(tags)}]" if tags else ""),
                        ]
                    )
                if len(f.actionable) > 10:
                    rows.append(["  ...", f"{len(f.actionable) - 10} more"])
            if f.held:
                rows.append(["held", ", ".join(f.held)])
            reboot = (
                "unknown" if f.reboot_required is None else "yes" if f.reboot_required else "no"
            )
            if f.reboot_required_pkgs:
                reboot += f" ({', '.join(f.reboot_required_pkgs)})"
            rows.append(["reboot required", reboot])
            if (uu := a.security) is not None:
                rows.append(
                    [
                        "unattended upgrades",
                        "not installed"
                        if not uu.installed
                        else ("enabled" if uu.enabled else "disabled")
                        + (", security only" if uu.security_only else ", not security-only")
                        + (", reboots automatically" if uu.automatic_reboot else ""),
                    ]
                )
            drift = {d.component: d for d in a.drift}
            for comp in sorted(set(f.components) | set(drift)):
                value = f.components.get(comp, "absent")
                if comp in drift:
                    d = drift[comp]
                    value += (
                        f"  DRIFT: was {d.recorded or 'absent'} when run {d.run_id} "
                        f"recorded it at {_when(d.recorded_at)}"
                    )
                if comp in self.policy.min_versions:
                    value += f"  (minimum {self.policy.min_versions[comp]})"
                rows.append([comp, value])
            if a.baseline is None:
                rows.append(["last recorded", "never recorded by a run"])
            else:
                rows.append(
                    [
                        "last recorded",
                        f"run {a.baseline.run_id} at {_when(a.baseline.recorded_at)}",
                    ]
                )
        if a.verdict is not None:
            rows.append(["health gate", "passes" if a.verdict.ok else "; ".join(a.verdict.reasons)])
        rows.append(["recommendation", f"{a.recommendation.action}: {a.recommendation.reason}"])
        return rows

    def _title(self, a: ServerAudit) -> str:
        serving = ", serving" if a.serving else ""
        return f"{a.server.id} ({a.server.role}, gen {a.server.generation}{serving})"

    def _headline(self) -> str:
        simulated = " (simulated packages)" if self.transport == "local" else ""
        return (
            f"audit of stack {self.stack!r}: {len(self.servers)} server(s), provider "
            f"{self.provider}, transport {self.transport}{simulated}"
        )

    def text(self) -> str:
        lines = [self._headline()]
        rec = self.recommendation
        lines.append(f"stack recommendation: {rec.action}: {rec.reason}")
        if self.command:
            lines.append(f"  run: {self.command}")
        for a in self.servers:
            lines.append("")
            lines.append(self._title(a))
            lines += [f"  {k}: {v}" for k, v in self._facts_rows(a)]
        return "\n".join(lines) + "\n"

    def tables(self) -> list[tuple[str, list[str], list[list[Any]]]]:
        """A summary table, then a table per server (the first MAX_SERVER_TABLES)."""
        summary_rows = []
        for a in self.servers:
            f = a.facts
            pending = "?" if f is None or f.pending is None else str(len(f.actionable))
            sec = (
                "?"
                if f is None or f.pending is None
                else str(len([p for p in f.actionable if p.security]))
            )
            reboot = (
                "?"
                if f is None or f.reboot_required is None
                else ("yes" if f.reboot_required or f.kernel.reboot_needed else "no")
            )
            summary_rows.append(
                [
                    a.server.id,
                    a.server.role,
                    a.server.generation,
                    "yes" if a.serving else "",
                    ago(a.age),
                    ago(f.uptime) if f else "?",
                    pending,
                    sec,
                    reboot,
                    ", ".join(d.describe() for d in a.drift),
                    a.recommendation.action,
                    a.recommendation.reason,
                ]
            )
        rec = self.recommendation
        title = f"{self._headline()}\nstack: {rec.action}: {rec.reason}"
        if self.command:
            title += f"\nrun: {self.command}"
        tables: list[tuple[str, list[str], list[list[Any]]]] = [
            (
                title,
                [
                    "server",
                    "role",
                    "gen",
                    "serving",
                    "age",
                    "uptime",
                    "pending",
                    "security",
                    "reboot",
                    "drift",
                    "action",
                    "reason",
                ],
                summary_rows,
            )
        ]
        shown = sorted(self.servers, key=lambda a: severity(a.recommendation.action))
        for a in shown[:MAX_SERVER_TABLES]:
            tables.append((self._title(a), ["fact", "value"], self._facts_rows(a)))
        if len(shown) > MAX_SERVER_TABLES:
            more = len(shown) - MAX_SERVER_TABLES
            tables.append(
                (f"{more} more server(s): see --output json", ["note"], [["summarised above"]])
            )
        return tables


# --------------------------------------------------------------------------------------
# The audit
# --------------------------------------------------------------------------------------


def stack_recommendation(
    stack: str, config: StackConfig, audits: list[ServerAudit]
) -> tuple[Recommendation, str | None]:
    """The stack's recommendation is its worst server's, with the lightest command that
    does it: rotate when only serving servers fail the gate, else rebuild; upgrade for
    patch and reboot."""
    if not audits:
        return Recommendation("leave", "the stack has no servers"), None
    worst: Action = min((a.recommendation.action for a in audits), key=severity)
    picked = [a for a in audits if a.recommendation.action == worst]
    first = picked[0]
    more = f" (and {len(picked) - 1} more)" if len(picked) > 1 else ""
    reason = (
        f"{len(picked)} of {len(audits)} server(s) to {worst}: "
        f"{first.server.id}: {first.recommendation.reason}{more}"
    )
    if worst == "leave":
        return Recommendation("leave", f"all {len(audits)} server(s) are up to date"), None
    if worst == "replace" and config.provider == "static":
        # Servers nobody can create are not replaced: upgrading in place is what is left.
        only = " --security-only" if config.hygiene.pending == "security" else ""
        lowest = _in_place_min_healthy(config, audits)
        why = flag = ""
        if lowest is not None:
            why = (
                f" (min-healthy {config.defaults.min_healthy}% keeps every host in service: "
                f"--min-healthy {lowest} lets one out at a time)"
            )
            flag = f" --min-healthy {lowest}"
        return Recommendation(
            "patch",
            f"{reason}; a static stack's servers cannot be replaced, so upgrade them{why}",
        ), f"changeover upgrade {stack}{only}{flag}"
    if worst != "replace" and not upgrades_in_place(config):
        # aws and libcloud servers are not upgraded in place (`upgrade` refuses them):
        # a fresh server is upgraded at boot, so replacing is how they are patched.
        worst_reason = f"{reason}; {config.provider} servers are patched by replacing them"
        return Recommendation(worst, worst_reason), _replace_command(
            stack, config, picked, all_serving=True
        )
    if worst == "replace":
        return Recommendation("replace", reason), _replace_command(stack, config, picked)
    if any(a.server.role not in config.serving_roles for a in picked):
        # `upgrade` leaves the data role alone (it cannot be drained): a rebuild replaces it.
        return Recommendation(
            worst, f"{reason}; the data role is not upgraded in place, so rebuild"
        ), f"changeover rebuild {stack}"
    if _in_place_min_healthy(config, audits) is not None and config.provider != "static":
        # Upgrading in place would take servers out below min-healthy (`upgrade` refuses):
        # a surge-first rotate brings fresh, fully upgraded servers and keeps all serving.
        return Recommendation(
            worst,
            f"{reason}; upgrading in place would leave fewer than min-healthy "
            f"{config.defaults.min_healthy}% serving, so replace them surge-first",
        ), _replace_command(stack, config, picked, all_serving=True)
    return Recommendation(worst, reason), f"changeover upgrade {stack}"


def _in_place_min_healthy(config: StackConfig, audits: list[ServerAudit]) -> int | None:
    """None when `upgrade` (one server at a time) keeps min-healthy in service; else the
    highest `--min-healthy` that lets one server out."""
    # Imported here: the local provider imports this module, so `changeover stacks` would
    # load the upgrade strategy (and all it imports) at start-up for nothing.
    from strategies.upgrade_steps import min_serving  # noqa: PLC0415

    pct = config.defaults.min_healthy
    routed_roles = {r for ep in config.entry_points for r in ep.roles}
    lowest: int | None = None
    for role in config.serving_roles:
        routed = role in routed_roles
        in_service = [
            a
            for a in audits
            if a.server.role == role and (a.serving if routed else a.server.state == "running")
        ]
        total = len(in_service)
        if total and total - 1 < min_serving(pct, total, routed=routed):
            allowed = 100 * (total - 1) // total
            lowest = allowed if lowest is None else min(lowest, allowed)
    return lowest


def upgrades_in_place(config: StackConfig) -> bool:
    """Does `changeover upgrade` work on this stack's provider (local, static)?"""
    return config.provider in ("local", "static")


def _replace_command(
    stack: str, config: StackConfig, picked: list[ServerAudit], *, all_serving: bool = False
) -> str:
    """rotate --only-if-needed when only serving servers failing the gate need it, else
    (`all_serving`) a rotate of every serving server when only serving servers need it,
    else rebuild (the data role is replaced only by a rebuild)."""
    serving_roles = set(config.serving_roles)
    serving_only = all(a.server.role in serving_roles for a in picked)
    # rotate --only-if-needed selects exactly the serving servers failing the gate.
    if serving_only and all(a.verdict is not None and not a.verdict.ok for a in picked):
        return f"changeover rotate {stack} --only-if-needed"
    if serving_only and all_serving:
        return f"changeover rotate {stack}"
    return f"changeover rebuild {stack}"


def audit_stack(
    provider: Provider,
    stack: str,
    config: StackConfig,
    *,
    state_dir: Path | None = None,
    store: StateStore | None = None,
    transport: Transport | None = None,
    now: float | None = None,
    workers: int = WORKERS,
    record: bool = True,
) -> AuditReport:
    """Audit every server of the stack. Read-only towards the provider and the servers.
    What it read is recorded in `store` (or the sqlite store in `state_dir`)."""
    log = get_logger(stack_name=stack)  # "stack" is structlog's stack-trace key
    started = time.monotonic()
    now = time.time() if now is None else now
    policy = config.hygiene
    servers = provider.list_servers(stack)
    members: set[str] = set()
    for ep in config.entry_points:
        try:
            members |= set(provider.get_members(stack, ep.name))
        except ChangeoverError as exc:
            log.warning(AUDIT_SERVER_FAILED, address=ep.name, error=str(exc))
    transport = transport or select_transport(provider, policy)
    script = fact_script(policy)
    own = store is None
    store = store or open_store(None, state_dir)
    try:
        baselines = load_baselines(store, stack, [s.id for s in servers])

        def audit_one(server: Server) -> ServerAudit:
            a = ServerAudit(
                server=server,
                serving=server.id in members,
                age=max(0.0, now - server.created_at),
                baseline=baselines.get(server.id),
            )
            if server.state == "running":
                try:
                    a.facts = read_facts(transport, server, policy, script)
                except BadInput:
                    raise  # a config problem: the same for every server, so stop
                except PreconditionFailed as exc:
                    a.error, a.refused = str(exc), True
                except ChangeoverError as exc:
                    a.error = str(exc)
                if a.facts is not None and transport.name == "ssh":
                    # A second read, only where real packages are: the local cloud's are
                    # simulated, and SSM would add a command per server.
                    try:
                        a.security = read_security(transport, server)
                    except ChangeoverError as exc:
                        log.warning(AUDIT_SERVER_FAILED, server=server.id, error=str(exc))
                if a.error:
                    log.warning(AUDIT_SERVER_FAILED, server=server.id, error=a.error)
            if a.facts is not None:
                a.verdict = evaluate(a.facts, policy)
                if a.baseline is not None:
                    a.drift = find_drift(
                        a.baseline.components,
                        a.baseline.probed,
                        a.facts,
                        recorded_at=a.baseline.recorded_at,
                        run_id=a.baseline.run_id,
                    )
            a.recommendation = recommend(
                state=server.state,
                facts=a.facts,
                policy=policy,
                drift=a.drift,
                age=a.age,
                error=a.error,
            )
            return a

        if workers > 1 and len(servers) > 1:
            with ThreadPoolExecutor(max_workers=min(workers, len(servers))) as pool:
                audits = list(pool.map(audit_one, servers))
        else:
            audits = [audit_one(s) for s in servers]
        if record:
            record_versions(store, stack, audits, now)
            # What `plan rotate --only-if-needed` decides from, as it may not ask (I8).
            record_facts(
                store,
                stack,
                {a.server.id: a.facts for a in audits if a.facts is not None},
                now,
                existing=[s.id for s in servers],
            )
    finally:
        if own:
            store.close()
    recommendation, command = stack_recommendation(stack, config, audits)
    report = AuditReport(
        stack=stack,
        provider=provider.name,
        transport=transport.name,
        generated_at=now,
        policy=policy,
        servers=audits,
        recommendation=recommendation,
        command=command,
        seconds=time.monotonic() - started,
    )
    log.info(
        AUDIT_DONE,
        servers=len(audits),
        action=recommendation.action,
        refused=sum(a.refused for a in audits),
        seconds=round(report.seconds, 3),
    )
    return report
