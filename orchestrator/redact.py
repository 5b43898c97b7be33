"""Redaction (I9): no secret reaches a log line, the journal, an error message or a report.

Two complementary nets:

- by pattern: a value under a key whose name looks secret (``password``, ``api_key``,
  ``SecretAccessKey``, ``DIGITALOCEAN_ACCESS_TOKEN``, ...; case, separators and nesting do
  not matter) is replaced by ``***``; inside free text, ``key=value``, ``key: value`` and
  ``"key": "value"`` pairs with such keys, ``Bearer`` credentials, AWS access key ids,
  PEM private key blocks and the password of ``scheme://user:password@host`` URLs;
- by value: the values of the credential variables the providers read from the
  environment (:data:`CREDENTIAL_ENV_VARS`) are masked wherever they appear, whatever
  the surrounding text looks like.

Integers under a key named like ``token`` pass: the lease's fencing token is a counter,
not a credential. Every other value under a secret-looking key is masked, except ``None``
and booleans (which say only whether a secret is set).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***"

# Every environment variable a provider reads a credential from. boto3's chain (aws.py)
# and the libcloud driver table (libcloud_provider.DRIVERS, GENERIC_CREDENTIALS); a test
# checks that the table is covered.
CREDENTIAL_ENV_VARS: tuple[str, ...] = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_BEARER_TOKEN_BEDROCK",
    "DIGITALOCEAN_ACCESS_TOKEN",
    "DIGITALOCEAN_TOKEN",
    "OS_USERNAME",
    "OS_PASSWORD",
    "OS_TOKEN",
    "OS_APPLICATION_CREDENTIAL_SECRET",
    "GCE_SERVICE_ACCOUNT",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "METAL_AUTH_TOKEN",
    "LINODE_TOKEN",
    "VULTR_API_KEY",
    "SCW_ACCESS_KEY",
    "SCW_SECRET_KEY",
    "LIBCLOUD_KEY",
    "LIBCLOUD_SECRET",
)
# Shorter values are not registered: masking every "admin" or "web" in every text would
# corrupt server ids in the journal. Patterns still apply to them.
MIN_SECRET_LENGTH = 6

# --- key names ------------------------------------------------------------------------------
_SECRET_PARTS = (
    "password",
    "passwd",
    "passphrase",
    "secret",
    "token",
    "apikey",
    "accesskey",
    "privatekey",
    "sshkey",
    "authorization",
    "credential",
    "session",
    "cookie",
    "bearer",
)
_SECRET_EXACT = frozenset({"pwd", "pass", "pw", "auth", "signature", "xamzsignature", "sig"})
_SQUASH = re.compile(r"[^a-z0-9]")
_key_cache: dict[str, bool] = {}


def is_secret_key(key: object) -> bool:
    """Whether a field, argument or header of this name holds a secret."""
    if not isinstance(key, str):
        return False
    cached = _key_cache.get(key)
    if cached is not None:
        return cached
    squashed = _SQUASH.sub("", key.lower())
    secret = (
        squashed in _SECRET_EXACT
        or any(part in squashed for part in _SECRET_PARTS)
        or (squashed.startswith("auth") and not squashed.startswith("author"))
        or squashed.endswith("auth")
    )
    if len(_key_cache) < 10_000:
        _key_cache[key] = secret
    return secret


def _only_token(key: str) -> bool:
    squashed = _SQUASH.sub("", key.lower())
    return "token" in squashed and not any(
        part in squashed.replace("token", "") for part in _SECRET_PARTS
    )


def _mask_value(key: str, value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and _only_token(key):
        return value  # a fencing token or counter, not a credential
    return MASK


# --- known values --------------------------------------------------------------------------
class _Known:
    """The exact secret values registered so far, as one compiled alternation."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values: set[str] = set()
        self.pattern: re.Pattern[str] | None = None
        self.env_read = False
        self.cache: dict[str, str] = {}  # redact_text's results, valid for these values

    def add(self, values: Iterable[str | None]) -> None:
        fresh = {v for v in values if isinstance(v, str) and len(v) >= MIN_SECRET_LENGTH}
        with self.lock:
            if fresh <= self.values:
                return
            self.values.update(fresh)
            ordered = sorted(self.values, key=len, reverse=True)  # longest first
            self.pattern = re.compile("|".join(re.escape(v) for v in ordered))
            self.cache = {}

    def clear(self) -> None:
        with self.lock:
            self.values.clear()
            self.pattern = None
            self.env_read = False
            self.cache = {}


_KNOWN = _Known()


def register_secret(*values: str | None) -> None:
    """Mask these exact values wherever they appear from now on (credentials read from a
    file, tokens minted at run time)."""
    _KNOWN.add(values)


def register_secrets_from_env(
    environ: Mapping[str, str] | None = None, names: Iterable[str] = CREDENTIAL_ENV_VARS
) -> int:
    """Register the values of the credential variables that are set; how many were.
    Called by the CLI at start; the first ``redact_text`` does it if nobody did."""
    env = os.environ if environ is None else environ
    values = [env[n] for n in names if env.get(n)]
    _KNOWN.add(values)
    _KNOWN.env_read = True
    return len([v for v in values if len(v) >= MIN_SECRET_LENGTH])


