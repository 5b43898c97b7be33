"""Client-side load generator that measures real downtime during a cutover.

The generator drives paced HTTP/1.1 traffic at a target (normally the elastic
address in front of a stack) from a few keep-alive connections while a rebuild
or rotation happens, and records every request as a :class:`Sample`.  It never
retries: a retry would hide exactly the failures a cutover must not cause, so a
request that raises, answers non-2xx, or returns an unexpected body is a
failure, full stop.  Writes are ``POST /items`` with unique payloads; only a
``201`` whose body echoes the payload with an integer id counts as an
acknowledged (durable) write, so callers can later check none was lost.

Only the standard library is used, so the generator can run beside the
orchestrator without pulling in an HTTP client whose pooling or retry logic
would blur the measurement.
"""

from __future__ import annotations

import http.client
import json
import math
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Literal

__all__ = ["LoadGenerator", "LoadResult", "Sample", "run_for"]

Kind = Literal["read", "write"]

BACKEND_HEADER = "X-Changeover-Backend"
DEFAULT_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Sample:
    """One request as the client saw it.

    ``t`` is when the request was sent, in monotonic seconds since the run
    started (add :attr:`LoadResult.started` for epoch time); ``latency`` is in
    seconds and covers connecting, sending and reading the whole body.
    """

    t: float
    latency: float
    ok: bool
    kind: Kind
    status: int | None
    backend: str | None
    error: str | None


def _percentile(ordered: list[float], pct: float) -> float:
    # Nearest-rank: always an observed value, so p99 of a short run is a real
    # request's latency rather than an interpolation between two.
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class LoadResult:
    """Everything a load run observed, plus summary figures.

    ``started`` and ``ended`` are ``time.time()`` epoch seconds so the run can
    be lined up with journal timestamps; ``ended`` is when the last worker
    finished, not when :meth:`LoadGenerator.stop` was called, so the achieved
    rate is not diluted by a late ``stop()``.
    """

    samples: list[Sample]
    acked_writes: dict[int, str]
    started: float
    ended: float
    target_rate: float = 0.0

    @property
    def sent(self) -> int:
        """Requests attempted (each exactly once)."""
        return len(self.samples)

    @property
    def ok(self) -> int:
        """Requests that succeeded."""
        return sum(1 for s in self.samples if s.ok)

    @property
    def failed(self) -> int:
        """Requests that failed for any reason."""
        return sum(1 for s in self.samples if not s.ok)

    @property
    def duration(self) -> float:
        """Wall-clock seconds from start to the last worker finishing."""
        return max(0.0, self.ended - self.started)

    @property
    def rate(self) -> float:
        """Achieved requests per second over the whole run."""
        return self.sent / self.duration if self.duration > 0 else 0.0

    @property
    def errors(self) -> Counter[str]:
        """How often each distinct error string occurred."""
        return Counter(s.error for s in self.samples if s.error is not None)

    def epoch(self, sample: Sample) -> float:
        """Epoch seconds at which ``sample`` was sent."""
        return self.started + sample.t

    def failure_times(self) -> list[float]:
        """Epoch send times of every failed request, in order."""
        return sorted(self.epoch(s) for s in self.samples if not s.ok)

    def latency_percentiles(
        self,
        *,
        window: tuple[float, float] | None = None,
        exclude: tuple[float, float] | None = None,
        ok_only: bool = False,
        kind: Kind | None = None,
    ) -> dict[str, float]:
        """Latency p50/p99/max in milliseconds, plus the sample count.

        ``window`` keeps samples sent inside ``[lo, hi]``; ``exclude`` drops
        samples sent inside ``[lo, hi]``; both are epoch seconds and may be
        combined.  ``kind`` keeps only reads or only writes.  Failures are
        included unless ``ok_only``, because a request that timed out is
        latency a real client suffered.  With no matching samples every figure
        is 0.0.
        """
        picked: list[float] = []
        for s in self.samples:
            if ok_only and not s.ok:
                continue
            if kind is not None and s.kind != kind:
                continue
            when = self.epoch(s)
            if window is not None and not window[0] <= when <= window[1]:
                continue
            if exclude is not None and exclude[0] <= when <= exclude[1]:
                continue
            picked.append(s.latency * 1000.0)
        if not picked:
            return {"count": 0.0, "p50": 0.0, "p99": 0.0, "max": 0.0}
        picked.sort()
        return {
            "count": float(len(picked)),
            "p50": _percentile(picked, 50),
            "p99": _percentile(picked, 99),
            "max": picked[-1],
        }

    def to_dict(self) -> dict[str, Any]:
        """Summary figures, JSON-ready; samples are left out to keep it small."""
        failures = self.failure_times()
        backends = Counter(s.backend for s in self.samples if s.ok and s.backend is not None)
        return {
            "started": self.started,
            "ended": self.ended,
            "duration": round(self.duration, 3),
            "target_rate": self.target_rate,
            "rate": round(self.rate, 2),
            "sent": self.sent,
            "ok": self.ok,
            "failed": self.failed,
            "reads": sum(1 for s in self.samples if s.kind == "read"),
            "writes": sum(1 for s in self.samples if s.kind == "write"),
            "acked_writes": len(self.acked_writes),
            "errors": dict(self.errors),
            "first_failure": failures[0] if failures else None,
            "last_failure": failures[-1] if failures else None,
            "backends": dict(backends),
            "latency_ms": {k: round(v, 3) for k, v in self.latency_percentiles().items()},
        }


