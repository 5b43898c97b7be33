"""The README's first quickstart command works from a fresh copy of the repo."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from orchestrator.rehearse import World

REPO = Path(__file__).resolve().parents[1]


def quickstart_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [c.strip() for c in re.findall(r"```sh\n(.+?)\n\s*```", section)]


def test_readme_has_exactly_two_quickstart_commands() -> None:
    """The quickstart is exactly two commands: the main job, then the test suite."""
    cmds = quickstart_commands()
    assert len(cmds) == 2
    assert "rebuild demo" in cmds[0] and "pytest" in cmds[1]


@pytest.mark.slow
def test_quickstart_creates_and_rebuilds_the_demo_stack(tmp_path: Path) -> None:
    """From a fresh copy: exit 0, generation 1 -> 2, the address holder changes, and the
    old processes are gone after the retain time."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    clone = tmp_path / "clone"
    for f in files:
        if (REPO / f).is_file():
            (clone / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, clone / f)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHANGEOVER_", "VIRTUAL_ENV"))}
    env["HOME"] = str(home)  # the default state dir lands under this throwaway home
    state = home / ".local" / "state" / "changeover"
    world = World(state)
    try:
        proc = subprocess.run(
            ["bash", "-c", quickstart_commands()[0]],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = proc.stdout
        assert "demo: created generation 1" in out
        assert "-> SUCCEEDED" in out and "generation: 1 -> 2" in out
        before, after = re.search(r"address demo-eip: (.+?) -> (.+)", out).groups()  # type: ignore[union-attr]
        assert set(before.split(", ")).isdisjoint(after.split(", "))
        live = world.live_servers()
        assert {s["generation"] for s in live.values()} == {2}
        assert sorted(world.members()) == sorted(after.split(", "))
    finally:
        world.down()
