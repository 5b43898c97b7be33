"""Alarm gates (orchestrator/gates.py): each kind asked over real sockets, and a failing
gate during a rebuild's bake rolls the run back with the gate named."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from orchestrator.gates import GATE_ATTEMPTS, evaluate, first_failure, json_path
from orchestrator.rehearse import World, stack_toml
from orchestrator.settings import Gate
from tests.conftest import demo_stack
from tests.gate_servers import Answer, free_port, gate_server, vector
from tests.invariants import journal_steps, run_status

GATE: TypeAdapter[Any] = TypeAdapter(Gate)


def gate(**spec: Any) -> Any:
    return GATE.validate_python(spec)


class Sleeps:
    """An injected sleep: records the waits instead of waiting."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def test_http_gate_checks_the_status_and_a_json_value() -> None:
    """The status must match; json_path must hold `equals` (or be truthy without it)."""
    bodies = {"/ok": (200, {"status": "ok", "checks": [{"up": True}]}), "/bad": (500, {})}
    with gate_server(lambda path, _q: bodies.get(path, (404, {}))) as srv:
        assert evaluate(gate(http=f"{srv.url}/ok")).ok
        assert evaluate(gate(http=f"{srv.url}/ok", json_path="$.status", equals="ok")).ok
        assert evaluate(gate(http=f"{srv.url}/ok", json_path="checks.0.up")).ok
        down = evaluate(gate(http=f"{srv.url}/bad?token=s3cret", name="app"))
        assert (down.ok, down.reason()) == (False, "gate 'app': HTTP 500, want 200")
        wrong = evaluate(gate(http=f"{srv.url}/ok", json_path="$.status", equals="green"))
        assert not wrong.ok and wrong.saw == '$.status = "ok", want "green"'
        missing = evaluate(gate(http=f"{srv.url}/ok", json_path="$.ready"))
        assert not missing.ok and missing.saw.startswith("no value at $.ready")
        # The derived name never carries the URL's query (a token may hide there).
        assert evaluate(gate(http=f"{srv.url}/bad?token=s3cret")).gate == (
            f"http 127.0.0.1:{srv.port}/bad"
        )


def test_json_path_walks_keys_and_indexes() -> None:
    """Dotted paths: object keys and list indexes (negative too), `$` the whole value."""
    data = {"a": {"b": [10, {"c": "x"}]}}
    assert json_path(data, "$.a.b.1.c") == "x"
    assert json_path(data, "a.b.-2") == 10
    assert json_path(data, "$") == data
    assert json_path(data, "$.a.b.7") is json_path(data, "$.nope")  # both missing


def test_prometheus_gate_fails_when_a_sample_crosses_the_threshold() -> None:
    """Every sample of /api/v1/query must stay within min..max; the reason names the
    series and the value; an empty result fails unless on_empty = 'pass'."""
    answers: dict[str, Answer] = {
        "errors": vector(0.01, 0.12),
        "calm": vector(0.01, 0.02),
        "rate": (200, {"status": "success", "data": {"resultType": "scalar", "result": [1, "3"]}}),
        "absent": vector(),
    }
    with gate_server(lambda _p, q: answers[q["query"]]) as prom:
        hot = evaluate(gate(prometheus=prom.url, query="errors", max=0.05, name="error-rate"))
        assert not hot.ok
        assert hot.reason() == (
            'gate \'error-rate\': {__name__="http_errors", instance="web-1"} = 0.12, above max 0.05'
        )
        assert evaluate(gate(prometheus=prom.url, query="calm", max=0.05)).ok
        low = evaluate(gate(prometheus=prom.url, query="rate", min=5))
        assert not low.ok and low.saw == "scalar = 3, below min 5"
        assert not evaluate(gate(prometheus=prom.url, query="absent", max=1)).ok
        assert evaluate(gate(prometheus=prom.url, query="absent", max=1, on_empty="pass")).ok
        assert prom.requests[0][0] == "/api/v1/query"


def test_a_refused_query_fails_at_once_and_a_server_error_is_retried() -> None:
    """A 400 (a bad query) is an answer: one request, a failure naming Prometheus's error.
    A 503 is asked again with backoff, then counts as a failure that says so."""
    bad: Answer = (400, {"status": "error", "errorType": "bad_data", "error": "parse error"})
    with gate_server(lambda _p, _q: bad) as prom:
        sleeps = Sleeps()
        verdict = evaluate(gate(prometheus=prom.url, query="(", max=1), sleep=sleeps)
        assert not verdict.ok and verdict.saw == "query refused (HTTP 400): parse error"
        assert len(prom.requests) == 1 and sleeps.waits == []
    with gate_server(lambda _p, _q: (503, {"status": "error"})) as prom:
        sleeps = Sleeps()
        verdict = evaluate(gate(prometheus=prom.url, query="up", max=1), sleep=sleeps)
        assert not verdict.ok
        assert verdict.saw.startswith(f"could not be evaluated ({GATE_ATTEMPTS} attempts)")
        assert len(prom.requests) == GATE_ATTEMPTS and len(sleeps.waits) == GATE_ATTEMPTS - 1


