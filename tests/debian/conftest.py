"""Real Debian 12 hosts for the tests: debootstrap chroots, each with a real sshd.

`build-chroot.sh` makes the chroot (minbase from bookworm's main suite, then
bookworm-security added, so real security upgrades, a kernel among them, are pending).
The result is cached as a tarball under ``~/.cache/changeover/`` named by the script's
hash: the first run builds it (one to two minutes), later runs unpack it. A file lock
keeps parallel test workers from building it twice.

Each test that asks for hosts gets fresh copies: every host is its own chroot, with
/proc mounted, its own SSH host key, a root login by a key the test made, and a real
``/usr/sbin/sshd`` from the chroot listening on a free port of 127.0.0.1 only. At
teardown every sshd and every process still running inside the chroot is stopped,
/proc is unmounted and the chroot removed, even when the test failed.

A chroot cannot reboot: `reboot()` stands for it by stopping the host's sshd, clearing
/run (so /var/run/reboot-required goes, as a reboot clears it) and starting sshd again.
Its boot id (the machine's) does not change.

Needs root, debootstrap and the Debian mirror: CI (.ci/run) has all three; elsewhere the
tests skip with the reason, except under CI, where they fail.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

BUILD_SCRIPT = Path(__file__).with_name("build-chroot.sh")
CACHE_DIR = Path("~/.cache/changeover").expanduser()
MIRROR = "http://deb.debian.org/debian"  # what this machine's apt uses
BUILD_TIMEOUT = 1200.0  # seconds for a fresh build (measured: 55 s to 2 min)
READY_TIMEOUT = 15.0  # seconds for a chroot's sshd to answer with its banner
HOST_KEY = "/etc/ssh/changeover_test_host_ed25519_key"
SSHD_CONFIG = "/etc/ssh/changeover_test_sshd_config"


def _need(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run the real-Debian tests: see .ci/run)")
    pytest.skip(reason)


def recipe_key() -> str:
    """The cache key: the build script's hash (edit the recipe, get a new chroot)."""
    return hashlib.sha256(BUILD_SCRIPT.read_bytes()).hexdigest()[:16]


