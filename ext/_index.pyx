# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The hot index, compiled: the twin of ``nvcache/fallback.py``.

Same names, same behaviour, same bytes on disk; the layout is described in
fallback.py, which is also the specification (tests/test_twins.py compares
the two). What is here is what every get and put runs, in C through
LMDB's API: name validation and hashing, the lookup with its checksum,
access buffering, choosing victims, the insert, the delete, applying
buffered accesses and the dump. Everything else (clear, the consistency
check, ``keep`` parsing, large records, any call handed a py-lmdb
transaction, reads when the C environment cannot open) is fallback.py's:
the Index holds a ``fallback.Index`` over the same databases and forwards
to it, the Reader a ``fallback.Reader``.
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
from libc.math cimport floor, log2, pow
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

# fstat(2) as the system call itself: glibc 2.33 made fstat a symbol of its own version
# (fstat64@GLIBC_2.33), the one symbol that kept the wheel from manylinux2014 (glibc 2.17).
# On Linux x86-64 and aarch64 the kernel's struct stat is glibc's.
cdef extern from "<sys/syscall.h>" nogil:
    enum:
        SYS_fstat
cdef extern from "<unistd.h>" nogil:
    long syscall(long number, ...)


def link_count(int fd):
    """The link count of an open file (0: unlinked); OSError as os.fstat raises it."""
    cdef stat st
    if syscall(SYS_fstat, fd, &st) != 0:
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

# -- the layout (fallback.py's docstring), named once --------------------------------------------

# The idx header <QQQQQQH> (fallback._HDR): byte offsets of its fields, then the name.
cdef enum:
    H_SIZE = 0
    H_REFS = 8
    H_LAST = 16
    H_CHECK = 24
    H_BORN = 32
    H_RANK = 40
    H_LID = 48
    HEADER = 50
# The prefix of chunk 0 in dat <QQQ> (fallback._PREFIX): size word (encoding << ENC_SHIFT | size),
# checksum, born_ns.
cdef enum:
    P_SIZE = 0
    P_CHECK = 8
    P_BORN = 16
    PREFIX = 24
cdef enum:
    KEYLEN = 16  # KEY_SIZE: xxh3-128 of the name
    RANK = 8  # the big-endian rank in front of an lru key

MAX_LAYER_ID = 1024
MAX_KIND = 32
KEY_SIZE = KEYLEN
HEADER_SIZE = HEADER
PREFIX_SIZE = PREFIX
RANK_SIZE = RANK
U64_MAX = (1 << 64) - 1  # counters saturate rather than wrap
RECORDS = b"records"
ACCESS = b"access"
EVICTIONS = b"evictions"
BOUND = _twin.BOUND
cdef bytes CURRENT_DICT = _twin.CURRENT_DICT
MAX_RECORD = _twin.MAX_RECORD
cdef uint64_t _MAX_RECORD = _twin.MAX_RECORD  # a larger size is a damaged header
ENC_SHIFT = _twin.ENC_SHIFT
SIZE_MASK = _twin.SIZE_MASK
cdef int _ENC_SHIFT = _twin.ENC_SHIFT
cdef uint64_t _SIZE_MASK = _twin.SIZE_MASK

cdef object _xxh3_64 = xxhash.xxh3_64_intdigest
cdef object _xxh3_128 = xxhash.xxh3_128_digest
cdef dict _valid_kinds = {}

keep_set = _twin.keep_set
CHUNK_SIZE = _twin.CHUNK_SIZE
cdef Py_ssize_t _CHUNK_SIZE = _twin.CHUNK_SIZE
assert _twin.HEADER_SIZE == HEADER and _twin.PREFIX_SIZE == PREFIX and _twin.CHUNK_SIZE + PREFIX == 65504


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


cdef inline uint64_t _u64_at(const unsigned char *p, int offset) noexcept:
    """A little-endian u64 field of the idx header or the chunk-0 prefix."""
    return _get_le(p + offset, 8)


cdef inline void _set_u64_at(unsigned char *p, int offset, uint64_t v) noexcept:
    _set_le(p + offset, v, 8)


cdef inline void _set_chunk(unsigned char *ckey, unsigned int chunk) noexcept:
    # The chunk number after a 16-byte key, big-endian (dat's keys sort by record, then chunk).
    ckey[KEYLEN] = (chunk >> 24) & 0xFF
    ckey[KEYLEN + 1] = (chunk >> 16) & 0xFF
    ckey[KEYLEN + 2] = (chunk >> 8) & 0xFF
    ckey[KEYLEN + 3] = chunk & 0xFF


cdef inline uint64_t _sat_add(uint64_t a, uint64_t b) noexcept:
    return a + b if a + b >= a else 0xFFFFFFFFFFFFFFFFULL


# -- the policies (nvcache/policy.py): LRU ranks by last_ns; LRFU's rank in C -----------------------

cdef double _LRFU_H = <double>_twin.LRFU.HALF_LIFE
cdef double _LRFU_CAP_H = <double>(_twin.LRFU.CAP * _twin.LRFU.HALF_LIFE)
cdef uint64_t _GHOST_SLOTS = _twin.GHOST_SLOTS
cdef uint64_t _GHOST_WINDOW = _twin.GHOST_WINDOW
cdef uint64_t U64_MAX_C = 0xFFFFFFFFFFFFFFFFULL
assert _twin.GHOST_SLOTS & (_twin.GHOST_SLOTS - 1) == 0


cdef inline uint64_t _lrfu_access(uint64_t rank, uint64_t n, uint64_t tick) noexcept:
    """policy.LRFU.access: the same double operations in the same order, floored."""
    if n == 0:
        return rank
    # (rank - tick) / H as Python divides ints: exact below 2**53, and beyond it clamped anyway
    cdef double x = (<double>(rank - tick) if rank >= tick else -<double>(tick - rank)) / _LRFU_H
    if x > 64.0:
        x = 64.0
    cdef double crf = <double>n + (0.0 if x < -64.0 else pow(2.0, x))
    cdef double v = _LRFU_H * log2(crf)
    if v > _LRFU_CAP_H:
        v = _LRFU_CAP_H
    return _sat_add(tick, <uint64_t>floor(v))


cdef inline uint64_t _policy_access(bint lrfu, uint64_t rank, uint64_t last_ns, uint64_t n,
                                    uint64_t tick) noexcept:
    """The rank after ``n`` references, the record's last reference now at ``last_ns``."""
    return _lrfu_access(rank, n, tick) if lrfu else last_ns


cdef inline void _ghost_slot(unsigned char *slot, const unsigned char *key) noexcept:
    """The ghost table's key of a record key: its first 32 bits modulo GHOST_SLOTS, big-endian."""
    cdef uint64_t n = ((<uint64_t>key[0] << 24) | (<uint64_t>key[1] << 16) | (<uint64_t>key[2] << 8)
                       | key[3]) % _GHOST_SLOTS
    slot[0] = (n >> 24) & 0xFF
    slot[1] = (n >> 16) & 0xFF
    slot[2] = (n >> 8) & 0xFF
    slot[3] = n & 0xFF


