"""The command line: the only place that reads config and the environment.

Heavy modules (the engine, providers, pydantic settings, and above all boto3 and
libcloud) are imported inside the commands, so `changeover --help`, `status` and `stacks`
start fast (tests/test_startup.py pins what each loads; bench/startup.py times them).
Results go to stdout (a table on a terminal, plain text otherwise, or one JSON object
with --output json); logs and progress go to stderr.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from collections.abc import Callable

    from orchestrator.engine import Engine, RunResult
    from orchestrator.plan import Plan
    from orchestrator.settings import Settings, StackConfig
    from orchestrator.state import StateStore
    from providers.base import Provider

app = typer.Typer(
    name="changeover",
    help="Replace servers instead of repairing them: build fresh, verify, migrate data, "
    "cut over, bake, retire.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
local_app = typer.Typer(help="The embedded local cloud.", no_args_is_help=True)
app.add_typer(local_app, name="local")
security_app = typer.Typer(
    help="Unattended upgrades from the security origins only.", no_args_is_help=True
)
app.add_typer(security_app, name="security")
state_app = typer.Typer(
    help="The state store: the journal, the leases and the recorded versions.",
    no_args_is_help=True,
)
app.add_typer(state_app, name="state")


class State:
    """Global options, resolved into Settings on first use."""

    def __init__(self, **opts: Any) -> None:
        self.opts = opts
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            from orchestrator.log import configure
            from orchestrator.settings import load_settings

            o = self.opts
            self._settings = load_settings(
                o["config"],
                state_dir=o["state_dir"],
                output=o["output"],
                log_format=o["log_format"],
                verbose=o["verbose"] or None,
            )
            for var, spec in (
                ("CHANGEOVER_CRASH_AFTER_CALL", self._settings.crash_after_call),
                ("CHANGEOVER_CRASH_BEFORE_CALL", self._settings.crash_before_call),
            ):
                if spec is None:  # the usual case: no need to load the guard (providers)
                    continue
                from orchestrator.errors import BadInput, ConfigError
                from orchestrator.guard import parse_call_spec

                try:  # checked before anything is created
                    parse_call_spec(spec)
                except BadInput as exc:
                    raise ConfigError(
                        f"config error in environment variable {var}: {exc}"
                    ) from None
            configure(self._settings.log_format, self._settings.verbose)
        return self._settings


def _state(ctx: typer.Context) -> State:
    state: State = ctx.obj
    return state


@app.callback()
def main_options(
    ctx: typer.Context,
    config: Annotated[
        Path | None, typer.Option("--config", help="TOML config (default ./changeover.toml)")
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            "--state-dir", help="journal, locks and the local cloud [~/.local/state/changeover]"
        ),
    ] = None,
    output: Annotated[
        str | None, typer.Option("--output", help="text | json", metavar="text|json")
    ] = None,
    log_format: Annotated[
        str | None, typer.Option("--log-format", help="console | json", metavar="console|json")
    ] = None,
    verbose: Annotated[int, typer.Option("-v", "--verbose", count=True, help="more logs")] = 0,
) -> None:
    """changeover: immutable-infrastructure orchestrator."""
    ctx.obj = State(
        config=config, state_dir=state_dir, output=output, log_format=log_format, verbose=verbose
    )


# --- helpers -------------------------------------------------------------------------------
def parse_duration(text: str) -> float:
    """'30d', '12h', '15m', '45s' or plain seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not m:
        raise typer.BadParameter(f"{text!r} is not a duration (like 30d, 12h, 15m, 45s)")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
    return float(m.group(1)) * unit


def make_provider(settings: Settings, name: str, config: StackConfig) -> Provider:
    """The provider adapter of a stack. Imported lazily: SDKs load only when used."""
    from orchestrator.errors import BadInput

    if config.provider == "local":
        from providers.local.cloud import LocalCloud
        from providers.local.provider import LocalProvider

        return LocalProvider(LocalCloud(settings.state_path))
    if config.provider == "aws":
        try:
            from providers.aws import make_aws_provider
        except ImportError as exc:
            raise BadInput(
                f"stack {name!r} needs the aws extra: pip install 'changeover[aws]' ({exc})"
            ) from None
        return make_aws_provider(name, config, state_dir=settings.state_path)
    if config.provider.startswith("libcloud"):
        try:
            from providers.libcloud_provider import make_libcloud_provider
        except ImportError as exc:
            raise BadInput(
                f"stack {name!r} needs the libcloud extra: "
                f"pip install 'changeover[libcloud]' ({exc})"
            ) from None
        return make_libcloud_provider(name, config, state_dir=settings.state_path)
    if config.provider == "static":
        from providers.static import StaticProvider

        return StaticProvider(name, config)
    raise BadInput(f"stack {name!r}: unknown provider {config.provider!r}")


