"""Opening a cache directory's files: :class:`Files`, and how they are opened, checked and created.

A :class:`Files` is one open data.mdb in this process with everything a
transaction needs: py-lmdb's environment, the core's index, reader and
writer, the readers table, a descriptor of data.mdb and the write map's
disk reservation. The store holds one at a time and replaces it as a whole
(after a fork, a rebuild by another process, damage, a moved directory):
nothing of an old one is reused.

:func:`open_files` opens what is there and says why it cannot be used;
:func:`create_files` empties the directory and makes a new cache. Both run
under the store's lock (shared for opening, exclusive for creating), and
neither follows a symlink planted in the directory.
"""

from __future__ import annotations

import logging
import os
import stat
import struct
from types import ModuleType
from typing import Any, Callable, Optional, Tuple

import lmdb

from .cachedir import (BOOT_KEY, CLEAN_FILE, DATA_FILE, DB_NAMES, FORMAT_VERSION, READERS_KEY, VERSION_FILE,
                       boot_problem, boot_record, read_version, remove_entry, write_version)
from .codec import Codec
from .errors import CacheError, StaleReader
from .locking import FileLock, open_nofollow
from .readertable import READERS_FILE, BadTable, ReaderTable
from .writemap import PAGE_SIZE, PAGES_PER_KEY, Reservation

log = logging.getLogger("nvcache")

# Errors that mean the file's bytes are wrong. Contention, "already open",
# a full disk or a full map are not among them: those never trigger a rebuild.
CORRUPTION_ERRORS = (lmdb.CorruptedError, lmdb.InvalidError, lmdb.PageNotFoundError,
                     lmdb.VersionMismatchError, lmdb.BadValsizeError, lmdb.IncompatibleError,
                     lmdb.InvalidParameterError,  # EINVAL from a get of a valid key: a bad page
                     lmdb.PageFullError,  # MDB_PAGE_FULL: a page's free-space bookkeeping is wrong
                     ValueError, struct.error)  # the index's own checks of stored bytes


class Files:
    """One open data.mdb and what goes with it (see the module docstring)."""

    __slots__ = ("env", "index", "meta_db", "table", "reader", "writer", "data_fd", "room", "writemap", "codec",
                 "bound", "policy")

    def __init__(self, env: Any, index: Any, meta_db: Any, table: ReaderTable) -> None:
        self.env = env
        self.index = index
        self.meta_db = meta_db
        self.table = table
        self.reader: Any = None
        self.writer: Any = None
        self.data_fd = -1
        self.room: Optional[Reservation] = None
        self.writemap = False
        self.codec: Codec = None  # type: ignore[assignment]  # set by _adopt before anyone reads it
        self.bound = 0  # the cache's bound recorded in the file when it was opened (0: none)
        self.policy = ""  # the file's eviction policy (its index writes by it)

    @property
    def map_size(self) -> int:
        """The map this process opened (at least data.mdb's length then)."""
        return int(self.env.info()["map_size"])

    def close(self) -> None:
        """Close everything; the caller holds the lock's mutex (no transaction is in flight).

        The Reader object stays usable as an object: a thread that fetched it
        just before gets StaleReader from it, never an AttributeError.
        """
        if self.reader is not None:
            self.reader.close()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        try:
            self.env.close()
        except lmdb.Error:
            pass
        self.table.close()
        if self.data_fd >= 0:
            fd, self.data_fd = self.data_fd, -1  # unpublished before it is closed
            os.close(fd)


def environment(path: str, map_size: int, durable: bool, create: bool, writemap: bool,
                readonly: bool = False) -> Any:
    """py-lmdb's environment on ``<path>/data.mdb``, without LMDB's lock table (see locking.py).

    The map is ``map_size`` or the file's length, whichever is larger: under
    the write map LMDB truncates the file to the map, and a shorter map would
    cut pages other processes map (SIGBUS) or reserved (holes again). Files
    grow only under the exclusive lock, and opening takes at least the shared
    one, so the length read here stays the longest any process maps.
    """
    try:
        length = os.stat(os.path.join(path, DATA_FILE)).st_size
    except FileNotFoundError:
        length = 0
    return lmdb.Environment(
        path, map_size=max(map_size, length), subdir=True, readonly=readonly, create=create,
        lock=False, sync=durable, metasync=durable, max_dbs=len(DB_NAMES),
        max_spare_txns=4, readahead=False, mode=0o640, writemap=writemap)


