"""An injection layer for AWS, built on botocore's own event hooks (no mock.patch).

moto answers instantly and perfectly: instances run at once, targets are healthy as
soon as they register, deregistered targets vanish. Real AWS does none of that. This
layer sits on a provider's clients and makes the waiting logic really wait:

- `throttle(fraction)`: that share of calls fails with RequestLimitExceeded;
- `fail_once(operation, code, status)`: the next call of an operation fails (a 500...);
- `not_found_after_launch()`: the first DescribeInstances after a RunInstances says
  InvalidInstanceID.NotFound, as EC2's eventual consistency does;
- `boot_delay(s)`, `status_delay(s)`, `health_delay(s)`, `drain_delay(s)`: instances stay
  pending, their status checks `initializing`, targets `initial`, deregistered targets
  `draining`, for that long; `boot_delay(s, extra_mean=m)` adds to each instance's boot a
  seeded exponential extra of mean m (image pulls, first-boot upgrades, reboots: the long
  tail of real boots), drawn in launch order, and `extras=[...]` gives them outright
  (the nth launched instance gets the nth);
- `unhealthy(ids)`: those targets never become healthy; `unhealthy_launch(n, ...)`: nor
  do the instances launched nth (1-based, in launch order).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Http:
    status_code: int


def _form(params: Any, prefix: str, suffix: str = "") -> list[str]:
    """The values of a query-API request's form fields named prefix...suffix
    (`InstanceId.1`, `Targets.member.1.Id`), as botocore's before-call sees them."""
    body = params.get("body", {}) if params else {}
    if not isinstance(body, dict):
        return []
    return [v for k, v in body.items() if k.startswith(prefix) and k.endswith(suffix)]


