"""Notifications: webhooks told, as JSON POSTs, when a run starts, cuts over and ends.

The engine emits events to its sink (``run_started``, ``step_done``, ``undo_done``,
``run_finished``); a :class:`Notifier` is one more sink. It turns them into the events an
operator subscribes to (:data:`EVENTS`) and hands each to a background worker per
webhook, so the run never waits on a receiver:

- each POST has a short timeout and is retried with exponential backoff (tenacity) on a
  connection error, a timeout, a 5xx, a 408 or a 429; any other answer is final;
- when the process ends, it waits at most :data:`FLUSH_DEADLINE` seconds for what is
  still queued, then logs each undelivered notification (``notify.undelivered``) and
  exits anyway: delivery is best effort and bounded, and never changes a run's outcome;
- every body is redacted (I9); a webhook's URL is never logged whole (a Slack URL's
  path is its secret) and never sent; credentials in its user info become an
  ``Authorization: Basic`` header; header values come from the environment only.

    ChangeoverError
    └── BadInput
        └── ConfigError   a notify entry is wrong, or names an unset variable
    DeliveryError         one POST failed; ``retryable`` says whether to try again
"""

from __future__ import annotations

import atexit
import base64
import datetime as dt
import json
import queue
import re
import threading
import time
import urllib.error
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, Protocol

from orchestrator import events as log_events
from orchestrator.errors import ConfigError
from orchestrator.log import get_logger
from orchestrator.redact import redact, register_secret

if TYPE_CHECKING:
    import urllib.request

    from tenacity import RetryCallState

    from orchestrator.settings import Notification, Settings, StackConfig

# urllib.request and tenacity are imported when a notification is sent: settings.py
# imports this module for its checks, and every command, `status` too, loads settings.

# What a webhook may subscribe to: a run began, traffic moved to new servers, and each
# way a run can end in the engine (a no-op or a locked stack never starts a run).
START_EVENTS = ("started", "cutover")
END_EVENTS = ("succeeded", "rolled_back", "dirty", "paused", "precondition_failed")
EVENTS = (*START_EVENTS, *END_EVENTS)

FLUSH_DEADLINE = 3.0  # seconds the process waits, at most, for queued notifications at exit
POST_TIMEOUT = 2.0  # seconds one POST may take (connect, send, answer)
ATTEMPTS = 4  # POSTs per notification, the first included
BACKOFF_INITIAL = 0.25  # seconds before the first retry; doubles each time
BACKOFF_MAX = 2.0  # seconds between retries, at most

# The steps after which new servers take traffic: one `cutover` per run and process.
CUTOVER_STEPS = frozenset({"RepointAddress", "AddMembers"})

_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def _version() -> str:
    try:
        return version("changeover")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


# --- config checks (settings.py calls these; messages never echo a URL) ------------------
def check_webhook(url: str) -> str:
    """An http(s) URL with a host, or ValueError naming what is wrong (not the URL, which
    may carry a token)."""
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise ValueError("the URL contains whitespace or control characters")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        shown = parts.scheme if parts.scheme.isalnum() else "none"
        raise ValueError(f"scheme {shown!r} is not http or https")
    try:
        host, _ = parts.hostname, parts.port
    except ValueError:
        raise ValueError("the URL's port is not a number from 0 to 65535") from None
    if not host:
        raise ValueError("the URL has no host")
    return url


def check_events(names: list[str]) -> list[str]:
    """Known event names, at least one, or ValueError naming the first unknown one."""
    if not names:
        raise ValueError(f"events is empty; list at least one of {', '.join(EVENTS)}")
    for name in names:
        if name not in EVENTS:
            raise ValueError(f"{name!r} is not an event (events: {', '.join(EVENTS)})")
    return names


def check_header_env(headers: dict[str, str]) -> dict[str, str]:
    """Header name -> the name of the variable holding its value."""
    for header, var in headers.items():
        if not _HEADER_NAME.fullmatch(header):
            raise ValueError(f"{header!r} is not an HTTP header name")
        if not _ENV_NAME.fullmatch(var):
            # Not echoed: what was pasted here may well be the token itself.
            raise ValueError(
                f"headers_env.{header}: not an environment variable name (name the "
                "variable that holds the value, never the value itself)"
            )
    return headers


# --- targets -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One webhook, resolved: where to POST, which events, which extra headers."""

    label: str  # `notify[0] https://hooks.example.com`: safe to log
    url: str  # without user info
    events: frozenset[str]
    headers: Mapping[str, str] = field(default_factory=dict)


