"""The demo application that runs on every server of the embedded local cloud.

One OS process is one server. It is started as ``python -m providers.local.app --root DIR``
where ``DIR/server.json`` (written by the local provider) says who it is::

    {"id", "stack", "role": "web" | "db", "generation", "run", "db_url" (web only),
     "image": {"name", "packages": {name: version}}, "package_index": path,
     "boot_delay": seconds, "control_token_file": path,
     "faults": {"health_fail", "hold_packages", "keep_reboot_required", "die_after"}}

Package state is SIMULATED. Nothing is installed on the host: the "apt repository" is the
JSON file ``package_index`` (``{"packages": {name: {"version", "security", "reboot"}}}``)
and the "installed packages" are ``DIR/root/var/lib/changeover/packages.json``. The first
boot plays cloud-init's ``package_upgrade`` + ``package_reboot_if_required``: every image
package is raised to the index's version (except ``faults.hold_packages``), a package
flagged ``reboot`` writes ``DIR/root/var/run/reboot-required{,.pkgs}``, and the simulated
reboot clears ``/var/run`` (unless ``faults.keep_reboot_required``). Later starts of the
same DIR are reboots of the same host: no upgrade, ``boot_count`` + 1, ``/var/run`` cleared,
and the server binds the port it had before when it is free (a host keeps its address).
``POST /admin/upgrade`` is ``apt-get upgrade`` run later on a live host (``changeover
upgrade``): it raises installed packages to the index's versions (``security_only``: only
entries flagged ``security``; entries flagged ``kept_back`` need ``dist_upgrade``, as apt
keeps back an upgrade that needs new dependencies), and a ``reboot`` entry it upgraded
writes the reboot-required sentinels. The running kernel changes only at the next boot.

The server is ready once ``DIR/port`` exists (written atomically after binding
127.0.0.1:0). ``DIR/pid`` is written first thing. SIGTERM shuts it down cleanly.

HTTP API (JSON bodies, HTTP/1.1 keep-alive, Content-Length always set). The control
endpoints, ``/admin/*`` and ``/db/load`` (it writes past the write gate), require the
cloud's control token (read at boot from ``control_token_file``) in the
``X-Changeover-Token`` header and answer 403 without it; a server configured without a
token file refuses them all.

every role
    ``GET /`` ``GET /health`` (503 with the health_fail fault) ``GET /facts``
    ``POST /admin/set-package {"name", "version"}`` (a manual change; null removes)
    ``POST /admin/upgrade {"security_only": bool, "dist_upgrade": bool}`` -> ``{"upgraded":
    {name: {"from", "to"}}, "kept_back", "reboot_required", "reboot_required_pkgs", "boot_id"}``
    ``POST /admin/fault {"health_fail": bool, "write_delay": seconds, "exit_after_commit":
    bool}`` (for tests: a db write waits ``write_delay`` once admitted, before it commits;
    ``exit_after_commit`` kills the process right after a write commits, unanswered)
web
    ``POST /items {"payload"}`` -> 201 once the db acknowledged, 502 on any db error
    ``GET /items/<id>``
db (SQLite in WAL mode with synchronous=FULL; a write is acknowledged once committed)
    ``POST /db/items {"payload"}`` -> 201, subject to the write mode (normal/hold/forward)
    ``GET /db/items/<id>`` ``GET /db/dump?after=ID&limit=N`` ``POST /db/load {"rows"}``
    ``GET /db/summary`` ``POST /admin/freeze`` ``POST /admin/forward {"url"}``
    ``POST /admin/unfreeze`` ``GET /admin/mode``

Only the standard library is used so that a server boots in a few tens of milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import re
import select
import signal
import socket
import socketserver
import sqlite3
import sys
import threading
import time
import traceback
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

from providers.local.daemon import atomic_write_text
from providers.local.http import TOKEN_HEADER, TokenError, read_token, token_ok

__all__ = [
    "App",
    "AppConfig",
    "HttpError",
    "PackageState",
    "WriteGate",
    "main",
    "version_key",
]

# A held write waits at most this long for the freeze to end before answering 503, so a
# forgotten freeze degrades into errors instead of piling up threads forever.
HOLD_TIMEOUT = 60.0

# /admin/freeze waits this long for in-flight writes to finish before giving up with 503.
FREEZE_DRAIN_TIMEOUT = 60.0

# Upstream calls (web -> db, db -> db when forwarding) may legitimately sit behind a
# held write for HOLD_TIMEOUT, so their socket timeout must be longer than that.
UPSTREAM_TIMEOUT = HOLD_TIMEOUT + 30.0

# Forwarding chains are allowed (old db -> new db -> newer db) but a loop is not.
MAX_FORWARD_HOPS = 4
FORWARD_HOPS_HEADER = "X-Changeover-Forward-Hops"

# /db/load carries whole batches of rows, so allow large bodies, but not unbounded ones.
MAX_BODY_BYTES = 64 * 1024 * 1024

WRITE_MODES = ("normal", "hold", "forward")


# ---------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------

_VERSION_PART = re.compile(r"\d+|\D+")


def version_key(version: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key for Debian-ish versions: digit runs compare numerically, others as text.

    ``~`` sorts before anything (as in dpkg), so ``1.0~rc1 < 1.0``.
    """
    parts: list[tuple[int, int, str]] = []
    for part in _VERSION_PART.findall(version):
        if part.isdigit():
            parts.append((2, int(part), ""))
        elif part.startswith("~"):
            parts.append((0, 0, part))
        else:
            parts.append((1, 0, part))
    # The end of a version sorts after '~' parts but before any other part.
    parts.append((0, 1, ""))
    return tuple(parts)


