"""`rotate`: surge-first replacement of the serving servers, a batch at a time.

The seed's third option: "scaling up a new server, and then dropping the old one".
At most `max_surge` new servers exist at once beyond the serving count, and at least
`min_healthy` percent of the serving count keeps serving throughout.
"""

from __future__ import annotations

import time
from pathlib import Path

from orchestrator.facts import judge_recorded, recorded_facts
from orchestrator.plan import Plan, Step
from orchestrator.settings import StackConfig
from orchestrator.state import StateStore
from providers.base import Provider
from strategies.base import check_replace, inspect_stack
from strategies.canary import WatchCanary
from strategies.opt_out import opted_out
from strategies.steps import (
    AddMembers,
    CreateServers,
    DestroyServers,
    DrainServers,
    RemoveMembers,
    VerifyServers,
    WaitRunning,
)
from strategies.stop import CheckStopConditions


def plan_rotate(
    provider: Provider,
    name: str,
    config: StackConfig,
    *,
    max_surge: int | None = None,
    min_healthy: int | None = None,
    older_than: float | None = None,
    only_if_needed: bool = False,
    now: float | None = None,
    live: bool = False,
    state_dir: Path | None = None,
    store: StateStore | None = None,
    canary: int | None = None,
    canary_watch: float | None = None,
    max_unhealthy: int | None = None,
    lanes: bool = True,
) -> Plan:
    """Compose the rotate plan. `older_than` is in seconds; `only_if_needed` also picks
    servers whose hygiene fails (pending upgrades, reboot required) and makes an empty
    selection a successful no-op.

    How `only_if_needed` decides: with `live` (a real run) it runs the health gate on
    each serving server now (on aws, SSM commands: mutating calls). Without it (`plan`,
    `--dry-run`: only read calls, I8) it judges the facts the last audit or verification
    recorded in `store` (or `state_dir`), stating their age; a server with none is listed under
    `needs_verification`, not selected, and a real run verifies it live.

    `canary` servers are replaced first, as batch 1, and watched for `canary_watch`
    seconds before anything else (strategies/canary.py); unset, the stack's default, or
    1 with `only_if_needed` (an unattended job's form), else none. Every batch starts with
    `CheckStopConditions#n` (`max_unhealthy`, min-healthy: strategies/stop.py).

    With `lanes` (the default) each server after the canaries is replaced in a lane of
    its own, and at most `max_surge` lanes are in flight at once: the next starts as soon
    as one finishes (orchestrator/lanes.py). Without (a campaign across maintenance
    windows, whose gates open one batch at a time) the servers go in lockstep batches of
    `max_surge`."""
    check_replace(provider, name)
    view = inspect_stack(provider, name, config)
    surge = max_surge or config.defaults.max_surge
    healthy_pct = config.defaults.min_healthy if min_healthy is None else min_healthy
    now = time.time() if now is None else now
    gen = view.next_generation
    db = view.data_server
    role = config.serving_roles[0]
    members = set(view.members)
    serving = [s for s in view.role(role) if s.id in members]

    # Opted out (tagged changeover:do-not-disrupt): never selected, by any selection,
    # and never asked for their hygiene. They keep serving and count toward min-healthy.
    skipped = opted_out(serving)
    candidates = [s for s in serving if s.id not in skipped]
    chosen = candidates
    reasons: dict[str, str] = {}
    unverified: dict[str, str] = {}  # no recorded facts: a real run verifies them live
    not_needed: dict[str, str] = {}
    if older_than is not None or only_if_needed:
        source = store or state_dir  # the state store, or the sqlite one of a state dir
        recorded = (
            recorded_facts(source, name, [s.id for s in candidates])
            if only_if_needed and not live and source is not None
            else {}
        )
        chosen = []
        for s in candidates:
            if older_than is not None and now - s.created_at > older_than:
                reasons[s.id] = f"older than {older_than:.0f}s"
            elif only_if_needed and live:
                report = provider.verify_server(s, config.roles[role].health, config.hygiene)
                if not report.passed:
                    reasons[s.id] = "; ".join(report.reasons)
                else:
                    not_needed[s.id] = "passes verification (verified live)"
            elif only_if_needed:
                judged = judge_recorded(s, recorded.get(s.id), config.hygiene, now=now, stack=name)
                if judged.needed is None:
                    unverified[s.id] = judged.reason
                else:
                    (reasons if judged.needed else not_needed)[s.id] = judged.reason
            if s.id in reasons:
                chosen.append(s)

    d = config.defaults
    canaries = canary if canary is not None else d.canary
    canaries = min(canaries if canaries is not None else int(only_if_needed), len(chosen))
    watch = d.canary_watch if canary_watch is None else canary_watch
    unhealthy_pct = d.max_unhealthy if max_unhealthy is None else max_unhealthy
    # The canary batch first (its own size, whatever the surge), then one lane per server
    # (or, without lanes, batches of max_surge).
    step = 1 if lanes else surge
    bounds = [0, *range(canaries, len(chosen), step)] if canaries else []
    bounds = bounds or list(range(0, len(chosen), step))
    steps: list[Step] = []
    for n, start in enumerate(bounds, start=1):
        end = bounds[n] if n < len(bounds) else len(chosen)
        batch = [s.id for s in chosen[start:end]]
        create = f"CreateServers#{n}"
        link = {"db": db.id} if db is not None else {}
        # A lane's steps carry its number; the canary batch is the plan's own sequence.
        lane = {"lane": n} if lanes and not (n == 1 and canaries) else {}
        steps += [
            CheckStopConditions(
                key=f"CheckStopConditions#{n}",
                batch=n,
                role=role,
                replacing=batch,
                count=len(batch),
                total=len(serving),
                min_healthy=healthy_pct,
                max_unhealthy=unhealthy_pct,
                **lane,
            ),
            CreateServers(key=create, role=role, generation=gen, count=len(batch), **link, **lane),
            WaitRunning(
                key=f"WaitRunning#{n}",
                sources=[create],
                timeout=config.defaults.boot_timeout,
                **lane,
            ),
            VerifyServers(
                key=f"VerifyServers#{n}",
                sources=[create],
                timeout=config.defaults.boot_timeout,
                **lane,
            ),
            AddMembers(
                key=f"AddMembers#{n}",
                sources=[create],
                verified_from=f"VerifyServers#{n}",
                role=role,
                replacing=batch,
                **lane,
            ),
            RemoveMembers(
                key=f"RemoveMembers#{n}",
                ids=batch,
                role=role,
                min_healthy=healthy_pct,
                total=len(serving),
                **lane,
            ),
            DrainServers(key=f"DrainServers#{n}", ids=batch, role=role, **lane),
        ]
        if n == 1 and canaries:
            # Before the destroy: a failed watch still puts the old servers back.
            steps.append(
                WatchCanary(
                    key="WatchCanary#1", sources=[create], role=role, seconds=watch, replacing=batch
                )
            )
        steps.append(DestroyServers(key=f"DestroyServers#{n}", ids=batch, **lane))
    return Plan(
        strategy="rotate",
        stack=name,
        steps=steps,
        params={
            "max_surge": surge,
            "min_healthy": healthy_pct,
            "older_than": older_than,
            "only_if_needed": only_if_needed,
            "live": live,
            "canary": canaries,
            "canary_watch": watch,
            "max_unhealthy": unhealthy_pct,
            # Lanes in flight at once (a sliding window); 1 for lockstep batches.
            "in_flight": surge if lanes else 1,
        },
        summary={
            "generation_before": view.generation,
            "generation_after": gen if steps else view.generation,
            "members_before": sorted(view.members),
            "entry_points_before": view.entry_members,
            "selected": {s.id: reasons.get(s.id, "all serving servers") for s in chosen},
            "skipped": skipped,
            **(
                {"canary": {"replacing": [s.id for s in chosen[:canaries]], "watch": watch}}
                if canaries
                else {}
            ),
            **(
                {"needs_verification": unverified, "not_needed": not_needed}
                if only_if_needed
                else {}
            ),
        },
    )
