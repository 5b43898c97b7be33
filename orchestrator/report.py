"""`changeover report RUN_ID`: what a run did, built from the journal alone.

The journal keeps each step's start, end, attempts and outputs, the run's result, and
the run's events (resumed, rollback started, each undo, the end). From those this
module derives, for any past run (a crashed one included):

- one lane per server, new and old, with its states over time: booting, booted,
  verified, serving, out of service (draining), drained, and when it was destroyed;
- the steps as bands, with attempts, no-ops, errors and undos;
- markers: the write freeze, the write switch, the cutover, the bake's end, a
  rollback, a kill (the last journal entry before a resume) and a resume;
- the health gate's facts per new server, and the component versions compared with
  the servers they replace (and any drift an audit saw on those);
- the provider calls per operation, the outcome, the exit code and what to do next.

A rehearsal adds its load (per-second requests, failures, p50/p99) and its checks with
`attach_load`. `orchestrator/report_html.py` draws the whole as one HTML file.
"""

from __future__ import annotations

import json
import math
import socket
import sqlite3
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from orchestrator.audit import load_baselines
from orchestrator.engine import unfinished_barrier
from orchestrator.errors import PreconditionFailed
from orchestrator.plan import Outcome
from orchestrator.state import StateStore, as_store
from orchestrator.state.base import RunEvent, RunRecord, StateUnavailable, StepRecord, pid_alive

if TYPE_CHECKING:
    from orchestrator.load import LoadResult

REPORT_VERSION = 1

# A server's states, in the order a new server goes through them. Each lane of the
# timeline is a run of these; "gone" ends a lane.
STATES = (
    "booting",  # created, not running yet
    "booted",  # running, not verified yet
    "verified",  # passed the health gate, not serving yet
    "serving",  # behind an entry point
    "out",  # out of every entry point: draining
    "drained",  # no request in flight, still alive
    "failed",  # failed the health gate
    "gone",  # destroyed
)

# What to do after a run that ended like this (the same words as `rebuild`'s result).
NEXT = {
    "succeeded": "",
    "noop": "",
    "rolled_back": "the old stack is serving as before; fix the cause, then run again",
    "dirty": "an operator is needed: `changeover status {run}` lists each resource's state",
    "precondition_failed": "nothing was touched; fix the precondition, then run again",
}


def exit_code_of(outcome: str | None) -> int | None:
    """The contract's exit code of an outcome; None for a run that has not ended."""
    if outcome is None:
        return None
    try:
        return Outcome(outcome).exit_code
    except ValueError:
        return None


def advice(rec: RunRecord, steps: list[StepRecord], *, holder_alive: bool, holder: Any) -> str:
    """What `changeover status RUN_ID` says to do next about this run."""
    if rec.finished:
        return NEXT.get(rec.outcome or rec.status, "").format(run=rec.id)
    # unfinished or dirty: the same words as `changeover status RUN_ID`
    barrier = unfinished_barrier(rec.plan, steps)
    if barrier is not None and not holder_alive:
        return (
            f"past the point of no return of {barrier} (the new servers serve): "
            f"`changeover resume {rec.id}` finishes it; rollback is refused"
        )
    return {
        "running": f"still running (pid {holder['pid']} on {holder['host']})"
        if holder_alive and holder is not None
        else f"interrupted: `changeover resume {rec.id}` to continue, "
        f"or `changeover rollback {rec.id}` to undo",
        "rolling_back": f"rollback interrupted: `changeover resume {rec.id}` finishes it",
        "dirty": "an operator is needed: fix the failed undo below, then "
        f"`changeover rollback {rec.id}`",
        "paused": f"a paused campaign, every server serving: the next window opens "
        f"{rec.result.get('next_window')}; `changeover {rec.strategy} {rec.stack}` continues "
        f"it then, `changeover rollback {rec.id}` ends it where it is",
    }.get(rec.status, "")


# --------------------------------------------------------------------------------------
# Building the report
# --------------------------------------------------------------------------------------


def build_report(state: StateStore | sqlite3.Connection, run_id: str) -> dict[str, Any]:
    """The report of one run (by id or unique prefix), from a state store (or an open
    SQLite connection), as JSON-ready data. Times are seconds since the run was created
    (`t0` is that moment, in epoch seconds)."""
    journal = as_store(state)
    rec = journal.get_run(run_id) or journal.find_run(run_id)
    if rec is None:
        raise PreconditionFailed(f"no run {run_id!r} in the journal")
    steps = journal.steps(rec.id)
    events = journal.events(rec.id)
    holder = journal.holder(rec.stack)
    alive = (
        holder is not None
        and holder.run_id == rec.id
        and holder.host == socket.gethostname()
        and pid_alive(holder.pid)
    )
    return _Builder(journal, rec, steps, events, alive=alive).build(
        advice(rec, steps, holder_alive=alive, holder=holder.to_dict() if holder else None)
    )