def _codec(files: Files, lock: FileLock) -> Codec:
    """The codec of these files, knowing their current dictionary (read here, under the caller's lock)."""
    env, index = files.env, files.index

    def load(number: int) -> Optional[bytes]:  # a dictionary first met in a record: outside any lock
        try:
            lock.acquire(False, None)
            try:
                txn = env.begin()
                try:
                    return index.dictionary(txn, number)  # type: ignore[no-any-return]
                finally:
                    txn.abort()
            except lmdb.Error as exc:  # closed under us (replaced): the read is retried on the new files
                raise StaleReader(f"the environment was replaced ({exc})") from exc
            finally:
                lock.release()
        except BaseException:
            lock.recover()  # a signal's exception may have escaped with the lock held (locking.py)
            raise

    codec = Codec(load)
    txn = env.begin()
    try:
        number = index.current_dictionary(txn)
        codec.learn(number, index.dictionary(txn, number) if number else None)
    finally:
        txn.abort()
    return codec


def _adopt(files: Files, path: str, core: ModuleType, lock: FileLock, writemap: bool,
           durable: bool, label: str, readonly: bool = False) -> Files:
    """Give freshly opened files their reader, writer, data.mdb descriptor and reservation.

    ``readonly``: a reader only (no writer, no write map, no claimed slot, which is a write
    into ``readers``): it reads under the shared flock and never changes a byte of the files.
    """
    env, table = files.env, files.table
    try:
        if core.FAST_READS and not readonly:
            table.claim()  # no free slot: this process reads under the flock
        try:
            files.writer = None if readonly else core.Writer(env, writemap, durable)
        except lmdb.Error as exc:
            raise CacheError(f"cannot open cache {label}: no write environment ({exc})") from exc
        # The compiled Reader reads through the Writer's environment: one mapping for both.
        files.reader = core.Reader(lock, env, files.index, table, files.writer)
        files.reader.codec = files.codec = _codec(files, lock)
        # Writable for fallocate (write map); otherwise only fstat'ed (the store's staleness check).
        files.data_fd = open_nofollow(os.path.join(path, DATA_FILE), os.O_RDWR if writemap else os.O_RDONLY)
    except BaseException:
        files.close()
        raise
    files.writemap = writemap
    if writemap:
        files.room = Reservation(files.data_fd, files.map_size, files.writer.last_page)
    return files


def open_files(path: str, core: ModuleType, lock: FileLock, map_size: int, writemap: bool, durable: bool,
               first_open_check: Optional[Callable[[], Optional[str]]],
               label: str, readonly: bool = False) -> Tuple[Optional[Files], Optional[str]]:
    """Open the cache in ``path``: (files, None) when usable, (files, MARK_BOOT) when only its boot
    record must be updated, (None, why it must be rebuilt) otherwise. ``path``
    is the locked directory (``FileLock.dir``); ``label`` names it in messages.

    ``first_open_check``: this is the only process using the cache; the
    check (see :class:`nvcache.deepcheck.FirstOpenCheck`) says whether the
    file may be mapped at all. Shortages (descriptors, memory) and other
    failures that say nothing about the file raise CacheError instead.
    ``readonly``: open for reading only (see :func:`_adopt`); nothing is written, not even by
    LMDB (which would write meta pages into an empty data.mdb opened for writing).
    """
    version = read_version(path)
    data_path = os.path.join(path, DATA_FILE)
    if version is None:
        return None, "new" if not os.path.exists(data_path) else "version file missing or unreadable"
    if version != FORMAT_VERSION:
        return None, f"format version {version} is not {FORMAT_VERSION}"
    try:
        if not stat.S_ISREG(os.lstat(data_path).st_mode):  # LMDB would follow a planted symlink
            return None, f"{DATA_FILE} is not a regular file"
    except FileNotFoundError:
        return None, f"{DATA_FILE} is missing"
    if first_open_check is not None:
        problem = first_open_check()
        if problem is not None:
            return None, f"deep check at first open: {problem}"
    try:
        table = ReaderTable(path, create=False)
    except BadTable as exc:  # other CacheErrors (no descriptors, no memory) are not damage
        return None, f"readers table: {exc}"
    if readonly:
        writemap = False
        if os.path.getsize(data_path) < 2 * PAGE_SIZE:
            table.close()
            return None, f"{DATA_FILE} is shorter than its two meta pages"
    try:
        env = environment(path, map_size, durable, create=False, writemap=writemap, readonly=readonly)
    except lmdb.Error as exc:
        table.close()
        if isinstance(exc, CORRUPTION_ERRORS) or not os.path.exists(data_path):
            return None, f"cannot open {DATA_FILE}: {exc}"
        raise CacheError(f"cannot open cache {label}: {exc}") from exc
    try:
        # Without txn=: a handle opened inside a read transaction dies with it.
        dbs = [env.open_db(name, create=False) for name in DB_NAMES]
        index = core.Index(*dbs)
        with env.begin() as txn:
            index.counters(txn)  # fails on a damaged or foreign meta database
            bound = index.bound(txn)
            policy = index.stored_policy(txn)  # ValueError: none, or a name this release lacks
            boot = txn.get(BOOT_KEY, None, dbs[3])
            nonce = txn.get(READERS_KEY, None, dbs[3])
        index.use_policy(policy)
        problem = None
    except (lmdb.NotFoundError, lmdb.ReadonlyError):
        problem = f"{DATA_FILE} lacks nvcache's databases"
    except (CORRUPTION_ERRORS + (TypeError, ValueError)) as exc:
        problem = f"{DATA_FILE} is damaged: {exc}"
    except BaseException:
        env.close()
        table.close()
        raise
    if problem is None and nonce != table.nonce:
        # A table made for another data.mdb (or remade after ours was deleted): processes
        # may still read through the old one, so only a new data.mdb is safe to write.
        problem = f"the readers table does not belong to {DATA_FILE}"
    if problem is not None:
        env.close()
        table.close()
        return None, problem
    files = _adopt(Files(env, index, dbs[3], table), path, core, lock, writemap, durable, label, readonly)
    files.bound, files.policy = bound, policy
    return files, boot_problem(boot, durable)


