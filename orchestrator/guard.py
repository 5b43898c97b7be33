"""The mutation guard: what stands between a run's steps and its provider.

Every mutating Protocol call (``providers.base.MUTATING_OPS``) passes through it:

- right before the call is sent, the run's lease is checked (I5): a holder whose lease
  was broken or taken over raises ``FencedError`` and makes no further mutation;
- the engine's ``before`` hook runs (it journals an irreversible step's point of no
  return before the call that crosses it);
- the testing hooks ``CHANGEOVER_CRASH_BEFORE_CALL=N`` / ``CHANGEOVER_CRASH_AFTER_CALL=N``
  SIGKILL the process right before the Nth mutating call is sent, or right after it
  returns, so tests can kill a run between two provider calls of one step.

Reads pass straight through. The guard counts the mutations it let through, which is how
the engine knows whether a refusal came before or after something was changed.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Callable
from typing import Any

from orchestrator import events
from orchestrator.errors import BadInput, PreconditionFailed
from orchestrator.log import get_logger
from providers.base import MUTATING_OPS


class MutationGuard:
    """Wraps a provider; checks the lease before, and counts, every mutating call."""

    def __init__(
        self,
        provider: Any,
        *,
        before: Callable[[str], None],
        crash_before_call: str | int | None = None,
        crash_after_call: str | int | None = None,
    ) -> None:
        self._provider = provider
        self._before = before
        self._crash_before = parse_call_spec(crash_before_call)
        self._crash_after = parse_call_spec(crash_after_call)
        self.sent: Counter[str] = Counter()  # mutating calls sent, by op and in all ("")
        self.mutations = 0  # of those, the ones that may have changed something

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._provider, name)
        if name not in MUTATING_OPS or not callable(attr):
            return attr

        def guarded(*args: Any, **kwargs: Any) -> Any:
            self._before(name)
            if self._hits(self._crash_before, name, ahead=1):
                _die(before_call=self.sent[""] + 1, op=name)
            self.sent[""] += 1
            self.sent[name] += 1
            try:
                result = attr(*args, **kwargs)
            except (PreconditionFailed, BadInput):
                raise  # the world refused: this call changed nothing
            except BaseException:
                self.mutations += 1  # it failed part-way, so it may have changed things
                raise
            else:
                self.mutations += 1
                return result
            finally:
                if self._hits(self._crash_after, name, ahead=0):
                    _die(after_call=self.sent[""], op=name)

        return guarded

    def _hits(self, spec: tuple[str, int] | None, op: str, *, ahead: int) -> bool:
        if spec is None or spec[0] not in ("", op):
            return False
        return self.sent[spec[0]] + ahead == spec[1]


def parse_call_spec(spec: str | int | None) -> tuple[str, int] | None:
    """`N` (the Nth mutating call), `OP` (the first call of OP) or `OP:N` (its Nth)."""
    if spec is None:
        return None
    text = str(spec)
    op, _, nth = text.partition(":")
    if op.isdigit() and not nth:
        op, nth = "", op
    if (op and op not in MUTATING_OPS) or not (nth or "1").isdigit() or int(nth or "1") < 1:
        raise BadInput(
            f"crash hook {text!r}: expected N, OP or OP:N with OP one of "
            + ", ".join(sorted(MUTATING_OPS))
        )
    return op, int(nth or "1")


def _die(**where: Any) -> None:
    """Die the way `kill -9` would: no cleanup, no journal write, no atexit."""
    get_logger().warning(events.CRASH_INJECTED, **where)
    os.kill(os.getpid(), signal.SIGKILL)
