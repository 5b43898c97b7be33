"""Strategies as data: the composed plans, asserted without running them."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from orchestrator.errors import PreconditionFailed
from orchestrator.plan import Plan
from orchestrator.rehearse import World
from providers.local.provider import LocalProvider
from strategies.rebuild import plan_rebuild
from strategies.rotate import plan_rotate


def keys(plan: Plan) -> list[str]:
    return [s.key for s in plan.steps]


def test_rebuild_plan_builds_verifies_migrates_then_cuts_over(world: World) -> None:
    """Rebuild: create db then web, verify, copy/freeze/sync/switch, repoint, bake, retire."""
    plan = plan_rebuild(LocalProvider(world.cloud), "demo", world.config)
    assert keys(plan) == [
        "CreateServers[db]", "CreateServers[web]", "WaitRunning", "VerifyServers",
        "CopyData", "FreezeWrites", "SyncData", "SwitchWrites",
        "RepointAddress", "VerifyAddress", "Bake", "RetireServers",
    ]  # fmt: skip
    assert plan.summary["generation_before"] == 1 and plan.summary["generation_after"] == 2
    retire = plan.steps[-1]
    assert sorted(retire.params["ids"]) == sorted(world.live_servers())
    assert retire.irreversible and not any(s.irreversible for s in plan.steps[:-1])
    assert plan.steps[8].params["previous"] == {"demo-eip": world.members()}
    # A plan survives the journal: it round-trips through its dict form.
    assert Plan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()


def test_rebuild_without_data_migration_keeps_the_db(world: World) -> None:
    """--no-migrate-data links the new web servers to the current db and never retires it."""
    db = world.data_server()
    plan = plan_rebuild(LocalProvider(world.cloud), "demo", world.config, migrate_data=False)
    assert "CopyData" not in keys(plan) and "CreateServers[db]" not in keys(plan)
    assert plan.steps[0].params["db"] == db
    assert db not in plan.steps[-1].params["ids"]


def test_rotate_plan_batches_by_max_surge(make_world: Callable[..., World]) -> None:
    """Rotate 4 servers with surge 2: a lane per server, at most 2 in flight, each
    checking its stop conditions first, add-before-remove, destroy last. Without lanes
    (a campaign across maintenance windows): two batches of 2."""
    world = make_world(roles={"db": {"count": 1, "data": True}, "web": {"count": 4}})
    plan = plan_rotate(LocalProvider(world.cloud), "demo", world.config, max_surge=2)
    per_batch = ["CheckStopConditions", "CreateServers", "WaitRunning", "VerifyServers",
                 "AddMembers", "RemoveMembers", "DrainServers", "DestroyServers"]  # fmt: skip
    assert keys(plan) == [f"{k}#{n}" for n in (1, 2, 3, 4) for k in per_batch]
    assert [s.lane for s in plan.steps] == [n for n in (1, 2, 3, 4) for _ in per_batch]
    assert plan.in_flight == 2
    removed = [s.params["ids"] for s in plan.steps if s.name == "RemoveMembers"]
    assert [len(b) for b in removed] == [1, 1, 1, 1]
    assert sorted(i for batch in removed for i in batch) == sorted(world.members())

    batches = plan_rotate(
        LocalProvider(world.cloud), "demo", world.config, max_surge=2, lanes=False
    )
    assert keys(batches) == [f"{k}#{n}" for n in (1, 2) for k in per_batch]
    assert {s.lane for s in batches.steps} == {None} and batches.in_flight == 1
    removed = [s.params["ids"] for s in batches.steps if s.name == "RemoveMembers"]
    assert [len(b) for b in removed] == [2, 2]
    assert sorted(i for batch in removed for i in batch) == sorted(world.members())
    assert all(s.params["count"] == 2 for s in batches.steps if s.name == "CreateServers")


def test_rotate_older_than_selects_nothing_young(world: World) -> None:
    """--older-than 30d on a fresh stack selects no server: an empty plan (a no-op)."""
    plan = plan_rotate(LocalProvider(world.cloud), "demo", world.config, older_than=30 * 86400)
    assert plan.steps == []
    later = plan_rotate(
        LocalProvider(world.cloud), "demo", world.config, older_than=60, now=time.time() + 3600
    )
    assert len(later.summary["selected"]) == 2


def test_rotate_only_if_needed_picks_servers_failing_hygiene(world: World) -> None:
    """--only-if-needed selects servers with a pending security upgrade, and only those.
    Live, as a real run does; a plan (live=False) decides from recorded facts only and
    asks no server (I8; tests/test_plan_readonly.py)."""
    index = world.cloud.read_package_index()
    index["packages"]["openssl"]["version"] = "3.0.99-1"  # a new security release
    world.cloud.write_package_index(index)
    plan = plan_rotate(
        LocalProvider(world.cloud), "demo", world.config, only_if_needed=True, live=True
    )
    assert sorted(plan.summary["selected"]) == sorted(world.members())
    assert all("openssl" in why for why in plan.summary["selected"].values())


def test_only_if_needed_on_a_clean_stack_is_a_noop(world: World) -> None:
    """A stack with nothing to fix: rotate --only-if-needed exits 0 and changes nothing."""
    mark = world.cloud.last_call_id()
    proc = world.cli("rotate", "demo", "--only-if-needed", "--yes")
    assert proc.returncode == 0 and "nothing to do" in proc.stdout
    assert not [c for c in world.cloud.calls(mark) if c["mutating"]]


def test_stack_without_servers_is_a_precondition_failure(make_world: Callable[..., World]) -> None:
    """Rebuilding a stack that was never created fails early, naming `local up`."""
    world = make_world(up=False)
    world.cloud.ensure_address("demo", "demo-eip")
    with pytest.raises(PreconditionFailed, match="local up"):
        plan_rebuild(LocalProvider(world.cloud), "demo", world.config)
