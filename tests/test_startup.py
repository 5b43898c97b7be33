"""Start-up (issue 15): what keeps `changeover --help`, `status` and `stacks` fast.

No timing is asserted here (bench/startup.py measures the times): each test runs the
real entry point in a fresh interpreter and lists the modules it loaded. What makes these
commands slow is importing what they do not use, so that is what is pinned:

- importing `orchestrator.cli` loads typer and nothing of changeover's own machinery;
- `--help` adds rich (the help is rich's, on a terminal in colour) but no pydantic;
- `status` and `stacks` load the settings (pydantic) and the journal, but never the cloud
  SDKs, structlog (nothing is logged), tenacity and urllib.request (nothing is notified),
  the engine or a strategy; `stacks` loads the local provider its stack uses, no other;
- nor pydantic-settings (asyncio, argparse, its sources), unless a CHANGEOVER_* variable
  sets a setting; then the same settings are read through it (compared here, on the same
  inputs), nor the modules that check a notification, a maintenance window or a host;
- typer reads each command's annotations evaluated once, not compiled again per read.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from pydantic import ValidationError

from orchestrator import settings as settings_module
from tests.test_fuzz_input import BASE_CONFIG, FUZZ, Mutation, _apply, config_mutations

ROOT = Path(__file__).resolve().parents[1]

# Never needed by these commands: the cloud SDKs and their test doubles, ssh.
SDKS = frozenset(
    {"boto3", "botocore", "s3transfer", "libcloud", "moto", "paramiko", "requests", "urllib3"}
)
# Loaded only by a command that logs, notifies, runs or plans.
RUN_ONLY = frozenset(
    {
        "structlog",
        "tenacity",
        "urllib.request",
        "orchestrator.engine",
        "orchestrator.guard",
        "orchestrator.plan",
        "orchestrator.progress",
        "providers.aws",
        "providers.libcloud_provider",
        "providers.static",
        "providers.ssh",
        "strategies.rebuild",
        "strategies.rotate",
        "strategies.upgrade",
        "strategies.upgrade_steps",
        "strategies.steps",
    }
)
# The settings: any command that reads the config needs them, --help does not.
SETTINGS = frozenset({"pydantic", "pydantic_settings", "orchestrator.settings"})
# Loaded only when a CHANGEOVER_* variable sets a setting, a notification or a maintenance
# window is configured, or a host is checked (the audit: hygiene, facts, security).
UNLESS_USED = frozenset(
    {"pydantic_settings", "orchestrator.notify", "orchestrator.windows", "orchestrator.audit"}
)
RICH = frozenset({"rich", "markdown_it", "pygments"})

CONFIG = """\
[stacks.shop]
provider = "local"
address = "shop-eip"

[stacks.shop.roles.web]
count = 2
"""

# Dumps the loaded modules at exit, after main() and everything it registered.
_RUN = """\
import atexit, json, runpy, sys

def _dump():
    with open({out!r}, "w") as f:
        json.dump(sorted(sys.modules), f)

atexit.register(_dump)
sys.argv = ["changeover", *{args!r}]
runpy.run_module("orchestrator", run_name="__main__", alter_sys=True)
"""


def _env(tmp_path: Path) -> dict[str, str]:
    drop = ("CHANGEOVER_", "FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "COLUMNS", "LINES")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["HOME"] = str(tmp_path / "home")  # nothing of the user's is read
    return env


def _loaded(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run `changeover ARGS` as a whole process (stdout a pipe), with `env` added to the
    environment; its result and the modules it had loaded when it exited."""
    out = tmp_path / "modules.json"
    out.unlink(missing_ok=True)
    proc = subprocess.run(
        [sys.executable, "-c", _RUN.format(out=str(out), args=list(args))],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**_env(tmp_path), **(env or {})},
        check=False,
    )
    assert out.exists(), proc.stderr
    return proc, set(json.loads(out.read_text()))


