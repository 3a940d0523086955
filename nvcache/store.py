"""The store: one cache directory's LMDB environment, its files and transactions.

A directory holds ``data.mdb`` (LMDB, opened with ``lock=False``), ``version``,
``users`` and ``clean``; the directory itself is the flock target (see
:mod:`nvcache.locking`). Each process opens a directory once: every
:class:`~nvcache.LayerCache` on it shares one :class:`Store`, because LMDB
refuses a second open of the same files and threads must share one flock
descriptor anyway.

Every transaction runs under the lock: :meth:`Store.read` under the shared
lock, :meth:`Store.write` under the exclusive one, which also applies the
process's buffered accesses first (unless the write may leave them for later). The store turns every LMDB failure into
CacheError; when the failure means the file is damaged, the next writer
rebuilds it (never on contention, "already open" or a full disk).

Rebuilding unlinks ``data.mdb`` and creates a new one. Processes that still
map the old file notice (its link count drops to zero) before their next
write or dump, and reopen.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import fcntl
import json
import logging
import mmap
import os
import shutil
import signal
import stat
import struct
import threading
import time
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Tuple

import lmdb

from .errors import CacheError, CacheFull, CacheTimeout, StaleReader
from .locking import (READERS_FILE, BadTable, FileLock, ReaderTable, fork_generation, is_resource_error,
                      open_lock_file, open_nofollow)

log = logging.getLogger("nvcache")

_INSERT = object()  # Store.write's marker for Store.insert's steps (victims, then Index.insert)

# 2: record bytes in chunks of at most 64 KiB; 3: the readers table; 4: size and checksum in front
# of a record's first chunk (a get reads dat alone); 5: the readers table marks claimed slots;
# 6: a birth stamp (born_ns) in the idx header and in front of chunk 0, so buffered references
# apply only to the record they were counted against
FORMAT_VERSION = 6
FORMAT_DESCRIPTION = ("nvcache LMDB layout: idx (with birth), dat (chunked, size+checksum+birth first), lru, "
                      "meta; readers table")
DATA_FILE = "data.mdb"
VERSION_FILE = "version"
USERS_FILE = "users"  # every process using the cache holds a shared flock on it
CLEAN_FILE = "clean"  # data.mdb's identity and mtime when its last user closed it
BOOT_KEY = b"boot"
READERS_KEY = b"readers"  # the nonce of the readers table made with this data.mdb
# The first opener walks a data.mdb this small even after a clean close (silent bit rot keeps
# mtime, and LMDB has no page checksums); larger files trust the clean mark to keep opens fast.
ALWAYS_CHECK_BYTES = 64 << 20
_MARK_BOOT = "update the boot record"

# The map is address space, not disk: data.mdb grows only as pages are
# written. Every process uses the same size unless a bound needs more.
_MIN_MAP_SIZE = 64 << 30
_DB_NAMES = (b"idx", b"dat", b"lru", b"meta")

# Errors that mean the file's bytes are wrong. Contention, "already open",
# a full disk or a full map are not among them: those never trigger a rebuild.
CORRUPTION_ERRORS = (lmdb.CorruptedError, lmdb.InvalidError, lmdb.PageNotFoundError,
                     lmdb.VersionMismatchError, lmdb.BadValsizeError, lmdb.IncompatibleError,
                     lmdb.InvalidParameterError,  # EINVAL from a get of a valid key: a bad page
                     lmdb.PageFullError)  # MDB_PAGE_FULL: a page's free-space bookkeeping is wrong
# What an index operation raises on bad stored bytes (arguments were checked by the front).
DATA_ERRORS = (lmdb.Error, ValueError, struct.error)
# Errors after which the environment must be reopened (not rebuilt).
REOPEN_ERRORS = (lmdb.PanicError, lmdb.BadTxnError, lmdb.BadRslotError, lmdb.BadDbiError)

# -- the write map ---------------------------------------------------------------
# With LMDB's write map a commit is memory stores into the shared mapping instead of one
# pwrite per dirty page (a put-evict at 10k records: 42 -> 20 us). LMDB then extends
# data.mdb to the whole map as a sparse file, and a store into a hole gets its disk block at
# that moment: on a full disk that is SIGBUS, which would kill the scanner. So before a write
# transaction the store fallocates what the transaction can use (``Store._reserve``), and a
# full disk becomes ENOSPC there, a CacheError before anything changed. Only on filesystems
# where an fallocated block stays writable without new space (not copy-on-write ones).
PAGE_SIZE = 4096  # LMDB's page size on x86-64 and aarch64 Linux with 4 KiB pages
_SAFE_FILESYSTEMS = {0xEF53: "ext2/3/4", 0x58465342: "xfs", 0x01021994: "tmpfs"}
# Pages one key can dirty: its leaf-to-root path in idx, dat and lru (trees deeper than 5
# levels need billions of records), plus free-list records. Pessimistic on purpose.
_PAGES_PER_KEY = 16
_RESERVE_SLACK = 64 * PAGE_SIZE  # meta, main and free-list pages of any transaction
# fallocate in steps (most writes then find their room reserved): an eighth of the file, at
# least 256 KiB (a small cache stays small on disk), at most 8 MiB.
_RESERVE_STEP_MIN, _RESERVE_STEP_MAX = 256 << 10, 8 << 20


class _NoRoom(Exception):
    """The disk cannot give a write-map transaction the room it may need (see Store._reserve)."""


def filesystem_type(path: str) -> int:
    """statfs(2)'s f_type for ``path``, or 0 when it cannot be asked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(512)  # struct statfs: f_type is the first word
        if libc.statfs(os.fsencode(path), buf) != 0:
            return 0
        return int(struct.unpack_from("=q" if ctypes.sizeof(ctypes.c_long) == 8 else "=i", buf.raw)[0]) & 0xFFFFFFFF
    except (OSError, AttributeError, ValueError):
        return 0


