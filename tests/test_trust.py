"""Trust at the edges: refusals after mutations, points of no return, lost leases.

Each test drives the real engine against the real local cloud, and reads the outcome
from the address, the process table, the journal and the cloud's call journal.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from orchestrator.db import connect
from orchestrator.engine import Engine
from orchestrator.errors import FencedError, LockedError, ResourceGone, TransientError
from orchestrator.lock import LeaseLock
from orchestrator.plan import Outcome
from orchestrator.rehearse import World
from providers.local.daemon import kill_pid
from providers.local.provider import LocalProvider
from strategies.rebuild import plan_rebuild
from tests.invariants import check_call_order, check_serving_only, journal_steps, run_status


def _engine(world: World, **kw: object) -> Engine:
    return Engine(
        state_dir=world.state_dir,
        provider=LocalProvider(world.cloud),
        config=world.config,
        **kw,  # type: ignore[arg-type]
    )


# --- 1. a refusal after something was changed is a failure, not "nothing touched" --------
@pytest.mark.slow
def test_refusal_after_the_freeze_rolls_back_and_unfreezes(world: World) -> None:
    """A PreconditionFailed (a 401/403, a host-key or ownership refusal) raised by a step
    after earlier steps changed the world: the run rolls back (exit 1) and the old db
    takes writes again; it is not reported as 'nothing was touched' (exit 2)."""
    before = world.members()
    old = set(world.live_servers())
    old_db = world.data_server()
    world.cloud.inject("fail_call", op="data_final_sync", times=1, error="refused")
    engine = _engine(world)
    result = engine.start(plan_rebuild(engine.provider, "demo", world.config))
    engine.close()
    assert result.outcome == Outcome.ROLLED_BACK and result.exit_code == 1, result.message
    assert "SyncData refused: injected refusal" in result.message
    assert world.db_mode(old_db) == "normal", "the old db was left frozen"
    assert world.members() == before
    assert set(world.live_servers()) == old
    assert run_status(world, result.run_id or "") == "rolled_back"
    check_serving_only(world, result.run_id or "")


def test_refusal_before_any_change_is_still_a_precondition(world: World) -> None:
    """The same refusal on the very first mutating call: exit 2, nothing touched."""
    old = set(world.live_servers())
    world.cloud.inject("fail_call", op="create_servers", times=1, error="refused")
    engine = _engine(world)
    result = engine.start(plan_rebuild(engine.provider, "demo", world.config))
    engine.close()
    assert result.outcome == Outcome.PRECONDITION_FAILED and result.exit_code == 2
    assert set(world.live_servers()) == old


# --- 2. past the point of no return, rollback refuses and resume finishes ---------------
@pytest.mark.slow
def test_kill_while_retiring_then_rollback_refuses_and_resume_finishes(world: World) -> None:
    """SIGKILL right after the old generation was destroyed, inside RetireServers: rollback
    refuses at once (exit 2, nothing touched) and says resume finishes it; resume does."""
    before = world.members()
    proc = world.cli(
        "rebuild", "demo", "--yes", env={"CHANGEOVER_CRASH_AFTER_CALL": "destroy_servers"}
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    run_id, steps = journal_steps(world)
    retire = steps[-1]
    assert retire["key"] == "RetireServers" and retire["state"] == "started"
    mark = world.cloud.last_call_id()
    members = world.members()
    status = world.cli("status", run_id).stdout
    assert "point of no return of RetireServers" in status and "resume" in status, status
    proc = world.cli("rollback", run_id)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"changeover resume {run_id}" in proc.stderr and "serving" in proc.stderr
    assert not [c for c in world.cloud.calls(mark) if c["mutating"]], "rollback touched things"
    assert world.members() == members
    proc = world.cli("resume", run_id)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert run_status(world, run_id) == "succeeded"
    check_call_order(world, before)
    check_serving_only(world, run_id)


def test_a_stopped_server_is_gone_not_transient(world: World) -> None:
    """A condition that cannot heal is never retried: pointing the address at a stopped
    server raises ResourceGone (a StepFailed), not TransientError."""
    provider = LocalProvider(world.cloud)
    victim = world.members()[0]
    kill_pid(world.live_servers()[victim]["pid"])
    with pytest.raises(ResourceGone, match="stopped"):
        provider.set_members("demo", world.config.address, [victim])
    assert not issubclass(ResourceGone, TransientError)


# --- 4. fencing: a holder that lost its lease makes no further mutating call -------------
@pytest.mark.slow
def test_lease_broken_mid_step_stops_the_old_holder_before_its_next_mutation(
    world: World,
) -> None:
    """Break the lease while a step's provider call is in flight; the step then retries.
    The old holder must not send that retry (or anything else that mutates)."""
    world.cloud.inject("latency", op="create_servers", times=1, seconds=0.6)
    world.cloud.inject("fail_call", op="create_servers", times=1, error="transient")
    engine = _engine(world)
    plan = plan_rebuild(engine.provider, "demo", world.config)
    broke_at: list[int] = []
    mark = world.cloud.last_call_id()

    def breaker() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if any(c["op"] == "create_servers" for c in world.cloud.calls(mark)):
                conn = connect(world.state_dir)
                broke_at.append(world.cloud.last_call_id())
                LeaseLock(conn).break_lock("demo")
                conn.close()
                return
            time.sleep(0.01)

    t = threading.Thread(target=breaker)
    t.start()
    with pytest.raises(FencedError, match="stopped before its next change"):
        engine.start(plan)
    t.join()
    engine.close()
    assert broke_at
    after = [c for c in world.cloud.calls(broke_at[0]) if c["mutating"]]
    assert after == [], f"the fenced holder still mutated: {after}"


def test_lease_taken_over_mid_step_stops_the_old_holder(world: World) -> None:
    """Another holder takes the lease over while a call is in flight (the renewal thread
    notices, Heartbeat.lost): the old holder's retry of that call is never sent."""
    engine = _engine(world, lock_ttl=1.5)
    plan = plan_rebuild(engine.provider, "demo", world.config)
    world.cloud.inject("latency", op="create_servers", times=1, seconds=1.5)
    world.cloud.inject("fail_call", op="create_servers", times=1, error="transient")
    mark = world.cloud.last_call_id()

    def steal() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if any(c["op"] == "create_servers" for c in world.cloud.calls(mark)):
                conn = connect(world.state_dir)
                lock = LeaseLock(conn)
                lock.break_lock("demo")
                lock.acquire("demo", "intruder")  # a newer holder, alive (this process)
                conn.close()
                return
            time.sleep(0.01)

    t = threading.Thread(target=steal)
    t.start()
    with pytest.raises(FencedError):
        engine.start(plan)
    t.join()
    engine.close()
    creates = [c for c in world.cloud.calls(mark) if c["op"] == "create_servers"]
    assert len(creates) == 1, "the retry went out after the lease was taken over"


