"""Redaction (I9): by key name at any depth, by pattern inside text, by registered value;
in log events, exception texts, the journal and the CLI's outputs; state dir 0700, its
database files 0600."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from orchestrator import log
from orchestrator.db import DB_NAME, connect, secure_state_dir
from orchestrator.journal import Journal
from orchestrator.lock import LeaseLock
from orchestrator.redact import (
    CREDENTIAL_ENV_VARS,
    MASK,
    clear_registered,
    is_secret_key,
    redact,
    redact_text,
    register_secret,
    register_secrets_from_env,
)

SECRET = "hunter2-Zq8xV"  # a value no pattern would guess from its look alone

SECRET_KEYS = [
    "password",
    "Password",
    "db_password",
    "passwd",
    "secret",
    "client_secret",
    "SecretAccessKey",
    "token",
    "auth_token",
    "session_token",
    "SessionToken",
    "DIGITALOCEAN_ACCESS_TOKEN",
    "api_key",
    "apikey",
    "x-api-key",
    "access_key",
    "AccessKeyId",
    "private_key",
    "ssh_private_key",
    "passphrase",
    "Authorization",
    "proxy-authorization",
    "credential",
    "credentials",
    "session",
    "cookie",
    "Set-Cookie",
    "auth",
]
PLAIN_KEYS = ["key", "idempotency_key", "author", "id", "stack", "passed", "members", "step"]


@pytest.fixture(autouse=True)
def _no_registered_values() -> Iterator[None]:
    clear_registered()
    register_secrets_from_env({})
    yield
    clear_registered()


# --- by key --------------------------------------------------------------------------------
@pytest.mark.parametrize("key", SECRET_KEYS)
def test_a_secret_looking_key_is_masked_at_any_depth(key: str) -> None:
    assert is_secret_key(key)
    event = {
        key: SECRET,
        "outer": {"inner": [{key: SECRET}, ({key: SECRET},)]},
        "deep": [[{"a": {"b": {key: SECRET}}}]],
    }
    out = redact(event)
    assert SECRET not in repr(out)
    assert out[key] == MASK
    assert out["outer"]["inner"][0][key] == MASK
    assert out["outer"]["inner"][1][0][key] == MASK
    assert out["deep"][0][0]["a"]["b"][key] == MASK


@pytest.mark.parametrize("key", PLAIN_KEYS)
def test_ordinary_keys_are_kept(key: str) -> None:
    assert not is_secret_key(key)
    assert redact({key: "CreateServers#1"}) == {key: "CreateServers#1"}


def test_a_whole_structure_under_a_secret_key_is_masked() -> None:
    out = redact({"credentials": {"user": "bob", "key": SECRET}, "cookie": [SECRET]})
    assert out == {"credentials": MASK, "cookie": MASK}


def test_the_fencing_token_is_a_counter_not_a_secret() -> None:
    out = redact({"token": 7, "lease": {"token": 8}, "session_token": 9, "password": 1234})
    assert out == {"token": 7, "lease": {"token": 8}, "session_token": MASK, "password": MASK}
    assert redact({"password": None, "secret": True}) == {"password": None, "secret": True}


def test_types_survive_and_the_input_is_not_changed() -> None:
    value = {"ids": ("a", "b"), "n": 3, "x": 1.5, "ok": False, "none": None, "password": "p4ss!"}
    out = redact(value)
    assert out["ids"] == ("a", "b") and out["n"] == 3 and out["x"] == 1.5
    assert value["password"] == "p4ss!"  # a copy: the caller's dict is untouched


# --- in text -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "kept"),
    [
        (f"password={SECRET} user=bob", "user=bob"),
        (f"login failed: passwd: {SECRET}", "login failed"),
        (f'{{"api_key": "{SECRET}", "n": 1}}', '"n": 1'),
        (f"{{'secret': '{SECRET}'}}", "secret"),
        (f"AWS_SESSION_TOKEN={SECRET}&region=eu", "region=eu"),
        (f"DIGITALOCEAN_ACCESS_TOKEN: {SECRET}", "DIGITALOCEAN_ACCESS_TOKEN"),
        (f"Authorization: Bearer {SECRET}", "Authorization: Bearer"),
        (f"proxy sent Bearer {SECRET} upstream", "upstream"),
        (f"Cookie: session={SECRET}", "Cookie"),
        (f"https://deploy:{SECRET}@git.example.com/repo.git", "git.example.com/repo.git"),
        (f"postgres://app:{SECRET}@10.0.0.5:5432/db", "10.0.0.5:5432/db"),
        (f'body {{\\"passphrase\\": \\"{SECRET}\\"}}', "passphrase"),
        (f"X-Amz-Security-Token={SECRET}&X-Amz-Signature={SECRET}", "X-Amz"),
        (
            f"AWS4-HMAC-SHA256 Credential={SECRET}/20260101/us-east-1/ec2/aws4_request, "
            f"SignedHeaders=host, Signature={SECRET}",
            "SignedHeaders=host",
        ),
        (
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAA\n"
            f"{SECRET}\n-----END OPENSSH PRIVATE KEY-----\nnext line",
            "next line",
        ),
        (f"-----BEGIN RSA PRIVATE KEY-----\n{SECRET}... (truncated", "BEGIN RSA PRIVATE KEY"),
    ],
)
def test_secrets_inside_text_are_masked(text: str, kept: str) -> None:
    out = redact_text(text)
    assert SECRET not in out, out
    assert kept in out, out
    assert MASK in out


def test_aws_access_key_ids_are_masked_anywhere() -> None:
    for key_id in ("AKIAIOSFODNN7EXAMPLE", "ASIAY34FZKBOKMUTVV7A"):
        out = redact_text(f"The access key {key_id} does not exist")
        assert key_id not in out and out == f"The access key {MASK} does not exist"


def test_text_without_secrets_is_unchanged() -> None:
    for text in (
        "server web-3 is stopped, not running",
        "lease lost: token 7 < 8; fencing token: 9",
        "verification failed: web-2: health check /health returned 503",
        "http://127.0.0.1:8080/admin/mode?x=1",
        "config error in c.toml: stacks.demo.libcloud.driver_args.api_key: unknown key",
        '{"password": null, "token": 5}',
        "",
    ):
        assert redact_text(text) == text


def test_registered_values_are_masked_whatever_surrounds_them() -> None:
    register_secret("zz-raw-credential-0042", "short")  # "short" is too short to register
    out = redact_text("cloud said: bad request for zz-raw-credential-0042xx; short")
    assert out == "cloud said: bad request for ***xx; short"


def test_values_of_every_credential_variable_are_registered() -> None:
    env = {name: f"canary-{name}-v4lue" for name in CREDENTIAL_ENV_VARS}
    assert register_secrets_from_env(env) == len(CREDENTIAL_ENV_VARS)
    text = " ".join(env.values())
    assert redact_text(text) == " ".join([MASK] * len(env))


def test_the_variable_list_covers_every_provider_credential() -> None:
    from providers.libcloud_provider import DRIVERS, GENERIC_CREDENTIALS

    read = {n for spec in DRIVERS.values() for _, names in spec.credentials for n in names}
    read |= {n for _, names in GENERIC_CREDENTIALS for n in names}
    read |= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}  # boto3
    assert read <= set(CREDENTIAL_ENV_VARS), read - set(CREDENTIAL_ENV_VARS)


def test_exceptions_become_their_redacted_message() -> None:
    exc = RuntimeError(f"HTTP 403 for https://u:{SECRET}@api.example.com, api_key={SECRET}")
    out = redact({"error": exc, "errors": [exc]}, stringify=True)
    assert SECRET not in repr(out) and "api.example.com" in out["error"]


def test_redaction_is_fast_enough_for_the_journal() -> None:
    """A step's outputs (a verify report of 20 servers) take well under a millisecond
    each to redact; measured, not asserted tightly (the machine is shared)."""
    outputs = {
        "passed": [f"web-{i}" for i in range(20)],
        "reports": {
            f"web-{i}": {"server_id": f"web-{i}", "passed": True, "reasons": [], "checks": 4}
            for i in range(20)
        },
    }
    n = 500
    start = time.perf_counter()
    for _ in range(n):
        redact(outputs)
    per_call = (time.perf_counter() - start) / n
    assert per_call < 0.005, f"{per_call * 1e6:.0f} us per call"


# --- in logs -------------------------------------------------------------------------------
@contextlib.contextmanager
def _json_logging() -> Iterator[None]:
    """changeover's structlog set-up (JSON on the current stderr); restored afterwards."""
    old_hook = sys.excepthook
    try:
        log.configure("json")
        yield
    finally:
        sys.excepthook = old_hook
        structlog.reset_defaults()
        for handler in [*logging.getLogger().handlers, logging.lastResort]:
            if handler is not None:
                for f in list(handler.filters):
                    if isinstance(f, log._RedactingFilter):
                        handler.removeFilter(f)


