"""`rebuild`: build the whole next generation, verify, migrate data, cut over, bake, retire.

The seed's first recommendation: "build a new stack and redirect your traffic to the
new stack using our Elastic Address".
"""

from __future__ import annotations

from orchestrator.errors import PreconditionFailed
from orchestrator.plan import Plan, Step
from orchestrator.settings import StackConfig
from providers.base import Provider
from strategies.base import StackView, check_replace, inspect_stack
from strategies.steps import (
    Bake,
    CopyData,
    CreateServers,
    FreezeWrites,
    RepointAddress,
    RetireServers,
    SwitchWrites,
    SyncData,
    VerifyAddress,
    VerifyServers,
    WaitRunning,
)


def plan_rebuild(
    provider: Provider,
    name: str,
    config: StackConfig,
    *,
    bake: float | None = None,
    retain: float | None = None,
    migrate_data: bool = True,
) -> Plan:
    """Compose the rebuild plan from the stack as it is now (read-only)."""
    check_replace(provider, name)
    if config.data_role is not None and migrate_data:
        provider.check_data_moves(name)  # a capability error belongs at plan time (exit 2)
    view = inspect_stack(provider, name, config)
    bake = config.defaults.bake if bake is None else bake
    retain = config.defaults.retain if retain is None else retain
    gen = view.next_generation
    data_role = config.data_role
    old_db = view.data_server
    rebuild_data = data_role is not None and migrate_data
    if rebuild_data and (old_db is None or old_db.state != "running"):
        raise PreconditionFailed(
            f"stack {name!r} has no running {data_role} server to migrate data from"
        )

    steps: list[Step] = []
    created: list[str] = []
    serving = config.serving_roles
    if rebuild_data:
        assert data_role is not None
        steps.append(
            CreateServers(
                key=f"CreateServers[{data_role}]",
                role=data_role,
                generation=gen,
                count=config.roles[data_role].count,
            )
        )
        created.append(f"CreateServers[{data_role}]")
    for role in serving:
        link = {}
        if rebuild_data:
            link = {"db_from": f"CreateServers[{data_role}]"}
        elif old_db is not None:
            link = {"db": old_db.id}
        steps.append(
            CreateServers(
                key=f"CreateServers[{role}]",
                role=role,
                generation=gen,
                count=config.roles[role].count,
                **link,
            )
        )
        created.append(f"CreateServers[{role}]")
    steps.append(WaitRunning(sources=created, timeout=config.defaults.boot_timeout))
    steps.append(VerifyServers(sources=created, timeout=config.defaults.boot_timeout))
    roles_from = {r: f"CreateServers[{r}]" for r in serving}
    if rebuild_data:
        assert old_db is not None and data_role is not None
        db_from = f"CreateServers[{data_role}]"
        steps += [
            CopyData(src=old_db.id, dst_from=db_from),
            FreezeWrites(src=old_db.id),
            SyncData(src=old_db.id, dst_from=db_from),
            SwitchWrites(src=old_db.id, dst_from=db_from),
        ]
    steps += [
        RepointAddress(
            roles_from=roles_from, verified_from="VerifyServers", previous=view.entry_members
        ),
        VerifyAddress(roles_from=roles_from),
        Bake(roles_from=roles_from, seconds=bake),
    ]
    old = [s.id for s in view.servers if rebuild_data or s.role != data_role]
    steps.append(
        RetireServers(
            ids=old,
            retain=retain,
            data_ids=[old_db.id] if rebuild_data and old_db else [],
        )
    )
    return Plan(
        strategy="rebuild",
        stack=name,
        steps=steps,
        params={"bake": bake, "retain": retain, "migrate_data": migrate_data},
        summary=_summary(view, gen),
    )


def _summary(view: StackView, gen: int) -> dict[str, object]:
    return {
        "generation_before": view.generation,
        "generation_after": gen,
        "members_before": sorted(view.members),
        "entry_points_before": view.entry_members,
    }
