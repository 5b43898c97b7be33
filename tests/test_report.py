"""`changeover report RUN_ID`: built from the journal alone, for every way a run ends."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from orchestrator.db import connect
from orchestrator.journal import Journal
from orchestrator.lock import LeaseLock
from orchestrator.rehearse import World
from orchestrator.report import build_report, exit_code_of, report_text


def _report(world: World, run_id: str) -> dict[str, Any]:
    code, data = world.cli_json("report", run_id)
    assert code == 0, data
    data.pop("_stderr")
    return data


def _last_run(world: World) -> str:
    conn = connect(world.state_dir)
    try:
        return str(conn.execute("SELECT id FROM runs ORDER BY created_at DESC").fetchone()[0])
    finally:
        conn.close()


def _kinds(report: dict[str, Any]) -> list[str]:
    return [m["kind"] for m in report["markers"]]


def test_killed_run_then_resumed(world: World) -> None:
    """A run killed after its cutover reports the kill and what to do; once resumed, the
    same report shows the kill, the resume, the cutover and every server's lane."""
    crashed = world.cli("rebuild", "demo", "--yes", env={"CHANGEOVER_CRASH_AFTER_STEP": "9"})
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    run_id = _last_run(world)
    mid = _report(world, run_id)
    assert mid["status"] == "running" and mid["outcome"] is None and mid["exit_code"] is None
    assert "kill" in _kinds(mid) and "cutover" in _kinds(mid)
    assert f"changeover resume {run_id}" in mid["next"]
    assert mid["api_calls"] == {}, "a killed process never wrote its call counts"

    resumed = world.cli("resume", run_id)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    done = _report(world, run_id)
    assert done["outcome"] == "succeeded" and done["exit_code"] == 0 and done["next"] == ""
    kinds = _kinds(done)
    assert kinds.index("kill") < kinds.index("resume")
    assert {"freeze", "cutover", "bake_end", "end"} <= set(kinds)
    lanes = {ln["id"]: ln for ln in done["servers"]}
    assert len(lanes) == 6  # 3 new, 3 old
    new = [ln for ln in lanes.values() if ln["side"] == "new"]
    old = [ln for ln in lanes.values() if ln["side"] == "old"]
    assert all(ln["segments"][-1]["state"] == "serving" and not ln["destroyed"] for ln in new)
    assert all(ln["destroyed"] for ln in old)
    assert {ln["role"] for ln in new} == {"db", "web"} == {ln["role"] for ln in old}
    # every new server's gate facts, with the versions it runs
    gate = {h["server"]: h for h in done["health"]}
    assert set(gate) == {ln["id"] for ln in new}
    assert all(h["passed"] and h["pending"] == 0 and h["versions"] for h in gate.values())
    # the resuming process made the calls of the retirement
    assert done["api_calls"]["destroy_servers"] == 1 and done["api_calls_total"] > 0

    text = world.cli("report", run_id)
    assert text.returncode == 0
    assert f"run {run_id}: rebuild demo -> SUCCEEDED (exit 0)" in text.stdout
    assert "* cutover" in text.stdout and "killed" in text.stdout


def test_rolled_back_at_the_health_gate(world: World) -> None:
    """A run that fails verification: the failing server, the rollback, the undos and
    the new servers destroyed; exit 1 and what to do next."""
    world.cloud.inject("server", times=1, role="web", health_fail=True)
    proc = world.cli("rebuild", "demo", "--yes")
    assert proc.returncode == 1, proc.stderr[-2000:]
    rep = _report(world, _last_run(world))
    assert rep["outcome"] == "rolled_back" and rep["exit_code"] == 1
    assert "old stack is serving" in rep["next"]
    assert "rollback" in _kinds(rep) and "cutover" not in _kinds(rep)
    new = [ln for ln in rep["servers"] if ln["side"] == "new"]
    assert len(new) == 3 and all(ln["destroyed"] for ln in new)
    assert any(seg["state"] == "failed" for ln in new for seg in ln["segments"])
    old = [ln for ln in rep["servers"] if ln["side"] == "old"]
    assert all(ln["segments"][-1]["state"] == "serving" for ln in old)
    undone = [s for s in rep["steps"] if s["undo"] == "done"]
    assert undone and all(s["undo_start"] is not None for s in undone)
    assert any(h["passed"] is False for h in rep["health"])


def test_dirty_run_says_what_to_do(world: World) -> None:
    """A destroy that fails past the point of no return: dirty, exit 3, what `status`
    says to do, and the resources as they are."""
    world.cloud.inject("fail_call", op="destroy_servers", times=1, error="fatal")
    proc = world.cli("rebuild", "demo", "--yes")
    assert proc.returncode == 3, proc.stderr[-2000:]
    rep = _report(world, _last_run(world))
    assert rep["outcome"] == "dirty" and rep["exit_code"] == 3
    # what `status` says: past the point of no return, resume finishes it
    assert f"changeover resume {rep['run_id']}" in rep["next"]
    assert "point of no return" in rep["next"]
    assert rep["resources"] and rep["resources"]["servers"]
    assert "cutover" in _kinds(rep)


def test_report_unknown_run_is_exit_2(tmp_path: Path) -> None:
    """An unknown run id is one line and exit 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "--state-dir", str(tmp_path), "report", "r0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and proc.stderr.strip() == "error: no run 'r0' in the journal"


def test_a_paused_outcome_is_reported(tmp_path: Path) -> None:
    """A `paused` campaign gets its exit code, marker and advice (the window's start)."""
    conn = connect(tmp_path)
    lock = LeaseLock(conn)
    journal = Journal(conn, lock)
    lease = lock.acquire("demo", "r1")
    plan = {"strategy": "rotate", "stack": "demo", "steps": [], "summary": {}}
    journal.create_run("r1", plan, lease)
    journal.event("r1", lease, "paused", step="EnterWindow#1", detail="2026-12-12T02:00:00+00:00")
    result = {"message": "paused", "next_window": "2026-12-12T02:00:00+00:00"}
    journal.set_status("r1", "paused", lease, outcome="paused", result=result)
    lock.release(lease)
    rep = build_report(conn, "r1")
    conn.close()
    assert rep["outcome"] == "paused" and rep["exit_code"] == exit_code_of("paused") == 0
    assert "`changeover rotate demo` continues it" in rep["next"]
    assert "2026-12-12T02:00:00+00:00" in rep["next"]
    assert [m["kind"] for m in rep["markers"]] == ["paused"]
    assert "PAUSED (exit 0)" in report_text(rep)
    json.dumps(rep)  # the JSON twin is plain data
