"""Kill points and fault mixes drawn by hypothesis: whatever the mix, the promise holds.

Each example builds a fresh world, injects a drawn mix of faults (transient failures
and latency on mutating calls), SIGKILLs the run at a drawn mutating call (before it is
sent or after it returns), then resumes or rolls back, under load. The same checks as
the exhaustive crash suite apply (tests/test_crash_calls.py). Derandomized, so CI runs
the same examples every time; `--hypothesis-seed` explores others locally.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.rehearse import World
from tests.conftest import demo_stack
from tests.test_crash_calls import _trial

OPS = ["create_servers", "set_members", "destroy_servers", "data_freeze", "data_final_sync"]
fault = st.one_of(
    st.fixed_dictionaries(
        {
            "kind": st.just("fail_call"),
            "op": st.sampled_from(OPS),
            "times": st.integers(1, 2),
            "error": st.just("transient"),
        }
    ),
    st.fixed_dictionaries(
        {
            "kind": st.just("latency"),
            "op": st.sampled_from(OPS),
            "times": st.just(1),
            "seconds": st.sampled_from([0.05, 0.3]),
        }
    ),
)


@pytest.mark.slow
@pytest.mark.timeout(900)
@settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    case=st.fixed_dictionaries(
        {
            "strategy": st.sampled_from(["rebuild", "rotate"]),
            "hook": st.sampled_from(
                ["CHANGEOVER_CRASH_AFTER_CALL", "CHANGEOVER_CRASH_BEFORE_CALL"]
            ),
            "n": st.integers(1, 10),
            "then": st.sampled_from(["resume", "rollback"]),
        }
    ),
    faults=st.lists(fault, max_size=3),
)
def test_any_kill_under_any_fault_mix_ends_serving_and_clean(
    tmp_path_factory: pytest.TempPathFactory, case: dict[str, Any], faults: list[dict[str, Any]]
) -> None:
    world = World(Path(tmp_path_factory.mktemp("prop")), stack_config=demo_stack())
    try:
        world.up()
        for f in faults:
            spec = dict(f)
            world.cloud.inject(spec.pop("kind"), **spec)
        # _trial asserts every guarantee it can see, and says which case failed.
        _trial(world, case["strategy"], case["hook"], case["n"], case["then"])
    finally:
        world.down()
