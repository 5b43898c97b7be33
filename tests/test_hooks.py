"""Lifecycle hooks: pre_drain, pre_terminate and post_cutover, as commands or webhooks.

End to end through the CLI on the local cloud (real server processes, a real webhook
receiver on 127.0.0.1): what a hook is told, a failing pre_terminate rolling back with
nothing destroyed, a webhook that holds then passes, and resumed runs (SIGKILL between
steps and inside one) that never run a hook again for a server it passed for. The
webhook and command semantics (refusal, hold until the timeout, a killed command) are
pinned on `run_hooks` with a fake provider.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from orchestrator.hooks import HookFailed, describe_running, run_hooks
from orchestrator.models import Server
from orchestrator.plan import RunContext
from orchestrator.rehearse import World, stack_toml
from orchestrator.settings import LifecycleHooks
from tests.conftest import demo_stack
from tests.invariants import journal_steps

Answer = tuple[int, dict[str, Any], dict[str, str]]  # status, JSON body, headers

# A command hook: appends its CHANGEOVER_* environment to a JSON-lines file.
RECORD = """
import json, os, sys
env = {k: v for k, v in os.environ.items() if k.startswith("CHANGEOVER_")}
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(env) + "\\n")
"""
# The same, and the second time it ever runs it SIGKILLs changeover (its parent): a
# kill inside a step, after the first server's hook passed and was journaled.
RECORD_THEN_KILL = (
    RECORD
    + """
import signal
with open(sys.argv[1]) as f:
    if len(f.read().splitlines()) == 2:
        os.kill(os.getppid(), signal.SIGKILL)
