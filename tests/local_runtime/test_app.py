"""Tests for providers.local.app: simulated first boot, health, web -> db, write modes."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from providers.local.app import version_key
from providers.local.daemon import kill_pid

from .conftest import INDEX_PACKAGES, AppProc, KeepAliveClient, Runtime, http_json

Answer = tuple[int, dict[str, Any], dict[str, str]]


def _in_thread(fn: Callable[[], Answer]) -> tuple[threading.Thread, list[Answer]]:
    out: list[Answer] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


def _wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def _mode(db: AppProc) -> dict[str, Any]:
    status, body, _ = http_json(db.port, "GET", "/admin/mode", token=db.token)
    assert status == 200
    return body


def test_version_key_orders_debian_like_versions() -> None:
    """version_key compares digit runs numerically and sorts '~' before release."""
    ordered = ["1.0~rc1", "1.0", "1.0-1", "1.0.1", "1.2", "1.10", "6.1.76-1", "6.1.90-1"]
    assert sorted(reversed(ordered), key=version_key) == ordered
    assert version_key("3.0.13-1") > version_key("3.0.11-1")


def test_first_boot_upgrades_reboots_and_leaves_held_package_pending(runtime: Runtime) -> None:
    """First boot installs the latest versions, a held package stays pending, reboot clears."""
    app = runtime.start_app("srv-1", "db", faults={"hold_packages": ["openssl"]})
    status, facts, _ = http_json(app.port, "GET", "/facts")
    assert status == 200
    assert facts["installed"] == {
        "openssl": "3.0.11-1",
        "linux-image": "6.1.90-1",
        "nginx": "1.22.1-9",
    }
    assert facts["pending"] == [
        {"name": "openssl", "installed": "3.0.11-1", "latest": "3.0.13-1", "security": True}
    ]
    assert facts["reboot_required"] is False
    assert facts["reboot_required_pkgs"] == []
    assert facts["boot_count"] == 2
    assert facts["image"]["name"] == "debian-12-base"
    assert facts["booted_at"] <= time.time()
    on_disk = json.loads((app.root / "root/var/lib/changeover/packages.json").read_text())
    assert on_disk == facts["installed"]
    assert not (app.root / "root/var/run/reboot-required").exists()


def test_keep_reboot_required_fault_leaves_sentinel(runtime: Runtime) -> None:
    """With keep_reboot_required the sentinel and its package list survive boot."""
    app = runtime.start_app("srv-1", faults={"keep_reboot_required": True})
    _, facts, _ = http_json(app.port, "GET", "/facts")
    assert facts["reboot_required"] is True
    assert facts["reboot_required_pkgs"] == ["linux-image"]
    assert facts["boot_count"] == 1
    assert facts["pending"] == []
    assert (app.root / "root/var/run/reboot-required.pkgs").read_text() == "linux-image\n"


def test_facts_are_computed_at_request_time(runtime: Runtime) -> None:
    """A newer index, a touched sentinel and a manual upgrade show up in the next /facts."""
    app = runtime.start_app("srv-1")
    _, facts, _ = http_json(app.port, "GET", "/facts")
    assert facts["pending"] == []

    runtime.write_index(
        {**INDEX_PACKAGES, "nginx": {"version": "1.22.1-10", "security": False, "reboot": False}}
    )
    (app.root / "root/var/run/reboot-required").write_text("")
    _, facts, _ = http_json(app.port, "GET", "/facts")
    assert facts["pending"] == [
        {"name": "nginx", "installed": "1.22.1-9", "latest": "1.22.1-10", "security": False}
    ]
    assert facts["reboot_required"] is True

    status, _, _ = http_json(
        app.port,
        "POST",
        "/admin/set-package",
        {"name": "nginx", "version": "1.22.1-10"},
        token=runtime.token,
    )
    assert status == 200
    _, facts, _ = http_json(app.port, "GET", "/facts")
    assert facts["pending"] == []
    assert facts["installed"]["nginx"] == "1.22.1-10"
    on_disk = json.loads((app.root / "root/var/lib/changeover/packages.json").read_text())
    assert on_disk["nginx"] == "1.22.1-10"


def test_health_fail_fault_answers_503_and_can_be_toggled(runtime: Runtime) -> None:
    """health_fail from server.json gives 503; POST /admin/fault turns it off and on."""
    app = runtime.start_app("srv-1", faults={"health_fail": True})
    status, body, _ = http_json(app.port, "GET", "/health")
    assert (status, body["ok"], body["id"]) == (503, False, "srv-1")
    assert (
        http_json(app.port, "POST", "/admin/fault", {"health_fail": False}, token=runtime.token)[0]
        == 200
    )
    status, body, _ = http_json(app.port, "GET", "/health")
    assert status == 200
    assert body == {"ok": True, "id": "srv-1", "role": "web", "generation": 1}
    http_json(app.port, "POST", "/admin/fault", {"health_fail": True}, token=runtime.token)
    assert http_json(app.port, "GET", "/health")[0] == 503


def test_bad_requests_get_json_errors_and_keep_the_connection(runtime: Runtime) -> None:
    """Bad JSON is 400 and unknown paths 404, on a keep-alive connection that stays usable."""
    db = runtime.start_app("db-1", "db")
    client = KeepAliveClient(db.port)
    try:
        client.conn.request("POST", "/db/items", body=b"{not json")
        resp = client.conn.getresponse()
        assert resp.status == 400
        assert "error" in json.loads(resp.read())
        assert client.request("GET", "/nope")[0] == 404
        assert client.request("GET", "/items/1")[0] == 404  # a web route on a db
        assert client.request("POST", "/db/items", {"payload": 7})[0] == 400
        assert client.request("GET", "/db/dump?after=x")[0] == 400
        assert client.request("GET", "/health")[0] == 200
    finally:
        client.close()


def test_web_write_is_acknowledged_by_db_and_readable(runtime: Runtime) -> None:
    """POST /items on web returns 201 with the db's id; GET /items/<id> reads it back."""
    db = runtime.start_app("db-1", "db")
    web = runtime.start_app("web-1", "web", db_url=db.url)
    client = KeepAliveClient(web.port)
    try:
        ids = []
        for i in range(5):
            status, body, _ = client.request("POST", "/items", {"payload": f"p{i}"})
            assert status == 201
            assert body["payload"] == f"p{i}"
            assert body["served_by"] == "web-1"
            ids.append(body["id"])
        assert ids == [1, 2, 3, 4, 5]
        status, body, _ = client.request("GET", "/items/3")
        assert (status, body["id"], body["payload"]) == (200, 3, "p2")
        assert client.request("GET", "/items/99")[0] == 404
        assert http_json(db.port, "GET", "/db/items/5")[1] == {"id": 5, "payload": "p4"}
        assert client.request("GET", "/")[1] == {"id": "web-1", "role": "web", "generation": 1}
    finally:
        client.close()


