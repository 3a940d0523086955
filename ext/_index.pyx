# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The hot index, compiled: the twin of ``nvcache/fallback.py``.

Same names, same behaviour, same bytes on disk; the layout is described in
fallback.py. What is here is what every get and put runs: name validation
and hashing, header packing, the lookup with its checksum, access
buffering, the eviction walk, applying buffered accesses and formatting the
dump. The cold consistency check and ``keep`` parsing are shared with the
twin rather than written twice.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem, PyDict_SetItem
from cpython.exc cimport PyErr_SetFromErrno
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_GET_LENGTH

cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object o)
    void *PyUnicode_DATA(object o)
from libc.stdint cimport uint16_t, uint64_t
from libc.stdio cimport snprintf
from libc.string cimport memcmp, memcpy

import xxhash

from nvcache import fallback as _twin
from nvcache.errors import CacheFull, StaleReader

cdef extern from "<sys/file.h>" nogil:
    int flock(int fd, int operation)
    int LOCK_SH
    int LOCK_UN
    int LOCK_NB

cdef extern from "<sys/stat.h>" nogil:
    cdef struct stat:
        unsigned long st_nlink
    int fstat(int fd, stat *buf)


def link_count(int fd):
    """The link count of an open file (0: unlinked); OSError as os.fstat raises it."""
    cdef stat st
    if fstat(fd, &st) != 0:
        PyErr_SetFromErrno(OSError)
    return st.st_nlink


cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    struct tm:
        int tm_sec
        int tm_min
        int tm_hour
        int tm_mday
        int tm_mon
        int tm_year
    int clock_gettime(int clk_id, timespec *tp)
    tm *gmtime_r(const time_t *timep, tm *result)
    int CLOCK_REALTIME

MAX_LAYER_ID = 1024
MAX_KIND = 32
KEY_SIZE = 16
HEADER_SIZE = 34
U64_MAX = (1 << 64) - 1  # counters saturate rather than wrap
RECORDS = b"records"
ACCESS = b"access"
EVICTIONS = b"evictions"

DEF HDR = 34  # <QQQQH: size, refs, last_ns, checksum, layer_id length
DEF KEYLEN = 16  # KEY_SIZE, for C arrays
DEF MAX_RECORD = 1 << 40  # the largest bound (MAX_MB); a larger size is a damaged header

cdef object _xxh3_64 = xxhash.xxh3_64_intdigest
cdef object _xxh3_128 = xxhash.xxh3_128_digest
cdef dict _valid_kinds = {}

keep_set = _twin.keep_set
CHUNK_SIZE = _twin.CHUNK_SIZE
cdef Py_ssize_t _CHUNK_SIZE = _twin.CHUNK_SIZE
cdef bytes _FIRST_CHUNK = b"\0\0\0\0"
# Records larger than one chunk are rare and slow anyway: shared with the twin.
cdef object _read_record = _twin.read_record
DEF PREFIX = 16  # <QQ size, checksum in front of chunk 0
cdef object _write_chunks = _twin.write_chunks
cdef object _delete_chunks = _twin.delete_chunks


cdef inline uint64_t _now_ns() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <uint64_t>ts.tv_sec * 1000000000ULL + <uint64_t>ts.tv_nsec


cdef inline uint64_t _get_le(const unsigned char *p, int n) noexcept:
    cdef uint64_t v = 0
    cdef int i
    for i in range(n - 1, -1, -1):
        v = (v << 8) | p[i]
    return v


cdef inline void _set_le(unsigned char *p, uint64_t v, int n) noexcept:
    cdef int i
    for i in range(n):
        p[i] = v & 0xFF
        v >>= 8


cdef inline void _set_be(unsigned char *p, uint64_t v) noexcept:
    cdef int i
    for i in range(7, -1, -1):
        p[i] = v & 0xFF
        v >>= 8


cdef inline void _set_chunk(unsigned char *ckey, unsigned int chunk) noexcept:
    # The chunk number after a 16-byte key, big-endian (dat's keys sort by record, then chunk).
    ckey[16] = (chunk >> 24) & 0xFF
    ckey[17] = (chunk >> 16) & 0xFF
    ckey[18] = (chunk >> 8) & 0xFF
    ckey[19] = chunk & 0xFF


cdef bytes _pair(uint64_t a, uint64_t b):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 16)
    cdef unsigned char *p = <unsigned char *>PyBytes_AS_STRING(out)
    _set_le(p, a, 8)
    _set_le(p + 8, b, 8)
    return out


cdef bytes _u64(uint64_t a):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 8)
    _set_le(<unsigned char *>PyBytes_AS_STRING(out), a, 8)
    return out


cdef bytes _header(uint64_t size, uint64_t refs, uint64_t last_ns, uint64_t check, uint64_t lid,
                   const unsigned char *name, Py_ssize_t name_len):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, HDR + name_len)
    cdef unsigned char *p = <unsigned char *>PyBytes_AS_STRING(out)
    _set_le(p, size, 8)
    _set_le(p + 8, refs, 8)
    _set_le(p + 16, last_ns, 8)
    _set_le(p + 24, check, 8)
    _set_le(p + 32, lid, 2)
    memcpy(p + HDR, name, name_len)
    return out


cdef bytes _lru_key(uint64_t last_ns, bytes key):
    cdef Py_ssize_t n = PyBytes_GET_SIZE(key)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 8 + n)
    cdef unsigned char *p = <unsigned char *>PyBytes_AS_STRING(out)
    _set_be(p, last_ns)
    memcpy(p + 8, PyBytes_AS_STRING(key), n)
    return out


cdef bytes _check_kind(object kind):
    if not isinstance(kind, str):
        raise TypeError(f"kind must be str, not {type(kind).__name__}")
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(kind)
    if not 1 <= n <= MAX_KIND or not kind.isascii():
        raise ValueError(f"kind must be 1-{MAX_KIND} characters of [a-z0-9_], got {kind!r}")
    cdef bytes raw = kind.encode("ascii")
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(raw)
    cdef Py_ssize_t i
    cdef unsigned char c
    for i in range(n):
        c = p[i]
        if not ((c >= 97 and c <= 122) or (c >= 48 and c <= 57) or c == 95):
            raise ValueError(f"kind must be 1-{MAX_KIND} characters of [a-z0-9_], got {kind!r}")
    if len(_valid_kinds) < 256:
        _valid_kinds[kind] = raw
    return raw


cdef bytes _record_name(object layer_id, object kind, Py_ssize_t *lid_len):
    if not isinstance(layer_id, str):
        raise TypeError(f"layer_id must be str, not {type(layer_id).__name__}")
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(layer_id)
    if not 1 <= n <= MAX_LAYER_ID:
        raise ValueError(f"layer_id must be 1-{MAX_LAYER_ID} characters, got {n}")
    if not PyUnicode_IS_ASCII(layer_id):
        raise ValueError("layer_id must be printable ASCII without whitespace")
    # An ASCII str stores one byte per character: check them in place, then copy them once.
    cdef const unsigned char *p = <const unsigned char *>PyUnicode_DATA(layer_id)
    cdef Py_ssize_t i
    for i in range(n):
        if p[i] < 0x21 or p[i] > 0x7E:
            raise ValueError("layer_id must be printable ASCII without whitespace")
    cdef PyObject *found = NULL
    if type(kind) is str:
        found = PyDict_GetItem(_valid_kinds, kind)
    cdef bytes k = <bytes>found if found is not NULL else _check_kind(kind)
    cdef Py_ssize_t m = PyBytes_GET_SIZE(k)
    cdef bytes name = PyBytes_FromStringAndSize(NULL, n + 1 + m)
    cdef unsigned char *out = <unsigned char *>PyBytes_AS_STRING(name)
    memcpy(out, p, n)
    out[n] = 95  # "_"
    memcpy(out + n + 1, PyBytes_AS_STRING(k), m)
    lid_len[0] = n
    return name


