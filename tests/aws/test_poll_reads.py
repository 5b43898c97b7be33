"""What one poll of a sliding window reads on AWS (issue 15, API economy), under moto on a
virtual clock: boot waits and status checks share one DescribeInstanceStatus, a lane's
add registers its target without reading the group first, and the min-healthy count of a
target group comes from the target health the member reads already hold."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from moto import mock_aws

from orchestrator.errors import TransientError
from providers.aws import AwsProvider
from tests.aws.clock import Fleet, VirtualClock, fleet
from tests.aws.faults import AwsFaults


@pytest.fixture
def aws_mock() -> Iterator[None]:
    with mock_aws():
        yield


def _fleet(tmp_path: Path, faults: AwsFaults, vc: VirtualClock) -> Fleet:
    return fleet(tmp_path, vc, faults, servers=2, surge=2)


def _launch(f: Fleet, count: int) -> list[str]:
    web = f.config.roles["web"]
    created = f.provider.create_servers(
        stack=f.world.stack,
        role="web",
        generation=2,
        run_id="run-1",
        count=count,
        image=web.image,
        size=web.size,
        idempotency_key="run-1/create",
        links={},
        fresh=True,
    )
    return [s.id for s in created]


def _poll(p: AwsProvider, stack: str, ids: list[str]) -> None:
    p.refresh()
    p.ex_prefetch(stack, ids)


def _since(p: AwsProvider, before: Counter[str]) -> Counter[str]:
    return Counter({k: v - before[k] for k, v in p.api_calls.items() if v - before[k]})


def test_a_poll_reads_boots_and_status_checks_in_one_call(aws_mock: None, tmp_path: Path) -> None:
    vc = VirtualClock()
    f = _fleet(tmp_path, AwsFaults(clock=vc.clock).boot_delay(40.0).status_delay(20.0), vc)
    p, stack = f.provider, f.world.stack
    checks = {"web": f.config.roles["web"].health}
    ids = _launch(f, 2)
    before = Counter(p.api_calls)

    vc.sleep(10.0)
    _poll(p, stack, ids)
    assert [s.state for s in p.describe_servers(stack, ids)] == ["pending", "pending"]
    assert _since(p, before) == {"DescribeInstanceStatus": 1}

    vc.sleep(40.0)  # booted, status checks still initializing
    _poll(p, stack, ids)
    servers = p.describe_servers(stack, ids)
    assert [s.state for s in servers] == ["running", "running"]
    assert all(s.host for s in servers), "the private address comes from RunInstances"
    with pytest.raises(TransientError, match="still initializing"):
        p.verify_servers(servers, checks, f.config.hygiene)
    assert _since(p, before) == {"DescribeInstanceStatus": 2}, "one read per poll"

    vc.sleep(25.0)
    _poll(p, stack, ids)
    servers = p.describe_servers(stack, ids)
    reports = p.verify_servers(servers, checks, f.config.hygiene)
    assert all(r.running and r.app_ok for r in reports), [r.reasons for r in reports]
    assert _since(p, before) == {"DescribeInstanceStatus": 3}
    # Outside a poll (no ex_prefetch) the provider reads the instances themselves.
    p.refresh()
    assert {s.id for s in p.describe_servers(stack, ids)} == set(ids)
    assert _since(p, before)["DescribeInstances"] == 1


def test_a_server_launched_elsewhere_is_read_from_the_instances(
    aws_mock: None, tmp_path: Path
) -> None:
    """The old servers (launched by an earlier run, another process): no RunInstances
    answer to go by, so a poll lists the stack; their tags are read fresh (I7)."""
    vc = VirtualClock()
    f = _fleet(tmp_path, AwsFaults(clock=vc.clock), vc)
    p, stack = f.provider, f.world.stack
    old = [s.id for s in p.list_servers(stack)]
    before = Counter(p.api_calls)
    _poll(p, stack, old)
    assert {s.id for s in p.describe_servers(stack, old)} == set(old)
    assert _since(p, before) == {"DescribeInstances": 1}


def test_a_lane_registers_its_target_without_reading_the_group(
    aws_mock: None, tmp_path: Path
) -> None:
    vc = VirtualClock()
    f = _fleet(tmp_path, AwsFaults(clock=vc.clock).health_delay(15.0), vc)
    p, stack, tg = f.provider, f.world.stack, f.config.entry_points[0].name
    new = _launch(f, 1)
    p.get_members(stack, tg)  # the group's ownership tags are checked once per provider
    before = Counter(p.api_calls)
    _poll(p, stack, new)
    with pytest.raises(TransientError, match="not healthy yet"):
        p.ex_add_members(stack, tg, new)
    assert _since(p, before) == {"RegisterTargets": 1}
    vc.sleep(5.0)
    _poll(p, stack, new)
    with pytest.raises(TransientError, match="not healthy yet"):
        p.ex_add_members(stack, tg, new)  # registered once: now it reads the health
    assert _since(p, before) == {"RegisterTargets": 1, "DescribeTargetHealth": 1}
    vc.sleep(15.0)
    _poll(p, stack, new)
    p.ex_add_members(stack, tg, new)
    assert new[0] in p.get_members(stack, tg)
    assert _since(p, before) == {"RegisterTargets": 1, "DescribeTargetHealth": 2}


def test_a_target_group_counts_only_its_healthy_targets_as_serving(
    aws_mock: None, tmp_path: Path
) -> None:
    """min-healthy (RemoveMembers) counts what the group finds healthy: a new target
    still in its health checks is a member, running, and not serving yet."""
    vc = VirtualClock()
    f = _fleet(tmp_path, AwsFaults(clock=vc.clock).health_delay(15.0), vc)
    p, stack, tg = f.provider, f.world.stack, f.config.entry_points[0].name
    old = sorted(p.get_members(stack, tg))
    new = _launch(f, 1)
    with pytest.raises(TransientError):
        p.ex_add_members(stack, tg, new)
    p.refresh()
    assert sorted(p.get_members(stack, tg)) == sorted([*old, *new])
    assert sorted(p.ex_healthy_members(stack, tg) or []) == old
    vc.sleep(15.0)
    p.refresh()
    assert sorted(p.ex_healthy_members(stack, tg) or []) == sorted([*old, *new])


def test_status_checks_of_more_than_100_servers_are_read_100_at_a_time(
    aws_mock: None, tmp_path: Path
) -> None:
    """EC2 takes at most 100 instance ids in a DescribeInstanceStatus (the faults refuse
    more, as EC2 does): a meltdown check of a large rotate's new servers is split."""
    vc = VirtualClock()
    f = _fleet(tmp_path, AwsFaults(clock=vc.clock), vc)
    p, stack = f.provider, f.world.stack
    ids = _launch(f, 130)
    p.refresh()
    servers = p.describe_servers(stack, ids)
    before = Counter(p.api_calls)
    reports = p.verify_servers(servers, {"web": f.config.roles["web"].health}, f.config.hygiene)
    assert len(reports) == 130 and all(r.app_ok for r in reports), reports[0].reasons
    assert _since(p, before) == {"DescribeInstanceStatus": 2}
