"""Configuration: one pydantic root, read once by the CLI and passed down typed.

Sources, highest first: CLI flags, ``CHANGEOVER_*`` environment variables (nested keys
with ``__``, e.g. ``CHANGEOVER_STACKS__DEMO__DEFAULTS__BAKE=5``), the TOML file. With no
file at all, a built-in ``demo`` stack on the local cloud is configured so the
quickstart works from a fresh clone.

Every command reads the settings, `status` and `stacks` too, which a cron job or a shell
prompt calls often (tests/test_startup.py pins what they load). So pydantic-settings,
which reads the variables, is imported only when a ``CHANGEOVER_*`` variable sets a
setting: it loads asyncio, argparse and all its sources, over 100 M instructions.
Without one, the flags and the file are merged as its sources would merge them
(tests/test_startup.py compares the two). The checks of a notification and of a
maintenance window import their modules when there is one to check.
"""

from __future__ import annotations

import os
import re
import shlex
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from orchestrator.errors import BadInput, ConfigError
from orchestrator.state.url import DEFAULT_STATE, parse_state

DEFAULT_CONFIG_FILE = "changeover.toml"
# XDG's place for state that outlives a process but is not config.
DEFAULT_STATE_DIR = Path("~/.local/state/changeover")

DEFAULT_BAKE_SECONDS = 10.0  # seconds to keep checking through the address after cutover
DEFAULT_RETAIN_SECONDS = 30.0  # seconds the old generation stays up for a cheap rollback
DEFAULT_MAX_SURGE = 1  # new servers at a time during rotate
DEFAULT_MIN_HEALTHY_PCT = 100  # percent of the serving count that must keep serving
DEFAULT_BOOT_TIMEOUT = 120.0  # seconds a new server may take to boot (and to verify)
DEFAULT_DRAIN_TIMEOUT = 330.0  # seconds to drain; an ELB's default deregistration delay is 300
# When a drain outlives drain_timeout: "fail" (the safe default) fails the step, so the run
# rolls back with what it still waited on; "proceed" goes on and records what was cut.
DEFAULT_ON_DRAIN_TIMEOUT: Literal["fail", "proceed"] = "fail"
DEFAULT_HOOK_TIMEOUT = 60.0  # seconds a lifecycle hook may take, a webhook's holds included
DEFAULT_HOOK_INTERVAL = 5.0  # seconds between asks while a webhook holds (or Retry-After)
DEFAULT_CANARY_WATCH = 60.0  # seconds a rotate's canary serves, watched, before the rest
DEFAULT_MAX_UNHEALTHY_PCT = 34  # percent of a run's new servers failing before it stops
DEFAULT_GATE_TIMEOUT = 5.0  # seconds one request of an alarm gate may take


ENV_PREFIX = "CHANGEOVER_"
ENV_DELIMITER = "__"

# A stack or role name ends up in server names, tags, file names and log lines.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
NAME_RULE = "1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"


# Scalars are typed in TOML, so `count = true` or `data = "yes"` is a mistake, not a value
# to coerce. Environment variables are always text, so the text spellings of a number or
# a boolean are accepted (and only those): CHANGEOVER_STACKS__DEMO__ROLES__WEB__COUNT=3.
def _int_from_text(value: Any) -> Any:
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d{1,18}\s*", value):
        return int(value)
    return value


