"""Shared fixtures: throwaway local-cloud worlds that are always torn down."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.rehearse import World
from orchestrator.settings import DEMO_STACK

# Short bake and retain keep end-to-end tests quick; the logic is the same at any length.
FAST = {"bake": 0.3, "retain": 0.0, "max_surge": 1, "min_healthy": 100}


def demo_stack(**overrides: Any) -> dict[str, Any]:
    stack: dict[str, Any] = json.loads(json.dumps(DEMO_STACK))
    stack["defaults"].update(FAST)
    for key, value in overrides.items():
        stack[key] = value
    return stack


@pytest.fixture
def make_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., World]]:
    """Build worlds on demand; every process they started is stopped at teardown."""
    worlds: list[World] = []

    def make(up: bool = True, **stack_overrides: Any) -> World:
        w = World(
            Path(tmp_path_factory.mktemp("world")), stack_config=demo_stack(**stack_overrides)
        )
        worlds.append(w)
        if up:
            w.up()
        return w

    yield make
    for w in worlds:
        w.down()


@pytest.fixture
def world(make_world: Callable[..., World]) -> World:
    """The demo stack (1 db + 2 web, generation 1) on a fresh local cloud."""
    return make_world()


def pytest_configure(config: pytest.Config) -> None:
    """The controller (not an xdist worker) names the file the crash suites tally into."""
    import os
    import tempfile

    from tests.crash_tally import ENV

    if not hasattr(config, "workerinput"):
        fd, path = tempfile.mkstemp(prefix="changeover-crash-tally-", suffix=".jsonl")
        os.close(fd)
        os.environ[ENV] = path


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the crash suites' kill points and trials (the README quotes them)."""
    from tests.crash_tally import summary

    lines = summary()
    if lines:
        terminalreporter.section("crash suite: kill points at mutating provider calls")
        for line in lines:
            terminalreporter.write_line(line)


def pytest_unconfigure(config: pytest.Config) -> None:
    import os

    from tests.crash_tally import ENV

    if not hasattr(config, "workerinput") and (path := os.environ.pop(ENV, None)):
        os.unlink(path)
