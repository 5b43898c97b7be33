"""What only the DynamoDB store has: the table `state init` makes, conditional writes that
lose a race, expiry of finished runs, API economy, and the engine (heartbeat included)
driving a real rebuild with its journal in DynamoDB."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from moto import mock_aws

from orchestrator.engine import Engine
from orchestrator.errors import BadInput, LockedError
from orchestrator.plan import Outcome
from orchestrator.rehearse import World
from orchestrator.state import StateSpec, open_store
from orchestrator.state.base import Holder
from orchestrator.state.dynamodb import IAM_ACTIONS, DynamoStore, create_table
from providers.local.provider import LocalProvider
from strategies.rebuild import plan_rebuild
from tests.state.conftest import REGION, dynamodb_client, new_table

ROOT = Path(__file__).resolve().parents[2]
STACK = "shop"


@pytest.fixture
def spec(aws_credentials: None) -> Iterator[StateSpec]:
    """A table made by `state init`'s code on moto in-process."""
    with mock_aws():
        s = StateSpec("dynamodb", new_table(), REGION)
        create_table(s)
        yield s


class Calls:
    """Counts the DynamoDB operations a store's client sends (botocore's event hooks)."""

    def __init__(self, store: DynamoStore) -> None:
        self.ops: Counter[str] = Counter()
        store.client.meta.events.register("before-call.dynamodb", self._count)

    def _count(self, model: Any, **_: Any) -> None:
        self.ops[model.name] += 1

    def total(self) -> int:
        return sum(self.ops.values())