def record_name(object layer_id, object kind):
    """Validate ``layer_id`` and ``kind``; return (``layer_id_kind`` as bytes, len(layer_id))."""
    cdef Py_ssize_t n = 0
    cdef bytes name = _record_name(layer_id, kind, &n)
    return name, n


def name_key(bytes name):
    """The LMDB key of a record name: its 16-byte xxh3-128 digest."""
    return _xxh3_128(name)


def checksum(data):
    return _xxh3_64(data)


def pack_header(uint64_t size, uint64_t refs, uint64_t last_ns, uint64_t check, uint64_t lid_len,
                bytes name):
    return _header(size, refs, last_ns, check, lid_len,
                   <const unsigned char *>PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name))


def unpack_header(hdr):
    """(size, refs, last_ns, checksum, layer_id length, name) of an ``idx`` value."""
    cdef bytes b = bytes(hdr)
    if PyBytes_GET_SIZE(b) <= HDR:
        raise ValueError("index header too short")
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(b)
    return (_get_le(p, 8), _get_le(p + 8, 8), _get_le(p + 16, 8), _get_le(p + 24, 8),
            _get_le(p + 32, 2), b[HDR:])


def lru_key(uint64_t last_ns, bytes key):
    return _lru_key(last_ns, key)


cdef str _rfc3339nano(uint64_t ns):
    cdef time_t secs = <time_t>(ns // 1000000000ULL)
    cdef long frac = <long>(ns % 1000000000ULL)
    cdef tm t
    cdef char buf[48]
    cdef int n, width = 9
    gmtime_r(&secs, &t)
    n = snprintf(buf, 32, "%04d-%02d-%02dT%02d:%02d:%02d", t.tm_year + 1900, t.tm_mon + 1,
                 t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec)
    if frac:
        while frac % 10 == 0:
            frac //= 10
            width -= 1
        n += snprintf(buf + n, 16, ".%0*ld", width, frac)
    buf[n] = b'Z'
    return buf[:n + 1].decode("ascii")


def rfc3339nano(ns):
    """UTC time of ``ns`` (nanoseconds since the epoch) as Go's RFC3339Nano formats it."""
    return _rfc3339nano(ns)


cdef class AccessBuffer:
    """Hits and misses seen by this process and not yet written to the index (see fallback.py)."""

    cdef public dict pending
    cdef public long long hits, misses, first_ns, max_age_ns
    cdef public Py_ssize_t max_keys
    cdef public bint due

    def __init__(self, long long max_age_ns, Py_ssize_t max_keys):
        self.max_age_ns = max_age_ns
        self.max_keys = max_keys
        self.pending = {}
        self.hits = self.misses = self.first_ns = 0
        self.due = False

    cdef inline void _aged(self, long long now_ns):
        if not self.first_ns:
            self.first_ns = now_ns
        elif now_ns - self.first_ns >= self.max_age_ns or len(self.pending) >= self.max_keys:
            self.due = True

    cdef void _hit(self, bytes key, long long now_ns):
        cdef PyObject *found = PyDict_GetItem(self.pending, key)
        cdef list entry
        if found is NULL:
            PyDict_SetItem(self.pending, key, [1, now_ns])
        else:
            entry = <list>found
            entry[0] = entry[0] + 1
            if now_ns > entry[1]:
                entry[1] = now_ns
        self.hits += 1
        self._aged(now_ns)

    def hit(self, bytes key, long long now_ns):
        self._hit(key, now_ns)

    def miss(self, long long now_ns):
        self.misses += 1
        self._aged(now_ns)

    def take(self):
        """Empty the buffer and return what it held (to apply, or to restore on failure)."""
        out = (self.pending, self.hits, self.misses, self.first_ns)
        self.pending = {}
        self.hits = self.misses = self.first_ns = 0
        self.due = False
        return out

    def restore(self, taken):
        """Merge back what :meth:`take` returned, after a failed apply (cold: shared with the twin)."""
        _twin.AccessBuffer.restore(self, taken)

    def clear(self):
        self.take()

    def __len__(self):
        """Pending keys, plus one when only counters are pending (so ``bool`` means "non-empty")."""
        return len(self.pending) or (1 if self.hits or self.misses else 0)


cdef inline bint _header_ok(bytes hdr):
    return hdr is not None and PyBytes_GET_SIZE(hdr) > HDR


cdef class Index:
    """The record index over the four databases of one environment (see fallback.py)."""

    cdef public object idx, dat, lru, meta, reserve

    def __init__(self, idx, dat, lru, meta):
        self.idx = idx
        self.dat = dat
        self.lru = lru
        self.meta = meta
        self.reserve = None

    # -- counters ---------------------------------------------------------
    cdef tuple _pair(self, txn, bytes name):
        cdef bytes raw = txn.get(name, None, self.meta)
        if raw is None:
            return (0, 0)
        if PyBytes_GET_SIZE(raw) != 16:
            raise ValueError(f"counter {name!r} is malformed")
        cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(raw)
        return (_get_le(p, 8), _get_le(p + 8, 8))

    cdef uint64_t _evictions(self, txn) except? 0:
        cdef bytes raw = txn.get(EVICTIONS, None, self.meta)
        if raw is None:
            return 0
        if PyBytes_GET_SIZE(raw) != 8:
            raise ValueError("counter b'evictions' is malformed")
        return _get_le(<const unsigned char *>PyBytes_AS_STRING(raw), 8)

    def counters(self, txn):
        """(record count, total bytes, hits, misses, evictions)."""
        count, total = self._pair(txn, RECORDS)
        hits, misses = self._pair(txn, ACCESS)
        return count, total, hits, misses, self._evictions(txn)

    def records(self, txn):
        """(record count, total bytes)."""
        if type(txn) is Writer:
            return _pair_w(<Writer>txn, RECORDS)
        return self._pair(txn, RECORDS)

    def count(self, txn):
        return self._pair(txn, RECORDS)[0]

    # -- reads --------------------------------------------------------------
    def contains(self, txn, bytes key):
        return txn.get(key, None, self.idx) is not None

    cdef object _lookup(self, txn, bytes key):
        # dat alone for a hit (see fallback.py); idx only when there are no bytes.
        cdef bytes first = txn.get(key + _FIRST_CHUNK, None, self.dat)
        cdef const unsigned char *p
        cdef uint64_t size
        cdef bytes data
        if first is None:
            return False if txn.get(key, None, self.idx) is not None else None
        if PyBytes_GET_SIZE(first) < PREFIX:
            return False
        p = <const unsigned char *>PyBytes_AS_STRING(first)
        size = _get_le(p, 8)
        if size > <uint64_t>_CHUNK_SIZE:
            return _read_record(txn, self.dat, key)  # rare and slow anyway: shared with the twin
        if <uint64_t>PyBytes_GET_SIZE(first) != PREFIX + size:
            return False
        data = PyBytes_FromStringAndSize(<const char *>p + PREFIX, <Py_ssize_t>size)
        if <uint64_t>_xxh3_64(data) != _get_le(p + 8, 8):
            return False
        return data

    def lookup(self, txn, bytes key):
        """The record's bytes; None when absent; False when its bytes fail the checksum."""
        return self._lookup(txn, key)

    # -- writes -------------------------------------------------------------
    cdef void _remove(self, txn, bytes key, uint64_t last_ns, uint64_t size) except *:
        txn.delete(key, b"", self.idx)
        if size <= <uint64_t>_CHUNK_SIZE:
            txn.delete(key + _FIRST_CHUNK, b"", self.dat)
        else:
            _delete_chunks(txn, self.dat, key, size)
        txn.delete(_lru_key(last_ns, key), b"", self.lru)

    def insert(self, txn, bytes key, bytes name, uint64_t lid_len, data, uint64_t max_bytes,
               frozenset keep, uint64_t refs=0, uint64_t last_ns=0):
        """Add a record, evicting the least recently referred ones to stay within ``max_bytes``.

        The record starts with ``refs`` references, last referred at
        ``last_ns`` (0: now; imports restore both).

        Returns the number of records evicted, or -1 when the name exists
        (nothing changes). Raises CacheFull, before changing anything, when
        only kept records could make room.
        """
        if type(txn) is Writer:
            return _insert_w(self, <Writer>txn, key, name, lid_len, data, max_bytes, keep, refs, last_ns)
        if txn.get(key, None, self.idx) is not None:
            return -1
        cdef uint64_t size = len(data)
        count, total = self._pair(txn, RECORDS)
        cdef uint64_t c_count = count, c_total = total
        cdef long long over = <long long>(c_total + size) - <long long>max_bytes
        cdef long long freed = 0
        cdef list victims = []
        cdef bytes vkey, hdr
        cdef bint room = False
        if over > 0:
            for vkey, hdr in self._walk(txn):
                if _take_victim(vkey, hdr, victims, keep, over, &freed):
                    room = True
                    break
            if not room:
                raise CacheFull(
                    f"cannot make room for {size} bytes within {max_bytes}: the rest is kept")
        if self.reserve is not None:
            self.reserve(len(victims), size)
        if victims:
            for vkey, vlast, vsize in victims:
                self._remove(txn, vkey, vlast, vsize)
                c_count -= 1
                c_total -= vsize
            txn.put(EVICTIONS, _u64(min(self._evictions(txn) + len(victims), U64_MAX)), True, True, False, self.meta)
        cdef uint64_t now_ns = last_ns or _now_ns()
        cdef uint64_t check = _xxh3_64(data)
        cdef bytes first
        txn.put(key, _header(size, refs, now_ns, check, lid_len,
                             <const unsigned char *>PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name)),
                True, True, False, self.idx)
        if size <= <uint64_t>_CHUNK_SIZE:
            first = _pair(size, check) + data  # the prefix, then the bytes: chunk 0
            txn.put(key + _FIRST_CHUNK, first, True, True, False, self.dat)
        else:
            _write_chunks(txn, self.dat, key, data, check)
        txn.put(_lru_key(now_ns, key), b"", True, True, False, self.lru)
        txn.put(RECORDS, _pair(c_count + 1, c_total + size), True, True, False, self.meta)
        return len(victims)

    def drop_damaged(self, txn, bytes key):
        """Remove a record whose bytes fail their checksum; False if it is healthy or gone."""
        if self._lookup(txn, key) is False:
            return self.remove(txn, key)
        return False

    def remove(self, txn, bytes key):
        """Delete one record; False when it is absent."""
        if type(txn) is Writer:
            return _delete_w(<Writer>txn, key)
        cdef bytes hdr = txn.get(key, None, self.idx)
        if hdr is None:
            return False
        count, total = self._pair(txn, RECORDS)
        cdef uint64_t size = 0
        if PyBytes_GET_SIZE(hdr) > HDR:
            size = _get_le(<const unsigned char *>PyBytes_AS_STRING(hdr), 8)
            txn.delete(_lru_key(_get_le(<const unsigned char *>PyBytes_AS_STRING(hdr) + 16, 8), key),
                       b"", self.lru)
        txn.delete(key, b"", self.idx)
        _delete_chunks(txn, self.dat, key, size)
        txn.put(RECORDS, _pair(max(count - 1, 0), max(total - size, 0)), True, True, False, self.meta)
        return True

    def apply(self, txn, dict pending, hits, misses):
        """Write buffered accesses: reference counts, last references, hit and miss counters."""
        if type(txn) is Writer:
            _apply_w(<Writer>txn, pending, hits, misses)
            return
        cdef bytes key, hdr, new
        cdef list entry
        cdef const unsigned char *p
        cdef unsigned char *q
        cdef uint64_t last, old_last, refs
        for key, entry in pending.items():
            hdr = txn.get(key, None, self.idx)
            if not _header_ok(hdr):
                continue  # deleted or evicted since: its hits still count below
            p = <const unsigned char *>PyBytes_AS_STRING(hdr)
            old_last = _get_le(p + 16, 8)
            last = entry[1]
            if last > old_last:  # another process may have applied a later access
                txn.delete(_lru_key(old_last, key), b"", self.lru)
                txn.put(_lru_key(last, key), b"", True, True, False, self.lru)
            else:
                last = old_last
            new = PyBytes_FromStringAndSize(<const char *>p, PyBytes_GET_SIZE(hdr))
            q = <unsigned char *>PyBytes_AS_STRING(new)
            refs = _get_le(p + 8, 8) + <uint64_t>entry[0]
            if refs < _get_le(p + 8, 8):  # saturate rather than wrap, like the twin
                refs = 0xFFFFFFFFFFFFFFFFULL
            _set_le(q + 8, refs, 8)
            _set_le(q + 16, last, 8)
            txn.put(key, new, True, True, False, self.idx)
        if hits or misses:
            old_hits, old_misses = self._pair(txn, ACCESS)
            txn.put(ACCESS, _pair(min(old_hits + hits, U64_MAX), min(old_misses + misses, U64_MAX)),
                    True, True, False, self.meta)

    def clear(self, txn):
        """Remove every record; hit, miss and eviction counters are kept."""
        for db in (self.idx, self.dat, self.lru):
            txn.drop(db, False)
        txn.put(RECORDS, _pair(0, 0), True, True, False, self.meta)

    def init_counters(self, txn):
        txn.put(RECORDS, _pair(0, 0), True, True, False, self.meta)
        txn.put(ACCESS, _pair(0, 0), True, True, False, self.meta)
        txn.put(EVICTIONS, _u64(0), True, True, False, self.meta)

    # -- walks --------------------------------------------------------------
    def _walk(self, txn):
        """(key, idx header) from the next victim on: oldest reference first, ties by name."""
        cur = txn.cursor(self.lru)
        cdef list group = []
        cdef bytes lk, key, hdr
        cdef bytes group_ts = b""
        cdef bint more
        try:
            if not cur.first():
                return
            more = True
            while more:
                lk = cur.key()
                more = cur.next()
                key = lk[8:]
                hdr = txn.get(key, None, self.idx)
                if not _header_ok(hdr):
                    continue  # an lru entry without its record: verify reports it
                if group and memcmp(PyBytes_AS_STRING(lk), PyBytes_AS_STRING(group_ts), 8) != 0:
                    if len(group) > 1:
                        group.sort(key=_by_name)
                    yield from group
                    group = []
                group_ts = lk
                group.append((key, hdr))
            if len(group) > 1:
                group.sort(key=_by_name)
            yield from group
        finally:
            cur.close()

    def dump(self, txn):
        """The ``cache_records`` of the seed's dump, next victim first."""
        cdef list out = []
        cdef bytes hdr
        cdef const unsigned char *p
        for _key, hdr in self._walk(txn):
            p = <const unsigned char *>PyBytes_AS_STRING(hdr)
            out.append({
                "last_referred": _rfc3339nano(_get_le(p + 16, 8)),
                "layer_id": hdr[HDR:].decode("ascii"),
                "reference_count": _get_le(p + 8, 8),
                "size": _get_le(p, 8),
            })
        return out

    def cache_data(self, txn):
        """The seed's ``cache-data`` dump."""
        _count, total, hits, misses, _evictions = self.counters(txn)
        return {"cache_hits": hits, "cache_misses": misses,
                "cache_records": self.dump(txn), "record_total_size": total}

    def check(self, txn, max_bytes):
        """Every inconsistency between index, records, LRU order, checksums and totals."""
        return _twin.Index.check(self, txn, max_bytes)


