"""Host facts as they were last recorded, for decisions that may not ask the server (I8).

`plan` and `--dry-run` make only read calls, so they cannot run the fact script on a
server: on aws that goes through SSM SendCommand, a mutating call. They read instead
the facts the last verification or audit recorded for each server, judge them with
today's policy (the same `evaluate` the health gate uses), and say how old they are:
"56 pending upgrade(s), ... (facts from audit 2h ago)". A server with no recorded
facts "needs verification"; a real run verifies it live.

Two records are read, and the newer one wins:
- a run's `VerifyServers` step: its outputs in the journal carry each server's report,
  facts included (steps.state = 'done' only: those servers passed the gate);
- an audit: `changeover audit` keeps the last facts it read of each server in the state
  store (one record per server; those of servers that are gone are dropped).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from orchestrator.hygiene import FACTS_VERSION, Facts, Kernel, Package, evaluate
from orchestrator.models import Server
from orchestrator.settings import HygienePolicy
from orchestrator.state import StateStore, open_store

# The journal's VerifyServers steps scanned for a server's facts, newest first.
SCAN_STEPS = 500

Source = Literal["audit", "run"]


def ago(seconds: float | None) -> str:
    """A duration as a person says it: 45s, 12m, 2h, 3d."""
    if seconds is None:
        return "?"
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


@dataclass(frozen=True, slots=True)
class RecordedFacts:
    """One server's facts as an audit or a run's verification recorded them."""

    server_id: str
    facts: Facts
    recorded_at: float
    source: Source
    run_id: str | None = None

    def origin(self, now: float) -> str:
        """'facts from audit 2h ago', 'facts from run r2026... 5m ago'."""
        what = "audit" if self.source == "audit" else f"run {self.run_id}"
        return f"facts from {what} {ago(now - self.recorded_at)} ago"


def _strs(value: Any) -> list[str]:
    return [str(v) for v in value or []]


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def facts_from_dict(d: Any) -> Facts | None:
    """`Facts.to_dict()` read back; None for anything else (a report made before facts
    carried a version, a provider's "not checked" note, a newer format)."""
    if not isinstance(d, Mapping) or d.get("facts_version") != FACTS_VERSION:
        return None
    try:
        k = d.get("kernel") or {}
        pending = d.get("pending")
        family = d.get("family")
        return Facts(
            family=family if family in ("apt", "dnf") else "unknown",
            os={str(a): str(b) for a, b in (d.get("os") or {}).items()},
            kernel=Kernel(
                running=_opt_str(k.get("running")),
                running_build=_opt_str(k.get("running_build")),
                installed=_strs(k.get("installed")),
                newest=_opt_str(k.get("newest")),
                newest_build=_opt_str(k.get("newest_build")),
            ),
            pending=None
            if pending is None
            else [
                Package(
                    name=str(p["name"]),
                    candidate=str(p["candidate"]),
                    installed=_opt_str(p.get("installed")),
                    security=bool(p.get("security")),
                    held=bool(p.get("held")),
                    phased=bool(p.get("phased")),
                    origins=tuple(_strs(p.get("origins"))),
                )
                for p in pending
            ],
            held=_strs(d.get("held")),
            reboot_required=None
            if d.get("reboot_required") is None
            else bool(d["reboot_required"]),
            reboot_required_pkgs=_strs(d.get("reboot_required_pkgs")),
            components={str(a): str(b) for a, b in (d.get("components") or {}).items()},
            probed=_strs(d.get("probed")),
            uptime=_opt_float(d.get("uptime")),
            lists_updated_at=_opt_float(d.get("lists_updated_at")),
            errors={str(a): str(b) for a, b in (d.get("errors") or {}).items()},
        )
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


# --------------------------------------------------------------------------------------
# Writing (audit) and reading (plan), in the state store
# --------------------------------------------------------------------------------------


def record_facts(
    store: StateStore,
    stack: str,
    facts: Mapping[str, Facts],
    at: float,
    *,
    existing: Iterable[str] | None = None,
) -> None:
    """Keep the facts an audit read, one record per server (the newest). `existing`:
    every server the stack has now; the records of the others (destroyed) are dropped."""
    store.record_facts(
        stack,
        {sid: f.to_dict() for sid, f in facts.items()},
        at,
        existing=list(existing) if existing is not None else None,
    )


def _from_audits(store: StateStore, stack: str, wanted: set[str]) -> dict[str, RecordedFacts]:
    found: dict[str, RecordedFacts] = {}
    for rec in store.audit_facts(stack):
        if rec.server_id not in wanted:
            continue
        facts = facts_from_dict(rec.facts)
        if facts is not None:
            found[rec.server_id] = RecordedFacts(rec.server_id, facts, rec.recorded_at, "audit")
    return found


def _from_runs(store: StateStore, stack: str, wanted: set[str]) -> dict[str, RecordedFacts]:
    found: dict[str, RecordedFacts] = {}
    for run_id, ended_at, server_id, report in store.verified_reports(stack, SCAN_STEPS):
        if not wanted - found.keys():
            break
        if server_id not in wanted or server_id in found:
            continue
        facts = facts_from_dict(report.get("facts"))
        if facts is not None:
            found[server_id] = RecordedFacts(server_id, facts, ended_at, "run", run_id)
    return found


def load_recorded_facts(
    store: StateStore, stack: str, server_ids: Iterable[str]
) -> dict[str, RecordedFacts]:
    """The newest recorded facts of each server, from audits and runs; read only."""
    wanted = set(server_ids)
    audits = _from_audits(store, stack, wanted)
    runs = _from_runs(store, stack, wanted)
    newest: dict[str, RecordedFacts] = {}
    for sid in wanted:
        candidates = [r for r in (audits.get(sid), runs.get(sid)) if r is not None]
        if candidates:
            newest[sid] = max(candidates, key=lambda r: r.recorded_at)
    return newest


def recorded_facts(
    state: StateStore | Path, stack: str, server_ids: Iterable[str]
) -> dict[str, RecordedFacts]:
    """`load_recorded_facts` from a store, or from the sqlite store in a state dir."""
    if isinstance(state, Path):
        store = open_store(None, state)
        try:
            return load_recorded_facts(store, stack, server_ids)
        finally:
            store.close()
    return load_recorded_facts(state, stack, server_ids)


# --------------------------------------------------------------------------------------
# Judging a server without asking it
# --------------------------------------------------------------------------------------


def policy_checks_nothing(policy: HygienePolicy) -> bool:
    """A policy under which the gate reads no host facts at all (as providers skip it)."""
    return (
        policy.pending == "ignore" and not policy.reboot_required_fails and not policy.min_versions
    )


@dataclass(frozen=True, slots=True)
class Judgement:
    """What the listing and the recorded facts say about a server.
    `needed`: True to replace it, False to keep it, None when it needs verification."""

    needed: bool | None
    reason: str


def judge_recorded(
    server: Server,
    recorded: RecordedFacts | None,
    policy: HygienePolicy,
    *,
    now: float,
    stack: str,
) -> Judgement:
    """The health gate's hygiene verdict on recorded facts, with their age. The app
    health check is live by nature, so only a real run makes it."""
    if server.state != "running":
        return Judgement(True, f"server is {server.state}")
    if policy_checks_nothing(policy):
        return Judgement(False, "hygiene policy checks nothing")
    if recorded is None:
        return Judgement(
            None,
            "needs verification: no recorded facts (`changeover audit "
            f"{stack}` records them; a real run verifies it live)",
        )
    verdict = evaluate(recorded.facts, policy)
    origin = recorded.origin(now)
    if verdict.ok:
        return Judgement(False, f"passes hygiene ({origin})")
    return Judgement(True, f"{'; '.join(verdict.reasons)} ({origin})")
