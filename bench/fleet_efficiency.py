"""Fleet efficiency: rotate 100 servers with --max-surge 10 under injected boot, verify and
drain latency, and compare the time taken with the critical-path bound
ceil(N / surge) x (boot + verify + drain). Target (PRODUCT.md): at most 1.10x.

It runs on the AWS provider under moto (in-process) with a virtual clock: every sleep
of the engine, the steps and the provider advances the clock by exactly what it asked
for, and the injected latencies (tests/aws/faults.py) are measured on that clock. So
the ratio is the orchestration's own overhead (polling granularity, serial steps), not
this machine's speed.

    python bench/fleet_efficiency.py [--servers 100] [--surge 10]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moto import mock_aws

from orchestrator.engine import Engine
from strategies.rotate import plan_rotate
from tests.aws.faults import AwsFaults
from tests.aws.world import AwsWorld

TARGET_RATIO = 1.10


class VirtualClock:
    """A clock that moves only when someone sleeps, by exactly that long."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)


def run(
    servers: int, surge: int, *, boot: float, status: float, health: float, drain: float
) -> dict[str, Any]:
    with mock_aws(), tempfile.TemporaryDirectory() as tmp:
        world = AwsWorld()
        config = world.config(
            address="tg",
            web=servers,
            db=False,
            max_surge=surge,
            min_healthy=100,
            boot_timeout=3600,
            drain_timeout=3600,
        )
        world.bootstrap(world.provider(config), config)
        vc = VirtualClock()
        faults = (
            AwsFaults(clock=vc.clock)
            .boot_delay(boot)
            .status_delay(status)
            .health_delay(health)
            .drain_delay(drain)
        )
        provider = world.provider(config, faults, sleep=vc.sleep)
        engine = Engine(
            state_dir=Path(tmp), provider=provider, config=config, sleep=vc.sleep, clock=vc.clock
        )
        started, wall = vc.now, time.monotonic()
        result = engine.start(plan_rotate(provider, world.stack, config))
        engine.close()
        took, wall = vc.now - started, time.monotonic() - wall
    verify = status + health
    bound = math.ceil(servers / surge) * (boot + verify + drain)
    return {
        "servers": servers,
        "surge": surge,
        "outcome": result.outcome.value,
        "boot_s": boot,
        "verify_s": verify,
        "drain_s": drain,
        "took_s": round(took, 1),
        "bound_s": bound,
        "ratio": round(took / bound, 3),
        "target_ratio": TARGET_RATIO,
        "api_calls": sum(provider.api_calls.values()),
        "by_operation": dict(sorted(provider.api_calls.items())),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--servers", type=int, default=100)
    ap.add_argument("--surge", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    r = run(a.servers, a.surge, boot=40.0, status=20.0, health=15.0, drain=30.0)
    if a.json:
        print(json.dumps(r))
        return
    print(
        f"fleet efficiency: rotate {r['servers']} servers, --max-surge {r['surge']} "
        f"(AWS provider under moto, virtual clock): {r['outcome']}\n"
        f"  injected per server: boot {r['boot_s']}s, verify {r['verify_s']}s "
        f"(status checks + target health), drain {r['drain_s']}s\n"
        f"  took {r['took_s']}s vs critical-path bound {r['bound_s']}s = {r['ratio']}x "
        f"(target <= {TARGET_RATIO}x); {r['wall_s']}s real time\n"
        f"  {r['api_calls']} API calls ({r['api_calls'] / r['servers']:.1f} per server): "
        f"{r['by_operation']}"
    )


if __name__ == "__main__":
    main()
