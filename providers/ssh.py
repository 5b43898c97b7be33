"""SSH transport (paramiko) that verifies host keys and never trusts on first use.

A server's host key must match either keys pinned by its provider (for example the ones
cloud-init prints on the console: providers/hostkeys.py pins them, VerifyServers records
them in the journal) or a known_hosts file
(`hygiene.ssh.known_hosts`, else ``~/.ssh/known_hosts`` and
``/etc/ssh/ssh_known_hosts``). An unknown key or a changed key raises `HostKeyRejected`
(exit 2). paramiko checks the key right after the key exchange, before it
authenticates, so a refused server gets neither credentials nor a command (I9).

Connection failures (refused, timed out, no banner) are retried `ssh.attempts` times
with a doubling backoff; a command that has started is never re-run, because it may not
be idempotent. Errors name the host and the key fingerprints (public data), never key
material.

    ChangeoverError
    ├── BadInput              the key file or known_hosts file named in config is missing
    ├── PreconditionFailed
    │   ├── HostKeyRejected   unknown or changed host key: nothing was sent
    │   └── (auth failure)    the server refused our key
    └── TransientError
        └── TransportUnavailable  unreachable after every attempt, or the command timed out
"""

from __future__ import annotations

import base64
import hashlib
import select
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import paramiko

from orchestrator.errors import BadInput, PreconditionFailed
from orchestrator.log import get_logger
from orchestrator.models import Server
from orchestrator.settings import SshOptions
from providers.hostkeys import host_keys_from_console  # noqa: F401 (its first home)
from providers.transport import CommandResult, HostKeyRejected, TransportUnavailable

# Log event names (see orchestrator/events.py for the run's own).
SSH_HOSTKEY_REFUSED = "ssh.hostkey_refused"
SSH_RETRY = "ssh.retry"

BACKOFF = 0.5  # seconds before the second connection attempt; doubles after that
MAX_OUTPUT = 16 * 1024 * 1024  # bytes kept of a command's stdout (and of its stderr)
POLL = 0.2  # seconds between checks of a running command's channel
DEFAULT_KNOWN_HOSTS = ("~/.ssh/known_hosts", "/etc/ssh/ssh_known_hosts")

