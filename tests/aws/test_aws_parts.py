"""AWS provider parts: launch sources, cloud-init, the SSM transport, EBS moves."""

from __future__ import annotations

import base64
import email

import pytest
import yaml
from botocore.exceptions import ClientError

from orchestrator.settings import StackConfig
from providers.aws import SsmTransport
from providers.cloudinit import READY_COMMAND, first_boot_user_data
from tests.aws.world import DATA_DEVICE, AwsWorld, session


def test_cloud_init_upgrades_reboots_and_signals_ready() -> None:
    """Alone, changeover's user data updates, upgrades, reboots if required, then signals."""
    text = first_boot_user_data(None)
    assert text.startswith("#cloud-config\n")
    doc = yaml.safe_load(text)
    assert doc["package_update"] and doc["package_upgrade"] and doc["package_reboot_if_required"]
    assert doc["runcmd"][-1] == READY_COMMAND


def test_cloud_init_merges_the_users_cloud_config() -> None:
    """A user #cloud-config keeps its keys; ours are forced and the signal runs last."""
    user = "#cloud-config\npackages: [nginx]\npackage_upgrade: false\nruncmd: [echo hi]\n"
    doc = yaml.safe_load(first_boot_user_data(user))
    assert doc["packages"] == ["nginx"] and doc["package_upgrade"] is True
    assert doc["runcmd"] == ["echo hi", READY_COMMAND]


def test_cloud_init_wraps_a_user_script_in_multipart() -> None:
    """A shell script becomes the second MIME part, after changeover's cloud-config."""
    msg = email.message_from_string(first_boot_user_data("#!/bin/sh\necho hello\n"))
    parts = [p for p in msg.walk() if not p.is_multipart()]
    assert [p.get_content_type() for p in parts] == ["text/cloud-config", "text/x-shellscript"]
    assert "echo hello" in parts[1].get_payload(decode=True).decode()


def _launch(aws: AwsWorld, launch: dict[str, object]) -> dict[str, object]:
    cfg = aws.config(db=False).model_dump(mode="json")
    cfg["roles"]["web"]["launch"] = {**launch, "subnets": [aws.subnet]}
    config = StackConfig.model_validate(cfg)
    provider = aws.provider(config)
    servers = provider.create_servers(
        stack=aws.stack,
        role="web",
        generation=1,
        run_id="r",
        count=1,
        image="",
        size="small",
        idempotency_key="r-" + "-".join(sorted(launch)),
        links={},
    )
    inst = aws.ec2.describe_instances(InstanceIds=[servers[0].id])["Reservations"][0]["Instances"][
        0
    ]
    return dict(inst)


def test_launch_from_ssm_parameter_and_template(aws: AwsWorld) -> None:
    """The latest AMI from an SSM public parameter, or a launch template by name."""
    param = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
    expected = aws.provider(aws.config()).ssm.get_parameter(Name=param)["Parameter"]["Value"]
    assert _launch(aws, {"ami_ssm_parameter": param})["ImageId"] == expected
    aws.ec2.create_launch_template(
        LaunchTemplateName="web-lt",
        LaunchTemplateData={"ImageId": aws.ami, "InstanceType": "t3.micro"},
    )
    inst = _launch(aws, {"launch_template": "web-lt"})
    assert inst["ImageId"] == aws.ami and inst["InstanceType"] == "t3.micro"


def test_user_data_is_sent_on_launch(aws: AwsWorld) -> None:
    """The instance's user data is changeover's cloud-init."""
    inst = _launch(aws, {"ami": aws.ami})
    attr = aws.ec2.describe_instance_attribute(
        InstanceId=str(inst["InstanceId"]), Attribute="userData"
    )
    text = base64.b64decode(attr["UserData"]["Value"]).decode()
    assert "package_reboot_if_required: true" in text


def test_ssm_transport_runs_a_command(aws: AwsWorld) -> None:
    """SSM RunCommand: send, poll the invocation, return its status."""
    config = aws.config(db=False)
    made = aws.bootstrap(aws.provider(config), config)
    provider = aws.provider(config)
    server = provider.describe_servers(aws.stack, made["web"][:1])[0]
    result = SsmTransport(provider).run(server, "echo hello", timeout=10)
    assert result.ok
    assert (
        provider.api_calls["SendCommand"] == 1 and provider.api_calls["GetCommandInvocation"] >= 1
    )


