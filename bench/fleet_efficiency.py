"""Fleet efficiency: rotate 100 servers with --max-surge 10 under injected boot, verify and
drain latency, and compare the time taken with what the schedule allows.

Two cases, in one run:

- uniform: every server boots in 40 s; the bound is ceil(N / surge) x (boot + verify +
  drain), which lockstep batches and a sliding window both meet.
- heterogeneous: boot = 40 s plus a seeded exponential extra (mean 30 s) per server, the
  long tail of real boots. Two bounds: lockstep (the sum over batches of their slowest
  server) and sliding window (surge slots, each taking the next server as soon as it is
  free: list scheduling over the servers in launch order).

Each case runs `rotate` as it runs now (a sliding window: at most --max-surge
replacements in flight, orchestrator/lanes.py) and, for comparison, in lockstep batches
(what a campaign across maintenance windows still does). Targets (issue 15): the sliding
window at most 1.10x the sliding-window bound, and at most 1.10x the uniform bound; API
calls per server at most 10 in both.

It runs on the AWS provider under moto (in-process) with a virtual clock: every sleep
of the engine, the steps and the provider advances the clock by exactly what it asked
for, and the injected latencies (tests/aws/faults.py) are measured on that clock. So
the ratio is the orchestration's own overhead (polling granularity, serial steps), not
this machine's speed.

    python bench/fleet_efficiency.py [--servers 100] [--surge 10] [--seed 7] [--json]
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import structlog
from moto import mock_aws

from strategies.rotate import plan_rotate
from tests.aws.clock import VirtualClock, fleet
from tests.aws.faults import AwsFaults

TARGET_RATIO = 1.10
MAX_CALLS_PER_SERVER = 10
DELAYS = {"status": 20.0, "health": 15.0, "drain": 30.0}
BOOT, EXTRA_MEAN, SEED = 40.0, 30.0, 7


def sliding_bound(durations: list[float], slots: int) -> float:
    """Each of `slots` takes the next server (in order) as soon as it is free."""
    free = [0.0] * slots
    for d in durations:
        heapq.heappush(free, heapq.heappop(free) + d)
    return max(free)


def lockstep_bound(durations: list[float], slots: int) -> float:
    """Batches of `slots` in order, each as long as its slowest server."""
    return sum(max(durations[i : i + slots]) for i in range(0, len(durations), slots))


def run(
    servers: int, surge: int, *, extra_mean: float, lanes: bool, seed: int = SEED
) -> dict[str, Any]:
    with mock_aws(), tempfile.TemporaryDirectory() as tmp:
        vc = VirtualClock()
        faults = (
            AwsFaults(clock=vc.clock, seed=seed)
            .boot_delay(BOOT, extra_mean=extra_mean)
            .status_delay(DELAYS["status"])
            .health_delay(DELAYS["health"])
            .drain_delay(DELAYS["drain"])
        )
        f = fleet(Path(tmp), vc, faults, servers=servers, surge=surge)
        provider, engine = f.provider, f.engine
        started, wall = vc.now, time.monotonic()
        result = engine.start(plan_rotate(provider, f.world.stack, f.config, lanes=lanes))
        engine.close()
        took, wall = vc.now - started, time.monotonic() - wall
        launched = sorted(faults.launched, key=lambda i: faults.launched[i])
        per_server = sum(DELAYS.values())
        durations = [faults.boot_of(i) + per_server for i in launched]
    calls = sum(provider.api_calls.values())
    return {
        "servers": servers,
        "surge": surge,
        "rotate": "sliding window" if lanes else "lockstep batches",
        "outcome": result.outcome.value,
        "took_s": round(took, 1),
        "sliding_bound_s": round(sliding_bound(durations, surge), 1),
        "lockstep_bound_s": round(lockstep_bound(durations, surge), 1),
        "uniform_bound_s": math.ceil(servers / surge) * (BOOT + per_server),
        "api_calls": calls,
        "calls_per_server": round(calls / servers, 2),
        "by_operation": dict(sorted(provider.api_calls.items())),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--servers", type=int, default=100)
    ap.add_argument("--surge", type=int, default=10)
    ap.add_argument("--seed", type=int, default=SEED, help="of the boots' extras")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    # The engine's step log (thousands of lines): errors only.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    rows: list[dict[str, Any]] = []
    for case, mean in (("uniform", 0.0), ("heterogeneous", EXTRA_MEAN)):
        for lanes in (True, False):
            r = run(a.servers, a.surge, extra_mean=mean, lanes=lanes, seed=a.seed)
            bound = r["uniform_bound_s"] if case == "uniform" else r["sliding_bound_s"]
            r |= {"case": case, "bound_s": bound, "ratio": round(r["took_s"] / bound, 3)}
            rows.append(r)
    if a.json:
        print(json.dumps(rows))
        return
    print(
        f"fleet efficiency: rotate {a.servers} servers, --max-surge {a.surge} (AWS provider "
        f"under moto, virtual clock); per server: boot {BOOT:.0f} s (heterogeneous: plus a "
        f"exponential extra, mean {EXTRA_MEAN:.0f} s, seed {a.seed}), status checks "
        f"{DELAYS['status']:.0f} s, target health {DELAYS['health']:.0f} s, drain "
        f"{DELAYS['drain']:.0f} s\n"
    )
    print(
        f"{'case':<14} {'rotate':<17} {'outcome':<10} {'took s':>8} {'lockstep bound':>15} "
        f"{'sliding bound':>14} {'ratio':>6} {'calls/server':>13} {'real s':>7}"
    )
    for r in rows:
        ok = r["ratio"] <= TARGET_RATIO and r["calls_per_server"] <= MAX_CALLS_PER_SERVER
        print(
            f"{r['case']:<14} {r['rotate']:<17} {r['outcome']:<10} {r['took_s']:>8.1f} "
            f"{r['lockstep_bound_s']:>15.1f} {r['sliding_bound_s']:>14.1f} "
            f"{r['ratio']:>5.3f}x {r['calls_per_server']:>13.2f} {r['wall_s']:>7.1f}"
            + ("" if r["rotate"] != "sliding window" else ("  ok" if ok else "  MISSED"))
        )
    print(
        f"\nratio: took / the case's bound (uniform: the uniform bound; heterogeneous: the "
        f"sliding-window bound); targets: sliding window <= {TARGET_RATIO}x and <= "
        f"{MAX_CALLS_PER_SERVER} API calls per server"
    )
    for r in rows:
        print(f"  {r['case']}, {r['rotate']}: {r['by_operation']}")


if __name__ == "__main__":
    main()
