"""A virtual clock, and a fleet on AWS (under moto) whose engine and provider run on it.

Every sleep of the engine, the steps and the provider advances the clock by exactly what
it asked for, and the injected latencies (tests/aws/faults.py) are measured on it: a
rotate of many servers takes no real time, and what it took is the orchestration's own
doing (polling granularity, serial steps), not the machine's speed. Shared by the lane
tests (tests/aws/test_lanes_aws.py) and the fleet bench (bench/fleet_efficiency.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from orchestrator.engine import Engine
from orchestrator.settings import StackConfig
from providers.aws import AwsProvider
from tests.aws.faults import AwsFaults
from tests.aws.world import AwsWorld


class VirtualClock:
    """A clock that moves only when someone sleeps, by exactly that long."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)


@dataclass
class Fleet:
    """A stack of web servers behind a target group, ready to rotate on a virtual clock."""

    world: AwsWorld
    config: StackConfig
    provider: AwsProvider  # with the faults on its clients, sleeping on the clock
    engine: Engine  # its journal in the state dir, on the clock


def fleet(
    state_dir: Path, vc: VirtualClock, faults: AwsFaults, *, servers: int, surge: int
) -> Fleet:
    """Bootstrap `servers` web servers (no db) behind a target group, with timeouts long
    enough for any injected boot or drain, and an engine that rotates them at most
    `surge` at a time. AWS must be mocked (mock_aws) for as long as the fleet is used;
    `faults` reads `vc` (AwsFaults(clock=vc.clock))."""
    world = AwsWorld()
    config = world.config(
        address="tg",
        web=servers,
        db=False,
        max_surge=surge,
        min_healthy=100,
        boot_timeout=3600,
        drain_timeout=3600,
    )
    world.bootstrap(world.provider(config), config)
    provider = world.provider(config, faults, sleep=vc.sleep)
    engine = Engine(
        state_dir=state_dir, provider=provider, config=config, sleep=vc.sleep, clock=vc.clock
    )
    return Fleet(world, config, provider, engine)
