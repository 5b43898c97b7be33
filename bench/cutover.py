"""Cutover benchmark: `rebuild` (with data migration) and `rotate` under real load.

Keep-alive clients that never retry send reads and acknowledged writes through the
local cloud's elastic address while changeover runs as a real subprocess. Prints the
requests sent and failed, acknowledged writes lost, p50/p99 latency in steady state and
in the switch window, and the rate achieved, for each strategy.

    python bench/cutover.py [--rate 250] [--min-requests 5000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.db import connect
from orchestrator.rehearse import World
from orchestrator.settings import DEMO_STACK

TARGET_REQUESTS_PER_S = 200  # PRODUCT.md: 200 requests/s or more through the address


def _window(world: World, run_id: str, first: str, last: str) -> tuple[float, float]:
    """Epoch times from the start of step `first` to the end of step `last` (+0.5 s)."""
    conn = connect(world.state_dir)
    try:
        rows = {
            r["key"]: r
            for r in conn.execute("SELECT * FROM steps WHERE run_id=?", (run_id,)).fetchall()
        }
    finally:
        conn.close()
    starts = [r["started_at"] for k, r in rows.items() if k.startswith(first) and r["started_at"]]
    ends = [r["ended_at"] for k, r in rows.items() if k.startswith(last) and r["ended_at"]]
    return min(starts), max(ends) + 0.5


def bench(
    strategy: str, args: list[str], rate: float, min_requests: int, **stack: Any
) -> dict[str, Any]:
    config = json.loads(json.dumps(DEMO_STACK))
    config["roles"]["web"]["count"] = stack.get("web", 2)
    with tempfile.TemporaryDirectory(prefix="co-bench-") as tmp:
        world = World(Path(tmp), stack_config=config)
        try:
            world.up()
            gen = world.load(
                rate=rate,
                connections=4,
                write_ratio=0.3,
                max_duration=600,
                max_requests=10 * min_requests,
            )
            gen.start()
            time.sleep(3.0)  # steady state before the change
            t0 = time.time()
            code, out = world.cli_json(strategy, "demo", "--yes", *args)
            took = time.time() - t0
            # Keep going until the run has seen enough requests in all.
            deadline = time.monotonic() + 120
            while gen.result is None and time.monotonic() < deadline:
                if gen.sent_so_far >= min_requests:
                    break
                time.sleep(0.2)
            time.sleep(1.0)
            result = gen.stop()
            if strategy == "rebuild":
                window = _window(world, out["run_id"], "FreezeWrites", "VerifyAddress")
            else:
                window = _window(world, out["run_id"], "AddMembers", "DestroyServers")
            lost = world.lost_writes(result)
        finally:
            world.down()
    return {
        "strategy": strategy,
        "exit_code": code,
        "outcome": out.get("outcome"),
        "run_seconds": round(took, 2),
        "requests_sent": result.sent,
        "requests_failed": result.failed,
        "errors": dict(result.errors),
        "acked_writes": len(result.acked_writes),
        "acked_writes_lost": len(lost),
        "rate_achieved": round(result.rate, 1),
        "rate_vs_target": round(result.rate / TARGET_REQUESTS_PER_S, 2),
        "steady_ms": result.latency_percentiles(exclude=window),
        "switch_window_ms": result.latency_percentiles(window=window),
        "switch_window_s": round(window[1] - window[0], 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rate", type=float, default=250.0)
    ap.add_argument("--min-requests", type=int, default=5000)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    runs = [
        bench("rebuild", ["--bake", "10", "--retain", "2"], a.rate, a.min_requests),
        bench("rotate", ["--max-surge", "1"], a.rate, a.min_requests, web=4),
    ]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    if a.json:
        print(json.dumps({"machine": machine, "runs": runs}))
        return
    print(f"cutover benchmark on {machine}, load {a.rate:.0f} req/s target, 4 keep-alive clients")
    for r in runs:
        s, w = r["steady_ms"], r["switch_window_ms"]
        print(
            f"\n{r['strategy']}: exit {r['exit_code']} ({r['outcome']}) in {r['run_seconds']}s\n"
            f"  requests sent {r['requests_sent']}, failed {r['requests_failed']} "
            f"{r['errors'] or ''}\n"
            f"  acknowledged writes {r['acked_writes']}, lost {r['acked_writes_lost']}\n"
            f"  rate achieved {r['rate_achieved']} req/s "
            f"({r['rate_vs_target']}x the 200 req/s target)\n"
            f"  latency steady p50 {s['p50']:.1f} ms p99 {s['p99']:.1f} ms; "
            f"switch window ({r['switch_window_s']}s) p50 {w['p50']:.1f} ms p99 {w['p99']:.1f} ms"
        )


if __name__ == "__main__":
    main()