cdef inline object _dump_record(bytes hdr):
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(hdr)
    return {
        "last_referred": _rfc3339nano(_get_le(p + 16, 8)),
        "layer_id": hdr[HDR:].decode("ascii"),
        "reference_count": _get_le(p + 8, 8),
        "size": _get_le(p, 8),
    }


cdef void _flush_group(list group, list out) except *:
    # Headers that share one last_referred, in name order (the name follows the header).
    if len(group) > 1:
        group.sort(key=_name_of)
    for hdr in group:
        out.append(_dump_record(hdr))
    del group[:]


def _name_of(bytes hdr):
    return hdr[HDR:]


def _by_name(entry):
    return (<bytes>entry[1])[HDR:]


cdef extern from *:
    """
    /* The reader's half of the readers-table handshake (nvcache/locking.py): set our slot,
       full fence, then look at the writer flag; the writer does the mirror image. */
    static inline int nvc_enter_read(volatile unsigned char *slot, volatile unsigned char *flag) {
        __atomic_store_n(slot, 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(flag, __ATOMIC_SEQ_CST) == 0) return 1;
        __atomic_store_n(slot, 0, __ATOMIC_RELEASE);
        return 0;
    }
    static inline void nvc_leave_read(volatile unsigned char *slot) {
        __atomic_store_n(slot, 0, __ATOMIC_RELEASE);
    }
    """
    bint nvc_enter_read(unsigned char *slot, unsigned char *flag) nogil
    void nvc_leave_read(unsigned char *slot) nogil


