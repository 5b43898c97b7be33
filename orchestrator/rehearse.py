"""Rehearsals: run a strategy on a throwaway local-cloud world under real load, with
faults injected, then check what must hold (scenarios/*.yaml are the data).

A ``World`` is a state dir with its own config file, local cloud and demo stack. The
strategy runs as a real `changeover` subprocess, so a scenario can SIGKILL it after any
step and then `resume` or `rollback` it, exactly as an operator would. The same World
is what the test suite and the cutover benchmark build on.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import typer.core
import typer.main
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator.cli import app, parse_duration
from orchestrator.errors import BadInput, ConfigError
from orchestrator.guard import parse_call_spec
from orchestrator.load import DEFAULT_TIMEOUT, LoadGenerator, LoadResult
from orchestrator.plan import Outcome
from orchestrator.redact import redact
from orchestrator.report import attach_load, build_report
from orchestrator.report_html import render_html
from orchestrator.settings import DEMO_STACK, StackConfig, read_utf8
from orchestrator.state import StateStore, open_store
from providers.local.bootstrap import ensure_stack
from providers.local.cloud import LocalCloud
from providers.local.daemon import kill_pid, pid_alive
from providers.local.http import request

CLI_TIMEOUT = 300.0  # seconds any one changeover subprocess may take


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table: entry points in `addresses`
        pairs = ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items() if x is not None)
        return "{ " + pairs + " }"
    return str(v)


def stack_toml(name: str, stack: dict[str, Any]) -> str:
    """A config file for one stack (enough TOML for our nested dicts)."""
    lines: list[str] = []

    def table(prefix: str, d: dict[str, Any]) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict) and v is not None}
        lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in scalars.items())
        for k, v in d.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}", v)

    table(f"stacks.{name}", stack)
    return "\n".join(lines) + "\n"


@dataclass
class World:
    """A throwaway local-cloud world: state dir, config file, one stack."""

    state_dir: Path
    stack: str = "demo"
    stack_config: dict[str, Any] = field(default_factory=lambda: json.loads(json.dumps(DEMO_STACK)))

    def __post_init__(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config_file = self.state_dir / "changeover.toml"
        self.config_file.write_text(stack_toml(self.stack, self.stack_config))
        self.config = StackConfig.model_validate(self.stack_config)
        self.cloud = LocalCloud(self.state_dir)

    # --- lifecycle ---------------------------------------------------------------------
    def up(self) -> None:
        ensure_stack(self.cloud, self.stack, self.config)

    def down(self) -> None:
        """Stop everything this world started, even processes the registry lost."""
        self.cloud.down()
        self.cloud.close()
        marker = str(self.state_dir)
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
                continue
            try:
                cmdline = (pid_dir / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline and "providers.local" in cmdline:
                kill_pid(int(pid_dir.name), grace=1.0)

    def store(self) -> StateStore:
        """The world's state store: sqlite in its state dir, as its `changeover`
        subprocesses (which get no CHANGEOVER_* variables but ours) use it."""
        return open_store(None, self.state_dir)

    # --- the CLI, as an operator would run it --------------------------------------------
    def cli(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = CLI_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("CHANGEOVER_")}
        full_env.update(env or {})
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "orchestrator",
                "--config",
                str(self.config_file),
                "--state-dir",
                str(self.state_dir),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
            check=False,
        )

    def cli_json(self, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        proc = self.cli("--output", "json", *args, env=env)
        try:
            data = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
        except ValueError:
            data = {"raw": proc.stdout}
        data.setdefault("_stderr", proc.stderr[-4000:])
        return proc.returncode, data

    # --- what is true now -----------------------------------------------------------------
    @property
    def address_port(self) -> int:
        info = self.cloud.address(self.stack, self.config.primary_address)
        if info is None:
            raise RuntimeError("address proxy is not running")
        return info.port

    def members(self) -> list[str]:
        info = self.cloud.address(self.stack, self.config.primary_address)
        assert info is not None
        token = self.cloud.control_token
        members = request(info.control_port, "GET", "/members", token=token)[1]["members"]
        return [m["id"] for m in members]

    def live_servers(self) -> dict[str, dict[str, Any]]:
        """Registered servers whose process is alive, by id."""
        out = {}
        for row in self.cloud.server_rows(self.stack):
            if row["pid"] and pid_alive(row["pid"]):
                out[row["id"]] = {
                    "role": row["role"],
                    "generation": row["generation"],
                    "run": row["run"],
                    "pid": row["pid"],
                }
        return out

    def data_server(self) -> str:
        """The live data server that takes writes itself (not one forwarding them)."""
        role = self.config.data_role
        found = [sid for sid, s in self.live_servers().items() if s["role"] == role]
        local = [sid for sid in found if self.db_mode(sid) != "forward"]
        if len(local) != 1:
            raise RuntimeError(f"expected one live data server taking writes, found {local}")
        return local[0]

    def db_port(self, server_id: str) -> int:
        row = self.cloud.server_row(server_id)
        assert row is not None
        return int((Path(row["root"]) / "port").read_text())

    def db_rows(self, server_id: str) -> dict[int, str]:
        rows: dict[int, str] = {}
        after = 0
        port = self.db_port(server_id)
        while True:
            page = request(port, "GET", f"/db/dump?after={after}&limit=5000")[1]["rows"]
            if not page:
                return rows
            rows.update({int(i): p for i, p in page})
            after = int(page[-1][0])

    def db_mode(self, server_id: str) -> str:
        port = self.db_port(server_id)
        return str(request(port, "GET", "/admin/mode", token=self.cloud.control_token)[1]["mode"])

    def publish(self, packages: dict[str, dict[str, Any]]) -> None:
        """Publish new versions in the simulated package index (what the mirror serves)."""
        index = self.cloud.read_package_index()
        index.setdefault("packages", {}).update(packages)
        self.cloud.write_package_index(index)

    def facts(self, server_id: str) -> dict[str, Any]:
        """A server's simulated host facts (installed and pending packages, boots)."""
        facts: dict[str, Any] = request(self.db_port(server_id), "GET", "/facts")[1]
        return facts

    def load(self, rate: float = 250.0, connections: int = 4, **kw: Any) -> LoadGenerator:
        return LoadGenerator(
            "127.0.0.1", self.address_port, rate=rate, connections=connections, **kw
        )

    def lost_writes(self, result: LoadResult) -> list[int]:
        """Acknowledged writes missing (or different) in the serving data server."""
        rows = self.db_rows(self.data_server())
        return [i for i, p in result.acked_writes.items() if rows.get(i) != p]


