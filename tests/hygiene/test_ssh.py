"""The SSH transport against a real sshd on 127.0.0.1: host keys, retries, a real audit."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.models import Server
from orchestrator.rehearse import World
from orchestrator.settings import SshOptions
from providers.ssh import SshTransport, host_keys_from_console
from providers.transport import HostKeyRejected, TransportUnavailable
from tests.hygiene.conftest import Sshd, keygen

SERVER = Server("srv-ssh", "demo", "web", 1, "run", "running", host="127.0.0.1", port=1)


def options(sshd: Sshd, known_hosts: Path | None = None, **kw: object) -> SshOptions:
    return SshOptions.model_validate(
        {
            "user": sshd.user,
            "port": sshd.port,
            "known_hosts": str(known_hosts or sshd.known_hosts),
            "key_file": str(sshd.client_key),
            "timeout": 5.0,
            **kw,
        }
    )


def test_command_runs_once_the_host_key_matches(sshd: Sshd) -> None:
    """A known host key: the command runs, with its stdout, stderr and exit status."""
    result = SshTransport(options(sshd)).run(SERVER, "echo out; echo err >&2; exit 3")
    assert (result.exit_status, result.stdout, result.stderr) == (3, "out\n", "err\n")


def test_changed_host_key_is_refused_before_anything_runs(sshd: Sshd, tmp_path: Path) -> None:
    """Another key in known_hosts: HostKeyRejected, no login, no command (I9)."""
    other = keygen(tmp_path / "other")
    marker = tmp_path / "ran"
    transport = SshTransport(options(sshd, sshd.known_hosts_with(other)))
    with pytest.raises(HostKeyRejected, match="CHANGED") as err:
        transport.run(SERVER, f"touch {marker}")
    assert err.value.exit_code == 2
    assert not marker.exists()
    assert sshd.sessions() == []


def test_unknown_host_key_is_refused(sshd: Sshd, tmp_path: Path) -> None:
    """No entry for the host: refused rather than trusted on first use."""
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(HostKeyRejected, match="unknown"):
        SshTransport(options(sshd, empty)).run(SERVER, "true")
    assert sshd.sessions() == []


def test_pinned_host_keys_are_used_instead_of_known_hosts(sshd: Sshd, tmp_path: Path) -> None:
    """Keys the provider pins (e.g. from cloud-init's console) decide, right or wrong."""
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    pinned = SshTransport(options(sshd, empty), host_keys=lambda s: [sshd.host_key_pub])
    assert pinned.run(SERVER, "echo pinned").stdout == "pinned\n"
    wrong = keygen(tmp_path / "wrong")
    with pytest.raises(HostKeyRejected, match="CHANGED"):
        SshTransport(options(sshd), host_keys=lambda s: [wrong]).run(SERVER, "true")


def test_host_keys_are_read_from_cloud_init_console_output() -> None:
    """The block cloud-init prints on the console yields the keys to pin."""
    console = (
        "[   12.3] cloud-init[800]: Cloud-init v. 23.1 finished\n"
        "-----BEGIN SSH HOST KEY KEYS-----\n"
        "ecdsa-sha2-nistp256 AAAAE2VjZHNh root@ip-10-0-0-1\n"
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 root@ip-10-0-0-1\n"
        "-----END SSH HOST KEY KEYS-----\n"
    )
    assert host_keys_from_console(console) == [
        "ecdsa-sha2-nistp256 AAAAE2VjZHNh",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5",
    ]


def test_unreachable_server_is_retried_a_bounded_number_of_times(sshd: Sshd) -> None:
    """Connection refused: `attempts` tries with a doubling backoff, then unavailable."""
    waits: list[float] = []
    closed = Server("srv-gone", "demo", "web", 1, "run", "running", host="127.0.0.1", port=1)
    transport = SshTransport(options(sshd, port=1, attempts=3), sleep=waits.append)
    with pytest.raises(TransportUnavailable, match="after 3 attempt"):
        transport.run(closed, "true")
    assert waits == [0.5, 1.0]


def test_a_command_past_its_timeout_is_not_run_again(sshd: Sshd, tmp_path: Path) -> None:
    """A started command that times out fails; it is never retried (it may not be idempotent)."""
    count = tmp_path / "count"
    transport = SshTransport(options(sshd, attempts=3), sleep=lambda s: None)
    with pytest.raises(TransportUnavailable, match="did not finish"):
        # 2 s, not less: on a loaded machine the session may take a second to start.
        transport.run(SERVER, f"echo x >> {count}; sleep 6", timeout=2.0)
    assert count.read_text() == "x\n"


def _ssh_world(make_world: Callable[..., World], sshd: Sshd, known_hosts: Path) -> World:
    ssh = {
        "user": sshd.user,
        "port": sshd.port,
        "known_hosts": str(known_hosts),
        "key_file": str(sshd.client_key),
    }
    return make_world(roles={"web": {"count": 1}}, hygiene={"transport": "ssh", "ssh": ssh})


def _os_release() -> dict[str, str]:
    out = {}
    for line in Path("/etc/os-release").read_text().splitlines():
        key, _, value = line.partition("=")
        out[key] = value.strip('"')
    return out


def test_audit_of_this_machine_over_ssh_returns_its_real_facts(
    make_world: Callable[..., World], sshd: Sshd
) -> None:
    """`changeover audit` over SSH reports this machine's OS, kernel, Python and pending count."""
    world = _ssh_world(make_world, sshd, sshd.known_hosts)
    code, report = world.cli_json("audit", "demo")
    assert code == 0, report["_stderr"]
    assert report["transport"] == "ssh" and not report["simulated"]
    (server,) = report["servers"]
    facts = server["facts"]
    assert facts["errors"] == {}
    assert facts["os"]["pretty_name"] == _os_release()["PRETTY_NAME"]
    assert facts["kernel"]["running"] == os.uname().release
    # The python3 a login shell finds on the fact script's PATH, not this test's venv.
    python = subprocess.run(
        [
            "sh",
            "-c",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin; python3 --version",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert facts["components"]["python"] == python.stdout.split()[1]
    assert 0 < facts["uptime"] <= float(Path("/proc/uptime").read_text().split()[0]) + 1
    if shutil.which("apt"):
        listed = subprocess.run(
            ["apt", "list", "--upgradable"],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "LC_ALL": "C"},
        ).stdout
        assert facts["pending_count"] == listed.count("[upgradable from:")
    assert any("Accepted publickey" in line for line in sshd.sessions())


def test_audit_refuses_a_changed_host_key_with_exit_2(
    make_world: Callable[..., World], sshd: Sshd, tmp_path: Path
) -> None:
    """A changed key: exit 2, the server marked refused, no login, no key material shown."""
    other = keygen(tmp_path / "other")
    world = _ssh_world(make_world, sshd, sshd.known_hosts_with(other))
    proc = world.cli("--output", "json", "audit", "demo")
    assert proc.returncode == 2, proc.stderr
    assert '"refused": true' in proc.stdout and "CHANGED" in proc.stdout
    assert sshd.sessions() == []
    secret = "".join(sshd.client_key.read_text().splitlines()[1:-1])
    for text in (
        proc.stdout,
        proc.stderr,
        (world.state_dir / "changeover.db").read_bytes().decode(errors="replace"),
    ):
        assert secret[:40] not in text
