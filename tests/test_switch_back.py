"""Switching writes back to the old db loses no acknowledged write (issue 10, item 3).

After the cutover the new web servers write straight to the new db. When a rollback
switches writes back, a write still in flight on the new db must end up on the old one:
``data_switch_back`` holds both sides, waits for in-flight writes, copies back, checks,
and leaves the new db forwarding to the old one.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from orchestrator.errors import DataMismatch
from orchestrator.rehearse import World
from providers.local.http import request
from providers.local.provider import LocalProvider

Answer = tuple[int, dict[str, Any]]


def _post(port: int, payload: str) -> Answer:
    """A write straight to a db, as a web server sends it; no retry."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/db/items", body=json.dumps({"payload": payload}))
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _in_thread(fn: Callable[[], Answer]) -> tuple[threading.Thread, list[Answer]]:
    out: list[Answer] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


def _wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


class Switched:
    """A world whose writes were switched from its db (src) to a new one (dst)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.provider = LocalProvider(world.cloud)
        self.src = world.data_server()
        created = self.provider.create_servers(
            stack="demo",
            role="db",
            generation=2,
            run_id="switch-back-test",
            count=1,
            image=world.config.roles["db"].image,
            size=world.config.roles["db"].size,
            idempotency_key="switch-back-test/db",
            links={},
        )
        self.dst = created[0].id
        _wait_for(lambda: self.provider.describe_servers("demo", [self.dst])[0].port is not None)
        self.acked: dict[int, str] = {}
        for i in range(5):
            self.write(self.src, f"before-{i}")
        p, s, d = self.provider, self.src, self.dst
        p.data_copy_live("demo", s, d)
        p.data_freeze("demo", s)
        p.data_final_sync("demo", s, d)
        p.data_switch("demo", s, d)
        self.write(self.src, "forwarded")  # lands on dst, through src
        self.write(self.dst, "direct")  # a new web server writes to dst itself

    def port(self, server_id: str) -> int:
        return self.world.db_port(server_id)

    def admin(self, server_id: str, path: str, body: Any = None) -> dict[str, Any]:
        token = self.world.cloud.control_token
        method = "GET" if body is None and path == "/admin/mode" else "POST"
        return request(self.port(server_id), method, path, body, token=token)[1]

    def write(self, server_id: str, payload: str) -> None:
        self.ack(_post(self.port(server_id), payload), payload)

    def ack(self, answer: Answer, payload: str) -> None:
        status, body = answer
        assert (status, body.get("payload")) == (201, payload), body
        assert body["id"] not in self.acked
        self.acked[body["id"]] = payload

    def lost(self) -> dict[int, str]:
        """Acknowledged writes missing from the old db."""
        rows = self.world.db_rows(self.src)
        return {i: p for i, p in self.acked.items() if rows.get(i) != p}


@pytest.fixture
def switched(world: World) -> Switched:
    return Switched(world)


def test_a_write_in_flight_on_the_new_db_is_on_the_old_db_after_switch_back(
    switched: Switched,
) -> None:
    """A write admitted by the new db but not yet committed while the switch back runs
    (held there by an injected latency) is acknowledged, and it is on the old db."""
    sw = switched
    sw.admin(sw.dst, "/admin/fault", {"write_delay": 1.0})
    thread, out = _in_thread(lambda: _post(sw.port(sw.dst), "in-flight"))
    _wait_for(lambda: sw.admin(sw.dst, "/admin/mode")["inflight"] == 1)
    result = sw.provider.data_switch_back("demo", sw.src, sw.dst)
    thread.join(30)
    sw.ack(out[0], "in-flight")
    assert sw.lost() == {}
    assert result["copied_back"] == 3  # forwarded, direct, in-flight
    assert sw.world.db_mode(sw.src) == "normal"


def test_a_late_write_to_the_new_db_lands_on_the_old_db(switched: Switched) -> None:
    """After the switch back, a write that still reaches the new db (a new web server
    that was not drained) is forwarded to the old db, not kept on a db to be destroyed;
    and the old db takes writes itself again."""
    sw = switched
    sw.provider.data_switch_back("demo", sw.src, sw.dst)
    mode = sw.admin(sw.dst, "/admin/mode")
    assert (mode["mode"], mode["forward_url"]) == ("forward", f"http://127.0.0.1:{sw.port(sw.src)}")
    sw.write(sw.dst, "late")
    sw.write(sw.src, "after")
    assert sw.lost() == {}
    assert sw.world.data_server() == sw.src


@pytest.mark.parametrize("killed_after", ["src held", "both held", "dst forwarding"])
def test_switch_back_finishes_after_a_kill_at_any_point(
    switched: Switched, killed_after: str
) -> None:
    """Re-run after a kill part-way (the modes it left behind), it completes: nothing
    lost, old db normal, new db forwarding to it; a write held meanwhile is released."""
    sw = switched
    src_url = f"http://127.0.0.1:{sw.port(sw.src)}"
    sw.admin(sw.src, "/admin/freeze", {})
    if killed_after != "src held":
        sw.admin(sw.dst, "/admin/freeze", {})
    if killed_after == "dst forwarding":
        rows = [[i, p] for i, p in sorted(sw.world.db_rows(sw.dst).items())]  # copied back
        token = sw.world.cloud.control_token
        request(sw.port(sw.src), "POST", "/db/load", {"rows": rows}, token=token)
        sw.admin(sw.dst, "/admin/forward", {"url": src_url})
    # A write arriving meanwhile is held (on src, or forwarded by dst and held on src).
    thread, out = _in_thread(lambda: _post(sw.port(sw.dst), "held"))
    time.sleep(0.2)
    started = time.monotonic()
    sw.provider.data_switch_back("demo", sw.src, sw.dst)
    assert time.monotonic() - started < 10  # no wait on a hold that cannot end
    thread.join(30)
    sw.ack(out[0], "held")
    assert sw.lost() == {}
    assert sw.world.db_mode(sw.src) == "normal"
    mode = sw.admin(sw.dst, "/admin/mode")
    assert (mode["mode"], mode["forward_url"]) == ("forward", src_url)
    again = sw.provider.data_switch_back("demo", sw.src, sw.dst)
    assert again["copied_back"] == 0 and again.get("already") == "switched back"


def test_a_diverged_copy_back_raises_and_keeps_writes_held(switched: Switched) -> None:
    """If the old db holds a row the new one contradicts, the check after the copy back
    fails: DataMismatch, and both dbs keep holding writes (none goes anywhere wrong)."""
    sw = switched
    new_id = max(sw.acked)
    token = sw.world.cloud.control_token
    request(sw.port(sw.src), "POST", "/db/load", {"rows": [[new_id, "conflict"]]}, token=token)
    with pytest.raises(DataMismatch, match="switch-back mismatch"):
        sw.provider.data_switch_back("demo", sw.src, sw.dst)
    assert sw.world.db_mode(sw.src) == "hold"
    assert sw.world.db_mode(sw.dst) == "hold"