def writemap_wanted(path: str, map_size: int) -> bool:
    """Whether this process writes through LMDB's write map (see ``_reserve``).

    Off when ``NVCACHE_WRITEMAP=0``, on filesystems not known to keep
    fallocated blocks writable, and for maps larger than the common size:
    LMDB truncates the file to the opener's map size, and a larger-map
    process's reserved pages beyond it would become holes again.
    """
    if os.environ.get("NVCACHE_WRITEMAP", "1").strip() == "0":
        return False
    if map_size != _MIN_MAP_SIZE or not hasattr(os, "posix_fallocate"):
        return False
    return filesystem_type(path) in _SAFE_FILESYSTEMS


# Buffered accesses are written at least this often while a process is active.
APPLY_AFTER_NS = 1_000_000_000
APPLY_AFTER_KEYS = 512  # bounds the one get that pays for a batch (12.7 us a key at 1M records)


def map_size_for(max_bytes: int) -> int:
    return max(_MIN_MAP_SIZE, 4 * max_bytes + (1 << 30))


def prepare_directory(path: str) -> None:
    """Create ``path`` (0o750) or check that it is safe to use."""
    try:
        os.makedirs(path, mode=0o750, exist_ok=True)
    except FileExistsError:
        raise CacheError(f"cache path {path} exists and is not a directory") from None
    except OSError as exc:
        raise CacheError(f"cannot create cache directory {path}: {exc.strerror}") from None
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise CacheError(f"cache path {path} is a symlink; refusing to follow it")
    if not stat.S_ISDIR(st.st_mode):
        raise CacheError(f"cache path {path} is not a directory")
    if st.st_uid not in (os.geteuid(), 0):
        raise CacheError(f"cache directory {path} is owned by uid {st.st_uid}, not by this user or root")


def read_version(path: str) -> Optional[int]:
    """The format version recorded in ``<path>/version``, or None if missing or unreadable.

    A shortage of descriptors or memory raises CacheError instead: it says
    nothing about the file, and None would empty the cache.
    """
    try:
        fd = open_nofollow(os.path.join(path, VERSION_FILE), os.O_RDONLY)
    except CacheError as exc:
        if is_resource_error(exc):
            raise
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            doc = json.loads(f.read(4096))
        version = doc.get("version") if isinstance(doc, dict) else None
        return version if type(version) is int else None
    except OSError as exc:
        if is_resource_error(exc):
            raise CacheError(f"cannot read {path}/{VERSION_FILE}: {exc.strerror}") from exc
        return None
    except ValueError:
        return None


def write_atomically(path: str, name: str, body: bytes) -> None:
    """Write ``<path>/<name>`` through a new temp file and rename: never through a planted symlink."""
    tmp = os.path.join(path, f".{name}.{os.getpid()}.{threading.get_ident()}")
    fd = open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        os.write(fd, body)
    finally:
        os.close(fd)
    os.replace(tmp, os.path.join(path, name))


def remove_entry(path: str) -> None:
    """Remove a file, symlink (never its target) or planted directory; absent is fine."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        shutil.rmtree(path)  # does not follow symlinks inside


def write_version(path: str) -> None:
    body = json.dumps({"version": FORMAT_VERSION, "description": FORMAT_DESCRIPTION}).encode()
    write_atomically(path, VERSION_FILE, body)


def current_boot_id() -> str:
    """The kernel's boot id (``NVCACHE_BOOT_ID`` overrides it, for tests); "" when unknown."""
    forced = os.environ.get("NVCACHE_BOOT_ID")
    if forced:
        return forced
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return f.read(64).decode("ascii", "replace").strip()
    except OSError:
        return ""


def allocated_bytes(path: str) -> int:
    """Disk space a file holds: its size, or less when sparse (with the write map, data.mdb's
    size is the whole map and its blocks are what LMDB used plus what the store reserved)."""
    st = os.stat(path)
    return min(st.st_size, st.st_blocks * 512)


def _file_mark(st: os.stat_result) -> Dict[str, int]:
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _exercise_writes(env: Any, dbs: List[Any]) -> None:
    """Delete every key of every database in one write transaction, then abort it.

    Part of the deep check (in a child process): reading every record does not
    interpret everything a write relies on (a leaf's free-space bounds, node
    offsets, branch pages when pages merge, the free list when pages are
    allocated), and LMDB trusts those; bit rot there made the first *write*
    crash (SIGBUS) in the bit-rot campaign. Aborted, and without a write map,
    the transaction never reaches the file.
    """
    txn = env.begin(write=True)
    try:
        for db in dbs:
            with txn.cursor(db) as cur:
                keys = list(cur.iternext(keys=True, values=False))
            for key in keys:
                txn.delete(key, db=db)
    finally:
        txn.abort()


_P_BRANCH, _P_LEAF, _P_OVERFLOW = 0x01, 0x02, 0x04
_F_BIGDATA, _F_SUBDATA = 0x01, 0x02
_NO_PAGE = (1 << 64) - 1


