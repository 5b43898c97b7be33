"""Progress on a terminal: what a step waits for, as events and as one live rich line.

End to end, a real `changeover rebuild` on the local cloud runs with its stderr on a
pseudo-terminal: the waits show by name with the seconds waited. With --output json, or
with stderr not a terminal, there is no progress at all and stdout is only the result.
The renderer's text and its throttling are checked with an injected clock.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console

from orchestrator.engine import Engine
from orchestrator.errors import StepFailed, TransientError
from orchestrator.plan import Outcome, RunContext
from orchestrator.progress import ProgressRenderer, WaitLine, seconds, sink_for
from orchestrator.rehearse import World
from orchestrator.waits import Waits, some
from providers.local.provider import LocalProvider
from strategies.rebuild import plan_rebuild
from strategies.steps import _drain

RUN_TIMEOUT = 120.0  # seconds any one changeover process in this file may take
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
BOOT_DELAY = 2.5  # seconds each new server takes to boot: the boot wait is seen to tick
BAKE = "2"


# --- a real run, stderr on a pseudo-terminal ------------------------------------------------
def _command(world: World, *args: str) -> tuple[list[str], dict[str, str]]:
    cmd = [
        sys.executable,
        "-m",
        "orchestrator",
        "--config",
        str(world.config_file),
        "--state-dir",
        str(world.state_dir),
        *args,
    ]
    drop = ("CHANGEOVER_", "FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "COLUMNS", "LINES")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["TERM"] = "xterm-256color"
    return cmd, env


def _run_on_pty(world: World, *args: str) -> tuple[int, str, str]:
    """Run changeover with stderr on a pseudo-terminal (200 columns) and stdout on a pipe;
    return its exit code, stdout, and everything written to the terminal."""
    cmd, env = _command(world, *args)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    try:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=env
        )
    finally:
        os.close(slave)
    terminal = b""
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                terminal += chunk
            elif proc.poll() is not None:
                break
        else:
            pytest.fail(f"changeover {' '.join(args)} took over {RUN_TIMEOUT:.0f}s")
        stdout, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        os.close(master)
    return proc.returncode, stdout.decode(), terminal.decode(errors="replace")


def _frames(terminal: str) -> list[str]:
    """What the terminal showed, one entry per drawn line: escape codes dropped, and a
    live line's redraws (carriage returns) split apart."""
    text = ANSI.sub("", terminal).replace("\r\n", "\n")
    return [f.strip() for line in text.split("\n") for f in line.split("\r") if f.strip()]


def _slow_boot(world: World) -> None:
    """The next generation's servers take BOOT_DELAY seconds to boot."""
    world.cloud.inject("server", times=3, boot_delay=BOOT_DELAY)


PROGRESS_MARKS = ("→ [", "✓ ", "✗ ", "— boot of", "— health gate on", "— bake through", "⠋")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_rebuild_on_a_terminal_shows_each_wait_by_name_with_the_seconds_waited(
    world: World,
) -> None:
    _slow_boot(world)
    code, stdout, terminal = _run_on_pty(world, "rebuild", "demo", "--yes", "--bake", BAKE)
    assert code == 0, terminal[-4000:]
    frames = _frames(terminal)

    boot = [f for f in frames if " WaitRunning — boot of 3 server(s): srv-" in f]
    assert boot, frames
    # The seconds tick on the same line while the servers boot, below the timeout.
    shown = {int(m.group(1)) for f in boot if (m := re.search(r"— (\d+) s \(timeout", f))}
    assert 0 in shown and max(shown) >= 2 and len(shown) >= 3, boot
    assert all(f.endswith("(timeout 2 min)") for f in boot), boot[-1]
    # The polls are the line's detail, not lines of their own.
    assert any("still booting)" in f for f in boot)
    assert not any("retrying WaitRunning" in f for f in frames)

    assert any(" VerifyServers — health gate on 3 server(s): " in f for f in frames)
    assert any(" CopyData — live copy of the data srv-" in f for f in frames)
    assert any(" SyncData — final sync of the data srv-" in f for f in frames)
    bake = [f for f in frames if re.search(r" Bake — bake through demo-eip .* s of 2 s$", f)]
    assert any(re.search(r"— 1 s of 2 s$", f) for f in bake), bake
    # When a step ends its live line gives way to the ✓ line, which says how long it waited.
    assert any(re.fullmatch(r"✓ WaitRunning — waited \d+ s", f) for f in frames), frames
    assert any(re.fullmatch(r"✓ Bake — waited [23] s", f) for f in frames), frames
    assert "✓ CreateServers[db]" in frames  # step keys are not taken for rich markup

    # stdout is the result only.
    assert stdout.startswith("run r") and "-> SUCCEEDED" in stdout
    assert not any(mark in stdout for mark in PROGRESS_MARKS), stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_json_output_and_a_stderr_that_is_no_terminal_get_no_progress(world: World) -> None:
    # --output json, even with stderr on a terminal: one JSON object, no progress.
    _slow_boot(world)
    code, stdout, terminal = _run_on_pty(
        world, "--output", "json", "rebuild", "demo", "--yes", "--bake", BAKE
    )
    assert code == 0, terminal[-4000:]
    result = json.loads(stdout)
    assert result["outcome"] == "succeeded" and result["generation"]["after"] == 2
    assert not any(mark in terminal for mark in PROGRESS_MARKS), terminal[-4000:]
    assert "step.done" in terminal  # the logs still go to stderr

    # Text output with stderr on a pipe: no progress either.
    _slow_boot(world)
    cmd, env = _command(world, "rebuild", "demo", "--yes", "--bake", BAKE)
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.startswith("run r") and "-> SUCCEEDED" in proc.stdout
    assert not any(mark in proc.stderr for mark in PROGRESS_MARKS), proc.stderr[-4000:]
    assert not any(mark in proc.stdout for mark in PROGRESS_MARKS)
    assert "\x1b[" not in proc.stderr  # no escape codes: nothing was drawn