from nvcache.locking import FAST_READS_SUPPORTED, FLAG_OFFSET, SLOTS_OFFSET, SLOT_SIZE
cdef Py_ssize_t _FLAG_OFFSET = FLAG_OFFSET, _SLOTS_OFFSET = SLOTS_OFFSET, _SLOT_SIZE = SLOT_SIZE

# Whether this core reads without the flock when the readers table lets it (see locking.py).
FAST_READS = FAST_READS_SUPPORTED


cdef extern from "lmdb.h" nogil:
    ctypedef struct MDB_env:
        pass
    ctypedef struct MDB_txn:
        pass
    ctypedef unsigned int MDB_dbi
    ctypedef struct MDB_cursor:
        pass
    ctypedef enum MDB_cursor_op:
        MDB_FIRST
        MDB_NEXT
        MDB_SET_KEY
    ctypedef struct MDB_val:
        size_t mv_size
        void *mv_data
    int mdb_env_create(MDB_env **env)
    int mdb_env_set_mapsize(MDB_env *env, size_t size)
    int mdb_env_set_maxdbs(MDB_env *env, MDB_dbi dbs)
    int mdb_env_open(MDB_env *env, const char *path, unsigned int flags, unsigned int mode)
    ctypedef struct MDB_envinfo:
        size_t me_last_pgno
    int mdb_env_info(MDB_env *env, MDB_envinfo *stat)
    void mdb_env_close(MDB_env *env)
    int mdb_txn_begin(MDB_env *env, MDB_txn *parent, unsigned int flags, MDB_txn **txn)
    void mdb_txn_abort(MDB_txn *txn)
    int mdb_txn_commit(MDB_txn *txn)
    void mdb_txn_reset(MDB_txn *txn)
    int mdb_txn_renew(MDB_txn *txn)
    int mdb_dbi_open(MDB_txn *txn, const char *name, unsigned int flags, MDB_dbi *dbi)
    int mdb_get(MDB_txn *txn, MDB_dbi dbi, MDB_val *key, MDB_val *data)
    int mdb_put(MDB_txn *txn, MDB_dbi dbi, MDB_val *key, MDB_val *data, unsigned int flags)
    int mdb_del(MDB_txn *txn, MDB_dbi dbi, MDB_val *key, MDB_val *data)
    int mdb_cursor_open(MDB_txn *txn, MDB_dbi dbi, MDB_cursor **cursor)
    void mdb_cursor_close(MDB_cursor *cursor)
    int mdb_cursor_get(MDB_cursor *cursor, MDB_val *key, MDB_val *data, MDB_cursor_op op)
    int mdb_cursor_put(MDB_cursor *cursor, MDB_val *key, MDB_val *data, unsigned int flags)
    const char *mdb_strerror(int err)
    enum:
        MDB_NOLOCK
        MDB_WRITEMAP
        MDB_NOSYNC
        MDB_NOMETASYNC
        MDB_RESERVE
        MDB_CURRENT
        MDB_APPEND
        MDB_KEYEXIST
        MDB_MAP_FULL
        MDB_PAGE_FULL
        MDB_TXN_FULL
        MDB_CURSOR_FULL
        MDB_MAP_RESIZED
        MDB_RDONLY
        MDB_NORDAHEAD
        MDB_NOTLS
        MDB_NOTFOUND
        MDB_CORRUPTED
        MDB_PAGE_NOTFOUND
        MDB_INVALID
        MDB_VERSION_MISMATCH
        MDB_BAD_VALSIZE
        MDB_INCOMPATIBLE
        MDB_PANIC
        MDB_BAD_TXN
        MDB_BAD_RSLOT
        MDB_BAD_DBI

import lmdb as _lmdb

# The same classes py-lmdb raises, so the store tells damage from other failures the same way.
cdef dict _MDB_ERRORS = {
    MDB_CORRUPTED: _lmdb.CorruptedError, MDB_PAGE_NOTFOUND: _lmdb.PageNotFoundError,
    MDB_INVALID: _lmdb.InvalidError, MDB_VERSION_MISMATCH: _lmdb.VersionMismatchError,
    MDB_BAD_VALSIZE: _lmdb.BadValsizeError, MDB_INCOMPATIBLE: _lmdb.IncompatibleError,
    MDB_PANIC: _lmdb.PanicError, MDB_BAD_TXN: _lmdb.BadTxnError, MDB_BAD_RSLOT: _lmdb.BadRslotError,
    MDB_BAD_DBI: _lmdb.BadDbiError, 22: _lmdb.InvalidParameterError,  # EINVAL
    MDB_MAP_FULL: _lmdb.MapFullError, MDB_PAGE_FULL: _lmdb.PageFullError, MDB_TXN_FULL: _lmdb.TxnFullError,
    MDB_CURSOR_FULL: _lmdb.CursorFullError, MDB_MAP_RESIZED: _lmdb.MapResizedError,
    # errno values, mapped as py-lmdb maps them: ENOSPC, EACCES, ENOMEM, EAGAIN
    28: _lmdb.DiskError, 13: _lmdb.ReadonlyError, 12: _lmdb.MemoryError, 11: _lmdb.LockError,
}


cdef object _mdb_error(int rc, str what):
    cls = _MDB_ERRORS.get(rc, _lmdb.Error)
    return cls(f"{what}: {mdb_strerror(rc).decode('utf-8', 'replace')}")


