"""Real Debian 12 hosts (debootstrap chroots with a real sshd) as a `static` stack:
audit, security enable/status and in-place security upgrades run real apt over SSH."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from orchestrator.security import APT_FILE, is_security_origin, parse_apt_config_dump
from orchestrator.settings import load_settings
from providers.static import StaticProvider
from tests.debian.conftest import DebianStack

STACK = "deb"
# Real apt on two hosts: an upgrade or a dry run takes tens of seconds, more on a busy CI.
pytestmark = pytest.mark.timeout(900)


def changeover(stack: DebianStack, *args: str, timeout: float = 900) -> tuple[int, Any, str]:
    """Run the CLI as a user would, with --output json; return (exit, JSON, stderr)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "--config",
            str(stack.config),
            "--state-dir",
            str(stack.state_dir),
            "--output",
            "json",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    data = json.loads(proc.stdout) if proc.stdout.strip() else None
    return proc.returncode, data, proc.stderr


def pending_security(host: Any) -> list[str]:
    """The host's installed packages with a security upgrade pending, asked inside the
    chroot with apt itself (not over SSH, not with changeover's parsers)."""
    out = host.run("apt-get", "-s", "-o", "Debug::NoLocking=true", "--with-new-pkgs", "upgrade")
    assert out.returncode == 0, out.stderr
    # "Inst NAME [INSTALLED] (CANDIDATE Debian-Security:12/...)"; a new package has no [].
    return [
        ln.split()[1]
        for ln in out.stdout.splitlines()
        if ln.startswith("Inst ") and ln.split()[2].startswith("[") and "-security" in ln
    ]


def test_audit_over_ssh_reports_the_pending_security_upgrades(debian_stack: DebianStack) -> None:
    """`audit` on a static stack runs the fact script over SSH on each host and counts the
    security upgrades apt really has pending there; `plan rebuild` refuses the stack."""
    hosts = debian_stack.hosts
    code, report, err = changeover(debian_stack, "audit", STACK)
    assert code == 0, err
    assert report["provider"] == "static" and report["transport"] == "ssh"
    assert [s["id"] for s in report["servers"]] == ["deb-1", "deb-2"]
    for server in report["servers"]:
        assert server["error"] is None, server["error"]
        expected = pending_security(debian_stack.host(server["id"]))
        assert expected, "the chroot should have security upgrades pending"
        assert server["security_count"] == len(expected)
        assert server["os"]["version_codename"] == "bookworm"
        assert server["recommendation"]["action"] == "replace"  # what a fresh server fixes
        assert server["security"]["installed"] is True  # unattended-upgrades is there...
        assert server["security"]["security_only"] is False  # ...with Debian's default origins
    # ...but nothing replaces a static server: the stack's advice is to upgrade in place.
    assert report["recommendation"]["action"] == "patch"
    # Two hosts and min-healthy 100%: one may leave only with --min-healthy 50, said so.
    command = f"changeover upgrade {STACK} --security-only --min-healthy 50"
    assert report["recommendation"]["command"] == command

    # Servers nobody can create cannot be replaced: plan rebuild/rotate exit 2 at plan
    # time with the capability message, before any host is asked.
    logins = [h.log.read_text(errors="replace").count("Accepted publickey") for h in hosts]
    for strategy in ("rebuild", "rotate"):
        code, _, err = changeover(debian_stack, "plan", strategy, STACK)
        assert code == 2, err
        assert "provider 'static' does not support rebuild or rotate" in err
        assert "Traceback" not in err
    assert [h.log.read_text(errors="replace").count("Accepted publickey") for h in hosts] == logins


def test_security_enable_leaves_a_security_only_config_the_real_tool_accepts(
    debian_stack: DebianStack,
) -> None:
    """`security enable` writes the config, and what apt and unattended-upgrade then read
    names the security origins only, with no automatic reboot; `status` says so."""
    code, before, err = changeover(debian_stack, "security", "status", STACK)
    assert code == 0, err
    assert all(s["security_only"] is False for s in before["servers"])  # Debian's defaults

    code, report, err = changeover(debian_stack, "security", "enable", STACK, "--yes")
    assert code == 0, [(s["error"], s["dry_run_origins"]) for s in report["servers"]]
    for server in report["servers"]:
        assert server["ok"] and server["error"] is None, server
        assert server["dry_run_ok"] is True
        assert server["dry_run_origins"], "unattended-upgrade printed no allowed origins"
        assert all(is_security_origin(o) for o in server["dry_run_origins"])
        assert server["automatic_reboot"] is False
        # unattended-upgrades' own 20auto-upgrades already switches both on: left alone.
        assert server["changed"] == [APT_FILE]

    for host in debian_stack.hosts:
        # The test's own look, inside the chroot: the real tools, not changeover's parsers.
        dump = host.run("apt-config", "dump")
        values = parse_apt_config_dump(dump.stdout)
        origins = values["Unattended-Upgrade::Origins-Pattern"]
        assert origins and all("Debian-Security" in o for o in origins), origins
        assert values["Unattended-Upgrade::Automatic-Reboot"] == ["false"]
        assert values["APT::Periodic::Unattended-Upgrade"] == ["1"]
    host = debian_stack.hosts[0]  # the same check on the other took the same 25 s
    dry = host.run("unattended-upgrade", "--dry-run", "-v")
    assert dry.returncode == 0, dry.stdout[-2000:] + dry.stderr[-2000:]
    allowed = next(ln for ln in dry.stdout.splitlines() if "Allowed origins are:" in ln)
    assert "label=Debian," not in allowed and "label=Debian-Security" in allowed

    code, status, err = changeover(debian_stack, "security", "status", STACK)
    assert code == 0, err
    for server in status["servers"]:
        assert server["installed"] and server["enabled"] and server["security_only"]
        assert server["managed_by_changeover"] is True
        assert server["automatic_reboot"] is False


def test_security_only_upgrade_over_ssh_leaves_nothing_pending(
    debian_stack: DebianStack, reboot_hook: Callable[..., None]
) -> None:
    """The static provider's in-place upgrade runs real apt over SSH: afterwards no
    security upgrade is pending, the new kernel's hook wrote /var/run/reboot-required,
    and the reboot hook (sshd restarted, /run cleared: a chroot cannot reboot) clears it."""
    settings = load_settings(debian_stack.config)
    provider = StaticProvider(STACK, settings.stack(STACK), reboot_hook=reboot_hook)
    host = debian_stack.hosts[0]
    other = debian_stack.hosts[1]
    pending_before = pending_security(host)
    assert any(name.startswith("linux-image-") for name in pending_before), pending_before

    result = provider.upgrade_packages(STACK, host.id, security_only=True, dist_upgrade=False)
    assert pending_security(host) == []
    assert "linux-image-amd64" in result["upgraded"]
    assert result["reboot_required"] is True
    assert (host.root / "run" / "reboot-required").exists()
    assert any(p.startswith("linux-image") for p in result["reboot_required_pkgs"])
    assert pending_security(other) == pending_before  # the other host is its own chroot

    again = provider.upgrade_packages(STACK, host.id, security_only=True, dist_upgrade=False)
    assert again["upgraded"] == {}  # idempotent: nothing newer the second time

    provider.reboot_server(STACK, host.id)
    state = provider.boot_state(STACK, host.id)
    assert state["reboot_required"] is False
    assert not (host.root / "run" / "reboot-required").exists()

    code, report, err = changeover(debian_stack, "audit", STACK)
    assert code == 0, err
    counts = {s["id"]: s["security_count"] for s in report["servers"]}
    assert counts == {host.id: 0, other.id: len(pending_before)}