def test_switching_data_back_moves_the_new_volume_to_the_old_db(aws: AwsWorld) -> None:
    """Rollback after the switch: the old db gets a volume made from the new db's, and its
    own volume is detached (with InstanceId, which moto needs)."""
    config = aws.config(web=1)
    made = aws.bootstrap(aws.provider(config), config)
    provider = aws.provider(config)
    old_db = made["db"][0]
    new_db = provider.create_servers(
        stack=aws.stack,
        role="db",
        generation=2,
        run_id="r2",
        count=1,
        image="",
        size="small",
        idempotency_key="r2/db",
        links={},
    )[0].id
    provider.data_copy_live(aws.stack, old_db, new_db)
    provider.data_freeze(aws.stack, old_db)
    provider.data_final_sync(aws.stack, old_db, new_db)
    provider.data_switch(aws.stack, old_db, new_db)
    assert provider.data_mode(aws.stack, old_db)["mode"] == "switched"
    new_vol = aws.ec2.describe_volumes(
        Filters=[{"Name": "attachment.instance-id", "Values": [new_db]}]
    )["Volumes"]
    new_vol_id = next(
        v["VolumeId"] for v in new_vol if v["Attachments"][0]["Device"] == DATA_DEVICE
    )
    provider.data_switch_back(aws.stack, old_db, new_db)
    assert provider.data_mode(aws.stack, old_db)["mode"] == "normal"
    original = aws.ec2.describe_volumes(VolumeIds=made["db_volume"])["Volumes"][0]
    assert original["State"] == "available", "the old volume was detached"
    back = aws.ec2.describe_volumes(
        Filters=[
            {"Name": "attachment.instance-id", "Values": [old_db]},
            {"Name": "attachment.device", "Values": [DATA_DEVICE]},
        ]
    )["Volumes"]
    snap = aws.ec2.describe_snapshots(SnapshotIds=[back[0]["SnapshotId"]])["Snapshots"][0]
    assert snap["VolumeId"] == new_vol_id
    assert provider.api_calls["DetachVolume"] == 1


def test_launch_options_reach_run_instances(aws: AwsWorld) -> None:
    """Instance type, subnet, security groups, key name and instance profile are passed."""
    sg = aws.ec2.create_security_group(GroupName="web", Description="web")["GroupId"]
    aws.ec2.create_key_pair(KeyName="ops")
    iam = session().client("iam")
    iam.create_instance_profile(InstanceProfileName="changeover-web")
    inst = _launch(
        aws,
        {
            "ami": aws.ami,
            "instance_type": "m5.large",
            "security_groups": [sg],
            "key_name": "ops",
            "instance_profile": "changeover-web",
        },
    )
    assert inst["InstanceType"] == "m5.large" and inst["SubnetId"] == aws.subnet
    assert [g["GroupId"] for g in inst["SecurityGroups"]] == [sg]
    assert inst["KeyName"] == "ops"
    assert "changeover-web" in inst["IamInstanceProfile"]["Arn"]


def test_quirk_reassociation_needs_the_flag_spelled_out(aws: AwsWorld) -> None:
    """moto refuses to move an associated EIP unless AllowReassociation is given; the
    provider always gives it, so the move works."""
    config = aws.config(address="both", db=False)
    made = aws.bootstrap(aws.provider(config), config)
    with pytest.raises(ClientError, match="AlreadyAssociated"):
        aws.ec2.associate_address(AllocationId=aws.eip_alloc, InstanceId=made["web"][1])
    provider = aws.provider(config)
    provider.set_members(aws.stack, aws.eip_alloc, [made["web"][1]])
    assert aws.eip_holder() == made["web"][1]


def test_http_health_checks_go_to_the_instance_address(aws: AwsWorld) -> None:
    """An http check probes the instance's private IP on the configured port and path."""
    cfg = aws.config(db=False).model_dump(mode="json")
    cfg["roles"]["web"]["health"] = {"type": "http", "path": "/up", "port": 8080}
    config = StackConfig.model_validate(cfg)
    made = aws.bootstrap(aws.provider(config), config)
    probes: list[tuple[str, int, str]] = []

    def prober(host: str, port: int, path: str, timeout: float) -> tuple[int, str | None]:
        probes.append((host, port, path))
        return (503 if len(probes) == 1 else 200), None

    provider = aws.provider(config, prober=prober)
    server = provider.describe_servers(aws.stack, made["web"][:1])[0]
    first = provider.verify_server(server, config.roles["web"].health, config.hygiene)
    second = provider.verify_server(server, config.roles["web"].health, config.hygiene)
    assert not first.passed and "HTTP 503" in first.reasons[0] and second.passed
    assert probes[0] == (server.host, 8080, "/up") and server.host
