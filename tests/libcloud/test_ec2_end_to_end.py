"""rebuild and rotate through libcloud's EC2 driver on moto, with the real engine and
strategies: the address moves to the new generation, the old nodes are destroyed, and a
node the stack does not own is never touched."""

from __future__ import annotations

from pathlib import Path

from orchestrator.engine import Engine
from orchestrator.models import TAG_GENERATION, TAG_ROLE, TAG_RUN, TAG_STACK
from orchestrator.plan import Outcome
from providers.libcloud_data import TAG_DATA_MODE, TAG_DATA_OF
from providers.libcloud_provider import LibcloudProvider
from strategies.rebuild import plan_rebuild
from strategies.rotate import plan_rotate
from tests.libcloud.fakes import PENDING_FACTS, FakeClock
from tests.libcloud.world import DEVICE, FREEZE, UNFREEZE, Ec2World


def _engine(tmp_path: Path, provider: LibcloudProvider, world: Ec2World) -> Engine:
    clock = FakeClock()
    config = provider.config
    return Engine(
        state_dir=tmp_path / "state",
        provider=provider,
        config=config,
        sleep=clock.sleep,
        clock=clock.clock,
    )


def test_rebuild_moves_the_address_and_the_data_volume(ec2: Ec2World, tmp_path: Path) -> None:
    """rebuild: the EIP ends on a gen-2 web, the new db's volume is made from the frozen
    old one, the old generation is terminated and the foreign node is untouched."""
    config = ec2.config(web=1, db=True)
    provider = ec2.provider(config)
    made = ec2.seed(config)
    old = set(made["web"] + made["db"])
    result = _engine(tmp_path, provider, ec2).start(plan_rebuild(provider, ec2.stack, config))
    assert result.outcome == Outcome.SUCCEEDED, result.message
    live = ec2.instances()
    holder = ec2.eip_holder()
    assert holder in live and live[holder][TAG_GENERATION] == "2"
    assert live[holder][TAG_ROLE] == "web"
    assert not old & set(live), "the old generation is still running"
    assert ec2.alive(ec2.foreign)
    new_db = next(i for i, t in live.items() if t.get(TAG_ROLE) == "db")
    [vol] = ec2.volumes_of(new_db)
    assert vol["Attachments"][0]["InstanceId"] == new_db
    assert vol["Attachments"][0]["Device"] == DEVICE
    snap = ec2.ec2.describe_snapshots(SnapshotIds=[vol["SnapshotId"]])["Snapshots"][0]
    assert snap["VolumeId"] == made["volumes"][0]
    # I4: the snapshots and the volume the run made carry its id, like its instances.
    assert {t["Key"]: t["Value"] for t in vol["Tags"]}[TAG_RUN] == result.run_id
    flt = [{"Name": f"tag:{TAG_STACK}", "Values": [ec2.stack]}]
    snaps = ec2.ec2.describe_snapshots(OwnerIds=["self"], Filters=flt)["Snapshots"]
    assert snaps and all(
        {t["Key"]: t["Value"] for t in s.get("Tags", [])}.get(TAG_RUN) == result.run_id
        for s in snaps
    )
    assert {live[i][TAG_RUN] for i in live if i != ec2.foreign} == {result.run_id}
    # The old db froze before the final snapshot; the new one took writes after it.
    assert ec2.transport.ran(FREEZE) == made["db"]
    assert ec2.transport.ran(UNFREEZE) == [new_db]
    [old_vol] = ec2.volumes_of(made["db"][0])
    tags = {t["Key"]: t["Value"] for t in old_vol["Tags"]}
    assert tags[TAG_DATA_MODE] == "switched"
    assert result.summary["api_calls"]["associate_address"] == 1


def test_rotate_replaces_the_server_behind_the_address(ec2: Ec2World, tmp_path: Path) -> None:
    """rotate: a verified gen-2 web takes the EIP before the gen-1 web is destroyed; the
    db and the foreign node are untouched."""
    config = ec2.config(web=1, db=True)
    provider = ec2.provider(config)
    made = ec2.seed(config)
    result = _engine(tmp_path, provider, ec2).start(plan_rotate(provider, ec2.stack, config))
    assert result.outcome == Outcome.SUCCEEDED, result.message
    live = ec2.instances()
    holder = ec2.eip_holder()
    assert holder in live and live[holder][TAG_GENERATION] == "2"
    assert made["web"][0] not in live
    assert made["db"][0] in live and ec2.alive(ec2.foreign)
    # I1: the new server's app was checked before the address moved to it.
    assert ("check", holder) in ec2.apps.log


def test_bake_failure_points_the_address_back(ec2_local: Ec2World, tmp_path: Path) -> None:
    """A failing bake rolls back: the EIP returns to gen 1, the new servers are gone, and
    the db gets back what the new one acknowledged (a volume made from its snapshot)."""
    world = ec2_local
    config = world.config(web=1, db=True)
    provider = world.provider(config)
    made = world.seed(config)
    world.apps.failing_probes = 100  # every probe through the address fails after cutover
    result = _engine(tmp_path, provider, world).start(plan_rebuild(provider, world.stack, config))
    assert result.outcome == Outcome.ROLLED_BACK, result.message
    assert world.eip_holder() == made["web"][0]
    live = world.instances()
    assert set(live) == {*made["web"], *made["db"], world.foreign}
    [back] = world.volumes_of(made["db"][0])
    assert back["VolumeId"] != made["volumes"][0], "the db kept its pre-cutover volume"
    tags = {t["Key"]: t["Value"] for t in back["Tags"]}
    assert tags[TAG_DATA_MODE] == "normal" and tags[TAG_DATA_OF] == made["db"][0]
    assert world.transport.ran(UNFREEZE)[-1] == made["db"][0]


def test_a_broken_new_server_never_gets_the_address(ec2_local: Ec2World, tmp_path: Path) -> None:
    """I1, I6: a new server failing its app check stops the run before cutover; the old
    stack is exactly as it was and the new server is destroyed."""
    world = ec2_local
    config = world.config(web=1)
    provider = world.provider(config)
    made = world.seed(config)
    world.apps.break_next = 1
    result = _engine(tmp_path, provider, world).start(plan_rebuild(provider, world.stack, config))
    assert result.outcome == Outcome.ROLLED_BACK
    assert "verification failed" in result.message
    assert world.eip_holder() == made["web"][0]
    assert set(world.instances()) == {*made["web"], world.foreign}
    assert "associate_address" not in result.summary["api_calls"]


def test_hygiene_runs_over_the_transport_and_gates(ec2_local: Ec2World) -> None:
    """Hygiene is read with orchestrator.hygiene's script over the given transport (never
    libcloud's SSH): a server with pending upgrades fails the gate, naming them."""
    world = ec2_local
    world.transport.facts = PENDING_FACTS
    config = world.config(web=1)
    provider = world.provider(config)
    [server] = provider.create_servers(
        stack=world.stack,
        role="web",
        generation=1,
        run_id="r1",
        count=1,
        image=world.ami,
        size="t3.micro",
        idempotency_key="r1/web",
        links={},
    )
    report = provider.verify_server(server, config.roles["web"].health, config.hygiene)
    assert report.running and report.app_ok and not report.hygiene_ok
    assert any("pending upgrade" in r for r in report.reasons)
    assert [sid for sid, _ in world.transport.commands] == [server.id]