def test_sink_for_is_none_for_json_or_a_stderr_that_is_no_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tty = SimpleNamespace(isatty=lambda: True)
    monkeypatch.setattr(sys, "stderr", tty)
    assert sink_for("json") is None
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert sink_for("text") is None


# --- the events a run emits -------------------------------------------------------------
@pytest.mark.slow
def test_the_engine_emits_each_long_wait_once_and_polls_are_not_retries(world: World) -> None:
    _slow_boot(world)
    seen: list[tuple[str, dict[str, Any]]] = []
    engine = Engine(
        state_dir=world.state_dir,
        provider=LocalProvider(world.cloud),
        config=world.config,
        on_event=lambda kind, payload: seen.append((kind, payload)),
    )
    try:
        result = engine.start(plan_rebuild(engine.provider, "demo", world.config, bake=1.0))
    finally:
        engine.close()
    assert result.outcome == Outcome.SUCCEEDED, result.message

    waits = [(k, p) for k, p in seen if k.startswith("wait_")]
    started = [p for k, p in waits if k == "wait_started"]
    done = [p for k, p in waits if k == "wait_done"]
    # Every wait that began ended, well, once; one boot wait spans all the polls.
    assert [(p["step"], p["what"]) for p in started] == [(p["step"], p["what"]) for p in done]
    assert all(p["ok"] for p in done)
    by_step = {p["step"]: p for p in started}
    assert by_step["WaitRunning"]["what"].startswith("boot of 3 server(s): srv-")
    assert by_step["WaitRunning"]["deadline"] == 120.0
    assert by_step["VerifyServers"]["what"].startswith("health gate on 3 server(s): ")
    assert by_step["CopyData"]["what"].startswith("live copy of the data srv-")
    assert by_step["SyncData"]["what"].startswith("final sync of the data srv-")
    assert by_step["Bake"]["duration"] == 1.0 and by_step["Bake"]["what"] == (
        "bake through demo-eip"
    )
    boot_done = next(p for p in done if p["step"] == "WaitRunning")
    assert boot_done["elapsed"] >= BOOT_DELAY - 0.5
    polls = [p for k, p in waits if k == "wait_progress" and p["step"] == "WaitRunning"]
    assert polls and all("still booting" in p["detail"] for p in polls)
    # The boot's polls are retries marked as polls; the renderer prints none of them.
    retries = [p for k, p in seen if k == "retry" and p["step"] == "WaitRunning"]
    assert retries and all(p["polling"] for p in retries)
    # Each wait event comes inside its step: after step_started, before step_done.
    order = [(k, p.get("step")) for k, p in seen]
    for p in started:
        assert order.index(("step_started", p["step"])) < order.index(("wait_started", p["step"]))
        assert order.index(("wait_done", p["step"])) < order.index(("step_done", p["step"]))


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_polled_wait_spans_its_attempts_and_a_real_error_ends_it() -> None:
    """TransientError out of a wait is a poll: the next attempt goes on with the same
    wait. Another error ends it (ok false); an error from outside any wait is no poll."""
    clock, seen = _Clock(), []
    waits = Waits()
    waits.start("WaitRunning", lambda kind, p: seen.append((kind, p)))
    for n in range(3):  # three attempts, each a poll
        try:
            with waits.waiting("boot of 2 server(s): a, b", clock=clock, deadline=30.0):
                clock.now += 1
                raise TransientError(f"{2 - n // 2} of 2 servers still booting")
        except TransientError as exc:
            assert waits.polled(exc)
    with waits.waiting("boot of 2 server(s): a, b", clock=clock, deadline=30.0):
        clock.now += 0.5
    waits.stop(ok=True)
    kinds = [k for k, _ in seen]
    assert kinds.count("wait_started") == 1 and kinds.count("wait_done") == 1
    assert seen[0][1] == {
        "step": "WaitRunning",
        "what": "boot of 2 server(s): a, b",
        "detail": "",
        "elapsed": 0.0,
        "deadline": 30.0,
        "duration": None,
    }
    assert seen[-1][1]["elapsed"] == 3.5 and seen[-1][1]["ok"] is True
    assert [p["detail"] for k, p in seen if k == "wait_progress"][-1] == (
        "1 of 2 servers still booting"
    )

    seen.clear()
    waits.start("DrainServers", lambda kind, p: seen.append((kind, p)))
    other = TransientError("throttled")
    assert not waits.polled(other)
    with pytest.raises(StepFailed), waits.waiting("drain of a", clock=clock):
        raise StepFailed("did not drain")
    assert [k for k, _ in seen] == ["wait_started", "wait_done"]
    assert seen[-1][1]["ok"] is False and seen[-1][1]["step"] == "DrainServers"


