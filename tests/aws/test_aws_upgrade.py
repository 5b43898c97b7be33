"""`changeover upgrade` on AWS: not supported yet, refused at plan time."""

from __future__ import annotations

import pytest

from orchestrator.errors import CapabilityError
from providers.aws import is_mutating
from strategies.upgrade import plan_upgrade
from tests.aws.world import AwsWorld


def test_upgrade_refuses_at_plan_time_on_aws(aws: AwsWorld) -> None:
    """aws has no in-place upgrade yet: the plan refuses (CapabilityError, exit 2) naming
    the provider and what to do instead, before any server is drained."""
    config = aws.config(address="tg", web=2)
    provider = aws.provider(config)
    aws.bootstrap(provider, config)
    before = dict(provider.api_calls)
    with pytest.raises(CapabilityError, match=r"'aws' does not support in-place upgrades"):
        plan_upgrade(provider, aws.stack, config, min_healthy=50)
    made = {op: n - before.get(op, 0) for op, n in provider.api_calls.items()}
    assert [op for op, n in made.items() if n and is_mutating(op)] == []