# -- names, headers, times ---------------------------------------------------------------------

cdef bytes _header(uint64_t size, uint64_t refs, uint64_t last_ns, uint64_t check, uint64_t born_ns,
                   uint64_t rank, uint64_t lid, const unsigned char *name, Py_ssize_t name_len):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, HEADER + name_len)
    cdef unsigned char *p = <unsigned char *>PyBytes_AS_STRING(out)
    _set_u64_at(p, H_SIZE, size)
    _set_u64_at(p, H_REFS, refs)
    _set_u64_at(p, H_LAST, last_ns)
    _set_u64_at(p, H_CHECK, check)
    _set_u64_at(p, H_BORN, born_ns)
    _set_u64_at(p, H_RANK, rank)
    _set_le(p + H_LID, lid, 2)
    memcpy(p + HEADER, name, name_len)
    return out


cdef bytes _lru_key(uint64_t rank, bytes key):
    cdef Py_ssize_t n = PyBytes_GET_SIZE(key)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, RANK + n)
    cdef unsigned char *p = <unsigned char *>PyBytes_AS_STRING(out)
    _set_be(p, rank)
    memcpy(p + RANK, PyBytes_AS_STRING(key), n)
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


def record_key(object layer_id, object kind):
    """Validate ``layer_id`` and ``kind``; return the record's LMDB key (xxh3-128 of its name)."""
    cdef Py_ssize_t n = 0
    return _xxh3_128(_record_name(layer_id, kind, &n))


def name_key(bytes name):
    """The LMDB key of a record name: its 16-byte xxh3-128 digest."""
    return _xxh3_128(name)


def checksum(data):
    return _xxh3_64(data)


def pack_header(uint64_t size, uint64_t refs, uint64_t last_ns, uint64_t check, uint64_t born_ns,
                uint64_t rank, uint64_t lid_len, bytes name):
    if lid_len > 0xFFFF:
        raise OverflowError("layer_id length out of range")
    return _header(size, refs, last_ns, check, born_ns, rank, lid_len,
                   <const unsigned char *>PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name))


def unpack_header(hdr):
    """(size, refs, last_ns, checksum, born_ns, rank, layer_id length, name) of an ``idx`` value."""
    cdef bytes b = bytes(hdr)
    if PyBytes_GET_SIZE(b) <= HEADER:
        raise ValueError("index header too short")
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(b)
    return (_u64_at(p, H_SIZE), _u64_at(p, H_REFS), _u64_at(p, H_LAST), _u64_at(p, H_CHECK),
            _u64_at(p, H_BORN), _u64_at(p, H_RANK), _get_le(p + H_LID, 2), b[HEADER:])


def lru_key(uint64_t rank, bytes key):
    return _lru_key(rank, key)


def lrfu_access(uint64_t rank, uint64_t n, uint64_t tick):
    """policy.LRFU.access(rank, _, n, tick) as the compiled core computes it (for the twin tests)."""
    return _lrfu_access(rank, n, tick)


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


cdef class Reader


cdef class AccessBuffer:
    """Hits and misses seen by this process and not yet written to the index (see fallback.py).

    Due by writes: ``count`` reads the snapshot id of the read just counted from its Reader's
    C field (``last_txn``, set at the renew), a load and a compare on every get."""

    cdef public dict pending
    cdef public long long hits, misses, first_ns, max_age_ns, first_txn, max_writes
    cdef public Py_ssize_t max_keys
    cdef public bint due
    cdef public Reader reader  # whose reads count() counts (None: never due by writes)

    def __init__(self, long long max_age_ns, Py_ssize_t max_keys, long long max_writes=1LL << 62):
        self.max_age_ns = max_age_ns
        self.max_keys = max_keys
        self.max_writes = max_writes
        self.reader = None
        self.pending = {}
        self.hits = self.misses = self.first_ns = self.first_txn = 0
        self.due = False

    cdef inline void _aged(self, long long now_ns, long long txn):
        if not self.first_ns:
            self.first_ns = now_ns
            self.first_txn = txn
            return
        if not self.first_txn:  # 0: no snapshot id was known at the first access (a reopened reader)
            self.first_txn = txn
        if (now_ns - self.first_ns >= self.max_age_ns or len(self.pending) >= self.max_keys
                or (self.first_txn and txn - self.first_txn >= self.max_writes)):
            self.due = True

    cdef int _hit(self, bytes key, long long now_ns, object born, long long txn) except -1:
        # ``born`` stays the int object the read made: compared as objects, stored as is.
        cdef PyObject *found = PyDict_GetItem(self.pending, key)
        cdef list entry
        if found is not NULL:
            entry = <list>found
            if entry[2] != born:  # another record of that name: start over
                found = NULL
        if found is NULL:
            PyDict_SetItem(self.pending, key, [1, now_ns, born])
        else:
            entry[0] = entry[0] + 1
            if now_ns > <long long>entry[1]:  # compared in C: no int object unless it changes
                entry[1] = now_ns
        self.hits += 1
        self._aged(now_ns, txn)
        return 0

    def hit(self, bytes key, long long now_ns, uint64_t born_ns, long long txn=0):
        self._hit(key, now_ns, born_ns, txn)

    def miss(self, long long now_ns, long long txn=0):
        self.misses += 1
        self._aged(now_ns, txn)

    def count(self, bytes key, data, born_ns):
        """Count what a lookup of ``key`` returned (a hit when ``data`` is bytes, else a miss),
        read by ``reader`` in the snapshot of its ``last_txn``; returns ``due`` (whether the
        buffer should now be applied)."""
        cdef long long txn = 0 if self.reader is None else self.reader.last_txn
        if type(data) is bytes:
            self._hit(key, _now_ns(), born_ns, txn)
        else:
            self.misses += 1
            self._aged(_now_ns(), txn)
        return self.due

    def take(self):
        """Empty the buffer and return what it held (to apply, or to restore on failure):
        (pending, hits, misses, first_ns, first_txn)."""
        out = (self.pending, self.hits, self.misses, self.first_ns, self.first_txn)
        self.pending = {}
        self.hits = self.misses = self.first_ns = self.first_txn = 0
        self.due = False
        return out

    def restore(self, taken):
        """Merge back what :meth:`take` returned, after a failed apply (cold: fallback.py's code)."""
        _twin.AccessBuffer.restore(self, taken)

    def clear(self):
        self.take()

    def __len__(self):
        """Pending keys, plus one when only counters are pending (so ``bool`` means "non-empty")."""
        return len(self.pending) or (1 if self.hits or self.misses else 0)