def _engine(settings: Settings, provider: Provider, config: StackConfig) -> Engine:
    import os
    import time

    from orchestrator.engine import Engine
    from orchestrator.notify import sink_for as notify_sink

    # Progress on a terminal, plus webhooks when configured (secrets from the environment).
    sink = notify_sink(settings, config, os.environ, then=_progress_sink(settings.output))
    window_clock: Any = time.time
    if settings.test_clock:  # testing hook: a campaign across windows without waiting
        from orchestrator.windows import SteppedClock

        stepped = window_clock = SteppedClock(settings.test_clock)
        show = sink

        def stepping(kind: str, payload: dict[str, Any]) -> None:
            if kind == "step_done":
                stepped.step_ended()
            if show is not None:
                show(kind, payload)

        sink = stepping
    return Engine(
        store=_store(settings),
        provider=provider,
        config=config,
        lock_ttl=settings.lock_ttl,
        crash_after_step=settings.crash_after_step,
        crash_after_call=settings.crash_after_call,
        crash_before_call=settings.crash_before_call,
        on_event=sink,
        window_clock=window_clock,
    )


def _store(settings: Settings) -> StateStore:
    """The state store `state` names (sqlite in the state dir by default). The caller
    closes it, or hands it to an Engine, which does."""
    from orchestrator.state import open_store

    return open_store(settings)


def _progress_sink(output: str | None) -> Any:
    """Rich progress on stderr when it is a terminal and the output is not JSON: a line
    per step and a live line while one waits (orchestrator/progress.py). Otherwise none:
    stdout holds only the result, and the logs say it all."""
    from orchestrator.progress import sink_for

    return sink_for(output)


Table = tuple[str, list[str], list[list[Any]]]  # title, columns, rows


def _emit(
    settings: Settings, data: dict[str, Any], text: str, table: Table | list[Table] | None = None
) -> None:
    """JSON with --output json; rich tables on a terminal; plain text otherwise.
    Whatever the form, secrets are masked first (I9)."""
    from orchestrator.redact import redact, redact_text

    data, text = redact(data, stringify=True), redact_text(text)
    if table is not None:
        table = [
            (redact_text(title), columns, redact(rows, stringify=True))
            for title, columns, rows in (table if isinstance(table, list) else [table])
        ]
    if settings.output == "json":
        sys.stdout.write(json.dumps(data, default=str) + "\n")
    elif table is not None and sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table as RichTable

        console = Console()
        for title, columns, rows in table if isinstance(table, list) else [table]:
            t = RichTable(*columns, title=title, title_justify="left")
            for row in rows:
                t.add_row(*("" if v is None else str(v) for v in row))
            console.print(t)
    else:
        sys.stdout.write(text.rstrip("\n") + "\n")


def _print_plan(settings: Settings, plan: Plan, provider: Provider | None = None) -> None:
    lines = [f"plan: {plan.strategy} {plan.stack} ({len(plan.steps)} steps)"]
    for k, v in plan.summary.items():
        lines.append(f"  {k}: {v}")
    lines += [f"  {i + 1:>2}. {s.describe()}" for i, s in enumerate(plan.steps)]
    if unverified := plan.summary.get("needs_verification"):
        # Decided from recorded facts (I8): these servers had none to decide from.
        lines.append(
            f"  {len(unverified)} server(s) need verification: no recorded facts; "
            f"`changeover audit {plan.stack}` records them, a real run verifies them live"
        )
    if skipped := plan.summary.get("skipped"):
        # Opted out (strategies/opt_out.py): never selected, whatever the selection.
        lines.append(
            f"  {len(skipped)} server(s) skipped: "
            + ", ".join(f"{i} ({why})" for i, why in skipped.items())
        )
    if not plan.steps:
        lines.append("  nothing to do" + (" on the recorded facts" if unverified else ""))
    table = (
        f"plan: {plan.strategy} {plan.stack}",
        ["#", "step", "parameters"],
        [[i + 1, st.key, st.describe().removeprefix(st.key)] for i, st in enumerate(plan.steps)],
    )
    calls = dict(provider.api_calls) if provider is not None else {}
    _emit(settings, {"plan": plan.to_dict(), "api_calls": calls}, "\n".join(lines), table)


def _print_result(settings: Settings, result: RunResult) -> None:
    s = result.summary
    if settings.output == "json" or "run_id" not in s:
        _emit(
            settings,
            s or {"outcome": result.outcome.value, "message": result.message},
            result.message,
        )
        return
    lines = [
        f"run {s['run_id']}: {s['strategy']} {s['stack']} -> {s['outcome'].upper()}",
        f"  generation: {s['generation']['before']} -> {s['generation']['after']}",
        f"  address {s['address']['name']}: {', '.join(s['address']['before'])} -> "
        f"{', '.join(s['address']['after'])}"
        if s["address"]["name"]
        else "  address: none (no entry point)",
        f"  servers created: {len(s['servers']['created'])}, destroyed: "
        f"{len(s['servers']['destroyed'])}",
        "  provider calls: " + ", ".join(f"{k}={v}" for k, v in s["api_calls"].items()),
    ]
    if result.outcome.value not in ("succeeded", "noop"):
        lines.append(f"  {result.message}")
        lines.append(f"  next: {_NEXT[result.outcome.value].format(run=s['run_id'], **s)}")
    if "resources" in s:
        lines.append("  resources now:")
        lines.append("    " + json.dumps(s["resources"], indent=2).replace("\n", "\n    "))
    table = (
        lines[0],
        ["", ""],
        [
            [ln.split(":", 1)[0].strip(), ln.split(":", 1)[1].strip()]
            for ln in lines[1:]
            if ":" in ln
        ],
    )
    _emit(settings, s, "\n".join(lines), table)


