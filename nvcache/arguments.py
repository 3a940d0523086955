"""Argument checks of the API front: bounds in MiB, counts, records (pure functions).

:mod:`nvcache.cache` applies them before anything is touched; the CLI and the import's
target view use the same rules (``parse_mib`` for a bound written as text).
"""

from __future__ import annotations

import math
import re
import threading
from typing import Any, Callable, Iterable, List, Tuple, Union
from urllib.parse import urlsplit

MAX_MB = 1 << 20  # 1 TiB of records: the LMDB map (address space) stays well inside 64-bit limits
DEFAULT_MB = 1000  # a new cache's bound when the opener gives none (the CLI's read-only commands)
_PLAIN_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")


def parse_mib(raw: str) -> float:
    """A bound written as text (``MAX_CACHE_RECORD_MB``, ``--max-mb``): plain decimals only, since
    float() would also take '1_0', '1e3' and 'inf'. ValueError otherwise."""
    raw = raw.strip()
    if not _PLAIN_DECIMAL.fullmatch(raw):
        raise ValueError(f"{raw!r} is not a plain decimal number (like 1000 or 0.5)")
    return float(raw)


def env_mib(environ: Any, name: str) -> float:
    """The MiB in environment variable ``name`` (unset or empty: 0), checked like ``max_mb``."""
    raw = environ.get(name, "").strip()
    try:
        max_mb = parse_mib(raw) if raw else 0.0
    except ValueError as exc:
        raise ValueError(f"{name} must be a plain decimal number of MiB: {exc}") from None
    bound_bytes(max_mb, name)  # its ValueError names the variable
    return max_mb


def bound_bytes(max_mb: object, what: str = "max_mb") -> int:
    if isinstance(max_mb, bool) or not isinstance(max_mb, (int, float)):
        raise TypeError(f"{what} must be a number of MiB, not {type(max_mb).__name__}")
    if not math.isfinite(max_mb) or not 0 <= max_mb <= MAX_MB:
        raise ValueError(f"{what} must be a finite number of MiB in [0, {MAX_MB}], got {max_mb!r}")
    max_bytes = int(max_mb * 1024 * 1024)
    if max_mb > 0 and max_bytes == 0:  # 0 disables the cache; a positive bound must hold a byte
        raise ValueError(f"{what} must be 0 (disabled) or at least one byte (1/1048576 MiB), got {max_mb!r}")
    return max_bytes


def mib_text(max_bytes: int) -> str:
    mib = max_bytes / (1 << 20)
    return f"{mib:g} MiB" if mib >= 1 else f"{max_bytes} bytes"


def count_arg(what: str, value: object, limit: int) -> int:
    """``value`` as a count in [0, ``limit``): TypeError for a non-int (bool included), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be int, not {type(value).__name__}")
    if not 0 <= value < limit:
        raise ValueError(f"{what} must be in [0, 2**{limit.bit_length() - 1}), got {value}")
    return value


def as_record(record: object) -> Union[bytes, bytearray]:
    if isinstance(record, (bytes, bytearray)):
        return record
    if isinstance(record, memoryview):
        return record.tobytes()  # any shape or format: its bytes, as len() of them
    raise TypeError(f"record must be bytes, bytearray or memoryview, not {type(record).__name__}")


def flag(what: str, value: object) -> bool:
    """``value`` when it is True or False; TypeError otherwise (1, None and "yes" included)."""
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be True or False, not {type(value).__name__}")
    return value


def seconds(what: str, value: object) -> float:
    """A wait in seconds, from 0 to the longest a lock can wait: TypeError / ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, not {type(value).__name__}")
    if not 0 <= value <= threading.TIMEOUT_MAX:
        raise ValueError(f"{what} must be between 0 and {int(threading.TIMEOUT_MAX)} seconds, got {value!r}")
    return float(value)


def history_entries(records: Iterable[Any], key: Callable[[str, str], bytes]) -> List[Tuple[bytes, int, int]]:
    """``merge_history``'s records, each (layer_id, kind, reference_count, last_referred_ns)
    checked, as (record key, reference count, last reference)."""
    if isinstance(records, (str, bytes)):
        raise TypeError("records must be an iterable of (layer_id, kind, reference_count, last_referred_ns)")
    entries: List[Tuple[bytes, int, int]] = []
    for record in records:
        if not isinstance(record, tuple) or len(record) != 4:
            raise TypeError(f"each record must be a tuple (layer_id, kind, reference_count, "
                            f"last_referred_ns), got {record!r:.80}")
        layer_id, kind, refs, last_ns = record
        record_key = key(layer_id, kind)
        count_arg("reference_count", refs, 1 << 64)
        if count_arg("last_referred_ns", last_ns, 1 << 64) == 0:
            raise ValueError("last_referred_ns must be > 0")
        entries.append((record_key, refs, last_ns))
    return entries


# -- remote tier URLs -------------------------------------------------------------------------
REMOTE_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
_QUERY_SECRET = re.compile(r"(?i)((?:^|&)(?:password|pass|auth)=)[^&]*")


def redact(url: str) -> str:
    """``url`` without its password (``redis://user:***@host:port/0``, ``unix://...?password=***``),
    to name a tier in messages and labels; the rest as given."""
    head, sep, query = url.partition("?")
    scheme, slashes, rest = head.partition("://")
    if slashes:
        netloc, slash, path = rest.partition("/")
        if "@" in netloc:
            userinfo, hosts = netloc.rsplit("@", 1)
            user, colon, _password = userinfo.partition(":")
            # A lone userinfo is redis-py's username, but may be a password written the wrong way.
            netloc = f"{user}:***@{hosts}" if colon else f"***@{hosts}"
        head = f"{scheme}://{netloc}{slash}{path}"
    return head + sep + _QUERY_SECRET.sub(r"\1***", query)


def cluster_nodes(url: str) -> List[Tuple[str, int]]:
    """The (host, port) pairs of a ``redis+cluster://`` URL's host list; ValueError otherwise."""
    nodes = []
    for item in urlsplit(url).netloc.rsplit("@", 1)[-1].split(","):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"a cluster URL lists host:port pairs, got {item!r} in {redact(url)!r}")
        nodes.append((host.strip("[]"), int(port)))
    return nodes


def remote_url(url: object) -> str:
    """A remote tier's URL, checked before anything connects: TypeError for a non-str, ValueError
    (naming the URL without its password) for a scheme, host, port or socket path that cannot
    work. redis-py reads the rest (database, options) when it connects."""
    if not isinstance(url, str):
        raise TypeError(f"remote must be a URL string, not {type(url).__name__}")
    scheme, sep, _rest = url.partition("://")
    if not sep or scheme.lower() not in REMOTE_SCHEMES:
        raise ValueError(f"remote URL must be redis://, rediss://, unix:// or redis+cluster://, got {redact(url)!r}")
    if scheme.lower().endswith("+cluster"):
        cluster_nodes(url)
        return url
    parts = urlsplit(url)
    try:
        port = parts.port  # ValueError for a port that is not a number in range
    except ValueError:
        raise ValueError(f"remote URL has a bad port: {redact(url)!r}") from None
    if scheme.lower() == "unix":
        if not parts.path or port is not None:
            raise ValueError(f"a unix:// URL names a socket path, got {redact(url)!r}")
    elif not parts.hostname:
        raise ValueError(f"remote URL has no host: {redact(url)!r}")
    return url
