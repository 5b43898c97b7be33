"""rebuild and rotate on AWS (moto), through the real engine and strategies."""

from __future__ import annotations

from typing import Any

from structlog.testing import capture_logs

from orchestrator import events
from orchestrator.engine import Engine
from orchestrator.plan import Outcome
from providers.cloudinit import READY_FILE
from providers.transport import CommandResult
from strategies.rebuild import plan_rebuild
from strategies.rotate import plan_rotate
from tests.aws.faults import AwsFaults
from tests.aws.world import DATA_DEVICE, AwsWorld
from tests.recorded import PENDING_FACTS, RecordedTransport


def _engine(tmp_path: Any, provider: Any, config: Any, **kw: Any) -> Engine:
    return Engine(state_dir=tmp_path, provider=provider, config=config, sleep=lambda _s: None, **kw)


def test_rebuild_moves_eip_and_data_volume(aws: AwsWorld, tmp_path: Any) -> None:
    """EIP ends on a gen-2 web; the new db's volume comes from a snapshot of the old one;
    the old instances are terminated; the untagged instance is untouched."""
    config = aws.config()
    made = aws.bootstrap(aws.provider(config), config)
    provider = aws.provider(config)
    old = set(made["web"] + made["db"])
    engine = _engine(tmp_path, provider, config)
    result = engine.start(plan_rebuild(provider, aws.stack, config))
    assert result.outcome == Outcome.SUCCEEDED, result.message
    holder = aws.eip_holder()
    live = aws.instances()
    assert holder in live and live[holder]["tags"]["changeover:generation"] == "2"
    assert live[holder]["tags"]["changeover:role"] == "web"
    assert not old & set(live), "old generation still running"
    new_db = next(i for i, v in live.items() if v["tags"]["changeover:role"] == "db")
    vols = aws.ec2.describe_volumes(
        Filters=[
            {"Name": "attachment.instance-id", "Values": [new_db]},
            {"Name": "attachment.device", "Values": [DATA_DEVICE]},
        ]
    )["Volumes"]
    assert len(vols) == 1
    snap = aws.ec2.describe_snapshots(SnapshotIds=[vols[0]["SnapshotId"]])["Snapshots"][0]
    assert snap["VolumeId"] == made["db_volume"][0]
    assert aws.foreign in aws.instances(tagged_only=False)
    assert result.summary["api_calls"]["AssociateAddress"] == 1


def test_rotate_target_group_keeps_min_healthy(aws: AwsWorld, tmp_path: Any) -> None:
    """Rotate 10 targets with surge 3 under boot, health and drain latency: healthy
    targets never drop below min-healthy at any step, and 10 new targets remain."""
    config = aws.config(address="tg", web=10, db=False, max_surge=3, min_healthy=100)
    now = [0.0]
    faults = AwsFaults(clock=lambda: now[0]).boot_delay(2).health_delay(2).drain_delay(3)

    def tick(_s: float) -> None:
        now[0] += 0.5

    made = aws.bootstrap(aws.provider(config), config)
    provider = aws.provider(config, faults, sleep=tick)
    samples: list[int] = []

    def sample(kind: str, _p: dict[str, Any]) -> None:
        if kind in ("step_started", "step_done", "retry"):
            samples.append(len(aws.healthy_targets()))

    engine = Engine(
        state_dir=tmp_path, provider=provider, config=config, sleep=tick, on_event=sample
    )
    result = engine.start(plan_rotate(provider, aws.stack, config))
    assert result.outcome == Outcome.SUCCEEDED, result.message
    assert samples and min(samples) >= 10, samples
    healthy = set(aws.healthy_targets())
    assert len(healthy) == 10 and not healthy & set(made["web"])
    assert all(aws.instances()[i]["tags"]["changeover:generation"] == "2" for i in healthy)


def test_injected_faults_are_retried(aws: AwsWorld, tmp_path: Any) -> None:
    """Throttling on 20% of calls, NotFound after a launch and one 500: the rebuild still
    succeeds, and the retries show in the logs."""
    config = aws.config()
    aws.bootstrap(aws.provider(config), config)
    provider = aws.provider(config)
    faults = AwsFaults(seed=3).throttle(0.2).not_found_after_launch()
    faults.fail_once("AssociateAddress", "InternalError", 500).attach(
        provider.ec2, provider.elbv2, provider.ssm
    )
    with capture_logs() as logs:
        result = _engine(tmp_path, provider, config).start(
            plan_rebuild(provider, aws.stack, config)
        )
    assert result.outcome == Outcome.SUCCEEDED, result.message
    retries = [e for e in logs if e["event"] == events.PROVIDER_RETRY]
    assert any("RequestLimitExceeded" in e["error"] for e in retries)
    assert any("NotFound" in e["error"] for e in retries)
    assert any(e["operation"] == "associate_address" for e in retries)
    assert sum(1 for i in faults.injected if "RequestLimitExceeded" in i) >= 5


