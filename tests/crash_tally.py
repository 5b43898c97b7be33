"""Counts of kill points and trials from the crash suites, printed at the end of a run.

Under pytest-xdist the suites run in worker processes: each record is appended to a file
the controller named (CHANGEOVER_CRASH_TALLY_FILE, set in tests/conftest.py), and the
controller prints the summary."""

from __future__ import annotations

import json
import os
from pathlib import Path

ENV = "CHANGEOVER_CRASH_TALLY_FILE"


def record(label: str, kill_points: int) -> None:
    """`kill_points` kills, each a trial of its own, plus the unkilled run that ended the
    scan."""
    path = os.environ.get(ENV)
    if path:
        with Path(path).open("a") as fh:
            fh.write(json.dumps({"label": label, "n": kill_points}) + "\n")


def summary() -> list[str]:
    path = os.environ.get(ENV)
    if not path or not Path(path).exists():
        return []
    tally = {}
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        tally[rec["label"]] = int(rec["n"])
    if not tally:
        return []
    width = max(len(k) for k in tally)
    lines = [f"{label:<{width}}  {n:>3} kill points" for label, n in sorted(tally.items())]
    lines.append(f"{'total':<{width}}  {sum(tally.values()):>3} kill points, each a trial")
    return lines