def test_web_answers_502_when_db_is_gone(runtime: Runtime) -> None:
    """A write through web whose db is down is a 502, never a 201."""
    db = runtime.start_app("db-1", "db")
    web = runtime.start_app("web-1", "web", db_url=db.url)
    assert http_json(web.port, "POST", "/items", {"payload": "a"})[0] == 201
    kill_pid(db.pid)
    status, body, _ = http_json(web.port, "POST", "/items", {"payload": "b"})
    assert status == 502
    assert "db" in body["error"]


def test_freeze_holds_write_until_forward_then_it_lands_in_other_db(runtime: Runtime) -> None:
    """A write arriving during a freeze waits, then is forwarded to the new db on /forward."""
    old = runtime.start_app("db-old", "db")
    new = runtime.start_app("db-new", "db")
    web = runtime.start_app("web-1", "web", db_url=old.url)
    assert http_json(web.port, "POST", "/items", {"payload": "before"})[0] == 201
    http_json(new.port, "POST", "/db/load", {"rows": [[1, "before"]]}, token=runtime.token)

    status, frozen, _ = http_json(old.port, "POST", "/admin/freeze", token=runtime.token)
    assert (status, frozen["mode"], frozen["max_id"]) == (200, "hold", 1)
    thread, out = _in_thread(lambda: http_json(web.port, "POST", "/items", {"payload": "during"}))
    _wait_for(lambda: _mode(old)["held"] == 1)
    assert not out

    status, mode, _ = http_json(
        old.port, "POST", "/admin/forward", {"url": new.url}, token=runtime.token
    )
    assert (status, mode["mode"]) == (200, "forward")
    thread.join(10)
    status, body, _ = out[0]
    assert (status, body["id"], body["payload"]) == (201, 2, "during")
    assert http_json(new.port, "GET", "/db/items/2")[1]["payload"] == "during"
    assert http_json(old.port, "GET", "/db/summary")[1]["count"] == 1


