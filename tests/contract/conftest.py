"""The provider contract suite's environments: one per provider, same tests for all.

An environment gives a provider, a stack config with one serving role and an address,
and an out-of-band way to make and inspect a server the stack does not own (I7).
Adding a provider to the suite means adding one environment here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from orchestrator.rehearse import World
from orchestrator.settings import StackConfig
from providers.base import Provider
from providers.local.provider import LocalProvider
from tests.aws.conftest import aws, aws_server, moto_endpoint  # noqa: F401 - shared fixtures
from tests.aws.world import AwsWorld


@dataclass
class ContractEnv:
    """What a contract test needs from one provider."""

    name: str
    provider: Provider
    stack: str
    config: StackConfig
    make_foreign: Callable[[], str]  # create a server outside the stack; returns its id
    foreign_alive: Callable[[str], bool]
    extra: dict[str, Any]


def _local(request: pytest.FixtureRequest) -> ContractEnv:
    make_world: Callable[..., World] = request.getfixturevalue("make_world")
    world = make_world(up=False, roles={"web": {"count": 2}})
    world.cloud.ensure_address("demo", "demo-eip")
    other = {"id": ""}

    def make_foreign() -> str:
        foreign = LocalProvider(world.cloud).create_servers(
            stack="someone-else",
            role="web",
            generation=1,
            run_id="theirs",
            count=1,
            image="debian-12-base",
            size="small",
            idempotency_key="theirs/1",
            links={},
        )
        other["id"] = foreign[0].id
        return foreign[0].id

    def foreign_alive(server_id: str) -> bool:
        row = world.cloud.server_row(server_id)
        return row is not None and not row["destroyed"]

    return ContractEnv(
        "local",
        LocalProvider(world.cloud),
        "demo",
        world.config,
        make_foreign,
        foreign_alive,
        {"world": world},
    )


def _aws(world: AwsWorld) -> ContractEnv:
    config = world.config(db=False)

    def foreign_alive(server_id: str) -> bool:
        return server_id in world.instances(tagged_only=False)

    return ContractEnv(
        "aws",
        world.provider(config),
        world.stack,
        config,
        lambda: world.foreign,
        foreign_alive,
        {"world": world},
    )


def _aws_in_process(request: pytest.FixtureRequest) -> ContractEnv:
    """aws under moto's mock_aws, in this process."""
    return _aws(request.getfixturevalue("aws"))


def _aws_http(request: pytest.FixtureRequest) -> ContractEnv:
    """aws against a ThreadedMotoServer on 127.0.0.1 through endpoint_url."""
    return _aws(request.getfixturevalue("aws_server"))


def _libcloud_ec2(request: pytest.FixtureRequest, *, server: bool) -> ContractEnv:
    """libcloud's EC2 driver on moto (shimmed in tests/libcloud/moto_shims.py)."""
    from tests.libcloud.world import make_world as make_ec2_world

    world = make_ec2_world(request, server=server)
    config = world.config(web=2)
    return ContractEnv(
        "libcloud-ec2",
        world.provider(config),
        world.stack,
        config,
        lambda: world.foreign,
        world.alive,
        {"world": world},
    )


def _libcloud_ec2_in_process(request: pytest.FixtureRequest) -> ContractEnv:
    """libcloud:ec2 under moto's mock_aws, in this process."""
    return _libcloud_ec2(request, server=False)


def _libcloud_ec2_http(request: pytest.FixtureRequest) -> ContractEnv:
    """libcloud:ec2 against a ThreadedMotoServer on 127.0.0.1 through endpoint_url."""
    return _libcloud_ec2(request, server=True)


# name -> builder; a builder may pull any fixture it needs through `request`.
ENVIRONMENTS: dict[str, Callable[[pytest.FixtureRequest], ContractEnv]] = {
    "local": _local,
    "aws-moto": _aws_in_process,
    "aws-moto-server": _aws_http,
    "libcloud-ec2-moto": _libcloud_ec2_in_process,
    "libcloud-ec2-moto-server": _libcloud_ec2_http,
}


@pytest.fixture(params=sorted(ENVIRONMENTS))
def env(request: pytest.FixtureRequest) -> Iterator[ContractEnv]:
    """One provider environment per parameter; torn down by its own fixtures."""
    yield ENVIRONMENTS[request.param](request)
