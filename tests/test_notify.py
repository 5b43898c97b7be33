"""Notifications: webhooks get a JSON POST when a run starts, cuts over and ends.

Every receiver is a real HTTP server on 127.0.0.1 that the test starts and stops (or, for
a receiver that hangs, a socket that listens and never answers). The end-to-end tests run
`changeover` as a subprocess on the local cloud, exactly as cron would.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from orchestrator import events as log_events
from orchestrator.errors import ConfigError
from orchestrator.notify import (
    EVENTS,
    FLUSH_DEADLINE,
    DeliveryPolicy,
    Notifier,
    Target,
    post_json,
    resolve,
)
from orchestrator.rehearse import World, stack_toml
from orchestrator.settings import Notification, load_settings

QUICK = DeliveryPolicy(attempts=4, timeout=2.0, backoff_initial=0.05, backoff_max=0.2)


@dataclass
class Received:
    """One request a receiver got."""

    path: str
    headers: dict[str, str]
    raw: bytes
    status: int  # what the receiver answered

    @property
    def body(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.raw)
        return data


class Receiver:
    """A webhook receiver on 127.0.0.1: records every POST, answers `statuses` first (one
    each), then 204."""

    def __init__(self, statuses: tuple[int, ...] = ()) -> None:
        self.requests: list[Received] = []
        self.statuses = list(statuses)
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    status = receiver.statuses.pop(0) if receiver.statuses else 204
                    receiver.requests.append(
                        Received(self.path, dict(self.headers.items()), raw, status)
                    )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook", userinfo: str = "") -> str:
        return f"http://{userinfo}127.0.0.1:{self.server.server_address[1]}{path}"

    def delivered(self) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if 200 <= r.status < 300]

    def events(self, path: str = "/hook") -> list[str]:
        return [r.body["event"] for r in self.delivered() if r.path == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(*statuses: int) -> Receiver:
        made.append(Receiver(statuses))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.fixture
def hanging() -> Iterator[str]:
    """A URL whose server accepts connections (the kernel's backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
    sock.close()


def _target(url: str, events: tuple[str, ...] = EVENTS, label: str = "notify.0") -> Target:
    return Target(label, url, frozenset(events), {})


def _started(run_id: str = "r1") -> dict[str, Any]:
    return {
        "run_id": run_id,
        "stack": "demo",
        "strategy": "rebuild",
        "steps": 12,
        "generation": {"before": 1, "after": 2},
        "resumed": False,
    }


def _finished(outcome: str, message: str, run_id: str = "r1") -> dict[str, Any]:
    return {
        "run_id": run_id,
        "stack": "demo",
        "strategy": "rebuild",
        "outcome": outcome,
        "generation": {"before": 1, "after": 1},
        "servers": {"created": ["srv-a", "srv-b"], "destroyed": ["srv-a"]},
        "message": message,
    }


# --- delivery, in process ---------------------------------------------------------------
def test_a_receiver_that_fails_twice_gets_the_notification_on_the_third_post(
    receivers: Callable[..., Receiver],
) -> None:
    """500, 500, then 204: the same body is POSTed three times with backoff between
    (tenacity), and nothing is left undelivered; each retry is a log event."""
    rx = receivers(500, 500)
    notifier = Notifier([_target(rx.url())], policy=QUICK)
    with capture_logs() as logs:
        notifier("run_started", _started())
        assert notifier.close(deadline=10) == {}
    assert [r.status for r in rx.requests] == [500, 500, 204]
    assert len({r.raw for r in rx.requests}) == 1  # the same notification, retried
    assert rx.events() == ["started"]
    retries = [e for e in logs if e["event"] == log_events.NOTIFY_RETRY]
    assert [e["attempt"] for e in retries] == [1, 2]
    assert "HTTP 500" in retries[0]["error"]


def test_a_refusal_is_not_retried_and_does_not_stop_the_others(
    receivers: Callable[..., Receiver],
) -> None:
    """A 404 is final (one POST, a `notify.failed` warning); a second webhook still gets
    every event, in order."""
    bad, good = receivers(404), receivers()
    notifier = Notifier(
        [_target(bad.url(), label="notify.0"), _target(good.url(), label="notify.1")],
        policy=QUICK,
    )
    with capture_logs() as logs:
        notifier("run_started", _started())
        notifier("run_finished", _finished("rolled_back", "VerifyServers failed"))
        assert notifier.close(deadline=10) == {}
    assert [r.status for r in bad.requests] == [404, 204]  # `started` refused, then fine
    assert good.events() == ["started", "rolled_back"]
    failed = [e for e in logs if e["event"] == log_events.NOTIFY_FAILED]
    assert len(failed) == 1 and failed[0]["error"] == "HTTP 404"
    assert failed[0]["notify_event"] == "started" and failed[0]["attempts"] == 1


def test_each_webhook_gets_only_the_events_it_lists_and_bodies_carry_no_secret(
    receivers: Callable[..., Receiver],
) -> None:
    """events = ["dirty"] gets the dirty end only; the other gets every event. A message
    with a password, an AWS key id and a bearer token arrives masked."""
    only_dirty, every = receivers(), receivers()
    notifier = Notifier(
        [_target(only_dirty.url(), ("dirty",)), _target(every.url(), label="notify.1")],
        policy=QUICK,
    )
    secret = "hunter2-" + secrets.token_hex(6)
    key_id = "AKIA" + "ABCDEFGHIJKLMNOP"
    message = f"undoing RepointAddress failed: password={secret} {key_id} Bearer {secret}"
    notifier("run_started", _started())
    notifier("step_done", {"step": "CreateServers[db]", "noop": None})
    notifier("step_done", {"step": "RepointAddress", "noop": None})
    notifier("run_finished", _finished("dirty", message))
    assert notifier.close(deadline=10) == {}

    assert only_dirty.events() == ["dirty"]
    assert every.events() == ["started", "cutover", "dirty"]
    for r in every.delivered():
        assert secret.encode() not in r.raw and key_id.encode() not in r.raw
    dirty = every.delivered()[-1].body
    assert dirty["outcome"] == "dirty" and "***" in dirty["message"]
    assert dirty["servers"] == {"created": 2, "destroyed": 1}
    assert dirty["message"].startswith("undoing RepointAddress failed: password=***")


def test_a_hanging_receiver_is_given_up_on_at_the_deadline(hanging: str) -> None:
    """A receiver that never answers: publishing returns at once, closing waits no more
    than its deadline, and the undelivered events are logged."""
    notifier = Notifier([_target(hanging)], policy=QUICK)
    t0 = time.monotonic()
    notifier("run_started", _started())
    notifier("run_finished", _finished("succeeded", "done"))
    assert time.monotonic() - t0 < 0.5  # the run did not wait
    with capture_logs() as logs:
        left = notifier.close(deadline=1.0)
    waited = time.monotonic() - t0
    assert left == {"notify.0": ["started", "succeeded"]}
    assert 0.9 <= waited < 2.0
    warning = next(e for e in logs if e["event"] == log_events.NOTIFY_UNDELIVERED)
    assert warning["events"] == ["started", "succeeded"] and warning["log_level"] == "warning"


def test_the_transport_does_not_follow_redirects(receivers: Callable[..., Receiver]) -> None:
    """A 307 is a final failure: following it would carry the Authorization header to
    another host."""
    from orchestrator.notify import DeliveryError

    rx = receivers(307)
    with pytest.raises(DeliveryError, match="redirected") as err:
        post_json(rx.url(), b"{}", {"Authorization": "Basic x"}, 2.0)
    assert not err.value.retryable and len(rx.requests) == 1


# --- config --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ({"webhook": "http://h/x", "events": ["started", "cutovr"]}, "'cutovr' is not an event"),
        ({"webhook": "ftp://h/x"}, "scheme 'ftp' is not http or https"),
        ({"webhook": "https:///x"}, "the URL has no host"),
        ({"webhook": "http://h/x", "events": []}, "events is empty"),
        ({"webhook": "http://h/x", "webhook_env": "HOOK"}, "`webhook` (a URL) or `webhook_env`"),
        ({"events": ["dirty"]}, "`webhook` (a URL) or `webhook_env`"),
        (
            {"webhook": "http://h/x", "headers_env": {"Authorization": "Bearer tok-123456"}},
            "headers_env.Authorization: not an environment variable name",
        ),
    ],
)
def test_a_bad_notify_entry_is_one_line_naming_it(
    tmp_path: Path, entry: dict[str, Any], words: str
) -> None:
    """Each mistake is one ConfigError line that names the key and says what is wrong,
    and never echoes a value that could be a token."""
    config = tmp_path / "c.toml"
    config.write_text(
        stack_toml("demo", {"address": "demo-eip", "notify": [entry], "roles": {"web": {}}})
    )
    with pytest.raises(ConfigError) as err:
        load_settings(config)
    line = str(err.value)
    assert "\n" not in line and "stacks.demo.notify.0" in line and words in line, line
    assert "tok-123456" not in line


