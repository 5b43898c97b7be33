"""API economy on AWS: rotate a target-group stack under moto and count API calls.

Boot, health and drain latency are injected (tests/aws/faults.py) on a virtual clock,
so the waiting logic really polls. Prints the calls per replaced server (goal <= 10)
and shows that DescribeInstances grows with the number of polls, not polls x servers.

    python bench/api_economy.py [--servers 50] [--surge 10]
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
from strategies.rotate import plan_rotate
from tests.aws.faults import AwsFaults
from tests.aws.world import AwsWorld

GOAL_CALLS_PER_SERVER = 10


def rotate(servers: int, surge: int, boot: float) -> dict[str, Any]:
    with mock_aws(), tempfile.TemporaryDirectory() as tmp:
        world = AwsWorld()
        config = world.config(address="tg", web=servers, db=False, max_surge=surge)
        world.bootstrap(world.provider(config), config)
        now = [0.0]

        def tick(_s: float) -> None:
            now[0] += 0.5

        faults = AwsFaults(clock=lambda: now[0]).boot_delay(boot).health_delay(1).drain_delay(1)
        provider = world.provider(config, faults, sleep=tick)
        engine = Engine(state_dir=Path(tmp), provider=provider, config=config, sleep=tick)
        result = engine.start(plan_rotate(provider, world.stack, config))
        engine.close()
        conn = connect(Path(tmp))
        polls = sum(
            r[0] for r in conn.execute("SELECT attempts FROM steps WHERE key LIKE 'WaitRunning%'")
        )
        conn.close()
    calls = provider.api_calls
    total = sum(calls.values())
    describe = calls["DescribeInstances"]
    return {
        "servers": servers,
        "surge": surge,
        "boot_delay_s": boot,
        "outcome": result.outcome.value,
        "api_calls": total,
        "calls_per_replaced_server": round(total / servers, 2),
        "goal_ratio": round(total / servers / GOAL_CALLS_PER_SERVER, 2),
        "describe_instances": describe,
        "wait_polls": polls,
        "polls_x_servers": polls * surge,
        "by_operation": dict(sorted(calls.items())),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--servers", type=int, default=50)
    ap.add_argument("--surge", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    runs = [
        rotate(a.servers, a.surge, boot=2.0),
        rotate(a.servers, a.surge, boot=6.0),  # same fleet, 3x the boot time: more polls
    ]
    if a.json:
        print(json.dumps(runs))
        return
    print(
        f"API economy: rotate {a.servers} instances in an ELBv2 target group, "
        f"--max-surge {a.surge}, moto in-process, virtual clock"
    )
    for r in runs:
        print(
            f"\nboot delay {r['boot_delay_s']}s: {r['outcome']}, {r['api_calls']} calls, "
            f"{r['calls_per_replaced_server']} per replaced server "
            f"({r['goal_ratio']}x the goal of {GOAL_CALLS_PER_SERVER})\n"
            f"  DescribeInstances {r['describe_instances']} for {r['wait_polls']} WaitRunning "
            f"polls (polls x servers per batch would be {r['polls_x_servers']})\n"
            f"  by operation: {r['by_operation']}"
        )
    grow = runs[1]["describe_instances"] - runs[0]["describe_instances"]
    extra_polls = runs[1]["wait_polls"] - runs[0]["wait_polls"]
    print(
        f"\nlonger boots added {extra_polls} polls and {grow} DescribeInstances calls "
        f"(one per poll, not {a.surge} per poll)"
    )


if __name__ == "__main__":
    main()
