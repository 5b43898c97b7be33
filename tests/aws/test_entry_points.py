"""Stacks as users build them on AWS: web servers behind an ALB target group *and* an
Elastic IP, a db with an EBS data volume, and foreign resources in the same account
(an untagged instance, an untagged Elastic IP on it, another stack's target group).

Rebuilt and rotated on moto, in-process and through its HTTP server: every entry point
ends on verified new servers, the target group never drops below the serving count
(sampled after every mutating call), every resource the run creates carries the run id,
nothing foreign is touched, and the old generation is gone. The destroy guard reads the
cloud's own view: a server that holds an Elastic IP the config does not know is never
destroyed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from orchestrator.engine import Engine
from orchestrator.errors import BadInput
from orchestrator.models import TAG_RUN, TAG_STACK
from orchestrator.plan import Outcome
from providers.aws import AwsProvider, is_mutating
from strategies.rebuild import plan_rebuild
from strategies.rotate import plan_rotate
from tests.aws.world import AwsWorld

WEB = 2


@dataclass
class Foreign:
    """What another team keeps in the same account: none of it may change (I7)."""

    instance: str
    eip_alloc: str
    target_group: str
    snapshot: dict[str, Any] = field(default_factory=dict)


def add_foreign(world: AwsWorld) -> Foreign:
    """An untagged Elastic IP on the untagged instance, and another stack's target group
    with that instance registered."""
    eip = world.ec2.allocate_address(Domain="vpc")["AllocationId"]
    world.ec2.associate_address(AllocationId=eip, InstanceId=world.foreign)
    vpc = world.ec2.describe_vpcs()["Vpcs"][0]["VpcId"]
    tg = world.elbv2.create_target_group(
        Name="other-team-web",
        Protocol="HTTP",
        Port=80,
        VpcId=vpc,
        Tags=[{"Key": TAG_STACK, "Value": "other-team"}],
    )["TargetGroups"][0]["TargetGroupArn"]
    world.elbv2.register_targets(TargetGroupArn=tg, Targets=[{"Id": world.foreign}])
    foreign = Foreign(world.foreign, eip, tg)
    foreign.snapshot = foreign_state(world, foreign)
    return foreign


def foreign_state(world: AwsWorld, foreign: Foreign) -> dict[str, Any]:
    inst = world.ec2.describe_instances(InstanceIds=[foreign.instance])["Reservations"][0]
    eip = world.ec2.describe_addresses(AllocationIds=[foreign.eip_alloc])["Addresses"][0]
    targets = world.elbv2.describe_target_health(TargetGroupArn=foreign.target_group)
    return {
        "state": inst["Instances"][0]["State"]["Name"],
        "tags": inst["Instances"][0].get("Tags", []),
        "eip_holder": eip.get("InstanceId"),
        "targets": sorted(t["Target"]["Id"] for t in targets["TargetHealthDescriptions"]),
    }


def sample_after_mutations(world: AwsWorld, provider: AwsProvider) -> list[tuple[str, int]]:
    """After every mutating call the provider makes, the healthy targets of the stack's
    target group, read with the world's own (uncounted) client."""
    samples: list[tuple[str, int]] = []

    def after(model: Any, **_: Any) -> None:
        if is_mutating(model.name):
            samples.append((model.name, len(world.healthy_targets())))

    for client in (provider.ec2, provider.elbv2, provider.ssm):
        client.meta.events.register("after-call", after)
    return samples


def run_tags_of_everything(world: AwsWorld, run_id: str) -> dict[str, list[str]]:
    """Resources of the stack created after bootstrap that lack the run's tag."""
    missing: dict[str, list[str]] = {"instances": [], "volumes": [], "snapshots": []}
    for i in world.instances().values():
        if i["tags"].get("changeover:generation") == "2" and i["tags"].get(TAG_RUN) != run_id:
            missing["instances"].append(i["instance"]["InstanceId"])
    flt = [{"Name": f"tag:{TAG_STACK}", "Values": [world.stack]}]
    for vol in world.ec2.describe_volumes(Filters=flt)["Volumes"]:
        tags = {t["Key"]: t["Value"] for t in vol.get("Tags", [])}
        if vol.get("SnapshotId") and tags.get(TAG_RUN) != run_id:
            missing["volumes"].append(vol["VolumeId"])
    snaps = world.ec2.describe_snapshots(OwnerIds=["self"], Filters=flt)["Snapshots"]
    for snap in snaps:
        tags = {t["Key"]: t["Value"] for t in snap.get("Tags", [])}
        if tags.get(TAG_RUN) != run_id:
            missing["snapshots"].append(snap["SnapshotId"])
    assert snaps, "the rebuild made no snapshot"
    return {k: v for k, v in missing.items() if v}