_NEXT = {
    "rolled_back": "the old stack is serving as before; fix the cause, then run again",
    "dirty": "an operator is needed: `changeover status {run}` lists each resource's state",
    "precondition_failed": "nothing was touched; fix the precondition, then run again",
    "paused": "every server serves; run the same command again at {next_window} to continue",
}


def _note(settings: Settings, text: str) -> None:
    """One line for the operator on stderr (stdout stays the result)."""
    from orchestrator.redact import redact_text

    sys.stderr.write(redact_text(text) + "\n")


def _holder_alive(pid: int, host: str) -> bool:
    import socket

    from orchestrator.lock import pid_alive

    return host == socket.gethostname() and pid_alive(pid)


def _confirm(settings: Settings, plan: Plan, yes: bool) -> None:
    from orchestrator.errors import BadInput

    if yes:
        return
    if not sys.stdin.isatty():
        raise BadInput("refusing to change the stack without --yes when not on a terminal")
    _print_plan(settings, plan)
    if not typer.confirm("Run this plan?"):
        raise typer.Exit(2)


def _execute(
    settings: Settings,
    name: str,
    build: Any,
    yes: bool,
    dry_run: bool,
    campaign: str | None = None,
) -> int:
    from orchestrator.engine import RunResult
    from orchestrator.plan import Outcome

    config = settings.stack(name)
    provider = make_provider(settings, name, config)
    engine = _engine(settings, provider, config)
    try:
        if not dry_run and campaign and (paused := engine.paused_campaign(name, campaign)):
            # The same command again (a cron job) continues the paused campaign, with the
            # options it started with; its window gate decides whether it runs now.
            _note(
                settings,
                f"continuing the paused {campaign} campaign {paused.id} on {name} "
                "(with the options it started with)",
            )
            result = engine.resume(paused.id)
            _print_result(settings, result)
            return result.exit_code
        if not dry_run:
            # A busy stack answers "locked" (4) before its servers are even inspected.
            engine.ensure_free(name)
        plan = build(provider, name, config)
        if dry_run:
            _print_plan(settings, plan, provider)
            return 0
        if not plan.steps:
            _print_result(
                settings,
                RunResult(
                    None,
                    Outcome.NOOP,
                    f"{plan.strategy} {name}: nothing to do",
                    {
                        "outcome": "noop",
                        "strategy": plan.strategy,
                        "stack": name,
                        "message": "nothing to do",
                        "selected": plan.summary.get("selected", {}),
                        "skipped": plan.summary.get("skipped", {}),
                    },
                ),
            )
            return 0
        _confirm(settings, plan, yes)
        result = engine.start(plan)
    finally:
        engine.close()
    _print_result(settings, result)
    return result.exit_code


# --- commands ---------------------------------------------------------------------------------
@app.command()
def stacks(ctx: typer.Context) -> None:
    """Stacks, their generation, address holder and last run."""
    from orchestrator.errors import ChangeoverError
    from strategies.base import StackView

    settings = _state(ctx).settings
    journal = _store(settings)
    rows = []
    for name, config in sorted(settings.stacks.items()):
        row: dict[str, Any] = {
            "stack": name,
            "provider": config.provider,
            "address": ", ".join(ep.name for ep in config.entry_points),
        }
        try:
            provider = make_provider(settings, name, config)
            view = StackView(
                name,
                config,
                provider.list_servers(name),
                {ep.name: provider.get_members(name, ep.name) for ep in config.entry_points},
            )
            row.update(generation=view.generation, servers=len(view.servers), holder=view.members)
        except ChangeoverError as exc:
            row.update(generation=None, servers=None, holder=[], error=str(exc))
        last = journal.runs(name, limit=1)
        row["last_run"] = (
            {"id": last[0].id, "strategy": last[0].strategy, "status": last[0].status}
            if last
            else None
        )
        rows.append(row)
    journal.close()
    text = []
    for r in rows:
        last = r["last_run"]
        text.append(
            f"{r['stack']:<12} {r['provider']:<8} gen={r['generation']} servers={r['servers']} "
            f"address={r['address']} -> {','.join(r['holder']) or '-'} "
            f"last={last['id'] + ' ' + last['strategy'] + ' ' + last['status'] if last else '-'}"
            + (f"  ({r['error']})" if r.get("error") else "")
        )
    table = (
        "stacks",
        ["stack", "provider", "generation", "servers", "address", "holder", "last run"],
        [
            [
                r["stack"],
                r["provider"],
                r["generation"],
                r["servers"],
                r["address"],
                ", ".join(r["holder"]) or r.get("error", "-"),
                f"{r['last_run']['id']} {r['last_run']['strategy']} {r['last_run']['status']}"
                if r["last_run"]
                else "-",
            ]
            for r in rows
        ],
    )
    _emit(settings, {"stacks": rows}, "\n".join(text) or "no stacks configured", table)


