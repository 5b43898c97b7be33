"""Ownership styles and the address adapters this suite cannot run against an API here
(GCE, Equinix Metal, a load balancer): fake drivers with libcloud's method names record
the calls, so the tests pin their order."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from libcloud.compute.base import Node
from libcloud.loadbalancer import base as lb_base

from orchestrator.engine import Engine
from orchestrator.models import TAG_GENERATION, TAG_ROLE, TAG_RUN, TAG_STACK, TAG_TOKEN
from orchestrator.plan import Outcome
from providers.libcloud_addresses import (
    EquinixMetalAddress,
    GceStaticAddress,
    LoadBalancerMembers,
)
from providers.libcloud_ownership import Ownership, OwnershipStyle, TokenRegistry
from providers.libcloud_provider import make_libcloud_provider
from strategies.rotate import plan_rotate
from tests.libcloud.fakes import FakeClock
from tests.libcloud.moto_shims import shim
from tests.libcloud.world import Ec2World

TAGS = {
    TAG_STACK: "shop",
    TAG_ROLE: "web",
    TAG_GENERATION: "3",
    TAG_RUN: "r20261126-120000-abcdef",
    TAG_TOKEN: "r20261126-120000-abcdef/CreateServers[web]",
}


def _as_listed(style: str, kwargs: dict[str, Any], name: str) -> SimpleNamespace:
    """The node as the driver would list it after create_node(**kwargs)."""
    extra: dict[str, Any] = {}
    if style == "tags":
        extra["tags"] = kwargs["ex_metadata"]
    elif style == "metadata":
        extra["metadata"] = kwargs["ex_metadata"]
    elif style == "gce-metadata":
        items = [{"key": k, "value": v} for k, v in kwargs["ex_metadata"].items()]
        extra["metadata"] = {"items": items}
        extra["labels"] = kwargs["ex_labels"]
    elif style == "string-tags":
        extra["tags"] = kwargs["ex_create_attr"]["tags"]
    elif style == "description":
        extra["description"] = kwargs["description"]
    return SimpleNamespace(name=name, extra=extra)


@pytest.mark.parametrize(
    "style", ["tags", "metadata", "gce-metadata", "string-tags", "description", "name"]
)
def test_ownership_round_trips_in_every_style(style: OwnershipStyle, tmp_path: Path) -> None:
    """Whatever a cloud can store, the five ownership tags read back exactly (I4, I7)."""
    own = Ownership(style, TokenRegistry(tmp_path / "tokens.json"))
    kwargs = own.create_kwargs(TAGS)
    node = _as_listed(style, kwargs, own.node_name(TAGS, 0))
    assert own.read(node) == TAGS
    assert own.token_matches(own.read(node) or {}, TAGS[TAG_TOKEN])
    stranger = SimpleNamespace(name="web-1", extra={"tags": {}, "metadata": {}})
    assert own.read(stranger) is None


def test_hashed_tokens_still_match_without_the_registry(tmp_path: Path) -> None:
    """On another machine (no registry) a DigitalOcean node still matches its key."""
    own = Ownership("string-tags", TokenRegistry(tmp_path / "a.json"))
    node = _as_listed("string-tags", own.create_kwargs(TAGS), "n")
    elsewhere = Ownership("string-tags", TokenRegistry(tmp_path / "b.json"))
    tags = elsewhere.read(node) or {}
    assert tags[TAG_STACK] == "shop" and elsewhere.token_matches(tags, TAGS[TAG_TOKEN])


@dataclass
class Recorder:
    """A fake driver: records calls in order and answers from canned state."""

    calls: list[tuple[str, Any]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args[0].id if args and hasattr(args[0], "id") else args))
            answer = self.state.get(name, True)
            return answer(*args, **kwargs) if callable(answer) else answer

        return call


def _gce_node(nid: str, nat: bool = True) -> Any:
    configs = [{"name": "External NAT", "type": "ONE_TO_ONE_NAT"}] if nat else []
    return SimpleNamespace(
        id=nid,
        name=f"web-{nid}",
        extra={
            "selfLink": f"https://compute/zones/z/instances/web-{nid}",
            "networkInterfaces": [{"name": "nic0", "accessConfigs": configs}],
        },
    )


def test_gce_static_address_moves_old_off_then_new_on() -> None:
    """GCE: the old holder's NAT config goes, the new node's ephemeral one goes, then the
    static address is added to the new node as its one-to-one NAT."""
    old, new = _gce_node("1"), _gce_node("2")
    addr = SimpleNamespace(address="198.51.100.7", extra={"users": [old.extra["selfLink"]]})
    driver = Recorder(state={"ex_get_address": addr})
    adapter = GceStaticAddress(driver, "gce", "shop-ip", "shop", "us-central1")
    assert adapter.holders() == [old.extra["selfLink"]]
    adapter.apply([new], [old])
    names = [c[0] for c in driver.calls if c[0] != "ex_get_address"]
    targets = [c[1] for c in driver.calls if c[0] != "ex_get_address"]
    assert names == ["ex_delete_access_config", "ex_delete_access_config", "ex_add_access_config"]
    assert targets == ["1", "2", "2"]


def test_equinix_metal_assigns_new_before_unassigning_old() -> None:
    """Equinix Metal: the elastic IP is assigned to the new device, then the old
    assignment is removed."""
    ip = {
        "id": "ip-1",
        "address": "198.51.100.9",
        "cidr": 32,
        "assignments": [{"id": "as-old", "assigned_to": {"href": "/metal/v1/devices/dev-1"}}],
    }
    driver = Recorder(state={"ex_describe_all_addresses": [ip]})
    adapter = EquinixMetalAddress(driver, "equinix_metal", "198.51.100.9", "shop", "proj")
    assert adapter.holders() == ["dev-1"]
    adapter.apply([SimpleNamespace(id="dev-2")], [])
    moves = [c for c in driver.calls if c[0] != "ex_describe_all_addresses"]
    assert moves == [
        ("ex_associate_address_with_node", "dev-2"),
        ("ex_disassociate_address", ("as-old",)),
    ]


# libcloud's classes are unannotated.
LoadBalancer: Any = lb_base.LoadBalancer
Member: Any = lb_base.Member


class FakeBalancerDriver:
    """libcloud.loadbalancer's API over an in-memory balancer; records attach/detach."""

    def __init__(self) -> None:
        self.balancer = LoadBalancer("lb-1", "shop-lb", 0, "198.51.100.20", 80, self)
        self.members: list[Any] = []
        self.log: list[tuple[str, str]] = []

    def get_balancer(self, balancer_id: str) -> Any:
        return self.balancer

    def balancer_list_members(self, balancer: Any) -> list[Any]:
        return list(self.members)

    def balancer_attach_compute_node(self, balancer: Any, node: Node) -> Any:
        member = Member(node.id, None, 80, balancer)
        self.members.append(member)
        self.log.append(("attach", str(node.id)))
        return member

    def balancer_detach_member(self, balancer: Any, member: Any) -> bool:
        self.members = [m for m in self.members if m.id != member.id]
        self.log.append(("detach", str(member.id)))
        return True


