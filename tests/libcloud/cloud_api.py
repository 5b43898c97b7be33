"""A local HTTP server on 127.0.0.1 speaking the DigitalOcean v2 and OpenStack (Keystone v3,
Nova, Neutron) APIs, enough for libcloud's own drivers to run changeover against it.

It serves the documented request and response shapes (droplets, floating IPs and their
assign/unassign actions; Keystone tokens with a service catalog, Nova servers and their
interfaces, Neutron floating IPs and ports), checks the credentials each API expects,
and records every request in order, so tests can assert what changeover did and when:
for example that the floating IP was attached to the new node before the old node was
deleted.

State is in memory; a node becomes active the first time it is read after its
creation, like a cloud that boots fast.
"""

from __future__ import annotations

import itertools
import json
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

DO_TOKEN = "dop_v1_test_token_0123456789abcdef"  # what the DigitalOcean API accepts
OS_USER, OS_PASSWORD, OS_PROJECT = "changeover", "os-password-0123456789", "demo"
CREATED = "2026-11-26T12:00:00Z"


@dataclass
class Request:
    """One request the server saw."""

    api: str  # do | keystone | nova | neutron
    method: str
    path: str
    body: Any = None


@dataclass
class CloudApis:
    """In-memory DigitalOcean and OpenStack, served over HTTP on 127.0.0.1."""

    requests: list[Request] = field(default_factory=list)
    droplets: dict[int, dict[str, Any]] = field(default_factory=dict)
    do_fips: dict[str, int | None] = field(default_factory=dict)  # ip -> droplet id
    servers: dict[str, dict[str, Any]] = field(default_factory=dict)
    ports: dict[str, dict[str, Any]] = field(default_factory=dict)  # port id -> port
    os_fips: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> floating IP
    fail_next: list[tuple[str, int]] = field(default_factory=list)  # (path part, status)
    _ids: Any = field(default_factory=lambda: itertools.count(1001))  # droplet ids
    _ips: Any = field(default_factory=lambda: itertools.count(10))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def start(self) -> str:
        apis = self

        class Handler(_Handler):
            cloud = apis

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    # --- out of band, as another team would -----------------------------------------------
    def add_do_floating_ip(self, ip: str) -> str:
        self.do_fips[ip] = None
        return ip

    def add_droplet(self, name: str, tags: list[str] | None = None) -> int:
        return int(self._droplet({"name": name, "tags": tags or [], "size": "s-1vcpu-1gb"})["id"])

    def add_os_floating_ip(self, ip: str) -> str:
        fid = str(uuid.uuid4())
        self.os_fips[fid] = {"id": fid, "floating_ip_address": ip, "port_id": None}
        return fid

    def add_server(self, name: str, metadata: dict[str, str] | None = None) -> str:
        return str(self._server_create({"name": name, "metadata": metadata or {}})["id"])

    def order(self, *needles: tuple[str, str]) -> list[int]:
        """Index of the first request matching each (method, path suffix), -1 if none."""
        out = []
        for method, suffix in needles:
            found = [
                i
                for i, r in enumerate(self.requests)
                if r.method == method and r.path.endswith(suffix)
            ]
            out.append(found[0] if found else -1)
        return out

    # --- DigitalOcean ---------------------------------------------------------------------
    def _droplet(self, body: dict[str, Any]) -> dict[str, Any]:
        did = next(self._ids)
        n = next(self._ips)
        size = body.get("size", "s-1vcpu-1gb")
        droplet = {
            "id": did,
            "name": body["name"],
            "memory": 1024,
            "vcpus": 1,
            "disk": 25,
            "locked": False,
            "status": "new",
            "kernel": None,
            "created_at": CREATED,
            "features": [],
            "backup_ids": [],
            "snapshot_ids": [],
            "image": {
                "id": 7555620,
                "name": "12 x64",
                "distribution": "Debian",
                "slug": str(body.get("image", "debian-12-x64")),
                "public": True,
                "regions": ["nyc3"],
                "min_disk_size": 20,
                "created_at": CREATED,
            },
            "size": {
                "slug": size,
                "memory": 1024,
                "vcpus": 1,
                "disk": 25,
                "transfer": 1.0,
                "price_monthly": 6.0,
                "price_hourly": 0.00893,
                "regions": ["nyc3"],
            },
            "size_slug": size,
            "networks": {
                "v4": [
                    {"ip_address": f"10.10.0.{n}", "type": "private", "netmask": "255.255.0.0"},
                    {"ip_address": f"192.0.2.{n}", "type": "public", "netmask": "255.255.255.0"},
                ],
                "v6": [],
            },
            "region": {"slug": body.get("region", "nyc3"), "name": "New York 3"},
            "tags": list(body.get("tags") or []),
        }
        self.droplets[did] = droplet
        return droplet

    def _do(self, method: str, path: str, query: dict[str, Any], body: Any) -> tuple[int, Any]:
        parts = path.strip("/").split("/")[1:]  # after "v2"
        if parts == ["droplets"] and method == "GET":
            for d in self.droplets.values():
                d["status"] = "active"
            return 200, {"droplets": list(self.droplets.values()), "links": {}, "meta": {}}
        if parts == ["droplets"] and method == "POST":
            return 202, {"droplet": self._droplet(body), "links": {"actions": []}}
        if len(parts) == 2 and parts[0] == "droplets":
            did = int(parts[1])
            if did not in self.droplets:
                return 404, {"id": "not_found", "message": "The resource was not found."}
            if method == "DELETE":
                del self.droplets[did]
                for ip, holder in self.do_fips.items():
                    if holder == did:
                        self.do_fips[ip] = None
                return 204, None
            return 200, {"droplet": self.droplets[did]}
        if parts == ["floating_ips"]:
            fips = [
                {
                    "ip": ip,
                    "droplet": self.droplets.get(holder) if holder else None,
                    "region": {"slug": "nyc3", "name": "New York 3"},
                    "locked": False,
                }
                for ip, holder in self.do_fips.items()
            ]
            return 200, {"floating_ips": fips, "links": {}, "meta": {"total": len(fips)}}
        if len(parts) == 3 and parts[0] == "floating_ips" and parts[2] == "actions":
            ip = parts[1]
            if ip not in self.do_fips:
                return 404, {"id": "not_found", "message": "The resource was not found."}
            if body.get("type") == "assign":
                if int(body["droplet_id"]) not in self.droplets:
                    return 422, {"id": "unprocessable_entity", "message": "Droplet not found"}
                self.do_fips[ip] = int(body["droplet_id"])
            else:
                self.do_fips[ip] = None
            action = {"id": next(self._ids), "status": "in-progress", "type": body.get("type")}
            return 201, {"action": action}
        return 404, {"id": "not_found", "message": f"no route {method} {path}"}

    # --- OpenStack -----------------------------------------------------------------------
    def _keystone(self, body: Any) -> tuple[int, Any, dict[str, str]]:
        user = body["auth"]["identity"]["password"]["user"]
        if (user.get("name"), user.get("password")) != (OS_USER, OS_PASSWORD):
            return 401, {"error": {"code": 401, "title": "Unauthorized"}}, {}
        catalog = [
            {
                "type": kind,
                "name": name,
                "endpoints": [
                    {"region": "RegionOne", "interface": "public", "url": f"{self.url}{path}"}
                ],
            }
            for kind, name, path in (
                ("compute", "nova", f"/compute/v2.1/{OS_PROJECT}"),
                ("network", "neutron", "/network"),
            )
        ]
        token = {
            "expires_at": "2099-01-01T00:00:00.000000Z",
            "issued_at": CREATED,
            "methods": ["password"],
            "roles": [{"id": "r1", "name": "member"}],
            "project": {"id": OS_PROJECT, "name": OS_PROJECT, "domain": {"id": "default"}},
            "user": {"id": "u1", "name": OS_USER, "domain": {"id": "default"}},
            "catalog": catalog,
        }
        return 201, {"token": token}, {"X-Subject-Token": self._token}

    def _server_create(self, body: dict[str, Any]) -> dict[str, Any]:
        sid = str(uuid.uuid4())
        n = next(self._ips)
        pid = str(uuid.uuid4())
        self.ports[pid] = {
            "id": pid,
            "device_id": sid,
            "device_owner": "compute:nova",
            "network_id": "net-private",
            "status": "ACTIVE",
            "fixed_ips": [{"subnet_id": "subnet-private", "ip_address": f"10.0.0.{n}"}],
            "mac_address": f"fa:16:3e:00:00:{n:02x}",
            "name": "",
            "admin_state_up": True,
        }
        server = {
            "id": sid,
            "name": body["name"],
            "status": "BUILD",
            "addresses": {"private": [{"addr": f"10.0.0.{n}", "version": 4}]},
            "hostId": "host-1",
            "tenant_id": OS_PROJECT,
            "user_id": "u1",
            "image": {"id": body.get("imageRef", "img-debian-12")},
            "flavor": {"id": body.get("flavorRef", "m1.small")},
            "metadata": dict(body.get("metadata") or {}),
            "created": CREATED,
            "updated": CREATED,
            "accessIPv4": "",
            "links": [{"rel": "self", "href": f"{self.url}/compute/v2.1/servers/{sid}"}],
        }
        self.servers[sid] = server
        return server

    def _os_fip(self, fip: dict[str, Any]) -> dict[str, Any]:
        port = self.ports.get(fip["port_id"] or "")
        return {
            **fip,
            "floating_network_id": "net-public",
            "status": "ACTIVE" if port else "DOWN",
            "fixed_ip_address": port["fixed_ips"][0]["ip_address"] if port else None,
            "port_details": (
                {"device_id": port["device_id"], "device_owner": port["device_owner"]}
                if port
                else None
            ),
        }

    def _nova(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        parts = path.strip("/").split("/")[3:]  # after compute/v2.1/<project>
        if parts == ["servers", "detail"]:
            for s in self.servers.values():
                s["status"] = "ACTIVE"
            return 200, {"servers": list(self.servers.values())}
        if parts == ["servers"] and method == "POST":
            made = self._server_create(body["server"])
            return 202, {"server": {"id": made["id"], "adminPass": "generated-by-nova"}}
        if len(parts) >= 2 and parts[0] == "servers":
            server = self.servers.get(parts[1])
            if server is None:
                return 404, {"itemNotFound": {"code": 404, "message": "Instance not found"}}
            if len(parts) == 3 and parts[2] == "os-interface":
                attachments = [
                    {
                        "port_id": p["id"],
                        "net_id": p["network_id"],
                        "port_state": p["status"],
                        "mac_addr": p["mac_address"],
                        "fixed_ips": p["fixed_ips"],
                    }
                    for p in self.ports.values()
                    if p["device_id"] == server["id"]
                ]
                return 200, {"interfaceAttachments": attachments}
            if method == "DELETE":
                del self.servers[server["id"]]
                for pid in [p for p, v in self.ports.items() if v["device_id"] == server["id"]]:
                    del self.ports[pid]
                    for fip in self.os_fips.values():
                        if fip["port_id"] == pid:
                            fip["port_id"] = None
                return 204, None
            return 200, {"server": server}
        return 404, {"itemNotFound": {"code": 404, "message": f"no route {method} {path}"}}

    def _neutron(self, method: str, path: str, query: dict[str, Any], body: Any) -> tuple[int, Any]:
        parts = path.strip("/").split("/")[2:]  # after network/v2.0
        if parts == ["floatingips"]:
            wanted = query.get("floating_ip_address", [None])[0]
            fips = [
                self._os_fip(f)
                for f in self.os_fips.values()
                if wanted in (None, f["floating_ip_address"])
            ]
            return 200, {"floatingips": fips}
        if len(parts) == 2 and parts[0] == "floatingips":
            fip = self.os_fips.get(parts[1])
            if fip is None:
                return 404, {"NeutronError": {"type": "FloatingIPNotFound", "message": "nope"}}
            if method == "PUT":
                port_id = body["floatingip"].get("port_id")
                if port_id is not None and port_id not in self.ports:
                    return 404, {"NeutronError": {"type": "PortNotFound", "message": port_id}}
                fip["port_id"] = port_id
            return 200, {"floatingip": self._os_fip(fip)}
        if parts == ["ports"]:
            return 200, {"ports": list(self.ports.values())}
        return 404, {"NeutronError": {"type": "HTTPNotFound", "message": f"{method} {path}"}}

    # --- dispatch --------------------------------------------------------------------------
    def handle(
        self, method: str, raw_path: str, headers: Any, body: Any
    ) -> tuple[int, Any, dict[str, str]]:
        url = urlsplit(raw_path)
        path, query = url.path, parse_qs(url.query)
        api = (
            "keystone"
            if path.startswith("/v3/")
            else "nova"
            if path.startswith("/compute/")
            else "neutron"
            if path.startswith("/network/")
            else "do"
        )
        with self._lock:
            self.requests.append(Request(api, method, path, body))
            for i, (part, status) in enumerate(self.fail_next):
                if part in path:
                    del self.fail_next[i]
                    return status, {"id": "service_unavailable", "message": "try later"}, {}
            if api == "keystone":
                return self._keystone(body)
            if api == "do":
                if headers.get("Authorization") != f"Bearer {DO_TOKEN}":
                    return 401, {"id": "unauthorized", "message": "Unable to authenticate"}, {}
                return (*self._do(method, path, query, body), {})
            if headers.get("X-Auth-Token") != self._token:
                return 401, {"error": {"code": 401, "message": "bad token"}}, {}
            if api == "nova":
                return (*self._nova(method, path, body), {})
            return (*self._neutron(method, path, query, body), {})


class _Handler(BaseHTTPRequestHandler):
    cloud: CloudApis
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms stall

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the cloud records requests itself."""

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw.strip() else None
        status, payload, extra = self.cloud.handle(self.command, self.path, self.headers, body)
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _serve
