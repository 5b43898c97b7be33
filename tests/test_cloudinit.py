"""First-boot user data (providers/cloudinit.py) with the stack's `[security]` policy:
fresh servers upgrade everything and set up unattended upgrades from the security
origins only, as `changeover security enable` does.

Every cloud-config rendered here is checked by the real `cloud-init schema` (Debian's
cloud-init package; .ci/run installs it). Without it the tests that need it skip with
the reason, except under CI, where they fail. The script the cloud-config writes is
unpacked and read: it carries `security enable`'s own files (security origins only,
Automatic-Reboot "false"), and the ready signal stays the last command.
tests/debian/test_first_boot_security.py runs that script on a real Debian 12.
"""

from __future__ import annotations

import base64
import email
import gzip
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.security import (
    APT_FILE,
    APT_PERIODIC_FILE,
    DNF_FILE,
    DNF_TIMER_DROPIN,
    SECURITY_ORIGINS,
    apt_files,
    dnf_files,
    is_security_origin,
)
from orchestrator.settings import SecurityPolicy, StackConfig, load_settings
from providers.cloudinit import READY_COMMAND, SECURITY_SCRIPT, first_boot_user_data
from providers.libcloud_provider import LINKS_FILE, user_data
from tests.test_bad_input import invoke

ON = SecurityPolicy()
OFF = SecurityPolicy(unattended=False)
USER_CONFIG = (
    "#cloud-config\n"
    "packages: [nginx, [libpq5, 15.5-0+deb12u1]]\n"
    "package_upgrade: false\n"
    "write_files:\n"
    "- {path: /etc/motd, content: hello, permissions: '0644'}\n"
    "runcmd:\n"
    "- echo hi\n"
    "- [touch, /var/tmp/user-was-here]\n"
    "bootcmd: [echo early]\n"
    "timezone: Europe/Berlin\n"
)
USER_SCRIPT = "#!/bin/sh\necho hello from the user\n"
# What first_boot_user_data rendered before the policy existed (unattended = false).
TODAY = (
    "#cloud-config\n"
    "package_update: true\n"
    "package_upgrade: true\n"
    "package_reboot_if_required: true\n"
    "runcmd:\n"
    f"- {READY_COMMAND}\n"
)


def _need(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI installs it: see .ci/run)")
    pytest.skip(reason)


