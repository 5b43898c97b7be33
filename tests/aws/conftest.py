"""AWS fixtures: moto in-process, and moto as a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator

import pytest
from moto import mock_aws
from moto.server import ThreadedMotoServer

from tests.aws.world import CREDS, AwsWorld


@pytest.fixture
def aws() -> Iterator[AwsWorld]:
    """moto in-process (mock_aws) with a world made in it."""
    with mock_aws():
        yield AwsWorld()


@pytest.fixture
def moto_endpoint() -> Iterator[str]:
    """A ThreadedMotoServer on 127.0.0.1 (a free port), stopped afterwards."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    _reset(url)  # moto's backends are process-global: start from an empty account
    try:
        yield url
    finally:
        _reset(url)
        server.stop()


def _reset(url: str) -> None:
    urllib.request.urlopen(
        urllib.request.Request(f"{url}/moto-api/reset", method="POST"), timeout=10
    ).close()


@pytest.fixture
def aws_server(moto_endpoint: str) -> AwsWorld:
    """A world made through the moto HTTP server (what a changeover subprocess sees)."""
    return AwsWorld(endpoint_url=moto_endpoint)


@pytest.fixture
def aws_env_vars() -> dict[str, str]:
    """Credentials for subprocesses, from the environment chain boto3 reads (I9)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CHANGEOVER_"))}
    env.update(
        {
            "AWS_ACCESS_KEY_ID": CREDS["aws_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": CREDS["aws_secret_access_key"],
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    return env