def test_a_poll_left_open_is_closed_when_the_step_ends() -> None:
    clock, seen = _Clock(), []
    waits = Waits()
    waits.start("RebootServers#1", lambda kind, p: seen.append((kind, p)))
    with pytest.raises(TransientError), waits.waiting("reboot of 1 server(s): a", clock=clock):
        raise TransientError("1 of 1 servers rebooting")
    waits.stop(ok=False)  # the engine, when the step's attempts gave up
    assert [k for k, _ in seen] == ["wait_started", "wait_progress", "wait_done"]
    assert seen[-1][1]["ok"] is False


def test_a_broken_sink_never_fails_the_step() -> None:
    def boom(kind: str, p: dict[str, Any]) -> None:
        raise RuntimeError("terminal gone")

    waits = Waits()
    waits.start("Bake", boom)
    with waits.waiting("bake through x", duration=5.0) as w:
        w.update("1 check(s) passed")


def test_drain_says_what_it_waits_for_and_how_many_requests_are_in_flight() -> None:
    """_drain (DrainServers, DrainForUpgrade, RetireServers, undo of a cutover) opens a
    wait only when something is in flight, and updates it as requests finish."""
    clock, seen = _Clock(), []
    inflight = iter([{"web-1": 3}, {"web-1": 2}, {"web-1": 1}, {}])

    def sleep(s: float) -> None:
        clock.now += s

    provider = SimpleNamespace(inflight=lambda stack, ep: next(inflight), refresh=lambda: None)
    config = SimpleNamespace(
        defaults=SimpleNamespace(drain_timeout=300.0), entry_points=[SimpleNamespace(name="lb")]
    )
    ctx = RunContext(
        run_id="r",
        stack="s",
        config=config,  # type: ignore[arg-type]
        provider=provider,  # type: ignore[arg-type]
        outputs={},
        log=SimpleNamespace(debug=lambda *a, **k: None),
        clock=clock,
        sleep=sleep,
    )
    ctx.waits.start("DrainServers", lambda kind, p: seen.append((kind, p)))
    _drain(ctx, ["web-1"])
    assert [k for k, _ in seen] == ["wait_started", *["wait_progress"] * 3, "wait_done"]
    assert seen[0][1]["what"] == "drain of web-1" and seen[0][1]["deadline"] == 300.0
    assert [p["detail"] for k, p in seen if k == "wait_progress"] == [
        "3 request(s) in flight",
        "2 request(s) in flight",
        "1 request(s) in flight",
    ]
    assert seen[-1][1]["ok"] is True and seen[-1][1]["elapsed"] > 0

    seen.clear()
    inflight = iter([{}])
    _drain(ctx, ["web-1"])
    assert seen == []  # nothing in flight: no wait to show


# --- the renderer, with an injected clock ------------------------------------------------
def _renderer() -> tuple[ProgressRenderer, _Clock, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200, color_system=None)
    clock = _Clock()
    return ProgressRenderer(console, clock=clock, ticker=False), clock, out


def _wait(kind: str, **p: Any) -> tuple[str, dict[str, Any]]:
    base = {"step": "WaitRunning", "what": "boot of 2 server(s): i-1, i-2", "detail": ""}
    base.update({"elapsed": 0.0, "deadline": 300.0, "duration": None})
    return kind, {**base, **p}


def test_seconds_read_like_a_person_would_say_them() -> None:
    assert [seconds(s) for s in (0, 0.9, 14.7, 119, 120, 125, 3600, 7199, 7260)] == [
        "0 s",
        "0 s",
        "14 s",
        "119 s",
        "2 min",
        "2 min 05 s",
        "60 min",
        "119 min 59 s",
        "2 h 01 min",
    ]


