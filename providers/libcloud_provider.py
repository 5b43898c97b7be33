"""The libcloud provider: the Provider Protocol over any apache-libcloud compute driver.

``provider = "libcloud:<driver>"`` (or ``"libcloud"`` with ``[stacks.X.libcloud] driver``)
picks a driver; the pieces that differ between clouds each live in their own module:

- ``libcloud_ownership``: where a driver keeps the ownership tags (I7);
- ``libcloud_addresses``: the movable address of each driver family, or load-balancer
  members for drivers without one;
- ``libcloud_data``: the data role's volume, moved with snapshots (EC2);
- ``libcloud_health``: app checks and address probes (injectable), hygiene over a
  ``providers.transport.Transport`` (libcloud's SSH client accepts any host key, I9);
- ``libcloud_errors``: libcloud's exceptions sorted into transient (the engine retries)
  and final, each naming the driver.

Servers use the NodeDriver calls ``create_node``, ``destroy_node``, ``list_nodes`` and
``wait_until_running``. Credentials come only from the environment or the credentials
file the config names; they are passed to the driver and nowhere else (I9).

This module imports libcloud; only ``orchestrator.cli.make_provider`` imports it, so
``changeover --help`` never loads libcloud.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from libcloud.compute.base import NodeImage, NodeLocation, NodeSize
from libcloud.compute.drivers.ec2 import EC2NetworkSubnet
from libcloud.compute.providers import get_driver as get_compute_driver
from libcloud.loadbalancer.providers import get_driver as get_lb_driver

from orchestrator import hygiene
from orchestrator.errors import (
    CapabilityError,
    ConfigError,
    PreconditionFailed,
    TransientError,
)
from orchestrator.models import (
    TAG_GENERATION,
    TAG_ROLE,
    TAG_RUN,
    TAG_STACK,
    TAG_TOKEN,
    DataSummary,
    HealthReport,
    Server,
    ServerState,
)
from orchestrator.redact import register_secret
from orchestrator.settings import (
    HealthCheck,
    HygienePolicy,
    LibcloudOptions,
    SecurityPolicy,
    StackConfig,
)
from providers.base import NoInPlaceUpgrades, Provider
from providers.cloudinit import first_boot_user_data
from providers.hostkeys import HostKeyPins
from providers.libcloud_addresses import (
    ADDRESS_FAMILIES,
    AddressAdapter,
    DigitalOceanFloatingIp,
    Ec2ElasticIp,
    EquinixMetalAddress,
    GceStaticAddress,
    LoadBalancerMembers,
    OpenStackFloatingIp,
    no_movable_address,
)
from providers.libcloud_data import DATA_DRIVERS, VolumeData, no_data_support
from providers.libcloud_errors import translated
from providers.libcloud_health import (
    AddressProbe,
    AddressTarget,
    HealthChecker,
    NetworkAddressProbe,
    NetworkHealthChecker,
)
from providers.libcloud_ownership import Ownership, OwnershipStyle, TokenRegistry, digest
from providers.transport import Transport

# EC2 instance states that are still alive (DescribeInstances keeps terminated ones a while).
EC2_LIVE_STATES = ["pending", "running", "shutting-down", "stopping", "stopped"]
# How often verify_server's wait_until_running re-lists a node that has no IP yet.
IP_POLL_SECONDS = 0.2
LINKS_FILE = "/etc/changeover/links.json"  # where a server finds the servers it depends on
# libcloud's factories and classes are unannotated; typed as Any once, here.
_compute_driver: Any = get_compute_driver
_lb_driver: Any = get_lb_driver
_EC2Subnet: Any = EC2NetworkSubnet


@dataclass(frozen=True)
class DriverSpec:
    """What changeover knows about one libcloud compute driver."""

    name: str  # changeover's name: ec2, digital_ocean, ...
    libcloud: str  # libcloud.compute.types.Provider value
    ownership: OwnershipStyle
    # Credential arguments of the driver constructor -> environment variables, first wins.
    credentials: tuple[tuple[str, tuple[str, ...]], ...]
    tested: str = "not tested against an API"


DRIVERS: dict[str, DriverSpec] = {
    "ec2": DriverSpec(
        "ec2",
        "ec2",
        "tags",
        (
            ("key", ("AWS_ACCESS_KEY_ID",)),
            ("secret", ("AWS_SECRET_ACCESS_KEY",)),
            ("token", ("AWS_SESSION_TOKEN",)),
        ),
    ),
    "digital_ocean": DriverSpec(
        "digital_ocean",
        "digitalocean",
        "string-tags",
        (("key", ("DIGITALOCEAN_ACCESS_TOKEN", "DIGITALOCEAN_TOKEN")),),
    ),
    "openstack": DriverSpec(
        "openstack",
        "openstack",
        "metadata",
        (("key", ("OS_USERNAME",)), ("secret", ("OS_PASSWORD",))),
    ),
    "gce": DriverSpec(
        "gce",
        "gce",
        "gce-metadata",
        (("user_id", ("GCE_SERVICE_ACCOUNT",)), ("key", ("GOOGLE_APPLICATION_CREDENTIALS",))),
    ),
    "equinix_metal": DriverSpec(
        "equinix_metal", "equinixmetal", "description", (("key", ("METAL_AUTH_TOKEN",)),)
    ),
    "linode": DriverSpec("linode", "linode", "name", (("key", ("LINODE_TOKEN",)),)),
    "vultr": DriverSpec("vultr", "vultr", "name", (("key", ("VULTR_API_KEY",)),)),
    "scaleway": DriverSpec(
        "scaleway",
        "scaleway",
        "name",
        (("key", ("SCW_ACCESS_KEY",)), ("secret", ("SCW_SECRET_KEY",))),
    ),
}
ALIASES = {"digitalocean": "digital_ocean", "equinixmetal": "equinix_metal", "aws": "ec2"}
# Every driver also takes these, for drivers changeover has no table entry for.
GENERIC_CREDENTIALS = (("key", ("LIBCLOUD_KEY",)), ("secret", ("LIBCLOUD_SECRET",)))


# --- configuration: driver, credentials, construction -------------------------------------
def driver_name(stack: str, config: StackConfig) -> str:
    """`libcloud:ec2`, or `libcloud` with [stacks.X.libcloud] driver; they must agree."""
    _, _, from_provider = config.provider.partition(":")
    from_table = config.libcloud.driver if config.libcloud else ""
    if from_provider and from_table and _canon(from_provider) != _canon(from_table):
        raise ConfigError(
            f"stacks.{stack}: provider {config.provider!r} and libcloud.driver "
            f"{from_table!r} disagree"
        )
    name = from_provider or from_table
    if not name:
        raise ConfigError(
            f"stacks.{stack}.libcloud.driver: required with provider = 'libcloud' "
            "(or write provider = 'libcloud:<driver>')"
        )
    return _canon(name)


def _canon(name: str) -> str:
    name = name.strip().lower().replace("-", "_")
    return ALIASES.get(name, name)


def spec_for(name: str) -> DriverSpec:
    """The table entry of a driver; unknown drivers fall back to name-based ownership."""
    name = _canon(name)
    return DRIVERS.get(name) or DriverSpec(name, name, "name", ())


def load_credentials(
    spec: DriverSpec, options: LibcloudOptions, environ: Mapping[str, str]
) -> dict[str, str]:
    """Credential arguments from the credentials file, then the environment (which wins).

    The values go to the driver constructor and nowhere else: not to logs, not to
    errors, not to the journal (I9).
    """
    creds: dict[str, str] = {}
    if options.credentials_file:
        path = Path(options.credentials_file).expanduser()
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(
                f"libcloud.credentials_file {str(path)!r}: cannot read it ({exc.strerror})"
            ) from None
        except tomllib.TOMLDecodeError:
            raise ConfigError(
                f"libcloud.credentials_file {str(path)!r}: not valid TOML"
            ) from None  # the decoder's message can quote the file: keep it out (I9)
        creds.update({str(k): str(v) for k, v in data.items()})
    for arg, names in (*spec.credentials, *GENERIC_CREDENTIALS):
        for env_name in names:
            if environ.get(env_name):
                creds[arg] = environ[env_name]
                break
    register_secret(*creds.values())  # masked wherever they turn up (I9)
    return creds


def _point_at(driver: Any, url: str) -> None:
    """Send the driver's requests to `url` (a compatible or local endpoint). Set on the
    connection itself: some drivers' constructors drop host and port."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"endpoint_url {url!r}: expected http(s)://host[:port]")
    conn = driver.connection
    conn.host = parts.hostname
    conn.secure = 1 if parts.scheme == "https" else 0
    conn.port = parts.port or (443 if conn.secure else 80)
    if parts.path not in ("", "/"):
        conn.request_path = parts.path.rstrip("/")
    conn.connection = None  # reconnect to the new endpoint on the next request


