"""Lifecycle hooks: commands or webhooks through which another system acts on, or holds,
a server on its way out of service or into it (Cluster API's pre-drain and
pre-terminate hooks are the model).

    pre_drain      each server leaving service, once it is out of every entry point and
                   before changeover waits for its requests in flight (DrainServers,
                   RetireServers, DrainForUpgrade)
    pre_terminate  each old server about to be destroyed, before the first destroy call
                   of its step (DestroyServers, RetireServers): before the point of no
                   return, so a failing hook still rolls back cleanly
    post_cutover   each new server once it serves (RepointAddress, AddMembers)

A hook runs once per server and step, one server after the other. Either:

- a **command** (`Hook.command`), run on the machine running changeover without a shell
  (write `sh -c '...'` for one), with changeover's environment less its own
  ``CHANGEOVER_*`` settings, plus CHANGEOVER_HOOK, CHANGEOVER_STACK, CHANGEOVER_RUN_ID,
  CHANGEOVER_SERVER_ID, CHANGEOVER_SERVER_ROLE, CHANGEOVER_SERVER_ADDRESS (its IP or
  host name; empty when it has none) and CHANGEOVER_SERVER_PORT (when known). Exit 0
  passes; anything else, or running past `timeout` (the command's process group is then
  killed), fails the step. A command holds by running;
- or a **webhook** (`Hook.webhook`): a JSON POST of ``{"hook", "run_id", "stack",
  "server": {"id", "role", "address", "port", "generation"}}``. A 2xx passes. 409, 423,
  or a 2xx whose JSON body says ``{"hold": true}`` (with an optional ``"reason"``)
  holds: the hook is asked again after the answer's Retry-After seconds, or `interval`,
  until `timeout`. A 5xx or no answer is asked again the same way. Any other answer
  (a 4xx) fails the step at once.

Each server whose hook passed is journaled in the step's marks at once (RunContext.mark),
so a resumed attempt of the step never runs it again for that server. While a hook runs
or holds, the step's marks say so, and `changeover status RUN` shows it
(`describe_running`).

Errors: HookFailed (a StepFailed: the engine rolls the run back, or past a point of no
return ends it dirty) names the hook, the server and what it answered.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from tenacity import RetryCallState, Retrying, retry_if_exception_type

from orchestrator import events
from orchestrator.errors import StepFailed
from orchestrator.models import Server
from orchestrator.plan import RunContext
from orchestrator.settings import ENV_PREFIX, Hook
from orchestrator.waits import Wait

Phase = Literal["pre_drain", "pre_terminate", "post_cutover"]
PHASES: tuple[Phase, ...] = ("pre_drain", "pre_terminate", "post_cutover")

HOOKS_MARK = "hooks"  # marks: phase -> ids of the servers whose hook passed in this step
RUNNING_MARK = "hook_running"  # marks: the hook running now (what `status` shows)
HOLD_STATUSES = (409, 423)  # Conflict, Locked: "not yet, ask again"
REQUEST_TIMEOUT = 10.0  # seconds one webhook request may take (within the hook's timeout)
OUTPUT_TAIL = 400  # characters of a failed command's output kept in the error
BODY_LIMIT = 65_536  # bytes of a webhook's answer read


class HookFailed(StepFailed):
    """A lifecycle hook failed: non-zero, refused, or still holding at its timeout."""


class _AskAgain(Exception):
    """A webhook held (or did not answer): ask again after `pause` seconds."""

    def __init__(self, detail: str, pause: float | None, *, held: bool) -> None:
        super().__init__(detail)
        self.detail = detail
        self.pause = pause
        self.held = held


def configured(ctx: RunContext, phase: Phase) -> Hook | None:
    """The stack's hook for `phase`, if any."""
    hooks = getattr(ctx.config, "hooks", None)
    spec: Hook | None = getattr(hooks, phase, None) if hooks is not None else None
    return spec


def passed(ctx: RunContext, phase: Phase) -> list[str]:
    """The servers whose `phase` hook passed in this step (this attempt or an earlier one)."""
    done = (ctx.marks.get(HOOKS_MARK) or {}).get(phase) or []
    return [str(i) for i in done]


def outputs(ctx: RunContext) -> dict[str, Any]:
    """What a step adds to its outputs: the hooks that passed, by phase (none: nothing)."""
    done = ctx.marks.get(HOOKS_MARK)
    return {HOOKS_MARK: done} if done else {}