def create_files(path: str, core: ModuleType, lock: FileLock, map_size: int, writemap: bool,
                 durable: bool, label: str, bound: int, policy: str) -> Files:
    """Empty ``path`` and create a new cache bounded to ``bound`` stored bytes and evicting by
    ``policy`` in it; the caller holds the exclusive lock."""
    table = env = None
    try:
        for name in (VERSION_FILE, DATA_FILE, CLEAN_FILE, READERS_FILE):
            remove_entry(os.path.join(path, name))
        # Nobody maps the new files yet (opening them takes the lock we hold).
        table = ReaderTable(path, create=True)
        env = environment(path, map_size, durable, create=True, writemap=False)
        with env.begin(write=True) as txn:
            dbs = [env.open_db(name, txn=txn, create=True) for name in DB_NAMES]
            index = core.Index(*dbs)
            index.init_counters(txn)
            index.set_bound(txn, bound)
            index.set_stored_policy(txn, policy)
            txn.put(BOOT_KEY, boot_record(None, durable), db=dbs[3])
            txn.put(READERS_KEY, table.nonce, db=dbs[3])
        if durable:
            env.sync(True)
        if writemap:  # created with pwrite (a full disk is an error); reopened with the map
            env.close()
            env = None
            env = environment(path, map_size, durable, create=False, writemap=True)
            dbs = [env.open_db(name, create=False) for name in DB_NAMES]
            index = core.Index(*dbs)
        index.use_policy(policy)
        write_version(path, bound, policy)
    except (lmdb.Error, OSError, CacheError) as exc:
        if env is not None:
            env.close()
        if table is not None:
            table.close()
        raise CacheError(f"cannot create cache in {label}: {exc}") from exc
    files = _adopt(Files(env, index, dbs[3], table), path, core, lock, writemap, durable, label)
    files.bound, files.policy = bound, policy
    return files


def write_boot(files: Files, durable: bool, timeout: float) -> None:
    """Record this boot in the boot record (see cachedir.boot_problem); under the exclusive lock.

    Raises lmdb.Error and writemap.NoRoom as a write transaction does.
    """
    files.table.enter_write(timeout)
    try:
        if files.room is not None:
            files.room.begin()
            files.room.reserve(PAGES_PER_KEY)
        with files.env.begin(write=True) as txn:
            txn.put(BOOT_KEY, boot_record(txn.get(BOOT_KEY, None, files.meta_db), durable), db=files.meta_db)
        if durable:
            files.env.sync(True)
    finally:
        files.table.leave_write()
