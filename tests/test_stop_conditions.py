"""Stop conditions for `rotate` (strategies/stop.py): the meltdown stop (--max-unhealthy)
and min-healthy, each checked before a batch creates anything, end to end on the local
cloud. A new server fails after it was put in service by a real fault: its process is
killed while changeover is stopped between batches (a crash hook), then `resume`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from orchestrator.rehearse import World
from providers.local.http import request
from providers.local.provider import LocalProvider
from strategies.rotate import plan_rotate
from tests.invariants import journal_steps, run_status

THREE_WEB = {"db": {"count": 1, "data": True}, "web": {"count": 3}}


def _kill(world: World, server_id: str) -> None:
    """The local cloud's fault: the server's process dies (it stays registered)."""
    world.cloud.kill_server(server_id)
    deadline = time.monotonic() + 10
    while server_id in world.live_servers():
        assert time.monotonic() < deadline, f"{server_id} still alive"
        time.sleep(0.05)


def _stopped_after_batches(world: World, batches: int, *args: str) -> tuple[str, list[str]]:
    """Start a rotate that is SIGKILLed right after batch `batches` destroyed its old
    server; return the run id and the new servers so far, in batch order."""
    env = {"CHANGEOVER_CRASH_AFTER_CALL": f"destroy_servers:{batches}"}
    proc = world.cli("rotate", "demo", "--yes", "--max-surge", "1", *args, env=env)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run_id, steps = journal_steps(world)
    creates = [_output(steps, f"CreateServers#{n}") for n in range(1, batches + 1)]
    new = [i for out in creates for i in out["created"]]
    return run_id, new


def _output(steps: list[dict[str, Any]], key: str) -> dict[str, Any]:
    out: dict[str, Any] = next(s for s in steps if s["key"] == key)["outputs"]
    return out


def _mutations(world: World, since: int) -> list[str]:
    return [c["op"] for c in world.cloud.calls(since) if c["mutating"]]


@pytest.mark.slow
def test_meltdown_stop_fires_before_creating_more(make_world: Callable[..., World]) -> None:
    """1 of the 2 new servers replaced so far dies (50%, above the default 34%): the
    resumed run stops before batch 3 creates anything (exit 1), says the meltdown stop
    fired and names the server; the batches done stay, the third old server serves."""
    world = make_world(roles=THREE_WEB)
    run_id, new = _stopped_after_batches(world, 2)
    _kill(world, new[0])
    mark = world.cloud.last_call_id()
    code, out = world.cli_json("resume", run_id)
    assert code == 1, out.get("_stderr")
    assert out["outcome"] == "rolled_back" and run_status(world, run_id) == "rolled_back"
    assert out["message"].startswith(
        "CheckStopConditions#3 failed: meltdown stop before batch 3: 1 of 2 new servers "
        "(50%) failed verification, above --max-unhealthy 34%: stopped before creating more "
        f"({new[0]}: stopped)"
    )
    assert "create_servers" not in _mutations(world, mark)
    _, steps = journal_steps(world, run_id)
    assert _output(steps, "CreateServers#3") == {}  # never begun
    serving = set(world.members())
    assert new[1] in serving and len(serving & set(world.live_servers())) == 2


def _fail_health(world: World, server_id: str) -> None:
    """The local cloud's fault: the server keeps running, its /health answers 503."""
    port = world.db_port(server_id)  # every local server keeps its port in the same file
    request(port, "POST", "/admin/fault", {"health_fail": True}, token=world.cloud.control_token)


@pytest.mark.slow
def test_within_max_unhealthy_the_run_goes_on(make_world: Callable[..., World]) -> None:
    """The first new server starts failing its health check after 2 batches: with
    --max-unhealthy 50 that is within the budget (50% is not above it), so the run
    replaces the third server too (exit 0); the check journals the failing server, and
    the default budget (34%) would have stopped."""
    world = make_world(roles=THREE_WEB)
    run_id, new = _stopped_after_batches(world, 2, "--max-unhealthy", "50")
    _fail_health(world, new[0])
    code, out = world.cli_json("resume", run_id)
    assert code == 0, out.get("_stderr")
    _, steps = journal_steps(world, run_id)
    check = _output(steps, "CheckStopConditions#3")
    assert list(check["unhealthy"]) == [new[0]] and check["unhealthy_pct"] == 50.0
    assert check["unhealthy"][new[0]].startswith("health check failed")
    assert len(out["servers"]["created"]) == 3 and new[0] in world.members()


@pytest.mark.slow
def test_min_healthy_stops_the_run_mid_way(make_world: Callable[..., World]) -> None:
    """After batch 1 its new server dies: replacing the second old server would leave 1
    serving of 2, below min-healthy 100%. The run stops (exit 1) before batch 2 creates
    anything, and the second old server still serves: the stack is touched no further."""
    world = make_world()
    run_id, new = _stopped_after_batches(world, 1, "--max-unhealthy", "100")
    _kill(world, new[0])
    old = [m for m in world.members() if m != new[0]]
    mark = world.cloud.last_call_id()
    code, out = world.cli_json("resume", run_id)
    assert code == 1, out.get("_stderr")
    assert out["message"].startswith(
        "CheckStopConditions#2 refused: stopped before batch 2: demo-eip has 1 serving "
        f"server(s) of 2 ({new[0]} not serving), and replacing {old[0]} would leave 1, "
        "below --min-healthy 100% (2)"
    )
    assert _mutations(world, mark) == []
    assert old[0] in world.members() and old[0] in world.live_servers()


@pytest.mark.slow
def test_min_healthy_refuses_before_anything_is_touched(
    make_world: Callable[..., World],
) -> None:
    """A stack already short of servers: replacing the first would leave fewer serving
    than min-healthy, so the run stops before creating anything: exit 2, nothing touched."""
    world = make_world()
    plan = plan_rotate(LocalProvider(world.cloud), "demo", world.config)
    first = plan.steps[0].params["replacing"][0]
    other = next(m for m in world.members() if m != first)
    _kill(world, other)
    mark = world.cloud.last_call_id()
    code, out = world.cli_json("rotate", "demo", "--yes")
    assert code == 2, out.get("_stderr")
    assert out["message"].startswith(
        f"CheckStopConditions#1: stopped before batch 1: demo-eip has 1 serving server(s) "
        f"of 2 ({other} not serving)"
    )
    assert "Nothing of batch 1 was begun" in out["message"]
    assert _mutations(world, mark) == []


@pytest.mark.slow
def test_rollback_puts_the_old_server_back_past_a_dead_new_one(
    make_world: Callable[..., World],
) -> None:
    """Killed right after RemoveMembers#1 (the new server serves alone), then the new
    server dies. `rollback` puts the old server back: the local address refuses a member
    that is not running, so the dead one is left out of the set rather than making the
    undo fail and the run dirty (exit 1, the old servers serve, the dead one destroyed)."""
    world = make_world()
    before = sorted(world.members())
    env = {"CHANGEOVER_CRASH_AFTER_STEP": "6"}  # Check, Create, Wait, Verify, Add, Remove
    proc = world.cli("rotate", "demo", "--yes", "--max-surge", "1", env=env)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run_id, steps = journal_steps(world)
    assert steps[5]["key"] == "RemoveMembers#1" and steps[5]["state"] == "done"
    new = _output(steps, "CreateServers#1")["created"]
    _kill(world, new[0])
    code, out = world.cli_json("rollback", run_id)
    assert code == 1, out.get("_stderr")
    assert out["outcome"] == "rolled_back" and run_status(world, run_id) == "rolled_back"
    assert sorted(world.members()) == before
    assert new[0] not in world.live_servers()
