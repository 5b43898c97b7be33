"""Parsers against recorded command output: one loader turns every fixture into a test.

Each ``tests/fixtures/hygiene/**/NAME.txt`` holds one command's output under a header
naming the command, where it was captured (or that it was written from documented
formats) and its exit status; ``NAME.expect.json`` names the parser and what it must
find. See tests/fixtures/hygiene/README.md for how each was produced.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orchestrator import hygiene
from orchestrator.settings import HygienePolicy

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hygiene"
SEPARATOR = "# --- output below, verbatim ---\n"
# The policy the facts fixtures were captured with (its script is fact-script-v1.sh).
CAPTURE_POLICY = HygienePolicy(components=["openssl"])


def load(path: Path) -> tuple[dict[str, str], str]:
    """(header fields, verbatim output) of one fixture."""
    head, sep, body = path.read_text().partition(SEPARATOR)
    assert sep, f"{path}: no '{SEPARATOR.strip()}' line"
    fields = {}
    for line in head.splitlines():
        key, _, value = line.removeprefix("# ").partition(": ")
        fields[key] = value
    return fields, body


def _packages(pkgs: list[hygiene.Package]) -> dict[str, Any]:
    return {
        "count": len(pkgs),
        "security": sum(p.security for p in pkgs),
        "names": sorted(p.name for p in pkgs),
        "packages": {p.name: p.to_dict() for p in pkgs},
    }


def _reboot_files(text: str) -> dict[str, Any]:
    parts = [p.strip("\n") for p in text.split("---\n")]
    files = [ln for ln in parts[0].splitlines() if ln.startswith("/var/run/")]
    out: dict[str, Any] = {"files": files, "pkgs": hygiene.parse_name_list(parts[-1])}
    if len(parts) == 3:
        out["message"] = parts[1].strip()
    if not files:
        out["pkgs"] = []
    return out


def _facts(text: str) -> dict[str, Any]:
    facts = hygiene.parse_facts(text)
    out = facts.to_dict()
    out["pending_held"] = sorted(p.name for p in facts.pending or [] if p.held)
    out["pending_phased"] = sorted(p.name for p in facts.pending or [] if p.phased)
    out["verdict_none"] = hygiene.evaluate(facts, HygienePolicy(pending="none")).reasons
    out["verdict_security"] = hygiene.evaluate(facts, HygienePolicy(pending="security")).reasons
    out["action"] = hygiene.recommend(state="running", facts=facts, policy=HygienePolicy()).action
    return out


def summarise(parser: str, text: str, exit_status: int) -> dict[str, Any]:
    """Run the named parser and describe its result as plain data."""
    if parser == "apt_list_upgradable":
        return _packages(hygiene.parse_apt_list_upgradable(text))
    if parser == "apt_get_simulate":
        sim = hygiene.parse_apt_get_simulate(text)
        return {
            "upgrades": len(sim.upgrades),
            "security": sum(p.security for p in sim.upgrades),
            "kept_back": sim.kept_back,
            "phased": sim.phased,
            "not_upgraded": sim.not_upgraded,
        }
    if parser in {"name_list", "versionlock"}:
        names = (
            hygiene.parse_name_list(text)
            if parser == "name_list"
            else hygiene.parse_versionlock(text)
        )
        return {"names": names}
    if parser == "reboot_files":
        return _reboot_files(text)
    if parser == "dpkg_kernels":
        kernel = hygiene.parse_kernel("", "", text)
        return {"installed": kernel.installed, "newest": kernel.newest}
    if parser == "components":
        return {
            name: hygiene.parse_component(name, text)
            for name in hygiene.COMPONENT_PROBES
            if hygiene.parse_component(name, text)
        }
    if parser == "gemfile_lock":
        return {"rails": hygiene.parse_component("rails", text)}
    if parser == "dnf_check_update":
        pkgs, notes = hygiene.parse_dnf_check_update(text)
        return {**_packages(pkgs), "notes": notes}
    if parser == "dnf_updateinfo":
        advisories = hygiene.parse_dnf_updateinfo(text)
        return {
            "names": sorted({a.name for a in advisories}),
            "severities": sorted({a.severity for a in advisories}),
        }
    if parser == "needs_restarting":
        required, pkgs = hygiene.parse_needs_restarting(text, exit_status)
        return {"required": required, "pkgs": pkgs}
    if parser == "facts":
        return _facts(text)
    raise AssertionError(f"unknown parser {parser!r}")


def matches(expected: Any, actual: Any, where: str = "") -> None:
    """Expected dicts are subsets; reason lists match by prefix; anything else equals."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: {actual!r} is not a mapping"
        for key, value in expected.items():
            assert key in actual, f"{where}.{key} missing from {sorted(actual)}"
            matches(value, actual[key], f"{where}.{key}")
    elif isinstance(expected, list) and where.rsplit(".", 1)[-1].startswith("verdict"):
        assert len(expected) == len(actual), f"{where}: {actual!r}"
        for prefix, reason in zip(expected, actual, strict=True):
            assert reason.startswith(prefix), f"{where}: {reason!r} !^ {prefix!r}"
    else:
        assert expected == actual, f"{where}: expected {expected!r}, got {actual!r}"


