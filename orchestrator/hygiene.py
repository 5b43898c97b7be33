"""Host hygiene: the fact script, its parsers, the policy, drift and recommendations.

Everything here is a pure function of text and data: no I/O. A transport runs
`fact_script(policy)` on a server (one round trip), `parse_facts` turns the output into
`Facts`, `evaluate` applies the health gate's `HygienePolicy`, `find_drift` compares
component versions with what a run recorded, and `recommend` picks replace, reboot,
patch or leave. The same path serves every provider and both the verify step and
`changeover audit`, so a server is judged the same way wherever it lives.

The script prints one section per probe::

    @@changeover NAME
    <output of the probe, stdout and stderr merged>
    @@changeover-exit NAME STATUS

apt systems (Debian, Ubuntu) are read with ``apt list --upgradable`` (pending, and the
security subset by suite: ``*-security``), ``apt-mark showhold`` (held) and
``apt-get -s upgrade`` (upgrades Ubuntu defers by phasing, which are not pending for
this machine yet). dnf systems (Amazon Linux 2023, RHEL-likes) are read with
``dnf check-update``, ``dnf updateinfo list --security``, ``dnf needs-restarting -r``
and ``dnf versionlock list``. Nothing here needs root on the server.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from orchestrator.settings import HygienePolicy

FACTS_VERSION = 1
MARK = "@@changeover"
EXIT_MARK = "@@changeover-exit"

# How many package names a reason lists before "and N more": enough to act on, short
# enough for one log line.
REASON_NAMES = 8

Family = Literal["apt", "dnf", "unknown"]
Action = Literal["replace", "patch", "reboot", "leave"]
# Most severe first: a stack's recommendation is its most severe server's.
ACTIONS: tuple[Action, ...] = ("replace", "patch", "reboot", "leave")

# Components recorded on every server, each with the probe that prints its version.
# Anything else named in `policy.components` or `policy.min_versions` is read from the
# package database (dpkg or rpm) under its package name.
COMPONENT_PROBES: dict[str, str] = {
    "nginx": "nginx -v",
    "ruby": "ruby -v",
    "rails": "",  # from Gemfile.lock: built per policy (the lock files to look in)
    "passenger": "passenger --version || passenger-config --version",
    "postgres": (
        'for p in "$(command -v postgres)" /usr/lib/postgresql/*/bin/postgres '
        '/usr/pgsql-*/bin/postgres; do [ -x "$p" ] && "$p" --version; done; '
        "command -v psql >/dev/null && psql --version"
    ),
    "node": "node --version || nodejs --version",
    "python": "python3 --version",
}


# --------------------------------------------------------------------------------------
# Versions
# --------------------------------------------------------------------------------------


def _order(c: str) -> int:
    """dpkg's character weight: '~' before the end, the end before letters, then others."""
    if c == "~":
        return -1
    if c.isascii() and c.isalpha():
        return ord(c)
    return ord(c) + 256


def _verrevcmp(a: str, b: str) -> int:
    """dpkg's comparison of an upstream version or a revision (lib/dpkg/version.c)."""
    i = j = 0
    while i < len(a) or j < len(b):
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac = _order(a[i]) if i < len(a) and not a[i].isdigit() else 0
            bc = _order(b[j]) if j < len(b) and not b[j].isdigit() else 0
            if ac != bc:
                return -1 if ac < bc else 1
            i += 1
            j += 1
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        first_diff = 0
        while i < len(a) and a[i].isdigit() and j < len(b) and b[j].isdigit():
            if not first_diff:
                first_diff = ord(a[i]) - ord(b[j])
            i += 1
            j += 1
        if i < len(a) and a[i].isdigit():
            return 1
        if j < len(b) and b[j].isdigit():
            return -1
        if first_diff:
            return -1 if first_diff < 0 else 1
    return 0


def _split_version(v: str) -> tuple[int, str, str]:
    epoch = 0
    head, sep, rest = v.partition(":")
    if sep and head.isdigit():
        epoch, v = int(head), rest
    upstream, sep, revision = v.rpartition("-")
    if not sep:
        upstream, revision = v, ""
    return epoch, upstream, revision


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1, as dpkg orders versions (epoch, upstream, revision; '~' sorts first).
    Close enough to rpm's order for kernels and component versions too."""
    ea, ua, ra = _split_version(a.strip())
    eb, ub, rb = _split_version(b.strip())
    if ea != eb:
        return -1 if ea < eb else 1
    return _verrevcmp(ua, ub) or _verrevcmp(ra, rb)


