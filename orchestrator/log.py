"""structlog set-up: readable on a terminal, JSON for machines, always on stderr.

Every event passes through :func:`redact_event` last before rendering (I9): fields with
secret-looking names at any depth, secrets inside any string, and exception texts.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import MutableMapping
from types import TracebackType
from typing import Any, TextIO, cast

import structlog

from orchestrator.redact import redact, redact_text, register_secrets_from_env

_BOOKKEEPING = ("timestamp", "level")


def redact_event(logger: Any, name: str, event: MutableMapping[str, Any]) -> dict[str, Any]:
    """A structlog processor: the event with every secret masked, its exception (if any)
    formatted to text and redacted. Runs for both renderers."""
    if event.get("exc_info") or event.get("stack_info"):
        event = structlog.processors.format_exc_info(logger, name, event)
        event = structlog.processors.StackInfoRenderer()(logger, name, event)
    out: dict[str, Any] = {k: event[k] for k in _BOOKKEEPING if k in event}
    out.update(redact({k: v for k, v in event.items() if k not in out}, stringify=True))
    return out


class _RedactingFilter(logging.Filter):
    """Masks secrets in the stdlib log records of libraries (botocore, libcloud, paramiko)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact_text(record.getMessage())
        record.args = None
        if record.exc_info:
            record.exc_text = redact_text("".join(traceback.format_exception(*record.exc_info)))
            record.exc_info = None
        return True


def _excepthook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    """An uncaught exception's traceback, redacted, on stderr."""
    sys.stderr.write(redact_text("".join(traceback.format_exception(kind, exc, tb))))


class _Stderr:
    """Whatever sys.stderr is when a line is written: while a live progress line shows
    (orchestrator/progress.py) that is rich's proxy, which prints log lines above it."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(log_format: str = "console", verbose: int = 0) -> None:
    """Route structlog to stderr in the chosen format. Called once, by the CLI. Also
    registers the credential values of the environment for masking, and redacts
    tracebacks and the stdlib logging of libraries."""
    register_secrets_from_env()
    level = logging.DEBUG if verbose > 0 else logging.INFO
    renderer: Any
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_event,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, _Stderr())),
        cache_logger_on_first_use=False,
    )
    handlers = [*logging.getLogger().handlers, logging.lastResort]
    for handler in handlers:
        if handler is not None and not any(
            isinstance(f, _RedactingFilter) for f in handler.filters
        ):
            handler.addFilter(_RedactingFilter())
    sys.excepthook = _excepthook


def get_logger(**bind: Any) -> Any:
    """A bound structlog logger."""
    return structlog.get_logger().bind(**bind)
