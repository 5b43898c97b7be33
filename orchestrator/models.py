"""Domain objects shared by the engine, strategies and providers."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

# Ownership tags (PRODUCT.md): a provider finds a stack's servers by these, and never
# touches a resource without the stack's tag (I7).
TAG_STACK = "changeover:stack"
TAG_ROLE = "changeover:role"
TAG_GENERATION = "changeover:generation"
TAG_RUN = "changeover:run"
# The idempotency key a server was created under (EC2's ClientToken plays this part).
TAG_TOKEN = "changeover:token"
# The opt-out (like Karpenter's karpenter.sh/do-not-disrupt): set by the operator, never by
# changeover. A server carrying it is never selected by `rotate` or `upgrade`; any value
# but "false" counts, an empty one included (a bare tag).
TAG_DO_NOT_DISRUPT = "changeover:do-not-disrupt"

ServerState = Literal["pending", "running", "stopped", "terminated"]


@dataclass(frozen=True)
class Server:
    """One server as its provider describes it."""

    id: str
    stack: str
    role: str
    generation: int
    run: str
    state: ServerState
    host: str | None = None
    port: int | None = None
    created_at: float = 0.0
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def do_not_disrupt(self) -> bool:
        """Tagged `changeover:do-not-disrupt` (any value but "false"): opted out."""
        value = self.tags.get(TAG_DO_NOT_DISRUPT)
        return value is not None and value.strip().lower() != "false"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Member:
    """A server behind an address: what the address routes to."""

    id: str
    host: str
    port: int


@dataclass
class HealthReport:
    """The health gate's verdict on one server: running, app healthy, host hygiene."""

    server_id: str
    running: bool
    app_ok: bool
    hygiene_ok: bool
    reasons: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.running and self.app_ok and self.hygiene_ok

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return d


@dataclass(frozen=True)
class DataSummary:
    """Row count, highest id and checksum of a data store: what the final sync compares."""

    count: int
    max_id: int
    checksum: str
