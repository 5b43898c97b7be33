"""Alarm gates: signals from outside the stack that must stay good while a change bakes.

A stack's ``gates = [...]`` (the models are in orchestrator/settings.py) are evaluated
periodically during ``Bake`` (rebuild) and during a rotate's canary watch
(strategies/canary.py). The first gate that fails fails the step, so the run rolls back
like a failed bake, and the reason names the gate and what it saw:

- ``http``: GET the URL; the status must be ``status`` (200), and with ``json_path`` the
  JSON value there must equal ``equals`` (without ``equals``: be present and truthy).
- ``prometheus``: ``GET /api/v1/query``; every sample of the result (a vector or a
  scalar) must stay within ``min``..``max``. No sample at all fails (``on_empty``).
- ``cloudwatch_alarm``: boto3 ``DescribeAlarms``; ``ALARM`` fails, ``OK`` and
  ``INSUFFICIENT_DATA`` pass, an alarm that does not exist fails.

A gate that cannot be asked (connection refused, a timeout, a 5xx from Prometheus, a
throttled AWS call) is asked again with backoff (tenacity, ``GATE_RETRY``); when it
still cannot be asked it counts as failed, and the reason says so. A definite answer (a
500 from an HTTP gate, an alarm in ALARM) is never retried.

    GateError       internal: the gate could not be asked (retried, then a failure)

``evaluate`` never raises: it returns a ``Verdict``. Sleep is injectable.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from orchestrator import events
from orchestrator.log import get_logger

if TYPE_CHECKING:
    from orchestrator.settings import CloudWatchGate, Gate, HttpGate, PrometheusGate

# How often a gate that cannot be asked is asked again, and for how long in all: short,
# so a gate that is down fails the bake in seconds rather than stalling it.
GATE_ATTEMPTS = 3
GATE_DEADLINE = 15.0  # seconds across the attempts (each request has the gate's timeout)
GATE_BACKOFF = (0.25, 2.0)  # seconds: first wait, longest wait
# Seconds between two evaluations of the gates during a bake or a watch (they are also
# evaluated on its first and last check): CloudWatch and Prometheus update about this often.
GATE_INTERVAL = 5.0
# Of a body that is not what a gate expects, this much goes into the reason.
SHOWN = 120


class GateError(Exception):
    """The gate could not be asked (refused, timed out, a server error): retried."""


@dataclass(frozen=True)
class Verdict:
    """One gate's answer: its title, whether it passed, and what it saw."""

    gate: str
    ok: bool
    saw: str

    def reason(self) -> str:
        return f"gate {self.gate!r}: {self.saw}"


