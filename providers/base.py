"""The provider contract: the one small Protocol every adapter implements.

A provider offers servers (tagged for ownership), entry points (elastic addresses,
load-balancer target groups, floating IPs: each a set of members, named by `address` in
the calls below), and a data store on the data role.
Anything specific to one adapter stays outside this Protocol. A capability an adapter
lacks raises ``CapabilityError`` naming the provider and the capability.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Protocol, runtime_checkable

from orchestrator.errors import CapabilityError
from orchestrator.models import DataSummary, HealthReport, Server
from orchestrator.settings import HealthCheck, HygienePolicy

# Operations that change the world. `plan` and --dry-run must never call one (I8).
MUTATING_OPS = frozenset(
    {
        "create_servers",
        "destroy_servers",
        "set_members",
        # Optional, where a provider has them (aws target groups): add or remove some
        # members without waiting on the others (the steps fall back to set_members).
        "ex_add_members",
        "ex_remove_members",
        "data_copy_live",
        "data_freeze",
        "data_unfreeze",
        "data_final_sync",
        "data_switch",
        "data_switch_back",
        "upgrade_packages",
        "reboot_server",
    }
)


@runtime_checkable
class Provider(Protocol):
    """What the engine needs from a place where servers live."""

    name: str
    calls: Counter[str]  # Protocol operations, by name

    @property
    def api_calls(self) -> Counter[str]:
        """The underlying API's calls by operation (the cloud's own names)."""

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
        fresh: bool = False,
    ) -> list[Server]:
        """Create `count` servers, or return those already created with this key.
        `fresh`: no earlier attempt used this key, so nothing was created under it yet
        and the look-up may be skipped (API economy)."""

    def destroy_servers(self, stack: str, ids: list[str]) -> list[str]:
        """Destroy the servers (only ours, I7); return the ids actually destroyed."""

    # --- health ----------------------------------------------------------------------
    def verify_server(
        self, server: Server, check: HealthCheck, policy: HygienePolicy
    ) -> HealthReport:
        """Run the health gate on one server: running, app health, host hygiene."""

    def verify_servers(
        self, servers: list[Server], checks: dict[str, HealthCheck], policy: HygienePolicy
    ) -> list[HealthReport]:
        """The health gate for many servers (checks by role), batching what it can."""

    def pin_host_keys(
        self, stack: str, servers: list[Server], known: dict[str, list[str]]
    ) -> dict[str, list[str]]:
        """Pin the SSH host keys of `servers` before the first connection, for every
        later SSH use of this provider (hygiene, data hooks); return them by server id,
        as known_hosts key fields ("type base64"). Read-only. `known` holds pins
        recorded earlier (the journal): they are installed as they are and win. The
        others come from the provider (cloud-init prints them on the console). Raises
        TransientError while a server's keys cannot be pinned and no known_hosts file
        lists it. Never trusts on first use. A provider that does not reach its
        servers over SSH returns {}."""

    # --- in-place upgrades (`changeover upgrade`) -----------------------------------------
    def upgrade_packages(
        self, stack: str, server_id: str, *, security_only: bool, dist_upgrade: bool
    ) -> dict[str, Any]:
        """Upgrade the server's packages in place, non-interactively, keeping its config
        files: apt `upgrade` (or `dist-upgrade`), dnf `upgrade`; with `security_only`,
        from the security origins alone. Idempotent: a second call upgrades nothing.
        Returns {"upgraded": {name: {"from", "to"}}, "reboot_required": bool,
        "reboot_required_pkgs": [...], "boot_id": the boot it ran in}."""

    def reboot_server(self, stack: str, server_id: str) -> None:
        """Reboot the server; return once its old boot has ended (it may not be back
        yet: `boot_state` raises TransientError until it is)."""

    def boot_state(self, stack: str, server_id: str) -> dict[str, Any]:
        """Read-only: {"boot_id": changes on every boot, "reboot_required": bool,
        "reboot_required_pkgs": [...]}. TransientError while the server is not up."""

    # --- address ---------------------------------------------------------------------
    def address_capacity(self, stack: str, address: str) -> int | None:
        """How many members the address can hold: 1 for an elastic IP, None for no limit."""

    def get_members(self, stack: str, address: str) -> list[str]:
        """Server ids the address routes to now, read back from the provider."""

    def set_members(self, stack: str, address: str, ids: list[str]) -> None:
        """Atomically make exactly `ids` the address's members."""

    def inflight(self, stack: str, address: str) -> dict[str, int]:
        """Requests in flight per member id, for draining."""

    def probe_address(self, stack: str, address: str, path: str) -> tuple[int, str | None]:
        """One request through the address: (status, id of the server that answered)."""

    def routes_to(self, stack: str, ids: list[str]) -> dict[str, list[str]]:
        """The destroy guard's view (I2), read from the provider, batched: of these
        servers, those that still receive traffic, each with what routes to it (the
        stack's entry points, and any address the provider can find on it, even one the
        config does not know). Servers that serve nothing are left out."""

    def refresh(self) -> None:
        """Forget reads kept for reuse: the next read asks the provider again. The engine
        calls it before every attempt of a step (each poll) and after every wait."""

    # --- data ----------------------------------------------------------------------------
    # The data role's store moves in phases; each provider maps them onto what it has
    # (rows copied between db servers locally; EBS snapshots and volumes on AWS).
    # `data_mode` is what the steps check first, so every phase is idempotent.
    def check_data_moves(self, stack: str) -> None:
        """Raise CapabilityError now (at plan time) if the data role's store cannot be
        moved here, or is not configured to be; rebuild with --no-migrate-data then."""

    def data_mode(self, stack: str, server_id: str) -> dict[str, Any]:
        """{"mode": "normal" | "frozen" | "switched", "inflight": writes in flight}."""

    def data_copy_live(self, stack: str, src_id: str, dst_id: str) -> dict[str, Any]:
        """Copy while the source still takes writes, so the final sync is short."""

    def data_freeze(self, stack: str, src_id: str) -> dict[str, Any]:
        """Stop new writes from landing on the source; return once none is in flight.
        Writes that arrive meanwhile must be held, not refused."""

    def data_unfreeze(self, stack: str, src_id: str) -> dict[str, Any]:
        """Let the source take writes itself again."""

    def data_final_sync(self, stack: str, src_id: str, dst_id: str) -> DataSummary:
        """Under the freeze: bring the destination level with the source and check it
        (count and checksum). Raises DataMismatch if they differ (I3)."""

    def data_switch(self, stack: str, src_id: str, dst_id: str) -> dict[str, Any]:
        """From now on writes reaching the source land on the destination."""

    def data_switch_back(self, stack: str, src_id: str, dst_id: str) -> dict[str, Any]:
        """Undo data_switch: bring back to the source every write the destination
        acknowledged, then let the source take writes itself again."""


class NoInPlaceUpgrades:
    """For providers that replace servers but cannot upgrade them in place (yet): every
    upgrade call refuses with a CapabilityError, and `plan upgrade` asks first."""

    name: str

    def _no_upgrade(self) -> CapabilityError:
        return CapabilityError(
            self.name,
            "in-place upgrades (`changeover upgrade`)",
            "replace the servers instead: `changeover rotate` or `changeover rebuild`",
        )

    def ex_check_upgrades(self, stack: str) -> None:
        """`plan upgrade` asks here first: refuse at plan time, before any drain."""
        raise self._no_upgrade()

    def upgrade_packages(
        self, stack: str, server_id: str, *, security_only: bool, dist_upgrade: bool
    ) -> dict[str, Any]:
        raise self._no_upgrade()

    def reboot_server(self, stack: str, server_id: str) -> None:
        raise self._no_upgrade()

    def boot_state(self, stack: str, server_id: str) -> dict[str, Any]:
        raise self._no_upgrade()
