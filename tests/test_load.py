"""Tests for the cutover load generator against a real tiny HTTP/1.1 server.

The server is a ``ThreadingHTTPServer`` on 127.0.0.1 that counts requests and
connections, assigns write ids, and can be told to fail, so the tests pin what
the generator reports against what the server actually saw.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from orchestrator.load import LoadGenerator, LoadResult, Sample, run_for


class _Server(ThreadingHTTPServer):
    """Counting test target; knobs decide which requests fail and how."""

    # Non-daemon handler threads so server_close() joins them and no socket
    # outlives the test (ResourceWarnings are errors here).
    daemon_threads = False
    block_on_close = True

    def __init__(self, *, fail_every: int = 0, bad_echo_every: int = 0) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.fail_every = fail_every
        self.bad_echo_every = bad_echo_every
        self.lock = threading.Lock()
        self.requests = 0
        self.failures_sent = 0
        self.connections = 0
        self.items: dict[int, str] = {}
        self.open_socks: set[socket.socket] = set()
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05})

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients vanishing mid-request is expected when a test kills the server.
        pass

    def kill(self) -> None:
        """Stop serving and cut every live connection, like a dying backend."""
        if not self.thread.is_alive():
            return
        self.shutdown()
        with self.lock:
            socks = list(self.open_socks)
        for sock in socks:
            # Already-closed sockets are fine: the point is none stays open.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.server_close()
        self.thread.join(5)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # One segment per response; otherwise Nagle plus delayed ACK adds ~40 ms.
    disable_nagle_algorithm = True
    timeout = 5
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1
            self.server.open_socks.add(self.connection)

    def finish(self) -> None:
        with self.server.lock:
            self.server.open_socks.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: dict[str, Any] | bytes) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.send_header("X-Changeover-Backend", "m-1")
        self.end_headers()
        self.wfile.write(raw)

    def _count(self) -> int:
        with self.server.lock:
            self.server.requests += 1
            n = self.server.requests
            if self.server.fail_every and n % self.server.fail_every == 0:
                self.server.failures_sent += 1
                return -1
            return n

    def do_GET(self) -> None:
        n = self._count()
        if n < 0:
            self._send(500, {"error": "boom"})
            return
        self._send(200, {"id": "srv-1", "n": n})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        data = json.loads(self.rfile.read(length))
        n = self._count()
        if n < 0:
            self._send(500, {"error": "boom"})
            return
        with self.server.lock:
            item_id = len(self.server.items) + 1
            self.server.items[item_id] = data["payload"]
            bad = self.server.bad_echo_every and item_id % self.server.bad_echo_every == 0
        payload = "corrupted" if bad else data["payload"]
        self._send(201, {"id": item_id, "payload": payload, "served_by": "srv-1"})


@pytest.fixture
def serve() -> Iterator[Callable[..., _Server]]:
    """Factory for started test servers; all are shut down at teardown."""
    servers: list[_Server] = []

    def make(**knobs: Any) -> _Server:
        server = _Server(**knobs)
        servers.append(server)
        server.thread.start()
        return server

    yield make
    for server in servers:
        server.kill()


def test_achieved_rate_tracks_target(serve: Callable[..., _Server]) -> None:
    """Paced load reaches roughly the target rate and never bursts far above it."""
    server = serve()
    result = run_for("127.0.0.1", server.port, 2.0, rate=200, connections=4)
    assert result.failed == 0
    assert 1.9 <= result.duration <= 2.5
    assert result.rate >= 0.7 * 200
    assert result.rate <= 1.1 * 200
    assert result.sent == server.requests


def test_keep_alive_reuses_connections(serve: Callable[..., _Server]) -> None:
    """Each worker keeps one connection open, so the server sees one per worker."""
    server = serve()
    result = run_for("127.0.0.1", server.port, 1.0, rate=200, connections=3)
    assert result.sent >= 100
    assert server.connections == 3


def test_acked_writes_carry_server_ids(serve: Callable[..., _Server]) -> None:
    """Acked writes map the server-assigned ids to the unique payloads sent."""
    server = serve()
    result = run_for("127.0.0.1", server.port, 1.0, rate=200, write_ratio=0.5, payload_prefix="t")
    writes = [s for s in result.samples if s.kind == "write"]
    assert writes and all(s.ok and s.status == 201 for s in writes)
    assert result.acked_writes == server.items
    assert len(set(result.acked_writes.values())) == len(writes)
    assert all(p.startswith("t-") for p in result.acked_writes.values())
    # Deterministic interleave: each worker's share is within one of the ratio.
    assert abs(len(writes) - result.sent * 0.5) <= 4
    assert {s.backend for s in result.samples} == {"m-1"}


def test_mismatched_echo_is_not_acked(serve: Callable[..., _Server]) -> None:
    """A 201 whose payload does not match what was sent is a failure, not an ack."""
    server = serve(bad_echo_every=3)
    result = run_for("127.0.0.1", server.port, 1.0, rate=200, write_ratio=1.0)
    corrupted = {i for i in server.items if i % 3 == 0}
    assert corrupted
    assert result.failed == len(corrupted)
    assert result.errors == Counter({"bad body: payload mismatch": len(corrupted)})
    assert set(result.acked_writes) == set(server.items) - corrupted


def test_server_errors_counted_exactly_without_retry(serve: Callable[..., _Server]) -> None:
    """Every 500 is exactly one failure, and the server saw each request once."""
    server = serve(fail_every=7)
    result = run_for("127.0.0.1", server.port, 1.0, rate=200)
    assert server.failures_sent > 0
    assert result.failed == server.failures_sent
    assert result.errors == Counter({"HTTP 500": server.failures_sent})
    assert server.requests == result.sent
    assert all(s.status == 500 for s in result.samples if not s.ok)
    # A 500 with a drained body leaves keep-alive intact: no reconnects.
    assert server.connections == 4


def test_server_death_yields_failures_and_bounded_stop(serve: Callable[..., _Server]) -> None:
    """Killing the server mid-run gives failures, and the run ends by max_duration."""
    server = serve()
    gen = LoadGenerator("127.0.0.1", server.port, rate=100, connections=2, max_duration=2.0)
    gen.start()
    try:
        time.sleep(0.6)
        server.kill()
        killed_at = time.time()
        assert gen.wait(timeout=4.0), "workers outlived max_duration"
    finally:
        result = gen.stop()
    assert result.duration <= 2.5
    assert result.ok > 0
    assert result.failed > 0
    assert all(result.epoch(s) >= killed_at - 0.2 for s in result.samples if not s.ok)
    assert any("ConnectionRefusedError" in e for e in result.errors)
    # Pacing continues while refused: no tight error loop inflating the count.
    assert result.sent <= 100 * 2.0 * 1.1


def test_max_requests_bounds_run_without_stop(serve: Callable[..., _Server]) -> None:
    """The generator stops by itself after max_requests, with that many sent."""
    server = serve()
    gen = LoadGenerator("127.0.0.1", server.port, rate=500, max_requests=40)
    gen.start()
    try:
        assert gen.wait(timeout=3.0)
    finally:
        result = gen.stop()
    assert result.sent == 40 == server.requests
    assert gen.stop() is result


def test_context_manager_stops_and_keeps_result(serve: Callable[..., _Server]) -> None:
    """Leaving the with-block stops the workers and exposes the result."""
    server = serve()
    with LoadGenerator("127.0.0.1", server.port, rate=100, max_duration=5.0) as gen:
        time.sleep(0.3)
    assert gen.result is not None
    assert gen.result.duration < 1.0
    assert 0 < gen.result.sent == server.requests


def test_to_dict_is_json_ready(serve: Callable[..., _Server]) -> None:
    """The summary serialises to JSON and carries the headline figures."""
    server = serve(fail_every=5)
    result = run_for("127.0.0.1", server.port, 0.5, rate=100)
    summary = json.loads(json.dumps(result.to_dict()))
    assert summary["sent"] == result.sent
    assert summary["failed"] == result.failed > 0
    assert summary["errors"] == {"HTTP 500": result.failed}
    assert summary["first_failure"] <= summary["last_failure"]
    assert summary["backends"] == {"m-1": result.ok}
    assert "samples" not in summary


def _synthetic() -> LoadResult:
    # Latency equals 1 ms per second of run time, so filtered windows have
    # predictable percentiles.
    samples = [
        Sample(
            t=float(i),
            latency=(i + 1) / 1000.0,
            ok=i != 50,
            kind="read",
            status=200,
            backend="m",
            error=None if i != 50 else "x",
        )
        for i in range(100)
    ]
    return LoadResult(samples=samples, acked_writes={}, started=1000.0, ended=1100.0)


def test_percentiles_window_and_exclude() -> None:
    """Percentiles honour epoch window/exclude filters and nearest-rank maths."""
    result = _synthetic()
    full = result.latency_percentiles()
    assert full == {"count": 100.0, "p50": 50.0, "p99": 99.0, "max": 100.0}
    inside = result.latency_percentiles(window=(1010.0, 1019.0))
    assert inside["count"] == 10.0
    assert inside["p50"] == pytest.approx(15.0)
    assert inside["max"] == pytest.approx(20.0)
    outside = result.latency_percentiles(exclude=(1000.0, 1089.0))
    assert outside["count"] == 10.0
    assert outside["p50"] == pytest.approx(95.0)
    both = result.latency_percentiles(window=(1040.0, 1059.0), exclude=(1045.0, 1054.0))
    assert both["count"] == 10.0
    assert result.latency_percentiles(window=(2000.0, 3000.0))["count"] == 0.0
    assert result.latency_percentiles(ok_only=True)["count"] == 99.0
    assert result.failure_times() == [1050.0]
    assert result.rate == pytest.approx(1.0)


def test_invalid_arguments_rejected() -> None:
    """Nonsensical settings fail fast instead of producing an unbounded run."""
    for kw in ({"rate": 0}, {"connections": 0}, {"write_ratio": 1.5}, {"max_requests": 0}):
        with pytest.raises(ValueError):
            LoadGenerator("127.0.0.1", 1, **kw)
    with pytest.raises(RuntimeError):
        LoadGenerator("127.0.0.1", 1).stop()
