"""`upgrade` on a stack whose roles no entry point names (every role of a static stack):
the plan through the CLI asks no host; a run, with the hosts' answers made in-process,
takes one batch at a time, says why Drain and Return have nothing to do, and gates each
host. tests/debian/test_static_upgrade.py runs the same against real Debian over SSH."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from orchestrator.db import connect
from orchestrator.engine import Engine
from orchestrator.errors import ConfigError, PreconditionFailed
from orchestrator.journal import Journal, StepRecord
from orchestrator.lock import LeaseLock
from orchestrator.models import HealthReport, Server
from orchestrator.plan import Outcome
from orchestrator.settings import HealthCheck, HygienePolicy, StackConfig, StaticHost, load_settings
from providers.static import DEFAULT_REBOOT, StaticProvider
from providers.transport import CommandResult
from strategies.upgrade import plan_upgrade
from tests.test_static import HOSTS

TWO = """
[stacks.s]
provider = "static"
[stacks.s.static]
hosts = [
  { id = "web-1", address = "127.0.0.1", port = 2201 },
  { id = "web-2", address = "127.0.0.1", port = 2202, reboot_command = "shutdown -r now" },
]
"""
STEPS = ("DrainForUpgrade", "UpgradePackages", "RebootServers", "VerifyUpgraded", "ReturnServers")


def _cli(tmp_path: Path, text: str, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "changeover.toml"
    config.write_text(text)
    return subprocess.run(
        [
            *(sys.executable, "-m", "orchestrator", "--config", str(config)),
            *("--state-dir", str(tmp_path / "state"), *args),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_plan_upgrade_on_a_static_stack_batches_each_role_and_asks_no_host(
    tmp_path: Path,
) -> None:
    """Each role's hosts in batches; min-healthy counts a role's running hosts and the
    refusal says what to pass; no SSH command is sent (none of these hosts answers)."""
    proc = _cli(tmp_path, HOSTS, "plan", "upgrade", "s")
    assert proc.returncode == 2, proc.stderr
    assert (
        "error: upgrading 1 of the 2 running web server(s) at a time would leave 1 running, "
        "below min-healthy 100% (2); pass --min-healthy 50"
    ) in proc.stderr
    proc = _cli(tmp_path, HOSTS, "plan", "upgrade", "s", "--min-healthy", "50")
    assert proc.returncode == 2, proc.stderr
    assert "1 of the 1 running db server(s)" in proc.stderr
    assert "pass --min-healthy 0 to upgrade it anyway" in proc.stderr
    assert "Traceback" not in proc.stderr

    proc = _cli(tmp_path, HOSTS, "--output", "json", "plan", "upgrade", "s", "--min-healthy", "0")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["plan"]["summary"]["batches"] == [["web-1"], ["web-2"], ["db-1"]]
    assert out["plan"]["summary"]["not_upgraded"] == {}
    keys = [s["key"] for s in out["plan"]["steps"]]
    assert keys == [f"{name}#{n}" for n in (1, 2, 3) for name in STEPS]
    assert out["api_calls"] == {}
    args = ("--output", "json", "plan", "upgrade", "s", "--batch", "2", "--min-healthy", "0")
    proc = _cli(tmp_path, HOSTS, *args)
    assert json.loads(proc.stdout)["plan"]["summary"]["batches"] == [["web-1", "web-2"], ["db-1"]]


def test_a_static_hosts_reboot_command_is_one_line() -> None:
    """reboot_command runs detached in `sh -c`: one non-empty line."""
    assert StaticHost(id="h", address="a", reboot_command="shutdown -r now").reboot_command
    for bad in ("", "  ", "reboot\nrm -rf /"):
        with pytest.raises(ValueError, match="reboot_command"):
            StaticHost(id="h", address="a", reboot_command=bad)


def test_a_bad_reboot_command_in_the_config_is_one_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "changeover.toml"
    config.write_text(TWO.replace('"shutdown -r now"', '""'))
    with pytest.raises(ConfigError, match="reboot_command"):
        load_settings(config)


class _Hosts(StaticProvider):
    """The static provider with its hosts' answers made in-process: an upgrade brings a
    kernel (reboot required), a reboot starts a new boot, the gate fails while a reboot
    is required. `log` is what happened to which host, in order."""

    def __init__(self, stack: str, config: StackConfig) -> None:
        super().__init__(stack, config)
        self.log: list[tuple[str, str]] = []
        self.boots = dict.fromkeys(self.hosts, 1)
        self.required: set[str] = set()
        self.stopped: set[str] = set()

    def _server(self, host: StaticHost) -> Server:
        server = super()._server(host)
        return replace(server, state="stopped") if host.id in self.stopped else server

    def upgrade_packages(
        self, stack: str, server_id: str, *, security_only: bool, dist_upgrade: bool
    ) -> dict[str, Any]:
        self.log.append(("upgrade", server_id))
        self.required.add(server_id)
        kernel = {"linux-image-amd64": {"from": "6.1.0", "to": "6.1.1"}}
        return {"upgraded": kernel, **self.boot_state(stack, server_id)}

    def boot_state(self, stack: str, server_id: str) -> dict[str, Any]:
        required = server_id in self.required
        return {
            "boot_id": f"{server_id}-boot-{self.boots[server_id]}",
            "reboot_required": required,
            "reboot_required_pkgs": ["linux-image-amd64"] if required else [],
        }

    def reboot_server(self, stack: str, server_id: str) -> None:
        self.log.append(("reboot", server_id))
        self.boots[server_id] += 1
        self.required.discard(server_id)

    def pin_host_keys(
        self, stack: str, servers: list[Server], known: dict[str, list[str]]
    ) -> dict[str, list[str]]:
        return {}

    def verify_servers(
        self, servers: list[Server], checks: dict[str, HealthCheck], policy: HygienePolicy
    ) -> list[HealthReport]:
        out = []
        for s in servers:
            self.log.append(("verify", s.id))
            ok = s.id not in self.required
            out.append(HealthReport(s.id, True, True, ok, [] if ok else ["reboot required"]))
        return out


def _run(tmp_path: Path, provider: _Hosts, **kw: Any) -> tuple[Outcome, list[StepRecord], Any]:
    plan = plan_upgrade(provider, "s", provider.config, **kw)
    engine = Engine(
        state_dir=tmp_path / "state",
        provider=provider,
        config=provider.config,
        sleep=lambda _s: None,
    )
    try:
        result = engine.start(plan)
    finally:
        engine.close()
    conn = connect(tmp_path / "state")
    try:
        assert result.run_id is not None
        steps = Journal(conn, LeaseLock(conn)).steps(result.run_id)
    finally:
        conn.close()
    return result.outcome, steps, result


def _two(tmp_path: Path) -> _Hosts:
    config = tmp_path / "changeover.toml"
    config.write_text(TWO)
    return _Hosts("s", load_settings(config).stack("s"))


def test_upgrade_on_static_hosts_takes_one_batch_at_a_time_and_gates_each(
    tmp_path: Path,
) -> None:
    """Each host upgraded, rebooted (reboot-required said so) and verified before the
    next one is touched; Drain and Return are no-ops that say nothing routes to the
    role; the result names no entry point."""
    provider = _two(tmp_path)
    outcome, steps, result = _run(tmp_path, provider, security_only=True, min_healthy=50)
    assert outcome == Outcome.SUCCEEDED, result.message
    assert [s.key for s in steps] == [f"{name}#{n}" for n in (1, 2) for name in STEPS]
    assert provider.log == [
        ("upgrade", "web-1"), ("reboot", "web-1"), ("verify", "web-1"),
        ("upgrade", "web-2"), ("reboot", "web-2"), ("verify", "web-2"),
    ]  # fmt: skip
    by_key = {s.key: s for s in steps}
    for n, host in ((1, "web-1"), (2, "web-2")):
        drain, back = by_key[f"DrainForUpgrade#{n}"], by_key[f"ReturnServers#{n}"]
        assert drain.noop == (
            "nothing to drain: no entry point serves role 'web' (changeover routes no "
            "traffic to it)"
        )
        assert back.noop is not None and back.noop.startswith("nothing to return to: ")
        assert back.outputs["verified"] == [host]
        assert by_key[f"RebootServers#{n}"].outputs["rebooted"] == [host]
        assert by_key[f"VerifyUpgraded#{n}"].outputs["passed"] == [host]
    assert result.summary["address"] == {"name": "", "before": [], "after": []}
    assert result.summary["entry_points"] == {}


def test_a_host_down_at_run_time_stops_the_batch_before_its_upgrade(tmp_path: Path) -> None:
    """min-healthy is checked again when the batch starts: with the other host down,
    upgrading this one would leave none running, so nothing is upgraded (rolled back)."""
    provider = _two(tmp_path)
    plan = plan_upgrade(provider, "s", provider.config, min_healthy=50)
    provider.stopped.add("web-2")
    engine = Engine(
        state_dir=tmp_path / "state",
        provider=provider,
        config=provider.config,
        sleep=lambda _s: None,
    )
    try:
        result = engine.start(plan)
    finally:
        engine.close()
    assert result.outcome == Outcome.ROLLED_BACK, result.message
    assert "would leave 0 web server(s) running of 2, below min-healthy 50%" in result.message
    assert provider.log == []


class _Commands(StaticProvider):
    """The static provider with its SSH commands recorded: the boot id changes once a
    reboot command was sent."""

    def __init__(self, stack: str, config: StackConfig) -> None:
        super().__init__(stack, config)
        self.sent: list[str] = []

    def _run(self, server: Server, command: str, timeout: float) -> CommandResult:
        self.sent.append(command)
        rebooted = any(c.startswith("nohup") for c in self.sent)
        return CommandResult(0, f"boot-{int(rebooted)}\n@@reboot\nabsent\n", "")


def test_the_reboot_command_is_the_hosts_own_or_the_default(tmp_path: Path) -> None:
    """web-1 reboots with the default command, web-2 with its `reboot_command`; each is
    sent detached, and the call returns once the boot id changed."""
    config = tmp_path / "changeover.toml"
    config.write_text(TWO)
    stack = load_settings(config).stack("s")
    for host, command in (("web-1", DEFAULT_REBOOT), ("web-2", "shutdown -r now")):
        provider = _Commands("s", stack)
        provider.reboot_server("s", host)
        detached = [c for c in provider.sent if c.startswith("nohup")]
        assert detached == [f"nohup sh -c 'sleep 1; {command}' </dev/null >/dev/null 2>&1 &"]


def test_a_host_not_running_is_left_out_of_the_plan_with_its_reason(tmp_path: Path) -> None:
    """Only a role's running servers are taken; the others are listed as not upgraded,
    and min-healthy counts the running ones."""
    provider = _two(tmp_path)
    provider.stopped.add("web-2")
    plan = plan_upgrade(provider, "s", provider.config, min_healthy=0)
    assert plan.summary["batches"] == [["web-1"]]
    assert plan.summary["not_upgraded"] == {"web-2": "stopped, not running"}
    with pytest.raises(PreconditionFailed, match="1 of the 1 running web server"):
        plan_upgrade(provider, "s", provider.config, min_healthy=50)
