"""Every rehearsal scenario in scenarios/ runs and passes its own checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.errors import ConfigError
from orchestrator.rehearse import load_scenario, run_scenario

SCENARIOS = sorted((Path(__file__).parent.parent / "scenarios").glob("*.yaml"))


def test_the_required_scenarios_exist() -> None:
    """scenarios/ holds at least the happy path, a health-gate failure and a cutover crash."""
    names = {p.stem for p in SCENARIOS}
    assert {"happy-path", "health-gate-failure", "crash-during-cutover"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario(path: Path, tmp_path: Path) -> None:
    """The scenario's expectations all hold (outcome, address, servers, load figures)."""
    report = run_scenario(load_scenario(path), state_dir=tmp_path)
    failed = [c for c in report["checks"] if not c["ok"]]
    assert report["checks"], "a scenario must check something"
    assert not failed, f"{failed}\n{report['stderr_tail']}"


def test_bad_scenario_file_names_the_key(tmp_path: Path) -> None:
    """A scenario with an unknown key is rejected with a message naming it."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstrategy: rebuild\nfautls: []\n")
    with pytest.raises(ConfigError, match="fautls"):
        load_scenario(bad)
