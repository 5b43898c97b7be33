"""`changeover security enable|status STACK`: unattended upgrades from the security
origins only (the seed: "Apply security upgrades ... set up unattended upgrades").

apt (Debian, Ubuntu): `enable` installs unattended-upgrades if it is missing and writes
two files:

- ``/etc/apt/apt.conf.d/52changeover-unattended-upgrades``: it first clears the origin
  lists the package's own ``50unattended-upgrades`` sets (``#clear``; apt reads the
  files in order and appends to lists), then allows the distribution's security
  origins alone, and sets ``Automatic-Reboot`` ("false" unless ``--reboot-at HH:MM``).
- ``/etc/apt/apt.conf.d/20auto-upgrades``: the periodic switches that make apt's daily
  timers update the lists and run unattended-upgrade.

It then checks what apt will really use: ``apt-config dump`` read back (every allowed
origin a security one, the reboot setting as asked, both periodic switches on) and
``unattended-upgrade --dry-run`` exiting 0, whose "Allowed origins are: ..." line must
name only security origins. dnf (Amazon Linux, Fedora, RHEL): dnf-automatic with
``upgrade_type = security`` in ``/etc/dnf/automatic.conf`` and its timer enabled, read
back the same way.

`status` reads the same things on each server and changes nothing. Everything goes over
the stack's transport (SSH with verified host keys for a static stack), one round trip
per server for `status` and three for `enable`.

Exit codes: 0 done; 1 `enable` did not take on some server (its error says why; running
it again is safe: files are rewritten only when they differ); 2 a server refused us (an
unknown or changed host key, a rejected login: nothing ran there) or bad input.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.errors import BadInput, ChangeoverError, PreconditionFailed
from orchestrator.hygiene import EXIT_MARK, MARK, split_sections
from orchestrator.log import get_logger
from orchestrator.models import Server
from orchestrator.settings import REBOOT_AT_PATTERN

if TYPE_CHECKING:
    from providers.transport import Transport

# Log event names.
SECURITY_ENABLED = "security.enabled"
SECURITY_FAILED = "security.server_failed"

APT_FILE = "/etc/apt/apt.conf.d/52changeover-unattended-upgrades"
APT_PERIODIC_FILE = "/etc/apt/apt.conf.d/20auto-upgrades"
DNF_FILE = "/etc/dnf/automatic.conf"
DNF_TIMER_DROPIN = "/etc/systemd/system/dnf-automatic.timer.d/50-changeover.conf"
ENABLE_TIMEOUT = 900.0  # seconds: installing the package and a dry run (it downloads)
STATUS_TIMEOUT = 60.0
WORKERS = 16

# The security origins of each distribution, as unattended-upgrades' Origins-Pattern
# (its own defaults for Debian 12 and Ubuntu 22.04/24.04 name these).
SECURITY_ORIGINS: dict[str, list[str]] = {
    "debian": [
        "origin=Debian,codename=${distro_codename},label=Debian-Security",
        "origin=Debian,codename=${distro_codename}-security,label=Debian-Security",
    ],
    "ubuntu": [
        "origin=Ubuntu,archive=${distro_codename}-security,label=Ubuntu",
        "origin=UbuntuESM,archive=${distro_codename}-infra-security,label=UbuntuESM",
    ],
}


def check_reboot_at(value: str | None) -> str | None:
    """--reboot-at: a 24-hour HH:MM, or None (never reboot automatically)."""
    if value is not None and not REBOOT_AT_PATTERN.fullmatch(value):
        raise BadInput(f"--reboot-at {value!r}: expected HH:MM (24-hour), such as 03:30")
    return value


def is_security_origin(pattern: str) -> bool:
    """An origin pattern (or a resolved "Allowed origins" entry) that can match only a
    security archive: its label, codename or archive names the security suite."""
    fields: dict[str, str] = {}
    for part in pattern.split(","):
        key, sep, value = part.partition("=")
        fields[key.strip() if sep else ""] = value if sep else part
    named = [fields.get(k, "") for k in ("label", "codename", "archive", "a", "n", "l")]
    legacy = pattern if ":" in pattern and "=" not in pattern else ""  # "Debian:bookworm-security"
    return any("security" in v.lower() for v in [*named, legacy])


def apt_files(distro: str, reboot_at: str | None) -> dict[str, str]:
    """The apt.conf.d files `enable` writes, by path."""
    origins = SECURITY_ORIGINS.get(distro)
    if origins is None:
        raise BadInput(
            f"no security origins known for distribution {distro!r} "
            f"(known: {', '.join(SECURITY_ORIGINS)})"
        )
    reboot = "true" if reboot_at else "false"
    lines = [
        "// Written by `changeover security enable`: unattended upgrades from the",
        "// security origins only. The lists 50unattended-upgrades sets are cleared first.",
        "#clear Unattended-Upgrade::Origins-Pattern;",
        "#clear Unattended-Upgrade::Allowed-Origins;",
        "Unattended-Upgrade::Origins-Pattern {",
        *[f'        "{o}";' for o in origins],
        "};",
        f'Unattended-Upgrade::Automatic-Reboot "{reboot}";',
    ]
    if reboot_at:
        lines.append(f'Unattended-Upgrade::Automatic-Reboot-Time "{reboot_at}";')
    periodic = 'APT::Periodic::Update-Package-Lists "1";\nAPT::Periodic::Unattended-Upgrade "1";\n'
    return {APT_FILE: "\n".join(lines) + "\n", APT_PERIODIC_FILE: periodic}


def dnf_files(reboot_at: str | None) -> dict[str, str]:
    """dnf-automatic's config (security upgrades, applied) and, with --reboot-at, a timer
    drop-in that runs it at that time: dnf-automatic reboots right after it applies
    upgrades that need it, so the reboot happens then."""
    conf = (
        "# Written by `changeover security enable`: security upgrades only.\n"
        "[commands]\n"
        "upgrade_type = security\n"
        "random_sleep = 0\n"
        "download_updates = yes\n"
        "apply_updates = yes\n"
        f"reboot = {'when-needed' if reboot_at else 'never'}\n"
        "\n[emitters]\nemit_via = stdio\n"
    )
    files = {DNF_FILE: conf}
    if reboot_at:
        files[DNF_TIMER_DROPIN] = (
            f"[Timer]\nOnCalendar=\nOnCalendar=*-*-* {reboot_at}:00\nRandomizedDelaySec=0\n"
        )
    return files


# --------------------------------------------------------------------------------------
# Reading the effective configuration back
# --------------------------------------------------------------------------------------

_DUMP_LINE = re.compile(r'^(?P<key>\S+?)(?:\s+"(?P<value>.*)")?;$')


def parse_apt_config_dump(text: str) -> dict[str, list[str]]:
    """`apt-config dump` -> values by key (list items under their list's key). A node
    with children dumps as `Key "";`: that empty value is no item and is left out."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = _DUMP_LINE.match(line.strip())
        if m is None or m["value"] is None:
            continue
        item = m["key"].endswith("::")
        if not item and m["value"] == "":
            continue
        out.setdefault(m["key"].removesuffix("::"), []).append(m["value"])
    return out


def parse_allowed_origins(text: str) -> list[str] | None:
    """unattended-upgrade's "Allowed origins are: a, b" line (None if not printed)."""
    for line in text.splitlines():
        _, sep, rest = line.partition("Allowed origins are:")
        if sep:
            return [o.strip() for o in rest.split(", ") if o.strip()]
    return None


@dataclass(slots=True)
class SecurityStatus:
    """One server's unattended-upgrade settings, as the package manager reads them."""

    server_id: str
    family: str = "unknown"
    distro: str = ""
    installed: bool | None = None
    enabled: bool | None = None
    origins: list[str] = field(default_factory=list)
    security_only: bool | None = None
    automatic_reboot: bool | None = None
    reboot_time: str | None = None
    managed: bool = False  # changeover's file is there
    dry_run_ok: bool | None = None  # enable only: unattended-upgrade --dry-run exited 0
    dry_run_origins: list[str] | None = None
    changed: list[str] = field(default_factory=list)  # enable only: files written
    error: str | None = None
    refused: bool = False

    @property
    def ok(self) -> bool:
        """Enabled for the security origins alone (and, after enable, dry-run passed)."""
        return bool(
            self.installed
            and self.enabled
            and self.security_only
            and self.dry_run_ok is not False
            and self.error is None
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.server_id,
            "family": self.family,
            "distro": self.distro,
            "installed": self.installed,
            "enabled": self.enabled,
            "origins": self.origins,
            "security_only": self.security_only,
            "automatic_reboot": self.automatic_reboot,
            "reboot_time": self.reboot_time,
            "managed_by_changeover": self.managed,
            "dry_run_ok": self.dry_run_ok,
            "dry_run_origins": self.dry_run_origins,
            "changed": self.changed,
            "ok": self.ok,
            "error": self.error,
            "refused": self.refused,
        }


def _section(name: str, body: str) -> str:
    # The fact script's framing (orchestrator/hygiene.py), so split_sections reads it.
    return (
        f"echo '{MARK} {name}'\n"
        f'{{ {body}\n}} </dev/null 2>&1; rc=$?; echo; echo "{EXIT_MARK} {name} $rc"\n'
    )


STATUS_SCRIPT = "".join(
    [
        "export LC_ALL=C LANG=C\n",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH\n",
        _section("distro", '. /etc/os-release && echo "$ID"'),
        _section(
            "family",
            "if command -v apt-get >/dev/null 2>&1; then echo apt; "
            "elif command -v dnf >/dev/null 2>&1; then echo dnf; else echo unknown; fi",
        ),
        "if command -v apt-get >/dev/null 2>&1; then\n",
        _section("installed", "dpkg-query -W -f='${db:Status-Abbrev}\\n' unattended-upgrades"),
        _section("apt-config", "apt-config dump"),
        _section("managed", f"test -e {APT_FILE}"),
        "elif command -v dnf >/dev/null 2>&1; then\n",
        _section("installed", "rpm -q dnf-automatic"),
        _section("dnf-config", f"cat {DNF_FILE}"),
        _section("dnf-timer", "systemctl is-enabled dnf-automatic.timer"),
        _section("managed", f"grep -q changeover {DNF_FILE}"),
        "fi\n",
    ]
)


def parse_status(server_id: str, output: str) -> SecurityStatus:
    """STATUS_SCRIPT's output -> the server's status."""
    s = split_sections(output)
    st = SecurityStatus(server_id)
    st.family = s["family"].text.strip() if "family" in s else "unknown"
    st.distro = s["distro"].text.strip() if "distro" in s else ""
    st.managed = "managed" in s and s["managed"].exit_status == 0
    inst = s.get("installed")
    if st.family == "apt":
        st.installed = bool(inst and inst.exit_status == 0 and inst.text.startswith("ii"))
        dump = parse_apt_config_dump(s["apt-config"].text if "apt-config" in s else "")
        st.origins = dump.get("Unattended-Upgrade::Origins-Pattern", []) + dump.get(
            "Unattended-Upgrade::Allowed-Origins", []
        )
        periodic = [
            dump.get(k, ["0"])[-1]
            for k in ("APT::Periodic::Update-Package-Lists", "APT::Periodic::Unattended-Upgrade")
        ]
        st.enabled = bool(st.installed) and all(v not in ("0", "", "false") for v in periodic)
        st.security_only = bool(st.origins) and all(is_security_origin(o) for o in st.origins)
        reboot = dump.get("Unattended-Upgrade::Automatic-Reboot", ["false"])[-1]
        st.automatic_reboot = reboot.lower() in ("true", "1", "yes")
        st.reboot_time = dump.get("Unattended-Upgrade::Automatic-Reboot-Time", [None])[-1]
    elif st.family == "dnf":
        st.installed = bool(inst and inst.exit_status == 0)
        conf = s["dnf-config"].text if "dnf-config" in s else ""
        values = dict(
            (k.strip(), v.strip())
            for k, sep, v in (ln.partition("=") for ln in conf.splitlines())
            if sep and not k.strip().startswith("#")
        )
        timer = s.get("dnf-timer")
        st.enabled = bool(st.installed and timer and timer.text.strip() == "enabled")
        st.enabled = st.enabled and values.get("apply_updates", "no") in ("yes", "true", "1")
        kind = values.get("upgrade_type", "default")
        st.origins = [f"upgrade_type={kind}"]
        st.security_only = kind == "security"
        st.automatic_reboot = values.get("reboot", "never") != "never"
    else:
        st.error = "neither apt-get nor dnf found"
    return st


def read_status(transport: Transport, server: Server) -> SecurityStatus:
    """One server's unattended-upgrade status (read-only, one round trip)."""
    result = transport.run(server, STATUS_SCRIPT, timeout=STATUS_TIMEOUT)
    return parse_status(server.id, result.stdout)


def _write_files(files: dict[str, str]) -> str:
    """Shell that writes each file atomically only if its content differs, and prints
    the paths it changed after a marker line."""
    parts = []
    for path, text in files.items():
        if not re.fullmatch(r"/[A-Za-z0-9_./-]+", path) or "CHANGEOVER_EOF" in text:
            raise BadInput(f"refusing to write {path!r}")
        parts.append(
            f"mkdir -p \"$(dirname '{path}')\"\n"
            f"cat > '{path}.changeover-new' <<'CHANGEOVER_EOF'\n{text}CHANGEOVER_EOF\n"
            f"if cmp -s '{path}.changeover-new' '{path}'; then rm -f '{path}.changeover-new'; "
            f"else chmod 644 '{path}.changeover-new' && mv '{path}.changeover-new' '{path}' "
            f"&& echo 'changed {path}'; fi\n"
        )
    return "".join(parts)


def enable_script(family: str, distro: str, reboot_at: str | None) -> str:
    """The shell `enable` runs on a server: install, write, switch on, then dry-run."""
    head = (
        "set -e\nexport DEBIAN_FRONTEND=noninteractive LC_ALL=C LANG=C\n"
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH\n"
    )
    if family == "apt":
        return (
            head + "if ! dpkg-query -W -f='${db:Status-Abbrev}' unattended-upgrades 2>/dev/null "
            "| grep -q '^ii'; then apt-get -q update && apt-get install -y -q "
            "-o Dpkg::Options::=--force-confold unattended-upgrades; fi\n"
            + _write_files(apt_files(distro, reboot_at))
            # On a host booted with systemd, apt's daily timers are what run it.
            + "if [ -d /run/systemd/system ]; then systemctl enable --now "
            "apt-daily.timer apt-daily-upgrade.timer >/dev/null; fi\n"
            + f"echo '{MARK} dry-run'\n"
            + "set +e\nunattended-upgrade --dry-run -v </dev/null 2>&1\n"
            + f'rc=$?; echo; echo "{EXIT_MARK} dry-run $rc"\n'
        )
    if family == "dnf":
        return (
            head
            + "rpm -q dnf-automatic >/dev/null || dnf -y -q install dnf-automatic\n"
            + _write_files(dnf_files(reboot_at))
            + "systemctl daemon-reload; systemctl enable --now dnf-automatic.timer\n"
        )
    raise BadInput(f"no package manager to configure ({family})")


def enable_server(transport: Transport, server: Server, reboot_at: str | None) -> SecurityStatus:
    """Enable unattended security upgrades on one server, then read them back."""
    before = read_status(transport, server)
    if before.error:
        return before
    result = transport.run(
        server, enable_script(before.family, before.distro, reboot_at), timeout=ENABLE_TIMEOUT
    )
    changed = [
        ln.split(" ", 1)[1] for ln in result.stdout.splitlines() if ln.startswith("changed /")
    ]
    sections = split_sections(result.stdout)
    if not result.ok and "dry-run" not in sections:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        failed = read_status(transport, server)
        failed.changed = changed
        failed.error = (
            f"enabling unattended upgrades failed (exit {result.exit_status}): "
            + " | ".join(tail)[:400]
        )
        return failed
    after = read_status(transport, server)
    after.changed = changed
    if "dry-run" in sections:
        dry = sections["dry-run"]
        after.dry_run_ok = dry.exit_status == 0
        after.dry_run_origins = parse_allowed_origins(dry.text)
        if after.dry_run_origins is not None and not all(
            is_security_origin(o) for o in after.dry_run_origins
        ):
            after.security_only = False
        if not after.dry_run_ok:
            lines = dry.text.strip().splitlines()[-2:]
            after.error = f"unattended-upgrade --dry-run exited {dry.exit_status}: " + " | ".join(
                lines
            )
    expected_reboot = reboot_at is not None
    if after.error is None and not after.ok:
        after.error = "read back, the configuration is not security-only and enabled"
    if after.error is None and after.automatic_reboot != expected_reboot:
        after.error = f"read back, Automatic-Reboot is {after.automatic_reboot}"
    return after


@dataclass(slots=True)
class SecurityReport:
    """`security enable|status` over a stack: one status per server."""

    stack: str
    action: str
    servers: list[SecurityStatus]
    reboot_at: str | None = None

    @property
    def exit_code(self) -> int:
        if any(s.refused for s in self.servers):
            return 2
        if self.action == "enable" and not all(s.ok and s.error is None for s in self.servers):
            return 1
        return 0

    def message(self) -> str:
        good = sum(1 for s in self.servers if s.ok)
        return (
            f"security {self.action} {self.stack}: {good} of {len(self.servers)} server(s) "
            "take unattended upgrades from the security origins only"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "stack": self.stack,
            "action": self.action,
            "reboot_at": self.reboot_at,
            "servers": [s.to_dict() for s in self.servers],
            "exit_code": self.exit_code,
            "message": self.message(),
        }

    def rows(self) -> list[list[Any]]:
        def yn(v: bool | None) -> str:
            return "?" if v is None else "yes" if v else "no"

        return [
            [
                s.server_id,
                yn(s.installed),
                yn(s.enabled),
                yn(s.security_only),
                (yn(s.automatic_reboot) + (f" at {s.reboot_time}" if s.reboot_time else ""))
                if s.automatic_reboot
                else yn(s.automatic_reboot),
                "; ".join(s.origins) or "-",
                s.error or (", ".join(s.changed) if s.changed else ""),
            ]
            for s in self.servers
        ]

    HEADERS = ("server", "installed", "enabled", "security only", "auto reboot", "origins", "note")

    def text(self) -> str:
        lines = [self.message()]
        for row in self.rows():
            lines.append("")
            lines += [f"  {h}: {v}" for h, v in zip(self.HEADERS, row, strict=True)]
        return "\n".join(lines) + "\n"


def run_security(
    transport: Transport,
    stack: str,
    servers: list[Server],
    *,
    enable: bool,
    reboot_at: str | None = None,
    workers: int = WORKERS,
) -> SecurityReport:
    """`security enable` (with `enable`) or `security status` on every running server."""
    log = get_logger(stack_name=stack)
    check_reboot_at(reboot_at)

    def one(server: Server) -> SecurityStatus:
        try:
            if enable:
                st = enable_server(transport, server, reboot_at)
                log.info(SECURITY_ENABLED, server=server.id, changed=st.changed, ok=st.ok)
                return st
            return read_status(transport, server)
        except BadInput:
            raise
        except PreconditionFailed as exc:  # the server refused us: nothing ran there
            log.warning(SECURITY_FAILED, server=server.id, error=str(exc))
            return SecurityStatus(server.id, error=str(exc), refused=True)
        except ChangeoverError as exc:
            log.warning(SECURITY_FAILED, server=server.id, error=str(exc))
            return SecurityStatus(server.id, error=str(exc))

    running = [s for s in servers if s.state == "running"]
    if workers > 1 and len(running) > 1:
        with ThreadPoolExecutor(max_workers=min(workers, len(running))) as pool:
            statuses = list(pool.map(one, running))
    else:
        statuses = [one(s) for s in running]
    return SecurityReport(stack, "enable" if enable else "status", statuses, reboot_at)
