"""The team state store: one DynamoDB table, shared by every machine that runs changeover.

``state = "dynamodb://TABLE?region=REGION"``. The endpoint and the credentials come from
boto3's usual chain (``AWS_ENDPOINT_URL`` included), so DynamoDB Local and moto work
unchanged. ``changeover state init`` creates the table (:func:`create_table`).

Single-table design (every key a string; ``stamp`` is a time, zero-padded to sort)::

    pk                 sk                              what
    RUN#<run>          RUN                             the run (plan, status, result)
    RUN#<run>          RUN#plan#000, RUN#result#000    chunks of a blob too big to inline
    RUN#<run>          STEP#<idx>                      a step (no item yet: pending)
    RUN#<run>          EVENT#<ns>#<rand>               a run event
    STACK#<stack>      LOCK                            the lease: run, token, pid, host, expiry
    STACK#<stack>      FENCE                           the fencing counter (atomic ADD)
    STACK#<stack>      OPEN#<run>                      the stack's unfinished runs
    STACK#<stack>      RUN#<stamp>#<run>               the stack's runs by time
    STACK#<stack>      VERIFIED#<stamp>#<run>#<idx>    a finished VerifyServers step
    STACK#<stack>      VERSION#<server>#<stamp>#<c>    a component version an audit read
    STACK#<stack>      FACTS#<server>                  the facts the last audit read
    RUNS               AT#<stamp>#<run>, ID#<run>      every run by time, and by id

- **Every lease and journal transition is a conditional write.** A journal write made
  for a run is one ``TransactWriteItems`` whose first item is a ``ConditionCheck`` on the
  stack's LOCK item (``token = :token``) next to the Put/Update: the fencing token is
  checked in the same conditional write. A lease is taken with a conditional Put
  (``attribute_not_exists``, or the token and expiry seen, and ``expires_at <= now``
  for a takeover after the TTL); renewals and releases are conditional on the token.
- **Reads are strongly consistent queries by key**, paginated with boto3's paginators;
  nothing scans the table.
- **Old runs expire**: when a run ends (its "finished" event, always its last write),
  its items get a ``ttl`` attribute (``ttl_days`` later, default 365), and DynamoDB's
  TTL deletes them. Unfinished runs, leases and the fencing counters never expire.
- Blobs (plans, outputs, results) are JSON, secrets masked (I9); above 8 KiB they are
  zlib-compressed, and above 300 KiB split into chunk items written in the same
  transaction (DynamoDB items hold at most 400 KB).
"""

from __future__ import annotations

import json
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    NoRegionError,
)
from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from orchestrator.errors import BadInput, ChangeoverError, LockedError
from orchestrator.redact import redact_text
from orchestrator.state.base import (
    UNFINISHED,
    VERIFY_STEP,
    FactsRecord,
    Holder,
    Lease,
    LeaseRules,
    Observed,
    RunEvent,
    RunRecord,
    StateMissing,
    StateStore,
    StateUnavailable,
    StepRecord,
    VerifiedReport,
    VersionRecord,
    dumps,
)
from orchestrator.state.url import StateSpec

Item = dict[str, Any]  # a DynamoDB item in the low-level client's form

KEY_SCHEMA = [
    {"AttributeName": "pk", "KeyType": "HASH"},
    {"AttributeName": "sk", "KeyType": "RANGE"},
]
TTL_ATTRIBUTE = "ttl"
INLINE_MAX = 8 * 1024  # JSON up to this many characters is stored as text
CHUNK_BYTES = 300 * 1024  # a compressed blob above this is split into chunk items
MAX_CHUNKS = 12  # 3.6 MB: a transaction carries at most 4 MB
BATCH_WRITE = 25  # BatchWriteItem's limit
BATCH_GET = 100  # BatchGetItem's limit
TAKE_ATTEMPTS = 5  # conditional lease writes lost to another taker before giving up
CONFLICT_ATTEMPTS = 6  # transactions cancelled by a concurrent one on the same item
WAITER = {"Delay": 2, "MaxAttempts": 90}  # table_exists: up to 3 minutes
# Error codes worth another try after botocore's own retries gave up.
UNAVAILABLE = {
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "ThrottlingException",
    "InternalServerError",
    "ServiceUnavailable",
    "TransactionConflictException",
    "TransactionInProgressException",
}
DENIED = {
    "AccessDeniedException",
    "UnrecognizedClientException",
    "InvalidSignatureException",
    "ExpiredTokenException",
    "MissingAuthenticationTokenException",
}
# What a team's jobs need on the table (docs/state-dynamodb-iam-policy.json). Each
# TransactWriteItems is authorized per item: ConditionCheckItem, PutItem, UpdateItem,
# DeleteItem.
IAM_ACTIONS = {
    "get_item": ["dynamodb:GetItem"],
    "put_item": ["dynamodb:PutItem"],
    "update_item": ["dynamodb:UpdateItem"],
    "delete_item": ["dynamodb:DeleteItem"],
    "query": ["dynamodb:Query"],
    "batch_get_item": ["dynamodb:BatchGetItem"],
    "batch_write_item": ["dynamodb:BatchWriteItem"],
    "transact_write_items": [
        "dynamodb:ConditionCheckItem",
        "dynamodb:PutItem",
        "dynamodb:UpdateItem",
        "dynamodb:DeleteItem",
    ],
    "describe_table": ["dynamodb:DescribeTable"],
    "create_table": ["dynamodb:CreateTable"],
    "describe_time_to_live": ["dynamodb:DescribeTimeToLive"],
    "update_time_to_live": ["dynamodb:UpdateTimeToLive"],
}


class _Conflict(Exception):
    """A transaction cancelled by a concurrent one on the same item: try it again."""