def newest(versions: Iterable[str]) -> str | None:
    """The highest version, or None for none."""
    best: str | None = None
    for v in versions:
        if best is None or compare_versions(v, best) > 0:
            best = v
    return best


# --------------------------------------------------------------------------------------
# The fact script
# --------------------------------------------------------------------------------------

# A component or package name goes into a shell command line, so it must be a plain
# package-style name; the settings validate the same pattern.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9+._-]{0,100}$")
PATH_PATTERN = re.compile(r"^/[A-Za-z0-9_./*+-]{1,300}$")


def _section(name: str, body: str) -> str:
    # stdin from /dev/null: no probe may wait for input. `rc` keeps the probe's status
    # because the echo that ends a possibly unterminated last line would reset `$?`.
    return (
        f"echo '{MARK} {name}'\n"
        f'{{ {body}\n}} </dev/null 2>&1; rc=$?; echo; echo "{EXIT_MARK} {name} $rc"\n'
    )


def extra_components(policy: HygienePolicy) -> list[str]:
    """Components read from the package database: configured, or given a minimum."""
    names = [*policy.components, *policy.min_versions]
    out: list[str] = []
    for name in names:
        if name not in COMPONENT_PROBES and name not in out:
            out.append(name)
    return out


def fact_script(policy: HygienePolicy) -> str:
    """The POSIX sh script that prints every fact in one round trip."""
    gemfiles = [p for p in policy.gemfile_locks if PATH_PATTERN.match(p)]
    rails = (
        "grep -H -E '^    rails \\(' " + " ".join(gemfiles) + " 2>/dev/null; true"
        if gemfiles
        else "true"
    )
    parts = [
        f"# changeover facts v{FACTS_VERSION}\n",
        "export LC_ALL=C LANG=C\n",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH\n",
        _section("os-release", "cat /etc/os-release || cat /usr/lib/os-release"),
        _section(
            "family",
            "if command -v apt-get >/dev/null 2>&1; then echo apt; "
            "elif command -v dnf >/dev/null 2>&1; then echo dnf; else echo unknown; fi",
        ),
        _section("kernel", "uname -r; uname -v"),
        _section(
            "boot-kernels",
            'for f in /boot/vmlinuz-*; do [ -e "$f" ] && echo "${f#/boot/vmlinuz-}"; done; true',
        ),
        _section("uptime", "cat /proc/uptime"),
        _section(
            "reboot-required",
            "if [ -e /var/run/reboot-required ]; then echo present; "
            "cat /var/run/reboot-required.pkgs 2>/dev/null; else echo absent; fi; true",
        ),
        "if command -v apt-get >/dev/null 2>&1; then\n",
        _section("apt-upgradable", "apt list --upgradable"),
        _section("apt-held", "apt-mark showhold"),
        _section("apt-simulate", "apt-get -s -o Debug::NoLocking=true upgrade"),
        _section(
            "apt-lists",
            "stat -c %Y /var/lib/apt/lists/*Release 2>/dev/null | sort -n | tail -n 1; true",
        ),
        _section(
            "dpkg-kernels",
            "dpkg-query -W -f='${db:Status-Abbrev} ${Package} ${Version}\\n' 'linux-image-[0-9]*'",
        ),
        "elif command -v dnf >/dev/null 2>&1; then\n",
        _section("dnf-check-update", "dnf -q check-update"),
        _section("dnf-security", "dnf -q updateinfo list --security"),
        _section("dnf-needs-restarting", "dnf -q needs-restarting -r"),
        _section("dnf-versionlock", "dnf -q versionlock list"),
        _section(
            "rpm-kernels",
            "rpm -q kernel kernel-core --qf '%{NAME} %{VERSION}-%{RELEASE}.%{ARCH}\\n'",
        ),
        "fi\n",
    ]
    for name, probe in COMPONENT_PROBES.items():
        parts.append(_section(f"component:{name}", rails if name == "rails" else probe))
    for name in extra_components(policy):
        if not NAME_PATTERN.match(name):
            continue  # the settings refuse such names; never put one in a command line
        parts.append(
            _section(
                f"package:{name}",
                f"dpkg-query -W -f='${{db:Status-Abbrev}} ${{Version}}\\n' {name} 2>/dev/null "
                f"|| rpm -q --qf '%{{VERSION}}-%{{RELEASE}}\\n' {name}",
            )
        )
    return "".join(parts)


