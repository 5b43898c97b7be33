"""Floating-IP changeovers on DigitalOcean and OpenStack, through libcloud's own drivers
pointed at a local server that speaks those APIs (tests/libcloud/cloud_api.py).

The server records every request, so these tests pin the order that matters: the
floating IP is attached to the new node before the old node is deleted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from structlog.testing import capture_logs

from orchestrator.engine import Engine
from orchestrator.models import TAG_GENERATION, TAG_STACK
from orchestrator.plan import Outcome
from orchestrator.settings import StackConfig
from providers.libcloud_provider import LibcloudProvider, make_libcloud_provider
from strategies.rebuild import plan_rebuild
from strategies.rotate import plan_rotate
from tests.libcloud.cloud_api import (
    DO_TOKEN,
    OS_PASSWORD,
    OS_PROJECT,
    OS_USER,
    CloudApis,
)
from tests.libcloud.fakes import FakeApps, FakeClock, RecordedTransport

STACK = "shop"
FLOATING_IP = "203.0.113.10"


@pytest.fixture
def apis() -> Iterator[CloudApis]:
    """The DigitalOcean + OpenStack API server on 127.0.0.1, stopped after the test."""
    cloud = CloudApis()
    cloud.start()
    yield cloud
    cloud.stop()


@dataclass
class Cloud:
    """One libcloud driver's view of the API server: config, environment, foreign node."""

    name: str
    apis: CloudApis
    config: StackConfig
    env: dict[str, str]
    foreign: str
    state_dir: Path

    def provider(self, apps: FakeApps | None = None) -> LibcloudProvider:
        return cast(
            LibcloudProvider,
            make_libcloud_provider(
                STACK,
                self.config,
                state_dir=self.state_dir,
                environ=self.env,
                transport=RecordedTransport(),
                checker=apps or FakeApps(),
                probe=apps or FakeApps(),
            ),
        )

    def holder(self) -> str | None:
        if self.name == "digital_ocean":
            held = self.apis.do_fips[FLOATING_IP]
            return None if held is None else str(held)
        fip = next(iter(self.apis.os_fips.values()))
        port = self.apis.ports.get(fip["port_id"] or "")
        return None if port is None else str(port["device_id"])

    def alive(self, node_id: str) -> bool:
        if self.name == "digital_ocean":
            return int(node_id) in self.apis.droplets
        return node_id in self.apis.servers

    def attach_request(self, node_id: str) -> tuple[str, str]:
        """(method, path suffix) of the request that attaches the IP to `node_id`."""
        if self.name == "digital_ocean":
            return "POST", f"/floating_ips/{FLOATING_IP}/actions"
        return "PUT", f"/floatingips/{next(iter(self.apis.os_fips))}"

    def attached_to(self, node_id: str) -> int:
        """Index of the request that attached the IP to `node_id` (-1 if none)."""
        method, suffix = self.attach_request(node_id)
        for i, r in enumerate(self.apis.requests):
            if r.method != method or not r.path.endswith(suffix) or not r.body:
                continue
            if self.name == "digital_ocean" and str(r.body.get("droplet_id")) == node_id:
                return i
            port = (r.body.get("floatingip") or {}).get("port_id")
            if self.name == "openstack" and port and _port_device(self.apis, port) == node_id:
                return i
        return -1

    def deleted(self, node_id: str) -> int:
        path = f"/droplets/{node_id}" if self.name == "digital_ocean" else f"/servers/{node_id}"
        return self.apis.order(("DELETE", path))[0]


def _port_device(apis: CloudApis, port_id: str) -> str | None:
    """Which node a port belonged to (ports of deleted servers are gone, so search the log)."""
    if port_id in apis.ports:
        return str(apis.ports[port_id]["device_id"])
    return None


def _config(name: str, url: str, *, web: int = 1) -> StackConfig:
    raw: dict[str, Any] = {
        "provider": f"libcloud:{name}",
        "address": FLOATING_IP,
        "roles": {"web": {"count": web, "image": "debian-12-x64", "size": "s-1vcpu-1gb"}},
        "defaults": {"bake": 2.0, "retain": 0.0},
    }
    if name == "digital_ocean":
        raw["endpoint_url"] = url
        raw["libcloud"] = {"driver": name, "location": "nyc3"}
    else:
        raw["libcloud"] = {
            "driver": name,
            "ip": "private",
            "driver_args": {"ex_force_auth_url": url, "ex_tenant_name": OS_PROJECT},
        }
    return StackConfig.model_validate(raw)


