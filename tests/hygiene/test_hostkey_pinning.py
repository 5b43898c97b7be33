"""SSH host keys of fresh cloud servers: pinned from the console, journaled, never TOFU.

A real sshd on 127.0.0.1 plays every instance moto launches. Hooks on the provider's
own clients (botocore's event hooks for boto3, a response class for libcloud; no
mock.patch) point each instance's private address at it, and make the console show
what cloud-init prints there: the sshd's host key between the BEGIN/END SSH HOST KEY
KEYS markers, or another key, or none. known_hosts is empty unless a test says so, so
only a pin lets a connection through.

The sshd runs every command through a shim (ForceCommand) that logs it, answers
cloud-init's ready file (this machine never ran cloud-init) and `systemctl` (a stack's
freeze hooks must not touch this machine's services), and runs the rest for real. The
fact script takes seconds on a machine with many pending upgrades, so one test reads
this machine's real facts and the others have the shim answer it with the output
recorded on a Debian 12 host (tests/recorded.py); either way it goes over SSH.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from moto import mock_aws
from moto.server import ThreadedMotoServer

from orchestrator.db import connect
from orchestrator.engine import Engine, RunResult
from orchestrator.journal import Journal
from orchestrator.lock import LeaseLock
from orchestrator.log import get_logger
from orchestrator.plan import Outcome, Plan, RunContext
from orchestrator.settings import StackConfig
from providers.aws import AwsProvider
from providers.cloudinit import READY_FILE
from providers.libcloud_provider import LibcloudProvider, make_libcloud_provider
from providers.transport import HostKeyRejected
from strategies.rebuild import plan_rebuild
from tests.aws.world import AwsWorld
from tests.hygiene.conftest import Sshd, keygen, running_sshd
from tests.libcloud.fakes import FakeApps
from tests.libcloud.moto_shims import MotoEC2Connection, MotoEC2Response, shim
from tests.recorded import CLEAN_FACTS

LOOPBACK = "127.0.0.1"
# The gate asks for a component version, so that hygiene really runs (over SSH); it
# asks nothing that depends on this machine's own package state.
POLICY: dict[str, Any] = {
    "pending": "ignore",
    "reboot_required_fails": False,
    "min_versions": {"python": "3"},
}


def console_text(keys: list[str]) -> str:
    """What cloud-init's final stage prints on the serial console (keys_to_console)."""
    lines = [
        "[   11.8] cloud-init[803]: Cloud-init v. 23.1.1 running 'modules:final'",
        "-----BEGIN SSH HOST KEY FINGERPRINTS-----",
        "256 SHA256:notAkeyJustItsFingerprint root@ip-10-0-0-5 (ED25519)",
        "-----END SSH HOST KEY FINGERPRINTS-----",
    ]
    if keys:
        lines += ["-----BEGIN SSH HOST KEY KEYS-----"]
        lines += [f"{k} root@ip-10-0-0-5" for k in keys]
        lines += ["-----END SSH HOST KEY KEYS-----"]
    return "\n".join([*lines, "[   12.0] cloud-init[803]: Cloud-init v. 23.1.1 finished", ""])


def sha256_fingerprint(key: str) -> str:
    """OpenSSH's fingerprint of a "type base64" public key."""
    kind, data = key.split()[:2]
    digest = base64.b64encode(hashlib.sha256(base64.b64decode(data)).digest()).decode()
    return f"{kind} SHA256:{digest.rstrip('=')}"