# --- scenarios ----------------------------------------------------------------------------
@dataclass
class Scenario:
    """A rehearsal: world, faults, load, the strategy run, and what is expected."""

    name: str
    strategy: str
    args: list[str] = field(default_factory=list)
    stack: dict[str, Any] = field(default_factory=dict)
    faults: list[dict[str, Any]] = field(default_factory=list)
    load: dict[str, Any] | None = None
    crash_after_step: int | None = None
    # Kill at a mutating provider call: N, OP or OP:N (see orchestrator/guard.py).
    crash_after_call: str | None = None
    crash_before_call: str | None = None
    then: str | None = None  # resume | rollback, after a crash
    expect: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    # Package versions published once the stack is up (the servers then have pending
    # upgrades): name -> {"version", "security", "reboot"}.
    publish: dict[str, Any] = field(default_factory=dict)


SCENARIO_KEYS = set(Scenario.__dataclass_fields__)

# The provider calls of the local cloud a `fail_call` or `latency` fault can target.
FAULT_OPS = (
    "boot_state",
    "create_servers",
    "data_copy_live",
    "data_final_sync",
    "data_freeze",
    "data_mode",
    "data_summary",
    "data_switch",
    "data_switch_back",
    "data_unfreeze",
    "describe_servers",
    "destroy_servers",
    "get_members",
    "inflight",
    "list_servers",
    "probe_address",
    "reboot_server",
    "set_members",
    "upgrade_packages",
    "verify_server",
)
FaultOp = Literal[FAULT_OPS]  # type: ignore[valid-type]
# A scenario's name becomes a directory under the state dir: nothing that could leave it.
SCENARIO_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
# Expectations checked only when the scenario runs load.
LOAD_CHECKS = ("failed_requests", "min_rate", "writes_lost")