@pytest.fixture(params=["digital_ocean", "openstack"])
def cloud(request: pytest.FixtureRequest, apis: CloudApis, tmp_path: Path) -> Cloud:
    """A floating IP, a node another team owns, and credentials in the environment."""
    name = request.param
    if name == "digital_ocean":
        apis.add_do_floating_ip(FLOATING_IP)
        foreign = str(apis.add_droplet("their-web", tags=["team:payments"]))
        env = {"DIGITALOCEAN_ACCESS_TOKEN": DO_TOKEN}
    else:
        apis.add_os_floating_ip(FLOATING_IP)
        foreign = apis.add_server("their-web", {"team": "payments"})
        env = {"OS_USERNAME": OS_USER, "OS_PASSWORD": OS_PASSWORD}
    return Cloud(name, apis, _config(name, apis.url), env, foreign, tmp_path)


def _seed(cloud: Cloud) -> list[str]:
    """Generation 1 behind the floating IP, made through a provider of its own."""
    provider = cloud.provider()
    web = provider.create_servers(
        stack=STACK,
        role="web",
        generation=1,
        run_id="seed",
        count=cloud.config.roles["web"].count,
        image="debian-12-x64",
        size="s-1vcpu-1gb",
        idempotency_key="seed/web",
        links={},
    )
    ids = [s.id for s in web]
    provider.set_members(STACK, FLOATING_IP, ids[:1])
    cloud.apis.requests.clear()
    return ids


def _run(cloud: Cloud, provider: LibcloudProvider, strategy: str) -> Any:
    clock = FakeClock()
    engine = Engine(
        state_dir=cloud.state_dir / "state",
        provider=provider,
        config=cloud.config,
        sleep=clock.sleep,
        clock=clock.clock,
    )
    build = plan_rebuild if strategy == "rebuild" else plan_rotate
    try:
        return engine.start(build(provider, STACK, cloud.config))
    finally:
        engine.close()


@pytest.mark.parametrize("strategy", ["rebuild", "rotate"])
def test_floating_ip_moves_to_the_new_node_before_the_old_is_deleted(
    cloud: Cloud, strategy: str
) -> None:
    """The IP is attached to the verified gen-2 node, then the gen-1 node is deleted;
    the node without the stack's tags is never touched (I1, I2, I7)."""
    [old] = _seed(cloud)
    provider = cloud.provider()
    result = _run(cloud, provider, strategy)
    assert result.outcome == Outcome.SUCCEEDED, result.message
    new = cloud.holder()
    assert new is not None and new != old
    [server] = provider.describe_servers(STACK, [new])
    assert server.tags[TAG_STACK] == STACK and server.tags[TAG_GENERATION] == "2"
    attach, delete = cloud.attached_to(new), cloud.deleted(old)
    assert 0 <= attach < delete, [(r.method, r.path) for r in cloud.apis.requests]
    assert not cloud.alive(old)
    assert cloud.alive(cloud.foreign)
    touched = [r.path for r in cloud.apis.requests if r.method != "GET"]
    assert not [p for p in touched if p.endswith(f"/{cloud.foreign}")]


def test_a_5xx_on_attach_is_retried_by_the_engine(cloud: Cloud) -> None:
    """A 503 from the cloud is a TransientError: the step is retried and the run succeeds."""
    _seed(cloud)
    method, suffix = cloud.attach_request("")
    cloud.apis.fail_next.append((suffix, 503))
    result = _run(cloud, cloud.provider(), "rotate")
    assert result.outcome == Outcome.SUCCEEDED, result.message
    attempts = [r for r in cloud.apis.requests if r.method == method and r.path.endswith(suffix)]
    assert len(attempts) == 2


def test_credentials_never_reach_logs_or_journal(cloud: Cloud) -> None:
    """I9: the token or password taken from the environment is in no log line, no error
    and not in the journal."""
    _seed(cloud)
    secret = cloud.env.get("DIGITALOCEAN_ACCESS_TOKEN") or cloud.env["OS_PASSWORD"]
    provider = cloud.provider()
    with capture_logs() as logs:
        result = _run(cloud, provider, "rotate")
    assert result.outcome == Outcome.SUCCEEDED
    assert secret not in repr(logs) and secret not in repr(result.summary)
    assert secret not in repr(provider)
    journal = b"".join(
        p.read_bytes() for p in (cloud.state_dir / "state").rglob("*") if p.is_file()
    )
    assert secret.encode() not in journal


def test_ownership_tags_are_stored_the_cloud_s_way(cloud: Cloud) -> None:
    """DigitalOcean keeps them as droplet tags "changeover:KEY:VALUE" (the token hashed);
    OpenStack as server metadata with the raw values."""
    [server_id] = _seed(cloud)
    if cloud.name == "digital_ocean":
        tags = cloud.apis.droplets[int(server_id)]["tags"]
        assert "changeover:stack:shop" in tags and "changeover:generation:1" in tags
        assert not any("seed/web" in t for t in tags)  # '/' is outside DO's tag alphabet
    else:
        meta = cloud.apis.servers[server_id]["metadata"]
        assert meta["changeover:stack"] == "shop" and meta["changeover:token"] == "seed/web"
    [again] = cloud.provider().list_servers(STACK)
    assert again.tags["changeover:token"] == "seed/web"
