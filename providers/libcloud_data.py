"""The data role's store on libcloud: a block volume moved with snapshots.

The Provider's data phases map onto volumes like this:

    phase            what happens
    data_copy_live   snapshot the old server's data volume while it still takes writes
                     (on EBS this makes the final snapshot incremental, so it is short)
    data_freeze      run the role's ``freeze_command`` on the old server (over the
                     transport); the volume is tagged changeover:data-mode=frozen
    data_final_sync  snapshot the frozen volume, create a volume from it, attach it to
                     the new server at ``device``; the check is that the new volume was
                     made from that final snapshot and has the same size
    data_switch      run ``unfreeze_command`` on the new server; the old volume is
                     tagged switched, so writes reaching the old server stay held
    data_switch_back freeze the new server, snapshot its volume, swap a volume made from
                     it onto the old server, unfreeze the old server

State lives in tags on the volumes and snapshots themselves, so every phase checks
the cloud first and a resumed step repeats nothing. That needs tags on volumes and
snapshots, which libcloud offers for EC2 (``ex_create_tags``); other drivers raise a
CapabilityError naming the driver (use ``--no-migrate-data``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from libcloud.compute.drivers.ec2 import EC2NodeLocation, ExEC2AvailabilityZone

from orchestrator.errors import (
    CapabilityError,
    DataMismatch,
    PreconditionFailed,
    StepFailed,
    TransientError,
)
from orchestrator.models import TAG_RUN, TAG_STACK, DataSummary, Server
from orchestrator.settings import DataOptions
from providers.libcloud_errors import translated
from providers.transport import Transport

TAG_DATA_OF = "changeover:data-of"  # the server whose data the volume holds
TAG_DATA_MODE = "changeover:data-mode"  # normal | frozen | switched
TAG_SNAPSHOT = "changeover:snapshot"  # which phase made the snapshot, and for what
TAG_REPLACED = "changeover:replaced-by"  # an old volume swapped off by switch_back
DATA_DRIVERS = frozenset({"ec2"})  # drivers whose volumes and snapshots carry tags
COMMAND_TIMEOUT = 300.0  # seconds a freeze or unfreeze command may take
# libcloud's classes are unannotated; typed as Any once, here.
_EC2Location: Any = EC2NodeLocation
_EC2Zone: Any = ExEC2AvailabilityZone


class VolumeData:
    """Data phases on EC2-style volumes and snapshots, state kept in their tags."""

    def __init__(
        self,
        *,
        driver: Any,
        driver_name: str,
        stack: str,
        options: DataOptions,
        transport: Transport | None,
        node_of: Callable[[str], Any],
        server_of: Callable[[str], Server],
        api: Counter[str],
    ) -> None:
        self.driver = driver
        self.driver_name = driver_name
        self.stack = stack
        self.options = options
        self.transport = transport
        self.node_of = node_of
        self.server_of = server_of
        self.api = api

    # --- helpers ---------------------------------------------------------------------
    def _call(self, op: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with translated(self.driver_name, op, self.api):
            return fn(*args, **kwargs)

    def _tag(self, resource: Any, tags: dict[str, str]) -> None:
        if not self._call("create_tags", self.driver.ex_create_tags, resource, tags):
            raise TransientError(f"libcloud:{self.driver_name} create_tags: not confirmed")
        resource.extra.setdefault("tags", {}).update(tags)

    def _volumes(self, **filters: str) -> list[Any]:
        wanted = {f"tag:{TAG_STACK}": self.stack} | {f"tag:{k}": v for k, v in filters.items()}
        found = self._call("list_volumes", self.driver.list_volumes, ex_filters=wanted)
        return [v for v in found if v.extra.get("state") not in ("deleting", "deleted")]

    def volume_of(self, server_id: str) -> Any:
        """The data volume of a server: tagged for it, or ours and attached at `device`."""
        tagged = self._volumes(**{TAG_DATA_OF: server_id})
        if tagged:
            return tagged[0]
        node = self.node_of(server_id)
        attached = self._call("list_volumes", self.driver.list_volumes, node=node)
        for vol in attached:
            tags = vol.extra.get("tags") or {}
            if vol.extra.get("device") == self.options.device and tags.get(TAG_STACK) == self.stack:
                self._tag(vol, {TAG_DATA_OF: server_id})
                return vol
        raise PreconditionFailed(
            f"libcloud:{self.driver_name}: server {server_id} has no data volume (a volume "
            f"tagged {TAG_STACK}={self.stack} attached at {self.options.device})"
        )

    def _run_of(self, server_id: str) -> str:
        """The run that created a server: what a snapshot or volume made for it carries
        (I4: every resource a run creates carries the run id)."""
        return self.server_of(server_id).run

    def _snapshot(self, volume: Any, purpose: str, run: str) -> Any:
        """The snapshot made for `purpose`, made now if it does not exist yet."""
        snaps = self._call("list_snapshots", self.driver.list_snapshots, owner="self")
        for snap in snaps:
            tags = snap.extra.get("tags") or {}
            if tags.get(TAG_STACK) == self.stack and tags.get(TAG_SNAPSHOT) == purpose:
                return snap
        return self._call(
            "create_snapshot",
            self.driver.create_volume_snapshot,
            volume,
            name=f"changeover {self.stack} {purpose}",
            ex_metadata={TAG_STACK: self.stack, TAG_RUN: run, TAG_SNAPSHOT: purpose},
        )

    def _completed(self, snap: Any) -> None:
        state = str(snap.extra.get("state", ""))
        if state != "completed":
            raise TransientError(f"snapshot {snap.id} is {state or 'pending'}")

    def _run(self, server_id: str, command: str | None, what: str) -> None:
        if command is None:
            raise CapabilityError(
                f"libcloud:{self.driver_name}",
                f"a write {what} without a command",
                f"set roles.<data role>.data_options.{what}_command",
            )
        if self.transport is None:
            raise CapabilityError(
                f"libcloud:{self.driver_name}",
                f"running the {what} command without a transport",
                "configure hygiene.transport (ssh with known_hosts)",
            )
        result = self.transport.run(self.server_of(server_id), command, timeout=COMMAND_TIMEOUT)
        if not result.ok:
            raise StepFailed(
                f"{what} command on {server_id} exited {result.exit_status}: {result.stderr[:200]}"
            )

    def _volume_from(self, snap: Any, like: Any, server_id: str, purpose: str, run: str) -> Any:
        """A volume made from `snap` for `server_id` (found again by its tags)."""
        made = self._volumes(**{TAG_SNAPSHOT: purpose})
        if made:
            return made[0]
        zone = str(like.extra.get("zone"))
        region = getattr(self.driver, "region_name", "")
        location = _EC2Location(zone, zone, "", self.driver, _EC2Zone(zone, "available", region))
        vol = self._call(
            "create_volume",
            self.driver.create_volume,
            like.size,
            f"changeover-{self.stack}-data-{server_id}",
            location=location,
            snapshot=snap,
        )
        self._tag(vol, {TAG_STACK: self.stack, TAG_RUN: run, TAG_SNAPSHOT: purpose})
        return vol

    def _attach(self, vol: Any, server_id: str) -> None:
        if vol.extra.get("state") == "in-use":
            return
        if vol.extra.get("state") not in ("available", None):
            raise TransientError(f"volume {vol.id} is {vol.extra.get('state')}")
        node = self.node_of(server_id)
        self._call("attach_volume", self.driver.attach_volume, node, vol, self.options.device)

    # --- the phases ----------------------------------------------------------------------
    def mode(self, server_id: str) -> dict[str, Any]:
        tags = self.volume_of(server_id).extra.get("tags") or {}
        # Block storage has no writes in flight once the freeze command has returned.
        return {"mode": tags.get(TAG_DATA_MODE, "normal"), "inflight": 0}

    def copy_live(self, src_id: str, dst_id: str) -> dict[str, Any]:
        run = self._run_of(dst_id)
        snap = self._snapshot(self.volume_of(src_id), f"live:{src_id}->{dst_id}", run)
        return {"snapshot": snap.id}

    def freeze(self, src_id: str) -> dict[str, Any]:
        vol = self.volume_of(src_id)
        self._run(src_id, self.options.freeze_command, "freeze")
        self._tag(vol, {TAG_DATA_MODE: "frozen"})
        return {"mode": "frozen"}

    def unfreeze(self, src_id: str) -> dict[str, Any]:
        vol = self.volume_of(src_id)
        self._run(src_id, self.options.unfreeze_command, "unfreeze")
        self._tag(vol, {TAG_DATA_MODE: "normal"})
        return {"mode": "normal"}

    def final_sync(self, src_id: str, dst_id: str) -> DataSummary:
        src = self.volume_of(src_id)
        purpose = f"final:{src_id}->{dst_id}"
        run = self._run_of(dst_id)
        snap = self._snapshot(src, purpose, run)
        self._completed(snap)
        vol = self._volume_from(snap, src, dst_id, purpose, run)
        if not (vol.extra.get("tags") or {}).get(TAG_DATA_OF):
            self._tag(vol, {TAG_DATA_OF: dst_id})
        self._attach(vol, dst_id)
        made_from = vol.extra.get("snapshot_id")
        if made_from != snap.id or int(vol.size) != int(src.size):
            raise DataMismatch(
                f"final sync mismatch: new volume {vol.id} ({vol.size} GiB, from {made_from}) "
                f"is not the final snapshot {snap.id} of {src.id} ({src.size} GiB)"
            )
        return DataSummary(count=int(src.size), max_id=0, checksum=str(snap.id))

    def switch(self, src_id: str, dst_id: str) -> dict[str, Any]:
        src = self.volume_of(src_id)
        self._run(dst_id, self.options.unfreeze_command, "unfreeze")
        self._tag(src, {TAG_DATA_MODE: "switched"})
        return {"switched_to": dst_id}

    def switch_back(self, src_id: str, dst_id: str) -> dict[str, Any]:
        """Bring what the new server acknowledged back onto the old one, then unfreeze it."""
        dst = self.volume_of(dst_id)
        purpose = f"back:{dst_id}->{src_id}"
        made = self._volumes(**{TAG_SNAPSHOT: purpose})
        if not made:
            self._run(dst_id, self.options.freeze_command, "freeze")
        run = self._run_of(dst_id)
        snap = self._snapshot(dst, purpose, run)
        self._completed(snap)
        new = self._volume_from(snap, dst, src_id, purpose, run)
        old = self.volume_of(src_id)
        if old.id != new.id:
            if old.extra.get("state") == "in-use":
                self._call("detach_volume", self.driver.detach_volume, old)
            self._tag(old, {TAG_DATA_OF: f"replaced:{src_id}", TAG_REPLACED: new.id})
            self._tag(new, {TAG_DATA_OF: src_id, TAG_DATA_MODE: "frozen"})
        self._attach(new, src_id)
        self._run(src_id, self.options.unfreeze_command, "unfreeze")
        self._tag(new, {TAG_DATA_MODE: "normal"})
        return {"copied_back": snap.id, "volume": new.id}


def no_data_support(driver_name: str) -> CapabilityError:
    """The error for data phases on a driver whose volumes changeover cannot tag."""
    return CapabilityError(
        f"libcloud:{driver_name}",
        "data migration with volumes and snapshots",
        "changeover keeps data state in volume and snapshot tags, which libcloud offers "
        "for ec2 only; rebuild with --no-migrate-data",
    )