def test_freeze_waits_for_inflight_writes(runtime: Runtime) -> None:
    """/admin/freeze returns only after writes already past the gate have finished."""
    old = runtime.start_app("db-old", "db")
    new = runtime.start_app("db-new", "db")
    # Make a write that stays in flight on `old`: forwarded to `new`, which holds it.
    http_json(old.port, "POST", "/admin/forward", {"url": new.url}, token=runtime.token)
    http_json(new.port, "POST", "/admin/freeze", token=runtime.token)
    write, write_out = _in_thread(
        lambda: http_json(old.port, "POST", "/db/items", {"payload": "x"})
    )
    _wait_for(lambda: _mode(old)["inflight"] == 1 and _mode(new)["held"] == 1)

    freeze, freeze_out = _in_thread(
        lambda: http_json(old.port, "POST", "/admin/freeze", token=runtime.token)
    )
    time.sleep(0.3)
    assert freeze_out == []  # still waiting for the in-flight write
    assert _mode(old)["mode"] == "hold"

    http_json(new.port, "POST", "/admin/unfreeze", token=runtime.token)
    write.join(10)
    freeze.join(10)
    assert write_out[0][0] == 201
    assert freeze_out[0][0] == 200
    assert freeze_out[0][1]["mode"] == "hold"
    assert _mode(old)["inflight"] == 0


def test_unfreeze_releases_held_writes_locally(runtime: Runtime) -> None:
    """Held writes are inserted locally when the db is unfrozen instead of forwarded."""
    db = runtime.start_app("db-1", "db")
    http_json(db.port, "POST", "/admin/freeze", token=runtime.token)
    threads = [
        _in_thread(partial(http_json, db.port, "POST", "/db/items", {"payload": f"h{i}"}))
        for i in range(3)
    ]
    _wait_for(lambda: _mode(db)["held"] == 3)
    assert http_json(db.port, "GET", "/db/summary")[1]["count"] == 0
    status, mode, _ = http_json(db.port, "POST", "/admin/unfreeze", token=runtime.token)
    assert (status, mode["mode"]) == (200, "normal")
    for thread, out in threads:
        thread.join(10)
        assert out[0][0] == 201
    assert http_json(db.port, "GET", "/db/summary")[1]["count"] == 3


def test_write_mode_survives_a_restart(runtime: Runtime) -> None:
    """A frozen db that restarts comes back frozen, with its rows."""
    db = runtime.start_app("db-1", "db")
    http_json(db.port, "POST", "/db/items", {"payload": "kept"})
    http_json(db.port, "POST", "/admin/freeze", token=runtime.token)
    kill_pid(db.pid)
    again = runtime.boot_app(db.root)
    assert _mode(again)["mode"] == "hold"
    assert http_json(again.port, "GET", "/db/items/1")[1]["payload"] == "kept"
    _, facts, _ = http_json(again.port, "GET", "/facts")
    assert facts["boot_count"] == 3  # first boot rebooted once; the restart is another boot


def test_dump_load_summary_copy_gives_equal_checksums(runtime: Runtime) -> None:
    """Copying rows page by page with dump/load yields the same count, max id and checksum."""
    src = runtime.start_app("db-src", "db")
    dst = runtime.start_app("db-dst", "db")
    client = KeepAliveClient(src.port)
    try:
        for i in range(25):
            assert client.request("POST", "/db/items", {"payload": f"row {i} é\n"})[0] == 201
    finally:
        client.close()

    cursor, pages = 0, 0
    while True:
        rows = http_json(src.port, "GET", f"/db/dump?after={cursor}&limit=10")[1]["rows"]
        if not rows:
            break
        status, loaded, _ = http_json(
            dst.port, "POST", "/db/load", {"rows": rows}, token=runtime.token
        )
        assert (status, loaded["loaded"]) == (200, len(rows))
        cursor, pages = rows[-1][0], pages + 1
    assert pages == 3

    src_sum = http_json(src.port, "GET", "/db/summary")[1]
    dst_sum = http_json(dst.port, "GET", "/db/summary")[1]
    assert src_sum == dst_sum
    assert (src_sum["count"], src_sum["max_id"]) == (25, 25)
    all_rows = http_json(src.port, "GET", "/db/dump")[1]["rows"]
    expected = hashlib.sha256("".join(f"{i}:{p}\n" for i, p in all_rows).encode()).hexdigest()
    assert src_sum["checksum"] == expected
    # Loading again changes nothing: INSERT OR IGNORE.
    assert (
        http_json(dst.port, "POST", "/db/load", {"rows": all_rows}, token=runtime.token)[1][
            "loaded"
        ]
        == 0
    )
