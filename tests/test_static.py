"""The static provider's config and capabilities, and `security`'s config text and
parsers, without a host (tests/debian runs them against real Debian hosts)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.audit import select_transport
from orchestrator.errors import BadInput, CapabilityError, ConfigError, PreconditionFailed
from orchestrator.security import (
    APT_FILE,
    APT_PERIODIC_FILE,
    DNF_FILE,
    DNF_TIMER_DROPIN,
    SecurityReport,
    SecurityStatus,
    apt_files,
    check_reboot_at,
    dnf_files,
    is_security_origin,
    parse_allowed_origins,
    parse_apt_config_dump,
    parse_status,
)
from orchestrator.settings import load_settings
from providers.base import Provider
from providers.static import StaticProvider, StaticTransport

FIXTURES = Path(__file__).parent / "fixtures" / "security"
HOSTS = """
[stacks.s]
provider = "static"
[stacks.s.static]
hosts = [
  { id = "web-1", address = "127.0.0.1", port = 2201, user = "admin", role = "web" },
  { id = "web-2", address = "127.0.0.1", port = 2202 },
  { id = "db-1", address = "10.0.0.5", role = "db" },
]
"""


def _config(tmp_path: Path, text: str = HOSTS) -> Path:
    path = tmp_path / "changeover.toml"
    path.write_text(text)
    return path


def _provider(tmp_path: Path, extra: str = "") -> StaticProvider:
    settings = load_settings(_config(tmp_path, HOSTS + extra))
    return StaticProvider("s", settings.stack("s"))


def test_a_static_stack_takes_its_roles_from_its_hosts_and_has_no_entry_points(
    tmp_path: Path,
) -> None:
    """Hosts name their roles (web by default); the stack needs no address."""
    config = load_settings(_config(tmp_path)).stack("s")
    assert config.roles["web"].count == 2 and config.roles["db"].count == 1
    assert config.entry_points == []
    assert config.static is not None
    assert [h.port for h in config.static.hosts] == [2201, 2202, 22]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('address = "eip-1"\n', "a static stack has no entry points"),
        ("", "listed twice"),
    ],
)
def test_static_config_mistakes_are_named(tmp_path: Path, extra: str, message: str) -> None:
    """An entry point on a static stack, or a host listed twice, is one clear error."""
    text = HOSTS.replace('provider = "static"\n', f'provider = "static"\n{extra}')
    if not extra:
        text = text.replace('id = "web-2"', 'id = "web-1"')
    with pytest.raises(ConfigError, match=message):
        load_settings(_config(tmp_path, text))


def test_static_needs_hosts_and_hosts_need_static(tmp_path: Path) -> None:
    """provider = "static" without hosts, or hosts on another provider, are refused."""
    with pytest.raises(ConfigError, match="needs \\[static\\] hosts"):
        load_settings(_config(tmp_path, '[stacks.s]\nprovider = "static"\n[stacks.s.roles.web]\n'))
    text = HOSTS.replace('provider = "static"', 'provider = "local"\naddress = "x"')
    text += "[stacks.s.roles.web]\n"
    with pytest.raises(ConfigError, match="are for provider = 'static'"):
        load_settings(_config(tmp_path, text))


def test_a_host_naming_an_undeclared_role_is_refused(tmp_path: Path) -> None:
    """With roles declared (for their health checks), every host's role must be one."""
    with pytest.raises(ConfigError, match="names role 'db', not a role"):
        load_settings(_config(tmp_path, HOSTS + "[stacks.s.roles.web]\n"))


def test_the_static_provider_meets_the_protocol_and_refuses_what_it_cannot_do(
    tmp_path: Path,
) -> None:
    """Listing works; creating, destroying, routing and data moves raise CapabilityError
    (exit 2) naming the provider."""
    p = _provider(tmp_path)
    assert isinstance(p, Provider)
    servers = p.list_servers("s")
    assert [(s.id, s.role, s.host, s.port) for s in servers] == [
        ("web-1", "web", "127.0.0.1", 2201),
        ("web-2", "web", "127.0.0.1", 2202),
        ("db-1", "db", "10.0.0.5", 22),
    ]
    assert [s.id for s in p.describe_servers("s", ["db-1", "nope"])] == ["db-1"]
    refused: list[Any] = [
        lambda: p.ex_check_replace("s"),
        lambda: p.destroy_servers("s", ["web-1"]),
        lambda: p.set_members("s", "x", []),
        lambda: p.check_data_moves("s"),
        lambda: p.create_servers(
            stack="s",
            role="web",
            generation=1,
            run_id="r",
            count=1,
            image="i",
            size="s",
            idempotency_key="k",
            links={},
        ),
    ]
    for call in refused:
        with pytest.raises(CapabilityError, match="provider 'static' does not support"):
            call()
    assert p.routes_to("s", ["web-1"]) == {}


