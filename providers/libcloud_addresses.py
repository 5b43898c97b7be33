"""Movable addresses on libcloud: one small adapter per driver family.

libcloud has no common API for elastic or floating addresses, so each family gets an
adapter with the same four operations: find the address, say who holds it, move it to
a node, take it off. The provider picks the adapter from the driver name:

    family          drivers          how a move is made
    ec2             ec2              ex_associate_address_with_node; a VPC address that
                                     is associated elsewhere is disassociated first
    floating-do     digital_ocean    ex_attach_floating_ip_to_node (an assign action moves
                                     the IP from its old droplet in one call)
    floating-os     openstack        ex_attach_floating_ip_to_node (Neutron re-points the
                                     floating IP at the new node's port in one PUT)
    gce             gce              the instance's one-to-one NAT access config: off the
                                     old holder, the new node's ephemeral config off, the
                                     static address on
    equinix_metal   equinix_metal    assign to the new device, then unassign the old one
    load-balancer   any, configured  libcloud.loadbalancer members: attach new, then
                                     detach old (the only way for Linode, Vultr, Scaleway)

Holders are reported as references (node ids, names, self links or IPs); the provider
matches them to its own nodes and refuses to move an address off a node that is not the
stack's (I7). Every call runs under ``translated`` so retries and messages name the
driver.
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from typing import Any, Protocol

from orchestrator.errors import CapabilityError, PreconditionFailed, TransientError
from orchestrator.models import TAG_STACK
from providers.libcloud_errors import translated

# Address families by changeover driver name; drivers not listed have no movable address.
ADDRESS_FAMILIES = {
    "ec2": "ec2",
    "digital_ocean": "floating-do",
    "openstack": "floating-os",
    "gce": "gce",
    "equinix_metal": "equinix_metal",
}
GCE_NAT_NAME = "External NAT"  # the access config name GCE itself gives a NAT
GCE_NIC = "nic0"


class AddressAdapter(Protocol):
    """One address (or load balancer) of one stack, on one driver."""

    kind: str
    api: Counter[str]  # libcloud calls made, by method name
    refs_are_ids: bool  # holders() answers node ids (else names, links or IPs)

    @property
    def capacity(self) -> int | None:
        """Members it can hold: 1 for an address, None for a load balancer."""

    def holders(self) -> list[str]:
        """References to what the address routes to now (read back from the cloud)."""

    def host(self) -> str | None:
        """The address's IP, for probes through it."""

    def apply(self, targets: list[Any], current: list[Any]) -> None:
        """Make `targets` (libcloud nodes, already checked to be ours) the members.
        `current` are the stack's nodes that hold it now."""


class _Base:
    kind = "address"
    refs_are_ids = True

    @property
    def capacity(self) -> int | None:
        return 1

    def __init__(self, driver: Any, driver_name: str, address: str, stack: str) -> None:
        self.driver = driver
        self.driver_name = driver_name
        self.address = address
        self.stack = stack
        self.api: Counter[str] = Counter()  # libcloud calls made, by method name

    def _missing(self) -> PreconditionFailed:
        return PreconditionFailed(
            f"libcloud:{self.driver_name}: address {self.address!r} of stack {self.stack!r} "
            "was not found"
        )

    def _said_no(self, op: str) -> TransientError:
        # The call returned without an error but the cloud did not confirm it; the step
        # retries, and re-reads the holder first, so a late success is not repeated.
        return TransientError(f"libcloud:{self.driver_name} {op}: not confirmed by the cloud")