@cython.no_gc_clear  # the GC must not take _writer (its environment) before __dealloc__ aborts our txn
cdef class Reader:
    """The hot read in one call: lock, snapshot, look up, count, unlock (see fallback.py).

    Two things make it cheaper than its twin. With a slot in the readers
    table, the common read takes no flock at all: the thread mutex, then the
    slot handshake (two atomic stores and a load). And it reads through its
    own read-only LMDB environment on the same file, with LMDB's C API: one
    reusable transaction, the header and the record bytes straight from the
    map, one copy into the returned ``bytes``. If that environment cannot be
    opened, reads go through py-lmdb as in the twin.
    """

    cdef public object lock, mutex, env
    cdef object _try_acquire, _release  # the mutex's bound methods, looked up once
    cdef public Index index
    cdef public AccessBuffer buffer
    cdef public int fd
    cdef unsigned char[::1] _view  # keeps the table's mapping alive while we point into it
    cdef unsigned char *_slot
    cdef unsigned char *_flag
    cdef MDB_env *_cenv
    cdef MDB_txn *_ctxn  # reset between reads, renewed for each
    cdef MDB_dbi _idx, _dat, _lru, _meta
    cdef Writer _writer  # whose environment we read through (None: our own); closed after us

    def __init__(self, lock, env, Index index, AccessBuffer buffer, table=None, Writer writer=None):
        self.lock = lock
        self.fd = lock.fd
        self.mutex = lock.mutex
        self._try_acquire = self.mutex.acquire
        self._release = self.mutex.release
        self.env = env
        self.index = index
        self.buffer = buffer
        self._slot = self._flag = NULL
        if table is not None and table.slot >= 0:
            self._view = table.mm
            self._flag = &self._view[_FLAG_OFFSET]
            self._slot = &self._view[_SLOTS_OFFSET + table.slot * _SLOT_SIZE]
        if writer is not None and writer._env != NULL:
            self._share_c(writer)
        if self._ctxn == NULL:
            self._open_c(env.path().encode(), env.info()["map_size"])

    cdef void _share_c(self, Writer writer):
        # One mapping of the file for reads and writes: a page that a get brought in is already
        # mapped when a put walks or changes it (each mapping of its own faults on every page).
        cdef MDB_txn *txn = NULL
        if mdb_txn_begin(writer._env, NULL, MDB_RDONLY, &txn) != 0:
            return
        mdb_txn_reset(txn)
        self._idx, self._dat, self._lru, self._meta = writer._idx, writer._dat, writer._lru, writer._meta
        self._writer = writer
        self._ctxn = txn

    cdef void _open_c(self, bytes path, size_t map_size):
        # No lock table (the readers table and the flock guard us), read-only, no readahead;
        # NOTLS: threads take turns on the one transaction under the mutex.
        cdef MDB_env *cenv = NULL
        cdef MDB_txn *txn = NULL
        cdef int rc = mdb_env_create(&cenv)
        if rc == 0:
            rc = mdb_env_set_maxdbs(cenv, 4) or mdb_env_set_mapsize(cenv, map_size)
        if rc == 0:
            rc = mdb_env_open(cenv, path, MDB_NOLOCK | MDB_RDONLY | MDB_NORDAHEAD | MDB_NOTLS, 0o640)
        if rc == 0:
            rc = mdb_txn_begin(cenv, NULL, MDB_RDONLY, &txn)
        if rc == 0:
            rc = (mdb_dbi_open(txn, b"idx", 0, &self._idx) or mdb_dbi_open(txn, b"dat", 0, &self._dat)
                  or mdb_dbi_open(txn, b"lru", 0, &self._lru) or mdb_dbi_open(txn, b"meta", 0, &self._meta))
        if rc == 0:  # the handles outlive the transaction that opened them only once it commits
            rc = mdb_txn_commit(txn)
            txn = NULL
        if rc == 0:
            rc = mdb_txn_begin(cenv, NULL, MDB_RDONLY, &txn)
        if rc != 0:
            if txn != NULL:
                mdb_txn_abort(txn)
            if cenv != NULL:
                mdb_env_close(cenv)
            return
        mdb_txn_reset(txn)
        self._cenv = cenv
        self._ctxn = txn

    @property
    def fast(self):
        """Whether reads may skip the flock (this process owns a slot)."""
        return self._slot != NULL

    @property
    def direct(self):
        """Whether reads go through LMDB's C API (the Writer's environment or our own; else py-lmdb)."""
        return self._ctxn != NULL

    @property
    def shared(self):
        """Whether reads go through the Writer's environment (one mapping for reads and writes)."""
        return self._ctxn != NULL and self._writer is not None

    def close(self):
        """Called by the store with the lock's mutex held, before it closes the environment.

        No read is in flight then (reads hold the mutex), so the table's
        mapping and the C environment can go at once. (A store that cannot
        get the mutex leaves its Reader open instead.)
        """
        self.env = None
        self._slot = self._flag = NULL
        self._view = None
        self._close_c()

    cdef void _close_c(self):
        if self._ctxn != NULL:
            mdb_txn_abort(self._ctxn)
            self._ctxn = NULL
        if self._cenv != NULL:
            mdb_env_close(self._cenv)
            self._cenv = NULL
        self._writer = None  # its environment may close now

    def __dealloc__(self):
        self._close_c()

    cdef object _lookup_c(self, bytes key):
        """``Index.lookup`` through the C API: None when absent, False when damaged.

        One B-tree lookup for a hit: chunk 0 of ``dat`` starts with the size
        and checksum; ``idx`` is read only when there are no bytes.
        """
        cdef MDB_val k, v, ik
        cdef unsigned char ckey[KEYLEN + 4]
        cdef const unsigned char *h
        cdef uint64_t size, done, part, last
        cdef uint64_t check
        cdef unsigned int chunk
        cdef bytes data
        cdef char *out
        cdef int rc = mdb_txn_renew(self._ctxn)
        if rc != 0:
            self._close_c()  # this environment is unusable: py-lmdb from now on
            return self._lookup_py(key)
        try:
            memcpy(ckey, PyBytes_AS_STRING(key), KEYLEN)
            _set_chunk(ckey, 0)
            k.mv_size = KEYLEN + 4
            k.mv_data = ckey
            rc = mdb_get(self._ctxn, self._dat, &k, &v)
            if rc == MDB_NOTFOUND:  # no bytes: absent, or an index entry without them (damage)
                ik.mv_size = KEYLEN
                ik.mv_data = <void *>PyBytes_AS_STRING(key)
                rc = mdb_get(self._ctxn, self._idx, &ik, &v)
                if rc == MDB_NOTFOUND:
                    return None
                if rc != 0:
                    raise _mdb_error(rc, "mdb_get")
                return False
            if rc != 0:
                raise _mdb_error(rc, "mdb_get")
            if v.mv_size < PREFIX:
                return False
            h = <const unsigned char *>v.mv_data
            size = _get_le(h, 8)
            check = _get_le(h + 8, 8)
            if size <= <uint64_t>_CHUNK_SIZE:
                if v.mv_size != PREFIX + size:
                    return False
                data = PyBytes_FromStringAndSize(<const char *>h + PREFIX, <Py_ssize_t>size)
            else:
                if size > MAX_RECORD or v.mv_size != PREFIX + <uint64_t>_CHUNK_SIZE:
                    return False
                # Before allocating what a (possibly damaged) prefix claims: the last chunk must
                # exist with the length that size implies (as the twin finds out chunk by chunk).
                last = (size - 1) // <uint64_t>_CHUNK_SIZE
                _set_chunk(ckey, <unsigned int>last)
                rc = mdb_get(self._ctxn, self._dat, &k, &v)
                if rc == MDB_NOTFOUND:
                    return False
                if rc != 0:
                    raise _mdb_error(rc, "mdb_get")
                if v.mv_size != size - last * <uint64_t>_CHUNK_SIZE:
                    return False
                data = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>size)
                out = PyBytes_AS_STRING(data)
                memcpy(out, h + PREFIX, _CHUNK_SIZE)  # h stays valid until the reset below
                done = _CHUNK_SIZE
                chunk = 1
                while done < size:  # chunk i: key + big-endian u32 i, CHUNK_SIZE bytes but the last
                    _set_chunk(ckey, chunk)
                    part = size - done if size - done < <uint64_t>_CHUNK_SIZE else <uint64_t>_CHUNK_SIZE
                    rc = mdb_get(self._ctxn, self._dat, &k, &v)
                    if rc == MDB_NOTFOUND:
                        return False
                    if rc != 0:
                        raise _mdb_error(rc, "mdb_get")
                    if v.mv_size != part:
                        return False
                    memcpy(out + done, v.mv_data, part)
                    done += part
                    chunk += 1
        finally:
            if self._ctxn != NULL:
                mdb_txn_reset(self._ctxn)
        if <uint64_t>_xxh3_64(data) != check:
            return False
        return data

    cdef bint _contains_c(self, bytes key) except -1:
        cdef MDB_val k, v
        cdef int rc = mdb_txn_renew(self._ctxn)
        if rc != 0:
            self._close_c()
            return self._contains_py(key)
        k.mv_size = KEYLEN
        k.mv_data = <void *>PyBytes_AS_STRING(key)
        rc = mdb_get(self._ctxn, self._idx, &k, &v)
        mdb_txn_reset(self._ctxn)
        if rc != 0 and rc != MDB_NOTFOUND:
            raise _mdb_error(rc, "mdb_get")
        return rc == 0

    cdef bint _contains_py(self, bytes key) except -1:
        txn = self.env.begin()
        try:
            return self.index.contains(txn, key)
        finally:
            txn.abort()

    cdef object _lookup_py(self, bytes key):
        txn = self.env.begin()
        try:
            return self.index._lookup(txn, key)
        finally:
            txn.abort()

    cdef object _read(self, bytes key, bint lookup):
        """The record (``lookup``) or whether it exists; the caller holds the read lock."""
        if self.env is None:
            raise StaleReader("the environment was replaced")
        if self._ctxn != NULL:
            return self._lookup_c(key) if lookup else self._contains_c(key)
        return self._lookup_py(key) if lookup else self._contains_py(key)

    cdef object _read_waiting(self, bytes key, bint lookup):
        lock = self.lock
        lock.acquire(False)
        try:
            return self._read(key, lookup)
        finally:
            lock.release()

    cdef object _guarded(self, bytes key, bint lookup):
        """``_read`` under the thread mutex and the slot handshake, else the shared flock."""
        release = self._release
        if not self._try_acquire(False):
            return self._read_waiting(key, lookup)
        if self.env is None:
            release()
            raise StaleReader("the environment was replaced")
        cdef unsigned char *slot = self._slot  # ours until we leave, even if close() runs meanwhile
        if slot != NULL and nvc_enter_read(slot, self._flag):
            try:
                return self._read(key, lookup)
            finally:
                nvc_leave_read(slot)
                release()
        if flock(self.fd, LOCK_SH | LOCK_NB) != 0:
            release()
            return self._read_waiting(key, lookup)
        try:
            return self._read(key, lookup)
        finally:
            flock(self.fd, LOCK_UN)
            release()

    def contains(self, bytes key):
        """Whether the record of ``key`` exists; counts nothing."""
        return self._guarded(key, False)

    def cache_data(self):
        """``Index.cache_data`` under the shared flock (a long read: writers wait on the flock)."""
        lock = self.lock
        lock.acquire(False)
        try:
            if self.env is None:
                raise StaleReader("the environment was replaced")
            if self._ctxn != NULL and mdb_txn_renew(self._ctxn) == 0:
                try:
                    return self._cache_data_c()
                finally:
                    mdb_txn_reset(self._ctxn)
            txn = self.env.begin()
            try:
                return self.index.cache_data(txn)
            finally:
                txn.abort()
        finally:
            lock.release()

    cdef tuple _pair_c(self, bytes name):
        cdef MDB_val k, v
        k.mv_size = PyBytes_GET_SIZE(name)
        k.mv_data = PyBytes_AS_STRING(name)
        cdef int rc = mdb_get(self._ctxn, self._meta, &k, &v)
        if rc == MDB_NOTFOUND:
            return (0, 0)
        if rc != 0:
            raise _mdb_error(rc, "mdb_get")
        if v.mv_size != 16:
            raise ValueError(f"counter {name!r} is malformed")
        return (_get_le(<const unsigned char *>v.mv_data, 8), _get_le(<const unsigned char *>v.mv_data + 8, 8))

    cdef int _check_evictions_c(self) except -1:
        # Index.counters also reads (and so validates) the evictions counter.
        cdef MDB_val k, v
        k.mv_size = PyBytes_GET_SIZE(EVICTIONS)
        k.mv_data = PyBytes_AS_STRING(EVICTIONS)
        cdef int rc = mdb_get(self._ctxn, self._meta, &k, &v)
        if rc == 0 and v.mv_size != 8:
            raise ValueError("counter b'evictions' is malformed")
        if rc != 0 and rc != MDB_NOTFOUND:
            raise _mdb_error(rc, "mdb_get")
        return 0

    cdef dict _cache_data_c(self):
        """Index.cache_data through the C API: the same walk (LRU order, ties by name), no py-lmdb calls."""
        _count, total = self._pair_c(RECORDS)
        hits, misses = self._pair_c(ACCESS)
        self._check_evictions_c()
        cdef list out = [], group = []
        cdef MDB_cursor *cur = NULL
        cdef MDB_val k, v, ik, hv
        cdef unsigned char group_ts[8]
        cdef bint grouped = False
        cdef bytes hdr
        cdef tuple entry
        cdef int rc = mdb_cursor_open(self._ctxn, self._lru, &cur)
        if rc != 0:
            raise _mdb_error(rc, "mdb_cursor_open")
        try:
            rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST)
            while rc == 0:
                if k.mv_size < 8:
                    raise _lmdb.BadValsizeError("an lru key shorter than its timestamp")
                ik.mv_size = k.mv_size - 8
                ik.mv_data = <unsigned char *>k.mv_data + 8
                rc = mdb_get(self._ctxn, self._idx, &ik, &hv)
                if rc == 0 and hv.mv_size > HDR:
                    if grouped and memcmp(k.mv_data, group_ts, 8) != 0:
                        _flush_group(group, out)
                    memcpy(group_ts, k.mv_data, 8)
                    grouped = True
                    group.append(PyBytes_FromStringAndSize(<char *>hv.mv_data, hv.mv_size))
                elif rc != 0 and rc != MDB_NOTFOUND:
                    raise _mdb_error(rc, "mdb_get")
                # else: an lru entry without its record: verify reports it
                rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)
            if rc != MDB_NOTFOUND:
                raise _mdb_error(rc, "mdb_cursor_get")
            _flush_group(group, out)
        finally:
            mdb_cursor_close(cur)
        return {"cache_hits": hits, "cache_misses": misses, "cache_records": out, "record_total_size": total}

    def get(self, layer_id, kind):
        """The record of ``layer_id`` and ``kind`` (validated), looked up without a writer.

        Returns its bytes, None when absent, False when they fail their
        checksum; counts the hit or miss in the buffer.
        """
        cdef Py_ssize_t n = 0
        cdef bytes key = _xxh3_128(_record_name(layer_id, kind, &n))
        data = self._guarded(key, True)
        if data is None or data is False:  # absent, or failed its checksum: a miss
            self.buffer.misses += 1
            self.buffer._aged(_now_ns())
        else:
            self.buffer._hit(key, _now_ns())
        return data