def test_plan_makes_no_mutating_call(aws: AwsWorld) -> None:
    """I8: planning a rebuild and a rotate makes zero mutating API calls, counted."""
    config = aws.config(address="tg", web=3)
    aws.bootstrap(aws.provider(config), config)
    provider = aws.provider(config)
    plan_rebuild(provider, aws.stack, config)
    plan_rotate(provider, aws.stack, config)
    assert provider.accounting.mutating == []
    assert provider.api_calls["DescribeInstances"] >= 1


def test_quirks_elastic_ip_holder_is_read_from_describe_addresses(aws: AwsWorld) -> None:
    """The old instance keeps showing the EIP as its public IP; the holder is read from
    DescribeAddresses, and reassociation needs AllowReassociation spelled out."""
    config = aws.config(address="both", db=False)
    provider = aws.provider(config)
    made = aws.bootstrap(provider, config)
    a, b = made["web"]
    provider.set_members(aws.stack, aws.eip_alloc, [b])
    stale = aws.ec2.describe_instances(InstanceIds=[a])["Reservations"][0]["Instances"][0]
    assert stale.get("PublicIpAddress"), "moto keeps the EIP on the old instance"
    provider.refresh()
    assert provider.get_members(aws.stack, aws.eip_alloc) == [b]


def test_rotate_behind_an_elastic_ip_swaps_the_holder(aws: AwsWorld, tmp_path: Any) -> None:
    """An EIP holds one server: rotate swaps it to the verified new instance atomically,
    then drains and terminates the old one."""
    config = aws.config(web=1, db=False)
    made = aws.bootstrap(aws.provider(config), config)
    provider = aws.provider(config)
    result = _engine(tmp_path, provider, config).start(plan_rotate(provider, aws.stack, config))
    assert result.outcome == Outcome.SUCCEEDED, result.message
    holder = aws.eip_holder()
    assert holder is not None and holder != made["web"][0]
    assert made["web"][0] not in aws.instances()
    assert aws.instances()[holder]["tags"]["changeover:generation"] == "2"


def test_hygiene_gate_over_the_transport(aws: AwsWorld, tmp_path: Any) -> None:
    """The health gate reads real recorded host facts over the transport: a clean host
    passes and its facts are journaled; pending security upgrades or an unfinished
    cloud-init fail it, and the EIP never moves."""
    config = aws.config(hygiene={"pending": "security"})
    made = aws.bootstrap(aws.provider(config), config)
    clean = RecordedTransport()
    provider = aws.provider(config, transport=clean)
    result = _engine(tmp_path / "a", provider, config).start(
        plan_rebuild(provider, aws.stack, config)
    )
    assert result.outcome == Outcome.SUCCEEDED, result.message
    assert any("changeover facts" in cmd for _, cmd in clean.commands)
    holder = aws.eip_holder()
    for transport, reason in (
        (RecordedTransport(facts=PENDING_FACTS), "pending security upgrade"),
        (
            RecordedTransport(failing={f"test -f {READY_FILE}": CommandResult(1, "")}),
            "cloud-init has not finished",
        ),
    ):
        provider = aws.provider(config, transport=transport)
        result = _engine(tmp_path / reason[:7], provider, config).start(
            plan_rebuild(provider, aws.stack, config)
        )
        assert result.outcome == Outcome.ROLLED_BACK and reason in result.message
        assert aws.eip_holder() == holder
    assert made


def test_initializing_status_checks_are_waited_for(aws: AwsWorld, tmp_path: Any) -> None:
    """EC2 status checks still `initializing` make the gate wait (retry), not fail."""
    config = aws.config()
    aws.bootstrap(aws.provider(config), config)
    now = [0.0]

    def tick(_s: float) -> None:
        now[0] += 0.5

    faults = AwsFaults(clock=lambda: now[0]).status_delay(5)
    provider = aws.provider(config, faults, sleep=tick)
    engine = Engine(state_dir=tmp_path, provider=provider, config=config, sleep=tick)
    result = engine.start(plan_rebuild(provider, aws.stack, config))
    assert result.outcome == Outcome.SUCCEEDED, result.message
    steps = {s.key: s for s in engine.journal.steps(result.run_id or "")}
    assert steps["VerifyServers"].attempts > 1
    engine.close()