# --- the server every instance is --------------------------------------------------------
@dataclass
class Host:
    """The test sshd, its shim's command log and an empty known_hosts file."""

    sshd: Sshd
    commands_log: Path
    empty_known_hosts: Path
    recorded_facts: Path  # while it exists, the shim answers the fact script with it

    def answer_facts_from_recording(self) -> None:
        self.recorded_facts.write_text(CLEAN_FACTS)

    def commands(self) -> list[str]:
        """The first line of every command that reached the shell, in order."""
        if not self.commands_log.exists():
            return []
        return self.commands_log.read_text().splitlines()

    def ssh(self, known_hosts: Path | None = None) -> dict[str, Any]:
        return {
            "user": self.sshd.user,
            "port": self.sshd.port,
            "known_hosts": str(known_hosts or self.empty_known_hosts),
            "key_file": str(self.sshd.client_key),
            "timeout": 5.0,
            "attempts": 1,
        }


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    log = tmp_path / "commands.log"
    facts = tmp_path / "recorded-facts.txt"
    shim_path = tmp_path / "shim.sh"
    shim_path.write_text(
        "#!/bin/sh\n"
        'cmd="$SSH_ORIGINAL_COMMAND"\n'
        f"printf '%s\\n' \"$cmd\" | head -n 1 >> {log}\n"
        'case "$cmd" in\n'
        f'  "test -f {READY_FILE}") exit 0 ;;\n'
        "  systemctl\\ *) exit 0 ;;\n"
        f'  *"changeover facts"*) if [ -f {facts} ]; then exec cat {facts}; fi ;;\n'
        "esac\n"
        'exec /bin/sh -c "$cmd"\n'
    )
    shim_path.chmod(0o755)
    empty = tmp_path / "known_hosts.empty"
    empty.write_text("")
    with running_sshd(tmp_path, f"ForceCommand {shim_path}\n") as sshd:
        yield Host(sshd, log, empty, facts)


# --- moto, in process and as a server ----------------------------------------------------
def _reset(url: str) -> None:
    req = urllib.request.Request(f"{url}/moto-api/reset", method="POST")
    urllib.request.urlopen(req, timeout=10).close()


