"""Ownership tags on libcloud nodes: how each driver family stores and reads them (I7).

changeover finds a stack's servers by five tags (stack, role, generation, run, token).
Every cloud keeps them somewhere else:

    style          drivers             where the tags live
    tags           ec2                 instance tags, exact keys and values
    metadata       openstack           server metadata, exact keys and values
    gce-metadata   gce                 instance metadata (":" -> "-" in keys), plus labels
    string-tags    digital_ocean       droplet tags "changeover:stack:NAME" (token hashed)
    description    equinix_metal       the device description "changeover:stack=NAME;..."
    name           everything else     the node name "co.STACK.ROLE.gN.DIGEST.I" (fallback)

Where a cloud cannot hold the raw idempotency key (DigitalOcean's tag alphabet, a node
name), the node carries a digest of it and a registry file under the state dir maps the
digest back to the key and run. The name fallback is the weakest: any node named like
ours counts as ours, so drivers with tags or metadata never use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from orchestrator.errors import ConfigError
from orchestrator.models import (
    TAG_DO_NOT_DISRUPT,
    TAG_GENERATION,
    TAG_ROLE,
    TAG_RUN,
    TAG_STACK,
    TAG_TOKEN,
)

OwnershipStyle = Literal["tags", "metadata", "gce-metadata", "string-tags", "description", "name"]

OWNERSHIP_KEYS = (TAG_STACK, TAG_ROLE, TAG_GENERATION, TAG_RUN, TAG_TOKEN)
NAME_PREFIX = "co"  # nodes named by the fallback start with this
DIGEST_CHARS = 10  # hex characters of the key digest kept on the node
_SAFE = re.compile(r"^[A-Za-z0-9_-]+$")  # stack and role names every style can carry
_DO_TAG = re.compile(r"^[A-Za-z0-9_:-]{1,255}$")  # DigitalOcean's tag alphabet


def digest(key: str) -> str:
    """A short, stable stand-in for an idempotency key."""
    return hashlib.sha256(key.encode()).hexdigest()[:DIGEST_CHARS]


class TokenRegistry:
    """digest -> (idempotency key, run id), for clouds that can't store the raw key.

    Written before the node is created, so a crash between the two still leaves a way
    back from the node to the step that made it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> dict[str, dict[str, str]]:
        try:
            data: dict[str, dict[str, str]] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data

    def remember(self, key: str, run: str) -> str:
        d = digest(key)
        data = self._load()
        if data.get(d) != {"key": key, "run": run}:
            data[d] = {"key": key, "run": run}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)  # atomic: a reader never sees half a file
        return d

    def lookup(self, d: str) -> dict[str, str] | None:
        return self._load().get(d)


