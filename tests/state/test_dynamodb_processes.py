"""Real `changeover` processes sharing one DynamoDB table (moto's HTTP server): the lease
keeps two of them off one stack, and a run killed in one is finished by another that
has a different state dir. An AWS stack on the same moto server is what they change."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from moto.server import ThreadedMotoServer

from orchestrator.rehearse import stack_toml
from orchestrator.state import StateSpec
from orchestrator.state.dynamodb import DynamoStore
from tests.aws.world import AwsWorld

REGION = "us-east-1"
TIMEOUT = 300  # seconds any one changeover process may take


@pytest.fixture
def moto_url() -> Iterator[str]:
    """A fresh moto server on 127.0.0.1 (a free port) for this test, stopped after."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    _reset(url)  # moto's backends are process-global: start from an empty account
    try:
        yield url
    finally:
        with contextlib.suppress(OSError):
            _reset(url)
        server.stop()


def _reset(url: str) -> None:
    urllib.request.urlopen(
        urllib.request.Request(f"{url}/moto-api/reset", method="POST"), timeout=10
    ).close()


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """What a changeover process gets: fake credentials in boto3's chain, nothing else of
    ours. (This process uses the same chain for the world and for reading the table.)"""
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_DYNAMODB", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    creds = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
    }
    for k, v in creds.items():
        monkeypatch.setenv(k, v)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CHANGEOVER_"))}
    return {**base, **creds}


def config_file(world: AwsWorld, path: Path, state: str | None = None, **kw: Any) -> Path:
    """The stack's TOML, with `state = ...` at its root when given."""
    cfg = world.config(**kw).model_dump(mode="json", exclude_none=True)
    head = f"state = {json.dumps(state)}\n" if state else ""
    path.write_text(head + stack_toml(world.stack, cfg))
    return path


def argv(cfg: Path, state_dir: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "orchestrator",
        "--config",
        str(cfg),
        "--state-dir",
        str(state_dir),
        "--output",
        "json",
        *args,
    ]


def run(
    cfg: Path, state_dir: Path, env: dict[str, str], *args: str, **extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv(cfg, state_dir, *args),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        env={**env, **extra},
    )


def runs_of(world: AwsWorld) -> dict[str, int]:
    """Live instances of the stack, counted by the run that created them."""
    out: dict[str, int] = {}
    for inst in world.instances().values():
        run_id = inst["tags"]["changeover:run"]
        out[run_id] = out.get(run_id, 0) + 1
    return out


def test_two_processes_one_stack_exactly_one_proceeds(
    moto_url: str, env: dict[str, str], tmp_path: Path
) -> None:
    """Two `changeover rebuild` processes, each with its own state dir, start at once on
    one stack with state on one DynamoDB table: one runs it, the other exits 4 having
    created nothing; the table then holds that one run, finished, and no lease."""
    world = AwsWorld(endpoint_url=moto_url)
    table = f"changeover-{uuid.uuid4().hex[:8]}"
    state = f"dynamodb://{table}?region={REGION}&endpoint_url={moto_url}"
    cfg = config_file(world, tmp_path / "changeover.toml", state, db=False, bake=4.0)
    config = world.config(db=False, bake=4.0)
    world.bootstrap(world.provider(config), config)
    init = run(cfg, tmp_path / "init", env, "state", "init")
    assert init.returncode == 0, init.stderr[-2000:]
    assert json.loads(init.stdout)["created"] is True
    again = run(cfg, tmp_path / "init", env, "state", "init")
    assert again.returncode == 0 and json.loads(again.stdout)["created"] is False

    dirs = [tmp_path / "machine-a", tmp_path / "machine-b"]
    procs = [
        subprocess.Popen(
            argv(cfg, d, "rebuild", world.stack, "--yes"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for d in dirs
    ]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT)
            outs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    codes = sorted(code for code, _, _ in outs)
    assert codes == [0, 4], [(c, e[-1500:]) for c, _, e in outs]
    (_, won, _), (_, _, lost_err) = sorted(outs, key=lambda o: o[0])
    assert "is locked by run" in lost_err and lost_err.count("\n") == 1, lost_err
    result = json.loads(won)
    assert result["outcome"] == "succeeded"
    winner = result["run_id"]
    assert winner in lost_err, "the refusal names the run that holds the stack"
    assert runs_of(world) == {winner: 1}, "the loser created nothing"

    store = DynamoStore(StateSpec("dynamodb", table, REGION, moto_url))
    assert [(r.id, r.status) for r in store.runs(world.stack)] == [(winner, "succeeded")]
    assert store.unfinished(world.stack) == [] and store.holder(world.stack) is None
    assert all(s.state == "done" for s in store.steps(winner))
    for d in dirs:
        assert not (d / "changeover.db").exists(), "the journal is in DynamoDB only"


def test_a_run_killed_on_one_machine_is_resumed_from_another(
    moto_url: str, env: dict[str, str], tmp_path: Path
) -> None:
    """SIGKILL a rebuild mid-way in one process; a process with another state dir (the
    endpoint from AWS_ENDPOINT_URL, the table from CHANGEOVER_STATE) sees the run,
    resumes it to the end, and the journal agrees with the cloud."""
    world = AwsWorld(endpoint_url=moto_url)
    table = f"changeover-{uuid.uuid4().hex[:8]}"
    shared = {
        **env,
        "CHANGEOVER_STATE": f"dynamodb://{table}?region={REGION}",
        "AWS_ENDPOINT_URL": moto_url,
    }
    cfg = config_file(world, tmp_path / "changeover.toml", address="both")
    config = world.config(address="both")
    world.bootstrap(world.provider(config), config)
    first, second = tmp_path / "machine-a", tmp_path / "machine-b"
    missing = run(cfg, first, shared, "status")
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        f"error: state table {table} does not exist in {REGION}: run `changeover state init`"
    )
    assert run(cfg, first, shared, "state", "init").returncode == 0

    crashed = run(
        cfg, first, shared, "rebuild", world.stack, "--yes", CHANGEOVER_CRASH_AFTER_STEP="7"
    )
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    listing = run(cfg, second, shared, "status")
    assert listing.returncode == 0, listing.stderr[-2000:]
    (seen,) = json.loads(listing.stdout)["runs"]
    assert seen["status"] == "running"
    run_id = seen["id"]
    status = json.loads(run(cfg, second, shared, "status", run_id).stdout)
    assert status["next"].startswith("interrupted: `changeover resume")
    assert status["lock"]["run_id"] == run_id

    done = run(cfg, second, shared, "resume", run_id)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["outcome"] == "succeeded"

    store = DynamoStore(StateSpec("dynamodb", table, REGION, moto_url))
    rec = store.get_run(run_id)
    assert rec is not None and (rec.status, rec.outcome) == ("succeeded", "succeeded")
    steps = store.steps(run_id)
    assert [s.state for s in steps] == ["done"] * len(steps)
    assert len(steps) > 7
    kinds = [e.kind for e in store.events(run_id)]
    assert kinds[0] == "resumed" and kinds[-1] == "finished"
    assert store.holder(world.stack) is None and store.unfinished(world.stack) == []
    live = world.instances()
    assert runs_of(world) == {run_id: 3}, "no duplicate and no leftover instance"
    assert world.eip_holder() in live
    assert sorted(world.healthy_targets()) == sorted(
        i for i, v in live.items() if v["tags"]["changeover:role"] == "web"
    )
    report = run(cfg, second, shared, "report", run_id)
    assert report.returncode == 0 and json.loads(report.stdout)["run_id"] == run_id
    for d in (first, second):
        assert not (d / "changeover.db").exists(), "the journal is in DynamoDB only"