def _float_from_text(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _bool_from_text(value: Any) -> Any:
    if isinstance(value, str):
        return {"true": True, "1": True, "false": False, "0": False}.get(
            value.strip().lower(), value
        )
    return value


# Strict: no bool for a number, no float for an int, no "yes" for a bool. Floats are
# finite (allow_inf_nan=False in every model's config): `bake = inf` is refused.
Int = Annotated[int, Strict(), BeforeValidator(_int_from_text)]
Float = Annotated[float, Strict(), BeforeValidator(_float_from_text)]
Bool = Annotated[bool, Strict(), BeforeValidator(_bool_from_text)]


def _empty_list() -> list[Any]:
    """`default_factory=list`, but cheaper to set up: for the built-in `list`, pydantic
    asks inspect for its signature, which parses its text (tokenize) every time."""
    return []


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class HealthCheck(_Strict):
    """The app health check of a role."""

    type: Literal["http", "tcp", "ec2-status", "target-group"] = "http"
    path: str = "/health"
    port: Int = Field(default=80, ge=1, le=65535, description="cloud servers; local ignores it")
    timeout: Float = Field(default=2.0, gt=0)


class SshOptions(_Strict):
    """How to reach servers over SSH. Keys are files named here, never inline (I9)."""

    user: str = "root"
    port: Int = Field(default=22, ge=1, le=65535)
    known_hosts: str | None = Field(
        default=None, description="known_hosts file; unknown or changed host keys are refused"
    )
    key_file: str | None = None
    address: Literal["private", "public"] = "private"
    timeout: Float = Field(default=15.0, gt=0)
    attempts: Int = Field(default=3, ge=1, le=10, description="connection attempts per command")


class HygienePolicy(_Strict):
    """Host hygiene a fresh server must pass before it may serve."""

    pending: Literal["none", "security", "ignore"] = Field(
        default="none",
        description="'none': no pending upgrades at all; 'security': no pending security "
        "upgrades; 'ignore': do not check",
    )
    reboot_required_fails: Bool = True
    min_versions: dict[str, str] = Field(
        default_factory=dict, description="component -> lowest acceptable version"
    )
    components: list[str] = Field(
        default_factory=_empty_list, description="extra components whose versions are recorded"
    )
    transport: Literal["auto", "local", "ssh", "ssm"] = "auto"
    ssh: SshOptions = SshOptions()
    max_age_days: Float | None = Field(
        default=None, gt=0, description="audit recommends replacing servers launched longer ago"
    )
    gemfile_locks: list[str] = Field(
        default_factory=lambda: [
            "/var/deploy/*/web_head/current/Gemfile.lock",
            "/srv/*/current/Gemfile.lock",
            "/var/www/*/current/Gemfile.lock",
        ],
        description="where the rails version is read from (absolute paths, globs allowed)",
    )
    facts_timeout: Float = Field(default=120.0, gt=0, description="seconds for the fact script")

    @model_validator(mode="after")
    def _check_names(self) -> HygienePolicy:
        # Component names and lock-file paths end up in a shell command on the server.
        for name in [*self.components, *self.min_versions]:
            if not name[:1].isalnum() or not all(c.isalnum() or c in "+._-" for c in name):
                raise ValueError(f"component {name!r}: use a package name (letters, digits, +._-)")
        for path in self.gemfile_locks:
            if not path.startswith("/") or not all(c.isalnum() or c in "/_.*+-" for c in path):
                raise ValueError(f"gemfile_locks: {path!r} is not a plain absolute path")
        return self


class LaunchOptions(_Strict):
    """How a cloud server of a role is launched (aws; libcloud maps what it can)."""

    launch_template: str | None = Field(default=None, description="id (lt-...) or name")
    launch_template_version: str = "$Latest"
    ami: str | None = None
    ami_ssm_parameter: str | None = Field(
        default=None, description="e.g. /aws/service/debian/release/12/latest/amd64"
    )
    instance_type: str | None = None
    subnets: list[str] = Field(default_factory=_empty_list)
    security_groups: list[str] = Field(default_factory=_empty_list)
    key_name: str | None = None
    instance_profile: str | None = None
    user_data: str | None = Field(default=None, description="merged with changeover's cloud-init")


class DataOptions(_Strict):
    """How the data role's store is moved on a cloud (a volume and its snapshots)."""

    device: str = "/dev/xvdf"
    freeze_command: str | None = Field(default=None, description="run over SSM/SSH to freeze")
    unfreeze_command: str | None = None


class RoleConfig(_Strict):
    """A role of a stack: how many servers, from which image, checked how."""

    count: Int = Field(default=1, ge=1, le=10_000)
    image: str = Field(default="debian-12-base", min_length=1)
    size: str = Field(default="small", min_length=1)
    health: HealthCheck = HealthCheck()
    data: Bool = Field(default=False, description="this role holds the stack's data")
    launch: LaunchOptions = LaunchOptions()
    data_options: DataOptions = DataOptions()

    @model_validator(mode="after")
    def _one_data_server(self) -> RoleConfig:
        # One server holds the data; more would be orphans that never get any.
        if self.data and self.count != 1:
            raise ValueError(f"count = {self.count}, but a data role has exactly one server")
        return self


class StrategyDefaults(_Strict):
    """Per-stack defaults for strategy flags."""

    bake: Float = Field(default=DEFAULT_BAKE_SECONDS, ge=0)
    retain: Float = Field(default=DEFAULT_RETAIN_SECONDS, ge=0)
    max_surge: Int = Field(default=DEFAULT_MAX_SURGE, ge=1)
    min_healthy: Int = Field(default=DEFAULT_MIN_HEALTHY_PCT, ge=0, le=100)
    boot_timeout: Float = Field(default=DEFAULT_BOOT_TIMEOUT, gt=0)
    drain_timeout: Float = Field(default=DEFAULT_DRAIN_TIMEOUT, gt=0)
    on_drain_timeout: Literal["fail", "proceed"] = Field(
        default=DEFAULT_ON_DRAIN_TIMEOUT,
        description="at drain_timeout: 'fail' the step (the run rolls back), or 'proceed' "
        "and record the requests still in flight",
    )
    canary: Int | None = Field(
        default=None,
        ge=0,
        description="rotate: servers replaced first and watched; unset: 1 with "
        "--only-if-needed, else 0 (no canary)",
    )
    canary_watch: Float = Field(
        default=DEFAULT_CANARY_WATCH, ge=0, description="rotate: seconds the canary is watched"
    )
    max_unhealthy: Int = Field(
        default=DEFAULT_MAX_UNHEALTHY_PCT,
        ge=0,
        le=100,
        description="rotate: percent of the run's new servers that may fail before it stops",
    )


class Hook(_Strict):
    """One lifecycle hook (orchestrator/hooks.py), run once per server:

    - `command`: run on the machine running changeover, with CHANGEOVER_SERVER_ID,
      _ROLE, _ADDRESS (and _PORT, CHANGEOVER_STACK, CHANGEOVER_RUN_ID, CHANGEOVER_HOOK)
      in its environment. No shell: the string is split as a shell would (shlex); write
      `sh -c '...'` to get one. Exit 0 passes; killed at `timeout`.
    - `webhook`: a JSON POST (run, stack, hook, server). A 2xx passes; 409, 423 or a 2xx
      answering {"hold": true} holds: asked again after Retry-After or `interval`
      seconds, until `timeout`."""

    command: str | list[str] | None = Field(
        default=None, description="the command line, or its argv as a list"
    )
    webhook: str | None = Field(default=None, description="an http(s) URL")
    timeout: Float = Field(
        default=DEFAULT_HOOK_TIMEOUT, gt=0, description="seconds in all, holds included"
    )
    interval: Float | None = Field(
        default=None, gt=0, description="webhook: seconds between asks while held (default 5)"
    )

    @field_validator("command")
    @classmethod
    def _check_command(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value is None:
            return value
        try:
            argv = shlex.split(value) if isinstance(value, str) else value
        except ValueError as exc:  # an unbalanced quote
            raise ValueError(f"{value!r}: {exc}") from None
        if not argv or not argv[0].strip():
            raise ValueError("empty: name the command to run")
        return value

    @field_validator("webhook")
    @classmethod
    def _check_url(cls, url: str | None) -> str | None:
        parts = urllib.parse.urlsplit(url or "")
        if url is not None and (parts.scheme not in ("http", "https") or not parts.hostname):
            raise ValueError(f"{url!r}: expected an http:// or https:// URL")
        return url

    @model_validator(mode="after")
    def _one_kind(self) -> Hook:
        if (self.command is None) == (self.webhook is None):
            raise ValueError("a hook is a `command` or a `webhook`, one of them")
        if self.command is not None and self.interval is not None:
            raise ValueError("`interval` is for a webhook's holds; a command holds by running")
        return self

    @property
    def argv(self) -> list[str]:
        """A command hook's argv."""
        if isinstance(self.command, str):
            return shlex.split(self.command)
        return list(self.command or [])

    @property
    def hold_interval(self) -> float:
        return DEFAULT_HOOK_INTERVAL if self.interval is None else self.interval


class LifecycleHooks(_Strict):
    """Commands or webhooks run per server at points of a run (orchestrator/hooks.py):
    a failure (non-zero, a refusal, the timeout) fails the step, so the run rolls back.
    A bare string or list is a command with the default timeout."""

    pre_drain: Hook | None = Field(
        default=None,
        description="each server leaving service, out of every entry point, before its "
        "requests in flight are waited for (rotate, rebuild's retirement, upgrade)",
    )
    pre_terminate: Hook | None = Field(
        default=None,
        description="each old server, before the first of them is destroyed (before the "
        "point of no return: a failure still rolls back)",
    )
    post_cutover: Hook | None = Field(
        default=None,
        description="each new server, once it serves (rebuild's cutover, rotate's AddMembers)",
    )

    @model_validator(mode="before")
    @classmethod
    def _commands(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: {"command": v} if isinstance(v, str | list) else v for k, v in data.items()}
        return data


class MaintenanceWindows(_Strict):
    """When campaigns (`upgrade`, `rotate`) may run: `--window` overrides `open`."""

    open: list[str] = Field(
        default_factory=_empty_list,
        description="windows like 'Sat,Sun 02:00-05:00 Europe/Berlin'; empty: any time",
    )
    batch_estimate: Float = Field(
        default=600.0,
        gt=0,
        description="seconds a batch is expected to take, until the campaign timed one",
    )

    @field_validator("open")
    @classmethod
    def _check_windows(cls, specs: list[str]) -> list[str]:
        from orchestrator.windows import Window  # noqa: PLC0415 - see the module docstring

        for spec in specs:
            try:
                Window.parse(spec)
            except BadInput as exc:
                raise ValueError(str(exc)) from None
        return specs


class _GateBase(_Strict):
    name: str | None = Field(
        default=None, min_length=1, max_length=80, description="what reasons call the gate"
    )
    timeout: Float = Field(
        default=DEFAULT_GATE_TIMEOUT, gt=0, le=60, description="seconds per request"
    )


def _check_gate_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r}: expected an http:// or https:// URL")
    return url


def _url_title(url: str) -> str:
    """host:port/path of a URL: never its credentials or query (a token may hide there)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    return host + (f":{parts.port}" if parts.port else "") + (parts.path or "/")


# `$.a.b.0.c` or `a.b.0.c`: keys and list indexes, dot-separated (orchestrator/gates.py).
JSON_PATH_PATTERN = re.compile(r"\$?(\.?[A-Za-z0-9_-]+)(\.[A-Za-z0-9_-]+)*|\$")


class HttpGate(_GateBase):
    """An HTTP check: GET `http`, want `status`; with `json_path`, the JSON value there
    must equal `equals` (without `equals`: be present and truthy)."""

    http: str = Field(description="the URL to GET")
    status: Int = Field(default=200, ge=100, le=599)
    json_path: str | None = Field(default=None, description="a dotted path such as $.status")
    equals: str | int | float | bool | None = None

    @field_validator("http")
    @classmethod
    def _url(cls, url: str) -> str:
        return _check_gate_url(url)

    @field_validator("json_path")
    @classmethod
    def _path(cls, path: str | None) -> str | None:
        if path is not None and not JSON_PATH_PATTERN.fullmatch(path):
            raise ValueError(f"{path!r}: use a dotted path of keys and indexes, like $.checks.0.ok")
        return path

    @model_validator(mode="after")
    def _equals_needs_path(self) -> HttpGate:
        if self.equals is not None and self.json_path is None:
            raise ValueError("`equals` compares the value at `json_path`: set json_path too")
        return self

    @property
    def title(self) -> str:
        return self.name or f"http {_url_title(self.http)}"


class PrometheusGate(_GateBase):
    """A Prometheus query (`/api/v1/query`): every sample must stay within `min`..`max`."""

    prometheus: str = Field(description="the server's base URL, e.g. http://prometheus:9090")
    query: str = Field(min_length=1, description="PromQL, e.g. an error ratio")
    max: Float | None = Field(default=None, description="fail when a sample is above it")
    min: Float | None = Field(default=None, description="fail when a sample is below it")
    on_empty: Literal["fail", "pass"] = Field(
        default="fail", description="a result without samples: 'fail' (no data) or 'pass'"
    )

    @field_validator("prometheus")
    @classmethod
    def _url(cls, url: str) -> str:
        return _check_gate_url(url)

    @model_validator(mode="after")
    def _a_threshold(self) -> PrometheusGate:
        if self.max is None and self.min is None:
            raise ValueError("a prometheus gate needs a threshold: `max`, `min` or both")
        return self

    @property
    def title(self) -> str:
        query = self.query if len(self.query) <= 60 else self.query[:57] + "..."
        return self.name or f"prometheus {query}"


class CloudWatchGate(_GateBase):
    """A CloudWatch alarm (DescribeAlarms): ALARM fails; OK and INSUFFICIENT_DATA pass."""

    cloudwatch_alarm: str = Field(min_length=1, max_length=255, description="the alarm's name")
    region: str | None = Field(default=None, description="default: the stack's region")
    endpoint_url: str | None = Field(default=None, description="default: the stack's")

    @property
    def title(self) -> str:
        return self.name or f"cloudwatch alarm {self.cloudwatch_alarm}"


_GATE_KINDS = {"http": HttpGate, "prometheus": PrometheusGate, "cloudwatch_alarm": CloudWatchGate}


def _gate_kind(value: Any) -> str | None:
    """Which kind a gate is: the one of `http`, `prometheus`, `cloudwatch_alarm` it sets."""
    if isinstance(value, dict):
        kinds = [k for k in _GATE_KINDS if k in value]
        return kinds[0] if len(kinds) == 1 else None
    return next((k for k, model in _GATE_KINDS.items() if isinstance(value, model)), None)


# One alarm gate (orchestrator/gates.py evaluates them during a bake or a canary watch).
Gate = Annotated[
    Annotated[HttpGate, Tag("http")]
    | Annotated[PrometheusGate, Tag("prometheus")]
    | Annotated[CloudWatchGate, Tag("cloudwatch_alarm")],
    Discriminator(
        _gate_kind,
        custom_error_type="gate_kind",
        custom_error_message="a gate sets exactly one of http, prometheus, cloudwatch_alarm",
    ),
]


def _all_events() -> list[str]:
    from orchestrator.notify import EVENTS  # noqa: PLC0415 - see the module docstring

    return list(EVENTS)


class Notification(_Strict):
    """A webhook told about runs (orchestrator/notify.py): a JSON POST per event it
    lists. Secrets stay out of this file: `webhook_env` and `headers_env` name the
    environment variables that hold them."""

    webhook: str | None = Field(default=None, description="the http(s) URL to POST to")
    webhook_env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$",
        description="the environment variable holding the URL (when the URL is a secret)",
    )
    events: list[str] = Field(default_factory=_all_events, description="default: every event")
    headers_env: dict[str, str] = Field(
        default_factory=dict,
        description="header name -> the environment variable holding its value (a token)",
    )

    @field_validator("webhook")
    @classmethod
    def _check_webhook(cls, url: str | None) -> str | None:
        from orchestrator.notify import check_webhook  # noqa: PLC0415 - see above

        return None if url is None else check_webhook(url)

    @field_validator("events")
    @classmethod
    def _check_events(cls, names: list[str]) -> list[str]:
        from orchestrator.notify import check_events  # noqa: PLC0415 - see above

        return check_events(names)

    @field_validator("headers_env")
    @classmethod
    def _check_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        from orchestrator.notify import check_header_env  # noqa: PLC0415 - see above

        return check_header_env(headers)

    @model_validator(mode="after")
    def _one_url(self) -> Notification:
        if (self.webhook is None) == (self.webhook_env is None):
            raise ValueError("set `webhook` (a URL) or `webhook_env` (a variable's name), one")
        return self


class LibcloudOptions(_Strict):
    """A libcloud driver and its non-secret arguments. Secrets come from the environment
    or the credentials file named here, never from this file or the logs."""

    driver: str = Field(description="ec2 | digital_ocean | openstack | gce | equinix_metal | ...")
    driver_args: dict[str, str | int | bool] = Field(default_factory=dict)
    credentials_file: str | None = None
    location: str | None = None
    load_balancer: str | None = None
    load_balancer_driver: str | None = Field(
        default=None, description="libcloud loadbalancer driver (elb, alb, gce, ...)"
    )
    load_balancer_args: dict[str, str | int | bool] = Field(default_factory=dict)
    ip: Literal["public", "private"] = Field(
        default="public", description="which node address health checks and hygiene use"
    )

    @model_validator(mode="after")
    def _no_secrets_in_args(self) -> LibcloudOptions:
        # I9: a secret in the config file ends up in backups, diffs and CI logs.
        secretish = ("secret", "password", "token", "credential", "passphrase", "api_key")
        secretish_too = ("apikey", "access_key", "private_key")
        for field in ("driver_args", "load_balancer_args"):
            for name in getattr(self, field):
                lower = name.lower()
                if lower == "key" or any(s in lower for s in secretish + secretish_too):
                    raise ValueError(
                        f"{field}.{name} looks secret: put it in the environment or the "
                        "credentials_file, never in the config"
                    )
        return self


AddressType = Literal["auto", "proxy", "elastic-ip", "target-group", "floating-ip", "load-balancer"]
# The keys that name an entry point by its type: `{ target_group = "...", roles = [...] }`.
_ENTRY_KEYS: dict[str, AddressType] = {
    "address": "auto",
    "elastic_ip": "elastic-ip",
    "target_group": "target-group",
    "floating_ip": "floating-ip",
    "load_balancer": "load-balancer",
    "proxy": "proxy",
}


class EntryPoint(_Strict):
    """One way traffic reaches the stack: an elastic IP, a target group, a floating IP, a
    load balancer or (local cloud) a proxy, serving the roles it names."""

    address: str | None = Field(default=None, min_length=1)
    elastic_ip: str | None = Field(default=None, min_length=1)
    target_group: str | None = Field(default=None, min_length=1)
    floating_ip: str | None = Field(default=None, min_length=1)
    load_balancer: str | None = Field(default=None, min_length=1)
    proxy: str | None = Field(default=None, min_length=1)
    type: AddressType = Field(default="auto", description="with `address`: what it names")
    roles: list[str] = Field(
        default_factory=_empty_list,
        description="the roles served through it; empty: every serving role",
    )

    @model_validator(mode="after")
    def _one_name(self) -> EntryPoint:
        given = [k for k in _ENTRY_KEYS if getattr(self, k) is not None]
        if len(given) != 1:
            keys = ", ".join(_ENTRY_KEYS)
            raise ValueError(f"an entry point names exactly one of {keys} (got {len(given)})")
        if given[0] != "address":
            if self.type not in ("auto", _ENTRY_KEYS[given[0]]):
                raise ValueError(f"{given[0]} with type = {self.type!r}: drop `type`")
            self.type = _ENTRY_KEYS[given[0]]
        return self

    @property
    def name(self) -> str:
        return str(next(v for k in _ENTRY_KEYS if (v := getattr(self, k)) is not None))


class StaticHost(_Strict):
    """A server of a `static` stack: one you already have, reached over SSH."""

    id: str = Field(description="the server's name in changeover's output and journal")
    address: str = Field(min_length=1, description="host name or IP address to SSH to")
    port: Int = Field(default=22, ge=1, le=65535)
    user: str | None = Field(default=None, min_length=1, description="default: hygiene.ssh.user")
    role: str = Field(default="web", min_length=1)
    reboot_command: str | None = Field(
        default=None,
        min_length=1,
        description="the shell command that reboots this host, run over SSH as its user "
        "(default: `systemctl reboot || shutdown -r now`)",
    )
    do_not_disrupt: Bool = Field(
        default=False,
        description="opted out: `upgrade` never selects this host (the static spelling of "
        "the changeover:do-not-disrupt tag)",
    )

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not NAME_PATTERN.fullmatch(value):
            raise ValueError(f"host id {value!r}: use {NAME_RULE}")
        return value

    @field_validator("reboot_command")
    @classmethod
    def _check_reboot_command(cls, value: str | None) -> str | None:
        # It runs detached (`nohup sh -c '...' &`): one line, so nothing else rides along.
        if value is not None and (not value.strip() or "\n" in value or "\r" in value):
            raise ValueError("reboot_command: one non-empty line, e.g. 'shutdown -r now'")
        return value

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        # The address ends up in known_hosts look-ups and log lines, never in a shell.
        if not re.fullmatch(r"[A-Za-z0-9_.:%-]{1,253}", value):
            raise ValueError(f"address {value!r}: use a host name or an IP address")
        return value


class StaticOptions(_Strict):
    """The servers of a `static` stack, listed by address: no cloud API manages them, so
    changeover neither creates nor destroys any (rebuild and rotate refuse)."""

    hosts: list[StaticHost] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> StaticOptions:
        ids: set[str] = set()
        places: set[tuple[str, int]] = set()
        for host in self.hosts:
            if host.id in ids:
                raise ValueError(f"host id {host.id!r} is listed twice")
            if (host.address, host.port) in places:
                raise ValueError(f"{host.address} port {host.port} is listed twice")
            ids.add(host.id)
            places.add((host.address, host.port))
        return self


# `[security] reboot_at` and `changeover security enable --reboot-at`: a 24-hour HH:MM.
REBOOT_AT_PATTERN = re.compile(r"([01]\d|2[0-3]):([0-5]\d)")


class SecurityPolicy(_Strict):
    """What a fresh server sets up at first boot besides upgrading everything."""

    unattended: Bool = Field(
        default=True,
        description="unattended upgrades from the security origins only, set up as "
        "`changeover security enable` does (servers changeover creates on aws and libcloud)",
    )
    reboot_at: str | None = Field(
        default=None,
        description="HH:MM (24-hour): reboot then when an unattended upgrade needs it; "
        "unset: never reboot automatically",
    )

    @field_validator("reboot_at")
    @classmethod
    def _check_reboot_at(cls, value: str | None) -> str | None:
        if value is not None and not REBOOT_AT_PATTERN.fullmatch(value):
            raise ValueError(f"{value!r}: expected HH:MM (24-hour), such as 03:30")
        return value


class StackConfig(_Strict):
    """One stack: where it lives, its entry points, its roles, its defaults."""

    provider: str = "local"
    region: str | None = None
    endpoint_url: str | None = None
    profile: str | None = None
    address: str | None = Field(
        default=None, min_length=1, description="the one entry point (or use `addresses`)"
    )
    address_type: AddressType = "auto"
    addresses: list[EntryPoint] = Field(
        default_factory=_empty_list, description="several entry points, each serving named roles"
    )
    libcloud: LibcloudOptions | None = None
    static: StaticOptions | None = Field(
        default=None, description="provider = 'static': the servers, listed by address"
    )
    roles: dict[str, RoleConfig]
    defaults: StrategyDefaults = StrategyDefaults()
    hygiene: HygienePolicy = HygienePolicy()
    security: SecurityPolicy = Field(
        default=SecurityPolicy(), description="the security policy fresh servers follow"
    )
    windows: MaintenanceWindows = MaintenanceWindows()
    gates: list[Gate] = Field(
        default_factory=_empty_list,
        description="alarm gates checked during a bake and a canary watch: http, "
        "prometheus or cloudwatch_alarm",
    )
    hooks: LifecycleHooks = Field(
        default=LifecycleHooks(), description="pre_drain, pre_terminate, post_cutover"
    )
    notify: list[Notification] = Field(
        default_factory=_empty_list, description="webhooks told when runs start, cut over and end"
    )

    @model_validator(mode="before")
    @classmethod
    def _static_roles(cls, data: Any) -> Any:
        # A static stack's roles are those its hosts name, unless declared (health checks).
        if isinstance(data, dict) and data.get("provider") == "static" and "roles" not in data:
            static = data.get("static")
            hosts = static.get("hosts") if isinstance(static, dict) else None
            if isinstance(hosts, list):
                named = [h.get("role", "web") for h in hosts if isinstance(h, dict)]
                data = {**data, "roles": {str(r): {"count": named.count(r)} for r in named}}
        return data

    @field_validator("roles")
    @classmethod
    def _check_role_names(cls, roles: dict[str, RoleConfig]) -> dict[str, RoleConfig]:
        for name in roles:
            if not NAME_PATTERN.fullmatch(name):
                raise ValueError(f"role name {name!r}: use {NAME_RULE}")
        return roles

    @model_validator(mode="after")
    def _check_roles(self) -> StackConfig:
        if not self.roles:
            raise ValueError("a stack needs at least one role")
        if all(r.data for r in self.roles.values()):
            raise ValueError("a stack needs at least one serving (non-data) role")
        if sum(1 for r in self.roles.values() if r.data) > 1:
            raise ValueError("at most one role may hold data")
        if self.provider not in ("local", "aws", "static") and not self.provider.startswith(
            "libcloud"
        ):
            raise ValueError(
                f"unknown provider {self.provider!r} (local, aws, libcloud:<driver>, static)"
            )
        if (self.provider == "static") != (self.static is not None):
            raise ValueError(
                "provider = 'static' needs [static] hosts = [...]"
                if self.static is None
                else "`static` hosts are for provider = 'static'"
            )
        if self.static is not None:
            for host in self.static.hosts:
                if host.role not in self.roles:
                    raise ValueError(
                        f"static host {host.id!r} names role {host.role!r}, not a role"
                    )
            # changeover moves no traffic to servers it cannot create: no entry points.
            if self.address is not None or self.addresses:
                raise ValueError(
                    "a static stack has no entry points (changeover does not move traffic "
                    "between servers it did not create): drop `address`/`addresses`"
                )
        elif (self.address is None) == (not self.addresses):
            raise ValueError(
                "set `address` (one entry point) or `addresses` (several), not both"
                if self.addresses
                else "a stack needs `address` or `addresses` (its entry points)"
            )
        seen: set[str] = set()
        for ep in self.addresses:
            if ep.name in seen:
                raise ValueError(f"entry point {ep.name!r} is listed twice")
            seen.add(ep.name)
            for role in ep.roles:
                if role not in self.roles or self.roles[role].data:
                    raise ValueError(
                        f"entry point {ep.name!r} names role {role!r}, which is not a serving "
                        f"role (serving roles: {', '.join(self.serving_roles)})"
                    )
        return self

    @property
    def entry_points(self) -> list[EntryPoint]:
        """The stack's entry points, each with its roles spelled out."""
        if self.address is not None:
            eps = [EntryPoint(address=self.address, type=self.address_type)]
        else:  # several, or none (a static stack)
            eps = self.addresses
        return [
            ep if ep.roles else ep.model_copy(update={"roles": self.serving_roles}) for ep in eps
        ]

    def entry_point(self, name: str) -> EntryPoint:
        for ep in self.entry_points:
            if ep.name == name:
                return ep
        raise ConfigError(f"{name!r} is not an entry point of this stack")

    @property
    def primary_address(self) -> str:
        """The first entry point: the one a rehearsal's load goes through ("" for a stack
        without one: a static stack)."""
        eps = self.entry_points
        return eps[0].name if eps else ""

    @property
    def data_role(self) -> str | None:
        return next((n for n, r in self.roles.items() if r.data), None)

    @property
    def serving_roles(self) -> list[str]:
        return [n for n, r in self.roles.items() if not r.data]


DEMO_STACK: dict[str, Any] = {
    "provider": "local",
    "address": "demo-eip",
    "roles": {
        "db": {"count": 1, "image": "debian-12-base", "data": True},
        "web": {"count": 2, "image": "debian-12-base"},
    },
    "defaults": {"bake": 3.0, "retain": 2.0, "max_surge": 1, "min_healthy": 100},
}


class Settings(BaseModel):
    """The root of all configuration."""

    # What pydantic-settings' BaseSettings sets for validation (_build_with_env() adds its
    # sources). Built when first validated: when a variable is set, only _Loaded is.
    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        validate_default=True,
        arbitrary_types_allowed=True,
        defer_build=True,
    )

    state_dir: Path = DEFAULT_STATE_DIR
    # Where the journal, the leases and the recorded versions live (orchestrator/state):
    # "sqlite" (changeover.db in the state dir) or "dynamodb://TABLE?region=REGION".
    state: str = DEFAULT_STATE
    output: Literal["text", "json"] = "text"
    log_format: Literal["console", "json"] = "console"
    verbose: Int = Field(default=0, ge=0)
    stacks: dict[str, StackConfig] = Field(default_factory=dict)
    # Testing hooks, documented in the README: SIGKILL ourselves after the Nth step ends,
    # right after the Nth mutating provider call returns, or right before it is sent.
    crash_after_step: Int | None = Field(default=None, ge=1)
    # N (the Nth mutating call), OP (its first call) or OP:N (the Nth call of OP).
    crash_after_call: str | None = Field(default=None, pattern=r"^(\d+|[a-z_]+(:\d+)?)$")
    crash_before_call: str | None = Field(default=None, pattern=r"^(\d+|[a-z_]+(:\d+)?)$")
    # The clock maintenance-window gates read: "ISO_TIME/SECONDS_PER_STEP" starts there and
    # moves that far each time a step ends (orchestrator.windows.SteppedClock).
    test_clock: str | None = None
    lock_ttl: Float = Field(default=60.0, gt=1)
    notify: list[Notification] = Field(
        default_factory=_empty_list, description="webhooks told about the runs of every stack"
    )

    @field_validator("state")
    @classmethod
    def _check_state(cls, value: str) -> str:
        parse_state(value)  # one line that names the problem, never the value
        return value.strip()

    @field_validator("stacks")
    @classmethod
    def _check_stack_names(cls, stacks: dict[str, StackConfig]) -> dict[str, StackConfig]:
        for name in stacks:
            if not NAME_PATTERN.fullmatch(name):
                raise ValueError(f"stack name {name!r}: use {NAME_RULE}")
        return stacks

    def stack(self, name: str) -> StackConfig:
        if name not in self.stacks:
            known = ", ".join(sorted(self.stacks)) or "none"
            raise ConfigError(f"unknown stack {name!r} (configured: {known})")
        return self.stacks[name]

    @property
    def state_path(self) -> Path:
        return self.state_dir.expanduser()