# --- 4. takeover: refused while the holder is alive, whatever the clock says ------------
@pytest.fixture
def live_holder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., object]]:
    """Start a real process that takes a stack's lease (TTL 1 s) and then stalls."""
    procs: list[subprocess.Popen[str]] = []

    def start(state_dir: object, run_id: str) -> subprocess.Popen[str]:
        code = textwrap.dedent(
            f"""
            import sys, time
            from pathlib import Path
            from orchestrator.db import connect
            from orchestrator.lock import LeaseLock
            LeaseLock(connect(Path({str(state_dir)!r})), ttl=1.0).acquire("demo", {run_id!r})
            print("held", flush=True)
            time.sleep(60)  # stalled: no renewals, the lease expires by the clock
            """
        )
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for p in procs:
        p.kill()
        p.wait(timeout=10)
        if p.stdout is not None:
            p.stdout.close()


def test_takeover_is_refused_while_the_holder_lives(
    make_world: Callable[..., World], live_holder: Callable[..., subprocess.Popen[str]]
) -> None:
    """A stalled holder's lease is past its wall-clock expiry, but its process lives: both
    another run and a resume of the same run are refused. Once it is dead, resume of the
    same run takes it at once."""
    world = make_world(up=False)
    holder = live_holder(world.state_dir, "run-a")
    time.sleep(1.2)  # the 1 s lease has expired by every clock
    conn = connect(world.state_dir)
    lock = LeaseLock(conn, ttl=30)
    for run in ("run-b", "run-a"):
        with pytest.raises(LockedError, match=f"live process {holder.pid}"):
            lock.acquire("demo", run)
    with pytest.raises(LockedError, match="live process"):
        lock.ensure_free("demo")
    holder.kill()
    holder.wait(timeout=10)
    assert lock.acquire("demo", "run-a").run_id == "run-a"
    conn.close()