def _hits(modules: set[str], names: frozenset[str]) -> list[str]:
    """The loaded modules that are one of `names` or inside one of them."""
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


def _import_only(*names: str) -> set[str]:
    code = f"import json, sys\nimport {', '.join(names)}\nprint(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return set(json.loads(proc.stdout))


def test_importing_the_cli_loads_typer_and_nothing_of_the_machinery() -> None:
    modules = _import_only("orchestrator.cli")
    assert "typer" in modules
    assert _hits(modules, SDKS | RUN_ONLY | SETTINGS | RICH) == []
    ours = _hits(modules, frozenset({"orchestrator", "providers", "strategies"}))
    assert ours == ["orchestrator", "orchestrator.cli"]


def test_help_is_rich_and_loads_neither_settings_nor_sdks(tmp_path: Path) -> None:
    proc, modules = _loaded(tmp_path, "--help")
    assert proc.returncode == 0, proc.stderr
    # rich's panels, not click's plain "Commands:" list.
    assert re.search(r"╭─ Commands ─+╮", proc.stdout), proc.stdout
    assert "│ rebuild " in proc.stdout and "│ status " in proc.stdout
    assert "rich.console" in modules
    assert _hits(modules, SDKS | RUN_ONLY | SETTINGS) == []
    assert _hits(modules, frozenset({"providers", "strategies"})) == []


def test_help_on_a_terminal_is_in_colour(tmp_path: Path) -> None:
    """On a terminal the rich help keeps its colours and panels."""
    master, slave = pty.openpty()
    env = {**_env(tmp_path), "TERM": "xterm-256color"}
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "--help"],
            stdin=subprocess.DEVNULL,
            stdout=slave,
            stderr=subprocess.PIPE,
            cwd=tmp_path,
            env=env,
        )
    finally:
        os.close(slave)
    shown = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                shown += chunk
            elif proc.poll() is not None:
                break
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        os.close(master)
    text = shown.decode(errors="replace")
    assert proc.returncode == 0, err
    assert "\x1b[" in text, text  # styled: colour and bold
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    assert "Commands" in plain and "╭─" in plain and "rebuild" in plain, plain


def test_status_on_an_empty_state_dir_loads_no_sdk_no_logging_no_engine(
    tmp_path: Path,
) -> None:
    proc, modules = _loaded(tmp_path, "--state-dir", str(tmp_path / "state"), "status")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "no runs yet\n"
    assert "orchestrator.settings" in modules and "orchestrator.state.sqlite" in modules
    assert _hits(modules, SDKS | RUN_ONLY | RICH | UNLESS_USED) == []
    assert _hits(modules, frozenset({"providers", "strategies"})) == []


def test_stacks_on_a_small_config_loads_only_its_own_provider(tmp_path: Path) -> None:
    config = tmp_path / "changeover.toml"
    config.write_text(CONFIG)
    state = str(tmp_path / "state")
    proc, modules = _loaded(tmp_path, "--config", str(config), "--state-dir", state, "stacks")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("shop "), proc.stdout  # its local cloud is not running
    assert "providers.local.provider" in modules
    assert _hits(modules, SDKS | RUN_ONLY | RICH | UNLESS_USED) == []
    assert _hits(modules, frozenset({"strategies"})) == ["strategies", "strategies.base"]


@pytest.mark.parametrize("output", ["text", "json"])
def test_status_output_is_what_it_was(tmp_path: Path, output: str) -> None:
    """The lazy imports change nothing a user sees: the same result, nothing on stderr."""
    proc, _ = _loaded(
        tmp_path, "--state-dir", str(tmp_path / "state"), "--output", output, "status"
    )
    assert proc.returncode == 0 and proc.stderr == ""
    expected = '{"runs": []}\n' if output == "json" else "no runs yet\n"
    assert proc.stdout == expected