def test_log_events_are_redacted_nested_and_in_text(capsys: pytest.CaptureFixture[str]) -> None:
    with _json_logging():
        log.get_logger(run="r1").info(
            "step.failed",
            session_token=SECRET,
            auth_token=SECRET,
            request={
                "headers": {"Authorization": f"Bearer {SECRET}"},
                "body": {"password": SECRET},
            },
            error=f"libcloud:digital_ocean create_node: 401 token={SECRET}",
            token=12,
        )
    err = capsys.readouterr().err
    line = json.loads(err.strip().splitlines()[-1])
    assert SECRET not in err
    assert line["token"] == 12 and line["run"] == "r1" and line["event"] == "step.failed"
    assert line["request"]["body"]["password"] == MASK


def test_exception_text_in_a_log_event_is_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    with _json_logging():
        try:
            raise ValueError(f"driver said: passphrase={SECRET}")
        except ValueError:
            log.get_logger().exception("provider.error")
    err = capsys.readouterr().err
    assert SECRET not in err
    assert "ValueError" in json.loads(err.strip().splitlines()[-1])["exception"]


def test_registered_values_are_masked_in_logs(capsys: pytest.CaptureFixture[str]) -> None:
    register_secrets_from_env({"LINODE_TOKEN": "canary-linode-abc123"})
    with _json_logging():
        log.get_logger().warning("odd", detail="the cloud echoed canary-linode-abc123 back")
    err = capsys.readouterr().err
    assert "odd" in err and "canary-linode-abc123" not in err


