"""State-store fixtures: one factory per backend, so one contract suite runs on each.

- ``sqlite``: the state dir's database (a tmp dir);
- ``dynamodb-inprocess``: moto's DynamoDB in this process (``mock_aws``);
- ``dynamodb-server``: moto as a real HTTP server on 127.0.0.1 (a free port), the
  endpoint given in the state URL, as DynamoDB Local would be.

Each DynamoDB test gets a table of its own, made by `changeover state init`'s code.
"""

from __future__ import annotations

import contextlib
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws
from moto.server import ThreadedMotoServer

from orchestrator.state import StateSpec, StateStore, open_store
from orchestrator.state.dynamodb import DynamoStore, create_table
from orchestrator.state.sqlite import SqliteStore

REGION = "us-east-1"
BACKENDS = ["sqlite", "dynamodb-inprocess", "dynamodb-server"]


@dataclass
class Backend:
    """How to open stores on one backend, and how to read what it keeps raw."""

    name: str
    spec: StateSpec | None  # None: sqlite
    state_dir: Path
    opened: list[StateStore] = field(default_factory=list)  # closed at teardown

    def store(
        self,
        *,
        ttl: float = 30.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        host: str | None = None,
        pid: int | None = None,
    ) -> StateStore:
        """A store posing as `host`/`pid` when given (another machine, another process)."""
        store: StateStore
        if self.spec is None:
            store = SqliteStore(
                self.state_dir, ttl=ttl, clock=clock, sleep=sleep, host=host, pid=pid
            )
        else:
            store = DynamoStore(self.spec, ttl=ttl, clock=clock, sleep=sleep, host=host, pid=pid)
        self.opened.append(store)
        return store

    def close(self) -> None:
        for store in self.opened:
            store.close()

    def raw(self) -> bytes:
        """Everything the backend keeps, as bytes (compressed blobs inflated)."""
        if self.spec is None:
            return b"".join(f.read_bytes() for f in sorted(self.state_dir.glob("changeover.db*")))
        import zlib

        client = dynamodb_client(self.spec.endpoint_url)
        out = []
        for page in client.get_paginator("scan").paginate(TableName=self.spec.table):
            for item in page["Items"]:
                for value in item.values():
                    if "B" in value:
                        with contextlib.suppress(zlib.error):
                            out.append(zlib.decompress(value["B"]))
                    else:
                        out.append(repr(value).encode())
        return b"\n".join(out)


def dynamodb_client(endpoint_url: str | None) -> Any:
    """A plain client for the test's own reads (not counted, not the store's)."""
    return boto3.client("dynamodb", region_name=REGION, endpoint_url=endpoint_url)


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake credentials in boto3's chain, and nothing else of the caller's AWS set-up."""
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_DYNAMODB", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)


@pytest.fixture(scope="module")
def moto_server() -> Iterator[str]:
    """moto's HTTP server on 127.0.0.1 (a free port) for this module, stopped after."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    try:
        yield url
    finally:
        with contextlib.suppress(OSError):
            urllib.request.urlopen(
                urllib.request.Request(f"{url}/moto-api/reset", method="POST"), timeout=10
            ).close()
        server.stop()


def new_table() -> str:
    return f"changeover-test-{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=BACKENDS)
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, aws_credentials: None
) -> Iterator[Backend]:
    """Each backend in turn, empty, its table created as `state init` does."""
    name: str = request.param
    with contextlib.ExitStack() as stack:
        spec = None
        if name != "sqlite":
            endpoint = None
            if name == "dynamodb-inprocess":
                stack.enter_context(mock_aws())
            else:
                endpoint = request.getfixturevalue("moto_server")
            spec = StateSpec("dynamodb", new_table(), REGION, endpoint)
            create_table(spec)
        backend = Backend(name, spec, tmp_path / "state")
        try:
            yield backend
        finally:
            backend.close()


@pytest.fixture
def store(backend: Backend) -> StateStore:
    return backend.store()


def open_url(url: str, state_dir: Path) -> StateStore:
    """A store the way the CLI opens one, from a `state` URL."""
    return open_store(url, state_dir)