cdef extern from *:
    """
    /* The reader's half of the readers-table handshake (nvcache/readertable.py): set our slot,
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


from nvcache.readertable import FAST_READS_SUPPORTED, FLAG_OFFSET, SLOTS_OFFSET, SLOT_SIZE
cdef Py_ssize_t _FLAG_OFFSET = FLAG_OFFSET, _SLOTS_OFFSET = SLOTS_OFFSET, _SLOT_SIZE = SLOT_SIZE

# Whether this core reads without the flock when the readers table lets it (see readertable.py).
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
    size_t mdb_txn_id(MDB_txn *txn)
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




cdef inline int _check(int rc, str what) except -1:
    """LMDB's return code: MDB_NOTFOUND passes (the caller tests it), other errors raise."""
    if rc != 0 and rc != MDB_NOTFOUND:
        raise _mdb_error(rc, what)
    return rc


# -- the counter reader (fallback.Index.counters): one for reads and writes ----------------------

cdef int _read_u64s(MDB_txn *txn, MDB_dbi meta, bytes name, int n, uint64_t *out) except -1:
    """``meta[name]`` as ``n`` little-endian u64 into ``out`` (zeros when absent)."""
    cdef MDB_val k, v
    cdef int i
    k.mv_size = PyBytes_GET_SIZE(name)
    k.mv_data = PyBytes_AS_STRING(name)
    if _check(mdb_get(txn, meta, &k, &v), "mdb_get") == MDB_NOTFOUND:
        for i in range(n):
            out[i] = 0
        return 0
    if v.mv_size != <size_t>(8 * n):
        raise ValueError(f"counter {name!r} is malformed")
    for i in range(n):
        out[i] = _get_le(<const unsigned char *>v.mv_data + 8 * i, 8)
    return 0


cdef int _counters_c(MDB_txn *txn, MDB_dbi meta, uint64_t *out, bint all) except -1:
    """(count, total) into out[0:2]; with ``all`` also hits, misses, evictions into out[2:5]."""
    _read_u64s(txn, meta, RECORDS, 2, out)
    if all:
        _read_u64s(txn, meta, ACCESS, 2, out + 2)
        _read_u64s(txn, meta, EVICTIONS, 1, out + 4)
    return 0


cdef tuple _counters_tuple(MDB_txn *txn, MDB_dbi meta, bint all):
    cdef uint64_t c[5]
    _counters_c(txn, meta, c, all)
    if not all:
        return (c[0], c[1])
    return (c[0], c[1], c[2], c[3], c[4])


# -- the walk (fallback.Index.walk): the eviction order, for the dump and for victims ------------

ctypedef int (*_group_fn)(object ctx, list group) except -1


def _by_name(entry):
    return (<bytes>entry[1])[HEADER:]


cdef int _walk_c(MDB_txn *txn, MDB_dbi lru, MDB_dbi idx, _group_fn on_group, object ctx,
                 bint by_name) except -1:
    """Call ``on_group(ctx, group)`` for each group of equal rank, next victim first, in name order
    (not ``by_name``: each record its own group, in key order; fallback.Index.walk).

    A group is a list of (key, idx header) as bytes; ``on_group`` returning 1
    stops the walk. An lru entry without its record is skipped (verify
    reports it).
    """
    cdef MDB_cursor *cur = NULL
    cdef MDB_val lk, lv, k, hv
    cdef unsigned char group_rank[RANK]
    cdef list group = []
    cdef int rc
    _check(mdb_cursor_open(txn, lru, &cur), "mdb_cursor_open")
    try:
        rc = mdb_cursor_get(cur, &lk, &lv, MDB_FIRST)
        while rc == 0:
            if lk.mv_size < RANK:
                raise _lmdb.BadValsizeError("an lru key shorter than its rank")
            k.mv_size = lk.mv_size - RANK
            k.mv_data = <unsigned char *>lk.mv_data + RANK
            if _check(mdb_get(txn, idx, &k, &hv), "mdb_get") == 0 and hv.mv_size > HEADER:
                if k.mv_size != KEYLEN:  # only a damaged or foreign file has other keys
                    raise _lmdb.CorruptedError(f"an lru entry with a {k.mv_size}-byte record key")
                if group and (not by_name or memcmp(lk.mv_data, group_rank, RANK) != 0):
                    if len(group) > 1:
                        group.sort(key=_by_name)
                    if on_group(ctx, group):
                        return 0
                    group = []
                memcpy(group_rank, lk.mv_data, RANK)
                group.append((PyBytes_FromStringAndSize(<char *>k.mv_data, k.mv_size),
                              PyBytes_FromStringAndSize(<char *>hv.mv_data, hv.mv_size)))
            rc = mdb_cursor_get(cur, &lk, &lv, MDB_NEXT)
        _check(rc, "mdb_cursor_get")
        if group:
            if len(group) > 1:
                group.sort(key=_by_name)
            on_group(ctx, group)
    finally:
        mdb_cursor_close(cur)
    return 0


cdef int _dump_group(object ctx, list group) except -1:
    """The walk's callback for the dump: one ``cache_records`` entry per record."""
    cdef bytes hdr
    cdef const unsigned char *p
    for _key, hdr in group:
        p = <const unsigned char *>PyBytes_AS_STRING(hdr)
        (<list>ctx).append({
            "last_referred": _rfc3339nano(_u64_at(p, H_LAST)),
            "layer_id": hdr[HEADER:].decode("ascii"),
            "reference_count": _u64_at(p, H_REFS),
            "size": _u64_at(p, H_SIZE),
        })
    return 0


cdef class _Victims:
    """What the victims walk collects: (key, rank, size) until ``freed >= over``."""
    cdef list chosen
    cdef frozenset keep
    cdef long long over, freed


cdef int _take_victims(object ctx, list group) except -1:
    """The walk's callback for eviction: every record of the group not kept, until there is room."""
    cdef _Victims vs = <_Victims>ctx
    cdef bytes vkey, hdr
    cdef const unsigned char *p
    cdef uint64_t vsize
    for vkey, hdr in group:
        p = <const unsigned char *>PyBytes_AS_STRING(hdr)
        if vs.keep and hdr[HEADER:HEADER + _get_le(p + H_LID, 2)] in vs.keep:
            continue
        vsize = _u64_at(p, H_SIZE)
        vs.chosen.append((vkey, _u64_at(p, H_RANK), vsize))
        vs.freed += vsize
        if vs.freed >= vs.over:
            return 1
    return 0


# -- the Index --------------------------------------------------------------------------------