class StateTooLarge(ChangeoverError):
    """A journal entry too large for one DynamoDB transaction (over 3.6 MB compressed)."""


# --------------------------------------------------------------------------------------
# Attribute values and keys
# --------------------------------------------------------------------------------------


def _s(value: str) -> Item:
    return {"S": value}


def _n(value: float) -> Item:
    return {"N": repr(value) if isinstance(value, float) else str(value)}


def _str(item: Item, name: str) -> str | None:
    v = item.get(name)
    return None if v is None else str(v["S"])


def _num(item: Item, name: str) -> float | None:
    v = item.get(name)
    return None if v is None else float(v["N"])


def _int(item: Item, name: str, default: int = 0) -> int:
    v = item.get(name)
    return default if v is None else int(v["N"])


def stamp(at: float) -> str:
    """A time that sorts as text (seconds since the epoch, zero-padded)."""
    return f"{at:020.6f}"


def _key(pk: str, sk: str) -> Item:
    return {"pk": _s(pk), "sk": _s(sk)}


def _run_pk(run_id: str) -> str:
    return f"RUN#{run_id}"


def _stack_pk(stack: str) -> str:
    return f"STACK#{stack}"


def _step_sk(idx: int) -> str:
    return f"STEP#{idx:06d}"


def _index_items(run_id: str, stack: str, created_at: float) -> list[Item]:
    """The items that find a run: by stack and time, by time, by id."""
    at = _n(created_at)
    return [
        {**_key(_stack_pk(stack), f"RUN#{stamp(created_at)}#{run_id}"), "id": _s(run_id)},
        {**_key("RUNS", f"AT#{stamp(created_at)}#{run_id}"), "id": _s(run_id), "created_at": at},
        {**_key("RUNS", f"ID#{run_id}"), "id": _s(run_id), "created_at": at},
    ]


class _Expr:
    """An update or condition expression with its placeholders."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}
        self.values: dict[str, Item] = {}
        self.sets: list[str] = []
        self.removes: list[str] = []
        self.adds: list[str] = []

    def name(self, attr: str) -> str:
        self.names[f"#{attr}"] = attr
        return f"#{attr}"

    def value(self, v: Item) -> str:
        key = f":v{len(self.values)}"
        self.values[key] = v
        return key

    def set(self, attr: str, v: Item) -> _Expr:
        self.sets.append(f"{self.name(attr)} = {self.value(v)}")
        return self

    def set_if_missing(self, attr: str, v: Item) -> _Expr:
        n = self.name(attr)
        self.sets.append(f"{n} = if_not_exists({n}, {self.value(v)})")
        return self

    def remove(self, attr: str) -> _Expr:
        self.removes.append(self.name(attr))
        return self

    def add(self, attr: str, amount: int) -> _Expr:
        self.adds.append(f"{self.name(attr)} {self.value(_n(amount))}")
        return self

    def update(self) -> str:
        parts = []
        if self.sets:
            parts.append("SET " + ", ".join(self.sets))
        if self.removes:
            parts.append("REMOVE " + ", ".join(self.removes))
        if self.adds:
            parts.append("ADD " + ", ".join(self.adds))
        return " ".join(parts)

    def params(self, *, condition: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.sets or self.removes or self.adds:
            out["UpdateExpression"] = self.update()
        if condition:
            out["ConditionExpression"] = condition
        if self.names:
            out["ExpressionAttributeNames"] = dict(self.names)
        if self.values:
            out["ExpressionAttributeValues"] = dict(self.values)
        return out


# --------------------------------------------------------------------------------------
# Blobs: JSON inline, compressed, or in chunk items
# --------------------------------------------------------------------------------------


def _pack(text: str) -> tuple[Item | None, list[bytes]]:
    """(the attribute value, or None when chunked; the chunks)."""
    if len(text) <= INLINE_MAX:
        return _s(text), []
    data = zlib.compress(text.encode(), 6)
    if len(data) <= CHUNK_BYTES:
        return {"B": data}, []
    chunks = [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)]
    if len(chunks) > MAX_CHUNKS:
        raise StateTooLarge(
            f"a journal entry of {len(data) // 1024} KiB compressed is more than one "
            "DynamoDB transaction carries"
        )
    return None, chunks


def _blob_set(expr: _Expr, pk: str, sk: str, attr: str, text: str) -> list[Item]:
    """Set `attr` in an update to `text`; returns the chunk items to put with it."""
    value, chunks = _pack(text)
    if value is not None:
        expr.set(attr, value).remove(f"{attr}_chunks")
        return []
    expr.set(f"{attr}_chunks", _n(len(chunks))).remove(attr)
    return [
        {**_key(pk, f"{sk}#{attr}#{i:03d}"), "data": {"B": chunk}} for i, chunk in enumerate(chunks)
    ]


def _blob_read(item: Item, attr: str, chunks: Mapping[str, bytes]) -> str | None:
    """The text of `attr` of `item`; `chunks`: chunk items' data by sort key."""
    v = item.get(attr)
    if v is not None:
        if "S" in v:
            return str(v["S"])
        return zlib.decompress(bytes(v["B"])).decode()
    count = _int(item, f"{attr}_chunks", 0)
    if not count:
        return None
    sk = item["sk"]["S"]
    data = b"".join(chunks[f"{sk}#{attr}#{i:03d}"] for i in range(count))
    return zlib.decompress(data).decode()


def _json(item: Item, attr: str, chunks: Mapping[str, bytes]) -> Any:
    text = _blob_read(item, attr, chunks)
    return json.loads(text) if text else None


# --------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------