StrategyArg = Annotated[str, typer.Argument(help="rebuild | rotate | upgrade", metavar="STRATEGY")]
RebootOpt = Annotated[
    str, typer.Option(help="auto (when reboot-required says so) | never | always")
]
# rotate's canary and stop condition (strategies/canary.py, strategies/stop.py).
CanaryOpt = Annotated[
    int | None,
    typer.Option(
        min=0,
        help="servers replaced first and watched before any other "
        "(default: 1 with --only-if-needed, else 0)",
        metavar="N",
    ),
]
CanaryWatchOpt = Annotated[
    float | None,
    typer.Option(min=0, help="seconds the canary is watched (default 60)", metavar="SECONDS"),
]
MaxUnhealthyOpt = Annotated[
    int | None,
    typer.Option(
        min=0,
        max=100,
        help="stop before creating more when over this percent of the run's new servers "
        "fail (default 34)",
        metavar="PCT",
    ),
]
WindowOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--window",
        help="maintenance window, like 'Sat,Sun 02:00-05:00 Europe/Berlin' (repeatable); "
        "a batch starts only if it fits, else the campaign pauses",
        metavar="SPEC",
    ),
]


@app.command()
def plan(
    ctx: typer.Context,
    strategy: StrategyArg,
    stack: str,
    bake: Annotated[float | None, typer.Option(min=0)] = None,
    retain: Annotated[float | None, typer.Option(min=0)] = None,
    no_migrate_data: bool = False,
    max_surge: Annotated[int | None, typer.Option(min=1)] = None,
    min_healthy: Annotated[int | None, typer.Option(min=0, max=100)] = None,
    older_than: str | None = None,
    only_if_needed: bool = False,
    batch: Annotated[int | None, typer.Option(min=1)] = None,
    security_only: bool = False,
    dist_upgrade: bool = False,
    reboot: RebootOpt = "auto",
    window: WindowOpt = None,
    canary: CanaryOpt = None,
    canary_watch: CanaryWatchOpt = None,
    max_unhealthy: MaxUnhealthyOpt = None,
) -> None:
    """The steps a run would take. Makes no mutating call."""
    settings = _state(ctx).settings
    store = _store(settings)  # the recorded facts `--only-if-needed` decides from (I8)
    builder = _builder(
        strategy,
        bake=bake,
        retain=retain,
        no_migrate_data=no_migrate_data,
        max_surge=max_surge,
        min_healthy=min_healthy,
        older_than=older_than,
        only_if_needed=only_if_needed,
        batch=batch,
        security_only=security_only,
        dist_upgrade=dist_upgrade,
        reboot=reboot,
        window=window,
        canary=canary,
        canary_watch=canary_watch,
        max_unhealthy=max_unhealthy,
        live=False,  # a plan makes only read calls (I8): it decides from recorded facts
        store=store,
    )
    try:
        raise typer.Exit(_execute(settings, stack, builder, yes=False, dry_run=True))
    finally:
        store.close()


def _builder(strategy: str, **o: Any) -> Any:
    import math

    from orchestrator.errors import BadInput

    # click's FloatRange(min=0) lets inf and nan through
    for flag in ("bake", "retain", "canary_watch"):
        if o.get(flag) is not None and not math.isfinite(o[flag]):
            name = flag.replace("_", "-")
            raise BadInput(f"--{name}: {o[flag]} is not a finite number of seconds")
    if strategy == "rebuild":
        from strategies.rebuild import plan_rebuild

        return lambda p, n, c: plan_rebuild(
            p, n, c, bake=o["bake"], retain=o["retain"], migrate_data=not o["no_migrate_data"]
        )
    if strategy == "rotate":
        from strategies.rotate import plan_rotate

        older = parse_duration(o["older_than"]) if o.get("older_than") else None
        return _campaign(
            o,
            lambda p, n, c, lanes: plan_rotate(
                p,
                n,
                c,
                lanes=lanes,
                max_surge=o["max_surge"],
                min_healthy=o["min_healthy"],
                older_than=older,
                only_if_needed=o["only_if_needed"],
                live=o.get("live", False),
                state_dir=o.get("state_dir"),
                store=o.get("store"),
                canary=o.get("canary"),
                canary_watch=o.get("canary_watch"),
                max_unhealthy=o.get("max_unhealthy"),
            ),
            lanes=True,
        )
    if strategy == "upgrade":
        from strategies.upgrade import plan_upgrade

        return _campaign(
            o,
            lambda p, n, c: plan_upgrade(
                p,
                n,
                c,
                batch=o.get("batch"),
                security_only=o.get("security_only", False),
                dist_upgrade=o.get("dist_upgrade", False),
                reboot=o.get("reboot", "auto"),
                min_healthy=o.get("min_healthy"),
            ),
        )
    raise BadInput(f"unknown strategy {strategy!r} (rebuild, rotate, upgrade)")