_SECTION_ECHO = re.compile(rf"^echo '{MARK} (\S+)'$", re.MULTILINE)


def script_sections(script: str) -> list[str]:
    """The section names a fact script asks for (a simulated host answers these)."""
    return _SECTION_ECHO.findall(script)


@dataclass(frozen=True, slots=True)
class Section:
    """One probe's output and exit status."""

    name: str
    text: str
    exit_status: int | None


def split_sections(output: str) -> dict[str, Section]:
    """Cut the script's output into sections. Text outside any section is ignored (a
    login banner, say); a section without its exit line has status None (cut short)."""
    sections: dict[str, Section] = {}
    name: str | None = None
    lines: list[str] = []
    for line in output.splitlines():
        if line.startswith(EXIT_MARK + " "):
            parts = line.split()
            if name is not None and len(parts) == 3 and parts[1] == name:
                status = int(parts[2]) if parts[2].lstrip("-").isdigit() else None
                sections[name] = Section(name, "\n".join(lines).strip("\n"), status)
                name, lines = None, []
            continue
        if line.startswith(MARK + " "):
            if name is not None:
                sections[name] = Section(name, "\n".join(lines).strip("\n"), None)
            name, lines = line[len(MARK) + 1 :].strip(), []
            continue
        if name is not None:
            lines.append(line)
    if name is not None:
        sections[name] = Section(name, "\n".join(lines).strip("\n"), None)
    return sections


# --------------------------------------------------------------------------------------
# Facts
# --------------------------------------------------------------------------------------


@dataclass(slots=True)
class Package:
    """A pending upgrade: installed and candidate versions, and why it may wait."""

    name: str
    candidate: str
    installed: str | None = None
    security: bool = False
    held: bool = False
    phased: bool = False
    origins: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "installed": self.installed,
            "candidate": self.candidate,
            "security": self.security,
            "held": self.held,
            "phased": self.phased,
            "origins": list(self.origins),
        }


@dataclass(slots=True)
class Kernel:
    """The running kernel against the newest installed one."""

    running: str | None = None
    running_build: str | None = None  # Debian's package version from `uname -v`
    installed: list[str] = field(default_factory=list)
    newest: str | None = None
    newest_build: str | None = None  # the dpkg version of the running release's package

    @property
    def reboot_needed(self) -> bool:
        """A newer kernel is installed than the one running (or, on Debian, the running
        release's package was rebuilt in place: same name, newer build)."""
        if self.running and self.newest and compare_versions(self.newest, self.running) > 0:
            return True
        return bool(
            self.running_build
            and self.newest_build
            and compare_versions(self.newest_build, self.running_build) > 0
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "running": self.running,
            "running_build": self.running_build,
            "installed": list(self.installed),
            "newest": self.newest,
            "newest_build": self.newest_build,
            "reboot_needed": self.reboot_needed,
        }


@dataclass(slots=True)
class Facts:
    """What one server says about itself. `errors` names the probes that failed."""

    family: Family = "unknown"
    os: dict[str, str] = field(default_factory=dict)
    kernel: Kernel = field(default_factory=Kernel)
    pending: list[Package] | None = None  # None: could not be determined
    held: list[str] = field(default_factory=list)
    reboot_required: bool | None = None
    reboot_required_pkgs: list[str] = field(default_factory=list)
    components: dict[str, str] = field(default_factory=dict)
    probed: list[str] = field(default_factory=list)  # components looked for
    uptime: float | None = None
    lists_updated_at: float | None = None
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def security(self) -> list[Package]:
        return [p for p in self.pending or [] if p.security]

    @property
    def actionable(self) -> list[Package]:
        """Pending upgrades this machine is offered now (phased ones are not yet)."""
        return [p for p in self.pending or [] if not p.phased]

    def to_dict(self) -> dict[str, Any]:
        pending = self.pending
        return {
            "facts_version": FACTS_VERSION,
            "family": self.family,
            "os": dict(self.os),
            "kernel": self.kernel.to_dict(),
            "pending": None if pending is None else [p.to_dict() for p in pending],
            "pending_count": None if pending is None else len(self.actionable),
            "security_count": None
            if pending is None
            else len([p for p in self.actionable if p.security]),
            "held": list(self.held),
            "reboot_required": self.reboot_required,
            "reboot_required_pkgs": list(self.reboot_required_pkgs),
            "components": dict(self.components),
            "probed": list(self.probed),
            "uptime": self.uptime,
            "lists_updated_at": self.lists_updated_at,
            "errors": dict(self.errors),
        }


