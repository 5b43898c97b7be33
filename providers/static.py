"""The `static` provider: servers you already have, listed in the config by address.

No cloud API manages these servers, so changeover never creates, destroys or re-routes
them: `rebuild` and `rotate` refuse at `plan` time (CapabilityError, exit 2), and so do
the data moves and entry-point calls. What works is what needs only SSH: `audit` (the
fact script), `security` (unattended security upgrades), and the in-place upgrade calls
(`upgrade_packages`, `reboot_server`, `boot_state`).

Every command goes over SSH with verified host keys (providers/ssh.py): a host's key
must be listed in `hygiene.ssh.known_hosts` (or the default known_hosts files) under its
address and port, or have been pinned earlier by a run (the journal); nothing is ever
trusted on first use. Each host may have its own port and user; the other SSH options
(key file, timeouts, attempts) are the stack's `hygiene.ssh`.

A server's state is "running" as listed: whether it answers shows when it is asked
(audit reports an unreachable host as an error on that host).
"""

from __future__ import annotations

import re
import shlex
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from typing import Any, NoReturn

from orchestrator.audit import check_hygiene
from orchestrator.errors import (
    BadInput,
    CapabilityError,
    ChangeoverError,
    PreconditionFailed,
    TransientError,
)
from orchestrator.hygiene import parse_apt_list_upgradable, parse_reboot_required
from orchestrator.models import (
    TAG_DO_NOT_DISRUPT,
    TAG_ROLE,
    TAG_STACK,
    DataSummary,
    HealthReport,
    Server,
)
from orchestrator.settings import HealthCheck, HygienePolicy, StackConfig, StaticHost
from providers.transport import CommandResult, Transport, TransportUnavailable

NAME = "static"
NOT_CREATED = (
    "a static stack lists servers you already have: changeover neither creates nor "
    "destroys them. Upgrade them in place (`changeover upgrade`), or move the stack to a "
    "cloud provider to replace them"
)
NO_ENTRY_POINTS = "a static stack has no entry points: changeover does not route its traffic"
UPGRADE_TIMEOUT = 1800.0  # seconds an apt or dnf upgrade may take on one server
REBOOT_TIMEOUT = 300.0  # seconds for a server's old boot to end after `reboot` is sent
POLL = 1.0  # seconds between looks at a rebooting server
DEFAULT_REBOOT = "systemctl reboot || shutdown -r now"  # a host's reboot_command

# The shell prologue of every package command: no prompts, config files kept.
_NONINTERACTIVE = (
    "export DEBIAN_FRONTEND=noninteractive LC_ALL=C LANG=C\n"
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH\n"
)
_APT = "apt-get -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold"
_INSTALLED = "dpkg-query -W -f='${db:Status-Abbrev} ${Package} ${Version}\\n'"
_RPM_INSTALLED = "rpm -qa --qf 'ii %{NAME} %{VERSION}-%{RELEASE}\\n'"
_BOOT_STATE = (
    "cat /proc/sys/kernel/random/boot_id; echo @@reboot; "
    "if [ -e /var/run/reboot-required ]; then echo present; "
    "cat /var/run/reboot-required.pkgs 2>/dev/null; else echo absent; fi"
)

RebootHook = Callable[[Server], None]