def _campaign(o: dict[str, Any], build: Callable[..., Plan], *, lanes: bool = False) -> Any:
    """A rotate or upgrade plan with its maintenance windows (`--window` or the stack's
    `[windows] open`): a window gate before each batch. `lanes`: `build` takes `lanes`,
    whether its replacements run side by side (a rotate's), which windows turn off."""
    from orchestrator.windows import Schedule
    from strategies.window import windowed

    if o.get("window"):
        Schedule.parse(o["window"])  # bad input before the stack is even inspected

    def plan(p: Provider, n: str, c: StackConfig) -> Plan:
        windows = list(o.get("window") or c.windows.open)
        # A campaign's window gates open one batch at a time: lockstep batches, no lanes.
        kw = {"lanes": not windows} if lanes else {}
        return windowed(build(p, n, c, **kw), windows, c.windows.batch_estimate)

    return plan


@app.command()
def rebuild(
    ctx: typer.Context,
    stack: str,
    bake: Annotated[float | None, typer.Option(min=0, help="seconds to bake")] = None,
    retain: Annotated[
        float | None, typer.Option(min=0, help="seconds to keep the old generation")
    ] = None,
    no_migrate_data: Annotated[
        bool, typer.Option(help="keep the data role; rebuild the rest")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask")] = False,
    dry_run: Annotated[bool, typer.Option(help="print the plan; change nothing")] = False,
) -> None:
    """Build the next generation, verify, migrate data, cut over, bake, retire."""
    settings = _state(ctx).settings
    builder = _builder("rebuild", bake=bake, retain=retain, no_migrate_data=no_migrate_data)
    raise typer.Exit(_execute(settings, stack, builder, yes, dry_run))


@app.command()
def rotate(
    ctx: typer.Context,
    stack: str,
    max_surge: Annotated[int | None, typer.Option(min=1, help="new servers at a time")] = None,
    min_healthy: Annotated[int | None, typer.Option(min=0, max=100, help="percent serving")] = None,
    older_than: Annotated[
        str | None, typer.Option(help="only servers older than (30d, 12h)")
    ] = None,
    only_if_needed: Annotated[
        bool, typer.Option(help="also servers failing hygiene; no-op if none")
    ] = False,
    window: WindowOpt = None,
    canary: CanaryOpt = None,
    canary_watch: CanaryWatchOpt = None,
    max_unhealthy: MaxUnhealthyOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask")] = False,
    dry_run: Annotated[bool, typer.Option(help="print the plan; change nothing")] = False,
) -> None:
    """Surge-first replacement of the serving servers, a batch at a time."""
    settings = _state(ctx).settings
    store = _store(settings)  # the recorded facts `--only-if-needed --dry-run` decides from
    builder = _builder(
        "rotate",
        max_surge=max_surge,
        min_healthy=min_healthy,
        older_than=older_than,
        only_if_needed=only_if_needed,
        # A real run may ask the servers (SSM on aws); --dry-run only reads (I8).
        live=not dry_run,
        store=store,
        window=window,
        canary=canary,
        canary_watch=canary_watch,
        max_unhealthy=max_unhealthy,
    )
    try:
        raise typer.Exit(_execute(settings, stack, builder, yes, dry_run, campaign="rotate"))
    finally:
        store.close()


@app.command()
def upgrade(
    ctx: typer.Context,
    stack: str,
    security_only: Annotated[
        bool, typer.Option(help="only upgrades from the security origins")
    ] = False,
    dist_upgrade: Annotated[
        bool, typer.Option(help="apt dist-upgrade: also upgrades that need new packages")
    ] = False,
    batch: Annotated[int | None, typer.Option(min=1, help="servers out at a time")] = None,
    reboot: RebootOpt = "auto",
    min_healthy: Annotated[int | None, typer.Option(min=0, max=100, help="percent serving")] = None,
    window: WindowOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask")] = False,
    dry_run: Annotated[bool, typer.Option(help="print the plan; change nothing")] = False,
) -> None:
    """Upgrade the serving servers in place, a batch at a time: drain, upgrade, reboot
    if required, verify, put back."""
    settings = _state(ctx).settings
    builder = _builder(
        "upgrade",
        batch=batch,
        security_only=security_only,
        dist_upgrade=dist_upgrade,
        reboot=reboot,
        min_healthy=min_healthy,
        window=window,
    )
    raise typer.Exit(_execute(settings, stack, builder, yes, dry_run, campaign="upgrade"))


def _run_engine_for(settings: Settings, run_id: str) -> tuple[Engine, str]:
    from orchestrator.errors import PreconditionFailed

    journal = _store(settings)
    try:
        rec = journal.get_run(run_id) or journal.find_run(run_id)
    finally:
        journal.close()
    if rec is None:
        raise PreconditionFailed(f"no run {run_id!r} in the journal ({journal.where})")
    config = settings.stack(rec.stack)
    return _engine(settings, make_provider(settings, rec.stack, config), config), rec.id


@app.command()
def resume(ctx: typer.Context, run_id: str) -> None:
    """Continue an interrupted run from its journal."""
    settings = _state(ctx).settings
    engine, rid = _run_engine_for(settings, run_id)
    try:
        result = engine.resume(rid)
    finally:
        engine.close()
    _print_result(settings, result)
    raise typer.Exit(result.exit_code)


@app.command()
def rollback(ctx: typer.Context, run_id: str) -> None:
    """Undo an unfinished run; point the address back."""
    settings = _state(ctx).settings
    engine, rid = _run_engine_for(settings, run_id)
    try:
        result = engine.rollback(rid)
    finally:
        engine.close()
    _print_result(settings, result)
    raise typer.Exit(result.exit_code)


@app.command()
def status(ctx: typer.Context, run_id: Annotated[str | None, typer.Argument()] = None) -> None:
    """Runs and their steps."""
    from orchestrator.errors import PreconditionFailed

    settings = _state(ctx).settings
    journal = _store(settings)
    try:
        if run_id is None:
            runs = journal.runs(limit=20)
            listing = {
                "runs": [
                    {
                        "id": r.id,
                        "strategy": r.strategy,
                        "stack": r.stack,
                        "status": r.status,
                        "created_at": r.created_at,
                        "error": r.error,
                    }
                    for r in runs
                ]
            }
            text = (
                "\n".join(f"{r.id}  {r.strategy:<8} {r.stack:<12} {r.status}" for r in runs)
                or "no runs yet"
            )
            runs_table: Table = (
                "runs",
                ["run", "strategy", "stack", "status"],
                [[r.id, r.strategy, r.stack, r.status] for r in runs],
            )
            _emit(settings, listing, text, runs_table)
            return
        rec = journal.get_run(run_id) or journal.find_run(run_id)
        if rec is None:
            raise PreconditionFailed(f"no run {run_id!r} in the journal")
        steps = journal.steps(rec.id)
        holder = journal.holder(rec.stack)
    finally:
        journal.close()
    alive = holder is not None and _holder_alive(holder.pid, holder.host)
    from orchestrator.engine import unfinished_barrier

    barrier = unfinished_barrier(rec.plan, steps) if not rec.finished else None
    advice = {
        "running": f"still running (pid {holder.pid} on {holder.host})"
        if alive and holder is not None
        else f"interrupted: `changeover resume {rec.id}` to continue, "
        f"or `changeover rollback {rec.id}` to undo",
        "rolling_back": f"rollback interrupted: `changeover resume {rec.id}` finishes it",
        "dirty": "an operator is needed: fix the failed undo below, then "
        f"`changeover rollback {rec.id}`",
        "paused": f"a paused campaign, every server serving: the next window opens "
        f"{rec.result.get('next_window')}; `changeover {rec.strategy} {rec.stack}` continues "
        f"it then (a cron job can), `changeover rollback {rec.id}` ends it where it is",
    }.get(rec.status, "")
    if barrier is not None and not alive:
        from orchestrator.plan import Step

        crossed = next(s for s in rec.plan["steps"] if s["key"] == barrier)
        advice = (
            f"past the point of no return of {barrier} ({Step.from_dict(crossed).no_return}): "
            f"`changeover resume {rec.id}` finishes it; rollback is refused"
        )
    data: dict[str, Any] = {
        "id": rec.id,
        "strategy": rec.strategy,
        "stack": rec.stack,
        "status": rec.status,
        "error": rec.error,
        "next": advice,
        "lock": holder.to_dict() if holder else None,
        "steps": [
            {
                "index": s.idx + 1,
                "key": s.key,
                "state": s.state,
                "attempts": s.attempts,
                "seconds": s.seconds,
                "noop": s.noop,
                "error": s.error,
                "undo": s.undo_state,
                "undo_error": s.undo_error,
            }
            for s in steps
        ],
        "result": rec.result,
    }
    lines = [f"run {rec.id}: {rec.strategy} {rec.stack} [{rec.status}]"]
    if rec.error or rec.status == "paused":
        lines.append(f"  reason: {rec.error or rec.result.get('message')}")
    for s in steps:
        extra = f" undo={s.undo_state}" if s.undo_state else ""
        extra += f" ({s.noop})" if s.noop else ""
        extra += f" error: {s.error}" if s.error else ""
        extra += f" undo error: {s.undo_error}" if s.undo_error else ""
        lines.append(f"  {s.idx + 1:>2}. {s.key:<24} {s.state:<8}{extra}")
    if alive and (waiting := _waiting_on(steps)):
        # What a running step waits on now: a drain, a lifecycle hook (its marks).
        data["waiting_on"] = waiting
        lines += [f"  waiting: {w}" for w in waiting]
    if "resources" in rec.result:
        lines.append("  resources: " + json.dumps(rec.result["resources"]))
    if advice:
        lines.append(f"  next: {advice}")
    table: Table = (
        f"{lines[0]}"
        + "".join(f"\nwaiting: {w}" for w in data.get("waiting_on", []))
        + (f"\nnext: {advice}" if advice else ""),
        ["#", "step", "state", "attempts", "seconds", "undo", "note"],
        [
            [
                st.idx + 1,
                st.key,
                st.state,
                st.attempts,
                st.seconds,
                st.undo_state,
                st.error or st.undo_error or st.noop or "",
            ]
            for st in steps
        ],
    )
    _emit(settings, data, "\n".join(lines), table)


def _waiting_on(steps: list[Any]) -> list[str]:
    """What the steps under way wait on, from their journaled marks (`status`)."""
    import time

    from orchestrator.hooks import describe_running
    from strategies.drain import describe_drain

    now = time.time()
    out: list[str] = []
    for st in steps:
        if st.state != "started":
            continue
        for line in (describe_running(st.outputs, now), describe_drain(st.outputs, now)):
            if line:
                out.append(f"{st.key}: {line}")
    return out


@app.command()
def unlock(
    ctx: typer.Context,
    stack: str,
    force: Annotated[bool, typer.Option("--force", help="required: break the lease")] = False,
) -> None:
    """Break a stack's lease. The old holder is fenced from then on."""
    from orchestrator.errors import BadInput

    settings = _state(ctx).settings
    settings.stack(stack)
    if not force:
        raise BadInput("unlock breaks another run's lease; pass --force if you mean it")
    store = _store(settings)
    try:
        holder = store.break_lock(stack)
    finally:
        store.close()
    _emit(
        settings,
        {"stack": stack, "broken": holder},
        f"unlocked {stack}" + (f" (was held by {holder})" if holder else " (was not locked)"),
    )


@app.command()
def audit(ctx: typer.Context, stack: str) -> None:
    """Pending and security updates, reboot-required, versions, drift, a recommendation."""
    from orchestrator.audit import audit_stack

    settings = _state(ctx).settings
    config = settings.stack(stack)
    provider = make_provider(settings, stack, config)
    store = _store(settings)
    try:
        report = audit_stack(provider, stack, config, store=store)
    finally:
        store.close()
    _emit(settings, report.to_dict(), report.text(), report.tables())
    raise typer.Exit(report.exit_code)


def _security(ctx: typer.Context, stack: str, *, enable: bool, reboot_at: str | None) -> None:
    from orchestrator.audit import select_transport
    from orchestrator.errors import BadInput
    from orchestrator.security import check_reboot_at, run_security

    settings = _state(ctx).settings
    config = settings.stack(stack)
    check_reboot_at(reboot_at)
    provider = make_provider(settings, stack, config)
    if enable:
        engine = _engine(settings, provider, config)
        try:
            engine.ensure_free(stack)  # a run in progress owns the servers: exit 4
        finally:
            engine.close()
    transport = select_transport(provider, config.hygiene)
    if transport.name == "local":
        raise BadInput(
            f"stack {stack!r}: the local cloud's packages are simulated; `security` needs "
            "real hosts (ssh or ssm)"
        )
    report = run_security(
        transport, stack, provider.list_servers(stack), enable=enable, reboot_at=reboot_at
    )
    _emit(
        settings,
        report.to_dict(),
        report.text(),
        (report.message(), list(report.HEADERS), report.rows()),
    )
    raise typer.Exit(report.exit_code)


@security_app.command("enable")
def security_enable(
    ctx: typer.Context,
    stack: str,
    reboot_at: Annotated[
        str | None,
        typer.Option("--reboot-at", help="reboot automatically at HH:MM when required"),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask")] = False,
) -> None:
    """Install and configure unattended upgrades for the security origins only, then
    read the effective configuration back (apt-config dump, unattended-upgrade
    --dry-run; dnf-automatic's config)."""
    from orchestrator.errors import BadInput
    from orchestrator.security import check_reboot_at

    check_reboot_at(reboot_at)
    if not yes:
        if not sys.stdin.isatty():
            raise BadInput("security enable changes the servers' configuration: pass --yes")
        reboot = f"reboot at {reboot_at} when required" if reboot_at else "no automatic reboot"
        if not typer.confirm(f"Enable unattended security upgrades on {stack} ({reboot})?"):
            raise typer.Exit(2)
    _security(ctx, stack, enable=True, reboot_at=reboot_at)


@security_app.command("status")
def security_status(ctx: typer.Context, stack: str) -> None:
    """Per server: unattended upgrades installed, enabled, from which origins, and
    whether they reboot automatically. Read-only."""
    _security(ctx, stack, enable=False, reboot_at=None)


@app.command()
def rehearse(
    ctx: typer.Context,
    scenario_file: Path,
    html: Annotated[
        Path | None,
        typer.Option("--html", help="write the run's report, with the load, as HTML here"),
    ] = None,
) -> None:
    """Run a rehearsal scenario: a strategy under load with faults, then checks."""
    from orchestrator.rehearse import load_scenario, run_scenario

    settings = _state(ctx).settings
    scenario = load_scenario(scenario_file)
    report = run_scenario(scenario, state_dir=settings.state_path, html=html)
    text = [f"scenario {scenario.name}: {'PASS' if report['passed'] else 'FAIL'}"]
    if load := report.get("load"):
        text.append(
            f"  load: {load['sent']} requests, {load['failed']} failed, "
            f"{load['acked_writes']} writes acknowledged, {load['writes_lost']} lost, "
            f"{load['rate']:.0f} req/s"
        )
    text += [
        f"  {c['check']}: {'ok' if c['ok'] else 'FAILED'} ({c['detail']})" for c in report["checks"]
    ]
    if report.get("html"):
        text.append(f"  html report: {report['html']} (run {report['run_id']})")
    _emit(settings, report, "\n".join(text))
    raise typer.Exit(0 if report["passed"] else 1)


@app.command()
def report(
    ctx: typer.Context,
    run_id: str,
    html: Annotated[
        Path | None, typer.Option("--html", help="write a self-contained HTML report here")
    ] = None,
) -> None:
    """What a run did, from the journal: timeline, health gate, calls, outcome."""
    from orchestrator.report import build_report, report_text

    settings = _state(ctx).settings
    store = _store(settings)
    try:
        data = build_report(store, run_id)
    finally:
        store.close()
    text = report_text(data)
    if html is not None:
        _write_html(html, data)
        text += f"\n  html report: {html}"
    _emit(settings, data, text)


def _write_html(path: Path, data: dict[str, Any]) -> None:
    """Write the HTML report; a path that cannot be written is bad input (exit 2)."""
    from orchestrator.errors import BadInput
    from orchestrator.redact import redact
    from orchestrator.report_html import render_html

    try:
        path.write_text(render_html(redact(data)), encoding="utf-8")
    except OSError as exc:
        raise BadInput(f"--html {path}: cannot write the report: {exc.strerror}") from None


@state_app.command("init")
def state_init(ctx: typer.Context) -> None:
    """Create the shared state store: the DynamoDB table `state` names (on-demand
    billing, TTL for finished runs). Idempotent. For sqlite, says where the file is."""
    from orchestrator.state import init_state, parse_state

    settings = _state(ctx).settings
    out = init_state(parse_state(settings.state), settings.state_path)
    _emit(settings, out, out["message"])


@local_app.command("up")
def local_up(ctx: typer.Context) -> None:
    """Start the local cloud and create each local stack's generation 1 if missing."""
    from providers.local.bootstrap import ensure_stack
    from providers.local.cloud import LocalCloud

    settings = _state(ctx).settings
    cloud = LocalCloud(settings.state_path)
    out = {}
    for name, config in sorted(settings.stacks.items()):
        if config.provider == "local":
            created = ensure_stack(cloud, name, config)
            info = cloud.address(name, config.primary_address)
            out[name] = {"created": created, "address": f"127.0.0.1:{info.port}" if info else None}
    _emit(
        settings,
        {"stacks": out},
        "\n".join(
            f"{n}: {'created generation 1' if v['created'] else 'already up'}; "
            f"address {v['address']}"
            for n, v in out.items()
        )
        or "no local stacks configured",
    )


@local_app.command("down")
def local_down(ctx: typer.Context) -> None:
    """Stop every server and proxy of the local cloud."""
    from providers.local.cloud import LocalCloud

    settings = _state(ctx).settings
    stopped = LocalCloud(settings.state_path).down()
    _emit(settings, {"stopped": stopped}, f"stopped {stopped} processes")


@local_app.command("status")
def local_status(ctx: typer.Context) -> None:
    """Processes of the local cloud."""
    from providers.local.cloud import LocalCloud

    settings = _state(ctx).settings
    procs = LocalCloud(settings.state_path).processes()
    _emit(
        settings,
        {"processes": procs},
        "\n".join(f"{p['kind']:<8} {p['stack']:<10} {p['id']:<14} pid={p['pid']}" for p in procs)
        or "local cloud is down",
    )


def _resolve_annotations(typer_app: typer.Typer) -> None:
    """Evaluate the annotations of every command (and callback) once. typer builds the
    whole command tree on each run and reads each command's annotations four times
    (inspect.signature(eval_str=True) and get_type_hints, twice each); being strings here
    (`from __future__ import annotations`), each read compiled them afresh: about 40 M
    instructions of every run, `status` and `--help` too (tests/test_startup.py)."""
    import typing

    for info in [typer_app.registered_callback, *typer_app.registered_commands]:
        func = info.callback if info is not None else None
        if func is not None:
            func.__annotations__ = typing.get_type_hints(func, include_extras=True)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _resolve_annotations(group.typer_instance)


def main() -> None:
    """Entry point: map errors to one line on stderr and the contract's exit codes."""
    import os

    from orchestrator.errors import ChangeoverError

    # Everything changeover and its local cloud write (state dir, journal, logs, the
    # control token) is for this user alone.
    os.umask(0o077)
    _resolve_annotations(app)
    try:
        app()  # standalone: typer prints usage errors itself and exits 2
    except ChangeoverError as exc:
        from orchestrator.redact import redact_text

        sys.stderr.write(f"error: {redact_text(str(exc))}\n")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; `changeover status` shows where the run stopped\n")
        sys.exit(3)