def build_driver(spec: DriverSpec, config: StackConfig, creds: dict[str, str]) -> Any:
    """Construct the libcloud compute driver from config arguments and credentials."""
    options = config.libcloud or LibcloudOptions(driver=spec.name)
    try:
        cls = _compute_driver(spec.libcloud)
    except AttributeError:
        raise ConfigError(
            f"libcloud.driver {spec.name!r}: libcloud has no such compute driver"
        ) from None
    kwargs: dict[str, Any] = dict(options.driver_args)
    kwargs.update(creds)
    if spec.name == "ec2":
        kwargs.setdefault("region", config.region or "us-east-1")
        # libcloud still defaults to SigV2 in old regions; AWS has deprecated it.
        kwargs.setdefault("signature_version", "4")
    if spec.name == "openstack":
        # libcloud defaults to the 1.1 compute API and Keystone 1.1; Neutron floating IPs
        # need the 2.x driver, and every cloud still running speaks Keystone v3.
        kwargs.setdefault("api_version", "2.0")
        kwargs.setdefault("ex_force_auth_version", "3.x_password")
    if "key" not in kwargs and "user_id" not in kwargs:
        names = [n for _, envs in spec.credentials for n in envs] or ["LIBCLOUD_KEY"]
        raise ConfigError(
            f"libcloud:{spec.name}: no credentials; set {' / '.join(names)} in the "
            "environment or name a libcloud.credentials_file"
        )
    try:
        driver = cls(**kwargs)
    except TypeError as exc:  # an argument the driver does not take; names only, no values
        raise ConfigError(f"libcloud:{spec.name} driver arguments: {exc}") from None
    if config.endpoint_url:
        _point_at(driver, config.endpoint_url)
    return driver


