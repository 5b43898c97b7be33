"""What a step is waiting for, announced as events (no terminal code here).

A step wraps a long wait (a boot, the health gate, a drain, a bake, a data copy) in
``with ctx.waiting("boot of 2 server(s): i-1, i-2", deadline=300) as w:`` and may say
how it goes with ``w.update("1 of 2 running")``. The engine binds the tracker to the
step being run and to its event sink, which then receives::

    wait_started   {step, what, detail, elapsed, deadline, duration}
    wait_progress  the same keys: the detail changed, or a poll goes on
    wait_done      the same keys and ok: whether the wait ended well

``elapsed`` is seconds since the wait began (by the run's clock); ``deadline`` is the
seconds after its start at which the step gives up (None: not known); ``duration`` is
how long a wait of a known length lasts (a bake, a retain time).

A polling step (one that raises TransientError until the world is ready, retried by the
engine) opens the same wait on each attempt: a TransientError leaving the block keeps
the wait open (``wait_progress`` with the error as its detail), and the next attempt's
``waiting`` with the same ``what`` goes on with it, so one wait spans all the polls. The
engine closes whatever is still open when the step ends. A poll is therefore a
TransientError that leaves a wait: the engine does not report it as a retry.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.errors import TransientError

WaitSink = Callable[[str, dict[str, Any]], None]


def some(ids: Sequence[str], limit: int = 4) -> str:
    """Server ids for a progress line: the first few, then how many more."""
    shown = ", ".join(ids[:limit])
    return f"{shown} and {len(ids) - limit} more" if len(ids) > limit else shown


@dataclass
class Wait:
    """One wait of a step: what, since when, how it goes."""

    what: str
    started: float
    clock: Callable[[], float]
    deadline: float | None = None
    duration: float | None = None
    detail: str = ""
    _emit: Callable[[str, Wait, dict[str, Any]], None] = field(
        default=lambda _k, _w, _x: None, repr=False
    )

    def elapsed(self) -> float:
        return max(self.clock() - self.started, 0.0)

    def update(self, detail: str) -> None:
        """Say how the wait goes (`3 request(s) in flight`); announced when it changes."""
        if detail != self.detail:
            self.detail = detail
            self._emit("wait_progress", self, {})

    def payload(self, step: str) -> dict[str, Any]:
        return {
            "step": step,
            "what": self.what,
            "detail": self.detail,
            "elapsed": round(self.elapsed(), 3),
            "deadline": self.deadline,
            "duration": self.duration,
        }


class Waits:
    """The waits of the step being run. The engine binds it (`start`) before a step's
    attempts and closes it (`stop`) after them; without a binding the events go nowhere."""

    def __init__(self) -> None:
        self.step = ""
        self._sink: WaitSink = lambda _k, _p: None
        self._open: list[Wait] = []  # entered by this attempt and not left yet
        self._pending: dict[str, Wait] = {}  # left open by a poll, by what
        self._poll: BaseException | None = None  # the error of the last poll

    def polled(self, exc: BaseException | None) -> bool:
        """Did this error leave a wait open (a poll of what the step waits for), rather
        than come from outside every wait (a retry after an error)?"""
        return exc is not None and exc is self._poll

    def start(self, step: str, sink: WaitSink) -> None:
        """Bind to a step about to be attempted: its events go to `sink`."""
        self.stop(ok=False)
        self.step, self._sink = step, sink

    def stop(self, *, ok: bool) -> None:
        """The step's attempts are over: close every wait still open."""
        for w in [*reversed(self._open), *self._pending.values()]:
            self._emit("wait_done", w, {"ok": ok})
        self._open.clear()
        self._pending.clear()
        self._poll = None

    def _emit(self, kind: str, w: Wait, extra: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):  # progress is never worth failing a step
            self._sink(kind, {**w.payload(self.step), **extra})

    @contextlib.contextmanager
    def waiting(
        self,
        what: str,
        *,
        clock: Callable[[], float] = time.time,
        deadline: float | None = None,
        duration: float | None = None,
    ) -> Iterator[Wait]:
        """Announce a wait for the time the block runs (see the module's docstring)."""
        w = self._pending.pop(what, None)
        if w is not None:
            w.deadline, w.duration = deadline, duration
            self._emit("wait_progress", w, {})
        else:
            for other in self._pending.values():  # a poll that is now something else
                self._emit("wait_done", other, {"ok": True})
            self._pending.clear()
            w = Wait(what, clock(), clock, deadline, duration, _emit=self._emit)
            self._emit("wait_started", w, {})
        self._open.append(w)
        try:
            yield w
        except TransientError as exc:
            self._open.remove(w)
            w.detail = str(exc)
            self._pending[what] = w  # the next attempt goes on with it
            self._poll = exc
            self._emit("wait_progress", w, {})
            raise
        except BaseException:
            self._open.remove(w)
            self._emit("wait_done", w, {"ok": False})
            raise
        self._open.remove(w)
        self._emit("wait_done", w, {"ok": True})
