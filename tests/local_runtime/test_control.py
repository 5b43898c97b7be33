"""The local cloud's control endpoints require the per-cloud token (issue 10, item 9)."""

from __future__ import annotations

import stat
import sys
import time
from pathlib import Path

import pytest

from orchestrator.rehearse import World
from providers.local.cloud import LocalCloud
from providers.local.daemon import kill_pid, pid_alive
from providers.local.http import TOKEN_FILE

from .conftest import Runtime, http_json

WRONG = "not-the-token"

# Every control endpoint of a db server, with a body that would change something.
DB_CONTROL = [
    ("POST", "/admin/freeze", None),
    ("POST", "/admin/forward", {"url": "http://127.0.0.1:9/db/items"}),
    ("POST", "/admin/unfreeze", None),
    ("GET", "/admin/mode", None),
    ("POST", "/admin/fault", {"health_fail": True}),
    ("POST", "/admin/set-package", {"name": "nginx", "version": "9.9"}),
    ("POST", "/db/load", {"rows": [[100, "injected"]]}),
]
WEB_CONTROL = [
    ("POST", "/admin/fault", {"health_fail": True}),
    ("POST", "/admin/set-package", {"name": "nginx", "version": "9.9"}),
]
PROXY_CONTROL = [
    ("GET", "/members", None),
    ("PUT", "/members", {"members": [{"id": "evil", "host": "127.0.0.1", "port": 9}]}),
    ("GET", "/stats", None),
    ("GET", "/health", None),
]


@pytest.mark.parametrize("token", [None, WRONG, ""], ids=["missing", "wrong", "empty"])
def test_server_control_endpoints_refuse_without_the_token(
    runtime: Runtime, token: str | None
) -> None:
    """Each /admin/* endpoint (and /db/load) answers 403 without the right token, and
    nothing changes: the db still takes writes locally, no row was loaded, the web server
    stays healthy with its packages."""
    db = runtime.start_app("db-1", "db")
    web = runtime.start_app("web-1", "web", db_url=db.url)
    for app, endpoints in ((db, DB_CONTROL), (web, WEB_CONTROL)):
        for method, path, body in endpoints:
            status, answer, _ = http_json(app.port, method, path, body, token=token)
            assert status == 403, (app.root.name, method, path, answer)
            assert "X-Changeover-Token" in answer["error"]
    mode = http_json(db.port, "GET", "/admin/mode", token=runtime.token)[1]
    assert (mode["mode"], mode["forward_url"]) == ("normal", None)
    assert http_json(db.port, "GET", "/db/summary")[1]["count"] == 0
    assert http_json(web.port, "GET", "/health")[0] == 200
    assert http_json(web.port, "GET", "/facts")[1]["installed"]["nginx"] != "9.9"
    # The data plane needs no token: reads, writes, health, facts.
    assert http_json(web.port, "POST", "/items", {"payload": "p"})[0] == 201
    # With the token, the same endpoints work.
    assert http_json(db.port, "POST", "/admin/freeze", token=runtime.token)[0] == 200
    assert http_json(db.port, "POST", "/admin/unfreeze", token=runtime.token)[0] == 200


@pytest.mark.parametrize("token", [None, WRONG], ids=["missing", "wrong"])
def test_proxy_control_endpoints_refuse_without_the_token(
    runtime: Runtime, token: str | None
) -> None:
    """Every route of the proxy's control port answers 403 without the right token; the
    members are unchanged, and the data port keeps serving them."""
    app = runtime.start_app("web-a")
    proxy = runtime.start_proxy()
    state = runtime.set_members(proxy, {"a": app})
    for method, path, body in PROXY_CONTROL:
        status, answer, _ = http_json(proxy.control_port, method, path, body, token=token)
        assert status == 403, (method, path, answer)
    assert http_json(proxy.control_port, "GET", "/members", token=proxy.token)[1] == state
    status, _, headers = http_json(proxy.port, "GET", "/")
    assert (status, headers["x-changeover-backend"]) == (200, "a")


def test_a_server_without_a_token_file_refuses_every_control_request(runtime: Runtime) -> None:
    """No configured token means no control at all (fail closed), not an open door."""
    db = runtime.start_app("db-1", "db")
    config = (db.root / "server.json").read_text().replace(str(runtime.token_path), "")
    (db.root / "server.json").write_text(config)
    kill_pid(db.pid)
    again = runtime.boot_app(db.root)
    for token in (None, runtime.token, ""):
        assert http_json(again.port, "POST", "/admin/freeze", token=token)[0] == 403


def test_processes_refuse_a_token_file_others_can_read(runtime: Runtime) -> None:
    """A token file that is group- or world-readable stops a proxy from starting."""
    token = runtime.token
    runtime.token_path.chmod(0o644)
    root = runtime.root / "address"
    argv = [sys.executable, "-m", "providers.local.proxy", "--root", str(root)]
    argv += ["--token-file", str(runtime.token_path)]
    pid = runtime.spawn(argv, root / "process.log")
    for _ in range(500):
        if not pid_alive(pid):
            break
        time.sleep(0.02)
    assert not pid_alive(pid)
    assert not (root / "port").exists()
    log = (root / "process.log").read_text()
    assert "readable by others" in log and token not in log


def test_the_cloud_token_is_private_and_never_on_a_command_line(tmp_path: Path) -> None:
    """The token file is 0600; the proxy and servers get its path, not the token."""
    cloud = LocalCloud(tmp_path)
    try:
        path = tmp_path / "local" / TOKEN_FILE
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert len(cloud.control_token) >= 32
        assert LocalCloud(tmp_path).control_token == cloud.control_token  # stable
        info = cloud.ensure_address("demo", "demo-eip")
        cmdline = Path(f"/proc/{info.pid}/cmdline").read_bytes()
        assert str(path).encode() in cmdline
        assert cloud.control_token.encode() not in cmdline
        environ = Path(f"/proc/{info.pid}/environ").read_bytes()
        assert cloud.control_token.encode() not in environ
    finally:
        cloud.down()
        cloud.close()


@pytest.mark.slow
def test_local_up_gives_an_old_state_dir_a_token(tmp_path: Path) -> None:
    """A state dir from before the token (no token file) gets one on `local up`, and the
    stack it starts answers its control endpoints to that token only."""
    world = World(tmp_path)
    try:
        token_path = tmp_path / "local" / TOKEN_FILE
        token_path.unlink()  # as a state dir made by an older changeover
        proc = world.cli("local", "up")
        assert proc.returncode == 0, proc.stderr
        assert stat.S_IMODE(token_path.stat().st_mode) == 0o600
        token = token_path.read_text().strip()
        world.cloud.control_token = token  # this object read the file before it was replaced
        assert len(world.members()) == 2
        info = world.cloud.address("demo", world.config.address)
        assert info is not None
        assert http_json(info.control_port, "GET", "/members")[0] == 403
        assert http_json(info.control_port, "GET", "/members", token=token)[0] == 200
    finally:
        world.down()


def test_a_token_file_others_can_read_is_refused_by_the_cli(tmp_path: Path) -> None:
    """`local up` with a token file that is not private: one line naming the file, exit
    2, and nothing started."""
    world = World(tmp_path)
    try:
        (tmp_path / "local" / TOKEN_FILE).chmod(0o640)
        proc = world.cli("local", "up")
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr
        assert TOKEN_FILE in lines[0] and "chmod 600" in lines[0]
        assert world.cloud.processes() == []
    finally:
        world.down()
