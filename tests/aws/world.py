"""An AWS world under moto: a VPC's default subnet, a tagged Elastic IP and target group,
a foreign (untagged) instance, and a stack's generation 1 with a data volume on its db."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import boto3

from orchestrator.models import TAG_STACK
from orchestrator.settings import StackConfig
from providers.aws import AwsProvider
from tests.aws.faults import AwsFaults
from tests.recorded import RecordedTransport

REGION = "us-east-1"
CREDS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
STACK = "shop"
DATA_DEVICE = "/dev/xvdf"


def attach_data_volume(ec2: Any, instance: str, stack: str, device: str, size: int) -> str:
    """Give a first-generation db its data volume, tagged for the stack (out of band)."""
    reservation = ec2.describe_instances(InstanceIds=[instance])["Reservations"][0]
    zone = reservation["Instances"][0]["Placement"]["AvailabilityZone"]
    vol: str = ec2.create_volume(
        Size=size,
        AvailabilityZone=zone,
        TagSpecifications=[
            {"ResourceType": "volume", "Tags": [{"Key": TAG_STACK, "Value": stack}]}
        ],
    )["VolumeId"]
    ec2.attach_volume(VolumeId=vol, InstanceId=instance, Device=device)
    return vol


def session() -> Any:
    return boto3.Session(region_name=REGION, **CREDS)


@dataclass
class AwsWorld:
    """Resources for one stack, made out of band with a plain (uncounted) client."""

    endpoint_url: str | None = None
    stack: str = STACK
    ami: str = ""
    eip_alloc: str = ""
    tg_arn: str = ""
    subnet: str = ""
    foreign: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = session()
        self.ec2 = s.client("ec2", endpoint_url=self.endpoint_url)
        self.elbv2 = s.client("elbv2", endpoint_url=self.endpoint_url)
        vpc = self.ec2.describe_vpcs()["Vpcs"][0]["VpcId"]
        self.subnet = self.ec2.describe_subnets()["Subnets"][0]["SubnetId"]
        self.ami = self.ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        tag = [{"Key": TAG_STACK, "Value": self.stack}]
        self.eip_alloc = self.ec2.allocate_address(
            Domain="vpc", TagSpecifications=[{"ResourceType": "elastic-ip", "Tags": tag}]
        )["AllocationId"]
        self.tg_arn = self.elbv2.create_target_group(
            Name=f"{self.stack}-web", Protocol="HTTP", Port=80, VpcId=vpc, Tags=tag
        )["TargetGroups"][0]["TargetGroupArn"]
        self.foreign = self.ec2.run_instances(
            ImageId=self.ami,
            MinCount=1,
            MaxCount=1,
            TagSpecifications=[
                {"ResourceType": "instance", "Tags": [{"Key": "team", "Value": "someone-else"}]}
            ],
        )["Instances"][0]["InstanceId"]

    def config(
        self,
        *,
        address: str = "eip",
        web: int | None = None,
        db: bool = True,
        hygiene: dict[str, Any] | None = None,
        **defaults: Any,
    ) -> StackConfig:
        """`address`: "eip" (one web server behind the Elastic IP, unless `web` says
        otherwise), "tg" (the target group) or "both" (the target group holds every web
        server, the Elastic IP one of them)."""
        if web is None:
            web = 1 if address == "eip" else 2
        entry: dict[str, Any] = {
            "eip": {"address": self.eip_alloc},
            "tg": {"address": self.tg_arn},
            "both": {
                "addresses": [
                    {"target_group": self.tg_arn, "roles": ["web"]},
                    {"elastic_ip": self.eip_alloc, "roles": ["web"]},
                ]
            },
        }[address]
        launch = {"ami": self.ami, "subnets": [self.subnet]}
        roles: dict[str, Any] = {
            "web": {
                "count": web,
                "size": "small",
                "launch": launch,
                "health": {"type": "ec2-status"},
            },
        }
        if db:
            roles["db"] = {
                "count": 1,
                "data": True,
                "launch": launch,
                "health": {"type": "ec2-status"},
                "data_options": {
                    "device": DATA_DEVICE,
                    "freeze_command": "systemctl stop app-writes",
                    "unfreeze_command": "systemctl start app-writes",
                },
            }
        return StackConfig.model_validate(
            {
                "provider": "aws",
                "region": REGION,
                "endpoint_url": self.endpoint_url,
                **entry,
                "roles": roles,
                "defaults": {"bake": 0.0, "retain": 0.0, "boot_timeout": 60.0, **defaults},
                "hygiene": hygiene or {"pending": "ignore", "reboot_required_fails": False},
            }
        )

    def provider(
        self, config: StackConfig, faults: AwsFaults | None = None, **kw: Any
    ) -> AwsProvider:
        kw.setdefault("transport", RecordedTransport())
        p = AwsProvider(
            stack=self.stack,
            config=config,
            session=session(),
            endpoint_url=self.endpoint_url,
            sleep=kw.pop("sleep", lambda _s: None),
            **kw,
        )
        if faults is not None:
            faults.attach(p.ec2, p.elbv2, p.ssm)
        return p

    def bootstrap(self, provider: AwsProvider, config: StackConfig) -> dict[str, list[str]]:
        """Generation 1: the db with a data volume, the web servers, the address on them."""
        made: dict[str, list[str]] = {}
        for role, cfg in config.roles.items():
            servers = provider.create_servers(
                stack=self.stack,
                role=role,
                generation=1,
                run_id="bootstrap",
                count=cfg.count,
                image="",
                size=cfg.size,
                idempotency_key=f"bootstrap/{role}",
                links={},
            )
            made[role] = [s.id for s in servers]
        for db in made.get("db", []):
            made["db_volume"] = [attach_data_volume(self.ec2, db, self.stack, DATA_DEVICE, 20)]
        for ep in config.entry_points:
            capacity = provider.address_capacity(self.stack, ep.name)
            provider.set_members(self.stack, ep.name, made["web"][: capacity or None])
        return made

    def instances(self, *, tagged_only: bool = True) -> dict[str, dict[str, Any]]:
        """Live instances (not terminated) by id, with their tags."""
        out = {}
        for r in self.ec2.describe_instances()["Reservations"]:
            for i in r["Instances"]:
                if i["State"]["Name"] in ("terminated", "shutting-down"):
                    continue
                tags = {t["Key"]: t["Value"] for t in i.get("Tags", [])}
                if tagged_only and tags.get(TAG_STACK) != self.stack:
                    continue
                out[i["InstanceId"]] = {"tags": tags, "instance": i}
        return out

    def eip_holder(self) -> str | None:
        addr = self.ec2.describe_addresses(AllocationIds=[self.eip_alloc])["Addresses"][0]
        holder: str | None = addr.get("InstanceId")
        return holder

    def healthy_targets(self) -> list[str]:
        d = self.elbv2.describe_target_health(TargetGroupArn=self.tg_arn)
        return [
            t["Target"]["Id"]
            for t in d["TargetHealthDescriptions"]
            if t["TargetHealth"]["State"] == "healthy"
        ]
