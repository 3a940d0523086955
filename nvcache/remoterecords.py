"""The value of a record in the remote tier (Redis): its stored form, its checksum, its name, a tag.

One value, big-endian, under the key ``prefix + name``::

    magic    4  b"nvR1"  (format 1 of remote values; another magic is rejected, not guessed at)
    flags    1  bit 0: a tag follows the body (TAGGED); other bits must be 0
    encoding 1  0 raw, 1 a zstd frame without dictionary (the local store's numbers, codec.py)
    name_len 2  length of the record name
    body_len 4  length of the stored bytes
    check    8  xxh3-64 of the stored bytes (as the core checks its own stored bytes)
    name        the record name (``layer_id + b"_" + kind``, names.record_name)
    body        the stored bytes
    tag     32  (when TAGGED) keyed BLAKE2b-256 of everything above: header, name and body

**What is authenticated.** With a key (``remote_key=`` / ``NVCACHE_REMOTE_KEY``), every value
written carries the tag and every value read must carry a tag that verifies under the key: a
value that someone without the key wrote or changed (a bit flipped, bytes cut, an encoding or
length changed, a valid value of another record copied under this name) is rejected before its
body is looked at. Then the name in the value must be the name asked for: the tag covers the
name, so a value copied from another key is caught by that check. What the tag does not stop:
anyone holding the key can write anything, and a value can be replayed under its own name (an
older record of the same name: layer records of one name are meant to be the same analysis,
so this replaces a record with another valid one of the same name).

**Without a key**, only the magic, the lengths, the name and the checksum are checked: that
catches truncation, a value written under the wrong key and bit rot, not someone who can write
to the server (a poisoned record, with a correct checksum, passes and hides what it leaves out).
So without a key the tier trusts everyone who can write to that Redis (and the network to it,
unless ``rediss://``). A tagged value read by a node without a key is accepted on its checksum.

**Dictionaries.** A local record compressed with a dictionary (encoding n >= 2) can only be
decoded with that file's dictionary n - 1, which another node does not have (dictionaries are
trained from each cache's own records and numbered per file; numbers restart in a rebuilt
file). So the remote form is never dictionary-compressed: encoding 1 (zstd without dictionary,
the level the local store uses for that size) or 0 (raw, when zstd does not make it smaller).
Shipping dictionaries as well would need a registry of dictionaries by content on the server and
a fetch on first sight, for about 10 % of the bytes (DEVELOPERS.md, "Compression": 1.012x gzip's
bytes without a dictionary at level 6, 0.899x with one); not worth it before measured traffic
says so. A record the local store holds as encoding 0 or 1 can travel as it is stored
(:func:`encode_stored`); others are encoded again from their bytes (:func:`encode_value`), and a
value read back is decoded here and re-encoded by the local store with its own dictionary.

A value is decoded only with its content size known and at most ``max_record`` bytes, so a
forged frame cannot make a node allocate more than that.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Any, Optional, Tuple, Union

import xxhash
import zstandard

from .codec import RAW, Codec

MAGIC = b"nvR1"
TAGGED = 0x01
ZSTD = 1  # encoding: a zstd frame made without dictionary (codec.py's "dictionary 0")
HEADER = struct.Struct(">4sBBHIQ")
TAG_SIZE = 32
KEY_MAX = 64  # BLAKE2b takes a key of at most 64 bytes
KEY_MIN = 16  # a shorter secret is a configuration mistake, not a key
_PERSON = b"nvcache-remote1"  # BLAKE2b personalisation: a tag made for anything else never verifies

KeyLike = Union[str, bytes, bytearray]

# A codec that never has a dictionary: its encode(data, 0) gives exactly encoding 0 or 1, and it
# keeps one zstd context per thread and level as the local store does (contexts are not
# thread-safe).
_codec = Codec(lambda number: None)


class BadValue(ValueError):
    """A remote value that must not be used; ``str()`` says why (logged, counted, deleted)."""


class TooLarge(ValueError):
    """A value whose record is larger than the reader's ``max_record``: not used, not deleted
    (another node may take records that large)."""


def make_key(secret: Optional[KeyLike]) -> Optional[bytes]:
    """The BLAKE2b key for ``secret`` (None: no key). A str is taken as UTF-8. A secret longer
    than BLAKE2b's 64-byte key is hashed down to 64 bytes first (as HMAC shortens long keys);
    one shorter than 16 bytes raises ValueError: it would be guessable."""
    if secret is None:
        return None
    if not isinstance(secret, (str, bytes, bytearray)):  # bytes(32) would be 32 zero bytes: public
        raise TypeError(f"remote_key must be str or bytes, not {type(secret).__name__}")
    raw = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if len(raw) < KEY_MIN:
        raise ValueError(f"remote_key must be at least {KEY_MIN} bytes, got {len(raw)}")
    if len(raw) > KEY_MAX:
        raw = hashlib.blake2b(raw, digest_size=KEY_MAX, person=b"nvcache-keylong").digest()
    return raw


def _tag(key: bytes, signed: Any) -> bytes:
    return hashlib.blake2b(signed, digest_size=TAG_SIZE, key=key, person=_PERSON).digest()


def encode_stored(name: bytes, encoding: int, stored: Any, key: Optional[bytes]) -> bytes:
    """The remote value of a record already in its remote form (``encoding`` 0 or 1)."""
    if encoding not in (RAW, ZSTD):
        raise ValueError(f"a remote value is raw (0) or zstd without dictionary (1), not {encoding}")
    body = bytes(stored)
    head = HEADER.pack(MAGIC, TAGGED if key is not None else 0, encoding, len(name), len(body),
                       xxhash.xxh3_64_intdigest(body))
    signed = b"".join((head, name, body))
    return signed + _tag(key, signed) if key is not None else signed


def encode_value(name: bytes, data: Any, key: Optional[bytes]) -> bytes:
    """The remote value of record ``name`` with bytes ``data`` (compressed here, no dictionary)."""
    encoding, stored = _codec.encode(data, 0)
    return encode_stored(name, encoding, stored, key)


def check_value(name: bytes, value: bytes, key: Optional[bytes]) -> Tuple[int, memoryview]:
    """(encoding, stored bytes) of a remote value read for ``name``; BadValue says what is wrong."""
    n = len(value)
    if n < HEADER.size:
        raise BadValue(f"truncated: {n} bytes, shorter than the {HEADER.size}-byte header")
    magic, flags, encoding, name_len, body_len, check = HEADER.unpack_from(value)
    if magic != MAGIC:
        raise BadValue(f"not an nvcache remote value (magic {magic!r})")
    if flags & ~TAGGED:
        raise BadValue(f"unknown flags {flags:#x}")
    tagged = bool(flags & TAGGED)
    end = HEADER.size + name_len + body_len
    want = end + (TAG_SIZE if tagged else 0)
    if n != want:
        raise BadValue(f"{'truncated' if n < want else 'trailing bytes'}: {n} bytes, the header says {want}")
    view = memoryview(value)
    if key is not None:
        # The tag first: nothing of a value someone forged is believed, not even its name.
        if not tagged:
            raise BadValue("no tag, and this tier has a key")
        if not hmac.compare_digest(_tag(key, view[:end]), view[end:]):
            raise BadValue("bad tag (changed, or written with another key)")
    if view[HEADER.size:HEADER.size + name_len] != name:
        raise BadValue(f"wrong name: the value is record {bytes(view[HEADER.size:HEADER.size + name_len])[:80]!r}")
    body = view[HEADER.size + name_len:end]
    if xxhash.xxh3_64_intdigest(body) != check:
        raise BadValue("bad checksum")
    if encoding not in (RAW, ZSTD):
        raise BadValue(f"unknown encoding {encoding}")
    return encoding, body


def decode_value(name: bytes, value: bytes, key: Optional[bytes], max_record: int) -> bytes:
    """The record bytes in a remote value read for ``name``; BadValue when it must not be used."""
    encoding, body = check_value(name, value, key)
    if encoding == RAW:
        if len(body) > max_record:
            raise TooLarge(f"record of {len(body)} bytes, above max_record {max_record}")
        return bytes(body)
    stored = bytes(body)
    try:
        size = zstandard.frame_content_size(stored)
    except zstandard.ZstdError:
        raise BadValue("not a zstd frame") from None
    if size < 0:  # unknown: this module always writes it, so someone else made the frame
        raise BadValue("zstd frame without its content size")
    if size > max_record:
        raise TooLarge(f"zstd frame of content size {size}, above max_record {max_record}")
    data = _codec.decode(ZSTD, stored)
    if data is None or len(data) != size:
        raise BadValue("zstd frame that does not decode")
    return data
