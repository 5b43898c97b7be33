"""Canaries for `rotate` (strategies/canary.py): the first batch serves, watched through
the address with the stack's gates, before any other server is touched."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from orchestrator.rehearse import World
from providers.local.provider import LocalProvider
from strategies.rotate import plan_rotate
from strategies.window import windowed
from tests.gate_servers import gate_server
from tests.invariants import check_call_order, journal_steps, run_status

FOUR_WEB = {"db": {"count": 1, "data": True}, "web": {"count": 4}}


def keys(plan: Any) -> list[str]:
    return [s.key for s in plan.steps]


def test_plan_replaces_the_canary_first_and_watches_it_before_its_destroy(
    make_world: Callable[..., World],
) -> None:
    """--canary 1 with surge 2 over 4 servers: the canary alone first, then a lane per
    server, 2 in flight (in a campaign: batches of 1, 2, 1); the watch comes after the
    canary's drain and before its destroy, so a failed watch can put the old server
    back; every batch starts with its stop conditions, after a window's gate."""
    world = make_world(roles=FOUR_WEB)
    provider = LocalProvider(world.cloud)
    plan = plan_rotate(provider, "demo", world.config, max_surge=2, canary=1, canary_watch=7)
    removed = [s.params["ids"] for s in plan.steps if s.name == "RemoveMembers"]
    assert [len(b) for b in removed] == [1, 1, 1, 1]
    # The canary is the plan's own sequence; the lanes come after it, 2 in flight.
    assert [s.lane for s in plan.steps if s.name == "RemoveMembers"] == [None, 2, 3, 4]
    assert plan.in_flight == 2
    assert keys(plan)[:9] == [
        "CheckStopConditions#1", "CreateServers#1", "WaitRunning#1", "VerifyServers#1",
        "AddMembers#1", "RemoveMembers#1", "DrainServers#1", "WatchCanary#1",
        "DestroyServers#1",
    ]  # fmt: skip
    watch = plan.steps[7]
    assert watch.params == {
        "sources": ["CreateServers#1"], "role": "web", "seconds": 7, "replacing": removed[0],
    }  # fmt: skip
    assert [k for k in keys(plan) if k.startswith("WatchCanary")] == ["WatchCanary#1"]
    assert plan.params["canary"] == 1 and plan.summary["canary"]["replacing"] == removed[0]

    batches = plan_rotate(
        provider, "demo", world.config, max_surge=2, canary=1, canary_watch=7, lanes=False
    )
    removed = [s.params["ids"] for s in batches.steps if s.name == "RemoveMembers"]
    assert [len(b) for b in removed] == [1, 2, 1]
    campaign = windowed(batches, ["Sat 02:00-05:00 UTC"], 600)
    gates = [i for i, k in enumerate(keys(campaign)) if k.startswith("EnterWindow")]
    assert [keys(campaign)[i + 1] for i in gates] == [f"CheckStopConditions#{n}" for n in (1, 2, 3)]


def test_only_if_needed_defaults_to_one_canary(make_world: Callable[..., World]) -> None:
    """An unattended job's form (--only-if-needed) gets one canary unless told otherwise;
    a plain rotate gets none, and --canary 0 turns it off."""
    world = make_world()
    index = world.cloud.read_package_index()
    index["packages"]["openssl"]["version"] = "3.0.99-1"  # every server now needs a fix
    world.cloud.write_package_index(index)
    provider = LocalProvider(world.cloud)

    needed = plan_rotate(provider, "demo", world.config, only_if_needed=True, live=True)
    assert needed.params["canary"] == 1 and "WatchCanary#1" in keys(needed)
    assert needed.params["canary_watch"] == 60.0  # the default
    plain = plan_rotate(provider, "demo", world.config)
    assert plain.params["canary"] == 0 and "WatchCanary#1" not in keys(plain)
    off = plan_rotate(provider, "demo", world.config, only_if_needed=True, live=True, canary=0)
    assert "WatchCanary#1" not in keys(off)


def _touched(world: World, since: int, others: set[str]) -> tuple[int, set[str]]:
    """After call `since`: how many servers were created, and which of `others` a
    mutating call touched (left an entry point's members, or was destroyed)."""
    created = 0
    touched: set[str] = set()
    for call in world.cloud.calls(since):
        detail = call["detail"] or ""
        ids = {i for i in detail.split(":", 1)[-1].split(",") if i}
        if call["op"] == "create_servers":
            created += int(detail.split(":")[2])
        elif call["op"] == "set_members":
            touched |= others - ids  # set_members names every member it leaves in
        elif call["op"] == "destroy_servers":
            touched |= others & ids
    return created, touched


