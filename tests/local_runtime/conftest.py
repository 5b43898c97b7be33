"""Fixtures for the embedded local cloud's processes: real processes on real sockets.

Every process a test starts is recorded and killed when the test ends, pass or fail;
as a safety net anything whose command line mentions the test's tmp dir is killed too.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from providers.local.daemon import kill_pid, pid_alive, spawn_detached
from providers.local.http import TOKEN_HEADER, ensure_token

REPO_ROOT = Path(__file__).resolve().parents[2]

# Generous: a loaded CI machine may take a while to start Python.
READY_TIMEOUT = 15.0

IMAGE_PACKAGES = {"openssl": "3.0.11-1", "linux-image": "6.1.76-1", "nginx": "1.22.1-9"}

INDEX_PACKAGES: dict[str, dict[str, Any]] = {
    "openssl": {"version": "3.0.13-1", "security": True, "reboot": False},
    "linux-image": {"version": "6.1.90-1", "security": True, "reboot": True},
    "nginx": {"version": "1.22.1-9", "security": False, "reboot": False},
}


def http_json(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    *,
    timeout: float = 10.0,
    raw: bytes | None = None,
    token: str | None = None,
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """One request on a fresh connection: (status, JSON body, headers).

    ``token`` goes in the control token header (control endpoints require it)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if token is not None:
            headers[TOKEN_HEADER] = token
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        payload = resp.read()
        obj = json.loads(payload) if payload else {}
        return resp.status, obj, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


class KeepAliveClient:
    """A keep-alive HTTP client that never retries (a reconnect would hide failures)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        self.conn.connect()
        self.sock = self.conn.sock

    def request(
        self, method: str, path: str, body: Any = None
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Send one request on the same connection and read the whole answer."""
        data = None if body is None else json.dumps(body).encode()
        self.conn.request(method, path, body=data)
        resp = self.conn.getresponse()
        payload = resp.read()
        if self.conn.sock is not self.sock:
            raise AssertionError("the keep-alive connection was replaced")
        headers = {k.lower(): v for k, v in resp.getheaders()}
        return resp.status, json.loads(payload) if payload else {}, headers

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


@dataclass
class AppProc:
    """A running demo app server."""

    root: Path
    pid: int
    port: int
    token: str

    @property
    def url(self) -> str:
        """Its base URL."""
        return f"http://127.0.0.1:{self.port}"


@dataclass
class ProxyProc:
    """A running address proxy."""

    root: Path
    pid: int
    port: int
    control_port: int
    token: str


@dataclass
class Runtime:
    """Starts app and proxy processes under one tmp dir, and remembers them all."""

    root: Path
    pids: list[int] = field(default_factory=list)

    @property
    def token_path(self) -> Path:
        """The control token file every process of this runtime reads (0600)."""
        return self.root / "control-token"

    @property
    def token(self) -> str:
        """The control token (created on first use)."""
        return ensure_token(self.token_path)

    @property
    def index_path(self) -> Path:
        """The simulated apt repository shared by all servers."""
        return self.root / "package-index.json"

    def write_index(self, packages: dict[str, dict[str, Any]]) -> None:
        """(Re)write the package index."""
        self.index_path.write_text(json.dumps({"packages": packages}))

    def spawn(self, argv: list[str], log_path: Path) -> int:
        """spawn_detached, recording the pid for cleanup."""
        pid = spawn_detached(argv, log_path=log_path, cwd=REPO_ROOT)
        self.pids.append(pid)
        return pid

    def _wait_ready(self, root: Path, pid: int, files: tuple[str, ...]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not all((root / f).exists() for f in files):
            if not pid_alive(pid):
                log = (root / "process.log").read_text(errors="replace")
                raise AssertionError(f"process {pid} died while starting:\n{log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"process {pid} not ready in {READY_TIMEOUT}s")
            time.sleep(0.01)

    def start_app(
        self,
        name: str,
        role: str = "web",
        *,
        db_url: str | None = None,
        generation: int = 1,
        faults: dict[str, Any] | None = None,
        packages: dict[str, str] | None = None,
    ) -> AppProc:
        """Write server.json for a new server and boot it; returns once it listens."""
        root = self.root / name
        root.mkdir(parents=True, exist_ok=True)
        if not self.index_path.exists():
            self.write_index(INDEX_PACKAGES)
        config = {
            "id": name,
            "stack": "demo",
            "role": role,
            "generation": generation,
            "run": "run-test",
            "db_url": db_url,
            "image": {"name": "debian-12-base", "packages": packages or IMAGE_PACKAGES},
            "package_index": str(self.index_path),
            "boot_delay": 0.0,
            "control_token_file": str(self.token_path),
            "faults": {
                "health_fail": False,
                "hold_packages": [],
                "keep_reboot_required": False,
                **(faults or {}),
            },
        }
        (root / "server.json").write_text(json.dumps(config))
        return self.boot_app(root)

    def boot_app(self, root: Path) -> AppProc:
        """(Re)start the app process of an existing server root."""
        argv = [sys.executable, "-m", "providers.local.app", "--root", str(root)]
        # A previous run's port file would make us think the new process is ready.
        (root / "port").unlink(missing_ok=True)
        token = self.token
        pid = self.spawn(argv, root / "process.log")
        self._wait_ready(root, pid, ("port",))
        return AppProc(root, pid, int((root / "port").read_text()), token)

    def start_proxy(self, name: str = "address", port: int = 0) -> ProxyProc:
        """Start (or restart) the proxy rooted at ``name``; returns once it listens."""
        root = self.root / name
        root.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable,
            "-m",
            "providers.local.proxy",
            "--root",
            str(root),
            "--port",
            str(port),
            "--token-file",
            str(self.token_path),
        ]
        token = self.token
        for stale in ("port", "control_port"):
            (root / stale).unlink(missing_ok=True)
        pid = self.spawn(argv, root / "process.log")
        self._wait_ready(root, pid, ("port", "control_port"))
        return ProxyProc(
            root,
            pid,
            int((root / "port").read_text()),
            int((root / "control_port").read_text()),
            token,
        )

    def set_members(self, proxy: ProxyProc, members: dict[str, AppProc]) -> dict[str, Any]:
        """PUT the proxy's members, mapping member id -> app."""
        body = {
            "members": [
                {"id": mid, "host": "127.0.0.1", "port": app.port} for mid, app in members.items()
            ]
        }
        status, state, _ = http_json(proxy.control_port, "PUT", "/members", body, token=proxy.token)
        assert status == 200, state
        return state


def _pids_mentioning(text: str) -> list[int]:
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    """A tmp root for processes; every process started under it is killed afterwards."""
    rt = Runtime(root=tmp_path)
    try:
        yield rt
    finally:
        for pid in rt.pids:
            kill_pid(pid, grace=1.0)
        for pid in _pids_mentioning(f"{tmp_path}/"):
            kill_pid(pid, grace=0.5)
