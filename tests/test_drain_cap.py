"""Drain caps: a drain that outlives `drain_timeout` ends as the stack chose,
`on_drain_timeout = "fail"` (the default: the run rolls back, naming what was still in
flight) or `"proceed"` (the run goes on and records what it cut off); and while a drain
waits, `changeover status RUN` says on what.

End to end on the local cloud: one web server behind the address proxy, and a write held
in flight through it for seconds (the db's `write_delay` fault), so the old web server
has a request in flight when `rotate` drains it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from orchestrator.rehearse import World
from providers.local.http import HttpError, request
from tests.conftest import FAST
from tests.invariants import journal_steps

ONE_WEB = {"db": {"count": 1, "data": True}, "web": {"count": 1}}


def _world(make_world: Callable[..., World], **defaults: Any) -> World:
    return make_world(roles=ONE_WEB, defaults={**FAST, **defaults})


def _inflight(world: World) -> dict[str, int]:
    info = world.cloud.address(world.stack, world.config.primary_address)
    assert info is not None
    stats = request(info.control_port, "GET", "/stats", token=world.cloud.control_token)[1]
    return {k: int(v) for k, v in stats.get("inflight", {}).items() if int(v) > 0}


@contextmanager
def held_write(world: World, seconds: float) -> Iterator[str]:
    """A write through the address that the db holds `seconds` before committing: the
    web server it went to has it in flight meanwhile. Yields that server's id."""
    db = world.data_server()
    token = world.cloud.control_token
    request(world.db_port(db), "POST", "/admin/fault", {"write_delay": seconds}, token=token)
    answers: list[int] = []

    def write() -> None:
        try:
            status = request(
                world.address_port,
                "POST",
                "/items",
                {"payload": "held"},
                timeout=seconds + 30,
                ok=tuple(range(100, 600)),
            )[0]
        except HttpError:
            status = 0  # the server went away under it
        answers.append(status)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    try:
        for _ in range(100):  # bounded: 10 s
            if busy := _inflight(world):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the held write never showed in flight")
        yield next(iter(busy))
    finally:
        thread.join(timeout=seconds + 35)
        assert not thread.is_alive(), "the held write never ended"


def test_drain_timeout_fails_by_default_and_rolls_back(make_world: Callable[..., World]) -> None:
    """on_drain_timeout unset ("fail"), drain_timeout 2 s, a request held for 12 s: the
    drain fails naming the server and its request in flight, the run rolls back (exit 1)
    and the old server serves as before."""
    world = _world(make_world, drain_timeout=2.0)
    before = world.members()
    with held_write(world, 12.0) as busy:
        assert busy == before[0]
        t0 = time.monotonic()
        code, out = world.cli_json("rotate", "demo", "--yes")
        elapsed = time.monotonic() - t0
    assert code == 1, out["_stderr"]
    assert out["outcome"] == "rolled_back"
    assert (
        f"did not drain within drain_timeout 2 s: {busy}: 1 request(s) in flight" in out["message"]
    )
    assert 'on_drain_timeout = "proceed"' in out["message"]  # what to do about it
    assert elapsed < 12.0  # it gave up at the cap, not when the request ended
    assert world.members() == before
    assert busy in world.live_servers()
    steps = journal_steps(world, out["run_id"])[1]
    drain = next(s for s in steps if s["key"] == "DrainServers#1")
    assert drain["state"] == "failed" and drain["outputs"].get("draining") is None


def test_drain_timeout_proceed_goes_on_and_records_what_was_cut(
    make_world: Callable[..., World],
) -> None:
    """on_drain_timeout = "proceed": the run goes on at the cap (exit 0), logs
    drain.timed_out and records the request it cut off in the step's outputs; the old
    server is replaced."""
    world = _world(make_world, drain_timeout=2.0, on_drain_timeout="proceed")
    with held_write(world, 12.0) as busy:
        code, out = world.cli_json("--log-format", "json", "rotate", "demo", "--yes")
    assert code == 0, out["_stderr"]
    assert out["servers"]["destroyed"] == [busy]
    assert busy not in world.live_servers() and busy not in world.members()
    events = [json.loads(ln) for ln in out["_stderr"].splitlines() if ln.startswith("{")]
    timed_out = [e for e in events if e.get("event") == "drain.timed_out"]
    assert timed_out and timed_out[0]["in_flight"] == {busy: 1}
    assert timed_out[0]["on_drain_timeout"] == "proceed"
    outputs = next(
        s["outputs"] for s in journal_steps(world, out["run_id"])[1] if s["key"] == "DrainServers#1"
    )
    assert outputs["drain_timed_out"] == {busy: 1}


def test_status_shows_what_a_drain_waits_on(make_world: Callable[..., World]) -> None:
    """While rotate drains a server with a request in flight, `status RUN` (text and
    JSON) says which server, how many requests, for how long and the timeout; once the
    request ends the run finishes (exit 0) and status shows no wait."""
    world = _world(make_world, drain_timeout=60.0)
    cmd, env = _command(world, "rotate", "demo", "--yes")
    with held_write(world, 8.0) as busy:
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            waiting, text = _poll_waiting(world)
            stdout, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    assert len(waiting) == 1
    line = waiting[0]
    assert line.startswith(f"DrainServers#1: draining {busy}: 1 request(s) in flight for ")
    assert line.endswith(" s (timeout 60 s)")
    assert f"waiting: {line.split(' for ')[0]}" in text
    run_id = json.loads(stdout.strip().splitlines()[-1])["run_id"]
    code, after = world.cli_json("status", run_id)
    assert code == 0 and "waiting_on" not in after


def _command(world: World, *args: str) -> tuple[list[str], dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHANGEOVER_")}
    base = [sys.executable, "-m", "orchestrator", "--config", str(world.config_file)]
    return [*base, "--state-dir", str(world.state_dir), "--output", "json", *args], env


def _poll_waiting(world: World) -> tuple[list[str], str]:
    """`status` of the latest run until it says what it waits on (bounded: 30 s)."""
    for _ in range(150):
        code, listing = world.cli_json("status")
        runs = listing.get("runs") or []
        if code == 0 and runs and runs[0]["status"] == "running":
            code, data = world.cli_json("status", runs[0]["id"])
            if data.get("waiting_on"):
                text = world.cli("status", runs[0]["id"]).stdout
                return list(data["waiting_on"]), text
        time.sleep(0.2)
    raise AssertionError("status never showed what the drain waits on")
