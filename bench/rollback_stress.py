"""Rollback-after-switch stress: `rebuild` whose bake fails, under write-heavy load.

Each trial builds a fresh local-cloud world (1 db + 2 web servers behind the address),
starts keep-alive clients that never retry (half of the requests are writes) through
the address, and runs `changeover rebuild` as a real subprocess. Once the new generation
serves and bakes, one new web server dies (SIGKILL, an abrupt crash like the
`die_after` fault of scenarios/server-dies-during-bake.yaml, but timed to the bake so a
loaded machine cannot move it before the cutover). Bake notices, the rollback points
the address back and switches writes back to the old db while the new servers may still
have writes in flight. Then every write the clients saw acknowledged must be on the
serving (old) db.

Counted per trial and in total: requests sent, failed, writes acknowledged, and
acknowledged writes lost (must be 0). Exit status 1 if any acknowledged write was lost,
3 if a trial did not exercise a rollback after the switch (exit 1 and outcome
rolled_back after RepointAddress and Bake ran), 2 for a bad option.

    python bench/rollback_stress.py [--trials 20] [--rate 400] [--connections 16] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.db import connect
from orchestrator.rehearse import World
from orchestrator.settings import DEMO_STACK

TARGET_RATE = 400.0  # requests/s through the address (issue 10)
STEP_WAIT = 120.0  # seconds a trial may wait for the run to reach a step


def _steps(world: World) -> dict[str, Any]:
    """The latest run's steps by name (first of each), or {} before the run is journaled."""
    conn = connect(world.state_dir)
    try:
        run = conn.execute("SELECT id FROM runs ORDER BY created_at DESC LIMIT 1").fetchone()
        if run is None:
            return {}
        rows = conn.execute(
            "SELECT * FROM steps WHERE run_id=? ORDER BY idx", (run["id"],)
        ).fetchall()
    finally:
        conn.close()
    out: dict[str, Any] = {}
    for row in rows:
        out.setdefault(row["name"], dict(row))
    return out


def _wait_for_bake(world: World, run_done: threading.Event, into: float) -> str | None:
    """Wait until the Bake step has run for `into` seconds; then kill one new web server.
    Returns the killed server's id, or None if the run ended first."""
    deadline = time.monotonic() + STEP_WAIT
    while time.monotonic() < deadline and not run_done.is_set():
        bake = _steps(world).get("Bake")
        if bake is not None and bake["started_at"] and time.time() >= bake["started_at"] + into:
            live = world.live_servers()
            newest = max(s["generation"] for s in live.values())
            web = sorted(
                (sid, s)
                for sid, s in live.items()
                if s["role"] == "web" and s["generation"] == newest and newest > 1
            )
            if not web:
                return None
            sid, server = web[0]
            os.kill(server["pid"], signal.SIGKILL)
            return sid
        time.sleep(0.05)
    return None


