"""Maintenance windows: when a campaign (`upgrade`, `rotate`) may start its next batch.

A window is written ``[DAYS] HH:MM-HH:MM [TIMEZONE]``::

    Sat,Sun 02:00-05:00 Europe/Berlin     two nights a week, Berlin time
    Mon-Fri 22:00-01:30 UTC               weeknights, across midnight (closes the next day)
    03:00-04:00                           every day, UTC

DAYS are Mon..Sun (three letters or the full name, any case), comma-separated, with
ranges (``Mon-Fri``); none, or ``daily``, means every day. A window that ends before it
starts crosses midnight: it opens on the named day and closes the next one. The time zone
is an IANA name (Europe/Berlin, UTC); times are wall-clock times there, so a window keeps
its local hours across daylight-saving changes.

The campaign's rule (strategies/window.py applies it before each batch): a batch starts
only if its expected duration fits before the open window closes; otherwise the campaign
pauses and names the next window's start.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from orchestrator.errors import BadInput

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_FULL = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_SPEC = re.compile(
    r"^\s*(?:(?P<days>[A-Za-z][A-Za-z,\- ]*?)\s+)?"
    r"(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})"
    r"(?:\s+(?P<tz>\S+))?\s*$"
)
EXAMPLE = "Sat,Sun 02:00-05:00 Europe/Berlin"


def _day(word: str, spec: str) -> int:
    w = word.strip().lower()
    if w in DAYS:
        return DAYS.index(w)
    if w in _FULL:
        return _FULL.index(w)
    raise BadInput(f"window {spec!r}: {word.strip()!r} is not a day (Mon..Sun); like {EXAMPLE!r}")


def _days(text: str | None, spec: str) -> frozenset[int]:
    if text is None or text.strip().lower() in ("daily", "every day", "*"):
        return frozenset(range(7))
    out: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            raise BadInput(f"window {spec!r}: an empty day in {text!r}; like {EXAMPLE!r}")
        if "-" in part:
            a, b = (_day(w, spec) for w in part.split("-", 1))
            out.update((a + i) % 7 for i in range((b - a) % 7 + 1))
        else:
            out.add(_day(part, spec))
    return frozenset(out)


def _minutes(hhmm: str, spec: str, *, end: bool) -> int:
    h, m = (int(x) for x in hhmm.split(":"))
    if m > 59 or h > 24 or (h == 24 and (m or not end)):
        raise BadInput(f"window {spec!r}: {hhmm} is not a time of day (00:00 to 24:00)")
    return h * 60 + m


@dataclass(frozen=True)
class Window:
    """One maintenance window, parsed from its spec."""

    spec: str
    days: frozenset[int]
    start: int  # minutes after local midnight
    end: int  # minutes after local midnight of the start day (> start: may pass 24:00)
    tz: ZoneInfo

    @staticmethod
    def parse(spec: str) -> Window:
        m = _SPEC.match(spec)
        if m is None:
            raise BadInput(
                f"window {spec!r}: expected [DAYS] HH:MM-HH:MM [TIMEZONE], like {EXAMPLE!r}"
            )
        start = _minutes(m["start"], spec, end=False)
        end = _minutes(m["end"], spec, end=True)
        if end == start:
            raise BadInput(f"window {spec!r}: it opens and closes at the same time")
        if end < start:
            end += 24 * 60  # crosses midnight: closes the next day
        name = m["tz"] or "UTC"
        try:
            tz = ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise BadInput(
                f"window {spec!r}: unknown time zone {name!r} (an IANA name like Europe/Berlin)"
            ) from None
        return Window(spec.strip(), _days(m["days"], spec), start, end, tz)

    @property
    def length(self) -> float:
        """Seconds the window is open (wall-clock; a DST change may add or take an hour)."""
        return (self.end - self.start) * 60.0

    def occurrences(self, after: float, days: int = 9) -> Iterable[tuple[float, float]]:
        """(opens, closes) as epoch seconds, of the occurrences that close after `after`,
        in order, looking `days` days ahead (a week and a margin covers any window)."""
        local = dt.datetime.fromtimestamp(after, self.tz).date() - dt.timedelta(days=1)
        for i in range(days + 1):
            day = local + dt.timedelta(days=i)
            if day.weekday() not in self.days:
                continue
            midnight = dt.datetime(day.year, day.month, day.day, tzinfo=self.tz)
            opens = _at(midnight, self.start)
            closes = _at(midnight, self.end)
            if closes > after:
                yield opens, closes


def _at(midnight: dt.datetime, minutes: int) -> float:
    """Epoch seconds of a local wall-clock time `minutes` after a local midnight (past
    24:00 lands on the next day, with that day's UTC offset)."""
    day = midnight + dt.timedelta(days=minutes // (24 * 60))
    local = day.replace(hour=(minutes // 60) % 24, minute=minutes % 60)
    return local.timestamp()


@dataclass(frozen=True)
class Schedule:
    """Several windows: the campaign may run in any of them."""

    windows: tuple[Window, ...]

    @staticmethod
    def parse(specs: Iterable[str]) -> Schedule:
        windows = tuple(Window.parse(s) for s in specs)
        if not windows:
            raise BadInput("no maintenance window given")
        return Schedule(windows)

    @property
    def longest(self) -> float:
        return max(w.length for w in self.windows)

    def open_now(self, now: float) -> tuple[Window, float] | None:
        """The open window that stays open longest from `now`, with its closing time."""
        best: tuple[Window, float] | None = None
        for w in self.windows:
            for opens, closes in w.occurrences(now):
                if opens <= now < closes and (best is None or closes > best[1]):
                    best = (w, closes)
        return best

    def next_open(self, now: float) -> tuple[Window, float]:
        """The next window to open after `now` (not the one open now)."""
        found = [(opens, w) for w in self.windows for opens, _ in w.occurrences(now) if opens > now]
        opens, w = min(found, key=lambda t: t[0])
        return w, opens


def iso(t: float, tz: dt.tzinfo | None = None) -> str:
    """An epoch time as ISO 8601 with its offset (in the window's zone when given)."""
    return dt.datetime.fromtimestamp(t, tz or dt.UTC).isoformat(timespec="seconds")


class SteppedClock:
    """Testing hook (CHANGEOVER_TEST_CLOCK="ISO_TIME/SECONDS_PER_STEP"): the clock the
    window gates read starts at ISO_TIME and moves forward SECONDS_PER_STEP each time a
    step ends, so a test can run a campaign across windows without waiting. Nothing
    else (leases, timeouts, the journal's timestamps) uses it."""

    def __init__(self, spec: str) -> None:
        when, _, per_step = spec.partition("/")
        try:
            self.t = dt.datetime.fromisoformat(when).timestamp()
            self.per_step = float(per_step or 0)
        except ValueError:
            raise BadInput(
                f"CHANGEOVER_TEST_CLOCK={spec!r}: expected ISO_TIME/SECONDS_PER_STEP"
            ) from None

    def __call__(self) -> float:
        return self.t

    def step_ended(self) -> None:
        self.t += self.per_step