def test_rotate_through_a_load_balancer(ec2_local: Ec2World, tmp_path: Path) -> None:
    """With a balancer, rotate replaces two servers one at a time: each new member is
    attached before an old one is detached, so two members always serve."""
    world = ec2_local
    lb = FakeBalancerDriver()
    config = world.config(
        web=2, libcloud={"driver": "ec2", "ip": "private", "load_balancer": "lb-1"}
    )

    def provider() -> Any:
        p: Any = make_libcloud_provider(
            world.stack,
            config,
            state_dir=world.state_dir,
            environ={"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
            lb_driver=lb,
            transport=world.transport,
            checker=world.apps,
            probe=world.apps,
        )
        shim(p.driver)
        return p

    seeder = provider()
    old = [
        s.id
        for s in seeder.create_servers(
            stack=world.stack,
            role="web",
            generation=1,
            run_id="seed",
            count=2,
            image=world.ami,
            size="t3.micro",
            idempotency_key="seed/web",
            links={},
        )
    ]
    seeder.set_members(world.stack, config.address, old)
    lb.log.clear()
    p = provider()
    clock = FakeClock()
    engine = Engine(
        state_dir=tmp_path / "state",
        provider=p,
        config=config,
        sleep=clock.sleep,
        clock=clock.clock,
    )
    result = engine.start(plan_rotate(p, world.stack, config))
    assert result.outcome == Outcome.SUCCEEDED, result.message
    assert [kind for kind, _ in lb.log] == ["attach", "detach", "attach", "detach"]
    assert {m.id for m in lb.members}.isdisjoint(old) and len(lb.members) == 2
    assert not set(old) & set(world.instances()) and world.alive(world.foreign)
    assert p.address_capacity(world.stack, config.address) is None
    assert isinstance(p.addresses[config.address], LoadBalancerMembers)
