"""Log event names. Every structlog event changeover emits is one of these constants."""

from __future__ import annotations

RUN_STARTED = "run.started"
RUN_FINISHED = "run.finished"
RUN_RESUMED = "run.resumed"
RUN_PAUSED = "run.paused"  # a campaign stopped before a batch: its window closes first
RUN_ROLLBACK_STARTED = "run.rollback.started"
RUN_ROLLBACK_FINISHED = "run.rollback.finished"
RUN_DIRTY = "run.dirty"

STEP_STARTED = "step.started"
STEP_DONE = "step.done"
STEP_NOOP = "step.noop"
STEP_RETRY = "step.retry"
STEP_FAILED = "step.failed"
STEP_UNDO_STARTED = "step.undo.started"
STEP_UNDO_DONE = "step.undo.done"
STEP_UNDO_FAILED = "step.undo.failed"

LOCK_ACQUIRED = "lock.acquired"
LOCK_RELEASED = "lock.released"
LOCK_BROKEN = "lock.broken"
LOCK_TAKEN_OVER = "lock.taken_over"
LOCK_LOST = "lock.lost"
STEP_POINT_OF_NO_RETURN = "step.point_of_no_return"

CUTOVER_SKIPPED = "cutover.skipped"
CUTOVER_REFUSED = "cutover.refused"
DESTROY_REFUSED = "destroy.refused"
CUTOVER_DONE = "cutover.done"
BAKE_CHECK = "bake.check"
BAKE_FAILED = "bake.failed"
GATE_PASSED = "gate.passed"
GATE_FAILED = "gate.failed"  # an alarm gate failed (or could not be asked): the step fails
GATE_RETRY = "gate.retry"  # a gate could not be asked: asked again
CANARY_CHECK = "canary.check"
CANARY_FAILED = "canary.failed"
STOP_UNHEALTHY = "stop.unhealthy"  # new servers of the run fail, still within max-unhealthy
STOP_FIRED = "stop.fired"  # a stop condition fired: the run stops before creating more
VERIFY_FAILED = "verify.failed"
DATA_SYNCED = "data.synced"
DRAIN_WAIT = "drain.wait"
DRAIN_TIMED_OUT = "drain.timed_out"  # on_drain_timeout = "proceed": went on, requests cut
HOOK_STARTED = "hook.started"
HOOK_HELD = "hook.held"  # a webhook hook held (or did not answer): asked again
HOOK_PASSED = "hook.passed"
HOOK_FAILED = "hook.failed"
HOOK_OUTPUT = "hook.output"  # the tail of a command hook's output (debug)

PROVIDER_CALL = "provider.call"
PROVIDER_RETRY = "provider.retry"
LOCAL_STARTED = "local.started"
LOCAL_STOPPED = "local.stopped"
CRASH_INJECTED = "fault.crash_injected"

NOTIFY_SENT = "notify.sent"
NOTIFY_RETRY = "notify.retry"
NOTIFY_FAILED = "notify.failed"  # a webhook gave up (refused, or out of attempts)
NOTIFY_UNDELIVERED = "notify.undelivered"  # still queued when the process stopped waiting