class _BadResponse(Exception):
    """A response that arrived but is not what the API promises."""


class LoadGenerator:
    """Paced keep-alive HTTP load from a few worker threads, never retrying.

    Each of ``connections`` workers owns one ``HTTPConnection`` and sends at
    ``rate / connections`` requests per second on a monotonic schedule, so the
    total target is ``rate``.  The run ends at :meth:`stop`, after
    ``max_duration`` seconds, or after ``max_requests`` requests, whichever
    comes first; a request in flight at that moment is still bounded by
    ``timeout``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        rate: float = 250.0,
        connections: int = 4,
        write_ratio: float = 0.3,
        max_duration: float = 120.0,
        max_requests: int = 100_000,
        payload_prefix: str = "w",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        if connections < 1:
            raise ValueError("connections must be at least 1")
        if not 0.0 <= write_ratio <= 1.0:
            raise ValueError("write_ratio must be between 0 and 1")
        if max_duration <= 0:
            raise ValueError("max_duration must be positive")
        if max_requests < 1:
            raise ValueError("max_requests must be at least 1")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.host = host
        self.port = port
        self.rate = float(rate)
        self.connections = connections
        self.write_ratio = write_ratio
        self.max_duration = max_duration
        self.max_requests = max_requests
        self.timeout = timeout
        # A per-run token keeps payloads unique across runs against the same
        # database, so a lost-write check cannot match an older run's row.
        self.payload_prefix = f"{payload_prefix}-{uuid.uuid4().hex[:8]}"

        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._samples: list[Sample] = []
        self._acked: dict[int, str] = {}
        self._issued = 0
        self._threads: list[threading.Thread] = []
        self._finished_at: list[float] = []
        self._t0 = 0.0
        self._started = 0.0
        self._result: LoadResult | None = None

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Start the worker threads; returns immediately."""
        if self._threads:
            raise RuntimeError("load generator already started")
        self._started = time.time()
        self._t0 = time.monotonic()
        interval = self.connections / self.rate
        for i in range(self.connections):
            # Staggered first sends spread the workers across one interval
            # instead of firing all of them in the same instant.
            offset = i * interval / self.connections
            thread = threading.Thread(
                target=self._worker,
                args=(i, offset, interval),
                name=f"changeover-load-{i}",
                daemon=True,
            )
            self._threads.append(thread)
        for thread in self._threads:
            thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the workers to end on their own bounds; True if all did."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            thread.join(remaining)
        return not any(t.is_alive() for t in self._threads)

    def stop(self) -> LoadResult:
        """Stop sending, join the workers and return the result (idempotent)."""
        if self._result is not None:
            return self._result
        if not self._threads:
            raise RuntimeError("load generator was never started")
        self._stop.set()
        # An in-flight request is bounded by the socket timeout, so this join
        # is bounded too; a grace second covers connect plus read.
        self.wait(self.timeout + 1.0)
        with self._lock:
            samples = sorted(self._samples, key=lambda s: s.t)
            acked = dict(self._acked)
            finished = list(self._finished_at)
        # A worker still stuck past the join bound has not finished; "now" is
        # the honest end for it.
        all_done = len(finished) == len(self._threads)
        ended_mono = max(finished) if all_done else time.monotonic()
        self._result = LoadResult(
            samples=samples,
            acked_writes=acked,
            started=self._started,
            ended=self._started + (ended_mono - self._t0),
            target_rate=self.rate,
        )
        return self._result

    def __enter__(self) -> LoadGenerator:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def sent_so_far(self) -> int:
        """Requests completed so far, while the generator runs."""
        with self._lock:
            return len(self._samples)

    @property
    def result(self) -> LoadResult | None:
        """The result once :meth:`stop` has run, else None."""
        return self._result

    # -- workers -------------------------------------------------------------

    def _claim(self) -> bool:
        with self._lock:
            if self._issued >= self.max_requests:
                return False
            self._issued += 1
            return True

    def _record(self, sample: Sample, ack: tuple[int, str] | None = None) -> None:
        with self._lock:
            if ack is not None:
                item_id, payload = ack
                if item_id in self._acked:
                    # Two acks sharing an id means one write silently replaced
                    # another; overwriting the entry would hide that loss.
                    sample = replace(sample, ok=False, error="duplicate write id")
                else:
                    self._acked[item_id] = payload
            self._samples.append(sample)

    def _new_connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def _worker(self, index: int, offset: float, interval: float) -> None:
        deadline = self._t0 + self.max_duration
        due = self._t0 + offset
        conn = self._new_connection()
        sent = 0
        writes = 0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= deadline:
                    break
                if due > now:
                    # Waiting on the event lets stop() interrupt the pacing
                    # sleep; capping at the deadline keeps the bound honest.
                    if self._stop.wait(min(due, deadline) - now):
                        break
                    continue
                if not self._claim():
                    break
                # Deterministic interleave: exactly floor(n * ratio) writes in
                # the first n requests, so short runs still hit the ratio.
                is_write = math.floor((sent + 1) * self.write_ratio) > writes
                sent += 1
                if is_write:
                    writes += 1
                    payload = f"{self.payload_prefix}-{index}-{writes}"
                    healthy = self._one(conn, "write", payload)
                else:
                    healthy = self._one(conn, "read", None)
                if not healthy:
                    # The old socket is in an unknown state; the next request
                    # (not a retry of this one) gets a fresh connection.
                    conn.close()
                    conn = self._new_connection()
                due += interval
                now = time.monotonic()
                if due < now - interval:
                    # Fallen more than one interval behind (slow responses):
                    # drop the backlog so catching up is at most one extra
                    # request rather than a burst that would inflate the rate.
                    due = now
        finally:
            conn.close()
            with self._lock:
                self._finished_at.append(time.monotonic())

    def _one(self, conn: http.client.HTTPConnection, kind: Kind, payload: str | None) -> bool:
        """Send one request and record it; False if the connection is suspect."""
        t_send = time.monotonic()
        status: int | None = None
        backend: str | None = None
        ack: tuple[int, str] | None = None
        error: str | None = None
        healthy = True
        try:
            if kind == "write":
                body = json.dumps({"payload": payload}).encode()
                conn.request(
                    "POST",
                    "/items",
                    body=body,
                    headers={"Content-Type": "application/json"},
                )
            else:
                conn.request("GET", "/")
            resp = conn.getresponse()
            # Always drain the body: an unread body would poison the
            # keep-alive connection for the next request.
            raw = resp.read()
            status = resp.status
            backend = resp.getheader(BACKEND_HEADER)
            ack = _check(kind, status, raw, payload)
        except _BadResponse as exc:
            error = str(exc)
        except (OSError, http.client.HTTPException) as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            healthy = False
        except Exception as exc:  # a worker must never die silently mid-run
            error = f"{type(exc).__name__}: {exc}"
            healthy = False
        latency = time.monotonic() - t_send
        self._record(
            Sample(
                t=t_send - self._t0,
                latency=latency,
                ok=error is None,
                kind=kind,
                status=status,
                backend=backend,
                error=error,
            ),
            ack,
        )
        return healthy