def build_lb_driver(options: LibcloudOptions, creds: dict[str, str], region: str | None) -> Any:
    """The libcloud.loadbalancer driver of a configured balancer."""
    name = options.load_balancer_driver or options.driver
    try:
        cls = _lb_driver(name)
    except AttributeError:
        raise ConfigError(
            f"libcloud.load_balancer_driver {name!r}: libcloud has no such loadbalancer driver"
        ) from None
    kwargs: dict[str, Any] = dict(options.load_balancer_args) | creds
    if region and name in ("elb", "alb"):
        kwargs.setdefault("region", region)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"libcloud load balancer {name!r} arguments: {exc}") from None


def _auto_transport(stack: str, config: StackConfig) -> Transport | None:
    """SSH with verified host keys (providers.ssh), if paramiko is installed."""
    if config.hygiene.transport not in ("auto", "ssh"):
        raise CapabilityError(
            "libcloud",
            f"hygiene.transport = {config.hygiene.transport!r}",
            "libcloud servers are reached over ssh",
        )
    try:
        # Lazy: paramiko is the optional ssh extra; without it hygiene needs a transport.
        from providers.ssh import SshTransport  # noqa: PLC0415
    except ImportError:
        return None
    return SshTransport(config.hygiene.ssh)


def make_libcloud_provider(
    name: str,
    config: StackConfig,
    *,
    state_dir: Path,
    environ: Mapping[str, str] | None = None,
    driver: Any = None,
    lb_driver: Any = None,
    transport: Transport | None = None,
    auto_transport: bool = True,
    checker: HealthChecker | None = None,
    probe: AddressProbe | None = None,
) -> Provider:
    """The provider for stack `name`. Checks every capability the stack needs first, so
    `plan` and every command fail with exit 2, touching nothing, when one is missing.

    `driver`, `lb_driver`, `transport`, `checker` and `probe` are for callers that build
    their own (tests, embedding); the CLI passes none of them. Without a `transport`,
    the SSH one (verified host keys) is used if installed, unless `auto_transport` is off.
    """
    dname = driver_name(name, config)
    spec = spec_for(dname)
    options = config.libcloud or LibcloudOptions(driver=dname)
    family = ADDRESS_FAMILIES.get(dname)
    balanced = bool(options.load_balancer) or any(
        ep.type == "load-balancer" for ep in config.entry_points
    )
    if family is None and not balanced:
        raise no_movable_address(dname, name)
    if transport is None and auto_transport:
        transport = _auto_transport(name, config)
    if transport is None and config.hygiene.pending != "ignore":
        raise _no_transport(dname)
    registry = TokenRegistry(state_dir / "libcloud" / f"{dname}-tokens.json")
    ownership = Ownership(spec.ownership, registry)
    ownership.check_names(name, list(config.roles))
    creds: dict[str, str] = {}
    if driver is None or (balanced and lb_driver is None):
        creds = load_credentials(spec, options, os.environ if environ is None else environ)
    if driver is None:
        driver = build_driver(spec, config, creds)
    lb: Any = None
    addresses: dict[str, AddressAdapter] = {}
    for ep in config.entry_points:
        # `address` with [libcloud] load_balancer set: the load balancer is the entry point.
        balancer = ep.name if ep.type == "load-balancer" else None
        if config.address is not None and options.load_balancer:
            balancer = options.load_balancer
        if balancer is not None:
            if lb is None:
                lb = lb_driver or build_lb_driver(options, creds, config.region)
            addresses[ep.name] = LoadBalancerMembers(lb, dname, balancer, name)
        elif family is None:
            raise no_movable_address(dname, name)
        else:
            addresses[ep.name] = _address_adapter(
                family, driver, dname, address=ep.name, stack=name, config=config
            )
    return LibcloudProvider(
        stack=name,
        config=config,
        spec=spec,
        driver=driver,
        addresses=addresses,
        ownership=ownership,
        transport=transport,
        checker=checker or NetworkHealthChecker(),
        probe=probe or NetworkAddressProbe(),
    )


