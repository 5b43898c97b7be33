"""Fuzzing the inputs: generated bad config files, CHANGEOVER_* variables and scenario
files each get exit 2, exactly one line on stderr naming the problem, no traceback, and
nothing started or written.

Each case is built bad on purpose (a wrong type, a non-finite or out-of-range number, an
empty or unsafe name, an unknown key, a malformed structure, or raw garbage), so a case
that is accepted is a bug. The CLI runs in-process through its entry point (no Python
start-up per example), with a fresh state dir per example that must stay absent.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer.core
import typer.main
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.cli import app
from orchestrator.plan import Outcome
from orchestrator.rehearse import FAULT_KINDS, FAULT_OPS, SCENARIO_KEYS, load_scenario
from orchestrator.settings import NAME_PATTERN, RoleConfig, StackConfig, StrategyDefaults
from tests.test_bad_input import Result, invoke, local_cloud_processes

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,  # the same cases on every run: CI failures reproduce
    database=None,
)
ADDRESS_TYPES = {"auto", "proxy", "elastic-ip", "target-group", "floating-ip"}
EXPECT_KEYS = {
    "exit_code",
    "crash_exit",
    "outcome",
    "address_moved",
    "old_stack_untouched",
    "only_serving_left",
    "generation_after",
    "failed_requests",
    "min_rate",
    "writes_lost",
}

Path_ = tuple[str | int, ...]
Mutation = tuple[Path_, Any]


# --- values that are bad by construction ---------------------------------------------------
def _is_int_text(s: str) -> bool:
    return re.fullmatch(r"\s*[+-]?\d{1,18}\s*", s) is not None


def _float_of(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


def _text() -> st.SearchStrategy[str]:
    return st.text(max_size=12)


def _scalar_junk() -> st.SearchStrategy[Any]:
    """Values of the wrong shape for a scalar key."""
    return st.one_of(
        st.lists(st.integers(-3, 3), max_size=3),
        st.dictionaries(st.from_regex(r"[a-z]{1,5}", fullmatch=True), st.integers(), max_size=2),
    )


def bad_count() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.booleans(),
        st.integers(max_value=0),
        st.integers(min_value=10_001),
        st.floats(allow_nan=True),  # even 2.0: a count is an integer
        _text().filter(lambda s: not _is_int_text(s)),
        _scalar_junk(),
    )


def _not_seconds(s: str, positive: bool) -> bool:
    """True if the text is not an acceptable duration (finite, >= 0 or > 0)."""
    f = _float_of(s)
    if f is None or not math.isfinite(f):
        return True
    return f <= 0 if positive else f < 0


def bad_seconds(positive: bool) -> st.SearchStrategy[Any]:
    """Not a finite duration (>= 0, or > 0 when `positive`)."""
    low = st.floats(max_value=0.0) if positive else st.floats(max_value=-1e-300)
    return st.one_of(
        st.sampled_from([math.inf, -math.inf, math.nan]),
        low,
        st.booleans(),
        _text().filter(lambda s: _not_seconds(s, positive)),
        _scalar_junk(),
    )


def bad_bool() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.integers(),
        st.floats(allow_nan=False),
        _text().filter(lambda s: s.strip().lower() not in {"true", "false", "1", "0"}),
        _scalar_junk(),
    )


def bad_name() -> st.SearchStrategy[str]:
    return st.text(max_size=70).filter(lambda s: NAME_PATTERN.fullmatch(s) is None)


def unknown_key(model_fields: Any) -> st.SearchStrategy[str]:
    return st.from_regex(r"[a-z][a-z0-9]{0,10}", fullmatch=True).filter(
        lambda k: k not in model_fields
    )


# --- config files ---------------------------------------------------------------------------
BASE_CONFIG: dict[str, Any] = {
    "stacks": {
        "app": {
            "address": "app-eip",
            "roles": {
                "db": {"data": True},
                "web": {"count": 2, "health": {"timeout": 2.0}},
            },
            "defaults": {"bake": 1.0, "retain": 0.0},
            "hygiene": {"reboot_required_fails": True},
        }
    }
}
APP = ("stacks", "app")


def config_mutations() -> st.SearchStrategy[Mutation]:
    """(path, value): one key of a good config set to a value it must refuse."""
    leaf: list[tuple[Path_, st.SearchStrategy[Any]]] = [
        ((*APP, "roles", "web", "count"), bad_count()),
        ((*APP, "defaults", "max_surge"), st.one_of(st.booleans(), st.integers(max_value=0))),
        ((*APP, "defaults", "min_healthy"), st.one_of(st.integers(101), st.integers(max_value=-1))),
        ((*APP, "defaults", "bake"), bad_seconds(positive=False)),
        ((*APP, "defaults", "retain"), bad_seconds(positive=False)),
        ((*APP, "defaults", "boot_timeout"), bad_seconds(positive=True)),
        ((*APP, "defaults", "drain_timeout"), bad_seconds(positive=True)),
        ((*APP, "roles", "web", "health", "timeout"), bad_seconds(positive=True)),
        ((*APP, "roles", "web", "health", "port"), st.one_of(st.booleans(), st.integers(65536))),
        ((*APP, "roles", "db", "data"), bad_bool()),
        ((*APP, "hygiene", "reboot_required_fails"), bad_bool()),
        ((*APP, "address"), st.one_of(st.just(""), st.integers(), st.booleans())),
        ((*APP, "roles", "web", "image"), st.one_of(st.just(""), st.integers())),
        ((*APP, "address_type"), _text().filter(lambda s: s not in ADDRESS_TYPES)),
        ((*APP, "roles", "db", "count"), st.integers(2, 50)),  # a data role of many servers
        ((*APP, "roles"), st.one_of(st.integers(), _text(), st.just({}))),
        (("lock_ttl",), st.one_of(st.floats(max_value=1.0), st.just(math.inf), st.booleans())),
        (("verbose",), st.one_of(st.booleans(), st.integers(max_value=-1))),
    ]
    by_value = st.one_of(*(st.tuples(st.just(p), values) for p, values in leaf))
    unknown = st.one_of(
        unknown_key(StackConfig.model_fields).map(lambda k: (*APP, k)),
        unknown_key(RoleConfig.model_fields).map(lambda k: (*APP, "roles", "web", k)),
        unknown_key(StrategyDefaults.model_fields).map(lambda k: (*APP, "defaults", k)),
    ).map(lambda p: (p, 1))
    renamed = st.one_of(
        bad_name().map(lambda n: (("<rename-role>", n), None)),
        bad_name().map(lambda n: (("<rename-stack>", n), None)),
    )
    return st.one_of(by_value, unknown, renamed)


def _apply(base: dict[str, Any], mutation: Mutation) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(json.dumps(base))
    path, value = mutation
    if path[0] == "<rename-role>":
        roles = data["stacks"]["app"]["roles"]
        roles[path[1]] = roles.pop("web")
    elif path[0] == "<rename-stack>":
        data["stacks"][path[1]] = data["stacks"].pop("app")
    else:
        node: Any = data
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return data


def _toml_scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return (
            "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
        )
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are TOML basic-string escapes
    if isinstance(v, list):
        return "[" + ", ".join(_toml_scalar(x) for x in v) + "]"
    raise TypeError(v)


def to_toml(data: dict[str, Any]) -> str:
    lines: list[str] = []

    def table(prefix: tuple[str, ...], d: dict[str, Any]) -> None:
        if prefix:
            lines.append("[" + ".".join(json.dumps(k) for k in prefix) + "]")
        lines.extend(
            f"{json.dumps(k)} = {_toml_scalar(v)}" for k, v in d.items() if not isinstance(v, dict)
        )
        for k, v in d.items():
            if isinstance(v, dict):
                table((*prefix, k), v)

    table((), data)
    return "\n".join(lines) + "\n"


def _assert_refused(res: Result, *, must_name: str | None = None) -> str:
    line = res.error_line()  # exit 2, one line, "error: ", no traceback
    assert "unknown stack" not in line, line
    if must_name is not None:
        assert must_name in line, line
    return line


def _in_fresh_dir(fn: Callable[[Path], None]) -> None:
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        root = Path(tmp)
        fn(root)
        state = root / "state"
        assert not state.exists(), "bad input touched the state dir"
        assert local_cloud_processes(root) == [], "bad input started processes"


def test_the_base_inputs_are_good(tmp_path: Path) -> None:
    """The fuzzers mutate inputs that are accepted, so a refusal is the mutation's."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(to_toml(BASE_CONFIG))
    res = invoke("--config", str(cfg), "--state-dir", str(tmp_path / "s"), "stacks")
    assert res.code == 0, res.err
    sc = tmp_path / "s.yaml"
    sc.write_text(yaml.safe_dump(BASE_SCENARIO))
    assert load_scenario(sc).expect == {"exit_code": 0}