def _error(code: str, status: int) -> tuple[_Http, dict[str, Any]]:
    return _Http(status), {
        "Error": {"Code": code, "Message": f"injected {code}"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }


@dataclass
class AwsFaults:
    """Faults and latencies for one provider's boto3 clients."""

    clock: Callable[[], float] = time.monotonic
    seed: int = 7
    throttle_fraction: float = 0.0
    pending_failures: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    not_found_armed: bool = False
    boot_seconds: float = 0.0
    boot_extra_mean: float = 0.0
    boot_extra: dict[str, float] = field(default_factory=dict)
    boot_extras: list[float] = field(default_factory=list)
    never_healthy_launch: set[int] = field(default_factory=set)
    health_seconds: float = 0.0
    drain_seconds: float = 0.0
    status_seconds: float = 0.0
    never_healthy: set[str] = field(default_factory=set)
    launched: dict[str, float] = field(default_factory=dict)
    registered: dict[str, float] = field(default_factory=dict)
    deregistered: dict[str, float] = field(default_factory=dict)
    injected: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._boot_rng = random.Random(self.seed)  # its own: throttling draws nothing here
        self._lock = threading.Lock()

    # --- configuration ------------------------------------------------------------
    def throttle(self, fraction: float) -> AwsFaults:
        self.throttle_fraction = fraction
        return self

    def fail_once(
        self, operation: str, code: str = "InternalError", status: int = 500
    ) -> AwsFaults:
        self.pending_failures.setdefault(operation, []).append((code, status))
        return self

    def not_found_after_launch(self) -> AwsFaults:
        self.not_found_armed = True
        return self

    def boot_delay(
        self, seconds: float, *, extra_mean: float = 0.0, extras: list[float] | None = None
    ) -> AwsFaults:
        self.boot_seconds = seconds
        self.boot_extra_mean = extra_mean
        self.boot_extras = list(extras or [])
        return self

    def boot_of(self, instance_id: str) -> float:
        """Seconds this instance takes to boot (the delay plus its drawn extra)."""
        return self.boot_seconds + self.boot_extra.get(instance_id, 0.0)

    def health_delay(self, seconds: float) -> AwsFaults:
        self.health_seconds = seconds
        return self

    def drain_delay(self, seconds: float) -> AwsFaults:
        self.drain_seconds = seconds
        return self

    def status_delay(self, seconds: float) -> AwsFaults:
        self.status_seconds = seconds
        return self

    def unhealthy(self, *ids: str) -> AwsFaults:
        self.never_healthy.update(ids)
        return self

    def unhealthy_launch(self, *nth: int) -> AwsFaults:
        self.never_healthy_launch.update(nth)
        return self

    # --- wiring -----------------------------------------------------------------------
    def attach(self, *clients: Any) -> AwsFaults:
        for client in clients:
            client.meta.events.register("before-call", self._before)
            client.meta.events.register("after-call", self._after)
        return self

    def _before(self, model: Any, params: Any = None, **_: Any) -> Any:
        op = model.name
        with self._lock:
            queued = self.pending_failures.get(op)
            if queued:
                code, status = queued.pop(0)
                self.injected.append(f"{op}:{code}")
                return _error(code, status)
            if op == "DescribeInstances" and self.not_found_armed and self.launched:
                self.not_found_armed = False
                self.injected.append(f"{op}:InvalidInstanceID.NotFound")
                return _error("InvalidInstanceID.NotFound", 400)
            if op == "DescribeInstanceStatus" and len(_form(params, "InstanceId.")) > 100:
                # EC2 takes at most 100 instance ids by name; moto does not check.
                self.injected.append(f"{op}:InvalidParameterValue")
                return _error("InvalidParameterValue", 400)
            if self.throttle_fraction and self._rng.random() < self.throttle_fraction:
                self.injected.append(f"{op}:RequestLimitExceeded")
                return _error("RequestLimitExceeded", 503)
            if op in ("RegisterTargets", "DeregisterTargets"):
                ids = _form(params, "Targets.member.", ".Id")
                book = self.registered if op == "RegisterTargets" else self.deregistered
                for i in ids:
                    book[i] = self.clock()
                    if op == "RegisterTargets":
                        self.deregistered.pop(i, None)
        return None

    def _after(self, model: Any, parsed: dict[str, Any], **_: Any) -> None:
        op = model.name
        now = self.clock()
        if op == "RunInstances":
            for inst in parsed.get("Instances", []):
                self.launched[inst["InstanceId"]] = now
                nth = len(self.launched)
                if nth <= len(self.boot_extras):
                    self.boot_extra[inst["InstanceId"]] = self.boot_extras[nth - 1]
                elif self.boot_extra_mean:
                    extra = self._boot_rng.expovariate(1.0 / self.boot_extra_mean)
                    self.boot_extra[inst["InstanceId"]] = extra
                if nth in self.never_healthy_launch:
                    self.never_healthy.add(inst["InstanceId"])
                inst["State"] = {"Code": 0, "Name": "pending"}
        elif op == "DescribeInstances":
            for res in parsed.get("Reservations", []):
                for inst in res.get("Instances", []):
                    born = self.launched.get(inst["InstanceId"])
                    if (
                        born is not None
                        and now - born < self.boot_of(inst["InstanceId"])
                        and (inst["State"]["Name"] == "running")
                    ):
                        inst["State"] = {"Code": 0, "Name": "pending"}
        elif op == "DescribeInstanceStatus":
            for st in parsed.get("InstanceStatuses", []):
                born = self.launched.get(st["InstanceId"])
                # Status checks start once the instance runs, i.e. after the boot delay.
                boot = self.boot_of(st["InstanceId"])
                if (
                    born is not None
                    and now - born < boot
                    and st["InstanceState"]["Name"]
                    in (
                        "pending",
                        "running",
                    )
                ):
                    # Still booting: as EC2 reports a pending instance (IncludeAllInstances).
                    st["InstanceState"] = {"Code": 0, "Name": "pending"}
                    st["InstanceStatus"] = {"Status": "not-applicable", "Details": []}
                    st["SystemStatus"] = {"Status": "not-applicable", "Details": []}
                elif born is not None and now - born < boot + self.status_seconds:
                    st["InstanceStatus"] = {"Status": "initializing", "Details": []}
        elif op == "DescribeTargetHealth":
            descriptions = parsed.get("TargetHealthDescriptions", [])
            for d in descriptions:
                tid = d["Target"]["Id"]
                born = self.registered.get(tid)
                if tid in self.never_healthy:
                    d["TargetHealth"] = {"State": "unhealthy"}
                elif born is not None and now - born < self.health_seconds:
                    d["TargetHealth"] = {"State": "initial"}
            present = {d["Target"]["Id"] for d in descriptions}
            for tid, gone in self.deregistered.items():
                if tid not in present and now - gone < self.drain_seconds:
                    descriptions.append(
                        {"Target": {"Id": tid, "Port": 80}, "TargetHealth": {"State": "draining"}}
                    )
