"""API economy on AWS: count every API call a job makes under moto, per replaced server.

Goal: at most 10 AWS calls per replaced server, at every size. moto answers every wait
at once, so the first four rows are the floor: any repeated describe there is a read
the code repeats, not polling for a slow cloud. The last two inject boot, health and
drain latency (tests/aws/faults.py) on a virtual clock, so the waiting logic really
polls: DescribeInstances grows with the number of polls, not polls x servers.

    python bench/api_economy.py [--json]

Rows:
    replace-and-repoint, 1 server, Elastic IP       rebuild of a one-server stack
    rolling replace, 10 servers, surge 1, target group
    rolling replace, 10 servers, surge 3, target group
    rolling replace, 100 servers, surge 10, target group
    rolling replace, 50 servers, surge 10, 2 s boot  (latency injected, virtual clock)
    rolling replace, 50 servers, surge 10, 6 s boot  (ditto: 3x the boot time)
and, for the record, the stack as users build it (2 web behind a target group and an
Elastic IP, a db with an EBS volume): rebuild with the data move, and rotate.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moto import mock_aws

from orchestrator.db import connect
from orchestrator.engine import Engine
from orchestrator.log import configure
from strategies.rebuild import plan_rebuild
from strategies.rotate import plan_rotate
from tests.aws.faults import AwsFaults
from tests.aws.world import AwsWorld

GOAL_CALLS_PER_SERVER = 10


def measure(
    label: str,
    *,
    job: str,
    servers: int,
    surge: int = 1,
    address: str = "tg",
    db: bool = False,
    boot: float | None = None,
) -> dict[str, Any]:
    """Run one job on a fresh moto account and count the provider's calls (the world's
    own set-up calls are made with another client and not counted)."""
    with mock_aws(), tempfile.TemporaryDirectory() as tmp:
        world = AwsWorld()
        config = world.config(address=address, web=servers, db=db, max_surge=surge)
        world.bootstrap(world.provider(config), config)
        now = [0.0]

        def tick(_s: float) -> None:
            now[0] += 0.5

        faults = None
        if boot is not None:
            faults = AwsFaults(clock=lambda: now[0]).boot_delay(boot).health_delay(1)
            faults.drain_delay(1)
        provider = world.provider(config, faults, sleep=tick)
        engine = Engine(state_dir=Path(tmp), provider=provider, config=config, sleep=tick)
        planner = plan_rebuild if job == "rebuild" else plan_rotate
        result = engine.start(planner(provider, world.stack, config))
        engine.close()
        conn = connect(Path(tmp))
        polls = sum(
            r[0] for r in conn.execute("SELECT attempts FROM steps WHERE key LIKE 'WaitRunning%'")
        )
        conn.close()
    calls = provider.api_calls
    total = sum(calls.values())
    replaced = servers + (1 if db and job == "rebuild" else 0)
    return {
        "job": label,
        "outcome": result.outcome.value,
        "replaced": replaced,
        "api_calls": total,
        "per_server": round(total / replaced, 2),
        "goal_ratio": round(total / replaced / GOAL_CALLS_PER_SERVER, 2),
        "describe_instances": calls["DescribeInstances"],
        "wait_polls": polls,
        "by_operation": dict(sorted(calls.items())),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    configure()  # logs to stderr, as the CLI does
    rows = [
        measure("replace-and-repoint, 1 server, EIP", job="rebuild", servers=1, address="eip"),
        measure("rolling replace, 10 servers, surge 1, TG", job="rotate", servers=10, surge=1),
        measure("rolling replace, 10 servers, surge 3, TG", job="rotate", servers=10, surge=3),
        measure("rolling replace, 100 servers, surge 10, TG", job="rotate", servers=100, surge=10),
        measure(
            "rolling replace, 50, surge 10, 2 s boot", job="rotate", servers=50, surge=10, boot=2
        ),
        measure(
            "rolling replace, 50, surge 10, 6 s boot", job="rotate", servers=50, surge=10, boot=6
        ),
    ]
    extra = [
        measure(
            "rebuild, 2 web (TG + EIP) + db with EBS",
            job="rebuild",
            servers=2,
            address="both",
            db=True,
        ),
        measure("rotate, 2 web (TG + EIP) + db", job="rotate", servers=2, address="both", db=True),
    ]
    if a.json:
        print(json.dumps({"rows": rows, "stack_as_built": extra}))
        return
    print("API economy on AWS (moto in-process; goal <= 10 calls per replaced server)\n")
    print(f"{'job':<46} {'outcome':<10} {'calls':>6} {'per server':>11} {'x goal':>7}")
    for r in rows + extra:
        print(
            f"{r['job']:<46} {r['outcome']:<10} {r['api_calls']:>6} {r['per_server']:>11} "
            f"{r['goal_ratio']:>7}"
        )
    print()
    for r in rows + extra:
        print(f"{r['job']}: {r['by_operation']}")
    slow, slower = rows[4], rows[5]
    print(
        f"\n3x the boot time added {slower['wait_polls'] - slow['wait_polls']} WaitRunning polls "
        f"and {slower['describe_instances'] - slow['describe_instances']} DescribeInstances "
        "(one batched describe per poll, not one per server)"
    )
    worst = max(r["per_server"] for r in rows)
    ratio = worst / GOAL_CALLS_PER_SERVER
    print(f"worst row: {worst} calls per replaced server ({ratio:.2f}x the goal)")


if __name__ == "__main__":
    main()
