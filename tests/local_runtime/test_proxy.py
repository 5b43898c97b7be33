"""Tests for providers.local.proxy: the elastic address as a real HTTP/1.1 proxy process."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from providers.local.daemon import kill_pid

from .conftest import KeepAliveClient, ProxyProc, Runtime, http_json


def _backend(resp_headers: dict[str, str]) -> str:
    return resp_headers["x-changeover-backend"]


def test_no_members_answers_503(runtime: Runtime) -> None:
    """An address without members answers 503 and counts it as a proxy error."""
    proxy = runtime.start_proxy()
    status, body, _ = http_json(proxy.port, "GET", "/")
    assert (status, body) == (503, {"error": "address has no members"})
    stats = http_json(proxy.control_port, "GET", "/stats", token=runtime.token)[1]
    assert (stats["requests"], stats["errors"], stats["inflight"]) == (1, 1, {})


def test_round_robin_across_members_on_one_connection(runtime: Runtime) -> None:
    """Consecutive requests on one keep-alive connection alternate between the members."""
    a, b = runtime.start_app("web-a"), runtime.start_app("web-b")
    proxy = runtime.start_proxy()
    state = runtime.set_members(proxy, {"a": a, "b": b})
    assert state["version"] == 1
    assert [m["id"] for m in state["members"]] == ["a", "b"]
    client = KeepAliveClient(proxy.port)
    try:
        seen = []
        for _ in range(6):
            status, body, headers = client.request("GET", "/")
            assert status == 200
            assert body["id"] == {"a": "web-a", "b": "web-b"}[_backend(headers)]
            seen.append(_backend(headers))
    finally:
        client.close()
    assert seen in (["a", "b"] * 3, ["b", "a"] * 3)


def test_swap_members_under_keep_alive_load_loses_nothing(runtime: Runtime) -> None:
    """Swapping members while clients keep sending: 0 failures, later requests hit the new one."""
    old, new = runtime.start_app("web-old"), runtime.start_app("web-new")
    proxy = runtime.start_proxy()
    runtime.set_members(proxy, {"old": old})
    stop = threading.Event()
    swapped_at: list[float] = []
    results: list[tuple[float, str]] = []
    failures: list[str] = []

    def hammer() -> None:
        client = KeepAliveClient(proxy.port)
        try:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    status, _, headers = client.request("GET", "/health")
                except Exception as exc:  # a failure is data here, not a crash
                    failures.append(repr(exc))
                    return
                if status != 200:
                    failures.append(f"status {status}")
                results.append((sent, _backend(headers)))
        finally:
            client.close()

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    runtime.set_members(proxy, {"new": new})
    swapped_at.append(time.monotonic())
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(10)

    assert failures == []
    before = [m for sent, m in results if sent < swapped_at[0] - 0.05]
    after = [m for sent, m in results if sent > swapped_at[0]]
    assert before and set(before) == {"old"}
    assert after and set(after) == {"new"}
    stats = http_json(proxy.control_port, "GET", "/stats", token=runtime.token)[1]
    assert stats["errors"] == 0
    assert stats["inflight"] == {"new": 0}


def test_stats_inflight_counts_until_response_relayed(runtime: Runtime) -> None:
    """inflight shows a request held at the member and drops to 0 once it is answered."""
    db = runtime.start_app("db-1", "db")
    proxy = runtime.start_proxy()
    runtime.set_members(proxy, {"db": db})
    http_json(db.port, "POST", "/admin/freeze", token=runtime.token)
    out: list[int] = []
    thread = threading.Thread(
        target=lambda: out.append(
            http_json(proxy.port, "POST", "/db/items", {"payload": "slow"})[0]
        )
    )
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while (
            http_json(proxy.control_port, "GET", "/stats", token=runtime.token)[1]["inflight"]["db"]
            != 1
        ):
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        http_json(db.port, "POST", "/admin/unfreeze", token=runtime.token)
        thread.join(10)
    assert out == [201]
    assert http_json(proxy.control_port, "GET", "/stats", token=runtime.token)[1]["inflight"] == {
        "db": 0
    }


def test_restart_on_same_port_keeps_members(runtime: Runtime) -> None:
    """A proxy restarted with --port P listens on P again and serves the persisted members."""
    app = runtime.start_app("web-a")
    proxy = runtime.start_proxy()
    state = runtime.set_members(proxy, {"a": app})
    # A client connection that outlives the proxy: the socket ends up in TIME_WAIT.
    assert http_json(proxy.port, "GET", "/")[0] == 200
    kill_pid(proxy.pid)

    again = runtime.start_proxy(port=proxy.port)
    assert again.port == proxy.port
    assert http_json(again.control_port, "GET", "/members", token=runtime.token)[1] == state
    status, body, headers = http_json(again.port, "GET", "/")
    assert (status, body["id"], headers["x-changeover-backend"]) == (200, "web-a", "a")


def test_dead_member_gives_502_and_bad_member_list_is_refused(runtime: Runtime) -> None:
    """A member that refuses connections yields 502; an invalid PUT leaves members unchanged."""
    proxy = runtime.start_proxy()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    body = {"members": [{"id": "dead", "host": "127.0.0.1", "port": dead_port}]}
    assert http_json(proxy.control_port, "PUT", "/members", body, token=runtime.token)[0] == 200
    status, answer, headers = http_json(proxy.port, "GET", "/")
    assert (status, headers["x-changeover-backend"]) == (502, "dead")
    assert "dead" in answer["error"]
    assert http_json(proxy.control_port, "GET", "/stats", token=runtime.token)[1]["errors"] == 1

    for bad in ({"members": [{"id": "x", "port": "80"}]}, {"members": "no"}, {}):
        assert http_json(proxy.control_port, "PUT", "/members", bad, token=runtime.token)[0] == 400
    dup = {"members": [{"id": "a", "port": 1}, {"id": "a", "port": 2}]}
    assert http_json(proxy.control_port, "PUT", "/members", dup, token=runtime.token)[0] == 400
    assert http_json(proxy.control_port, "GET", "/members", token=runtime.token)[1]["version"] == 1


class _DropSecondRequest(socketserver.BaseRequestHandler):
    """Answers the first request of a connection, then drops the connection on the next
    (after reading it whole), or, with ``close_idle``, right after the first answer.

    Dropping the second request is a member that processed a request and died before it
    answered; it also looks like a member closing an idle keep-alive connection just as
    the proxy reuses it. Closing after the answer is a member's keep-alive timeout.
    """

    def handle(self) -> None:
        server: _FlakyServer = self.server  # type: ignore[assignment]
        sock: socket.socket = self.request
        # The proxy keeps the last connection pooled; don't let it pin shutdown for long.
        sock.settimeout(2.0)
        with server.lock:
            server.connections += 1
        buffer = b""
        for answered in (True, False):
            while b"\r\n\r\n" not in buffer:
                try:
                    chunk = sock.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buffer += chunk
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(buffer) < length:
                try:
                    chunk = sock.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buffer += chunk
            buffer = buffer[length:]
            with server.lock:
                server.requests += 1
                server.methods.append(head.split(b" ", 1)[0].decode())
            if answered:
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                if server.close_idle:
                    return


class _FlakyServer(socketserver.ThreadingTCPServer):
    daemon_threads = False  # server_close joins handlers, so no socket outlives the test
    block_on_close = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _DropSecondRequest)
        self.lock = threading.Lock()
        self.connections = 0
        self.requests = 0
        self.methods: list[str] = []
        self.close_idle = False


@pytest.fixture
def flaky_server() -> Iterator[_FlakyServer]:
    """A member that drops every connection on its second request."""
    server = _FlakyServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_stale_pooled_connection_is_retried_once(
    runtime: Runtime, flaky_server: _FlakyServer
) -> None:
    """A reused backend connection that dies before answering is retried on a fresh one."""
    proxy = runtime.start_proxy()
    member = {"id": "flaky", "host": "127.0.0.1", "port": flaky_server.server_address[1]}
    http_json(proxy.control_port, "PUT", "/members", {"members": [member]}, token=runtime.token)
    client = KeepAliveClient(proxy.port)
    try:
        for _ in range(3):
            status, _, _ = _raw_get(client)
            assert status == 200
        assert http_json(proxy.control_port, "GET", "/stats", token=runtime.token)[1]["errors"] == 0
    finally:
        client.close()
        kill_pid(proxy.pid)  # closes its pooled connection to the flaky server
    # Each reuse was dropped and retried: 3 answered requests, 2 dropped, 3 connections.
    assert (flaky_server.connections, flaky_server.requests) == (3, 5)


def _raw_get(client: KeepAliveClient) -> tuple[int, bytes, dict[str, str]]:
    client.conn.request("GET", "/")
    resp = client.conn.getresponse()
    return resp.status, resp.read(), dict(resp.getheaders())


def _raw_exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_connection_close_and_chunked_requests(runtime: Runtime) -> None:
    """Connection: close ends the client connection; a chunked request body gets 501."""
    app = runtime.start_app("web-a")
    proxy = runtime.start_proxy()
    runtime.set_members(proxy, {"a": app})
    answer = _raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"\r\nConnection: close" in head
    assert b'"web-a"' in body
    chunked = b"POST /items HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert _raw_exchange(proxy.port, chunked).startswith(b"HTTP/1.1 501 ")


def test_a_refused_connection_is_passed_to_another_member(runtime: Runtime) -> None:
    """A member that refuses connections (its process died) gets no request: each one,
    writes included, goes to a live member instead, since the dead one never saw it."""
    live = runtime.start_app("web-live")
    proxy = runtime.start_proxy()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    body = {
        "members": [
            {"id": "dead", "host": "127.0.0.1", "port": dead_port},
            {"id": "live", "host": "127.0.0.1", "port": live.port},
        ]
    }
    assert http_json(proxy.control_port, "PUT", "/members", body, token=runtime.token)[0] == 200
    answered = [http_json(proxy.port, "GET", "/health") for _ in range(6)]
    assert [(s, h["x-changeover-backend"]) for s, _, h in answered] == [(200, "live")] * 6
    assert http_json(proxy.control_port, "GET", "/stats", token=runtime.token)[1]["errors"] == 0


def _flaky_member(runtime: Runtime, flaky_server: _FlakyServer) -> ProxyProc:
    proxy = runtime.start_proxy()
    member = {"id": "flaky", "host": "127.0.0.1", "port": flaky_server.server_address[1]}
    body = {"members": [member]}
    assert http_json(proxy.control_port, "PUT", "/members", body, token=proxy.token)[0] == 200
    return proxy


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_a_write_that_reached_the_member_is_never_replayed(
    runtime: Runtime, flaky_server: _FlakyServer, method: str
) -> None:
    """A member reads a write on a reused keep-alive connection and closes it unanswered
    (it may have committed the write): the client gets a 502 and the member saw the write
    exactly once; the proxy does not send it again on a fresh connection."""
    proxy = _flaky_member(runtime, flaky_server)
    client = KeepAliveClient(proxy.port)
    try:
        assert _raw_get(client)[0] == 200  # leaves the backend connection pooled
        client.conn.request(method, "/items", body=b'{"payload":"once"}')
        resp = client.conn.getresponse()
        status, body = resp.status, resp.read()
    finally:
        client.close()
        kill_pid(proxy.pid)
    assert status == 502, body
    assert b"flaky" in body
    assert flaky_server.methods == ["GET", method]
    assert flaky_server.connections == 1


def test_a_pooled_connection_the_member_closed_is_not_reused(
    runtime: Runtime, flaky_server: _FlakyServer
) -> None:
    """A member that closes idle keep-alive connections (a keep-alive timeout) costs no
    write: the proxy sees the pooled connection is closed before sending, so the POST goes
    out once, on a fresh connection, and succeeds."""
    flaky_server.close_idle = True
    proxy = _flaky_member(runtime, flaky_server)
    client = KeepAliveClient(proxy.port)
    try:
        statuses = []
        for _ in range(3):
            statuses.append(_raw_get(client)[0])
            time.sleep(0.2)  # the member closes its side in the meantime
            client.conn.request("POST", "/items", body=b'{"payload":"p"}')
            resp = client.conn.getresponse()
            resp.read()
            statuses.append(resp.status)
            time.sleep(0.2)
    finally:
        client.close()
        kill_pid(proxy.pid)
    assert statuses == [200] * 6
    assert flaky_server.methods == ["GET", "POST"] * 3
    assert flaky_server.connections == 6


def test_a_member_that_commits_a_write_and_dies_gets_it_once(runtime: Runtime) -> None:
    """Two db members; the one that takes the write commits it and dies before answering.
    The client gets a 502, and the write is committed exactly once in all: it is not sent
    to the dead member again, nor passed to the live one."""
    dbs = {name: runtime.start_app(f"db-{name}", "db") for name in ("a", "b")}
    for db in dbs.values():
        body = {"exit_after_commit": True}
        assert http_json(db.port, "POST", "/admin/fault", body, token=db.token)[0] == 200
    proxy = runtime.start_proxy()
    runtime.set_members(proxy, dbs)
    client = KeepAliveClient(proxy.port)
    try:
        for _ in range(2):  # a pooled connection to each member
            assert client.request("GET", "/health")[0] == 200
        status, answer, _ = client.request("POST", "/db/items", {"payload": "once"})
    finally:
        client.close()
    assert status == 502, answer
    rows = {}
    for name, db in dbs.items():
        kill_pid(db.pid)
        again = runtime.boot_app(db.root)  # its committed rows survive the crash
        rows[name] = http_json(again.port, "GET", "/db/dump")[1]["rows"]
    assert sorted(r[1] for r in rows["a"] + rows["b"]) == ["once"]