def kernel_version(packages: Mapping[str, Any]) -> str | None:
    """The version of the (simulated) kernel package: the first named linux-image*."""
    names = sorted(n for n in packages if n.startswith("linux-image"))
    return str(packages[names[0]]) if names else None


# /etc/os-release of the simulated images, by image name prefix.
OS_RELEASES: dict[str, dict[str, str]] = {
    "debian-12": {
        "ID": "debian",
        "VERSION_ID": "12",
        "VERSION_CODENAME": "bookworm",
        "PRETTY_NAME": "Debian GNU/Linux 12 (bookworm)",
    },
}


def os_release(image: str) -> dict[str, str]:
    """The simulated /etc/os-release fields of an image."""
    for prefix, fields in OS_RELEASES.items():
        if image.startswith(prefix):
            return dict(fields)
    name = image.split("-", maxsplit=1)[0] or "linux"
    return {"ID": name, "PRETTY_NAME": f"{image} (simulated)"}


def _atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _log(message: str) -> None:
    # stderr is the server's log file (see providers.local.daemon).
    sys.stderr.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")
    sys.stderr.flush()


class HttpError(Exception):
    """An error answer: raised anywhere in a handler, turned into a JSON response."""

    def __init__(self, status: int, error: str, **extra: Any) -> None:
        super().__init__(error)
        self.status = status
        self.body: dict[str, Any] = {"error": error, **extra}


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AppConfig:
    """The identity and settings of one server, read from ``DIR/server.json``."""

    id: str
    stack: str
    role: str
    generation: int
    run: str
    db_url: str | None
    image: dict[str, Any]
    package_index: Path
    boot_delay: float = 0.0
    health_fail: bool = False
    hold_packages: frozenset[str] = frozenset()
    keep_reboot_required: bool = False
    die_after: float | None = None  # fault: the process dies this long after it serves
    control_token_file: Path | None = None

    @classmethod
    def load(cls, path: Path) -> AppConfig:
        """Parse server.json; missing optional fields take their defaults."""
        raw = json.loads(path.read_text())
        faults = raw.get("faults") or {}
        image = raw.get("image") or {}
        return cls(
            id=str(raw["id"]),
            stack=str(raw.get("stack", "")),
            role=str(raw["role"]),
            generation=int(raw.get("generation", 0)),
            run=str(raw.get("run", "")),
            db_url=raw.get("db_url"),
            image={
                "name": image.get("name", ""),
                "packages": dict(image.get("packages") or {}),
            },
            package_index=Path(raw.get("package_index") or path.parent / "package-index.json"),
            boot_delay=float(raw.get("boot_delay") or 0.0),
            health_fail=bool(faults.get("health_fail", False)),
            hold_packages=frozenset(faults.get("hold_packages") or ()),
            keep_reboot_required=bool(faults.get("keep_reboot_required", False)),
            die_after=float(faults["die_after"]) if faults.get("die_after") else None,
            control_token_file=(
                Path(raw["control_token_file"]) if raw.get("control_token_file") else None
            ),
        )


# ---------------------------------------------------------------------------------------
# Simulated packages
# ---------------------------------------------------------------------------------------


