"""Argument checks of the API front: bounds in MiB, counts, records (pure functions).

:mod:`nvcache.cache` applies them before anything is touched; the CLI and the import's
target view use the same rules (``parse_mib`` for a bound written as text).
"""

from __future__ import annotations

import math
import re
import threading
from typing import Any, Callable, Iterable, List, Tuple, Union

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
