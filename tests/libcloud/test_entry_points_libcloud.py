"""Several entry points on libcloud: the EC2 driver over moto, with two web servers
behind a load balancer (libcloud.loadbalancer, in memory) *and* an Elastic IP that
holds one of them. rebuild and rotate move both; the balancer always has two members."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.engine import Engine
from orchestrator.plan import Outcome
from orchestrator.settings import StackConfig
from providers.libcloud_provider import make_libcloud_provider
from strategies.rebuild import plan_rebuild
from strategies.rotate import plan_rotate
from tests.libcloud.moto_shims import shim
from tests.libcloud.test_adapters import FakeBalancerDriver
from tests.libcloud.world import Ec2World

ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def two_doors(world: Ec2World) -> StackConfig:
    return world.config(
        web=2,
        address=None,
        addresses=[
            {"load_balancer": "lb-1", "roles": ["web"]},
            {"elastic_ip": world.eip_alloc, "roles": ["web"]},
        ],
    )


def provider(world: Ec2World, config: StackConfig, lb: FakeBalancerDriver) -> Any:
    p: Any = make_libcloud_provider(
        world.stack,
        config,
        state_dir=world.state_dir,
        environ=ENV,
        lb_driver=lb,
        transport=world.transport,
        checker=world.apps,
        probe=world.apps,
    )
    shim(p.driver)
    return p


def seed(world: Ec2World, config: StackConfig, lb: FakeBalancerDriver) -> list[str]:
    seeder = provider(world, config, lb)
    web = [
        s.id
        for s in seeder.create_servers(
            stack=world.stack,
            role="web",
            generation=1,
            run_id="seed",
            count=2,
            image=world.ami,
            size="t3.micro",
            idempotency_key="seed/web",
            links={},
        )
    ]
    seeder.set_members(world.stack, "lb-1", web)
    seeder.set_members(world.stack, world.eip_alloc, web[:1])
    lb.log.clear()
    return web


def run(world: Ec2World, tmp_path: Path, strategy: str) -> None:
    lb = FakeBalancerDriver()
    config = two_doors(world)
    old = seed(world, config, lb)
    p = provider(world, config, lb)
    counts: list[int] = []
    original = lb.balancer_detach_member

    def detach(balancer: Any, member: Any) -> bool:
        done = original(balancer, member)
        counts.append(len(lb.members))
        return done

    lb.balancer_detach_member = detach  # type: ignore[method-assign]
    engine = Engine(state_dir=tmp_path / "state", provider=p, config=config, sleep=lambda _s: None)
    planner = plan_rebuild if strategy == "rebuild" else plan_rotate
    result = engine.start(planner(p, world.stack, config))
    engine.close()
    assert result.outcome == Outcome.SUCCEEDED, result.message
    members = {str(m.id) for m in lb.members}
    assert len(members) == 2 and not members & set(old)
    assert world.eip_holder() in members
    assert counts and min(counts) >= 2, counts
    assert not set(old) & set(world.instances()) and world.alive(world.foreign)


def test_rebuild_moves_the_balancer_and_the_elastic_ip(ec2_local: Ec2World, tmp_path: Path) -> None:
    run(ec2_local, tmp_path, "rebuild")


def test_rotate_moves_the_balancer_and_the_elastic_ip(ec2_local: Ec2World, tmp_path: Path) -> None:
    run(ec2_local, tmp_path, "rotate")