def make_client(spec: StateSpec) -> Any:
    """A DynamoDB client from boto3's chain: region from the URL or the chain, the
    endpoint from the URL or the chain (AWS_ENDPOINT_URL), credentials from the chain."""
    session = boto3.session.Session(region_name=spec.region)
    try:
        return session.client(
            "dynamodb",
            endpoint_url=spec.endpoint_url,
            config=Config(
                retries={"mode": "standard", "max_attempts": 6},
                connect_timeout=5,
                read_timeout=20,
            ),
        )
    except NoRegionError:
        raise BadInput(
            f"state: DynamoDB table {spec.table} needs a region: add ?region=REGION to the "
            "URL, or set AWS_REGION"
        ) from None


class DynamoStore(LeaseRules):
    """The StateStore Protocol on one DynamoDB table (see the module doc)."""

    def __init__(
        self,
        spec: StateSpec,
        *,
        ttl: float = 60.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        host: str | None = None,
        pid: int | None = None,
        client: Any = None,
    ) -> None:
        if spec.backend != "dynamodb" or not spec.table:
            raise ValueError("a dynamodb state spec")
        self.spec = spec
        self.table: str = spec.table
        self._init_rules(ttl, clock, sleep, host, pid)
        self._client = client
        # What the journal writes need about a run they do not carry: its stack and its
        # steps' keys and names (from its plan, which never changes).
        self._stacks: dict[str, str] = {}
        self._plans: dict[str, list[tuple[str, str]]] = {}
        self._last_ns = 0

    @property
    def where(self) -> str:
        return self.spec.describe()

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = make_client(self.spec)
        return self._client

    def clone(self) -> StateStore:
        # boto3 clients are thread-safe: the clone shares ours.
        return DynamoStore(
            self.spec,
            ttl=self.ttl,
            clock=self.clock,
            sleep=self.sleep,
            host=self.host,
            pid=self.pid,
            client=self.client,
        )

    def close(self) -> None:
        """Nothing to close: the client's connections are pooled and reused."""

    # --- calls ---------------------------------------------------------------------------
    def _api(self, op: str, **kw: Any) -> Any:
        """One DynamoDB call, its failures as changeover's errors (the conditional ones
        stay ClientErrors, for the caller to read)."""
        try:
            return getattr(self.client, op)(TableName=self.table, **kw)
        except ClientError as exc:
            raise self._mapped(exc, op) from None
        except NoCredentialsError:
            raise self._no_credentials() from None
        except BotoCoreError as exc:
            raise StateUnavailable(f"{self.where} did not answer: {exc}") from None

    def _mapped(self, exc: ClientError, op: str) -> Exception:
        code = exc.response.get("Error", {}).get("Code", "")
        message = exc.response.get("Error", {}).get("Message", "")
        if code == "ResourceNotFoundException":
            return StateMissing(
                f"state table {self.table} does not exist"
                + (f" in {self.spec.region}" if self.spec.region else "")
                + ": run `changeover state init`"
            )
        if code in UNAVAILABLE:
            return StateUnavailable(f"{self.where} is busy ({code}); try again")
        if code in DENIED:
            actions = ", ".join(IAM_ACTIONS.get(op, [op]))
            return BadInput(
                f"state: {self.where} refused {op} ({code}: {redact_text(message)}); the "
                f"caller needs {actions} on it (docs/state-dynamodb-iam-policy.json)"
            )
        unmapped: Exception = exc  # a condition or a validation error: the caller's
        return unmapped

    def _paginate(self, op: str, **kw: Any) -> Iterator[Item]:
        """Items of a query, page by page (boto3's paginator)."""
        pages = self.client.get_paginator(op).paginate(TableName=self.table, **kw)
        try:
            for page in pages:
                yield from page.get("Items", [])
        except ClientError as exc:
            raise self._mapped(exc, op) from None
        except BotoCoreError as exc:
            raise StateUnavailable(f"{self.where} did not answer: {exc}") from None

    def _query(
        self,
        pk: str,
        prefix: str,
        *,
        newest_first: bool = False,
        limit: int | None = None,
        between: tuple[str, str] | None = None,
    ) -> Iterator[Item]:
        """Items of partition `pk` whose sort key starts with `prefix` (any, for ""), or
        lies `between` two keys."""
        expr = _Expr()
        cond = f"{expr.name('pk')} = {expr.value(_s(pk))}"
        if between is not None:
            lo, hi = expr.value(_s(between[0])), expr.value(_s(between[1]))
            cond += f" AND {expr.name('sk')} BETWEEN {lo} AND {hi}"
        elif prefix:
            cond += f" AND begins_with({expr.name('sk')}, {expr.value(_s(prefix))})"
        kw: dict[str, Any] = {
            "KeyConditionExpression": cond,
            "ExpressionAttributeNames": expr.names,
            "ExpressionAttributeValues": expr.values,
            "ConsistentRead": True,
            "ScanIndexForward": not newest_first,
        }
        if limit is not None:
            kw["PaginationConfig"] = {"MaxItems": limit, "PageSize": min(limit, 1000)}
        return self._paginate("query", **kw)

    def _get(self, pk: str, sk: str) -> Item | None:
        item: Item | None = self._api("get_item", Key=_key(pk, sk), ConsistentRead=True).get("Item")
        return item

    def _transact(self, items: list[Item]) -> list[str]:
        """Write `items` in one transaction. Returns [] when it was applied, else the
        cancellation reason of each item ("ConditionalCheckFailed", "None", ...)."""
        for it in items:
            for kind in it.values():
                kind["TableName"] = self.table

        def attempt() -> list[str]:
            try:
                # A fresh token per attempt: botocore's own retries of this request reuse
                # it, so a write that landed before a dropped response is not doubled.
                self.client.transact_write_items(
                    TransactItems=items, ClientRequestToken=uuid.uuid4().hex
                )
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code != "TransactionCanceledException":
                    raise self._mapped(exc, "transact_write_items") from None
                reasons = [
                    str(r.get("Code", "None")) for r in exc.response.get("CancellationReasons", [])
                ]
                if "ConditionalCheckFailed" in reasons:
                    return reasons
                if any(r in ("TransactionConflict", "ThrottlingError") for r in reasons):
                    raise _Conflict(",".join(reasons)) from None
                raise StateUnavailable(
                    f"{self.where} cancelled a journal write ({', '.join(reasons)})"
                ) from None
            except NoCredentialsError:
                raise self._no_credentials() from None
            except BotoCoreError as exc:
                raise StateUnavailable(f"{self.where} did not answer: {exc}") from None
            return []

        try:
            for tried in Retrying(
                stop=stop_after_attempt(CONFLICT_ATTEMPTS),
                wait=wait_exponential(multiplier=0.05, max=1.0) + wait_random(0, 0.05),
                retry=retry_if_exception_type(_Conflict),
                reraise=True,
            ):
                with tried:
                    return attempt()
        except _Conflict as exc:
            raise StateUnavailable(
                f"{self.where}: journal write kept conflicting ({exc})"
            ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _no_credentials(self) -> BadInput:
        return BadInput(
            f"state: no AWS credentials for {self.where} (boto3's chain: the environment, "
            "the profile, the instance or pod role)"
        )

    def _batch_write(self, puts: Iterable[Item] = (), deletes: Iterable[Item] = ()) -> None:
        requests: list[Item] = [{"PutRequest": {"Item": it}} for it in puts]
        requests += [{"DeleteRequest": {"Key": k}} for k in deletes]
        for start in range(0, len(requests), BATCH_WRITE):
            pending = {self.table: requests[start : start + BATCH_WRITE]}
            for tried in Retrying(
                stop=stop_after_attempt(8),
                wait=wait_exponential(multiplier=0.05, max=2.0),
                retry=retry_if_exception_type(_Conflict),
                reraise=True,
            ):
                with tried:
                    out = self._batch("batch_write_item", RequestItems=pending)
                    pending = out.get("UnprocessedItems") or {}
                    if pending:
                        raise _Conflict("unprocessed items")

    def _batch(self, op: str, **kw: Any) -> Any:
        try:
            return getattr(self.client, op)(**kw)
        except ClientError as exc:
            raise self._mapped(exc, op) from None
        except NoCredentialsError:
            raise self._no_credentials() from None
        except BotoCoreError as exc:
            raise StateUnavailable(f"{self.where} did not answer: {exc}") from None

    def _batch_get(self, keys: list[Item]) -> list[Item]:
        found: list[Item] = []
        for start in range(0, len(keys), BATCH_GET):
            pending: Any = {
                self.table: {"Keys": keys[start : start + BATCH_GET], "ConsistentRead": True}
            }
            for tried in Retrying(
                stop=stop_after_attempt(8),
                wait=wait_exponential(multiplier=0.05, max=2.0),
                retry=retry_if_exception_type(_Conflict),
                reraise=True,
            ):
                with tried:
                    out = self._batch("batch_get_item", RequestItems=pending)
                    found += out.get("Responses", {}).get(self.table, [])
                    pending = out.get("UnprocessedKeys") or {}
                    if pending:
                        raise _Conflict("unprocessed keys")
        return found

    def _fence(self, lease: Lease) -> Item:
        """The ConditionCheck that makes a write count only for the current holder."""
        expr = _Expr()
        cond = f"{expr.name('token')} = {expr.value(_n(lease.token))}"
        return {
            "ConditionCheck": {
                "Key": _key(_stack_pk(lease.stack), "LOCK"),
                **expr.params(condition=cond),
            }
        }

    # --- leases --------------------------------------------------------------------------
    def holder(self, stack: str) -> Holder | None:
        item = self._get(_stack_pk(stack), "LOCK")
        if item is None:
            return None
        return Holder(
            stack=stack,
            run_id=_str(item, "run_id") or "",
            token=_int(item, "token"),
            pid=_int(item, "pid"),
            host=_str(item, "host") or "",
            acquired_at=_num(item, "acquired_at") or 0.0,
            expires_at=_num(item, "expires_at") or 0.0,
        )

    def _next_token(self, stack: str) -> int:
        expr = _Expr().add("last_token", 1)
        out = self._api(
            "update_item",
            Key=_key(_stack_pk(stack), "FENCE"),
            ReturnValues="UPDATED_NEW",
            **expr.params(),
        )
        return int(out["Attributes"]["last_token"]["N"])

    def _take(self, stack: str, run_id: str, observed: Observed | None) -> Lease | Observed:
        now = self.clock()
        for _ in range(TAKE_ATTEMPTS):
            now = self.clock()
            row = self.holder(stack)
            decision = self.decide(row, run_id, now, observed)
            if isinstance(decision, tuple):
                return decision
            if row is not None and decision is not None:
                raise self.refusal(row, decision, now)
            token = self._next_token(stack)
            item = {
                **_key(_stack_pk(stack), "LOCK"),
                "run_id": _s(run_id),
                "token": _n(token),
                "pid": _n(self.pid),
                "host": _s(self.host),
                "acquired_at": _n(now),
                "expires_at": _n(now + self.ttl),
            }
            expr = _Expr()
            if row is None:
                cond = f"attribute_not_exists({expr.name('pk')})"
            else:
                # Exactly the lease we judged, unrenewed; and a takeover only after its TTL.
                cond = (
                    f"{expr.name('token')} = {expr.value(_n(row.token))} AND "
                    f"{expr.name('expires_at')} = {expr.value(_n(row.expires_at))}"
                )
                if row.expires_at <= now and row.run_id != run_id:
                    cond += f" AND {expr.name('expires_at')} <= {expr.value(_n(now))}"
            try:
                self._api("put_item", Item=item, **expr.params(condition=cond))
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
                    raise
                continue  # someone else wrote the lease meanwhile: judge it afresh
            return Lease(stack, run_id, token, now + self.ttl)
        row = self.holder(stack)
        if row is not None:
            raise self.refusal(row, "held", now)
        raise LockedError(stack, "?", 0, "the lease kept changing hands while we looked")

    def check(self, lease: Lease) -> None:
        row = self.holder(lease.stack)
        if row is None or row.token != lease.token:
            raise self.fenced(lease)

    def renew(self, lease: Lease) -> Lease:
        expires = self.clock() + self.ttl
        expr = _Expr().set("expires_at", _n(expires))
        cond = f"{expr.name('token')} = {expr.value(_n(lease.token))}"
        try:
            self._api(
                "update_item",
                Key=_key(_stack_pk(lease.stack), "LOCK"),
                **expr.params(condition=cond),
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                raise self.fenced(lease, "was lost") from None
            raise
        return Lease(lease.stack, lease.run_id, lease.token, expires)

    def release(self, lease: Lease) -> None:
        expr = _Expr()
        cond = f"{expr.name('token')} = {expr.value(_n(lease.token))}"
        try:
            self._api(
                "delete_item",
                Key=_key(_stack_pk(lease.stack), "LOCK"),
                **expr.params(condition=cond),
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
                raise
            # Not ours any more: broken or taken over. Nothing to release.

    def break_lock(self, stack: str) -> str | None:
        row = self.holder(stack)
        bump = _Expr().add("last_token", 1)
        self._transact(
            [
                {"Delete": {"Key": _key(_stack_pk(stack), "LOCK")}},
                {"Update": {"Key": _key(_stack_pk(stack), "FENCE"), **bump.params()}},
            ]
        )
        return row.run_id if row else None

    # --- journal writes ------------------------------------------------------------------
    def _write(self, lease: Lease | None, items: list[Item]) -> list[str]:
        """A journal write: `items` in one transaction, behind the lease's fence when a
        lease is given. Returns the reasons of the items after the fence ([] if it was
        applied); raises FencedError, changing nothing, when the fence refused it."""
        fence = [self._fence(lease)] if lease is not None else []
        reasons = self._transact(fence + items)
        if reasons and lease is not None and reasons[0] == "ConditionalCheckFailed":
            raise self.fenced(lease)
        return reasons[len(fence) :]

    def create_run(self, run_id: str, plan: dict[str, Any], lease: Lease) -> None:
        now = time.time()
        pk = _run_pk(run_id)
        value, chunks = _pack(dumps(plan))
        run: Item = {
            **_key(pk, "RUN"),
            "id": _s(run_id),
            "strategy": _s(plan["strategy"]),
            "stack": _s(plan["stack"]),
            "status": _s("running"),
            "created_at": _n(now),
            "updated_at": _n(now),
        }
        if value is not None:
            run["plan"] = value
        else:
            run["plan_chunks"] = _n(len(chunks))
        expr = _Expr()
        items: list[Item] = [
            {
                "Put": {
                    "Item": run,
                    **expr.params(condition=f"attribute_not_exists({expr.name('pk')})"),
                }
            },
            {
                "Put": {
                    "Item": {**_key(_stack_pk(plan["stack"]), f"OPEN#{run_id}"), "id": _s(run_id)}
                }
            },
            *({"Put": {"Item": it}} for it in _index_items(run_id, plan["stack"], now)),
            *(
                {"Put": {"Item": {**_key(pk, f"RUN#plan#{i:03d}"), "data": {"B": c}}}}
                for i, c in enumerate(chunks)
            ),
        ]
        if self._write(lease, items):
            raise BadInput(f"run {run_id} is already in the journal")
        self._stacks[run_id] = plan["stack"]
        self._plans[run_id] = [(s["key"], s["name"]) for s in plan["steps"]]

    def _run_meta(self, run_id: str) -> tuple[str, list[tuple[str, str]]]:
        if run_id not in self._stacks and self.get_run(run_id) is None:
            raise BadInput(f"no run {run_id!r} in {self.where}")
        return self._stacks[run_id], self._plans[run_id]

    def set_status(
        self,
        run_id: str,
        status: str,
        lease: Lease | None,
        *,
        outcome: str | None = None,
        result: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        stack, _ = self._run_meta(run_id)
        pk = _run_pk(run_id)
        expr = _Expr().set("status", _s(status)).set("updated_at", _n(time.time()))
        if outcome is not None:
            expr.set("outcome", _s(outcome))
        extra: list[Item] = []
        if result is not None:
            extra = _blob_set(expr, pk, "RUN", "result", dumps(result))
        if error:
            expr.set("error", _s(redact_text(error)))
        else:
            expr.remove("error")
        cond = f"attribute_exists({expr.name('pk')})"
        marker = _key(_stack_pk(stack), f"OPEN#{run_id}")
        items: list[Item] = [
            {"Update": {"Key": _key(pk, "RUN"), **expr.params(condition=cond)}},
            {"Put": {"Item": {**marker, "id": _s(run_id)}}}
            if status in UNFINISHED
            else {"Delete": {"Key": marker}},
            *({"Put": {"Item": it}} for it in extra),
        ]
        if self._write(lease, items):
            raise BadInput(f"no run {run_id!r} in {self.where}")

    def _step(
        self,
        run_id: str,
        idx: int,
        lease: Lease,
        expr: _Expr,
        *,
        condition: str | None = None,
        extra: list[Item] | None = None,
    ) -> bool:
        """Update step `idx` (creating its item: a step with none is pending). False when
        `condition` did not hold (nothing changed)."""
        _, steps = self._run_meta(run_id)
        key, name = steps[idx]
        expr.set("key", _s(key)).set("name", _s(name)).set("idx", _n(idx))
        items: list[Item] = [
            {
                "Update": {
                    "Key": _key(_run_pk(run_id), _step_sk(idx)),
                    **expr.params(condition=condition),
                }
            },
            *({"Put": {"Item": it}} for it in extra or []),
        ]
        return not self._write(lease, items)

    def step_started(self, run_id: str, idx: int, lease: Lease) -> None:
        expr = _Expr().set("state", _s("started")).set_if_missing("started_at", _n(time.time()))
        expr.set_if_missing("attempts", _n(0)).remove("error")
        self._step(run_id, idx, lease, expr)

    def step_marked(self, run_id: str, idx: int, lease: Lease, marker: dict[str, Any]) -> None:
        expr = _Expr()
        sk = _step_sk(idx)
        extra = _blob_set(expr, _run_pk(run_id), sk, "outputs", dumps(marker))
        cond = f"{expr.name('state')} = {expr.value(_s('started'))}"
        self._step(run_id, idx, lease, expr, condition=cond, extra=extra)

    def step_paused(self, run_id: str, idx: int, lease: Lease, marks: dict[str, Any]) -> None:
        expr = _Expr().set("state", _s("pending"))
        extra = _blob_set(expr, _run_pk(run_id), _step_sk(idx), "outputs", dumps(marks))
        expr.remove("started_at").remove("ended_at").add("attempts", 1)
        self._step(run_id, idx, lease, expr, extra=extra)

    def step_done(
        self,
        run_id: str,
        idx: int,
        lease: Lease,
        outputs: dict[str, Any],
        *,
        noop: str | None = None,
        tries: int = 1,
    ) -> None:
        now = time.time()
        stack, steps = self._run_meta(run_id)
        sk = _step_sk(idx)
        expr = _Expr().set("state", _s("done")).set("ended_at", _n(now))
        extra = _blob_set(expr, _run_pk(run_id), sk, "outputs", dumps(outputs))
        if noop:
            expr.set("noop", _s(noop))
        else:
            expr.remove("noop")
        expr.add("attempts", tries)
        if steps[idx][1] == VERIFY_STEP:
            # What audits and `plan --only-if-needed` read back, newest first, by stack.
            pointer = f"VERIFIED#{stamp(now)}#{run_id}#{idx:06d}"
            expr.set("verified_sk", _s(pointer))
            extra.append(
                {
                    **_key(_stack_pk(stack), pointer),
                    "run_id": _s(run_id),
                    "idx": _n(idx),
                    "ended_at": _n(now),
                }
            )
        self._step(run_id, idx, lease, expr, extra=extra)

    def step_failed(self, run_id: str, idx: int, lease: Lease, error: str, tries: int = 1) -> None:
        expr = _Expr().set("state", _s("failed")).set("ended_at", _n(time.time()))
        expr.set("error", _s(redact_text(error))).add("attempts", tries)
        self._step(run_id, idx, lease, expr)

    def undo_state(
        self, run_id: str, idx: int, lease: Lease, state: str, error: str | None = None
    ) -> None:
        expr = _Expr().set("undo_state", _s(state)).set_if_missing("state", _s("pending"))
        expr.set_if_missing("attempts", _n(0))
        if error:
            expr.set("undo_error", _s(redact_text(error)))
        else:
            expr.remove("undo_error")
        self._step(run_id, idx, lease, expr)

    def event(
        self,
        run_id: str,
        lease: Lease | None,
        kind: str,
        *,
        step: str | None = None,
        detail: str | None = None,
    ) -> None:
        """Record a RunEvent now. "finished" is a run's last write: its items then get
        their expiry (`ttl_days` from now)."""
        ns = max(time.time_ns(), self._last_ns + 1)
        self._last_ns = ns
        item: Item = {
            **_key(_run_pk(run_id), f"EVENT#{ns:020d}#{uuid.uuid4().hex[:6]}"),
            "at": _n(ns / 1e9),
            "kind": _s(kind),
        }
        if step is not None:
            item["step"] = _s(step)
        if detail:
            item["detail"] = _s(redact_text(detail))
        self._write(lease, [{"Put": {"Item": item}}])
        if kind == "finished":
            self._expire(run_id)

    def _expire(self, run_id: str) -> None:
        """Give every item of a finished run its `ttl`: DynamoDB deletes them then."""
        expires = _n(int(time.time() + self.spec.ttl_days * 86400))
        items = list(self._query(_run_pk(run_id), ""))
        run = next((it for it in items if it["sk"]["S"] == "RUN"), None)
        if run is None:
            return
        if _str(run, "status") in UNFINISHED:
            return  # ended paused or dirty: it is not over
        stack = _str(run, "stack") or ""
        extra = _index_items(run_id, stack, _num(run, "created_at") or 0.0)
        for it in items:
            if "verified_sk" in it:
                extra.append(
                    {
                        **_key(_stack_pk(stack), it["verified_sk"]["S"]),
                        "run_id": _s(run_id),
                        "idx": it["idx"],
                        "ended_at": it.get("ended_at", _n(0)),
                    }
                )
        self._batch_write(puts=[{**it, TTL_ATTRIBUTE: expires} for it in [*items, *extra]])

    # --- journal reads -------------------------------------------------------------------
    def events(self, run_id: str) -> list[RunEvent]:
        return [
            RunEvent(
                at=_num(it, "at") or 0.0,
                kind=_str(it, "kind") or "",
                step=_str(it, "step"),
                detail=_str(it, "detail"),
            )
            for it in self._query(_run_pk(run_id), "EVENT#")
        ]

    def _record(self, items: list[Item]) -> RunRecord | None:
        """The run among `items` (its item and its chunk items)."""
        run = next((it for it in items if it["sk"]["S"] == "RUN"), None)
        if run is None:
            return None
        chunks = {it["sk"]["S"]: bytes(it["data"]["B"]) for it in items if "data" in it}
        rec = RunRecord(
            id=_str(run, "id") or "",
            strategy=_str(run, "strategy") or "",
            stack=_str(run, "stack") or "",
            status=_str(run, "status") or "",
            outcome=_str(run, "outcome"),
            created_at=_num(run, "created_at") or 0.0,
            updated_at=_num(run, "updated_at") or 0.0,
            plan=_json(run, "plan", chunks) or {},
            result=_json(run, "result", chunks) or {},
            error=_str(run, "error"),
        )
        self._stacks[rec.id] = rec.stack
        self._plans[rec.id] = [(s["key"], s["name"]) for s in rec.plan.get("steps", [])]
        return rec

    def get_run(self, run_id: str) -> RunRecord | None:
        return self._record(list(self._query(_run_pk(run_id), "RUN")))

    def _runs(self, ids: list[str]) -> list[RunRecord]:
        """Runs by id (one batched read; a chunked one with a query of its own)."""
        out = []
        for item in self._batch_get([_key(_run_pk(i), "RUN") for i in dict.fromkeys(ids)]):
            if "plan_chunks" in item or "result_chunks" in item:
                rec = self.get_run(_str(item, "id") or "")
            else:
                rec = self._record([item])
            if rec is not None:
                out.append(rec)
        return sorted(out, key=lambda r: r.created_at, reverse=True)

    def find_run(self, prefix: str) -> RunRecord | None:
        found = [_str(it, "id") or "" for it in self._query("RUNS", f"ID#{prefix}", limit=2)]
        return self.get_run(found[0]) if len(found) == 1 else None

    def runs(self, stack: str | None = None, limit: int = 20) -> list[RunRecord]:
        if stack:
            index = self._query(_stack_pk(stack), "RUN#", newest_first=True, limit=limit)
        else:
            index = self._query("RUNS", "AT#", newest_first=True, limit=limit)
        return self._runs([_str(it, "id") or "" for it in index])

    def unfinished(self, stack: str) -> list[RunRecord]:
        ids = [_str(it, "id") or "" for it in self._query(_stack_pk(stack), "OPEN#")]
        return [r for r in self._runs(ids) if r.status in UNFINISHED] if ids else []

    def _step_record(self, item: Item, chunks: Mapping[str, bytes]) -> StepRecord:
        return StepRecord(
            idx=_int(item, "idx"),
            key=_str(item, "key") or "",
            name=_str(item, "name") or "",
            state=_str(item, "state") or "pending",
            attempts=_int(item, "attempts"),
            started_at=_num(item, "started_at"),
            ended_at=_num(item, "ended_at"),
            outputs=_json(item, "outputs", chunks) or {},
            noop=_str(item, "noop"),
            error=_str(item, "error"),
            undo_state=_str(item, "undo_state"),
            undo_error=_str(item, "undo_error"),
        )

    def steps(self, run_id: str) -> list[StepRecord]:
        if run_id not in self._plans and self.get_run(run_id) is None:
            return []
        items = list(self._query(_run_pk(run_id), "STEP#"))
        chunks = {it["sk"]["S"]: bytes(it["data"]["B"]) for it in items if "data" in it}
        have = {_int(it, "idx"): self._step_record(it, chunks) for it in items if "data" not in it}
        return [
            have.get(idx)
            or StepRecord(idx, key, name, "pending", 0, None, None, {}, None, None, None, None)
            for idx, (key, name) in enumerate(self._plans[run_id])
        ]

    # --- recorded versions and facts -----------------------------------------------------
    def record_versions(self, stack: str, rows: list[VersionRecord]) -> None:
        expires = _n(int(time.time() + self.spec.ttl_days * 86400))
        items = []
        for r in rows:
            item: Item = {
                **_key(
                    _stack_pk(stack), f"VERSION#{r.server_id}#{stamp(r.recorded_at)}#{r.component}"
                ),
                "server_id": _s(r.server_id),
                "component": _s(r.component),
                "recorded_at": _n(r.recorded_at),
                "source": _s(r.source),
                TTL_ATTRIBUTE: expires,
            }
            if r.version is not None:
                item["version"] = _s(r.version)
            if r.run_id is not None:
                item["run_id"] = _s(r.run_id)
            items.append(item)
        self._batch_write(puts=items)

    def versions(
        self, stack: str, server_id: str, *, after: float, until: float
    ) -> list[VersionRecord]:
        lo = f"VERSION#{server_id}#{stamp(after)}"
        hi = f"VERSION#{server_id}#{stamp(until)}#\uffff"
        out = []
        for it in self._query(_stack_pk(stack), "", between=(lo, hi)):
            at = _num(it, "recorded_at") or 0.0
            if _str(it, "server_id") != server_id or not after < at <= until:
                continue
            out.append(
                VersionRecord(
                    server_id,
                    _str(it, "component") or "",
                    _str(it, "version"),
                    at,
                    _str(it, "source") or "audit",
                    _str(it, "run_id"),
                )
            )
        return sorted(out, key=lambda r: r.recorded_at)

    def record_facts(
        self,
        stack: str,
        facts: Mapping[str, dict[str, Any]],
        at: float,
        *,
        existing: list[str] | None = None,
    ) -> None:
        pk = _stack_pk(stack)
        puts = []
        for sid, f in facts.items():
            value, chunks = _pack(dumps(f))
            if value is None:
                raise StateTooLarge(
                    f"the facts of {sid} are too large to record ({len(chunks)} chunks)"
                )
            puts.append(
                {
                    **_key(pk, f"FACTS#{sid}"),
                    "server_id": _s(sid),
                    "recorded_at": _n(at),
                    "source": _s("audit"),
                    "facts": value,
                }
            )
        deletes = []
        if existing is not None:
            keep = set(existing)
            deletes = [
                _key(pk, it["sk"]["S"])
                for it in self._query(pk, "FACTS#")
                if _str(it, "server_id") not in keep
            ]
        self._batch_write(puts=puts, deletes=deletes)

    def audit_facts(self, stack: str) -> list[FactsRecord]:
        out = []
        for it in self._query(_stack_pk(stack), "FACTS#"):
            try:
                facts = _json(it, "facts", {})
            except ValueError:
                continue
            out.append(
                FactsRecord(
                    _str(it, "server_id") or "",
                    _num(it, "recorded_at") or 0.0,
                    _str(it, "source") or "audit",
                    facts or {},
                )
            )
        return out

    def verified_reports(self, stack: str, limit: int) -> Iterator[VerifiedReport]:
        pointers = self._query(_stack_pk(stack), "VERIFIED#", newest_first=True, limit=limit)
        page: list[Item] = []
        for pointer in pointers:
            page.append(pointer)
            if len(page) == 25:  # read the steps a page at a time: callers stop early
                yield from self._reports(page)
                page = []
        if page:
            yield from self._reports(page)

    def _reports(self, pointers: list[Item]) -> Iterator[VerifiedReport]:
        keys = [_key(_run_pk(_str(p, "run_id") or ""), _step_sk(_int(p, "idx"))) for p in pointers]
        steps = {(it["pk"]["S"], it["sk"]["S"]): it for it in self._batch_get(keys)}
        for p, k in zip(pointers, keys, strict=True):
            item = steps.get((k["pk"]["S"], k["sk"]["S"]))
            if item is None or _str(item, "state") != "done":
                continue
            chunks: dict[str, bytes] = {}
            if "outputs_chunks" in item:
                chunks = {
                    it["sk"]["S"]: bytes(it["data"]["B"])
                    for it in self._query(k["pk"]["S"], f"{k['sk']['S']}#outputs#")
                }
            try:
                reports = (_json(item, "outputs", chunks) or {}).get("reports", {})
            except (AttributeError, ValueError):
                continue
            run_id, ended_at = _str(p, "run_id") or "", _num(item, "ended_at") or 0.0
            for server_id, report in reports.items():
                yield run_id, ended_at, str(server_id), report or {}


# --------------------------------------------------------------------------------------
# `changeover state init`
# --------------------------------------------------------------------------------------


def create_table(spec: StateSpec, client: Any = None) -> dict[str, Any]:
    """Create the state table (on-demand billing, the key schema, TTL on `ttl`) and wait
    until it is active. An existing table with our key schema is fine; one with another
    is an error naming both."""
    store = DynamoStore(spec, client=client)
    created = False
    try:
        desc = store._api("describe_table")["Table"]
    except StateMissing:
        store._api(
            "create_table",
            KeySchema=KEY_SCHEMA,
            AttributeDefinitions=[
                {"AttributeName": "pk", "AttributeType": "S"},
                {"AttributeName": "sk", "AttributeType": "S"},
            ],
            BillingMode="PAY_PER_REQUEST",
        )
        created = True
    try:
        store.client.get_waiter("table_exists").wait(TableName=store.table, WaiterConfig=WAITER)
    except BotoCoreError as exc:
        raise StateUnavailable(f"{store.where} did not become active: {exc}") from None
    desc = store._api("describe_table")["Table"]
    keys = sorted((k["AttributeName"], k["KeyType"]) for k in desc.get("KeySchema", []))
    types = {a["AttributeName"]: a["AttributeType"] for a in desc.get("AttributeDefinitions", [])}
    if (
        keys != [("pk", "HASH"), ("sk", "RANGE")]
        or types.get("pk") != "S"
        or types.get("sk") != "S"
    ):
        have = ", ".join(f"{n} {t}" for n, t in keys) or "none"
        raise BadInput(
            f"state table {store.table} exists with another key schema ({have}); changeover "
            "needs pk (string, HASH) and sk (string, RANGE): name another table in `state`"
        )
    ttl = store._api("describe_time_to_live").get("TimeToLiveDescription", {})
    note = ""
    if ttl.get("TimeToLiveStatus") in ("ENABLED", "ENABLING"):
        if ttl.get("AttributeName") != TTL_ATTRIBUTE:
            note = (
                f"; TTL is on attribute {ttl.get('AttributeName')!r}, not {TTL_ATTRIBUTE!r}: "
                "finished runs will not expire"
            )
    else:
        store._api(
            "update_time_to_live",
            TimeToLiveSpecification={"Enabled": True, "AttributeName": TTL_ATTRIBUTE},
        )
    billing = desc.get("BillingModeSummary", {}).get("BillingMode", "PROVISIONED")
    verb = "created" if created else "already exists"
    return {
        "backend": "dynamodb",
        "table": store.table,
        "region": store.client.meta.region_name,
        "created": created,
        "billing": billing,
        "ttl_attribute": TTL_ATTRIBUTE,
        "ttl_days": spec.ttl_days,
        "message": f"state table {store.table} {verb} ({billing}, finished runs expire "
        f"after {spec.ttl_days} days){note}",
    }
