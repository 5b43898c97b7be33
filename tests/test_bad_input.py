"""Bad input gets one line naming the key (and where its value came from), exit 2, and
nothing is started or written: config files, CHANGEOVER_* variables, scenario files.

Most cases call the CLI's real entry point (`orchestrator.cli.main`) in-process, which is
what `python -m orchestrator` runs; a few go through a subprocess to pin the whole path.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog
from typer.testing import CliRunner

from orchestrator.cli import main
from orchestrator.errors import ConfigError
from orchestrator.rehearse import FAULT_OPS, Scenario, load_scenario, run_scenario
from orchestrator.settings import load_settings

ROOT = Path(__file__).parent.parent
SCENARIOS = sorted((ROOT / "scenarios").glob("*.yaml"))

GOOD_CONFIG = (
    '[stacks.app]\naddress = "app-eip"\n'
    "[stacks.app.roles.db]\ndata = true\n"
    "[stacks.app.roles.web]\ncount = 2\n"
    "[stacks.app.defaults]\nbake = 1.5\n"
)
GOOD_SCENARIO = "name: ok\nstrategy: rebuild\nexpect: {exit_code: 0}\n"


@dataclass
class Result:
    code: int
    out: str
    err: str

    def error_line(self) -> str:
        """The one error line; fails unless this was exit 2 with exactly one line."""
        lines = [ln for ln in self.err.splitlines() if ln.strip()]
        assert self.code == 2, (self.code, self.err)
        assert "Traceback" not in self.err
        assert len(lines) == 1, self.err
        assert lines[0].startswith("error: "), lines[0]
        return lines[0]


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    """Run `changeover ARGS` in this process through its entry point, with the
    CHANGEOVER_* environment replaced by `env`. An exception that escapes main() is a
    traceback to a user, so it is not caught here: the test fails with it."""
    runner = CliRunner()
    environ: dict[str, str | None] = {k: None for k in os.environ if k.startswith("CHANGEOVER_")}
    environ.update(env or {})
    saved_log = structlog.get_config()
    saved_hook, saved_argv = sys.excepthook, sys.argv
    code = 0
    with runner.isolation(env=environ) as (out, err, _):
        sys.argv = ["changeover", *args]
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.argv = saved_argv
            sys.excepthook = saved_hook
            structlog.configure(**saved_log)
        return Result(code, out.getvalue().decode(errors="replace"), err.getvalue().decode())


def subprocess_cli(*args: str, env: dict[str, str] | None = None) -> Result:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CHANGEOVER_")}
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **(env or {})},
        cwd=ROOT,
        check=False,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def local_cloud_processes(marker: Path) -> list[int]:
    """Pids of local-cloud processes (servers, proxies) started for this state dir."""
    pids = []
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            cmdline = (pid_dir / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(marker) in cmdline and "providers.local" in cmdline:
            pids.append(int(pid_dir.name))
    return pids


# --- config files ---------------------------------------------------------------------------
def test_config_file_not_utf8_is_one_line(tmp_path: Path) -> None:
    """A config file that is not UTF-8 is named, through `python -m orchestrator`."""
    cfg = tmp_path / "c.toml"
    cfg.write_bytes(b'[stacks.app]\naddress = "\xff\xfe"\n')
    state = tmp_path / "state"
    line = subprocess_cli("--config", str(cfg), "--state-dir", str(state), "stacks").error_line()
    assert str(cfg) in line and "not UTF-8" in line and "0xff" in line
    assert not state.exists(), "nothing may be touched"


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ("[stacks.app.roles.web]\ncount = true\n", "stacks.app.roles.web.count"),
        ("[stacks.app.roles.web]\ncount = 2.5\n", "stacks.app.roles.web.count"),
        ('[stacks.app.roles.db]\ndata = "yes"\n[stacks.app.roles.web]\n', "roles.db.data"),
        ("[stacks.app.roles.web]\n[stacks.app.roles.db]\ndata = 1\n", "roles.db.data"),
        ('[stacks.app.roles.""]\n', "stacks.app.roles: role name ''"),
        ('[stacks.app.roles."../x"]\n', "role name '../x'"),
        ("[stacks.app.roles.web]\n[stacks.app.defaults]\nbake = inf\n", "defaults.bake"),
        ("[stacks.app.roles.web]\n[stacks.app.defaults]\nbake = nan\n", "defaults.bake"),
        ("[stacks.app.roles.web]\n[stacks.app.defaults]\nbake = -1.0\n", "defaults.bake"),
        ("[stacks.app.roles.web]\n[stacks.app.defaults]\nretain = -inf\n", "defaults.retain"),
        ("[stacks.app.roles.web]\n[stacks.app.defaults]\ndrain_timeout = inf\n", "drain_timeout"),
        ("[stacks.app.roles.web]\n[stacks.app.defaults]\nmax_surge = true\n", "max_surge"),
        ("[stacks.app.roles.web.health]\ntimeout = inf\n", "roles.web.health.timeout"),
        ('[stacks.app.roles.web]\nimage = ""\n', "roles.web.image"),
        (
            "[stacks.app.roles.web]\n[stacks.app.roles.db]\ndata = true\ncount = 2\n",
            "stacks.app.roles.db: count = 2, but a data role has exactly one server",
        ),
    ],
)
def test_values_accepted_before_are_refused(tmp_path: Path, toml: str, named: str) -> None:
    """Wrongly typed, empty, non-finite or negative values, bad role names and a data
    role of more than one server: each is exit 2 with one line naming the key."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('[stacks.app]\naddress = "app-eip"\n' + toml)
    state = tmp_path / "state"
    line = invoke("--config", str(cfg), "--state-dir", str(state), "stacks").error_line()
    assert f"config error in {cfg}" in line and named in line
    assert not state.exists()


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ('[stacks.app]\naddress = ""\n[stacks.app.roles.web]\n', "stacks.app.address"),
        ('[stacks."a/b"]\naddress = "x"\n[stacks."a/b".roles.web]\n', "stack name 'a/b'"),
        ('lock_ttl = inf\n[stacks.app]\naddress = "x"\n[stacks.app.roles.web]\n', "lock_ttl"),
        ('verbose = true\n[stacks.app]\naddress = "x"\n[stacks.app.roles.web]\n', "verbose"),
    ],
    ids=["empty-address", "stack-name", "lock-ttl-inf", "verbose-bool"],
)
def test_top_level_values_refused(tmp_path: Path, toml: str, named: str) -> None:
    """An empty address, an unsafe stack name and non-finite or mistyped top-level keys."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    line = invoke("--config", str(cfg), "--state-dir", str(tmp_path / "s"), "stacks").error_line()
    assert f"config error in {cfg}" in line and named in line, line


def test_a_good_config_still_loads(tmp_path: Path) -> None:
    """The stricter types still take every honest spelling, from the file and from
    variables (which are always text)."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(GOOD_CONFIG)
    env = {
        "CHANGEOVER_STACKS__APP__ROLES__WEB__COUNT": "3",
        "CHANGEOVER_STACKS__APP__DEFAULTS__RETAIN": "0.5",
        "CHANGEOVER_STACKS__APP__HYGIENE__REBOOT_REQUIRED_FAILS": "false",
        "CHANGEOVER_LOCK_TTL": "30",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        settings = load_settings(cfg)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    app = settings.stacks["app"]
    assert app.roles["web"].count == 3 and app.roles["db"].data is True
    assert app.defaults.bake == 1.5 and app.defaults.retain == 0.5
    assert app.hygiene.reboot_required_fails is False and settings.lock_ttl == 30.0


# --- environment variables ----------------------------------------------------------------
def test_stacks_not_json_names_the_variable(tmp_path: Path) -> None:
    """CHANGEOVER_STACKS=notjson: one line naming the variable, through a subprocess."""
    state = tmp_path / "state"
    res = subprocess_cli("--state-dir", str(state), "stacks", env={"CHANGEOVER_STACKS": "notjson"})
    line = res.error_line()
    assert "CHANGEOVER_STACKS" in line and "not valid JSON" in line
    assert "notjson" not in line, "a variable's value may be a secret: never echo it"
    assert not state.exists()


@pytest.mark.parametrize(
    ("env", "variable", "key"),
    [
        ({"CHANGEOVER_STACKS__APP__ROLES__WEB__COUNT": "0"}, None, "roles.web.count"),
        ({"CHANGEOVER_STACKS__APP__ROLES__WEB__COUNT": "true"}, None, "roles.web.count"),
        ({"CHANGEOVER_STACKS__APP__DEFAULTS__BAKE": "inf"}, None, "defaults.bake"),
        ({"CHANGEOVER_STACKS__APP__ADDRESS": ""}, None, "stacks.app.address"),
        ({"CHANGEOVER_STACKS__APP__ROLES__WEB__DATA": "yes"}, None, "roles.web.data"),
        # web becomes a data role too: the error is the stack's, the cause this variable.
        ({"CHANGEOVER_STACKS__APP__ROLES__WEB__DATA": "true"}, None, "stacks.app"),
        ({"CHANGEOVER_STACKS__APP__ROLES": "[1"}, None, "not valid JSON"),
        ({"CHANGEOVER_STACKS__APP__HYGIENE__COMPONENTS": "x"}, None, "not valid JSON"),
        ({"CHANGEOVER_LOCK_TTL": "nan"}, None, "lock_ttl"),
        # Two variables, one of them bad: only the bad one is named.
        (
            {"CHANGEOVER_STACKS__APP__DEFAULTS__BAKE": "2", "CHANGEOVER_VERBOSE": "-1"},
            "CHANGEOVER_VERBOSE",
            "verbose",
        ),
    ],
)
def test_errors_from_variables_name_the_variable(
    tmp_path: Path, env: dict[str, str], variable: str | None, key: str
) -> None:
    """A bad value that comes from the environment is attributed to its variable, not to
    the (good) config file."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(GOOD_CONFIG)
    res = invoke("--config", str(cfg), "--state-dir", str(tmp_path / "s"), "stacks", env=env)
    line = res.error_line()
    culprit = variable or next(iter(env))
    assert f"environment variable {culprit}:" in line and key in line, line
    assert str(cfg) not in line
    for other in set(env) - {culprit}:
        assert other not in line


def test_file_errors_stay_the_files_with_variables_set(tmp_path: Path) -> None:
    """With unrelated variables set, a bad value in the file is still the file's."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(GOOD_CONFIG.replace("count = 2", "count = 0"))
    env = {"CHANGEOVER_STACKS__APP__DEFAULTS__BAKE": "2", "CHANGEOVER_LOCK_TTL": "30"}
    line = invoke("--config", str(cfg), "stacks", env=env).error_line()
    assert f"config error in {cfg}: stacks.app.roles.web.count" in line
    assert "CHANGEOVER_" not in line


def test_bad_flag_value_names_the_flag(tmp_path: Path) -> None:
    """--output xml names the flag, not the config file."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(GOOD_CONFIG)
    line = invoke("--config", str(cfg), "--output", "xml", "stacks").error_line()
    assert "--output" in line and str(cfg) not in line


def test_non_finite_bake_flag_is_refused(tmp_path: Path) -> None:
    """`--bake inf` on the command line is refused before anything runs (nan is a usage
    error of the flag's range already)."""
    state = tmp_path / "s"
    line = invoke("--state-dir", str(state), "plan", "rebuild", "demo", "--bake", "inf")
    assert "--bake: inf is not a finite number" in line.error_line()
    res = invoke("--state-dir", str(state), "plan", "rebuild", "demo", "--retain", "nan")
    assert res.code == 2 and "--retain" in res.err and "Traceback" not in res.err
    assert not state.exists()


# --- scenario files -------------------------------------------------------------------------
SCENARIO_CASES = [
    pytest.param(b"\xff\xfe\x00\x81garbage", "not UTF-8", id="garbage-bytes"),
    pytest.param(b"name: [unclosed\n", "not valid YAML", id="not-yaml"),
    pytest.param(b"- a\n- b\n", "a mapping", id="a-list"),
    pytest.param(GOOD_SCENARIO.encode() + b"stack: 5\n", "stack:", id="stack-5"),
    pytest.param(GOOD_SCENARIO.encode() + b"faults: 5\n", "faults:", id="faults-5"),
    pytest.param(
        GOOD_SCENARIO.encode() + b"faults: [{kind: explode}]\n",
        "faults.0.kind: unknown fault kind 'explode'",
        id="unknown-kind",
    ),
    pytest.param(
        GOOD_SCENARIO.encode() + b"faults: [{op: create_servers, times: 2}]\n",
        "faults.0.kind: missing",
        id="fault-without-kind",
    ),
    pytest.param(
        GOOD_SCENARIO.encode() + b"faults: [{kind: fail_call, op: create_server}]\n",
        "faults.0.op",
        id="unknown-op",
    ),
    pytest.param(
        GOOD_SCENARIO.encode() + b"faults: [{kind: server, role: wbe}]\n",
        "faults.0.role: no role 'wbe'",
        id="unknown-role",
    ),
    pytest.param(
        GOOD_SCENARIO.encode() + b"faults: [{kind: server, boot_delay: .inf}]\n",
        "faults.0.boot_delay",
        id="fault-inf",
    ),
    pytest.param(
        GOOD_SCENARIO.encode() + b"stack: {roles: {web: {count: true}}}\n",
        "stack.roles.web.count",
        id="stack-count-bool",
    ),
    pytest.param(
        GOOD_SCENARIO.encode() + b"stack: {roles: {db: {count: 3}}}\n",
        "stack.roles.db: count = 3",
        id="data-count-3",
    ),
    pytest.param(
        b"name: ../../x\nstrategy: rebuild\nexpect: {exit_code: 0}\n", "name:", id="name-dotdot"
    ),
    pytest.param(
        b"name: x\nstrategy: rebuild\nexpect: {exit_cod: 0}\n", "expect.exit_cod", id="expect-typo"
    ),
    pytest.param(b"name: x\nstrategy: rebuild\nexpect: {}\n", "expect: no checks", id="no-checks"),
    pytest.param(b"name: x\nstrategy: rebuild\n", "expect: no checks", id="no-expect"),
    pytest.param(
        b"name: x\nstrategy: rebuild\nexpect: {old_stack_untouched: false}\n",
        "expect: no checks",
        id="only-false-checks",
    ),
    pytest.param(
        b"name: x\nstrategy: rebuild\nexpect: {writes_lost: 0}\n",
        "expect.writes_lost: needs load",
        id="load-check-without-load",
    ),
    pytest.param(GOOD_SCENARIO.encode() + b"load: {rate: .inf}\n", "load.rate", id="load-inf"),
    pytest.param(GOOD_SCENARIO.encode() + b"args: [--frobnicate]\n", "args:", id="bad-arg"),
    pytest.param(GOOD_SCENARIO.encode() + b"args: [--bake, inf]\n", "--bake", id="arg-inf"),
    pytest.param(GOOD_SCENARIO.encode() + b"then: resume\n", "then:", id="then-no-crash"),
    pytest.param(
        GOOD_SCENARIO.encode() + b"crash_after_step: true\n", "crash_after_step", id="crash-bool"
    ),
    pytest.param(
        GOOD_SCENARIO.encode() + b"crash_after_call: reboot_all\n",
        "crash_after_call",
        id="crash-call-unknown-op",
    ),
    pytest.param(
        GOOD_SCENARIO.encode() + b"crash_before_call: 0\n",
        "crash_before_call",
        id="crash-call-zero",
    ),
    pytest.param(
        GOOD_SCENARIO.encode() + b"crash_after_step: 2\ncrash_after_call: 3\n",
        "choose one",
        id="two-crash-hooks",
    ),
]


@pytest.mark.parametrize(("content", "named"), SCENARIO_CASES)
def test_bad_scenario_is_refused_before_anything_starts(
    tmp_path: Path, content: bytes, named: str
) -> None:
    """Every bad scenario file is exit 2 with one line naming the key, and no world was
    built: no state dir, no rehearsal directory, no local-cloud process."""
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    state = tmp_path / "state"
    line = invoke("--state-dir", str(state), "rehearse", str(path)).error_line()
    assert f"scenario {path}" in line and named in line, line
    assert not state.exists(), sorted(p.name for p in state.iterdir())
    assert local_cloud_processes(tmp_path) == []


def test_scenario_name_cannot_leave_the_state_dir(tmp_path: Path) -> None:
    """`name: ../../x` is refused: nothing is written beside or above the state dir."""
    before = set(tmp_path.iterdir())
    path = tmp_path / "escape.yaml"
    path.write_text("name: ../../x\nstrategy: rebuild\nexpect: {exit_code: 0}\n")
    with pytest.raises(ConfigError, match="name"):
        load_scenario(path)
    state = tmp_path / "a" / "b"
    assert invoke("--state-dir", str(state), "rehearse", str(path)).code == 2
    assert set(tmp_path.iterdir()) == before | {path}


def test_scenario_without_checks_does_not_pass(tmp_path: Path) -> None:
    """Even a Scenario built in code with no expectations reports FAIL, not PASS."""
    scenario = Scenario(name="no-checks", strategy="rebuild", args=["--dry-run"])
    report = run_scenario(scenario, state_dir=tmp_path)
    assert report["checks"] == [] and report["passed"] is False
    assert local_cloud_processes(tmp_path) == []


def test_the_shipped_scenarios_load() -> None:
    """Every scenario in scenarios/ passes the stricter checks, with at least one check."""
    assert SCENARIOS
    for path in SCENARIOS:
        scenario = load_scenario(path)
        assert scenario.expect, path


def test_fault_ops_are_calls_the_local_cloud_makes() -> None:
    """A fault can only target an op the local provider really calls (no dead faults)."""
    source = (ROOT / "providers" / "local" / "provider.py").read_text()
    made = set(re.findall(r'self\._call\("([a-z_]+)"', source))
    assert set(FAULT_OPS) <= made, set(FAULT_OPS) - made


def test_missing_config_from_the_environment_names_the_variable(tmp_path: Path) -> None:
    """CHANGEOVER_CONFIG naming a file that is not there says where the name came from."""
    missing = tmp_path / "nope.toml"
    res = invoke("stacks", env={"CHANGEOVER_CONFIG": str(missing)})
    line = res.error_line()
    assert str(missing) in line and "CHANGEOVER_CONFIG" in line and "not found" in line
