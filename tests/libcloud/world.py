"""A libcloud EC2 world under moto: a tagged Elastic IP, a foreign instance, and the
provider built the way the CLI builds it (config, credentials from the environment,
endpoint_url), then shimmed to moto's dialect.

Resources made out of band (the foreign instance, the data volume of generation 1) go
through a plain boto3 client, so they never count as changeover's calls.
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import boto3
import pytest
from moto import mock_aws
from moto.server import ThreadedMotoServer

from orchestrator.models import TAG_STACK
from orchestrator.settings import StackConfig
from providers.libcloud_data import TAG_DATA_OF
from providers.libcloud_provider import LibcloudProvider, make_libcloud_provider
from tests.aws.world import attach_data_volume
from tests.libcloud.fakes import FakeApps, RecordedTransport
from tests.libcloud.moto_shims import shim

REGION = "us-east-1"
STACK = "shop"
ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-123"}
DEVICE = "/dev/xvdf"
# moto launches any image id; listing its catalogue of real AMIs costs ~0.7 s a test.
AMI = "ami-0c0ffee0c0ffee000"
FREEZE = "systemctl stop shop-db && sync"
UNFREEZE = "systemctl start shop-db"


def moto_server(request: pytest.FixtureRequest) -> str:
    """A ThreadedMotoServer on 127.0.0.1 (a free port) for this test; stopped after it."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"

    def reset() -> None:  # moto's backends are process-global: leave an empty account
        req = urllib.request.Request(f"{url}/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=10).close()

    def stop() -> None:
        reset()
        server.stop()
        if server._server is not None:  # stop() leaves the listening socket open
            server._server.server_close()

    reset()
    request.addfinalizer(stop)
    return url


def in_process(request: pytest.FixtureRequest) -> None:
    """moto's mock_aws for this test, in this process."""
    mock = mock_aws()
    mock.start()
    request.addfinalizer(mock.stop)


@dataclass
class Ec2World:
    """One stack's world on moto EC2, and providers for it."""

    state_dir: Path
    endpoint_url: str | None = None
    stack: str = STACK
    apps: FakeApps = field(default_factory=FakeApps)
    transport: RecordedTransport = field(default_factory=RecordedTransport)

    def __post_init__(self) -> None:
        s = boto3.Session(
            region_name=REGION,
            aws_access_key_id=ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=ENV["AWS_SECRET_ACCESS_KEY"],
        )
        self.ec2 = s.client("ec2", endpoint_url=self.endpoint_url)
        self.ami = AMI
        self.subnet = self.ec2.describe_subnets()["Subnets"][0]["SubnetId"]
        eip = self.ec2.allocate_address(
            Domain="vpc",
            TagSpecifications=[
                {"ResourceType": "elastic-ip", "Tags": [{"Key": TAG_STACK, "Value": self.stack}]}
            ],
        )
        self.eip_ip, self.eip_alloc = eip["PublicIp"], eip["AllocationId"]
        self.foreign = self.ec2.run_instances(
            ImageId=self.ami,
            MinCount=1,
            MaxCount=1,
            TagSpecifications=[
                {"ResourceType": "instance", "Tags": [{"Key": "team", "Value": "someone-else"}]}
            ],
        )["Instances"][0]["InstanceId"]

    # --- config and provider --------------------------------------------------------------
    def config(self, *, web: int = 2, db: bool = False, **stack: Any) -> StackConfig:
        launch = {"ami": self.ami, "subnets": [self.subnet]}
        roles: dict[str, Any] = {"web": {"count": web, "size": "t3.micro", "launch": launch}}
        if db:
            roles["db"] = {
                "count": 1,
                "size": "t3.micro",
                "data": True,
                "launch": launch,
                "data_options": {
                    "device": DEVICE,
                    "freeze_command": FREEZE,
                    "unfreeze_command": UNFREEZE,
                },
            }
        raw: dict[str, Any] = {
            "provider": "libcloud:ec2",
            "region": REGION,
            "address": self.eip_alloc,
            "libcloud": {"driver": "ec2", "ip": "private"},
            "roles": roles,
            "defaults": {"bake": 2.0, "retain": 0.0, "max_surge": 1, "min_healthy": 100},
        }
        if self.endpoint_url:
            raw["endpoint_url"] = self.endpoint_url
        raw.update(stack)
        return StackConfig.model_validate(raw)

    def provider(self, config: StackConfig) -> LibcloudProvider:
        """Built by the product's factory from config and environment, then shimmed."""
        provider = cast(
            LibcloudProvider,
            make_libcloud_provider(
                self.stack,
                config,
                state_dir=self.state_dir,
                environ=ENV,
                transport=self.transport,
                checker=self.apps,
                probe=self.apps,
            ),
        )
        shim(provider.driver)
        return provider

    # --- out of band ---------------------------------------------------------------------
    def instances(self, *, live: bool = True) -> dict[str, dict[str, Any]]:
        """Every instance in the account (ours and not), by id, with its tags."""
        out = {}
        for r in self.ec2.describe_instances()["Reservations"]:
            for i in r["Instances"]:
                if live and i["State"]["Name"] in ("shutting-down", "terminated"):
                    continue
                out[i["InstanceId"]] = {t["Key"]: t["Value"] for t in i.get("Tags", [])}
        return out

    def alive(self, instance_id: str) -> bool:
        return instance_id in self.instances()

    def eip_holder(self) -> str | None:
        eip = self.ec2.describe_addresses(AllocationIds=[self.eip_alloc])["Addresses"][0]
        holder: str | None = eip.get("InstanceId")
        return holder

    def seed(self, config: StackConfig) -> dict[str, list[str]]:
        """Generation 1: its servers, a data volume on its db, the address on a web server
        (through a provider of its own, so the one under test has counted nothing)."""
        provider = self.provider(config)
        made: dict[str, list[str]] = {}
        for role, rc in config.roles.items():
            servers = provider.create_servers(
                stack=self.stack,
                role=role,
                generation=1,
                run_id="seed",
                count=rc.count,
                image=rc.image,
                size=rc.size,
                idempotency_key=f"seed/{role}",
                links={},
            )
            made[role] = [s.id for s in servers]
        for db in made.get("db", []):
            vol = attach_data_volume(self.ec2, db, self.stack, DEVICE, 8)
            made.setdefault("volumes", []).append(vol)
        provider.set_members(self.stack, config.address, made["web"][:1])
        return made

    def volumes_of(self, server_id: str) -> list[dict[str, Any]]:
        """Volumes tagged as holding `server_id`'s data."""
        found = self.ec2.describe_volumes(
            Filters=[{"Name": f"tag:{TAG_DATA_OF}", "Values": [server_id]}]
        )["Volumes"]
        return list(found)


def make_world(request: pytest.FixtureRequest, *, server: bool) -> Ec2World:
    """An Ec2World on moto in-process or over HTTP, torn down with the test."""
    tmp: Path = request.getfixturevalue("tmp_path")
    if server:
        return Ec2World(tmp, endpoint_url=moto_server(request))
    in_process(request)
    return Ec2World(tmp)