HostKeySource = Callable[[Server], Sequence[str]]


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint of a public key."""
    digest = base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
    return f"{key.get_name()} SHA256:{digest}"


class _Refuse(paramiko.MissingHostKeyPolicy):  # type: ignore[misc]  # paramiko is untyped
    """An unknown host key is refused: no trust on first use."""

    def __init__(self, where: str) -> None:
        self.where = where

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: Any) -> None:
        raise HostKeyRejected(
            f"ssh: host key of {hostname} is unknown ({fingerprint(key)}); refusing to "
            f"connect, nothing was run. Check it, then add it to {self.where}"
        )


class SshTransport:
    """Runs a command over SSH after verifying the server's host key."""

    name = "ssh"

    def __init__(
        self,
        options: SshOptions,
        *,
        host_keys: HostKeySource | None = None,
        backoff: float = BACKOFF,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.options = options
        self.host_keys = host_keys
        self.backoff = backoff
        self.sleep = sleep
        self.log = get_logger(transport="ssh")

    # --- host keys ---------------------------------------------------------------------
    def _known_hosts_files(self) -> list[Path]:
        if self.options.known_hosts:
            path = Path(self.options.known_hosts).expanduser()
            if not path.is_file():
                raise BadInput(f"hygiene.ssh.known_hosts: {path} is not a file")
            return [path]
        return [p for p in (Path(d).expanduser() for d in DEFAULT_KNOWN_HOSTS) if p.is_file()]

    def _host_name(self, host: str) -> str:
        return host if self.options.port == 22 else f"[{host}]:{self.options.port}"

    def known_host_keys(self, host: str) -> list[str]:
        """The keys a known_hosts file lists for `host` (at our port), as "type base64"."""
        name = self._host_name(host)
        found: list[str] = []
        for path in self._known_hosts_files():
            try:
                entries = paramiko.HostKeys(str(path)).lookup(name)
            except (OSError, paramiko.SSHException):
                continue
            for key in (entries or {}).values():
                found.append(f"{key.get_name()} {key.get_base64()}")
        return found

    def _trust(self, client: paramiko.SSHClient, server: Server, host: str) -> str:
        """Load the keys this server may present; return where they came from."""
        pinned = list(self.host_keys(server)) if self.host_keys is not None else []
        if pinned:
            name = self._host_name(host)
            store = client.get_host_keys()
            for line in pinned:
                keytype, _, data = line.strip().partition(" ")
                try:
                    key = paramiko.PKey.from_type_string(keytype, base64.b64decode(data.split()[0]))
                except (ValueError, IndexError, paramiko.SSHException) as exc:
                    raise PreconditionFailed(
                        f"ssh: a host key pinned for {server.id} is not a valid key: {exc}"
                    ) from None
                store.add(name, keytype, key)
            return f"the keys pinned for {server.id}"
        files = self._known_hosts_files()
        for path in files:
            client.load_system_host_keys(str(path))
        return ", ".join(str(p) for p in files) or "a known_hosts file (none was found)"

    # --- running ---------------------------------------------------------------------------
    def run(self, server: Server, command: str, *, timeout: float = 30.0) -> CommandResult:
        host = server.host
        if not host:
            raise TransportUnavailable(f"server {server.id} has no address yet")
        key_file = None
        if self.options.key_file:
            key_path = Path(self.options.key_file).expanduser()
            if not key_path.is_file():
                raise BadInput(f"hygiene.ssh.key_file: {key_path} is not a file")
            key_file = str(key_path)
        target = f"{self.options.user}@{host}:{self.options.port}"
        delay = self.backoff
        last = ""
        for attempt in range(1, self.options.attempts + 1):
            client = paramiko.SSHClient()
            try:
                where = self._trust(client, server, host)
                client.set_missing_host_key_policy(_Refuse(where))
                try:
                    client.connect(
                        host,
                        port=self.options.port,
                        username=self.options.user,
                        key_filename=key_file,
                        timeout=self.options.timeout,
                        banner_timeout=self.options.timeout,
                        auth_timeout=self.options.timeout,
                        allow_agent=key_file is None,
                        look_for_keys=key_file is None,
                    )
                except paramiko.BadHostKeyException as exc:
                    raise HostKeyRejected(
                        f"ssh: host key of {host}:{self.options.port} CHANGED: it offered "
                        f"{fingerprint(exc.key)}, {where} has {fingerprint(exc.expected_key)}; "
                        "refusing to connect, nothing was run"
                    ) from None
                except paramiko.AuthenticationException as exc:
                    raise PreconditionFailed(
                        f"ssh: authentication to {target} failed: {exc}"
                    ) from None
                return self._exec(client, command, timeout, target)
            except HostKeyRejected as exc:
                self.log.error(SSH_HOSTKEY_REFUSED, server=server.id, host=host, reason=str(exc))
                raise
            except (OSError, paramiko.SSHException, EOFError) as exc:
                # Connection-level trouble only: _exec raises TransportUnavailable itself.
                last = f"{type(exc).__name__}: {exc}"
                if attempt < self.options.attempts:
                    self.log.warning(SSH_RETRY, server=server.id, attempt=attempt, error=last)
                    self.sleep(delay)
                    delay *= 2
            finally:
                client.close()
        raise TransportUnavailable(
            f"ssh: {target} unreachable after {self.options.attempts} attempt(s): {last}"
        )

    def _exec(
        self, client: paramiko.SSHClient, command: str, timeout: float, target: str
    ) -> CommandResult:
        transport = client.get_transport()
        if transport is None:
            raise paramiko.SSHException("no transport after connect")
        channel = transport.open_session(timeout=self.options.timeout)
        try:
            channel.exec_command(command)
        except paramiko.SSHException:
            channel.close()
            raise
        out, err = bytearray(), bytearray()
        deadline = time.monotonic() + timeout
        try:
            while True:
                while channel.recv_ready():
                    chunk = channel.recv(65536)
                    if len(out) < MAX_OUTPUT:
                        out += chunk
                while channel.recv_stderr_ready():
                    chunk = channel.recv_stderr(65536)
                    if len(err) < MAX_OUTPUT:
                        err += chunk
                if (
                    channel.exit_status_ready()
                    and not channel.recv_ready()
                    and not channel.recv_stderr_ready()
                ):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TransportUnavailable(
                        f"ssh: command on {target} did not finish within {timeout:g}s"
                    )
                select.select([channel], [], [], min(POLL, remaining))
            status = channel.recv_exit_status()
        except (OSError, paramiko.SSHException, EOFError) as exc:
            # The command has started: running it again could repeat its effects.
            raise TransportUnavailable(
                f"ssh: connection to {target} lost while the command ran: {exc}"
            ) from exc
        finally:
            channel.close()
        return CommandResult(status, out.decode(errors="replace"), err.decode(errors="replace"))
