"""The command line contract: exit codes, one-line errors, JSON output, lazy imports."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.db import connect
from orchestrator.rehearse import World


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    return "\n".join(lines)


def test_help_imports_neither_boto3_nor_libcloud() -> None:
    """`changeover --help` stays light: heavy SDKs are imported lazily."""
    code = (
        "import sys\nsys.argv=['changeover','--help']\nfrom orchestrator.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy=[m for m in ('boto3','botocore','libcloud','pydantic','structlog')"
        " if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert "rebuild" in proc.stdout
    assert "HEAVY []" in proc.stdout


def test_malformed_config_is_one_line_exit_2(tmp_path: Path) -> None:
    """A TOML syntax error gets one line naming the file, exit 2."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("[stacks.web\naddress = 1\n")
    err = _one_line_error(run("--config", str(cfg), "--state-dir", str(tmp_path), "stacks"))
    assert err.startswith("error: config error in") and "not valid TOML" in err
    assert len(err.splitlines()) == 1


def test_wrong_config_key_is_named(tmp_path: Path) -> None:
    """An unknown or invalid key is named with its full path."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('[stacks.app]\naddress = "a"\n[stacks.app.roles.web]\ncount = 0\n')
    err = _one_line_error(run("--config", str(cfg), "--state-dir", str(tmp_path), "stacks"))
    assert "stacks.app.roles.web.count" in err and len(err.splitlines()) == 1
    cfg.write_text('[stacks.app]\naddress = "a"\nadress = "b"\n[stacks.app.roles.web]\n')
    err = _one_line_error(run("--config", str(cfg), "--state-dir", str(tmp_path), "stacks"))
    assert "stacks.app.adress: unknown key" in err


def test_unknown_stack_exit_2(tmp_path: Path) -> None:
    """An unknown stack name is refused before anything is touched."""
    err = _one_line_error(run("--state-dir", str(tmp_path), "rebuild", "nope", "--yes"))
    assert "unknown stack 'nope'" in err
    assert not (tmp_path / "local").exists(), "nothing may be touched"


@pytest.mark.parametrize(
    "args",
    [
        ["rotate", "demo", "--max-surge", "0", "--yes"],
        ["rebuild", "demo", "--bake", "-1", "--yes"],
        ["rotate", "demo", "--older-than", "soon", "--yes"],
        ["plan", "upgrade-everything", "demo"],
        ["--output", "yaml", "stacks"],
    ],
)
def test_bad_flag_value_exit_2(tmp_path: Path, args: list[str]) -> None:
    """A bad flag value is a usage error: exit 2, no traceback."""
    proc = run("--state-dir", str(tmp_path), *args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_config_file_exit_2(tmp_path: Path) -> None:
    """An explicit --config that does not exist is named."""
    err = _one_line_error(run("--config", str(tmp_path / "x.toml"), "stacks"))
    assert "x.toml" in err and "not found" in err


def test_mutating_command_needs_yes_off_a_terminal(world: World) -> None:
    """Without --yes and without a terminal, rebuild refuses (exit 2) and touches nothing."""
    mark = world.cloud.last_call_id()
    proc = world.cli("rebuild", "demo")
    assert proc.returncode == 2 and "--yes" in proc.stderr
    assert not [c for c in world.cloud.calls(mark) if c["mutating"]]


def test_plan_and_dry_run_make_no_mutating_call(world: World) -> None:
    """I8: plan and --dry-run read the stack but make no mutating provider call."""
    mark = world.cloud.last_call_id()
    for args in (
        ["plan", "rebuild", "demo"],
        ["plan", "rotate", "demo"],
        ["rebuild", "demo", "--dry-run"],
        ["rotate", "demo", "--dry-run", "--yes"],
    ):
        proc = world.cli(*args)
        assert proc.returncode == 0, proc.stderr
        assert "CreateServers" in proc.stdout
    calls = world.cloud.calls(mark)
    assert calls, "plan must read the provider"
    assert [c["op"] for c in calls if c["mutating"]] == []


def test_json_output_of_a_rebuild(world: World) -> None:
    """--output json prints one object with the contract's fields; logs stay on stderr."""
    code, out = world.cli_json("rebuild", "demo", "--yes")
    assert code == 0, out["_stderr"]
    assert out["outcome"] == "succeeded" and out["strategy"] == "rebuild"
    assert out["generation"] == {"before": 1, "after": 2}
    assert out["address"]["before"] != out["address"]["after"]
    assert len(out["servers"]["created"]) == 3 and len(out["servers"]["destroyed"]) == 3
    assert set(out["timings"]) >= {"RepointAddress", "Bake", "RetireServers"}
    assert out["api_calls"]["set_members"] == 1
    status = world.cli("--output", "json", "status", out["run_id"])
    assert json.loads(status.stdout)["status"] == "succeeded"


def test_concurrent_rebuilds_one_runs_other_exits_4(world: World) -> None:
    """I5: two rebuilds at once: exactly one runs, the other exits 4 naming the holder."""
    cmd = [
        sys.executable,
        "-m",
        "orchestrator",
        "--config",
        str(world.config_file),
        "--state-dir",
        str(world.state_dir),
        "--output",
        "json",
        "rebuild",
        "demo",
        "--yes",
        "--bake",
        "2",
    ]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _running_runs(world):
            time.sleep(0.05)
        second = world.cli("--output", "json", "rebuild", "demo", "--yes")
        out, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    holder = json.loads(out)["run_id"]
    assert first.returncode == 0
    assert second.returncode == 4, second.stderr
    assert f"locked by run {holder}" in second.stderr


def _running_runs(world: World) -> list[str]:
    if not (world.state_dir / "changeover.db").exists():
        return []
    conn = connect(world.state_dir)
    try:
        return [r[0] for r in conn.execute("SELECT id FROM runs WHERE status='running'")]
    finally:
        conn.close()


def test_unknown_run_exit_2(tmp_path: Path) -> None:
    """resume, rollback and status of a run that does not exist exit 2."""
    for verb in ("resume", "rollback", "status"):
        err = _one_line_error(run("--state-dir", str(tmp_path), verb, "r-nope"))
        assert "no run 'r-nope'" in err


def test_unlock_requires_force(world: World) -> None:
    """unlock without --force refuses; with it, reports what it broke."""
    assert world.cli("unlock", "demo").returncode == 2
    proc = world.cli("unlock", "demo", "--force")
    assert proc.returncode == 0 and "was not locked" in proc.stdout


def test_local_status_and_stacks(world: World) -> None:
    """`local status` lists live processes; `stacks` shows generation and holder."""
    assert world.cli("local", "status").stdout.count("pid=") == 4
    out = world.cli("--output", "json", "stacks").stdout
    demo = json.loads(out)["stacks"][0]
    assert demo["generation"] == 1 and sorted(demo["holder"]) == sorted(world.members())
