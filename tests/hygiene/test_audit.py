"""`changeover audit` on the local cloud: findings, drift, recommendations, output forms."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.audit import AuditReport, ServerAudit, audit_stack, stack_recommendation
from orchestrator.db import connect
from orchestrator.hygiene import Action, Recommendation, Verdict
from orchestrator.journal import Journal
from orchestrator.lock import LeaseLock
from orchestrator.models import Server
from orchestrator.rehearse import World
from orchestrator.settings import HygienePolicy, StackConfig
from providers.local.http import request
from providers.local.provider import LocalProvider


def _port(world: World, server_id: str) -> int:
    row = world.cloud.server_row(server_id)
    assert row is not None
    return int((Path(row["root"]) / "port").read_text())


def _verify_step_end(world: World, run_id: str) -> float:
    conn = connect(world.state_dir)
    try:
        steps = Journal(conn, LeaseLock(conn)).steps(run_id)
    finally:
        conn.close()
    ended = [s.ended_at for s in steps if s.name == "VerifyServers"]
    assert ended and ended[0] is not None
    return ended[0]


def test_audit_reports_a_hand_made_change_as_drift_since_the_last_run(world: World) -> None:
    """After a run, nginx upgraded by hand shows as drift: old, new, and when it was recorded."""
    code, run = world.cli_json("rebuild", "demo", "--yes")
    assert code == 0, run
    changed, untouched = world.members()
    request(
        _port(world, changed),
        "POST",
        "/admin/set-package",
        {"name": "nginx", "version": "1.24.0-1"},
        token=world.cloud.control_token,
    )
    code, report = world.cli_json("audit", "demo")
    assert code == 0, report["_stderr"]
    by_id = {s["id"]: s for s in report["servers"]}
    assert by_id[changed]["drift"] == [
        {
            "component": "nginx",
            "recorded": "1.22.1",
            "now": "1.24.0",
            "recorded_at": _verify_step_end(world, run["run_id"]),
            "run_id": run["run_id"],
        }
    ]
    assert by_id[untouched]["drift"] == []
    assert by_id[changed]["recommendation"]["action"] == "replace"
    assert report["recommendation"]["action"] == "replace"
    assert report["recommendation"]["command"] == "changeover rebuild demo"
    # The baseline is the run's record, so drift stays visible audit after audit.
    text = world.cli("audit", "demo").stdout
    assert f"DRIFT: was 1.22.1 when run {run['run_id']} recorded it at" in text
    conn = connect(world.state_dir)
    try:
        rows = conn.execute(
            "SELECT version FROM component_versions WHERE server_id=? AND component='nginx'",
            (changed,),
        ).fetchall()
    finally:
        conn.close()
    assert [r[0] for r in rows] == ["1.24.0", "1.24.0"]  # each audit recorded what it read


def test_audit_is_read_only_and_finds_a_new_security_release(world: World) -> None:
    """A new security release in the index: every server to replace, no mutating call (I8)."""
    index = world.cloud.read_package_index()
    index["packages"]["openssl"]["version"] = "3.0.99-1~deb12u1"
    world.cloud.write_package_index(index)
    mark = world.cloud.last_call_id()
    code, report = world.cli_json("audit", "demo")
    assert code == 0, report["_stderr"]
    assert report["counts"]["replace"] == 3
    for server in report["servers"]:
        assert server["security_count"] == 1
        assert server["recommendation"]["reason"].startswith("1 pending security upgrade(s)")
    assert report["recommendation"]["command"] == "changeover rebuild demo"
    assert report["simulated"] is True
    assert not [c for c in world.cloud.calls(mark) if c["mutating"]]


def test_stopped_and_reboot_pending_servers(world: World) -> None:
    """A dead server is to be replaced; one whose sentinel is set, to be rebooted."""
    web_a, web_b = world.members()
    world.cloud.kill_server(web_a)
    row = world.cloud.server_row(web_b)
    assert row is not None
    sentinel = Path(row["root"]) / "root/var/run"
    (sentinel / "reboot-required").write_text("*** System restart required ***\n")
    (sentinel / "reboot-required.pkgs").write_text("libc6\n")
    report = audit_stack(
        LocalProvider(world.cloud), "demo", world.config, state_dir=world.state_dir
    )
    actions = {a.server.id: a.recommendation for a in report.servers}
    assert actions[web_a] == Recommendation("replace", "server is stopped")
    assert actions[web_b] == Recommendation("reboot", "reboot required (by libc6)")
    assert report.exit_code == 0
    # A table of all servers, then one per server, worst first.
    tables = report.tables()
    assert tables[0][1][-2:] == ["action", "reason"] and len(tables[0][2]) == 3
    assert [t[0].split()[0] for t in tables[1:3]] == [web_a, web_b]
    assert ["reboot required", "yes (libc6)"] in tables[2][2]
    assert f"{web_b} (web, gen 1, serving)" in report.text()


def _audited(role: str, action: Action, gate_ok: bool) -> ServerAudit:
    server = Server(f"srv-{role}-{action}", "demo", role, 1, "r", "running", "127.0.0.1", 1)
    return ServerAudit(
        server=server,
        serving=role == "web",
        age=1.0,
        verdict=Verdict(gate_ok),
        recommendation=Recommendation(action, "why"),
    )


def teststack_recommendation_takes_the_worst_server_and_the_lightest_command() -> None:
    """Only serving servers failing the gate: rotate --only-if-needed; else rebuild; patch
    and reboot: upgrade; all fine: leave."""
    config = StackConfig.model_validate(
        {"address": "a", "roles": {"db": {"data": True}, "web": {"count": 2}}}
    )

    def stack(*audits: ServerAudit) -> AuditReport:
        rec, command = stack_recommendation("demo", config, list(audits))
        return AuditReport("demo", "local", "local", time.time(), HygienePolicy(), [], rec, command)

    rotate = stack(_audited("web", "replace", False), _audited("db", "leave", True))
    assert rotate.command == "changeover rotate demo --only-if-needed"
    assert rotate.recommendation.reason.startswith("1 of 2 server(s) to replace")
    assert stack(_audited("db", "replace", False)).command == "changeover rebuild demo"
    assert stack(_audited("web", "replace", True)).command == "changeover rebuild demo"
    patch = stack(_audited("web", "reboot", False), _audited("web", "patch", False))
    # min-healthy 100% (the default): `upgrade` could take no server out, so surge first
    # (the patched server fails the gate: --only-if-needed selects it).
    assert patch.command == "changeover rotate demo --only-if-needed"
    assert "upgrading in place would leave fewer than min-healthy 100%" in (
        patch.recommendation.reason
    )
    config = StackConfig.model_validate(
        {
            "address": "a",
            "roles": {"db": {"data": True}, "web": {"count": 2}},
            "defaults": {"min_healthy": 50},
        }
    )
    patch = stack(_audited("web", "reboot", False), _audited("web", "patch", False))
    assert (patch.recommendation.action, patch.command) == ("patch", "changeover upgrade demo")
    # `upgrade` leaves the data role alone: a db to patch means a rebuild.
    assert stack(_audited("db", "patch", True)).command == "changeover rebuild demo"
    assert stack(_audited("web", "leave", True)).command is None


@pytest.mark.parametrize("provider", ["aws", "libcloud:ec2"])
def test_providers_without_in_place_upgrades_are_patched_by_replacing(provider: str) -> None:
    """aws and libcloud refuse `upgrade` (exit 2): their patch and reboot advice is a
    command that runs there, a rotate (only the failing servers when the gate fails), or a
    rebuild when the data role needs it."""
    extra = {"libcloud": {"driver": "ec2"}} if provider.startswith("libcloud") else {}
    config = StackConfig.model_validate(
        {
            "provider": provider,
            "address": "a",
            "roles": {"db": {"data": True}, "web": {"count": 2}},
            **extra,
        }
    )

    def command(*audits: ServerAudit) -> str | None:
        rec, cmd = stack_recommendation("demo", config, list(audits))
        assert rec.action in ("patch", "reboot")
        assert f"{provider} servers are patched by replacing them" in rec.reason
        return cmd

    assert command(_audited("web", "patch", True)) == "changeover rotate demo"
    assert command(_audited("web", "reboot", False)) == "changeover rotate demo --only-if-needed"
    assert command(_audited("db", "patch", True)) == "changeover rebuild demo"


def test_bad_audit_input_is_one_line_and_exit_2(make_world: Callable[..., World]) -> None:
    """An unknown stack, or a transport the provider lacks: one line, exit 2."""
    world = make_world(hygiene={"transport": "ssm"})
    unknown = world.cli("audit", "nope")
    assert unknown.returncode == 2 and "unknown stack 'nope'" in unknown.stderr
    ssm = world.cli("audit", "demo")
    assert ssm.returncode == 2
    assert "provider 'local' does not support the ssm transport" in ssm.stderr
    assert "Traceback" not in ssm.stderr
