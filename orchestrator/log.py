"""structlog set-up: readable on a terminal, JSON for machines, always on stderr.

Every event passes through :func:`redact_event` last before rendering (I9): fields with
secret-looking names at any depth, secrets inside any string, and exception texts.
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback
from collections.abc import MutableMapping
from types import TracebackType
from typing import Any, TextIO, cast

from orchestrator.redact import redact, redact_text, register_secrets_from_env

# structlog is imported when the first logger is made, not with this module: it loads
# rich, asyncio and more (about 0.1 s), which commands that never log (`status`,
# `stacks`) would pay at start-up. A configure() made before then is applied at that point.
_BOOKKEEPING = ("timestamp", "level")
_PENDING: list[tuple[str, int, bool]] = []  # (format, verbose, colors) not yet applied
_PENDING_LOCK = threading.Lock()


def redact_event(logger: Any, name: str, event: MutableMapping[str, Any]) -> dict[str, Any]:
    """A structlog processor: the event with every secret masked, its exception (if any)
    formatted to text and redacted. Runs for both renderers."""
    import structlog  # noqa: PLC0415 - loaded by now: this runs inside structlog

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
    tracebacks and the stdlib logging of libraries.

    structlog itself is configured now if it is already loaded, else by the first
    get_logger() (so a command that never logs never loads it)."""
    register_secrets_from_env()
    with _PENDING_LOCK:
        _PENDING[:] = [(log_format, verbose, sys.stderr.isatty())]
    if "structlog" in sys.modules:
        _apply_pending(deferred=False)
    handlers = [*logging.getLogger().handlers, logging.lastResort]
    for handler in handlers:
        if handler is not None and not any(
            isinstance(f, _RedactingFilter) for f in handler.filters
        ):
            handler.addFilter(_RedactingFilter())
    sys.excepthook = _excepthook


def _apply_pending(deferred: bool = True) -> None:
    """Give structlog the configuration the last configure() asked for, once. When
    deferred, structlog was not loaded at that configure(), so a configuration it has now
    was made later, and it stays, as it would have."""
    if not _PENDING:
        return
    import structlog  # noqa: PLC0415 - see _PENDING

    with _PENDING_LOCK:
        if not _PENDING:
            return
        log_format, verbose, colors = _PENDING[-1]
        if not (deferred and structlog.is_configured()):
            renderer: Any
            if log_format == "json":
                renderer = structlog.processors.JSONRenderer()
            else:
                renderer = structlog.dev.ConsoleRenderer(colors=colors)
            structlog.configure(
                processors=[
                    structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    redact_event,
                    renderer,
                ],
                wrapper_class=structlog.make_filtering_bound_logger(
                    logging.DEBUG if verbose > 0 else logging.INFO
                ),
                logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, _Stderr())),
                cache_logger_on_first_use=False,
            )
        # Cleared only now: a thread that finds nothing pending may log at once.
        _PENDING.clear()


def get_logger(**bind: Any) -> Any:
    """A bound structlog logger."""
    import structlog  # noqa: PLC0415 - see _PENDING

    _apply_pending()
    return structlog.get_logger().bind(**bind)
