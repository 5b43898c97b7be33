"""The provider contract: the one small Protocol every adapter implements.

A provider offers servers (tagged for ownership), an address (an elastic address or a
load-balancer target group: a set of members), and a data store on the data role.
Anything specific to one adapter stays outside this Protocol. A capability an adapter
lacks raises ``CapabilityError`` naming the provider and the capability.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Protocol, runtime_checkable

from orchestrator.models import DataSummary, HealthReport, Server
from orchestrator.settings import HealthCheck, HygienePolicy

# Operations that change the world. `plan` and --dry-run must never call one (I8).
MUTATING_OPS = frozenset(
    {
        "create_servers",
        "destroy_servers",
        "set_members",
        "data_copy",
        "data_set_mode",
    }
)


@runtime_checkable
class Provider(Protocol):
    """What the engine needs from a place where servers live."""

    name: str
    calls: Counter[str]

    # --- servers -------------------------------------------------------------------
    def list_servers(self, stack: str) -> list[Server]:
        """Every live (not terminated) server carrying the stack's ownership tag."""

    def describe_servers(self, stack: str, ids: list[str]) -> list[Server]:
        """The given servers, in one batched call. Unknown ids are left out."""

    def create_servers(
        self,
        *,
        stack: str,
        role: str,
        generation: int,
        run_id: str,
        count: int,
        image: str,
        size: str,
        idempotency_key: str,
        links: dict[str, str],
    ) -> list[Server]:
        """Create `count` servers, or return those already created with this key."""

    def destroy_servers(self, stack: str, ids: list[str]) -> list[str]:
        """Destroy the servers (only ours, I7); return the ids actually destroyed."""

    # --- health ----------------------------------------------------------------------
    def verify_server(
        self, server: Server, check: HealthCheck, policy: HygienePolicy
    ) -> HealthReport:
        """Run the health gate on one server: running, app health, host hygiene."""

    # --- address ---------------------------------------------------------------------
    def get_members(self, stack: str, address: str) -> list[str]:
        """Server ids the address routes to now, read back from the provider."""

    def set_members(self, stack: str, address: str, ids: list[str]) -> None:
        """Atomically make exactly `ids` the address's members."""

    def inflight(self, stack: str, address: str) -> dict[str, int]:
        """Requests in flight per member id, for draining."""

    def probe_address(self, stack: str, address: str, path: str) -> tuple[int, str | None]:
        """One request through the address: (status, id of the server that answered)."""

    # --- data --------------------------------------------------------------------------
    def data_summary(self, stack: str, server_id: str) -> DataSummary:
        """Count, highest id and checksum of the server's data."""

    def data_copy(self, stack: str, src_id: str, dst_id: str, after_id: int) -> int:
        """Copy rows with id > after_id from src to dst; return rows copied."""

    def data_mode(self, stack: str, server_id: str) -> dict[str, Any]:
        """The write mode of a data server: normal, hold (frozen) or forward."""

    def data_set_mode(
        self, stack: str, server_id: str, mode: str, forward_to: str | None = None
    ) -> dict[str, Any]:
        """Set the write mode. 'hold' returns once no write is in flight."""