# -- writes through LMDB's C API ---------------------------------------------------------------

cdef class Writer:
    """Write transactions through LMDB's C API, for puts and deletes (see fallback.py).

    Its own environment on the store's file (no lock table; the store's
    flock and the readers table order it with every other writer and
    reader, as they order processes). The store passes it to Index.insert,
    Index.apply, Index.remove and Index.records in place of a py-lmdb
    transaction, and those then run their C twins of the same steps: no
    py-lmdb object per get, put or delete. Other writes (clear, repairs)
    stay on py-lmdb. ``begin()`` returns the writer itself, holding the
    transaction.
    """

    cdef MDB_env *_env
    cdef MDB_txn *_txn
    cdef MDB_dbi _idx, _dat, _lru, _meta

    def __init__(self, env, bint writemap, bint durable):
        cdef unsigned int flags = MDB_NOLOCK | MDB_NORDAHEAD | MDB_NOTLS
        if writemap:
            flags |= MDB_WRITEMAP
        if not durable:
            flags |= MDB_NOSYNC | MDB_NOMETASYNC
        cdef bytes path = env.path().encode()
        cdef MDB_txn *txn = NULL
        cdef int rc = mdb_env_create(&self._env)
        if rc == 0:
            rc = mdb_env_set_maxdbs(self._env, 4) or mdb_env_set_mapsize(self._env, env.info()["map_size"])
        if rc == 0:
            rc = mdb_env_open(self._env, path, flags, 0o640)
        if rc == 0:
            rc = mdb_txn_begin(self._env, NULL, MDB_RDONLY, &txn)
        if rc == 0:
            rc = (mdb_dbi_open(txn, b"idx", 0, &self._idx) or mdb_dbi_open(txn, b"dat", 0, &self._dat)
                  or mdb_dbi_open(txn, b"lru", 0, &self._lru) or mdb_dbi_open(txn, b"meta", 0, &self._meta))
        if rc == 0:
            rc = mdb_txn_commit(txn)  # the handles outlive the transaction only once it commits
            txn = NULL
        if rc != 0:
            if txn != NULL:
                mdb_txn_abort(txn)
            self.close()
            raise _mdb_error(rc, "opening the write environment")

    def begin(self):
        if self._env == NULL:
            raise _lmdb.Error("the write environment is closed")
        if self._txn != NULL:
            raise _lmdb.BadTxnError("a write transaction is already open")
        cdef int rc = mdb_txn_begin(self._env, NULL, 0, &self._txn)
        if rc != 0:
            self._txn = NULL
            raise _mdb_error(rc, "mdb_txn_begin")
        return self

    def commit(self):
        cdef MDB_txn *txn = self._txn
        self._txn = NULL  # freed by LMDB whether or not the commit succeeds
        if txn == NULL:
            raise _lmdb.BadTxnError("no write transaction is open")
        cdef int rc = mdb_txn_commit(txn)
        if rc != 0:
            raise _mdb_error(rc, "mdb_txn_commit")

    def abort(self):
        if self._txn != NULL:
            mdb_txn_abort(self._txn)
            self._txn = NULL

    def close(self):
        self.abort()
        if self._env != NULL:
            mdb_env_close(self._env)
            self._env = NULL

    def last_page(self):
        """The last page in use as of the last commit (LMDB's mdb_env_info)."""
        cdef MDB_envinfo info
        if self._env == NULL:
            raise _lmdb.Error("the write environment is closed")
        mdb_env_info(self._env, &info)
        return info.me_last_pgno

    def __dealloc__(self):
        if self._txn != NULL:
            mdb_txn_abort(self._txn)
        if self._env != NULL:
            mdb_env_close(self._env)

    cdef inline MDB_txn *_open_txn(self) except NULL:
        if self._txn == NULL:
            raise _lmdb.BadTxnError("no write transaction is open")
        return self._txn


