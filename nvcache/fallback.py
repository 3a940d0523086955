"""The hot index, in pure Python: the twin of ``ext/_index.pyx``, and its specification.

Both modules define the same names with the same behaviour and write the
same bytes; the package's ``__init__`` picks one (``NVCACHE_NO_EXTENSIONS=1``
forces this one) and the test suite runs over both. ``tests/test_twins.py``
compares the compiled core's C paths with this module. The Index works
inside transactions the store opened and locked (it never locks, opens or
commits); the Reader takes the read lock itself (the flock, or the compiled
twin's readers-table slot) because a get is one call.

LMDB layout (format 8; one environment, five named databases):

``idx``  key -> header ``<QQQQQQH`` (size, refs, last_ns, checksum, born_ns,
         rank, layer_id length) followed by the record's full name. The key is
         the 16-byte xxh3-128 of the name, since LMDB keys stop at 511 bytes.
         ``born_ns``: CLOCK_REALTIME ns when this record was inserted (also
         for imports, which set last_ns): buffered references apply only to
         the record they were counted against. ``rank``: the record's place in
         the eviction order, as its policy last set it (the key of its ``lru``
         entry).
``dat``  key + big-endian u32 chunk number -> the record's stored bytes, in
         chunks of at most ``CHUNK_SIZE``; chunk 0 starts with ``<QQQ``
         (size word, checksum, born_ns), so a get reads ``dat`` alone (one
         B-tree lookup for most records) and knows which record it counted.
         The size word's low 48 bits are the stored size, its high 16 bits
         the encoding (``ENC_SHIFT``): 0 raw; n >= 1 a zstd frame made with
         dictionary n - 1 of this file (0: none; see :mod:`nvcache.codec`).
         Format-6 files written before compression have only raw records; a
         release that predates it reads an encoded record as damaged, never
         as its record. Size and checksum are of the stored bytes. A chunk value
         is at most 65,504 bytes (16 pages with LMDB's node header): a large
         record never needs a long run of free pages, which would fragment
         the file under churn of mixed sizes.
``lru``  big-endian rank + key -> b"": the eviction order of the policy (LRU:
         the rank is last_ns), so a cursor walk from the first entry meets
         the next victim first; equal ranks are ordered by name.
``ghost`` big-endian u32 slot -> key + ``<QQ`` (rank, the file's eviction count
         with it): what a policy with ghosts (LRFU) remembers of evicted
         records, one per slot (the slot is the key's first 32 bits modulo
         ``GHOST_SLOTS``; a later eviction to the same slot overwrites it). A
         put of that key takes it, and starts from its rank if fewer than
         ``GHOST_WINDOW`` × (records held) evictions happened since.
``meta`` ``records`` -> ``<QQ`` (count, total stored bytes), ``access`` ->
         ``<QQ`` (hits, misses), ``evictions`` -> ``<Q``, ``bound`` -> ``<Q``
         the cache's bound in stored bytes (every write obeys it); the compression
         dictionaries: ``dict`` + big-endian u16 n -> ``<Q`` xxh3-64 of the
         dictionary, then the dictionary (written once, never changed),
         ``dictionary`` -> ``<H`` the one new records are compressed with,
         ``policy`` -> the ascii name of the cache's eviction policy (set at
         creation, never changed: a key of ``POLICIES``), and
         ``trainings`` -> ``<H`` how many trainings processes have claimed;
         the tallies (``TALLIES``: absent until first added to, saturating u64s):
         ``flight`` -> ``<QQQ`` get_or_create's waits, takeovers and nanoseconds waited
         (:mod:`nvcache.flight`); ``remote`` -> 9 × ``<Q`` the remote tier's counters
         (``REMOTE_TALLY``'s names, :mod:`nvcache.fleet`).
"""

from __future__ import annotations

import struct
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import xxhash

from .errors import CacheFull
from .accessbuffer import AccessBuffer  # noqa: F401 (this core's buffer)
from .names import MAX_KIND, MAX_LAYER_ID, keep_set, name_key, record_key, record_name  # noqa: F401 (this core's names)
from .policy import DEFAULT_POLICY, LRU, LRFU, POLICIES, policy_named  # noqa: F401 (this core's policies)
from .fallbackio import FAST_READS, Reader, Writer, link_count  # noqa: F401 (this core's transactions)

