"""Fixtures for the libcloud provider's tests: EC2 worlds on moto, in-process and over
HTTP on 127.0.0.1, each torn down with its test."""

from __future__ import annotations

import pytest

from tests.libcloud.world import Ec2World, make_world


@pytest.fixture(params=["in-process", "server"])
def ec2(request: pytest.FixtureRequest) -> Ec2World:
    """An EC2 world on moto: under mock_aws, and through a ThreadedMotoServer."""
    return make_world(request, server=request.param == "server")


@pytest.fixture
def ec2_local(request: pytest.FixtureRequest) -> Ec2World:
    """An EC2 world on moto under mock_aws only (for the longer end-to-end runs)."""
    return make_world(request, server=False)