def check_pages(path: str) -> Optional[str]:
    """Walk data.mdb's B-trees page by page (LMDB 0.9's on-disk format); the first problem found.

    Part of the deep check: LMDB trusts a page's own header, and bit rot there
    can be harmless to every read but not to a write. A page's number is the
    one LMDB frees it by when a write copies it: a wrong one goes to the free
    list, and a later transaction writes to that page, which under the write
    map is an address outside the file (a crash). So every page reachable from
    the newer meta page must carry its own number and a kind that fits, and
    every free-list entry must lie inside the file.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 2 * PAGE_SIZE:
            return "shorter than its two meta pages"
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as raw:
            metas = [raw[0:PAGE_SIZE], raw[PAGE_SIZE:2 * PAGE_SIZE]]
            meta = max(metas, key=lambda m: struct.unpack_from("<Q", m, 144)[0])
            last = struct.unpack_from("<Q", meta, 136)[0]
            if (last + 1) * PAGE_SIZE > size:
                return f"the meta page's last page {last} lies beyond the file"
            seen: set = set()
            problems: List[str] = []

            def page(n: int, kind: int) -> Optional[bytes]:
                if n < 2 or n > last or n in seen:
                    problems.append(f"page {n} is out of range or reached twice")
                    return None
                seen.add(n)
                pg = raw[n * PAGE_SIZE:(n + 1) * PAGE_SIZE]
                number, _pad, flags = struct.unpack_from("<QHH", pg, 0)
                if number != n or not flags & kind:
                    problems.append(f"page {n} says it is page {number} with flags {flags:#x}")
                    return None
                return pg

            def value(pg: bytes, off: int, flags: int, dsize: int) -> Optional[bytes]:
                if not flags & _F_BIGDATA:
                    return pg[off:off + dsize]
                first = struct.unpack_from("<Q", pg, off)[0]
                head = page(first, _P_OVERFLOW)
                if head is None:
                    return None
                count = struct.unpack_from("<I", head, 12)[0]
                if first + count - 1 > last or count * PAGE_SIZE < 16 + dsize:
                    problems.append(f"overflow page {first} runs past the file")
                    return None
                seen.update(range(first + 1, first + count))
                return raw[first * PAGE_SIZE + 16:first * PAGE_SIZE + 16 + dsize]

            def walk(root: int, on_leaf: Callable[[bytes, int, int, int], None], depth: int = 0) -> None:
                if root == _NO_PAGE or problems:
                    return
                if depth > 32:
                    problems.append("a B-tree deeper than 32 levels")
                    return
                pg = page(root, _P_BRANCH | _P_LEAF)
                if pg is None:
                    return
                flags, lower, upper = struct.unpack_from("<HHH", pg, 10)
                if not 16 <= lower <= upper <= PAGE_SIZE:
                    problems.append(f"page {root} has free-space bounds {lower}..{upper}")
                    return
                for off in struct.unpack_from(f"<{(lower - 16) >> 1}H", pg, 16):
                    if not upper <= off <= PAGE_SIZE - 8:
                        problems.append(f"page {root} has a node outside its bounds")
                        return
                    lo, hi, nflags, ksize = struct.unpack_from("<HHHH", pg, off)
                    if off + 8 + ksize > PAGE_SIZE:
                        problems.append(f"page {root} has a key past its end")
                        return
                    if flags & _P_BRANCH:
                        walk(lo | hi << 16 | nflags << 32, on_leaf, depth + 1)
                    else:
                        on_leaf(pg, off + 8 + ksize, nflags, lo | hi << 16)
                    if problems:
                        return

            def free_leaf(pg: bytes, off: int, flags: int, dsize: int) -> None:
                ids = value(pg, off, flags, dsize)
                if ids is None or len(ids) < 8:
                    return
                n = struct.unpack_from("<Q", ids, 0)[0]
                if (n + 1) * 8 > len(ids):
                    problems.append("a free-list record longer than its value")
                elif n and max(struct.unpack_from(f"<{n}Q", ids, 8)) > last:
                    problems.append("a free-list entry beyond the file's last page")

            def data_leaf(pg: bytes, off: int, flags: int, dsize: int) -> None:
                if flags & _F_BIGDATA:  # only overflow pages have a header to check
                    value(pg, off, flags, dsize)

            def main_leaf(pg: bytes, off: int, flags: int, dsize: int) -> None:
                if flags & _F_SUBDATA and off + 48 <= PAGE_SIZE:  # a named database's record
                    walk(struct.unpack_from("<Q", pg, off + 40)[0], data_leaf, 1)

            walk(struct.unpack_from("<Q", meta, 80)[0], free_leaf)
            walk(struct.unpack_from("<Q", meta, 128)[0], main_leaf)
            return problems[0] if problems else None


class Store:
    """The open environment of one directory in this process (shared, reference counted)."""

    _registry: Dict[Tuple[int, int], "Store"] = {}
    _registry_lock = threading.Lock()

    @classmethod
    def acquire(cls, path: str, core: ModuleType, max_bytes: int, durable: bool,
                lock_timeout: float) -> "Store":
        prepare_directory(path)
        st = os.stat(path)
        ident = (st.st_dev, st.st_ino)
        with cls._registry_lock:
            store = cls._registry.get(ident)
            if store is None:
                store = cls(path, core, max_bytes, durable, lock_timeout)
                cls._registry[ident] = store
            elif store.core is not core:  # its index and buffer are the other core's objects
                raise CacheError(f"{path} is already open in this process with the other core "
                                 f"({store.core.__name__})")
            else:  # inherited through fork, the store reopens itself at first use
                store.force_sync = store.force_sync or (durable and not store.durable)
            store.users += 1
            return store

    def __init__(self, path: str, core: ModuleType, max_bytes: int, durable: bool,
                 lock_timeout: float) -> None:
        self.path = path
        self.core = core
        self.map_size = map_size_for(max_bytes)
        self.writemap = writemap_wanted(path, self.map_size)
        self._allocated = 0  # data.mdb has disk blocks below this offset (write map only)
        # What the current write transaction reserved so far: bytes of data, tree pages, and
        # data.mdb's used bytes when it began (-1: not read yet).
        self._txn_reserve, self._txn_pages, self._txn_used = 0, 0, -1
        self.durable = durable
        self.force_sync = False
        self.users = 0
        self.buffer = core.AccessBuffer(APPLY_AFTER_NS, APPLY_AFTER_KEYS)
        self.generation = fork_generation()
        self.env: Any = None
        self.index: Any = None
        self.reader: Any = None
        self.writer: Any = None  # the core's Writer: inserts and applies (the put path)
        self._writer_fns = frozenset((None, _INSERT, core.Index.apply, core.Index.remove))
        self.table: Optional[ReaderTable] = None
        self._data_fd = -1
        self._damaged = False
        self._broken = False
        # False whenever _needs_refresh() may be true (closed, damaged, broken, forked): one
        # attribute for the hot get to check.
        self._ok = False
        self._suspect = False  # verify() found problems: no clean mark, so the next first opener checks
        self._meta_db: Any = None
        self._users_fd = -1
        self.lock = FileLock(path, lock_timeout)
        try:
            self._users_fd = open_lock_file(os.path.join(path, USERS_FILE))
            self._first = self._claim_users()
            self._open()
            self._first = False  # later reopens follow a rebuild or a fork: no deep check
        except BaseException:
            self._close_env()
            self.lock.close()
            if self._users_fd >= 0:
                os.close(self._users_fd)
            raise

    # -- opening and rebuilding ------------------------------------------------
    def _open(self) -> None:
        # Usually a shared lock suffices; only a rebuild or a boot-record
        # update needs the exclusive one, and then everything is re-checked.
        self.lock.acquire(False)
        try:
            problem = self._try_open(deep=self._first)
        finally:
            self.lock.release()
        if problem is None:
            return
        self._close_env()
        self.lock.acquire(True)
        try:
            problem = self._try_open(deep=self._first)  # re-checked: someone may have rebuilt it
            if problem == _MARK_BOOT:
                self._write_boot()
            elif problem is not None:
                self._rebuild(problem)
        finally:
            self.lock.release()

    def _try_open(self, deep: bool) -> Optional[str]:
        """Open the environment; return why it must be rebuilt, or None when it is usable.

        ``deep``: this is the only process using the cache, so if it was not
        closed cleanly, walk the whole file first (in a child process: LMDB
        has no page checksums and may crash on a damaged page).
        """
        version = read_version(self.path)
        data_path = os.path.join(self.path, DATA_FILE)
        if version is None:
            return "new" if not os.path.exists(data_path) else "version file missing or unreadable"
        if version != FORMAT_VERSION:
            return f"format version {version} is not {FORMAT_VERSION}"
        try:
            if not stat.S_ISREG(os.lstat(data_path).st_mode):  # LMDB would follow a planted symlink
                return f"{DATA_FILE} is not a regular file"
        except FileNotFoundError:
            return f"{DATA_FILE} is missing"
        if deep:
            # Small files are always walked (it costs less than a scanner's first layer); large
            # ones only after an unclean close. Either way the mark is consumed: if this process
            # dies before closing cleanly, the next first opener walks the file.
            trusted = self._closed_cleanly() and allocated_bytes(data_path) > ALWAYS_CHECK_BYTES
            try:
                remove_entry(os.path.join(self.path, CLEAN_FILE))
            except OSError as exc:
                log.debug("could not consume the clean mark of %s: %s", self.path, exc)
            if not trusted:
                problem = self._deep_check()
                if problem is not None:
                    return f"deep check at first open: {problem}"
        try:
            table = ReaderTable(self.path, create=False)
        except BadTable as exc:  # other CacheErrors (no descriptors, no memory) are not damage
            return f"readers table: {exc}"
        if self.writemap and os.path.getsize(data_path) > self.map_size:
            # A larger-bound process (pwrite commits) filled more than our map: LMDB would grow
            # our map to match, beyond what _reserve reserves for.
            self.writemap = False
        try:
            env = self._env(create=False)
        except lmdb.Error as exc:
            table.close()
            if isinstance(exc, CORRUPTION_ERRORS) or not os.path.exists(data_path):
                return f"cannot open {DATA_FILE}: {exc}"
            raise CacheError(f"cannot open cache {self.path}: {exc}") from exc
        try:
            # Without txn=: a handle opened inside a read transaction dies with it.
            dbs = [env.open_db(name, create=False) for name in _DB_NAMES]
            index = self.core.Index(*dbs)
            with env.begin() as txn:
                index.counters(txn)  # fails on a damaged or foreign meta database
                boot = txn.get(BOOT_KEY, None, dbs[3])
                nonce = txn.get(READERS_KEY, None, dbs[3])
        except (lmdb.NotFoundError, lmdb.ReadonlyError):
            env.close()
            table.close()
            return f"{DATA_FILE} lacks nvcache's databases"
        except (CORRUPTION_ERRORS + (ValueError, TypeError)) as exc:
            env.close()
            table.close()
            return f"{DATA_FILE} is damaged: {exc}"
        except BaseException:
            env.close()
            table.close()
            raise
        if nonce != table.nonce:
            # A table made for another data.mdb (or remade after ours was deleted): processes
            # may still read through the old one, so only a new data.mdb is safe to write.
            env.close()
            table.close()
            return f"the readers table does not belong to {DATA_FILE}"
        self._adopt(env, index, dbs[3], table)
        return self._boot_problem(boot)

    # -- reboots -----------------------------------------------------------------
    # Without fsync a commit is safe from a process crash but not from an OS
    # crash, which always comes with a reboot. The cache records the boot id
    # and whether any non-durable process ever opened it ("N") or only
    # durable ones ("D"); after a reboot an "N" cache is rebuilt.
    def _boot_problem(self, boot: Optional[bytes]) -> Optional[str]:
        current = current_boot_id()
        stored, _, flag = (boot or b"").decode("ascii", "replace").partition("\0")
        if not current:
            return None  # no boot id to compare (not Linux): trust the file
        if stored != current:
            if flag == "D":
                return _MARK_BOOT
            return f"the machine rebooted since non-durable writes (boot id {stored or 'unknown'})"
        if flag != "D" or self.durable:
            return None
        return _MARK_BOOT  # first non-durable user of a durable-only cache: record it

    def _boot_record(self, previous: Optional[bytes]) -> bytes:
        flag = "D" if self.durable and (previous is None or previous.endswith(b"\0D")) else "N"
        return f"{current_boot_id()}\0{flag}".encode("ascii", "replace")

    def _write_boot(self) -> None:
        assert self.table is not None
        self.table.enter_write(self.lock.timeout)
        try:
            if self.writemap:
                self._txn_used = -1
                try:
                    self._reserve(_PAGES_PER_KEY)
                except _NoRoom as exc:  # the next use reopens without the write map
                    self.writemap, self._broken, self._ok = False, True, False
                    raise CacheError(f"no space left for the cache in {self.path}: {exc}") from None
            with self.env.begin(write=True) as txn:
                txn.put(BOOT_KEY, self._boot_record(txn.get(BOOT_KEY, None, self._meta_db)),
                        db=self._meta_db)
            if self.durable:
                self.env.sync(True)
        except lmdb.Error as exc:
            raise self._failure(exc) from exc
        finally:
            self.table.leave_write()

    # -- clean close and the deep check ---------------------------------------------
    def _claim_users(self) -> bool:
        """Join the users of the cache; True when no other process has it open."""
        first = True
        try:
            fcntl.flock(self._users_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            first = False
        deadline = time.monotonic() + self.lock.timeout
        while True:  # a closing process holds the exclusive lock for a moment
            try:
                fcntl.flock(self._users_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return first
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise CacheTimeout(f"{self.path}/{USERS_FILE} stayed locked for {self.lock.timeout} s") from None
                time.sleep(0.001)

    def _closed_cleanly(self) -> bool:
        """Whether data.mdb is exactly as the last process to close it left it."""
        try:
            fd = open_nofollow(os.path.join(self.path, CLEAN_FILE), os.O_RDONLY)
            with os.fdopen(fd, "rb") as f:
                mark = json.loads(f.read(4096))
            st = os.stat(os.path.join(self.path, DATA_FILE))
        except (OSError, ValueError, CacheError):
            return False
        return mark == _file_mark(st)

    def _mark_clean(self) -> None:
        """Called by the last process to close the cache, under the exclusive lock."""
        try:
            st = os.stat(os.path.join(self.path, DATA_FILE))
            write_atomically(self.path, CLEAN_FILE, json.dumps(_file_mark(st)).encode())
        except (OSError, CacheError) as exc:
            log.debug("could not record a clean close of %s: %s", self.path, exc)

    def _deep_check(self) -> Optional[str]:
        """Walk every record in a child process; a crash there only means "rebuild"."""
        size = allocated_bytes(os.path.join(self.path, DATA_FILE))
        limit = 30.0 + size / (50 << 20)  # generous: a cycle in damaged pages must not hang us
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, reported by exit status
            code = 70
            try:
                code = 68
                if check_pages(os.path.join(self.path, DATA_FILE)) is not None:
                    os._exit(68)
                code = 70
                env = self._env(create=False, writemap=False)  # the trial write is aborted: no trace
                dbs = [env.open_db(name, create=False) for name in _DB_NAMES]
                with env.begin() as txn:
                    code = 0 if not self.core.Index(*dbs).check(txn, None) else 65
                if code == 0:
                    code = 67
                    _exercise_writes(env, dbs)
                    code = 0
            except BaseException:
                code = code if code in (67, 68) else 66
            os._exit(code)
        deadline = time.monotonic() + limit
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() >= deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return f"no answer within {limit:.0f} s"
            time.sleep(0.002)
        if os.WIFSIGNALED(status):
            return f"the checking process died of signal {os.WTERMSIG(status)}"
        code = os.WEXITSTATUS(status)
        return None if code == 0 else {65: "inconsistent index", 66: "LMDB error",
                                        67: "LMDB error in a trial write",
                                        68: "a damaged page"}.get(code, f"exit {code}")

    def _env(self, create: bool, writemap: Optional[bool] = None) -> Any:
        return lmdb.Environment(
            self.path, map_size=self.map_size, subdir=True, readonly=False, create=create,
            lock=False, sync=self.durable, metasync=self.durable, max_dbs=len(_DB_NAMES),
            max_spare_txns=4, readahead=False, mode=0o640,
            writemap=self.writemap if writemap is None else writemap)

    def _reserve(self, pages: int, data: int = 0) -> None:
        """Give data.mdb disk blocks for what the current write transaction may add (write map).

        ``pages``: tree pages it may dirty (a pessimistic count); ``data``:
        record bytes it writes. LMDB writes new pages after its last used one,
        one per dirty page at most (and a transaction cannot dirty more than
        every page of the trees), so blocks up to ``used + min(pages, 2 * used)
        + data`` suffice. Only growth is ever needed: no process deallocates
        (every write-map process truncates to the same map size), and a
        rebuilt file resets ``_allocated`` when it is adopted.

        Raises _NoRoom when the disk cannot give that: the caller then commits
        with pwrite instead, which reuses LMDB's free pages and meets a full
        disk as ENOSPC.
        """
        used = self._txn_used
        if used < 0:  # once per transaction: the last commit's size, which only this one changes now
            if self.writer is not None:
                last = self.writer.last_page()
            else:
                last = self.env.info()["last_pgno"]
            used = self._txn_used = (last + 1) * PAGE_SIZE
            self._txn_pages = self._txn_reserve = 0
        self._txn_pages += pages
        self._txn_reserve += data
        need = min(used + min(self._txn_pages * PAGE_SIZE, 2 * used) + self._txn_reserve
                   + (used >> 8) + _RESERVE_SLACK, self.map_size)  # used >> 8: free-list records
        if need <= self._allocated:
            return
        step = min(max(used >> 3, _RESERVE_STEP_MIN), _RESERVE_STEP_MAX)
        for target in (min(need + step, self.map_size), need):  # the step is a convenience
            try:
                os.posix_fallocate(self._data_fd, 0, target)
            except OSError as exc:
                failure = exc
                continue
            self._allocated = target
            return
        raise _NoRoom(failure.strerror)

    def _stop_writemap(self, why: str) -> None:
        """Commit with pwrite from now on in this process (we hold the exclusive lock)."""
        log.info("cache in %s: no room to reserve on disk (%s); writing without the write map", self.path, why)
        self.writemap = False
        self._reopen_locked()

    def _adopt(self, env: Any, index: Any, meta_db: Any, table: ReaderTable) -> None:
        try:  # the compiled core's opens a C environment; there is no other write path
            writer = self.core.Writer(env, self.writemap, self.durable)
        except lmdb.Error as exc:
            env.close()
            table.close()
            raise CacheError(f"cannot open cache {self.path}: no write environment: {exc}") from exc
        self.writer = writer
        self.env = env
        self.index = index
        self.table = table
        if self.core.FAST_READS:
            table.claim()  # no free slot: this process reads under the flock
        # The compiled Reader reads through the Writer's environment: one mapping for both.
        self.reader = self.core.Reader(self.lock, env, index, table, self.writer)
        self._meta_db = meta_db
        # Writable for fallocate (write map); otherwise only fstat'ed (see _stale).
        self._data_fd = open_nofollow(os.path.join(self.path, DATA_FILE),
                                      os.O_RDWR if self.writemap else os.O_RDONLY)
        self._allocated = 0
        self._damaged = self._broken = False
        self._ok = True

    def _close_env(self) -> None:
        # The Reader object stays (closed): a thread that fetched it just before
        # gets StaleReader from it, never an AttributeError on None.
        self._ok = False
        if self.reader is not None:
            self.reader.close()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.env is not None:
            try:
                self.env.close()
            except lmdb.Error:
                pass
            self.env = None
            self.index = None
        if self.table is not None:
            self.table.close()
            self.table = None
        if self._data_fd >= 0:
            fd, self._data_fd = self._data_fd, -1  # unpublished before it is closed
            os.close(fd)

    def _rebuild(self, reason: str) -> None:
        """Empty and recreate the cache; the caller holds the exclusive lock."""
        if reason == "new":
            log.info("creating cache in %s", self.path)
        else:
            log.warning("emptying cache in %s: %s", self.path, reason)
        self._close_env()
        table = env = None
        try:
            for name in (VERSION_FILE, DATA_FILE, "lock.mdb", CLEAN_FILE, READERS_FILE):
                remove_entry(os.path.join(self.path, name))
            # Nobody maps the new files yet (opening them takes the lock we hold).
            table = ReaderTable(self.path, create=True)
            env = self._env(create=True, writemap=False)
            with env.begin(write=True) as txn:
                dbs = [env.open_db(name, txn=txn, create=True) for name in _DB_NAMES]
                index = self.core.Index(*dbs)
                index.init_counters(txn)
                txn.put(BOOT_KEY, self._boot_record(None), db=dbs[3])
                txn.put(READERS_KEY, table.nonce, db=dbs[3])
            if self.durable:
                env.sync(True)
            if self.writemap:  # created with pwrite (a full disk is an error); reopened with the map
                env.close()
                env = None
                env = self._env(create=False)
                dbs = [env.open_db(name, create=False) for name in _DB_NAMES]
                index = self.core.Index(*dbs)
            write_version(self.path)
        except (lmdb.Error, OSError, CacheError) as exc:
            if env is not None:
                env.close()
            if table is not None:
                table.close()
            raise CacheError(f"cannot create cache in {self.path}: {exc}") from exc
        self._adopt(env, index, dbs[3], table)

    def _needs_refresh(self) -> bool:
        return self.generation != fork_generation() or self.env is None or self._damaged or self._broken

    def _refresh(self) -> None:
        """Reopen after a fork, after another process rebuilt the file, or after damage.

        Under the exclusive lock: its mutex keeps every other thread of this
        process out of a transaction while the environment is replaced, and
        several threads that found the store stale at once reopen it once
        (the condition is checked again inside).
        """
        self.lock.acquire(True)  # in a forked child, its own fresh mutex and descriptor
        try:
            if self.generation != fork_generation():
                # The mapping and buffer are the parent's: drop them, never use them again. Until
                # the generation is updated below, every call comes here first.
                self._close_env()
                self.buffer.clear()
                users_fd = open_lock_file(os.path.join(self.path, USERS_FILE))
                inherited, self._users_fd = self._users_fd, users_fd
                os.close(inherited)  # closing our copy leaves the parent's flock alone
                self._claim_users()
                try:
                    self._reopen_locked()
                except BaseException:
                    self._ok = False  # the generation is still the parent's: the next call retries
                    raise
                # Only now, with the child's own environment adopted: a failure above retries.
                self.generation = fork_generation()
            elif self.env is None or self._damaged or self._broken or self._stale():
                self._reopen_locked()  # (stale: another process rebuilt data.mdb)
        finally:
            self.lock.release()

    def _stale(self) -> bool:
        # Also called without the lock (before a dump, a put's existence check): another thread
        # may close the descriptor under us, and a closed one means "reopen" as well.
        fd = self._data_fd
        if self._damaged or self._broken or fd < 0:
            return True
        try:
            return self.core.link_count(fd) == 0
        except OSError:
            return True

    # -- transactions ----------------------------------------------------------
    def _ensure(self) -> None:
        """Reopen first when forked, closed by a failure, or found damaged."""
        if self._needs_refresh():
            self._refresh()

    def _env_locked(self) -> Any:
        """The environment, checked again under the lock: another thread's failed reopen may have closed it."""
        env = self.env
        if env is None:
            raise CacheError(f"the cache in {self.path} could not be reopened; the next call tries again")
        return env

    def read(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(index, txn, *args)`` in a read transaction under the shared lock."""
        self._ensure()
        lock = self.lock
        lock.acquire(False)
        try:
            txn = self._env_locked().begin()
            try:
                return fn(self.index, txn, *args)
            finally:
                txn.abort()
        except DATA_ERRORS as exc:
            raise self._failure(exc) from exc
        finally:
            lock.release()

    def lookup(self, key: bytes) -> Any:
        """The hot read: ``Reader.lookup`` (lock, look up, unlock): (bytes/None/False, born_ns)."""
        if not self._ok:
            self._refresh()  # _ensure() in one attribute: this is every get's path
        reader = self.reader
        try:
            return reader.lookup(key)
        except StaleReader:
            return self._via_reader("lookup", key)  # replaced meanwhile: the slow way
        except lmdb.Error as exc:
            raise self._failure(exc) from exc

    def _refresh_if_stale(self) -> None:
        """Reopen first if another process rebuilt the file (an fstat; not for the hot get)."""
        if self._stale():
            self._refresh()

    def _via_reader(self, method: str, *args: Any) -> Any:
        """``reader.<method>(*args)``, retried while other threads keep replacing the reader."""
        if not self._ok:
            self._refresh()
        for _attempt in range(8):  # each retry follows a finished reopen by another thread
            reader = self.reader
            try:
                return getattr(reader, method)(*args)
            except StaleReader:
                if self.reader is reader or self.reader is None:
                    break  # closed and not replaced: that reopen failed
            except DATA_ERRORS as exc:
                raise self._failure(exc) from exc
        raise CacheError(f"the cache in {self.path} could not be reopened; the next call tries again")

    def contains(self, key: bytes, fresh: bool = False) -> bool:
        """Whether a record exists, read like :meth:`get` (the cheap path); counts nothing.

        ``fresh``: first reopen if another process rebuilt the file (a put must
        not skip its write because of a record in a file nobody uses any more).
        """
        if fresh:
            self._refresh_if_stale()
        elif self._ok:  # the common case first, as in get: one core call
            try:
                return bool(self.reader.contains(key))
            except StaleReader:
                pass  # replaced meanwhile: the slow way below
            except DATA_ERRORS as exc:
                raise self._failure(exc) from exc
        return bool(self._via_reader("contains", key))

    def cache_data(self) -> Dict[str, Any]:
        """The seed's dump, after reopening if another process rebuilt the file."""
        self._refresh_if_stale()
        return self._via_reader("cache_data")  # type: ignore[no-any-return]

    def read_fresh(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Like :meth:`read`, but first reopen if another process rebuilt the file."""
        self._refresh_if_stale()
        return self.read(fn, *args)

    def write(self, fn: Optional[Callable[..., Any]], *args: Any, timeout: Optional[float] = None,
              defer: Optional[Tuple[bytes, int, Optional[int]]] = None) -> Any:
        """Apply buffered accesses, then ``fn(index, txn, *args)``, in one write transaction.

        ``defer=(key, size, max_bytes)``: the buffer may stay for later unless
        inserting ``size`` bytes under ``max_bytes`` evicts (a put applies its
        buffer before choosing victims; ``max_bytes`` None: never, for a
        delete). Rewriting up to hundreds of buffered headers on every delete or
        small put would cost more than the write; a buffer that is due (1 s
        old) is applied all the same. Unless ``fn`` found ``key`` present and
        left it (a result of -1), the buffered references to ``key`` are then
        dropped: they belong to a record of that name that is gone (their hits
        still count).

        If the transaction meets a damaged file, the file is rebuilt (we hold
        the exclusive lock) and the operation retried once on the new one: a
        put then stores its record instead of failing on every later try.
        """
        if not self._ok:
            self._ensure()
        lock = self.lock
        wait = lock.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        lock.acquire(True, timeout)
        try:
            attempt = 0
            while True:
                attempt += 1
                held: List[Any] = []  # what _apply_buffer took from the buffer
                try:
                    if self._stale():
                        self._reopen_locked()
                    env, table = self._env_locked(), self.table
                    assert table is not None
                    # Readers without the flock must be out before any page changes.
                    # What is left of the caller's timeout (0 stays 0: bookkeeping never waits).
                    table.enter_write(max(deadline - time.monotonic(), 0.0) if wait > 0 else 0.0)
                    try:
                        writer, core = self.writer, self.core
                        if self.writemap:
                            self._txn_used = -1
                            if fn is not _INSERT:  # an insert reserves once it knows its victims
                                self._reserve(0)
                        if writer is not None and fn in self._writer_fns:
                            txn = writer.begin()  # the put path: the core's own write transactions
                        else:
                            txn = env.begin(write=True)
                        try:
                            if fn is _INSERT:
                                result = self._insert_in(txn, held, *args)
                            else:
                                if len(self.buffer) and (defer is None or self._buffer_due()):
                                    self._apply_buffer(txn, held)
                                result = fn(self.index, txn, *args) if fn is not None else None
                        except BaseException:
                            txn.abort()
                            raise
                        txn.commit()
                    finally:
                        table.leave_write()
                except DATA_ERRORS as exc:
                    self._untake(held)
                    failure = self._failure(exc)
                    if attempt >= 2 or not self._damaged:
                        raise failure from exc
                    continue
                except _NoRoom as exc:  # nothing was written: retry with pwrite (once: it is off now)
                    self._untake(held)
                    self._stop_writemap(str(exc))
                    continue
                except BaseException:
                    self._untake(held)
                    raise
                if defer is not None and not held and result != -1:
                    # Removed, or found absent, or inserted anew (-1: it existed): what is buffered
                    # for this name belongs to a record that is gone.
                    self.buffer.pending.pop(defer[0], None)
                if self.force_sync:  # committed: a failed fsync must not re-apply the buffer
                    try:
                        self.env.sync(True)
                    except lmdb.Error as exc:
                        raise self._failure(exc) from exc
                return result
        finally:
            lock.release()

    def _buffer_due(self) -> bool:
        """The buffer's time has come (a process that only writes must still apply it every second)."""
        buf = self.buffer
        return bool(buf.due or (buf.first_ns and time.time_ns() - buf.first_ns >= buf.max_age_ns))

    def insert(self, key: bytes, name: bytes, lid: int, data: Any, max_bytes: int, keep: frozenset,
               refs: int = 0, last_ns: int = 0) -> int:
        """Put one record (``Index.victims`` then ``Index.insert``); -1 when it exists."""
        return int(self.write(_INSERT, key, name, lid, data, max_bytes, keep, refs, last_ns,
                              defer=(key, len(data), max_bytes)))

    def _insert_in(self, txn: Any, held: List[Any], key: bytes, name: bytes, lid: int, data: Any,
                   max_bytes: int, keep: frozenset, refs: int, last_ns: int) -> int:
        """The insert's steps in the write transaction: victims, the buffer if it evicts, insert."""
        index = self.index
        size = len(data)
        try:
            victims = index.victims(txn, size, max_bytes, keep)
        except CacheFull:
            if index.exists(txn, key):  # a present record is not put again: no error
                return -1
            raise
        if len(self.buffer) and (victims or self._buffer_due()):
            # Buffered references decide the victims: apply them first, then choose again.
            if self._apply_buffer(txn, held) and victims:
                victims = index.victims(txn, size, max_bytes, keep)
        if self.writemap:
            self._reserve((len(victims) + 1) * _PAGES_PER_KEY, size + (size >> 9))
        return int(index.insert(txn, key, name, lid, data, victims, refs, last_ns))

    def _apply_buffer(self, txn: Any, held: List[Any]) -> bool:
        """Take the buffer and apply it in ``txn`` (``held`` keeps it for a failure); True if it held references."""
        taken = self.buffer.take()
        held.append(taken)
        pending, hits, misses, _first = taken
        if pending or hits or misses:
            if self.writemap:
                self._reserve(len(pending) * _PAGES_PER_KEY)
            self.index.apply(txn, pending, hits, misses)
        return bool(pending)

    def _untake(self, held: List[Any]) -> None:
        for taken in held:  # what a failed transaction did not write goes back to the buffer
            self.buffer.restore(taken)

    def _reopen_locked(self) -> None:
        # We hold the exclusive lock, so nobody else can rebuild meanwhile.
        damaged = self._damaged
        self._close_env()
        problem = None if damaged else self._try_open(deep=False)
        if problem == _MARK_BOOT:
            self._write_boot()
        elif damaged or problem is not None:
            self._rebuild("damage found while in use" if damaged else problem or "")

    def _failure(self, exc: BaseException) -> CacheError:
        if isinstance(exc, CORRUPTION_ERRORS + (ValueError, struct.error)):
            self._damaged, self._ok = True, False
            log.warning("cache in %s is damaged (%s); it will be rebuilt", self.path, exc)
            return CacheError(f"cache in {self.path} is damaged: {exc}")
        if isinstance(exc, REOPEN_ERRORS):
            self._broken, self._ok = True, False
        if isinstance(exc, lmdb.MapFullError):
            return CacheError(f"cache file in {self.path} reached its map size")
        if isinstance(exc, lmdb.DiskError) or getattr(exc, "errno", None) == errno.ENOSPC:
            return CacheError(f"no space left for the cache in {self.path}")
        return CacheError(f"cache operation failed in {self.path}: {exc}")

    def suspect(self) -> None:
        """verify() found problems: never mark this file as closed cleanly.

        The next process to open the cache alone then walks it in the deep
        check, which rebuilds it (a live cache is not emptied under others).
        """
        self._suspect = True

    def flush(self) -> None:
        """Write this process's buffered accesses now."""
        if len(self.buffer):
            self.write(None)

    def apply_due(self) -> None:
        """Write the buffer if the lock is free right now; else keep it for later.

        Called after a read whose buffer came due: the read has succeeded, and
        bookkeeping must never turn it into an error or a wait behind another
        process (a failed write keeps the buffer).
        """
        try:
            self.write(None, timeout=0)
        except CacheError as exc:
            log.debug("buffered accesses for %s kept for later: %s", self.path, exc)

    # -- lifecycle ---------------------------------------------------------------
    def release(self) -> None:
        """One user fewer; the last one flushes and closes the environment."""
        with self._registry_lock:
            self.users -= 1
            if self.users > 0:
                return
            for ident, store in list(self._registry.items()):
                if store is self:
                    del self._registry[ident]
        try:
            if self.generation == fork_generation() and self.env is not None:
                self.flush()
                self._leave()
        finally:
            # With the mutex (bounded): no other thread may be inside a transaction of this env.
            # A thread that kept it past the timeout may be inside one: then leave the
            # environment and descriptors to the garbage collector rather than pull them away.
            if self.lock.mutex.acquire(True, self.lock.timeout):
                try:
                    self._close_env()
                finally:
                    self.lock.mutex.release()
                self.lock.close()
                os.close(self._users_fd)
            else:
                log.warning("closed %s while another thread still used it: its resources stay open",
                            self.path)

    def _leave(self) -> None:
        """If this is the last process using the cache, record that it closed cleanly.

        Best effort and never waits: without the mark, the next first opener
        only walks the file once more.
        """
        try:
            self.lock.acquire(True, 0)
        except CacheTimeout:
            return
        try:
            try:
                fcntl.flock(self._users_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # others still use it
            if not self._stale() and not self._suspect:
                self._mark_clean()
        finally:
            self.lock.release()

    @classmethod
    def flush_all(cls) -> None:
        """At interpreter exit: write every open store's buffered accesses."""
        for store in list(cls._registry.values()):
            if store.generation == fork_generation() and store.env is not None:
                try:
                    store.flush()
                except CacheError as exc:
                    log.warning("could not write buffered accesses for %s: %s", store.path, exc)


def _after_fork_in_child() -> None:
    # The registry's lock may have been held by a parent thread that does not exist here.
    Store._registry_lock = threading.Lock()
    for store in Store._registry.values():
        store._ok = False  # the environment is the parent's: the first use refreshes


atexit.register(Store.flush_all)
os.register_at_fork(after_in_child=_after_fork_in_child)