cdef class Index:
    """The record index over the five databases of one environment (see fallback.py).

    Handed the compiled :class:`Writer` as ``txn`` (the store's put path), a
    method runs its C path; handed a py-lmdb transaction, it forwards to
    ``fallback.Index`` over the same databases (``twin``), which follows the
    same policy.
    """

    cdef public object idx, dat, lru, meta, ghost, twin
    cdef bint _lrfu  # the policy: LRFU (clocked, with ghosts), else LRU
    cdef bint _by_name  # its ties_by_name

    def __init__(self, idx, dat, lru, meta, ghost):
        self.idx = idx
        self.dat = dat
        self.lru = lru
        self.meta = meta
        self.ghost = ghost
        self.twin = _twin.Index(idx, dat, lru, meta, ghost)
        self._lrfu = False
        self._by_name = True

    # -- the policy (fallback.Index's) --------------------------------------------
    @property
    def policy(self):
        return self.twin.policy

    def use_policy(self, name):
        self.twin.use_policy(name)
        self._lrfu = self.twin.policy is _twin.LRFU
        self._by_name = self.twin.policy.ties_by_name

    def stored_policy(self, txn):
        return self.twin.stored_policy(txn)

    def set_stored_policy(self, txn, name):
        self.twin.set_stored_policy(txn, name)

    # -- counters ---------------------------------------------------------
    def counters(self, txn):
        """(record count, total bytes, hits, misses, evictions)."""
        if type(txn) is Writer:
            return _counters_tuple((<Writer>txn)._open_txn(), (<Writer>txn)._meta, True)
        return self.twin.counters(txn)

    def records(self, txn):
        """(record count, total bytes): the first two counters."""
        if type(txn) is Writer:
            return _counters_tuple((<Writer>txn)._open_txn(), (<Writer>txn)._meta, False)
        return self.twin.records(txn)

    def count(self, txn):
        return self.records(txn)[0]

    # -- reads --------------------------------------------------------------
    def exists(self, txn, bytes key):
        """Whether ``idx`` has an entry for ``key``."""
        if type(txn) is Writer:
            return _exists_w(<Writer>txn, key)
        return self.twin.exists(txn, key)

    contains = exists

    def history(self, txn, bytes key):
        """(refs, last_ns, born_ns) of ``key``, None when absent (cold: py-lmdb transactions only)."""
        return self.twin.history(txn, key)

    def lookup(self, txn, bytes key):
        """(stored bytes, born_ns, encoding); (None, 0, 0) absent; (False, 0, 0) damaged (fallback.py)."""
        return self.twin.lookup(txn, key)

    # -- compression dictionaries: cold, in py-lmdb transactions (see fallback.py) -----------
    def dictionary(self, txn, number):
        return self.twin.dictionary(txn, number)

    def current_dictionary(self, txn):
        """fallback.Index.current_dictionary; in C for ours: every put reads it (a newer one is
        adopted after the commit, not at the process's next REFRESH_EVERY-th put)."""
        cdef MDB_val k, v
        cdef const unsigned char *p
        if type(txn) is not Writer:
            return self.twin.current_dictionary(txn)
        k.mv_size = PyBytes_GET_SIZE(CURRENT_DICT)
        k.mv_data = PyBytes_AS_STRING(CURRENT_DICT)
        if _check(mdb_get((<Writer>txn)._open_txn(), (<Writer>txn)._meta, &k, &v), "mdb_get") == MDB_NOTFOUND:
            return 0
        if v.mv_size != 2:
            return 0  # as the twin reads a malformed one
        p = <const unsigned char *>v.mv_data
        return p[0] | (p[1] << 8)

    def add_dictionary(self, txn, body):
        return self.twin.add_dictionary(txn, body)

    def sample(self, txn, start, limit):
        return self.twin.sample(txn, start, limit)

    def bound(self, txn):
        """The cache's bound recorded in the file (0: none): read by every put, so in C for ours."""
        cdef uint64_t value
        if type(txn) is Writer:
            _read_u64s((<Writer>txn)._open_txn(), (<Writer>txn)._meta, BOUND, 1, &value)
            return value
        return self.twin.bound(txn)

    def set_bound(self, txn, max_bytes):
        return self.twin.set_bound(txn, max_bytes)

    def evict(self, txn, victims):
        return self.twin.evict(txn, victims)

    def trainings(self, txn):
        return self.twin.trainings(txn)

    def claim_training(self, txn, seen):
        return self.twin.claim_training(txn, seen)

    def tally(self, txn, name):
        return self.twin.tally(txn, name)

    def add_tally(self, txn, name, values):
        return self.twin.add_tally(txn, name, values)

    def walk(self, txn, on_group, on_orphan=None):
        """fallback.Index.walk (the C walk serves the dump and the victims)."""
        return self.twin.walk(txn, on_group, on_orphan)

    def dump(self, txn):
        """The ``cache_records`` of the seed's dump, next victim first."""
        return self.twin.dump(txn)

    def cache_data(self, txn):
        """The seed's ``cache-data`` dump."""
        return self.twin.cache_data(txn)

    def check(self, txn, max_bytes):
        """Every inconsistency between index, records, LRU order, checksums and totals."""
        return self.twin.check(txn, max_bytes)

    # -- writes -------------------------------------------------------------
    def victims(self, txn, uint64_t size, uint64_t max_bytes, frozenset keep):
        """The records (key, rank, size) to evict so that ``size`` more bytes fit (see fallback.py)."""
        if type(txn) is Writer:
            return _victims_w(<Writer>txn, size, max_bytes, keep, self._by_name)
        return self.twin.victims(txn, size, max_bytes, keep)

    def insert(self, txn, bytes key, bytes name, uint64_t lid_len, data, victims, uint64_t refs=0,
               uint64_t last_ns=0, unsigned int enc=0):
        """Evict ``victims``, then add the record born now; -1 (no change) when the key exists."""
        if enc > 0xFFFF:
            raise ValueError(f"an encoding is 16 bits, not {enc}")
        if type(txn) is Writer:
            return _insert_w(<Writer>txn, key, name, lid_len, data, victims, refs, last_ns, enc, self._lrfu)
        return self.twin.insert(txn, key, name, lid_len, data, victims, refs, last_ns, enc)

    def remove(self, txn, bytes key):
        """Delete one record; False when it is absent."""
        if type(txn) is Writer:
            return _delete_w(<Writer>txn, key)
        return self.twin.remove(txn, key)

    def apply(self, txn, dict pending, hits, misses):
        """Write buffered accesses: references of records still born as counted, hits and misses."""
        if type(txn) is Writer:
            _apply_w(<Writer>txn, pending, hits, misses, self._lrfu)
            return
        self.twin.apply(txn, pending, hits, misses)

    def clear(self, txn):
        """Remove every record and ghost; hit, miss and eviction counters are kept."""
        self.twin.clear(txn)

    def init_counters(self, txn):
        self.twin.init_counters(txn)


