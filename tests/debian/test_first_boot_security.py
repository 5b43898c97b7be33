"""The first-boot security script on a real Debian 12 (a debootstrap chroot): cloud-init's
own code writes the files and builds the runcmd script from changeover's cloud-config,
the runcmd script runs in the chroot, and `security status`'s own script then reads
back what apt will really use: unattended-upgrades from the security origins only.

Needs root, debootstrap, the Debian mirror (tests/debian/conftest.py) and Debian's
cloud-init package (its Python modules): CI (.ci/run) has them all; elsewhere the test
skips with the reason, except under CI, where it fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from orchestrator.security import (
    STATUS_SCRIPT,
    is_security_origin,
    parse_allowed_origins,
    parse_status,
)
from orchestrator.settings import SecurityPolicy
from providers.cloudinit import READY_FILE, SECURITY_SCRIPT, first_boot_user_data
from tests.debian.conftest import (
    _mounts_under,
    _need,
    _pids_inside,
    _unmount_all,
    _unpack,
    chroot_tarball,
)

# A dry run of unattended-upgrade with the chroot's security upgrades pending.
pytestmark = pytest.mark.timeout(900)
RUNCMD = "/var/lib/cloud/instance/scripts/runcmd"  # where cloud-init puts it

# Run by cloud-init's own Python: its write_files module writes the entries (decoding
# gz+b64, setting modes) under the chroot, and util.shellify makes the runcmd script.
CLOUD_INIT_CODE = """
import json, sys
from cloudinit import util
from cloudinit.config.cc_write_files import write_files
root, doc = sys.argv[1], json.load(sys.stdin)
files = [dict(f, path=root + f["path"]) for f in doc["write_files"]]
write_files("write_files", files, "root:root")
util.write_file(root + sys.argv[2], util.shellify(doc["runcmd"]), mode=0o700)
"""


def cloud_init_python() -> str:
    """The interpreter Debian's cloud-init runs on (its command's #! line)."""
    tool = shutil.which("cloud-init")
    if tool is None:
        _need("cloud-init is missing (apt-get install --no-install-recommends cloud-init)")
    first = Path(str(tool)).read_text(errors="replace").splitlines()[0]
    return first.removeprefix("#!").split()[0]


def in_chroot(root: Path, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["chroot", str(root), *command],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"},
    )


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A fresh Debian 12 root (unattended-upgrades with Debian's default origins)."""
    python = cloud_init_python()
    root = tmp_path / "fresh"
    _unpack(chroot_tarball(), root)
    shutil.copy("/etc/resolv.conf", root / "etc" / "resolv.conf")
    subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
    try:
        yield python, root
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _pids_inside(root):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        _unmount_all(root)
        if not _mounts_under(root):  # never delete through a live mount
            shutil.rmtree(root, ignore_errors=True)


def test_first_boot_sets_up_security_only_unattended_upgrades(fresh: tuple[str, Path]) -> None:
    """The default policy's cloud-config, applied with cloud-init's own modules: before,
    Debian's default origins (not security-only); after, security origins only, the
    periodic switches on, no automatic reboot, the dry run clean, the ready file
    written. A distribution it has no origins for fails loudly but never holds back
    the ready signal."""
    python, root = fresh
    before = parse_status("fresh", in_chroot(root, "sh", "-c", STATUS_SCRIPT).stdout)
    assert before.installed and not before.security_only and not before.managed

    doc = yaml.safe_load(first_boot_user_data(None, SecurityPolicy()))
    proc = subprocess.run(
        [python, "-c", CLOUD_INIT_CODE, str(root), RUNCMD],
        input=json.dumps(doc),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert (root / SECURITY_SCRIPT.lstrip("/")).stat().st_mode & 0o777 == 0o700

    # An unknown distribution: the script says so and fails; the ready signal still comes.
    os_release = root / "etc" / "os-release"
    real = os_release.read_text()
    os_release.write_text(real.replace("ID=debian", "ID=notdebian"))
    try:
        out = in_chroot(root, "sh", RUNCMD)
    finally:
        os_release.write_text(real)
    assert "no security origins known for distribution 'notdebian'" in out.stderr, out.stderr
    assert (root / READY_FILE.lstrip("/")).exists()
    (root / READY_FILE.lstrip("/")).unlink()

    out = in_chroot(root, "sh", RUNCMD)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "@@changeover-exit dry-run 0" in out.stdout, out.stdout[-3000:]
    allowed = parse_allowed_origins(out.stdout)  # unattended-upgrade's own words
    assert allowed and all(is_security_origin(o) for o in allowed), allowed
    assert "changeover:" not in out.stderr, out.stderr  # no failed attempt
    assert (root / READY_FILE.lstrip("/")).exists()

    after = parse_status("fresh", in_chroot(root, "sh", "-c", STATUS_SCRIPT).stdout)
    assert after.error is None and after.family == "apt" and after.distro == "debian"
    assert after.installed and after.enabled and after.managed and after.security_only
    assert after.origins and all(is_security_origin(o) for o in after.origins)
    assert after.automatic_reboot is False
