"""Progress on a terminal: a line per step, and one live line while a step waits.

The engine and the steps only emit events (orchestrator/waits.py says which); this
module draws them with rich on stderr, and only there: the CLI hands the engine a
renderer only when stderr is a terminal and the output is not JSON (``sink_for``), so
stdout always holds exactly the result, and a pipe or a log file gets no progress.

    → [3/12] WaitRunning
    ⠹ WaitRunning — boot of 2 server(s): srv-1, srv-2 (1 of 2 still booting) — 14 s (timeout 2 min)
    ✓ WaitRunning — waited 15 s

The live line is redrawn at most every ``interval`` seconds (events may come faster: a
drain polls every 50 ms), and by a ticker thread in between, so the seconds go on while
a step is blocked in one long provider call (a snapshot). It is cleared when its wait
ends; the step's ✓ or ✗ line takes its place. Log lines print above it.
"""

from __future__ import annotations

import atexit
import math
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.text import Text

from orchestrator.redact import redact_text

SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
REFRESH_INTERVAL = 0.25  # seconds: at most four redraws a second


def seconds(value: float) -> str:
    """A duration for a person: `14 s`, `2 min 05 s`, `1 h 02 min` (whole units, floored)."""
    s = max(int(value), 0)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min" + (f" {s % 60:02d} s" if s % 60 else "")
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


@dataclass
class WaitLine:
    """One open wait as the renderer sees it."""

    step: str
    what: str
    started: float  # by the renderer's clock
    detail: str = ""
    deadline: float | None = None
    duration: float | None = None

    def text(self, now: float, frame: int = 0) -> str:
        """The live line: spinner, step, what (detail), seconds waited and the limit."""
        elapsed = now - self.started
        out = f"{SPINNER[frame % len(SPINNER)]} {self.step} — {redact_text(self.what)}"
        if self.detail:
            out += f" ({redact_text(self.detail)})"
        out += f" — {seconds(elapsed)}"
        if self.duration:
            out += f" of {seconds(self.duration)}"
        elif self.deadline:
            out += f" (timeout {seconds(self.deadline)})"
        return out