def test_secrets_come_from_the_environment_and_a_missing_one_is_named() -> None:
    """webhook_env and headers_env are read from the environment the CLI passes; an
    unset variable is a ConfigError naming the key and the variable."""
    spec = Notification.model_validate(
        {"webhook_env": "HOOK_URL", "headers_env": {"X-Token": "HOOK_TOKEN"}}
    )
    env = {"HOOK_URL": "https://hooks.example.com/services/T0/B0/sekrit", "HOOK_TOKEN": "t0ken!"}
    target = resolve("notify.0", spec, env)
    assert target.url == env["HOOK_URL"] and target.headers == {"X-Token": "t0ken!"}
    assert target.label == "notify.0 https://hooks.example.com"  # what logs show
    with pytest.raises(ConfigError, match=r"notify\.0\.headers_env\.X-Token: .*HOOK_TOKEN is"):
        resolve("notify.0", spec, {"HOOK_URL": env["HOOK_URL"]})
    with pytest.raises(ConfigError, match=r"notify\.0\.webhook_env: .*HOOK_URL is not set"):
        resolve("notify.0", spec, {})
    bad = {**env, "HOOK_URL": "hooks.example.com/x"}
    with pytest.raises(ConfigError, match="HOOK_URL: scheme") as err:
        resolve("notify.0", spec, bad)
    assert "hooks.example.com" not in str(err.value)