@cython.no_gc_clear  # the GC must not take _writer (its environment) before __dealloc__ aborts our txn
cdef class Reader:
    """The hot read in one call: lock, snapshot, look up, unlock; it counts nothing (see fallback.py).

    Two things make it cheaper than its twin. With a slot in the readers
    table, the common read takes no flock at all: the thread mutex, then the
    slot handshake (two atomic stores and a load). And it reads through the
    Writer's LMDB environment (its own read-only one when there is no
    Writer) with LMDB's C API: one reusable transaction, the record bytes
    straight from the map, one copy into the returned ``bytes``. If that
    environment cannot be opened, or a renew fails, reads go through
    ``fallback.Reader`` (py-lmdb), under this Reader's lock, for good.
    """

    cdef public object lock, mutex, env
    cdef public object codec  # the decoder of this environment's records: set and used by the store
    cdef object _try_acquire, _release, _is_owned  # the mutex's bound methods, looked up once
    cdef public Index index
    cdef public int fd
    cdef public long long last_txn  # the write transaction id of the snapshot the last read used (0: none yet)
    cdef object _py  # fallback.Reader over the same environment: reads when ours is unusable
    cdef unsigned char[::1] _view  # keeps the table's mapping alive while we point into it
    cdef unsigned char *_slot
    cdef unsigned char *_flag
    cdef MDB_env *_cenv
    cdef MDB_txn *_ctxn  # reset between reads, renewed for each
    cdef MDB_dbi _idx, _dat, _lru, _meta
    cdef Writer _writer  # whose environment we read through (None: our own); closed after us

    def __init__(self, lock, env, Index index, table=None, Writer writer=None):
        self.lock = lock
        self.fd = lock.fd
        self.mutex = lock.mutex
        self._try_acquire = self.mutex.acquire
        self._release = self.mutex.release
        self._is_owned = self.mutex._is_owned
        self.env = env
        self.index = index
        self._py = _twin.Reader(lock, env, index.twin)
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
            rc = mdb_env_set_maxdbs(cenv, 5) or mdb_env_set_mapsize(cenv, map_size)
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
        """Whether reads go through LMDB's C API (the Writer's environment or our own; else fallback.Reader)."""
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
        self._py.close()

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

    cdef object _lookup_in(self, object key, uint64_t *born, uint64_t *enc):
        """fallback.Index.lookup in the renewed transaction: the bytes, None (absent) or False (damaged).

        One B-tree lookup for a hit: chunk 0 of ``dat`` starts with the size,
        checksum and birth; ``idx`` is read only when there are no bytes. One
        function for the whole read (no calls per chunk): every get runs it.
        """
        cdef MDB_val k, v, ik
        cdef unsigned char ckey[KEYLEN + 4]
        cdef const unsigned char *h
        cdef uint64_t size, done, part, last, check
        cdef unsigned int chunk
        cdef bytes data
        cdef char *out
        cdef int rc
        if type(key) is not bytes or PyBytes_GET_SIZE(key) != KEYLEN:
            raise TypeError(f"a record key is {KEYLEN} bytes")
        born[0] = 0
        enc[0] = 0
        memcpy(ckey, PyBytes_AS_STRING(key), KEYLEN)
        _set_chunk(ckey, 0)
        k.mv_size = KEYLEN + 4
        k.mv_data = ckey
        if _check(mdb_get(self._ctxn, self._dat, &k, &v), "mdb_get") == MDB_NOTFOUND:
            # no bytes: absent, or an index entry without them (damage)
            ik.mv_size = KEYLEN
            ik.mv_data = <void *>PyBytes_AS_STRING(key)
            if _check(mdb_get(self._ctxn, self._idx, &ik, &v), "mdb_get") == MDB_NOTFOUND:
                return None
            return False
        if v.mv_size < PREFIX:
            return False
        h = <const unsigned char *>v.mv_data
        size = _u64_at(h, P_SIZE) & _SIZE_MASK
        check = _u64_at(h, P_CHECK)
        if size <= <uint64_t>_CHUNK_SIZE:
            if v.mv_size != PREFIX + size:
                return False
            data = PyBytes_FromStringAndSize(<const char *>h + PREFIX, <Py_ssize_t>size)
        else:
            if size > _MAX_RECORD or v.mv_size != PREFIX + <uint64_t>_CHUNK_SIZE:
                return False
            # Before allocating what a (possibly damaged) prefix claims: the last chunk must
            # exist with the length that size implies (as the twin finds out chunk by chunk).
            last = (size - 1) // <uint64_t>_CHUNK_SIZE
            _set_chunk(ckey, <unsigned int>last)
            if _check(mdb_get(self._ctxn, self._dat, &k, &v), "mdb_get") == MDB_NOTFOUND:
                return False
            if v.mv_size != size - last * <uint64_t>_CHUNK_SIZE:
                return False
            data = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>size)
            out = PyBytes_AS_STRING(data)
            memcpy(out, h + PREFIX, _CHUNK_SIZE)  # h stays valid until the transaction resets
            done = _CHUNK_SIZE
            chunk = 1
            while done < size:  # chunk i: key + big-endian u32 i, CHUNK_SIZE bytes but the last
                _set_chunk(ckey, chunk)
                part = size - done if size - done < <uint64_t>_CHUNK_SIZE else <uint64_t>_CHUNK_SIZE
                if _check(mdb_get(self._ctxn, self._dat, &k, &v), "mdb_get") == MDB_NOTFOUND:
                    return False
                if v.mv_size != part:
                    return False
                memcpy(out + done, v.mv_data, part)
                done += part
                chunk += 1
        if <uint64_t>_xxh3_64(data) != check:
            return False
        born[0] = _u64_at(h, P_BORN)  # h (chunk 0 in the map) is valid until the reset
        enc[0] = _u64_at(h, P_SIZE) >> _ENC_SHIFT
        return data

    cdef object _read(self, int what, object arg):
        """0: exists, 1: lookup, 2: lookup_many, 3: find (fallback.Reader._read); the caller holds the read lock."""
        cdef uint64_t born = 0, enc = 0
        cdef list out
        cdef int rc
        if self.env is None:
            raise StaleReader("the environment was replaced")
        if self._ctxn != NULL:
            rc = mdb_txn_renew(self._ctxn)
            if rc == MDB_MAP_RESIZED:  # another process grew the file past our map: the store reopens
                raise _mdb_error(rc, "mdb_txn_renew")
            if rc == 0:
                self.last_txn = <long long>mdb_txn_id(self._ctxn)
                try:
                    if what == 1:
                        data = self._lookup_in(arg, &born, &enc)
                        return (data, born, enc)
                    if what == 3:
                        data = self._lookup_in(arg, &born, &enc)
                        return (arg, data, born, enc)
                    if what == 2:
                        out = []
                        for key in arg:
                            data = self._lookup_in(key, &born, &enc)
                            out.append((data, born, enc))
                        return out
                    return self._exists_in(arg)
                finally:
                    mdb_txn_reset(self._ctxn)
            self._close_c()  # this environment is unusable: fallback.Reader from now on
        try:
            return self._py._read(what, arg)
        finally:
            self.last_txn = self._py.last_txn

    cdef bint _exists_in(self, bytes key) except -1:
        cdef MDB_val k, v
        if PyBytes_GET_SIZE(key) != KEYLEN:
            raise TypeError(f"a record key is {KEYLEN} bytes")
        k.mv_size = KEYLEN
        k.mv_data = <void *>PyBytes_AS_STRING(key)
        return _check(mdb_get(self._ctxn, self._idx, &k, &v), "mdb_get") == 0

    cdef object _read_waiting(self, int what, object arg, object timeout):
        lock = self.lock
        try:
            lock.acquire(False, timeout)
            try:
                return self._read(what, arg)
            finally:
                lock.release()  # Python: a pending signal's handler runs as it starts
        except BaseException:
            lock.recover()  # then nothing stays held (locking.py)
            raise

    cdef object _guarded(self, int what, object arg, object timeout):
        """``_read`` under the thread mutex and the slot handshake, else the shared flock."""
        release = self._release
        # Owned already: a signal handler calling in during one of this thread's calls (the mutex
        # is reentrant), or a hold an interrupted call left: FileLock.acquire tells which.
        if self._is_owned() or not self._try_acquire(False):
            return self._read_waiting(what, arg, timeout)
        if self.env is None:
            release()
            raise StaleReader("the environment was replaced")
        cdef unsigned char *slot = self._slot  # ours until we leave, even if close() runs meanwhile
        if slot != NULL and nvc_enter_read(slot, self._flag):
            try:
                return self._read(what, arg)
            finally:
                nvc_leave_read(slot)
                release()
        if flock(self.fd, LOCK_SH | LOCK_NB) != 0:
            release()
            return self._read_waiting(what, arg, timeout)
        try:
            return self._read(what, arg)
        finally:
            flock(self.fd, LOCK_UN)
            release()

    def lookup(self, bytes key, timeout=None):
        """(bytes, born_ns) of the record of ``key``; (None, 0) when absent, (False, 0) when damaged."""
        return self._guarded(1, key, timeout)

    def find(self, layer_id, kind, timeout=None):
        """(key, data, born_ns) of the record of ``layer_id`` and ``kind`` (validated): a lookup by name."""
        cdef Py_ssize_t n = 0
        return self._guarded(3, _xxh3_128(_record_name(layer_id, kind, &n)), timeout)

    def lookup_many(self, keys, timeout=None):
        """:meth:`lookup` of each key, under one lock acquisition and one read transaction."""
        return self._guarded(2, list(keys), timeout)

    def contains(self, bytes key, timeout=None):
        """Whether the record of ``key`` exists; counts nothing."""
        return self._guarded(0, key, timeout)

    def cache_data(self, timeout=None):
        """``Index.cache_data`` under the shared flock (a long read: writers wait on the flock)."""
        cdef list records = []
        cdef uint64_t c[5]
        cdef int rc
        lock = self.lock
        try:
            lock.acquire(False, timeout)
            try:
                if self.env is None:
                    raise StaleReader("the environment was replaced")
                if self._ctxn != NULL:
                    rc = mdb_txn_renew(self._ctxn)
                    if rc == MDB_MAP_RESIZED:
                        raise _mdb_error(rc, "mdb_txn_renew")
                    if rc == 0:
                        try:
                            _counters_c(self._ctxn, self._meta, c, True)
                            _walk_c(self._ctxn, self._lru, self._idx, _dump_group, records,
                                    self.index._by_name)
                        finally:
                            mdb_txn_reset(self._ctxn)
                        return {"cache_hits": c[2], "cache_misses": c[3], "cache_records": records,
                                "record_total_size": c[1]}
                    self._close_c()  # this environment is unusable: fallback.Reader from now on
            finally:
                lock.release()
        except BaseException:
            lock.recover()  # a signal's exception may have escaped with the lock held (locking.py)
            raise
        return self._py.cache_data(timeout)  # under its own hold of the lock