def engine(tmp_path: Path, provider: AwsProvider, config: Any) -> Engine:
    return Engine(state_dir=tmp_path, provider=provider, config=config, sleep=lambda _s: None)


def verified(eng: Engine, run_id: str) -> set[str]:
    return {
        i
        for rec in eng.journal.steps(run_id)
        if rec.key.startswith("VerifyServers") and rec.state == "done"
        for i in rec.outputs.get("passed", [])
    }


@pytest.fixture(params=["in-process", "http"])
def world(request: pytest.FixtureRequest) -> AwsWorld:
    """moto in-process, and moto's HTTP server on 127.0.0.1 (what a subprocess sees)."""
    name = "aws" if request.param == "in-process" else "aws_server"
    found: AwsWorld = request.getfixturevalue(name)
    return found


def test_rebuild_moves_every_entry_point(world: AwsWorld, tmp_path: Path) -> None:
    config = world.config(address="both", web=WEB, db=True)
    made = world.bootstrap(world.provider(config), config)
    foreign = add_foreign(world)
    provider = world.provider(config)
    samples = sample_after_mutations(world, provider)
    eng = engine(tmp_path, provider, config)
    result = eng.start(plan_rebuild(provider, world.stack, config))
    assert result.outcome == Outcome.SUCCEEDED, result.message
    run_id = result.run_id or ""

    live = world.instances()
    new_web = {i for i, v in live.items() if v["tags"]["changeover:role"] == "web"}
    assert len(new_web) == WEB and all(
        live[i]["tags"]["changeover:generation"] == "2" for i in new_web
    )
    passed = verified(eng, run_id)
    assert set(world.healthy_targets()) == new_web <= passed
    assert world.eip_holder() in new_web
    assert not set(made["web"] + made["db"]) & set(live), "old generation still running"
    assert samples and min(n for _, n in samples) >= WEB, samples
    assert run_tags_of_everything(world, run_id) == {}
    assert foreign_state(world, foreign) == foreign.snapshot
    entry = result.summary["entry_points"]
    assert set(entry[world.tg_arn]["after"]) == new_web
    assert entry[world.eip_alloc]["after"] == [world.eip_holder()]
    eng.close()


def test_rotate_moves_every_entry_point(world: AwsWorld, tmp_path: Path) -> None:
    config = world.config(address="both", web=WEB, db=True, max_surge=1)
    made = world.bootstrap(world.provider(config), config)
    foreign = add_foreign(world)
    holder_before = world.eip_holder()
    provider = world.provider(config)
    samples = sample_after_mutations(world, provider)
    eng = engine(tmp_path, provider, config)
    result = eng.start(plan_rotate(provider, world.stack, config))
    assert result.outcome == Outcome.SUCCEEDED, result.message

    live = world.instances()
    new_web = {i for i, v in live.items() if v["tags"]["changeover:role"] == "web"}
    assert len(new_web) == WEB and not new_web & set(made["web"])
    assert set(world.healthy_targets()) == new_web <= verified(eng, result.run_id or "")
    assert world.eip_holder() in new_web and world.eip_holder() != holder_before
    assert made["db"][0] in live, "rotate keeps the db"
    assert all(v["tags"][TAG_RUN] == result.run_id for i, v in live.items() if i in new_web)
    assert samples and min(n for _, n in samples) >= WEB, samples
    assert foreign_state(world, foreign) == foreign.snapshot
    eng.close()


def test_destroy_guard_spares_a_server_holding_an_unknown_eip(
    aws: AwsWorld, tmp_path: Path
) -> None:
    """A web server holds an Elastic IP the config does not know (someone's admin IP):
    rotate replaces it, but the destroy guard finds the EIP through DescribeAddresses
    and refuses; the run rolls back and the server is never destroyed (I2)."""
    config = aws.config(address="tg", web=WEB, db=False)
    made = aws.bootstrap(aws.provider(config), config)
    unknown = aws.ec2.allocate_address(Domain="vpc")["AllocationId"]
    victim = made["web"][0]
    aws.ec2.associate_address(AllocationId=unknown, InstanceId=victim)
    provider = aws.provider(config)
    result = engine(tmp_path, provider, config).start(plan_rotate(provider, aws.stack, config))
    assert result.outcome == Outcome.ROLLED_BACK, result.message
    assert "still serve" in result.message and unknown in result.message
    live = aws.instances()
    assert victim in live and live[victim]["instance"]["State"]["Name"] == "running"
    holder = aws.ec2.describe_addresses(AllocationIds=[unknown])["Addresses"][0]
    assert holder.get("InstanceId") == victim
    assert set(aws.healthy_targets()) == set(made["web"]), "rollback restores the group"
    assert set(live) == set(made["web"]), "the rolled-back batch is gone, the old kept"