KEY_SIZE = 16

# The idx header, defined once: size, refs, last_ns, checksum, born_ns, rank, layer_id length.
_HDR = struct.Struct("<QQQQQQH")
HEADER_SIZE = _HDR.size  # 50
_TS = struct.Struct(">Q")  # the rank in front of an lru key
RANK_SIZE = _TS.size
_PAIR = struct.Struct("<QQ")
_U64 = struct.Struct("<Q")

U64_MAX = (1 << 64) - 1  # counters saturate rather than wrap
_PREFIX = struct.Struct("<QQQ")  # size, checksum, born_ns: in front of chunk 0
PREFIX_SIZE = _PREFIX.size  # 24
CHUNK_SIZE = 65536 - 32 - PREFIX_SIZE  # record bytes per chunk: chunk 0's value stays <= 65,504 bytes
_CHUNK = struct.Struct(">I")
_FIRST_CHUNK = _CHUNK.pack(0)
RECORDS = b"records"
ACCESS = b"access"
EVICTIONS = b"evictions"
MAX_RECORD = 1 << 40  # the largest bound (arguments.MAX_MB); a larger stored size is a damaged header
ENC_SHIFT = 48  # the size word in chunk 0's prefix: the encoding above, the size below
SIZE_MASK = (1 << ENC_SHIFT) - 1
DICT_PREFIX = b"dict"
CURRENT_DICT = b"dictionary"
TRAININGS = b"trainings"
# Tallies: counters that only ever grow, one little-endian u64 each, by meta key.
REMOTE_TALLY = ("remote_hits", "remote_misses", "remote_errors", "remote_skipped", "remote_rejected",
                "remote_puts", "fleet_claims", "fleet_waits", "fleet_takeovers")
TALLIES: Dict[bytes, struct.Struct] = {b"flight": struct.Struct("<3Q"),
                                       b"remote": struct.Struct(f"<{len(REMOTE_TALLY)}Q")}
BOUND = b"bound"  # the cache's bound in stored bytes (<Q): one bound per cache, whoever opened it
POLICY_KEY = b"policy"  # the cache's policy's name (ascii)
GHOST_SLOTS = 1 << 16  # slots of the ghost table (a power of two)
GHOST_WINDOW = 8  # a ghost counts for GHOST_WINDOW x (records held) evictions after its own
_SLOT = struct.Struct(">I")
_DICT_ID = struct.Struct(">H")
_U16 = struct.Struct("<H")

def checksum(data: Any) -> int:
    return xxhash.xxh3_64_intdigest(data)


def pack_header(size: int, refs: int, last_ns: int, check: int, born_ns: int, rank: int, lid_len: int,
                name: bytes) -> bytes:
    return _HDR.pack(size, refs, last_ns, check, born_ns, rank, lid_len) + name


def unpack_header(hdr: bytes) -> Tuple[int, int, int, int, int, int, int, bytes]:
    """(size, refs, last_ns, checksum, born_ns, rank, layer_id length, name) of an ``idx`` value."""
    if len(hdr) <= HEADER_SIZE:
        raise ValueError("index header too short")
    return _HDR.unpack_from(hdr) + (bytes(hdr[HEADER_SIZE:]),)


def lru_key(rank: int, key: bytes) -> bytes:
    return _TS.pack(rank) + key


def rfc3339nano(ns: int) -> str:
    """UTC time of ``ns`` (nanoseconds since the epoch) as Go's RFC3339Nano formats it."""
    secs, frac = divmod(ns, 1_000_000_000)
    t = time.gmtime(secs)
    text = "%04d-%02d-%02dT%02d:%02d:%02d" % (t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec)
    if frac:
        text += (".%09d" % frac).rstrip("0")
    return text + "Z"


def chunk_count(size: int) -> int:
    return (size + CHUNK_SIZE - 1) // CHUNK_SIZE or 1