# --- end to end: the CLI on the local cloud ------------------------------------------------
def _fields(body: dict[str, Any], run_id: str) -> None:
    assert body["run_id"] == run_id and body["stack"] == "demo"
    dt.datetime.fromisoformat(body["time"])  # ISO 8601


@pytest.mark.slow
def test_rebuild_notifies_started_cutover_succeeded_in_order_without_secrets(
    make_world: Callable[..., World], receivers: Callable[..., Receiver]
) -> None:
    """A real `changeover rebuild` with a webhook whose URL carries credentials and a
    header token from the environment: started, cutover, succeeded arrive in order with
    run id, stack, strategy, outcome, generations and counts; the credentials go in
    headers only, never in a body, the output, the logs or the state dir."""
    rx = receivers()
    password, token = f"pw-{secrets.token_hex(8)}", f"tok-{secrets.token_hex(8)}"
    world = make_world(
        notify=[
            {
                "webhook": rx.url("/hook", userinfo=f"hooker:{password}@"),
                "events": ["started", "cutover", "succeeded", "rolled_back"],
                "headers_env": {"X-Hook-Token": "HOOK_TOKEN"},
            }
        ]
    )
    code, out = world.cli_json(
        "--log-format", "json", "rebuild", "demo", "--yes", env={"HOOK_TOKEN": token}
    )
    assert code == 0, out.get("_stderr")
    run_id = out["run_id"]

    assert rx.events() == ["started", "cutover", "succeeded"]
    started, cutover, succeeded = (r.body for r in rx.delivered())
    for body in (started, cutover, succeeded):
        _fields(body, run_id)
        assert body["strategy"] == "rebuild" and body["generation"] == {"before": 1, "after": 2}
    assert started["outcome"] is None and started["message"] == "rebuild demo started (12 steps)"
    assert cutover["step"] == "RepointAddress" and cutover["outcome"] is None
    assert succeeded["outcome"] == "succeeded" and succeeded["message"] == "done"
    assert (
        succeeded["servers"]
        == {
            "created": len(out["servers"]["created"]),
            "destroyed": len(out["servers"]["destroyed"]),
        }
        == {"created": 3, "destroyed": 3}
    )

    for r in rx.delivered():
        assert r.headers["User-Agent"].startswith("changeover/")
        assert r.headers["Content-Type"] == "application/json"
        assert r.headers["X-Hook-Token"] == token
        assert (
            r.headers["Authorization"]
            == "Basic " + base64.b64encode(f"hooker:{password}".encode()).decode()
        )
        assert password.encode() not in r.raw and token.encode() not in r.raw
    proc_text = json.dumps(out)
    assert password not in proc_text and token not in proc_text
    for path in world.state_dir.rglob("*"):
        if path.is_file() and path != world.config_file:
            data = path.read_bytes()
            assert password.encode() not in data and token.encode() not in data, path


@pytest.mark.slow
def test_a_rolled_back_rebuild_notifies_rolled_back_and_no_cutover(
    make_world: Callable[..., World], receivers: Callable[..., Receiver]
) -> None:
    """A fresh web server fails the health gate: the webhook gets started then
    rolled_back (the cause in the message, the generation unchanged); one that lists
    only failures gets rolled_back alone."""
    rx = receivers()
    world = make_world(
        notify=[
            {"webhook": rx.url("/all")},
            {"webhook": rx.url("/failures"), "events": ["rolled_back", "dirty"]},
        ]
    )
    world.cloud.inject("server", role="web", times=1, health_fail=True)
    code, out = world.cli_json("rebuild", "demo", "--yes")
    assert code == 1 and out["outcome"] == "rolled_back", out.get("_stderr")

    assert rx.events("/all") == ["started", "rolled_back"]
    assert rx.events("/failures") == ["rolled_back"]
    body = rx.delivered()[-1].body
    _fields(body, out["run_id"])
    assert body["outcome"] == "rolled_back" and "VerifyServers" in body["message"]
    assert body["message"] == out["message"]
    assert body["generation"] == {"before": 1, "after": 1}
    assert body["servers"] == {"created": 3, "destroyed": 3}