class _Spec(BaseModel):
    """A part of a scenario file. YAML is typed: `times: "2"` or `bake: .inf` is a mistake."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class _FailCall(_Spec):
    kind: Literal["fail_call"]
    op: FaultOp | None = None
    times: int = Field(default=1, ge=-1)
    error: Literal["transient", "fatal"] = "transient"


class _Latency(_Spec):
    kind: Literal["latency"]
    op: FaultOp | None = None
    times: int = Field(default=1, ge=-1)
    seconds: float = Field(default=0.0, ge=0, le=60)


class _ServerFault(_Spec):
    kind: Literal["server"]
    times: int = Field(default=1, ge=-1)
    role: str | None = None
    boot_delay: float = Field(default=0.0, ge=0, le=300)
    health_fail: bool = False
    hold_packages: list[str] = Field(default_factory=list)
    keep_reboot_required: bool = False
    die_after: float | None = Field(default=None, gt=0, le=3600)


_Fault = Annotated[_FailCall | _Latency | _ServerFault, Field(discriminator="kind")]
FAULT_KINDS = ("fail_call", "latency", "server")


class _Load(_Spec):
    """LoadGenerator's arguments."""

    rate: float = Field(default=250.0, gt=0, le=100_000)
    connections: int = Field(default=4, ge=1, le=256)
    write_ratio: float = Field(default=0.3, ge=0, le=1)
    max_duration: float = Field(default=120.0, gt=0, le=3600)
    max_requests: int = Field(default=100_000, ge=1)
    payload_prefix: str = Field(default="w", min_length=1)
    timeout: float = Field(default=DEFAULT_TIMEOUT, gt=0, le=600)


class _Expect(_Spec):
    """What must hold after the run; each key set here is one check."""

    exit_code: int | None = None
    crash_exit: int | None = None
    outcome: Literal[tuple(o.value for o in Outcome)] | None = None  # type: ignore[valid-type]
    address_moved: bool | None = None
    old_stack_untouched: bool = False
    only_serving_left: bool = False
    generation_after: int | None = Field(default=None, ge=1)
    failed_requests: int | None = Field(default=None, ge=0)
    min_rate: float | None = Field(default=None, ge=0)
    writes_lost: int | None = Field(default=None, ge=0)
    no_pending_security: bool = False


class _Package(_Spec):
    version: str = Field(min_length=1)
    security: bool = False
    reboot: bool = False
    kept_back: bool = False


class _ScenarioFile(_Spec):
    name: str = Field(pattern=SCENARIO_NAME)
    strategy: Literal["rebuild", "rotate", "upgrade"]
    args: list[str] = Field(default_factory=list)
    stack: dict[str, Any] = Field(default_factory=dict)
    faults: list[_Fault] = Field(default_factory=list)
    load: _Load | None = None
    crash_after_step: int | None = Field(default=None, ge=1)
    crash_after_call: int | str | None = None
    crash_before_call: int | str | None = None
    then: Literal["resume", "rollback"] | None = None
    expect: _Expect = Field(default_factory=_Expect)
    description: str = ""
    publish: dict[str, _Package] = Field(default_factory=dict)


def _field_error(exc: ValidationError) -> str:
    """One line naming the key of the first error in a scenario file."""
    first = exc.errors()[0]
    # A fault's errors carry its kind in their location (faults.0.fail_call.op): drop it.
    parts = [str(p) for p in first["loc"]]
    if len(parts) > 2 and parts[0] == "faults" and parts[2] in FAULT_KINDS:
        del parts[2]
    loc = ".".join(parts) or "(top)"
    kind = first["type"]
    msg = str(first["msg"]).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        msg = "unknown key"
    elif kind == "missing":
        msg = "missing"
    elif kind == "union_tag_not_found":
        loc, msg = f"{loc}.kind", f"missing (one of {', '.join(FAULT_KINDS)})"
    elif kind == "union_tag_invalid":
        tag = (first.get("ctx") or {}).get("tag")
        loc, msg = f"{loc}.kind", f"unknown fault kind {tag!r} (one of {', '.join(FAULT_KINDS)})"
    elif kind == "string_pattern_mismatch" and loc == "name":
        msg = "use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
    more = len(exc.errors()) - 1
    return f"{loc}: {msg}" + (f" (and {more} more)" if more else "")


def _check_args(strategy: str, args: list[str]) -> str | None:
    """Why the strategy's command line would refuse these args, or None."""
    if {"--help", "--version"} & set(args):
        return f"{args}: not a run flag"
    command = typer.main.get_command(app)
    assert isinstance(command, typer.core.TyperGroup)
    try:
        ctx = command.commands[strategy].make_context(
            strategy, ["demo", "--yes", *args], resilient_parsing=False
        )
    except typer.TyperException as exc:
        format_message = getattr(exc, "format_message", None)
        return str(format_message() if format_message else exc)
    for flag in ("bake", "retain"):
        value = ctx.params.get(flag)
        if value is not None and not math.isfinite(value):
            return f"--{flag}: {value} is not a finite number of seconds"
    if ctx.params.get("older_than"):
        try:
            parse_duration(ctx.params["older_than"])
        except typer.BadParameter as exc:
            return f"--older-than: {exc.format_message()}"
    return None


