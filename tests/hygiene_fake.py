"""A fake remote-command transport: records every command, answers from recordings."""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.models import Server
from providers.transport import CommandResult


@dataclass
class CleanHostTransport:
    """Answers like a freshly upgraded host; records (server, command) in order."""

    name: str = "fake"
    answers: dict[str, CommandResult] = field(default_factory=dict)
    commands: list[tuple[str, str]] = field(default_factory=list)

    def run(self, server: Server, command: str, *, timeout: float = 30.0) -> CommandResult:
        self.commands.append((server.id, command))
        return self.answers.get(command, CommandResult(0, ""))
