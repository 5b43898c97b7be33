"""Counts of kill points and trials from the crash suites, printed at the end of a run."""

from __future__ import annotations

TALLY: dict[str, int] = {}


def record(label: str, kill_points: int) -> None:
    """`kill_points` kills, each a trial of its own, plus the unkilled run that ended the
    scan."""
    TALLY[label] = kill_points


def summary() -> list[str]:
    if not TALLY:
        return []
    width = max(len(k) for k in TALLY)
    lines = [f"{label:<{width}}  {n:>3} kill points" for label, n in sorted(TALLY.items())]
    lines.append(f"{'total':<{width}}  {sum(TALLY.values()):>3} kill points, each a trial")
    return lines
