"""The local cloud's transport: the fact script answered by a simulated host."""

from __future__ import annotations

import socket

import pytest

from orchestrator.audit import read_facts
from orchestrator.models import Server
from orchestrator.rehearse import World
from orchestrator.settings import HygienePolicy
from providers.local.http import request
from providers.local.provider import LocalProvider
from providers.local.transport import LocalTransport
from providers.transport import TransportUnavailable


def test_simulated_host_reads_like_a_real_one(world: World) -> None:
    """What /facts holds comes back through the real parsers: pending, security, versions."""
    index = world.cloud.read_package_index()
    index["packages"]["openssl"]["version"] = "3.0.99-1~deb12u1"
    index["packages"]["tzdata"]["version"] = "2099a-0+deb12u1"
    world.cloud.write_package_index(index)
    server = LocalProvider(world.cloud).list_servers("demo")[0]
    assert server.port is not None
    raw = request(server.port, "GET", "/facts")[1]
    facts = read_facts(LocalTransport(), server, HygienePolicy(components=["libc6"]))
    assert facts.errors == {}
    assert [(p.name, p.installed, p.candidate, p.security) for p in facts.pending or []] == [
        (p["name"], p["installed"], p["latest"], p["security"]) for p in raw["pending"]
    ]
    assert [p.name for p in facts.security] == ["openssl"]
    assert facts.components == {
        "nginx": "1.22.1",
        "python": "3.11.2",
        "libc6": raw["installed"]["libc6"],
    }
    assert facts.kernel.running == "6.1.119-1-amd64" and not facts.kernel.reboot_needed
    assert facts.os["pretty_name"] == "Debian GNU/Linux 12 (bookworm)"


def test_a_simulated_host_runs_nothing_but_the_fact_script(world: World) -> None:
    """Any other command exits 127: no real command runs on a local server."""
    server = LocalProvider(world.cloud).list_servers("demo")[0]
    result = LocalTransport().run(server, "uname -r")
    assert result.exit_status == 127 and "simulates" in result.stderr


def test_an_unreachable_server_is_retried_a_bounded_number_of_times() -> None:
    """Nothing listening: three reads with a doubling backoff, then unavailable."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])  # closed again when the block ends
    gone = Server("srv-gone", "demo", "web", 1, "r", "running", "127.0.0.1", port)
    waits: list[float] = []
    script = "echo '@@changeover uptime'\n"
    with pytest.raises(TransportUnavailable, match="after 3 attempts"):
        LocalTransport(sleep=waits.append).run(gone, script, timeout=1.0)
    assert waits == [0.2, 0.4]