def test_destroy_guard_stops_a_rebuild_before_retiring(aws: AwsWorld, tmp_path: Path) -> None:
    """The same guard in a rebuild: the old server that holds an unknown EIP is not
    retired; the run rolls back to the old generation, which still serves."""
    config = aws.config(address="tg", web=WEB, db=False)
    made = aws.bootstrap(aws.provider(config), config)
    unknown = aws.ec2.allocate_address(Domain="vpc")["AllocationId"]
    aws.ec2.associate_address(AllocationId=unknown, InstanceId=made["web"][1])
    provider = aws.provider(config)
    result = engine(tmp_path, provider, config).start(plan_rebuild(provider, aws.stack, config))
    assert result.outcome == Outcome.ROLLED_BACK, result.message
    assert unknown in result.message
    assert set(aws.instances()) == set(made["web"])
    assert set(aws.healthy_targets()) == set(made["web"])


def test_an_eip_alone_cannot_serve_a_role_of_several(aws: AwsWorld) -> None:
    """Refused at plan time (exit 2, one line that says what to configure): an Elastic
    IP holds one server, so the other web servers would serve nothing (I4)."""
    config = aws.config(address="eip", web=WEB, db=False)
    provider = aws.provider(config)
    with pytest.raises(BadInput) as err:
        plan_rebuild(provider, aws.stack, config)
    text = str(err.value)
    assert "\n" not in text and "target_group" in text and "count = 1" in text
    assert err.value.exit_code == 2
    with pytest.raises(BadInput):
        plan_rotate(provider, aws.stack, config)
    assert provider.accounting.mutating == []


def test_entry_points_in_the_config_file(tmp_path: Path) -> None:
    """`addresses` with typed keys, roles checked against the stack's serving roles."""
    from orchestrator.errors import ConfigError
    from orchestrator.settings import load_settings

    base = '[stacks.shop]\nprovider = "aws"\nregion = "us-east-1"\n'
    roles = "[stacks.shop.roles.web]\ncount = 2\n[stacks.shop.roles.db]\ndata = true\n"
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        base + 'addresses = [{ target_group = "shop-web", roles = ["web"] }, '
        '{ elastic_ip = "eipalloc-1" }]\n' + roles
    )
    stack = load_settings(cfg).stack("shop")
    eps = {ep.name: (ep.type, ep.roles) for ep in stack.entry_points}
    assert eps == {
        "shop-web": ("target-group", ["web"]),
        "eipalloc-1": ("elastic-ip", ["web"]),
    }
    for bad, says in (
        ('addresses = [{ target_group = "x", roles = ["db"] }]\n', "not a serving role"),
        ('address = "x"\naddresses = [{ target_group = "y" }]\n', "not both"),
        ('addresses = [{ target_group = "x", elastic_ip = "y" }]\n', "exactly one"),
        ("", "needs `address` or `addresses`"),
        ('addresses = [{ proxy = "x" }, { proxy = "x" }]\n', "listed twice"),
    ):
        cfg.write_text(base + bad + roles)
        with pytest.raises(ConfigError) as err:
            load_settings(cfg)
        assert says in str(err.value) and "\n" not in str(err.value)
    assert json.dumps(eps)


def test_a_failure_after_cutover_points_every_entry_point_back(
    aws: AwsWorld, tmp_path: Path
) -> None:
    """The new server the Elastic IP moved to dies right after the move: the cutover's
    check through the entry points fails, and rollback points *both* the target group
    and the Elastic IP back at the old servers, then destroys the new generation."""
    config = aws.config(address="both", web=WEB, db=False)
    made = aws.bootstrap(aws.provider(config), config)
    holder_before = aws.eip_holder()
    provider = aws.provider(config)
    killed: list[str] = []

    def kill_new_holder(model: Any, **_: Any) -> None:
        if model.name == "AssociateAddress" and not killed:
            holder = aws.eip_holder()
            assert holder is not None and holder not in made["web"]
            aws.ec2.terminate_instances(InstanceIds=[holder])
            killed.append(holder)

    provider.ec2.meta.events.register("after-call", kill_new_holder)
    result = engine(tmp_path, provider, config).start(plan_rebuild(provider, aws.stack, config))
    assert killed and result.outcome == Outcome.ROLLED_BACK, result.message
    assert aws.eip_holder() == holder_before
    assert set(aws.healthy_targets()) == set(made["web"])
    assert set(aws.instances()) == set(made["web"]), "the new generation is destroyed"
