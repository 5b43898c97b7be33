"""A real sshd on 127.0.0.1 for the SSH tests: its own port, keys and config in a tmp dir.

The system's sshd and its config are never touched. sshd run as root needs its
privilege-separation directory (/run/sshd), which the openssh-server service would
normally create; the fixture creates it if missing. CI (.ci/run) installs
openssh-server; elsewhere the SSH tests skip when there is no sshd.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"
READY_TIMEOUT = 10.0  # seconds for sshd to answer with its banner


@dataclass
class Sshd:
    """A running test sshd and the files a client needs to reach it."""

    port: int
    user: str
    dir: Path
    host_key_pub: str  # "ssh-ed25519 AAAA..."
    client_key: Path
    known_hosts: Path
    log: Path

    def known_hosts_with(self, key_pub: str) -> Path:
        """A known_hosts file that lists `key_pub` for this sshd."""
        path = self.dir / f"known_hosts-{abs(hash(key_pub))}"
        path.write_text(f"[127.0.0.1]:{self.port} {key_pub}\n")
        return path

    def sessions(self) -> list[str]:
        """Log lines of logins and commands: proof of whether anything ran."""
        text = self.log.read_text(errors="replace")
        return [ln for ln in text.splitlines() if "Accepted" in ln or "Starting session" in ln]


def keygen(path: Path) -> str:
    """Make an ed25519 key pair; return the public key's 'type base64' fields."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_banner(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited: {log.read_text(errors='replace')[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as conn:
                if conn.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd on port {port} did not answer within {READY_TIMEOUT}s")


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    """An sshd on a free loopback port that lets the current user in with a test key."""
    with running_sshd(tmp_path) as server:
        yield server


@contextlib.contextmanager
def running_sshd(tmp_path: Path, extra_config: str = "") -> Iterator[Sshd]:
    """Start the test sshd (with `extra_config` lines appended to its sshd_config);
    stop it on the way out, even when the test fails."""
    if not Path(SSHD).exists() or shutil.which("ssh-keygen") is None:
        if os.environ.get("CI"):
            pytest.fail("sshd is missing in CI: .ci/run installs openssh-server")
        pytest.skip("no sshd here (apt-get install openssh-server)")
    d = tmp_path / "sshd"
    d.mkdir()
    host_pub = keygen(d / "host_key")
    client_pub = keygen(d / "client_key")
    (d / "authorized_keys").write_text(client_pub + "\n")
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\n"
        "ListenAddress 127.0.0.1\n"
        f"HostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\n"
        f"PidFile {d / 'sshd.pid'}\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        "StrictModes no\n"  # tmp dirs are not owned the way sshd wants for ~/.ssh
        "PermitRootLogin prohibit-password\n"
        "LogLevel VERBOSE\n" + extra_config
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    log = d / "sshd.log"
    with log.open("wb") as log_fh:
        proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        _wait_banner(port, proc, log)
        known = d / "known_hosts"
        known.write_text(f"[127.0.0.1]:{port} {host_pub}\n")
        yield Sshd(port, getpass.getuser(), d, host_pub, d / "client_key", known, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
