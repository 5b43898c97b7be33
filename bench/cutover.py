"""Cutover benchmark: `rebuild` (with data migration) and `rotate` under real load.

Keep-alive clients that never retry send reads and acknowledged writes through the
local cloud's elastic address while changeover runs as a real subprocess, for every
load of a matrix (requests/s x share of writes) and both strategies, all in one run.
For each it reports the requests sent and failed, acknowledged writes lost, and the
latency of reads and of writes apart: p50/p99 in steady state (before the run starts
and after it ended) and in the switch window, the rebuild's measured write freeze, and
whether the write p99 in the window is within its bound (the freeze plus twice the
steady write p99).

Where the time goes is measured too: slow requests (over twice the steady p99 of their
kind) are attributed to the journal's steps they overlapped, and the CPU taken by the
orchestrator, the address proxy, the servers that were already serving and the servers
the run started is sampled from /proc during the window.

    python bench/cutover.py [--loads 250/0,250/30,...] [--strategies rebuild,rotate]
                            [--steady 4] [--after 2] [--bake 3] [--no-bytecode-cache]
                            [--json]

The switch window is, for `rebuild`, from the start of `FreezeWrites` to the end of
`VerifyAddress`, and for `rotate` from the start of the first `AddMembers` to the end
of the last `DestroyServers`; both plus 0.5 s, so answers to requests sent at the end
are in it. Python caches compiled bytecode in a private temporary directory
(PYTHONPYCACHEPREFIX), as an installed package has it; `--no-bytecode-cache` leaves the
environment alone (a checkout under PYTHONDONTWRITEBYTECODE=1 compiles the app's
modules in every new server).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.db import connect
from orchestrator.load import LoadResult
from orchestrator.rehearse import World
from orchestrator.settings import DEMO_STACK

DEFAULT_LOADS = "250/0,250/30,250/50,500/0,500/30,500/50,1000/0,1000/30,1000/50"
# Keep-alive clients, each with one request out at a time: a write takes several ms under
# load, so 4 clients cannot send 1,000 req/s with writes; one per 125 req/s, at least 4.
MIN_CONNECTIONS, RATE_PER_CONNECTION = 4, 125.0


def connections(rate: float) -> int:
    return max(MIN_CONNECTIONS, math.ceil(rate / RATE_PER_CONNECTION))


WINDOW_TAIL = 0.5  # seconds after the window's last step: answers still coming in
WARMUP = 0.5  # seconds at the start of the load, and after the run, left out of steady state
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# --- CPU sampling ----------------------------------------------------------------------


def _cpu_seconds(pid: int, *, children: bool = False) -> float | None:
    """utime + stime of a process (or of its reaped children), in seconds; None if it is
    gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    first = 13 if children else 11
    return (int(fields[first]) + int(fields[first + 1])) / TICK


class CpuSampler:
    """Samples the CPU time of the world's processes every `interval` seconds.

    Processes are grouped: the orchestrator (the CLI), the short-lived processes it ran
    and reaped ("spawn helpers": the local cloud starts each server through one), the
    proxy, the servers alive when sampling started ("old") and those that appeared later
    ("new"); a server's pid is read from its root's `pid` file. Only Linux (/proc) is
    supported; elsewhere every figure stays 0.
    """

    def __init__(self, world: World, interval: float = 0.1) -> None:
        self.servers_dir = world.cloud.root / "servers"
        info = world.cloud.address(world.stack, world.config.primary_address)
        self.proxy_pid = info.pid if info else 0
        self.cli_pid = 0
        self.interval = interval
        self.old = set(self._server_pids())
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._last: dict[int, float] = {}
        self._helpers = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def _server_pids(self) -> list[int]:
        pids: list[int] = []
        try:
            roots = list(self.servers_dir.iterdir())
        except OSError:
            return pids
        for root in roots:
            try:
                pids.append(int((root / "pid").read_text()))
            except (OSError, ValueError):
                continue
        return pids

    def _group(self, pid: int) -> str:
        if pid == self.proxy_pid:
            return "proxy"
        if pid == self.cli_pid:
            return "orchestrator"
        return "old servers" if pid in self.old else "new servers"

    def _take(self) -> None:
        pids = {self.proxy_pid, *self._server_pids()}
        if self.cli_pid:
            pids.add(self.cli_pid)
        for pid in pids:
            cpu = _cpu_seconds(pid)
            if cpu is not None:
                # A process that exits keeps its last reading: its CPU was spent.
                self._last[pid] = cpu
        totals: dict[str, float] = {}
        for pid, cpu in self._last.items():
            group = self._group(pid)
            totals[group] = totals.get(group, 0.0) + cpu
        if self.cli_pid:
            helpers = _cpu_seconds(self.cli_pid, children=True)
            if helpers is not None:
                self._helpers = helpers
        totals["spawn helpers"] = self._helpers
        self.samples.append((time.time(), totals))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._take()

    def start(self) -> None:
        self._take()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._take()

    def used(self, lo: float, hi: float) -> dict[str, float]:
        """CPU seconds each group used between epoch `lo` and `hi` (nearest samples)."""
        before = [s for t, s in self.samples if t <= lo] or [self.samples[0][1]]
        after = [s for t, s in self.samples if t >= hi] or [self.samples[-1][1]]
        a, b = before[-1], after[0]
        groups = ("orchestrator", "spawn helpers", "proxy", "old servers", "new servers")
        return {g: round(b.get(g, 0.0) - a.get(g, 0.0), 3) for g in groups}