class Ec2ElasticIp(_Base):
    """An EC2 Elastic IP, named by its public IP or allocation id. It must carry the
    stack's ``changeover:stack`` tag before changeover will move it (I7)."""

    kind = "elastic-ip"

    def __init__(self, driver: Any, driver_name: str, address: str, stack: str) -> None:
        super().__init__(driver, driver_name, address, stack)
        self._owned_checked = False

    def _find(self) -> Any:
        with translated(self.driver_name, "describe_addresses", self.api):
            found = self.driver.ex_describe_all_addresses()
        for eip in found:
            if self.address in (eip.ip, (eip.extra or {}).get("allocation_id")):
                return eip
        raise self._missing()

    def _check_owned(self, eip: Any) -> None:
        if self._owned_checked:
            return
        allocation = (eip.extra or {}).get("allocation_id")
        if allocation:
            with translated(self.driver_name, "describe_tags", self.api):
                tags = self.driver.ex_describe_tags(SimpleNamespace(id=allocation))
            if tags.get(TAG_STACK) != self.stack:
                raise PreconditionFailed(
                    f"libcloud:{self.driver_name}: elastic IP {eip.ip} ({allocation}) is not "
                    f"tagged {TAG_STACK}={self.stack}; tag it to let changeover move it (I7)"
                )
        self._owned_checked = True

    def holders(self) -> list[str]:
        eip = self._find()
        return [eip.instance_id] if eip.instance_id else []

    def host(self) -> str | None:
        return str(self._find().ip)

    def apply(self, targets: list[Any], current: list[Any]) -> None:
        eip = self._find()
        self._check_owned(eip)
        domain = "vpc" if eip.domain == "vpc" else None
        target = targets[-1] if targets else None
        if target is not None and eip.instance_id == target.id:
            return
        if eip.instance_id and (target is None or domain == "vpc"):
            # A VPC address must be disassociated before it can be associated elsewhere
            # (libcloud cannot send AllowReassociation).
            with translated(self.driver_name, "disassociate_address", self.api):
                ok = self.driver.ex_disassociate_address(eip, domain=domain)
            if not ok:
                raise self._said_no("disassociate_address")
        if target is None:
            return
        with translated(self.driver_name, "associate_address", self.api):
            association = self.driver.ex_associate_address_with_node(target, eip, domain=domain)
        if domain == "vpc" and not association:
            raise self._said_no("associate_address")


class DigitalOceanFloatingIp(_Base):
    """A DigitalOcean floating (reserved) IP, named by its address."""

    kind = "floating-ip"

    def _find(self) -> Any:
        with translated(self.driver_name, "get_floating_ip", self.api):
            for fip in self.driver.ex_list_floating_ips():
                if fip.ip_address == self.address:
                    return fip
        raise self._missing()

    def holders(self) -> list[str]:
        fip = self._find()
        return [str(fip.node_id)] if fip.node_id is not None else []

    def host(self) -> str | None:
        return str(self._find().ip_address)

    def apply(self, targets: list[Any], current: list[Any]) -> None:
        fip = self._find()
        target = targets[-1] if targets else None
        if target is not None:
            if str(fip.node_id) == str(target.id):
                return
            # DigitalOcean's assign action moves the IP off its old droplet atomically.
            with translated(self.driver_name, "attach_floating_ip", self.api):
                ok = self.driver.ex_attach_floating_ip_to_node(target, fip)
            if not ok:
                raise self._said_no("attach_floating_ip")
        elif fip.node_id is not None:
            holder = current[0] if current else SimpleNamespace(id=fip.node_id)
            with translated(self.driver_name, "detach_floating_ip", self.api):
                ok = self.driver.ex_detach_floating_ip_from_node(holder, fip)
            if not ok:
                raise self._said_no("detach_floating_ip")


