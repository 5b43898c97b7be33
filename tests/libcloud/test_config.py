"""Configuration of libcloud stacks: capabilities checked before anything is touched,
credentials only from the environment or a named file, errors that name the driver."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests
from libcloud.common import exceptions as lc_exceptions
from libcloud.common.types import InvalidCredsError

from orchestrator.errors import (
    CapabilityError,
    ConfigError,
    PreconditionFailed,
    StepFailed,
    TransientError,
)
from orchestrator.rehearse import stack_toml
from orchestrator.settings import StackConfig
from providers.libcloud_errors import classify
from providers.libcloud_provider import (
    DriverSpec,
    build_driver,
    load_credentials,
    make_libcloud_provider,
    spec_for,
)

# libcloud's exception classes are unannotated.
BaseHTTPError: Any = lc_exceptions.BaseHTTPError
RateLimitReachedError: Any = lc_exceptions.RateLimitReachedError


def _stack(driver: str, **extra: Any) -> dict[str, Any]:
    stack: dict[str, Any] = {
        "provider": "libcloud",
        "address": "203.0.113.10",
        "libcloud": {"driver": driver},
        "roles": {"web": {"count": 1}},
        "hygiene": {"pending": "ignore"},
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(stack.get(key), dict):
            stack[key] = {**stack[key], **value}
        else:
            stack[key] = value
    return stack


def _cli(
    tmp_path: Path, stack: dict[str, Any], *args: str, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "changeover.toml"
    config.write_text(stack_toml("shop", stack))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHANGEOVER_", "AWS_"))}
    env.update(extra_env or {})
    state = str(tmp_path / "state")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "--config",
            str(config),
            "--state-dir",
            state,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


@pytest.mark.parametrize("driver", ["linode", "vultr", "scaleway"])
def test_no_movable_address_and_no_balancer_exits_2_at_plan(tmp_path: Path, driver: str) -> None:
    """`plan` on a driver without a movable address or a load balancer exits 2, naming
    the driver and the capability; no run is journaled (nothing touched)."""
    proc = _cli(tmp_path, _stack(driver), "plan", "rotate", "shop")
    assert proc.returncode == 2, proc.stderr
    assert f"libcloud:{driver}" in proc.stderr and "movable address" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "state" / "changeover.db").exists() or "run" not in proc.stdout


def test_every_command_fails_the_same_way_early(tmp_path: Path) -> None:
    """rebuild and rotate fail with the same capability error before any cloud call."""
    for command in (["rebuild", "shop", "--yes"], ["rotate", "shop", "--yes"]):
        proc = _cli(tmp_path, _stack("linode"), *command)
        assert proc.returncode == 2 and "libcloud:linode" in proc.stderr, proc.stderr


def test_a_load_balancer_lifts_the_capability_error(tmp_path: Path) -> None:
    """With a balancer configured, a driver without a movable address gets a provider
    whose address is the balancer's members (no limit on their number)."""
    config = StackConfig.model_validate(
        _stack("linode", libcloud={"load_balancer": "lb-1", "load_balancer_driver": "elb"})
    )
    provider: Any = make_libcloud_provider(
        "shop", config, state_dir=tmp_path, driver=object(), lb_driver=object()
    )
    assert provider.address_capacity("shop", config.address) is None
    assert provider.name == "libcloud:linode"


def test_hygiene_without_a_transport_is_a_capability_error(tmp_path: Path) -> None:
    """Host hygiene needs a transport; libcloud's own SSH (any host key) is never used."""
    config = StackConfig.model_validate(_stack("ec2", hygiene={"pending": "none"}))
    with pytest.raises(CapabilityError, match=r"libcloud:ec2.*transport"):
        make_libcloud_provider(
            "shop", config, state_dir=tmp_path, driver=object(), auto_transport=False
        )


def test_secrets_in_driver_args_are_refused(tmp_path: Path) -> None:
    """I9: a secret-looking driver argument in the config is a one-line config error."""
    stack = _stack("digital_ocean", libcloud={"driver_args": {"api_key": "sekrit-123"}})
    proc = _cli(tmp_path, stack, "plan", "rotate", "shop")
    assert proc.returncode == 2
    assert "driver_args.api_key looks secret" in proc.stderr and "sekrit-123" not in proc.stderr


