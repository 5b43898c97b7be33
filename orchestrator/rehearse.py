"""Rehearsals: run a strategy on a throwaway local-cloud world under real load, with
faults injected, then check what must hold (scenarios/*.yaml are the data).

A ``World`` is a state dir with its own config file, local cloud and demo stack. The
strategy runs as a real `changeover` subprocess, so a scenario can SIGKILL it after any
step and then `resume` or `rollback` it, exactly as an operator would. The same World
is what the test suite and the cutover benchmark build on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.db import connect
from orchestrator.errors import ConfigError
from orchestrator.load import LoadGenerator, LoadResult
from orchestrator.settings import DEMO_STACK, StackConfig
from providers.local.bootstrap import ensure_stack
from providers.local.cloud import LocalCloud
from providers.local.daemon import kill_pid, pid_alive
from providers.local.http import request

CLI_TIMEOUT = 300.0  # seconds any one changeover subprocess may take


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (str, list)):
        return json.dumps(v)  # a JSON string or array of scalars is valid TOML
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
        info = self.cloud.address(self.stack, self.config.address)
        if info is None:
            raise RuntimeError("address proxy is not running")
        return info.port

    def members(self) -> list[str]:
        info = self.cloud.address(self.stack, self.config.address)
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
    then: str | None = None  # resume | rollback, after a crash
    expect: dict[str, Any] = field(default_factory=dict)
    description: str = ""


SCENARIO_KEYS = set(Scenario.__dataclass_fields__)


def load_scenario(path: Path) -> Scenario:
    """Read one scenario file; a bad file is a ConfigError naming the key."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"scenario {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"scenario {path}: expected a mapping at the top")
    if unknown := set(data) - SCENARIO_KEYS:
        raise ConfigError(f"scenario {path}: unknown key(s) {sorted(unknown)}")
    for key in ("name", "strategy"):
        if key not in data:
            raise ConfigError(f"scenario {path}: missing {key!r}")
    if data["strategy"] not in ("rebuild", "rotate"):
        raise ConfigError(f"scenario {path}: strategy must be rebuild or rotate")
    if data.get("then") not in (None, "resume", "rollback"):
        raise ConfigError(f"scenario {path}: then must be resume or rollback")
    return Scenario(**data)


def run_scenario(scenario: Scenario, *, state_dir: Path) -> dict[str, Any]:
    """Build the world, run the scenario, check its expectations, tear the world down."""
    stack = json.loads(json.dumps(DEMO_STACK))
    _deep_update(stack, scenario.stack)
    world = World(
        state_dir / "rehearsals" / f"{scenario.name}-{int(time.time())}", stack_config=stack
    )
    try:
        return _run(world, scenario)
    finally:
        world.down()


def _deep_update(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v


def _run(world: World, sc: Scenario) -> dict[str, Any]:
    world.up()
    before_members = sorted(world.members())
    before_servers = set(world.live_servers())
    for fault in sc.faults:
        f = dict(fault)
        world.cloud.inject(f.pop("kind"), op=f.pop("op", None), times=f.pop("times", 1), **f)
    gen = world.load(**sc.load) if sc.load else None
    if gen:
        gen.start()
        time.sleep(0.5)  # steady state before the change
    env = {"CHANGEOVER_CRASH_AFTER_STEP": str(sc.crash_after_step)} if sc.crash_after_step else {}
    code, result = world.cli_json(sc.strategy, world.stack, "--yes", *sc.args, env=env)
    first_code = code
    if sc.crash_after_step and sc.then:
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
    figures: dict[str, Any] = {}
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
    return {
        "scenario": sc.name,
        "passed": all(c["ok"] for c in checks),
        "checks": checks,
        "load": figures,
        "result": {k: v for k, v in result.items() if k != "_stderr"},
        "stderr_tail": result.get("_stderr", "")[-1500:],
    }


def _last_run_id(world: World) -> str:
    conn = connect(world.state_dir)
    try:
        row = conn.execute("SELECT id FROM runs ORDER BY created_at DESC LIMIT 1").fetchone()
    finally:
        conn.close()
    if row is None:
        raise RuntimeError("no run was journaled")
    return str(row["id"])
