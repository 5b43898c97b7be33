"""How the libcloud provider checks servers: app health, the address, and host hygiene.

The app check and the address probe are small Protocols the provider is given, so tests
(and clouds changeover cannot reach from where it runs) can put their own in:

- ``HealthChecker.check(server, check)``: the role's http/tcp check against one server.
- ``AddressProbe.probe(target, path, timeout)``: one request through the address; says
  which server answered.

The defaults speak real HTTP and TCP. Host hygiene (pending upgrades, reboot-required,
component versions) is read by the provider with ``orchestrator.hygiene`` over a
``providers.transport.Transport``; libcloud's own SSH helpers accept any host key, so they
are never used (I9).
"""

from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from orchestrator.models import Server
from orchestrator.settings import HealthCheck

# The header (or JSON field) through which an app names the server that answered.
BACKEND_HEADER = "x-changeover-backend"


@dataclass(frozen=True)
class CheckResult:
    """One app check: passed or not, and why not."""

    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class AddressTarget:
    """What a probe needs: where the address is, and which servers it routes to now."""

    address: str
    host: str | None
    port: int
    members: list[Server] = field(default_factory=list)


@runtime_checkable
class HealthChecker(Protocol):
    """Runs a role's app health check against one server."""

    def check(self, server: Server, check: HealthCheck) -> CheckResult:
        """Pass or fail, with a reason."""


@runtime_checkable
class AddressProbe(Protocol):
    """One request through the address."""

    def probe(self, target: AddressTarget, path: str, timeout: float) -> tuple[int, str | None]:
        """(HTTP status or 0 if unreachable, id of the server that answered or a reason)."""


class NetworkHealthChecker:
    """The real checks: HTTP GET of the health path, or a TCP connect, to the server."""

    def check(self, server: Server, check: HealthCheck) -> CheckResult:
        if server.host is None:
            return CheckResult(False, "server has no address yet")
        port = server.port or check.port
        if check.type == "tcp":
            try:
                socket.create_connection((server.host, port), check.timeout).close()
            except OSError as exc:
                return CheckResult(False, f"tcp check failed: {exc}")
            return CheckResult(True)
        status, _, _ = _get(server.host, port, check.path, check.timeout)
        if status != 200:
            return CheckResult(False, f"health check failed: HTTP {status or 'unreachable'}")
        return CheckResult(True)


class NetworkAddressProbe:
    """GET through the address. The app names itself in ``X-Changeover-Backend`` (or an
    ``id`` field); if it does not and the address holds one server, that server answered.
    """

    def probe(self, target: AddressTarget, path: str, timeout: float) -> tuple[int, str | None]:
        if target.host is None:
            return 0, f"address {target.address} has no IP"
        status, headers, body = _get(target.host, target.port, path, timeout)
        if status == 0:
            return 0, body.get("error")
        backend = headers.get(BACKEND_HEADER) or body.get("id")
        if backend is None and len(target.members) == 1:
            backend = target.members[0].id
        return status, None if backend is None else str(backend)


def _get(host: str, port: int, path: str, timeout: float) -> tuple[int, dict[str, str], Any]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        raw = resp.read()
        headers = {k.lower(): v for k, v in resp.getheaders()}
    except OSError as exc:
        return 0, {}, {"error": str(exc)}
    finally:
        conn.close()
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        body = {}
    return resp.status, headers, body if isinstance(body, dict) else {}