def run_hooks(ctx: RunContext, phase: Phase, ids: Sequence[str]) -> list[str]:
    """Run the stack's `phase` hook for each server not done yet, in order, journaling
    each one that passes. Returns the servers whose hook ran now. Raises HookFailed at
    the first failure. Without a configured hook: nothing, and no call is made."""
    spec = configured(ctx, phase)
    if spec is None or not ids:
        return []
    done = passed(ctx, phase)
    todo = [i for i in ids if i not in done]
    if not todo:
        return []
    found = {s.id: s for s in ctx.provider.describe_servers(ctx.stack, todo)}
    ran: list[str] = []
    for server_id in todo:
        server = found.get(server_id)
        if server is None or server.state == "terminated":
            continue  # gone already: nothing left to prepare
        _run_one(ctx, phase, spec, server)
        done.append(server_id)
        ran.append(server_id)
        ctx.mark(**{HOOKS_MARK: {**(ctx.marks.get(HOOKS_MARK) or {}), phase: done}})
    return ran


def _run_one(ctx: RunContext, phase: Phase, spec: Hook, server: Server) -> None:
    kind = "command" if spec.command is not None else "webhook"
    running = {
        "hook": phase,
        "kind": kind,
        "server": server.id,
        "since": time.time(),
        "timeout": spec.timeout,
    }
    # A fenced journal write before the hook runs: a process whose lease was taken
    # over stops here, before it acts on anything outside.
    ctx.mark(**{RUNNING_MARK: running})
    ctx.log.info(events.HOOK_STARTED, hook=phase, kind=kind, server=server.id)
    try:
        with ctx.waiting(f"{phase} hook for {server.id}", deadline=spec.timeout) as wait:
            if spec.command is not None:
                _command(ctx, phase, spec, server)
            else:
                _webhook(ctx, phase, spec, server, wait=wait, running=running)
    except HookFailed as exc:
        ctx.log.error(events.HOOK_FAILED, hook=phase, server=server.id, error=str(exc))
        raise
    finally:
        ctx.mark(**{RUNNING_MARK: None})
    ctx.log.info(events.HOOK_PASSED, hook=phase, kind=kind, server=server.id)


def hook_env(
    ctx: RunContext, phase: Phase, server: Server, base: Mapping[str, str]
) -> dict[str, str]:
    """A command hook's environment: `base` less changeover's own CHANGEOVER_* settings
    (a hook that runs changeover must not inherit a testing hook), plus the hook's."""
    env = {k: v for k, v in base.items() if not k.upper().startswith(ENV_PREFIX)}
    env.update(
        {
            "CHANGEOVER_HOOK": phase,
            "CHANGEOVER_STACK": ctx.stack,
            "CHANGEOVER_RUN_ID": ctx.run_id,
            "CHANGEOVER_SERVER_ID": server.id,
            "CHANGEOVER_SERVER_ROLE": server.role,
            "CHANGEOVER_SERVER_ADDRESS": server.host or "",
            "CHANGEOVER_SERVER_GENERATION": str(server.generation),
        }
    )
    if server.port is not None:
        env["CHANGEOVER_SERVER_PORT"] = str(server.port)
    return env