# --- parsers, one per probe --------------------------------------------------------------


def parse_os_release(text: str) -> dict[str, str]:
    """/etc/os-release: KEY=value lines, values shell-quoted."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if not sep or not re.fullmatch(r"[A-Z0-9_]+", key):
            continue
        try:
            words = shlex.split(value)
        except ValueError:
            words = [value.strip("\"'")]
        out[key] = words[0] if words else ""
    return out


_APT_LIST = re.compile(
    r"^(?P<name>[^\s/]+)/(?P<suites>\S+)\s+(?P<version>\S+)\s+(?P<arch>\S+)"
    r"\s+\[upgradable from: (?P<old>[^\]]+)\]"
)


def _is_security_origin(origin: str) -> bool:
    # Debian: "stable-security", "bookworm-security", "Debian-Security:12/...";
    # Ubuntu: "jammy-security", "noble-infra-security" (ESM). Suites are named so.
    return "-security" in origin.lower() or origin.lower().startswith("debian-security")


def parse_apt_list_upgradable(text: str) -> list[Package]:
    """`apt list --upgradable`: name/suites version arch [upgradable from: old]."""
    out = []
    for line in text.splitlines():
        m = _APT_LIST.match(line.strip())
        if m is None:
            continue  # "Listing...", apt's CLI warning, blank lines
        suites = tuple(m["suites"].split(","))
        out.append(
            Package(
                name=m["name"],
                candidate=m["version"],
                installed=m["old"].strip(),
                security=any(_is_security_origin(s) for s in suites),
                origins=suites,
            )
        )
    return out


@dataclass(slots=True)
class AptSimulation:
    """`apt-get -s upgrade`: what would be installed, and what would not and why."""

    upgrades: list[Package] = field(default_factory=list)
    kept_back: list[str] = field(default_factory=list)
    phased: list[str] = field(default_factory=list)
    not_upgraded: int | None = None


_APT_INST = re.compile(
    r"^Inst (?P<name>\S+) (?:\[(?P<old>[^\]]*)\] )?\((?P<new>\S+)(?P<origins>.*?)"
    r" \[(?P<arch>[^\]]+)\]\)"
)
_APT_SUMMARY = re.compile(r"(\d+) upgraded, (\d+) newly installed, (\d+) to remove and (\d+) not")


def parse_apt_get_simulate(text: str) -> AptSimulation:
    """`apt-get -s upgrade` (or dist-upgrade): Inst lines and the kept-back lists."""
    sim = AptSimulation()
    listing: list[str] | None = None
    for line in text.splitlines():
        if listing is not None and line.startswith(" "):
            listing.extend(line.split())
            continue
        listing = None
        if line.startswith("The following packages have been kept back"):
            listing = sim.kept_back
        elif "deferred due to phasing" in line:
            listing = sim.phased
        elif m := _APT_INST.match(line):
            if m["old"] is None:
                continue  # a new package (a dependency), not an upgrade of one installed
            origins = tuple(o.strip() for o in m["origins"].split(",") if o.strip())
            sim.upgrades.append(
                Package(
                    name=m["name"],
                    candidate=m["new"],
                    installed=m["old"],
                    security=any(_is_security_origin(o) for o in origins),
                    origins=origins,
                )
            )
        elif m := _APT_SUMMARY.search(line):
            sim.not_upgraded = int(m.group(4))
    return sim


def parse_name_list(text: str) -> list[str]:
    """One package name per line (`apt-mark showhold`)."""
    return [ln.strip() for ln in text.splitlines() if NAME_PATTERN.match(ln.strip())]


def _rpm_name(nevra: str) -> str:
    """name-[epoch:]version-release[.arch] -> name."""
    base = re.sub(r"\.(x86_64|aarch64|noarch|i686|s390x|ppc64le|src|\*)$", "", nevra)
    parts = base.rsplit("-", 2)
    return parts[0] if len(parts) == 3 else base


def parse_dnf_check_update(text: str) -> tuple[list[Package], list[str]]:
    """`dnf check-update`: name.arch version repo (long names wrap onto two lines).
    Returns the packages and AL2023's "Security: ..." notes about installed kernels."""
    out: list[Package] = []
    notes: list[str] = []
    carry: str | None = None
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.startswith("Obsoleting Packages"):
            break  # repeats packages above with what they obsolete
        if line.startswith("Security:"):
            notes.append(line[len("Security:") :].strip())
            continue
        if not line.strip() or line.startswith(("Last metadata", "Loaded plugins")):
            continue
        tokens = line.split()
        if carry is not None and raw[:1].isspace() and len(tokens) == 2:
            tokens = [carry, *tokens]
        carry = None
        if len(tokens) == 1 and "." in tokens[0]:
            carry = tokens[0]  # the rest of this entry is on the next line
            continue
        if len(tokens) != 3 or "." not in tokens[0]:
            continue
        name, _, _arch = tokens[0].rpartition(".")
        out.append(Package(name=name, candidate=tokens[1], origins=(tokens[2],)))
    return out, notes