def _get(url: str, timeout: float) -> tuple[int, bytes]:
    """GET a URL: (status, body) for any HTTP answer; GateError when there is none."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return int(resp.status), resp.read(1_000_000)
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code), exc.read(1_000_000)
    except urllib.error.URLError as exc:
        raise GateError(str(exc.reason)) from None
    except (OSError, ValueError) as exc:  # a timeout, a reset, a malformed answer
        raise GateError(str(exc) or type(exc).__name__) from None


def _shown(body: bytes) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    return text if len(text) <= SHOWN else text[: SHOWN - 3] + "..."


_MISSING = object()


def json_path(data: Any, path: str) -> Any:
    """The value at a dotted path (`$.checks.0.ok`): keys of objects, indexes of lists.
    `_MISSING` when there is none."""
    value = data
    for part in [p for p in path.removeprefix("$").split(".") if p]:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif (
            isinstance(value, list)
            and part.lstrip("-").isdigit()
            and -len(value) <= int(part) < len(value)
        ):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def _same(value: Any, want: Any) -> bool:
    if isinstance(want, bool) or isinstance(value, bool):
        return value is want
    if isinstance(want, int | float) and isinstance(value, int | float):
        return float(value) == float(want)
    return bool(value == want)


def _check_http(gate: HttpGate) -> tuple[bool, str]:
    status, body = _get(gate.http, gate.timeout)
    if status != gate.status:
        return False, f"HTTP {status}, want {gate.status}"
    if gate.json_path is None:
        return True, f"HTTP {status}"
    try:
        data = json.loads(body)
    except ValueError:
        return False, f"HTTP {status} but not JSON: {_shown(body)!r}"
    value = json_path(data, gate.json_path)
    if value is _MISSING:
        return False, f"no value at {gate.json_path} in {_shown(body)!r}"
    if gate.equals is None:
        ok = bool(value)
        return ok, f"{gate.json_path} = {json.dumps(value)}" + ("" if ok else ", not truthy")
    ok = _same(value, gate.equals)
    return ok, f"{gate.json_path} = {json.dumps(value)}" + (
        "" if ok else f", want {json.dumps(gate.equals)}"
    )


def _samples(result: dict[str, Any]) -> list[tuple[str, float]]:
    """(series, value) of a query's result: a vector, a scalar, or a matrix's last points."""
    kind, found = result.get("resultType"), result.get("result")
    if kind == "scalar" and isinstance(found, list):
        return [("scalar", float(found[1]))]
    out: list[tuple[str, float]] = []
    for series in found if isinstance(found, list) else []:
        metric = series.get("metric") or {}
        label = "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(metric.items())) + "}"
        point = series.get("value") or (series.get("values") or [[0, "NaN"]])[-1]
        out.append((label if metric else "{}", float(point[1])))
    return out


def _check_prometheus(gate: PrometheusGate) -> tuple[bool, str]:
    url = (
        gate.prometheus.rstrip("/")
        + "/api/v1/query?"
        + urllib.parse.urlencode({"query": gate.query})
    )
    status, body = _get(url, gate.timeout)
    if status >= 500 or status == 429:
        raise GateError(f"HTTP {status} from Prometheus: {_shown(body)}")
    try:
        answer = json.loads(body)
    except ValueError:
        return False, f"HTTP {status}, not a Prometheus answer: {_shown(body)!r}"
    if status != 200 or answer.get("status") != "success":
        # A 400/422 is the query's fault: asking again gives the same answer.
        return False, f"query refused (HTTP {status}): {answer.get('error') or _shown(body)}"
    try:
        samples = _samples(answer.get("data") or {})
    except (TypeError, ValueError, IndexError, AttributeError):
        return False, f"not a query result: {_shown(body)!r}"
    if not samples:
        ok = gate.on_empty == "pass"
        return ok, "no samples" + ("" if ok else " (on_empty = 'fail'): is the metric scraped?")
    for series, value in samples:
        if math.isnan(value):
            return False, f"{series} = NaN"
        if gate.max is not None and value > gate.max:
            return False, f"{series} = {value:g}, above max {gate.max:g}"
        if gate.min is not None and value < gate.min:
            return False, f"{series} = {value:g}, below min {gate.min:g}"
    shown = ", ".join(f"{v:g}" for _, v in samples[:3]) + (" ..." if len(samples) > 3 else "")
    return True, f"{len(samples)} sample(s): {shown}"


# boto3 clients, one per (region, endpoint), created on first use: boto3 is imported only
# when a stack has a CloudWatch gate.
_CLIENTS: dict[tuple[str | None, str | None], Any] = {}


def _cloudwatch(region: str | None, endpoint_url: str | None, timeout: float) -> Any:
    key = (region, endpoint_url)
    if key not in _CLIENTS:
        try:
            import boto3  # noqa: PLC0415 - the aws extra, only for CloudWatch gates
            from botocore.config import Config  # noqa: PLC0415
        except ImportError:
            raise GateError(
                "boto3 is not installed: pip install 'changeover[aws]' for CloudWatch gates"
            ) from None
        config = Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 1})
        _CLIENTS[key] = boto3.client(
            "cloudwatch", region_name=region, endpoint_url=endpoint_url, config=config
        )
    return _CLIENTS[key]


# AWS error codes that mean "ask again later", not "no".
_AWS_TRANSIENT = {"Throttling", "ThrottlingException", "RequestLimitExceeded", "InternalFailure"}


def _check_cloudwatch(
    gate: CloudWatchGate, region: str | None, endpoint_url: str | None
) -> tuple[bool, str]:
    from botocore.exceptions import (  # noqa: PLC0415 - only with a CloudWatch gate
        BotoCoreError,
        ClientError,
        NoRegionError,
    )

    try:
        client = _cloudwatch(gate.region or region, gate.endpoint_url or endpoint_url, gate.timeout)
        found = client.describe_alarms(
            AlarmNames=[gate.cloudwatch_alarm], AlarmTypes=["MetricAlarm", "CompositeAlarm"]
        )
    except NoRegionError:
        return False, "no region: set `region` on the gate or the stack"
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        message = exc.response.get("Error", {}).get("Message", "")
        if code in _AWS_TRANSIENT:
            raise GateError(f"{code}: {message}") from None
        return False, f"DescribeAlarms refused: {code}: {message}"
    except BotoCoreError as exc:  # no endpoint, a timeout, no credentials
        raise GateError(str(exc)) from None
    alarms = [*found.get("MetricAlarms", []), *found.get("CompositeAlarms", [])]
    if not alarms:
        return False, f"no alarm named {gate.cloudwatch_alarm!r}"
    state = str(alarms[0].get("StateValue", "?"))
    why = str(alarms[0].get("StateReason") or "")
    if state == "ALARM":
        return False, "in ALARM" + (f": {why}" if why else "")
    return True, state


def evaluate(
    gate: Gate,
    *,
    region: str | None = None,
    endpoint_url: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
    attempts: int = GATE_ATTEMPTS,
) -> Verdict:
    """Ask one gate; a gate that cannot be asked is retried, then counts as failed.
    `region` and `endpoint_url` are the stack's, for a CloudWatch gate without its own."""
    from orchestrator.settings import CloudWatchGate, HttpGate  # noqa: PLC0415 - no cycle

    log = get_logger()

    def ask() -> tuple[bool, str]:
        if isinstance(gate, HttpGate):
            return _check_http(gate)
        if isinstance(gate, CloudWatchGate):
            return _check_cloudwatch(gate, region, endpoint_url)
        return _check_prometheus(gate)

    def before_sleep(state: Any) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            events.GATE_RETRY, gate=gate.title, attempt=state.attempt_number, error=str(exc)
        )

    retrying = Retrying(
        stop=stop_after_attempt(attempts) | stop_after_delay(GATE_DEADLINE),
        wait=wait_exponential(multiplier=GATE_BACKOFF[0], max=GATE_BACKOFF[1]),
        retry=retry_if_exception_type(GateError),
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        ok, saw = retrying(ask)
    except GateError as exc:
        ok, saw = False, f"could not be evaluated ({attempts} attempts): {exc}"
    verdict = Verdict(gate.title, ok, saw)
    if ok:
        log.debug(events.GATE_PASSED, gate=verdict.gate, saw=saw)
    else:
        log.error(events.GATE_FAILED, gate=verdict.gate, saw=saw)
    return verdict


def first_failure(
    gates: Sequence[Gate],
    *,
    region: str | None = None,
    endpoint_url: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Verdict | None:
    """Evaluate the gates in order; the first that fails (None: all passed)."""
    for gate in gates:
        verdict = evaluate(gate, region=region, endpoint_url=endpoint_url, sleep=sleep)
        if not verdict.ok:
            return verdict
    return None