# --- the journal -----------------------------------------------------------------------


def _steps(world: World, run_id: str) -> list[dict[str, Any]]:
    conn = connect(world.state_dir)
    try:
        rows = conn.execute(
            "SELECT key, started_at, ended_at FROM steps WHERE run_id=? ORDER BY idx",
            (run_id,),
        ).fetchall()
    finally:
        conn.close()
    return [dict(r) for r in rows if r["started_at"]]


def _span(steps: list[dict[str, Any]], first: str, last: str) -> tuple[float, float]:
    """Epoch times from the start of the first step `first` to the end of the last `last`."""
    starts = [r["started_at"] for r in steps if r["key"].startswith(first)]
    ends = [r["ended_at"] for r in steps if r["key"].startswith(last) and r["ended_at"]]
    return min(starts), max(ends)


def _step_name(key: str) -> str:
    return re.sub(r"(#\d+|\[.*\])$", "", key)


def _slow_by_step(
    result: LoadResult,
    steps: list[dict[str, Any]],
    span: tuple[float, float],
    thresholds: dict[str, float],
) -> dict[str, int]:
    """Slow requests sent during `span`, counted by the step(s) they overlapped.

    Slow is over the threshold of the request's kind (ms). A request that overlapped no
    step was between steps or while the CLI started or ended: "(no step)".
    """
    out: Counter[str] = Counter()
    for s in result.samples:
        sent = result.epoch(s)
        if not span[0] <= sent <= span[1] or s.latency * 1000.0 <= thresholds[s.kind]:
            continue
        done = sent + s.latency
        names = {
            _step_name(r["key"])
            for r in steps
            if r["started_at"] <= done and (r["ended_at"] or span[1]) >= sent
        }
        for name in names or {"(no step)"}:
            out[name] += 1
    return dict(out.most_common())


# --- one run ---------------------------------------------------------------------------


