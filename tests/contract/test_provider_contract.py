"""The provider contract: every provider passes the same tests (STYLE: one suite, all)."""

from __future__ import annotations

import time

import pytest

from orchestrator.errors import ChangeoverError
from orchestrator.models import TAG_GENERATION, TAG_ROLE, TAG_RUN, TAG_STACK, Server
from tests.contract.conftest import ContractEnv

BOOT_DEADLINE = 60.0


def _create(env: ContractEnv, count: int = 2, key: str = "run-1/CreateServers") -> list[Server]:
    role = env.config.serving_roles[0]
    return env.provider.create_servers(
        stack=env.stack,
        role=role,
        generation=7,
        run_id="run-1",
        count=count,
        image=env.config.roles[role].image,
        size=env.config.roles[role].size,
        idempotency_key=key,
        links={},
    )


def _wait_running(env: ContractEnv, ids: list[str]) -> list[Server]:
    deadline = time.monotonic() + BOOT_DEADLINE
    while time.monotonic() < deadline:
        servers = env.provider.describe_servers(env.stack, ids)
        if len(servers) == len(ids) and all(s.state == "running" for s in servers):
            return servers
        time.sleep(0.1)
    raise AssertionError(f"servers never ran: {ids}")


def test_created_servers_carry_the_ownership_tags(env: ContractEnv) -> None:
    """Every server created is tagged with stack, role, generation and run (I4, I7)."""
    servers = _create(env)
    assert len(servers) == 2
    for s in servers:
        assert s.tags[TAG_STACK] == env.stack and s.tags[TAG_RUN] == "run-1"
        assert s.tags[TAG_ROLE] == env.config.serving_roles[0] and s.tags[TAG_GENERATION] == "7"
        assert (s.stack, s.generation, s.run) == (env.stack, 7, "run-1")
    listed = {s.id for s in env.provider.list_servers(env.stack)}
    assert {s.id for s in servers} <= listed


def test_create_is_idempotent_by_key(env: ContractEnv) -> None:
    """A resumed create with the same key returns the same servers and makes no more."""
    first = _create(env)
    again = _create(env)
    assert sorted(s.id for s in again) == sorted(s.id for s in first)
    assert len(env.provider.list_servers(env.stack)) == 2


def test_describe_is_one_batched_call(env: ContractEnv) -> None:
    """Polling many servers costs one describe call, not one per server."""
    ids = [s.id for s in _create(env)]
    before = env.provider.calls["describe_servers"]
    found = env.provider.describe_servers(env.stack, ids)
    assert sorted(s.id for s in found) == sorted(ids)
    assert env.provider.calls["describe_servers"] == before + 1


def test_servers_boot_and_pass_verification(env: ContractEnv) -> None:
    """A fresh server reaches running and passes the health gate."""
    servers = _wait_running(env, [s.id for s in _create(env, count=1)])
    role = env.config.roles[servers[0].role]
    report = env.provider.verify_server(servers[0], role.health, env.config.hygiene)
    assert report.passed, report.reasons
    assert report.running and report.app_ok and report.hygiene_ok


def test_foreign_servers_are_invisible_and_untouchable(env: ContractEnv) -> None:
    """I7: a server without the stack's tag is never listed, described or destroyed."""
    foreign = env.make_foreign()
    _create(env, count=1)
    assert foreign not in {s.id for s in env.provider.list_servers(env.stack)}
    assert env.provider.describe_servers(env.stack, [foreign]) == []
    with pytest.raises(ChangeoverError):
        env.provider.destroy_servers(env.stack, [foreign])
    assert env.foreign_alive(foreign)


def test_address_members_round_trip(env: ContractEnv) -> None:
    """set_members then get_members reads the holder back from the provider."""
    servers = _wait_running(env, [s.id for s in _create(env, count=2)])
    address = env.config.address
    env.provider.set_members(env.stack, address, [servers[0].id])
    assert env.provider.get_members(env.stack, address) == [servers[0].id]
    env.provider.set_members(env.stack, address, [servers[1].id])
    assert env.provider.get_members(env.stack, address) == [servers[1].id]


def test_destroy_is_idempotent(env: ContractEnv) -> None:
    """Destroying twice destroys once; destroyed servers leave the listing."""
    ids = [s.id for s in _create(env, count=2)]
    assert sorted(env.provider.destroy_servers(env.stack, ids)) == sorted(ids)
    assert env.provider.destroy_servers(env.stack, ids) == []
    assert not {s.id for s in env.provider.list_servers(env.stack)} & set(ids)


def test_every_call_is_counted(env: ContractEnv) -> None:
    """API accounting: each provider operation is counted by name."""
    _create(env, count=1)
    env.provider.list_servers(env.stack)
    assert env.provider.calls["create_servers"] >= 1
    assert env.provider.calls["list_servers"] >= 1