class PackageState:
    """The simulated package database and /var/run sentinels of one server."""

    def __init__(self, root: Path, config: AppConfig) -> None:
        self._config = config
        self._lock = threading.Lock()
        self.host_root = root / "root"
        self.packages_path = self.host_root / "var/lib/changeover/packages.json"
        self.boot_path = self.host_root / "var/lib/changeover/boot.json"
        self.reboot_required_path = self.host_root / "var/run/reboot-required"
        self.reboot_pkgs_path = self.host_root / "var/run/reboot-required.pkgs"
        self.installed: dict[str, str] = {}
        self.boot_count = 0
        # The kernel package version the last (simulated) boot started: a kernel upgraded
        # after it runs only once the server reboots.
        self.running_kernel: str | None = None
        self._last_index: dict[str, dict[str, Any]] = {}

    def read_index(self) -> dict[str, dict[str, Any]]:
        """Read the package index; a missing or half-written file yields the last good one."""
        for _ in range(3):
            try:
                raw = json.loads(self._config.package_index.read_text())
                packages = raw.get("packages", {}) if isinstance(raw, dict) else {}
                self._last_index = {str(k): v for k, v in packages.items() if isinstance(v, dict)}
                return self._last_index
            except FileNotFoundError:
                return self._last_index
            except (json.JSONDecodeError, OSError):
                # The provider may be rewriting the index in place; try again shortly.
                time.sleep(0.01)
        return self._last_index

    def boot(self) -> None:
        """First boot: upgrade and maybe reboot. Later boots: clear /var/run, count the boot."""
        if self.packages_path.exists():
            self.installed = {
                str(k): str(v) for k, v in json.loads(self.packages_path.read_text()).items()
            }
            previous = 0
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                previous = int(json.loads(self.boot_path.read_text())["boot_count"])
            if not self._config.keep_reboot_required:
                self._clear_var_run()
            self.running_kernel = kernel_version(self.installed)
            self._set_boot_count(previous + 1)
            return

        index = self.read_index()
        installed: dict[str, str] = {}
        needs_reboot: list[str] = []
        for name, image_version in self._config.image["packages"].items():
            installed[name] = str(image_version)
            entry = index.get(name)
            if entry is None or name in self._config.hold_packages:
                continue
            latest = str(entry.get("version", ""))
            if version_key(latest) > version_key(installed[name]):
                installed[name] = latest
                if entry.get("reboot"):
                    needs_reboot.append(name)
        self.installed = installed
        _atomic_write_json(self.packages_path, installed)
        boot_count = 1
        if needs_reboot:
            atomic_write_text(self.reboot_required_path, "*** System restart required ***\n")
            atomic_write_text(self.reboot_pkgs_path, "".join(f"{p}\n" for p in needs_reboot))
            if not self._config.keep_reboot_required:
                # package_reboot_if_required: the reboot wipes /var/run (a tmpfs).
                self._clear_var_run()
                boot_count = 2
        rebooted = boot_count == 2 or not needs_reboot
        booted = installed if rebooted else self._config.image["packages"]
        self.running_kernel = kernel_version(booted)
        self._set_boot_count(boot_count)

    def _clear_var_run(self) -> None:
        for path in (self.reboot_required_path, self.reboot_pkgs_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _set_boot_count(self, count: int) -> None:
        self.boot_count = count
        _atomic_write_json(
            self.boot_path, {"boot_count": count, "running_kernel": self.running_kernel}
        )

    def set_package(self, name: str, version: str | None) -> dict[str, str]:
        """Change one installed package by hand (drift); ``None`` removes it."""
        with self._lock:
            if version is None:
                self.installed.pop(name, None)
            else:
                self.installed[name] = version
            _atomic_write_json(self.packages_path, self.installed)
            return dict(self.installed)

    def upgrade(self, *, security_only: bool, dist_upgrade: bool) -> dict[str, Any]:
        """Upgrade installed packages to the index's versions, as apt would on a live host.
        Idempotent: a second call finds nothing newer."""
        index = self.read_index()
        upgraded: dict[str, dict[str, str]] = {}
        kept_back: list[str] = []
        needs_reboot: list[str] = []
        with self._lock:
            for name in sorted(self.installed):
                entry = index.get(name)
                if entry is None or name in self._config.hold_packages:
                    continue
                latest = str(entry.get("version", ""))
                if version_key(latest) <= version_key(self.installed[name]):
                    continue
                if security_only and not entry.get("security"):
                    continue
                if entry.get("kept_back") and not dist_upgrade:
                    kept_back.append(name)
                    continue
                upgraded[name] = {"from": self.installed[name], "to": latest}
                self.installed[name] = latest
                if entry.get("reboot"):
                    needs_reboot.append(name)
            _atomic_write_json(self.packages_path, self.installed)
            if needs_reboot:
                _, already = self.reboot_required()
                pkgs = list(dict.fromkeys([*already, *needs_reboot]))
                atomic_write_text(self.reboot_pkgs_path, "".join(f"{p}\n" for p in pkgs))
                atomic_write_text(self.reboot_required_path, "*** System restart required ***\n")
        required, pkgs = self.reboot_required()
        return {
            "upgraded": upgraded,
            "kept_back": kept_back,
            "reboot_required": required,
            "reboot_required_pkgs": pkgs,
            "boot_id": str(self.boot_count),
        }

    def pending(self) -> list[dict[str, Any]]:
        """Installed packages for which the index has a newer version, read right now."""
        index = self.read_index()
        with self._lock:
            installed = dict(self.installed)
        result: list[dict[str, Any]] = []
        for name in sorted(installed):
            entry = index.get(name)
            if entry is None:
                continue
            latest = str(entry.get("version", ""))
            if version_key(latest) > version_key(installed[name]):
                result.append(
                    {
                        "name": name,
                        "installed": installed[name],
                        "latest": latest,
                        "security": bool(entry.get("security", False)),
                    }
                )
        return result

    def reboot_required(self) -> tuple[bool, list[str]]:
        """Whether the reboot-required sentinel exists, and the packages that asked for it."""
        required = self.reboot_required_path.exists()
        pkgs: list[str] = []
        with contextlib.suppress(FileNotFoundError):
            pkgs = [ln.strip() for ln in self.reboot_pkgs_path.read_text().splitlines()]
        return required, [p for p in pkgs if p]


# ---------------------------------------------------------------------------------------
# Database (db role)
# ---------------------------------------------------------------------------------------


class Database:
    """The db role's SQLite store; one connection, serialised by a lock.

    :meth:`summary` is kept up to date as rows are committed, so it costs O(1) rather
    than a pass over every row: it runs while writes are frozen (the rebuild's final
    sync compares both dbs), where its time is the clients' wait.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # The summary of every row with id <= _max_id, in id order; None: recompute.
        self._digest: Any = None
        self._count = 0
        self._max_id = 0
        # Autocommit mode: every INSERT is its own durable transaction, batches use
        # explicit BEGIN/COMMIT.
        self._conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)"
        )
        # At boot, before serving: from then on only the rows committed are added.
        self._summarise()

    def close(self) -> None:
        """Close the connection (used on shutdown)."""
        with self._lock:
            self._conn.close()

    def insert(self, payload: str) -> int:
        """Insert and commit one row; return its id."""
        with self._lock:
            cur = self._conn.execute("INSERT INTO items (payload) VALUES (?)", (payload,))
            row_id = cur.lastrowid
            if row_id is not None:
                self._extend_summary([(row_id, payload)])
        if row_id is None:
            raise RuntimeError("sqlite returned no row id")
        return row_id

    def get(self, item_id: int) -> str | None:
        """Return the payload of one row, or None."""
        with self._lock:
            row = self._conn.execute(
                "SELECT payload FROM items WHERE id = ?", (item_id,)
            ).fetchone()
        return None if row is None else str(row[0])

    def dump(self, after: int, limit: int) -> list[list[Any]]:
        """Rows with id > after, ordered by id; limit < 0 means all."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, payload FROM items WHERE id > ? ORDER BY id LIMIT ?",
                (after, limit),
            ).fetchall()
        return [[int(r[0]), str(r[1])] for r in rows]

    def load(self, rows: list[tuple[int, str]]) -> int:
        """INSERT OR IGNORE a batch in one transaction; return how many rows were new."""
        with self._lock:
            before = self._conn.total_changes
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(
                    "INSERT OR IGNORE INTO items (id, payload) VALUES (?, ?)", rows
                )
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            self._extend_summary(sorted(rows, key=lambda r: r[0]))
            return self._conn.total_changes - before

    def max_id(self) -> int:
        """The highest id, 0 when empty."""
        with self._lock:
            row = self._conn.execute("SELECT COALESCE(MAX(id), 0) FROM items").fetchone()
        return int(row[0])

    def _extend_summary(self, rows: list[tuple[int, str]]) -> None:
        """Account for rows just committed, in id order (caller holds the lock).

        Rows past the summarised end extend it; any other row (an id below the end, or
        one INSERT OR IGNORE may have skipped) drops it, to be recomputed when asked.
        """
        if self._digest is None:
            return
        for row_id, payload in rows:
            if row_id <= self._max_id:
                self._digest = None
                return
            self._digest.update(f"{row_id}:{payload}\n".encode())
            self._count += 1
            self._max_id = int(row_id)

    def summary(self) -> dict[str, Any]:
        """Row count, max id and a checksum that is equal iff the rows are equal: the
        SHA-256 of every ``id:payload\\n`` line in id order."""
        with self._lock:
            if self._digest is None:
                self._summarise()
            checksum = self._digest.copy().hexdigest()
            return {"count": self._count, "max_id": self._max_id, "checksum": checksum}

    def _summarise(self) -> None:
        """Summarise every row afresh (caller holds the lock, or is __init__)."""
        digest = hashlib.sha256()
        count = max_id = 0
        for row_id, payload in self._conn.execute("SELECT id, payload FROM items ORDER BY id"):
            digest.update(f"{row_id}:{payload}\n".encode())
            count += 1
            max_id = int(row_id)
        self._digest, self._count, self._max_id = digest, count, max_id


