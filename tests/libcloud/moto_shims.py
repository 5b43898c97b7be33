"""Shims between libcloud's EC2 driver and moto. They live here, in the tests, because
they paper over moto's quirks, not AWS's; the product code talks to real EC2 unchanged.

moto differs from EC2 in three ways that matter to libcloud:

1. Its XML namespace is ``http://ec2.amazonaws.com/doc/2016-11-15`` with no trailing
   slash, so every namespaced lookup libcloud makes finds nothing (create_node returns
   no node, associate returns no association id).
2. It reads ``CreateTags``/``DeleteTags`` parameters 1-based (``ResourceId.1``,
   ``Tag.1.Key``) and rejects libcloud's 0-based ``ResourceId.0``/``Tag.0.Key``.
3. Its ``CreateTags``, ``DisassociateAddress``, ``DeleteVolume`` ... responses carry no
   ``<return>true</return>``, which libcloud reads as "the call failed".
4. Its ``DetachVolume`` needs the ``InstanceId`` that EC2 makes optional (and libcloud
   does not send): moto fails with a TypeError inside its own error class.

``shim(driver)`` swaps the class of a driver's connection for one that fixes all three,
so a driver built by the product code from config (credentials, endpoint_url) can be
pointed at moto as it is. The fourth is fixed by looking the attachment up first.
"""

from __future__ import annotations

import re
from typing import Any

from libcloud.compute.drivers.ec2 import EC2Connection, EC2Response

MOTO_NS = 'xmlns="http://ec2.amazonaws.com/doc/2016-11-15"'
EC2_URI = "http://ec2.amazonaws.com/doc/2016-11-15/"
EC2_NS = f'xmlns="{EC2_URI}"'
# libcloud's methods are unannotated; called through Any-typed aliases.
_parse: Any = EC2Response.parse_body
_request: Any = EC2Connection.request
ZERO_BASED = re.compile(r"^(ResourceId|Tag)\.(\d+)(\..*)?$")
TAG_ACTIONS = ("CreateTags", "DeleteTags")


class MotoEC2Response(EC2Response):
    """EC2Response reading moto's XML: the real namespace, and a <return> element."""

    def parse_body(self) -> Any:
        body = str(self.body).replace(MOTO_NS, EC2_NS)
        if "<return>" not in body:
            body = re.sub(r"(</\w+Response>)\s*$", r"<return>true</return>\1", body)
        self.body = body
        return _parse(self)


class MotoEC2Connection(EC2Connection):
    """EC2Connection sending tag parameters 1-based, as moto reads them."""

    responseCls = MotoEC2Response

    def request(self, action: Any, params: Any = None, **kw: Any) -> Any:  # type: ignore[override]
        if params and params.get("Action") in TAG_ACTIONS and "ResourceId.0" in params:
            fixed = {}
            for key, value in params.items():
                m = ZERO_BASED.match(key)
                fixed[f"{m[1]}.{int(m[2]) + 1}{m[3] or ''}" if m else key] = value
            params = fixed
        if params and params.get("Action") == "DetachVolume" and "InstanceId" not in params:
            query = {"Action": "DescribeVolumes", "VolumeId.1": params["VolumeId"]}
            described = _request(self, action, params=query).object
            instance = described.findtext(f".//{{{EC2_URI}}}instanceId")
            if instance:
                params = {**params, "InstanceId": instance}
        return _request(self, action, params=params, **kw)


def shim(driver: Any) -> Any:
    """Point a libcloud EC2 driver built by the product code at moto's dialect."""
    driver.connection.__class__ = MotoEC2Connection
    return driver