@FUZZ
@given(config_mutations())
def test_fuzz_bad_config_file(mutation: Mutation) -> None:
    """A config file with one bad key: exit 2, one line naming the file, nothing touched."""

    def check(root: Path) -> None:
        cfg = root / "c.toml"
        cfg.write_text(to_toml(_apply(BASE_CONFIG, mutation)))
        res = invoke("--config", str(cfg), "--state-dir", str(root / "state"), "stacks")
        _assert_refused(res, must_name=f"config error in {cfg}")

    _in_fresh_dir(check)


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_garbage_config_file(garbage: bytes) -> None:
    """Raw bytes as a config file: at worst exit 2 with one line, never a traceback.
    (The stack asked for exists in no config, so every outcome is a refusal.)"""

    def check(root: Path) -> None:
        cfg = root / "c.toml"
        cfg.write_bytes(garbage)
        res = invoke(
            "--config", str(cfg), "--state-dir", str(root / "state"), "plan", "rebuild", "nope"
        )
        res.error_line()

    _in_fresh_dir(check)


# --- environment variables ----------------------------------------------------------------
def _env_text(pred: Callable[[str], bool]) -> st.SearchStrategy[str]:
    return st.text(max_size=12).filter(lambda s: "\x00" not in s and pred(s))


def _not_json(s: str) -> bool:
    try:
        json.loads(s)
    except ValueError:
        return True
    return False