def _cli(world: World, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHANGEOVER_")}
    argv = [sys.executable, "-m", "orchestrator", "--config", str(world.config_file)]
    argv += ["--state-dir", str(world.state_dir), "--output", "json", *args]
    # Its own session, as an operator's shell is not the clients' process: on Linux the
    # scheduler shares the CPU between sessions first, so the orchestrator's start-up
    # must not be charged to the load generator's threads alone.
    return subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


def _pcts(result: LoadResult, kind: str, **where: Any) -> dict[str, float]:
    p = result.latency_percentiles(kind=kind, **where)  # type: ignore[arg-type]
    return {k: round(v, 2) for k, v in p.items()}


def bench(
    strategy: str,
    rate: float,
    write_ratio: float,
    *,
    steady: float,
    after: float,
    bake: float,
) -> dict[str, Any]:
    config = json.loads(json.dumps(DEMO_STACK))
    config["roles"]["web"]["count"] = 4 if strategy == "rotate" else 2
    if strategy == "rebuild":
        args = ["--bake", str(bake), "--retain", "2"]
        first, last = "FreezeWrites", "VerifyAddress"
    else:
        args = ["--max-surge", "1"]
        first, last = "AddMembers", "DestroyServers"
    with tempfile.TemporaryDirectory(prefix="co-bench-") as tmp:
        world = World(Path(tmp), stack_config=config)
        try:
            world.up()
            gen = world.load(
                rate=rate,
                connections=connections(rate),
                write_ratio=write_ratio,
                max_duration=600,
                max_requests=10_000_000,
            )
            cpu = CpuSampler(world)
            gen.start()
            cpu.start()
            time.sleep(steady)  # steady state before the change
            t0 = time.time()
            proc = _cli(world, strategy, "demo", "--yes", *args)
            cpu.cli_pid = proc.pid
            stdout, stderr = proc.communicate(timeout=600)
            t1 = time.time()
            time.sleep(WARMUP + after)  # steady state again, after the change
            result = gen.stop()
            cpu.stop()
            try:
                out = json.loads(stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                out = {"raw": stdout[-2000:], "stderr": stderr[-2000:]}
            steps = _steps(world, out["run_id"]) if "run_id" in out else []
            lost = world.lost_writes(result)
        finally:
            world.down()
    if not steps:
        raise RuntimeError(f"{strategy} left no journal: {out}")
    lo, hi = _span(steps, first, last)
    window = (lo, hi + WINDOW_TAIL)
    # Steady state brackets the run: before it and after it (the run and the first
    # WARMUP seconds after it left out), so a change in the machine's background load
    # during the run weighs on both sides alike.
    calm = {"window": (result.started + WARMUP, result.ended), "exclude": (t0, t1 + WARMUP)}
    row: dict[str, Any] = {
        "strategy": strategy,
        "rate": rate,
        "connections": connections(rate),
        "write_pct": round(write_ratio * 100),
        "exit_code": proc.returncode,
        "outcome": out.get("outcome"),
        "run_seconds": round(t1 - t0, 2),
        "requests_sent": result.sent,
        "requests_failed": result.failed,
        "errors": dict(result.errors),
        "acked_writes": len(result.acked_writes),
        "acked_writes_lost": len(lost),
        "rate_achieved": round(result.rate, 1),
        "switch_window_s": round(window[1] - window[0], 3),
    }
    for kind in ("read", "write"):
        row[kind] = {
            "steady_ms": _pcts(result, kind, **calm),
            "window_ms": _pcts(result, kind, window=window),
            "whole_run_ms": _pcts(result, kind, window=(t0, t1)),
        }
    read_steady = row["read"]["steady_ms"]["p99"]
    row["read_p99_ratio"] = (
        round(row["read"]["window_ms"]["p99"] / read_steady, 2) if read_steady else None
    )
    if strategy == "rebuild":
        freeze_lo, _ = _span(steps, "FreezeWrites", "FreezeWrites")
        _, freeze_hi = _span(steps, "SwitchWrites", "SwitchWrites")
        row["freeze_ms"] = round((freeze_hi - freeze_lo) * 1000.0, 1)
    else:
        row["freeze_ms"] = 0.0  # rotate never holds writes
    write_steady = row["write"]["steady_ms"]["p99"]
    row["write_bound_ms"] = round(row["freeze_ms"] + 2 * write_steady, 1)
    row["write_within_bound"] = (
        row["write"]["window_ms"]["p99"] <= row["write_bound_ms"] if write_steady else None
    )
    thresholds = {
        "read": 2 * read_steady,
        "write": row["freeze_ms"] + 2 * write_steady,
    }
    row["slow_in_window_by_step"] = _slow_by_step(result, steps, window, thresholds)
    row["slow_in_run_by_step"] = _slow_by_step(result, steps, (t0, t1), thresholds)
    row["cpu_s_in_window"] = cpu.used(*window)
    row["cpu_s_in_run"] = cpu.used(t0, t1)
    row["steps"] = [
        {
            "key": r["key"],
            "start": round(r["started_at"] - t0, 3),
            "end": round((r["ended_at"] or t1) - t0, 3),
        }
        for r in steps
    ]
    return row


def _loads(spec: str) -> list[tuple[float, float]]:
    out = []
    for part in spec.split(","):
        rate, _, pct = part.strip().partition("/")
        out.append((float(rate), float(pct or 0) / 100.0))
    return out


def _fmt(x: float) -> str:
    return f"{x:.1f}"


def table(runs: list[dict[str, Any]]) -> str:
    head = (
        "| load | strategy | sent / failed (rate) | acked writes / lost | read p99 steady / window "
        "(ratio) | write p99 steady / window | freeze | write p99 vs bound |"
    )
    lines = [head, "| " + " | ".join(["---"] * 8) + " |"]
    for r in runs:
        rd, wr = r["read"], r["write"]
        if wr["steady_ms"]["count"]:
            writes = f"{_fmt(wr['steady_ms']['p99'])} / {_fmt(wr['window_ms']['p99'])} ms"
            verdict = "within" if r["write_within_bound"] else "OVER"
            bound = f"{_fmt(wr['window_ms']['p99'])} vs {_fmt(r['write_bound_ms'])} ms, {verdict}"
        else:
            writes, bound = "-", "-"
        freeze = f"{r['freeze_ms']:.0f} ms" if r["strategy"] == "rebuild" else "-"
        ratio = f"{r['read_p99_ratio']:.2f}x" if r["read_p99_ratio"] is not None else "-"
        lines.append(
            f"| {r['rate']:.0f}/s, {r['write_pct']}% writes | {r['strategy']} "
            f"| {r['requests_sent']} / {r['requests_failed']} ({r['rate_achieved']:.0f}/s) "
            f"| {r['acked_writes']} / {r['acked_writes_lost']} "
            f"| {_fmt(rd['steady_ms']['p99'])} / {_fmt(rd['window_ms']['p99'])} ms ({ratio}) "
            f"| {writes} | {freeze} | {bound} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--loads", default=DEFAULT_LOADS, help="RATE/WRITE%%,... (default: 3x3)")
    ap.add_argument("--strategies", default="rebuild,rotate")
    ap.add_argument("--steady", type=float, default=4.0, help="steady seconds before the run")
    ap.add_argument("--after", type=float, default=2.0, help="steady seconds after the run")
    ap.add_argument("--bake", type=float, default=3.0, help="rebuild's bake, seconds")
    ap.add_argument("--no-bytecode-cache", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    cache = None
    if not a.no_bytecode_cache:
        cache = tempfile.TemporaryDirectory(prefix="co-bench-pycache-")
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        os.environ["PYTHONPYCACHEPREFIX"] = cache.name
    started = time.time()
    load_before = os.getloadavg()
    runs = []
    try:
        for rate, write_ratio in _loads(a.loads):
            for strategy in a.strategies.split(","):
                run = bench(
                    strategy, rate, write_ratio, steady=a.steady, after=a.after, bake=a.bake
                )
                runs.append(run)
                print(table([run]).splitlines()[-1], file=sys.stderr, flush=True)
    finally:
        if cache is not None:
            cache.cleanup()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    conditions: dict[str, Any] = {
        "machine": machine,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(time.time() - started, 1),
        "connections": {f"{rate:.0f}/s": connections(rate) for rate, _ in _loads(a.loads)},
        "bytecode_cache": cache is not None,
    }
    if a.json:
        print(json.dumps({**conditions, "runs": runs}))
        return
    print(
        f"cutover benchmark on {machine}, keep-alive clients that never retry (one per "
        f"{RATE_PER_CONNECTION:.0f} req/s, at least {MIN_CONNECTIONS}: "
        + ", ".join(f"{k} {v}" for k, v in conditions["connections"].items())
        + "), "
        f"load average {conditions['load_average_before'][0]} before and "
        f"{conditions['load_average_after'][0]} after, {conditions['seconds']} s\n"
    )
    print(table(runs))
    print("\nslow requests in the switch window by step, and CPU seconds in the window:")
    for r in runs:
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_s_in_window"].items())
        print(
            f"  {r['rate']:.0f}/s {r['write_pct']}% {r['strategy']}: "
            f"window {r['switch_window_s']} s; slow {r['slow_in_window_by_step'] or 'none'}; "
            f"cpu {cpu}"
        )


if __name__ == "__main__":
    main()