class ProgressRenderer:
    """An engine event sink that draws on a rich console. Thread-safe: the ticker
    redraws from a thread of its own."""

    def __init__(
        self,
        console: Console,
        *,
        clock: Callable[[], float] = time.monotonic,
        interval: float = REFRESH_INTERVAL,
        ticker: bool = True,
    ) -> None:
        self.console = console
        self.clock = clock
        self.interval = interval
        self.redraws = 0  # how many times the live line was drawn
        self._lock = threading.RLock()
        self._lines: list[WaitLine] = []  # open waits, newest last: the line shows it
        self._waited: dict[str, float] = {}  # seconds each step waited, for its ✓ line
        self._live: Live | None = None
        self._last_redraw = -math.inf
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ticker = ticker

    # --- the sink --------------------------------------------------------------------
    def __call__(self, kind: str, p: dict[str, Any]) -> None:
        with self._lock:
            handler = getattr(self, f"_on_{kind}", None)
            if handler is not None:
                handler(p)

    def close(self) -> None:
        """Clear the live line (if any) and stop the ticker."""
        self._stop.set()
        with self._lock:
            self._lines.clear()
            self._end_live()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)

    def _print(self, markup: str) -> None:
        self.console.print(markup, highlight=False, soft_wrap=True)

    # --- steps -------------------------------------------------------------------------
    def _on_step_started(self, p: dict[str, Any]) -> None:
        self._waited.pop(p["step"], None)
        self._print(f"[bold cyan]→[/] [{p['index'] + 1}/{p['total']}] {escape(p['step'])}")

    def _on_step_done(self, p: dict[str, Any]) -> None:
        self._end_step(p["step"])
        waited = self._waited.pop(p["step"], None)
        note = f" [dim]— waited {seconds(waited)}[/]" if waited and waited >= 1 else ""
        if p.get("noop"):
            note += f" [dim](no-op: {escape(redact_text(str(p['noop'])))})[/]"
        self._print(f"[green]✓[/] {escape(p['step'])}{note}")

    def _on_step_failed(self, p: dict[str, Any]) -> None:
        self._end_step(p["step"])
        self._print(f"[red]✗[/] {escape(p['step'])}: {escape(redact_text(str(p['error'])))}")

    def _on_retry(self, p: dict[str, Any]) -> None:
        if p.get("polling"):
            return  # a poll of a wait: its line says how it goes
        self._print(f"[dim]  retrying {escape(p['step'])} (attempt {p['attempt']})[/]")

    def _on_rollback_started(self, p: dict[str, Any]) -> None:
        self._lines.clear()
        self._end_live()
        self._print(f"[yellow]↺ rolling back[/]: {escape(redact_text(str(p['cause'])))}")

    def _on_undo_done(self, p: dict[str, Any]) -> None:
        self._end_step(p["step"])
        self._print(f"[yellow]↺[/] undid {escape(p['step'])}")

    def _on_paused(self, p: dict[str, Any]) -> None:
        self._end_step(p["step"])
        window = escape(str(p.get("next_window", "")))
        self._print(f"[yellow]⏸[/] {escape(p['step'])}: paused until the next window {window}")

    # --- waits -------------------------------------------------------------------------
    def _find(self, p: dict[str, Any]) -> WaitLine | None:
        for line in self._lines:
            if line.step == p["step"] and line.what == p["what"]:
                return line
        return None

    def _on_wait_started(self, p: dict[str, Any]) -> None:
        if (line := self._find(p)) is None:
            started = self.clock() - float(p.get("elapsed") or 0.0)
            line = WaitLine(p["step"], p["what"], started)
            self._lines.append(line)
        self._set(line, p)
        self._start_live()
        self._redraw(force=True)

    def _on_wait_progress(self, p: dict[str, Any]) -> None:
        if (line := self._find(p)) is None:  # its start was missed: begin the line here
            self._on_wait_started(p)
            return
        self._set(line, p)
        self._redraw()

    def _on_wait_done(self, p: dict[str, Any]) -> None:
        line = self._find(p)
        if line is not None:
            self._lines.remove(line)
            elapsed = max(self.clock() - line.started, 0.0)
            self._waited[line.step] = self._waited.get(line.step, 0.0) + elapsed
        if self._lines:
            self._redraw(force=True)
        else:
            self._end_live()

    @staticmethod
    def _set(line: WaitLine, p: dict[str, Any]) -> None:
        line.detail = str(p.get("detail") or "")
        line.deadline = p.get("deadline")
        line.duration = p.get("duration")

    def _end_step(self, step: str) -> None:
        self._lines = [line for line in self._lines if line.step != step]
        if not self._lines:
            self._end_live()

    # --- the live line -------------------------------------------------------------------
    def line(self, now: float | None = None) -> str | None:
        """The text of the live line now (the newest open wait), or None."""
        if not self._lines:
            return None
        return self._lines[-1].text(self.clock() if now is None else now, self.redraws)

    def _start_live(self) -> None:
        if self._live is not None:
            return
        self._live = Live(
            console=self.console,
            auto_refresh=False,  # redrawn here, throttled, and by the ticker
            transient=True,  # cleared when the wait ends
            redirect_stdout=False,  # stdout holds the result only
            redirect_stderr=True,  # log lines print above the live line
        )
        self._live.start()
        self._last_redraw = -math.inf
        if self._ticker and self._thread is None:
            self._thread = threading.Thread(
                target=self._tick, name="changeover-progress", daemon=True
            )
            self._thread.start()

    def _end_live(self) -> None:
        if self._live is not None:
            live, self._live = self._live, None
            live.stop()

    def _redraw(self, *, force: bool = False) -> None:
        """Draw the live line, at most once per `interval` unless forced."""
        if self._live is None:
            return
        now = self.clock()
        if not force and now - self._last_redraw < self.interval:
            return
        text = self.line(now)
        if text is None:
            return
        self._last_redraw = now
        self.redraws += 1
        self._live.update(Text(text, no_wrap=True, overflow="ellipsis"), refresh=True)

    def tick(self) -> None:
        """One beat of the ticker: redraw if `interval` has passed, so the seconds move on
        while a step is blocked in one long call."""
        with self._lock:
            self._redraw()

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            self.tick()


def sink_for(output: str | None) -> ProgressRenderer | None:
    """The renderer for this process: only when stderr is a terminal and the output is
    not JSON; None otherwise (no progress at all: the logs tell the same story)."""
    if output == "json" or not sys.stderr.isatty():
        return None
    renderer = ProgressRenderer(Console(stderr=True))
    atexit.register(renderer.close)
    return renderer
