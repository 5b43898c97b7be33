"""First-boot user data: cloud-init that upgrades every package, reboots if required,
then signals that the server is ready. Merged with the user's own user data.

Merging: a `#cloud-config` document from the user is merged key by key (changeover
forces only the three package keys and appends its ready signal); any other user data
(a shell script, an include file) becomes the second part of a MIME multipart message,
which cloud-init runs after changeover's part.
"""

from __future__ import annotations

from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import Any

import yaml

READY_FILE = "/var/lib/changeover/ready"
READY_COMMAND = f"mkdir -p /var/lib/changeover && date -u +%FT%TZ > {READY_FILE}"

BASE: dict[str, Any] = {
    "package_update": True,
    "package_upgrade": True,
    "package_reboot_if_required": True,
}


def cloud_config(user_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """changeover's cloud-config, merged over the user's."""
    merged: dict[str, Any] = dict(user_config or {})
    merged.update(BASE)
    # The ready signal runs last, after the user's own commands and after any reboot.
    merged["runcmd"] = [*list(merged.get("runcmd", [])), READY_COMMAND]
    return merged


def first_boot_user_data(user_data: str | None = None) -> str:
    """The user data to launch with: ours alone, merged, or multipart."""
    text = (user_data or "").strip()
    if not text:
        return "#cloud-config\n" + yaml.safe_dump(cloud_config(), sort_keys=False)
    if text.startswith("#cloud-config"):
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ValueError("user data #cloud-config is not a mapping")
        return "#cloud-config\n" + yaml.safe_dump(cloud_config(loaded), sort_keys=False)
    message = MIMEMultipart()
    ours = "#cloud-config\n" + yaml.safe_dump(cloud_config(), sort_keys=False)
    message.attach(MIMEText(ours, "cloud-config"))
    subtype = "x-shellscript" if text.startswith("#!") else "x-include-url"
    message.attach(MIMEText(text, subtype))
    return message.as_string()
