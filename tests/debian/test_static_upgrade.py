"""`changeover upgrade --security-only` through the CLI on a static stack of two real
Debian 12 hosts (debootstrap chroots with a real sshd, tests/debian/conftest.py): real
apt over SSH, a batch at a time, each host rebooted by its `reboot_command` and put
through the whole health gate before the next batch begins.

The hosts get what the gate needs to mean something per host: each is reached at its
own loopback address (127.A.B.1 and .2, besides the fixture's 127.0.0.1) and serves a
stand-in app there (python3's http.server answering /health), so the role's one http
health check asks each host for itself. A chroot cannot reboot, so each host's
`reboot_command` is a script inside it that does what a boot would, as far as changeover
can see: it stops the services (sshd, the app), clears /run (reboot-required goes with
it), gives the chroot a new boot id (a file bind-mounted over
/proc/sys/kernel/random/boot_id) and starts the services again.
"""

from __future__ import annotations

import random
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from orchestrator.db import connect
from orchestrator.errors import TransientError
from orchestrator.journal import Journal, StepRecord
from orchestrator.lock import LeaseLock
from orchestrator.settings import load_settings
from providers.static import StaticProvider
from tests.debian.conftest import SSHD_CONFIG, DebianHost, DebianStack
from tests.debian.test_static_security import STACK, changeover, pending_security

# Two real apt upgrades one after the other, plus audits: minutes on a busy machine.
pytestmark = pytest.mark.timeout(1200)

APP_DIR = "/srv/changeover-test-app"
APP_SCRIPT = "/usr/local/sbin/changeover-test-app"
BOOT_SCRIPT = "/usr/local/sbin/changeover-test-boot"
REBOOT_COMMAND = "/usr/local/sbin/changeover-test-reboot"
REBOOT_LOG = "/var/log/changeover-test-reboots"  # a line per stand-in reboot; /var survives
BOOT_ID = "/proc/sys/kernel/random/boot_id"
STEPS = ("DrainForUpgrade", "UpgradePackages", "RebootServers", "VerifyUpgraded", "ReturnServers")


