"""What every strategy starts from: a read-only view of the stack as it is now.

Strategies compose plans from it and make no mutating call (I8): `plan` runs exactly
the same code as a real run, then stops before the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from orchestrator.errors import PreconditionFailed
from orchestrator.models import Server
from orchestrator.settings import StackConfig
from providers.base import Provider


@dataclass
class StackView:
    """The servers of a stack, what its address routes to, and its serving generation."""

    name: str
    config: StackConfig
    servers: list[Server]
    members: list[str]

    @cached_property
    def generation(self) -> int:
        members = set(self.members)  # a set: stacks may hold thousands of servers
        return max((s.generation for s in self.servers if s.id in members), default=0)

    @property
    def next_generation(self) -> int:
        return max((s.generation for s in self.servers), default=0) + 1

    def role(self, role: str) -> list[Server]:
        return [s for s in self.servers if s.role == role]

    @property
    def data_server(self) -> Server | None:
        role = self.config.data_role
        if role is None:
            return None
        # The newest data server up to the serving generation: a rotate replaces only
        # the serving roles, so the db may be generations older than the web servers.
        found = [s for s in self.role(role) if s.generation <= self.generation]
        return max(found, key=lambda s: s.generation) if found else None


def inspect_stack(provider: Provider, name: str, config: StackConfig) -> StackView:
    """Read the stack (two read-only calls) and check it is fit to change."""
    servers = provider.list_servers(name)
    members = provider.get_members(name, config.address)
    view = StackView(name, config, servers, members)
    if not servers:
        raise PreconditionFailed(
            f"stack {name!r} has no servers"
            + (
                "; `changeover local up` creates the demo stack"
                if config.provider == "local"
                else ""
            )
        )
    if not members:
        raise PreconditionFailed(f"address {config.address!r} of stack {name!r} routes to nothing")
    known = {s.id for s in servers}
    if foreign := [m for m in members if m not in known]:
        raise PreconditionFailed(
            f"address {config.address!r} routes to servers outside stack {name!r}: {foreign}"
        )
    # Older servers that still serve (a rotate rolled back after a batch was replaced)
    # and the data server (rotate keeps it) belong; any other older one is a stray.
    keep = set(members) | ({view.data_server.id} if view.data_server else set())
    strays = [s.id for s in servers if s.generation != view.generation and s.id not in keep]
    if strays:
        raise PreconditionFailed(
            f"stack {name!r} has servers outside its serving generation {view.generation}: "
            f"{', '.join(strays)}; inspect them with `changeover status`, then destroy or adopt"
        )
    return view