cdef class Writer:
    """Write transactions through LMDB's C API, for puts and deletes (see fallback.py).

    Its own environment on the store's file (no lock table; the store's
    flock and the readers table order it with every other writer and
    reader, as they order processes). ``begin()`` returns the writer
    itself, holding the transaction; the store hands it to the Index's
    write verbs (victims, insert, remove, apply, exists, records, counters)
    in place of a py-lmdb transaction, and those run their C paths: no
    py-lmdb object per get, put or delete. If the environment cannot be
    opened the constructor raises lmdb.Error (there is no py-lmdb write
    path in this core). Other writes (clear, repairs) use py-lmdb
    transactions, which the Index forwards to fallback.py.
    """

    cdef MDB_env *_env
    cdef MDB_txn *_txn
    cdef MDB_dbi _idx, _dat, _lru, _meta, _ghost

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
            rc = mdb_env_set_maxdbs(self._env, 5) or mdb_env_set_mapsize(self._env, env.info()["map_size"])
        if rc == 0:
            rc = mdb_env_open(self._env, path, flags, 0o640)
        if rc == 0:
            rc = mdb_txn_begin(self._env, NULL, MDB_RDONLY, &txn)
        if rc == 0:
            rc = (mdb_dbi_open(txn, b"idx", 0, &self._idx) or mdb_dbi_open(txn, b"dat", 0, &self._dat)
                  or mdb_dbi_open(txn, b"lru", 0, &self._lru) or mdb_dbi_open(txn, b"meta", 0, &self._meta)
                  or mdb_dbi_open(txn, b"ghost", 0, &self._ghost))
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
            # Writes are one at a time under the exclusive lock and the mutex, which the caller
            # holds: a transaction still open here was left by a call a signal interrupted.
            mdb_txn_abort(self._txn)
            self._txn = NULL
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




# -- the write paths through LMDB's C API: fallback.Index's steps, in the same order --------------

cdef bint _exists_w(Writer w, bytes key) except -1:
    cdef MDB_val k, v
    if PyBytes_GET_SIZE(key) != KEYLEN:
        raise TypeError(f"a record key has {KEYLEN} bytes, not {PyBytes_GET_SIZE(key)}")
    k.mv_size = KEYLEN
    k.mv_data = <void *>PyBytes_AS_STRING(key)
    return _check(mdb_get(w._open_txn(), w._idx, &k, &v), "mdb_get") == 0


cdef int _put_u64s_w(Writer w, bytes name, uint64_t *vals, int n) except -1:
    cdef unsigned char buf[16]
    cdef MDB_val k, v
    cdef int i
    for i in range(n):
        _set_le(buf + 8 * i, vals[i], 8)
    k.mv_size = PyBytes_GET_SIZE(name)
    k.mv_data = PyBytes_AS_STRING(name)
    v.mv_size = 8 * n
    v.mv_data = buf
    _check(mdb_put(w._open_txn(), w._meta, &k, &v, 0), "mdb_put")
    return 0