@dataclass(frozen=True, slots=True)
class Advisory:
    """One line of `dnf updateinfo list`: an advisory and the package it updates."""

    id: str
    severity: str
    package: str

    @property
    def name(self) -> str:
        return _rpm_name(self.package)


def parse_dnf_updateinfo(text: str) -> list[Advisory]:
    """`dnf updateinfo list --security`: ID Severity/Sec. name-version-release.arch."""
    out = []
    for line in text.splitlines():
        tokens = line.split()
        if len(tokens) >= 3 and "/Sec." in tokens[1]:
            out.append(Advisory(tokens[0], tokens[1].split("/")[0], tokens[2]))
    return out


def parse_needs_restarting(text: str, exit_status: int | None) -> tuple[bool | None, list[str]]:
    """`dnf needs-restarting -r`: exit 1 and a list of "  * name" when a reboot is needed."""
    pkgs = [m.group(1) for m in re.finditer(r"^\s+\*\s+(\S+)", text, re.MULTILINE)]
    if "Reboot is required" in text or (exit_status == 1 and pkgs):
        return True, pkgs
    if "Reboot should not be necessary" in text or exit_status == 0:
        return False, []
    return None, []


def parse_versionlock(text: str) -> list[str]:
    """`dnf versionlock list`: name-[epoch:]version-release.* patterns -> names."""
    out = []
    for line in text.splitlines():
        token = line.strip()
        if not token or token.startswith(("Last metadata", "#")) or " " in token:
            continue
        out.append(_rpm_name(token.lstrip("!")))
    return out