def _address_adapter(
    family: str, driver: Any, dname: str, *, address: str, stack: str, config: StackConfig
) -> AddressAdapter:
    """The adapter for one movable address of the driver's family."""
    if family == "ec2":
        return Ec2ElasticIp(driver, dname, address, stack)
    if family == "floating-do":
        return DigitalOceanFloatingIp(driver, dname, address, stack)
    if family == "floating-os":
        return OpenStackFloatingIp(driver, dname, address, stack)
    if family == "gce":
        return GceStaticAddress(driver, dname, address, stack, config.region)
    project = (config.libcloud.driver_args if config.libcloud else {}).get("project")
    return EquinixMetalAddress(
        driver, dname, address, stack, None if project is None else str(project)
    )


def _no_transport(dname: str) -> CapabilityError:
    return CapabilityError(
        f"libcloud:{dname}",
        "host hygiene checks without a transport",
        "libcloud's own SSH client accepts any host key, so changeover never uses it: "
        "configure hygiene.transport = 'ssh' with hygiene.ssh.known_hosts, or set "
        "hygiene.pending = 'ignore' to gate on app health alone",
    )


# --- user data ---------------------------------------------------------------------------
def user_data(
    links: dict[str, dict[str, str | None]],
    extra: str | None,
    security: SecurityPolicy | None = None,
) -> str:
    """First-boot cloud-init (providers.cloudinit: upgrade, reboot if required, the
    stack's security policy, ready signal), plus a file naming the servers this one links
    to (its db). The links file is written when the role's own user data is empty or
    cloud-config."""
    text = (extra or "").strip()
    if links and (not text or text.startswith("#cloud-config")):
        theirs = yaml.safe_load(text) if text else {}
        config = dict(theirs) if isinstance(theirs, dict) else {}
        entry = {"path": LINKS_FILE, "permissions": "0644", "content": json.dumps(links)}
        config["write_files"] = [*config.get("write_files", []), entry]
        text = "#cloud-config\n" + yaml.safe_dump(config, sort_keys=False)
    return first_boot_user_data(text or None, security)


