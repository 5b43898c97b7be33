"""The local provider: the Provider Protocol over the embedded local cloud.

Every call is counted, written to the cloud's call journal (so tests can assert that
`plan` made no mutating call, I8, or that nothing was associated before verification),
and passes through the cloud's fault table (injected failures and latencies).
"""

from __future__ import annotations

import socket
import time
from collections import Counter
from typing import Any

from orchestrator.errors import (
    CapabilityError,
    ChangeoverError,
    DataMismatch,
    PreconditionFailed,
    ResourceGone,
    StepFailed,
    TransientError,
)
from orchestrator.models import DataSummary, HealthReport, Member, Server
from orchestrator.settings import HealthCheck, HygienePolicy
from providers.base import MUTATING_OPS
from providers.local.cloud import LocalCloud
from providers.local.http import HttpError, request

COPY_PAGE = 2000  # rows per page when copying data between db servers
VERIFY_PASSED = "verify_server.passed"  # call-journal entry: this server passed the gate


class InjectedFault(ChangeoverError):
    """A non-transient failure injected into a provider call."""


class LocalProvider:
    """Provider for stacks on the embedded local cloud."""

    name = "local"

    def __init__(self, cloud: LocalCloud) -> None:
        self.cloud = cloud
        self.calls: Counter[str] = Counter()

    @property
    def token(self) -> str:
        """The cloud's control token, sent to every control endpoint."""
        return self.cloud.control_token

    @property
    def api_calls(self) -> Counter[str]:
        return self.calls  # the local cloud's API is the Protocol itself

    # --- bookkeeping -----------------------------------------------------------------
    def _call(self, op: str, detail: str = "") -> None:
        """Count and journal a call, then apply injected faults for it."""
        self.calls[op] += 1
        self.cloud.record_call(op, op in MUTATING_OPS, detail)
        for fault in self.cloud.take_faults("latency", op):
            time.sleep(float(fault.get("seconds", 0.0)))
        for fault in self.cloud.take_faults("fail_call", op):
            message = f"injected failure of {op}"
            kind = fault.get("error", "transient")
            if kind == "transient":
                raise TransientError(message)
            if kind == "refused":
                # Like a cloud's 401/403 or an ownership check: the world says no.
                raise PreconditionFailed(f"injected refusal of {op}")
            raise InjectedFault(message)

    def _owned(self, stack: str, server_id: str) -> Server:
        row = self.cloud.server_row(server_id)
        if row is None or row["stack"] != stack:
            # I7: never touch what does not carry this stack's tag.
            raise PreconditionFailed(f"server {server_id} does not belong to stack {stack!r}")
        return self.cloud.to_server(row)

    def _port(self, stack: str, server_id: str) -> int:
        server = self._owned(stack, server_id)
        if server.port is None:
            if server.state in ("stopped", "terminated"):
                # A dead process does not come back by itself: never retry for minutes.
                raise ResourceGone(f"server {server_id} is {server.state}, not running")
            raise TransientError(f"server {server_id} is {server.state}, not running")
        return server.port

    # --- servers -----------------------------------------------------------------------
    def list_servers(self, stack: str) -> list[Server]:
        self._call("list_servers", stack)
        return [self.cloud.to_server(r) for r in self.cloud.server_rows(stack)]

    def describe_servers(self, stack: str, ids: list[str]) -> list[Server]:
        self._call("describe_servers", f"{stack}:{len(ids)}")
        wanted = set(ids)
        # Destroyed servers are described as terminated (not absent: absent means "not
        # visible yet", which a cloud answers right after a launch).
        rows = self.cloud.server_rows(stack, include_destroyed=True)
        return [self.cloud.to_server(r) for r in rows if r["id"] in wanted]

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
        del fresh  # the look-up by key below is local and free: always made
        self._call("create_servers", f"{stack}:{role}:{count}:{idempotency_key}")
        db_url = None
        if "db" in links:
            db_url = f"http://127.0.0.1:{self._port(stack, links['db'])}"
        # Like EC2's ClientToken: a resumed step finds what it already created.
        rows = [r for r in self.cloud.server_rows(stack) if r["idem_key"] == idempotency_key]
        ids = [r["id"] for r in rows]
        while len(ids) < count:
            spec: dict[str, Any] = {"image": image, "size": size, "db_url": db_url}
            for fault in self.cloud.take_faults("server", role=role):
                spec.update({k: v for k, v in fault.items() if k != "role"})
            ids.append(
                self.cloud.register_server(
                    stack=stack,
                    role=role,
                    generation=generation,
                    run=run_id,
                    idem_key=idempotency_key,
                    spec=spec,
                )
            )
        for server_id in ids:
            row = self.cloud.server_row(server_id)
            if row is not None and row["pid"] is None:
                self.cloud.boot_server(server_id)
        return [self.cloud.to_server(r) for r in map(self.cloud.server_row, ids) if r]

    def destroy_servers(self, stack: str, ids: list[str]) -> list[str]:
        self._call("destroy_servers", f"{stack}:{','.join(ids)}")
        done = []
        for server_id in ids:
            row = self.cloud.server_row(server_id)
            if row is None or row["stack"] != stack:
                raise PreconditionFailed(f"server {server_id} does not belong to stack {stack!r}")
            if not row["destroyed"]:
                self.cloud.destroy_server(server_id)
                done.append(server_id)
        return done

    # --- health ------------------------------------------------------------------------
    def verify_servers(
        self, servers: list[Server], checks: dict[str, HealthCheck], policy: HygienePolicy
    ) -> list[HealthReport]:
        return [self.verify_server(s, checks[s.role], policy) for s in servers]

    def verify_server(
        self, server: Server, check: HealthCheck, policy: HygienePolicy
    ) -> HealthReport:
        self._call("verify_server", server.id)
        current = self._owned(server.stack, server.id)
        report = HealthReport(current.id, current.state == "running", False, False)
        if current.port is None:
            report.reasons.append(f"server is {current.state}")
            return report
        if check.type == "http":
            try:
                request(current.port, "GET", check.path, timeout=check.timeout)
                report.app_ok = True
            except HttpError as exc:
                report.reasons.append(f"health check failed: {exc}")
        elif check.type == "tcp":
            try:
                socket.create_connection(("127.0.0.1", current.port), check.timeout).close()
                report.app_ok = True
            except OSError as exc:
                report.reasons.append(f"tcp check failed: {exc}")
        else:
            raise CapabilityError("local", f"health check type {check.type!r}", "use http or tcp")
        # Host hygiene: the same fact script, parsers and policy as on every provider
        # (orchestrator/hygiene.py), here answered by the simulated host. Imported here:
        # `changeover stacks` loads this provider but checks no host, and the audit
        # module imports much (tests/test_startup.py).
        from orchestrator.audit import check_hygiene, select_transport  # noqa: PLC0415

        try:
            facts, verdict = check_hygiene(select_transport(self, policy), current, policy)
        except ChangeoverError as exc:
            report.reasons.append(f"could not read host facts: {exc}")
            return report
        report.facts = facts.to_dict()
        report.hygiene_ok = verdict.ok
        report.reasons += verdict.reasons
        if report.passed:
            # The call journal keeps the verdict too, so a replay can tell a gate that
            # passed from one that was merely asked (tests/invariants.py, I1).
            self.cloud.record_call(VERIFY_PASSED, False, current.id)
        return report

    def pin_host_keys(
        self, stack: str, servers: list[Server], known: dict[str, list[str]]
    ) -> dict[str, list[str]]:
        """The local cloud's own transport is not SSH: there are no host keys to pin.
        (hygiene.transport = "ssh" here checks hygiene.ssh.known_hosts.)"""
        return {}

    # --- in-place upgrades ---------------------------------------------------------------
    def upgrade_packages(
        self, stack: str, server_id: str, *, security_only: bool, dist_upgrade: bool
    ) -> dict[str, Any]:
        """The simulated `apt-get upgrade` on the live server (providers/local/app.py)."""
        kind = ("security " if security_only else "") + (
            "dist-upgrade" if dist_upgrade else "upgrade"
        )
        self._call("upgrade_packages", f"{server_id}:{kind}")
        body = {"security_only": security_only, "dist_upgrade": dist_upgrade}
        return self._data_request(stack, server_id, "POST", "/admin/upgrade", body)

    def reboot_server(self, stack: str, server_id: str) -> None:
        """Restart the server's process on the same root: a reboot of the same host."""
        self._call("reboot_server", server_id)
        server = self._owned(stack, server_id)
        if server.state == "terminated":
            raise ResourceGone(f"server {server_id} is terminated")
        self.cloud.reboot_server(server_id)

    def boot_state(self, stack: str, server_id: str) -> dict[str, Any]:
        self._call("boot_state", server_id)
        facts = self._data_request(stack, server_id, "GET", "/facts")
        return {
            "boot_id": str(facts.get("boot_count")),
            "reboot_required": bool(facts.get("reboot_required")),
            "reboot_required_pkgs": list(facts.get("reboot_required_pkgs") or []),
        }

    # --- address ----------------------------------------------------------------------
    def _address(self, stack: str, address: str) -> Any:
        info = self.cloud.address(stack, address)
        if info is None and self.cloud.address_row(stack, address) is not None:
            # The proxy died or the machine restarted: bring it back on its stable port,
            # with its persisted members (first use starts what the local cloud needs).
            info = self.cloud.ensure_address(stack, address)
        if info is None:
            raise PreconditionFailed(
                f"address {address!r} of stack {stack!r} is not running; `changeover local up`"
            )
        return info

    def address_capacity(self, stack: str, address: str) -> int | None:
        return None  # the local address is a proxy: any number of members

    def get_members(self, stack: str, address: str) -> list[str]:
        self._call("get_members", address)
        info = self._address(stack, address)
        try:
            _, data, _ = request(info.control_port, "GET", "/members", token=self.token)
        except HttpError as exc:
            raise TransientError(str(exc)) from exc
        return [m["id"] for m in data.get("members", [])]

    def set_members(self, stack: str, address: str, ids: list[str]) -> None:
        self._call("set_members", f"{address}:{','.join(ids)}")
        info = self._address(stack, address)
        members = []
        for server_id in ids:
            port = self._port(stack, server_id)
            members.append(Member(server_id, "127.0.0.1", port).__dict__)
        try:
            request(info.control_port, "PUT", "/members", {"members": members}, token=self.token)
        except HttpError as exc:
            raise TransientError(str(exc)) from exc

    def inflight(self, stack: str, address: str) -> dict[str, int]:
        self._call("inflight", address)
        info = self._address(stack, address)
        try:
            _, data, _ = request(info.control_port, "GET", "/stats", token=self.token)
        except HttpError as exc:
            raise TransientError(str(exc)) from exc
        return {k: int(v) for k, v in data.get("inflight", {}).items()}

    def routes_to(self, stack: str, ids: list[str]) -> dict[str, list[str]]:
        """Every address (proxy) of the local cloud that has one of these as a member."""
        self._call("routes_to", ",".join(ids))
        want = set(ids)
        out: dict[str, list[str]] = {}
        for row in self.cloud.address_rows():
            # Another stack's proxy that is not running routes nothing; ours is restarted.
            if row["stack"] != stack and self.cloud.address(row["stack"], row["name"]) is None:
                continue
            for member in self.get_members(row["stack"], row["name"]):
                if member in want:
                    out.setdefault(member, []).append(row["name"])
        return out

    def refresh(self) -> None:
        """The local cloud's reads are cheap and never kept."""

    def probe_address(self, stack: str, address: str, path: str) -> tuple[int, str | None]:
        self._call("probe_address", address)
        info = self._address(stack, address)
        try:
            status, data, headers = request(info.port, "GET", path, ok=tuple(range(100, 600)))
        except HttpError as exc:
            return 0, str(exc)
        return status, headers.get("x-changeover-backend") or data.get("id")

    # --- data ---------------------------------------------------------------------------
    def _data_request(
        self, stack: str, server_id: str, method: str, path: str, body: Any = None
    ) -> dict[str, Any]:
        port = self._port(stack, server_id)
        try:
            return request(port, method, path, body, timeout=70.0, token=self.token)[1]
        except HttpError as exc:
            if exc.status is not None and exc.status < 500:
                raise StepFailed(str(exc)) from exc
            raise TransientError(str(exc)) from exc

    def data_summary(self, stack: str, server_id: str) -> DataSummary:
        self._call("data_summary", server_id)
        d = self._data_request(stack, server_id, "GET", "/db/summary")
        return DataSummary(int(d["count"]), int(d["max_id"] or 0), str(d["checksum"]))

    def _copy(self, stack: str, src_id: str, dst_id: str) -> int:
        """Copy rows the destination does not have yet (by id), a page at a time."""
        cursor = self.data_summary(stack, dst_id).max_id
        copied = 0
        while True:
            rows = self._data_request(
                stack, src_id, "GET", f"/db/dump?after={cursor}&limit={COPY_PAGE}"
            )["rows"]
            if not rows:
                return copied
            self._data_request(stack, dst_id, "POST", "/db/load", {"rows": rows})
            copied += len(rows)
            cursor = int(rows[-1][0])

    def check_data_moves(self, stack: str) -> None:
        return None  # every local db server can copy, hold and forward

    def data_mode(self, stack: str, server_id: str) -> dict[str, Any]:
        self._call("data_mode", server_id)
        d = self._data_request(stack, server_id, "GET", "/admin/mode")
        d["mode"] = _MODES.get(d.get("mode", ""), d.get("mode"))
        return d

    def data_copy_live(self, stack: str, src_id: str, dst_id: str) -> dict[str, Any]:
        self._call("data_copy_live", f"{src_id}->{dst_id}")
        return {"copied": self._copy(stack, src_id, dst_id)}

    def data_freeze(self, stack: str, src_id: str) -> dict[str, Any]:
        self._call("data_freeze", src_id)
        return self._data_request(stack, src_id, "POST", "/admin/freeze")

    def data_unfreeze(self, stack: str, src_id: str) -> dict[str, Any]:
        self._call("data_unfreeze", src_id)
        return self._data_request(stack, src_id, "POST", "/admin/unfreeze")

    def data_final_sync(self, stack: str, src_id: str, dst_id: str) -> DataSummary:
        self._call("data_final_sync", f"{src_id}->{dst_id}")
        self._copy(stack, src_id, dst_id)
        old = self.data_summary(stack, src_id)
        new = self.data_summary(stack, dst_id)
        if (old.count, old.checksum) != (new.count, new.checksum):
            raise DataMismatch(
                f"final sync mismatch: old has {old.count} rows ({old.checksum[:12]}), "
                f"new has {new.count} rows ({new.checksum[:12]})"
            )
        return new

    def data_switch(self, stack: str, src_id: str, dst_id: str) -> dict[str, Any]:
        self._call("data_switch", f"{src_id}->{dst_id}")
        url = f"http://127.0.0.1:{self._port(stack, dst_id)}"
        return self._data_request(stack, src_id, "POST", "/admin/forward", {"url": url})

    def data_switch_back(self, stack: str, src_id: str, dst_id: str) -> dict[str, Any]:
        """Make the old db (src) the one that takes writes again, losing none that the new
        db (dst) acknowledged, even one from a new web server still in flight.

        1. hold src and wait until no write is in flight there (forwarded ones included);
        2. hold dst and wait until nothing is in flight there (new web servers write to
           dst directly);
        3. copy back every row dst has that src lacks, then check row count and checksum
           (DataMismatch if they differ: both stay held, nothing is lost);
        4. make dst forward to src: a write that still reaches dst (held there, or late)
           lands on src, not on a db about to be destroyed;
        5. release src.

        Idempotent: re-run after a kill at any point, it reads the modes first. Once dst
        forwards to src, steps 2-4 are done (dst takes no write of its own any more).
        """
        self._call("data_switch_back", f"{src_id}<-{dst_id}")
        src_url = f"http://127.0.0.1:{self._port(stack, src_id)}"
        src_mode = self._data_request(stack, src_id, "GET", "/admin/mode")
        dst_mode = self._data_request(stack, dst_id, "GET", "/admin/mode")
        dst_done = dst_mode.get("mode") == "forward" and dst_mode.get("forward_url") == src_url
        if dst_done and src_mode.get("mode") == "normal":
            return {"copied_back": 0, "already": "switched back"}
        self._data_request(stack, src_id, "POST", "/admin/freeze")
        copied = 0
        if not dst_done:
            self._data_request(stack, dst_id, "POST", "/admin/freeze")
            copied = self._copy(stack, dst_id, src_id)
        old = self.data_summary(stack, src_id)
        new = self.data_summary(stack, dst_id)
        if (old.count, old.checksum) != (new.count, new.checksum):
            raise DataMismatch(
                f"switch-back mismatch: old has {old.count} rows ({old.checksum[:12]}), "
                f"new has {new.count} rows ({new.checksum[:12]}); writes stay held on both"
            )
        if not dst_done:
            self._data_request(stack, dst_id, "POST", "/admin/forward", {"url": src_url})
        self._data_request(stack, src_id, "POST", "/admin/unfreeze")
        return {"copied_back": copied, "rows": old.count, "checksum": old.checksum}


# The demo db's own words for its write modes, in the Protocol's terms.
_MODES = {"hold": "frozen", "forward": "switched", "normal": "normal"}