def parse_reboot_required(text: str) -> tuple[bool | None, list[str]]:
    """Our probe: "present" then the .pkgs lines, or "absent"."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines or lines[0] not in ("present", "absent"):
        return None, []
    return lines[0] == "present", [p for p in lines[1:] if NAME_PATTERN.match(p)]


def parse_uptime(text: str) -> float | None:
    """/proc/uptime: seconds since boot, then idle seconds."""
    try:
        return float(text.split(maxsplit=1)[0])
    except (IndexError, ValueError):
        return None


def parse_kernel(uname: str, boot: str, dpkg_kernels: str = "", rpm_kernels: str = "") -> Kernel:
    """`uname -r; uname -v`, the /boot/vmlinuz-* releases and the kernel packages."""
    kernel = Kernel()
    lines = uname.splitlines()
    if lines:
        kernel.running = lines[0].strip() or None
    if len(lines) > 1 and (m := re.search(r"Debian (\S+)", lines[1])):
        kernel.running_build = m.group(1)
    releases = [
        ln.strip() for ln in boot.splitlines() if ln.strip() and not ln.strip().startswith("0-")
    ]
    builds: dict[str, str] = {}
    for line in dpkg_kernels.splitlines():
        tokens = line.split()
        if len(tokens) == 3 and tokens[0] == "ii" and tokens[1].startswith("linux-image-"):
            release = tokens[1][len("linux-image-") :]
            builds[release] = tokens[2]
            if release not in releases:
                releases.append(release)
    for line in rpm_kernels.splitlines():
        tokens = line.split()
        if (
            len(tokens) == 2
            and tokens[0] in ("kernel", "kernel-core")
            and tokens[1] not in releases
        ):
            releases.append(tokens[1])
    kernel.installed = sorted(set(releases), key=_VersionKey)
    kernel.newest = newest(releases)
    if kernel.running and kernel.running in builds:
        kernel.newest_build = builds[kernel.running]
    return kernel


class _VersionKey:
    """Sort key wrapper for compare_versions."""

    __slots__ = ("v",)

    def __init__(self, v: str) -> None:
        self.v = v

    def __lt__(self, other: _VersionKey) -> bool:
        return compare_versions(self.v, other.v) < 0


_COMPONENT_PATTERNS: dict[str, re.Pattern[str]] = {
    "nginx": re.compile(r"nginx/(\S+)"),
    "ruby": re.compile(r"^ruby (\S+)", re.MULTILINE),
    "rails": re.compile(r"^\S*:?\s{4}rails \(([^)\s]+)\)", re.MULTILINE),
    "passenger": re.compile(
        r"(?:Passenger(?:\(R\))?(?: Enterprise)? |^)(\d+\.\d+[\w.]*)\s*$", re.MULTILINE
    ),
    "postgres": re.compile(r"\(PostgreSQL\) (\S+)"),
    "node": re.compile(r"^v?(\d+\.\d+\.\d+\S*)\s*$", re.MULTILINE),
    "python": re.compile(r"^Python (\S+)", re.MULTILINE),
}


def parse_component(name: str, text: str) -> str | None:
    """A component's version from its probe's output; None when it is not there."""
    pattern = _COMPONENT_PATTERNS.get(name)
    if pattern is None:
        return None
    found = pattern.findall(text)
    return newest(found) if name == "postgres" else (found[0] if found else None)


def parse_package_version(text: str) -> str | None:
    """`dpkg-query -W -f='${db:Status-Abbrev} ${Version}'` or `rpm -q --qf`."""
    for line in text.splitlines():
        tokens = line.split()
        if len(tokens) == 2 and tokens[0] == "ii":
            return tokens[1]
        if len(tokens) == 1 and re.match(r"^\d", tokens[0]):
            return tokens[0]
    return None


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip() and not line.startswith("WARNING: apt does not have"):
            return line.strip()[:200]
    return "no output"


class _Failed(Protocol):
    """Whether a probe failed (recording why in `facts.errors`)."""

    def __call__(self, name: str, ok: Sequence[int] = ...) -> bool: ...


def parse_facts(output: str) -> Facts:
    """The fact script's whole output -> Facts. Never raises: what could not be read is
    named in `errors` and left unknown (None), and the policy treats unknown as failing."""
    sec = split_sections(output)
    facts = Facts()
    if not sec:
        facts.errors["script"] = f"no fact sections in the output ({_first_line(output)})"
        return facts

    def text(name: str) -> str:
        s = sec.get(name)
        return s.text if s is not None else ""

    def failed(name: str, ok: Sequence[int] = (0,)) -> bool:
        s = sec.get(name)
        if s is None:
            facts.errors[name] = "probe did not run"
            return True
        if s.exit_status not in ok:
            facts.errors[name] = f"exit {s.exit_status}: {_first_line(s.text)}"
            return True
        return False

    fam = text("family").strip()
    if fam == "apt":
        facts.family = "apt"
    elif fam == "dnf":
        facts.family = "dnf"
    if not failed("os-release"):
        raw = parse_os_release(text("os-release"))
        facts.os = {
            k.lower(): raw[k]
            for k in ("ID", "ID_LIKE", "VERSION_ID", "VERSION_CODENAME", "PRETTY_NAME")
            if k in raw
        }
    if not failed("uptime"):
        facts.uptime = parse_uptime(text("uptime"))
    facts.kernel = parse_kernel(
        text("kernel"), text("boot-kernels"), text("dpkg-kernels"), text("rpm-kernels")
    )
    required, pkgs = parse_reboot_required(text("reboot-required"))
    if required is None:
        facts.errors["reboot-required"] = "probe did not run or printed nothing usable"
    facts.reboot_required, facts.reboot_required_pkgs = required, pkgs

    if facts.family == "apt":
        _apt_facts(facts, sec, failed, text)
    elif facts.family == "dnf":
        _dnf_facts(facts, sec, failed, text)
    else:
        facts.errors["family"] = "neither apt-get nor dnf found: pending upgrades unknown"

    for name in sec:
        if name.startswith("component:"):
            comp = name.split(":", 1)[1]
            facts.probed.append(comp)
            if version := parse_component(comp, text(name)):
                facts.components[comp] = version
        elif name.startswith("package:"):
            comp = name.split(":", 1)[1]
            facts.probed.append(comp)
            if version := parse_package_version(text(name)):
                facts.components[comp] = version
    return facts


def _apt_facts(
    facts: Facts, sec: Mapping[str, Section], failed: _Failed, text: Callable[[str], str]
) -> None:
    pending: list[Package] | None = None
    if not failed("apt-upgradable"):
        pending = parse_apt_list_upgradable(text("apt-upgradable"))
    if not failed("apt-held"):
        facts.held = parse_name_list(text("apt-held"))
    phased: list[str] = []
    if "apt-simulate" in sec and sec["apt-simulate"].exit_status == 0:
        sim = parse_apt_get_simulate(text("apt-simulate"))
        phased = sim.phased
        if pending is None:
            # An apt without `apt list`: the simulation still says what would upgrade.
            pending = sim.upgrades
            facts.errors.pop("apt-upgradable", None)
    if pending is not None:
        held = set(facts.held)
        for p in pending:
            p.held = p.name in held
            p.phased = p.name in phased
    facts.pending = pending
    stamp = text("apt-lists").strip()
    if stamp.isdigit():
        facts.lists_updated_at = float(stamp)


def _dnf_facts(
    facts: Facts, sec: Mapping[str, Section], failed: _Failed, text: Callable[[str], str]
) -> None:
    # check-update exits 100 when updates are available, 0 when there are none.
    if not failed("dnf-check-update", ok=(0, 100)):
        pending, _notes = parse_dnf_check_update(text("dnf-check-update"))
        security: set[str] = set()
        if not failed("dnf-security"):
            security = {a.name for a in parse_dnf_updateinfo(text("dnf-security"))}
        for p in pending:
            p.security = p.name in security
        facts.pending = pending
    if "dnf-versionlock" in sec and sec["dnf-versionlock"].exit_status == 0:
        facts.held = parse_versionlock(text("dnf-versionlock"))
    s = sec.get("dnf-needs-restarting")
    if s is not None:
        needed, pkgs = parse_needs_restarting(s.text, s.exit_status)
        if needed is not None:
            # There is no /var/run/reboot-required on RHEL-likes: needs-restarting is it.
            facts.reboot_required = bool(facts.reboot_required) or needed
            facts.reboot_required_pkgs = sorted({*facts.reboot_required_pkgs, *pkgs})
            facts.errors.pop("reboot-required", None)


# --------------------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------------------


def _names(pkgs: Sequence[Package] | Sequence[str]) -> str:
    names = [p if isinstance(p, str) else p.name for p in pkgs]
    shown = ", ".join(names[:REASON_NAMES])
    more = len(names) - REASON_NAMES
    return f"{shown} and {more} more" if more > 0 else shown


@dataclass(slots=True)
class Verdict:
    """The hygiene part of the health gate: passed, or the reasons it did not."""

    ok: bool
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "reasons": list(self.reasons)}


def below_minimum(facts: Facts, policy: HygienePolicy) -> list[str]:
    """Components older than the policy's minimum. A component not found on the server
    is not checked: not every role runs every component."""
    out = []
    for comp, minimum in policy.min_versions.items():
        have = facts.components.get(comp)
        if have is not None and compare_versions(have, minimum) < 0:
            out.append(f"{comp} {have} is below the minimum {minimum}")
    return out


def reboot_reasons(facts: Facts) -> list[str]:
    """Why this server needs a reboot (empty when it does not)."""
    out = []
    if facts.reboot_required:
        pkgs = ", ".join(facts.reboot_required_pkgs) or "unknown packages"
        out.append(f"reboot required (by {pkgs})")
    if facts.kernel.reboot_needed:
        k = facts.kernel
        if k.newest and k.running and compare_versions(k.newest, k.running) > 0:
            detail = f"running kernel {k.running}, newest installed {k.newest}"
        else:
            detail = f"running kernel build {k.running_build}, installed {k.newest_build}"
        out.append(f"reboot required: {detail}")
    return out


def evaluate(facts: Facts, policy: HygienePolicy) -> Verdict:
    """Apply the policy. What could not be read fails, so an unreadable server never
    passes the gate."""
    verdict = Verdict(ok=True)

    def fail(reason: str) -> None:
        verdict.ok = False
        verdict.reasons.append(reason)

    if "script" in facts.errors:
        fail(f"could not read host facts: {facts.errors['script']}")
        return verdict
    if policy.pending != "ignore":
        if facts.pending is None:
            why = next(
                (f"{k}: {v}" for k, v in facts.errors.items() if k.startswith(("apt", "dnf"))),
                facts.errors.get("family", "unknown"),
            )
            fail(f"pending upgrades unknown ({why})")
        else:
            actionable = facts.actionable
            security = [p for p in actionable if p.security]
            held = [p for p in actionable if p.held]
            tail = f" (held: {_names(held)})" if held else ""
            if policy.pending == "none" and actionable:
                fail(
                    f"{len(actionable)} pending upgrade(s), {len(security)} security: "
                    f"{_names(actionable)}{tail}"
                )
            elif policy.pending == "security" and security:
                fail(f"{len(security)} pending security upgrade(s): {_names(security)}{tail}")
    if policy.reboot_required_fails:
        if facts.reboot_required is None:
            fail("reboot-required unknown (the probe printed nothing usable)")
        for reason in reboot_reasons(facts):
            fail(reason)
    for reason in below_minimum(facts, policy):
        fail(reason)
    return verdict


# --------------------------------------------------------------------------------------
# Drift and recommendations
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Drift:
    """A component whose version differs from what a run recorded."""

    component: str
    recorded: str | None
    now: str | None
    recorded_at: float
    run_id: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "component": self.component,
            "recorded": self.recorded,
            "now": self.now,
            "recorded_at": self.recorded_at,
            "run_id": self.run_id,
        }

    def describe(self) -> str:
        return f"{self.component} {self.recorded or 'absent'} -> {self.now or 'absent'}"


def find_drift(
    recorded: Mapping[str, str],
    recorded_probed: Sequence[str],
    facts: Facts,
    *,
    recorded_at: float,
    run_id: str,
) -> list[Drift]:
    """Components changed since the record. Only components both reads looked for are
    compared, so adding a component to the config is not mistaken for a change."""
    looked = set(recorded_probed or recorded) & set(facts.probed)
    out = []
    for comp in sorted(looked):
        before, now = recorded.get(comp), facts.components.get(comp)
        if before != now:
            out.append(Drift(comp, before, now, recorded_at, run_id))
    return out


@dataclass(frozen=True, slots=True)
class Recommendation:
    """What to do with a server (or a stack), and why."""

    action: Action
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "reason": self.reason}


DAY = 86400.0


def recommend(
    *,
    state: str,
    facts: Facts | None,
    policy: HygienePolicy,
    drift: Sequence[Drift] = (),
    age: float | None = None,
    error: str | None = None,
) -> Recommendation:
    """replace > patch > reboot > leave. changeover replaces rather than repairs, so
    anything a fresh server would not have (a security hole, an old component, a hand
    change, old age, an unknown state) means replace; only non-security upgrades are
    worth patching in place, and a reboot alone fixes only a pending reboot."""
    if state != "running":
        return Recommendation("replace", f"server is {state}")
    if error is not None or facts is None:
        return Recommendation("replace", f"could not be audited: {error or 'no facts'}")
    replace: list[str] = []
    actionable = facts.actionable if facts.pending is not None else []
    security = [p for p in actionable if p.security]
    if policy.pending != "ignore":
        if facts.pending is None:
            replace.append("pending upgrades unknown")
        elif security:
            replace.append(f"{len(security)} pending security upgrade(s): {_names(security)}")
    replace += below_minimum(facts, policy)
    if drift:
        replace.append(
            f"changed by hand since run {drift[0].run_id} recorded it: "
            + ", ".join(d.describe() for d in drift)
        )
    if policy.max_age_days is not None and age is not None and age > policy.max_age_days * DAY:
        replace.append(f"launched {age / DAY:.0f}d ago, past max_age_days {policy.max_age_days:g}")
    if replace:
        return Recommendation("replace", "; ".join(replace))
    reboot = reboot_reasons(facts)
    others = [p for p in actionable if not p.security]
    if others and policy.pending == "none":
        then = "; then a reboot" if reboot else ""
        return Recommendation(
            "patch", f"{len(others)} pending upgrade(s), none security: {_names(others)}{then}"
        )
    if reboot:
        return Recommendation("reboot", "; ".join(reboot))
    note = ""
    if others:
        note = f" ({len(others)} non-security upgrade(s) pending; policy: {policy.pending})"
    return Recommendation("leave", f"up to date, no reboot required, no drift{note}")


def severity(action: Action) -> int:
    """0 for the most severe action."""
    return ACTIONS.index(action)