def _label(where: str, url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{where} {parts.scheme}://{host}{port}"


def resolve(where: str, spec: Notification, environ: Mapping[str, str]) -> Target:
    """A configured webhook with its URL and header values read from `environ`. Raises
    ConfigError (one line naming the key and the variable, never a value)."""
    url = spec.webhook
    if spec.webhook_env is not None:
        url = environ.get(spec.webhook_env) or None
        if url is None:
            raise ConfigError(
                f"config error: {where}.webhook_env: environment variable "
                f"{spec.webhook_env} is not set"
            )
        try:
            check_webhook(url)
        except ValueError as exc:
            raise ConfigError(
                f"config error: {where}.webhook_env: environment variable {spec.webhook_env}: {exc}"
            ) from None
        register_secret(url)  # the whole URL is the secret (a Slack webhook's is)
    assert url is not None  # the model demands webhook or webhook_env
    headers: dict[str, str] = {}
    for header, var in spec.headers_env.items():
        value = environ.get(var)
        if not value:
            raise ConfigError(
                f"config error: {where}.headers_env.{header}: environment variable {var} is not set"
            )
        register_secret(value)
        headers[header] = value
    parts = urllib.parse.urlsplit(url)
    if parts.username is not None or parts.password is not None:
        user = urllib.parse.unquote(parts.username or "")
        password = urllib.parse.unquote(parts.password or "")
        register_secret(password)
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        register_secret(token)
        if not any(h.lower() == "authorization" for h in headers):
            headers["Authorization"] = f"Basic {token}"
        netloc = parts.hostname or ""
        if ":" in netloc:  # an IPv6 literal
            netloc = f"[{netloc}]"
        if parts.port:
            netloc += f":{parts.port}"
        url = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return Target(_label(where, url), url, frozenset(spec.events), headers)


# --- delivery ------------------------------------------------------------------------------
class DeliveryError(Exception):
    """One POST failed: unreachable, timed out, or answered with something not 2xx."""

    def __init__(self, reason: str, *, retryable: bool) -> None:
        super().__init__(reason)
        self.retryable = retryable


class Send(Protocol):
    """POST one JSON body; raise DeliveryError unless the receiver answered 2xx."""

    def __call__(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> None: ...


@cache
def _opener() -> urllib.request.OpenerDirector:
    import urllib.request  # noqa: PLC0415 - when sending (see above)

    class _NoRedirect(urllib.request.HTTPRedirectHandler):
        # A redirect would carry the Authorization header to wherever it points.
        def redirect_request(self, *_: Any, **__: Any) -> None:
            return None

    return urllib.request.build_opener(_NoRedirect())


def post_json(url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> None:
    """The real transport: urllib, no redirects, the proxy variables honoured."""
    import urllib.request  # noqa: PLC0415 - when sending (see above)

    req = urllib.request.Request(url, data=body, method="POST", headers=dict(headers))
    try:
        with _opener().open(req, timeout=timeout) as resp:
            resp.read(65536)
    except urllib.error.HTTPError as exc:
        with exc:
            code = exc.code
        if 300 <= code < 400:
            raise DeliveryError(
                f"HTTP {code}: redirected; configure the final URL", retryable=False
            ) from None
        raise DeliveryError(f"HTTP {code}", retryable=code >= 500 or code in (408, 429)) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DeliveryError(f"{type(exc).__name__}: {reason}", retryable=True) from None


@dataclass(frozen=True)
class DeliveryPolicy:
    """How a notification is retried: data, applied with tenacity by the worker."""

    attempts: int = ATTEMPTS
    timeout: float = POST_TIMEOUT
    backoff_initial: float = BACKOFF_INITIAL
    backoff_max: float = BACKOFF_MAX


class _Worker:
    """Delivers one webhook's notifications in order, from a daemon thread of its own, so
    a receiver that hangs delays neither the run nor the other webhooks."""

    def __init__(self, target: Target, send: Send, policy: DeliveryPolicy, agent: str) -> None:
        self.target = target
        self.send = send
        self.policy = policy
        self.agent = agent
        self.queue: queue.SimpleQueue[tuple[str, bytes] | None] = queue.SimpleQueue()
        self.cond = threading.Condition()
        self.outstanding: list[str] = []  # events queued and not yet delivered or given up
        self.last_error = ""
        self.abandon = threading.Event()
        self.thread = threading.Thread(
            target=self._run, name=f"changeover-{target.label}", daemon=True
        )
        self.thread.start()

    def put(self, event: str, body: bytes) -> None:
        with self.cond:
            self.outstanding.append(event)
        self.queue.put((event, body))

    def wait(self, until: float) -> list[str]:
        """Wait until everything queued is done or the monotonic time `until`; what is
        still outstanding then."""
        with self.cond:
            self.cond.wait_for(lambda: not self.outstanding, max(until - time.monotonic(), 0))
            return list(self.outstanding)

    def stop(self) -> None:
        self.abandon.set()
        self.queue.put(None)

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            event, body = item
            if self.abandon.is_set():
                continue
            try:
                self._deliver(event, body)
            finally:
                with self.cond:
                    if not self.abandon.is_set():
                        self.outstanding.remove(event)
                    self.cond.notify_all()

    def _sleep(self, seconds: float) -> None:
        self.abandon.wait(seconds)  # ends at once when the process gives up waiting

    def _deliver(self, event: str, body: bytes) -> None:
        from tenacity import (  # noqa: PLC0415 - when sending (see above)
            Retrying,
            retry_if_exception,
            stop_after_attempt,
            stop_when_event_set,
            wait_exponential,
        )

        log = get_logger(webhook=self.target.label, notify_event=event)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": self.agent,
            **self.target.headers,
        }
        policy = self.policy

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            self.last_error = str(exc)
            log.info(log_events.NOTIFY_RETRY, attempt=state.attempt_number, error=str(exc))

        retrying = Retrying(
            # ... or once the process has given up waiting.
            stop=stop_after_attempt(policy.attempts) | stop_when_event_set(self.abandon),
            wait=wait_exponential(multiplier=policy.backoff_initial, max=policy.backoff_max),
            retry=retry_if_exception(lambda e: isinstance(e, DeliveryError) and e.retryable),
            sleep=self._sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            retrying(self.send, self.target.url, body, headers, policy.timeout)
        except DeliveryError as exc:
            self.last_error = str(exc)
            if not self.abandon.is_set():
                log.warning(
                    log_events.NOTIFY_FAILED,
                    error=str(exc),
                    attempts=retrying.statistics.get("attempt_number"),
                    note="not delivered; the run is not affected",
                )
            return
        except Exception as exc:  # a bug in a transport must not kill the worker
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning(log_events.NOTIFY_FAILED, error=self.last_error)
            return
        log.debug(log_events.NOTIFY_SENT, attempts=retrying.statistics.get("attempt_number"))


@dataclass
class _RunInfo:
    """What a body says about the run this process drives."""

    run_id: str
    stack: str
    strategy: str
    generation: dict[str, Any]
    resumed: bool
    moved: bool = False  # a step (or an undo) finished in this process
    started_sent: bool = False
    cutover_sent: bool = False


class Notifier:
    """An engine event sink that notifies webhooks. Thread-safe; never raises."""

    def __init__(
        self,
        targets: list[Target],
        *,
        send: Send = post_json,
        policy: DeliveryPolicy = DeliveryPolicy(),
        deadline: float = FLUSH_DEADLINE,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.targets = targets
        self.send = send
        self.policy = policy
        self.deadline = deadline
        self.now = now
        self.agent = f"changeover/{_version()}"
        self._workers: dict[str, _Worker] = {}
        self._lock = threading.Lock()
        self._run: _RunInfo | None = None
        self._closed = False

    # --- the engine's sink ---------------------------------------------------------------
    def __call__(self, kind: str, payload: dict[str, Any]) -> None:
        try:
            self._on(kind, payload)
        except Exception as exc:  # a notification problem never stops a run
            get_logger().warning(log_events.NOTIFY_FAILED, error=f"{type(exc).__name__}: {exc}")

    def _on(self, kind: str, p: dict[str, Any]) -> None:
        if kind == "run_started":
            self._run = _RunInfo(
                run_id=str(p["run_id"]),
                stack=str(p["stack"]),
                strategy=str(p["strategy"]),
                generation=dict(p.get("generation") or {}),
                resumed=bool(p.get("resumed")),
            )
            if not self._run.resumed:
                self._started(steps=p.get("steps"))
            return
        run = self._run
        if kind in ("step_done", "undo_done") and run is not None:
            run.moved = True
            if not run.started_sent:
                # A resumed run (or a continued campaign) is news once it moves: a cron
                # job re-pausing a campaign outside its window stays quiet.
                self._started(steps=None)
            name = str(p.get("step", "")).split("#")[0].split("[")[0]
            moved_traffic = kind == "step_done" and name in CUTOVER_STEPS and not p.get("noop")
            if moved_traffic and not run.cutover_sent:
                run.cutover_sent = True
                message = f"{p['step']} done: new servers take traffic"
                self.publish("cutover", self._body("cutover", step=p["step"], message=message))
        elif kind == "run_finished":
            self._finished(p)

    def _started(self, steps: Any) -> None:
        run = self._run
        assert run is not None
        run.started_sent = True
        what = f"{run.strategy} {run.stack}"
        if run.resumed:
            message = f"{what}: run {run.run_id} continues"
        else:
            message = f"{what} started" + (f" ({steps} steps)" if steps else "")
        self.publish("started", self._body("started", message=message))

    def _finished(self, summary: dict[str, Any]) -> None:
        outcome = str(summary.get("outcome"))
        if outcome not in END_EVENTS:
            return
        run = self._run
        if run is None or run.run_id != summary.get("run_id"):
            # `rollback RUN_ID` emits no start: the summary says it all.
            run = self._run = _RunInfo(
                run_id=str(summary.get("run_id")),
                stack=str(summary.get("stack")),
                strategy=str(summary.get("strategy")),
                generation={},
                resumed=True,
            )
        if outcome == "paused" and run.resumed and not run.moved:
            return  # paused again where it was: nothing new to tell
        servers = summary.get("servers") or {}
        self.publish(
            outcome,
            self._body(
                outcome,
                outcome=outcome,
                generation=summary.get("generation") or run.generation,
                servers={
                    "created": len(servers.get("created", [])),
                    "destroyed": len(servers.get("destroyed", [])),
                },
                message=str(summary.get("message", "")),
                next_window=summary.get("next_window"),
            ),
        )

    def _body(self, event: str, **fields: Any) -> dict[str, Any]:
        run = self._run
        assert run is not None
        body: dict[str, Any] = {
            "event": event,
            "run_id": run.run_id,
            "stack": run.stack,
            "strategy": run.strategy,
            "outcome": None,
            "generation": run.generation,
            "servers": None,
            "step": None,
            "next_window": None,
            "resumed": run.resumed,
            "message": "",
            "time": dt.datetime.fromtimestamp(self.now(), dt.UTC).isoformat(timespec="seconds"),
        }
        body.update(fields)
        return body

    # --- delivery ------------------------------------------------------------------------
    def publish(self, event: str, body: dict[str, Any]) -> None:
        """Queue `body` (redacted) for every webhook that subscribes to `event`."""
        data = json.dumps(redact(body, stringify=True)).encode()
        with self._lock:
            if self._closed:
                return
            for target in self.targets:
                if event in target.events:
                    self._worker(target).put(event, data)

    def _worker(self, target: Target) -> _Worker:
        worker = self._workers.get(target.label)
        if worker is None:
            if not self._workers:
                atexit.register(self.close)  # the last few seconds of the process
            worker = self._workers[target.label] = _Worker(
                target, self.send, self.policy, self.agent
            )
        return worker

    def close(self, deadline: float | None = None) -> dict[str, list[str]]:
        """Wait at most `deadline` seconds (all webhooks together) for what is queued,
        then stop. Logs and returns what was not delivered: webhook label -> events."""
        with self._lock:
            if self._closed:
                return {}
            self._closed = True
            workers = list(self._workers.values())
        atexit.unregister(self.close)
        until = time.monotonic() + (self.deadline if deadline is None else deadline)
        undelivered: dict[str, list[str]] = {}
        for worker in workers:
            left = worker.wait(until)
            worker.stop()
            if left:
                undelivered[worker.target.label] = left
                get_logger(webhook=worker.target.label).warning(
                    log_events.NOTIFY_UNDELIVERED,
                    events=left,
                    error=worker.last_error or "no answer yet",
                    note="gave up waiting at exit; the run's outcome is not affected",
                )
        return undelivered


def sink_for(
    settings: Settings,
    config: StackConfig,
    environ: Mapping[str, str],
    then: Callable[[str, dict[str, Any]], None] | None = None,
) -> Callable[[str, dict[str, Any]], None] | None:
    """`then` (another sink, or None), plus a Notifier when the root or the stack
    configures webhooks. The CLI passes the environment: nothing here reads it."""
    name = next((n for n, c in settings.stacks.items() if c is config), "?")
    targets = [resolve(f"notify.{i}", n, environ) for i, n in enumerate(settings.notify)]
    targets += [
        resolve(f"stacks.{name}.notify.{i}", n, environ) for i, n in enumerate(config.notify)
    ]
    if not targets:
        return then
    notifier = Notifier(targets)
    if then is None:
        return notifier
    other = then

    def both(kind: str, payload: dict[str, Any]) -> None:
        other(kind, payload)
        notifier(kind, payload)

    return both
