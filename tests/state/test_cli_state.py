"""`state` on the command line: `state init`, and a bad `state` refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3

from tests.state.conftest import REGION


def changeover(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CHANGEOVER_"))}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**base, **(env or {})},
        cwd=cwd,
    )


def test_state_init_on_sqlite_says_where_and_that_nothing_is_needed(tmp_path: Path) -> None:
    """The default store needs no set-up: `state init` names the file and exits 0."""
    state = tmp_path / "state"
    proc = changeover("--state-dir", str(state), "--output", "json", "state", "init", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["backend"] == "sqlite" and out["path"] == str(state / "changeover.db")
    assert "nothing to create" in out["message"]


def test_a_bad_state_url_is_one_line_exit_2_and_touches_nothing(tmp_path: Path) -> None:
    """From the environment: the line names CHANGEOVER_STATE and `state`, never the
    value; from the file: the file and `state`. The state dir is never created."""
    state = tmp_path / "state"
    secret = "s3cr3t-value"
    for value, problem in (
        (f"postgres://u:{secret}@db/x", "not a state store URL"),
        (f"dynamodb://t{secret}?region=mars-1", "region: not an AWS region name"),
        (f"dynamodb://ab?region={REGION}", "table name must be 3-255"),
        (f"dynamodb://tbl-{secret}?password={secret}", "unknown option 'password'"),
    ):
        proc = changeover(
            "--state-dir", str(state), "status", env={"CHANGEOVER_STATE": value}, cwd=tmp_path
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith(
            "error: config error in environment variable CHANGEOVER_STATE: state: "
        )
        assert problem in proc.stderr and secret not in proc.stderr
    config = tmp_path / "changeover.toml"
    config.write_text('state = "dynamodb://"\n')
    proc = changeover("--config", str(config), "--state-dir", str(state), "stacks")
    assert proc.returncode == 2
    assert proc.stderr == (
        f"error: config error in {config}: state: the DynamoDB table name must be 3-255 "
        "letters, digits, '_', '-' or '.'\n"
    )
    assert not state.exists()


def test_state_init_refuses_a_table_with_another_key_schema(
    moto_server: str, tmp_path: Path, aws_credentials: None
) -> None:
    """An existing table that is not ours: exit 2, one line naming its key schema."""
    client = boto3.client("dynamodb", region_name=REGION, endpoint_url=moto_server)
    client.create_table(
        TableName="taken-table",
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ENDPOINT_URL": moto_server,
        "CHANGEOVER_STATE": f"dynamodb://taken-table?region={REGION}",
    }
    proc = changeover("--state-dir", str(tmp_path / "s"), "state", "init", env=env, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == (
        "error: state table taken-table exists with another key schema (id HASH); changeover "
        "needs pk (string, HASH) and sk (string, RANGE): name another table in `state`\n"
    )
    made = changeover(
        "--state-dir",
        str(tmp_path / "s"),
        "--output",
        "json",
        "state",
        "init",
        env={**env, "CHANGEOVER_STATE": f"dynamodb://changeover-state?region={REGION}"},
        cwd=tmp_path,
    )
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["created"] is True
    assert client.describe_table(TableName="changeover-state")["Table"]["TableStatus"] == "ACTIVE"
