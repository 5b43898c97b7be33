"""SSH host keys pinned from the provider before the first connection (never TOFU).

A fresh cloud server's host key is in no known_hosts file, and changeover never trusts
a key on first use (I9). So a provider pins each new server's keys from a channel it
already trusts, its own authenticated API: cloud-init prints the server's host keys on
the serial console between ``-----BEGIN SSH HOST KEY KEYS-----`` and
``-----END SSH HOST KEY KEYS-----`` (its ``keys_to_console`` module, on by default),
and EC2's GetConsoleOutput or OpenStack's os-getConsoleOutput return that console.

- ``VerifyServers`` asks the provider to pin its servers (``Provider.pin_host_keys``)
  before the gate connects to them, and records the pins in the journal. A step that
  runs again in a new process hands the recorded pins back (``known``): the same keys
  are used, and the console is not read again.
- Right after boot the console may show no keys yet (cloud-init prints them late):
  that is transient (``HostKeysUnknown``), polled by the step's retry until the gate's
  timeout, unless a known_hosts file lists the server's address. Past the timeout the
  gate fails with a message that says how to provide the keys.
- Servers this process did not pin (the old generation's db for the freeze hooks, a
  server of a resumed run, an audit) are looked up when first used: their console once;
  without keys there, the SSH transport's known_hosts decides.
- Pins win over known_hosts. A server that offers another key is refused
  (``HostKeyRejected``) before authentication, so nothing is sent.

Nothing here imports paramiko: the SSH transport is the optional ``ssh`` extra.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from orchestrator.errors import BadInput, TransientError
from orchestrator.models import Server
from orchestrator.settings import SshOptions
from providers.transport import Transport

BEGIN = "-----BEGIN SSH HOST KEY KEYS-----"
END = "-----END SSH HOST KEY KEYS-----"
KEY_TYPES = ("ssh-", "ecdsa-", "sk-")

# The serial console of a server, as text (None: the provider has no console for it).
ConsoleReader = Callable[[Server], str | None]

HOW_TO = (
    "changeover never trusts a host key on first use. Let cloud-init print the host keys "
    "on the console (its keys_to_console module, on by default: keep "
    "`ssh: {emit_keys_to_console: true}` and leave the key types out of "
    "`ssh_key_console_blacklist`), or add the server's key to the file "
    "hygiene.ssh.known_hosts names"
)


def host_keys_from_console(console: str) -> list[str]:
    """The host keys cloud-init prints on the serial console, as known_hosts key fields
    ("type base64"), so a provider can pin them before the first connection."""
    keys: list[str] = []
    inside = False
    for line in console.splitlines():
        text = line.strip()
        if BEGIN in text:
            inside = True
        elif END in text:
            inside = False
        elif inside:
            parts = text.split()
            if len(parts) >= 2 and parts[0].startswith(KEY_TYPES):
                keys.append(f"{parts[0]} {parts[1]}")
    return keys


class HostKeysUnknown(TransientError):
    """No host key can be pinned for these servers yet. Transient: the console shows the
    keys once cloud-init gets to it; the message says what to do if it never does."""

    def __init__(self, servers: Sequence[Server], *, console: bool) -> None:
        self.server_ids = [s.id for s in servers]
        named = ", ".join(f"{s.id} ({s.host or 'no address'})" for s in servers)
        seen = (
            "its console output shows no SSH host keys"
            if console
            else "this provider cannot read its console"
        )
        super().__init__(
            f"no SSH host key to check {named} against: {seen}, and no known_hosts file "
            f"lists it. {HOW_TO}"
        )


def ssh_transport(options: SshOptions, pins: HostKeyPins) -> Transport:
    """An SSH transport that checks host keys against `pins` (then known_hosts)."""
    try:
        from providers.ssh import SshTransport  # noqa: PLC0415 (paramiko only when used)
    except ImportError as exc:
        raise BadInput(f"the ssh transport needs: pip install 'changeover[ssh]' ({exc})") from None
    return SshTransport(options, host_keys=pins)


class HostKeyPins:
    """The host keys pinned per server id: the ``HostKeySource`` of a provider's SSH
    transport. Thread-safe (audits ask many servers at once)."""

    def __init__(self, console: ConsoleReader | None = None) -> None:
        self.console = console
        self.transport: Any = None  # the SSH transport that checks against these pins
        self._pins: dict[str, list[str]] = {}
        self._looked: set[str] = set()  # not pinned here; the console had no keys
        self._lock = threading.Lock()

    def attach(self, transport: Transport | None) -> bool:
        """Become `transport`'s host-key source if it is an SSH transport without one.
        True when SSH to the provider's servers checks these pins."""
        ssh: Any = transport
        if getattr(ssh, "name", None) != "ssh" or not hasattr(ssh, "host_keys"):
            return False
        if ssh.host_keys is None:
            ssh.host_keys = self
        if ssh.host_keys is not self:
            return False  # its owner pins keys its own way
        self.transport = ssh
        return True

    @property
    def active(self) -> bool:
        return self.transport is not None

    def get(self, server_id: str) -> list[str] | None:
        with self._lock:
            keys = self._pins.get(server_id)
            return list(keys) if keys is not None else None

    def pin(self, server_id: str, keys: Sequence[str]) -> None:
        """Pin `keys` for a server. The first pin stands: it is what was recorded."""
        lines = [str(k).strip() for k in keys if str(k).strip()]
        if not lines:
            return
        with self._lock:
            self._pins.setdefault(server_id, lines)
            self._looked.discard(server_id)

    def snapshot(self) -> dict[str, list[str]]:
        with self._lock:
            return {k: list(v) for k, v in self._pins.items()}

    def __call__(self, server: Server) -> list[str]:
        """The keys `server` may present: pinned, or else its console's, read once."""
        with self._lock:
            if server.id in self._pins:
                return list(self._pins[server.id])
            if server.id in self._looked or self.console is None:
                return []
        keys = host_keys_from_console(self.console(server) or "")
        if keys:
            self.pin(server.id, keys)
            return self.get(server.id) or keys
        with self._lock:
            self._looked.add(server.id)
        return []

    def listed(self, server: Server) -> bool:
        """Whether a known_hosts file of the transport lists the server's address."""
        known = getattr(self.transport, "known_host_keys", None)
        return bool(server.host and callable(known) and known(server.host))

    def pin_servers(
        self,
        servers: Sequence[Server],
        known: Mapping[str, Sequence[str]],
        *,
        reach: Callable[[Server], Server] | None = None,
    ) -> dict[str, list[str]]:
        """Pin `servers` before the first connection; return their pins by id.

        Every pin in `known` (recorded in the journal) is installed first and wins; the
        others come from each server's console. A server with neither, whose SSH address
        (`reach`, if it differs from `host`) no known_hosts file lists, raises
        HostKeysUnknown (transient: its console may show the keys on a later poll).
        Without an SSH transport this is a no-op: {}."""
        if not self.active:
            return {}
        for server_id, recorded in known.items():
            if isinstance(recorded, (list, tuple)):
                self.pin(server_id, recorded)
        pinned: dict[str, list[str]] = {}
        waiting: list[Server] = []
        for server in servers:
            keys = self.get(server.id)
            if keys is None and self.console is not None:
                self.pin(server.id, host_keys_from_console(self.console(server) or ""))
                keys = self.get(server.id)
            if keys:
                pinned[server.id] = keys
            elif not self.listed(reach(server) if reach is not None else server):
                waiting.append(server)
        if waiting:
            raise HostKeysUnknown(waiting, console=self.console is not None)
        return pinned