class _Builder:
    """Derives lanes, bands and markers from one run's journal records."""

    def __init__(
        self,
        store: StateStore,
        rec: RunRecord,
        steps: list[StepRecord],
        events: list[RunEvent],
        *,
        alive: bool = False,
    ) -> None:
        self.store = store
        self.alive = alive  # a live process still drives the run
        self.rec = rec
        self.steps = steps
        self.events = events
        self.t0 = rec.created_at
        self.params = {s["key"]: s.get("params", {}) for s in rec.plan.get("steps", [])}
        # server id -> list of (epoch, state); and what we know of each server
        self.transitions: dict[str, list[tuple[float, str]]] = defaultdict(list)
        self.info: dict[str, dict[str, Any]] = {}
        self.undo_times: dict[str, dict[str, float]] = defaultdict(dict)
        for ev in events:
            if ev.step and ev.kind.startswith("undo_"):
                self.undo_times[ev.step][ev.kind.removeprefix("undo_")] = ev.at

    def rel(self, at: float | None) -> float | None:
        return None if at is None else round(at - self.t0, 3)

    def end_time(self) -> float:
        times = [self.rec.updated_at, self.rec.created_at]
        for s in self.steps:
            times += [t for t in (s.started_at, s.ended_at) if t is not None]
        times += [e.at for e in self.events]
        return max(times)

    # --- servers -------------------------------------------------------------------------
    def _server(self, sid: str, **info: Any) -> None:
        known = self.info.setdefault(sid, {"id": sid})
        for k, v in info.items():
            if v is not None and known.get(k) is None:
                known[k] = v

    def _mark(self, ids: Any, at: float | None, state: str) -> None:
        if at is None:
            return
        for sid in _ids(ids):
            self._server(sid)
            self.transitions[sid].append((at, state))

    def _old_servers(self) -> None:
        """The servers a run replaces, with what the plan knows of them."""
        summary = self.rec.plan.get("summary", {})
        before = summary.get("generation_before")
        serving = set(_ids(summary.get("members_before", [])))
        data_ids: set[str] = set()
        for p in self.params.values():
            data_ids |= set(_ids(p.get("data_ids", [])))
            if p.get("src"):
                data_ids.add(str(p["src"]))
        # The data role is the role of the CreateServers step the data moves to.
        dst_steps = {p["dst_from"] for p in self.params.values() if p.get("dst_from")}
        data_role = next(
            (self.params[k].get("role") for k in sorted(dst_steps) if k in self.params), None
        )
        old: list[str] = []
        for p in self.params.values():
            for sid in [*_ids(p.get("ids", [])), *_ids(p.get("data_ids", []))]:
                if sid not in old:
                    old.append(sid)
        for sid in sorted(serving | data_ids):
            if sid not in old:
                old.append(sid)
        role_of: dict[str, str] = {}
        for p in self.params.values():
            if p.get("role") and p.get("ids"):  # rotate: RemoveMembers/DrainServers[role]
                for sid in _ids(p["ids"]):
                    role_of[sid] = str(p["role"])
        # rebuild: the entry points' roles; one role means every old member had it
        serving_roles = {
            r
            for p in self.params.values()
            for r in (p.get("roles_from") or {})
            if p.get("previous")
        }
        for sid in old:
            role = role_of.get(sid) or (data_role if sid in data_ids else None)
            if role is None and sid in serving and len(serving_roles) == 1:
                role = next(iter(serving_roles))
            gen = before if self.rec.strategy == "rebuild" else None
            self._server(sid, side="old", role=role, generation=gen)
            # the old data server serves the data even though no entry point holds it
            self.transitions[sid].append((self.t0, "serving"))

    def _from_steps(self) -> None:
        for s in self.steps:
            p = self.params.get(s.key, {})
            out, end = s.outputs, s.ended_at
            done = s.state == "done"
            if s.name == "CreateServers":
                for sid in _ids(out.get("created", [])):
                    self._server(
                        sid, side="new", role=p.get("role"), generation=p.get("generation")
                    )
                # a server exists from the moment the step asked for it
                self._mark(out.get("created", []), s.started_at, "booting")
            elif s.name == "WaitRunning" and done:
                self._mark(out.get("running", []), end, "booted")
            elif s.name == "VerifyServers":
                if done:
                    self._mark(out.get("passed", []), end, "verified")
                elif s.state == "failed" and s.error:
                    failing = [sid for sid in self.info if f"{sid}:" in s.error]
                    self._mark(failing, end, "failed")
            elif s.name == "SwitchWrites" and done:
                # the new db takes the writes; the old one forwards them to it
                self._mark(
                    _ids([out.get("switched_to")] if out.get("switched_to") else []), end, "serving"
                )
                self._mark(_ids([p["src"]] if p.get("src") else []), end, "out")
            elif s.name == "RepointAddress" and done:
                members = out.get("members", {})
                self._mark(_union(members), end, "serving")
                left = set(_union(out.get("previous", self.params.get(s.key, {}).get("previous"))))
                self._mark(sorted(left - set(_union(members))), end, "out")
            elif s.name == "AddMembers" and done:
                self._mark(_union(out.get("added", {})), end, "serving")
            elif s.name == "RemoveMembers" and done:
                self._mark(_union(out.get("removed", {})), end, "out")
            elif s.name == "DrainServers" and done:
                self._mark(out.get("drained", []), end, "drained")
            elif s.name in ("DestroyServers", "RetireServers"):
                if s.name == "RetireServers" and s.started_at is not None:
                    # it waits `retain`, then drains: the old side leaves service here
                    self._mark(p.get("ids", []), s.started_at, "out")
                if done:
                    self._mark(out.get("destroyed", []), end, "gone")
            self._undo(s)

    def _undo(self, s: StepRecord) -> None:
        """What a step's undo did to the servers, at the time it was journaled done."""
        if s.undo_state != "done":
            return
        at = self.undo_times.get(s.key, {}).get("done") or self.rec.updated_at
        p = self.params.get(s.key, {})
        if s.name == "CreateServers":
            self._mark(s.outputs.get("created", []), at, "gone")
        elif s.name == "RepointAddress":
            back = _union(p.get("previous", {}))
            self._mark(back, at, "serving")
            left = set(_union(s.outputs.get("members", {}))) - set(back)
            self._mark(sorted(left), at, "out")
        elif s.name == "AddMembers":
            self._mark(_union(s.outputs.get("added", {})), at, "out")
        elif s.name == "RemoveMembers":
            self._mark(_union(s.outputs.get("removed", {})), at, "serving")

    def lanes(self, end: float) -> list[dict[str, Any]]:
        self._old_servers()
        self._from_steps()
        lanes = []
        order = {"new": 0, "old": 1}
        ids = sorted(
            self.info,
            key=lambda i: (
                order.get(self.info[i].get("side", "new"), 2),
                str(self.info[i].get("role") or ""),
                min((t for t, _ in self.transitions[i]), default=0.0),
                i,
            ),
        )
        for sid in ids:
            trans: list[tuple[float, str]] = []
            for at, state in sorted(self.transitions[sid], key=lambda x: x[0]):
                if not trans or trans[-1][1] != state:  # the same state again goes on
                    trans.append((at, state))
            segments = []
            for i, (at, state) in enumerate(trans):
                if state == "gone":
                    break
                until = trans[i + 1][0] if i + 1 < len(trans) else end
                if until > at or i + 1 == len(trans):
                    segments.append(
                        {"state": state, "start": self.rel(at), "end": self.rel(max(until, at))}
                    )
            first: dict[str, float | None] = {}
            for at, state in trans:
                first.setdefault(state, self.rel(at))
            info = self.info[sid]
            lanes.append(
                {
                    "id": sid,
                    "role": info.get("role"),
                    "generation": info.get("generation"),
                    "side": info.get("side", "new"),
                    "events": first,
                    "segments": segments,
                    "destroyed": first.get("gone") is not None,
                }
            )
        return lanes

    # --- markers ---------------------------------------------------------------------------
    def markers(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []

        def add(kind: str, at: float | None, label: str) -> None:
            if at is not None:
                out.append({"kind": kind, "at": self.rel(at), "label": label})

        for s in self.steps:
            if s.state != "done":
                continue
            if s.name == "FreezeWrites" and not s.noop:
                add("freeze", s.ended_at, "writes frozen")
            elif s.name == "SwitchWrites":
                add("switch", s.ended_at, "writes switched to the new db")
            elif s.name == "RepointAddress":
                add("cutover", s.ended_at, "cutover" + (" (no-op)" if s.noop else ""))
            elif s.name == "AddMembers":
                add("cutover", s.ended_at, f"cutover {s.key.partition('#')[2] or ''}".strip())
            elif s.name == "Bake":
                add("bake_end", s.ended_at, "bake ended")
        last_seen = self.t0
        timeline = sorted(
            [(t, "step") for s in self.steps for t in (s.started_at, s.ended_at) if t]
            + [(e.at, e.kind) for e in self.events],
        )
        for ev in self.events:
            if ev.kind in ("resumed", "rollback_requested"):
                if ev.detail in ("running", "rolling_back"):
                    # The process that drove it died: the last thing it journaled.
                    before = [t for t, _ in timeline if t < ev.at and t >= last_seen]
                    add("kill", max(before) if before else None, "killed (last journal entry)")
                verb = "resumed" if ev.kind == "resumed" else "rollback requested"
                add("resume", ev.at, verb)
                last_seen = ev.at
            elif ev.kind == "rollback_started":
                add("rollback", ev.at, "rollback: " + (ev.detail or ""))
            elif ev.kind == "paused":
                add("paused", ev.at, f"paused until the next window ({ev.detail})")
            elif ev.kind == "finished":
                add("end", ev.at, f"ended: {ev.detail}")
        if self.rec.status in ("running", "rolling_back") and not self.alive:
            # Nothing drives it: the process died (or was stopped) after its last entry.
            add("kill", max(t for t, _ in timeline) if timeline else None, "interrupted")
        if not any(m["kind"] == "rollback" for m in out) and self.rec.status in (
            "rolled_back",
            "rolling_back",
        ):
            # journaled before run events existed: the failed step's end is the start
            failed = [s.ended_at for s in self.steps if s.state == "failed" and s.ended_at]
            add("rollback", min(failed) if failed else None, "rollback")
        return sorted(out, key=lambda m: m["at"])

    # --- steps ---------------------------------------------------------------------------
    def step_rows(self) -> list[dict[str, Any]]:
        rows = []
        for s in self.steps:
            undo = self.undo_times.get(s.key, {})
            rows.append(
                {
                    "index": s.idx + 1,
                    "key": s.key,
                    "name": s.name,
                    "state": s.state,
                    "attempts": s.attempts,
                    "retries": max(0, s.attempts - 1),
                    "start": self.rel(s.started_at),
                    "end": self.rel(s.ended_at),
                    "seconds": s.seconds,
                    "noop": s.noop,
                    "error": s.error,
                    "undo": s.undo_state,
                    "undo_error": s.undo_error,
                    "undo_start": self.rel(undo.get("started")),
                    "undo_end": self.rel(undo.get("done") or undo.get("failed")),
                }
            )
        return rows

    # --- the health gate and versions ----------------------------------------------------
    def health(self) -> list[dict[str, Any]]:
        out = []
        for s in self.steps:
            if s.name != "VerifyServers":
                continue
            reports = s.outputs.get("reports", {}) if s.state == "done" else {}
            for sid, r in reports.items():
                facts = r.get("facts") or {}
                kernel = facts.get("kernel") or {}
                out.append(
                    {
                        "server": sid,
                        "step": s.key,
                        "passed": bool(r.get("passed")),
                        "running": r.get("running"),
                        "app_ok": r.get("app_ok"),
                        "hygiene_ok": r.get("hygiene_ok"),
                        "reasons": r.get("reasons", []),
                        "pending": facts.get("pending_count"),
                        "security": facts.get("security_count"),
                        "reboot_required": facts.get("reboot_required"),
                        "reboot_required_pkgs": facts.get("reboot_required_pkgs", []),
                        "held": facts.get("held", []),
                        "os": (facts.get("os") or {}).get("pretty_name"),
                        "kernel": kernel.get("running"),
                        "versions": facts.get("components", {}),
                    }
                )
            if s.state == "failed":
                out.append(
                    {"server": None, "step": s.key, "passed": False, "reasons": [s.error or ""]}
                )
        return out

    def versions(self, lanes: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
        """Component versions of the new servers against what was recorded for the
        servers they replace; and drift an audit saw on those before this run."""
        old = [ln["id"] for ln in lanes if ln["side"] == "old"]
        new_versions: dict[str, set[str]] = defaultdict(set)
        for h in self.health():
            for comp, v in (h.get("versions") or {}).items():
                new_versions[comp].add(str(v))
        try:
            baselines = load_baselines(self.store, self.rec.stack, old)
        except (sqlite3.Error, StateUnavailable):
            baselines = {}
        baselines = {k: b for k, b in baselines.items() if b.run_id != self.rec.id}
        old_versions: dict[str, set[str]] = defaultdict(set)
        for b in baselines.values():
            for comp, v in b.components.items():
                old_versions[comp].add(v)
        rows = []
        for comp in sorted(set(new_versions) | set(old_versions)):
            before, after = sorted(old_versions.get(comp, ())), sorted(new_versions.get(comp, ()))
            rows.append(
                {
                    "component": comp,
                    "before": before,
                    "after": after,
                    "changed": bool(before) and before != after,
                }
            )
        drift = []
        for sid, b in sorted(baselines.items()):
            audited = self.store.versions(
                self.rec.stack, sid, after=b.recorded_at, until=self.rec.created_at
            )
            latest = {v.component: (v.version, v.recorded_at) for v in audited}
            for comp, (version, at) in sorted(latest.items()):
                if b.components.get(comp) != version:
                    drift.append(
                        {
                            "server": sid,
                            "component": comp,
                            "recorded": b.components.get(comp),
                            "recorded_by": b.run_id,
                            "audited": version,
                            "audited_at": at,
                        }
                    )
        return rows, drift

    # --- all of it ---------------------------------------------------------------------------
    def build(self, next_step: str) -> dict[str, Any]:
        rec = self.rec
        end = self.end_time()
        lanes = self.lanes(end)
        versions, drift = self.versions(lanes)
        result = rec.result
        # a run resumed after it ended dirty keeps its old outcome until it ends again
        outcome = rec.outcome if rec.outcome == rec.status else None
        return {
            "report_version": REPORT_VERSION,
            "run_id": rec.id,
            "strategy": rec.strategy,
            "stack": rec.stack,
            "status": rec.status,
            "outcome": outcome,
            "exit_code": exit_code_of(outcome),
            "message": result.get("message") or rec.error,
            "next": next_step,
            "t0": rec.created_at,
            "duration": round(end - self.t0, 3),
            "generation": result.get("generation")
            or {"before": rec.plan.get("summary", {}).get("generation_before")},
            "address": result.get("address"),
            "entry_points": result.get("entry_points"),
            "servers": lanes,
            "steps": self.step_rows(),
            "markers": self.markers(),
            "health": self.health(),
            "versions": versions,
            "drift": drift,
            "api_calls": result.get("api_calls", {}),
            # counted in memory: a resumed run's are those of the process that ended it
            "api_calls_by": "the last process"
            if any(e.kind in ("resumed", "rollback_requested") for e in self.events)
            else "the run",
            "api_calls_total": sum(int(v) for v in result.get("api_calls", {}).values()),
            "retries": {s.key: s.attempts - 1 for s in self.steps if s.attempts > 1},
            "resources": result.get("resources"),
            "events": [
                {"at": self.rel(e.at), "kind": e.kind, "step": e.step, "detail": e.detail}
                for e in self.events
            ],
        }


def _ids(value: Any) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    return []


def _union(by_address: Any) -> list[str]:
    """Every server id in a {entry point: [ids]} map, in first-seen order."""
    out: list[str] = []
    if isinstance(by_address, dict):
        for ids in by_address.values():
            out += [i for i in _ids(ids) if i not in out]
    return out


# --------------------------------------------------------------------------------------
# A rehearsal's load
# --------------------------------------------------------------------------------------


def load_series(result: LoadResult, t0: float) -> list[dict[str, Any]]:
    """Per second of the load (seconds since `t0`): requests sent, failures, and the
    p50/p99 latency in milliseconds of the requests sent in that second."""
    buckets: dict[int, list[tuple[float, bool]]] = defaultdict(list)
    for s in result.samples:
        buckets[math.floor(result.epoch(s) - t0)].append((s.latency * 1000.0, s.ok))
    out = []
    for sec in range(min(buckets, default=0), max(buckets, default=-1) + 1):
        got = buckets.get(sec, [])
        lat = sorted(v for v, _ in got)
        out.append(
            {
                "t": sec,
                "requests": len(got),
                "failed": sum(1 for _, ok in got if not ok),
                "p50_ms": round(_nearest_rank(lat, 50), 3),
                "p99_ms": round(_nearest_rank(lat, 99), 3),
            }
        )
    return out


def _nearest_rank(ordered: list[float], pct: float) -> float:
    if not ordered:
        return 0.0
    return ordered[max(1, math.ceil(pct / 100.0 * len(ordered))) - 1]


def attach_load(
    report: dict[str, Any],
    result: LoadResult,
    *,
    lost: list[int],
    checks: list[dict[str, Any]],
    scenario: str,
) -> dict[str, Any]:
    """Add a rehearsal's load (on the run's time axis) and its checks to a report."""
    report["load"] = {
        "per_second": load_series(result, report["t0"]),
        "sent": result.sent,
        "failed": result.failed,
        "rate": round(result.rate, 1),
        "errors": dict(result.errors),
        "latency_ms": {k: round(v, 3) for k, v in result.latency_percentiles().items()},
        "acked_writes": len(result.acked_writes),
        "writes_lost": len(lost),
        "lost_ids": sorted(lost),
    }
    report["scenario"] = {
        "name": scenario,
        "passed": bool(checks) and all(c["ok"] for c in checks),
        "checks": checks,
    }
    return report


# --------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------


def report_text(r: dict[str, Any]) -> str:
    """The report for a terminal or a log: what `changeover report RUN_ID` prints."""
    outcome = r["outcome"] or f"{r['status']} (not ended)"
    lines = [
        f"run {r['run_id']}: {r['strategy']} {r['stack']} -> {outcome.upper()}"
        + (f" (exit {r['exit_code']})" if r["exit_code"] is not None else ""),
        f"  took {r['duration']:.1f}s; {len(r['steps'])} steps",
    ]
    if r.get("message") and r["message"] != "done":
        lines.append(f"  {r['message']}")
    lines.append("  timeline (seconds from the start):")
    for s in r["steps"]:
        when = f"{s['start']:>7.2f} - {s['end']:>7.2f}" if s["end"] is not None else " " * 17
        if s["start"] is None:
            when = " " * 7 + " (not started)"
        note = f" no-op: {s['noop']}" if s["noop"] else ""
        note += f" retries: {s['retries']}" if s["retries"] else ""
        note += f" error: {s['error']}" if s["error"] else ""
        note += f" undo: {s['undo']}" if s["undo"] else ""
        lines.append(f"    {when}  {s['key']:<24} {s['state']}{note}")
    for m in r["markers"]:
        lines.append(f"    {m['at']:>7.2f}  * {m['label']}")
    lines.append("  servers:")
    for ln in r["servers"]:
        states = " > ".join(f"{k}@{v:.2f}" for k, v in ln["events"].items() if v is not None)
        who = f"{ln['side']} {ln['role'] or ''} gen {ln['generation'] or '?'}".replace("  ", " ")
        lines.append(f"    {ln['id']:<14} {who:<18} {states}")
    for h in r["health"]:
        if h.get("server") is None:
            lines.append(f"  health gate {h['step']}: FAILED {'; '.join(h['reasons'])}")
            continue
        versions = ", ".join(f"{k} {v}" for k, v in h["versions"].items())
        lines.append(
            f"  gate {h['server']}: {'passed' if h['passed'] else 'FAILED'}; "
            f"pending {h['pending']}, security {h['security']}, "
            f"reboot required {'yes' if h['reboot_required'] else 'no'}; {versions}"
        )
    changed = [v for v in r["versions"] if v["changed"]]
    if changed:
        lines.append(
            "  versions changed: "
            + ", ".join(
                f"{v['component']} {'/'.join(v['before'])} -> {'/'.join(v['after']) or '-'}"
                for v in changed
            )
        )
    for d in r["drift"]:
        lines.append(
            f"  drift on {d['server']}: {d['component']} {d['recorded']} -> {d['audited']}"
        )
    calls = r["api_calls"]
    lines.append(
        "  provider calls: "
        + (", ".join(f"{k}={v}" for k, v in calls.items()) if calls else "not recorded")
    )
    if r.get("load"):
        ld = r["load"]
        lines.append(
            f"  load: {ld['sent']} requests, {ld['failed']} failed, {ld['acked_writes']} "
            f"writes acknowledged, {ld['writes_lost']} lost"
        )
    if r["next"]:
        lines.append(f"  next: {r['next']}")
    return "\n".join(lines)


def dumps(report: dict[str, Any]) -> str:
    """The JSON twin, one line."""
    return json.dumps(report, default=str)
