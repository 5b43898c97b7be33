"""CloudWatch alarm gates (orchestrator/gates.py) on moto: DescribeAlarms in-process, and
a rebuild on the local cloud whose bake asks a ThreadedMotoServer and rolls back while
the alarm is in ALARM."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws
from pydantic import TypeAdapter

from orchestrator import gates
from orchestrator.rehearse import World
from orchestrator.settings import Gate
from tests.aws.world import CREDS, REGION
from tests.invariants import journal_steps

GATE: TypeAdapter[Any] = TypeAdapter(Gate)
ALARM = "shop-5xx"


def _put_alarm(cloudwatch: Any, state: str | None) -> None:
    cloudwatch.put_metric_alarm(
        AlarmName=ALARM,
        MetricName="HTTPCode_Target_5XX_Count",
        Namespace="AWS/ApplicationELB",
        Statistic="Sum",
        Period=60,
        EvaluationPeriods=1,
        Threshold=10.0,
        ComparisonOperator="GreaterThanThreshold",
    )
    if state is not None:
        cloudwatch.set_alarm_state(
            AlarmName=ALARM, StateValue=state, StateReason=f"5xx count crossed ({state})"
        )


@pytest.fixture
def cloudwatch() -> Iterator[Any]:
    """moto in-process, and a fresh client cache (gates keep one per region)."""
    gates._CLIENTS.clear()
    with mock_aws():
        yield boto3.client("cloudwatch", region_name=REGION, **CREDS)
    gates._CLIENTS.clear()


def test_alarm_states(cloudwatch: Any) -> None:
    """ALARM fails with the alarm's reason; OK and INSUFFICIENT_DATA pass; an alarm that
    does not exist fails (a typo must not pass a bake)."""
    spec = GATE.validate_python({"cloudwatch_alarm": ALARM, "name": "5xx"})
    _put_alarm(cloudwatch, "INSUFFICIENT_DATA")
    no_data = gates.evaluate(spec, region=REGION)
    assert (no_data.ok, no_data.saw) == (True, "INSUFFICIENT_DATA")
    _put_alarm(cloudwatch, "OK")
    assert gates.evaluate(spec, region=REGION).ok
    _put_alarm(cloudwatch, "ALARM")
    verdict = gates.evaluate(spec, region=REGION)
    assert not verdict.ok
    assert verdict.reason() == "gate '5xx': in ALARM: 5xx count crossed (ALARM)"
    other = GATE.validate_python({"cloudwatch_alarm": "no-such-alarm"})
    missing = gates.evaluate(other, region=REGION)
    assert (missing.ok, missing.saw) == (False, "no alarm named 'no-such-alarm'")
    assert missing.gate == "cloudwatch alarm no-such-alarm"


@pytest.mark.slow
def test_alarm_in_alarm_rolls_back_the_bake(
    make_world: Callable[..., World], moto_endpoint: str, aws_env_vars: dict[str, str]
) -> None:
    """A local stack gated on a CloudWatch alarm (moto's HTTP server, credentials from the
    environment): while the alarm is in ALARM the rebuild's bake rolls back (exit 1),
    naming the gate; once it is OK the rebuild succeeds."""
    client = boto3.client("cloudwatch", region_name=REGION, endpoint_url=moto_endpoint, **CREDS)
    _put_alarm(client, "ALARM")
    spec = {"cloudwatch_alarm": ALARM, "region": REGION, "endpoint_url": moto_endpoint}
    world = make_world(gates=[spec])
    before = sorted(world.members())
    code, out = world.cli_json("rebuild", "demo", "--yes", "--bake", "1", env=aws_env_vars)
    assert code == 1, out.get("_stderr")
    assert out["outcome"] == "rolled_back"
    assert f"gate 'cloudwatch alarm {ALARM}': in ALARM" in out["message"]
    assert sorted(world.members()) == before

    _put_alarm(client, "OK")
    code, out = world.cli_json("rebuild", "demo", "--yes", "--bake", "1", env=aws_env_vars)
    assert code == 0, out.get("_stderr")
    _, steps = journal_steps(world)
    assert next(s for s in steps if s["key"] == "Bake")["outputs"]["gate_rounds"] >= 2