def test_host_keys_come_from_known_hosts_at_each_hosts_port_never_first_use(
    tmp_path: Path,
) -> None:
    """pin_host_keys takes journal pins first, then known_hosts at [address]:port; a host
    with neither is refused, naming it (there is no console to wait for)."""
    known = tmp_path / "known_hosts"
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    known.write_text(f"[127.0.0.1]:2201 {key}\n")
    p = _provider(tmp_path, f'[stacks.s.hygiene.ssh]\nknown_hosts = "{known}"\n')
    web1, web2, _ = p.list_servers("s")
    assert p.pin_host_keys("s", [web1], {}) == {"web-1": [key]}
    assert p.ex_host_keys(web1) == [key]
    assert p.pin_host_keys("s", [web2], {"web-2": ["ssh-ed25519 AAAArecorded"]}) == {
        "web-2": ["ssh-ed25519 AAAArecorded"]
    }
    p2 = _provider(tmp_path, f'[stacks.s.hygiene.ssh]\nknown_hosts = "{known}"\n')
    with pytest.raises(PreconditionFailed, match=r"no known SSH host key for web-2 \(127"):
        p2.pin_host_keys("s", p2.list_servers("s")[:2], {})


def _cli(config: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(sys.executable, "-m", "orchestrator", "--config", str(config)),
            *("--state-dir", str(tmp_path / "state"), *args),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("strategy", ["rebuild", "rotate"])
def test_plan_rebuild_or_rotate_on_a_static_stack_exits_2_with_the_capability(
    tmp_path: Path, strategy: str
) -> None:
    """Replacing needs creating: the plan refuses at once (no host is reachable here, so
    nothing was asked either)."""
    proc = _cli(_config(tmp_path), tmp_path, "plan", strategy, "s")
    assert proc.returncode == 2, proc.stderr
    assert "error: provider 'static' does not support rebuild or rotate" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_security_enable_without_yes_off_a_terminal_refuses(tmp_path: Path) -> None:
    """A job without --yes is told to pass it (exit 2), and nothing is asked or run."""
    proc = _cli(_config(tmp_path), tmp_path, "security", "enable", "s")
    assert proc.returncode == 2 and "pass --yes" in proc.stderr
    proc = _cli(_config(tmp_path), tmp_path, "security", "enable", "s", "--reboot-at", "3:30")
    assert proc.returncode == 2 and "expected HH:MM" in proc.stderr


# --- security: the config it writes --------------------------------------------------------


def test_the_apt_config_clears_the_default_origins_and_allows_security_alone() -> None:
    """Debian: the 50unattended-upgrades lists are cleared, then only the security
    origins are allowed; no automatic reboot unless a time is given."""
    files = apt_files("debian", None)
    text = files[APT_FILE]
    assert "#clear Unattended-Upgrade::Origins-Pattern;" in text
    assert "#clear Unattended-Upgrade::Allowed-Origins;" in text
    patterns = [ln.strip().strip('";') for ln in text.splitlines() if "origin=" in ln]
    assert patterns == [
        "origin=Debian,codename=${distro_codename},label=Debian-Security",
        "origin=Debian,codename=${distro_codename}-security,label=Debian-Security",
    ]
    assert 'Unattended-Upgrade::Automatic-Reboot "false";' in text
    assert "Automatic-Reboot-Time" not in text
    assert files[APT_PERIODIC_FILE] == (
        'APT::Periodic::Update-Package-Lists "1";\nAPT::Periodic::Unattended-Upgrade "1";\n'
    )
    timed = apt_files("ubuntu", "03:30")[APT_FILE]
    assert 'Automatic-Reboot "true";' in timed
    assert 'Automatic-Reboot-Time "03:30";' in timed
    assert "origin=Ubuntu,archive=${distro_codename}-security,label=Ubuntu" in timed
    with pytest.raises(BadInput, match="no security origins known for distribution 'arch'"):
        apt_files("arch", None)


def test_the_dnf_config_takes_security_upgrades_and_reboots_only_when_asked() -> None:
    """dnf-automatic: upgrade_type = security, applied; reboot never, or when needed at
    --reboot-at through a timer drop-in."""
    plain = dnf_files(None)
    assert set(plain) == {DNF_FILE}
    assert "upgrade_type = security\n" in plain[DNF_FILE]
    assert "apply_updates = yes\n" in plain[DNF_FILE]
    assert "reboot = never\n" in plain[DNF_FILE]
    timed = dnf_files("22:05")
    assert "reboot = when-needed\n" in timed[DNF_FILE]
    assert "OnCalendar=*-*-* 22:05:00" in timed[DNF_TIMER_DROPIN]


@pytest.mark.parametrize("value", ["3:30", "24:00", "12:60", "noon", ""])
def test_reboot_at_is_a_24_hour_time(value: str) -> None:
    """--reboot-at takes HH:MM only."""
    with pytest.raises(BadInput, match="expected HH:MM"):
        check_reboot_at(value)
    assert check_reboot_at("00:00") == "00:00" and check_reboot_at(None) is None


@pytest.mark.parametrize(
    ("origin", "security"),
    [
        ("origin=Debian,codename=${distro_codename},label=Debian-Security", True),
        ("origin=Debian,codename=bookworm-security,label=Debian-Security", True),
        ("origin=Ubuntu,archive=jammy-security,label=Ubuntu", True),
        ("Ubuntu:jammy-security", True),
        ("origin=Debian,codename=${distro_codename},label=Debian", False),
        ("origin=Debian,codename=${distro_codename}-updates", False),
        ("origin=Debian-Security-Mirror", False),  # the origin alone proves nothing
        ("", False),
    ],
)
def test_which_origins_count_as_security(origin: str, security: bool) -> None:
    """An origin counts only if its label, codename or archive names the security suite."""
    assert is_security_origin(origin) is security


def test_status_of_a_default_debian_12_host_is_not_security_only() -> None:
    """Real output: unattended-upgrades as Debian installs it allows the main suite too."""
    st = parse_status("h", (FIXTURES / "debian12-status-default.txt").read_text())
    assert (st.family, st.distro, st.installed, st.enabled) == ("apt", "debian", True, True)
    assert st.security_only is False
    assert "origin=Debian,codename=${distro_codename},label=Debian" in st.origins
    assert st.automatic_reboot is False and st.managed is False and not st.ok


def test_status_after_enable_names_only_security_origins_and_the_reboot_time() -> None:
    """Real output after our file is in place (with --reboot-at 03:30)."""
    st = parse_status("h", (FIXTURES / "debian12-status-enabled-reboot-0330.txt").read_text())
    assert st.origins == [
        "origin=Debian,codename=${distro_codename},label=Debian-Security",
        "origin=Debian,codename=${distro_codename}-security,label=Debian-Security",
    ]
    assert st.security_only and st.enabled and st.managed and st.ok
    assert st.automatic_reboot is True and st.reboot_time == "03:30"


def test_apt_config_dump_parsing_skips_list_heads() -> None:
    """`Key "";` heads a list; its items follow as `Key:: "..."`."""
    dump = 'A::B "";\nA::B:: "x";\nA::B:: "y";\nC "1";\nD::E "";\n'
    assert parse_apt_config_dump(dump) == {"A::B": ["x", "y"], "C": ["1"]}
    line = "Allowed origins are: origin=Debian,codename=bookworm,label=Debian-Security, o=x"
    assert parse_allowed_origins(f"noise\n{line}\n") == [
        "origin=Debian,codename=bookworm,label=Debian-Security",
        "o=x",
    ]
    assert parse_allowed_origins("nothing") is None


@pytest.mark.parametrize("kind", ["auto", "ssh"])
def test_each_host_is_reached_at_its_own_port_as_its_own_user(tmp_path: Path, kind: str) -> None:
    """The stack's transport (auto or ssh) connects to each host with that host's port and
    user; the other SSH options are the stack's."""
    p = _provider(tmp_path, f'[stacks.s.hygiene]\ntransport = "{kind}"\n')
    transport = select_transport(p, p.config.hygiene)
    assert isinstance(transport, StaticTransport) and transport.name == "ssh"
    web1, web2, db1 = p.list_servers("s")
    options = [transport.ssh(s).options for s in (web1, web2, db1)]
    assert [(o.port, o.user) for o in options] == [(2201, "admin"), (2202, "root"), (22, "root")]


def test_the_security_report_says_per_server_what_is_set_and_what_failed() -> None:
    """Text and JSON name each server's state; a failed enable exits 1, a refusal 2."""
    good = parse_status("web-1", (FIXTURES / "debian12-status-enabled-reboot-0330.txt").read_text())
    bad = SecurityStatus("web-2", error="unattended-upgrade --dry-run exited 1: boom")
    report = SecurityReport("s", "enable", [good, bad], "03:30")
    text = report.text()
    assert "1 of 2 server(s) take unattended upgrades from the security origins only" in text
    assert "auto reboot: yes at 03:30" in text
    assert "note: unattended-upgrade --dry-run exited 1: boom" in text
    assert report.exit_code == 1
    assert report.to_dict()["servers"][0]["ok"] is True
    refused = SecurityStatus("web-3", error="host key CHANGED", refused=True)
    assert SecurityReport("s", "status", [good, refused]).exit_code == 2
    assert SecurityReport("s", "status", [good, bad]).exit_code == 0  # status only reports
