"""A sliding-window rotate on the local cloud (orchestrator/lanes.py): real server
processes, the real proxy, changeover as a subprocess. At most --max-surge replacements
are in flight; one slow boot holds up only its own lane; a failed lane undoes the lanes in
flight with it; a kill while several replacements are in different stages is finished by
`resume` or cleanly stopped by `rollback` (the finished ones stay)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, cast

import pytest

from orchestrator.lanes import Lane, LaneScheduler
from orchestrator.plan import Plan, RunContext, Step, StepResult
from orchestrator.rehearse import World
from tests.invariants import check_call_order, check_serving_only, journal_steps, run_status

FOUR_WEB = {"db": {"count": 1, "data": True}, "web": {"count": 4}}
LANE_STEPS = 8  # CheckStopConditions, Create, Wait, Verify, Add, Remove, Drain, Destroy
ROTATE_4x2 = 4 * LANE_STEPS


def _by_key(steps: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {s["key"]: s for s in steps}


def _spans(steps: list[dict[str, Any]], lanes: int) -> list[tuple[float, float]]:
    rows = _by_key(steps)
    return [
        (rows[f"CheckStopConditions#{n}"]["started_at"], rows[f"DestroyServers#{n}"]["ended_at"])
        for n in range(1, lanes + 1)
    ]


def _stages(steps: list[dict[str, Any]]) -> dict[int, str]:
    """Lanes begun and not finished -> the step each is at (begun, not done)."""
    at: dict[int, str] = {}
    for s in steps:
        lane = s["key"].split("#")[1]
        if s["state"] == "started" or (s["state"] == "done" and s["name"] != "DestroyServers"):
            at[int(lane)] = s["name"] if s["state"] == "started" else f"after {s['name']}"
        if s["state"] == "done" and s["name"] == "DestroyServers":
            at.pop(int(lane), None)
    return at


@pytest.mark.slow
def test_a_slow_boot_holds_up_only_its_own_lane(make_world: Callable[..., World]) -> None:
    """4 web servers, --max-surge 2, the first new server boots 4 s late: lanes 3 and 4
    begin while lane 1 still waits for its boot, and never more than 2 are in flight."""
    world = make_world(roles=FOUR_WEB)
    old = set(world.members())
    world.cloud.inject("server", times=1, role="web", boot_delay=4.0)
    code, out = world.cli_json("rotate", "demo", "--yes", "--max-surge", "2")
    assert code == 0, out.get("_stderr")
    run_id, steps = journal_steps(world)
    spans = _spans(steps, 4)
    assert spans[2][0] < spans[0][1] and spans[3][0] < spans[0][1], spans
    for t, _ in spans:
        assert sum(1 for a, b in spans if a <= t < b) <= 2, "more than --max-surge in flight"
    members = world.members()
    assert len(members) == 4 and not set(members) & old
    assert not set(world.live_servers()) & old
    check_call_order(world, sorted(old))
    check_serving_only(world, run_id)


@pytest.mark.slow
def test_a_failed_lane_undoes_the_lanes_in_flight(make_world: Callable[..., World]) -> None:
    """3 web servers, --max-surge 3: every new server boots 1.5 s late and the first one
    fails its health check. Its lane fails verification while the other two are in
    flight: they are undone with it (exit 1), every old server serves, no new one is left."""
    world = make_world(roles={"db": {"count": 1, "data": True}, "web": {"count": 3}})
    old = sorted(world.members())
    world.cloud.inject("server", times=3, role="web", boot_delay=1.5)
    world.cloud.inject("server", times=1, role="web", health_fail=True)
    code, out = world.cli_json("rotate", "demo", "--yes", "--max-surge", "3")
    assert code == 1, out.get("_stderr")
    assert out["outcome"] == "rolled_back"
    assert out["message"].startswith("VerifyServers#1 failed"), out["message"]
    assert "#2, #3 were in flight too and are undone with it" in out["message"]
    assert sorted(world.members()) == old
    assert set(world.live_servers()) - {world.data_server()} == set(old)
    run_id, _ = journal_steps(world)
    check_call_order(world, old)
    check_serving_only(world, run_id)


# A kill after each of these steps of a 4-server rotate with --max-surge 2 (32 steps):
# each leaves two replacements in flight, at different stages, or one in flight and one
# finished. Every step is covered by one of resume or rollback.
@pytest.mark.slow
@pytest.mark.parametrize("step", range(1, ROTATE_4x2 + 1))
def test_kill_with_replacements_in_different_stages(
    make_world: Callable[..., World], step: int
) -> None:
    then = "resume" if step % 2 else "rollback"
    world = make_world(roles=FOUR_WEB)
    before = sorted(world.members())
    code = world.cli(
        "rotate",
        "demo",
        "--yes",
        "--max-surge",
        "2",
        env={"CHANGEOVER_CRASH_AFTER_STEP": str(step)},
    ).returncode
    assert code == -9, f"expected SIGKILL after step {step}, got exit {code}"
    run_id, steps = journal_steps(world)
    assert sum(1 for s in steps if s["state"] == "done") == step
    assert len(_stages(steps)) <= 2, f"more than --max-surge in flight: {_stages(steps)}"
    finished = [s for s in steps if s["name"] == "DestroyServers" and s["state"] == "done"]
    proc = world.cli(then, run_id)
    members = world.members()
    live = world.live_servers()
    if then == "resume" or step == ROTATE_4x2:
        if then == "rollback":
            assert proc.returncode == 2 and "nothing to roll back" in proc.stderr
            proc = world.cli("resume", run_id)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert run_status(world, run_id) == "succeeded"
        assert {live[m]["generation"] for m in members} == {2}
    else:
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert run_status(world, run_id) == "rolled_back"
        # The finished replacements stay; those in flight are undone.
        new = [m for m in members if live[m]["generation"] == 2]
        assert len(new) == len(finished), (new, finished)
        assert all(live[m]["generation"] in (1, 2) for m in members)
    assert len(members) == 4, "serving count changed"
    assert not set(live) - set(members) - {world.data_server()}, "a server left behind"
    check_call_order(world, before)
    check_serving_only(world, run_id)


@pytest.mark.slow
@pytest.mark.parametrize("then", ["resume", "rollback"])
def test_kill_mid_destroy_while_another_lane_boots(
    make_world: Callable[..., World], then: str
) -> None:
    """The first new server boots 4 s late. The run is killed right after the first
    destroy call (lane 2's: it replaced its server meanwhile), before that step was
    journaled done: lane 1 waits for its boot, lane 2 is past its point of no return.
    `resume` finishes both. `rollback` finishes lane 2's destroy (it can only go
    forward), keeps lane 2, undoes lane 1 and never starts the others (exit 1)."""
    world = make_world(roles=FOUR_WEB)
    before = sorted(world.members())
    world.cloud.inject("server", times=1, role="web", boot_delay=4.0)
    env = {"CHANGEOVER_CRASH_AFTER_CALL": "destroy_servers:1"}
    proc = world.cli("rotate", "demo", "--yes", "--max-surge", "2", env=env)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run_id, steps = journal_steps(world)
    rows = _by_key(steps)
    assert _stages(steps) == {1: "WaitRunning", 2: "DestroyServers"}, _stages(steps)
    assert rows["DestroyServers#2"]["outputs"].get("point_of_no_return") == "destroy_servers"
    proc = world.cli(then, run_id)
    members = world.members()
    live = world.live_servers()
    if then == "resume":
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert {live[m]["generation"] for m in members} == {2}
    else:
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert run_status(world, run_id) == "rolled_back"
        _, steps = journal_steps(world, run_id)
        rows = _by_key(steps)
        assert rows["DestroyServers#2"]["state"] == "done"
        new = [m for m in members if live[m]["generation"] == 2]
        assert new == rows["CreateServers#2"]["outputs"]["created"]
        assert rows["CreateServers#1"]["undo_state"] == "done"
        assert rows["CheckStopConditions#3"]["state"] == "pending"
    assert len(members) == 4
    assert not set(live) - set(members) - {world.data_server()}, "a server left behind"
    check_call_order(world, before)
    check_serving_only(world, run_id)


@pytest.mark.slow
def test_a_destroy_that_fails_past_its_point_of_no_return_is_resumed_forward(
    make_world: Callable[..., World],
) -> None:
    """The first destroy call of a 4-server rotate (--max-surge 2) fails for good: that
    lane is past its point of no return, so the run ends dirty (exit 3), not rolled back.
    `resume` then goes forward: the destroy is done again and every lane finishes."""
    world = make_world(roles=FOUR_WEB)
    before = sorted(world.members())
    world.cloud.inject("fail_call", op="destroy_servers", times=1, error="fatal")
    code, out = world.cli_json("rotate", "demo", "--yes", "--max-surge", "2")
    assert code == 3, out.get("_stderr")
    assert "past its point of no return" in out["message"], out["message"]
    run_id = out["run_id"]
    proc = world.cli("resume", run_id)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert run_status(world, run_id) == "succeeded"
    members = world.members()
    live = world.live_servers()
    assert len(members) == 4 and {live[m]["generation"] for m in members} == {2}
    assert not set(live) - set(members) - {world.data_server()}, "a server left behind"
    check_call_order(world, before)
    check_serving_only(world, run_id)


# --- the scheduler's polling rules, on their own ------------------------------------------


class _Wait(Step):
    """A stand-in lane step; only its name matters to the rules below."""

    name = "TestWaitA"

    def do(self, ctx: RunContext) -> StepResult:
        return StepResult()


class _OtherWait(_Wait):
    name = "TestWaitB"


class _Prefetching:
    """A provider that shares a poll's reads across lanes (as AWS does: ex_prefetch)."""

    def ex_prefetch(self, stack: str, ids: list[str]) -> None:
        pass


