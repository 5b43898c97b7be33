"""Configuration: one pydantic-settings root, read once by the CLI and passed down typed.

Sources, highest first: CLI flags, ``CHANGEOVER_*`` environment variables (nested keys
with ``__``, e.g. ``CHANGEOVER_STACKS__DEMO__DEFAULTS__BAKE=5``), the TOML file. With no
file at all, a built-in ``demo`` stack on the local cloud is configured so the
quickstart works from a fresh clone.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from orchestrator.errors import ConfigError

DEFAULT_CONFIG_FILE = "changeover.toml"
# XDG's place for state that outlives a process but is not config.
DEFAULT_STATE_DIR = Path("~/.local/state/changeover")

DEFAULT_BAKE_SECONDS = 10.0  # seconds to keep checking through the address after cutover
DEFAULT_RETAIN_SECONDS = 30.0  # seconds the old generation stays up for a cheap rollback
DEFAULT_MAX_SURGE = 1  # new servers at a time during rotate
DEFAULT_MIN_HEALTHY_PCT = 100  # percent of the serving count that must keep serving
DEFAULT_BOOT_TIMEOUT = 120.0  # seconds a new server may take to boot (and to verify)
DEFAULT_DRAIN_TIMEOUT = 330.0  # seconds to drain; an ELB's default deregistration delay is 300


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HealthCheck(_Strict):
    """The app health check of a role."""

    type: Literal["http", "tcp", "ec2-status", "target-group"] = "http"
    path: str = "/health"
    port: int = Field(default=80, ge=1, le=65535, description="cloud servers; local ignores it")
    timeout: float = Field(default=2.0, gt=0)


class SshOptions(_Strict):
    """How to reach servers over SSH. Keys are files named here, never inline (I9)."""

    user: str = "root"
    port: int = Field(default=22, ge=1, le=65535)
    known_hosts: str | None = Field(
        default=None, description="known_hosts file; unknown or changed host keys are refused"
    )
    key_file: str | None = None
    address: Literal["private", "public"] = "private"
    timeout: float = Field(default=15.0, gt=0)
    attempts: int = Field(default=3, ge=1, le=10, description="connection attempts per command")


class HygienePolicy(_Strict):
    """Host hygiene a fresh server must pass before it may serve."""

    pending: Literal["none", "security", "ignore"] = Field(
        default="none",
        description="'none': no pending upgrades at all; 'security': no pending security "
        "upgrades; 'ignore': do not check",
    )
    reboot_required_fails: bool = True
    min_versions: dict[str, str] = Field(
        default_factory=dict, description="component -> lowest acceptable version"
    )
    components: list[str] = Field(
        default_factory=list, description="extra components whose versions are recorded"
    )
    transport: Literal["auto", "local", "ssh", "ssm"] = "auto"
    ssh: SshOptions = SshOptions()
    max_age_days: float | None = Field(
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
    facts_timeout: float = Field(default=120.0, gt=0, description="seconds for the fact script")

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
    subnets: list[str] = Field(default_factory=list)
    security_groups: list[str] = Field(default_factory=list)
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

    count: int = Field(default=1, ge=1, le=10_000)
    image: str = "debian-12-base"
    size: str = "small"
    health: HealthCheck = HealthCheck()
    data: bool = Field(default=False, description="this role holds the stack's data")
    launch: LaunchOptions = LaunchOptions()
    data_options: DataOptions = DataOptions()


class StrategyDefaults(_Strict):
    """Per-stack defaults for strategy flags."""

    bake: float = Field(default=DEFAULT_BAKE_SECONDS, ge=0)
    retain: float = Field(default=DEFAULT_RETAIN_SECONDS, ge=0)
    max_surge: int = Field(default=DEFAULT_MAX_SURGE, ge=1)
    min_healthy: int = Field(default=DEFAULT_MIN_HEALTHY_PCT, ge=0, le=100)
    boot_timeout: float = Field(default=DEFAULT_BOOT_TIMEOUT, gt=0)
    drain_timeout: float = Field(default=DEFAULT_DRAIN_TIMEOUT, gt=0)


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


class StackConfig(_Strict):
    """One stack: where it lives, its entry point, its roles, its defaults."""

    provider: str = "local"
    region: str | None = None
    endpoint_url: str | None = None
    profile: str | None = None
    address: str
    address_type: Literal["auto", "proxy", "elastic-ip", "target-group", "floating-ip"] = "auto"
    libcloud: LibcloudOptions | None = None
    roles: dict[str, RoleConfig]
    defaults: StrategyDefaults = StrategyDefaults()
    hygiene: HygienePolicy = HygienePolicy()

    @model_validator(mode="after")
    def _check_roles(self) -> StackConfig:
        if not self.roles:
            raise ValueError("a stack needs at least one role")
        if all(r.data for r in self.roles.values()):
            raise ValueError("a stack needs at least one serving (non-data) role")
        if sum(1 for r in self.roles.values() if r.data) > 1:
            raise ValueError("at most one role may hold data")
        if self.provider not in ("local", "aws") and not self.provider.startswith("libcloud"):
            raise ValueError(f"unknown provider {self.provider!r} (local, aws, libcloud:<driver>)")
        return self

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


class Settings(BaseSettings):
    """The root of all configuration."""

    model_config = SettingsConfigDict(
        env_prefix="CHANGEOVER_", env_nested_delimiter="__", extra="forbid"
    )

    state_dir: Path = DEFAULT_STATE_DIR
    output: Literal["text", "json"] = "text"
    log_format: Literal["console", "json"] = "console"
    verbose: int = 0
    stacks: dict[str, StackConfig] = Field(default_factory=dict)
    # Testing hook, documented in the README: SIGKILL ourselves after the Nth step ends.
    crash_after_step: int | None = None
    lock_ttl: float = Field(default=60.0, gt=1)

    def stack(self, name: str) -> StackConfig:
        if name not in self.stacks:
            known = ", ".join(sorted(self.stacks)) or "none"
            raise ConfigError(f"unknown stack {name!r} (configured: {known})")
        return self.stacks[name]

    @property
    def state_path(self) -> Path:
        return self.state_dir.expanduser()


def _describe(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(root)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = len(err.errors()) - 1
    tail = f" (and {more} more)" if more else ""
    return f"config error in {source}: {loc}: {msg}{tail}"


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Read the TOML file and the environment once. Raises ConfigError with one line."""
    explicit = config_file is not None or "CHANGEOVER_CONFIG" in os.environ
    path = Path(config_file or os.environ.get("CHANGEOVER_CONFIG", DEFAULT_CONFIG_FILE))
    if explicit and not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    source = str(path) if path.is_file() else "environment"
    if path.is_file():
        try:
            with path.open("rb") as fh:
                tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config error in {path}: not valid TOML: {exc}") from None

    toml_path = path if path.is_file() else None

    class _FromFile(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if toml_path is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
            else:
                # Lowest priority, so CHANGEOVER_STACKS__DEMO__... still deep-merges over it.
                sources.append(InitSettingsSource(settings_cls, {"stacks": {"demo": DEMO_STACK}}))
            return tuple(sources)

    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        return _FromFile(**clean)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