def load_scenario(path: Path) -> Scenario:
    """Read and check the whole scenario file: a bad one is a ConfigError of one line
    naming the key, raised before anything is started or written."""
    where = f"scenario {path}"
    text = read_utf8(Path(path), where)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(_one_line(f"{where}: not valid YAML{at}: {problem}")) from None
    except RecursionError:
        raise ConfigError(f"{where}: not valid YAML: nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys at the top")
    try:
        spec = _ScenarioFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_one_line(f"{where}: {_field_error(exc)}")) from None
    # The world the scenario builds: the demo stack with its changes, checked as config.
    stack = json.loads(json.dumps(DEMO_STACK))
    _deep_update(stack, spec.stack)
    try:
        config = StackConfig.model_validate(stack)
    except ValidationError as exc:
        raise ConfigError(_one_line(f"{where}: stack.{_field_error(exc)}")) from None
    for i, fault in enumerate(spec.faults):
        if isinstance(fault, _ServerFault) and fault.role and fault.role not in config.roles:
            raise ConfigError(
                f"{where}: faults.{i}.role: no role {fault.role!r} in the stack "
                f"({', '.join(config.roles)})"
            )
    for key in ("crash_after_call", "crash_before_call"):
        try:
            parse_call_spec(getattr(spec, key))
        except BadInput as exc:
            raise ConfigError(f"{where}: {key}: {exc}") from None
    crashes = [spec.crash_after_step, spec.crash_after_call, spec.crash_before_call]
    if sum(c is not None for c in crashes) > 1:
        raise ConfigError(
            f"{where}: crash_after_step, crash_after_call, crash_before_call: choose one"
        )
    if spec.then and all(c is None for c in crashes):
        raise ConfigError(
            f"{where}: then: needs crash_after_step, crash_after_call or crash_before_call "
            "(what to do after the crash)"
        )
    if problem := _check_args(spec.strategy, spec.args):
        raise ConfigError(_one_line(f"{where}: args: {problem}"))
    expect = spec.expect.model_dump(exclude_defaults=True)
    if spec.load is None and (needs_load := [k for k in LOAD_CHECKS if k in expect]):
        raise ConfigError(f"{where}: expect.{needs_load[0]}: needs load (there is no traffic)")
    if not expect:
        raise ConfigError(
            f"{where}: expect: no checks; a scenario must check something "
            f"({', '.join(_Expect.model_fields)})"
        )
    return Scenario(
        name=spec.name,
        strategy=spec.strategy,
        args=list(spec.args),
        stack=spec.stack,
        faults=[f.model_dump(exclude_unset=True) for f in spec.faults],
        load=spec.load.model_dump(exclude_unset=True) if spec.load else None,
        crash_after_step=spec.crash_after_step,
        crash_after_call=None if spec.crash_after_call is None else str(spec.crash_after_call),
        crash_before_call=None if spec.crash_before_call is None else str(spec.crash_before_call),
        then=spec.then,
        expect=expect,
        description=spec.description,
        publish={k: v.model_dump() for k, v in spec.publish.items()},
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())


def run_scenario(
    scenario: Scenario, *, state_dir: Path, html: Path | None = None
) -> dict[str, Any]:
    """Build the world, run the scenario, check its expectations, tear the world down.
    With `html`, write the run's report there, with the load on its time axis."""
    stack = json.loads(json.dumps(DEMO_STACK))
    _deep_update(stack, scenario.stack)
    world = World(
        state_dir / "rehearsals" / f"{scenario.name}-{int(time.time())}", stack_config=stack
    )
    try:
        return _run(world, scenario, html)
    finally:
        world.down()