CASES = sorted(FIXTURES.rglob("*.expect.json"))


@pytest.mark.parametrize(
    "case", CASES, ids=[str(c.relative_to(FIXTURES)).removesuffix(".expect.json") for c in CASES]
)
def test_parser_reads_recorded_output(case: Path) -> None:
    """Each recorded output parses to what its expectation file says."""
    spec = json.loads(case.read_text())
    fields, body = load(case.with_name(case.name.removesuffix(".expect.json") + ".txt"))
    matches(spec["expect"], summarise(spec["parser"], body, int(fields["exit"])), spec["parser"])


def test_every_fixture_names_its_command_and_provenance() -> None:
    """Every output fixture says which command produced it, and whether it is real."""
    outputs = list(FIXTURES.rglob("*.txt"))
    assert len(outputs) >= 30
    for path in outputs:
        fields, _ = load(path)
        assert fields.get("command"), path
        assert fields.get("provenance") in (
            "real output",
            "written from documented format (not captured on a real host)",
        ), path
        assert path.with_name(path.stem + ".expect.json").exists(), f"{path}: no expectation"
    real = [p for p in outputs if load(p)[0]["provenance"] == "real output"]
    assert {p.parent.name for p in real} == {"debian12-chroot", "debian12-host"}


def test_fact_script_is_the_one_the_fixtures_were_captured_with() -> None:
    """The facts fixtures stay true to the script: change it, and they must be re-captured."""
    recorded = (FIXTURES / "fact-script-v1.sh").read_text()
    assert hygiene.fact_script(CAPTURE_POLICY) == recorded


@pytest.mark.parametrize(
    ("a", "b", "order"),
    [
        ("1.0", "1.0", 0),
        ("1.0~rc1", "1.0", -1),
        ("1:1.0", "2.0", 1),
        ("6.1.0-50-amd64", "6.1.0-56-amd64", -1),
        ("3.0.20-1~deb12u2", "3.0.22-1~deb12u2", -1),
        ("2:6.1.7.10+dfsg-1~deb12u2", "2:6.1.7.10+dfsg-1~deb12u4", -1),
        ("5.2.15-2+b8", "5.2.15-2+b13", -1),
        ("6.1.79-99.167.amzn2023.x86_64", "6.1.82-99.168.amzn2023.x86_64", -1),
        ("1.22.1", "1.24", -1),
        ("3.1.2p20", "3.1.2", 1),
    ],
)
def test_versions_compare_as_dpkg_orders_them(a: str, b: str, order: int) -> None:
    """compare_versions follows dpkg: epochs, '~' before the end, numeric runs."""
    assert hygiene.compare_versions(a, b) == order
    assert hygiene.compare_versions(b, a) == -order
