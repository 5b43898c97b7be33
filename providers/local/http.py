"""A tiny JSON-over-HTTP client for talking to local servers and proxies on loopback.

Also home of the local cloud's control token: a random secret per cloud, kept in a 0600
file in the state dir. Every control endpoint of the cloud's processes (``/admin/*`` and
``/db/load`` on a server, every route of an address proxy's control port) requires it in
the :data:`TOKEN_HEADER` header, so another local user cannot redirect db writes or
repoint an address. The processes learn the token from the file's path, never from their
command line (which any user can read in ``ps``).
"""

from __future__ import annotations

import contextlib
import hmac
import http.client
import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

TOKEN_HEADER = "X-Changeover-Token"
TOKEN_FILE = "control-token"  # in STATE_DIR/local/


class HttpError(Exception):
    """A request to a local process failed: no answer, or a status outside 2xx."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TokenError(Exception):
    """The control token file is missing, unreadable, not private or empty."""


def read_token(path: Path) -> str:
    """The token stored at ``path``; refuses a file that other users could read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise TokenError(f"cannot read the control token {path}: {exc.strerror or exc}") from exc
    with os.fdopen(fd) as fh:
        mode = os.fstat(fh.fileno()).st_mode & 0o777
        if mode & 0o077:
            raise TokenError(f"the control token {path} is readable by others (mode {mode:o})")
        token = fh.read().strip()
    if not token:
        raise TokenError(f"the control token {path} is empty")
    return token


def ensure_token(path: Path) -> str:
    """Create the token file (0600) if it does not exist yet; return the token.

    Concurrent callers agree on one token: the file is written under a temporary name
    and linked into place, which fails if another caller got there first.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # 0600
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(32) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
    return read_token(path)


def token_ok(expected: str | None, presented: str | None) -> bool:
    """Whether a request's token matches, in constant time; no expected token: never."""
    if not expected or presented is None:
        return False
    return hmac.compare_digest(expected.encode(), presented.encode())


def request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    *,
    timeout: float = 5.0,
    ok: tuple[int, ...] = (200, 201),
    token: str | None = None,
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """One request to 127.0.0.1:port. Returns (status, json body, headers).

    ``token`` is sent in :data:`TOKEN_HEADER` (control endpoints require it).
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        if token is not None:
            headers[TOKEN_HEADER] = token
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
