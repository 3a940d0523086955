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
import errno
import logging
import os
import stat
import struct
import threading
import time
from types import ModuleType
from typing import Any, Callable, Dict, Optional, Tuple

import lmdb

from . import deepcheck
from .cachedir import (BOOT_KEY, CLEAN_FILE, DATA_FILE, DB_NAMES, FORMAT_VERSION, MARK_BOOT, READERS_KEY, USERS_FILE,
                       VERSION_FILE, allocated_bytes, boot_problem, boot_record, claim_users, closed_cleanly,
                       consume_clean_mark, file_mark, last_user, mark_clean, prepare_directory, read_version,
                       remove_entry, write_version)
from .errors import CacheError, CacheTimeout, StaleReader
from .locking import READERS_FILE, BadTable, FileLock, ReaderTable, fork_generation, open_lock_file, open_nofollow
from .writemap import PAGES_PER_KEY, NoRoom, Reservation, map_size_for, writemap_wanted

log = logging.getLogger("nvcache")

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

# Buffered accesses are written at least this often while a process is active.
APPLY_AFTER_NS = 1_000_000_000
APPLY_AFTER_KEYS = 512  # bounds the one get that pays for a batch (12.7 us a key at 1M records)


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
        self._room: Optional[Reservation] = None  # disk room for write-map transactions
        self.durable = durable
        self.force_sync = False
        self.users = 0
        self.buffer = core.AccessBuffer(APPLY_AFTER_NS, APPLY_AFTER_KEYS)
        self.generation = fork_generation()
        self.env: Any = None
        self.index: Any = None
        self.reader: Any = None
        self.writer: Any = None  # the core's Writer: inserts and applies (the put path)
        self._writer_fns = frozenset((None, core.Index.insert, core.Index.apply, core.Index.remove))
        self.table: Optional[ReaderTable] = None
        self._data_fd = -1
        self._damaged = False
        self._broken = False
        # False whenever _needs_refresh() may be true (closed, damaged, broken, forked): one
        # attribute for the hot get to check.
        self._ok = False
        self._suspect = False  # verify() found problems: no clean mark, so the next first opener checks
        self._deep_result: Optional[Tuple[Dict[str, int], Optional[str]]] = None  # (file mark, problem)
        self._meta_db: Any = None
        self._users_fd = -1
        self.lock = FileLock(path, lock_timeout)
        try:
            self._users_fd = open_lock_file(os.path.join(path, USERS_FILE))
            self._first = claim_users(self._users_fd, self.path, self.lock.timeout)
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
            # The directory may have been replaced since the lock opened it (see _follow_directory).
            problem = "moved" if self.lock.moved() else self._try_open(deep=self._first)
        finally:
            self.lock.release()
        if problem is None:
            return
        self._close_env()
        self.lock.acquire(True)
        try:
            if self.lock.moved():
                self._follow_directory()
            problem = self._try_open(deep=self._first)  # re-checked: someone may have rebuilt it
            if problem == MARK_BOOT:
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
            trusted = closed_cleanly(self.path) and allocated_bytes(data_path) > deepcheck.ALWAYS_CHECK_BYTES
            consume_clean_mark(self.path)
            if not trusted:
                # Once per file: the retry under the exclusive lock finds the mark consumed.
                mark = file_mark(os.stat(data_path))
                if self._deep_result is None or self._deep_result[0] != mark:
                    self._deep_result = (mark, self._deep_check())
                problem = self._deep_result[1]
                if problem is not None:
                    return f"deep check at first open: {problem}"
        try:
            table = ReaderTable(self.path, create=False)
        except BadTable as exc:  # other CacheErrors (no descriptors, no memory) are not damage
            return f"readers table: {exc}"
        if self.writemap and os.path.getsize(data_path) > self.map_size:
            # A larger-bound process (pwrite commits) filled more than our map: LMDB would grow
            # our map to match, beyond what the Reservation reserves for.
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
            dbs = [env.open_db(name, create=False) for name in DB_NAMES]
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
        return boot_problem(boot, self.durable)

    def _write_boot(self) -> None:
        assert self.table is not None
        self.table.enter_write(self.lock.timeout)
        try:
            if self._room is not None:
                self._room.begin()
                try:
                    self._room.reserve(PAGES_PER_KEY)
                except NoRoom as exc:  # the next use reopens without the write map
                    self.writemap, self._broken, self._ok = False, True, False
                    raise CacheError(f"no space left for the cache in {self.path}: {exc}") from None
            with self.env.begin(write=True) as txn:
                txn.put(BOOT_KEY, boot_record(txn.get(BOOT_KEY, None, self._meta_db), self.durable),
                        db=self._meta_db)
            if self.durable:
                self.env.sync(True)
        except lmdb.Error as exc:
            raise self._failure(exc) from exc
        finally:
            self.table.leave_write()

    def _deep_check(self) -> Optional[str]:
        """Walk data.mdb in a child process (see :mod:`nvcache.deepcheck`)."""
        return deepcheck.deep_check(self.path, lambda: self._env(create=False, writemap=False), self.core.Index)

    def _env(self, create: bool, writemap: Optional[bool] = None) -> Any:
        return lmdb.Environment(
            self.path, map_size=self.map_size, subdir=True, readonly=False, create=create,
            lock=False, sync=self.durable, metasync=self.durable, max_dbs=len(DB_NAMES),
            max_spare_txns=4, readahead=False, mode=0o640,
            writemap=self.writemap if writemap is None else writemap)

    def _stop_writemap(self, why: str) -> None:
        """Commit with pwrite from now on in this process (we hold the exclusive lock)."""
        log.info("cache in %s: no room to reserve on disk (%s); writing without the write map", self.path, why)
        self.writemap = False
        self._reopen_locked()

    def _adopt(self, env: Any, index: Any, meta_db: Any, table: ReaderTable) -> None:
        self.env = env
        self.index = index
        self.table = table
        if self.core.FAST_READS:
            table.claim()  # no free slot: this process reads under the flock
        try:
            self.writer = self.core.Writer(env, self.writemap, self.durable)
        except lmdb.Error as exc:  # the compiled one opens an environment: py-lmdb does it all then
            log.debug("cache in %s: no C write environment (%s); writing through py-lmdb", self.path, exc)
            self.writer = None
        # The compiled Reader reads through the Writer's environment: one mapping for both.
        self.reader = self.core.Reader(self.lock, env, index, self.buffer, table, self.writer)
        self._meta_db = meta_db
        # Writable for fallocate (write map); otherwise only fstat'ed (see _stale).
        self._data_fd = open_nofollow(os.path.join(self.path, DATA_FILE),
                                      os.O_RDWR if self.writemap else os.O_RDONLY)
        if self.writemap:
            writer = self.writer
            last_page = writer.last_page if writer is not None else lambda: env.info()["last_pgno"]
            self._room = Reservation(self._data_fd, self.map_size, last_page)
            index.reserve = self._room.reserve_insert
        else:
            self._room = None
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
            for name in (VERSION_FILE, DATA_FILE, CLEAN_FILE, READERS_FILE):
                remove_entry(os.path.join(self.path, name))
            # Nobody maps the new files yet (opening them takes the lock we hold).
            table = ReaderTable(self.path, create=True)
            env = self._env(create=True, writemap=False)
            with env.begin(write=True) as txn:
                dbs = [env.open_db(name, txn=txn, create=True) for name in DB_NAMES]
                index = self.core.Index(*dbs)
                index.init_counters(txn)
                txn.put(BOOT_KEY, boot_record(None, self.durable), db=dbs[3])
                txn.put(READERS_KEY, table.nonce, db=dbs[3])
            if self.durable:
                env.sync(True)
            if self.writemap:  # created with pwrite (a full disk is an error); reopened with the map
                env.close()
                env = None
                env = self._env(create=False)
                dbs = [env.open_db(name, create=False) for name in DB_NAMES]
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
                claim_users(self._users_fd, self.path, self.lock.timeout)
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

    def get(self, layer_id: str, kind: str) -> Any:
        """The hot read: ``Reader.get`` (validate, hash, lock, look up, count) in one core call."""
        if not self._ok:
            self._refresh()  # _ensure() in one attribute: this is every get's path
        reader = self.reader
        try:
            return reader.get(layer_id, kind)
        except StaleReader:
            return self._via_reader("get", layer_id, kind)  # replaced meanwhile: the slow way
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
                taken = None
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
                        room = self._room
                        if room is not None:
                            room.begin()
                            if fn is not core.Index.insert:  # an insert reserves before it writes
                                room.reserve(0)
                        if writer is not None and fn in self._writer_fns:
                            txn = writer.begin()  # the put path: the core's own write transactions
                        else:
                            txn = env.begin(write=True)
                        try:
                            if len(self.buffer) and (defer is None or self._buffer_due()
                                                     or self._evicts(txn, defer)):
                                taken = self.buffer.take()
                                pending, hits, misses, _first = taken
                                if pending or hits or misses:
                                    if room is not None:
                                        room.reserve(len(pending) * PAGES_PER_KEY)
                                    self.index.apply(txn, pending, hits, misses)
                            result = fn(self.index, txn, *args) if fn is not None else None
                        except BaseException:
                            txn.abort()
                            raise
                        txn.commit()
                    finally:
                        table.leave_write()
                except DATA_ERRORS as exc:
                    self._untake(taken)
                    failure = self._failure(exc)
                    if attempt >= 2 or not self._damaged:
                        raise failure from exc
                    continue
                except NoRoom as exc:  # nothing was written: retry with pwrite (once: it is off now)
                    self._untake(taken)
                    self._stop_writemap(str(exc))
                    continue
                except BaseException:
                    self._untake(taken)
                    raise
                if defer is not None and taken is None and result != -1:
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

    def _evicts(self, txn: Any, defer: Tuple[bytes, int, Optional[int]]) -> bool:
        _key, size, max_bytes = defer
        return max_bytes is not None and self.index.records(txn)[1] + size > max_bytes

    def _untake(self, taken: Optional[Tuple[Any, ...]]) -> None:
        if taken is not None:  # what a failed transaction did not write goes back to the buffer
            self.buffer.restore(taken)

    def _reopen_locked(self) -> None:
        # We hold the exclusive lock, so nobody else can rebuild meanwhile.
        damaged = self._damaged
        self._close_env()
        if self.lock.moved():
            self._follow_directory()
            damaged = False  # that was the old directory's file
        problem = None if damaged else self._try_open(deep=False)
        if problem == MARK_BOOT:
            self._write_boot()
        elif damaged or problem is not None:
            self._rebuild("damage found while in use" if damaged else problem or "")

    def _follow_directory(self) -> None:
        """Our path names another directory now (removed or renamed, then made anew): move to it.

        We hold the exclusive lock of the old directory, whose files nobody
        else uses any more. Its lock is exchanged for the new directory's
        before any file there is touched (else two writers would share one
        data.mdb), and this process joins the new directory's users.
        """
        log.warning("cache directory %s was removed or replaced under this process; "
                    "using the cache found there now", self.path)
        old_ident = self.lock.ident
        self.lock.rebind(prepare_directory)
        users_fd = open_lock_file(os.path.join(self.path, USERS_FILE))
        old_users, self._users_fd = self._users_fd, users_fd
        os.close(old_users)  # leaves the old directory's users
        claim_users(self._users_fd, self.path, self.lock.timeout)
        self._suspect = False
        self._deep_result = None
        with self._registry_lock:
            if self._registry.get(old_ident) is self:
                del self._registry[old_ident]
            self._registry.setdefault(self.lock.ident, self)

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
            self._notice_moved()
            self.write(None)

    def _notice_moved(self) -> None:
        """Reopen at the next use if our directory was renamed away (a stat; for bookkeeping paths).

        A removed directory also unlinks data.mdb, which every write notices;
        one renamed away keeps its files, and only this check moves us to the
        cache at our path.
        """
        if self._ok and self.lock.moved():
            self._broken, self._ok = True, False

    def apply_due(self) -> None:
        """Write the buffer if the lock is free right now; else keep it for later.

        Called after a read whose buffer came due: the read has succeeded, and
        bookkeeping must never turn it into an error or a wait behind another
        process (a failed write keeps the buffer).
        """
        try:
            self._notice_moved()
            self.write(None, timeout=0)
        except CacheError as exc:
            log.debug("buffered accesses for %s kept for later: %s", self.path, exc)

    # -- lifecycle ---------------------------------------------------------------
    def release(self) -> None:
        """One user fewer; the last one flushes and closes the environment. Never raises CacheError.

        A final flush that fails (the lock stayed busy past ``lock_timeout``, a
        full disk) keeps the store open and registered with its buffer: the
        at-exit flush, or the next cache opened on this path by this process,
        writes it later, so statistics stay exact once a flush succeeds. What
        even the at-exit flush cannot write is logged there.
        """
        with self._registry_lock:
            self.users -= 1
            if self.users > 0:
                return
        mine = self.generation == fork_generation()  # a forked child's buffer is its parent's
        if mine and len(self.buffer):
            try:
                self.flush()
            except CacheError as exc:
                log.warning("closing %s: buffered accesses (%s) not written yet (%s); "
                            "the at-exit flush tries again", self.path, self._buffer_summary(), exc)
                return
        with self._registry_lock:
            if self.users > 0:
                return  # another cache on this path took the store meanwhile
            for ident, store in list(self._registry.items()):
                if store is self:
                    del self._registry[ident]
        try:
            if mine and self.env is not None:
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

    def _buffer_summary(self) -> str:
        buf = self.buffer
        return f"{len(buf.pending)} records' references, {buf.hits} hits, {buf.misses} misses"

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
            if not last_user(self._users_fd):
                return  # others still use it
            if not self._stale() and not self._suspect and not self.lock.moved():
                mark_clean(self.path)
        finally:
            self.lock.release()

    @classmethod
    def flush_all(cls) -> None:
        """At interpreter exit: write every open store's buffered accesses."""
        for store in list(cls._registry.values()):
            if store.generation == fork_generation() and len(store.buffer):
                try:
                    store.flush()
                except CacheError as exc:
                    log.warning("at exit: dropped buffered accesses for %s (%s): %s", store.path,
                                store._buffer_summary(), exc)


def _after_fork_in_child() -> None:
    # The registry's lock may have been held by a parent thread that does not exist here.
    Store._registry_lock = threading.Lock()
    for store in Store._registry.values():
        store._ok = False  # the environment is the parent's: the first use refreshes


atexit.register(Store.flush_all)
os.register_at_fork(after_in_child=_after_fork_in_child)
