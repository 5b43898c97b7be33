"""`changeover report --output json` for a libcloud run (EC2 driver on moto)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from orchestrator.engine import Engine
from orchestrator.plan import Outcome
from providers.libcloud_provider import make_libcloud_provider
from strategies.rotate import plan_rotate
from tests.libcloud.fakes import FakeClock
from tests.libcloud.moto_shims import shim
from tests.libcloud.test_adapters import FakeBalancerDriver
from tests.libcloud.world import Ec2World


def test_report_of_a_libcloud_rotate(ec2_local: Ec2World, tmp_path: Path) -> None:
    """A rotate through a balancer on libcloud: its report has one cutover per batch,
    the new and old servers' lanes, and the libcloud calls per operation."""
    world = ec2_local
    lb = FakeBalancerDriver()
    config = world.config(
        web=2, libcloud={"driver": "ec2", "ip": "private", "load_balancer": "lb-1"}
    )

    def provider() -> Any:
        p: Any = make_libcloud_provider(
            world.stack,
            config,
            state_dir=world.state_dir,
            environ={"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
            lb_driver=lb,
            transport=world.transport,
            checker=world.apps,
            probe=world.apps,
        )
        shim(p.driver)
        return p

    seeder = provider()
    old = seeder.create_servers(
        stack=world.stack,
        role="web",
        generation=1,
        run_id="seed",
        count=2,
        image=world.ami,
        size="t3.micro",
        idempotency_key="seed/web",
        links={},
    )
    seeder.set_members(world.stack, config.address, [s.id for s in old])
    p = provider()
    clock = FakeClock()
    state = tmp_path / "state"
    engine = Engine(
        state_dir=state, provider=p, config=config, sleep=clock.sleep, clock=clock.clock
    )
    result = engine.start(plan_rotate(p, world.stack, config))
    engine.close()
    assert result.outcome == Outcome.SUCCEEDED, result.message
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "--state-dir",
            str(state),
            "--output",
            "json",
            "report",
            str(result.run_id),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads(proc.stdout)
    assert rep["strategy"] == "rotate" and rep["outcome"] == "succeeded"
    assert [m["kind"] for m in rep["markers"]].count("cutover") == 2  # one per batch
    sides = sorted(ln["side"] for ln in rep["servers"])
    assert sides == ["new", "new", "old", "old"]
    assert all(ln["destroyed"] for ln in rep["servers"] if ln["side"] == "old")
    assert all(ln["role"] == "web" for ln in rep["servers"])
    assert rep["api_calls"] and rep["api_calls_total"] > 0