@pytest.mark.slow
def test_canary_failing_a_gate_is_rolled_back_before_any_other_server_is_touched(
    make_world: Callable[..., World],
) -> None:
    """The canary serves, the stack's gate fails during its watch: exit 1, the canary is
    removed and destroyed, its old server serves again, and no other server was touched
    (the call journal names none, and one server was created in all)."""
    with gate_server(lambda _p, _q: (503, {"status": "degraded"})) as app:
        world = make_world(roles=FOUR_WEB, gates=[{"http": f"{app.url}/slo", "name": "slo"}])
        before = sorted(world.members())
        servers = set(world.live_servers())
        mark = world.cloud.last_call_id()
        code, out = world.cli_json(
            "rotate", "demo", "--yes", "--canary", "1", "--canary-watch", "5"
        )
    assert code == 1, out.get("_stderr")
    run_id, steps = journal_steps(world)
    canary_old = next(s for s in steps if s["key"] == "RemoveMembers#1")["outputs"]["removed"][
        "demo-eip"
    ]
    canary_new = next(s for s in steps if s["key"] == "CreateServers#1")["outputs"]["created"]
    assert out["outcome"] == "rolled_back" and run_status(world, run_id) == "rolled_back"
    assert out["message"].startswith(f"WatchCanary#1 failed: canary {canary_new[0]} watch ")
    assert "gate 'slo': HTTP 503, want 200" in out["message"]
    assert f"The canary is rolled back: {canary_old[0]} serves again" in out["message"]
    assert sorted(world.members()) == before and set(world.live_servers()) == servers
    created, touched = _touched(world, mark, set(before) - set(canary_old))
    assert created == 1 and not touched, f"touched outside the canary batch: {touched}"
    assert [s["key"] for s in steps if s["state"] != "pending"][-1] == "WatchCanary#1"
    check_call_order(world, before, since=mark)


@pytest.mark.slow
def test_canary_that_dies_during_its_watch_is_rolled_back(
    make_world: Callable[..., World],
) -> None:
    """A canary that passed its health gate and then dies while watched (the local
    cloud's die_after fault): the watch sees it stopped, and the canary is rolled back."""
    world = make_world()
    before = sorted(world.members())
    world.cloud.inject("server", times=1, role="web", die_after=2.5)
    code, out = world.cli_json("rotate", "demo", "--yes", "--canary", "1", "--canary-watch", "8")
    assert code == 1, out.get("_stderr")
    assert out["message"].startswith("WatchCanary#1 failed: canary ")
    assert "stopped" in out["message"] and "no other server was touched" in out["message"]
    assert sorted(world.members()) == before
    assert len(world.live_servers()) == 3  # the db and the two old web servers


@pytest.mark.slow
def test_canary_that_stays_healthy_lets_the_rest_proceed(make_world: Callable[..., World]) -> None:
    """A passing gate and a healthy canary: the watch lasts its time, then the other
    batches run and the rotate succeeds; the gate was asked during the watch only."""
    with gate_server(lambda _p, _q: (200, {"status": "ok"})) as app:
        world = make_world(
            gates=[{"http": f"{app.url}/slo", "json_path": "$.status", "equals": "ok"}]
        )
        before = set(world.members())
        code, out = world.cli_json(
            "rotate", "demo", "--yes", "--canary", "1", "--canary-watch", "1.5"
        )
        assert code == 0, out.get("_stderr")
        asked = len(app.requests)
    assert out["outcome"] == "succeeded"
    members = set(world.members())
    assert len(members) == 2 and not members & before
    _, steps = journal_steps(world)
    watch = next(s for s in steps if s["key"] == "WatchCanary#1")
    assert watch["state"] == "done" and out["timings"]["WatchCanary#1"] >= 1.5
    assert watch["outputs"]["gate_rounds"] == asked >= 2
    order = [s["key"] for s in steps]
    assert order.index("WatchCanary#1") < order.index("DestroyServers#1")
    assert order.index("WatchCanary#1") < order.index("CreateServers#2")
