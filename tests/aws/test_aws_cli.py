"""changeover as an operator runs it against AWS: a subprocess, moto over HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.rehearse import stack_toml
from providers.aws import is_mutating
from tests.aws.world import AwsWorld


def _config_file(world: AwsWorld, tmp_path: Path, **kw: Any) -> Path:
    cfg = world.config(**kw).model_dump(mode="json", exclude_none=True)
    path = tmp_path / "changeover.toml"
    path.write_text(stack_toml(world.stack, cfg))
    return path


def _cli(
    cfg: Path, state: Path, env: dict[str, str], *args: str, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "--config",
            str(cfg),
            "--state-dir",
            str(state),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**env, **(extra_env or {})},
    )


@pytest.mark.parametrize("step", [2, 7, 9])
def test_sigkill_mid_rebuild_then_resume(
    aws_server: AwsWorld, tmp_path: Path, aws_env_vars: dict[str, str], step: int
) -> None:
    """SIGKILL in the middle of a rebuild, then resume: no duplicate instances, and the
    run completes with the EIP and the target group on the new generation."""
    cfg = _config_file(aws_server, tmp_path, address="both")
    config = aws_server.config(address="both")
    aws_server.bootstrap(aws_server.provider(config), config)
    state = tmp_path / "state"
    crashed = _cli(
        cfg,
        state,
        aws_env_vars,
        "rebuild",
        aws_server.stack,
        "--yes",
        extra_env={"CHANGEOVER_CRASH_AFTER_STEP": str(step)},
    )
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    runs = json.loads(_cli(cfg, state, aws_env_vars, "--output", "json", "status").stdout)
    run_id = runs["runs"][0]["id"]
    done = _cli(cfg, state, aws_env_vars, "--output", "json", "resume", run_id)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["outcome"] == "succeeded"
    live = aws_server.instances()
    assert len(live) == 3, "duplicate or leftover instances"
    assert {v["tags"]["changeover:run"] for v in live.values()} == {run_id}
    all_of_run = [
        i
        for r in aws_server.ec2.describe_instances(
            Filters=[{"Name": "tag:changeover:run", "Values": [run_id]}]
        )["Reservations"]
        for i in r["Instances"]
    ]
    assert len(all_of_run) == 3, "a resumed step launched twice"
    assert aws_server.eip_holder() in live
    assert sorted(aws_server.healthy_targets()) == sorted(
        i for i, v in live.items() if v["tags"]["changeover:role"] == "web"
    )


def test_plan_and_dry_run_make_zero_mutating_calls(
    aws_server: AwsWorld, tmp_path: Path, aws_env_vars: dict[str, str]
) -> None:
    """I8 on AWS: plan and --dry-run only describe; the JSON counts every call."""
    cfg = _config_file(aws_server, tmp_path, address="tg", web=3)
    aws_server.bootstrap(
        aws_server.provider(aws_server.config(address="tg", web=3)),
        aws_server.config(address="tg", web=3),
    )
    state = tmp_path / "state"
    for args in (
        ["plan", "rebuild", aws_server.stack],
        ["plan", "rotate", aws_server.stack],
        ["rebuild", aws_server.stack, "--dry-run"],
    ):
        proc = _cli(cfg, state, aws_env_vars, "--output", "json", *args)
        assert proc.returncode == 0, proc.stderr[-2000:]
        calls = json.loads(proc.stdout)["api_calls"]
        assert calls.get("DescribeInstances", 0) >= 1
        assert [op for op in calls if is_mutating(op)] == []


def test_credentials_never_reach_logs_or_journal(
    aws_server: AwsWorld, tmp_path: Path, aws_env_vars: dict[str, str]
) -> None:
    """I9: the secret key from the environment appears in no output and no state file."""
    cfg = _config_file(aws_server, tmp_path, db=False)
    aws_server.bootstrap(
        aws_server.provider(aws_server.config(db=False)), aws_server.config(db=False)
    )
    state = tmp_path / "state"
    secret = "s3cr3t-NEVER-LOG-ME"
    env = {**aws_env_vars, "AWS_SECRET_ACCESS_KEY": secret}
    proc = _cli(cfg, state, env, "--log-format", "json", "-v", "rebuild", aws_server.stack, "--yes")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert secret not in proc.stdout + proc.stderr
    for f in state.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
