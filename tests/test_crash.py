"""Crash at every step: SIGKILL after each journaled step, then resume or roll back."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from orchestrator.rehearse import World
from tests.invariants import (
    check_call_order,
    check_serving_only,
    journal_steps,
    run_status,
)

REBUILD_STEPS = 12  # 2 CreateServers, WaitRunning, VerifyServers, 4 data, 4 cutover/bake/retire
ROTATE_STEPS = 16  # 2 batches of 8 (surge 1 over 2 web servers)
RETIRE_STEP = 12


def _crash(world: World, strategy: str, step: int) -> str:
    code = world.cli(
        strategy, "demo", "--yes", env={"CHANGEOVER_CRASH_AFTER_STEP": str(step)}
    ).returncode
    assert code == -9, f"expected SIGKILL after step {step}, got exit {code}"
    run_id, steps = journal_steps(world)
    assert [s["state"] for s in steps[:step]] == ["done"] * step
    return run_id


@pytest.mark.slow
@pytest.mark.parametrize("step", range(1, REBUILD_STEPS + 1))
def test_rebuild_resume_after_kill(make_world: Callable[..., World], step: int) -> None:
    """A rebuild killed after any step is completed by `resume`; I1, I2 and I4 hold."""
    world = make_world()
    before = world.members()
    old_servers = set(world.live_servers())
    run_id = _crash(world, "rebuild", step)
    proc = world.cli("resume", run_id)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert run_status(world, run_id) == "succeeded"
    members = world.members()
    assert members and not set(members) & old_servers
    assert {world.live_servers()[m]["generation"] for m in members} == {2}
    assert not set(world.live_servers()) & old_servers, "old generation still running"
    _, steps = journal_steps(world, run_id)
    verified = set(steps[3]["outputs"]["passed"])
    assert set(members) <= verified, "I1: serving servers that did not pass verification"
    check_call_order(world, before)
    check_serving_only(world, run_id)


@pytest.mark.slow
@pytest.mark.parametrize("step", range(1, REBUILD_STEPS + 1))
def test_rebuild_rollback_after_kill(make_world: Callable[..., World], step: int) -> None:
    """A rebuild killed after any step before retiring is rolled back to the old stack (I6)."""
    world = make_world()
    before = sorted(world.members())
    old_servers = set(world.live_servers())
    old_db = world.data_server()
    rows_before = world.db_rows(old_db)
    run_id = _crash(world, "rebuild", step)
    proc = world.cli("rollback", run_id)
    if step == RETIRE_STEP:
        # Every step is done, the old generation is gone: nothing to undo, resume ends it.
        assert proc.returncode == 2 and "nothing to roll back" in proc.stderr
        assert world.cli("resume", run_id).returncode == 0
        check_serving_only(world, run_id)
        return
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert run_status(world, run_id) == "rolled_back"
    assert sorted(world.members()) == before
    assert set(world.live_servers()) == old_servers, "I6: old stack changed"
    assert world.db_mode(old_db) == "normal"
    assert world.db_rows(old_db) == rows_before
    check_call_order(world, before)
    check_serving_only(world, run_id)


@pytest.mark.slow
@pytest.mark.parametrize("step", range(1, ROTATE_STEPS + 1))
@pytest.mark.parametrize("then", ["resume", "rollback"])
def test_rotate_kill_then_resume_or_rollback(
    make_world: Callable[..., World], step: int, then: str
) -> None:
    """A rotate killed after any step is finished by resume, or stopped cleanly by rollback."""
    world = make_world()
    before = world.members()
    run_id = _crash(world, "rotate", step)
    proc = world.cli(then, run_id)
    if then == "rollback" and step == ROTATE_STEPS:
        assert proc.returncode == 2 and "nothing to roll back" in proc.stderr
        proc = world.cli("resume", run_id)
    members = world.members()
    live = world.live_servers()
    if then == "resume" or step == ROTATE_STEPS:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert {live[m]["generation"] for m in members} == {2}
    else:
        assert proc.returncode == 1, proc.stderr[-2000:]
        # Rollback undoes the unfinished batch; a batch whose old server was destroyed
        # stays replaced (destroy is irreversible), so 0 or 1 servers are new.
        batches_done = step // (ROTATE_STEPS // 2)
        new = [m for m in members if live[m]["generation"] == 2]
        assert len(new) == batches_done
    assert len(members) == 2, "serving count changed"
    check_call_order(world, before)
    check_serving_only(world, run_id)
