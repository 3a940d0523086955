"""The store: one cache directory in this process, and every transaction on it.

Every :class:`~nvcache.LayerCache` of a directory in a process shares one
:class:`Store` (one mapping, one flock descriptor, one access buffer). It
offers named verbs: reads that count nothing (lookup, find, lookup_many,
contains, counters, cache_data, check) and writes (insert, remove,
drop_damaged, add_counters, clear, flush), each write one transaction under
the exclusive lock (:meth:`Store._write`) that applies the buffered accesses
first when it must. Staleness is one state (``Store.state``) behind one gate
(:meth:`Store._current`); LMDB failures become CacheError, and damage is
rebuilt by the next writer. DEVELOPERS.md has the reasons.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Tuple

import lmdb

from . import deepcheck
from .cachedir import MARK_BOOT, USERS_FILE, claim_users, last_user, mark_clean, prepare_directory
from .errors import CacheError, CacheTimeout, StaleReader
from .locking import FileLock, fork_generation, open_lock_file
from .opening import CORRUPTION_ERRORS, Files, create_files, environment, open_files, write_boot
from .writemap import PAGES_PER_KEY, NoRoom, map_size_for, writemap_wanted

log = logging.getLogger("nvcache")

# What an index operation raises on bad stored bytes (arguments were checked by the front).
DATA_ERRORS = (lmdb.Error,) + CORRUPTION_ERRORS
# Errors after which the environment must be reopened (not rebuilt).
REOPEN_ERRORS = (lmdb.PanicError, lmdb.BadTxnError, lmdb.BadRslotError, lmdb.BadDbiError)

# Buffered accesses are written at least this often while a process is active.
APPLY_AFTER_NS = 1_000_000_000
APPLY_AFTER_KEYS = 512  # bounds the one get that pays for a batch (12.7 us a key at 1M records)

# Store.state: OPEN (falsy: the hot paths test it alone), else what the next use must do first.
OPEN, REOPEN, REBUILD = 0, 1, 2

_Op = Callable[..., Any]


class Store:
    """One directory's cache in this process (shared by its LayerCaches, reference counted)."""

    def __init__(self, path: str, core: ModuleType, max_bytes: int, durable: bool,
                 lock_timeout: float) -> None:
        self.path = path
        self.core = core
        self.map_size = map_size_for(max_bytes)
        self.writemap = writemap_wanted(path, self.map_size)
        self.durable = durable
        self.force_sync = False
        self.users = 0
        self.buffer = core.AccessBuffer(APPLY_AFTER_NS, APPLY_AFTER_KEYS)
        self.generation = fork_generation()
        self.state = REOPEN
        self.files: Optional[Files] = None
        self.reader: Any = None  # files.reader, kept after a close: it then raises StaleReader
        self._taken: Optional[Tuple[Any, ...]] = None  # what the running write took from the buffer
        self._moved_check_at = 0.0  # monotonic time of the next write's look at the directory
        self._suspect = False  # verify() found problems: no clean mark, so the next first opener checks
        self._users_fd = -1
        self.lock = FileLock(path, lock_timeout)
        try:
            self._users_fd = open_lock_file(os.path.join(self.lock.dir, USERS_FILE))
            first = claim_users(self._users_fd, path, lock_timeout)
            self._first_open(deepcheck.FirstOpenCheck(self.lock.dir, self._deep_check) if first else None)
        except BaseException as exc:
            self._close_files()
            self.lock.close()
            if self._users_fd >= 0:
                os.close(self._users_fd)
            if isinstance(exc, OSError):  # a file vanished while we opened it, or a shortage
                raise CacheError(f"cannot open cache {path}: {exc}") from exc
            raise

    # -- opening -------------------------------------------------------------------
    def _first_open(self, check: Optional[deepcheck.FirstOpenCheck]) -> None:
        # Usually the shared lock suffices; a rebuild or a boot-record update needs the
        # exclusive one, and then everything is checked again.
        self.lock.acquire(False)
        try:
            # The directory may have been replaced since the lock opened it (see _follow_directory).
            problem = "moved" if self.lock.moved() else self._open(check)
        finally:
            self.lock.release()
        if problem is None:
            return
        self._close_files()
        self.lock.acquire(True)
        try:
            self._open_locked(check)
        finally:
            self.lock.release()

    def _open(self, check: Optional[deepcheck.FirstOpenCheck]) -> Optional[str]:
        files, problem = open_files(self.lock.dir, self.core, self.lock, self.map_size, self.writemap,
                                    self.durable, check, self.path)
        if files is not None:
            if self.lock.moved():  # replaced while we opened it (only possible without /proc)
                files.close()
                return "moved"
            self._use(files)
        return problem

    def _open_locked(self, check: Optional[deepcheck.FirstOpenCheck] = None) -> None:
        """Open, rebuild, or update the boot record, as the files require; under the exclusive lock."""
        for _attempt in range(3):
            if self.lock.moved():
                check = self._follow_directory(None)
            problem = self._open(check)
            if problem != "moved":
                break
        else:
            raise CacheError(f"cache directory {self.path} kept being replaced")
        if problem == MARK_BOOT:
            assert self.files is not None
            try:
                write_boot(self.files, self.durable, self.lock.timeout)
            except NoRoom as exc:  # the next use reopens without the write map
                self.writemap, self.state = False, REOPEN
                raise CacheError(f"no space left for the cache in {self.path}: {exc}") from None
            except lmdb.Error as exc:
                raise self._failure(exc) from exc
        elif problem is not None:
            self._rebuild(problem)

    def _deep_check(self) -> Optional[str]:
        """Walk data.mdb in a child process (see :mod:`nvcache.deepcheck`)."""
        return deepcheck.deep_check(
            self.lock.dir, lambda: environment(self.lock.dir, self.map_size, self.durable, False, False),
            self.core.Index)

    def _rebuild(self, reason: str) -> None:
        """Empty and recreate the cache; the caller holds the exclusive lock."""
        if reason == "new":
            log.info("creating cache in %s", self.path)
        else:
            log.warning("emptying cache in %s: %s", self.path, reason)
        self._close_files()
        self._use(create_files(self.lock.dir, self.core, self.lock, self.map_size, self.writemap, self.durable,
                               self.path))

    def _use(self, files: Files) -> None:
        self.files = files
        self.reader = files.reader
        self.writemap = files.writemap
        self.state = OPEN

    def _close_files(self) -> None:
        if self.state == OPEN:
            self.state = REOPEN
        files, self.files = self.files, None
        if files is not None:
            files.close()

    # -- the one "current?" gate -----------------------------------------------------------
    def _current(self, fresh: bool = False, timeout: Optional[float] = None) -> None:
        """Reopen first when the state says so, or (``fresh``) when another process rebuilt the file."""
        if self.state or (fresh and self._replaced()):
            self._refresh(timeout)

    def _replaced(self) -> bool:
        """Whether data.mdb was unlinked (rebuilt or its directory removed); an fstat, no lock.

        Another thread may close the descriptor under us: a closed one means
        "reopen" as well.
        """
        files = self.files
        if files is None:
            return True
        try:
            return self.core.link_count(files.data_fd) == 0
        except OSError:
            return True

    def _refresh(self, timeout: Optional[float] = None) -> None:
        """Reopen after a fork, a failure, damage, a moved directory or a rebuild elsewhere.

        Under the exclusive lock: its mutex keeps every other thread of this
        process out of a transaction while the files are replaced, and several
        threads that found the store stale at once reopen it once (the
        condition is checked again inside).
        """
        self.lock.acquire(True, timeout)  # in a forked child, its own fresh mutex and descriptor
        try:
            if self.generation != fork_generation():
                self._after_fork_locked(timeout)
            elif self.state or self._replaced():
                self._reopen_locked(timeout)
        except OSError as exc:  # a file vanished or the machine is short of something: not ours to raise
            self.state = max(self.state, REOPEN)
            raise CacheError(f"cannot reopen the cache in {self.path}: {exc}") from exc
        except BaseException:
            self.state = max(self.state, REOPEN)  # whatever failed is retried by the next call
            raise
        finally:
            self.lock.release()

    def _after_fork_locked(self, timeout: Optional[float]) -> None:
        # The mapping and buffer are the parent's: drop them, never use them again. Until the
        # generation is updated below, every call comes here first (the state stays REOPEN).
        self._close_files()
        self.buffer.clear()
        self._join_users(timeout)  # closing our copy of the parent's descriptor leaves its flock alone
        self._reopen_locked(timeout)
        self.generation = fork_generation()

    def _reopen_locked(self, timeout: Optional[float] = None) -> None:
        # We hold the exclusive lock, so nobody else can rebuild meanwhile. Damage found in a file
        # that another process has since replaced (or in a directory we leave) is not rebuilt.
        damaged = self.state == REBUILD and not self._replaced()
        self._close_files()
        check = None
        if self.lock.moved():
            check = self._follow_directory(timeout)
            damaged = False
        if damaged:
            self._rebuild("damage found while in use")
        else:
            self._open_locked(check)

    def _join_users(self, timeout: Optional[float]) -> bool:
        """Hold ``users`` of the directory we lock (a fresh descriptor); True when no other process has it."""
        users_fd = open_lock_file(os.path.join(self.lock.dir, USERS_FILE))
        try:
            first = claim_users(users_fd, self.path, self.lock.timeout if timeout is None else timeout)
        except BaseException:
            os.close(users_fd)
            raise
        old, self._users_fd = self._users_fd, users_fd
        if old >= 0:
            os.close(old)
        return first

    def _follow_directory(self, timeout: Optional[float]) -> Optional[deepcheck.FirstOpenCheck]:
        """Our path names another directory now (removed or renamed, then made anew): move to it.

        We hold the exclusive lock of the old directory, whose files nobody
        else uses any more. Its lock is exchanged for the new directory's
        before any file there is touched (else two writers would share one
        data.mdb), and this process joins the new directory's users; if it is
        their first, the new cache gets the first opener's check.
        """
        log.warning("cache directory %s was removed or replaced under this process; "
                    "using the cache found there now", self.path)
        self.lock.rebind(prepare_directory, timeout)
        self.state = REOPEN  # what was found in the old directory's file does not carry over
        self._suspect = False
        first = self._join_users(timeout)
        return deepcheck.FirstOpenCheck(self.lock.dir, self._deep_check) if first else None

    def _notice_moved(self) -> None:
        """Reopen at the next use if our directory was renamed away (a stat; for bookkeeping paths).

        A removed directory also unlinks data.mdb, which every write notices;
        one renamed away keeps its files, and only this check moves us to the
        cache at our path.
        """
        if not self.state and self.lock.moved():
            self.state = REOPEN

    def _stop_writemap(self, why: str) -> None:
        """Commit with pwrite from now on in this process (we hold the exclusive lock)."""
        log.info("cache in %s: no room to reserve on disk (%s); writing without the write map", self.path, why)
        self.writemap = False
        self._reopen_locked()

    def _failure(self, exc: BaseException, reader: Any = None) -> CacheError:
        """The CacheError for an LMDB or index failure, after setting the state it calls for.

        ``reader``: the one a read failed in; if another thread has replaced it
        since, the failure belongs to files no longer used and changes no state.
        """
        if reader is not None and reader is not self.reader:
            return CacheError(f"cache operation failed in {self.path}: {exc}")
        if isinstance(exc, CORRUPTION_ERRORS):
            self.state = REBUILD
            log.warning("cache in %s is damaged (%s); it will be rebuilt", self.path, exc)
            return CacheError(f"cache in {self.path} is damaged: {exc}")
        if isinstance(exc, REOPEN_ERRORS):
            self.state = max(self.state, REOPEN)
        if isinstance(exc, lmdb.MapFullError):
            return CacheError(f"cache file in {self.path} reached its map size")
        if isinstance(exc, lmdb.DiskError) or getattr(exc, "errno", None) == errno.ENOSPC:
            return CacheError(f"no space left for the cache in {self.path}")
        return CacheError(f"cache operation failed in {self.path}: {exc}")

    def _files_locked(self) -> Files:
        """The files, checked again under the lock: another thread's failed reopen may have closed them."""
        files = self.files
        if files is None:
            raise CacheError(f"the cache in {self.path} could not be reopened; the next call tries again")
        return files

    # -- reads (count nothing: the front counts) -------------------------------------------
    # Each takes the caller's lock timeout (None: the lock's own): caches that share this store
    # may each have their own.
    def lookup(self, key: bytes, timeout: Optional[float] = None) -> Tuple[Any, int]:
        """(bytes, born) of a record; (None, 0) when absent; (False, 0) when damaged."""
        if self.state:
            self._refresh(timeout)
        reader = self.reader
        try:
            return reader.lookup(key, timeout)  # type: ignore[no-any-return]
        except StaleReader:
            return self._via_reader(lambda reader: reader.lookup(key, timeout), timeout)  # replaced meanwhile
        except DATA_ERRORS as exc:
            raise self._failure(exc, reader) from exc

    def find(self, layer_id: str, kind: str, timeout: Optional[float] = None) -> Tuple[bytes, Any, int]:
        """(key, data, born) of a record by name (validated): :meth:`lookup` in one core call, the hot read."""
        if self.state:
            self._refresh(timeout)
        reader = self.reader
        try:
            return reader.find(layer_id, kind, timeout)  # type: ignore[no-any-return]
        except StaleReader:
            return self._via_reader(lambda reader: reader.find(layer_id, kind, timeout), timeout)
        except DATA_ERRORS as exc:
            if isinstance(exc, ValueError):
                self.core.record_key(layer_id, kind)  # raises again for a bad argument: not damage
            raise self._failure(exc, reader) from exc

    def lookup_many(self, keys: List[bytes], timeout: Optional[float] = None) -> List[Tuple[Any, int]]:
        """:meth:`lookup` of every key under one lock and in one read transaction."""
        return self._via_reader(lambda reader: reader.lookup_many(keys, timeout), timeout)  # type: ignore[no-any-return]

    def contains(self, key: bytes, fresh: bool = False, timeout: Optional[float] = None) -> bool:
        """Whether a record exists, read like :meth:`lookup`; counts nothing.

        ``fresh``: first reopen if another process rebuilt the file (a put must
        not skip its write because of a record in a file nobody uses any more).
        """
        if fresh:
            self._current(True, timeout)
        elif not self.state:  # the common case first, as in lookup: one core call
            reader = self.reader
            try:
                return bool(reader.contains(key, timeout))
            except StaleReader:
                pass  # replaced meanwhile: the slow way below
            except DATA_ERRORS as exc:
                raise self._failure(exc, reader) from exc
        return bool(self._via_reader(lambda reader: reader.contains(key, timeout), timeout))

    def _via_reader(self, read: Callable[[Any], Any], timeout: Optional[float]) -> Any:
        """``read(reader)``, retried while other threads keep replacing the reader."""
        for _attempt in range(8):  # each retry follows a reopen (a failed one raises)
            self._current(False, timeout)
            reader = self.reader
            try:
                return read(reader)
            except StaleReader:
                continue  # another thread closed it meanwhile: its reopen is due or done
            except DATA_ERRORS as exc:
                raise self._failure(exc, reader) from exc
        raise CacheError(f"the cache in {self.path} could not be reopened; the next call tries again")

    def cache_data(self, timeout: Optional[float] = None) -> Dict[str, Any]:
        """The seed's dump (counters and records, next victim first) from the newest file."""
        self._current(True, timeout)
        return self._via_reader(lambda reader: reader.cache_data(timeout), timeout)  # type: ignore[no-any-return]

    def counters(self, timeout: Optional[float] = None) -> Tuple[int, int, int, int, int]:
        """(record count, total bytes, hits, misses, evictions) from the newest file."""
        return self._read(lambda index, txn: index.counters(txn), timeout)  # type: ignore[no-any-return]

    def check(self, max_bytes: Optional[int], timeout: Optional[float] = None) -> List[str]:
        """Every problem the index finds in the newest file (see ``Index.check``)."""
        return list(self._read(lambda index, txn: index.check(txn, max_bytes), timeout))

    def _read(self, read: Callable[[Any, Any], Any], timeout: Optional[float]) -> Any:
        """``read(index, txn)`` in a py-lmdb read transaction under the shared lock (cold reads)."""
        self._current(True, timeout)
        lock = self.lock
        lock.acquire(False, timeout)
        try:
            files = self._files_locked()
            txn = files.env.begin()
            try:
                return read(files.index, txn)
            finally:
                txn.abort()
        except DATA_ERRORS as exc:
            raise self._failure(exc) from exc
        finally:
            lock.release()

    # -- writes -------------------------------------------------------------------------
    def insert(self, key: bytes, name: bytes, lid_len: int, data: Any, max_bytes: int, keep: frozenset,
               refs: int = 0, last_ns: int = 0, timeout: Optional[float] = None) -> int:
        """Add a record, evicting by the policy to stay within ``max_bytes``: the number evicted, or
        -1 (and no change) when the name exists. Raises CacheFull, changing nothing, when only kept
        records could make room."""
        return self._write(self._insert, key, name, lid_len, data, max_bytes, keep, refs, last_ns,
                           timeout=timeout)  # type: ignore[no-any-return]

    def _insert(self, files: Files, txn: Any, key: bytes, name: bytes, lid_len: int, data: Any,
                max_bytes: int, keep: frozenset, refs: int, last_ns: int) -> int:
        index = files.index
        if index.exists(txn, key):
            return -1
        size = len(data)
        # Before the victims are chosen (the buffer changes their order), and only when this insert
        # evicts or the buffer is due: rewriting hundreds of buffered headers on every put that
        # fits would cost more than the put.
        if len(self.buffer) and (self._buffer_due() or index.records(txn)[1] + size > max_bytes):
            self._apply_buffer(files, txn)
        victims = index.victims(txn, size, max_bytes, keep)
        if files.room is not None:
            files.room.reserve_insert(len(victims), size)
        return index.insert(txn, key, name, lid_len, data, victims, refs, last_ns)  # type: ignore[no-any-return]

    def remove(self, key: bytes, timeout: Optional[float] = None) -> bool:
        """Delete a record; False when there was none."""
        return bool(self._write(self._remove, key, timeout=timeout))

    def _remove(self, files: Files, txn: Any, key: bytes) -> bool:
        self._reserve(files, 0)
        if len(self.buffer) and self._buffer_due():
            self._apply_buffer(files, txn)
        return bool(files.index.remove(txn, key))

    def drop_damaged(self, key: bytes, timeout: Optional[float] = None) -> bool:
        """Remove a record whose bytes fail their checksum; False if it is healthy or gone."""
        return bool(self._write(self._drop_damaged, key, timeout=timeout, native=False))

    def _drop_damaged(self, files: Files, txn: Any, key: bytes) -> bool:
        self._flush(files, txn)
        return bool(files.index.drop_damaged(txn, key))

    def add_counters(self, hits: int, misses: int, timeout: Optional[float] = None) -> None:
        """Add to the hit and miss counters (imports)."""
        self._write(self._add_counters, hits, misses, timeout=timeout)

    def _add_counters(self, files: Files, txn: Any, hits: int, misses: int) -> None:
        self._flush(files, txn)
        files.index.apply(txn, {}, hits, misses)

    def clear(self, timeout: Optional[float] = None) -> None:
        """Remove every record (counters stay)."""
        self._write(self._clear, timeout=timeout, native=False)

    def _clear(self, files: Files, txn: Any) -> None:
        self._flush(files, txn)
        files.index.clear(txn)

    def flush(self, timeout: Optional[float] = None) -> None:
        """Write this process's buffered accesses now."""
        if len(self.buffer):
            self._notice_moved()
            self._write(self._flush, timeout=timeout)

    def _flush(self, files: Files, txn: Any) -> None:
        self._reserve(files, 0)
        if len(self.buffer):
            self._apply_buffer(files, txn)

    def apply_due(self) -> None:
        """Write the buffer if the lock is free right now; else keep it for later.

        Called after a read whose buffer came due: the read has succeeded, and
        bookkeeping must never turn it into an error or a wait behind another
        process (a failed write keeps the buffer).
        """
        try:
            self._notice_moved()
            self._write(self._flush, timeout=0)
        except CacheError as exc:
            log.debug("buffered accesses for %s kept for later: %s", self.path, exc)

    def _apply_buffer(self, files: Files, txn: Any) -> None:
        """Inside a write: apply the buffered accesses (restored by _write if the write fails)."""
        self._taken = taken = self.buffer.take()
        pending, hits, misses, _first = taken
        if pending or hits or misses:
            self._reserve(files, len(pending) * PAGES_PER_KEY)
            files.index.apply(txn, pending, hits, misses)

    def _buffer_due(self) -> bool:
        """The buffer's time has come (a process that only writes must still apply it every second)."""
        buf = self.buffer
        return bool(buf.due or (buf.first_ns and time.time_ns() - buf.first_ns >= buf.max_age_ns))

    @staticmethod
    def _reserve(files: Files, pages: int) -> None:
        if files.room is not None:
            files.room.reserve(pages)

    def _write(self, op: _Op, *args: Any, timeout: Optional[float] = None, native: bool = True) -> Any:
        """``op(files, txn, *args)`` in one write transaction under the exclusive lock: every write.

        ``native``: the core's own write transaction (the compiled core's C
        path) rather than py-lmdb's (for the cold writes the C path does not
        do). Readers without the flock are waited out before any page changes.
        If the transaction meets a damaged file, the file is rebuilt (we hold
        the exclusive lock) and the operation retried once on the new one: a
        put then stores its record instead of failing on every later try.
        """
        if self.state:
            self._refresh(timeout)
        lock = self.lock
        wait = lock.timeout if timeout is None else timeout
        now = time.monotonic()
        deadline = now + wait
        lock.acquire(True, timeout)
        try:
            if now >= self._moved_check_at:  # a directory renamed away keeps its files: look once a second
                self._moved_check_at = now + 1.0
                self._notice_moved()
            attempt = 0
            while True:
                attempt += 1
                self._taken = None
                try:
                    if self.state or self._replaced():
                        self._reopen_locked(timeout)
                    files = self._files_locked()
                    # What is left of the caller's timeout (0 stays 0: bookkeeping never waits).
                    files.table.enter_write(max(deadline - time.monotonic(), 0.0) if wait > 0 else 0.0)
                    try:
                        if files.room is not None:
                            files.room.begin()
                        txn = files.writer.begin() if native else files.env.begin(write=True)
                        try:
                            result = op(files, txn, *args)
                        except BaseException:
                            txn.abort()
                            raise
                        txn.commit()
                    finally:
                        files.table.leave_write()
                except DATA_ERRORS as exc:
                    self._untake()
                    failure = self._failure(exc)
                    if attempt >= 2 or self.state != REBUILD:
                        raise failure from exc
                    continue
                except NoRoom as exc:  # nothing was written: retry with pwrite (once: it is off now)
                    self._untake()
                    self._stop_writemap(str(exc))
                    continue
                except OSError as exc:  # a file vanished under a reopen, or a shortage
                    self._untake()
                    raise CacheError(f"cache operation failed in {self.path}: {exc}") from exc
                except BaseException:
                    self._untake()
                    raise
                if self.force_sync:  # committed: a failed fsync must not re-apply the buffer
                    try:
                        files.env.sync(True)
                    except lmdb.Error as exc:
                        raise self._failure(exc) from exc
                return result
        finally:
            lock.release()

    def _untake(self) -> None:
        taken, self._taken = self._taken, None
        if taken is not None:  # what a failed transaction did not write goes back to the buffer
            self.buffer.restore(taken)

    def suspect(self) -> None:
        """verify() found problems: never mark this file as closed cleanly.

        The next process to open the cache alone then walks it in the deep
        check, which rebuilds it (a live cache is not emptied under others).
        """
        self._suspect = True

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def ident(self) -> Tuple[int, int]:
        """(st_dev, st_ino) of the directory this store locks now (it follows a replaced one)."""
        return self.lock.ident

    def grow(self, max_bytes: int, durable: bool, timeout: float) -> None:
        """Another cache on this path joins: its bound may need a larger map, its durability a sync."""
        self.force_sync = self.force_sync or (durable and not self.durable)
        if map_size_for(max_bytes) > self.map_size:
            self.lock.acquire(True, timeout)
            try:
                self.map_size = map_size_for(max_bytes)
                self.writemap = writemap_wanted(self.path, self.map_size)
                self._close_files()  # the next use reopens with the larger map
            finally:
                self.lock.release()

    def final_flush(self) -> bool:
        """The last user's flush: False (logged) when the buffer could not be written yet."""
        if self.generation != fork_generation() or not len(self.buffer):
            return True  # a forked child's buffer is its parent's
        try:
            self.flush()
            return True
        except CacheError as exc:
            log.warning("closing %s: buffered accesses (%s) not written yet (%s); "
                        "the at-exit flush tries again", self.path, self.buffer_summary(), exc)
            return False

    def close(self) -> None:
        """Record a clean close if this process is the cache's last user, and close every resource.

        Once only: a second call does nothing (its descriptors may belong to other files by then).
        """
        if self._users_fd < 0:
            return
        try:
            if self.generation == fork_generation() and self.files is not None:
                self._leave()
        finally:
            # With the mutex (bounded): no other thread may be inside a transaction of these files.
            # A thread that kept it past the timeout may be inside one: then leave the files and
            # descriptors to the garbage collector rather than pull them away.
            if self.lock.mutex.acquire(True, self.lock.timeout):
                try:
                    self._close_files()
                finally:
                    self.lock.mutex.release()
                self.lock.close()
                fd, self._users_fd = self._users_fd, -1
                os.close(fd)
            else:
                log.warning("closed %s while another thread still used it: its resources stay open",
                            self.path)

    def buffer_summary(self) -> str:
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
            if not self._replaced() and not self._suspect and not self.lock.moved():
                mark_clean(self.lock.dir)
        finally:
            self.lock.release()
