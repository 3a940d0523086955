"""The life of a Store's files: first open, one staleness state and gate, reopening, following.

A :class:`Lifecycle` (the base of :class:`~nvcache.store.Store`) holds the
files of one cache directory (:class:`~nvcache.opening.Files`) and replaces
them as a whole when they stop being usable. Staleness is one state,
:attr:`Lifecycle.state`: OPEN, or what the next use must do first (REOPEN
after a fork, an LMDB failure or a moved directory; REBUILD after damage).
One gate, :meth:`Lifecycle._current`, reopens when the state says so or,
for ``fresh`` uses, when another process rebuilt data.mdb (its link count is
0); reopening runs under the exclusive lock and follows a directory that was
removed or renamed and made anew at the path (:meth:`_follow_directory`).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from types import ModuleType
from typing import Any, Dict, Optional, Tuple

import lmdb

from . import deepcheck, formats
from .cachedir import (CLEAN_FILE, DATA_FILE, MARK_BOOT, USERS_FILE, claim_users, closed_cleanly, recorded_bound,
                       recorded_policy, consume_clean_mark, file_mark, format_dir, last_user, mark_clean,
                       prepare_directory, prepare_format_directory, write_atomically)
from .errors import CacheDamaged, CacheError, CacheTimeout
from .locking import FileLock, fork_generation, open_lock_file, open_nofollow
from .policy import DEFAULT_POLICY, POLICIES
from .opening import CORRUPTION_ERRORS, Files, create_files, environment, open_files, write_boot
from .writemap import NoRoom, first_map_size, grown_map_size, writemap_wanted

log = logging.getLogger("nvcache")

# Errors after which the environment must be reopened (not rebuilt). MapResizedError: another
# process grew data.mdb past our map (see writemap.py); reads and writes reopen and go on.
REOPEN_ERRORS = (lmdb.PanicError, lmdb.BadTxnError, lmdb.BadRslotError, lmdb.BadDbiError, lmdb.MapResizedError)

# Buffered accesses are written at least this often while a process is active.
APPLY_AFTER_NS = 1_000_000_000
APPLY_AFTER_KEYS = 512  # bounds the one get that pays for a batch (12.7 us a key at 1M records)
# ... and once the file has committed max(APPLY_AFTER_WRITES, records // APPLY_AFTER_TURNOVER,
# 2 x processes reading it) write transactions since the read of the oldest (other processes' puts
# choose victims without them: a reference must not wait while a 16th of the cache is replaced).
# The processes' share: an apply is a write too, so with a limit at or below the number of readers
# their applies alone would keep each other due (measured: 12 readers and no put, 1,961 writes in
# 4 s instead of 48); at twice it they add at most as many writes as the puts make. See DEVELOPERS.md,
# "LRU's fidelity".
APPLY_AFTER_WRITES = 8
APPLY_AFTER_TURNOVER = 16
APPLY_RETRY_NS = 1_000_000  # a due buffer whose write found the lock busy waits this long to try again


def writes_due(records: int, processes: int) -> int:
    """The buffer's write limit (AccessBuffer.max_writes) in a file of ``records`` records that
    ``processes`` processes read."""
    return max(APPLY_AFTER_WRITES, records // APPLY_AFTER_TURNOVER, 2 * processes)

# Lifecycle.state: OPEN (falsy: the hot paths test it alone), else what the next use must do first.
OPEN, REOPEN, REBUILD = 0, 1, 2


def existing_directory(path: str) -> None:
    """prepare_directory for a cache that does not repair: the same checks, but nothing is made."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        raise CacheError(f"no nvcache cache at {path}: there is no such directory") from None
    except OSError as exc:
        raise CacheError(f"cannot look at {path}: {exc.strerror}") from None
    prepare_directory(path)


