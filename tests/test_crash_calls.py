"""Kill inside steps: SIGKILL at every mutating provider call, then resume or roll back.

`CHANGEOVER_CRASH_AFTER_CALL=N` kills changeover right after its Nth mutating provider
call returns (the world changed, the journal has not heard of it);
`CHANGEOVER_CRASH_BEFORE_CALL=N` right before the Nth is sent (the step began, the call
never went out). Each test scans N = 1, 2, ... on a fresh world until the run finishes
without being killed, so it covers every mutating call the run makes, however many
retries the timing causes. A light load runs through the address during the killed run
and the recovery, so "every acknowledged write is present" is checked on real writes. A
scan keeps one world: each trial starts from the stack the previous recovery left.

After each trial: the run ended succeeded or rolled back (or, past a point of no return,
`rollback` refused with exit 2 and `resume` finished it); I1 and I2 from the call
journal; I4 (nothing the run created is alive and not serving); I6 after a rollback
before retirement; every acknowledged write present on the serving db.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from orchestrator.rehearse import World
from tests.crash_tally import record
from tests.invariants import check_call_order, check_serving_only, journal_steps, run_status

SCAN_LIMIT = 40  # far above the calls of these runs; a bound, not a target
LOAD = {"rate": 40.0, "connections": 2}


@dataclass
class Before:
    """The world before the run, to check I6 against."""

    members: list[str]
    servers: set[str]
    mark: int  # the cloud's call journal up to here is an earlier trial's
    db: str
    rows: dict[int, str]


def _snapshot(world: World) -> Before:
    db = world.data_server()
    return Before(
        sorted(world.members()),
        set(world.live_servers()),
        world.cloud.last_call_id(),
        db,
        world.db_rows(db),
    )


def _killed_run(world: World, strategy: str, hook: str, n: int | str) -> str | None:
    """Run `strategy` with the kill hook at call n; the run id if it was killed."""
    proc = world.cli(strategy, "demo", "--yes", env={hook: str(n)})
    if proc.returncode == 0:
        return None  # n is past the run's last mutating call
    assert proc.returncode == -9, f"{hook}={n}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    run_id, _ = journal_steps(world)
    return run_id


def _past_point_of_no_return(world: World, run_id: str) -> bool:
    _, steps = journal_steps(world, run_id)
    return any(
        s["state"] in ("started", "failed") and s["outputs"].get("point_of_no_return")
        for s in steps
    )


def _recover(world: World, run_id: str, then: str, where: str) -> str:
    """resume or rollback; past a point of no return, rollback must refuse and resume
    finish. Returns the run's final status."""
    proc = world.cli(then, run_id)
    if then == "rollback" and proc.returncode == 2:
        assert _past_point_of_no_return(world, run_id), f"{where}: refused\n{proc.stderr}"
        assert f"changeover resume {run_id}" in proc.stderr, proc.stderr
        proc = world.cli("resume", run_id)
        then = "resume"
    want = 0 if then == "resume" else 1
    assert proc.returncode == want, f"{where}: {then} exit {proc.returncode}\n{proc.stderr[-3000:]}"
    status = run_status(world, run_id)
    assert status == ("succeeded" if then == "resume" else "rolled_back"), f"{where}: {status}"
    return status


def _check(world: World, before: Before, run_id: str, status: str, where: str) -> None:
    check_call_order(world, before.members, since=before.mark)
    check_serving_only(world, run_id)
    members = world.members()
    live = world.live_servers()
    assert len(members) == len(before.members), f"{where}: serving count {members}"
    if status == "rolled_back" and not set(before.servers) - set(live):
        # Nothing of the old stack was destroyed: it must be exactly as it was (I6).
        assert sorted(members) == before.members, f"{where}: I6 address {members}"
        assert set(live) == before.servers, f"{where}: I6 servers"
        assert world.db_mode(before.db) == "normal", f"{where}: old db left frozen"
    rows = world.db_rows(world.data_server())
    assert all(rows.get(i) == p for i, p in before.rows.items()), f"{where}: rows lost"


def _trial(world: World, strategy: str, hook: str, n: int, then: str) -> bool:
    """One kill at call n and its recovery, under load. False once n is past the end."""
    before = _snapshot(world)
    where = f"{strategy} {hook}={n} then {then}"
    with world.load(**LOAD) as gen:
        run_id = _killed_run(world, strategy, hook, n)
        status = _recover(world, run_id, then, where) if run_id else "succeeded"
    result = gen.stop()
    assert world.lost_writes(result) == [], f"{where}: acknowledged writes lost"
    if run_id is None:
        return False
    _check(world, before, run_id, status, where)
    return True


def _scan(make_world: Callable[..., World], strategy: str, hook: str, then: str) -> int:
    # One world for the whole scan: each recovery leaves a clean, serving stack (that is
    # what is being checked), which is where the next trial starts.
    world = make_world()
    for n in range(1, SCAN_LIMIT + 1):
        if not _trial(world, strategy, hook, n, then):
            record(f"{strategy}, kill {hook.split('_')[2].lower()} call, then {then}", n - 1)
            return n - 1
    raise AssertionError(f"{strategy} still being killed at call {SCAN_LIMIT}")


STRATEGIES = ["rebuild", "rotate"]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("then", ["resume", "rollback"])
def test_kill_after_every_mutating_call(
    make_world: Callable[..., World], strategy: str, then: str
) -> None:
    """The world changed, the journal does not know yet: resume or rollback ends clean."""
    assert _scan(make_world, strategy, "CHANGEOVER_CRASH_AFTER_CALL", then) >= 6


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_kill_before_every_mutating_call(make_world: Callable[..., World], strategy: str) -> None:
    """The step began, its call never went out: rollback ends clean (or, past the point
    of no return, refuses and resume finishes)."""
    assert _scan(make_world, strategy, "CHANGEOVER_CRASH_BEFORE_CALL", "rollback") >= 6


# Where to stop the first run so its rollback has the most to undo: right after cutover.
CUTOVER = {"rebuild": "set_members", "rotate": "set_members:2"}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("hook", ["CHANGEOVER_CRASH_AFTER_CALL", "CHANGEOVER_CRASH_BEFORE_CALL"])
def test_kill_during_rollback_then_rollback_again(
    make_world: Callable[..., World], strategy: str, hook: str
) -> None:
    """Killed after cutover, then the rollback itself is killed at each of its mutating
    calls; `rollback` again finishes it: the old stack serves, clean, no write lost."""
    world = make_world()
    for n in range(1, SCAN_LIMIT + 1):
        before = _snapshot(world)
        where = f"{strategy} rollback killed at {hook}={n}"
        with world.load(**LOAD) as gen:
            run_id = _killed_run(world, strategy, "CHANGEOVER_CRASH_AFTER_CALL", CUTOVER[strategy])
            assert run_id is not None, f"{where}: the first run was not killed"
            proc = world.cli("rollback", run_id, env={hook: str(n)})
            killed = proc.returncode == -9
            if killed:
                proc = world.cli("rollback", run_id)
            assert proc.returncode == 1, f"{where}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        result = gen.stop()
        assert world.lost_writes(result) == [], f"{where}: acknowledged writes lost"
        assert run_status(world, run_id) == "rolled_back"
        _check(world, before, run_id, "rolled_back", where)
        if not killed:
            record(f"{strategy}, rollback killed {hook.split('_')[2].lower()} call", n - 1)
            assert n > 2
            return
    raise AssertionError(f"rollback still being killed at call {SCAN_LIMIT}")
