"""Checks of the guarantees, read from the address, the process table and the journals."""

from __future__ import annotations

import json
from typing import Any

from orchestrator.db import connect
from orchestrator.rehearse import World
from providers.local.provider import VERIFY_PASSED


def journal_steps(world: World, run_id: str | None = None) -> tuple[str, list[dict[str, Any]]]:
    conn = connect(world.state_dir)
    try:
        if run_id is None:
            run_id = conn.execute(
                "SELECT id FROM runs ORDER BY created_at DESC LIMIT 1"
            ).fetchone()[0]
        rows = conn.execute("SELECT * FROM steps WHERE run_id=? ORDER BY idx", (run_id,)).fetchall()
        steps = [dict(r) for r in rows]
    finally:
        conn.close()
    for s in steps:
        s["outputs"] = json.loads(s["outputs_json"]) if s["outputs_json"] else {}
    assert run_id is not None
    return run_id, steps


def run_status(world: World, run_id: str) -> str:
    conn = connect(world.state_dir)
    try:
        return str(conn.execute("SELECT status FROM runs WHERE id=?", (run_id,)).fetchone()[0])
    finally:
        conn.close()


def check_call_order(world: World, initial_members: list[str], since: int = 0) -> None:
    """I1 and I2 from the provider call journal, replayed in order.

    I1: every server put behind the address passed verification earlier (a gate that was
    asked and failed does not count), or was serving already.
    I2: no server is destroyed while the address routes to it.
    `since`: replay only the calls after that call-journal id (`initial_members` are the
    members at that point).
    """
    members = set(initial_members)
    verified = set(initial_members)
    for call in world.cloud.calls(since):
        op, detail = call["op"], call["detail"] or ""
        if op == VERIFY_PASSED:
            verified.add(detail)
        elif op == "set_members":
            ids = [i for i in detail.split(":", 1)[1].split(",") if i]
            unverified = set(ids) - verified
            assert not unverified, f"I1: address pointed at unverified {unverified}"
            members = set(ids)
        elif op == "destroy_servers":
            ids = set(detail.split(":", 1)[1].split(","))
            assert not ids & members, f"I2: destroyed serving servers {ids & members}"


def check_serving_only(world: World, run_id: str) -> None:
    """I4: every server the run created is either serving (or the serving db) or gone."""
    live = world.live_servers()
    members = set(world.members())
    data = world.data_server() if world.config.data_role else None
    for sid, s in live.items():
        if s["run"] == run_id:
            assert sid in members or sid == data, (
                f"I4: {sid} of the run is neither serving nor gone"
            )
    leftovers = set(live) - members - {data}
    assert not leftovers, f"servers alive but not serving: {leftovers}"
