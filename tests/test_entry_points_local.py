"""Several entry points on the local cloud: two real proxies on loopback, driven through
the CLI as an operator runs it. A rebuild and a rotate move both; a rollback after the
cutover moves both back; the destroy guard refuses a server another entry point still
routes to."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from orchestrator.engine import Engine
from orchestrator.plan import Outcome
from orchestrator.rehearse import World
from providers.local.http import request
from providers.local.provider import LocalProvider
from strategies.rebuild import plan_rebuild

ENTRY = [{"proxy": "demo-eip", "roles": ["web"]}, {"proxy": "demo-admin"}]


def members(world: World, address: str) -> list[str]:
    info = world.cloud.address(world.stack, address)
    assert info is not None, f"{address} is not running"
    token = world.cloud.control_token
    found = request(info.control_port, "GET", "/members", token=token)[1]["members"]
    return sorted(m["id"] for m in found)


def answered_by(world: World, address: str) -> str:
    info = world.cloud.address(world.stack, address)
    assert info is not None
    status, data, headers = request(info.port, "GET", "/health")
    assert status == 200
    return str(headers.get("x-changeover-backend") or data.get("id"))


@pytest.fixture
def two_door_world(make_world: Callable[..., World]) -> World:
    stack = make_world(address=None, addresses=ENTRY)
    return stack


def web(world: World, generation: int) -> list[str]:
    return sorted(
        i
        for i, s in world.live_servers().items()
        if s["role"] == "web" and s["generation"] == generation
    )


@pytest.mark.slow
def test_rebuild_and_rotate_move_both_proxies(two_door_world: World) -> None:
    world = two_door_world
    gen1 = web(world, 1)
    assert members(world, "demo-eip") == members(world, "demo-admin") == gen1
    code, out = world.cli_json("rebuild", "demo", "--yes")
    assert code == 0, out
    gen2 = web(world, 2)
    assert members(world, "demo-eip") == members(world, "demo-admin") == gen2
    assert answered_by(world, "demo-admin") in gen2 and answered_by(world, "demo-eip") in gen2
    assert set(out["entry_points"]) == {"demo-eip", "demo-admin"}
    assert not set(gen1) & set(world.live_servers())
    code, out = world.cli_json("rotate", "demo", "--yes")
    assert code == 0, out
    gen3 = web(world, 3)
    assert len(gen3) == 2 and members(world, "demo-eip") == members(world, "demo-admin") == gen3


@pytest.mark.slow
def test_rollback_after_cutover_moves_both_back(two_door_world: World) -> None:
    """The bake fails (a new web server dies during it): both proxies point back."""
    world = two_door_world
    gen1 = web(world, 1)
    world.cloud.inject("server", role="web", die_after=3.0, times=1)
    provider = LocalProvider(world.cloud)
    engine = Engine(state_dir=world.state_dir, provider=provider, config=world.config)
    plan = plan_rebuild(provider, "demo", world.config, bake=8.0)
    result = engine.start(plan)
    steps = {r.key: r.state for r in engine.journal.steps(result.run_id or "")}
    engine.close()
    assert result.outcome == Outcome.ROLLED_BACK, result.message
    assert steps["RepointAddress"] != "pending", "it failed before the cutover"
    assert members(world, "demo-eip") == members(world, "demo-admin") == gen1
    assert not web(world, 2)


@pytest.mark.slow
def test_destroy_guard_spares_a_server_another_proxy_routes_to(two_door_world: World) -> None:
    """Someone points a proxy of another stack at one of ours: it still serves, so the
    rebuild that would retire it rolls back instead, and the server lives (I2)."""
    world = two_door_world
    victim = web(world, 1)[0]
    world.cloud.ensure_address("other", "their-door")
    info = world.cloud.address("other", "their-door")
    assert info is not None
    port = LocalProvider(world.cloud)._port("demo", victim)
    request(
        info.control_port,
        "PUT",
        "/members",
        {"members": [{"id": victim, "host": "127.0.0.1", "port": port}]},
        token=world.cloud.control_token,
    )
    code, out = world.cli_json("rebuild", "demo", "--yes")
    assert code == 1, out
    assert "still serve" in out["message"] and "their-door" in out["message"]
    assert victim in world.live_servers()
    assert members(world, "demo-eip") == members(world, "demo-admin") == web(world, 1)
