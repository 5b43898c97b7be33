"""The switch window as clients see it (issue 15).

- the load generator reports reads and writes apart;
- a member change of the address neither resets nor re-connects a client's established
  keep-alive connection, and concurrent changes are applied in order, each persisted
  before it serves;
- the db's summary, compared while writes are frozen, costs no pass over the rows.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from orchestrator.load import LoadResult, Sample
from tests.local_runtime.conftest import (
    KeepAliveClient,
    Runtime,
    http_json,
    runtime,  # noqa: F401  (the fixture, shared with tests/local_runtime)
)


def _sample(t: float, ms: float, kind: str) -> Sample:
    return Sample(
        t=t,
        latency=ms / 1000.0,
        ok=True,
        kind=kind,  # type: ignore[arg-type]
        status=200,
        backend="a",
        error=None,
    )


def test_latency_percentiles_apart_for_reads_and_writes() -> None:
    """`kind` keeps one kind of request; combined with a window it keeps both filters."""
    samples = [_sample(i * 0.01, 1.0, "read") for i in range(100)]
    samples += [_sample(i * 0.01, 50.0, "write") for i in range(100)]
    samples.append(_sample(0.5, 900.0, "write"))
    result = LoadResult(samples=samples, acked_writes={}, started=1000.0, ended=1001.0)

    reads = result.latency_percentiles(kind="read")
    writes = result.latency_percentiles(kind="write")
    assert (reads["count"], reads["p99"], reads["max"]) == (100, 1.0, 1.0)
    assert (writes["count"], writes["p50"], writes["max"]) == (101, 50.0, 900.0)
    both = result.latency_percentiles()
    assert both["count"] == 201

    in_window = result.latency_percentiles(window=(1000.5, 1000.5), kind="write")
    assert (in_window["count"], in_window["max"]) == (2, 900.0)
    assert result.latency_percentiles(window=(1000.5, 1000.5), kind="read")["count"] == 1


def test_member_change_keeps_client_keep_alive_connections(runtime: Runtime) -> None:  # noqa: F811
    """Clients' connections survive any number of member changes: the same socket carries
    every request, and each request after a change goes to a member of the new set."""
    a, b = runtime.start_app("web-a"), runtime.start_app("web-b")
    proxy = runtime.start_proxy()
    runtime.set_members(proxy, {"a": a})
    clients = [KeepAliveClient(proxy.port) for _ in range(3)]
    try:
        sockets = [(c.conn.sock, c.conn.sock.getsockname()) for c in clients]
        for members, expected in (
            ({"a": a, "b": b}, {"a", "b"}),
            ({"b": b}, {"b"}),
            ({"a": a}, {"a"}),
        ):
            runtime.set_members(proxy, members)
            seen = set()
            for _ in range(4):
                for client in clients:
                    status, _, headers = client.request("GET", "/")
                    assert status == 200
                    seen.add(headers["x-changeover-backend"])
            assert seen == expected
        # http.client re-connects silently when its socket was closed; it never did.
        assert [(c.conn.sock, c.conn.sock.getsockname()) for c in clients] == sockets
    finally:
        for client in clients:
            client.close()
    stats = http_json(proxy.control_port, "GET", "/stats", token=runtime.token)[1]
    assert stats["errors"] == 0


def test_concurrent_member_changes_apply_in_order_and_persist(runtime: Runtime) -> None:  # noqa: F811
    """Member changes persisted off the event loop still get one version each, and the
    file on disk is the state served."""
    app = runtime.start_app("web-a")
    proxy = runtime.start_proxy()
    versions: list[int] = []
    lock = threading.Lock()

    def change(i: int) -> None:
        body = {"members": [{"id": f"m{i}", "host": "127.0.0.1", "port": app.port}]}
        status, state, _ = http_json(
            proxy.control_port, "PUT", "/members", body, token=runtime.token
        )
        assert status == 200, state
        with lock:
            versions.append(state["version"])

    threads = [threading.Thread(target=change, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(versions) == list(range(1, 9))
    served = http_json(proxy.control_port, "GET", "/members", token=runtime.token)[1]
    persisted = json.loads((proxy.root / "members.json").read_text())
    assert persisted == served
    assert served["version"] == 8


def test_db_summary_kept_up_to_date_equals_a_full_pass(tmp_path: Path) -> None:
    """The db's summary is maintained as rows commit (it runs during the freeze); it is
    always what a full pass over the rows gives, whatever order rows arrive in."""
    import hashlib

    from providers.local.app import Database

    def full_pass(db: Database) -> dict[str, object]:
        rows = db.dump(0, -1)
        text = "".join(f"{i}:{p}\n" for i, p in rows)
        checksum = hashlib.sha256(text.encode()).hexdigest()
        return {"count": len(rows), "max_id": rows[-1][0] if rows else 0, "checksum": checksum}

    db = Database(tmp_path / "a.db")
    try:
        assert db.summary() == full_pass(db)
        for i in range(5):
            db.insert(f"row {i}")
        assert db.summary() == full_pass(db)
        assert db.load([(9, "nine"), (7, "seven")]) == 2  # past the end, unordered
        assert db.summary() == full_pass(db)
        assert db.load([(6, "six"), (7, "again")]) == 1  # below the end, and a duplicate
        assert db.summary() == full_pass(db)
        db.insert("after")
        assert db.summary() == full_pass(db)
        assert db.summary()["max_id"] == 10
    finally:
        db.close()
    reopened = Database(tmp_path / "a.db")
    try:
        assert reopened.summary() == full_pass(reopened)
    finally:
        reopened.close()
