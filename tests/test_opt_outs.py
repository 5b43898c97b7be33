"""Opt-outs: a server tagged `changeover:do-not-disrupt` is never selected by `rotate`
(plain, `--older-than`, `--only-if-needed`) or `upgrade`, and `plan` lists it under
`skipped` with the reason. End to end through the CLI on the local cloud, where the
servers are real processes; the static and libcloud spellings of the tag are read too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.models import TAG_DO_NOT_DISRUPT, TAG_RUN, TAG_STACK
from orchestrator.rehearse import World
from orchestrator.settings import StackConfig
from providers.libcloud_ownership import Ownership, OwnershipStyle, TokenRegistry
from providers.local.provider import LocalProvider
from providers.static import StaticProvider
from strategies.opt_out import SKIP_REASON
from strategies.upgrade import plan_upgrade
from tests.conftest import demo_stack

ADVISORY = {"openssl": {"version": "3.0.16-1~deb12u1", "security": True, "reboot": False}}


def _web(world: World) -> list[str]:
    return sorted(i for i, s in world.live_servers().items() if s["role"] == "web")


def _opt_out_one(world: World) -> tuple[str, str]:
    """Tag the first web server as the operator would; returns (tagged, the other)."""
    tagged, other = _web(world)
    world.cloud.tag_server(tagged, TAG_DO_NOT_DISRUPT)
    return tagged, other


def _mutating(world: World, since: int) -> list[dict[str, object]]:
    return [c for c in world.cloud.calls(since) if c["mutating"]]


def test_plan_lists_the_opted_out_server_as_skipped(world: World) -> None:
    """plan rotate (--older-than, --only-if-needed, plain) and plan upgrade: the tagged
    server is under `skipped` with the reason, never selected, also in the text
    output; no mutating call."""
    tagged, other = _opt_out_one(world)
    mark = world.cloud.last_call_id()
    for args in (["--older-than", "0s"], ["--only-if-needed"], []):
        code, out = world.cli_json("plan", "rotate", "demo", *args)
        assert code == 0, out["_stderr"]
        summary = out["plan"]["summary"]
        assert summary["skipped"] == {tagged: SKIP_REASON}, args
        assert tagged not in summary["selected"], args
        assert tagged not in summary.get("needs_verification", {}), args
        assert tagged not in str(out["plan"]["steps"]), args
    assert world.cli_json("plan", "rotate", "demo")[1]["plan"]["summary"]["selected"] == {
        other: "all serving servers"
    }
    text = world.cli("plan", "rotate", "demo", "--older-than", "0s")
    assert text.returncode == 0
    assert f"1 server(s) skipped: {tagged} (tagged changeover:do-not-disrupt)" in text.stdout
    code, out = world.cli_json("plan", "upgrade", "demo", "--min-healthy", "50")
    assert code == 0, out["_stderr"]
    assert out["plan"]["summary"]["skipped"] == {tagged: SKIP_REASON}
    assert out["plan"]["summary"]["batches"] == [[other]]
    assert _mutating(world, mark) == []


def test_rotate_older_than_leaves_the_opted_out_server_serving(world: World) -> None:
    """rotate --older-than 0s replaces only the untagged server: the tagged one keeps
    serving, untouched (no destroy, no removal from the address), generation 1."""
    tagged, other = _opt_out_one(world)
    mark = world.cloud.last_call_id()
    code, out = world.cli_json("rotate", "demo", "--older-than", "0s", "--yes")
    assert code == 0, out["_stderr"]
    assert out["servers"]["destroyed"] == [other]
    live = world.live_servers()
    assert tagged in live and live[tagged]["generation"] == 1
    assert other not in live
    assert tagged in world.members() and len(world.members()) == 2
    for call in world.cloud.calls(mark):
        if call["op"] == "set_members":
            assert tagged in str(call["detail"]), "the tagged server left the address"
        assert not (call["op"] == "destroy_servers" and tagged in str(call["detail"]))


def test_rotate_only_if_needed_never_selects_or_asks_the_opted_out_server(
    make_world: Callable[..., World],
) -> None:
    """--only-if-needed, with both servers pending upgrades: the untagged one is
    replaced; the tagged one is not even verified (no hygiene call), and stays."""
    # --only-if-needed replaces a canary first and watches it: briefly, here.
    world = make_world(defaults={**demo_stack()["defaults"], "canary_watch": 0.5})
    tagged, other = _opt_out_one(world)
    world.publish(ADVISORY)
    mark = world.cloud.last_call_id()
    code, out = world.cli_json("rotate", "demo", "--only-if-needed", "--yes")
    assert code == 0, out["_stderr"]
    assert out["servers"]["destroyed"] == [other]
    verified = {c["detail"] for c in world.cloud.calls(mark) if c["op"] == "verify_server"}
    assert tagged not in verified and other in verified
    assert tagged in world.live_servers() and tagged in world.members()


def test_plain_rotate_skips_it_and_all_opted_out_is_a_noop(world: World) -> None:
    """A plain rotate skips the tagged server too; with every serving server tagged it
    is a no-op (exit 0) that lists them, and nothing is touched."""
    tagged, other = _opt_out_one(world)
    world.cloud.tag_server(other, TAG_DO_NOT_DISRUPT, "")  # a bare tag counts as well
    mark = world.cloud.last_call_id()
    code, out = world.cli_json("rotate", "demo", "--yes")
    assert code == 0, out["_stderr"]
    assert out["outcome"] == "noop"
    assert out["skipped"] == {tagged: SKIP_REASON, other: SKIP_REASON}
    assert _mutating(world, mark) == []
    world.cloud.tag_server(other, TAG_DO_NOT_DISRUPT, "false")  # "false" opts back in
    code, out = world.cli_json("rotate", "demo", "--yes")
    assert code == 0, out["_stderr"]
    assert out["servers"]["destroyed"] == [other]
    assert tagged in world.members()


def test_upgrade_skips_the_opted_out_server(make_world: Callable[..., World]) -> None:
    """upgrade --min-healthy 50 on 3 web servers, one tagged: the other two are upgraded
    (one at a time), the tagged one keeps its old packages and never left the address."""
    world = make_world(
        roles={"db": {"count": 1, "data": True}, "web": {"count": 3}},
    )
    world.publish(ADVISORY)
    tagged = _web(world)[0]
    world.cloud.tag_server(tagged, TAG_DO_NOT_DISRUPT)
    mark = world.cloud.last_call_id()
    code, out = world.cli_json("upgrade", "demo", "--min-healthy", "50", "--yes")
    assert code == 0, out["_stderr"]
    for server in _web(world):
        version = world.facts(server)["installed"]["openssl"]
        assert (version == ADVISORY["openssl"]["version"]) == (server != tagged), server
    for call in world.cloud.calls(mark):
        if call["op"] == "set_members":
            assert tagged in str(call["detail"]), "the tagged server was drained"
        assert not (call["op"] == "upgrade_packages" and tagged in str(call["detail"]))


def test_opted_out_servers_still_count_toward_min_healthy(world: World) -> None:
    """The tagged server keeps serving, so it counts: upgrading the other of 2 needs
    --min-healthy 50 exactly as without the tag (100 is refused, exit 2)."""
    _opt_out_one(world)
    provider = LocalProvider(world.cloud)
    plan = plan_upgrade(provider, "demo", world.config, min_healthy=50)
    assert plan.steps[0].params["total"] == 2
    proc = world.cli("upgrade", "demo", "--yes")
    assert proc.returncode == 2 and "--min-healthy 50" in proc.stderr


def test_a_static_host_opts_out_with_do_not_disrupt() -> None:
    """provider = static: `do_not_disrupt = true` on a host is the tag; upgrade's plan
    skips that host (read from the config alone: no SSH)."""
    config = StackConfig.model_validate(
        {
            "provider": "static",
            "static": {
                "hosts": [
                    {"id": "web-1", "address": "10.0.0.1"},
                    {"id": "web-2", "address": "10.0.0.2", "do_not_disrupt": True},
                ]
            },
        }
    )
    provider = StaticProvider("edge", config)
    assert [s.do_not_disrupt for s in provider.list_servers("edge")] == [False, True]
    plan = plan_upgrade(provider, "edge", config, min_healthy=0)
    assert plan.summary["skipped"] == {"web-2": SKIP_REASON}
    assert plan.summary["batches"] == [["web-1"]]


def test_libcloud_nodes_carry_the_opt_out_where_the_driver_keeps_tags(tmp_path: Path) -> None:
    """Each ownership style reads changeover:do-not-disrupt from where the operator can
    set it: tags, metadata, GCE metadata or labels, DigitalOcean/Equinix tags."""
    registry = TokenRegistry(tmp_path / "tokens.json")
    own = {TAG_STACK: "shop", TAG_RUN: "r1"}
    nodes: dict[OwnershipStyle, dict[str, object]] = {
        "tags": {"tags": {**own, TAG_DO_NOT_DISRUPT: "true"}},
        "metadata": {"metadata": {**own, TAG_DO_NOT_DISRUPT: "yes"}},
        "gce-metadata": {
            "metadata": {"items": [{"key": "changeover-stack", "value": "shop"}]},
            "labels": {"changeover-do-not-disrupt": "true"},
        },
        "string-tags": {"tags": ["changeover:stack:shop", TAG_DO_NOT_DISRUPT]},
        "description": {
            "description": "changeover:stack=shop",
            "tags": [f"{TAG_DO_NOT_DISRUPT}:true"],
        },
    }
    for style, extra in nodes.items():
        tags = Ownership(style, registry).read(SimpleNamespace(extra=extra, name="n"))
        assert tags is not None and tags.get(TAG_DO_NOT_DISRUPT) is not None, style
    untagged = Ownership("tags", registry).read(SimpleNamespace(extra={"tags": own}, name="n"))
    assert untagged is not None and TAG_DO_NOT_DISRUPT not in untagged


def test_ownership_tags_are_not_the_operators_to_set(world: World) -> None:
    """The local cloud takes an operator's tag, but never over an ownership tag."""
    server = _web(world)[0]
    with pytest.raises(ValueError, match="ownership tag"):
        world.cloud.tag_server(server, TAG_STACK, "other")
    assert {s.stack for s in LocalProvider(world.cloud).list_servers("demo")} == {"demo"}