class Lifecycle:
    """One directory's files in this process over time (the Store adds the verbs)."""

    _txn: Any = None  # the store's write transaction in progress (see _abandon_write)

    def __init__(self, path: str, core: ModuleType, max_bytes: int, durable: bool,
                 lock_timeout: float, repair: bool = True, policy: str = DEFAULT_POLICY) -> None:
        self.path = path
        # False (LayerCache(..., repair=False)): a reader that never writes a byte of the files and
        # raises CacheDamaged where a writer would rebuild (see _rebuild, _failure, _leave).
        self.repair = repair
        # A reader's consumed clean mark (its bytes, data.mdb's mark then, its mode and owner), put
        # back by _leave.
        self._clean_mark: Optional[Tuple[bytes, Dict[str, int], Tuple[int, int, int]]] = None
        self.core = core
        # The cache's bound as this process last saw it in the file (its own until then): the
        # file's is the one every write obeys (see Store.set_bound).
        self.bound = max_bytes
        self.map_size = first_map_size(max_bytes)  # what a new file starts with; see _grow_map
        self.policy = policy  # the eviction policy of the file in use (of a new one until then)
        self.writemap = writemap_wanted(path)
        self.durable = durable
        self.force_sync = False
        self.users = 0
        self.buffer = core.AccessBuffer(APPLY_AFTER_NS, APPLY_AFTER_KEYS, APPLY_AFTER_WRITES)
        self.generation = fork_generation()
        self.state = REOPEN
        self.files: Optional[Files] = None
        self.reader: Any = None  # files.reader, kept after a close: it then raises StaleReader
        self._taken: Optional[Tuple[Any, ...]] = None  # what the running write took from the buffer
        self._moved_check_at = 0.0  # monotonic time of the next look at the directory (see _current)
        self._users_ident: Tuple[int, int] = (-1, -1)  # the directory whose users we joined
        self._suspect = False  # verify() found problems: no clean mark, so the next first opener checks
        self._users_fd = -1
        self.lock = FileLock(format_dir(path), lock_timeout)  # this format's directory in the path
        self.lock.on_recover = self._abandon_write
        try:
            self._users_fd = open_lock_file(os.path.join(self.lock.dir, USERS_FILE))
            first = claim_users(self._users_fd, path, lock_timeout)
            self._users_ident = self.lock.ident
            self._first_open(deepcheck.FirstOpenCheck(self.lock.dir, self._deep_check, self.repair)
                             if first else None)
            if self.repair:  # (a reader changes nothing on disk, an older format's files included)
                formats.remove_unused(path)  # an older release's cache nobody uses any more (never raises)
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
        try:
            self.lock.acquire(False)
            try:
                # The directory may have been replaced since the lock opened it (see _follow_directory).
                problem = "moved" if self.lock.moved() else self._open(check)
                if problem == MARK_BOOT and not self.repair:
                    problem = None  # a reader writes nothing: the boot record is the next writer's (see _open_locked)
                if problem is None and not self.repair:
                    self._keep_clean_mark(check)
            finally:
                self.lock.release()
            if problem is None:
                return
            self._close_files()
            self.lock.acquire(True)
            try:
                self._open_locked(check)
                if not self.repair:
                    self._keep_clean_mark(check)
            finally:
                self.lock.release()
        except BaseException:
            self.lock.recover()  # a signal's exception may have escaped with the lock held (locking.py)
            raise

    def _keep_clean_mark(self, check: Optional[deepcheck.FirstOpenCheck]) -> None:
        """A reader that opened first consumes the clean mark only once its open succeeded (an open
        refused for damage changes no file), and only a valid one (a stale or garbled mark is no
        mark: nobody can trust it), keeping its bytes to put back at close (_leave)."""
        if check is None or not closed_cleanly(self.lock.dir):
            return
        kept = None
        try:
            with os.fdopen(open_nofollow(os.path.join(self.lock.dir, CLEAN_FILE), os.O_RDONLY), "rb") as f:
                st = os.fstat(f.fileno())
                kept = (f.read(4096), file_mark(os.stat(os.path.join(self.lock.dir, DATA_FILE))),
                        (st.st_mode & 0o7777, st.st_uid, st.st_gid))
        except (OSError, CacheError):
            pass
        consume_clean_mark(self.lock.dir)
        self._clean_mark = kept

    def _open(self, check: Optional[deepcheck.FirstOpenCheck]) -> Optional[str]:
        files, problem = open_files(self.lock.dir, self.core, self.lock, self.map_size, self.writemap,
                                    self.durable, check, self.path, readonly=not self.repair)
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
            if problem != "moved" and (problem in (None, MARK_BOOT) or not self.lock.moved()):
                break  # (a problem found while the directory was replaced under us: follow it instead)
        else:
            raise CacheError(f"cache directory {self.path} kept being replaced")
        if problem == MARK_BOOT:
            assert self.files is not None
            if not self.repair:
                # A reader never writes non-durably, so it need not record itself, nor this boot:
                # the files are usable as they are, and the next writer updates the record.
                return
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
        """Empty and recreate the cache; the caller holds the exclusive lock.

        Without ``repair`` the files stay as they are: CacheDamaged (or CacheError for no cache).
        """
        if not self.repair:
            if reason == "new":
                raise CacheError(f"no nvcache cache in {self.path} (a cache opened with repair=False creates none)")
            raise CacheDamaged(f"the cache in {self.path} is damaged or cannot be used as it is: {reason} "
                               "(left unchanged: opened with repair=False)")
        if reason == "new":
            log.info("creating cache in %s", self.path)
        else:
            log.warning("emptying cache in %s: %s", self.path, reason)
        self._close_files()
        # The bound the cache had (damage in data.mdb does not lose it), else this process's.
        self.bound = recorded_bound(self.lock.dir) or self.bound
        self.policy = recorded_policy(self.lock.dir) or self.policy
        if self.policy not in POLICIES:  # a damaged version file (a new policy is a new format)
            self.policy = DEFAULT_POLICY
        self.map_size = first_map_size(self.bound)
        self._use(create_files(self.lock.dir, self.core, self.lock, self.map_size, self.writemap, self.durable,
                               self.path, self.bound, self.policy))

    def _use(self, files: Files) -> None:
        if files.bound:
            self.bound = files.bound
        self.policy = files.policy
        self.files = files
        self.reader = self.buffer.reader = files.reader  # (the buffer reads its snapshot ids)
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
        """Reopen first when the state says so, or (``fresh``) when another process rebuilt the file
        or (looked at once a second) our directory was renamed away."""
        if fresh:
            self._look_at_directory(time.monotonic())
        if self.state or (fresh and self._replaced()):
            self._refresh(timeout)

    def _look_at_directory(self, now: float) -> None:
        """At most once a second (``now``: time.monotonic()): reopen at the next use if our directory
        was renamed away. A removed one also unlinks data.mdb, which writes and fresh reads notice
        anyway; a renamed one keeps its files, and only this moves us to the cache at our path."""
        if now >= self._moved_check_at:
            self._moved_check_at = now + 1.0
            if not self.state and self.lock.moved():
                self.state = REOPEN

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
        try:
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
        except BaseException:
            self.lock.recover()  # a signal's exception may have escaped with the lock held (locking.py)
            raise

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
        elif self._users_ident != self.lock.ident:  # a follow whose join failed: join now
            self._join_users(timeout)
        if damaged:
            self._rebuild("damage found while in use")
        else:
            self._open_locked(check)
            if not self.repair:
                self._keep_clean_mark(check)

    def _join_users(self, timeout: Optional[float]) -> bool:
        """Hold ``users`` of the directory we lock (a fresh descriptor); True when no other process has it."""
        users_fd = open_lock_file(os.path.join(self.lock.dir, USERS_FILE))
        try:
            first = claim_users(users_fd, self.path, self.lock.timeout if timeout is None else timeout)
        except BaseException:
            os.close(users_fd)
            raise
        old, self._users_fd = self._users_fd, users_fd
        self._users_ident = self.lock.ident
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
        if not self.lock.rebind(prepare_format_directory if self.repair else existing_directory, timeout):
            return None  # the path names our directory again: nothing to follow
        log.warning("cache directory %s was removed or replaced under this process; "
                    "using the cache found there now", self.path)
        self.state = REOPEN  # what was found in the old directory's file does not carry over
        self._suspect = False
        self._clean_mark = None
        first = self._join_users(timeout)
        return deepcheck.FirstOpenCheck(self.lock.dir, self._deep_check, self.repair) if first else None

    def _grow_map(self, timeout: Optional[float] = None) -> None:
        """A write found the map full: reopen with a larger one (we hold the exclusive lock).

        Under the write map LMDB extends data.mdb to the new map at once;
        other processes meet the longer file as MapResizedError at their
        next transaction and reopen (REOPEN_ERRORS).
        """
        files = self._files_locked()
        current = files.map_size
        grown = grown_map_size(current, self.bound)
        (log.info if grown <= 2 * current else log.warning)(
            "cache in %s: data.mdb's map grows from %d to %d MiB (bound %d MiB)",
            self.path, current >> 20, grown >> 20, self.bound >> 20)
        self.map_size = grown
        self.state = max(self.state, REOPEN)
        self._reopen_locked(timeout)

    def _stop_writemap(self, why: str, timeout: Optional[float] = None) -> None:
        """Commit with pwrite from now on in this process (we hold the exclusive lock)."""
        log.info("cache in %s: no room to reserve on disk (%s); writing without the write map", self.path, why)
        self.writemap = False
        self._reopen_locked(timeout)

    def _failure(self, exc: BaseException, reader: Any = None) -> CacheError:
        """The CacheError for an LMDB or index failure, after setting the state it calls for.

        ``reader``: the one a read failed in; if another thread has replaced it
        since, the failure belongs to files no longer used and changes no state.
        """
        if reader is not None and reader is not self.reader:
            return CacheError(f"cache operation failed in {self.path}: {exc}")
        if isinstance(exc, CORRUPTION_ERRORS) and not self.repair:  # reported, never rebuilt
            self.state = max(self.state, REOPEN)
            return CacheDamaged(f"the cache in {self.path} is damaged: {exc} (left unchanged: opened with "
                                "repair=False)")
        if isinstance(exc, CORRUPTION_ERRORS):
            self.state = REBUILD
            log.warning("cache in %s is damaged (%s); it will be rebuilt", self.path, exc)
            return CacheError(f"cache in {self.path} is damaged: {exc}")
        if isinstance(exc, REOPEN_ERRORS):
            self.state = max(self.state, REOPEN)
        if isinstance(exc, lmdb.MapFullError):  # (writes grow the map and retry: see Store._write)
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

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def ident(self) -> Tuple[int, int]:
        """(st_dev, st_ino) of the directory this store locks now (it follows a replaced one)."""
        return self.lock.ident

    def join(self, durable: bool) -> None:
        """Another cache on this path joins: its durability may need a sync after each write."""
        self.force_sync = self.force_sync or (durable and not self.durable)

    def allow_repair(self, timeout: float) -> None:
        """A repair=True cache joins this store, opened by a repair=False one: from the next use on
        it has a writer (and repairs), as a store opened with repair=True."""
        if self.repair:
            return
        try:
            self.lock.acquire(True, timeout)
            try:
                self.repair = True
                self._clean_mark = None  # a writer uses the file now: its last user marks it, as usual
                self._close_files()  # the next use reopens with a writer
            finally:
                self.lock.release()
        except BaseException:
            self.lock.recover()  # a signal's exception may have escaped with the lock held
            raise

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
        if self.lock.nested():  # a signal handler closing the cache inside one of this thread's calls:
            log.warning("closed %s inside one of its calls (a signal handler): its resources stay open "
                        "for that call", self.path)  # that call goes on with these files after it
            return
        try:
            self.lock.recover()  # what an interrupted call of this thread left held
            if self.generation == fork_generation() and self.files is not None:
                self._leave()
        finally:
            # With the mutex (bounded): no other thread may be inside a transaction of these files.
            # A thread that kept it past the timeout may be inside one: then leave the files and
            # descriptors to the garbage collector rather than pull them away.
            try:
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
            except BaseException:
                self.lock.recover()  # a signal's exception may have escaped with the lock held
                raise

    def _abandon_write(self) -> None:
        """FileLock.recover's part here (we hold the mutex): abort the write transaction an
        interrupted call left open (the next write would begin another on the same environment),
        and clear the readers table's writer flag it left raised."""
        txn, self._txn = self._txn, None
        files = self.files
        try:
            if txn is not None:
                txn.abort()
        finally:
            try:
                # A signal may land between the writer's begin() and the store's note of it: the
                # compiled writer's own transaction would then stay open without this.
                if files is not None and files.writer is not None:
                    files.writer.abort()
            finally:
                if files is not None:
                    files.table.abandon_write(self.lock.fd)

    def buffer_summary(self) -> str:
        buf = self.buffer
        return f"{len(buf.pending)} records' references, {buf.hits} hits, {buf.misses} misses"

    def _put_back_clean_mark(self) -> None:
        """A reader that consumed the clean mark at its first open puts it back, if the file is as it was."""
        if self._clean_mark is None or self._suspect or self.lock.moved():
            return
        body, mark, (mode, uid, gid) = self._clean_mark
        try:
            if file_mark(os.stat(os.path.join(self.lock.dir, DATA_FILE))) == mark:
                write_atomically(self.lock.dir, CLEAN_FILE, body)
                fd = open_nofollow(os.path.join(self.lock.dir, CLEAN_FILE), os.O_RDONLY)
                try:
                    os.fchmod(fd, mode)
                    if (uid, gid) != (os.geteuid(), os.getegid()):
                        os.fchown(fd, uid, gid)  # as root only (else an OSError: logged)
                finally:
                    os.close(fd)
        except (OSError, CacheError) as exc:
            log.debug("could not put back the clean mark of %s: %s", self.path, exc)

    def _leave(self) -> None:
        """If this is the last process using the cache, record that it closed cleanly.

        Best effort and never waits: without the mark, the next first opener
        only walks the file once more.
        """
        try:
            try:
                self.lock.acquire(True, 0)
            except CacheTimeout:
                return
            try:
                if not last_user(self._users_fd):
                    return  # others still use it
                if not self.repair:  # a reader puts back the mark it consumed, if the file is as it was then
                    self._put_back_clean_mark()
                    return
                if not self._replaced() and not self._suspect and not self.lock.moved():
                    mark_clean(self.lock.dir)
            finally:
                self.lock.release()
        except BaseException:
            self.lock.recover()  # a signal's exception may have escaped with the lock held (locking.py)
            raise