def schema_check(text: str, where: Path) -> subprocess.CompletedProcess[str]:
    """`cloud-init schema --config-file` on one cloud-config document."""
    tool = shutil.which("cloud-init")
    if tool is None:
        _need("cloud-init is missing (apt-get install --no-install-recommends cloud-init)")
        raise AssertionError  # not reached
    where.write_text(text)
    return subprocess.run(
        [tool, "schema", "--config-file", str(where)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def assert_valid(text: str, tmp_path: Path) -> None:
    """Valid for the real cloud-init. Each test calls it last, so that without cloud-init
    (a skip, outside CI) its own checks have still run."""
    assert text.startswith("#cloud-config\n")
    proc = schema_check(text, tmp_path / "user-data.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Valid cloud-config" in proc.stdout, proc.stdout


def parts(user_data_text: str) -> list[tuple[str, str]]:
    """A MIME multipart user data's parts: (content type, text)."""
    message = email.message_from_string(user_data_text)
    assert message.is_multipart()
    found = []
    for part in message.walk():
        if not part.is_multipart():
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            found.append((part.get_content_type(), payload.decode()))
    return found


def script_of(doc: dict[str, Any]) -> str:
    """The first-boot security script a cloud-config writes, unpacked as cloud-init does."""
    [entry] = [f for f in doc["write_files"] if f["path"] == SECURITY_SCRIPT]
    assert entry["encoding"] == "gz+b64" and entry["permissions"] == "0700"
    assert entry["owner"] == "root:root"
    return gzip.decompress(base64.b64decode(entry["content"])).decode()


def heredocs(script: str, path: str) -> list[str]:
    """The contents the script writes to `path` (one per distribution branch)."""
    pattern = re.escape(f"cat > '{path}.changeover-new' <<'CHANGEOVER_EOF'\n")
    return re.findall(pattern + r"(.*?)CHANGEOVER_EOF\n", script, flags=re.S)


def origins(apt_conf: str) -> list[str]:
    block = apt_conf.split("Unattended-Upgrade::Origins-Pattern {", 1)[1].split("};", 1)[0]
    return re.findall(r'"([^"]*)";', block)


def assert_security_only(script: str, reboot_at: str | None = None) -> None:
    """The script's apt and dnf files are `security enable`'s, security origins only."""
    apt_confs = heredocs(script, APT_FILE)
    assert sorted(apt_confs) == sorted(apt_files(d, reboot_at)[APT_FILE] for d in SECURITY_ORIGINS)
    for conf in apt_confs:
        assert origins(conf) and all(is_security_origin(o) for o in origins(conf)), conf
        assert "#clear Unattended-Upgrade::Origins-Pattern;" in conf
        assert "#clear Unattended-Upgrade::Allowed-Origins;" in conf
        reboot = '"true"' if reboot_at else '"false"'
        assert re.findall(r"Unattended-Upgrade::Automatic-Reboot (\S+);", conf) == [reboot]
        if reboot_at:
            assert f'Unattended-Upgrade::Automatic-Reboot-Time "{reboot_at}";' in conf
    periodic = heredocs(script, APT_PERIODIC_FILE)
    assert periodic == [apt_files("debian", reboot_at)[APT_PERIODIC_FILE]] * len(SECURITY_ORIGINS)
    assert 'APT::Periodic::Unattended-Upgrade "1";' in periodic[0]
    [dnf] = heredocs(script, DNF_FILE)
    assert dnf == dnf_files(reboot_at)[DNF_FILE] and "upgrade_type = security\n" in dnf
    assert ("reboot = when-needed\n" if reboot_at else "reboot = never\n") in dnf
    assert len(heredocs(script, DNF_TIMER_DROPIN)) == (1 if reboot_at else 0)
    # It picks the branch on the server, as `security status` does, and retries apt.
    assert ". /etc/os-release" in script and "command -v apt-get" in script
    assert "command -v dnf" in script and "systemctl enable --now dnf-automatic.timer" in script
    assert "unattended-upgrades" in script and "dnf-automatic" in script


def check_shell(script: str, tmp_path: Path) -> None:
    """The script parses as POSIX sh (dash, /bin/sh on Debian and Ubuntu)."""
    path = tmp_path / "unattended-security.sh"
    path.write_text(script)
    shell = shutil.which("dash") or "/bin/sh"
    proc = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


# --- the user data --------------------------------------------------------------------------
def test_default_policy_sets_up_security_only_unattended_upgrades(tmp_path: Path) -> None:
    """Alone, with the default policy: upgrade everything, reboot if required, write and
    run the security script, then the ready signal, last. Valid for cloud-init."""
    default = StackConfig.model_validate({"address": "eip", "roles": {"web": {}}}).security
    assert default == ON and default.unattended and default.reboot_at is None
    text = first_boot_user_data(None, default)
    doc = yaml.safe_load(text)
    assert doc["package_update"] and doc["package_upgrade"] and doc["package_reboot_if_required"]
    assert doc["runcmd"] == [["sh", SECURITY_SCRIPT], READY_COMMAND]
    assert "packages" not in doc  # installed by the script, for apt or dnf: see below
    script = script_of(doc)
    assert_security_only(script)
    check_shell(script, tmp_path)
    assert len(text) < 4096, "EC2 takes 16 KB of user data: leave the user room"
    assert_valid(text, tmp_path)


def test_reboot_at_is_the_same_as_security_enable_reboot_at(tmp_path: Path) -> None:
    """`reboot_at = "03:30"`: Automatic-Reboot "true" at that time (apt), a timer drop-in
    that runs dnf-automatic then (dnf): what `security enable --reboot-at 03:30` writes."""
    text = first_boot_user_data(None, SecurityPolicy(reboot_at="03:30"))
    assert_security_only(script_of(yaml.safe_load(text)), reboot_at="03:30")
    assert_valid(text, tmp_path)


def test_unattended_false_is_todays_user_data() -> None:
    """`unattended = false` (or no policy) renders exactly what changeover rendered before."""
    assert first_boot_user_data(None, OFF) == first_boot_user_data(None) == TODAY
    assert first_boot_user_data(USER_CONFIG, OFF) == first_boot_user_data(USER_CONFIG)
    doc = yaml.safe_load(first_boot_user_data(USER_CONFIG, OFF))
    assert doc["runcmd"][-1] == READY_COMMAND and SECURITY_SCRIPT not in str(doc)
    assert [t for t, _ in parts(first_boot_user_data(USER_SCRIPT, OFF))] == [
        "text/cloud-config",
        "text/x-shellscript",
    ]
    assert parts(first_boot_user_data(USER_SCRIPT, OFF))[0][1] == TODAY


def test_a_users_cloud_config_keeps_everything(tmp_path: Path) -> None:
    """A user #cloud-config: its packages, files, commands and other keys all stay; the
    three package keys are forced; its commands run before the security script, the
    ready signal last."""
    text = first_boot_user_data(USER_CONFIG, ON)
    theirs = yaml.safe_load(USER_CONFIG)
    doc = yaml.safe_load(text)
    assert doc["packages"] == theirs["packages"]
    assert doc["package_upgrade"] is True and doc["package_update"] is True
    assert doc["write_files"][:-1] == theirs["write_files"]
    assert doc["write_files"][-1]["path"] == SECURITY_SCRIPT
    assert doc["runcmd"] == [*theirs["runcmd"], ["sh", SECURITY_SCRIPT], READY_COMMAND]
    for key in ("bootcmd", "timezone"):
        assert doc[key] == theirs[key]
    assert_security_only(script_of(doc))
    assert_valid(text, tmp_path)


def test_a_users_shell_script_becomes_the_second_part(tmp_path: Path) -> None:
    """A shell script: changeover's cloud-config (with the policy) is the first MIME part,
    the script, unchanged, the second."""
    found = parts(first_boot_user_data(USER_SCRIPT, ON))
    assert [t for t, _ in found] == ["text/cloud-config", "text/x-shellscript"]
    assert found[1][1] == USER_SCRIPT.strip()
    doc = yaml.safe_load(found[0][1])
    assert doc["runcmd"] == [["sh", SECURITY_SCRIPT], READY_COMMAND]
    assert_security_only(script_of(doc))
    assert_valid(found[0][1], tmp_path)


def test_libcloud_links_file_and_policy_together(tmp_path: Path) -> None:
    """libcloud's user data adds its links file to the user's files; all three stay."""
    links = {"db": {"private": "10.0.0.5", "public": None}}
    text = user_data(links, USER_CONFIG, ON)
    doc = yaml.safe_load(text)
    paths = [f["path"] for f in doc["write_files"]]
    assert paths == ["/etc/motd", LINKS_FILE, SECURITY_SCRIPT]
    assert doc["runcmd"][-2:] == [["sh", SECURITY_SCRIPT], READY_COMMAND]
    assert_valid(text, tmp_path)


def test_the_schema_check_is_not_a_rubber_stamp(tmp_path: Path) -> None:
    """The validator the tests rely on refuses a broken file entry and a bad runcmd."""
    doc = yaml.safe_load(first_boot_user_data(None, ON))
    doc["write_files"][0]["encoding"] = "zip"
    bad = schema_check("#cloud-config\n" + yaml.safe_dump(doc), tmp_path / "bad.yaml")
    assert bad.returncode != 0 and "encoding" in bad.stdout + bad.stderr
    bad = schema_check("#cloud-config\nruncmd: 3\n", tmp_path / "bad2.yaml")
    assert bad.returncode != 0 and "runcmd" in bad.stdout + bad.stderr


# --- the providers send it ------------------------------------------------------------------
def test_aws_launches_with_the_stacks_policy() -> None:
    """The AWS provider's RunInstances carries the user data for the stack's policy."""
    from moto import mock_aws

    from tests.aws.world import AwsWorld

    with mock_aws():
        aws = AwsWorld()

        def launched(security: dict[str, Any]) -> str:
            cfg = aws.config(db=False).model_dump(mode="json")
            cfg["security"] = security
            provider = aws.provider(StackConfig.model_validate(cfg))
            [server] = provider.create_servers(
                stack=aws.stack,
                role="web",
                generation=1,
                run_id="r",
                count=1,
                image="",
                size="small",
                idempotency_key=f"r-web-{len(security)}-{sorted(security)}",
                links={},
            )
            attr = aws.ec2.describe_instance_attribute(InstanceId=server.id, Attribute="userData")
            return base64.b64decode(attr["UserData"]["Value"]).decode()

        assert launched({"reboot_at": "04:15"}) == first_boot_user_data(
            None, SecurityPolicy(reboot_at="04:15")
        )
        assert launched({"unattended": False}) == TODAY


def test_libcloud_launches_with_the_stacks_policy(request: pytest.FixtureRequest) -> None:
    """The libcloud provider (EC2 driver on moto) sends the same user data."""
    from tests.libcloud.world import make_world

    world = make_world(request, server=False)
    config = world.config(web=1, security={"reboot_at": "04:15"})
    [server] = world.provider(config).create_servers(
        stack=world.stack,
        role="web",
        generation=1,
        run_id="r1",
        count=1,
        image=world.ami,
        size="t3.micro",
        idempotency_key="r1/web",
        links={},
    )
    attr = world.ec2.describe_instance_attribute(InstanceId=server.id, Attribute="userData")
    text = base64.b64decode(attr["UserData"]["Value"]).decode()
    assert text == first_boot_user_data(None, SecurityPolicy(reboot_at="04:15"))


# --- the config -----------------------------------------------------------------------------
BASE_TOML = '[stacks.app]\naddress = "app-eip"\n[stacks.app.roles.web]\n'


def test_the_policy_is_on_by_default_and_read_from_file_and_variables(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(BASE_TOML)
    assert load_settings(cfg).stacks["app"].security == SecurityPolicy(unattended=True)
    cfg.write_text(BASE_TOML + '[stacks.app.security]\nunattended = false\nreboot_at = "23:59"\n')
    assert load_settings(cfg).stacks["app"].security == SecurityPolicy(
        unattended=False, reboot_at="23:59"
    )
    cfg.write_text(BASE_TOML)
    os.environ["CHANGEOVER_STACKS__APP__SECURITY__UNATTENDED"] = "false"
    try:
        assert load_settings(cfg).stacks["app"].security.unattended is False
    finally:
        del os.environ["CHANGEOVER_STACKS__APP__SECURITY__UNATTENDED"]


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ('unattended = "yes"\n', "stacks.app.security.unattended"),
        ("unattended = 1\n", "stacks.app.security.unattended"),
        ('reboot_at = "24:00"\n', "stacks.app.security.reboot_at: '24:00': expected HH:MM"),
        ('reboot_at = "3:30"\n', "stacks.app.security.reboot_at"),
        ("reboot_at = 330\n", "stacks.app.security.reboot_at"),
        ("unattented = false\n", "stacks.app.security.unattented: unknown key"),
    ],
)
def test_bad_policy_values_are_one_line_naming_the_key(
    tmp_path: Path, toml: str, named: str
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(BASE_TOML + "[stacks.app.security]\n" + toml)
    state = tmp_path / "state"
    line = invoke("--config", str(cfg), "--state-dir", str(state), "stacks").error_line()
    assert f"config error in {cfg}" in line and named in line, line
    assert not state.exists()


def test_a_bad_policy_variable_names_the_variable(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(BASE_TOML)
    env = {"CHANGEOVER_STACKS__APP__SECURITY__REBOOT_AT": "noon"}
    line = invoke("--config", str(cfg), "--state-dir", str(tmp_path / "s"), "stacks", env=env)
    text = line.error_line()
    assert "CHANGEOVER_STACKS__APP__SECURITY__REBOOT_AT" in text and "HH:MM" in text, text