def clear_registered() -> None:
    """Forget every registered value (tests)."""
    _KNOWN.clear()


# --- free text -----------------------------------------------------------------------------
_PEM = re.compile(
    r"(-----BEGIN (?P<kind>[A-Z0-9 ]*PRIVATE KEY)-----)[\s\S]*?(?:-----END (?P=kind)-----|\Z)"
)
_URL_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*:)[^/\s@]+@")
_BEARER = re.compile(r"(?P<scheme>\b(?:Bearer|Basic|Digest|Negotiate))\s+[A-Za-z0-9._~+/=-]{6,}")
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|ABIA|ACCA)[A-Z0-9]{16}\b")
# The words a secret-looking key contains; is_secret_key has the last word on a match.
_WORDS = (
    r"pass|pwd|pw|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|ssh[_-]?key|auth"
    r"|credential|session|cookie|bearer|sig"
)
# A cheap test before the key/value pass: does any secret-looking word occur at all?
_HINT = re.compile(_WORDS, re.IGNORECASE)
_PAIR = re.compile(
    rf"""(?P<q>\\?["']?)(?P<key>[A-Za-z0-9_.-]*(?:{_WORDS})[A-Za-z0-9_.-]*)(?P=q)
        (?P<sep>\s*[:=]\s*)
        (?P<scheme>(?:Bearer|Basic|Digest|Token|Negotiate|AWS4-HMAC-SHA256)\s+)?
        (?P<val>\\"(?:[^\\]|\\[^"])*?\\"|"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[^\s,;&"'<>(){{}}\[\]]+)""",
    re.VERBOSE | re.IGNORECASE,
)
_NOT_SECRET = frozenset({"null", "None", "true", "false", "True", "False", '""', "''"})


def _pair(m: re.Match[str]) -> str:
    key = m.group("key")
    if not is_secret_key(key):
        return m.group(0)
    val = m.group("val")
    sep = m.group("sep")
    if ":" in sep and not m.group("q") and "." in key and not m.group("scheme"):
        return m.group(0)  # `stacks.x.libcloud.driver_args.api_key: unknown key` names a field
    if val in _NOT_SECRET or (val.isdigit() and _only_token(key)):
        return m.group(0)  # "token: 7" is a fencing token; "password: null" says nothing
    if val.startswith('\\"'):
        masked = f'\\"{MASK}\\"'
    elif val[:1] in "\"'":
        masked = f"{val[0]}{MASK}{val[0]}"
    else:
        masked = MASK
    return f"{m.group('q')}{key}{m.group('q')}{sep}{m.group('scheme') or ''}{masked}"


def redact_text(text: str) -> str:
    """The text with every secret the patterns or the registered values find masked."""
    if not text:
        return text
    if not _KNOWN.env_read:
        register_secrets_from_env()
    if len(text) > _CACHE_TEXT:
        return _redact_text(text)
    cache = _KNOWN.cache
    done = cache.get(text)
    if done is None:
        done = _redact_text(text)
        if len(cache) >= _CACHE_SIZE:
            cache.clear()
        cache[text] = done
    return done


# Server ids, step keys and states repeat in every journal write: short texts are cached.
_CACHE_TEXT, _CACHE_SIZE = 256, 8192


def _redact_text(text: str) -> str:
    known = _KNOWN.pattern
    if known is not None:
        text = known.sub(MASK, text)
    if "-----BEGIN" in text:
        text = _PEM.sub(lambda m: f"{m.group(1)}{MASK}-----END {m.group('kind')}-----", text)
    if "://" in text:
        text = _URL_USERINFO.sub(lambda m: f"{m.group('head')}{MASK}@", text)
    if _HINT.search(text) is not None:
        text = _PAIR.sub(_pair, text)
        text = _BEARER.sub(lambda m: f"{m.group('scheme')} {MASK}", text)
    return _AWS_KEY_ID.sub(MASK, text)


# --- structures ----------------------------------------------------------------------------
def redact(value: Any, *, stringify: bool = False) -> Any:
    """A copy of `value` with secrets masked: values under secret-looking keys at any depth
    of dicts, lists, tuples and sets, and secrets inside every string (``redact_text``).
    An exception becomes its redacted message. Other objects are kept as they are, or,
    with `stringify`, replaced by their redacted ``str`` (for renderers that would print
    them anyway)."""
    if isinstance(value, str):
        return redact_text(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, Mapping):
        return {
            k: _mask_value(k, v) if is_secret_key(k) else redact(v, stringify=stringify)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v, stringify=stringify) for v in value]
    if isinstance(value, tuple):
        return tuple(redact(v, stringify=stringify) for v in value)
    if isinstance(value, (set, frozenset)):
        return [redact(v, stringify=stringify) for v in value]
    if isinstance(value, BaseException):
        return redact_text(str(value)) or type(value).__name__
    if isinstance(value, (bytes, bytearray)):
        return redact_text(bytes(value).decode("utf-8", "replace"))
    if stringify:
        return redact_text(str(value))
    return value
