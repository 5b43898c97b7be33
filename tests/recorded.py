"""A remote-command transport that runs nothing and answers from real recorded output.

The hygiene fact script's output was captured on a real Debian 12 host (see
tests/fixtures/hygiene/README.md). Providers whose servers cannot really be reached in
tests (moto's made-up instances, libcloud fakes) run the real gate against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.models import Server
from providers.transport import CommandResult

FIXTURES = Path(__file__).parent / "fixtures" / "hygiene" / "debian12-chroot"
CLEAN_FACTS = (FIXTURES / "clean-facts.txt").read_text()
PENDING_FACTS = (FIXTURES / "pending-facts.txt").read_text()


@dataclass
class RecordedTransport:
    """Answers the fact script from a recording; any other command succeeds silently.
    Remembers (server, command) in order, so tests can assert what ran where."""

    name: str = "recorded"
    facts: str = CLEAN_FACTS
    failing: dict[str, CommandResult] = field(default_factory=dict)  # command -> answer
    commands: list[tuple[str, str]] = field(default_factory=list)

    def run(self, server: Server, command: str, *, timeout: float = 30.0) -> CommandResult:
        self.commands.append((server.id, command))
        if command in self.failing:
            return self.failing[command]
        if "changeover facts" in command:
            return CommandResult(0, self.facts)
        return CommandResult(0, "")

    def ran(self, command: str) -> list[str]:
        """Server ids `command` ran on, in order."""
        return [sid for sid, cmd in self.commands if cmd == command]
