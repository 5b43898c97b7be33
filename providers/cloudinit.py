"""First-boot user data: cloud-init that upgrades every package, reboots if required,
sets up unattended security upgrades (the stack's ``[security]`` policy), then signals
that the server is ready. Merged with the user's own user data.

Unattended upgrades (``security.unattended``, on by default): the package manager and the
distribution are known only on the server, so the cloud-config writes one script
(``write_files``, gzip+base64: EC2 takes at most 16 KB of user data) and runs it
(``runcmd``). At boot it finds them as `changeover security status` does (apt-get or dnf,
``ID`` from /etc/os-release) and runs, for them, the very script `changeover security
enable` runs (orchestrator.security.enable_script): the same files at the same paths with
the same content (security origins only; Automatic-Reboot "false" unless
``security.reboot_at``). apt may be busy right after boot (its daily timers), so the
script tries again a few times. It never holds back the ready signal: a failure is in
/var/log/cloud-init-output.log, and `changeover security status` shows it. With
``unattended = false`` the user data is what it was before the policy existed.

Merging: a `#cloud-config` document from the user is merged key by key (changeover
forces only the three package keys, appends its file to ``write_files`` and its commands
to ``runcmd``, the ready signal last); any other user data (a shell script, an include
file) becomes the second part of a MIME multipart message, which cloud-init runs after
changeover's part.
"""

from __future__ import annotations

import base64
import gzip
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import Any

import yaml

from orchestrator.security import SECURITY_ORIGINS, enable_script
from orchestrator.settings import SecurityPolicy

READY_FILE = "/var/lib/changeover/ready"
READY_COMMAND = f"mkdir -p /var/lib/changeover && date -u +%FT%TZ > {READY_FILE}"
SECURITY_SCRIPT = "/var/lib/changeover/unattended-security.sh"
SECURITY_ATTEMPTS = 5
SECURITY_RETRY_SECONDS = 30

BASE: dict[str, Any] = {
    "package_update": True,
    "package_upgrade": True,
    "package_reboot_if_required": True,
}


def security_script(reboot_at: str | None) -> str:
    """The first-boot script that sets up unattended security upgrades: `security
    enable`'s own script for whichever package manager and distribution it finds."""
    branches = {f"apt_{d}": enable_script("apt", d, reboot_at) for d in SECURITY_ORIGINS}
    branches["dnf"] = enable_script("dnf", "", reboot_at)
    # Each runs in a subshell of its own (`name() ( ... )`), so its `set -e` stops it
    # alone, and it is called as a plain command (not in `&&`/`if`, where -e is ignored).
    functions = "".join(f"enable_{name}() (\n{body})\n" for name, body in branches.items())
    cases = "".join(f"        {d}) run=enable_apt_{d} ;;\n" for d in SECURITY_ORIGINS)
    return (
        "#!/bin/sh\n"
        "# Written by changeover at first boot ([stacks.NAME.security] unattended = true):\n"
        "# unattended upgrades from the security origins only, set up by the script\n"
        "# `changeover security enable` runs.\n"
        + functions
        + 'fail() { echo "changeover: unattended security upgrades not set up: $*" >&2; '
        "exit 1; }\n"
        "if command -v apt-get >/dev/null 2>&1; then\n"
        '    ID=; . /etc/os-release; case "$ID" in\n'
        + cases
        + "        *) fail \"no security origins known for distribution '$ID'\" ;;\n"
        "    esac\n"
        "elif command -v dnf >/dev/null 2>&1; then\n"
        "    run=enable_dnf\n"
        "else\n"
        '    fail "neither apt-get nor dnf found"\n'
        "fi\n"
        f"for attempt in {' '.join(str(i + 1) for i in range(SECURITY_ATTEMPTS))}; do\n"
        '    "$run"; rc=$?\n'
        '    [ "$rc" -eq 0 ] && exit 0\n'
        '    echo "changeover: $run exited $rc (attempt $attempt)" >&2\n'
        f'    [ "$attempt" -lt {SECURITY_ATTEMPTS} ] && sleep {SECURITY_RETRY_SECONDS}\n'
        "done\n"
        f'fail "{SECURITY_ATTEMPTS} attempts failed"\n'
    )


def cloud_config(
    user_config: dict[str, Any] | None = None, security: SecurityPolicy | None = None
) -> dict[str, Any]:
    """changeover's cloud-config, merged over the user's. Without `security` (or with
    `unattended = false`), no unattended upgrades are set up."""
    merged: dict[str, Any] = dict(user_config or {})
    merged.update(BASE)
    ours: list[Any] = []
    if security is not None and security.unattended:
        # Compressed: EC2 takes 16 KB of user data, and the script is 6-7 KB as text.
        script = security_script(security.reboot_at).encode()
        entry = {
            "path": SECURITY_SCRIPT,
            "owner": "root:root",
            "permissions": "0700",
            "encoding": "gz+b64",
            "content": base64.b64encode(gzip.compress(script, mtime=0)).decode(),
        }
        merged["write_files"] = [*list(merged.get("write_files") or []), entry]
        ours.append(["sh", SECURITY_SCRIPT])
    # The ready signal runs last, after the user's own commands and after any reboot.
    merged["runcmd"] = [*list(merged.get("runcmd", [])), *ours, READY_COMMAND]
    return merged


def first_boot_user_data(
    user_data: str | None = None, security: SecurityPolicy | None = None
) -> str:
    """The user data to launch with: ours alone, merged, or multipart. Pass the stack's
    `security` policy (StackConfig.security); None sets up no unattended upgrades."""
    text = (user_data or "").strip()
    if not text:
        return "#cloud-config\n" + yaml.safe_dump(cloud_config(None, security), sort_keys=False)
    if text.startswith("#cloud-config"):
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ValueError("user data #cloud-config is not a mapping")
        return "#cloud-config\n" + yaml.safe_dump(cloud_config(loaded, security), sort_keys=False)
    message = MIMEMultipart()
    ours = "#cloud-config\n" + yaml.safe_dump(cloud_config(None, security), sort_keys=False)
    message.attach(MIMEText(ours, "cloud-config"))
    subtype = "x-shellscript" if text.startswith("#!") else "x-include-url"
    message.attach(MIMEText(text, subtype))
    return message.as_string()
