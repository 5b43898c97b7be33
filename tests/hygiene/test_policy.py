"""The hygiene policy, drift and recommendations, as pure functions over recorded facts."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from orchestrator.hygiene import (
    Drift,
    Facts,
    Kernel,
    Package,
    evaluate,
    find_drift,
    parse_facts,
    recommend,
    split_sections,
)
from orchestrator.settings import HygienePolicy
from tests.hygiene.test_fixtures import FIXTURES, load


def recorded(name: str) -> Facts:
    return parse_facts(load(FIXTURES / name)[1])


HOST = "debian12-host/facts.txt"  # 135 pending, 81 security
CLEAN = "debian12-chroot/upgraded-facts.txt"


def clean_facts(**changes: object) -> Facts:
    facts = recorded(CLEAN)
    for key, value in changes.items():
        setattr(facts, key, value)
    return facts


def test_pending_policy_none_security_and_ignore() -> None:
    """'none' fails on any pending upgrade, 'security' only on security ones, 'ignore' never."""
    facts = recorded(HOST)
    none = evaluate(facts, HygienePolicy(pending="none"))
    assert not none.ok and none.reasons[0].startswith("135 pending upgrade(s), 81 security")
    security = evaluate(facts, HygienePolicy(pending="security"))
    assert not security.ok and security.reasons[0].startswith("81 pending security upgrade(s)")
    assert evaluate(facts, HygienePolicy(pending="ignore")).ok


def test_security_policy_passes_a_server_with_only_non_security_upgrades() -> None:
    """Non-security upgrades alone pass the 'security' policy and fail 'none'."""
    facts = clean_facts(pending=[Package("tzdata", "2026f-0", "2026b-0", origins=("stable",))])
    assert evaluate(facts, HygienePolicy(pending="security")).ok
    assert not evaluate(facts, HygienePolicy(pending="none")).ok


def test_phased_upgrades_are_not_pending_but_held_ones_are() -> None:
    """Ubuntu's phased upgrades are not offered yet, so they pass; a held upgrade fails."""
    phased = Package("software-properties-common", "0.99.48", "0.99.46", phased=True)
    assert evaluate(clean_facts(pending=[phased]), HygienePolicy()).ok
    held = Package("openssl", "3.0.22", "3.0.20", security=True, held=True)
    verdict = evaluate(clean_facts(pending=[held], held=["openssl"]), HygienePolicy())
    assert verdict.reasons == ["1 pending upgrade(s), 1 security: openssl (held: openssl)"]


def test_reboot_required_and_a_newer_kernel_fail_unless_policy_allows() -> None:
    """The sentinel and a newer installed kernel each fail; reboot_required_fails=false lets
    both through."""
    facts = recorded("ubuntu2204/facts-kernel-reboot.txt")
    policy = HygienePolicy(pending="ignore")
    assert evaluate(facts, policy).reasons == [
        "reboot required (by linux-image-5.15.0-105-generic, linux-base)",
        "reboot required: running kernel 5.15.0-102-generic, newest installed 5.15.0-105-generic",
    ]
    assert evaluate(facts, HygienePolicy(pending="ignore", reboot_required_fails=False)).ok


def test_debian_kernel_rebuilt_under_the_same_release_needs_a_reboot() -> None:
    """Same `uname -r`, newer package build (uname -v names the running one): reboot."""
    kernel = Kernel(
        running="6.1.0-28-amd64",
        running_build="6.1.119-1",
        installed=["6.1.0-28-amd64"],
        newest="6.1.0-28-amd64",
        newest_build="6.1.123-1",
    )
    verdict = evaluate(clean_facts(kernel=kernel), HygienePolicy())
    assert verdict.reasons == [
        "reboot required: running kernel build 6.1.119-1, installed 6.1.123-1"
    ]


def test_minimum_versions_per_component() -> None:
    """A component below its minimum fails; one the server does not run is not checked."""
    facts = recorded(CLEAN)  # nginx 1.22.1, postgres 15.20, no redis
    verdict = evaluate(
        facts, HygienePolicy(min_versions={"nginx": "1.24", "postgres": "15.2", "redis": "7"})
    )
    assert verdict.reasons == ["nginx 1.22.1 is below the minimum 1.24"]