def test_the_line_names_step_what_detail_seconds_and_the_limit() -> None:
    line = WaitLine("WaitRunning#1", "boot of 2 server(s): i-1, i-2", started=100.0)
    line.deadline = 300.0
    assert (
        line.text(114.2) == "⠋ WaitRunning#1 — boot of 2 server(s): i-1, i-2 — 14 s (timeout 5 min)"
    )
    line.detail = "1 of 2 servers still booting"
    assert line.text(114.2, frame=1).startswith("⠙ WaitRunning#1 — boot of 2 server(s)")
    assert "(1 of 2 servers still booting) — 14 s (timeout 5 min)" in line.text(114.2)
    bake = WaitLine("Bake", "bake through demo-eip", started=0.0, duration=30.0)
    assert bake.text(12.0) == "⠋ Bake — bake through demo-eip — 12 s of 30 s"
    snap = WaitLine("CopyData", "live copy of the data db-1 -> db-2", started=0.0)
    snap.detail = "snapshot snap-0a1 is pending"
    assert snap.text(75.0).endswith("(snapshot snap-0a1 is pending) — 75 s")
    assert some(["a", "b", "c", "d", "e", "f"]) == "a, b, c, d and 2 more"


def test_redraws_are_throttled_and_the_seconds_follow_the_clock() -> None:
    r, clock, out = _renderer()
    r("step_started", {"step": "WaitRunning", "index": 2, "total": 12})
    r(*_wait("wait_started"))
    assert r.redraws == 1  # drawn at once
    for _ in range(20):  # a burst of polls within 0.2 s: no redraw
        clock.now += 0.01
        r(*_wait("wait_progress", detail="2 of 2 still booting"))
    assert r.redraws == 1
    clock.now += 0.06  # past 0.25 s since the last redraw
    r(*_wait("wait_progress", detail="1 of 2 still booting"))
    assert r.redraws == 2
    assert (r.line() or "")[1:] == (
        " WaitRunning — boot of 2 server(s): i-1, i-2 (1 of 2 still booting) — 0 s (timeout 5 min)"
    )
    clock.now += 14
    assert "— 14 s (timeout 5 min)" in (r.line() or "")
    r.tick()  # the ticker's beat: 14 s since the last redraw
    assert r.redraws == 3
    r.tick()
    assert r.redraws == 3  # no time passed
    r(*_wait("wait_done", ok=True))
    assert r.line() is None
    r("step_done", {"step": "WaitRunning", "index": 2, "total": 12, "noop": None})
    text = out.getvalue()
    assert "→ [3/12] WaitRunning" in text
    assert "— 14 s (timeout 5 min)" in text  # the line as it was drawn
    assert text.rstrip().endswith("✓ WaitRunning — waited 14 s")


def test_real_retries_are_printed_polls_are_not_and_keys_keep_their_brackets() -> None:
    r, _, out = _renderer()
    r("step_started", {"step": "CreateServers[web]", "index": 1, "total": 12})
    r("retry", {"step": "CreateServers[web]", "attempt": 1, "polling": False})
    r("retry", {"step": "WaitRunning", "attempt": 1, "polling": True})
    r("step_done", {"step": "CreateServers[web]", "index": 1, "total": 12, "noop": "exists"})
    r("step_failed", {"step": "VerifyServers[web]", "error": "srv-1: health check failed"})
    r("rollback_started", {"cause": "VerifyServers[web] failed"})
    r("undo_done", {"step": "CreateServers[web]"})
    r("some_future_event", {"step": "x"})  # ignored
    lines = [ln.rstrip() for ln in out.getvalue().splitlines()]
    assert lines == [
        "→ [2/12] CreateServers[web]",
        "  retrying CreateServers[web] (attempt 1)",
        "✓ CreateServers[web] (no-op: exists)",
        "✗ VerifyServers[web]: srv-1: health check failed",
        "↺ rolling back: VerifyServers[web] failed",
        "↺ undid CreateServers[web]",
    ]


def test_the_line_is_cleared_when_the_step_ends_even_with_a_wait_open() -> None:
    r, clock, out = _renderer()
    r(*_wait("wait_started", step="Bake", what="bake through demo-eip", duration=30.0))
    clock.now += 3
    r("step_failed", {"step": "Bake", "error": "bake failed after 3 checks"})
    assert r.line() is None and r._live is None
    assert out.getvalue().rstrip().endswith("✗ Bake: bake failed after 3 checks")


def test_a_missed_start_still_shows_the_wait() -> None:
    r, _, _ = _renderer()
    r(*_wait("wait_progress", elapsed=7.0, detail="2 of 2 still booting"))
    assert "— 7 s (timeout 5 min)" in (r.line() or "")
    r.close()
    assert r.line() is None