def read_record(txn: Any, dat: Any, key: bytes) -> Tuple[Any, int, int]:
    """(stored bytes, born_ns, encoding) from ``dat`` alone: (None, 0, 0) without chunk 0,
    (False, 0, 0) when damaged.

    Damaged: a short prefix, a missing or wrongly sized chunk, or bytes that
    fail the checksum in the prefix.
    """
    first = txn.get(key + _FIRST_CHUNK, None, dat)
    if first is None:
        return None, 0, 0
    if len(first) < PREFIX_SIZE:
        return False, 0, 0
    word, check, born = _PREFIX.unpack_from(first)
    size = word & SIZE_MASK
    if size <= CHUNK_SIZE:
        data = first[PREFIX_SIZE:]
    elif size > MAX_RECORD:
        return False, 0, 0
    else:
        parts = [first[PREFIX_SIZE:]]
        for i in range(1, chunk_count(size)):
            part = txn.get(key + _CHUNK.pack(i), None, dat)
            if part is None:
                return False, 0, 0
            parts.append(part)
        data = b"".join(parts)
    if len(data) != size or xxhash.xxh3_64_intdigest(data) != check:
        return False, 0, 0
    return data, born, word >> ENC_SHIFT


def read_prefix(txn: Any, dat: Any, key: bytes) -> Optional[Tuple[int, int, int, int]]:
    """(size, checksum, born_ns, encoding) from the front of chunk 0; None when missing or short."""
    first = txn.get(key + _FIRST_CHUNK, None, dat)
    if first is None or len(first) < PREFIX_SIZE:
        return None
    word, check, born = _PREFIX.unpack_from(first)
    return word & SIZE_MASK, check, born, word >> ENC_SHIFT


def write_chunks(txn: Any, dat: Any, key: bytes, data: Any, check: int, born_ns: int, enc: int) -> None:
    view = memoryview(data)
    txn.put(key + _FIRST_CHUNK, _PREFIX.pack(len(data) | enc << ENC_SHIFT, check, born_ns) + view[:CHUNK_SIZE],
            db=dat)
    for i in range(1, chunk_count(len(data))):
        txn.put(key + _CHUNK.pack(i), view[i * CHUNK_SIZE:(i + 1) * CHUNK_SIZE], db=dat)


def delete_chunks(txn: Any, dat: Any, key: bytes, size: int) -> None:
    if size > MAX_RECORD:  # else billions of deletes for one damaged header
        raise ValueError(f"a stored record size of {size} bytes: a damaged header")
    for i in range(chunk_count(size)):
        txn.delete(key + _CHUNK.pack(i), db=dat)


def ghost_slot(key: bytes) -> bytes:
    """The ghost table's key of a record key: its first 32 bits modulo GHOST_SLOTS, big-endian."""
    return _SLOT.pack(_SLOT.unpack_from(key)[0] % GHOST_SLOTS)


def _by_name(entry: Tuple[bytes, bytes]) -> bytes:
    return entry[1][HEADER_SIZE:]