def _scheduler(provider: object, steps: list[Step]) -> LaneScheduler:
    plan = Plan("rotate", "s", steps, params={"in_flight": len(steps)})
    ctx = cast(RunContext, SimpleNamespace(provider=provider))
    return LaneScheduler(cast(Any, None), "r", plan, lease=cast(Any, None), ctx=ctx, records=[])


def _lane(number: int, idx: int, attempts: int) -> Lane:
    return Lane(number, [idx], cast(RunContext, None), attempts=attempts)


def test_lanes_waiting_in_a_kind_the_poll_read_ride_along_where_reads_are_shared() -> None:
    steps: list[Step] = [_Wait(lane=1), _Wait(lane=2), _OtherWait(lane=3), _Wait(lane=4)]
    lanes = [_lane(1, 0, 2), _lane(2, 1, 3), _lane(3, 2, 2), _lane(4, 3, 0)]
    s = _scheduler(_Prefetching(), steps)
    # Lane 1 was due and looked at its wait again: lane 2 waits in the same kind; lane 3
    # waits in another; lane 4 has not made its first look (its first look may act).
    assert [x.number for x in s._riders(lanes, {1}, {"TestWaitA"})] == [2]
    assert s._riders(lanes, {1}, set()) == [], "a poll that looked at no wait again"
    # A provider whose every look is a request of its own: nobody rides.
    assert _scheduler(object(), steps)._riders(lanes, {1}, {"TestWaitA"}) == []


def test_a_wait_that_begins_unseen_is_first_polled_at_a_low_quantile() -> None:
    s = _scheduler(_Prefetching(), [])
    # Boots begin at the launch (seen): the shortest so far is the rule.
    s.waits["WaitRunning"] = [80.0, 42.0, 130.0, 61.0, 50.0]
    assert s._soonest("WaitRunning") == 42.0
    # Status checks begin as the boot ends, seen a poll later: a wait seen late looks
    # short (4 s) and would have every later lane looked at early; the low quantile not.
    s.waits["VerifyServers"] = [20.0, 4.0, 19.5, 12.0, 18.0]
    s.unsure.add("VerifyServers")
    assert s._soonest("VerifyServers") == 12.0