@pytest.mark.slow
def test_a_receiver_that_never_answers_delays_the_process_by_the_deadline_at_most(
    make_world: Callable[..., World], hanging: str
) -> None:
    """The same rebuild with a webhook that hangs: the run takes about as long as one
    without notifications (delivery is off its path), the process exits at most the
    flush deadline after the run finished, and the undelivered events are a warning."""
    world = make_world()
    plain = world.cli("--log-format", "json", "rebuild", "demo", "--yes")
    assert plain.returncode == 0, plain.stderr[-3000:]

    notify = json.dumps([{"webhook": hanging}])
    proc = world.cli(
        "--output",
        "json",
        "--log-format",
        "json",
        "rebuild",
        "demo",
        "--yes",
        env={"CHANGEOVER_STACKS__DEMO__NOTIFY": notify},
    )
    exited = time.time()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["outcome"] == "succeeded"
    logs = _json_logs(proc.stderr)

    def run_seconds(entries: list[dict[str, Any]]) -> float:
        return _at(entries, "run.finished") - _at(entries, "run.started")

    # Delivering synchronously would cost ~10 s per event (4 attempts of 2 s each).
    assert run_seconds(logs) < run_seconds(_json_logs(plain.stderr)) + 5.0
    after_finish = exited - _at(logs, "run.finished")
    assert FLUSH_DEADLINE - 0.5 <= after_finish <= FLUSH_DEADLINE + 2.0, after_finish
    undelivered = [e for e in logs if e["event"] == log_events.NOTIFY_UNDELIVERED]
    assert len(undelivered) == 1 and undelivered[0]["level"] == "warning"
    assert "succeeded" in undelivered[0]["events"]
    assert undelivered[0]["webhook"].startswith("stacks.demo.notify.0 http://127.0.0.1:")


def _json_logs(stderr: str) -> list[dict[str, Any]]:
    out = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def _at(logs: list[dict[str, Any]], event: str) -> float:
    stamp = next(e["timestamp"] for e in logs if e["event"] == event)
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


@pytest.mark.slow
def test_a_campaign_notifies_paused_once_and_its_continuation(
    make_world: Callable[..., World], receivers: Callable[..., Receiver]
) -> None:
    """rotate in a window (injected clock): outside it, started then paused (naming the
    next window); the same command again outside the window tells nothing new; inside
    the next window the continuation sends started (resumed), cutover, succeeded."""
    rx = receivers()
    world = make_world(
        windows={"open": ["Sat 02:00-03:30 UTC"], "batch_estimate": 1200},
        notify=[{"webhook": rx.url()}],
    )
    args = ("rotate", "demo", "--yes", "--max-surge", "1")

    def clock(start: str) -> dict[str, str]:
        return {"CHANGEOVER_TEST_CLOCK": f"{start}/300"}

    code, out = world.cli_json(*args, env=clock("2026-12-05T12:00:00+00:00"))
    assert code == 0 and out["outcome"] == "paused", out.get("_stderr")
    run_id = out["run_id"]
    assert rx.events() == ["started", "paused"]
    paused = rx.delivered()[-1].body
    _fields(paused, run_id)
    assert paused["strategy"] == "rotate" and paused["outcome"] == "paused"
    assert paused["next_window"] == "2026-12-12T02:00:00+00:00" == out["next_window"]
    assert paused["servers"] == {"created": 0, "destroyed": 0}

    code, again = world.cli_json(*args, env=clock("2026-12-05T13:00:00+00:00"))
    assert code == 0 and again["outcome"] == "paused" and again["run_id"] == run_id
    assert rx.events() == ["started", "paused"]  # a cron tick outside the window: quiet

    code, done = world.cli_json(*args, env=clock("2026-12-12T02:00:00+00:00"))
    assert code == 0 and done["outcome"] == "succeeded", done.get("_stderr")
    assert rx.events() == ["started", "paused", "started", "cutover", "succeeded"]
    resumed, cutover, succeeded = (r.body for r in rx.delivered()[2:])
    assert resumed["resumed"] is True and resumed["run_id"] == run_id
    assert "continues" in resumed["message"]
    assert cutover["step"] == "AddMembers#1"
    assert succeeded["outcome"] == "succeeded" and succeeded["servers"]["created"] == 2