@dataclass
class WriteGate:
    """The db's write mode, shared by all request threads.

    ``normal`` inserts locally, ``hold`` parks writers until the mode changes, ``forward``
    sends writes to another db. ``inflight`` counts writes that passed the gate and are
    being inserted or forwarded, so a freeze can wait for them to finish.
    """

    state_path: Path
    mode: str = "normal"
    forward_url: str | None = None
    inflight: int = 0
    held: int = 0
    cond: threading.Condition = field(default_factory=threading.Condition)

    def load(self) -> None:
        """Restore the persisted mode so a restarted db comes back in the same mode."""
        with contextlib.suppress(FileNotFoundError, ValueError, TypeError):
            raw = json.loads(self.state_path.read_text())
            if raw.get("mode") in WRITE_MODES:
                self.mode = str(raw["mode"])
                self.forward_url = raw.get("forward_url")
            if self.mode == "forward" and not self.forward_url:
                self.mode = "hold"

    def set_mode(self, mode: str, forward_url: str | None = None) -> None:
        """Switch mode, persist it, and wake every held writer. Caller holds ``cond``."""
        self.mode = mode
        self.forward_url = forward_url if mode == "forward" else None
        _atomic_write_json(self.state_path, {"mode": mode, "forward_url": self.forward_url})
        self.cond.notify_all()

    def snapshot(self) -> dict[str, Any]:
        """The mode as reported by GET /admin/mode."""
        with self.cond:
            return {
                "mode": self.mode,
                "forward_url": self.forward_url,
                "inflight": self.inflight,
                "held": self.held,
            }

    @contextlib.contextmanager
    def admit(self, hold_timeout: float) -> Iterator[tuple[str, str | None]]:
        """Wait out a hold, then count the write as in flight until the block exits."""
        deadline = time.monotonic() + hold_timeout
        with self.cond:
            while self.mode == "hold":
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise HttpError(503, "write held too long: the db is frozen", mode="hold")
                self.held += 1
                try:
                    self.cond.wait(remaining)
                finally:
                    self.held -= 1
            mode, url = self.mode, self.forward_url
            self.inflight += 1
        try:
            yield mode, url
        finally:
            with self.cond:
                self.inflight -= 1
                self.cond.notify_all()


# ---------------------------------------------------------------------------------------
# Upstream HTTP client (web -> db, db -> db)
# ---------------------------------------------------------------------------------------