class Ownership:
    """Writes a stack's ownership tags into create_node arguments and reads them back."""

    def __init__(self, style: OwnershipStyle, registry: TokenRegistry) -> None:
        self.style = style
        self.registry = registry

    # --- checks ----------------------------------------------------------------------
    def check_names(self, stack: str, roles: list[str]) -> None:
        """Every style can carry names of letters, digits, '-' and '_'; refuse others early."""
        for kind, value in [("stack", stack)] + [("role", r) for r in roles]:
            if not _SAFE.match(value):
                raise ConfigError(
                    f"{kind} name {value!r} cannot be stored in {self.style} ownership tags: "
                    "use letters, digits, '-' and '_'"
                )

    # --- writing -----------------------------------------------------------------------
    def node_name(self, tags: dict[str, str], index: int) -> str:
        d = digest(tags[TAG_TOKEN])
        stack, role, gen = tags[TAG_STACK], tags[TAG_ROLE], tags[TAG_GENERATION]
        if self.style == "name":
            return f"{NAME_PREFIX}.{stack}.{role}.g{gen}.{d}.{index}"
        # A readable name only; ownership lives in the tags. GCE wants [a-z][-a-z0-9]*.
        name = f"{stack}-{role}-g{gen}-{d}-{index}".lower().replace("_", "-")
        return name if name[0].isalpha() else f"{NAME_PREFIX}-{name}"

    def create_kwargs(self, tags: dict[str, str]) -> dict[str, Any]:
        """Extra create_node keyword arguments that store `tags` on the new node."""
        if self.style in ("tags", "metadata"):
            return {"ex_metadata": dict(tags)}
        if self.style == "gce-metadata":
            labels = {
                _gce_key(k): re.sub(r"[^a-z0-9_-]", "-", v.lower())[:63]
                for k, v in tags.items()
                if k != TAG_TOKEN
            }
            return {"ex_metadata": {_gce_key(k): v for k, v in tags.items()}, "ex_labels": labels}
        if self.style == "string-tags":
            self.registry.remember(tags[TAG_TOKEN], tags[TAG_RUN])
            return {"ex_create_attr": {"tags": self._string_tags(tags)}}
        if self.style == "description":
            return {
                "description": ";".join(f"{k}={v}" for k, v in tags.items()),
                "tags": self._string_tags(tags),
            }
        self.registry.remember(tags[TAG_TOKEN], tags[TAG_RUN])
        return {}

    def _string_tags(self, tags: dict[str, str]) -> list[str]:
        out = []
        for k, v in tags.items():
            value = digest(v) if k == TAG_TOKEN or not _DO_TAG.match(f"{k}:{v}") else v
            out.append(f"{k}:{value}")
        return out

    # --- reading -----------------------------------------------------------------------
    def read(self, node: Any) -> dict[str, str] | None:
        """The node's ownership tags, or None if it carries none (not changeover's)."""
        extra = node.extra or {}
        tags: dict[str, str] = {}
        if self.style == "tags":
            tags = {k: str(v) for k, v in (extra.get("tags") or {}).items()}
        elif self.style == "metadata":
            tags = {k: str(v) for k, v in (extra.get("metadata") or {}).items()}
        elif self.style == "gce-metadata":
            items = (extra.get("metadata") or {}).get("items") or []
            raw = {str(i.get("key")): str(i.get("value")) for i in items}
            tags = {k: raw[_gce_key(k)] for k in OWNERSHIP_KEYS if _gce_key(k) in raw}
        elif self.style == "string-tags":
            tags = self._from_string_tags(extra.get("tags") or [])
        elif self.style == "description":
            text = str(extra.get("description") or "")
            pairs = (p.split("=", 1) for p in text.split(";") if "=" in p)
            tags = {k: v for k, v in pairs if k in OWNERSHIP_KEYS}
        else:
            tags = self._from_name(str(node.name or ""))
        if TAG_STACK not in tags:
            return None
        out = {k: tags[k] for k in OWNERSHIP_KEYS if k in tags}
        if (opted := self._opt_out(extra)) is not None:
            out[TAG_DO_NOT_DISRUPT] = opted
        return out

    def _opt_out(self, extra: dict[str, Any]) -> str | None:
        """The operator's changeover:do-not-disrupt, where this driver keeps tags: the
        node's tags or metadata, a GCE metadata item or label `changeover-do-not-disrupt`,
        a DigitalOcean or Equinix tag `changeover:do-not-disrupt` (bare, or `:VALUE`).
        None when absent; a node named by the fallback cannot carry it."""
        if self.style in ("tags", "metadata"):
            source = extra.get("tags" if self.style == "tags" else "metadata") or {}
            value = source.get(TAG_DO_NOT_DISRUPT)
            return None if value is None else str(value)
        if self.style == "gce-metadata":
            items = (extra.get("metadata") or {}).get("items") or []
            raw = {str(i.get("key")): str(i.get("value")) for i in items}
            raw.update({str(k): str(v) for k, v in (extra.get("labels") or {}).items()})
            return raw.get(_gce_key(TAG_DO_NOT_DISRUPT))
        if self.style in ("string-tags", "description"):
            for item in map(str, extra.get("tags") or []):
                if item == TAG_DO_NOT_DISRUPT:
                    return ""
                if item.startswith(TAG_DO_NOT_DISRUPT + ":"):
                    return item[len(TAG_DO_NOT_DISRUPT) + 1 :]
        return None

    def _from_string_tags(self, values: list[str]) -> dict[str, str]:
        tags: dict[str, str] = {}
        for item in values:
            for key in OWNERSHIP_KEYS:
                if str(item).startswith(key + ":"):
                    tags[key] = str(item)[len(key) + 1 :]
        if TAG_TOKEN in tags:
            self._resolve_token(tags, tags[TAG_TOKEN])
        return tags

    def _from_name(self, name: str) -> dict[str, str]:
        m = re.fullmatch(
            rf"{NAME_PREFIX}\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.g(\d+)\.([0-9a-f]{{{DIGEST_CHARS}}})\.\d+",
            name,
        )
        if not m:
            return {}
        tags = {TAG_STACK: m[1], TAG_ROLE: m[2], TAG_GENERATION: m[3], TAG_RUN: "unknown"}
        self._resolve_token(tags, m[4])
        return tags

    def _resolve_token(self, tags: dict[str, str], d: str) -> None:
        found = self.registry.lookup(d)
        if found is None:
            # Another machine made it: the digest still matches digest(key) for lookups.
            tags[TAG_TOKEN] = f"sha256:{d}"
            return
        tags[TAG_TOKEN] = found["key"]
        tags.setdefault(TAG_RUN, found["run"])
        if tags[TAG_RUN] == "unknown":
            tags[TAG_RUN] = found["run"]

    def token_matches(self, tags: dict[str, str], key: str) -> bool:
        """Whether a node's token tag says it was created under idempotency key `key`."""
        token = tags.get(TAG_TOKEN)
        return token in (key, f"sha256:{digest(key)}")


def _gce_key(key: str) -> str:
    return key.replace(":", "-")