def _bindable(address: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def _addresses_and_port(count: int) -> tuple[list[str], int]:
    """Loopback addresses no one else uses (all of 127/8 is loopback on Linux), and a
    port free on each of them, for the stand-in apps."""
    for _ in range(50):
        base = f"127.{random.randint(64, 254)}.{random.randint(1, 254)}"
        addresses = [f"{base}.{n}" for n in range(1, count + 1)]
        with socket.socket() as s:
            s.bind((addresses[0], 0))
            port = int(s.getsockname()[1])
        if all(_bindable(a, port) for a in addresses):
            return addresses, port
    raise RuntimeError("no free loopback addresses for the stand-in apps")


def _write(root: Path, path: str, text: str, mode: int = 0o644) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    target.chmod(mode)


def _install(host: DebianHost, address: str, port: int) -> None:
    """The host's app, its boot script and its reboot stand-in, then sshd also on its
    own address and the app started."""
    root = host.root
    _write(root, f"{APP_DIR}/health", "ok\n")
    _write(
        root,
        APP_SCRIPT,
        "#!/bin/sh\n# The stand-in app: /health answers 200 once it is up.\n"
        f"nohup python3 -m http.server --bind {address} --directory {APP_DIR} {port} "
        "</dev/null >>/var/log/changeover-test-app.log 2>&1 &\n"
        "echo $! > /run/changeover-test-app.pid\n",
        0o755,
    )
    _write(
        root,
        BOOT_SCRIPT,
        "#!/bin/sh\n# What this chroot starts at boot: sshd (it daemonizes) and the app.\n"
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin\n"
        "mkdir -p -m 0755 /run/sshd\n"
        f"/usr/sbin/sshd -f {SSHD_CONFIG}\n"
        f"exec {APP_SCRIPT}\n",
        0o755,
    )
    _write(
        root,
        REBOOT_COMMAND,
        "#!/bin/sh\n"
        "# A chroot cannot reboot. As far as changeover can see, this does what a reboot\n"
        "# does: the services stop, /run is cleared (reboot-required with it), the boot id\n"
        "# changes, and the services start again a moment later.\n"
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin\n"
        f'echo "$(date +%s) $(cat {BOOT_ID})" >> {REBOOT_LOG}\n'
        "for f in /run/changeover-test-sshd.pid /run/changeover-test-app.pid; do\n"
        '  [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null\n'
        "done\n"
        "sleep 2\n"
        "find /run -mindepth 1 -delete\n"
        "mkdir -p /var/lib/changeover-test\n"
        "cat /proc/sys/kernel/random/uuid > /var/lib/changeover-test/boot_id\n"
        f"umount {BOOT_ID} 2>/dev/null\n"
        f"mount --bind /var/lib/changeover-test/boot_id {BOOT_ID}\n"
        f"exec {BOOT_SCRIPT}\n",
        0o755,
    )
    config = root / SSHD_CONFIG.lstrip("/")
    config.write_text(config.read_text() + f"ListenAddress {address}\n")
    host.stop()
    host.start()  # the fixture's way (it waits for the banner), now on both addresses
    started = host.run(APP_SCRIPT)
    assert started.returncode == 0, started.stderr
    _wait_http(f"http://{address}:{port}/health")


def _wait_http(url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2.0) as resp:
                if resp.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def _upgradable(stack: DebianStack) -> list[str]:
    """Each host at its own address with its app and its reboot_command, and the role's
    health check asking the app: the fixture's config, rewritten in place."""
    addresses, port = _addresses_and_port(len(stack.hosts))
    text = stack.config.read_text()
    known = stack.known_hosts.read_text()
    for host, address in zip(stack.hosts, addresses, strict=True):
        _install(host, address, port)
        old = f'address = "127.0.0.1", port = {host.port}'
        assert old in text, text
        text = text.replace(
            old, f'address = "{address}", port = {host.port}, reboot_command = "{REBOOT_COMMAND}"'
        )
        known += f"[{address}]:{host.port} {host.host_key_pub}\n"
    stack.known_hosts.write_text(known)
    text += (
        f"[stacks.{STACK}.roles.web]\n"
        "count = 2\n"
        f'health = {{ type = "http", port = {port}, path = "/health" }}\n'
    )
    stack.config.write_text(text)
    return addresses


def _logins(stack: DebianStack) -> list[int]:
    return [h.log.read_text(errors="replace").count("Accepted publickey") for h in stack.hosts]


def _journal(stack: DebianStack, run_id: str) -> list[StepRecord]:
    conn = connect(stack.state_dir)
    try:
        return Journal(conn, LeaseLock(conn)).steps(run_id)
    finally:
        conn.close()


def _boot_id(host: DebianHost) -> str:
    return (host.root / BOOT_ID.lstrip("/")).read_text().strip()


def test_upgrade_security_only_on_a_static_stack_one_host_at_a_time(
    debian_stack: DebianStack,
) -> None:
    """`upgrade --security-only --batch 1` on two real Debian hosts over SSH: each host
    ends with 0 pending security upgrades, its kernel upgraded and rebooted (reboot-
    required cleared), verified through the whole health gate; one batch at a time;
    plan makes no SSH login; audit afterwards counts 0 security upgrades on both."""
    stack = debian_stack
    hosts = stack.hosts
    _upgradable(stack)
    pending_before = {h.id: pending_security(h) for h in hosts}
    for host_id, names in pending_before.items():
        assert any(n.startswith("linux-image-") for n in names), (host_id, names)
    boots_before = {h.id: _boot_id(h) for h in hosts}

    # The plan, and a refused run, read the config only: no host is logged in to.
    logins = _logins(stack)
    code, plan, err = changeover(stack, "plan", "upgrade", STACK, "--security-only")
    assert code == 2, err
    assert "upgrading 1 of the 2 running web server(s) at a time would leave 1 running" in err
    assert "pass --min-healthy 50" in err and "Traceback" not in err
    args = ("--security-only", "--batch", "1", "--min-healthy", "50")
    code, plan, err = changeover(stack, "plan", "upgrade", STACK, *args)
    assert code == 0, err
    assert plan["plan"]["summary"]["batches"] == [["deb-1"], ["deb-2"]]
    assert plan["plan"]["summary"]["not_upgraded"] == {}
    assert [s["key"] for s in plan["plan"]["steps"]] == [
        f"{name}#{n}" for n in (1, 2) for name in STEPS
    ]
    assert plan["api_calls"] == {}  # not one SSH command
    code, _, err = changeover(stack, "upgrade", STACK, "--security-only", "--yes")
    assert code == 2 and "below min-healthy 100%" in err, err
    assert _logins(stack) == logins

    # What audit recommends is what runs: the command, as printed, with --yes.
    code, audit, err = changeover(stack, "audit", STACK)
    assert code == 0, err
    recommended = audit["recommendation"]["command"]
    assert recommended == f"changeover upgrade {STACK} --security-only --min-healthy 50"
    started = time.monotonic()
    code, result, err = changeover(stack, *recommended.split()[1:], "--reboot", "auto", "--yes")
    seconds = time.monotonic() - started
    assert code == 0, err[-3000:]
    assert result["outcome"] == "succeeded", result
    assert result["servers"] == {"created": [], "destroyed": []}
    run_id = result["run_id"]

    # Never two batches at once: batch 1's steps all ended before batch 2's first began.
    steps = _journal(stack, run_id)
    assert [s.key for s in steps] == [f"{name}#{n}" for n in (1, 2) for name in STEPS]
    assert all(s.state == "done" for s in steps), [(s.key, s.state, s.error) for s in steps]
    batch1, batch2 = steps[:5], steps[5:]
    assert max(s.ended_at or 0 for s in batch1) <= min(s.started_at or 0 for s in batch2)
    code, status, err = changeover(stack, "status", run_id)
    assert code == 0, err
    assert [(s["key"], s["state"]) for s in status["steps"]] == [(s.key, "done") for s in steps]

    by_key = {s.key: s for s in steps}
    figures: list[str] = []
    for n, host in enumerate(hosts, start=1):
        drain, upgrade = by_key[f"DrainForUpgrade#{n}"], by_key[f"UpgradePackages#{n}"]
        reboot, verify = by_key[f"RebootServers#{n}"], by_key[f"VerifyUpgraded#{n}"]
        back = by_key[f"ReturnServers#{n}"]
        # Nothing routes to a static host: Drain and Return say so, and do nothing.
        assert drain.noop is not None and "no entry point serves role 'web'" in drain.noop
        assert back.noop is not None and "no entry point serves role 'web'" in back.noop
        assert drain.outputs["removed"] == {} and back.outputs["added"] == {}
        # The journal records each host's upgraded packages, the kernel among them.
        upgraded = upgrade.outputs["servers"][host.id]["upgraded"]
        assert "linux-image-amd64" in upgraded, sorted(upgraded)
        assert upgrade.outputs["servers"][host.id]["reboot_required"] is True
        assert set(pending_before[host.id]) <= set(upgraded)
        # --reboot auto: reboot-required said so, the host rebooted (a new boot id).
        assert reboot.noop is None and reboot.outputs["rebooted"] == [host.id]
        assert _boot_id(host) != boots_before[host.id]
        assert len((host.root / REBOOT_LOG.lstrip("/")).read_text().splitlines()) == 1
        assert not (host.root / "run" / "reboot-required").exists()
        # The whole gate passed after the reboot: app, hygiene, no reboot required.
        report = verify.outputs["reports"][host.id]
        assert report["passed"] and report["app_ok"] and report["hygiene_ok"], report
        assert verify.outputs["passed"] == [host.id]
        after = pending_security(host)
        assert after == [], after
        new = sorted(name for name, change in upgraded.items() if change["from"] is None)
        figures.append(
            f"{host.id}: {len(pending_before[host.id])} security upgrade(s) pending before, "
            f"{len(after)} after; {len(upgraded) - len(new)} package(s) upgraded (the kernel "
            f"among them) and {len(new)} new ({', '.join(new)}); "
            f"upgrade {upgrade.seconds:.0f}s, reboot {reboot.seconds:.0f}s, "
            f"gate {verify.seconds:.1f}s"
        )

    code, audit, err = changeover(stack, "audit", STACK)
    assert code == 0, err
    assert {s["id"]: s["security_count"] for s in audit["servers"]} == {"deb-1": 0, "deb-2": 0}
    assert all(s["reboot_required"] is False for s in audit["servers"]), audit["servers"]
    print(
        f"\nchangeover upgrade {STACK} --security-only --batch 1 on 2 Debian 12 hosts: "
        f"{seconds:.0f}s in all\n  " + "\n  ".join(figures)
    )


def test_a_static_hosts_reboot_command_is_what_the_provider_runs(
    debian_stack: DebianStack,
) -> None:
    """The provider runs a host's `reboot_command` detached over SSH and returns once the
    old boot has ended; boot_state then shows the new boot and no reboot required."""
    _upgradable(debian_stack)
    host = debian_stack.hosts[0]
    (host.root / "run" / "reboot-required").write_text("*** System restart required ***\n")
    provider = StaticProvider(STACK, load_settings(debian_stack.config).stack(STACK))
    before = provider.boot_state(STACK, host.id)
    assert before["reboot_required"] is True
    provider.reboot_server(STACK, host.id)
    deadline = time.monotonic() + 30
    while True:
        try:
            after: dict[str, Any] = provider.boot_state(STACK, host.id)
            break
        except TransientError:  # still coming back up
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert after["boot_id"] != before["boot_id"]
    assert after["reboot_required"] is False
    assert len((host.root / REBOOT_LOG.lstrip("/")).read_text().splitlines()) == 1
