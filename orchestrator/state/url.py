"""The `state` setting: which store holds the journal, the leases and the versions.

- ``sqlite`` (the default): ``changeover.db`` in the state dir;
- ``dynamodb://TABLE?region=REGION``: a DynamoDB table shared by every machine that runs
  changeover for the same stacks. Options: ``region`` (else boto3's chain:
  ``AWS_REGION``/``AWS_DEFAULT_REGION``, the profile), ``endpoint_url`` (else boto3's
  chain, ``AWS_ENDPOINT_URL`` included: DynamoDB Local, moto), ``ttl_days`` (how long a
  finished run's items live before DynamoDB's TTL deletes them; default 365).

Credentials never go in the URL: boto3's usual chain provides them.
Parsing is pure (no boto3): the settings validate the value with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qsl, urlsplit

DEFAULT_STATE = "sqlite"
DEFAULT_TTL_DAYS = 365  # a finished run's journal items live this long on DynamoDB
USAGE = "use `sqlite` (the default) or `dynamodb://TABLE?region=REGION`"
OPTIONS = ("region", "endpoint_url", "ttl_days")

# DynamoDB's own rule for table names.
TABLE_PATTERN = re.compile(r"[A-Za-z0-9_.-]{3,255}")
REGION_PATTERN = re.compile(r"[a-z]{2}(-[a-z0-9]+)+-\d{1,2}")


@dataclass(frozen=True)
class StateSpec:
    """A parsed `state` setting."""

    backend: Literal["sqlite", "dynamodb"]
    table: str | None = None
    region: str | None = None
    endpoint_url: str | None = None
    ttl_days: int = DEFAULT_TTL_DAYS

    def describe(self) -> str:
        if self.backend == "sqlite":
            return "sqlite"
        where = f" in {self.region}" if self.region else ""
        return f"DynamoDB table {self.table}{where}"


def parse_state(value: str) -> StateSpec:
    """The spec of a `state` value, or ValueError with one line that never repeats the
    value itself (it may come from an environment variable)."""
    text = value.strip()
    if text in ("sqlite", "sqlite://"):
        return StateSpec("sqlite")
    try:
        parts = urlsplit(text)
    except ValueError:
        raise ValueError(f"not a state store URL: {USAGE}") from None
    if parts.scheme != "dynamodb":
        raise ValueError(f"not a state store URL: {USAGE}")
    if parts.path not in ("", "/") or parts.fragment or "@" in parts.netloc:
        raise ValueError(
            "a dynamodb state URL is `dynamodb://TABLE?region=REGION`, with nothing else "
            "(credentials come from boto3's chain, never from the URL)"
        )
    table = parts.netloc
    if not TABLE_PATTERN.fullmatch(table):
        raise ValueError("the DynamoDB table name must be 3-255 letters, digits, '_', '-' or '.'")
    options: dict[str, str] = {}
    for key, val in parse_qsl(parts.query, keep_blank_values=True):
        if key not in OPTIONS:
            name = repr(key) if re.fullmatch(r"[A-Za-z_]{1,32}", key) else "an option"
            raise ValueError(
                f"unknown option {name} in the state URL (known: {', '.join(OPTIONS)})"
            )
        if key in options:
            raise ValueError(f"option {key!r} given twice in the state URL")
        options[key] = val
    region = options.get("region")
    if region is not None and not REGION_PATTERN.fullmatch(region):
        raise ValueError("region: not an AWS region name (like eu-central-1)")
    endpoint = options.get("endpoint_url")
    if endpoint is not None:
        ep = urlsplit(endpoint)
        if ep.scheme not in ("http", "https") or not ep.hostname or ep.username or ep.password:
            raise ValueError("endpoint_url: an http:// or https:// URL without credentials")
    ttl_days = DEFAULT_TTL_DAYS
    if "ttl_days" in options:
        if not re.fullmatch(r"\d{1,5}", options["ttl_days"]) or int(options["ttl_days"]) < 1:
            raise ValueError("ttl_days: a whole number of days, at least 1")
        ttl_days = int(options["ttl_days"])
    return StateSpec("dynamodb", table, region, endpoint, ttl_days)