def _deep_update(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v


def _run(world: World, sc: Scenario, html: Path | None = None) -> dict[str, Any]:
    world.up()
    if sc.publish:
        world.publish(sc.publish)
    before_members = sorted(world.members())
    before_servers = set(world.live_servers())
    for fault in sc.faults:
        f = dict(fault)
        world.cloud.inject(f.pop("kind"), op=f.pop("op", None), times=f.pop("times", 1), **f)
    gen = world.load(**sc.load) if sc.load else None
    if gen:
        gen.start()
        time.sleep(0.5)  # steady state before the change
    hooks = {
        "CHANGEOVER_CRASH_AFTER_STEP": sc.crash_after_step,
        "CHANGEOVER_CRASH_AFTER_CALL": sc.crash_after_call,
        "CHANGEOVER_CRASH_BEFORE_CALL": sc.crash_before_call,
    }
    env = {k: str(v) for k, v in hooks.items() if v is not None}
    code, result = world.cli_json(sc.strategy, world.stack, "--yes", *sc.args, env=env)
    first_code = code
    if env and sc.then:
        run_id = _last_run_id(world)
        code, result = world.cli_json(sc.then, run_id)
    load_result = None
    if gen:
        time.sleep(0.5)
        load_result = gen.stop()
    after_members = sorted(world.members())
    after_servers = set(world.live_servers())
    exp = sc.expect
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: Any) -> None:
        checks.append({"check": name, "ok": bool(ok), "detail": detail})

    if "exit_code" in exp:
        check("exit code", code == exp["exit_code"], f"got {code}, want {exp['exit_code']}")
    if "crash_exit" in exp:
        check("crashed", first_code == exp["crash_exit"], f"first run exited {first_code}")
    if "outcome" in exp:
        check(
            "outcome",
            result.get("outcome") == exp["outcome"],
            f"got {result.get('outcome')}, want {exp['outcome']}",
        )
    if "address_moved" in exp:
        moved = after_members != before_members and not set(after_members) & before_servers
        check(
            "address moved" if exp["address_moved"] else "address unchanged",
            moved == exp["address_moved"],
            f"{before_members} -> {after_members}",
        )
    if exp.get("old_stack_untouched"):
        check(
            "old stack untouched",
            after_servers == before_servers,
            f"{sorted(before_servers)} -> {sorted(after_servers)}",
        )
    if exp.get("only_serving_left"):
        data = world.data_server() if world.config.data_role else None
        extra = after_servers - set(after_members) - {data}
        check("no leftover servers", not extra, sorted(extra))
    if "generation_after" in exp:
        gens = {world.live_servers()[m]["generation"] for m in after_members}
        check("generation", gens == {exp["generation_after"]}, sorted(gens))
    if exp.get("no_pending_security"):
        pending = {
            m: names
            for m in after_members
            if (names := [p["name"] for p in world.facts(m)["pending"] if p["security"]])
        }
        check("no pending security upgrades", not pending, pending)
    figures: dict[str, Any] = {}
    lost: list[int] = []
    if load_result is not None:
        figures = load_result.to_dict()
        lost = world.lost_writes(load_result)
        figures["writes_lost"] = len(lost)
        if "failed_requests" in exp:
            check(
                "failed requests",
                load_result.failed <= exp["failed_requests"],
                f"{load_result.failed} of {load_result.sent} ({dict(load_result.errors)})",
            )
        if "min_rate" in exp:
            check(
                "request rate",
                load_result.rate >= exp["min_rate"],
                f"{load_result.rate:.0f} req/s over {load_result.duration:.1f}s",
            )
        if "writes_lost" in exp:
            check(
                "acknowledged writes lost",
                len(lost) <= exp["writes_lost"],
                f"{len(lost)} of {len(load_result.acked_writes)}",
            )
    out: dict[str, Any] = {}
    if html is not None:
        out["html"] = str(html)
        out["run_id"] = _write_report(
            world, sc.name, html, load=load_result, lost=lost, checks=checks
        )
    return (
        out
        | {
            "scenario": sc.name,
            "passed": bool(checks) and all(c["ok"] for c in checks),  # no check is no pass
            "checks": checks,
            "load": figures,
            "result": {k: v for k, v in result.items() if k != "_stderr"},
            "stderr_tail": result.get("_stderr", "")[-1500:],
        }
    )


def _write_report(
    world: World,
    name: str,
    path: Path,
    *,
    load: LoadResult | None,
    lost: list[int],
    checks: list[dict[str, Any]],
) -> str:
    """The run's report with the rehearsal's load and checks, as HTML at `path`."""
    store = world.store()
    try:
        data = build_report(store, _last_run_id(world))
    finally:
        store.close()
    if load is not None:
        attach_load(data, load, lost=lost, checks=checks, scenario=name)
    else:
        data["scenario"] = {"name": name, "passed": all(c["ok"] for c in checks), "checks": checks}
    try:
        path.write_text(render_html(redact(data)), encoding="utf-8")
    except OSError as exc:
        raise BadInput(f"--html {path}: cannot write the report: {exc.strerror}") from None
    return str(data["run_id"])


def _last_run_id(world: World) -> str:
    store = world.store()
    try:
        last = store.runs(limit=1)
    finally:
        store.close()
    if not last:
        raise RuntimeError("no run was journaled")
    return last[0].id