def test_state_init_makes_an_on_demand_table_with_ttl(aws_credentials: None) -> None:
    """`state init`: PAY_PER_REQUEST, pk/sk strings, TTL on `ttl`; again: no change; a
    table of the same name with another key schema is refused (exit 2)."""
    with mock_aws():
        spec = StateSpec("dynamodb", new_table(), REGION)
        first = create_table(spec)
        assert (first["created"], first["billing"], first["ttl_attribute"]) == (
            True,
            "PAY_PER_REQUEST",
            "ttl",
        )
        client = dynamodb_client(None)
        desc = client.describe_table(TableName=spec.table)["Table"]
        assert desc["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
        assert sorted((k["AttributeName"], k["KeyType"]) for k in desc["KeySchema"]) == [
            ("pk", "HASH"),
            ("sk", "RANGE"),
        ]
        ttl = client.describe_time_to_live(TableName=spec.table)["TimeToLiveDescription"]
        assert (ttl["TimeToLiveStatus"], ttl["AttributeName"]) == ("ENABLED", "ttl")
        assert create_table(spec)["created"] is False
        client.create_table(
            TableName="someone-elses",
            KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        with pytest.raises(BadInput, match="exists with another key schema \\(id HASH\\)"):
            create_table(StateSpec("dynamodb", "someone-elses", REGION))


def test_a_missing_table_says_to_run_state_init(aws_credentials: None) -> None:
    """Any use of a table nobody created: one line, exit 2."""
    with mock_aws():
        store = open_store(f"dynamodb://nobody-made-me?region={REGION}", None)
        with pytest.raises(BadInput) as err:
            store.runs()
        assert str(err.value) == (
            "state table nobody-made-me does not exist in us-east-1: run `changeover state init`"
        )
        assert err.value.exit_code == 2


class StaleReads(DynamoStore):
    """A store whose first look at a lease comes too late: another taker's write lands
    between our read and our conditional write (an injected race)."""

    def __init__(self, *args: Any, rival: DynamoStore, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.rival = rival
        self.raced = False

    def holder(self, stack: str) -> Holder | None:
        seen = super().holder(stack)
        if not self.raced:
            self.raced = True
            self.rival.acquire(stack, "r-rival")  # lands after our read
        return seen


def test_a_lease_taken_between_read_and_write_fails_the_conditional_write(
    spec: StateSpec,
) -> None:
    """Two takers read "free" at once: the one whose conditional Put comes second fails
    it, looks again, and is refused; the lease stays the winner's."""
    rival = DynamoStore(spec, pid=1)  # alive on this host: init
    late = StaleReads(spec, rival=rival)
    with pytest.raises(LockedError, match="locked by run r-rival"):
        late.acquire(STACK, "r-late")
    holder = late.holder(STACK)
    assert holder is not None and holder.run_id == "r-rival"


def test_finished_runs_expire_and_unfinished_ones_never(spec: StateSpec) -> None:
    """A run's items get `ttl` (ttl_days on) at its "finished" event, index items too;
    a paused run, the lease and the fencing counter never expire."""
    store = DynamoStore(StateSpec("dynamodb", spec.table, REGION, ttl_days=7))
    plan = {
        "strategy": "rotate",
        "stack": STACK,
        "summary": {},
        "steps": [{"key": "VerifyServers#1", "name": "VerifyServers", "params": {}}],
    }
    for run_id, status in (("r-done", "succeeded"), ("r-paused", "paused")):
        lease = store.acquire(STACK, run_id)
        store.create_run(run_id, plan, lease)
        store.step_started(run_id, 0, lease)
        store.step_done(run_id, 0, lease, {"reports": {"srv-1": {"passed": True}}})
        store.set_status(run_id, status, lease, outcome=status)
        store.event(run_id, lease, "finished", detail=status)
        store.release(lease)
    store.acquire(STACK, "r-holds")
    items = [
        it
        for page in dynamodb_client(None).get_paginator("scan").paginate(TableName=spec.table)
        for it in page["Items"]
    ]
    now = time.time()

    def expiry(it: dict[str, Any]) -> float | None:
        return float(it["ttl"]["N"]) if "ttl" in it else None

    done = [it for it in items if "r-done" in it["pk"]["S"] + it["sk"]["S"]]
    assert {it["sk"]["S"].split("#")[0] for it in done} >= {
        "RUN",
        "STEP",
        "EVENT",
        "AT",
        "ID",
        "VERIFIED",
    }
    for it in done:
        at = expiry(it)
        assert at is not None and 6.9 * 86400 < at - now <= 7 * 86400, it["sk"]
    paused = [it for it in items if "r-paused" in it["pk"]["S"] + it["sk"]["S"]]
    assert paused and all(expiry(it) is None for it in paused)
    lease_items = [it for it in items if it["sk"]["S"] in ("LOCK", "FENCE")]
    assert len(lease_items) == 2 and all(expiry(it) is None for it in lease_items)
    assert store.get_run("r-done") is not None, "expiry is DynamoDB's, later"


def test_reads_are_queries_by_key(spec: StateSpec) -> None:
    """Nothing scans the table; a lease check is one GetItem; a journal write is one
    transaction; listing runs is a query and one batched read."""
    store = DynamoStore(spec)
    calls = Calls(store)
    lease = store.acquire(STACK, "r1")
    store.create_run("r1", {"strategy": "x", "stack": STACK, "summary": {}, "steps": []}, lease)
    calls.ops.clear()
    store.check(lease)
    assert dict(calls.ops) == {"GetItem": 1}
    calls.ops.clear()
    store.set_status("r1", "dirty", lease)
    assert dict(calls.ops) == {"TransactWriteItems": 1}
    calls.ops.clear()
    store.runs(STACK)
    store.unfinished(STACK)
    assert dict(calls.ops) == {"Query": 2, "BatchGetItem": 2}


def test_a_rebuild_journaled_in_dynamodb_keeps_its_lease_and_is_economical(
    make_world: Any, aws_credentials: None
) -> None:
    """The engine drives a rebuild on the local cloud with its journal and lease in
    DynamoDB: a step blocked past the lease TTL keeps the lease (the heartbeat renews
    it in DynamoDB), a rival is refused meanwhile, and the calls stay few per step."""
    world: World = make_world()
    world.cloud.inject("latency", op="set_members", times=1, seconds=3.0)
    with mock_aws():
        spec = StateSpec("dynamodb", new_table(), REGION)
        create_table(spec)
        store = DynamoStore(spec, ttl=1.5)
        calls = Calls(store)
        engine = Engine(store=store, provider=LocalProvider(world.cloud), config=world.config)
        plan = plan_rebuild(engine.provider, "demo", world.config)
        refused: list[str] = []

        def rival() -> None:
            other = DynamoStore(spec, ttl=1.5, pid=1)  # another live process on this host
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not refused:
                if any(c["op"] == "set_members" for c in world.cloud.calls()[-3:]):
                    time.sleep(2.0)  # past the 1.5 s TTL, inside the 3 s call
                    try:
                        other.acquire("demo", "intruder")
                        refused.append("acquired")
                    except LockedError as exc:
                        refused.append(str(exc))
                time.sleep(0.05)

        t = threading.Thread(target=rival)
        t.start()
        result = engine.start(plan)
        t.join()
        engine.close()
        assert result.outcome == Outcome.SUCCEEDED, result.message
        assert refused and "locked by run" in refused[0]
        steps = store.steps(result.run_id or "")
        assert [s.state for s in steps] == ["done"] * len(plan.steps)
        assert store.holder("demo") is None and store.unfinished("demo") == []
        assert "Scan" not in calls.ops
        # About 5 per step (heartbeats included): a journal write at each end of a step,
        # a lease check before each mutating call, a query where the engine reads steps.
        assert calls.total() < 8 * len(plan.steps), dict(calls.ops)


def test_the_iam_policy_allows_every_call_the_store_makes() -> None:
    """docs/state-dynamodb-iam-policy.json covers each DynamoDB operation in dynamodb.py,
    the runtime ones scoped to the table, and `state init`'s in a statement of its own."""
    source = (ROOT / "orchestrator" / "state" / "dynamodb.py").read_text()
    ops = set(re.findall(r"_(?:api|batch)\(\s*\"(\w+)\"", source))
    ops |= set(re.findall(r"client\.(\w+)\(", source)) - {"get_paginator", "get_waiter"}
    ops |= set(re.findall(r"get_paginator\(\s*(?:\"(\w+)\"|op)", source)) - {""}
    ops |= {"query"}  # the paginator's operation
    assert {"transact_write_items", "batch_get_item", "put_item", "create_table"} <= ops
    policy = json.loads((ROOT / "docs" / "state-dynamodb-iam-policy.json").read_text())
    allowed = {a for st in policy["Statement"] for a in st["Action"]}
    needed = {a for op in ops for a in IAM_ACTIONS[op]}
    assert needed <= allowed, sorted(needed - allowed)
    assert "dynamodb:Scan" not in allowed
    for st in policy["Statement"]:
        assert all(r.startswith("arn:aws:dynamodb:") and ":table/" in r for r in st["Resource"])