def trial(index: int, args: argparse.Namespace) -> dict[str, Any]:
    """One rebuild that rolls back after the switch, under load."""
    config = json.loads(json.dumps(DEMO_STACK))
    with tempfile.TemporaryDirectory(prefix=f"co-rollback-{index}-") as tmp:
        world = World(Path(tmp), stack_config=config)
        try:
            world.up()
            before = sorted(world.members())
            gen = world.load(
                rate=args.rate,
                connections=args.connections,
                write_ratio=0.5,
                max_duration=STEP_WAIT + 300,
                max_requests=10_000_000,
            )
            gen.start()
            time.sleep(args.steady)
            out: dict[str, Any] = {}
            run_done = threading.Event()

            def run() -> None:
                code, result = world.cli_json(
                    "rebuild", "demo", "--yes", "--bake", str(args.bake), "--retain", "0"
                )
                out.update(result, _exit=code)
                run_done.set()

            runner = threading.Thread(target=run, daemon=True)
            t0 = time.monotonic()
            runner.start()
            killed = _wait_for_bake(world, run_done, args.kill_at)
            runner.join(STEP_WAIT + 300)
            took = time.monotonic() - t0
            time.sleep(args.steady)  # the old stack serving again, under the same load
            result = gen.stop()
            lost = world.lost_writes(result)
            after = sorted(world.members())
            steps = _steps(world)
        finally:
            world.down()
    switched = all(
        steps.get(name, {}).get("started_at") for name in ("SwitchWrites", "RepointAddress", "Bake")
    )
    rolled_back = out.get("_exit") == 1 and out.get("outcome") == "rolled_back"
    return {
        "trial": index,
        "exit_code": out.get("_exit"),
        "outcome": out.get("outcome"),
        "killed": killed,
        "rolled_back_after_switch": bool(switched and rolled_back and killed),
        "address_back": after == before,
        "run_seconds": round(took, 2),
        "sent": result.sent,
        "failed": result.failed,
        "failed_writes": sum(1 for s in result.samples if s.kind == "write" and not s.ok),
        "errors": dict(result.errors),
        "writes_sent": sum(1 for s in result.samples if s.kind == "write"),
        "acked_writes": len(result.acked_writes),
        "lost": len(lost),
        "rate": round(result.rate, 1),
        "stderr_tail": "" if rolled_back else str(out.get("_stderr", ""))[-800:],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--trials", type=int, default=20, help="rebuilds to roll back (20)")
    ap.add_argument("--rate", type=float, default=TARGET_RATE, help="requests/s (400)")
    ap.add_argument("--connections", type=int, default=16, help="keep-alive clients (16)")
    ap.add_argument("--bake", type=float, default=20.0, help="bake seconds (20)")
    ap.add_argument("--kill-at", type=float, default=1.0, help="seconds into bake (1)")
    ap.add_argument("--steady", type=float, default=1.0, help="load before and after (1 s)")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    a = ap.parse_args()
    bad = [
        msg
        for ok, msg in (
            (a.trials >= 1, "--trials must be at least 1"),
            (a.rate > 0, "--rate must be positive"),
            (a.connections >= 1, "--connections must be at least 1"),
            (a.steady >= 0, "--steady must not be negative"),
            (0 <= a.kill_at < a.bake, "--kill-at must be at least 0 and less than --bake"),
        )
        if not ok
    ]
    if bad:
        print(f"rollback_stress: {bad[0]}", file=sys.stderr)
        return 2
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f}, Python {platform.python_version()}"
    )
    rows = []
    for i in range(1, a.trials + 1):
        row = trial(i, a)
        rows.append(row)
        if not a.json:
            print(
                f"trial {i:>3}: exit {row['exit_code']} {row['outcome']}, "
                f"sent {row['sent']}, failed {row['failed']}, "
                f"acked writes {row['acked_writes']}, lost {row['lost']}, "
                f"{row['rate']} req/s",
                file=sys.stderr,
                flush=True,
            )
    total = {
        key: sum(r[key] for r in rows)
        for key in ("sent", "failed", "failed_writes", "writes_sent", "acked_writes")
    }
    total["lost"] = sum(r["lost"] for r in rows)
    total["trials"] = len(rows)
    total["rolled_back_after_switch"] = sum(r["rolled_back_after_switch"] for r in rows)
    total["min_rate"] = min(r["rate"] for r in rows)
    total["mean_rate"] = round(sum(r["rate"] for r in rows) / len(rows), 1)
    if a.json:
        print(
            json.dumps({"machine": machine, "target_rate": a.rate, "total": total, "trials": rows})
        )
    else:
        print(
            f"rollback-after-switch stress on {machine}; target {a.rate:.0f} req/s, "
            f"{a.connections} keep-alive clients, 50% writes, no retries"
        )
        print(
            f"{'trial':>5} {'exit':>4} {'outcome':<12} {'sent':>7} {'failed':>6} "
            f"{'acked w':>7} {'lost':>4} {'req/s':>6}"
        )
        for r in rows:
            print(
                f"{r['trial']:>5} {r['exit_code']!s:>4} {r['outcome']!s:<12} {r['sent']:>7} "
                f"{r['failed']:>6} {r['acked_writes']:>7} {r['lost']:>4} {r['rate']:>6}"
            )
        print(
            f"{'total':>5} {'':>4} {'':<12} {total['sent']:>7} {total['failed']:>6} "
            f"{total['acked_writes']:>7} {total['lost']:>4} {total['mean_rate']:>6}"
        )
        sent = max(1, total["sent"])
        acked = max(1, total["acked_writes"])
        print(
            f"failed/sent {total['failed'] / sent:.5f} ({total['failed']} of {total['sent']}); "
            f"lost/acknowledged {total['lost'] / acked:.5f} "
            f"({total['lost']} of {total['acked_writes']}); "
            f"acknowledged/writes sent {total['acked_writes'] / max(1, total['writes_sent']):.5f}"
        )
        print(
            f"rolled back after the switch: {total['rolled_back_after_switch']} of "
            f"{total['trials']} trials; rate min {total['min_rate']} mean {total['mean_rate']} "
            "req/s"
        )
        print(
            f"failed requests that were writes: {total['failed_writes']} of {total['failed']} "
            "(a write in flight on the server that died gets a 502: it may have committed, "
            "so it is never replayed)"
        )
        if total["min_rate"] < a.rate:
            print(
                f"note: the load reached {total['min_rate']}-{max(r['rate'] for r in rows)} "
                f"req/s of the {a.rate:.0f} asked (load average "
                f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end)"
            )
        for r in rows:
            if r["errors"]:
                print(f"  trial {r['trial']} errors: {r['errors']}")
            if r["stderr_tail"]:
                print(f"  trial {r['trial']} stderr: {r['stderr_tail']}")
    if total["lost"]:
        return 1
    if total["rolled_back_after_switch"] < total["trials"]:
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