def test_remote_holder_is_watched_for_a_heartbeat_before_takeover(
    make_world: Callable[..., World],
) -> None:
    """A lease held from another host that looks expired by our clock (clocks differ, or
    jumped) is taken only after a whole heartbeat interval passes without a renewal."""
    world = make_world(up=False)
    conn = connect(world.state_dir)
    now = [5000.0]

    def put_remote(expires_at: float) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO locks VALUES (?,?,?,?,?,?,?)",
            ("demo", "run-far", 7, 1, "another-host", 0.0, expires_at),
        )

    put_remote(now[0] - 1)  # expired by our clock
    # Its clock runs behind ours: each renewal still looks expired to us.
    renewals = iter([now[0] - 0.5])

    def sleep_while_it_renews(_s: float) -> None:
        expires = next(renewals, None)
        if expires is not None:
            put_remote(expires)  # the holder's heartbeat lands meanwhile: it is alive

    lock = LeaseLock(conn, ttl=30, clock=lambda: now[0], sleep=sleep_while_it_renews)
    with pytest.raises(LockedError, match="still renewing"):
        lock.acquire("demo", "run-b")
    put_remote(now[0] - 1)
    lock = LeaseLock(conn, ttl=30, clock=lambda: now[0], sleep=lambda _s: None)
    assert lock.acquire("demo", "run-b").run_id == "run-b"  # silent for an interval: dead
    conn.close()


# --- 6. the I1 replay check counts only verifications that passed -----------------------
def test_replay_check_catches_a_cutover_to_a_server_that_failed_its_gate(world: World) -> None:
    """Point the address (behind the engine's back) at a server whose gate was asked and
    failed: the replay of the call journal must flag it as I1."""
    before = world.members()
    provider = LocalProvider(world.cloud)
    world.cloud.inject("server", role="web", times=1, health_fail=True)
    role = world.config.roles["web"]
    (bad,) = provider.create_servers(
        stack="demo",
        role="web",
        generation=9,
        run_id="r-test",
        count=1,
        image=role.image,
        size=role.size,
        idempotency_key="r-test.bad",
        links={"db": world.data_server()},
    )
    deadline = time.monotonic() + 20
    while provider.describe_servers("demo", [bad.id])[0].state != "running":
        assert time.monotonic() < deadline, "server did not boot"
        time.sleep(0.05)
    report = provider.verify_server(bad, role.health, world.config.hygiene)
    assert not report.passed
    check_call_order(world, before)  # asked, failed, not serving: fine so far
    provider.set_members("demo", world.config.address, [bad.id])
    with pytest.raises(AssertionError, match="I1: address pointed at unverified"):
        check_call_order(world, before)
    provider.set_members("demo", world.config.address, before)


@pytest.mark.slow
def test_a_scheduled_rotation_runs_again_and_then_a_rebuild(world: World) -> None:
    """rotate leaves the db a generation behind the web servers; that is a clean stack:
    the next rotate and a rebuild (which migrates that db) both run."""
    for args in (["rotate"], ["rotate"], ["rebuild"]):
        proc = world.cli(*args, "demo", "--yes")
        assert proc.returncode == 0, f"{args}: {proc.stderr[-2000:]}"
    gens = {s["generation"] for s in world.live_servers().values()}
    assert gens == {4}, gens  # rotate: web 2, rotate: web 3, rebuild: everything 4


@pytest.mark.slow
def test_pointing_back_at_dead_old_servers_fails_at_once_not_for_minutes(world: World) -> None:
    """The bake fails, and the old web servers died meanwhile: the address cannot go back.
    The undo fails at once (no set_members retried for minutes), the run is dirty (exit 3)
    and says what is gone."""
    before = world.members()
    mark = world.cloud.last_call_id()
    stop = threading.Event()

    def kill_old_then_new() -> None:
        while not stop.is_set():
            members = world.members()
            if set(members) != set(before):
                for old in before:
                    world.cloud.kill_server(old)
                time.sleep(0.3)
                world.cloud.kill_server(members[0])
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_old_then_new)
    killer.start()
    try:
        engine = _engine(world)
        result = engine.start(plan_rebuild(engine.provider, "demo", world.config, bake=3.0))
        engine.close()
    finally:
        stop.set()
        killer.join()
    assert result.outcome == Outcome.DIRTY and result.exit_code == 3, result.message
    assert "cannot point the address back" in result.message
    _, steps = journal_steps(world, result.run_id)
    repoint = next(s for s in steps if s["key"] == "RepointAddress")
    assert repoint["undo_state"] == "failed"
    sets = [c for c in world.cloud.calls(mark) if c["op"] == "set_members"]
    assert len(sets) == 1, "only the cutover itself may have set members"
