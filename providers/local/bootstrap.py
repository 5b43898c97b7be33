"""Create a stack's first generation on the local cloud (`changeover local up`).

This is the starting world for the quickstart and for tests: generation 1 of every
role, the data role first (web servers need its address), then the address pointed at
the serving role. It is idempotent: an existing stack is left as it is.
"""

from __future__ import annotations

import time

from orchestrator.errors import StepFailed
from orchestrator.settings import StackConfig
from providers.local.cloud import LocalCloud
from providers.local.provider import LocalProvider

BOOT_TIMEOUT = 30.0


def _wait_running(provider: LocalProvider, stack: str, ids: list[str]) -> None:
    deadline = time.monotonic() + BOOT_TIMEOUT
    while time.monotonic() < deadline:
        states = {s.id: s.state for s in provider.describe_servers(stack, ids)}
        if all(states.get(i) == "running" for i in ids):
            return
        if dead := [i for i in ids if states.get(i) in ("stopped", "terminated", None)]:
            raise StepFailed(f"servers died while booting: {dead}")
        time.sleep(0.05)
    raise StepFailed(f"servers of stack {stack!r} did not boot within {BOOT_TIMEOUT:.0f}s")


def ensure_stack(cloud: LocalCloud, name: str, config: StackConfig) -> bool:
    """Start the stack's address and, if it has no servers, its generation 1."""
    provider = LocalProvider(cloud)
    for ep in config.entry_points:
        cloud.ensure_address(name, ep.name)
    if cloud.server_rows(name):
        return False
    links: dict[str, str] = {}
    if (data_role := config.data_role) is not None:
        role = config.roles[data_role]
        db = provider.create_servers(
            stack=name,
            role=data_role,
            generation=1,
            run_id="bootstrap",
            count=role.count,
            image=role.image,
            size=role.size,
            idempotency_key=f"bootstrap/{name}/{data_role}",
            links={},
        )
        _wait_running(provider, name, [s.id for s in db])
        links = {"db": db[0].id}
    web: dict[str, list[str]] = {}
    for role_name in config.serving_roles:
        role = config.roles[role_name]
        created = provider.create_servers(
            stack=name,
            role=role_name,
            generation=1,
            run_id="bootstrap",
            count=role.count,
            image=role.image,
            size=role.size,
            idempotency_key=f"bootstrap/{name}/{role_name}",
            links=links,
        )
        web[role_name] = [s.id for s in created]
    _wait_running(provider, name, [i for ids in web.values() for i in ids])
    for ep in config.entry_points:
        provider.set_members(name, ep.name, [i for r in ep.roles for i in web.get(r, [])])
    return True