class OpenStackFloatingIp(_Base):
    """An OpenStack (Neutron) floating IP, named by its address or id."""

    kind = "floating-ip"

    def _find(self) -> Any:
        with translated(self.driver_name, "get_floating_ip", self.api):
            fip = self.driver.ex_get_floating_ip(self.address)
            if fip is None:
                fip = next(
                    (f for f in self.driver.ex_list_floating_ips() if f.id == self.address), None
                )
        if fip is None:
            raise self._missing()
        return fip

    def _holder(self, fip: Any) -> str | None:
        extra = fip.extra or {}
        details = extra.get("port_details") or {}
        if details.get("device_id"):
            return str(details["device_id"])
        port_id = extra.get("port_id")
        if not port_id:
            return None
        # Neutron before 13.0 has no port_details: look the port up.
        with translated(self.driver_name, "list_ports", self.api):
            for port in self.driver.ex_list_ports():
                if port.id == port_id:
                    return str(port.extra.get("device_id")) or None
        return None

    def holders(self) -> list[str]:
        holder = self._holder(self._find())
        return [holder] if holder else []

    def host(self) -> str | None:
        return str(self._find().ip_address)

    def apply(self, targets: list[Any], current: list[Any]) -> None:
        fip = self._find()
        target = targets[-1] if targets else None
        holder = self._holder(fip)
        if target is not None:
            if holder == str(target.id):
                return
            # One PUT re-points the floating IP at the new node's port.
            with translated(self.driver_name, "attach_floating_ip", self.api):
                ok = self.driver.ex_attach_floating_ip_to_node(target, fip)
            if not ok:
                raise self._said_no("attach_floating_ip")
        elif holder is not None:
            node = current[0] if current else SimpleNamespace(id=holder)
            with translated(self.driver_name, "detach_floating_ip", self.api):
                ok = self.driver.ex_detach_floating_ip_from_node(node, fip)
            if not ok:
                raise self._said_no("detach_floating_ip")


class GceStaticAddress(_Base):
    """A GCE static external address, named by its address name (region from config)."""

    kind = "static-address"
    refs_are_ids = False  # self links of instances

    def __init__(
        self, driver: Any, driver_name: str, address: str, stack: str, region: str | None
    ) -> None:
        super().__init__(driver, driver_name, address, stack)
        self.region = region

    def _find(self) -> Any:
        with translated(self.driver_name, "get_address", self.api):
            found = self.driver.ex_get_address(self.address, region=self.region)
        if found is None:
            raise self._missing()
        return found

    def holders(self) -> list[str]:
        return [str(u) for u in (self._find().extra or {}).get("users") or []]

    def host(self) -> str | None:
        return str(self._find().address)

    @staticmethod
    def _nat_configs(node: Any) -> list[str]:
        nics = (node.extra or {}).get("networkInterfaces") or []
        configs = nics[0].get("accessConfigs", []) if nics else []
        return [str(c.get("name", GCE_NAT_NAME)) for c in configs]

    def apply(self, targets: list[Any], current: list[Any]) -> None:
        addr = self._find()
        target = targets[-1] if targets else None
        users = set(self.holders())
        if target is not None and (target.extra or {}).get("selfLink") in users:
            return
        # An address can be on one instance only: off the old holder first.
        for node in current:
            for name in self._nat_configs(node):
                with translated(self.driver_name, "delete_access_config", self.api):
                    self.driver.ex_delete_access_config(node, name, GCE_NIC)
        if target is None:
            return
        for name in self._nat_configs(target):  # its ephemeral IP makes room
            with translated(self.driver_name, "delete_access_config", self.api):
                self.driver.ex_delete_access_config(target, name, GCE_NIC)
        with translated(self.driver_name, "add_access_config", self.api):
            self.driver.ex_add_access_config(
                target, GCE_NAT_NAME, GCE_NIC, nat_ip=addr.address, config_type="ONE_TO_ONE_NAT"
            )