def _installed(text: str) -> dict[str, str]:
    """`dpkg-query -W` lines ("ii  name version") -> installed versions by name."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].startswith("i"):
            out[parts[1].split(":")[0]] = parts[2]
    return out


class StaticTransport:
    """SSH to each host at its own port and as its own user, checking host keys."""

    name = "ssh"

    def __init__(self, policy: HygienePolicy, hosts: dict[str, StaticHost], pins: Any) -> None:
        try:
            from providers.ssh import SshTransport  # noqa: PLC0415 (paramiko only when used)
        except ImportError as exc:
            raise BadInput(
                f"the static provider needs: pip install 'changeover[ssh]' ({exc})"
            ) from None
        self._by_id: dict[str, Any] = {}
        for host in hosts.values():
            options = policy.ssh.model_copy(
                update={"port": host.port, "user": host.user or policy.ssh.user}
            )
            self._by_id[host.id] = SshTransport(options, host_keys=pins)
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def ssh(self, server: Server) -> Any:
        try:
            return self._by_id[server.id]
        except KeyError:
            raise BadInput(f"{server.id!r} is not a host of this static stack") from None

    def run(self, server: Server, command: str, *, timeout: float = 30.0) -> CommandResult:
        with self._lock:
            self.calls["ssh.run"] += 1
        result: CommandResult = self.ssh(server).run(server, command, timeout=timeout)
        return result


class StaticProvider:
    """The Provider Protocol for servers listed in the config (see the module docstring)."""

    name = NAME

    def __init__(
        self, stack: str, config: StackConfig, *, reboot_hook: RebootHook | None = None
    ) -> None:
        if config.static is None:
            raise BadInput(f"stack {stack!r}: provider 'static' needs [static] hosts")
        self.stack = stack
        self.config = config
        self.hosts = {h.id: h for h in config.static.hosts}
        self.calls: Counter[str] = Counter()
        self.reboot_hook = reboot_hook
        self._pins: dict[str, list[str]] = {}
        self._transports: dict[str, StaticTransport] = {}
        self._lock = threading.Lock()

    # --- helpers -------------------------------------------------------------------------
    def _call(self, op: str) -> None:
        with self._lock:
            self.calls[op] += 1

    def _refuse(self, capability: str, hint: str = NOT_CREATED) -> NoReturn:
        raise CapabilityError(NAME, capability, hint)

    def _own(self, stack: str) -> None:
        if stack != self.stack:
            raise BadInput(f"this static provider serves stack {self.stack!r}, not {stack!r}")

    def _server(self, host: StaticHost) -> Server:
        return Server(
            id=host.id,
            stack=self.stack,
            role=host.role,
            generation=0,
            run="",
            state="running",
            host=host.address,
            port=host.port,
            tags={
                TAG_STACK: self.stack,
                TAG_ROLE: host.role,
                **({TAG_DO_NOT_DISRUPT: "true"} if host.do_not_disrupt else {}),
            },
        )

    def _by_id(self, stack: str, server_id: str) -> Server:
        self._own(stack)
        if server_id not in self.hosts:
            raise BadInput(f"{server_id!r} is not a host of static stack {stack!r}")
        return self._server(self.hosts[server_id])

    def ex_host_keys(self, server: Server) -> list[str]:
        """Keys pinned for `server` (by pin_host_keys); else known_hosts decides."""
        with self._lock:
            return list(self._pins.get(server.id, []))

    def ex_transport(self, policy: HygienePolicy) -> Transport:
        """SSH to each host at its own port and user (per policy: one transport each)."""
        key = policy.model_dump_json()
        with self._lock:
            if key not in self._transports:
                self._transports[key] = StaticTransport(policy, self.hosts, self.ex_host_keys)
            return self._transports[key]

    def _run(self, server: Server, command: str, timeout: float) -> CommandResult:
        return self.ex_transport(self.config.hygiene).run(server, command, timeout=timeout)

    def ex_check_replace(self, stack: str) -> None:
        """rebuild and rotate call this at plan time: they need to create servers."""
        self._refuse("rebuild or rotate (creating and destroying servers)")

    @property
    def api_calls(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for transport in self._transports.values():
            total.update(transport.calls)
        return total

    # --- servers ---------------------------------------------------------------------------
    def list_servers(self, stack: str) -> list[Server]:
        self._call("list_servers")
        self._own(stack)
        return [self._server(h) for h in self.hosts.values()]

    def describe_servers(self, stack: str, ids: list[str]) -> list[Server]:
        self._call("describe_servers")
        self._own(stack)
        return [self._server(self.hosts[i]) for i in ids if i in self.hosts]

    def create_servers(
        self,
        *,
        stack: str,
        role: str,
        generation: int,
        run_id: str,
        count: int,
        image: str,
        size: str,
        idempotency_key: str,
        links: dict[str, str],
        fresh: bool = False,
    ) -> list[Server]:
        self._refuse("creating servers")

    def destroy_servers(self, stack: str, ids: list[str]) -> list[str]:
        self._refuse("destroying servers")

    # --- health ------------------------------------------------------------------------------
    def verify_server(
        self, server: Server, check: HealthCheck, policy: HygienePolicy
    ) -> HealthReport:
        self._call("verify_server")
        current = self._by_id(server.stack, server.id)
        report = HealthReport(current.id, True, False, False)
        host = current.host or ""
        if check.type == "http":
            url = f"http://{host}:{check.port}{check.path}"
            try:
                with urllib.request.urlopen(url, timeout=check.timeout) as resp:
                    report.app_ok = 200 <= resp.status < 300
                    if not report.app_ok:
                        report.reasons.append(f"health check {url}: HTTP {resp.status}")
            except (OSError, urllib.error.URLError) as exc:
                report.reasons.append(f"health check {url} failed: {exc}")
        elif check.type == "tcp":
            try:
                socket.create_connection((host, check.port), check.timeout).close()
                report.app_ok = True
            except OSError as exc:
                report.reasons.append(f"tcp check {host}:{check.port} failed: {exc}")
        else:
            self._refuse(f"health check type {check.type!r}", "use http or tcp")
        try:
            facts, verdict = check_hygiene(self.ex_transport(policy), current, policy)
        except ChangeoverError as exc:
            report.reasons.append(f"could not read host facts: {exc}")
            return report
        report.facts = facts.to_dict()
        report.hygiene_ok = verdict.ok
        report.reasons += verdict.reasons
        return report

    def verify_servers(
        self, servers: list[Server], checks: dict[str, HealthCheck], policy: HygienePolicy
    ) -> list[HealthReport]:
        return [self.verify_server(s, checks[s.role], policy) for s in servers]

    def pin_host_keys(
        self, stack: str, servers: list[Server], known: dict[str, list[str]]
    ) -> dict[str, list[str]]:
        """Pins recorded earlier win; every other host must be in a known_hosts file (at
        its address and port). There is no console to read keys from, so a host with
        neither is refused (PreconditionFailed): it will not appear by waiting."""
        self._call("pin_host_keys")
        self._own(stack)
        transport = StaticTransport(self.config.hygiene, self.hosts, None)
        pinned: dict[str, list[str]] = {}
        missing: list[str] = []
        for server in servers:
            keys = [str(k) for k in known.get(server.id, []) if str(k).strip()]
            if not keys and server.id in self.hosts:
                keys = transport.ssh(server).known_host_keys(server.host or "")
            if keys:
                with self._lock:
                    self._pins.setdefault(server.id, keys)
                    pinned[server.id] = list(self._pins[server.id])
            else:
                missing.append(f"{server.id} ({server.host}:{server.port})")
        if missing:
            where = self.config.hygiene.ssh.known_hosts or "~/.ssh/known_hosts"
            raise PreconditionFailed(
                f"no known SSH host key for {', '.join(missing)}: changeover never trusts a "
                f"key on first use. Add each host's key to {where} (as [address]:port when "
                "the port is not 22)"
            )
        return pinned

    # --- in-place upgrades --------------------------------------------------------------------
    def upgrade_packages(
        self, stack: str, server_id: str, *, security_only: bool, dist_upgrade: bool
    ) -> dict[str, Any]:
        """apt: `apt-get update`, then either the security candidates by name from their
        security suite (`--only-upgrade name/suite`, held packages left alone), or
        `upgrade --with-new-pkgs` (a new kernel ABI is a new package) or `dist-upgrade`.
        dnf: `dnf upgrade [--security]`. Keeps config files; idempotent."""
        self._call("upgrade_packages")
        server = self._by_id(stack, server_id)
        family = self._run(
            server,
            "if command -v apt-get >/dev/null 2>&1; then echo apt; "
            "elif command -v dnf >/dev/null 2>&1; then echo dnf; else echo unknown; fi",
            30.0,
        ).stdout.strip()
        if family not in ("apt", "dnf"):
            raise PreconditionFailed(f"{server_id}: neither apt-get nor dnf found")
        listing = _NONINTERACTIVE + (_INSTALLED if family == "apt" else _RPM_INSTALLED)
        before = _installed(self._must(server, listing, "the installed packages"))
        if family == "apt":
            self._must(server, _NONINTERACTIVE + "apt-get -q update", "apt-get update")
            if security_only:
                upgradable = self._must(
                    server, _NONINTERACTIVE + "apt list --upgradable", "apt list"
                )
                held = set(
                    self._must(server, _NONINTERACTIVE + "apt-mark showhold", "apt-mark").split()
                )
                wanted = [
                    f"{p.name}/{next(o for o in p.origins if o.endswith('-security'))}"
                    for p in parse_apt_list_upgradable(upgradable)
                    if p.security
                    and p.name not in held
                    and any(o.endswith("-security") for o in p.origins)
                ]
                for name in wanted:  # they go into a command line
                    if not re.fullmatch(r"[A-Za-z0-9+._/-]+", name):
                        raise PreconditionFailed(f"{server_id}: odd package name {name!r}")
                command = f"{_APT} install --only-upgrade {' '.join(wanted)}" if wanted else ""
            else:
                command = f"{_APT} {'dist-upgrade' if dist_upgrade else 'upgrade --with-new-pkgs'}"
            if command:
                self._must(server, _NONINTERACTIVE + command, "apt-get", UPGRADE_TIMEOUT)
        else:
            command = "dnf -y -q upgrade" + (" --security" if security_only else "")
            self._must(server, _NONINTERACTIVE + command, "dnf upgrade", UPGRADE_TIMEOUT)
        after = _installed(self._must(server, listing, "the installed packages"))
        upgraded = {
            name: {"from": before.get(name), "to": version}
            for name, version in sorted(after.items())
            if before.get(name) != version
        }
        state = self.boot_state(stack, server_id)
        return {"upgraded": upgraded, **state}

    def _must(self, server: Server, command: str, what: str, timeout: float = 120.0) -> str:
        result = self._run(server, command, timeout)
        if not result.ok:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise PreconditionFailed(
                f"{server.id}: {what} exited {result.exit_status}: {' | '.join(tail)[:400]}"
            )
        return result.stdout

    def reboot_server(self, stack: str, server_id: str) -> None:
        """The reboot hook if one was given (in-process tests: a chroot cannot reboot),
        else the host's `reboot_command` (default `systemctl reboot || shutdown -r now`)
        over SSH, detached so that the session can end first; returns once the old boot
        has ended (a new boot id, or the host stopped answering)."""
        self._call("reboot_server")
        server = self._by_id(stack, server_id)
        if self.reboot_hook is not None:
            self.reboot_hook(server)
            return
        boot = self.boot_state(stack, server_id)["boot_id"]
        command = self.hosts[server_id].reboot_command or DEFAULT_REBOOT
        detached = shlex.quote(f"sleep 1; {command}")
        self._run(server, f"nohup sh -c {detached} </dev/null >/dev/null 2>&1 &", 30.0)
        deadline = time.monotonic() + REBOOT_TIMEOUT
        while time.monotonic() < deadline:
            try:
                if self.boot_state(stack, server_id)["boot_id"] != boot:
                    return
            except TransientError:
                return  # it stopped answering: its old boot has ended
            time.sleep(POLL)
        raise TransientError(f"{server_id}: still in boot {boot} {REBOOT_TIMEOUT:g}s after reboot")

    def boot_state(self, stack: str, server_id: str) -> dict[str, Any]:
        server = self._by_id(stack, server_id)
        try:
            result = self._run(server, _BOOT_STATE, 30.0)
        except TransportUnavailable as exc:
            raise TransientError(f"{server_id} is not up: {exc}") from None
        boot, _, reboot = result.stdout.partition("@@reboot")
        required, pkgs = parse_reboot_required(reboot)
        return {
            "boot_id": boot.strip(),
            "reboot_required": bool(required),
            "reboot_required_pkgs": pkgs,
        }

    # --- entry points: a static stack has none -----------------------------------------------
    def address_capacity(self, stack: str, address: str) -> int | None:
        self._refuse(f"entry point {address!r}", NO_ENTRY_POINTS)

    def get_members(self, stack: str, address: str) -> list[str]:
        self._refuse(f"entry point {address!r}", NO_ENTRY_POINTS)

    def set_members(self, stack: str, address: str, ids: list[str]) -> None:
        self._refuse(f"entry point {address!r}", NO_ENTRY_POINTS)

    def inflight(self, stack: str, address: str) -> dict[str, int]:
        self._refuse(f"entry point {address!r}", NO_ENTRY_POINTS)

    def probe_address(self, stack: str, address: str, path: str) -> tuple[int, str | None]:
        self._refuse(f"entry point {address!r}", NO_ENTRY_POINTS)

    def routes_to(self, stack: str, ids: list[str]) -> dict[str, list[str]]:
        """Nothing routes through changeover here, and it destroys nothing: no view."""
        self._call("routes_to")
        return {}

    def refresh(self) -> None:
        """Nothing is kept between reads: each one asks the server."""

    # --- data: not moved on a static stack ---------------------------------------------------
    def check_data_moves(self, stack: str) -> None:
        self._refuse("moving data", NOT_CREATED)

    def data_mode(self, stack: str, server_id: str) -> dict[str, Any]:
        self._refuse("moving data", NOT_CREATED)

    def data_copy_live(self, stack: str, src_id: str, dst_id: str) -> dict[str, Any]:
        self._refuse("moving data", NOT_CREATED)

    def data_freeze(self, stack: str, src_id: str) -> dict[str, Any]:
        self._refuse("moving data", NOT_CREATED)

    def data_unfreeze(self, stack: str, src_id: str) -> dict[str, Any]:
        self._refuse("moving data", NOT_CREATED)

    def data_final_sync(self, stack: str, src_id: str, dst_id: str) -> DataSummary:
        self._refuse("moving data", NOT_CREATED)

    def data_switch(self, stack: str, src_id: str, dst_id: str) -> dict[str, Any]:
        self._refuse("moving data", NOT_CREATED)

    def data_switch_back(self, stack: str, src_id: str, dst_id: str) -> dict[str, Any]:
        self._refuse("moving data", NOT_CREATED)