def test_a_variable_that_sets_a_setting_is_read_through_pydantic_settings(
    tmp_path: Path,
) -> None:
    state = str(tmp_path / "state")
    proc, modules = _loaded(
        tmp_path, "--state-dir", state, "status", env={"CHANGEOVER_OUTPUT": "json"}
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout == '{"runs": []}\n'
    assert "pydantic_settings" in modules
    # A CHANGEOVER_* variable that is no setting (the config file's path) does not.
    config = tmp_path / "changeover.toml"
    config.write_text(CONFIG)
    proc, modules = _loaded(
        tmp_path, "--state-dir", state, "stacks", env={"CHANGEOVER_CONFIG": str(config)}
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("shop "), proc.stdout
    assert "pydantic_settings" not in modules


def test_a_bad_state_setting_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """The same refusal from the file (read without pydantic-settings) and from a
    variable (read through it)."""
    config = tmp_path / "changeover.toml"
    config.write_text('state = "nope://x"\n' + CONFIG)
    state = str(tmp_path / "state")
    expected = (
        "not a state store URL: use `sqlite` (the default) or `dynamodb://TABLE?region=REGION`"
    )
    proc, modules = _loaded(tmp_path, "--config", str(config), "--state-dir", state, "status")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"error: config error in {config}: state: {expected}\n"
    assert "pydantic_settings" not in modules
    proc, modules = _loaded(
        tmp_path, "--state-dir", state, "status", env={"CHANGEOVER_STATE": "nope://x"}
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (
        f"error: config error in environment variable CHANGEOVER_STATE: state: {expected}\n"
    )
    assert "pydantic_settings" in modules


# --- without a variable, the settings are what pydantic-settings makes of the same input ----
def _outcome(build: Any) -> tuple[str, Any]:
    """What building the settings gives: their values, or the errors (where, which, what)."""
    try:
        return "ok", build().model_dump(mode="json")
    except ValidationError as exc:
        return "error", [(e["loc"], e["type"], e["msg"]) for e in exc.errors()]


def _both_ways(data: dict[str, Any] | None, overrides: dict[str, Any]) -> tuple[Any, Any]:
    """The settings as load_settings builds them with no variable set, and as
    pydantic-settings builds them from the same file and flags."""
    base = data if data is not None else {"stacks": {"demo": settings_module.DEMO_STACK}}
    variables = frozenset(settings_module._field_env_vars())  # any set here: left out
    fast = _outcome(lambda: settings_module._build(data, overrides, use_env=False))
    read = _outcome(lambda: settings_module._build_with_env(base, overrides, variables))
    return fast, read


@pytest.fixture
def no_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.upper().startswith("CHANGEOVER_")]:
        monkeypatch.delenv(var)


FULL_STACK: dict[str, Any] = {
    "provider": "aws",
    "region": "eu-west-1",
    "addresses": [{"target_group": "tg-web", "roles": ["web"]}, {"elastic_ip": "eip-api"}],
    "roles": {
        "db": {"data": True, "launch": {"ami": "ami-1", "subnets": ["s-1"]}},
        "web": {"count": 3, "health": {"type": "tcp", "port": 8080}},
        "api": {"count": 2, "data_options": {"device": "/dev/xvdg"}},
    },
    "defaults": {"bake": 2.5, "canary": 1, "on_drain_timeout": "proceed"},
    "hygiene": {"pending": "security", "components": ["openssl"], "ssh": {"user": "admin"}},
    "security": {"reboot_at": "03:30"},
    "windows": {"open": ["Sat,Sun 02:00-05:00 Europe/Berlin"], "batch_estimate": 300.0},
    "gates": [
        {"http": "https://status.example/health", "json_path": "$.ok", "equals": True},
        {"prometheus": "http://prom:9090", "query": "errors", "max": 0.01},
        {"cloudwatch_alarm": "api-5xx"},
    ],
    "hooks": {"pre_drain": "drain-hook --fast", "post_cutover": {"webhook": "https://h.example/"}},
    "notify": [{"webhook": "https://n.example/hook", "events": ["started"]}],
}
STATIC_STACK: dict[str, Any] = {
    "provider": "static",
    "static": {"hosts": [{"id": "h1", "address": "10.0.0.1"}, {"id": "h2", "address": "h2"}]},
}
CASES: list[tuple[dict[str, Any] | None, dict[str, Any]]] = [
    (None, {}),  # no file: the demo stack
    (None, {"state_dir": Path("/tmp/x"), "output": "json", "verbose": 2}),
    ({"stacks": {"full": FULL_STACK, "hosts": STATIC_STACK}, "lock_ttl": 5.0}, {}),
    ({"notify": [{"webhook_env": "HOOK_URL", "headers_env": {"X-Token": "TOKEN"}}]}, {}),
    # Keys that name a setting in another case, twice, or not at all.
    ({"STATE_DIR": "/srv/a", "Output": "json", "stacks": {}}, {}),
    ({"state_dir": "/srv/a", "STATE_DIR": "/srv/b"}, {"state_dir": Path("/srv/c")}),
    ({"Stacks": {"x": FULL_STACK}, "stacks": {"y": FULL_STACK}}, {}),
    ({"stackz": {}, "Verbose": 1, "bogus": 2}, {"output": "text"}),
    # The flags over the file; a table merged key by key, as a variable's would be.
    ({"output": "json", "log_format": "json"}, {"output": "text", "verbose": 1}),
    (None, {"stacks": {"demo": {"defaults": {"bake": 9.0}}, "new": {"roles": {}}}}),
    ({"stacks": 5}, {}),
    ({"state": " sqlite ", "test_clock": "2024-01-01T00:00:00Z/60"}, {}),
    # Errors, first and all: each is reported as before.
    ({"state": "nope://x", "lock_ttl": 0.5, "verbose": -1}, {}),
    ({"stacks": {"bad name!": FULL_STACK, "ok": {**FULL_STACK, "windows": {"open": ["x"]}}}}, {}),
    ({"stacks": {"n": {**FULL_STACK, "notify": [{"webhook": "ftp://x", "events": ["nah"]}]}}}, {}),
    ({"stacks": {"s": {**STATIC_STACK, "roles": {"web": {"count": 1}}, "address": "a"}}}, {}),
    ({"crash_after_call": "no such spec!", "crash_after_step": 0}, {"output": "yaml"}),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_without_variables_the_settings_are_pydantic_settings_own(case: int) -> None:
    data, overrides = CASES[case]
    fast, read = _both_ways(data, overrides)
    assert fast == read


@FUZZ
@given(config_mutations())
def test_a_mutated_config_is_refused_alike_both_ways(mutation: Mutation) -> None:
    data = _apply(BASE_CONFIG, mutation)
    # The top-level keys in capitals too: pydantic-settings matches them in any case.
    for variant in (data, {k.upper(): v for k, v in data.items()}):
        fast, read = _both_ways(variant, {"verbose": 1})
        assert fast == read


def test_a_variable_that_is_left_out_is_not_read(
    monkeypatch: pytest.MonkeyPatch, no_variables: None
) -> None:
    """Leaving out the only variable (to find which one an error comes from) reads as
    if it were not set; leaving out another still reads it."""
    monkeypatch.setenv("CHANGEOVER_VERBOSE", "3")
    monkeypatch.setenv("changeover_output", "json")  # matched in any case
    build = settings_module._build
    both = frozenset({"changeover_verbose", "changeover_output"})
    assert set(settings_module._field_env_vars()) == both
    assert (build(None, {}).verbose, build(None, {}).output) == (3, "json")
    one = build(None, {}, exclude=frozenset({"changeover_verbose"}))
    assert (one.verbose, one.output) == (0, "json")
    assert _outcome(lambda: build(None, {}, exclude=both)) == _both_ways(None, {})[0]


# --- typer reads the commands' annotations evaluated once --------------------------------------
_PARAMS = """import json, sys
from orchestrator import cli
import typer.main

if {resolve!r}:
    sys.argv = ["changeover", "--help"]
    try:
        cli.main()
    except SystemExit:
        pass
    print("\\x00")


def walk(cmd, path):
    for p in cmd.params:
        yield [path, p.name, repr(p.type_descriptor.annotation), repr(p.default), p.required,
               p.multiple, p.nargs, p.help, p.opts]
    for name, sub in sorted(getattr(cmd, "commands", {{}}).items()):
        yield from walk(sub, path + " " + name)


infos = [cli.app.registered_callback, *cli.app.registered_commands]
infos += [c for g in cli.app.registered_groups for c in g.typer_instance.registered_commands]
strings = [i.callback.__name__ for i in infos for a in i.callback.__annotations__.values()
           if isinstance(a, str)]
print(json.dumps({{"strings": strings, "params": list(walk(typer.main.get_command(cli.app), ""))}}))
"""


def test_main_gives_typer_the_commands_annotations_evaluated() -> None:
    """main() evaluates each command's annotations once (typer compiled the strings again
    at each of its four reads per run): the same parameters either way."""
    runs = {}
    for resolve in (False, True):
        proc = _python(_PARAMS.format(resolve=resolve))
        assert proc.returncode == 0, proc.stderr
        runs[resolve] = json.loads(proc.stdout.rsplit("\x00", 1)[-1])
    assert runs[False]["strings"], "the module's annotations are strings to start with"
    assert runs[True]["strings"] == []
    assert runs[True]["params"] == runs[False]["params"]
    assert len(runs[True]["params"]) > 50


# --- structlog is configured when the first logger is made ----------------------------------
def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("CHANGEOVER_")},
        check=False,
    )


def test_configure_defers_structlog_until_the_first_logger() -> None:
    """configure() does not load structlog; the first logger then logs as configured:
    JSON, on stderr, redacted (stdout holds only results)."""
    proc = _python(
        "import sys\n"
        "from orchestrator import log\n"
        "log.configure('json', 0)\n"
        "assert 'structlog' not in sys.modules, 'configure() loaded structlog'\n"
        "log.get_logger(run='r1').info('run.started', password='hunter2-secret')\n"
        "log.get_logger().debug('hidden')  # below the level: not shown\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    event = json.loads(lines[0])
    assert event["event"] == "run.started" and event["run"] == "r1"
    assert event["level"] == "info" and "timestamp" in event
    assert "hunter2-secret" not in lines[0]


def test_a_configuration_made_after_a_deferred_configure_wins() -> None:
    """As if configure() had configured structlog at once: one made later (a test's
    capture_logs) is not overwritten by the first logger."""
    proc = _python(
        "from orchestrator import log\n"
        "log.configure('json', 0)\n"
        "from structlog.testing import capture_logs\n"
        "with capture_logs() as logs:\n"
        "    log.get_logger(run='r1').info('captured')\n"
        "assert logs == [{'run': 'r1', 'event': 'captured', 'log_level': 'info'}], logs\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and proc.stdout == ""


def test_configure_applies_at_once_when_structlog_is_loaded() -> None:
    """With structlog already loaded (a test process), configure() configures it at once,
    and a later configure() replaces an earlier one."""
    proc = _python(
        "import structlog\n"
        "from orchestrator import log\n"
        "log.configure('console', 0)\n"
        "assert isinstance(structlog.get_config()['processors'][-1],"
        " structlog.dev.ConsoleRenderer)\n"
        "log.configure('json', 0)\n"
        "assert isinstance(structlog.get_config()['processors'][-1],"
        " structlog.processors.JSONRenderer)\n"
    )
    assert proc.returncode == 0, proc.stderr