class UpstreamError(Exception):
    """The upstream could not be reached or gave no usable answer."""


def _peer_closed(sock: socket.socket) -> bool:
    # An idle keep-alive socket that is readable has either hit EOF or holds bytes nobody
    # asked for; both mean it must not carry another request.
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


class Upstreams:
    """Keep-alive connections from one request thread to upstream servers."""

    def __init__(self, timeout: float = UPSTREAM_TIMEOUT) -> None:
        self._timeout = timeout
        self._conns: dict[tuple[str, int], http.client.HTTPConnection] = {}

    def close(self) -> None:
        """Close every connection."""
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    def call(
        self,
        base_url: str,
        method: str,
        path: str,
        payload: Any = None,
        *,
        headers: Mapping[str, str] | None = None,
        idempotent: bool = False,
    ) -> tuple[int, dict[str, Any]]:
        """Send one JSON request and return (status, JSON body).

        A reused connection that turns out stale is replaced once, provided the request
        cannot have been processed: always when sending failed, and also when reading
        failed for idempotent requests. Anything else raises :class:`UpstreamError`.
        """
        parts = urlsplit(base_url)
        if parts.hostname is None or parts.port is None:
            raise UpstreamError(f"bad upstream url {base_url!r}")
        key = (parts.hostname, parts.port)
        conn = self._conns.get(key)
        if conn is None:
            conn = http.client.HTTPConnection(key[0], key[1], timeout=self._timeout)
            self._conns[key] = conn
        elif conn.sock is not None and _peer_closed(conn.sock):
            conn.close()
        body = None if payload is None else json.dumps(payload).encode()
        hdrs = {"Content-Type": "application/json", "Accept": "application/json"}
        hdrs.update(headers or {})
        for attempt in (1, 2):
            reused = conn.sock is not None
            try:
                conn.request(method, path, body=body, headers=hdrs)
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                if reused and attempt == 1:
                    continue
                raise UpstreamError(f"cannot send to {base_url}: {exc!r}") from exc
            try:
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                if reused and attempt == 1 and idempotent:
                    continue
                raise UpstreamError(f"no answer from {base_url}: {exc!r}") from exc
            if resp.will_close:
                conn.close()
            try:
                obj = json.loads(data) if data else {}
            except ValueError:
                obj = {"raw": data.decode("utf-8", "replace")[:500]}
            if not isinstance(obj, dict):
                obj = {"value": obj}
            return resp.status, obj
        raise UpstreamError(f"no answer from {base_url}")  # pragma: no cover


# ---------------------------------------------------------------------------------------
# The application
# ---------------------------------------------------------------------------------------


@dataclass
class Request:
    """One parsed request, as the router sees it."""

    method: str
    path: str
    query: dict[str, list[str]]
    body: bytes
    headers: Mapping[str, str]  # keys lower-cased
    upstreams: Upstreams

    def json(self) -> dict[str, Any]:
        """The body as a JSON object; an empty body is ``{}``."""
        if not self.body.strip():
            return {}
        try:
            obj = json.loads(self.body)
        except ValueError as exc:
            raise HttpError(400, f"bad JSON body: {exc}") from exc
        if not isinstance(obj, dict):
            raise HttpError(400, "the JSON body must be an object")
        return obj

    def query_int(self, name: str, default: int) -> int:
        """An integer query parameter."""
        values = self.query.get(name)
        if not values:
            return default
        try:
            return int(values[-1])
        except ValueError as exc:
            raise HttpError(400, f"query parameter {name!r} must be an integer") from exc


def _path_id(path: str, prefix: str) -> int:
    try:
        return int(path[len(prefix) :])
    except ValueError as exc:
        raise HttpError(404, f"no such item: {path[len(prefix) :]!r}") from exc