"""
)


class Receiver:
    """A webhook receiver on 127.0.0.1: records each POST's JSON, answers by `answer`
    (given the body and how many times this server was asked before)."""

    def __init__(self, answer: Callable[[dict[str, Any], int], Answer]) -> None:
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer._lock:
                    asked = sum(
                        1 for r in outer.requests if r["server"]["id"] == body["server"]["id"]
                    )
                    outer.requests.append(body)
                status, reply, headers = answer(body, asked)
                data = json.dumps(reply).encode()
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def asked(self, server_id: str) -> int:
        with self._lock:
            return sum(1 for r in self.requests if r["server"]["id"] == server_id)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def receiver_factory() -> Iterator[Callable[[Callable[[dict[str, Any], int], Answer]], Receiver]]:
    made: list[Receiver] = []

    def make(answer: Callable[[dict[str, Any], int], Answer]) -> Receiver:
        made.append(Receiver(answer))
        return made[-1]

    yield make
    for r in made:
        r.close()


def _script(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hook.py"
    path.write_text(text)
    return path


def _records(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _web(world: World) -> list[str]:
    return sorted(i for i, s in world.live_servers().items() if s["role"] == "web")


def _outputs(world: World, run_id: str, key: str) -> dict[str, Any]:
    steps = journal_steps(world, run_id)[1]
    out: dict[str, Any] = next(s["outputs"] for s in steps if s["key"] == key)
    return out


# --- end to end, through the CLI -----------------------------------------------------------
def test_pre_drain_command_is_told_the_servers_id_role_and_address(
    make_world: Callable[..., World], tmp_path: Path
) -> None:
    """rotate: the pre_drain command runs once per old server with its id, role,
    address and port, the stack, the run and the hook in its environment (and none of
    changeover's own CHANGEOVER_* settings); the journal records that it passed."""
    log = tmp_path / "env.jsonl"
    hook = [sys.executable, str(_script(tmp_path, RECORD)), str(log)]
    world = make_world(hooks={"pre_drain": hook})
    old = _web(world)
    ports = {i: world.db_port(i) for i in old}
    code, out = world.cli_json("rotate", "demo", "--yes", env={"CHANGEOVER_LOCK_TTL": "30"})
    assert code == 0, out["_stderr"]
    seen = _records(log)
    assert sorted(r["CHANGEOVER_SERVER_ID"] for r in seen) == old
    for r in seen:
        assert r["CHANGEOVER_SERVER_ROLE"] == "web"
        assert r["CHANGEOVER_SERVER_ADDRESS"] == "127.0.0.1"
        assert r["CHANGEOVER_SERVER_PORT"] == str(ports[r["CHANGEOVER_SERVER_ID"]])
        assert r["CHANGEOVER_STACK"] == "demo" and r["CHANGEOVER_RUN_ID"] == out["run_id"]
        assert r["CHANGEOVER_HOOK"] == "pre_drain"
        assert "CHANGEOVER_LOCK_TTL" not in r
    first = _outputs(world, out["run_id"], "DrainServers#1")
    assert first["hooks"] == {"pre_drain": [seen[0]["CHANGEOVER_SERVER_ID"]]}


def test_failing_pre_terminate_rolls_back_with_nothing_destroyed(
    make_world: Callable[..., World],
) -> None:
    """A pre_terminate command that exits 3: the run rolls back (exit 1) before any old
    server is destroyed (no point of no return journaled), the message names the hook,
    the server and its output, and the old servers serve as before."""
    hook = [sys.executable, "-c", "import sys; print('blocked by ops'); sys.exit(3)"]
    world = make_world(hooks={"pre_terminate": hook})
    before = sorted(world.members())
    mark = world.cloud.last_call_id()
    code, out = world.cli_json("rotate", "demo", "--yes")
    assert code == 1, out["_stderr"]
    assert out["outcome"] == "rolled_back"
    assert (
        "pre_terminate hook for" in out["message"] and "exited 3: blocked by ops" in out["message"]
    )
    assert sorted(world.members()) == before
    assert set(before) <= set(world.live_servers())
    destroyed = [c["detail"] for c in world.cloud.calls(mark) if c["op"] == "destroy_servers"]
    assert destroyed and not any(old in str(d) for d in destroyed for old in before)
    steps = journal_steps(world, out["run_id"])[1]
    assert all("point_of_no_return" not in s["outputs"] for s in steps)
    assert len(world.live_servers()) == 3  # the db and the two old web servers


def test_post_cutover_webhook_holds_twice_then_passes(
    make_world: Callable[..., World],
    receiver_factory: Callable[[Callable[[dict[str, Any], int], Answer]], Receiver],
) -> None:
    """rebuild: the post_cutover webhook is asked for each new web server; it holds
    (423 with Retry-After, then a 2xx saying hold) and passes the third time; the run
    succeeds, each body names the run, the stack, the hook and the server."""

    def answer(body: dict[str, Any], asked: int) -> Answer:
        if asked == 0:
            return 423, {"reason": "not yet"}, {"Retry-After": "0"}
        if asked == 1:
            return 200, {"hold": True, "reason": "warming caches"}, {}
        return 200, {"ok": True}, {}

    receiver = receiver_factory(answer)
    world = make_world(hooks={"post_cutover": {"webhook": receiver.url, "interval": 0.1}})
    code, out = world.cli_json("rebuild", "demo", "--yes")
    assert code == 0, out["_stderr"]
    new_web = sorted(out["address"]["after"])
    assert len(new_web) == 2
    assert [receiver.asked(i) for i in new_web] == [3, 3]
    for body in receiver.requests:
        assert body["hook"] == "post_cutover"
        assert body["run_id"] == out["run_id"] and body["stack"] == "demo"
        server = body["server"]
        assert server["id"] in new_web and server["role"] == "web"
        assert server["address"] == "127.0.0.1" and isinstance(server["port"], int)
        assert server["generation"] == 2
    passed = _outputs(world, out["run_id"], "RepointAddress")["hooks"]
    assert sorted(passed["post_cutover"]) == new_web


def test_resumed_run_does_not_rerun_a_hook_that_passed(
    make_world: Callable[..., World], tmp_path: Path
) -> None:
    """SIGKILL right after DrainServers#1 (CHANGEOVER_CRASH_AFTER_STEP), then resume:
    each old server's pre_drain hook ran exactly once."""
    log = tmp_path / "env.jsonl"
    hook = [sys.executable, str(_script(tmp_path, RECORD)), str(log)]
    world = make_world(hooks={"pre_drain": hook})
    old = _web(world)
    keys = [s["key"] for s in world.cli_json("plan", "rotate", "demo")[1]["plan"]["steps"]]
    after = keys.index("DrainServers#1") + 1  # the steps before it, and it, end; then -9
    crash = {"CHANGEOVER_CRASH_AFTER_STEP": str(after)}
    crashed = world.cli("rotate", "demo", "--yes", env=crash)
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    assert len(_records(log)) == 1
    run_id, steps = journal_steps(world)
    assert [s["state"] for s in steps][: after + 1] == ["done"] * after + ["pending"]
    resumed = world.cli("resume", run_id)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert sorted(r["CHANGEOVER_SERVER_ID"] for r in _records(log)) == old


def test_kill_inside_a_step_keeps_the_hooks_that_passed(
    make_world: Callable[..., World], tmp_path: Path
) -> None:
    """rotate --canary 2 (one batch of both old servers: the canary batch, whose steps
    each take all of its servers; the lanes after it take one each): changeover is
    SIGKILLed while the second server's pre_terminate hook runs. The first server's pass
    was journaled, so `resume` runs the hook for the second only, then destroys both."""
    log = tmp_path / "env.jsonl"
    hook = [sys.executable, str(_script(tmp_path, RECORD_THEN_KILL)), str(log)]
    world = make_world(hooks={"pre_terminate": hook})
    old = _web(world)
    crashed = world.cli("rotate", "demo", "--yes", "--canary", "2", "--canary-watch", "0")
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    first, second = (r["CHANGEOVER_SERVER_ID"] for r in _records(log))
    assert sorted([first, second]) == old
    run_id, steps = journal_steps(world)
    destroy = next(s for s in steps if s["key"] == "DestroyServers#1")
    assert destroy["state"] == "started"
    assert destroy["outputs"]["hooks"] == {"pre_terminate": [first]}
    assert destroy["outputs"]["hook_running"]["server"] == second
    resumed = world.cli("resume", run_id)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["CHANGEOVER_SERVER_ID"] for r in _records(log)] == [first, second, second]
    assert not set(old) & set(world.live_servers())
    assert _outputs(world, run_id, "DestroyServers#1")["hooks"] == {
        "pre_terminate": [first, second]
    }