def _check(kind: Kind, status: int, raw: bytes, payload: str | None) -> tuple[int, str] | None:
    """Validate a response; return the acknowledged write, or raise _BadResponse."""
    if not 200 <= status < 300:
        raise _BadResponse(f"HTTP {status}")
    expected = 201 if kind == "write" else 200
    if status != expected:
        raise _BadResponse(f"unexpected status {status}")
    try:
        body = json.loads(raw)
    except ValueError:
        raise _BadResponse("bad body: not JSON") from None
    if not isinstance(body, dict) or "id" not in body:
        raise _BadResponse("bad body: no id")
    if kind == "read":
        return None
    item_id = body["id"]
    # bool is an int subclass; a True id would be a server bug, not an ack.
    if not isinstance(item_id, int) or isinstance(item_id, bool):
        raise _BadResponse("bad body: id not an integer")
    if payload is None or body.get("payload") != payload:
        raise _BadResponse("bad body: payload mismatch")
    return item_id, payload


def run_for(host: str, port: int, seconds: float, **kw: Any) -> LoadResult:
    """Run a :class:`LoadGenerator` for ``seconds`` and return its result.

    ``max_duration`` defaults to ``seconds`` so the workers bound themselves
    too; the run ends early if ``max_requests`` is reached first.
    """
    kw.setdefault("max_duration", seconds)
    gen = LoadGenerator(host, port, **kw)
    gen.start()
    try:
        gen.wait(seconds)
    finally:
        result = gen.stop()
    return result
