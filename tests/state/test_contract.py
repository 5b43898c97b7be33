"""One contract suite for every state store: sqlite, and DynamoDB on moto in-process and
over moto's HTTP server. What the engine, the CLI, audits and reports rely on."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from orchestrator.errors import FencedError, LockedError
from orchestrator.state import StateStore
from orchestrator.state.base import VersionRecord
from tests.state.conftest import Backend

STACK = "shop"
DEAD_PID = 4_194_304  # PID_MAX_LIMIT on Linux: no process ever has it


def plan(*steps: tuple[str, str], stack: str = STACK, **extra: Any) -> dict[str, Any]:
    return {
        "strategy": "rebuild",
        "stack": stack,
        "steps": [{"key": k, "name": n, "params": {}} for k, n in steps],
        "summary": {},
        **extra,
    }


THREE = plan(
    ("CreateServers[web]", "CreateServers"),
    ("VerifyServers#1", "VerifyServers"),
    ("RepointAddress", "RepointAddress"),
)


class Clock:
    """A wall clock the test moves; `sleep` moves it too, and runs `during` first."""

    def __init__(self, now: float = 10_000.0) -> None:
        self.now = now
        self.slept: list[float] = []
        self.during: list[Any] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        for fn in self.during:
            fn()
        self.now += seconds


@pytest.fixture
def live_pid() -> Iterator[int]:
    """A process of ours that lives through the test (another holder on this host)."""
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait(timeout=10)


# --- runs, steps, events -------------------------------------------------------------------
def test_runs_are_created_found_and_listed(store: StateStore) -> None:
    """A run reads back as written; by id, by unique prefix, newest first, per stack."""
    lease = store.acquire(STACK, "r20260101-000000-aaaaaa")
    store.create_run("r20260101-000000-aaaaaa", THREE, lease)
    store.release(lease)
    other = store.acquire("blog", "r20260101-000001-bbbbbb")
    store.create_run("r20260101-000001-bbbbbb", plan(("Bake", "Bake"), stack="blog"), other)
    store.release(other)
    rec = store.get_run("r20260101-000000-aaaaaa")
    assert rec is not None
    assert (rec.strategy, rec.stack, rec.status, rec.outcome) == ("rebuild", STACK, "running", None)
    assert rec.plan == THREE and rec.result == {} and not rec.finished
    assert store.get_run("r-missing") is None
    found = store.find_run("r20260101-000000")
    assert found is not None and found.id == "r20260101-000000-aaaaaa"
    assert store.find_run("r2026") is None, "an ambiguous prefix finds nothing"
    assert [r.id for r in store.runs()] == ["r20260101-000001-bbbbbb", "r20260101-000000-aaaaaa"]
    assert [r.id for r in store.runs(limit=1)] == ["r20260101-000001-bbbbbb"]
    assert [r.id for r in store.runs(STACK)] == ["r20260101-000000-aaaaaa"]
    steps = store.steps("r20260101-000000-aaaaaa")
    assert [(s.idx, s.key, s.name, s.state, s.attempts) for s in steps] == [
        (0, "CreateServers[web]", "CreateServers", "pending", 0),
        (1, "VerifyServers#1", "VerifyServers", "pending", 0),
        (2, "RepointAddress", "RepointAddress", "pending", 0),
    ]
    assert all(s.outputs == {} and s.seconds is None for s in steps)


def test_step_transitions_keep_outputs_attempts_and_errors(store: StateStore) -> None:
    """started -> done (outputs, no-op, attempts), failed (error), paused (pending again,
    marks kept), a point-of-no-return marker only on a started step, undo states."""
    lease = store.acquire(STACK, "r1")
    store.create_run("r1", THREE, lease)
    store.step_marked("r1", 0, lease, {"point_of_no_return": "x"})  # not started: ignored
    assert store.steps("r1")[0].outputs == {}
    store.step_started("r1", 0, lease)
    store.step_marked("r1", 0, lease, {"point_of_no_return": "destroy_servers"})
    assert store.steps("r1")[0].outputs == {"point_of_no_return": "destroy_servers"}
    store.step_done("r1", 0, lease, {"created": ["srv-1", "srv-2"]}, tries=3)
    store.step_started("r1", 1, lease)
    store.step_failed("r1", 1, lease, "gate failed on srv-2", tries=2)
    store.step_started("r1", 2, lease)
    store.step_paused("r1", 2, lease, {"estimate": 42.0})
    store.step_done("r1", 2, lease, {}, noop="already points there")
    store.undo_state("r1", 0, lease, "failed", "destroy refused")
    done, failed, noop = store.steps("r1")
    assert done.state == "done" and done.outputs == {"created": ["srv-1", "srv-2"]}
    assert done.attempts == 3 and done.seconds is not None and done.seconds >= 0
    assert (done.undo_state, done.undo_error) == ("failed", "destroy refused")
    assert failed.state == "failed" and failed.error == "gate failed on srv-2"
    assert failed.attempts == 2 and failed.ended_at is not None
    assert noop.state == "done" and noop.noop == "already points there"
    assert noop.attempts == 2, "the pause counts as an attempt, and so does the run"
    store.step_started("r1", 1, lease)  # a retry clears the error, keeps the start time
    again = store.steps("r1")[1]
    assert again.state == "started" and again.error is None
    assert again.started_at == failed.started_at
    store.undo_state("r1", 0, lease, "done")
    assert store.steps("r1")[0].undo_error is None


def test_a_paused_step_is_pending_again_with_its_marks(store: StateStore) -> None:
    """step_paused: pending, no start or end, what it measured kept for next time."""
    lease = store.acquire(STACK, "r1")
    store.create_run("r1", THREE, lease)
    store.step_started("r1", 0, lease)
    store.step_paused("r1", 0, lease, {"slowest_batch": 12.5})
    rec = store.steps("r1")[0]
    assert (rec.state, rec.started_at, rec.ended_at) == ("pending", None, None)
    assert rec.outputs == {"slowest_batch": 12.5} and rec.attempts == 1


def test_events_read_back_in_order(store: StateStore) -> None:
    """Run events come back in the order they happened, with their step and detail."""
    lease = store.acquire(STACK, "r1")
    store.create_run("r1", THREE, lease)
    store.event("r1", lease, "rollback_started", detail="Bake failed")
    for kind in ("undo_started", "undo_done"):
        store.event("r1", lease, kind, step="RepointAddress")
    store.event("r1", None, "resumed", detail="rolling_back")
    events = store.events("r1")
    assert [(e.kind, e.step, e.detail) for e in events] == [
        ("rollback_started", None, "Bake failed"),
        ("undo_started", "RepointAddress", None),
        ("undo_done", "RepointAddress", None),
        ("resumed", None, "rolling_back"),
    ]
    assert [e.at for e in events] == sorted(e.at for e in events)
    assert store.events("r-other") == []


def test_unfinished_runs_hold_their_stack_until_they_end(store: StateStore) -> None:
    """running, rolling_back, dirty and paused are unfinished; an ended run is not. Its
    status, outcome, result and error read back."""
    lease = store.acquire(STACK, "r1")
    store.create_run("r1", THREE, lease)
    assert [r.id for r in store.unfinished(STACK)] == ["r1"]
    store.set_status("r1", "paused", lease, outcome="paused", result={"next_window": "w"})
    (paused,) = store.unfinished(STACK)
    assert (paused.status, paused.outcome, paused.result) == (
        "paused",
        "paused",
        {"next_window": "w"},
    )
    store.set_status("r1", "dirty", lease, outcome="dirty", error="undo failed")
    assert [(r.status, r.error) for r in store.unfinished(STACK)] == [("dirty", "undo failed")]
    store.set_status(
        "r1", "succeeded", lease, outcome="succeeded", result={"message": "done"}, error=None
    )
    assert store.unfinished(STACK) == []
    rec = store.get_run("r1")
    assert rec is not None and rec.finished
    assert (rec.status, rec.outcome, rec.error, rec.result) == (
        "succeeded",
        "succeeded",
        None,
        {"message": "done"},
    )
    assert rec.updated_at >= rec.created_at
    assert store.unfinished("blog") == []


# --- leases ------------------------------------------------------------------------------------
def test_lease_acquire_renew_release_break(store: StateStore) -> None:
    """A lease: held with its holder's details, renewed, released; tokens only grow; a
    broken lease names its run, and its holder is fenced."""
    first = store.acquire(STACK, "r1")
    held = store.holder(STACK)
    assert held is not None
    assert (held.run_id, held.token, held.pid, held.expires_at) == (
        "r1",
        first.token,
        os.getpid(),
        first.expires_at,
    )
    with pytest.raises(LockedError, match="locked by run r1"):
        store.acquire(STACK, "r2")
    store.check(first)
    renewed = store.renew(first)
    assert renewed.token == first.token and renewed.expires_at >= first.expires_at
    store.ensure_free("blog")
    store.release(renewed)
    assert store.holder(STACK) is None
    store.ensure_free(STACK)
    second = store.acquire(STACK, "r2")
    assert second.token > first.token
    assert store.break_lock(STACK) == "r2"
    assert store.holder(STACK) is None
    assert store.break_lock(STACK) is None
    third = store.acquire(STACK, "r3")
    assert third.token > second.token + 1, "breaking a lease moves the fencing counter too"
    for stale in (first, second):
        with pytest.raises(FencedError):
            store.check(stale)
        with pytest.raises(FencedError):
            store.renew(stale)
    store.release(second)  # not the holder: a no-op
    assert store.holder(STACK) is not None


def test_a_write_with_an_old_token_is_fenced_and_changes_nothing(
    backend: Backend, store: StateStore
) -> None:
    """After a break and a takeover, every journal write carrying the old lease raises
    FencedError and leaves the journal exactly as it was."""
    old = store.acquire(STACK, "r1")
    store.create_run("r1", THREE, old)
    store.step_started("r1", 0, old)
    store.event("r1", old, "resumed", detail="running")
    store.break_lock(STACK)
    newer = backend.store().acquire(STACK, "r1")  # resumed elsewhere
    before = (store.get_run("r1"), store.steps("r1"), store.events("r1"))
    writes = [
        lambda: store.step_started("r1", 1, old),
        lambda: store.step_done("r1", 0, old, {"created": ["x"]}),
        lambda: store.step_failed("r1", 0, old, "boom"),
        lambda: store.step_marked("r1", 0, old, {"point_of_no_return": "x"}),
        lambda: store.step_paused("r1", 0, old, {}),
        lambda: store.undo_state("r1", 0, old, "started"),
        lambda: store.set_status("r1", "rolled_back", old, outcome="rolled_back"),
        lambda: store.event("r1", old, "finished", detail="rolled_back"),
        lambda: store.create_run("r2", THREE, old),
    ]
    for write in writes:
        with pytest.raises(FencedError, match="broken or taken over"):
            write()
    assert (store.get_run("r1"), store.steps("r1"), store.events("r1")) == before
    assert store.get_run("r2") is None and [r.id for r in store.runs()] == ["r1"]
    store.step_done("r1", 0, newer, {"created": ["y"]})  # the new holder writes on
    assert store.steps("r1")[0].outputs == {"created": ["y"]}


def test_a_lease_from_another_host_is_taken_only_after_its_ttl(backend: Backend) -> None:
    """Takeover only after the TTL, and only once half a TTL passed with no renewal: a
    holder that renews while we watch keeps its lease, whatever our clock says."""
    clock = Clock()
    here = backend.store(ttl=30, clock=clock, sleep=clock.sleep, host="host-a")
    there = backend.store(ttl=30, clock=clock, sleep=clock.sleep, host="host-b")
    held = here.acquire(STACK, "r1")
    clock.now += 29
    with pytest.raises(LockedError, match="locked by run r1"):
        there.acquire(STACK, "r2")
    assert clock.slept == [], "an unexpired lease is refused at once, not watched"
    clock.now += 2  # expired by our clock; the holder on host-a still renews...
    behind = backend.store(ttl=30, clock=lambda: clock.now - 100, host="host-a")
    clock.during = [lambda: behind.renew(held)]  # ...by a clock 100 s behind ours
    with pytest.raises(LockedError, match="host-a is still renewing"):
        there.acquire(STACK, "r2")
    assert clock.slept == [15.0]
    clock.during = []
    clock.now += 31  # expired, and silent for the half TTL we watch: gone
    taken = there.acquire(STACK, "r2")
    assert taken.token > held.token and taken.run_id == "r2"
    assert clock.slept == [15.0, 15.0]
    with pytest.raises(FencedError):
        here.check(held)
    holder = there.holder(STACK)
    assert holder is not None and (holder.host, holder.run_id) == ("host-b", "r2")


def test_on_this_host_a_dead_holder_is_retaken_by_its_run_at_once(
    backend: Backend, live_pid: int
) -> None:
    """Same host: a live holder keeps its lease even past expiry; a dead holder's run
    takes it back at once (resume), while another run waits for the TTL."""
    clock = Clock()
    me = backend.store(ttl=30, clock=clock, sleep=clock.sleep)
    alive = backend.store(ttl=30, clock=clock, sleep=clock.sleep, pid=live_pid)
    alive.acquire(STACK, "r-live")
    clock.now += 3600
    for run in ("r-live", "r-other"):
        with pytest.raises(LockedError, match=f"live process {live_pid}"):
            me.acquire(STACK, run)
    with pytest.raises(LockedError, match="live process"):
        me.ensure_free(STACK)
    me.break_lock(STACK)
    dead = backend.store(ttl=30, clock=clock, sleep=clock.sleep, pid=DEAD_PID)
    gone = dead.acquire(STACK, "r-dead")
    with pytest.raises(LockedError, match="locked by run r-dead"):
        me.acquire(STACK, "r-other")
    back = me.acquire(STACK, "r-dead")
    assert back.token > gone.token and clock.slept == []
    me.break_lock(STACK)
    dead.acquire(STACK, "r-dead")
    clock.now += 31
    assert me.acquire(STACK, "r-other").run_id == "r-other", "expired: another run may"


def test_a_clone_shares_the_store(store: StateStore) -> None:
    """clone() (the heartbeat's handle) sees and renews the same lease."""
    lease = store.acquire(STACK, "r1")
    other = store.clone()
    try:
        renewed = other.renew(lease)
        holder = store.holder(STACK)
        assert holder is not None and holder.expires_at == renewed.expires_at
    finally:
        other.close()


# --- recorded versions and facts ---------------------------------------------------------------
def test_component_versions_round_trip(store: StateStore) -> None:
    """What audits recorded of a server, in a time range, oldest first."""
    rows = [
        VersionRecord("srv-1", "nginx", "1.22", 100.0),
        VersionRecord("srv-1", "openssl", "3.0.11", 100.0),
        VersionRecord("srv-1", "nginx", "1.24", 200.0),
        VersionRecord("srv-10", "nginx", "9.9", 150.0),
        VersionRecord("srv-2", "nginx", None, 150.0),
    ]
    store.record_versions(STACK, rows)
    store.record_versions(STACK, [])
    got = store.versions(STACK, "srv-1", after=100.0, until=200.0)
    assert [(v.component, v.version, v.recorded_at) for v in got] == [("nginx", "1.24", 200.0)]
    every = store.versions(STACK, "srv-1", after=0.0, until=1e12)
    assert sorted((v.component, v.version) for v in every) == [
        ("nginx", "1.22"),
        ("nginx", "1.24"),
        ("openssl", "3.0.11"),
    ]
    assert [v.version for v in store.versions(STACK, "srv-2", after=0, until=1e12)] == [None]
    assert store.versions("blog", "srv-1", after=0, until=1e12) == []


def test_audit_facts_keep_the_newest_per_server_and_drop_the_gone(store: StateStore) -> None:
    """record_facts keeps one record per server; servers gone from the stack are dropped."""
    store.record_facts(STACK, {"srv-1": {"v": 1}, "srv-2": {"v": 1}}, 100.0)
    store.record_facts(STACK, {"srv-1": {"v": 2}}, 200.0, existing=["srv-1", "srv-3"])
    got = {r.server_id: (r.facts, r.recorded_at, r.source) for r in store.audit_facts(STACK)}
    assert got == {"srv-1": ({"v": 2}, 200.0, "audit")}
    assert store.audit_facts("blog") == []


def test_verified_reports_newest_first(store: StateStore) -> None:
    """The health-gate reports of finished VerifyServers steps, newest first, limited."""
    for n, run in enumerate(("r1", "r2")):
        lease = store.acquire(STACK, run)
        store.create_run(run, THREE, lease)
        store.step_started(run, 1, lease)
        report = {"passed": True, "facts": {"components": {"nginx": f"1.2{n}"}}}
        store.step_done(run, 1, lease, {"reports": {f"srv-{n}": report}})
        store.step_started(run, 0, lease)
        store.step_done(run, 0, lease, {"reports": {"ignored": {}}})  # not a VerifyServers
        store.release(lease)
    got = list(store.verified_reports(STACK, 10))
    assert [(run, sid) for run, _at, sid, _r in got] == [("r2", "srv-1"), ("r1", "srv-0")]
    assert got[0][3]["facts"]["components"] == {"nginx": "1.21"}
    assert got[0][1] >= got[1][1] > 0
    assert [r[0] for r in store.verified_reports(STACK, 1)] == ["r2"]
    assert list(store.verified_reports("blog", 10)) == []


# --- what is written ---------------------------------------------------------------------------
def test_secrets_are_masked_in_everything_the_journal_keeps(
    backend: Backend, store: StateStore
) -> None:
    """I9: plans, outputs, results, errors, event details and facts are stored masked."""
    secret = "hunter2-" + secrets.token_hex(6)
    lease = store.acquire(STACK, "r1")
    store.create_run("r1", plan(("Bake", "Bake"), db={"password": secret}), lease)
    store.step_started("r1", 0, lease)
    store.step_done("r1", 0, lease, {"api_key": secret, "note": f"password={secret}"})
    store.step_failed("r1", 0, lease, f"login failed: password={secret}")
    store.event("r1", lease, "rollback_started", detail=f"token={secret}")
    store.set_status("r1", "dirty", lease, result={"secret": secret}, error=f"password={secret}")
    store.record_facts(STACK, {"srv-1": {"os": {"db_password": secret}}}, 1.0)
    rec, (step,), (event,) = store.get_run("r1"), store.steps("r1"), store.events("r1")
    assert rec is not None
    assert rec.plan["db"]["password"] == "***" and rec.result["secret"] == "***"
    assert step.outputs["api_key"] == "***" and secret not in step.outputs["note"]
    assert secret not in (step.error or "") + (event.detail or "") + (rec.error or "")
    assert store.audit_facts(STACK)[0].facts["os"]["db_password"] == "***"
    assert secret.encode() not in backend.raw()


def test_large_entries_round_trip(store: StateStore) -> None:
    """A plan and outputs far larger than a DynamoDB item (400 KB) read back whole."""
    noise = [secrets.token_hex(64) for _ in range(12_000)]  # ~1.5 MB, poorly compressible
    steps = [(f"Step#{i}", "Bake") for i in range(2000)]
    big = plan(*steps, notes=noise[:4000])
    lease = store.acquire(STACK, "r1")
    store.create_run("r1", big, lease)
    store.step_started("r1", 1999, lease)
    store.step_done("r1", 1999, lease, {"lines": noise})
    store.set_status("r1", "succeeded", lease, outcome="succeeded", result={"lines": noise})
    rec = store.get_run("r1")
    assert rec is not None and rec.plan == big and rec.result == {"lines": noise}
    got = store.steps("r1")
    assert len(got) == 2000 and got[1999].outputs == {"lines": noise}
    assert [r.id for r in store.runs(STACK)] == ["r1"]
    assert store.runs(STACK)[0].result == {"lines": noise}
    store.step_done("r1", 1999, lease, {"lines": noise[:3]})  # chunked, then inline again
    assert store.steps("r1")[1999].outputs == {"lines": noise[:3]}