def _command(ctx: RunContext, phase: Phase, spec: Hook, server: Server) -> None:
    argv = spec.argv
    what = f"{phase} hook for {server.id}"
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # The hook's environment, not config: changeover's own, passed on.
            env=hook_env(ctx, phase, server, os.environ),
            start_new_session=True,  # its own process group: a timeout kills all of it
        )
    except OSError as exc:
        raise HookFailed(f"{what}: cannot run {argv[0]!r}: {exc.strerror or exc}") from None
    try:
        out, _ = proc.communicate(timeout=spec.timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise HookFailed(
            f"{what}: `{argv[0]}` still running after its timeout of {spec.timeout:g} s; killed"
        ) from None
    text = out.decode(errors="replace").strip() if out else ""
    ctx.log.debug(events.HOOK_OUTPUT, hook=phase, server=server.id, output=text[-OUTPUT_TAIL:])
    if proc.returncode != 0:
        tail = f": {text[-OUTPUT_TAIL:]}" if text else ""
        raise HookFailed(f"{what}: `{argv[0]}` exited {proc.returncode}{tail}")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def webhook_body(ctx: RunContext, phase: Phase, server: Server) -> dict[str, Any]:
    """What a webhook hook is sent."""
    return {
        "hook": phase,
        "run_id": ctx.run_id,
        "stack": ctx.stack,
        "server": {
            "id": server.id,
            "role": server.role,
            "address": server.host,
            "port": server.port,
            "generation": server.generation,
        },
    }


def _webhook(
    ctx: RunContext,
    phase: Phase,
    spec: Hook,
    server: Server,
    *,
    wait: Wait,
    running: dict[str, Any],
) -> None:
    """POST until the answer passes (return) or fails (HookFailed); holds and missing
    answers are asked again, with tenacity, until the hook's timeout."""
    url = str(spec.webhook)
    what = f"{phase} hook for {server.id}"
    data = json.dumps(webhook_body(ctx, phase, server)).encode()
    deadline = ctx.clock() + spec.timeout
    holds = 0

    def pause(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        wanted = exc.pause if isinstance(exc, _AskAgain) and exc.pause is not None else None
        return spec.hold_interval if wanted is None else wanted

    def out_of_time(state: RetryCallState) -> bool:
        return ctx.clock() + pause(state) > deadline

    def noted(state: RetryCallState) -> None:
        nonlocal holds
        exc = state.outcome.exception() if state.outcome else None
        if not isinstance(exc, _AskAgain):
            return
        holds += exc.held
        detail = f"held {holds} time(s): {exc.detail}" if exc.held else exc.detail
        wait.update(detail)
        ctx.mark(**{RUNNING_MARK: {**running, "holds": holds, "detail": detail}})
        ctx.log.info(events.HOOK_HELD, hook=phase, server=server.id, detail=exc.detail)

    def ask() -> None:
        left = max(deadline - ctx.clock(), 0.1)
        _post(url, data, timeout=min(REQUEST_TIMEOUT, left), what=what)

    retrying = Retrying(
        retry=retry_if_exception_type(_AskAgain),
        wait=pause,
        stop=out_of_time,
        sleep=ctx.wait,  # renews the lease while it waits
        before_sleep=noted,
        reraise=True,
    )
    try:
        retrying(ask)
    except _AskAgain as exc:
        raise HookFailed(
            f"{what}: still {'held' if exc.held else 'not answering'} after its timeout of "
            f"{spec.timeout:g} s ({exc.detail})"
        ) from None


def _post(url: str, data: bytes, *, timeout: float, what: str) -> None:
    """One ask: return on a pass, raise _AskAgain on a hold or no answer, HookFailed on
    a refusal."""
    req = urllib.request.Request(
        url,
        data=data,
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "changeover-hook"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, headers, body = resp.status, resp.headers, resp.read(BODY_LIMIT)
    except urllib.error.HTTPError as exc:
        status, headers, body = exc.code, exc.headers, exc.read(BODY_LIMIT)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _AskAgain(f"no answer ({reason})", None, held=False) from None
    answer = _json(body)
    reason = str(answer.get("reason") or "").strip()
    said = f"HTTP {status}" + (f" ({reason})" if reason else "")
    if status in HOLD_STATUSES or (200 <= status < 300 and answer.get("hold") is True):
        raise _AskAgain(said, _retry_after(headers), held=True)
    if 200 <= status < 300:
        return
    if status >= 500:
        raise _AskAgain(said, _retry_after(headers), held=False)
    raise HookFailed(f"{what}: the webhook answered {said}")


def _json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body) if body else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _retry_after(headers: Any) -> float | None:
    """Retry-After in seconds (the HTTP-date form is not worth a hook's while)."""
    try:
        value = float(headers.get("Retry-After", ""))
    except (TypeError, ValueError):
        return None
    return max(value, 0.0)


def describe_running(marks: Mapping[str, Any], now: float) -> str | None:
    """For `status`: the hook a step is running now, from its journaled marks."""
    running = marks.get(RUNNING_MARK)
    if not isinstance(running, dict):
        return None
    elapsed = max(now - float(running.get("since", now)), 0.0)
    detail = running.get("detail") or "running"
    return (
        f"{running.get('hook')} hook ({running.get('kind')}) for {running.get('server')}: "
        f"{detail} for {elapsed:.0f} s (timeout {float(running.get('timeout') or 0):.0f} s)"
    )
