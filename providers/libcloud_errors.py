"""libcloud's exceptions, sorted into changeover's error tree by what the engine does.

    libcloud raised                                    changeover raises
    RateLimitReachedError, HTTP 429                    TransientError (retried by the step)
    ServiceUnavailableError, any HTTP 5xx              TransientError
    EC2 throttling codes (RequestLimitExceeded ...)    TransientError
    socket / connection errors, timeouts               TransientError
    InvalidCredsError, HTTP 401/403                    PreconditionFailed (nothing to retry)
    anything else from the driver                      StepFailed (the run rolls back)

Every message names the driver (``libcloud:ec2 associate_address: ...``) so an operator
knows which cloud said no. Messages are the cloud's own words; libcloud never puts the
credentials into them, and neither do we (I9).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from libcloud.common.exceptions import BaseHTTPError
from libcloud.common.types import InvalidCredsError, LibcloudError, ProviderError
from requests.exceptions import ConnectionError as RequestsConnectionError
from requests.exceptions import Timeout as RequestsTimeout

from orchestrator.errors import (
    ChangeoverError,
    PreconditionFailed,
    StepFailed,
    TransientError,
)

# Error codes some clouds return with a 4xx status that still mean "try again later".
TRANSIENT_CODES = (
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "InternalError",
    "ServiceUnavailable",
    "Unavailable",
    "IncorrectInstanceState",  # EC2: the instance is still settling after a change
    "pending event",  # DigitalOcean: the droplet has an action in progress
)


class LibcloudStepFailed(StepFailed):
    """A libcloud driver refused an operation for good (a 4xx that retrying won't fix)."""


def classify(driver: str, op: str, exc: BaseException) -> ChangeoverError:
    """The changeover error for a libcloud exception raised by `op` on `driver`."""
    where = f"libcloud:{driver} {op}"
    text = str(exc) or type(exc).__name__
    if isinstance(exc, InvalidCredsError):
        return PreconditionFailed(f"{where}: credentials were rejected ({text})")
    status: int | None = None
    if isinstance(exc, BaseHTTPError):
        status = int(exc.code) if str(exc.code).isdigit() else None
    elif isinstance(exc, ProviderError):
        status = int(exc.http_code) if exc.http_code is not None else None
    if status in (401, 403):
        return PreconditionFailed(f"{where}: not allowed (HTTP {status}): {text}")
    if status is not None and (status == 429 or status >= 500):
        return TransientError(f"{where}: HTTP {status}: {text}")
    if any(code in text for code in TRANSIENT_CODES):
        return TransientError(f"{where}: {text}")
    if isinstance(exc, OSError):  # sockets, timeouts, refused connections
        return TransientError(f"{where}: {type(exc).__name__}: {text}")
    if _is_requests_transport_error(exc):
        return TransientError(f"{where}: {type(exc).__name__}: {text}")
    if isinstance(exc, (BaseHTTPError, LibcloudError)):
        suffix = f" (HTTP {status})" if status is not None else ""
        return LibcloudStepFailed(f"{where}{suffix}: {text}")
    return LibcloudStepFailed(f"{where}: {type(exc).__name__}: {text}")


def _is_requests_transport_error(exc: BaseException) -> bool:
    """requests' connection errors and timeouts (libcloud talks HTTP through requests)."""
    return isinstance(exc, (RequestsConnectionError, RequestsTimeout))


@contextmanager
def translated(driver: str, op: str, api: Counter[str] | None = None) -> Iterator[None]:
    """Run a driver call, counted in `api` under its libcloud name; re-raise what it
    throws as a changeover error naming the driver."""
    if api is not None:
        api[op] += 1
    try:
        yield
    except ChangeoverError:
        raise
    except Exception as exc:
        raise classify(driver, op, exc) from exc