def env_mutations() -> st.SearchStrategy[tuple[str, str]]:
    """(variable, value): one CHANGEOVER_* variable that must be refused."""
    p = "CHANGEOVER_STACKS__APP__"
    cases: list[tuple[str, st.SearchStrategy[str]]] = [
        ("CHANGEOVER_STACKS", _env_text(_not_json)),
        ("CHANGEOVER_STACKS", st.sampled_from(["[]", "5", '"x"', "true", '{"app": 5}'])),
        (p + "ROLES", _env_text(lambda s: _not_json(s) or not s.strip().startswith("{"))),
        (p + "HYGIENE__COMPONENTS", _env_text(_not_json)),
        (p + "ROLES__WEB__COUNT", _env_text(lambda s: not _is_int_text(s))),
        (p + "ROLES__WEB__COUNT", st.integers(max_value=0).map(str)),
        (p + "ROLES__DB__COUNT", st.integers(2, 99).map(str)),
        (
            p + "ROLES__DB__DATA",
            _env_text(lambda s: s.strip().lower() not in {"true", "false", "1", "0"}),
        ),
        (
            p + "DEFAULTS__BAKE",
            _env_text(lambda s: _not_seconds(s, positive=False)),
        ),
        (p + "DEFAULTS__BAKE", st.sampled_from(["inf", "-inf", "nan", "-1", "Infinity"])),
        (p + "ADDRESS", st.just("")),
        (
            "CHANGEOVER_LOCK_TTL",
            _env_text(lambda s: (f := _float_of(s)) is None or not math.isfinite(f) or f <= 1),
        ),
        ("CHANGEOVER_VERBOSE", _env_text(lambda s: not _is_int_text(s) or int(s) < 0)),
        ("CHANGEOVER_OUTPUT", _env_text(lambda s: s not in {"text", "json"})),
    ]
    unknown = unknown_key(StackConfig.model_fields).map(lambda k: (p + k.upper(), "x"))
    return st.one_of(unknown, *(st.tuples(st.just(n), v) for n, v in cases))


@FUZZ
@given(env_mutations())
def test_fuzz_bad_environment_override(case: tuple[str, str]) -> None:
    """A good config file and one bad CHANGEOVER_* variable: exit 2, one line naming the
    variable (not the file), never echoing its value, nothing touched."""
    name, value = case

    def check(root: Path) -> None:
        cfg = root / "c.toml"
        cfg.write_text(to_toml(BASE_CONFIG))
        res = invoke(
            "--config", str(cfg), "--state-dir", str(root / "state"), "stacks", env={name: value}
        )
        line = _assert_refused(res, must_name=f"environment variable {name}")
        assert str(cfg) not in line

    _in_fresh_dir(check)


# --- scenario files -------------------------------------------------------------------------
BASE_SCENARIO: dict[str, Any] = {
    "name": "fuzz",
    "strategy": "rebuild",
    "args": ["--bake", "1"],
    "stack": {"roles": {"web": {"count": 2}}},
    "faults": [{"kind": "fail_call", "op": "create_servers", "times": 1}],
    "expect": {"exit_code": 0},
}

# Every flag rebuild takes (and --help): an unknown flag is drawn from outside these.


def _run_flags() -> set[str]:
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    params = group.commands["rebuild"].params
    return {"--help"} | {o for p in params for o in (*p.opts, *p.secondary_opts)}


RUN_FLAGS = _run_flags()


