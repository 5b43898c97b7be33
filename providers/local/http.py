"""A tiny JSON-over-HTTP client for talking to local servers and proxies on loopback."""

from __future__ import annotations

import http.client
import json
from typing import Any


class HttpError(Exception):
    """A request to a local process failed: no answer, or a status outside 2xx."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    *,
    timeout: float = 5.0,
    ok: tuple[int, ...] = (200, 201),
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """One request to 127.0.0.1:port. Returns (status, json body, headers)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        status = resp.status
        hdrs = {k.lower(): v for k, v in resp.getheaders()}
    except (OSError, http.client.HTTPException) as exc:
        raise HttpError(f"{method} 127.0.0.1:{port}{path}: {exc or type(exc).__name__}") from exc
    finally:
        conn.close()
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        data = {"raw": raw[:200].decode(errors="replace")}
    if status not in ok:
        raise HttpError(f"{method} 127.0.0.1:{port}{path}: HTTP {status} {data}", status)
    return status, data if isinstance(data, dict) else {"value": data}, hdrs