cdef int _put_lru_w(Writer w, uint64_t rank, const unsigned char *key, bint delete) except -1:
    cdef unsigned char buf[RANK + KEYLEN]
    cdef MDB_val k, v
    _set_be(buf, rank)
    memcpy(buf + RANK, key, KEYLEN)
    k.mv_size = RANK + KEYLEN
    k.mv_data = buf
    cdef int rc
    if delete:
        _check(mdb_del(w._txn, w._lru, &k, NULL), "mdb_del")
    else:
        # A new rank sorts last (unless another process's clock ran ahead, or an import):
        # append without a search from the root, else an ordinary put.
        v.mv_size = 0
        v.mv_data = buf
        rc = mdb_put(w._txn, w._lru, &k, &v, MDB_APPEND)
        if rc == MDB_KEYEXIST:
            rc = mdb_put(w._txn, w._lru, &k, &v, 0)
        _check(rc, "mdb_put")
    return 0


cdef int _remove_w(Writer w, bytes key, uint64_t size) except -1:
    """A record's index entry and chunks (fallback.delete_chunks); the caller deletes its lru entry."""
    cdef MDB_txn *txn = w._open_txn()
    cdef MDB_val k
    cdef unsigned char ckey[KEYLEN + 4]
    cdef unsigned int chunk, chunks
    if PyBytes_GET_SIZE(key) != KEYLEN:
        raise TypeError(f"a record key has {KEYLEN} bytes, not {PyBytes_GET_SIZE(key)}")
    if size > _MAX_RECORD:  # else billions of deletes for one damaged header (as delete_chunks)
        raise ValueError(f"a stored record size of {size} bytes: a damaged header")
    k.mv_size = KEYLEN
    k.mv_data = <void *>PyBytes_AS_STRING(key)
    _check(mdb_del(txn, w._idx, &k, NULL), "mdb_del")
    memcpy(ckey, PyBytes_AS_STRING(key), KEYLEN)
    chunks = <unsigned int>((size + <uint64_t>_CHUNK_SIZE - 1) // <uint64_t>_CHUNK_SIZE) or 1
    k.mv_size = KEYLEN + 4
    k.mv_data = ckey
    for chunk in range(chunks):
        _set_chunk(ckey, chunk)
        _check(mdb_del(txn, w._dat, &k, NULL), "mdb_del")
    return 0


cdef object _delete_w(Writer w, bytes key):
    """Index.remove."""
    cdef MDB_txn *txn = w._open_txn()
    cdef MDB_val k, v
    cdef bytes hdr
    cdef const unsigned char *p
    cdef uint64_t size = 0
    cdef uint64_t c[2]
    if PyBytes_GET_SIZE(key) != KEYLEN:
        raise TypeError(f"a record key has {KEYLEN} bytes, not {PyBytes_GET_SIZE(key)}")
    k.mv_size = KEYLEN
    k.mv_data = <void *>PyBytes_AS_STRING(key)
    if _check(mdb_get(txn, w._idx, &k, &v), "mdb_get") == MDB_NOTFOUND:
        return False
    hdr = PyBytes_FromStringAndSize(<char *>v.mv_data, v.mv_size)  # before any change
    _counters_c(txn, w._meta, c, False)
    if PyBytes_GET_SIZE(hdr) > HEADER:  # else a damaged header: its lru entry is found by verify
        p = <const unsigned char *>PyBytes_AS_STRING(hdr)
        size = _u64_at(p, H_SIZE)
        _put_lru_w(w, _u64_at(p, H_RANK), <const unsigned char *>PyBytes_AS_STRING(key), True)
    _remove_w(w, key, size)
    c[0] = c[0] - 1 if c[0] > 0 else 0
    c[1] = c[1] - size if c[1] > size else 0
    _put_u64s_w(w, RECORDS, c, 2)
    return True


cdef list _victims_w(Writer w, uint64_t size, uint64_t max_bytes, frozenset keep, bint by_name):
    """Index.victims: the C walk with the eviction callback."""
    cdef MDB_txn *txn = w._open_txn()
    cdef uint64_t c[2]
    _counters_c(txn, w._meta, c, False)
    cdef _Victims vs = _Victims.__new__(_Victims)
    vs.chosen = []
    vs.over = <long long>(c[1] + size) - <long long>max_bytes
    if vs.over <= 0:
        return vs.chosen
    vs.keep = keep
    vs.freed = 0
    _walk_c(txn, w._lru, w._idx, _take_victims, vs, by_name)
    if vs.freed < vs.over:
        raise CacheFull(f"cannot make room for {size} bytes within {max_bytes}: the rest is kept")
    return vs.chosen


cdef uint64_t _take_ghost_w(Writer w, const unsigned char *key, uint64_t held, bint *found) except? 0:
    """Index._take_ghost: the rank ``key`` left when evicted, if still recent (``found``), removing it."""
    cdef MDB_txn *txn = w._open_txn()
    cdef MDB_val k, v
    cdef unsigned char slot[4]
    cdef uint64_t evictions
    _ghost_slot(slot, key)
    k.mv_size = 4
    k.mv_data = slot
    found[0] = False
    if _check(mdb_get(txn, w._ghost, &k, &v), "mdb_get") != 0 or v.mv_size != KEYLEN + 16:
        return 0
    if memcmp(v.mv_data, key, KEYLEN) != 0:
        return 0
    cdef uint64_t rank = _get_le(<const unsigned char *>v.mv_data + KEYLEN, 8)
    cdef uint64_t evicted_at = _get_le(<const unsigned char *>v.mv_data + KEYLEN + 8, 8)
    _check(mdb_del(txn, w._ghost, &k, NULL), "mdb_del")
    _read_u64s(txn, w._meta, EVICTIONS, 1, &evictions)
    cdef uint64_t window = U64_MAX_C if held > U64_MAX_C // _GHOST_WINDOW else _GHOST_WINDOW * (held if held > 1 else 1)
    if evictions - evicted_at > window:
        return 0
    found[0] = True
    return rank


cdef int _put_ghost_w(Writer w, const unsigned char *key, uint64_t rank, uint64_t evicted_at) except -1:
    """What an evicted record leaves in the ghost table: its key, rank and eviction count, in its slot."""
    cdef MDB_val k, v
    cdef unsigned char slot[4]
    cdef unsigned char value[KEYLEN + 16]
    _ghost_slot(slot, key)
    memcpy(value, key, KEYLEN)
    _set_le(value + KEYLEN, rank, 8)
    _set_le(value + KEYLEN + 8, evicted_at, 8)
    k.mv_size = 4
    k.mv_data = slot
    v.mv_size = KEYLEN + 16
    v.mv_data = value
    _check(mdb_put(w._open_txn(), w._ghost, &k, &v, 0), "mdb_put")
    return 0


cdef object _insert_w(Writer w, bytes key, bytes name, uint64_t lid_len, data, victims,
                      uint64_t refs, uint64_t last_ns, uint64_t enc, bint lrfu):
    """Index.insert: evict the victims, then the header, the chunks (chunk 0 in place), lru, counters.

    One function: every put runs it, and calls per step cost measurable time.
    """
    cdef MDB_txn *txn = w._open_txn()
    cdef MDB_val k, v
    cdef unsigned char ckey[KEYLEN + 4]
    cdef const unsigned char[::1] src = data
    cdef uint64_t size = src.shape[0]
    cdef unsigned char *out
    cdef uint64_t done, part, check, born, last, vsize, rank, ghost = 0
    cdef uint64_t c[2]
    cdef uint64_t access[2]
    cdef uint64_t evictions
    cdef bint ghosted = False
    cdef unsigned int chunk
    cdef Py_ssize_t n_victims = len(victims)
    cdef bytes vkey
    if PyBytes_GET_SIZE(key) != KEYLEN:
        raise TypeError(f"a record key has {KEYLEN} bytes, not {PyBytes_GET_SIZE(key)}")
    k.mv_size = KEYLEN
    k.mv_data = <void *>PyBytes_AS_STRING(key)
    if _check(mdb_get(txn, w._idx, &k, &v), "mdb_get") == 0:
        return -1
    _counters_c(txn, w._meta, c, False)
    if lrfu:  # before the victims leave theirs
        ghost = _take_ghost_w(w, <const unsigned char *>PyBytes_AS_STRING(key), c[0], &ghosted)
    if n_victims:
        _read_u64s(txn, w._meta, EVICTIONS, 1, &evictions)
        for vkey, vrank, vsize in victims:
            _remove_w(w, vkey, vsize)
            _put_lru_w(w, vrank, <const unsigned char *>PyBytes_AS_STRING(vkey), True)
            evictions = _sat_add(evictions, 1)
            if lrfu:
                _put_ghost_w(w, <const unsigned char *>PyBytes_AS_STRING(vkey), vrank, evictions)
            if c[0] < 1 or c[1] < <uint64_t>vsize:  # a damaged counter: never store a wrapped one
                raise ValueError("the record counters are smaller than the records they count")
            c[0] -= 1
            c[1] -= vsize
        _put_u64s_w(w, EVICTIONS, &evictions, 1)
    born = _now_ns()
    last = last_ns or born
    rank = last
    if lrfu:  # policy.LRFU.admit on the request clock
        _read_u64s(txn, w._meta, ACCESS, 2, access)
        rank = _sat_add(access[0], access[1])
        if ghosted:
            rank = _lrfu_access(ghost, 1, rank)
    check = _xxh3_64(data)
    hdr = _header(size, refs, last, check, born, rank, lid_len, <const unsigned char *>PyBytes_AS_STRING(name),
                  PyBytes_GET_SIZE(name))
    k.mv_size = KEYLEN
    k.mv_data = <void *>PyBytes_AS_STRING(key)
    v.mv_size = PyBytes_GET_SIZE(hdr)
    v.mv_data = <void *>PyBytes_AS_STRING(hdr)
    _check(mdb_put(txn, w._idx, &k, &v, 0), "mdb_put")
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
        _check(mdb_put(txn, w._dat, &k, &v, MDB_RESERVE), "mdb_put")
        out = <unsigned char *>v.mv_data
        if chunk == 0:
            _set_u64_at(out, P_SIZE, size | enc << _ENC_SHIFT)
            _set_u64_at(out, P_CHECK, check)
            _set_u64_at(out, P_BORN, born)
            out += PREFIX
        if part:
            memcpy(out, &src[done], part)
        done += part
        chunk += 1
        if done >= size:
            break
    _put_lru_w(w, rank, <const unsigned char *>PyBytes_AS_STRING(key), False)
    c[0] += 1
    c[1] += size
    _put_u64s_w(w, RECORDS, c, 2)
    return n_victims


cdef int _apply_w(Writer w, dict pending, hits, misses, bint lrfu) except -1:
    """Index.apply: the twin's steps, the headers in key order.

    One cursor over ``idx`` visits the keys in order, so LMDB mostly finds the
    next one on the cursor's page without a descent from the root, and
    rewrites each header in place. (Deleting every moved ``lru`` entry first
    and then adding them all measured a little faster still, but needs more
    free pages at once: in a full map a flush that fits one key at a time
    then failed.) One loop, no calls per key but LMDB's: every flush runs it.
    """
    cdef MDB_txn *txn = w._open_txn()
    cdef MDB_cursor *cur = NULL
    cdef MDB_val k, v
    cdef bytes key, new
    cdef list entry
    cdef unsigned char *q
    cdef uint64_t last, when, old_rank, new_rank, tick = 0
    cdef uint64_t counts[2]
    cdef bint counted = hits or misses
    if counted or lrfu:
        _read_u64s(txn, w._meta, ACCESS, 2, counts)
        counts[0] = min(counts[0] + hits, U64_MAX)
        counts[1] = min(counts[1] + misses, U64_MAX)
        tick = _sat_add(counts[0], counts[1])  # the request clock after this batch
    _check(mdb_cursor_open(txn, w._idx, &cur), "mdb_cursor_open")
    try:
        for key in sorted(pending):  # equal-length keys: bytes order is LMDB's memcmp order
            if PyBytes_GET_SIZE(key) != KEYLEN:
                continue  # never (keys are xxh3-128 digests); a lookup would find nothing either
            entry = pending[key]
            k.mv_size = KEYLEN
            k.mv_data = <void *>PyBytes_AS_STRING(key)
            if _check(mdb_cursor_get(cur, &k, &v, MDB_SET_KEY), "mdb_cursor_get") != 0 or v.mv_size <= HEADER:
                continue  # deleted or evicted since: its hits still count below
            if _get_le(<const unsigned char *>v.mv_data + H_BORN, 8) != <uint64_t>entry[2]:
                continue  # another record of that name now: the references were not its own
            new = PyBytes_FromStringAndSize(<const char *>v.mv_data, v.mv_size)  # before any change
            q = <unsigned char *>PyBytes_AS_STRING(new)
            last = _u64_at(q, H_LAST)
            when = <uint64_t>entry[1]
            if when > last:  # else another process applied a later access
                last = when
            old_rank = _u64_at(q, H_RANK)
            new_rank = _policy_access(lrfu, old_rank, last, <uint64_t>entry[0], tick)
            if new_rank != old_rank:
                _put_lru_w(w, old_rank, <const unsigned char *>PyBytes_AS_STRING(key), True)
                _put_lru_w(w, new_rank, <const unsigned char *>PyBytes_AS_STRING(key), False)
            _set_u64_at(q, H_REFS, _sat_add(_u64_at(q, H_REFS), <uint64_t>entry[0]))
            _set_u64_at(q, H_LAST, last)
            _set_u64_at(q, H_RANK, new_rank)
            v.mv_size = PyBytes_GET_SIZE(new)
            v.mv_data = q
            _check(mdb_cursor_put(cur, &k, &v, MDB_CURRENT), "mdb_cursor_put")  # same size: in place
    finally:
        mdb_cursor_close(cur)
    if counted:
        _put_u64s_w(w, ACCESS, counts, 2)
    return 0
