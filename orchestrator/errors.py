"""Errors, split by what the engine does with them.

    ChangeoverError
    ├── BadInput              exit 2: bad config, flag or argument; nothing touched
    │   ├── ConfigError
    │   └── CapabilityError   a provider lacks what the stack needs
    ├── PreconditionFailed    exit 2: the world is not as a run needs it; nothing touched
    ├── LockedError           exit 4: another run holds the stack's lease
    ├── FencedError           our lease was taken over; stop at once, touch nothing more
    ├── TransientError        retried by the engine under the step's retry policy
    ├── Paused                a campaign's window closes before its next batch: exit 0,
    │                         the run waits (paused) for the same command in its window
    ├── StepFailed            a step gave up: the engine rolls the run back (exit 1)
    │   ├── ResourceGone      a server stopped or terminated, a resource gone: never retried
    │   ├── VerificationFailed
    │   ├── GuardRefused      a guarded step refused (for example an unverified cutover)
    │   └── DataMismatch      the final sync's checksum or row count disagreed
    └── DirtyError            a rollback step failed: an operator is needed (exit 3)

Steps raise these; the engine maps them to outcomes. Nothing else escapes a step: any
other exception is treated as StepFailed so the run still rolls back.
"""

from __future__ import annotations


class ChangeoverError(Exception):
    """Base of every error changeover raises on purpose."""

    exit_code = 3


class BadInput(ChangeoverError):
    """Bad configuration, flag or argument. Nothing was touched."""

    exit_code = 2


class ConfigError(BadInput):
    """The config file or a CHANGEOVER_* variable is wrong; the message names the key."""


class CapabilityError(BadInput):
    """A provider lacks a capability the stack needs."""

    def __init__(self, provider: str, capability: str, hint: str = "") -> None:
        self.provider = provider
        self.capability = capability
        msg = f"provider {provider!r} does not support {capability}"
        super().__init__(f"{msg}; {hint}" if hint else msg)


class PreconditionFailed(ChangeoverError):
    """The world is not in a state a run can start from. Nothing was touched."""

    exit_code = 2


class LockedError(ChangeoverError):
    """Another run holds the stack's lease."""

    exit_code = 4

    def __init__(
        self,
        stack: str,
        holder_run: str,
        expires_in: float,
        detail: str = "",
        advice: str | None = None,
    ) -> None:
        self.stack = stack
        self.holder_run = holder_run
        why = detail or f"lease expires in {max(expires_in, 0):.0f}s"
        advice = advice or (f"wait, or `changeover unlock {stack} --force` if that run is dead")
        super().__init__(f"stack {stack!r} is locked by run {holder_run} ({why}); {advice}")


class FencedError(ChangeoverError):
    """Our lease was broken or taken over; a newer holder owns the stack."""


class Paused(ChangeoverError):
    """A campaign stops cleanly before a batch: the maintenance window closes before the
    batch would end. Not a failure: the run is left `paused`, and the same command run
    again in the next window continues it."""

    exit_code = 0

    def __init__(
        self, message: str, *, next_window: str, window: str, marks: dict[str, object]
    ) -> None:
        super().__init__(message)
        self.next_window = next_window  # ISO 8601, in the window's time zone
        self.window = window  # the spec of the window that opens next
        self.marks = marks  # what the step measured, journaled for its next attempt


class TransientError(ChangeoverError):
    """A failure worth retrying: throttling, a 5xx, eventual consistency."""


class StepFailed(ChangeoverError):
    """A step gave up. The engine rolls the run back."""

    exit_code = 1


class ResourceGone(StepFailed):
    """A condition that cannot heal: a server stopped or terminated, a resource deleted.
    Never retried: waiting would not bring it back."""


class VerificationFailed(StepFailed):
    """A server or the address failed the health gate."""


class GuardRefused(StepFailed):
    """A guarded step refused to act, with its reason."""


class DataMismatch(StepFailed):
    """The final data sync did not match (checksum or row count)."""


class DirtyError(ChangeoverError):
    """Rollback itself failed; an operator is needed."""

    exit_code = 3
