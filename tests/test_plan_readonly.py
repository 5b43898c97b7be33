"""I8 with hygiene on: `plan rotate --only-if-needed` asks no server and changes nothing.

On aws the fact script goes through SSM SendCommand, a mutating call, so a plan cannot
run it. It decides from the facts the last audit or run recorded, stating their age,
or says a server "needs verification". A real run still verifies live.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.audit import audit_stack
from orchestrator.engine import Engine
from orchestrator.facts import facts_from_dict
from orchestrator.hygiene import parse_facts
from orchestrator.models import Server
from orchestrator.plan import Outcome
from orchestrator.rehearse import stack_toml
from orchestrator.settings import StackConfig
from providers.aws import AwsProvider, is_mutating
from providers.transport import CommandResult
from strategies.rotate import plan_rotate
from tests.aws import conftest as aws_fixtures
from tests.aws.world import AwsWorld
from tests.recorded import CLEAN_FACTS, PENDING_FACTS, RecordedTransport

# The AWS fixtures (moto in-process, moto over HTTP, credentials for subprocesses).
aws = aws_fixtures.aws
moto_endpoint = aws_fixtures.moto_endpoint
aws_server = aws_fixtures.aws_server
aws_env_vars = aws_fixtures.aws_env_vars

HYGIENE = {"pending": "none"}  # hygiene on: any pending upgrade fails the gate
PENDING_REASON = "56 pending upgrade(s), 56 security: apt, ca-certificates"
TWO_HOURS = 7200.0


@dataclass
class PerServerTransport(RecordedTransport):
    """Answers the fact script with `by_server[id]` (clean for the others)."""

    by_server: dict[str, str] = field(default_factory=dict)

    def run(self, server: Server, command: str, *, timeout: float = 30.0) -> CommandResult:
        self.facts = self.by_server.get(server.id, CLEAN_FACTS)
        return super().run(server, command, timeout=timeout)


def _stack(aws: AwsWorld, **hygiene: Any) -> StackConfig:
    """Two web servers behind a target group (every one serves), no data role."""
    return aws.config(address="tg", web=2, db=False, hygiene=hygiene or HYGIENE)


def _assert_read_only(provider: AwsProvider, transport: RecordedTransport) -> None:
    assert provider.accounting.mutating == [], provider.accounting.mutating
    assert "SendCommand" not in provider.api_calls
    assert transport.commands == [], "a plan ran commands on servers"


def test_recorded_facts_read_back() -> None:
    """What the gate and audit record reads back as the same facts, judged the same."""
    for text in (CLEAN_FACTS, PENDING_FACTS):
        facts = parse_facts(text)
        back = facts_from_dict(json.loads(json.dumps(facts.to_dict())))
        assert back is not None and back.to_dict() == facts.to_dict()
    assert facts_from_dict({"hygiene": "not checked: the policy asks for nothing"}) is None
    assert facts_from_dict({}) is None


def test_plan_without_recorded_facts_says_needs_verification(aws: AwsWorld, tmp_path: Path) -> None:
    """No audit or run recorded facts: the plan selects nothing, lists every serving
    server as needing verification, and makes 0 mutating calls and 0 commands. A real
    run (live) still verifies them over the transport and selects the pending ones."""
    config = _stack(aws)
    made = aws.bootstrap(aws.provider(config), config)
    transport = RecordedTransport(facts=PENDING_FACTS)
    provider = aws.provider(config, transport=transport)
    plan = plan_rotate(provider, aws.stack, config, only_if_needed=True, state_dir=tmp_path)
    _assert_read_only(provider, transport)
    assert plan.steps == [] and plan.summary["selected"] == {}
    assert plan.params["live"] is False
    unverified = plan.summary["needs_verification"]
    assert sorted(unverified) == sorted(made["web"])
    assert all(
        why.startswith("needs verification: no recorded facts") for why in unverified.values()
    )

    live = plan_rotate(provider, aws.stack, config, only_if_needed=True, live=True)
    assert sorted(live.summary["selected"]) == sorted(made["web"])
    assert all(PENDING_REASON in why for why in live.summary["selected"].values())
    assert live.summary["needs_verification"] == {}
    assert any("changeover facts" in cmd for _, cmd in transport.commands)


def test_plan_decides_from_an_earlier_audit_and_states_its_age(
    aws: AwsWorld, tmp_path: Path
) -> None:
    """An audit 2h ago found pending upgrades on one server: the plan selects that one,
    keeps the other, says 'facts from audit 2h ago', and asks neither server."""
    config = _stack(aws)
    made = aws.bootstrap(aws.provider(config), config)
    stale, clean = made["web"]
    audit_transport = PerServerTransport(by_server={stale: PENDING_FACTS})
    audit_stack(
        aws.provider(config),
        aws.stack,
        config,
        state_dir=tmp_path,
        transport=audit_transport,
        now=time.time() - TWO_HOURS,
    )
    assert audit_transport.commands, "the audit itself asks the servers"

    transport = RecordedTransport(facts=CLEAN_FACTS)
    provider = aws.provider(config, transport=transport)
    plan = plan_rotate(provider, aws.stack, config, only_if_needed=True, state_dir=tmp_path)
    _assert_read_only(provider, transport)
    selected = plan.summary["selected"]
    assert list(selected) == [stale]
    assert selected[stale].startswith(PENDING_REASON)
    assert selected[stale].endswith("(facts from audit 2h ago)")
    assert plan.summary["not_needed"] == {clean: "passes hygiene (facts from audit 2h ago)"}
    assert plan.summary["needs_verification"] == {}
    removed = [s.params["ids"] for s in plan.steps if s.name == "RemoveMembers"]
    assert removed == [[stale]]


def test_plan_decides_from_an_earlier_run_then_a_newer_audit(aws: AwsWorld, tmp_path: Path) -> None:
    """A rotate's VerifyServers recorded the new servers' facts (pending upgrades, under a
    policy that ignored them then). Under today's policy a plan selects them from those
    facts, naming the run; a newer audit's clean facts then win over the run's."""
    lenient = _stack(aws, pending="ignore", reboot_required_fails=True)
    aws.bootstrap(aws.provider(lenient), lenient)
    runner = aws.provider(lenient, transport=RecordedTransport(facts=PENDING_FACTS))
    engine = Engine(state_dir=tmp_path, provider=runner, config=lenient, sleep=lambda _s: None)
    result = engine.start(plan_rotate(runner, aws.stack, lenient))
    engine.close()
    assert result.outcome == Outcome.SUCCEEDED, result.message
    new = sorted(result.summary["address"]["after"])

    config = _stack(aws)
    later = time.time() + 600
    transport = RecordedTransport(facts=CLEAN_FACTS)
    provider = aws.provider(config, transport=transport)
    plan = plan_rotate(
        provider, aws.stack, config, only_if_needed=True, state_dir=tmp_path, now=later
    )
    _assert_read_only(provider, transport)
    assert sorted(plan.summary["selected"]) == new
    for why in plan.summary["selected"].values():
        assert why.startswith(PENDING_REASON)
        assert why.endswith(f"(facts from run {result.run_id} 10m ago)")

    audit_stack(
        aws.provider(config),
        aws.stack,
        config,
        state_dir=tmp_path,
        transport=RecordedTransport(facts=CLEAN_FACTS),
        now=later - 60,
    )
    provider = aws.provider(config, transport=transport)
    plan = plan_rotate(
        provider, aws.stack, config, only_if_needed=True, state_dir=tmp_path, now=later
    )
    _assert_read_only(provider, transport)
    assert plan.steps == [] and plan.summary["selected"] == {}
    assert plan.summary["not_needed"] == dict.fromkeys(
        new, "passes hygiene (facts from audit 1m ago)"
    )


# --- through the CLI, as an operator runs it: a subprocess against moto over HTTP ------------


def _cli(
    world: AwsWorld, tmp_path: Path, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "changeover.toml"
    if not cfg.exists():
        dumped = _stack(world).model_dump(mode="json", exclude_none=True)
        cfg.write_text(stack_toml(world.stack, dumped))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "--config",
            str(cfg),
            "--state-dir",
            str(tmp_path / "state"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )


def _plan_json(world: AwsWorld, tmp_path: Path, env: dict[str, str], *args: str) -> dict[str, Any]:
    proc = _cli(world, tmp_path, env, "--output", "json", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out: dict[str, Any] = json.loads(proc.stdout)
    calls = out["api_calls"]
    assert calls.get("DescribeInstances", 0) >= 1
    assert [op for op in calls if is_mutating(op)] == [], calls
    assert "SendCommand" not in calls and "GetCommandInvocation" not in calls
    return out


def test_cli_plan_rotate_only_if_needed_is_read_only(
    aws_server: AwsWorld, tmp_path: Path, aws_env_vars: dict[str, str]
) -> None:
    """`changeover plan rotate STACK --only-if-needed --output json` (and `rotate
    --only-if-needed --dry-run`) with hygiene on: no facts -> every server needs
    verification; after an audit -> the pending server is selected, with the facts' age.
    Every call is a read, and no SSM command is sent."""
    config = _stack(aws_server)
    made = aws_server.bootstrap(aws_server.provider(config), config)
    stale, clean = made["web"]
    stack = aws_server.stack
    for args in (
        ["plan", "rotate", stack, "--only-if-needed"],
        ["rotate", stack, "--only-if-needed", "--dry-run"],
    ):
        plan = _plan_json(aws_server, tmp_path, aws_env_vars, *args)["plan"]
        assert plan["params"]["live"] is False
        assert plan["steps"] == [] and plan["summary"]["selected"] == {}
        unverified = plan["summary"]["needs_verification"]
        assert sorted(unverified) == sorted(made["web"])
        assert all(why.startswith("needs verification") for why in unverified.values())
    text = _cli(aws_server, tmp_path, aws_env_vars, "plan", "rotate", stack, "--only-if-needed")
    assert text.returncode == 0, text.stderr[-2000:]
    assert "2 server(s) need verification" in text.stdout
    assert "nothing to do on the recorded facts" in text.stdout

    audit_stack(
        aws_server.provider(config),
        stack,
        config,
        state_dir=tmp_path / "state",
        transport=PerServerTransport(by_server={stale: PENDING_FACTS}),
        now=time.time() - TWO_HOURS,
    )
    out = _plan_json(
        aws_server, tmp_path, aws_env_vars, "plan", "rotate", stack, "--only-if-needed"
    )
    summary = out["plan"]["summary"]
    assert list(summary["selected"]) == [stale]
    assert summary["selected"][stale].startswith(PENDING_REASON)
    assert summary["selected"][stale].endswith("(facts from audit 2h ago)")
    assert summary["not_needed"] == {clean: "passes hygiene (facts from audit 2h ago)"}
    assert summary["needs_verification"] == {}
    assert [s["name"] for s in out["plan"]["steps"]][:4] == [
        "CheckStopConditions",
        "CreateServers",
        "WaitRunning",
        "VerifyServers",
    ]
    text = _cli(aws_server, tmp_path, aws_env_vars, "plan", "rotate", stack, "--only-if-needed")
    assert text.returncode == 0 and "(facts from audit 2h ago)" in text.stdout
