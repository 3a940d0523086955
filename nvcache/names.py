"""Record names: validating a layer id and kind, and the ``keep`` argument (pure Python).

fallback.py exports these as its own (the compiled core has C twins of
``record_name`` and the keys; ``keep_set`` is shared by both cores).
"""

from __future__ import annotations

from typing import Dict, Tuple

import xxhash

MAX_LAYER_ID = 1024
MAX_KIND = 32

# Deleting every allowed byte leaves only the offending ones.
_PRINTABLE = bytes(range(0x21, 0x7F))
_KIND_CHARS = b"abcdefghijklmnopqrstuvwxyz0123456789_"
_valid_kinds: Dict[str, bytes] = {}


def _check_kind(kind: object) -> bytes:
    if not isinstance(kind, str):
        raise TypeError(f"kind must be str, not {type(kind).__name__}")
    if not 1 <= len(kind) <= MAX_KIND or not kind.isascii():
        raise ValueError(f"kind must be 1-{MAX_KIND} characters of [a-z0-9_], got {kind!r}")
    raw = kind.encode("ascii")
    if raw.translate(None, _KIND_CHARS):
        raise ValueError(f"kind must be 1-{MAX_KIND} characters of [a-z0-9_], got {kind!r}")
    if len(_valid_kinds) < 256:  # a handful of kinds exist; never grow without bound
        _valid_kinds[kind] = raw
    return raw


def layer_id_bytes(layer_id: object, what: str = "layer_id") -> bytes:
    """Validate a layer id (1-1024 printable ASCII characters, no whitespace); return its bytes."""
    if not isinstance(layer_id, str):
        raise TypeError(f"{what} must be str, not {type(layer_id).__name__}")
    n = len(layer_id)
    if not 1 <= n <= MAX_LAYER_ID:
        raise ValueError(f"{what} must be 1-{MAX_LAYER_ID} characters, got {n}")
    if not layer_id.isascii():
        raise ValueError(f"{what} must be printable ASCII without whitespace, got {layer_id!r}")
    raw = layer_id.encode("ascii")
    if raw.translate(None, _PRINTABLE):
        raise ValueError(f"{what} must be printable ASCII without whitespace, got {layer_id!r}")
    return raw


def record_name(layer_id: object, kind: object) -> Tuple[bytes, int]:
    """Validate ``layer_id`` and ``kind``; return (``layer_id_kind`` as bytes, len(layer_id))."""
    raw = layer_id_bytes(layer_id)
    k = _valid_kinds.get(kind) if type(kind) is str else None  # type: ignore[arg-type]
    if k is None:
        k = _check_kind(kind)
    return raw + b"_" + k, len(raw)



def keep_set(keep: object) -> frozenset:
    """The layer ids of ``keep``, each validated like a layer id, as a frozenset of bytes."""
    if isinstance(keep, str):
        raise TypeError("keep must be an iterable of layer_id strings, not a single string")
    if isinstance(keep, (bytes, bytearray, memoryview)):
        raise TypeError(f"keep must be an iterable of layer_id strings, not {type(keep).__name__}")
    try:
        items = list(keep)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(f"keep must be an iterable of layer_id strings, not {type(keep).__name__}") from None
    return frozenset(layer_id_bytes(item, "each layer id in keep") for item in items)


def record_key(layer_id: object, kind: object) -> bytes:
    """Validate ``layer_id`` and ``kind``; return the record's LMDB key (xxh3-128 of its name)."""
    return xxhash.xxh3_128_digest(record_name(layer_id, kind)[0])


def name_key(name: bytes) -> bytes:
    """The LMDB key of a record name: its 16-byte xxh3-128 digest."""
    return xxhash.xxh3_128_digest(name)
