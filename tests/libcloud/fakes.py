"""Fakes for what a libcloud test cannot reach: the apps on moto's made-up IPs, and SSH.

- ``FakeApps`` is both the provider's HealthChecker and its AddressProbe. It answers as
  the servers' apps would, with faults injected by count (no clock): boot latency (a
  server fails its first N checks), broken servers, and failing probes through the
  address. It records every check and probe, in order.
- ``RecordedTransport`` (from tests/recorded.py) answers the hygiene fact script with
  output recorded on a real Debian 12 host, and records every command it ran.
- ``FakeClock`` is the engine's clock and sleep: sleeping advances it, so bake and
  retain take no real time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from orchestrator.models import Server
from orchestrator.settings import HealthCheck
from providers.libcloud_health import AddressTarget, CheckResult
from tests.recorded import CLEAN_FACTS, PENDING_FACTS, RecordedTransport

__all__ = ["CLEAN_FACTS", "PENDING_FACTS", "FakeApps", "FakeClock", "RecordedTransport"]


@dataclass
class FakeApps:
    """Health checks and address probes answered as healthy apps would, with faults."""

    boot_checks: int = 0  # every server fails this many app checks before it is up
    broken: set[str] = field(default_factory=set)  # servers whose app always fails
    break_next: int = 0  # the next N servers checked for the first time are broken
    failing_probes: int = 0  # the next N probes through the address answer 503
    checks: dict[str, int] = field(default_factory=dict)
    log: list[tuple[str, str]] = field(default_factory=list)  # ("check"|"probe", server id)

    def check(self, server: Server, check: HealthCheck) -> CheckResult:
        seen = self.checks.get(server.id, 0)
        if seen == 0 and self.break_next > 0:
            self.break_next -= 1
            self.broken.add(server.id)
        self.checks[server.id] = seen + 1
        self.log.append(("check", server.id))
        if server.id in self.broken:
            return CheckResult(False, f"health check failed: HTTP 500 from {server.id}")
        if seen < self.boot_checks:
            return CheckResult(False, "health check failed: connection refused (booting)")
        return CheckResult(True)

    def probe(self, target: AddressTarget, path: str, timeout: float) -> tuple[int, str | None]:
        if not target.members:
            return 0, f"address {target.address} routes to nothing"
        member = target.members[-1]
        self.log.append(("probe", member.id))
        if self.failing_probes > 0:
            self.failing_probes -= 1
            return 503, member.id
        if member.id in self.broken:
            return 500, member.id
        return 200, member.id


@dataclass
class FakeClock:
    """A clock that only moves when someone sleeps."""

    now: float = field(default_factory=time.time)

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)