class App:
    """Routes requests for one server; holds its state."""

    def __init__(self, root: Path, config: AppConfig) -> None:
        self.root = root
        self.config = config
        self.packages = PackageState(root, config)
        self.health_fail = config.health_fail
        self.write_delay = 0.0
        self.exit_after_commit = False
        # Read once at start: a missing or world-readable token file stops the boot.
        self.token = read_token(config.control_token_file) if config.control_token_file else None
        self.booted_at = 0.0
        self.db: Database | None = None
        self.gate: WriteGate | None = None
        if config.role == "db":
            self.gate = WriteGate(state_path=root / "mode.json")
            self.gate.load()

    def boot(self) -> None:
        """Run the simulated first-boot upgrade (or reboot) and open the data store."""
        self.packages.boot()
        if self.config.role == "db":
            self.db = Database(self.root / "data" / "app.db")
        self.booted_at = time.time()

    def close(self) -> None:
        """Release the data store."""
        if self.db is not None:
            self.db.close()

    def _identity(self) -> dict[str, Any]:
        return {
            "id": self.config.id,
            "role": self.config.role,
            "generation": self.config.generation,
        }

    # -- routing -------------------------------------------------------------------------

    def handle(self, req: Request) -> tuple[int, dict[str, Any]]:
        """Answer one request with (status, JSON body)."""
        method, path = req.method, req.path
        if _is_control(path) and not token_ok(self.token, req.headers.get(TOKEN_HEADER.lower())):
            raise HttpError(403, f"{path} requires a valid {TOKEN_HEADER} header")
        if method == "GET":
            if path == "/":
                return 200, self._identity()
            if path == "/health":
                return self._health()
            if path == "/facts":
                return 200, self._facts()
        if method == "POST" and path == "/admin/set-package":
            return self._set_package(req)
        if method == "POST" and path == "/admin/fault":
            return self._set_fault(req)
        if method == "POST" and path == "/admin/upgrade":
            return self._upgrade(req)
        if self.config.role == "web":
            if method == "POST" and path == "/items":
                return self._web_post_item(req)
            if method == "GET" and path.startswith("/items/"):
                return self._web_get_item(req, _path_id(path, "/items/"))
        if self.config.role == "db":
            routed = self._db_route(req)
            if routed is not None:
                return routed
        raise HttpError(404, f"no route for {method} {path}")

    def _db_route(self, req: Request) -> tuple[int, dict[str, Any]] | None:
        method, path = req.method, req.path
        if method == "POST":
            if path == "/db/items":
                return self._db_post_item(req)
            if path == "/db/load":
                return self._db_load(req)
            if path == "/admin/freeze":
                return self._freeze()
            if path == "/admin/forward":
                return self._forward(req)
            if path == "/admin/unfreeze":
                return self._unfreeze()
        if method == "GET":
            if path.startswith("/db/items/"):
                return self._db_get_item(_path_id(path, "/db/items/"))
            if path == "/db/dump":
                return self._db_dump(req)
            if path == "/db/summary":
                return 200, self._database().summary()
            if path == "/admin/mode":
                return 200, self._gate().snapshot()
        return None

    # -- every role ----------------------------------------------------------------------

    def _health(self) -> tuple[int, dict[str, Any]]:
        if self.health_fail:
            return 503, {"ok": False, **self._identity(), "reason": "health_fail fault"}
        return 200, {"ok": True, **self._identity()}

    def _facts(self) -> dict[str, Any]:
        reboot_required, reboot_pkgs = self.packages.reboot_required()
        return {
            **self._identity(),
            "stack": self.config.stack,
            "run": self.config.run,
            "image": self.config.image,
            "installed": dict(self.packages.installed),
            "pending": self.packages.pending(),
            "reboot_required": reboot_required,
            "reboot_required_pkgs": reboot_pkgs,
            "boot_count": self.packages.boot_count,
            "booted_at": self.booted_at,
            # Read by the local cloud's transport (providers/local/transport.py), which
            # answers changeover's fact script from them in the real commands' formats.
            "kernel": {
                "running": self.packages.running_kernel,
                "installed": [v for v in [kernel_version(self.packages.installed)] if v],
            },
            "os_release": os_release(str(self.config.image.get("name", ""))),
            "held": sorted(n for n in self.config.hold_packages if n in self.packages.installed),
            "uptime": round(time.time() - self.booted_at, 3) if self.booted_at else 0.0,
        }

    def _set_package(self, req: Request) -> tuple[int, dict[str, Any]]:
        body = req.json()
        name, version = body.get("name"), body.get("version")
        if not isinstance(name, str) or not name:
            raise HttpError(400, "'name' must be a non-empty string")
        if version is not None and not isinstance(version, str):
            raise HttpError(400, "'version' must be a string or null")
        return 200, {"installed": self.packages.set_package(name, version)}

    def _upgrade(self, req: Request) -> tuple[int, dict[str, Any]]:
        body = req.json()
        flags = {k: body.get(k, False) for k in ("security_only", "dist_upgrade")}
        for key, value in flags.items():
            if not isinstance(value, bool):
                raise HttpError(400, f"{key!r} must be a boolean")
        result = self.packages.upgrade(
            security_only=flags["security_only"], dist_upgrade=flags["dist_upgrade"]
        )
        _log(f"{self.config.id} upgraded {sorted(result['upgraded'])}")
        return 200, result

    def _set_fault(self, req: Request) -> tuple[int, dict[str, Any]]:
        body = req.json()
        if "health_fail" in body:
            if not isinstance(body["health_fail"], bool):
                raise HttpError(400, "'health_fail' must be a boolean")
            self.health_fail = body["health_fail"]
        if "write_delay" in body:
            delay = body["write_delay"]
            if (
                not isinstance(delay, (int, float))
                or isinstance(delay, bool)
                or not (0 <= delay <= HOLD_TIMEOUT)
            ):
                raise HttpError(
                    400, f"'write_delay' must be a number of seconds in 0..{HOLD_TIMEOUT}"
                )
            self.write_delay = float(delay)
        if "exit_after_commit" in body:
            if not isinstance(body["exit_after_commit"], bool):
                raise HttpError(400, "'exit_after_commit' must be a boolean")
            self.exit_after_commit = body["exit_after_commit"]
        return 200, {
            "faults": {
                "health_fail": self.health_fail,
                "write_delay": self.write_delay,
                "exit_after_commit": self.exit_after_commit,
            }
        }

    # -- web role ------------------------------------------------------------------------

    def _db_url(self) -> str:
        if not self.config.db_url:
            raise HttpError(502, "this web server has no db_url")
        return self.config.db_url

    def _web_post_item(self, req: Request) -> tuple[int, dict[str, Any]]:
        payload = req.json().get("payload")
        if not isinstance(payload, str):
            raise HttpError(400, "'payload' must be a string")
        try:
            status, answer = req.upstreams.call(
                self._db_url(), "POST", "/db/items", {"payload": payload}
            )
        except UpstreamError as exc:
            raise HttpError(502, f"db unreachable: {exc}") from exc
        if status != 201 or not isinstance(answer.get("id"), int):
            raise HttpError(502, f"db answered {status}", db=answer)
        return 201, {"id": answer["id"], "payload": payload, "served_by": self.config.id}

    def _web_get_item(self, req: Request, item_id: int) -> tuple[int, dict[str, Any]]:
        try:
            status, answer = req.upstreams.call(
                self._db_url(), "GET", f"/db/items/{item_id}", idempotent=True
            )
        except UpstreamError as exc:
            raise HttpError(502, f"db unreachable: {exc}") from exc
        if status == 200:
            return 200, {**answer, "served_by": self.config.id}
        if status == 404:
            return 404, answer
        raise HttpError(502, f"db answered {status}", db=answer)

    # -- db role -------------------------------------------------------------------------

    def _database(self) -> Database:
        if self.db is None:
            raise HttpError(503, "the database is not open")
        return self.db

    def _gate(self) -> WriteGate:
        if self.gate is None:
            raise HttpError(404, "not a db server")
        return self.gate

    def _db_post_item(self, req: Request) -> tuple[int, dict[str, Any]]:
        payload = req.json().get("payload")
        if not isinstance(payload, str):
            raise HttpError(400, "'payload' must be a string")
        try:
            hops = int(req.headers.get(FORWARD_HOPS_HEADER.lower()) or 0)
        except ValueError:
            hops = 0
        with self._gate().admit(HOLD_TIMEOUT) as (mode, forward_url):
            if mode == "normal":
                if self.write_delay > 0:
                    time.sleep(self.write_delay)  # the write_delay fault: in flight, not committed
                row_id = self._database().insert(payload)
                if self.exit_after_commit:
                    _log(f"exit_after_commit fault: dying with write {row_id} unanswered")
                    os._exit(1)
                return 201, {"id": row_id, "payload": payload}
            if forward_url is None:  # pragma: no cover - set_mode guarantees a url
                raise HttpError(503, "forward mode without a url")
            if hops >= MAX_FORWARD_HOPS:
                raise HttpError(508, "write forwarded too many times (a forwarding loop?)")
            base, path = _split_forward_url(forward_url)
            try:
                status, answer = req.upstreams.call(
                    base,
                    "POST",
                    path,
                    {"payload": payload},
                    headers={FORWARD_HOPS_HEADER: str(hops + 1)},
                )
            except UpstreamError as exc:
                raise HttpError(502, f"forward target unreachable: {exc}") from exc
            return status, answer

    def _db_get_item(self, item_id: int) -> tuple[int, dict[str, Any]]:
        payload = self._database().get(item_id)
        if payload is None:
            raise HttpError(404, f"no such item: {item_id}")
        return 200, {"id": item_id, "payload": payload}

    def _db_dump(self, req: Request) -> tuple[int, dict[str, Any]]:
        after = req.query_int("after", 0)
        limit = req.query_int("limit", -1)
        return 200, {"rows": self._database().dump(after, limit)}

    def _db_load(self, req: Request) -> tuple[int, dict[str, Any]]:
        raw_rows = req.json().get("rows")
        if not isinstance(raw_rows, list):
            raise HttpError(400, "'rows' must be a list of [id, payload]")
        rows: list[tuple[int, str]] = []
        for row in raw_rows:
            if (
                not isinstance(row, list)
                or len(row) != 2
                or not isinstance(row[0], int)
                or isinstance(row[0], bool)
                or not isinstance(row[1], str)
            ):
                raise HttpError(400, f"bad row {row!r}: expected [int, str]")
            rows.append((row[0], row[1]))
        loaded = self._database().load(rows)
        return 200, {"loaded": loaded, "received": len(rows)}

    def _freeze(self) -> tuple[int, dict[str, Any]]:
        gate = self._gate()
        deadline = time.monotonic() + FREEZE_DRAIN_TIMEOUT
        with gate.cond:
            if gate.mode != "hold":
                gate.set_mode("hold")
            while gate.inflight > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise HttpError(
                        503,
                        "in-flight writes did not finish",
                        mode="hold",
                        inflight=gate.inflight,
                    )
                gate.cond.wait(remaining)
            # Holding cond: no writer can pass the gate while we read max_id.
            max_id = self._database().max_id()
            return 200, {"mode": "hold", "max_id": max_id, "held": gate.held}

    def _forward(self, req: Request) -> tuple[int, dict[str, Any]]:
        url = req.json().get("url")
        if not isinstance(url, str) or not url.startswith("http://"):
            raise HttpError(400, "'url' must be an http:// URL")
        try:
            _split_forward_url(url)
        except UpstreamError as exc:
            raise HttpError(400, str(exc)) from exc
        gate = self._gate()
        with gate.cond:
            gate.set_mode("forward", url)
        return 200, gate.snapshot()

    def _unfreeze(self) -> tuple[int, dict[str, Any]]:
        gate = self._gate()
        with gate.cond:
            gate.set_mode("normal")
        return 200, gate.snapshot()