cdef inline int _w_check(int rc, str what) except -1:
    if rc != 0 and rc != MDB_NOTFOUND:
        raise _mdb_error(rc, what)
    return rc


cdef tuple _pair_w(Writer w, bytes name):
    cdef MDB_val k, v
    k.mv_size = PyBytes_GET_SIZE(name)
    k.mv_data = PyBytes_AS_STRING(name)
    if _w_check(mdb_get(w._open_txn(), w._meta, &k, &v), "mdb_get") == MDB_NOTFOUND:
        return (0, 0)
    if v.mv_size != 16:
        raise ValueError(f"counter {name!r} is malformed")
    return (_get_le(<const unsigned char *>v.mv_data, 8), _get_le(<const unsigned char *>v.mv_data + 8, 8))


cdef int _put_pair_w(Writer w, bytes name, uint64_t a, uint64_t b) except -1:
    cdef unsigned char buf[16]
    cdef MDB_val k, v
    _set_le(buf, a, 8)
    _set_le(buf + 8, b, 8)
    k.mv_size = PyBytes_GET_SIZE(name)
    k.mv_data = PyBytes_AS_STRING(name)
    v.mv_size = 16
    v.mv_data = buf
    _w_check(mdb_put(w._open_txn(), w._meta, &k, &v, 0), "mdb_put")
    return 0


cdef inline uint64_t _sat_add(uint64_t a, uint64_t b) noexcept:
    return a + b if a + b >= a else 0xFFFFFFFFFFFFFFFFULL


cdef int _put_lru_w(Writer w, uint64_t last_ns, const unsigned char *key, bint delete) except -1:
    cdef unsigned char buf[8 + KEYLEN]
    cdef MDB_val k, v
    _set_be(buf, last_ns)
    memcpy(buf + 8, key, KEYLEN)
    k.mv_size = 8 + KEYLEN
    k.mv_data = buf
    cdef int rc
    if delete:
        _w_check(mdb_del(w._txn, w._lru, &k, NULL), "mdb_del")
    else:
        # A new time sorts last (unless another process's clock ran ahead, or an import):
        # append without a search from the root, else an ordinary put.
        v.mv_size = 0
        v.mv_data = buf
        rc = mdb_put(w._txn, w._lru, &k, &v, MDB_APPEND)
        if rc == MDB_KEYEXIST:
            rc = mdb_put(w._txn, w._lru, &k, &v, 0)
        _w_check(rc, "mdb_put")
    return 0