def test_a_gate_nobody_answers_fails_after_bounded_retries() -> None:
    """Connection refused: retried GATE_ATTEMPTS times (no real waiting here), then the
    first failing gate is reported, naming it and why."""
    sleeps = Sleeps()
    gates = [
        gate(http=f"http://127.0.0.1:{free_port()}/health", name="status-page"),
        gate(prometheus="http://127.0.0.1:1", query="up", max=1),
    ]
    failed = first_failure(gates, sleep=sleeps)
    assert failed is not None and failed.gate == "status-page"
    assert "could not be evaluated (3 attempts)" in failed.saw and "refused" in failed.saw
    assert len(sleeps.waits) == GATE_ATTEMPTS - 1  # the second gate was never asked


def test_bad_gate_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """A gate naming two kinds, one without a threshold, a URL that is not http: exit 2
    with one line naming the key, and no state written."""
    for n, (spec, expect) in enumerate(
        [
            ({"http": "http://127.0.0.1/x", "prometheus": "http://127.0.0.1"}, "a gate sets"),
            ({"prometheus": "http://127.0.0.1:9090", "query": "up"}, "needs a threshold"),
            ({"http": "ftp://example.com/x"}, "expected an http:// or https:// URL"),
        ]
    ):
        config = tmp_path / f"bad{n}.toml"
        config.write_text(stack_toml("demo", demo_stack(gates=[spec])))
        state = tmp_path / f"state{n}"
        argv = ["--config", str(config), "--state-dir", str(state), "plan", "rebuild", "demo"]
        proc = subprocess.run(
            [sys.executable, "-m", "orchestrator", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert expect in lines[0] and "stacks.demo.gates.0" in lines[0]
        assert not state.exists() or not any(state.iterdir())


def _rebuild_fails_on(world: World, name: str) -> dict[str, Any]:
    """Rebuild the world's stack; it must roll back in its bake, naming the gate."""
    before = sorted(world.members())
    servers = set(world.live_servers())
    code, out = world.cli_json("rebuild", "demo", "--yes", "--bake", "1")
    assert code == 1, out.get("_stderr")
    assert out["outcome"] == "rolled_back"
    assert out["message"].startswith("Bake failed: bake failed after ")
    assert f"gate {name!r}" in out["message"]
    assert sorted(world.members()) == before  # the address points back at the old servers
    assert set(world.live_servers()) == servers  # and the new ones are gone
    run_id, steps = journal_steps(world)
    assert run_status(world, run_id) == "rolled_back"
    assert [s["key"] for s in steps if s["state"] == "failed"] == ["Bake"]
    return out


@pytest.mark.slow
def test_failing_http_gate_rolls_back_the_bake(make_world: Callable[..., World]) -> None:
    """An HTTP gate answering 500 during the bake: the rebuild rolls back (exit 1) and the
    reason names the gate and its status."""
    with gate_server(lambda _p, _q: (500, {"error": "db down"})) as app:
        world = make_world(gates=[{"http": f"{app.url}/status", "name": "status-page"}])
        out = _rebuild_fails_on(world, "status-page")
        assert "HTTP 500, want 200" in out["message"]
        assert app.requests and app.requests[0][0] == "/status"


@pytest.mark.slow
def test_prometheus_gate_crossing_mid_bake_rolls_back(make_world: Callable[..., World]) -> None:
    """The query is fine when the bake starts and above its threshold later: the gates
    are evaluated again during the bake, and the second answer rolls it back."""
    answers = iter([vector(0.01), *[vector(0.5)] * 20])
    with gate_server(lambda _p, _q: next(answers)) as prom:
        world = make_world(
            gates=[{"prometheus": prom.url, "query": "sum(rate(errors[1m]))", "max": 0.1}]
        )
        out = _rebuild_fails_on(world, "prometheus sum(rate(errors[1m]))")
        assert "= 0.5, above max 0.1" in out["message"]
        assert len(prom.requests) >= 2
        assert {q["query"] for _, q in prom.requests} == {"sum(rate(errors[1m]))"}


@pytest.mark.slow
def test_passing_gates_let_the_rebuild_finish(make_world: Callable[..., World]) -> None:
    """An HTTP gate with a JSON value and a Prometheus query under its threshold pass:
    the rebuild succeeds, and the bake journals how often the gates were asked."""
    answers = {"/status": (200, {"state": "green"}), "/api/v1/query": vector(0.0)}
    with gate_server(lambda path, _q: answers[path]) as srv:
        world = make_world(
            gates=[
                {"http": f"{srv.url}/status", "json_path": "$.state", "equals": "green"},
                {"prometheus": srv.url, "query": "errors", "max": 0.05},
            ]
        )
        code, out = world.cli_json("rebuild", "demo", "--yes", "--bake", "1")
        assert code == 0, out.get("_stderr")
        _, steps = journal_steps(world)
        bake = next(s for s in steps if s["key"] == "Bake")
        assert bake["outputs"]["gate_rounds"] >= 2
        assert len(srv.requests) == 2 * bake["outputs"]["gate_rounds"]
