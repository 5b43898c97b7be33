"""`changeover upgrade`: in-place upgrades on the local cloud, with real processes.

Each test publishes new package versions after the stack is up (the servers then have
pending upgrades), runs `upgrade` through the CLI, and checks the world from the local
cloud's call journal and the servers' own facts: one batch out at a time, upgrades and
reboots only on drained servers, a server back behind the address only once verified
after its upgrade, and nothing left drained.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from orchestrator.db import connect
from orchestrator.plan import Plan
from orchestrator.rehearse import World
from providers.local.provider import VERIFY_PASSED, LocalProvider
from strategies.upgrade import plan_upgrade
from tests.conftest import demo_stack
from tests.invariants import check_serving_only, journal_steps, run_status

ADVISORY = {
    "openssl": {"version": "3.0.16-1~deb12u1", "security": True, "reboot": False},
    "linux-image-amd64": {"version": "6.1.129-1", "security": True, "reboot": True},
    "tzdata": {"version": "2025a-0+deb12u1", "security": False, "reboot": False},
}
SECURITY = {"openssl", "linux-image-amd64"}
LOAD = {"rate": 40.0, "connections": 2}


def _world(make_world: Callable[..., World], web: int) -> World:
    image = "debian-12-base"
    world = make_world(
        roles={
            "db": {"count": 1, "image": image, "data": True},
            "web": {"count": web, "image": image},
        }
    )
    world.publish(ADVISORY)
    return world


def _web(world: World) -> list[str]:
    return sorted(i for i, s in world.live_servers().items() if s["role"] == "web")


def _plan_batches(world: World, run_id: str) -> list[list[str]]:
    conn = connect(world.state_dir)
    try:
        row = conn.execute("SELECT plan_json FROM runs WHERE id=?", (run_id,)).fetchone()
    finally:
        conn.close()
    batches: list[list[str]] = json.loads(row[0])["summary"]["batches"]
    return batches


def check_campaign(world: World, run_id: str, members_before: list[str], since: int) -> None:
    """Replay the call journal: at most one planned batch out of the address at a time;
    upgrades and reboots only on servers out of it; a server upgraded goes back only
    after a passed gate that came after its upgrade; nothing drained at the end."""
    batches = [set(b) for b in _plan_batches(world, run_id)]
    web = set(_web(world))
    members = set(members_before)
    verified_since_upgrade: set[str] = set(members_before)
    for call in world.cloud.calls(since):
        op, detail = call["op"], call["detail"] or ""
        if op == "set_members":
            new = {i for i in detail.split(":", 1)[1].split(",") if i}
            if unverified := (new - members) - verified_since_upgrade:
                raise AssertionError(f"back behind the address unverified: {unverified}")
            members = new
            out = web - members
            assert not out or any(out <= b for b in batches), f"two batches out: {out}"
        elif op in ("upgrade_packages", "reboot_server"):
            server = detail.split(":", 1)[0]
            assert server not in members, f"{op} on {server} while it serves"
            if op == "upgrade_packages":
                verified_since_upgrade.discard(server)
        elif op == VERIFY_PASSED:
            verified_since_upgrade.add(detail)
    assert sorted(world.members()) == sorted(members_before), "a server was left drained"


def check_upgraded(world: World, *, security_only: bool) -> None:
    """Every web server runs the advisory's versions (and the new kernel); the db was not
    touched."""
    for server in _web(world):
        facts = world.facts(server)
        wanted = SECURITY if security_only else set(ADVISORY)
        for name in wanted:
            assert facts["installed"][name] == ADVISORY[name]["version"], (server, name)
        assert facts["kernel"]["running"] == ADVISORY["linux-image-amd64"]["version"]
        assert not facts["reboot_required"], server
        if security_only:
            assert facts["installed"]["tzdata"] != ADVISORY["tzdata"]["version"]
    db = world.facts(world.data_server())
    assert db["installed"]["openssl"] != ADVISORY["openssl"]["version"], "the db was upgraded"


def test_plan_upgrade_batches_the_serving_role_and_only_reads(
    make_world: Callable[..., World],
) -> None:
    """plan: per batch Drain, Upgrade, Reboot, Verify, Return; batches in order, the db
    left out with its reason; only the upgrade is irreversible; no mutating call."""
    world = _world(make_world, web=4)
    mark = world.cloud.last_call_id()
    plan = plan_upgrade(LocalProvider(world.cloud), "demo", world.config, batch=2, min_healthy=50)
    assert [s.key for s in plan.steps[:5]] == [
        "DrainForUpgrade#1", "UpgradePackages#1", "RebootServers#1", "VerifyUpgraded#1",
        "ReturnServers#1",
    ]  # fmt: skip
    assert len(plan.steps) == 10
    batches = plan.summary["batches"]
    assert [len(b) for b in batches] == [2, 2]
    assert sorted(i for b in batches for i in b) == _web(world)
    assert list(plan.summary["not_upgraded"]) == [world.data_server()]
    assert [s.key for s in plan.steps if s.irreversible] == [
        "UpgradePackages#1",
        "UpgradePackages#2",
    ]
    assert Plan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()
    assert not [c for c in world.cloud.calls(mark) if c["mutating"]]
    code, out = world.cli_json("plan", "upgrade", "demo", "--batch", "2", "--min-healthy", "50")
    assert code == 0 and out["plan"]["summary"]["batches"] == batches
    assert not [c for c in world.cloud.calls(mark) if c["mutating"]]


def test_upgrade_refuses_to_go_below_min_healthy(make_world: Callable[..., World]) -> None:
    """With min-healthy 100% an in-place upgrade would take a server out: exit 2, the
    message says what to pass, and nothing was touched."""
    world = _world(make_world, web=2)
    mark = world.cloud.last_call_id()
    proc = world.cli("upgrade", "demo", "--yes")
    assert proc.returncode == 2, proc.stderr
    assert "--min-healthy 50" in proc.stderr + proc.stdout
    assert not [c for c in world.cloud.calls(mark) if c["mutating"]]


def test_upgrade_security_only_under_load(make_world: Callable[..., World]) -> None:
    """Security upgrades only, 2 of 4 at a time, under load: every web server gets the
    security versions and the new kernel (rebooted), keeps tzdata, serves again; no
    request failed, no acknowledged write lost, never two batches out."""
    world = _world(make_world, web=4)
    before, mark = sorted(world.members()), world.cloud.last_call_id()
    with world.load(**LOAD) as gen:
        code, out = world.cli_json(
            "upgrade", "demo", "--yes", "--security-only", "--batch", "2", "--min-healthy", "50"
        )
    result = gen.stop()
    assert code == 0, out["_stderr"]
    assert out["outcome"] == "succeeded" and out["servers"] == {"created": [], "destroyed": []}
    assert result.failed == 0 and world.lost_writes(result) == []
    check_campaign(world, out["run_id"], before, mark)
    check_upgraded(world, security_only=True)


def test_failed_gate_leaves_the_server_drained_then_resume_finishes(
    make_world: Callable[..., World],
) -> None:
    """--reboot never with a kernel upgrade: the gate fails on reboot-required, the run
    ends dirty (3) with that server drained and the other serving, naming it and
    `resume`; `rollback` refuses; after the operator reboots it, `resume` finishes."""
    world = _world(make_world, web=2)
    before, mark = sorted(world.members()), world.cloud.last_call_id()
    proc = world.cli("upgrade", "demo", "--yes", "--min-healthy", "50", "--reboot", "never")
    assert proc.returncode == 3, proc.stderr
    run_id, steps = journal_steps(world)
    first = _plan_batches(world, run_id)[0][0]
    assert world.members() == [s for s in before if s != first]
    assert (
        f"{first} are left drained" in proc.stdout and f"changeover resume {run_id}" in proc.stdout
    )
    assert [s["state"] for s in steps][:4] == ["done", "done", "done", "failed"]
    refused = world.cli("rollback", run_id)
    assert refused.returncode == 2 and f"changeover resume {run_id}" in refused.stderr
    status = world.cli_json("status", run_id)[1]
    assert f"changeover resume {run_id}" in status["next"] and "upgraded" in status["next"]
    world.cloud.reboot_server(first)  # the operator's fix: reboot it by hand
    # The run goes on as planned: --reboot never, so fix the second server alike.
    second = world.cli("resume", run_id)
    assert second.returncode == 3, second.stderr
    other = _plan_batches(world, run_id)[1][0]
    world.cloud.reboot_server(other)
    done = world.cli("resume", run_id)
    assert done.returncode == 0, done.stderr
    assert run_status(world, run_id) == "succeeded"
    check_campaign(world, run_id, before, mark)
    check_upgraded(world, security_only=False)


# Kill points: inside batch 1 (one of its two servers upgraded), and batch 2's reboot.
KILLS = ["upgrade_packages:1", "reboot_server:3"]


@pytest.mark.parametrize("kill", KILLS)
def test_sigkill_mid_batch_then_resume(make_world: Callable[..., World], kill: str) -> None:
    """SIGKILL right after a mid-batch call: `rollback` refuses (the batch is upgraded),
    `resume` goes on with the same batch, never has two batches out, and ends with
    every server upgraded, verified and serving, under load with nothing failed."""
    world = _world(make_world, web=4)
    before, mark = sorted(world.members()), world.cloud.last_call_id()
    args = ("upgrade", "demo", "--yes", "--batch", "2", "--min-healthy", "50")
    with world.load(**LOAD) as gen:
        proc = world.cli(*args, env={"CHANGEOVER_CRASH_AFTER_CALL": kill})
        assert proc.returncode == -9, proc.stderr[-3000:]
        run_id, _ = journal_steps(world)
        killed_at = world.cloud.last_call_id()
        refused = world.cli("rollback", run_id)
        assert refused.returncode == 2, refused.stderr
        resumed = world.cli("resume", run_id)
    result = gen.stop()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert result.failed == 0 and world.lost_writes(result) == []
    # The resumed process first works on the batch the killed one was in.
    victim = _victim(world, mark, killed_at)
    first_after = next(c for c in world.cloud.calls(killed_at) if c["op"] in HOST_OPS)
    resumed_on = str(first_after["detail"]).split(":")[0]
    assert any({victim, resumed_on} <= b for b in _batch_sets(world, run_id)), (
        victim,
        resumed_on,
    )
    check_campaign(world, run_id, before, mark)
    check_upgraded(world, security_only=False)
    check_serving_only(world, run_id)


def test_kill_after_drain_then_rollback_puts_the_batch_back(
    make_world: Callable[..., World],
) -> None:
    """Killed after the first drain, before any upgrade: `rollback` puts the batch back
    (exit 1) and nothing was upgraded."""
    world = _world(make_world, web=2)
    before = sorted(world.members())
    proc = world.cli(
        "upgrade", "demo", "--yes", "--min-healthy", "50",
        env={"CHANGEOVER_CRASH_AFTER_CALL": "set_members:1"},
    )  # fmt: skip
    assert proc.returncode == -9
    run_id, _ = journal_steps(world)
    assert len(world.members()) == 1
    back = world.cli("rollback", run_id)
    assert back.returncode == 1, back.stderr
    assert sorted(world.members()) == before
    assert all(
        world.facts(s)["installed"]["openssl"] != ADVISORY["openssl"]["version"] for s in before
    )


def _batch_sets(world: World, run_id: str) -> list[set[str]]:
    return [set(b) for b in _plan_batches(world, run_id)]


HOST_OPS = ("upgrade_packages", "reboot_server", "boot_state")


def _victim(world: World, since: int, until: int) -> str:
    """The server of the last upgrade or reboot call the killed process made."""
    calls = [c for c in world.cloud.calls(since) if c["id"] <= until and c["op"] in HOST_OPS]
    return str(calls[-1]["detail"]).split(":")[0]


@pytest.mark.parametrize(("min_healthy", "verb"), [(50, "upgrade"), (100, "rotate")])
def test_the_command_audit_recommends_runs_and_fixes_it(
    make_world: Callable[..., World], min_healthy: int, verb: str
) -> None:
    """Pending upgrades: audit recommends `upgrade` when one server may leave (min-healthy
    50%), else a surge-first `rotate` (100%: `upgrade` would refuse). The command as
    printed, with --yes, exits 0, and a second audit has nothing left to advise."""
    world = make_world(
        roles={"web": {"count": 2, "image": "debian-12-base"}},  # no db: upgrade leaves it
        defaults={**demo_stack()["defaults"], "min_healthy": min_healthy},
    )
    world.publish({"tzdata": ADVISORY["tzdata"]})  # not a security upgrade: patch, not replace
    code, report = world.cli_json("audit", "demo")
    assert code == 0, report.get("_stderr")
    command = report["recommendation"]["command"]
    assert command.split()[:3] == ["changeover", verb, "demo"], report["recommendation"]
    done = world.cli(*command.split()[1:], "--yes")
    assert done.returncode == 0, done.stderr[-3000:]
    code, after = world.cli_json("audit", "demo")
    assert code == 0 and after["recommendation"]["command"] is None, after["recommendation"]