def test_library_logging_and_tracebacks_are_redacted(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with _json_logging():
        logging.getLogger("botocore.test").warning("signing with secret=%s", SECRET)
        try:
            raise RuntimeError(f"password={SECRET}")
        except RuntimeError as exc:
            sys.excepthook(RuntimeError, exc, exc.__traceback__)
    err = capsys.readouterr().err
    assert SECRET not in err and "RuntimeError: password=***" in err
    assert "signing with secret=***" in caplog.text and SECRET not in caplog.text


# --- in the journal ------------------------------------------------------------------------
def test_the_journal_stores_no_secret(tmp_path: Path) -> None:
    conn = connect(tmp_path / "state")
    lock = LeaseLock(conn)
    journal = Journal(conn, lock)
    lease = lock.acquire("demo", "run-1")
    plan: dict[str, Any] = {"strategy": "rebuild", "stack": "demo", "steps": [], "params": {}}
    plan["steps"] = [{"key": "CreateServers#1", "name": "CreateServers", "params": {}}]
    journal.create_run("run-1", plan, lease)
    journal.step_started("run-1", 0, lease)
    journal.step_done("run-1", 0, lease, {"created": ["web-1"], "api_key": SECRET})
    journal.step_failed("run-1", 0, lease, f"HTTP 401: Authorization: Bearer {SECRET}")
    journal.undo_state("run-1", 0, lease, "failed", f"https://u:{SECRET}@x/")
    journal.set_status(
        "run-1",
        "dirty",
        lease,
        result={"message": f"password={SECRET}", "nested": {"secret": SECRET}},
        error=f"token={SECRET}",
    )
    [step] = journal.steps("run-1")
    assert step.outputs == {"created": ["web-1"], "api_key": MASK}
    run = journal.get_run("run-1")
    assert run is not None and run.plan == plan
    conn.execute("PRAGMA wal_checkpoint(FULL)")
    conn.close()
    stored = b"".join(p.read_bytes() for p in (tmp_path / "state").iterdir() if p.is_file())
    assert SECRET.encode() not in stored
    assert b"web-1" in stored  # what was stored is there; only the secret is not


# --- permissions ---------------------------------------------------------------------------
def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_state_dir_is_0700_and_its_database_files_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)  # the usual umask, whatever the test runner's is
    try:
        state = tmp_path / "fresh" / "state"
        conn = connect(state)
        conn.execute("INSERT INTO fencing VALUES ('demo', 1)")
        assert _mode(state) == 0o700
        files = sorted(p.name for p in state.iterdir())
        assert {DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm"} <= set(files), files
        for p in state.iterdir():
            assert _mode(p) == 0o600, (p.name, oct(_mode(p)))
        conn.close()
    finally:
        os.umask(old)


def test_an_open_state_dir_and_database_are_tightened(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    connect(state).close()
    for suffix in ("", "-wal", "-shm"):
        path = state / f"{DB_NAME}{suffix}"
        if path.exists():
            path.chmod(0o644)
    state.chmod(0o755)
    conn = connect(state)
    conn.execute("INSERT INTO fencing VALUES ('demo', 1)")
    assert _mode(state) == 0o700
    for p in state.iterdir():
        assert _mode(p) == 0o600, (p.name, oct(_mode(p)))
    conn.close()
    assert secure_state_dir(state) == state and _mode(state) == 0o700


def test_the_local_cloud_makes_its_state_dir_0700(tmp_path: Path) -> None:
    from providers.local.cloud import LocalCloud

    old = os.umask(0o022)
    try:
        cloud = LocalCloud(tmp_path / "new-state")
        cloud.close()
    finally:
        os.umask(old)
    assert _mode(tmp_path / "new-state") == 0o700