class Index:
    """The record index over the five databases of one environment.

    Its writes follow ``policy`` (LRU until :meth:`use_policy` says the file's
    own, as the store's opening does); its reads do not depend on it.
    """

    def __init__(self, idx: Any, dat: Any, lru: Any, meta: Any, ghost: Any) -> None:
        self.idx = idx
        self.dat = dat
        self.lru = lru
        self.meta = meta
        self.ghost = ghost
        self.policy: Any = LRU

    # -- the policy -------------------------------------------------------------
    def use_policy(self, name: str) -> None:
        """Write by the policy ``name`` (a key of POLICIES) from now on."""
        self.policy = policy_named(name)

    def stored_policy(self, txn: Any) -> str:
        """The name of the policy this file was created with (ValueError: damaged or unknown)."""
        raw = txn.get(POLICY_KEY, None, self.meta)
        if raw is None:
            raise ValueError("the file records no eviction policy")
        return policy_named(bytes(raw).decode("ascii", "replace")).name  # type: ignore[no-any-return]

    def set_stored_policy(self, txn: Any, name: str) -> None:
        """Record the file's policy (at creation: the ranks of its records are that policy's)."""
        txn.put(POLICY_KEY, policy_named(name).name.encode("ascii"), db=self.meta)

    def _tick(self, txn: Any) -> int:
        """The file's request clock: hits + misses applied so far."""
        hits, misses = self._pair(txn, ACCESS)
        return min(hits + misses, U64_MAX)

    def _take_ghost(self, txn: Any, key: bytes, held: int) -> Optional[int]:
        """The rank ``key`` left in the ghost table when evicted, if still recent (see GHOST_WINDOW;
        ``held``: the records in the cache), removing it; None when absent or too old.

        Without the window a ghost would count however long ago it was evicted (slots are only
        overwritten by collisions), which measured worse than LRFU's history of recent victims."""
        slot = ghost_slot(key)
        raw = txn.get(slot, None, self.ghost)
        if raw is None or len(raw) != KEY_SIZE + _PAIR.size or bytes(raw[:KEY_SIZE]) != key:
            return None
        txn.delete(slot, db=self.ghost)
        rank, evicted_at = _PAIR.unpack_from(raw, KEY_SIZE)
        if not 0 <= self._evictions(txn) - evicted_at <= min(GHOST_WINDOW * max(1, held), U64_MAX):
            return None
        return int(rank)

    # -- counters: the one reader ---------------------------------------------
    def _pair(self, txn: Any, name: bytes) -> Tuple[int, int]:
        raw = txn.get(name, None, self.meta)
        if raw is None:
            return 0, 0
        if len(raw) != _PAIR.size:
            raise ValueError(f"counter {name!r} is malformed")
        return _PAIR.unpack(raw)  # type: ignore[return-value]

    def _evictions(self, txn: Any) -> int:
        raw = txn.get(EVICTIONS, None, self.meta)
        if raw is None:
            return 0
        if len(raw) != _U64.size:
            raise ValueError("counter b'evictions' is malformed")
        return int(_U64.unpack(raw)[0])

    def counters(self, txn: Any) -> Tuple[int, int, int, int, int]:
        """(record count, total bytes, hits, misses, evictions)."""
        return self._pair(txn, RECORDS) + self._pair(txn, ACCESS) + (self._evictions(txn),)  # type: ignore

    def records(self, txn: Any) -> Tuple[int, int]:
        """(record count, total bytes): the first two counters."""
        return self._pair(txn, RECORDS)

    def count(self, txn: Any) -> int:
        return self.records(txn)[0]

    # -- reads --------------------------------------------------------------
    def exists(self, txn: Any, key: bytes) -> bool:
        """Whether ``idx`` has an entry for ``key``."""
        return txn.get(key, None, self.idx) is not None

    contains = exists

    def history(self, txn: Any, key: bytes) -> Optional[Tuple[int, int, int]]:
        """(refs, last_ns, born_ns) from the ``idx`` header of ``key``; None when absent.

        A header too short to hold them also reads as None: ``apply`` skips
        such an entry too (verify reports it).
        """
        hdr = txn.get(key, None, self.idx)
        if hdr is None or len(hdr) <= HEADER_SIZE:
            return None
        _size, refs, last, _check, born, _rank, _lid = _HDR.unpack_from(hdr)
        return refs, last, born

    def lookup(self, txn: Any, key: bytes) -> Tuple[Any, int, int]:
        """(stored bytes, born_ns, encoding); (None, 0, 0) when absent; (False, 0, 0) when damaged.

        Damaged: bytes that fail their checksum, a missing chunk, or an index
        entry without bytes (``idx`` is read only when ``dat`` has none).
        """
        found = read_record(txn, self.dat, key)
        if found[0] is None and txn.get(key, None, self.idx) is not None:
            return False, 0, 0
        return found

    # -- compression dictionaries (cold: read once per process, written by training) ----------
    def dictionary(self, txn: Any, number: int) -> Optional[bytes]:
        """Dictionary ``number`` (>= 1) of this file; None when absent or damaged."""
        raw = txn.get(DICT_PREFIX + _DICT_ID.pack(number), None, self.meta)
        if raw is None or len(raw) <= _U64.size:
            return None
        body = bytes(raw[_U64.size:])
        return body if xxhash.xxh3_64_intdigest(body) == _U64.unpack_from(raw)[0] else None

    def current_dictionary(self, txn: Any) -> int:
        """The number of the dictionary new records are compressed with (0: none yet)."""
        raw = txn.get(CURRENT_DICT, None, self.meta)
        return int(_U16.unpack(raw)[0]) if raw is not None and len(raw) == _U16.size else 0

    def add_dictionary(self, txn: Any, body: bytes) -> int:
        """Store a new dictionary and make it the current one; returns its number."""
        number = self.current_dictionary(txn) + 1
        while txn.get(DICT_PREFIX + _DICT_ID.pack(number), None, self.meta) is not None:
            number += 1  # never reuse a number: records made with it may still exist
        if number > 0xFFFE:
            raise ValueError("no dictionary numbers left")
        txn.put(DICT_PREFIX + _DICT_ID.pack(number), _U64.pack(xxhash.xxh3_64_intdigest(body)) + body,
                db=self.meta)
        txn.put(CURRENT_DICT, _U16.pack(number), db=self.meta)
        return number

    def bound(self, txn: Any) -> int:
        """The cache's bound in stored bytes as recorded in the file (0: none recorded yet)."""
        raw = txn.get(BOUND, None, self.meta)
        return 0 if raw is None else int(_U64.unpack(raw)[0])  # malformed: struct.error, damage

    def set_bound(self, txn: Any, max_bytes: int) -> None:
        """Record the cache's bound; every process's next write evicts to it."""
        if not 0 < max_bytes <= MAX_RECORD:
            raise ValueError(f"a bound is between 1 byte and {MAX_RECORD}, not {max_bytes}")
        txn.put(BOUND, _U64.pack(max_bytes), db=self.meta)

    def trainings(self, txn: Any) -> int:
        """How many dictionary trainings processes have claimed in this file (one per generation)."""
        raw = txn.get(TRAININGS, None, self.meta)
        return int(_U16.unpack(raw)[0]) if raw is not None and len(raw) == _U16.size else 0

    def claim_training(self, txn: Any, seen: int) -> bool:
        """Claim the next training if ``seen`` is still the count of claimed ones (else another
        process claimed it first)."""
        if self.trainings(txn) != seen or seen >= 0xFFFF:
            return False
        txn.put(TRAININGS, _U16.pack(seen + 1), db=self.meta)
        return True

    def tally(self, txn: Any, name: bytes) -> Tuple[int, ...]:
        """The counters of tally ``name`` (a key of TALLIES) in this file; zeros when absent."""
        shape = TALLIES[name]
        raw = txn.get(name, None, self.meta)
        return shape.unpack(raw) if raw is not None and len(raw) == shape.size else (0,) * (shape.size // 8)

    def add_tally(self, txn: Any, name: bytes, values: Sequence[int]) -> None:
        """Add ``values`` to tally ``name`` (saturating, like the other counters)."""
        old = self.tally(txn, name)
        if len(values) != len(old):
            raise ValueError(f"tally {name!r} has {len(old)} counters, got {len(values)} values")
        txn.put(name, TALLIES[name].pack(*(min(U64_MAX, a + max(0, b)) for a, b in zip(old, values))), db=self.meta)

    def sample(self, txn: Any, start: bytes, limit: int) -> List[Tuple[Any, int]]:
        """Up to ``limit`` records (stored bytes, encoding) from key ``start`` on (wrapping):
        keys are hashes, so a random ``start`` gives a random sample."""
        out: List[Tuple[Any, int]] = []
        cur = txn.cursor(self.idx)
        try:
            for first in (True, False):
                more = cur.set_range(start) if first else cur.first()
                while more and len(out) < limit:
                    key = cur.key()
                    if not first and key >= start:
                        return out
                    data, _born, enc = read_record(txn, self.dat, key)
                    if type(data) is bytes:
                        out.append((data, enc))
                    more = cur.next()
        finally:
            cur.close()
        return out

    # -- the walk: the one home of the eviction order ----------------------------
    def walk(self, txn: Any, on_group: Callable[[List[Tuple[bytes, bytes]]], Any],
             on_orphan: Optional[Callable[[bytes], None]] = None) -> None:
        """Call ``on_group`` with each group of equal rank, next victim first, in name order
        (a policy without ``ties_by_name``: each record is its own group, in key order).

        A group is a list of (lru key, idx header), the record's key being
        ``lru key[RANK_SIZE:]``; ``on_group`` returning true stops the walk. An lru
        entry without its record goes to ``on_orphan`` (verify reports it;
        the others skip it).
        """
        by_name = self.policy.ties_by_name
        cur = txn.cursor(self.lru)
        try:
            more = cur.first()
            group: List[Tuple[bytes, bytes]] = []
            while more:
                lk = cur.key()
                more = cur.next()
                hdr = txn.get(lk[RANK_SIZE:], None, self.idx)
                if hdr is None or len(hdr) <= HEADER_SIZE:
                    if on_orphan is not None:
                        on_orphan(lk)
                    continue
                if group and (not by_name or lk[:RANK_SIZE] != group[0][0][:RANK_SIZE]):
                    if len(group) > 1:
                        group.sort(key=_by_name)
                    if on_group(group):
                        return
                    group = []
                group.append((lk, hdr))
            if group:
                if len(group) > 1:
                    group.sort(key=_by_name)
                on_group(group)
        finally:
            cur.close()

    def dump(self, txn: Any) -> List[Dict[str, Any]]:
        """The ``cache_records`` of the seed's dump, next victim first."""
        out: List[Dict[str, Any]] = []

        def add(group: List[Tuple[bytes, bytes]]) -> None:
            for _key, hdr in group:
                size, refs, last, _check, _born, _rank, _lid = _HDR.unpack_from(hdr)
                out.append({"last_referred": rfc3339nano(last), "layer_id": hdr[HEADER_SIZE:].decode("ascii"),
                            "reference_count": refs, "size": size})
        self.walk(txn, add)
        return out

    def cache_data(self, txn: Any) -> Dict[str, Any]:
        """The seed's ``cache-data`` dump."""
        _count, total, hits, misses, _evictions = self.counters(txn)
        return {"cache_hits": hits, "cache_misses": misses,
                "cache_records": self.dump(txn), "record_total_size": total}

    # -- writes -------------------------------------------------------------
    def victims(self, txn: Any, size: int, max_bytes: int, keep: frozenset) -> List[Tuple[bytes, int, int]]:
        """The records (key, rank, size) to evict so that ``size`` more bytes fit ``max_bytes``.

        [] when they fit. Walks the policy's order, skipping records of
        layers in ``keep``; raises CacheFull (nothing changes) when only kept
        records could make room.
        """
        over = self.records(txn)[1] + size - max_bytes
        chosen: List[Tuple[bytes, int, int]] = []
        if over <= 0:
            return chosen
        freed = [0]

        def take(group: List[Tuple[bytes, bytes]]) -> bool:
            for lk, hdr in group:
                vsize, _refs, _last, _check, _born, vrank, vlid = _HDR.unpack_from(hdr)
                if keep and hdr[HEADER_SIZE:HEADER_SIZE + vlid] in keep:
                    continue
                chosen.append((lk[RANK_SIZE:], vrank, vsize))  # vrank == the lru key's (else verify reports it)
                freed[0] += vsize
                if freed[0] >= over:
                    return True
            return False
        self.walk(txn, take)
        if freed[0] < over:
            raise CacheFull(f"cannot make room for {size} bytes within {max_bytes}: the rest is kept")
        return chosen

    def insert(self, txn: Any, key: bytes, name: bytes, lid_len: int, data: Any,
               victims: Sequence[Tuple[bytes, int, int]], refs: int = 0, last_ns: int = 0, enc: int = 0) -> int:
        """Evict ``victims`` (from :meth:`victims`, same transaction), then add the record.

        ``data`` are the stored bytes, ``enc`` their encoding (0: raw). The
        record is born now and starts with ``refs`` references, last
        referred at ``last_ns`` (0: now; imports restore both). Returns the
        number evicted, or -1 when the key exists (nothing changes).
        """
        if txn.get(key, None, self.idx) is not None:
            return -1
        size = len(data)
        policy = self.policy
        # taken before the victims leave theirs (one may share its slot)
        ghost = self._take_ghost(txn, key, self.records(txn)[0]) if policy.ghosts else None
        count, total = self._evict(txn, victims)
        born = time.time_ns()
        last = last_ns or born
        rank = policy.admit(last, self._tick(txn) if policy.clocked else 0, ghost)
        check = xxhash.xxh3_64_intdigest(data)
        txn.put(key, _HDR.pack(size, refs, last, check, born, rank, lid_len) + name, db=self.idx)
        write_chunks(txn, self.dat, key, data, check, born, enc)
        txn.put(_TS.pack(rank) + key, b"", db=self.lru)
        txn.put(RECORDS, _PAIR.pack(count + 1, total + size), db=self.meta)
        return len(victims)

    def evict(self, txn: Any, victims: Sequence[Tuple[bytes, int, int]]) -> int:
        """Evict ``victims`` (from :meth:`victims`, same transaction) without adding a record: a
        smaller bound applied at once. Returns how many were evicted."""
        count, total = self._evict(txn, victims)
        txn.put(RECORDS, _PAIR.pack(count, total), db=self.meta)
        return len(victims)

    def _evict(self, txn: Any, victims: Sequence[Tuple[bytes, int, int]]) -> Tuple[int, int]:
        """Delete ``victims`` and count the evictions; the record counters after them (not stored)."""
        count, total = self.records(txn)
        if victims:
            ghosts = self.policy.ghosts
            evictions = self._evictions(txn)
            for vkey, vrank, vsize in victims:
                txn.delete(vkey, db=self.idx)
                delete_chunks(txn, self.dat, vkey, vsize)
                txn.delete(_TS.pack(vrank) + vkey, db=self.lru)
                evictions = min(evictions + 1, U64_MAX)
                if ghosts:
                    txn.put(ghost_slot(vkey), vkey + _PAIR.pack(vrank, evictions), db=self.ghost)
                if count < 1 or total < vsize:  # a damaged counter: never store a wrapped one
                    raise ValueError("the record counters are smaller than the records they count")
                count -= 1
                total -= vsize
            txn.put(EVICTIONS, _U64.pack(evictions), db=self.meta)
        return count, total

    def remove(self, txn: Any, key: bytes) -> bool:
        """Delete one record; False when it is absent."""
        hdr = txn.get(key, None, self.idx)
        if hdr is None:
            return False
        count, total = self.records(txn)
        size = 0
        if len(hdr) > HEADER_SIZE:  # else a damaged header: its lru entry is found by verify, not here
            size, _refs, _last, _check, _born, rank, _lid = _HDR.unpack_from(hdr)
            txn.delete(_TS.pack(rank) + key, db=self.lru)
        txn.delete(key, db=self.idx)
        delete_chunks(txn, self.dat, key, size)
        txn.put(RECORDS, _PAIR.pack(max(count - 1, 0), max(total - size, 0)), db=self.meta)
        return True

    def apply(self, txn: Any, pending: Dict[bytes, List[int]], hits: int, misses: int) -> None:
        """Write buffered accesses: references of records still born as counted, hits and misses.

        Each entry's references count at the request clock after this batch (every reference of
        the batch at its end): the seed's reference count and last reference time, and the
        policy's rank."""
        policy = self.policy
        old_hits, old_misses = self._pair(txn, ACCESS) if hits or misses or policy.clocked else (0, 0)
        new_hits, new_misses = min(old_hits + hits, U64_MAX), min(old_misses + misses, U64_MAX)
        tick = min(new_hits + new_misses, U64_MAX)
        for key, (n, when, born) in pending.items():
            hdr = txn.get(key, None, self.idx)
            if hdr is None or len(hdr) <= HEADER_SIZE:
                continue  # deleted or evicted since: its hits still count below
            size, refs, last, check, hborn, rank, lid = _HDR.unpack_from(hdr)
            if hborn != born:
                continue  # another record of that name now: the references were not its own
            new_refs = min(refs + n, U64_MAX)
            new_last = max(last, when)  # ``when`` may be older: another process applied a later access
            new_rank = policy.access(rank, new_last, n, tick)
            if new_rank != rank:
                txn.delete(_TS.pack(rank) + key, db=self.lru)
                txn.put(_TS.pack(new_rank) + key, b"", db=self.lru)
            txn.put(key, _HDR.pack(size, new_refs, new_last, check, hborn, new_rank, lid) + hdr[HEADER_SIZE:],
                    db=self.idx)
        if hits or misses:
            txn.put(ACCESS, _PAIR.pack(new_hits, new_misses), db=self.meta)

    def clear(self, txn: Any) -> None:
        """Remove every record and ghost; hit, miss and eviction counters are kept."""
        for db in (self.idx, self.dat, self.lru, self.ghost):
            txn.drop(db, False)
        txn.put(RECORDS, _PAIR.pack(0, 0), db=self.meta)

    def init_counters(self, txn: Any) -> None:
        txn.put(RECORDS, _PAIR.pack(0, 0), db=self.meta)
        txn.put(ACCESS, _PAIR.pack(0, 0), db=self.meta)
        txn.put(EVICTIONS, _U64.pack(0), db=self.meta)

    def check(self, txn: Any, max_bytes: Optional[int]) -> List[str]:
        """Every inconsistency between index, records, LRU order, checksums and totals (cold)."""
        from .checkindex import check_index
        return check_index(self, txn, max_bytes)
