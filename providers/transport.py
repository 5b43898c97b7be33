"""Remote command transports: how changeover runs a command on a server.

Host hygiene (pending upgrades, reboot-required, component versions) is read by running
commands on the server. Each transport (SSH with verified host keys, AWS SSM
RunCommand, the local cloud's own) implements this Protocol, with timeouts and bounded
retries of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from orchestrator.errors import PreconditionFailed, TransientError
from orchestrator.models import Server


@dataclass(frozen=True)
class CommandResult:
    """What a command printed and how it exited."""

    exit_status: int
    stdout: str
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


class HostKeyRejected(PreconditionFailed):
    """The server's SSH host key is unknown or changed (I9). Nothing was run."""


class TransportUnavailable(TransientError):
    """The transport could not reach the server this time (worth a bounded retry)."""


@runtime_checkable
class Transport(Protocol):
    """Runs one command on one server."""

    name: str

    def run(self, server: Server, command: str, *, timeout: float = 30.0) -> CommandResult:
        """Run `command` (a shell command line) and return its result."""
