"""The local cloud's own transport: changeover's fact script, answered by a simulated host.

A local server is a process, not a machine, and its packages are SIMULATED (see
providers/local/app.py), so no real apt runs on it. This transport reads the server's
``GET /facts`` and answers each section of the fact script the way the real command
would print it on a Debian host (``apt list --upgradable``, ``/proc/uptime``,
``nginx -v`` ...). The output then goes through the same parsers and the same policy
as output read over SSH or SSM, so the local cloud exercises the whole hygiene path.
Any other command exits 127: a simulated host runs nothing else.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from orchestrator.hygiene import script_sections
from orchestrator.models import Server
from providers.local.http import HttpError, request
from providers.transport import CommandResult, TransportUnavailable

ATTEMPTS = 3  # reads of /facts before the server counts as unreachable
BACKOFF = 0.2  # seconds before the second read; doubles after that

# Sections of the script's dnf branch: a simulated Debian host never takes it.
_DNF_SECTIONS = frozenset(
    {"dnf-check-update", "dnf-security", "dnf-needs-restarting", "dnf-versionlock", "rpm-kernels"}
)

# Component -> (simulated package, how its probe prints the version).
_COMPONENTS: dict[str, tuple[str, str]] = {
    "nginx": ("nginx", "nginx version: nginx/{v}"),
    "ruby": ("ruby", "ruby {v} (simulated) [x86_64-linux-gnu]"),
    "rails": ("rails", "/var/deploy/app/web_head/current/Gemfile.lock:    rails ({v})"),
    "passenger": ("passenger", "Phusion Passenger(R) {v}"),
    "postgres": ("postgresql", "postgres (PostgreSQL) {v} (Debian {full})"),
    "node": ("nodejs", "v{v}"),
    "python": ("python3", "Python {v}"),
}


def upstream(version: str) -> str:
    """'1:1.22.1-9+b1' -> '1.22.1': what a program prints about itself."""
    v = version.split(":", 1)[-1]
    return v.rsplit("-", 1)[0] if "-" in v else v


def kernel_release(version: str) -> str:
    """The simulated `uname -r` of a kernel package version."""
    return f"{version}-amd64"


def render(sections: list[str], facts: dict[str, Any]) -> str:
    """The fact script's output, as a Debian host in this state would print it."""
    out = []
    for name in sections:
        if name in _DNF_SECTIONS:
            continue
        body, status = _section(name, facts)
        out.append(f"@@changeover {name}\n{body}\n\n@@changeover-exit {name} {status}\n")
    return "".join(out)


def _section(name: str, facts: dict[str, Any]) -> tuple[str, int]:
    installed: dict[str, str] = facts.get("installed", {})
    kernel = facts.get("kernel") or {}
    pending: list[dict[str, Any]] = facts.get("pending", [])
    held: list[str] = facts.get("held", [])
    if name == "os-release":
        return "\n".join(f'{k}="{v}"' for k, v in facts.get("os_release", {}).items()), 0
    if name == "family":
        return "apt", 0
    if name == "kernel":
        running = kernel.get("running")
        if not running:
            return "", 0
        return f"{kernel_release(running)}\n#1 SMP PREEMPT_DYNAMIC Debian {running} (simulated)", 0
    if name == "boot-kernels":
        return "\n".join(kernel_release(v) for v in kernel.get("installed", [])), 0
    if name == "dpkg-kernels":
        lines = [f"ii  linux-image-{kernel_release(v)} {v}" for v in kernel.get("installed", [])]
        return "\n".join(lines), 0 if lines else 1
    if name == "uptime":
        up = float(facts.get("uptime") or 0.0)
        return f"{up:.2f} {up * 1.9:.2f}", 0
    if name == "reboot-required":
        if facts.get("reboot_required"):
            return "\n".join(["present", *facts.get("reboot_required_pkgs", [])]), 0
        return "absent", 0
    if name == "apt-upgradable":
        lines = [
            "",
            "WARNING: apt does not have a stable CLI interface. Use with caution in scripts.",
            "",
            "Listing...",
        ]
        for p in pending:
            suite = "stable-security" if p.get("security") else "stable"
            lines.append(
                f"{p['name']}/{suite} {p['latest']} amd64 [upgradable from: {p['installed']}]"
            )
        return "\n".join(lines), 0
    if name == "apt-held":
        return "\n".join(held), 0
    if name == "apt-simulate":
        return _simulate(pending, held), 0
    if name == "apt-lists":
        return "", 0
    if name.startswith("component:"):
        return _component(name.split(":", 1)[1], installed)
    if name.startswith("package:"):
        pkg = name.split(":", 1)[1]
        if pkg in installed:
            return f"ii  {installed[pkg]}", 0
        return f"dpkg-query: no packages found matching {pkg}", 1
    return f"sh: 1: {name}: not found (simulated host)", 127


def _simulate(pending: list[dict[str, Any]], held: list[str]) -> str:
    lines = ["Reading package lists...", "Building dependency tree...", "Calculating upgrade..."]
    kept = [p for p in pending if p["name"] in held]
    moving = [p for p in pending if p["name"] not in held]
    if kept:
        lines += ["The following packages have been kept back:", "  " + " ".join(held)]
    lines.append(
        f"{len(moving)} upgraded, 0 newly installed, 0 to remove and {len(kept)} not upgraded."
    )
    for p in moving:
        origin = "Debian-Security:12/stable-security" if p.get("security") else "Debian:12/stable"
        lines.append(f"Inst {p['name']} [{p['installed']}] ({p['latest']} {origin} [amd64])")
    return "\n".join(lines)


def _component(comp: str, installed: dict[str, str]) -> tuple[str, int]:
    if comp not in _COMPONENTS:
        return f"sh: 1: {comp}: not found", 127
    pkg, fmt = _COMPONENTS[comp]
    if pkg not in installed:
        return ("", 0) if comp == "rails" else (f"sh: 1: {comp}: not found", 127)
    full = installed[pkg]
    return fmt.format(v=upstream(full), full=full), 0


class LocalTransport:
    """Runs changeover's fact script on a local cloud server (simulated)."""

    name = "local"

    def __init__(
        self,
        *,
        attempts: int = ATTEMPTS,
        backoff: float = BACKOFF,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.attempts = attempts
        self.backoff = backoff
        self.sleep = sleep

    def run(self, server: Server, command: str, *, timeout: float = 30.0) -> CommandResult:
        sections = script_sections(command)
        if not sections:
            return CommandResult(
                127, "", "the local cloud simulates its hosts: only changeover's fact script runs"
            )
        if server.port is None:
            raise TransportUnavailable(f"server {server.id} is {server.state}: nothing to reach")
        facts: dict[str, Any] | None = None
        error = ""
        delay = self.backoff
        for attempt in range(self.attempts):
            if attempt:
                self.sleep(delay)
                delay *= 2
            try:
                facts = request(server.port, "GET", "/facts", timeout=min(timeout, 10.0))[1]
                break
            except HttpError as exc:
                error = str(exc)
        if facts is None:
            raise TransportUnavailable(
                f"server {server.id}: /facts unreachable after {self.attempts} attempts: {error}"
            )
        return CommandResult(0, render(sections, facts))
