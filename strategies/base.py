"""What every strategy starts from: a read-only view of the stack as it is now.

Strategies compose plans from it and make no mutating call (I8): `plan` runs exactly
the same code as a real run, then stops before the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from orchestrator.errors import BadInput, PreconditionFailed
from orchestrator.models import Server
from orchestrator.settings import StackConfig
from providers.base import Provider


@dataclass
class StackView:
    """The servers of a stack, what its entry points route to, and its serving generation."""

    name: str
    config: StackConfig
    servers: list[Server]
    entry_members: dict[str, list[str]]  # entry point -> the server ids it routes to now

    @cached_property
    def members(self) -> list[str]:
        """Every server some entry point routes to, each once."""
        return list(dict.fromkeys(m for ms in self.entry_members.values() for m in ms))

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


def check_entry_points(provider: Provider, name: str, config: StackConfig) -> None:
    """An elastic IP holds one server: a role of several servers needs an entry point
    that holds them all (a target group, a load balancer), or they serve nothing (I4)."""
    capacity = {
        ep.name: provider.address_capacity(name, ep.name) or 0 for ep in config.entry_points
    }
    for role in config.serving_roles:
        count = config.roles[role].count
        eps = [ep.name for ep in config.entry_points if role in ep.roles]
        if count > 1 and eps and all(0 < capacity[e] < count for e in eps):
            raise BadInput(
                f"stack {name!r}: role {role!r} has {count} servers but its only entry point "
                f"{', '.join(eps)} holds {capacity[eps[0]]} (an elastic IP), so the rest would "
                f"serve nothing; add one that holds them all, e.g. addresses = "
                f'[{{ target_group = "...", roles = ["{role}"] }}, {{ elastic_ip = "{eps[0]}", '
                f'roles = ["{role}"] }}], or set roles.{role}.count = 1'
            )


def check_replace(provider: Provider, name: str) -> None:
    """rebuild and rotate create and destroy servers: a provider that cannot (static)
    says so here, at plan time (CapabilityError, exit 2), before anything is read."""
    check = getattr(provider, "ex_check_replace", None)
    if callable(check):
        check(name)


def inspect_stack(provider: Provider, name: str, config: StackConfig) -> StackView:
    """Read the stack (one read per entry point, one listing) and check it is fit to change."""
    check_entry_points(provider, name, config)
    servers = provider.list_servers(name)
    entry_members = {ep.name: provider.get_members(name, ep.name) for ep in config.entry_points}
    view = StackView(name, config, servers, entry_members)
    if not servers:
        raise PreconditionFailed(
            f"stack {name!r} has no servers"
            + (
                "; `changeover local up` creates the demo stack"
                if config.provider == "local"
                else ""
            )
        )
    for address, members in entry_members.items():
        if not members:
            raise PreconditionFailed(
                f"entry point {address!r} of stack {name!r} routes to nothing; point it at "
                "the stack's servers first"
            )
    known = {s.id for s in servers}
    for address, members in entry_members.items():
        if foreign := [m for m in members if m not in known]:
            raise PreconditionFailed(
                f"entry point {address!r} routes to servers outside stack {name!r}: {foreign}"
            )
    # Older servers that still serve (a rotate rolled back after a batch was replaced)
    # and the data server (rotate keeps it) belong; any other older one is a stray.
    keep = set(view.members) | ({view.data_server.id} if view.data_server else set())
    strays = [s.id for s in servers if s.generation != view.generation and s.id not in keep]
    if strays:
        raise PreconditionFailed(
            f"stack {name!r} has servers outside its serving generation {view.generation}: "
            f"{', '.join(strays)}; inspect them with `changeover status`, then destroy or adopt"
        )
    return view
