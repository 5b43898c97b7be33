"""The health gate's hygiene on the local cloud, through the CLI as an operator runs it.

tests/test_engine.py pins the engine side (a held package, a kept sentinel, a failing
health check each roll back). These add what the policy decides: security-only,
kernel reboots named as such, minimum versions, and the facts every verify records.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from orchestrator.db import connect
from orchestrator.journal import Journal
from orchestrator.lock import LeaseLock
from orchestrator.rehearse import World
from tests.invariants import check_serving_only


@pytest.mark.parametrize(
    ("hygiene", "fault", "reasons"),
    [
        (
            {"pending": "security"},
            {"hold_packages": ["openssl"]},
            ["1 pending security upgrade(s): openssl (held: openssl)"],
        ),
        (
            {},
            {"keep_reboot_required": True},
            [
                "reboot required (by linux-image-amd64)",
                "running kernel 6.1.76-1-amd64, newest installed 6.1.119-1-amd64",
            ],
        ),
        ({"min_versions": {"nginx": "1.24"}}, {}, ["nginx 1.22.1 is below the minimum 1.24"]),
    ],
    ids=["pending-security", "kernel-reboot-required", "min-version"],
)
def test_gate_failure_rolls_back_through_the_cli(
    make_world: Callable[..., World],
    hygiene: dict[str, Any],
    fault: dict[str, Any],
    reasons: list[str],
) -> None:
    """A fresh server failing the policy: `rebuild` exits 1, the address never moved."""
    world = make_world(hygiene=hygiene)
    before, old = world.members(), set(world.live_servers())
    mark = world.cloud.last_call_id()
    if fault:
        world.cloud.inject("server", role="web", times=1, **fault)
    code, result = world.cli_json("rebuild", "demo", "--yes")
    assert code == 1, result
    assert result["outcome"] == "rolled_back"
    for reason in reasons:
        assert reason in result["message"]
    assert world.members() == before
    assert not [c for c in world.cloud.calls(mark) if c["op"] == "set_members"]
    assert set(world.live_servers()) == old
    check_serving_only(world, result["run_id"])


def test_security_policy_lets_non_security_upgrades_through(
    make_world: Callable[..., World],
) -> None:
    """pending=security: a server holding back only tzdata passes and serves."""
    world = make_world(hygiene={"pending": "security"})
    world.cloud.inject("server", role="web", times=1, hold_packages=["tzdata"])
    code, result = world.cli_json("rotate", "demo", "--yes")
    assert code == 0, result
    assert set(world.members()) == set(result["address"]["after"])


def test_every_verify_step_records_the_facts_in_the_journal(world: World) -> None:
    """rebuild and rotate verify with the same fact reading, recorded per server."""
    code, rebuilt = world.cli_json("rebuild", "demo", "--yes")
    assert code == 0, rebuilt
    code, rotated = world.cli_json("rotate", "demo", "--yes")
    assert code == 0, rotated
    conn = connect(world.state_dir)
    journal = Journal(conn, LeaseLock(conn))
    try:
        verified = [
            (run_id, step)
            for run_id in (rebuilt["run_id"], rotated["run_id"])
            for step in journal.steps(run_id)
            if step.name == "VerifyServers"
        ]
    finally:
        conn.close()
    assert len(verified) == 1 + 2  # rebuild verifies once; rotate once per batch of one
    for _, step in verified:
        for server_id in step.outputs["passed"]:
            facts = step.outputs["reports"][server_id]["facts"]
            assert facts["family"] == "apt" and facts["pending_count"] == 0
            assert facts["os"]["id"] == "debian" and facts["reboot_required"] is False
            assert facts["kernel"]["running"] == facts["kernel"]["newest"] == "6.1.119-1-amd64"
            assert facts["components"] == {"nginx": "1.22.1", "python": "3.11.2"}