def test_unreadable_facts_fail_closed() -> None:
    """Output with no sections, or a failed package probe, never passes the gate."""
    garbage = evaluate(parse_facts("Permission denied (publickey).\n"), HygienePolicy())
    assert not garbage.ok and garbage.reasons[0].startswith("could not read host facts")
    output = load(FIXTURES / CLEAN)[1].replace(
        "@@changeover-exit apt-upgradable 0", "@@changeover-exit apt-upgradable 100"
    )
    output = output.replace("@@changeover-exit apt-simulate 0", "@@changeover-exit apt-simulate 1")
    facts = parse_facts(output)
    assert facts.pending is None and "apt-upgradable" in facts.errors
    assert evaluate(facts, HygienePolicy()).reasons[0].startswith("pending upgrades unknown")
    assert evaluate(facts, HygienePolicy(pending="ignore")).ok


def test_sections_survive_a_banner_and_a_cut_off_end() -> None:
    """Text before the first section is ignored; a section cut short has no exit status."""
    sections = split_sections("Welcome!\n@@changeover uptime\n12.5 3.0\n\n@@changeover kernel\n6.1")
    assert sections["uptime"].text == "12.5 3.0" and sections["uptime"].exit_status is None
    assert sections["kernel"].text == "6.1"


def test_drift_compares_only_components_both_reads_looked_for() -> None:
    """A changed version is drift; a component added to the config later is not."""
    facts = recorded(CLEAN)  # nginx 1.22.1, python 3.11.2, openssl ...
    before = {"nginx": "1.20.0", "python": "3.11.2"}
    drift = find_drift(before, ["nginx", "python"], facts, recorded_at=100.0, run_id="r1")
    assert drift == [Drift("nginx", "1.20.0", "1.22.1", 100.0, "r1")]
    removed = find_drift(
        {"nginx": "1.22.1", "node": "18"},
        ["nginx", "node"],
        clean_facts(components={}),
        recorded_at=1.0,
        run_id="r",
    )
    assert [(d.component, d.recorded, d.now) for d in removed] == [
        ("nginx", "1.22.1", None),
        ("node", "18", None),
    ]


def test_recommendations_replace_patch_reboot_leave() -> None:
    """replace > patch > reboot > leave, each with the reason that chose it."""
    policy = HygienePolicy()
    sec = Package("openssl", "3.0.22", "3.0.20", security=True)
    other = Package("tzdata", "2026f", "2026b")
    assert recommend(state="stopped", facts=None, policy=policy).action == "replace"
    rec = recommend(state="running", facts=None, policy=policy, error="ssh: unreachable")
    assert rec.action == "replace" and "ssh: unreachable" in rec.reason
    assert recommend(state="running", facts=clean_facts(pending=[sec]), policy=policy).action == (
        "replace"
    )
    drift = [Drift("nginx", "1.22.1", "1.24.0", 1.0, "r1")]
    rec = recommend(state="running", facts=clean_facts(), policy=policy, drift=drift)
    assert rec.action == "replace" and "nginx 1.22.1 -> 1.24.0" in rec.reason
    old = HygienePolicy(max_age_days=30)
    assert recommend(state="running", facts=clean_facts(), policy=old, age=31 * 86400).action == (
        "replace"
    )
    patched = recommend(
        state="running", facts=clean_facts(pending=[other], reboot_required=True), policy=policy
    )
    assert patched.action == "patch" and patched.reason.endswith("then a reboot")
    rebooting = recommend(state="running", facts=clean_facts(reboot_required=True), policy=policy)
    assert rebooting.action == "reboot"
    assert recommend(state="running", facts=clean_facts(), policy=policy).action == "leave"
    lenient = recommend(
        state="running",
        facts=clean_facts(pending=[other]),
        policy=HygienePolicy(pending="security"),
    )
    assert lenient.action == "leave" and "1 non-security upgrade(s) pending" in lenient.reason


@pytest.mark.parametrize("name", ["nginx; rm -rf /", "$(id)", "-rf", "a b"])
def test_component_names_that_could_inject_shell_are_refused(name: str) -> None:
    """Component names end up in a command line, so only package-style names are accepted."""
    with pytest.raises(ValidationError, match="use a package name"):
        HygienePolicy(components=[name])
    with pytest.raises(ValidationError, match="gemfile_locks"):
        HygienePolicy(gemfile_locks=["/srv/$(id)/Gemfile.lock"])
