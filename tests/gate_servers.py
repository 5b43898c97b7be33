"""Real HTTP servers on 127.0.0.1 that alarm gates ask: a health endpoint and a
Prometheus-compatible query API, each answering what the test sets, counting requests."""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# (status, JSON body) a server answers; a function gets the request's path and query.
Answer = tuple[int, Any]


class GateServer:
    """Answers every GET with `answer(path, query)`; records each request."""

    def __init__(self, answer: Callable[[str, dict[str, str]], Answer]) -> None:
        self.answer = answer
        self.requests: list[tuple[str, dict[str, str]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(parts.query))
                outer.requests.append((parts.path, query))
                status, body = outer.answer(parts.path, query)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_: Any) -> None:  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.httpd.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> GateServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)


@contextmanager
def gate_server(answer: Callable[[str, dict[str, str]], Answer]) -> Iterator[GateServer]:
    server = GateServer(answer).start()
    try:
        yield server
    finally:
        server.stop()


def vector(*values: float, metric: str = "http_errors") -> Answer:
    """A Prometheus instant-query answer: one sample per value."""
    result = [
        {"metric": {"__name__": metric, "instance": f"web-{i}"}, "value": [1700000000.0, str(v)]}
        for i, v in enumerate(values)
    ]
    return 200, {"status": "success", "data": {"resultType": "vector", "result": result}}


def free_port() -> int:
    """A port nothing listens on (bound, then released): connections are refused."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