# --- the provider ------------------------------------------------------------------------
class LibcloudProvider(NoInPlaceUpgrades):
    """Provider for a stack on one libcloud compute driver."""

    def __init__(
        self,
        *,
        stack: str,
        config: StackConfig,
        spec: DriverSpec,
        driver: Any,
        addresses: dict[str, AddressAdapter],
        ownership: Ownership,
        transport: Transport | None,
        checker: HealthChecker,
        probe: AddressProbe,
    ) -> None:
        self.name = f"libcloud:{spec.name}"
        self.stack = stack
        self.config = config
        self.spec = spec
        self.driver = driver
        self.addresses = addresses  # entry point name -> its adapter
        self.ownership = ownership
        self.transport = transport
        # SSH host keys are pinned from the console (where the driver reads it) before
        # the first connection; providers/hostkeys.py.
        console = self._console_output if _console_reader(driver) is not None else None
        self.host_keys = HostKeyPins(console=console)
        self.host_keys.attach(transport)
        self.checker = checker
        self.probe = probe
        self.options = config.libcloud or LibcloudOptions(driver=spec.name)
        self.calls: Counter[str] = Counter()
        self._api: Counter[str] = Counter()

    @property
    def api_calls(self) -> Counter[str]:
        """libcloud calls by NodeDriver method (the address adapter's included)."""
        total = Counter(self._api)
        for adapter in self.addresses.values():
            total += adapter.api
        return total

    def __repr__(self) -> str:  # never the driver: its attributes hold the credentials
        return f"<LibcloudProvider {self.name} stack={self.stack!r}>"

    # --- helpers ---------------------------------------------------------------------
    def _do(self, op: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        with translated(self.spec.name, op, self._api):
            return fn(*args, **kwargs)

    def _list(self, ids: list[str] | None = None, *, live_only: bool = False, **tags: str) -> Any:
        """Nodes, narrowed on the server where the driver can (EC2 filters)."""
        if self.spec.name == "ec2":
            filters: dict[str, Any] = {f"tag:{k}": v for k, v in tags.items()}
            if ids is not None:
                filters["instance-id"] = ids
            if live_only:
                filters["instance-state-name"] = EC2_LIVE_STATES
            return self._do("list_nodes", self.driver.list_nodes, ex_filters=filters or None)
        nodes = self._do("list_nodes", self.driver.list_nodes)
        if ids is not None:
            wanted = set(ids)
            nodes = [n for n in nodes if str(n.id) in wanted]
        return nodes

    def _owned(
        self, stack: str, ids: list[str] | None = None, *, live_only: bool = False
    ) -> list[tuple[Any, dict[str, str]]]:
        """(node, ownership tags) of the stack's nodes: I7 is enforced here, on read."""
        out = []
        for node in self._list(ids, live_only=live_only, **{TAG_STACK: stack}):
            tags = self.ownership.read(node)
            if tags is None or tags.get(TAG_STACK) != stack:
                continue
            if live_only and _state(node) == "terminated":
                continue
            out.append((node, tags))
        return out

    def _server(self, node: Any, tags: dict[str, str]) -> Server:
        state = _state(node)
        role = tags.get(TAG_ROLE, "")
        role_cfg = self.config.roles.get(role)
        port = role_cfg.health.port if role_cfg else None
        created = getattr(node, "created_at", None)
        return Server(
            id=str(node.id),
            stack=tags[TAG_STACK],
            role=role,
            generation=int(tags.get(TAG_GENERATION, "0") or 0),
            run=tags.get(TAG_RUN, ""),
            state=state,
            host=_ip(node, self.options.ip),
            port=port if state == "running" else None,
            created_at=created.timestamp() if created is not None else 0.0,
            tags=dict(tags),
        )

    def _node(self, stack: str, server_id: str) -> tuple[Any, dict[str, str]]:
        found = self._owned(stack, [server_id])
        if not found:
            raise PreconditionFailed(
                f"{self.name}: server {server_id} does not belong to stack {stack!r}"
            )
        return found[0]

    # --- servers -----------------------------------------------------------------------
    def list_servers(self, stack: str) -> list[Server]:
        self.calls["list_servers"] += 1
        return [self._server(n, t) for n, t in self._owned(stack, live_only=True)]

    def describe_servers(self, stack: str, ids: list[str]) -> list[Server]:
        self.calls["describe_servers"] += 1
        if not ids:
            return []
        return [self._server(n, t) for n, t in self._owned(stack, list(ids))]

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
        del fresh  # libcloud lists nodes anyway (ownership): the look-up is always made
        self.calls["create_servers"] += 1
        # Like EC2's ClientToken: a resumed step finds what it already created.
        mine = [
            (n, t)
            for n, t in self._owned(stack, live_only=True)
            if self.ownership.token_matches(t, idempotency_key)
        ]
        servers = [self._server(n, t) for n, t in mine]
        missing = count - len(servers)
        if missing <= 0:
            return servers[:count]
        tags = {
            TAG_STACK: stack,
            TAG_ROLE: role,
            TAG_GENERATION: str(generation),
            TAG_RUN: run_id,
            TAG_TOKEN: idempotency_key,
        }
        linked = self._links(stack, links)
        role_cfg = self.config.roles[role]
        script = user_data(linked, role_cfg.launch.user_data, self.config.security)
        if self.spec.name == "ec2":
            # One RunInstances for the whole batch; the token makes a retry a no-op.
            token = digest(f"{idempotency_key}#{len(servers)}")
            made = self._do(
                "create_node",
                self.driver.create_node,
                **self._create_args(role, image, size, tags, index=len(servers), script=script),
                ex_mincount=missing,
                ex_maxcount=missing,
                ex_clienttoken=token,
            )
            nodes = made if isinstance(made, list) else [made]
        else:
            nodes = [
                self._do(
                    "create_node",
                    self.driver.create_node,
                    **self._create_args(
                        role, image, size, tags, index=len(servers) + i, script=script
                    ),
                )
                for i in range(missing)
            ]
        for node in nodes:
            servers.append(self._server(node, self.ownership.read(node) or tags))
        return servers

    def _links(self, stack: str, links: dict[str, str]) -> dict[str, dict[str, str | None]]:
        if not links:
            return {}
        found = {s.id: s for s in self.describe_servers(stack, list(links.values()))}
        out: dict[str, dict[str, str | None]] = {}
        for role, server_id in links.items():
            server = found.get(server_id)
            if server is None:
                raise PreconditionFailed(f"{self.name}: linked {role} server {server_id} is gone")
            out[role] = {"id": server_id, "host": server.host}
        return out

    def _create_args(
        self, role: str, image: str, size: str, tags: dict[str, str], *, index: int, script: str
    ) -> dict[str, Any]:
        """create_node arguments for this driver family."""
        launch = self.config.roles[role].launch
        image = launch.ami or image
        size = launch.instance_type or size
        name = self.ownership.node_name(tags, index)
        location = self.options.location or self.config.region
        args: dict[str, Any] = {"name": name, **self.ownership.create_kwargs(tags)}
        node_size = NodeSize(size, size, 0, 0, 0, 0, self.driver)
        node_image = NodeImage(image, image, self.driver)
        spec = self.spec.name
        if spec == "ec2":
            args.update(size=node_size, image=node_image, ex_userdata=script)
            if launch.key_name:
                args["ex_keyname"] = launch.key_name
            if launch.instance_profile:
                args["ex_iamprofile"] = launch.instance_profile
            if launch.subnets:
                subnet = launch.subnets[index % len(launch.subnets)]
                args["ex_subnet"] = _EC2Subnet(subnet, subnet, "available")
                if launch.security_groups:
                    args["ex_security_group_ids"] = launch.security_groups
            elif launch.security_groups:
                args["ex_security_groups"] = launch.security_groups
        elif spec == "gce":
            # GCE takes names and reads cloud-init from the user-data metadata key.
            args["ex_metadata"] = {**args.get("ex_metadata", {}), "user-data": script}
            args.update(size=size, image=image, location=location)
        elif spec == "openstack":
            args.update(size=node_size, image=node_image, ex_userdata=script)
        elif spec == "digital_ocean":
            if location is None:
                raise ConfigError(f"{self.name}: set libcloud.location (the region slug)")
            args.update(
                size=node_size,
                image=node_image,
                location=NodeLocation(location, location, "", self.driver),
                ex_user_data=script,
            )
        elif spec == "equinix_metal":
            if location is None:
                raise ConfigError(f"{self.name}: set libcloud.location (the metro code)")
            args.update(
                size=node_size,
                image=node_image,
                location=NodeLocation(location, location, "", self.driver, {"code": location}),
                cloud_init=script,
            )
        else:
            args.update(size=node_size, image=node_image)
            if location is not None:
                args["location"] = NodeLocation(location, location, "", self.driver)
        return args

    def destroy_servers(self, stack: str, ids: list[str]) -> list[str]:
        self.calls["destroy_servers"] += 1
        if not ids:
            return []
        nodes = {str(n.id): n for n in self._list(list(ids))}
        # Check every one first (I7), so a list with a foreign id destroys nothing.
        for server_id in ids:
            node = nodes.get(server_id)
            if node is None:
                continue  # already gone for good
            tags = self.ownership.read(node)
            if tags is None or tags.get(TAG_STACK) != stack:
                raise PreconditionFailed(
                    f"{self.name}: server {server_id} does not belong to stack {stack!r}; "
                    "changeover never touches it (I7)"
                )
        done = []
        for server_id in ids:
            node = nodes.get(server_id)
            if node is None or _state(node) == "terminated":
                continue
            if not self._do("destroy_node", self.driver.destroy_node, node):
                raise TransientError(f"{self.name} destroy_node {server_id}: not confirmed")
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
        self.calls["verify_server"] += 1
        found = self._owned(server.stack, [server.id])
        if not found:
            return HealthReport(server.id, False, False, False, ["server is gone"])
        node, tags = found[0]
        current = self._server(node, tags)
        report = HealthReport(current.id, current.state == "running", False, False)
        if current.state != "running":
            report.reasons.append(f"server is {current.state}")
            return report
        if current.host is None:
            current = self._wait_for_ip(node, tags, check.timeout)
            if current.host is None:
                report.reasons.append(f"server has no {self.options.ip} IP yet")
                return report
        if check.type not in ("http", "tcp"):
            raise CapabilityError(self.name, f"health check type {check.type!r}", "use http or tcp")
        result = self.checker.check(current, check)
        report.app_ok = result.ok
        if not result.ok:
            report.reasons.append(result.reason)
        if policy.pending == "ignore" and not policy.reboot_required_fails:
            report.hygiene_ok = True
            report.facts = {"hygiene": "not checked: the policy asks for nothing"}
            return report
        if self.transport is None:
            if policy.pending != "ignore":
                raise _no_transport(self.spec.name)
            report.hygiene_ok = True
            report.facts = {"hygiene": "not checked: no transport and hygiene.pending = ignore"}
            return report
        # SSH goes to the address hygiene.ssh names, which may differ from the app's.
        reach = replace(current, host=_ip(node, policy.ssh.address) or current.host)
        ran = self.transport.run(reach, hygiene.fact_script(policy), timeout=60.0)
        if not ran.stdout.strip():
            report.reasons.append(f"could not read host facts (exit {ran.exit_status})")
            return report
        facts = hygiene.parse_facts(ran.stdout)
        verdict = hygiene.evaluate(facts, policy)
        report.facts = facts.to_dict()
        report.hygiene_ok = verdict.ok
        report.reasons += verdict.reasons
        return report

    # --- SSH host keys (providers/hostkeys.py) ------------------------------------------
    def pin_host_keys(
        self, stack: str, servers: list[Server], known: dict[str, list[str]]
    ) -> dict[str, list[str]]:
        """Pin new nodes' host keys from their console (EC2, OpenStack) before hygiene
        connects over SSH; `known` are pins recorded in the journal, used as they are.
        Without an SSH transport: {}."""
        if not self.host_keys.active:
            return {}
        self.calls["pin_host_keys"] += 1

        def reach(server: Server) -> Server:  # the address hygiene.ssh names
            node = self._node(stack, server.id)[0]
            return replace(server, host=_ip(node, self.config.hygiene.ssh.address) or server.host)

        return self.host_keys.pin_servers(servers, known, reach=reach)

    def ex_host_keys(self, server: Server) -> list[str]:
        """The keys pinned for a server, else its console's: for `audit` over SSH."""
        return self.host_keys(server)

    def _console_output(self, server: Server) -> str | None:
        """The node's serial console, where cloud-init prints the SSH host keys."""
        reader = _console_reader(self.driver)
        if reader is None:
            return None
        node = self._node(server.stack or self.stack, server.id)[0]
        got = self._do(reader[0], reader[1], node)
        text = got.get("output") if isinstance(got, dict) else got
        return text if isinstance(text, str) else None

    def _wait_for_ip(self, node: Any, tags: dict[str, str], timeout: float) -> Server:
        """libcloud's wait_until_running: running and an IP assigned, or give up."""
        kwargs = {"ex_node_ids": [node.id]} if self.spec.name == "ec2" else {}
        try:
            with translated(self.spec.name, "wait_until_running", self._api):
                ready = self.driver.wait_until_running(
                    [node],
                    wait_period=IP_POLL_SECONDS,
                    timeout=max(timeout, IP_POLL_SECONDS),
                    ssh_interface=f"{self.options.ip}_ips",
                    ex_list_nodes_kwargs=kwargs,
                )
        except Exception:  # timed out or the node went away: the report says no IP
            return self._server(node, tags)
        return self._server(ready[0][0], tags)

    # --- address ---------------------------------------------------------------------
    def _adapter(self, address: str) -> AddressAdapter:
        if address not in self.addresses:
            raise PreconditionFailed(f"{self.name}: {address!r} is not an entry point")
        return self.addresses[address]

    def address_capacity(self, stack: str, address: str) -> int | None:
        return self._adapter(address).capacity

    def _holders(self, stack: str, address: str) -> tuple[list[str], list[Any]]:
        """Holder ids (ours where they match our nodes) and our nodes that hold it."""
        refs = self._adapter(address).holders()
        if not refs:
            return [], []
        owned = self._owned(stack, live_only=True)
        ids, nodes = [], []
        for ref in refs:
            match = next((n for n, _ in owned if _refers_to(ref, n)), None)
            ids.append(str(match.id) if match is not None else ref)
            if match is not None:
                nodes.append(match)
        return ids, nodes

    def get_members(self, stack: str, address: str) -> list[str]:
        self.calls["get_members"] += 1
        adapter = self._adapter(address)
        if adapter.refs_are_ids:
            return adapter.holders()  # node ids already: no listing needed
        return self._holders(stack, address)[0]

    def set_members(self, stack: str, address: str, ids: list[str]) -> None:
        self.calls["set_members"] += 1
        adapter = self._adapter(address)
        capacity = adapter.capacity
        if capacity is not None and len(ids) > capacity:
            # An address holds one server: the newest one asked for (AddMembers appends
            # new servers after the current ones).
            ids = ids[-capacity:]
        holder_ids, holder_nodes = self._holders(stack, address)
        if foreign := [h for h in holder_ids if h not in {str(n.id) for n in holder_nodes}]:
            raise PreconditionFailed(
                f"{self.name}: address {address!r} is held by {foreign}, outside stack "
                f"{stack!r}; changeover will not move it off them (I7)"
            )
        owned = {str(n.id): (n, t) for n, t in self._owned(stack, list(ids))}
        targets = []
        for server_id in ids:
            if server_id not in owned:
                raise PreconditionFailed(
                    f"{self.name}: server {server_id} does not belong to stack {stack!r}"
                )
            node = owned[server_id][0]
            if _state(node) != "running":
                raise TransientError(f"{self.name}: server {server_id} is {_state(node)}")
            targets.append(node)
        adapter.apply(targets, holder_nodes)

    def inflight(self, stack: str, address: str) -> dict[str, int]:
        # Clouds do not report requests in flight per server behind an address.
        self.calls["inflight"] += 1
        return {}

    def routes_to(self, stack: str, ids: list[str]) -> dict[str, list[str]]:
        """The stack's entry points, each read back from the cloud."""
        self.calls["routes_to"] += 1
        want = set(ids)
        out: dict[str, list[str]] = {}
        for address in self.addresses:
            for member in self.get_members(stack, address):
                if member in want:
                    out.setdefault(member, []).append(address)
        return out

    def refresh(self) -> None:
        """Nothing is kept between reads here."""

    def probe_address(self, stack: str, address: str, path: str) -> tuple[int, str | None]:
        self.calls["probe_address"] += 1
        adapter = self._adapter(address)
        refs = adapter.holders()
        owned = self._owned(stack, refs if adapter.refs_are_ids else None) if refs else []
        members = [self._server(n, t) for n, t in owned if any(_refers_to(r, n) for r in refs)]
        role = self.config.entry_point(address).roles[0]
        check = self.config.roles[role].health
        target = AddressTarget(address, adapter.host(), check.port, members)
        return self.probe.probe(target, path, check.timeout)

    # --- data ----------------------------------------------------------------------------
    def check_data_moves(self, stack: str) -> None:
        if self.spec.name not in DATA_DRIVERS:
            raise no_data_support(self.spec.name)

    def _data(self, stack: str) -> VolumeData:
        if self.spec.name not in DATA_DRIVERS:
            raise no_data_support(self.spec.name)
        role = self.config.data_role
        if role is None:
            raise PreconditionFailed(f"stack {stack!r} has no data role")

        def server_of(server_id: str) -> Server:
            return self._server(*self._node(stack, server_id))

        return VolumeData(
            driver=self.driver,
            driver_name=self.spec.name,
            stack=stack,
            options=self.config.roles[role].data_options,
            transport=self.transport,
            node_of=lambda server_id: self._node(stack, server_id)[0],
            server_of=server_of,
            api=self._api,
        )

    def data_mode(self, stack: str, server_id: str) -> dict[str, Any]:
        self.calls["data_mode"] += 1
        return self._data(stack).mode(server_id)

    def data_copy_live(self, stack: str, src_id: str, dst_id: str) -> dict[str, Any]:
        self.calls["data_copy_live"] += 1
        return self._data(stack).copy_live(src_id, dst_id)

    def data_freeze(self, stack: str, src_id: str) -> dict[str, Any]:
        self.calls["data_freeze"] += 1
        return self._data(stack).freeze(src_id)

    def data_unfreeze(self, stack: str, src_id: str) -> dict[str, Any]:
        self.calls["data_unfreeze"] += 1
        return self._data(stack).unfreeze(src_id)

    def data_final_sync(self, stack: str, src_id: str, dst_id: str) -> DataSummary:
        self.calls["data_final_sync"] += 1
        return self._data(stack).final_sync(src_id, dst_id)

    def data_switch(self, stack: str, src_id: str, dst_id: str) -> dict[str, Any]:
        self.calls["data_switch"] += 1
        return self._data(stack).switch(src_id, dst_id)

    def data_switch_back(self, stack: str, src_id: str, dst_id: str) -> dict[str, Any]:
        self.calls["data_switch_back"] += 1
        return self._data(stack).switch_back(src_id, dst_id)


def _console_reader(driver: Any) -> tuple[str, Any] | None:
    """The driver's console-output call, by name: EC2 and OpenStack (a dict with
    "output"), Outscale (the text). None for drivers that cannot read a node's console."""
    for name in ("ex_get_console_output", "ex_read_console_output_node"):
        read = getattr(driver, name, None)
        if callable(read):
            return name, read
    return None


def _state(node: Any) -> ServerState:
    """libcloud's NodeState in the Protocol's four words."""
    state = str(node.state)
    if (node.extra or {}).get("status") == "shutting-down":
        return "terminated"  # EC2: on its way out, never coming back
    if state == "running":
        return "running"
    if state == "terminated":
        return "terminated"
    if state in ("stopped", "stopping", "suspended", "paused", "error"):
        return "stopped"
    return "pending"  # pending, starting, rebooting, reconfiguring, unknown


def _ip(node: Any, which: str) -> str | None:
    ips = node.public_ips if which == "public" else node.private_ips
    ips = [ip for ip in ips or [] if ip and ":" not in ip]  # IPv4 first
    return str(ips[0]) if ips else None


def _refers_to(ref: str, node: Any) -> bool:
    """Whether an address's holder reference (id, name, self link, IP) names `node`."""
    extra = node.extra or {}
    if ref in (str(node.id), node.name, extra.get("selfLink")):
        return True
    return ref in set(node.private_ips or []) | set(node.public_ips or [])