def test_a_bad_hook_is_one_line_and_exit_2(make_world: Callable[..., World]) -> None:
    """An unbalanced quote in a hook command: one line naming the key, exit 2, nothing
    touched."""
    world = make_world()
    world.config_file.write_text(
        stack_toml("demo", {**demo_stack(), "hooks": {"pre_drain": "sh -c 'drain"}})
    )
    mark = world.cloud.last_call_id()
    proc = world.cli("plan", "rotate", "demo")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "stacks.demo.hooks.pre_drain.command" in lines[0], proc.stderr
    assert "No closing quotation" in lines[0]
    assert world.cloud.calls(mark) == []


# --- run_hooks with a fake provider: the semantics --------------------------------------------
SERVER = Server("srv-1", "demo", "web", 2, "r1", "running", host="127.0.0.1", port=8080)


def _ctx(hooks: dict[str, Any]) -> tuple[RunContext, list[dict[str, Any]]]:
    journaled: list[dict[str, Any]] = []
    provider = SimpleNamespace(
        describe_servers=lambda stack, ids: [SERVER] if SERVER.id in ids else [],
        refresh=lambda: None,
    )
    ctx = RunContext(
        run_id="r1",
        stack="demo",
        config=SimpleNamespace(hooks=LifecycleHooks.model_validate(hooks)),  # type: ignore[arg-type]
        provider=provider,  # type: ignore[arg-type]
        outputs={},
        log=structlog.get_logger(),
        journal_marks=journaled.append,
    )
    return ctx, journaled


def test_a_refusal_fails_at_once(
    receiver_factory: Callable[[Callable[[dict[str, Any], int], Answer]], Receiver],
) -> None:
    """A 403 is not a hold: one ask, HookFailed naming the answer, nothing marked passed."""
    receiver = receiver_factory(lambda body, n: (403, {"reason": "change freeze"}, {}))
    ctx, journaled = _ctx({"pre_terminate": {"webhook": receiver.url, "interval": 0.05}})
    with pytest.raises(HookFailed, match=r"answered HTTP 403 \(change freeze\)"):
        run_hooks(ctx, "pre_terminate", ["srv-1"])
    assert receiver.asked("srv-1") == 1
    assert not any("hooks" in m for m in journaled)
    assert ctx.marks["hook_running"] is None