cdef int _remove_w(Writer w, bytes key, uint64_t last_ns, uint64_t size, bint lru=True) except -1:
    """Index._remove: the record's index entry, chunks and (``lru``) LRU entry."""
    cdef MDB_txn *txn = w._open_txn()
    cdef MDB_val k
    cdef unsigned char ckey[KEYLEN + 4]
    cdef unsigned int chunk, chunks
    if size > MAX_RECORD:  # else billions of deletes for one damaged header (as delete_chunks)
        raise ValueError(f"a stored record size of {size} bytes: a damaged header")
    k.mv_size = KEYLEN
    k.mv_data = <void *>PyBytes_AS_STRING(key)
    _w_check(mdb_del(txn, w._idx, &k, NULL), "mdb_del")
    memcpy(ckey, PyBytes_AS_STRING(key), KEYLEN)
    chunks = <unsigned int>((size + <uint64_t>_CHUNK_SIZE - 1) // <uint64_t>_CHUNK_SIZE) or 1
    k.mv_size = KEYLEN + 4
    k.mv_data = ckey
    for chunk in range(chunks):
        _set_chunk(ckey, chunk)
        _w_check(mdb_del(txn, w._dat, &k, NULL), "mdb_del")
    if lru:
        _put_lru_w(w, last_ns, <const unsigned char *>PyBytes_AS_STRING(key), True)
    return 0


cdef object _delete_w(Writer w, bytes key):
    """Index.remove through the C API."""
    cdef MDB_txn *txn = w._open_txn()
    cdef MDB_val k, v
    cdef bytes hdr
    cdef uint64_t size = 0
    if PyBytes_GET_SIZE(key) != KEYLEN:
        raise TypeError(f"a record key has {KEYLEN} bytes, not {PyBytes_GET_SIZE(key)}")
    k.mv_size = KEYLEN
    k.mv_data = <void *>PyBytes_AS_STRING(key)
    if _w_check(mdb_get(txn, w._idx, &k, &v), "mdb_get") == MDB_NOTFOUND:
        return False
    hdr = PyBytes_FromStringAndSize(<char *>v.mv_data, v.mv_size)  # before any change
    count, total = _pair_w(w, RECORDS)
    if PyBytes_GET_SIZE(hdr) > HDR:  # a damaged header: its lru entry is found by verify, not here
        size = _get_le(<const unsigned char *>PyBytes_AS_STRING(hdr), 8)
        _put_lru_w(w, _get_le(<const unsigned char *>PyBytes_AS_STRING(hdr) + 16, 8),
                   <const unsigned char *>PyBytes_AS_STRING(key), True)
    _remove_w(w, key, 0, size, False)
    _put_pair_w(w, RECORDS, max(count - 1, 0), max(total - size, 0))
    return True


cdef int _take_victim(bytes vkey, bytes hdr, list victims, frozenset keep, long long over,
                      long long *freed) except -1:
    """The next record of the eviction walk becomes a victim unless kept; 1 once there is room."""
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(hdr)
    cdef uint64_t vsize = _get_le(p, 8)
    if keep and hdr[HDR:HDR + _get_le(p + 32, 2)] in keep:
        return 0
    victims.append((vkey, _get_le(p + 16, 8), vsize))
    freed[0] += vsize
    return freed[0] >= over


cdef int _take_victims(list group, list victims, frozenset keep, long long over, long long *freed) except -1:
    """Victims from one group of equal last references, in name order; 1 once there is room."""
    if len(group) > 1:
        group.sort(key=_by_name)
    for vkey, hdr in group:
        if _take_victim(vkey, hdr, victims, keep, over, freed):
            return 1
    return 0


cdef object _insert_w(Index index, Writer w, bytes key, bytes name, uint64_t lid_len, data,
                      uint64_t max_bytes, frozenset keep, uint64_t refs, uint64_t last_ns):
    """Index.insert through the C API: the same steps in the same order as the twin's."""
    cdef MDB_txn *txn = w._open_txn()
    cdef MDB_val k, v, lk, lv, hv
    cdef MDB_cursor *cur = NULL
    cdef unsigned char ckey[KEYLEN + 4]
    cdef unsigned char group_ts[8]
    cdef const unsigned char[::1] src = data
    cdef uint64_t size = src.shape[0]
    cdef unsigned char *out
    cdef uint64_t done, part, check, now_ns, c_count, c_total, evictions
    cdef unsigned int chunk
    cdef long long over, freed = 0
    cdef bint room = False, grouped = False
    cdef list victims = [], group = []
    cdef int rc
    if PyBytes_GET_SIZE(key) != KEYLEN:
        raise TypeError(f"a record key has {KEYLEN} bytes, not {PyBytes_GET_SIZE(key)}")
    k.mv_size = KEYLEN
    k.mv_data = <void *>PyBytes_AS_STRING(key)
    if _w_check(mdb_get(txn, w._idx, &k, &v), "mdb_get") == 0:
        return -1
    c_count, c_total = _pair_w(w, RECORDS)
    over = <long long>(c_total + size) - <long long>max_bytes
    if over > 0:
        _w_check(mdb_cursor_open(txn, w._lru, &cur), "mdb_cursor_open")
        try:
            rc = mdb_cursor_get(cur, &lk, &lv, MDB_FIRST)
            while rc == 0:
                if lk.mv_size < 8:
                    raise _lmdb.BadValsizeError("an lru key shorter than its timestamp")
                k.mv_size = lk.mv_size - 8
                k.mv_data = <unsigned char *>lk.mv_data + 8
                if _w_check(mdb_get(txn, w._idx, &k, &hv), "mdb_get") == 0 and hv.mv_size > HDR:
                    if k.mv_size != KEYLEN:  # only a damaged or foreign file has other keys
                        raise _lmdb.CorruptedError(f"an lru entry with a {k.mv_size}-byte record key")
                    if grouped and memcmp(lk.mv_data, group_ts, 8) != 0:
                        if _take_victims(group, victims, keep, over, &freed):
                            room = True
                            break
                        group = []
                    memcpy(group_ts, lk.mv_data, 8)
                    grouped = True
                    group.append((PyBytes_FromStringAndSize(<char *>k.mv_data, k.mv_size),
                                  PyBytes_FromStringAndSize(<char *>hv.mv_data, hv.mv_size)))
                # else: an lru entry without its record: verify reports it
                rc = mdb_cursor_get(cur, &lk, &lv, MDB_NEXT)
            if not room:
                _w_check(rc, "mdb_cursor_get")
                room = _take_victims(group, victims, keep, over, &freed)
        finally:
            mdb_cursor_close(cur)
        if not room:
            raise CacheFull(f"cannot make room for {size} bytes within {max_bytes}: the rest is kept")
    if index.reserve is not None:
        index.reserve(len(victims), size)
    if victims:
        for vkey, vlast, vsize in victims:
            _remove_w(w, vkey, vlast, vsize)
            c_count -= 1
            c_total -= <uint64_t>vsize
        k.mv_size = PyBytes_GET_SIZE(EVICTIONS)
        k.mv_data = PyBytes_AS_STRING(EVICTIONS)
        evictions = 0
        if _w_check(mdb_get(txn, w._meta, &k, &v), "mdb_get") == 0:
            if v.mv_size != 8:
                raise ValueError("counter b'evictions' is malformed")
            evictions = _get_le(<const unsigned char *>v.mv_data, 8)
        evictions = _sat_add(evictions, len(victims))
        v.mv_size = 8
        v.mv_data = ckey  # scratch
        _set_le(ckey, evictions, 8)
        _w_check(mdb_put(txn, w._meta, &k, &v, 0), "mdb_put")
    now_ns = last_ns or _now_ns()
    check = _xxh3_64(data)
    hdr = _header(size, refs, now_ns, check, lid_len, <const unsigned char *>PyBytes_AS_STRING(name),
                  PyBytes_GET_SIZE(name))
    k.mv_size = KEYLEN
    k.mv_data = <void *>PyBytes_AS_STRING(key)
    v.mv_size = PyBytes_GET_SIZE(hdr)
    v.mv_data = <void *>PyBytes_AS_STRING(hdr)
    _w_check(mdb_put(txn, w._idx, &k, &v, 0), "mdb_put")
    # Chunk 0: the prefix, then up to CHUNK_SIZE bytes, written in place (MDB_RESERVE).
    memcpy(ckey, PyBytes_AS_STRING(key), KEYLEN)
    k.mv_size = KEYLEN + 4
    k.mv_data = ckey
    done = 0
    chunk = 0
    while True:
        _set_chunk(ckey, chunk)
        part = size - done if size - done < <uint64_t>_CHUNK_SIZE else <uint64_t>_CHUNK_SIZE
        v.mv_size = part + (PREFIX if chunk == 0 else 0)
        _w_check(mdb_put(txn, w._dat, &k, &v, MDB_RESERVE), "mdb_put")
        out = <unsigned char *>v.mv_data
        if chunk == 0:
            _set_le(out, size, 8)
            _set_le(out + 8, check, 8)
            out += PREFIX
        if part:
            memcpy(out, &src[done], part)
        done += part
        chunk += 1
        if done >= size:
            break
    _put_lru_w(w, now_ns, <const unsigned char *>PyBytes_AS_STRING(key), False)
    _put_pair_w(w, RECORDS, c_count + 1, c_total + size)
    return len(victims)


cdef int _apply_w(Writer w, dict pending, hits, misses) except -1:
    """Index.apply through the C API: the twin's steps, the headers in key order.

    One cursor over ``idx`` visits the keys in order, so LMDB mostly finds the
    next one on the cursor's page without a descent from the root, and
    rewrites each header in place. (Deleting every moved ``lru`` entry first
    and then adding them all measured a little faster still, but needs more
    free pages at once: in a full map a flush that fits one key at a time
    then failed.)
    """
    cdef MDB_txn *txn = w._open_txn()
    cdef MDB_cursor *cur = NULL
    cdef MDB_val k, v
    cdef bytes key, new
    cdef list entry
    cdef unsigned char *q
    cdef uint64_t last, old_last, refs, old_refs
    _w_check(mdb_cursor_open(txn, w._idx, &cur), "mdb_cursor_open")
    try:
        for key in sorted(pending):  # equal-length keys: bytes order is LMDB's memcmp order
            if PyBytes_GET_SIZE(key) != KEYLEN:
                continue  # never (keys are xxh3-128 digests); a lookup would find nothing either
            entry = pending[key]
            k.mv_size = KEYLEN
            k.mv_data = <void *>PyBytes_AS_STRING(key)
            if _w_check(mdb_cursor_get(cur, &k, &v, MDB_SET_KEY), "mdb_cursor_get") != 0 or v.mv_size <= HDR:
                continue  # deleted or evicted since: its hits still count below
            new = PyBytes_FromStringAndSize(<const char *>v.mv_data, v.mv_size)  # before any change
            q = <unsigned char *>PyBytes_AS_STRING(new)
            old_last = _get_le(q + 16, 8)
            last = entry[1]
            if last > old_last:  # another process may have applied a later access
                _put_lru_w(w, old_last, <const unsigned char *>PyBytes_AS_STRING(key), True)
                _put_lru_w(w, last, <const unsigned char *>PyBytes_AS_STRING(key), False)
            else:
                last = old_last
            old_refs = _get_le(q + 8, 8)
            refs = _sat_add(old_refs, <uint64_t>entry[0])
            _set_le(q + 8, refs, 8)
            _set_le(q + 16, last, 8)
            v.mv_size = PyBytes_GET_SIZE(new)
            v.mv_data = q
            _w_check(mdb_cursor_put(cur, &k, &v, MDB_CURRENT), "mdb_cursor_put")  # same size: in place
    finally:
        mdb_cursor_close(cur)
    if hits or misses:
        old_hits, old_misses = _pair_w(w, ACCESS)
        _put_pair_w(w, ACCESS, min(old_hits + hits, U64_MAX), min(old_misses + misses, U64_MAX))
    return 0
