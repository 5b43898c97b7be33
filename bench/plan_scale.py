"""Scale: plan a rebuild and a rotate of a 1,000-server AWS stack, against moto running
as a separate server process, and measure changeover's own CPU time and memory.

Target (PRODUCT.md): under 5 s of changeover's own CPU and under 300 MB. moto runs in its
own process (`python -m moto.server` on 127.0.0.1), so the CPU measured here (this
process's rusage around the plan calls) is changeover's and boto3's, not moto's.

    python bench/plan_scale.py [--servers 1000]
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from strategies.rebuild import plan_rebuild
from strategies.rotate import plan_rotate
from tests.aws.world import AwsWorld

CPU_BOUND_S, MEMORY_BOUND_MB = 5.0, 300.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--servers", type=int, default=1000)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    port = _free_port()
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        world = AwsWorld(endpoint_url=url)
        config = world.config(address="tg", web=a.servers - 1)
        world.bootstrap(world.provider(config), config)
        results: dict[str, Any] = {}
        for name, plan in (("plan rebuild", plan_rebuild), ("plan rotate", plan_rotate)):
            provider = world.provider(config)
            cpu, wall = _cpu(), time.monotonic()
            steps = len(plan(provider, world.stack, config).steps)
            results[name] = {
                "cpu_s": round(_cpu() - cpu, 2),
                "wall_s": round(time.monotonic() - wall, 2),
                "steps": steps,
                "api_calls": dict(provider.api_calls),
            }
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    finally:
        moto.terminate()
        moto.wait(timeout=10)
    if a.json:
        print(json.dumps({"servers": a.servers, "peak_rss_mb": round(peak_mb), **results}))
        return
    print(f"plan a {a.servers}-server AWS stack (moto in its own process on 127.0.0.1)")
    for name, r in results.items():
        print(
            f"  {name}: {r['cpu_s']} s CPU ({r['cpu_s'] / CPU_BOUND_S:.2f}x the "
            f"{CPU_BOUND_S:.0f} s bound), {r['wall_s']} s wall, {r['steps']} steps, "
            f"calls {r['api_calls']}"
        )
    print(
        f"  peak memory of this process: {peak_mb:.0f} MB "
        f"({peak_mb / MEMORY_BOUND_MB:.2f}x the {MEMORY_BOUND_MB:.0f} MB bound; it includes "
        f"creating the stack through boto3)"
    )


if __name__ == "__main__":
    main()