def scenario_mutations() -> st.SearchStrategy[Mutation]:
    fault = ("faults", 0)
    leaf: list[tuple[Path_, st.SearchStrategy[Any]]] = [
        (("name",), st.one_of(bad_name(), st.integers(), st.booleans(), st.just(None))),
        (("name",), st.sampled_from(["../../x", "../x", "/tmp/x", "a/b", ".", ".."])),
        (
            ("strategy",),
            st.one_of(_text().filter(lambda s: s not in {"rebuild", "rotate"}), st.integers()),
        ),
        (
            ("args",),
            st.one_of(st.integers(), _text(), st.lists(st.integers(), min_size=1, max_size=3)),
        ),
        (
            ("args",),
            st.from_regex(r"--[a-z][a-z-]{0,10}", fullmatch=True)
            .filter(lambda f: f not in RUN_FLAGS)
            .map(lambda f: [f]),
        ),
        (("args",), st.sampled_from([["--bake", "inf"], ["--bake", "-1"], ["--retain", "x"]])),
        (("stack",), st.one_of(st.integers(), _text(), st.lists(st.integers(), max_size=2))),
        (("stack", "roles", "web", "count"), bad_count()),
        (("stack", "roles", "db", "count"), st.integers(2, 9)),
        (("stack", "defaults", "bake"), bad_seconds(positive=False)),
        (("faults",), st.one_of(st.integers(), _text(), st.just({"kind": "server"}))),
        ((*fault, "kind"), _text().filter(lambda s: s not in FAULT_KINDS)),
        ((*fault, "op"), _text().filter(lambda s: s not in FAULT_OPS)),
        ((*fault, "times"), st.one_of(st.integers(max_value=-2), st.booleans(), _text())),
        ((*fault, "error"), _text().filter(lambda s: s not in {"transient", "fatal"})),
        (("load",), st.one_of(st.integers(), _text())),
        (
            ("load", "rate"),
            st.one_of(st.floats(max_value=0.0), st.sampled_from([math.inf, math.nan])),
        ),
        (
            ("load", "write_ratio"),
            st.one_of(st.floats(min_value=1.0001), st.floats(max_value=-0.0001)),
        ),
        (("crash_after_step",), st.one_of(st.integers(max_value=0), st.booleans(), _text())),
        (
            ("then",),
            st.one_of(_text().filter(lambda s: s not in {"resume", "rollback"}), st.integers()),
        ),
        (("then",), st.sampled_from(["resume", "rollback"])),  # without crash_after_step
        (
            ("expect",),
            st.one_of(st.just({}), st.integers(), _text(), st.just({"old_stack_untouched": False})),
        ),
        (("expect", "exit_code"), st.one_of(st.booleans(), _text(), st.floats())),
        (("expect", "writes_lost"), st.integers(0, 3)),  # a load check, and there is no load
        (("expect", "outcome"), _text().filter(lambda s: s not in {o.value for o in Outcome})),
        (("description",), st.one_of(st.integers(), st.lists(st.integers(), max_size=2))),
    ]
    by_value = st.one_of(*(st.tuples(st.just(p), v) for p, v in leaf))
    unknown = st.one_of(
        unknown_key(SCENARIO_KEYS).map(lambda k: (k,)),
        unknown_key(EXPECT_KEYS).map(lambda k: ("expect", k)),
        unknown_key({"kind", "op", "times", "error"}).map(lambda k: (*fault, k)),
    ).map(lambda p: (p, 1))
    missing = st.sampled_from(["name", "strategy", "kind"]).map(lambda k: (("<drop>", k), None))
    return st.one_of(by_value, unknown, missing)


def _apply_scenario(mutation: Mutation) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(json.dumps(BASE_SCENARIO))
    path, value = mutation
    if path[0] == "<drop>":
        if path[1] == "kind":
            del data["faults"][0]["kind"]
        else:
            del data[str(path[1])]
        return data
    node: Any = data
    for key in path[:-1]:
        node = node[key] if isinstance(key, int) else node.setdefault(key, {})
    node[path[-1]] = value
    return data


@FUZZ
@given(scenario_mutations())
def test_fuzz_bad_scenario(mutation: Mutation) -> None:
    """A scenario with one bad key: exit 2, one line naming the file, and no world built
    (no state dir, no local-cloud process)."""

    def check(root: Path) -> None:
        path = root / "sc.yaml"
        path.write_text(yaml.safe_dump(_apply_scenario(mutation)))
        res = invoke("--state-dir", str(root / "state"), "rehearse", str(path))
        _assert_refused(res, must_name=f"scenario {path}")

    _in_fresh_dir(check)


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_fuzz_garbage_scenario(garbage: bytes) -> None:
    """Raw bytes or text as a scenario file: exit 2, one line, nothing started."""

    def check(root: Path) -> None:
        path = root / "sc.yaml"
        path.write_bytes(garbage)
        res = invoke("--state-dir", str(root / "state"), "rehearse", str(path))
        _assert_refused(res, must_name=f"scenario {path}")

    _in_fresh_dir(check)
