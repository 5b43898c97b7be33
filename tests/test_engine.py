"""The engine against the real local cloud: retries, the health gate, bake, dirty, fencing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from structlog.testing import capture_logs

from orchestrator import events
from orchestrator.db import connect
from orchestrator.engine import Engine
from orchestrator.errors import FencedError, LockedError
from orchestrator.journal import Journal
from orchestrator.lock import LeaseLock
from orchestrator.plan import Outcome
from orchestrator.rehearse import World
from providers.local.daemon import kill_pid
from providers.local.provider import LocalProvider
from strategies.rebuild import plan_rebuild
from tests.invariants import check_call_order, check_serving_only


def _engine(world: World) -> Engine:
    return Engine(
        state_dir=world.state_dir, provider=LocalProvider(world.cloud), config=world.config
    )


def _rebuild(world: World, **kw: float) -> tuple[Engine, Outcome, str, str]:
    engine = _engine(world)
    plan = plan_rebuild(engine.provider, "demo", world.config, **kw)
    result = engine.start(plan)
    engine.close()
    assert result.run_id is not None
    return engine, result.outcome, result.message, result.run_id


def test_transient_provider_errors_are_retried_and_logged(world: World) -> None:
    """Injected throttling on create and repoint is retried; each retry is a log event."""
    world.cloud.inject("fail_call", op="create_servers", times=2, error="transient")
    world.cloud.inject("fail_call", op="set_members", times=1, error="transient")
    with capture_logs() as logs:
        _, outcome, message, _ = _rebuild(world)
    assert outcome == Outcome.SUCCEEDED, message
    retries = [e for e in logs if e["event"] == events.STEP_RETRY]
    assert {e["step"] for e in retries} >= {"CreateServers[db]", "RepointAddress"}


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ({"health_fail": True}, "health check failed"),
        ({"hold_packages": ["openssl"]}, "pending upgrade"),
        ({"keep_reboot_required": True}, "reboot required"),
    ],
)
def test_health_gate_failure_rolls_back_without_moving_the_address(
    world: World, fault: dict[str, object], reason: str
) -> None:
    """A fresh server failing app health or hygiene: exit 1, address never moved, new gone."""
    before = world.members()
    old = set(world.live_servers())
    mark = world.cloud.last_call_id()
    world.cloud.inject("server", role="web", times=1, **fault)
    _, outcome, message, run_id = _rebuild(world)
    assert outcome == Outcome.ROLLED_BACK and outcome.exit_code == 1
    assert reason in message
    assert world.members() == before
    assert not [c for c in world.cloud.calls(mark) if c["op"] == "set_members"]
    assert set(world.live_servers()) == old
    check_serving_only(world, run_id)


def test_bake_failure_points_the_address_back_and_keeps_writes(world: World) -> None:
    """A new server dying during bake: address points back, every acked write survives."""
    before = world.members()
    stop = threading.Event()

    def kill_new_server_after_cutover() -> None:
        while not stop.is_set():
            members = world.members()
            if set(members) != set(before):
                time.sleep(0.3)
                world.cloud.kill_server(members[0])
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_new_server_after_cutover)
    killer.start()
    try:
        with world.load(rate=150) as gen:
            _, outcome, message, _ = _rebuild(world, bake=3.0)
            time.sleep(0.3)
        result = gen.stop()
    finally:
        stop.set()
        killer.join()
    assert outcome == Outcome.ROLLED_BACK, message
    assert "bake failed" in message
    assert world.members() == before
    assert world.lost_writes(result) == []
    assert result.acked_writes
    check_call_order(world, before)


def test_failed_undo_is_dirty_and_names_resources(world: World) -> None:
    """An undo that fails makes the run dirty (exit 3) with each resource's state; a later
    rollback, once the cause is fixed, finishes cleanly."""
    world.cloud.inject("server", role="web", times=1, health_fail=True)
    world.cloud.inject("fail_call", op="destroy_servers", times=-1, error="fatal")
    _, outcome, message, run_id = _rebuild(world)
    assert outcome == Outcome.DIRTY and outcome.exit_code == 3
    assert f"changeover rollback {run_id}" in message
    conn = connect(world.state_dir)
    rec = Journal(conn, LeaseLock(conn)).get_run(run_id)
    conn.close()
    assert rec is not None and rec.status == "dirty"
    servers = rec.result["resources"]["servers"]
    assert any(s["created_by_this_run"] and not s["serving"] for s in servers)
    assert "changeover rollback" in world.cli("status", run_id).stdout
    # The stack stays held until the dirty run is dealt with.
    assert world.cli("rebuild", "demo", "--yes").returncode == 4
    world.cloud.clear_faults()
    proc = world.cli("rollback", run_id)
    assert proc.returncode == 1, proc.stderr
    check_serving_only(world, run_id)


def test_lease_fencing_refuses_a_broken_holder(world: World) -> None:
    """I5: after unlock --force, the old holder can no longer write to the journal."""
    conn = connect(world.state_dir)
    lock = LeaseLock(conn, ttl=30)
    lease = lock.acquire("demo", "run-a")
    with pytest.raises(LockedError, match="locked by run run-a"):
        LeaseLock(connect(world.state_dir), ttl=30).acquire("demo", "run-b")
    assert lock.break_lock("demo") == "run-a"
    newer = lock.acquire("demo", "run-b")
    assert newer.token > lease.token
    with pytest.raises(FencedError):
        lock.check(lease)
    with pytest.raises(FencedError):
        lock.renew(lease)
    conn.close()


def test_expired_lease_can_be_taken(make_world: Callable[..., World]) -> None:
    """A lease past its TTL no longer blocks another run."""
    world = make_world(up=False)
    now = [1000.0]
    conn = connect(world.state_dir)
    lock = LeaseLock(conn, ttl=5, clock=lambda: now[0])
    lock.acquire("demo", "run-a")
    now[0] += 6
    assert lock.acquire("demo", "run-b").run_id == "run-b"
    conn.close()


def test_dead_address_proxy_comes_back_on_its_port_with_its_members(world: World) -> None:
    """The local cloud restarts a dead address proxy on first use, same port and holder."""
    port, members = world.address_port, world.members()
    info = world.cloud.address("demo", "demo-eip")
    assert info is not None
    kill_pid(info.pid)
    assert world.cloud.address("demo", "demo-eip") is None
    provider = LocalProvider(world.cloud)
    assert provider.get_members("demo", "demo-eip") == members
    assert world.address_port == port
    assert provider.probe_address("demo", "demo-eip", "/health")[0] == 200


def test_lease_is_renewed_while_a_step_blocks(world: World) -> None:
    """I5: a step blocked longer than the lease TTL keeps the lease (heartbeat thread), so a
    competing run is refused meanwhile and the blocked run still finishes."""
    world.cloud.inject("latency", op="set_members", times=1, seconds=3.0)
    engine = Engine(
        state_dir=world.state_dir,
        provider=LocalProvider(world.cloud),
        config=world.config,
        lock_ttl=1.5,
    )
    plan = plan_rebuild(engine.provider, "demo", world.config)
    refused: list[str] = []

    def compete() -> None:
        conn = connect(world.state_dir)
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not refused:
                if world.cloud.calls() and any(
                    c["op"] == "set_members" for c in world.cloud.calls()[-3:]
                ):
                    time.sleep(2.0)  # well past the 1.5 s TTL, still inside the 3 s call
                    try:
                        LeaseLock(conn, ttl=1.5).acquire("demo", "intruder")
                        refused.append("acquired")
                    except LockedError as exc:
                        refused.append(str(exc))
                time.sleep(0.05)
        finally:
            conn.close()

    t = threading.Thread(target=compete)
    t.start()
    result = engine.start(plan)
    t.join()
    engine.close()
    assert result.outcome == Outcome.SUCCEEDED, result.message
    assert refused and "locked by run" in refused[0]