def test_a_hold_that_never_ends_fails_at_the_timeout(
    receiver_factory: Callable[[Callable[[dict[str, Any], int], Answer]], Receiver],
) -> None:
    """Held every time (409): asked every `interval`, then HookFailed at `timeout`
    saying it was still held; each hold is logged and journaled for `status`."""
    receiver = receiver_factory(lambda body, n: (409, {"reason": "job 42 running"}, {}))
    ctx, journaled = _ctx({"pre_drain": {"webhook": receiver.url, "timeout": 0.6, "interval": 0.1}})
    t0 = time.monotonic()
    with capture_logs() as logs, pytest.raises(HookFailed, match="still held after its timeout"):
        run_hooks(ctx, "pre_drain", ["srv-1"])
    assert time.monotonic() - t0 < 5
    assert 3 <= receiver.asked("srv-1") <= 8
    held = [e for e in logs if e["event"] == "hook.held"]
    assert held and held[0]["detail"] == "HTTP 409 (job 42 running)"
    running = [m["hook_running"] for m in journaled if m.get("hook_running")]
    assert running[-1]["holds"] >= 2 and "job 42 running" in running[-1]["detail"]
    line = describe_running({"hook_running": running[-1]}, time.time())
    assert line is not None and line.startswith("pre_drain hook (webhook) for srv-1: held ")


def test_no_answer_is_asked_again_then_passes_once_up(
    receiver_factory: Callable[[Callable[[dict[str, Any], int], Answer]], Receiver],
) -> None:
    """A 500 and then a pass: asked twice, passed, journaled once as passed; a second
    call of run_hooks (a resumed step) asks nothing."""
    receiver = receiver_factory(lambda body, n: (500, {}, {}) if n == 0 else (204, {}, {}))
    ctx, journaled = _ctx({"post_cutover": {"webhook": receiver.url, "interval": 0.05}})
    assert run_hooks(ctx, "post_cutover", ["srv-1"]) == ["srv-1"]
    assert receiver.asked("srv-1") == 2
    assert {"hooks": {"post_cutover": ["srv-1"]}} in journaled
    assert run_hooks(ctx, "post_cutover", ["srv-1"]) == []
    assert receiver.asked("srv-1") == 2


def test_a_webhook_nobody_answers_fails_at_the_timeout() -> None:
    """Connection refused until the timeout: HookFailed saying it is not answering."""
    ctx, _ = _ctx({"pre_drain": {"webhook": "http://127.0.0.1:9/hook", "timeout": 0.3}})
    with pytest.raises(HookFailed, match="still not answering after its timeout"):
        run_hooks(ctx, "pre_drain", ["srv-1"])


def test_a_command_past_its_timeout_is_killed_with_its_children(tmp_path: Path) -> None:
    """A command still running at its timeout: its whole process group is killed (a
    child it started included) and the step fails saying so."""
    pidfile = tmp_path / "child.pid"
    script = f"sleep 30 & echo $! > {pidfile}; wait"
    ctx, _ = _ctx({"pre_terminate": {"command": ["sh", "-c", script], "timeout": 0.5}})
    with pytest.raises(HookFailed, match=r"still running after its timeout of 0\.5 s; killed"):
        run_hooks(ctx, "pre_terminate", ["srv-1"])
    child = int(pidfile.read_text())
    for _ in range(50):  # bounded: 5 s
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the hook's child {child} outlived the timeout")


def test_without_a_hook_nothing_is_called() -> None:
    """No hook configured for the phase: no provider call, nothing journaled."""
    calls: list[str] = []
    ctx, journaled = _ctx({})
    ctx.provider = SimpleNamespace(describe_servers=lambda *a: calls.append("d") or [])  # type: ignore[assignment]
    assert run_hooks(ctx, "pre_drain", ["srv-1"]) == []
    assert calls == [] and journaled == []
