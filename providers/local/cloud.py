"""The embedded local cloud: a registry of real server and proxy processes.

Servers are real OS processes (``providers.local.app``) on 127.0.0.1 with their own
root and data dir; an elastic address is a real reverse proxy (``providers.local.proxy``)
on a stable loopback port. Both are started detached and outlive changeover. The
registry, the fault table and the provider call journal live in ``STATE_DIR/local/``
as SQLite, so a test, a scenario and a separate changeover process all see one cloud.

Package state is SIMULATED: an image is a package manifest, a package index file plays
the apt repository, and a fresh server "upgrades" to the index's latest versions at
boot (see providers/local/app.py).

Control: every cloud has a random token in ``STATE_DIR/local/control-token`` (0600),
created with the cloud (or on the first use of an older state dir that lacks one). Its
servers and proxies read it from that path at start and require it on every control
endpoint (see providers/local/http.py); only the path is on their command lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.db import secure_state_dir
from orchestrator.errors import PreconditionFailed
from orchestrator.models import (
    TAG_GENERATION,
    TAG_ROLE,
    TAG_RUN,
    TAG_STACK,
    TAG_TOKEN,
    Server,
    ServerState,
)
from orchestrator.redact import register_secret
from providers.local.daemon import kill_pid, pid_alive, spawn_detached
from providers.local.http import TOKEN_FILE, TokenError, ensure_token

SCHEMA = """
CREATE TABLE IF NOT EXISTS servers (
    id TEXT PRIMARY KEY, stack TEXT NOT NULL, role TEXT NOT NULL, generation INTEGER NOT NULL,
    run TEXT NOT NULL, idem_key TEXT, root TEXT NOT NULL, pid INTEGER, destroyed INTEGER
    NOT NULL DEFAULT 0, created_at REAL NOT NULL, spec_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS servers_stack ON servers(stack, destroyed);
CREATE INDEX IF NOT EXISTS servers_idem ON servers(idem_key);
CREATE TABLE IF NOT EXISTS addresses (
    stack TEXT NOT NULL, name TEXT NOT NULL, root TEXT NOT NULL, pid INTEGER, port INTEGER,
    PRIMARY KEY (stack, name)
);
CREATE TABLE IF NOT EXISTS faults (
    id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, op TEXT, remaining INTEGER
    NOT NULL, value_json TEXT NOT NULL
);
-- Tags an operator sets on a server (changeover:do-not-disrupt), beside the ownership ones.
CREATE TABLE IF NOT EXISTS server_tags (
    server_id TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
    PRIMARY KEY (server_id, key)
);
CREATE TABLE IF NOT EXISTS calls (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, pid INTEGER NOT NULL,
    op TEXT NOT NULL, mutating INTEGER NOT NULL, detail TEXT
);
"""

# The simulated apt world. Images are older than the index, so a fresh server upgrades.
IMAGES: dict[str, dict[str, str]] = {
    "debian-12-base": {
        "openssl": "3.0.11-1~deb12u2",
        "linux-image-amd64": "6.1.76-1",
        "libc6": "2.36-9+deb12u4",
        "tzdata": "2024a-0+deb12u1",
        "nginx": "1.22.1-9",
        "python3": "3.11.2-1+b1",
    },
}
DEFAULT_INDEX: dict[str, Any] = {
    "packages": {
        "openssl": {"version": "3.0.15-1~deb12u1", "security": True, "reboot": False},
        "linux-image-amd64": {"version": "6.1.119-1", "security": True, "reboot": True},
        "libc6": {"version": "2.36-9+deb12u9", "security": True, "reboot": False},
        "tzdata": {"version": "2024b-0+deb12u1", "security": False, "reboot": False},
        "nginx": {"version": "1.22.1-9", "security": False, "reboot": False},
        "python3": {"version": "3.11.2-1+b1", "security": False, "reboot": False},
    }
}

READY_TIMEOUT = 15.0  # seconds for a proxy to come up; servers are polled by WaitRunning


@dataclass(frozen=True)
class AddressInfo:
    """A running address proxy."""

    stack: str
    name: str
    port: int
    control_port: int
    pid: int


class LocalCloud:
    """The registry and process manager behind the local provider."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir.expanduser()
        self.root = self.state_dir / "local"
        secure_state_dir(self.state_dir)  # 0700: the cloud's files are the owner's only
        self.root.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._db() as db:
            db.executescript(SCHEMA)
        index = self.root / "package-index.json"
        if not index.exists():
            self.write_package_index(DEFAULT_INDEX)
        try:
            self.control_token = ensure_token(self.token_path)
        except TokenError as exc:
            raise PreconditionFailed(
                f"{exc}; it must be a file only its owner can read (chmod 600 {self.token_path})"
            ) from None
        register_secret(self.control_token)  # never in a log, the journal or an output

    @property
    def token_path(self) -> Path:
        """The 0600 file holding this cloud's control token."""
        return self.root / TOKEN_FILE

    # --- storage -------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.root / "cloud.db", timeout=30.0, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @property
    def package_index_path(self) -> Path:
        return self.root / "package-index.json"

    def write_package_index(self, index: dict[str, Any]) -> None:
        """Publish a new simulated package index (what `apt-get update` would see)."""
        tmp = self.package_index_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, self.package_index_path)

    def read_package_index(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.package_index_path.read_text())
        return data

    # --- call journal and faults ----------------------------------------------------------
    def record_call(self, op: str, mutating: bool, detail: str = "") -> None:
        self._db().execute(
            "INSERT INTO calls (ts, pid, op, mutating, detail) VALUES (?,?,?,?,?)",
            (time.time(), os.getpid(), op, int(mutating), detail),
        )

    def calls(self, since_id: int = 0) -> list[dict[str, Any]]:
        rows = (
            self._db()
            .execute("SELECT * FROM calls WHERE id > ? ORDER BY id", (since_id,))
            .fetchall()
        )
        return [dict(r) for r in rows]

    def last_call_id(self) -> int:
        row = self._db().execute("SELECT MAX(id) AS m FROM calls").fetchone()
        return int(row["m"] or 0)

    def inject(self, kind: str, *, op: str | None = None, times: int = 1, **value: Any) -> None:
        """Inject a fault. times=-1 means until cleared.

        kinds: ``fail_call`` (op, error='transient'|'fatal'), ``latency`` (op, seconds),
        ``server`` (the next `times` servers created, optionally only of `role`, get
        boot_delay / health_fail / hold_packages / keep_reboot_required / die_after).
        """
        if kind not in ("fail_call", "latency", "server"):
            raise ValueError(f"unknown fault kind {kind!r}")
        self._db().execute(
            "INSERT INTO faults (kind, op, remaining, value_json) VALUES (?,?,?,?)",
            (kind, op, times, json.dumps(value)),
        )

    def clear_faults(self) -> None:
        self._db().execute("DELETE FROM faults")

    def take_faults(
        self, kind: str, op: str | None = None, role: str | None = None
    ) -> list[dict[str, Any]]:
        """Consume one use of each matching fault and return their values."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            rows = db.execute(
                "SELECT * FROM faults WHERE kind=? AND (op IS NULL OR op=?) AND remaining != 0",
                (kind, op),
            ).fetchall()
            taken = []
            for r in rows:
                value = json.loads(r["value_json"])
                if role is not None and value.get("role") not in (None, role):
                    continue
                if r["remaining"] > 0:
                    db.execute("UPDATE faults SET remaining=remaining-1 WHERE id=?", (r["id"],))
                taken.append(value)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return taken

    # --- servers -----------------------------------------------------------------------
    def server_rows(
        self, stack: str | None = None, include_destroyed: bool = False
    ) -> list[sqlite3.Row]:
        sql = "SELECT * FROM servers WHERE 1=1"
        args: list[Any] = []
        if stack is not None:
            sql += " AND stack=?"
            args.append(stack)
        if not include_destroyed:
            sql += " AND destroyed=0"
        return list(self._db().execute(sql + " ORDER BY created_at, id", args).fetchall())

    def server_row(self, server_id: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = (
            self._db().execute("SELECT * FROM servers WHERE id=?", (server_id,)).fetchone()
        )
        return row

    def to_server(self, row: sqlite3.Row) -> Server:
        root = Path(row["root"])
        port: int | None = None
        state: ServerState
        if row["destroyed"]:
            state = "terminated"
        elif row["pid"] is None:
            state = "pending"
        elif not pid_alive(row["pid"]):
            state = "stopped"
        else:
            try:
                port = int((root / "port").read_text())
                state = "running"
            except (FileNotFoundError, ValueError):
                state = "pending"
        return Server(
            id=row["id"],
            stack=row["stack"],
            role=row["role"],
            generation=row["generation"],
            run=row["run"],
            state=state,
            host="127.0.0.1" if port else None,
            port=port,
            created_at=row["created_at"],
            tags={
                **self.server_tags(row["id"]),
                TAG_STACK: row["stack"],
                TAG_ROLE: row["role"],
                TAG_GENERATION: str(row["generation"]),
                TAG_RUN: row["run"],
                TAG_TOKEN: row["idem_key"] or "",
            },
        )

    def server_tags(self, server_id: str) -> dict[str, str]:
        """The tags an operator set on a server (the ownership tags are its row's)."""
        rows = self._db().execute(
            "SELECT key, value FROM server_tags WHERE server_id=? ORDER BY key", (server_id,)
        )
        return {r["key"]: r["value"] for r in rows}

    def tag_server(self, server_id: str, key: str, value: str = "true") -> None:
        """Set a tag on a server, as an operator would in a cloud's console (for example
        TAG_DO_NOT_DISRUPT). The ownership tags are not the operator's to change."""
        if key in (TAG_STACK, TAG_ROLE, TAG_GENERATION, TAG_RUN, TAG_TOKEN):
            raise ValueError(f"{key} is an ownership tag: changeover sets it")
        if self.server_row(server_id) is None:
            raise ValueError(f"no server {server_id}")
        self._db().execute(
            "INSERT OR REPLACE INTO server_tags (server_id, key, value) VALUES (?,?,?)",
            (server_id, key, value),
        )

    def untag_server(self, server_id: str, key: str) -> None:
        """Remove a tag an operator set."""
        self._db().execute("DELETE FROM server_tags WHERE server_id=? AND key=?", (server_id, key))

    def register_server(
        self,
        *,
        stack: str,
        role: str,
        generation: int,
        run: str,
        idem_key: str | None,
        spec: dict[str, Any],
    ) -> str:
        server_id = "srv-" + uuid.uuid4().hex[:8]
        root = self.root / "servers" / server_id
        self._db().execute(
            "INSERT INTO servers (id, stack, role, generation, run, idem_key, root, created_at, "
            "spec_json) VALUES (?,?,?,?,?,?,?,?,?)",
            (
                server_id,
                stack,
                role,
                generation,
                run,
                idem_key,
                str(root),
                time.time(),
                json.dumps(spec),
            ),
        )
        return server_id

    def boot_server(self, server_id: str) -> int:
        """Write server.json and start the process. The row exists before the process."""
        row = self.server_row(server_id)
        assert row is not None
        spec = json.loads(row["spec_json"])
        root = Path(row["root"])
        root.mkdir(parents=True, exist_ok=True)
        image = spec.get("image", "debian-12-base")
        config = {
            "id": server_id,
            "stack": row["stack"],
            "role": row["role"],
            "generation": row["generation"],
            "run": row["run"],
            "db_url": spec.get("db_url"),
            "image": {"name": image, "packages": IMAGES.get(image, IMAGES["debian-12-base"])},
            "package_index": str(self.package_index_path),
            "boot_delay": float(spec.get("boot_delay", 0.0)),
            "control_token_file": str(self.token_path),
            "faults": {
                "health_fail": bool(spec.get("health_fail", False)),
                "hold_packages": list(spec.get("hold_packages", [])),
                "keep_reboot_required": bool(spec.get("keep_reboot_required", False)),
                "die_after": spec.get("die_after"),
            },
        }
        (root / "server.json").write_text(json.dumps(config, indent=2))
        pid = spawn_detached(
            [sys.executable, *PROCESS_FLAGS, "-m", "providers.local.app", "--root", str(root)],
            log_path=root / "server.log",
            cwd=_import_root(),
        )
        self._db().execute("UPDATE servers SET pid=? WHERE id=?", (pid, server_id))
        return pid

    def destroy_server(self, server_id: str) -> None:
        row = self.server_row(server_id)
        if row is None:
            return
        if row["pid"]:
            kill_pid(row["pid"])
        self._db().execute("UPDATE servers SET destroyed=1 WHERE id=?", (server_id,))
        shutil.rmtree(row["root"], ignore_errors=True)

    def reboot_server(self, server_id: str) -> int:
        """A reboot: stop the server's process (SIGTERM, as systemd would), then start it
        again on the same root, data dir and (when free) port. Its packages stay; /var/run
        is cleared and the new kernel runs (providers/local/app.py). Returns the new pid."""
        row = self.server_row(server_id)
        if row is None or row["destroyed"]:
            raise PreconditionFailed(f"server {server_id} does not exist")
        if row["pid"]:
            kill_pid(row["pid"])
        # Down until the new boot writes its port: pollers must not see the old one.
        with contextlib.suppress(FileNotFoundError):
            os.replace(Path(row["root"]) / "port", Path(row["root"]) / "port.prev")
        return self.boot_server(server_id)

    def kill_server(self, server_id: str) -> None:
        """Fault: the server's process dies (it stays registered, now `stopped`)."""
        row = self.server_row(server_id)
        if row is not None and row["pid"]:
            kill_pid(row["pid"], grace=0.0)

    # --- addresses -----------------------------------------------------------------------
    def address_row(self, stack: str, name: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = (
            self._db()
            .execute("SELECT * FROM addresses WHERE stack=? AND name=?", (stack, name))
            .fetchone()
        )
        return row

    def address_rows(self) -> list[sqlite3.Row]:
        """Every address of the local cloud, of any stack."""
        return list(self._db().execute("SELECT * FROM addresses ORDER BY stack, name"))

    def address(self, stack: str, name: str) -> AddressInfo | None:
        """The running proxy of an address, or None if it is not running."""
        row = self.address_row(stack, name)
        if row is None or not row["pid"] or not pid_alive(row["pid"]):
            return None
        root = Path(row["root"])
        try:
            control = int((root / "control_port").read_text())
        except (FileNotFoundError, ValueError):
            return None
        return AddressInfo(stack, name, int(row["port"]), control, int(row["pid"]))

    def ensure_address(self, stack: str, name: str) -> AddressInfo:
        """Start the address proxy if it is not running; it keeps its port and members."""
        info = self.address(stack, name)
        if info is not None:
            return info
        row = self.address_row(stack, name)
        root = self.root / "addresses" / f"{stack}--{name}"
        root.mkdir(parents=True, exist_ok=True)
        for f in ("port", "control_port", "pid"):
            (root / f).unlink(missing_ok=True)
        port = int(row["port"]) if row is not None and row["port"] else 0
        pid = spawn_detached(
            [
                sys.executable,
                *PROCESS_FLAGS,
                "-m",
                "providers.local.proxy",
                "--root",
                str(root),
                "--port",
                str(port),
                "--token-file",
                str(self.token_path),
            ],
            log_path=root / "proxy.log",
            cwd=_import_root(),
        )
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if (root / "control_port").exists() and (root / "port").exists():
                break
            if not pid_alive(pid):
                raise RuntimeError(f"address proxy for {stack}/{name} died; see {root}/proxy.log")
            time.sleep(0.02)
        else:
            kill_pid(pid)
            raise RuntimeError(f"address proxy for {stack}/{name} did not start")
        port = int((root / "port").read_text())
        self._db().execute(
            "INSERT OR REPLACE INTO addresses (stack, name, root, pid, port) VALUES (?,?,?,?,?)",
            (stack, name, str(root), pid, port),
        )
        info = self.address(stack, name)
        assert info is not None
        return info

    # --- the whole cloud -------------------------------------------------------------------
    def processes(self) -> list[dict[str, Any]]:
        """Every process the cloud started that is still alive."""
        out = []
        for row in self.server_rows():
            if row["pid"] and pid_alive(row["pid"]):
                out.append(
                    {"kind": "server", "id": row["id"], "stack": row["stack"], "pid": row["pid"]}
                )
        for row in self._db().execute("SELECT * FROM addresses").fetchall():
            if row["pid"] and pid_alive(row["pid"]):
                out.append(
                    {"kind": "address", "id": row["name"], "stack": row["stack"], "pid": row["pid"]}
                )
        return out

    def down(self) -> int:
        """Stop every server and proxy of this cloud. Returns how many were stopped."""
        stopped = 0
        for row in self.server_rows():
            self.destroy_server(row["id"])
            stopped += 1
        for row in self._db().execute("SELECT * FROM addresses").fetchall():
            if row["pid"] and pid_alive(row["pid"]):
                kill_pid(row["pid"])
                stopped += 1
            self._db().execute(
                "UPDATE addresses SET pid=NULL WHERE stack=? AND name=?",
                (row["stack"], row["name"]),
            )
        return stopped


# A server and a proxy need only the standard library and their own package, which `-m`
# finds in the working directory (_import_root): -S skips site-packages and its .pth
# files (a development install's import finder among them), so a server boots on less
# CPU, taken from the servers still serving: 0.084 -> 0.075 s of CPU to import the app
# in a user install, 0.107 -> 0.072 s in an editable one.
PROCESS_FLAGS = ("-S",)


def _import_root() -> Path:
    """Where `python -m providers...` resolves: the parent of the providers package."""
    return Path(__file__).resolve().parents[2]
