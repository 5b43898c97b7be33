"""Maintenance windows: the spec's meaning, and campaigns that pause at a window's end
and continue in the next when the same command runs again.

Time is injected, never waited for: the parsing tests give epoch times, and the campaign
tests set CHANGEOVER_TEST_CLOCK (the window gates' clock starts at a given time and moves
a fixed amount each time a step ends), so a batch "takes" a known number of minutes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from zoneinfo import ZoneInfo

import pytest

from orchestrator.errors import BadInput
from orchestrator.rehearse import World
from orchestrator.windows import Schedule, Window
from tests.invariants import journal_steps, run_status
from tests.test_upgrade import ADVISORY, check_campaign, check_upgraded

BERLIN = ZoneInfo("Europe/Berlin")


def at(text: str, tz: dt.tzinfo = dt.UTC) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=tz).timestamp()


def test_a_window_opens_on_its_days_in_its_zone() -> None:
    """'Sat,Sun 02:00-05:00 Europe/Berlin': open Saturday 02:00-05:00 Berlin time, not on
    Friday, not at 05:00; the next opening after Sunday's is the next Saturday's."""
    s = Schedule.parse(["Sat,Sun 02:00-05:00 Europe/Berlin"])
    sat = at("2026-12-05 02:30", BERLIN)  # 2026-12-05 is a Saturday
    w, closes = s.open_now(sat) or (None, 0.0)
    assert w is not None and closes == at("2026-12-05 05:00", BERLIN)
    assert s.open_now(at("2026-12-04 03:00", BERLIN)) is None  # Friday
    assert s.open_now(at("2026-12-05 05:00", BERLIN)) is None  # closed at 05:00 sharp
    assert s.next_open(at("2026-12-04 12:00", BERLIN))[1] == at("2026-12-05 02:00", BERLIN)
    assert s.next_open(at("2026-12-06 03:00", BERLIN))[1] == at("2026-12-12 02:00", BERLIN)
    assert s.longest == 3 * 3600


def test_windows_across_midnight_ranges_and_daylight_saving() -> None:
    """A window ending before it starts closes the next day; Mon-Fri is a range; a
    window keeps its wall-clock hours across a daylight-saving change."""
    s = Schedule.parse(["Mon-Fri 22:00-01:30 UTC"])
    fri_night = at("2026-12-05 01:00")  # Saturday 01:00: Friday's window still open
    assert s.open_now(fri_night) == (s.windows[0], at("2026-12-05 01:30"))
    assert s.open_now(at("2026-12-06 01:00")) is None  # Saturday night: no window
    assert s.next_open(at("2026-12-05 12:00"))[1] == at("2026-12-07 22:00")  # Monday
    # Berlin leaves summer time on 2026-10-25 (03:00 CEST -> 02:00 CET): 01:00-04:00
    # that night is four hours long, and still opens at 01:00 local time.
    dst = Schedule.parse(["Sun 01:00-04:00 Europe/Berlin"])
    opens = dst.next_open(at("2026-10-24 12:00", BERLIN))[1]
    assert opens == at("2026-10-25 01:00", BERLIN)
    assert dst.open_now(opens) == (dst.windows[0], opens + 4 * 3600)
    daily = Window.parse("03:00-04:00")
    assert daily.days == frozenset(range(7)) and daily.tz == ZoneInfo("UTC")


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("Funday 02:00-05:00", "'Funday' is not a day"),
        ("Sat 25:00-26:00", "25:00 is not a time of day"),
        ("Sat 02:00-02:00", "opens and closes at the same time"),
        ("Sat 02:00-05:00 Mars/Olympus", "unknown time zone 'Mars/Olympus'"),
        ("at night", "expected [DAYS] HH:MM-HH:MM [TIMEZONE]"),
    ],
)
def test_a_bad_window_is_one_clear_line(spec: str, words: str) -> None:
    with pytest.raises(BadInput, match=None) as err:
        Window.parse(spec)
    assert words in str(err.value) and "\n" not in str(err.value)


def _world(make_world: Callable[..., World], web: int, window: str, estimate: float) -> World:
    image = "debian-12-base"
    world = make_world(
        roles={
            "db": {"count": 1, "image": image, "data": True},
            "web": {"count": web, "image": image},
        },
        windows={"open": [window], "batch_estimate": estimate},
    )
    world.publish(ADVISORY)
    return world


def _clock(start: str, per_step: float) -> dict[str, str]:
    return {"CHANGEOVER_TEST_CLOCK": f"{start}/{per_step:.0f}"}


UPGRADE = ("upgrade", "demo", "--yes", "--security-only", "--min-healthy", "50")


def test_upgrade_campaign_pauses_at_the_windows_end_and_continues_in_the_next(
    make_world: Callable[..., World],
) -> None:
    """Window Sat 02:00-03:00, 3 web servers upgraded one at a time, each step taking 5
    minutes on the injected clock (6 steps: 30 minutes a batch). Batch 1 starts at 02:00
    on the 20-minute estimate, batch 2 at 02:30 on batch 1's measured 30 minutes, batch 3
    would end after 03:00: the campaign pauses (exit 0, every server serving) and names
    next Saturday 02:00. Another command is refused (4); the same command outside the
    window pauses again; in the next window it continues the same run to the end."""
    world = _world(make_world, web=3, window="Sat 02:00-03:00 UTC", estimate=1200)
    before, mark = sorted(world.members()), world.cloud.last_call_id()

    code, out = world.cli_json(*UPGRADE, env=_clock("2026-12-05T02:00:00+00:00", 300))
    assert code == 0, out.get("_stderr")
    assert out["outcome"] == "paused"
    assert out["next_window"] == "2026-12-12T02:00:00+00:00"
    assert "paused before batch 3 of 3" in out["message"]
    assert "30m (the slowest of 2 batch(es) so far)" in out["message"]
    run_id = out["run_id"]
    assert run_status(world, run_id) == "paused"
    assert sorted(world.members()) == before  # nothing left drained
    upgraded = [
        s
        for s in before
        if world.facts(s)["installed"]["openssl"] == ADVISORY["openssl"]["version"]
    ]
    assert len(upgraded) == 2
    _, steps = journal_steps(world)
    assert next(s["key"] for s in steps if s["state"] == "pending") == "EnterWindow#3"

    status = world.cli_json("status", run_id)[1]
    assert status["status"] == "paused" and "2026-12-12T02:00:00+00:00" in status["next"]
    other = world.cli("rebuild", "demo", "--yes")
    assert other.returncode == 4 and "a paused upgrade campaign" in other.stderr
    assert "`changeover upgrade demo` continues it" in other.stderr

    code, report = world.cli_json("report", run_id)
    assert code == 0 and report["outcome"] == "paused" and report["exit_code"] == 0
    assert [m for m in report["markers"] if m["kind"] == "paused"]
    assert "2026-12-12T02:00:00+00:00" in report["next"]

    # A cron job an hour later: still outside the window, the same run pauses again.
    code, again = world.cli_json(*UPGRADE, env=_clock("2026-12-05T04:00:00+00:00", 300))
    assert code == 0 and again["outcome"] == "paused" and again["run_id"] == run_id
    assert "no window is open" in again["message"]

    # Next Saturday at 02:00: the same command continues the same campaign to its end.
    code, done = world.cli_json(*UPGRADE, env=_clock("2026-12-12T02:00:00+00:00", 300))
    assert code == 0, done.get("_stderr")
    assert done["outcome"] == "succeeded" and done["run_id"] == run_id
    assert "continuing the paused upgrade campaign" in done["_stderr"]
    gates = {s["key"]: s for s in journal_steps(world)[1] if s["key"].startswith("EnterWindow")}
    assert sorted(gates) == ["EnterWindow#1", "EnterWindow#2", "EnterWindow#3"]
    check_campaign(world, run_id, before, mark)
    check_upgraded(world, security_only=True)


def test_a_batch_longer_than_any_window_never_starts(make_world: Callable[..., World]) -> None:
    """A configured estimate longer than the window: the gate refuses before anything is
    touched (exit 2), naming both durations, instead of pausing forever."""
    world = _world(make_world, web=2, window="Sat 02:00-03:00 UTC", estimate=7200)
    mark = world.cloud.last_call_id()
    proc = world.cli(*UPGRADE, env=_clock("2026-12-05T02:00:00+00:00", 300))
    assert proc.returncode == 2, proc.stderr
    assert "longer than the longest window (1h00m)" in proc.stdout + proc.stderr
    assert not [c for c in world.cloud.calls(mark) if c["mutating"]]


def test_plan_shows_the_gates_and_a_bad_window_flag_is_refused(
    make_world: Callable[..., World],
) -> None:
    """`plan upgrade --window` puts a gate before each batch; a bad --window is exit 2
    with one line, before the stack is inspected."""
    world = _world(make_world, web=2, window="Sat 02:00-03:00 UTC", estimate=600)
    code, out = world.cli_json(
        "plan", "upgrade", "demo", "--min-healthy", "50", "--window", "Sun 01:00-06:00 UTC"
    )
    assert code == 0
    keys = [s["key"] for s in out["plan"]["steps"]]
    assert keys[0] == "EnterWindow#1" and keys[6] == "EnterWindow#2" and len(keys) == 12
    assert out["plan"]["summary"]["windows"]["open"] == ["Sun 01:00-06:00 UTC"]
    bad = world.cli("upgrade", "demo", "--yes", "--window", "Sun 1-6")
    assert bad.returncode == 2 and "window 'Sun 1-6'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_rotate_campaign_pauses_then_rollback_ends_it_where_it_is(
    make_world: Callable[..., World],
) -> None:
    """rotate with a window: 8 steps of 5 minutes a replacement (40 minutes); in
    02:00-03:30 two of three servers are replaced and the campaign pauses before the
    third, with every server serving. `rollback` ends it there (exit 1): the replaced
    servers stay, the third old one still serves, and the stack is free again."""
    world = _world(make_world, web=3, window="Sat 02:00-03:30 UTC", estimate=1200)
    before = sorted(world.members())
    args = ("rotate", "demo", "--yes", "--max-surge", "1")
    code, out = world.cli_json(*args, env=_clock("2026-12-05T02:00:00+00:00", 300))
    assert code == 0, out.get("_stderr")
    assert out["outcome"] == "paused" and "paused before batch 3 of 3" in out["message"]
    assert len(out["servers"]["created"]) == 2 and len(out["servers"]["destroyed"]) == 2
    serving = sorted(world.members())
    assert len(serving) == 3 and len(set(serving) & set(before)) == 1
    run_id = out["run_id"]

    ended = world.cli("rollback", run_id)
    assert ended.returncode == 1, ended.stderr
    assert run_status(world, run_id) == "rolled_back"
    assert sorted(world.members()) == serving  # ended where it was: nothing undone
    assert sorted(world.live_servers()) == sorted([*serving, world.data_server()])
    # The stack is free: the same command starts a new campaign (outside the window, it
    # pauses at once, before touching anything).
    code, fresh = world.cli_json(*args, env=_clock("2026-12-05T12:00:00+00:00", 300))
    assert code == 0 and fresh["outcome"] == "paused" and fresh["run_id"] != run_id
    assert fresh["servers"]["created"] == [] and sorted(world.members()) == serving