class EquinixMetalAddress(_Base):
    """An Equinix Metal elastic IP, named by its address or reservation id."""

    kind = "elastic-ip"

    def __init__(
        self, driver: Any, driver_name: str, address: str, stack: str, project: str | None
    ) -> None:
        super().__init__(driver, driver_name, address, stack)
        self.project = project

    def _find(self) -> dict[str, Any]:
        with translated(self.driver_name, "describe_addresses", self.api):
            found = self.driver.ex_describe_all_addresses(ex_project_id=self.project)
        for ip in found:
            if self.address in (ip.get("address"), ip.get("id")):
                return dict(ip)
        raise self._missing()

    @staticmethod
    def _assignments(ip: dict[str, Any]) -> list[tuple[str, str]]:
        """(assignment id, device id) pairs."""
        out = []
        for a in ip.get("assignments") or []:
            device = str((a.get("assigned_to") or {}).get("href", "")).rsplit("/", 1)[-1]
            assignment = str(a.get("id") or str(a.get("href", "")).rsplit("/", 1)[-1])
            out.append((assignment, device))
        return out

    def holders(self) -> list[str]:
        return [device for _, device in self._assignments(self._find())]

    def host(self) -> str | None:
        return str(self._find().get("address"))

    def apply(self, targets: list[Any], current: list[Any]) -> None:
        ip = self._find()
        target = targets[-1] if targets else None
        assigned = self._assignments(ip)
        if target is not None and [d for _, d in assigned] == [str(target.id)]:
            return
        if target is not None and str(target.id) not in [d for _, d in assigned]:
            cidr = f"{ip.get('address')}/{ip.get('cidr', 32)}"
            with translated(self.driver_name, "associate_address", self.api):
                self.driver.ex_associate_address_with_node(target, cidr)
        for assignment, device in assigned:
            if target is None or device != str(target.id):
                with translated(self.driver_name, "disassociate_address", self.api):
                    self.driver.ex_disassociate_address(assignment)


class LoadBalancerMembers(_Base):
    """Members of a libcloud.loadbalancer balancer: any number, swapped add-first."""

    kind = "load-balancer"
    refs_are_ids = False  # member ids or IPs, depending on the balancer

    @property
    def capacity(self) -> int | None:
        return None

    def __init__(self, lb_driver: Any, driver_name: str, balancer_id: str, stack: str) -> None:
        super().__init__(lb_driver, driver_name, balancer_id, stack)

    def _balancer(self) -> Any:
        with translated(self.driver_name, "get_balancer", self.api):
            return self.driver.get_balancer(self.address)

    def _members(self) -> list[Any]:
        balancer = self._balancer()
        with translated(self.driver_name, "list_members", self.api):
            return list(self.driver.balancer_list_members(balancer))

    def holders(self) -> list[str]:
        # A member names its node by id (ELB) or by IP (most others); report both.
        return [str(m.id) if m.id else str(m.ip) for m in self._members()]

    def host(self) -> str | None:
        ip = self._balancer().ip
        return str(ip) if ip else None

    def apply(self, targets: list[Any], current: list[Any]) -> None:
        balancer = self._balancer()
        with translated(self.driver_name, "list_members", self.api):
            members = list(self.driver.balancer_list_members(balancer))

        def is_member(member: Any, node: Any) -> bool:
            ips = set(node.private_ips or []) | set(node.public_ips or [])
            return str(member.id) == str(node.id) or member.ip in ips

        # Add first, then remove: the balancer never has fewer healthy members than asked.
        for node in targets:
            if not any(is_member(m, node) for m in members):
                with translated(self.driver_name, "attach_member", self.api):
                    self.driver.balancer_attach_compute_node(balancer, node)
        for member in members:
            if not any(is_member(member, node) for node in targets):
                with translated(self.driver_name, "detach_member", self.api):
                    self.driver.balancer_detach_member(balancer, member)


def no_movable_address(driver_name: str, stack: str) -> CapabilityError:
    """The error for a driver with neither a movable address nor a configured balancer."""
    return CapabilityError(
        f"libcloud:{driver_name}",
        "a movable address (elastic or floating IP)",
        f"stack {stack!r} can only change over through a load balancer here: set "
        f"[stacks.{stack}.libcloud] load_balancer (and load_balancer_driver) and use "
        "`changeover rotate`",
    )