def chroot_tarball() -> Path:
    """The built chroot as a tarball, built now if the cache has none for this recipe."""
    if os.geteuid() != 0:
        _need("the Debian chroot tests need root (debootstrap, chroot, mount)")
    if shutil.which("debootstrap") is None:
        _need("debootstrap is missing (apt-get install debootstrap)")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tarball = CACHE_DIR / f"debian12-chroot-{recipe_key()}.tar.zst"
    with (CACHE_DIR / f"{tarball.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait, then reuse
        if tarball.exists():
            return tarball
        build = CACHE_DIR / f"build-{recipe_key()}-{os.getpid()}"
        shutil.rmtree(build, ignore_errors=True)
        try:
            started = time.monotonic()
            proc = subprocess.run(
                ["sh", str(BUILD_SCRIPT), str(build), MIRROR],
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT,
                check=False,
            )
            if proc.returncode != 0:
                output = proc.stdout[-3000:] + proc.stderr[-3000:]
                pytest.fail(f"building the Debian chroot failed:\n{output}")
            partial = tarball.with_suffix(".partial")
            subprocess.run(
                ["tar", "--zstd", "--numeric-owner", "-C", str(build), "-cf", str(partial), "."],
                check=True,
                capture_output=True,
            )
            partial.rename(tarball)
            (CACHE_DIR / f"{tarball.name}.built").write_text(
                f"built in {time.monotonic() - started:.0f}s\n{proc.stdout[-2000:]}"
            )
        finally:
            _unmount_all(build)
            shutil.rmtree(build, ignore_errors=True)
    return tarball


def _mounts_under(root: Path) -> list[str]:
    prefix = str(root.resolve()) + "/"
    with open("/proc/self/mounts") as fh:
        points = [line.split()[1] for line in fh]
    return sorted((p for p in points if (p + "/").startswith(prefix)), reverse=True)


def _unmount_all(root: Path) -> None:
    for point in _mounts_under(root):
        if subprocess.run(["umount", point], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def _pids_inside(root: Path) -> list[int]:
    """Processes whose root directory is this chroot (all of them started by the test)."""
    target = str(root.resolve())
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "root") == target:
                    pids.append(int(entry.name))
    return pids


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


@dataclass
class DebianHost:
    """One chroot with its sshd: a static stack's host."""

    id: str
    root: Path
    port: int
    host_key_pub: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def run(self, *command: str) -> subprocess.CompletedProcess[str]:
        """Run a command inside the chroot directly (the test's own look, not over SSH)."""
        return subprocess.run(
            ["chroot", str(self.root), *command],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"},
        )

    def start(self) -> None:
        (self.root / "run" / "sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(
                ["chroot", str(self.root), "/usr/sbin/sshd", "-D", "-e", "-f", SSHD_CONFIG],
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd in {self.root} exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as conn:
                    if conn.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd in {self.root} did not answer within {READY_TIMEOUT}s")

    def stop(self) -> None:
        """Stop sshd and everything else running inside the chroot."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = _pids_inside(self.root)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if pids:
                time.sleep(0.5)

    def reboot(self) -> None:
        """What stands for a reboot here: sshd stopped, /run cleared, sshd started."""
        self.stop()
        run = self.root / "run"
        for entry in run.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        self.start()


@dataclass
class DebianStack:
    """Two Debian hosts as a `static` stack, and the files its config names."""

    hosts: list[DebianHost]
    known_hosts: Path
    client_key: Path
    config: Path
    state_dir: Path

    def host(self, server_id: str) -> DebianHost:
        return next(h for h in self.hosts if h.id == server_id)


def _unpack(tarball: Path, root: Path) -> None:
    root.mkdir()
    subprocess.run(
        ["tar", "--zstd", "--numeric-owner", "-C", str(root), "-xf", str(tarball)],
        check=True,
        capture_output=True,
    )


def _prepare(host: DebianHost, client_pub: str, host_key: Path) -> None:
    root = host.root
    shutil.copy(host_key, root / HOST_KEY.lstrip("/"))
    (root / HOST_KEY.lstrip("/")).chmod(0o600)
    ssh_dir = root / "root" / ".ssh"
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(client_pub + "\n")
    (ssh_dir / "authorized_keys").chmod(0o600)
    (root / SSHD_CONFIG.lstrip("/")).write_text(
        f"Port {host.port}\n"
        "ListenAddress 127.0.0.1\n"
        f"HostKey {HOST_KEY}\n"
        "AuthorizedKeysFile /root/.ssh/authorized_keys\n"
        "PidFile /run/changeover-test-sshd.pid\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        "PermitRootLogin prohibit-password\n"
        "LogLevel VERBOSE\n"
    )
    shutil.copy("/etc/resolv.conf", root / "etc" / "resolv.conf")
    subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)


@pytest.fixture
def debian_stack(tmp_path: Path) -> Iterator[DebianStack]:
    """Two fresh Debian 12 hosts with security upgrades pending, as a static stack."""
    if shutil.which("ssh-keygen") is None:
        _need("ssh-keygen is missing (apt-get install openssh-client)")
    tarball = chroot_tarball()
    client_pub = _keygen(tmp_path / "client_key")
    hosts: list[DebianHost] = []
    try:
        for n in (1, 2):
            root = tmp_path / f"deb-{n}"
            _unpack(tarball, root)
            key = tmp_path / f"host_key_{n}"
            host = DebianHost(
                f"deb-{n}", root, _free_port(), _keygen(key), tmp_path / f"sshd-{n}.log"
            )
            hosts.append(host)
            _prepare(host, client_pub, key)
            host.start()
        known = tmp_path / "known_hosts"
        known.write_text("".join(f"[127.0.0.1]:{h.port} {h.host_key_pub}\n" for h in hosts))
        config = tmp_path / "changeover.toml"
        rows = ",\n".join(
            f'  {{ id = "{h.id}", address = "127.0.0.1", port = {h.port}, user = "root", '
            'role = "web" }'
            for h in hosts
        )
        config.write_text(
            "[stacks.deb]\n"
            'provider = "static"\n'
            "[stacks.deb.static]\n"
            f"hosts = [\n{rows}\n]\n"
            "[stacks.deb.hygiene]\n"
            'pending = "security"\n'
            "[stacks.deb.hygiene.ssh]\n"
            f'known_hosts = "{known}"\n'
            f'key_file = "{tmp_path / "client_key"}"\n'
            "timeout = 20.0\n"
        )
        yield DebianStack(hosts, known, tmp_path / "client_key", config, tmp_path / "state")
    finally:
        for host in hosts:
            host.stop()
            _unmount_all(host.root)
        for host in hosts:
            if not _mounts_under(host.root):  # never delete through a live mount
                shutil.rmtree(host.root, ignore_errors=True)


@pytest.fixture
def reboot_hook(debian_stack: DebianStack) -> Callable[..., None]:
    """The static provider's reboot hook for these hosts (a chroot cannot reboot)."""

    def hook(server: object) -> None:
        debian_stack.host(str(getattr(server, "id", ""))).reboot()

    return hook