def _is_control(path: str) -> bool:
    """Endpoints that change how the server behaves, or write past its write gate."""
    return path.startswith("/admin/") or path == "/db/load"


def _split_forward_url(url: str) -> tuple[str, str]:
    """Accept a db base URL or the full URL of its ``/db/items`` endpoint."""
    parts = urlsplit(url)
    if not parts.hostname or parts.port is None:
        raise UpstreamError(f"bad forward url {url!r}: host and port required")
    path = parts.path if parts.path not in ("", "/") else "/db/items"
    return f"http://{parts.hostname}:{parts.port}", path


# ---------------------------------------------------------------------------------------
# HTTP plumbing
# ---------------------------------------------------------------------------------------


class AppHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that knows its :class:`App`."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, app: App, port: int = 0) -> None:
        self.app = app
        super().__init__(("127.0.0.1", port), AppRequestHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the FQDN of the address, which can stall on a
        # host with slow DNS; loopback needs no name.
        socketserver.TCPServer.server_bind(self)
        self.server_name = "127.0.0.1"
        self.server_port = self.server_address[1]


class AppRequestHandler(BaseHTTPRequestHandler):
    """Reads a request, hands it to the App, writes the JSON answer; never raises."""

    protocol_version = "HTTP/1.1"
    server_version = "changeover-demo-app/1"
    # Responses are written as headers + body; without NODELAY Nagle and delayed ACKs
    # would add ~40 ms to every keep-alive round trip.
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        self.upstreams = Upstreams()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.upstreams.close()

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # Per-request lines would dominate the log at hundreds of requests per second.
        return

    def log_message(self, format: str, *args: Any) -> None:
        _log(f"{self.address_string()} {format % args}")

    def do_GET(self) -> None:
        """Handle GET."""
        self._dispatch()

    def do_POST(self) -> None:
        """Handle POST."""
        self._dispatch()

    def do_PUT(self) -> None:
        """Handle PUT."""
        self._dispatch()

    def do_DELETE(self) -> None:
        """Handle DELETE."""
        self._dispatch()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise HttpError(501, "chunked request bodies are not supported")
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            return b""
        try:
            length = int(raw_length)
        except ValueError as exc:
            self.close_connection = True
            raise HttpError(400, "bad Content-Length") from exc
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True
            raise HttpError(413 if length > 0 else 400, "bad Content-Length")
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            raise HttpError(400, "truncated body")
        return body

    def _dispatch(self) -> None:
        app = cast(AppHTTPServer, self.server).app
        try:
            body = self._read_body()
            parts = urlsplit(self.path)
            req = Request(
                method=self.command,
                path=parts.path,
                query=parse_qs(parts.query),
                body=body,
                headers={k.lower(): v for k, v in self.headers.items()},
                upstreams=self.upstreams,
            )
            status, obj = app.handle(req)
        except HttpError as exc:
            status, obj = exc.status, exc.body
        except Exception as exc:
            _log(f"500 on {self.command} {self.path}:\n{traceback.format_exc()}")
            status, obj = 500, {"error": f"internal error: {exc!r}"}
        self._send_json(status, obj)

    def _send_json(self, status: int, obj: dict[str, Any]) -> None:
        data = json.dumps(obj, separators=(",", ":")).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            # The client went away; nothing to answer.
            self.close_connection = True


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------


def _bind(app: App, port: int) -> AppHTTPServer:
    """Bind the port the host had before (a reboot keeps its address), else any port."""
    if port:
        try:
            return AppHTTPServer(app, port)
        except OSError:
            _log(f"{app.config.id}: port {port} is taken; binding another")
    return AppHTTPServer(app)


def main(argv: list[str] | None = None) -> int:
    """Boot the server rooted at ``--root`` and serve until SIGTERM."""
    parser = argparse.ArgumentParser(prog="providers.local.app", description=__doc__)
    parser.add_argument("--root", required=True, type=Path)
    ns = parser.parse_args(argv)
    root: Path = ns.root.resolve()

    # A reboot keeps the host's port when it is still free (see _bind); the cloud moves
    # the port file aside before the restart (cloud.reboot_server) so nobody reads it.
    previous_port = 0
    for name in ("port.prev", "port"):
        with contextlib.suppress(FileNotFoundError, ValueError):
            previous_port = previous_port or int((root / name).read_text())
    # A stale port file from a previous boot would tell pollers we are up already.
    with contextlib.suppress(FileNotFoundError):
        (root / "port").unlink()
    atomic_write_text(root / "pid", f"{os.getpid()}\n")

    server: AppHTTPServer | None = None
    stopping = threading.Event()

    def on_signal(signum: int, _frame: types.FrameType | None) -> None:
        stopping.set()
        if server is None:
            raise SystemExit(0)
        # shutdown() blocks until serve_forever returns, which runs in this very thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    config = AppConfig.load(root / "server.json")
    try:
        app = App(root, config)
    except TokenError as exc:
        _log(f"{config.id} cannot start: {exc}")
        return 1
    if config.boot_delay > 0:
        time.sleep(config.boot_delay)
    app.boot()
    server = _bind(app, previous_port)
    try:
        port = server.server_address[1]
        atomic_write_text(root / "port", f"{port}\n")
        _log(f"{config.id} ({config.role}, generation {config.generation}) on 127.0.0.1:{port}")
        if config.die_after is not None:
            # The "server dies" fault: an abrupt exit, like a crashed host, no clean shutdown.
            threading.Timer(config.die_after, os._exit, args=(1,)).start()
        if not stopping.is_set():
            server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
        app.close()
        _log(f"{config.id} stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
