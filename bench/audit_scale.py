"""Audit scale benchmark: `changeover audit` of a 1,000-server stack, CPU and memory.

1,000 real local-cloud processes would not fit a 2-core machine, so the servers come from
an in-memory provider (it implements the Provider Protocol; its servers cost nothing)
whose transport answers the fact script from recorded outputs: the real captures in
tests/fixtures/hygiene (this machine: 135 pending upgrades; a Debian chroot in several
states) and the documented Ubuntu and Amazon Linux ones, in turn. The journal holds a
previous run's VerifyServers record of every server, so drift is measured too. Everything
else is changeover's own code: the fact script, the parsers, the policy, drift,
recommendations, the state database, the report and its JSON.

Measured: CPU (user + system, this process, all threads) and peak resident memory of the
whole process, against the targets in PRODUCT.md (5 s and 300 MB).

    python bench/audit_scale.py [--servers 1000] [--workers 16] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.audit import WORKERS, audit_stack
from orchestrator.db import connect
from orchestrator.errors import CapabilityError
from orchestrator.hygiene import parse_facts, script_sections
from orchestrator.journal import Journal
from orchestrator.lock import LeaseLock
from orchestrator.log import configure
from orchestrator.models import DataSummary, HealthReport, Server
from orchestrator.settings import HealthCheck, HygienePolicy, StackConfig
from providers.transport import CommandResult

CPU_BOUND_S = 5.0  # PRODUCT.md: under 5 s of changeover's own CPU
MEMORY_BOUND_MB = 300.0  # PRODUCT.md: under 300 MB of memory
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "hygiene"
SEPARATOR = "# --- output below, verbatim ---\n"


def recorded_outputs() -> list[str]:
    """Every recorded fact-script output (real ones first), headers stripped."""
    paths = sorted(FIXTURES.glob("debian12-*/*facts*.txt")) + sorted(
        p for p in FIXTURES.glob("*/*facts*.txt") if not p.parent.name.startswith("debian12")
    )
    return [p.read_text().partition(SEPARATOR)[2] for p in paths]


class RecordedTransport:
    """Answers the fact script with a recorded output per server (round robin)."""

    name = "recorded"

    def __init__(self, outputs: list[str], servers: list[Server]) -> None:
        cycle = itertools.cycle(outputs)
        self.answers = {s.id: next(cycle) for s in servers}

    def run(self, server: Server, command: str, *, timeout: float = 30.0) -> CommandResult:
        if not script_sections(command):
            return CommandResult(127, "", "only the fact script is recorded")
        return CommandResult(0, self.answers[server.id])


class MemoryProvider:
    """A provider whose servers are rows in memory. Only reads are implemented: an audit
    makes no other call (I8)."""

    name = "memory"

    def __init__(self, stack: str, count: int) -> None:
        self.calls: Counter[str] = Counter()
        now = time.time()
        self.servers = [
            Server(
                id=f"i-{n:06d}",
                stack=stack,
                role="db" if n == 0 else "web",
                generation=3,
                run="r-prev",
                state="running",
                host=f"10.0.{n // 250}.{n % 250 + 1}",
                port=22,
                created_at=now - 86400.0 * (n % 45),
            )
            for n in range(count)
        ]
        self.transport = RecordedTransport(recorded_outputs(), self.servers)

    def ex_transport(self, policy: HygienePolicy) -> RecordedTransport:
        return self.transport

    def list_servers(self, stack: str) -> list[Server]:
        self.calls["list_servers"] += 1
        return list(self.servers)

    def describe_servers(self, stack: str, ids: list[str]) -> list[Server]:
        self.calls["describe_servers"] += 1
        wanted = set(ids)
        return [s for s in self.servers if s.id in wanted]

    def get_members(self, stack: str, address: str) -> list[str]:
        self.calls["get_members"] += 1
        return [s.id for s in self.servers if s.role == "web"]

    def address_capacity(self, stack: str, address: str) -> int | None:
        return None

    def verify_server(
        self, server: Server, check: HealthCheck, policy: HygienePolicy
    ) -> HealthReport:
        raise CapabilityError(self.name, "verify_server", "benchmark provider")

    def _no(self, *args: Any, **kwargs: Any) -> Any:
        raise CapabilityError(self.name, "changes", "benchmark provider: reads only")

    create_servers = destroy_servers = set_members = inflight = probe_address = _no
    data_mode = data_copy_live = data_freeze = data_unfreeze = _no
    data_switch = data_switch_back = _no

    def data_final_sync(self, stack: str, src_id: str, dst_id: str) -> DataSummary:
        raise CapabilityError(self.name, "data", "benchmark provider")


def seed_previous_run(state_dir: Path, stack: str, provider: MemoryProvider) -> None:
    """A finished run whose VerifyServers recorded every server's facts (the drift base)."""
    conn = connect(state_dir)
    try:
        lock = LeaseLock(conn)
        lease = lock.acquire(stack, "r-prev")
        journal = Journal(conn, lock)
        plan = {
            "strategy": "rebuild",
            "stack": stack,
            "steps": [{"key": "VerifyServers", "name": "VerifyServers"}],
        }
        journal.create_run("r-prev", plan, lease)
        journal.step_started("r-prev", 0, lease)
        reports = {}
        for server in provider.servers:
            facts = parse_facts(provider.transport.answers[server.id]).to_dict()
            if server.id.endswith("7"):  # one in ten changed by hand since
                facts["components"] = {**facts["components"], "python": "3.9.0"}
            reports[server.id] = {"server_id": server.id, "facts": facts}
        journal.step_done("r-prev", 0, lease, {"passed": list(reports), "reports": reports})
        journal.set_status("r-prev", "succeeded", lease, outcome="succeeded")
        lock.release(lease)
    finally:
        conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=WORKERS)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args()
    configure()  # logs to stderr, as the CLI does

    stack = "big"
    config = StackConfig.model_validate(
        {
            "provider": "local",
            "address": "big-lb",
            "roles": {"db": {"count": 1, "data": True}, "web": {"count": args.servers - 1}},
            "hygiene": {"pending": "security", "min_versions": {"nginx": "1.20"}},
        }
    )
    with tempfile.TemporaryDirectory(prefix="co-audit-bench-") as tmp:
        state_dir = Path(tmp)
        provider = MemoryProvider(stack, args.servers)
        seed_previous_run(state_dir, stack, provider)

        cpu0, wall0 = time.process_time(), time.perf_counter()
        report = audit_stack(provider, stack, config, state_dir=state_dir, workers=args.workers)
        cpu1 = time.process_time()
        payload = json.dumps(report.to_dict(), default=str)
        text = report.text()
        tables = report.tables()
        cpu2, wall2 = time.process_time(), time.perf_counter()

    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak_mb = usage.ru_maxrss / 1024.0  # KiB on Linux
    process_cpu = usage.ru_utime + usage.ru_stime  # start-up, imports and set-up included
    cpu = cpu2 - cpu0
    figures = {
        "servers": args.servers,
        "workers": args.workers,
        "recorded_outputs": len(recorded_outputs()),
        "cpu_seconds": round(cpu, 3),
        "cpu_audit_seconds": round(cpu1 - cpu0, 3),
        "cpu_render_seconds": round(cpu2 - cpu1, 3),
        "cpu_process_seconds": round(process_cpu, 3),
        "wall_seconds": round(wall2 - wall0, 3),
        "peak_rss_mb": round(peak_mb, 1),
        "json_mb": round(len(payload) / 1e6, 2),
        "text_lines": text.count("\n"),
        "tables": len(tables),
        "counts": report.counts,
        "drifted_servers": sum(1 for a in report.servers if a.drift),
        "provider_calls": dict(provider.calls),
        "cpu_ratio": round(cpu / CPU_BOUND_S, 3),
        "memory_ratio": round(peak_mb / MEMORY_BOUND_MB, 3),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    ok = cpu < CPU_BOUND_S and peak_mb < MEMORY_BOUND_MB
    figures["within_bounds"] = ok
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"audit of {args.servers} servers ({args.workers} workers, recorded outputs)")
        print(
            f"  CPU    {cpu:.2f} s (audit {cpu1 - cpu0:.2f} s + report {cpu2 - cpu1:.2f} s)"
            f"  = {cpu / CPU_BOUND_S:.2f} x the {CPU_BOUND_S:g} s bound"
        )
        print(
            f"  memory {peak_mb:.0f} MB peak RSS (whole process)"
            f"  = {peak_mb / MEMORY_BOUND_MB:.2f} x the {MEMORY_BOUND_MB:g} MB bound"
        )
        print(
            f"  whole process CPU {process_cpu:.2f} s (interpreter, imports, seeding the journal)"
        )
        print(f"  wall   {wall2 - wall0:.2f} s; JSON report {len(payload) / 1e6:.1f} MB")
        print(f"  recommendations {report.counts}; {figures['drifted_servers']} drifted")
        print(f"  provider calls {dict(provider.calls)}")
        print("  within bounds" if ok else "  OVER BOUND")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