ErrorKey = tuple[tuple[str, ...], str]
SETTINGS_ERROR: ErrorKey = ((), "settings_error")  # a variable that should be JSON is not


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _error_key(err: Any) -> ErrorKey:
    return tuple(str(p).lower() for p in err["loc"]), str(err["type"])


def _describe(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(root)"
    msg = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = len(err.errors()) - 1
    tail = f" (and {more} more)" if more else ""
    return _one_line(f"config error in {source}: {loc}: {msg}{tail}")


def read_utf8(path: Path, where: str, *, decode_where: str | None = None, hint: str = "") -> str:
    """A text file (config, scenario), or a one-line ConfigError: unreadable, or not UTF-8
    (naming the first bad byte and its offset)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it ({exc.strerror})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{decode_where or where}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at "
            f"offset {exc.start}){hint}"
        ) from None


def _read_toml(path: Path) -> dict[str, Any]:
    """The config file as data, or a ConfigError saying why it is not a config."""
    text = read_utf8(
        path,
        f"config file {str(path)!r}",
        decode_where=f"config error in {path}",
        hint="; TOML files are UTF-8",
    )
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(_one_line(f"config error in {path}: not valid TOML: {exc}")) from None


def _field_env_vars() -> dict[str, str]:
    """The CHANGEOVER_* variables that set a setting: lower-cased name -> name as set.
    pydantic-settings reads these and no others (it matches lower-cased names)."""
    out: dict[str, str] = {}
    prefix = ENV_PREFIX.lower()
    for name in os.environ:
        low = name.lower()
        head = low[len(prefix) :].split(ENV_DELIMITER, 1)[0]
        if low.startswith(prefix) and head in Settings.model_fields:
            out[low] = name
    return out


def _env_path(name: str) -> tuple[str, ...]:
    return tuple(name.lower()[len(ENV_PREFIX) :].split(ENV_DELIMITER))


class _EnvNotJSON(Exception):
    """A variable that must hold JSON (a table or a list) does not: pydantic-settings'
    SettingsError."""


def _as_source(data: dict[str, Any]) -> dict[str, Any]:
    """`data` as pydantic-settings' InitSettingsSource passes it on (case-insensitive): a
    key naming a setting in any case becomes its name (of several spellings the first
    wins, the others are dropped); other keys stay as they are, to be refused."""
    out: dict[str, Any] = {}
    rest = dict(data)
    for field in Settings.model_fields:
        spellings = [key for key in rest if key.lower() == field]
        if spellings:
            out[field] = rest[spellings[0]]
            for key in spellings:
                del rest[key]
    out.update(rest)
    return out


def _merged(low: dict[str, Any], high: dict[str, Any]) -> dict[str, Any]:
    """`high` over `low`, tables merged key by key (pydantic's deep_update)."""
    out = dict(low)
    for key, value in high.items():
        below = out.get(key)
        if isinstance(below, dict) and isinstance(value, dict):
            out[key] = _merged(below, value)
        else:
            out[key] = value
    return out


def _build(
    file_data: dict[str, Any] | None,
    overrides: dict[str, Any],
    *,
    use_env: bool = True,
    exclude: frozenset[str] = frozenset(),
) -> Settings:
    # Lowest priority, so CHANGEOVER_STACKS__DEMO__... still deep-merges over the demo.
    base = file_data if file_data is not None else {"stacks": {"demo": DEMO_STACK}}
    if use_env and set(_field_env_vars()) - exclude:
        return _build_with_env(base, overrides, exclude)
    # No variable sets anything: the flags over the file, as pydantic-settings merges them.
    return Settings.model_validate(_merged(_as_source(base), _as_source(overrides)))


def _build_with_env(
    base: dict[str, Any], overrides: dict[str, Any], exclude: frozenset[str]
) -> Settings:
    """The flags, then the CHANGEOVER_* variables less `exclude` (to find which one an
    error comes from), then `base`, read by pydantic-settings."""
    from pydantic_settings import (  # noqa: PLC0415 - see the module docstring
        BaseSettings,
        EnvSettingsSource,
        InitSettingsSource,
        PydanticBaseSettingsSource,
        SettingsConfigDict,
        SettingsError,
    )

    class _Env(EnvSettingsSource):
        def _load_env_vars(self) -> Mapping[str, str | None]:
            env = super()._load_env_vars()
            return {k: v for k, v in env.items() if k.lower() not in exclude}

    class _Loaded(BaseSettings, Settings):
        model_config = SettingsConfigDict(
            env_prefix=ENV_PREFIX,
            env_nested_delimiter=ENV_DELIMITER,
            extra="forbid",
            allow_inf_nan=False,
            defer_build=False,
        )

        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return init_settings, _Env(settings_cls), InitSettingsSource(settings_cls, base)

    try:
        return _Loaded(**overrides)
    except SettingsError:
        raise _EnvNotJSON from None


def _problems(attempt: Callable[[], Settings]) -> set[ErrorKey]:
    """The errors of one way of loading (empty if it loads)."""
    try:
        attempt()
    except ValidationError as exc:
        return {_error_key(e) for e in exc.errors()}
    except _EnvNotJSON:
        return {SETTINGS_ERROR}
    return set()


def _culprits(
    env: dict[str, str],
    key: ErrorKey,
    file_data: dict[str, Any] | None,
    overrides: dict[str, Any],
) -> list[str]:
    """The variables without which the error goes away (all of them if none alone)."""

    def without(low: str) -> Callable[[], Settings]:
        return lambda: _build(file_data, overrides, exclude=frozenset({low}))

    found = [name for low, name in sorted(env.items()) if key not in _problems(without(low))]
    return found or sorted(env.values())


def _explain(
    exc: ValidationError, source: str, file_data: dict[str, Any] | None, overrides: dict[str, Any]
) -> str:
    """The error's line, naming where the bad value came from: a flag, a variable, the file."""
    first = exc.errors()[0]
    key = _error_key(first)
    loc = key[0]
    if loc and loc[0] in overrides:
        return _describe(exc, f"--{loc[0].replace('_', '-')}")
    env = _field_env_vars()
    if env:
        from_file = file_data is not None and key in _problems(
            lambda: _build(file_data, overrides, use_env=False)
        )
        # An error the file alone has is the file's, unless a variable replaces that value.
        if not from_file or any(_env_path(low) == loc for low in env):
            names = _culprits(env, key, file_data, overrides)
            return _describe(exc, f"environment variable {', '.join(names)}")
    return _describe(exc, source)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Read the TOML file and the environment once. Raises ConfigError with one line that
    names the key and where its value came from (the file, a variable or a flag)."""
    explicit = config_file is not None or "CHANGEOVER_CONFIG" in os.environ
    path = Path(config_file or os.environ.get("CHANGEOVER_CONFIG", DEFAULT_CONFIG_FILE))
    try:
        is_file = path.is_file()
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r}: {exc.strerror}") from None
    if explicit and not is_file:
        via = "" if config_file is not None else " (from CHANGEOVER_CONFIG)"
        raise ConfigError(f"config file {str(path)!r}{via} not found")
    file_data = _read_toml(path) if is_file else None
    source = str(path) if is_file else "environment"
    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        return _build(file_data, clean)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, source, file_data, clean)) from None
    except _EnvNotJSON:
        # A variable that must hold JSON (a table or a list) does not.
        names = _culprits(_field_env_vars(), SETTINGS_ERROR, file_data, clean)
        raise ConfigError(
            f"config error in environment variable {', '.join(names)}: not valid JSON "
            "(this key takes a table or a list, written as a JSON object or array)"
        ) from None