def test_missing_credentials_name_the_variables(tmp_path: Path) -> None:
    """No credentials anywhere: exit 2, naming the environment variables to set."""
    proc = _cli(tmp_path, _stack("ec2"), "plan", "rotate", "shop")
    assert proc.returncode == 2
    assert "AWS_ACCESS_KEY_ID" in proc.stderr and "credentials" in proc.stderr


def test_provider_and_driver_must_agree() -> None:
    """`libcloud:ec2` with driver = "gce" is a config error naming both."""
    from providers.libcloud_provider import driver_name

    config = StackConfig.model_validate(_stack("gce", provider="libcloud:ec2"))
    with pytest.raises(ConfigError, match="disagree"):
        driver_name("shop", config)


def test_credentials_file_then_environment(tmp_path: Path) -> None:
    """The named credentials file is read; the environment wins over it."""
    creds = tmp_path / "creds.toml"
    creds.write_text('key = "file-key"\nsecret = "file-secret"\n')
    config = StackConfig.model_validate(_stack("ec2", libcloud={"credentials_file": str(creds)}))
    assert config.libcloud is not None
    got = load_credentials(spec_for("ec2"), config.libcloud, {"AWS_ACCESS_KEY_ID": "env-key"})
    assert got == {"key": "env-key", "secret": "file-secret"}
    bad = tmp_path / "bad.toml"
    bad.write_text('secret = "leaky\n')
    config = StackConfig.model_validate(_stack("ec2", libcloud={"credentials_file": str(bad)}))
    assert config.libcloud is not None
    with pytest.raises(ConfigError) as err:
        load_credentials(spec_for("ec2"), config.libcloud, {})
    assert "leaky" not in str(err.value)


def test_endpoint_url_points_the_driver_connection() -> None:
    """endpoint_url reaches drivers whose constructors drop host and port (DigitalOcean)."""
    config = StackConfig.model_validate(
        _stack("digital_ocean", endpoint_url="http://127.0.0.1:8081")
    )
    driver = build_driver(spec_for("digital_ocean"), config, {"key": "t"})
    conn = driver.connection
    assert (conn.host, conn.port, conn.secure) == ("127.0.0.1", 8081, 0)


def test_unknown_drivers_fall_back_to_name_ownership() -> None:
    """A driver changeover has no table entry for keeps ownership in the node name."""
    assert spec_for("kamatera") == DriverSpec("kamatera", "kamatera", "name", ())
    assert spec_for("DigitalOcean").name == "digital_ocean"


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (RateLimitReachedError(headers={}), TransientError),
        (BaseHTTPError(503, "Service Unavailable"), TransientError),
        (BaseHTTPError(500, "boom"), TransientError),
        (BaseHTTPError(400, "RequestLimitExceeded: slow down"), TransientError),
        (requests.exceptions.ConnectionError("refused"), TransientError),
        (BaseHTTPError(404, "no such droplet"), StepFailed),
        (InvalidCredsError("bad token"), PreconditionFailed),
        (ValueError("Floating ip 1.2.3.4 not found"), StepFailed),
    ],
)
def test_libcloud_errors_are_sorted_for_the_engine(exc: Exception, kind: type) -> None:
    """Rate limits, 5xx, throttling codes and connection errors are retried; the rest
    fail the step; every message names the driver and the operation."""
    err = classify("digital_ocean", "attach_floating_ip", exc)
    assert isinstance(err, kind)
    assert str(err).startswith("libcloud:digital_ocean attach_floating_ip")


def test_help_never_imports_libcloud() -> None:
    """`changeover --help` stays fast: libcloud loads only for a libcloud stack."""
    code = (
        "import sys\nfrom orchestrator import cli\nsys.argv = ['changeover', '--help']\n"
        "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('libcloud'))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", "import json\n" + code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_data_migration_without_volume_support_fails_at_plan(tmp_path: Path) -> None:
    """A data role on a driver whose volumes changeover cannot move: `plan rebuild` exits
    2 naming the driver and the capability, before any cloud call."""
    stack = _stack(
        "digital_ocean",
        roles={"web": {"count": 1}, "db": {"count": 1, "data": True}},
    )
    token = {"DIGITALOCEAN_ACCESS_TOKEN": "not-a-real-token"}
    proc = _cli(tmp_path, stack, "plan", "rebuild", "shop", extra_env=token)
    assert proc.returncode == 2, proc.stderr
    assert "libcloud:digital_ocean" in proc.stderr and "data migration" in proc.stderr
    assert "--no-migrate-data" in proc.stderr