@pytest.fixture(params=["mock_aws", "moto_server"])
def aws(request: pytest.FixtureRequest) -> Iterator[AwsWorld]:
    """An AWS world in moto: in this process (mock_aws) or behind a ThreadedMotoServer
    on 127.0.0.1 (stopped afterwards)."""
    if request.param == "mock_aws":
        with mock_aws():
            yield AwsWorld()
        return
    server = ThreadedMotoServer(ip_address=LOOPBACK, port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        _reset(url)  # moto's backends are process-global: start from an empty account
        yield AwsWorld(endpoint_url=url)
        _reset(url)
    finally:
        server.stop()


@pytest.fixture
def aws_in_process() -> Iterator[AwsWorld]:
    with mock_aws():
        yield AwsWorld()


@dataclass
class Console:
    """botocore event hooks on a provider's EC2 client: every instance's private address
    is the test sshd's, and GetConsoleOutput shows `keys` as cloud-init prints them
    (AWS sends the console base64-encoded)."""

    keys: list[str]

    def attach(self, provider: AwsProvider) -> AwsProvider:
        events = provider.ec2.meta.events
        events.register("after-call.ec2.GetConsoleOutput", self._console)
        events.register("after-call.ec2.DescribeInstances", self._loopback)
        return provider

    def _console(self, parsed: dict[str, Any], **_: Any) -> None:
        parsed["Output"] = base64.b64encode(console_text(self.keys).encode()).decode()

    def _loopback(self, parsed: dict[str, Any], **_: Any) -> None:
        for reservation in parsed.get("Reservations", []):
            for instance in reservation.get("Instances", []):
                instance["PrivateIpAddress"] = LOOPBACK


def ssh_config(
    aws: AwsWorld, host: Host, *, db: bool, known_hosts: Path | None = None, **defaults: Any
) -> StackConfig:
    hygiene = {**POLICY, "transport": "ssh", "ssh": host.ssh(known_hosts)}
    return aws.config(web=1, db=db, hygiene=hygiene, **defaults)


def ssh_provider(aws: AwsWorld, config: StackConfig, console: Console) -> AwsProvider:
    """The provider as the CLI builds it for hygiene.transport = "ssh": no transport
    injected, so it makes its own SSH transport, checking the keys it pins."""
    return console.attach(aws.provider(config, transport=None))


def rebuild(
    tmp_path: Path, aws: AwsWorld, config: StackConfig, provider: AwsProvider, **kw: Any
) -> RunResult:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    engine = Engine(state_dir=state, provider=provider, config=config, **kw)
    try:
        return engine.start(plan_rebuild(provider, aws.stack, config))
    finally:
        engine.close()


def journal_steps(tmp_path: Path, run_id: str) -> list[Any]:
    conn = connect(tmp_path / "state")
    try:
        return Journal(conn, LeaseLock(conn)).steps(run_id)
    finally:
        conn.close()


def new_instances(aws: AwsWorld, generation: str = "2") -> dict[str, str]:
    """Role by instance id, of the live instances of a generation."""
    return {
        i: v["tags"]["changeover:role"]
        for i, v in aws.instances().items()
        if v["tags"].get("changeover:generation") == generation
    }


# --- tests ---------------------------------------------------------------------------------
def test_console_pins_let_the_gate_pass_over_ssh_and_go_to_the_journal(
    aws: AwsWorld, host: Host, tmp_path: Path
) -> None:
    """A rebuild with data, hygiene and freeze hook over SSH, known_hosts empty: the new
    servers' keys are pinned from GetConsoleOutput before the first connection and
    journaled; the old db's freeze hook is checked against its own console's keys."""
    if aws.endpoint_url is not None:
        host.answer_facts_from_recording()  # this machine's real facts: once is enough
    config = ssh_config(aws, host, db=True)
    made = aws.bootstrap(aws.provider(config), config)
    provider = ssh_provider(aws, config, Console([host.sshd.host_key_pub]))
    result = rebuild(tmp_path, aws, config, provider, sleep=lambda _s: None)
    assert result.outcome == Outcome.SUCCEEDED, result.message
    assert result.run_id is not None
    new = new_instances(aws)
    assert sorted(new.values()) == ["db", "web"]
    (verify,) = [s for s in journal_steps(tmp_path, result.run_id) if s.name == "VerifyServers"]
    assert verify.outputs["host_keys"] == {i: [host.sshd.host_key_pub] for i in new}
    for server_id in new:  # hygiene ran there, over SSH
        facts = verify.outputs["reports"][server_id]["facts"]
        assert facts["errors"] == {} and facts["components"]["python"].startswith("3.")
    ran = host.commands()
    assert ran.count(f"test -f {READY_FILE}") == 2  # the gate, once per new server
    assert "systemctl stop app-writes" in ran  # FreezeWrites on the old db, over SSH
    # One console read per server reached: the two new ones, and the old db.
    assert provider.api_calls["GetConsoleOutput"] == 3
    assert made["db"][0] in provider.host_keys.snapshot()


def test_console_keys_that_differ_from_the_server_are_refused_before_anything_is_sent(
    aws: AwsWorld, host: Host, tmp_path: Path
) -> None:
    """The console shows another key than the sshd presents: the gate refuses, naming both
    fingerprints; no login, no command; the run rolls back and the address stays. The
    pins win over a known_hosts file that lists the sshd's real key."""
    other = keygen(tmp_path / "other_host_key")
    config = ssh_config(aws, host, db=False, known_hosts=host.sshd.known_hosts)
    made = aws.bootstrap(aws.provider(config), config)
    provider = ssh_provider(aws, config, Console([other]))
    result = rebuild(tmp_path, aws, config, provider, sleep=lambda _s: None)
    assert result.outcome == Outcome.ROLLED_BACK, result.message
    assert "CHANGED" in result.message
    assert sha256_fingerprint(other) in result.message
    assert sha256_fingerprint(host.sshd.host_key_pub) in result.message
    assert "AAAA" not in result.message  # fingerprints only, never key material
    assert host.sshd.sessions() == [] and host.commands() == []
    assert aws.eip_holder() in made["web"]
    assert new_instances(aws) == {}


def test_a_server_whose_keys_cannot_be_pinned_fails_its_gate_saying_how_to_pin_them(
    aws_in_process: AwsWorld, host: Host, tmp_path: Path
) -> None:
    """No keys on the console (polled until the gate's timeout) and none in known_hosts:
    never trusted on first use. The gate fails with what to do; nothing was sent."""
    aws = aws_in_process
    config = ssh_config(aws, host, db=False, boot_timeout=1.5)
    made = aws.bootstrap(aws.provider(config), config)
    provider = ssh_provider(aws, config, Console([]))
    started = time.monotonic()
    result = rebuild(tmp_path, aws, config, provider)  # real sleeps: the gate polls
    assert result.outcome == Outcome.ROLLED_BACK, result.message
    assert time.monotonic() - started >= 1.5
    assert "no SSH host key to check" in result.message
    assert "console output shows no SSH host keys" in result.message
    assert "hygiene.ssh.known_hosts" in result.message
    assert "keys_to_console" in result.message and "emit_keys_to_console" in result.message
    assert provider.api_calls["GetConsoleOutput"] >= 2  # polled, not given up at once
    assert host.sshd.sessions() == [] and host.commands() == []
    assert aws.eip_holder() in made["web"]


def test_known_hosts_is_the_fallback_when_the_console_shows_no_keys(
    aws_in_process: AwsWorld, host: Host, tmp_path: Path
) -> None:
    """No keys on the console, but known_hosts lists the server's address: the gate checks
    against known_hosts, and the journal records no pin."""
    aws = aws_in_process
    host.answer_facts_from_recording()
    config = ssh_config(aws, host, db=False, known_hosts=host.sshd.known_hosts)
    aws.bootstrap(aws.provider(config), config)
    provider = ssh_provider(aws, config, Console([]))
    result = rebuild(tmp_path, aws, config, provider, sleep=lambda _s: None)
    assert result.outcome == Outcome.SUCCEEDED, result.message
    assert result.run_id is not None
    (verify,) = [s for s in journal_steps(tmp_path, result.run_id) if s.name == "VerifyServers"]
    assert verify.outputs["host_keys"] == {}
    assert f"test -f {READY_FILE}" in host.commands()


def test_verify_in_a_new_process_reuses_the_journaled_pins_without_reading_the_console(
    aws_in_process: AwsWorld, host: Host, tmp_path: Path
) -> None:
    """VerifyServers run again with a new provider object and the outputs read back from
    the journal (as the engine hands them to a resumed run): it checks the recorded pins,
    makes no GetConsoleOutput call, and records the same pins. The new provider's
    console shows another key, so only the journal's pin can let the gate pass."""
    aws = aws_in_process
    host.answer_facts_from_recording()
    config = ssh_config(aws, host, db=False)
    aws.bootstrap(aws.provider(config), config)
    first = ssh_provider(aws, config, Console([host.sshd.host_key_pub]))
    result = rebuild(tmp_path, aws, config, first, sleep=lambda _s: None)
    assert result.outcome == Outcome.SUCCEEDED, result.message
    assert result.run_id is not None
    assert first.api_calls["GetConsoleOutput"] == 1

    conn = connect(tmp_path / "state")
    try:
        journal = Journal(conn, LeaseLock(conn))
        run = journal.get_run(result.run_id)
        records = journal.steps(result.run_id)
    finally:
        conn.close()
    assert run is not None
    plan = Plan.from_dict(run.plan)
    idx = next(r.idx for r in records if r.name == "VerifyServers")
    recorded = records[idx].outputs["host_keys"]
    assert list(recorded.values()) == [[host.sshd.host_key_pub]]

    resumed = ssh_provider(aws, config, Console([keygen(tmp_path / "not_the_key")]))
    ctx = RunContext(
        run_id=result.run_id,
        stack=aws.stack,
        config=config,
        provider=resumed,
        outputs={r.key: r.outputs for r in records if r.state == "done"},
        log=get_logger(),
    )
    sessions = len(host.sshd.sessions())
    again = plan.steps[idx].do(ctx)
    assert again.outputs["host_keys"] == recorded
    assert resumed.api_calls["GetConsoleOutput"] == 0
    assert len(host.sshd.sessions()) > sessions  # the gate's hygiene ran over SSH
    (server_id,) = recorded
    assert resumed.host_keys.get(server_id) == [host.sshd.host_key_pub]

    # A run resumed past its gate never runs VerifyServers again: the engine installs
    # the journaled pins when it builds the run's context, reading no console.
    later = ssh_provider(aws, config, Console([keygen(tmp_path / "another_key")]))
    engine = Engine(state_dir=tmp_path / "state", provider=later, config=config)
    try:
        engine._context(result.run_id, plan, cast(Any, None))
    finally:
        engine.close()
    assert later.host_keys.get(server_id) == [host.sshd.host_key_pub]
    assert later.api_calls["GetConsoleOutput"] == 0


# --- libcloud (EC2 driver on moto) ---------------------------------------------------------
def _loopback_console_response(keys: list[str]) -> type[MotoEC2Response]:
    """moto's EC2 answers as libcloud reads them, with every private address the test
    sshd's and GetConsoleOutput showing `keys` (EC2 sends it base64-encoded)."""
    encoded = base64.b64encode(console_text(keys).encode()).decode()

    class Response(MotoEC2Response):
        def parse_body(self) -> Any:
            body = str(self.body)
            if "GetConsoleOutputResponse" in body:
                output = f"<output>{encoded}</output>"
                body = re.sub(r"<output>.*?</output>", output, body, flags=re.S)
            self.body = re.sub(
                r"<privateIpAddress>[^<]*</privateIpAddress>",
                f"<privateIpAddress>{LOOPBACK}</privateIpAddress>",
                body,
            )
            return super().parse_body()

    return Response


def libcloud_provider(tmp_path: Path, config: StackConfig, keys: list[str]) -> LibcloudProvider:
    """Built by the product's factory (it makes its own SSH transport), then pointed at
    moto, whose answers go through the loopback-and-console response above."""
    provider = cast(
        LibcloudProvider,
        make_libcloud_provider(
            "shop",
            config,
            state_dir=tmp_path,
            environ={"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret"},
            checker=FakeApps(),
            probe=FakeApps(),
        ),
    )
    shim(provider.driver)
    response = _loopback_console_response(keys)

    class Connection(MotoEC2Connection):
        responseCls = response

    provider.driver.connection.__class__ = Connection
    return provider


def test_libcloud_ec2_pins_from_ex_get_console_output(host: Host, tmp_path: Path) -> None:
    """libcloud's EC2 driver: the console (ex_get_console_output) pins the node's key for
    the SSH transport the provider makes itself; another key on the console is refused
    before anything is sent."""
    with mock_aws():
        world = AwsWorld()
        raw = {
            "provider": "libcloud:ec2",
            "region": "us-east-1",
            "address": world.eip_alloc,
            "libcloud": {"driver": "ec2", "ip": "private"},
            "roles": {
                "web": {"count": 1, "size": "t3.micro", "launch": {"ami": world.ami}},
            },
            "hygiene": {**POLICY, "transport": "ssh", "ssh": host.ssh()},
        }
        config = StackConfig.model_validate(raw)
        provider = libcloud_provider(tmp_path, config, [host.sshd.host_key_pub])
        (server,) = provider.create_servers(
            stack="shop",
            role="web",
            generation=1,
            run_id="r-test",
            count=1,
            image=world.ami,
            size="t3.micro",
            idempotency_key="r-test.web",
            links={},
        )
        (server,) = provider.describe_servers("shop", [server.id])
        assert server.host == LOOPBACK
        assert provider.pin_host_keys("shop", [server], {}) == {server.id: [host.sshd.host_key_pub]}
        assert provider.api_calls["ex_get_console_output"] == 1
        assert provider.transport is not None
        assert provider.transport.run(server, "echo pinned").stdout == "pinned\n"

        other = keygen(tmp_path / "other_host_key")
        wrong = libcloud_provider(tmp_path, config, [other])
        sessions = len(host.sshd.sessions())
        assert wrong.pin_host_keys("shop", [server], {}) == {server.id: [other]}
        assert wrong.transport is not None
        with pytest.raises(HostKeyRejected, match="CHANGED"):
            wrong.transport.run(server, "echo never")
        assert len(host.sshd.sessions()) == sessions
        assert host.commands() == ["echo pinned"]
