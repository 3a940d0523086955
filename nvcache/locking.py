"""Locking between processes, threads and forks.

LMDB's own lock table keys readers by PID, and two scanner containers that
share a hostPath are often both PID 1: their readers collide. So nvcache
opens LMDB with ``lock=False`` and guards every transaction itself (reads of
the compiled core may use the readers table, :mod:`nvcache.readertable`, instead
of the flock):

* across processes, ``flock`` on the cache directory itself: shared for
  reads, exclusive for writes. flock belongs to the open file description,
  so it works across PID namespaces and is released by the kernel when a
  process dies, even by ``kill -9``. The directory, not a ``lock`` file in
  it: a /tmp cleaner may unlink an old lock file while a writer holds it,
  and the next opener would then lock a new file and go ahead. A directory
  can still be removed (``rm -rf``) or renamed under live processes, and a
  new cache then appear at the path: the lock remembers which directory it
  locks (:meth:`FileLock.moved`), and the store moves it to the new one
  (:meth:`FileLock.rebind`) before it touches any file there;
* across threads, a mutex: threads share the descriptor and therefore the
  flock, so they must not take it concurrently (an exclusive request would
  silently convert another thread's shared lock);
* across ``fork``: a child must never release its parent's flock (the
  descriptor is shared) nor inherit a mutex held by another thread, so
  :func:`fork_generation` changes in every child and the lock reopens.

Every wait is bounded by ``timeout`` seconds and then raises CacheTimeout,
so a process stopped while holding the lock cannot hang the others.

A signal handler's exception (KeyboardInterrupt) can land anywhere, also right
after the mutex was taken and before any ``try`` (CPython runs pending handlers
when a C call returns). So the mutex is an RLock, which records its owner
atomically with the acquisition, and every lock user ends in
:meth:`FileLock.recover` when anything escapes it: whatever this thread still
holds then (mutex, flock, the readers table's writer flag, a write
transaction) was left by an interrupted call and is released there.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import sys
import threading
import time
import weakref
from typing import Any, Callable, Optional, Tuple

from .errors import CacheError, CacheTimeout

_fork_generation = 0
# Every live FileLock: a forked child gives each a fresh mutex before any thread of its own runs.
_locks: "weakref.WeakSet[FileLock]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1
    for lock in list(_locks):
        # The parent's mutex may have been held by a thread that does not exist here.
        lock.mutex = threading.RLock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def fork_generation() -> int:
    """A number that differs in a forked child from its parent's."""
    return _fork_generation


def open_nofollow(path: str, flags: int, mode: int = 0o640) -> int:
    """``os.open`` that refuses to follow a symlink planted at ``path``; failures are CacheError.

    O_NONBLOCK: a FIFO planted in place of a file must not hang the opener
    (it changes nothing for regular files).
    """
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CacheError(f"{path} is a symlink; refusing to follow it") from None
        raise CacheError(f"cannot open {path}: {exc.strerror}") from exc


# Errors that say something about the machine (descriptors, memory), not about a file's contents:
# they must never be taken for damage (which empties the cache).
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.EINTR,
                             errno.ENOBUFS})


def is_resource_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or the OSError behind a CacheError) is a shortage, not a bad file."""
    cause = exc if isinstance(exc, OSError) else exc.__cause__
    return isinstance(cause, OSError) and cause.errno in RESOURCE_ERRNOS


def open_lock_file(path: str) -> int:
    """Open (creating) a file that only ever serves as a flock target.

    A directory planted at ``path`` is removed first. Only a directory: a race
    with another process doing the same then fails (rmtree of a file) instead
    of unlinking the lock file that process already holds.
    """
    try:
        return open_nofollow(path, os.O_RDWR | os.O_CREAT)
    except CacheError as exc:
        if not isinstance(exc.__cause__, IsADirectoryError):
            raise
    shutil.rmtree(path, ignore_errors=True)
    return open_nofollow(path, os.O_RDWR | os.O_CREAT)


def open_directory(path: str) -> int:
    """A descriptor of the directory ``path`` (never through a symlink), to flock."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise CacheError(f"cannot open cache directory {path}: {exc.strerror}") from exc


_PROC_FD = "/proc/self/fd"


def files_dir(fd: int, path: str) -> str:
    """The path through which to open the files of the directory open as ``fd`` (locked).

    ``/proc/self/fd/<fd>`` names the directory the descriptor holds, so files
    opened through it are that directory's even if ``path`` was removed or
    renamed and another directory made there meanwhile: a process never opens,
    creates or deletes a file of a cache whose lock it does not hold. Without
    /proc, ``path`` itself (and the store checks ``moved()`` after opening).
    """
    proc = f"{_PROC_FD}/{fd}"
    return proc if _PROC_WORKS else path


def _proc_works() -> bool:
    try:
        fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return os.path.samefile(f"{_PROC_FD}/{fd}", "/")
    except OSError:
        return False
    finally:
        os.close(fd)


_PROC_WORKS = _proc_works()


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
# nvcache's modules that only call the library's API, as any program does (the command, the
# simulation, the seed tools): their frames say nothing about a call in progress.
_CALLERS = {os.path.join(_PACKAGE, name + ".py") for name in
            ("__main__", "console", "cli", "climetrics", "clisim", "simulate", "seedfmt")}


def _library_frame(frame: Any) -> bool:
    name = frame.f_code.co_filename
    return name.startswith(_PACKAGE) and name not in _CALLERS


def _nested_call() -> bool:
    """Whether this thread is inside a cache call that was suspended to run a signal handler
    that called the cache again: beyond the caller's run of library frames, another one.

    Only asked when this thread holds the mutex while it should not (rare): the hold then
    belongs to that outer call, which goes on after the handler, and must be left alone.
    Frames of nvcache's own API callers (the CLI, the simulation) are not library frames:
    ``python -m nvcache`` is a program calling the library, not a call in progress.
    """
    frame = sys._getframe(1)
    while frame is not None and _library_frame(frame):
        frame = frame.f_back
    while frame is not None:
        if _library_frame(frame):
            return True
        frame = frame.f_back
    return False


def _identity(fd: int) -> Tuple[int, int]:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


class FileLock:
    """A reader/writer lock on one directory, safe for threads of one process."""

    _POLL_MIN = 0.00005
    _POLL_MAX = 0.002

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        # Reentrant only for its owner record (_is_owned, the C RLock's method that threading's
        # Condition uses too): no call takes it twice (the hot reads ask _is_owned first).
        self.mutex = threading.RLock()
        # What recover() must undo besides the flock (the store's write transaction, the table's flag).
        self.on_recover: Optional[Callable[[], None]] = None
        self.fd = open_directory(path)
        self.ident = _identity(self.fd)
        self._generation = _fork_generation
        _locks.add(self)

    def moved(self) -> bool:
        """Whether ``path`` no longer names the directory this lock locks (removed, renamed, replaced).

        Only a path that is gone or names something else counts: a stat that
        fails for another reason (a shortage) says nothing, and is False.
        """
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return True
        except OSError:
            return False
        return (st.st_dev, st.st_ino) != self.ident

    @property
    def dir(self) -> str:
        """A path to the locked directory itself, whatever ``path`` names now (see files_dir)."""
        return files_dir(self.fd, self.path)

    def rebind(self, create: Callable[[str], None], timeout: Optional[float] = None) -> bool:
        """Lock the directory now at ``path`` instead (creating it with ``create`` when missing).

        The caller holds the mutex and the exclusive flock; afterwards it holds
        the exclusive flock of the new directory (and the mutex), and the old
        directory's flock is released. Raises CacheError/CacheTimeout when the
        new one cannot be opened or locked within the timeout; the lock then
        still holds the old directory. False (nothing done) when ``path``
        names the locked directory again.
        """
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            if not self.moved():
                return False  # still (or again) the directory we lock
            create(self.path)
            try:
                fd = open_directory(self.path)
            except CacheError as exc:
                if not isinstance(exc.__cause__, FileNotFoundError) or time.monotonic() >= deadline:
                    raise
                continue  # removed again between creating and opening it
            try:
                self._flock_until(fd, deadline)
                st = os.stat(self.path, follow_symlinks=False)
                if (st.st_dev, st.st_ino) == _identity(fd):
                    break
            except (FileNotFoundError, NotADirectoryError):
                pass  # removed again while we waited for it: once more
            except OSError as exc:
                os.close(fd)
                raise CacheError(f"cannot lock cache directory {self.path}: {exc.strerror}") from exc
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            if time.monotonic() >= deadline:
                raise CacheTimeout(f"{self.path} kept being replaced for {timeout} s")
        old, self.fd, self.ident = self.fd, fd, _identity(fd)
        os.close(old)  # releases the old directory's flock
        return True

    def _flock_until(self, fd: int, deadline: float, op: int = fcntl.LOCK_EX) -> None:
        """flock ``fd`` (``op``), polling with a growing pause (flock has no timeout of its own)."""
        pause = self._POLL_MIN
        while True:
            try:
                fcntl.flock(fd, op | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise CacheTimeout(f"{self.path} stayed locked by another process") from None
                time.sleep(pause)
                pause = min(pause * 2, self._POLL_MAX)

    def _reopen_after_fork(self) -> None:
        # Called with the (child's own) mutex held, so only one thread does it.
        # The inherited descriptor shares the parent's lock: close our copy
        # (that never releases the parent's flock) and take a fresh one.
        old = self.fd
        self.fd = open_directory(self.path)
        self.ident = _identity(self.fd)
        self._generation = _fork_generation
        try:
            os.close(old)
        except OSError:
            pass

    def acquire(self, exclusive: bool, timeout: Optional[float] = None) -> None:
        """Take the mutex, then the flock; raise CacheTimeout after ``timeout`` seconds.

        ``timeout`` defaults to the lock's own; 0 tries once without waiting.
        Whatever escapes leaves nothing held (see recover). Callers wrap the
        acquisition and their release in ``except BaseException: recover()``:
        a signal can also land right after this returns.
        """
        timeout = self.timeout if timeout is None else timeout
        mutex = self.mutex
        try:
            if mutex._is_owned():  # type: ignore[attr-defined]
                if _nested_call():
                    raise CacheError("the cache was called from a signal handler that interrupted one of "
                                     "its calls; that call still holds the lock")
                self.recover()  # left held by an interrupted call whose own recovery was interrupted
            if not (mutex.acquire(True, timeout) if timeout > 0 else mutex.acquire(False)):
                raise CacheTimeout(f"another thread held the cache lock for {timeout} s")
            op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            if self.fd < 0:
                raise CacheError("the cache is closed")
            if self._generation != _fork_generation:
                self._reopen_after_fork()
            try:
                fcntl.flock(self.fd, op | fcntl.LOCK_NB)
            except BlockingIOError:
                self._wait(op, timeout)
        except BaseException:
            self.recover()
            raise

    def _wait(self, op: int, timeout: float) -> None:
        # The first try failed already (the caller's); acquire releases the mutex if this one fails too.
        try:
            if timeout <= 0:
                raise CacheTimeout(f"{self.path} is locked by another process")
            time.sleep(self._POLL_MIN)
            self._flock_until(self.fd, time.monotonic() - self._POLL_MIN + timeout, op)
        except CacheTimeout as exc:
            raise CacheTimeout(f"{exc} for {timeout} s" if timeout > 0 else str(exc)) from None

    def release(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            self.mutex.release()

    def recover(self) -> bool:
        """Release what an interrupted call of this thread left held; True when there was something.

        Calls do not nest, so a mutex this thread owns when an exception
        escapes a lock user (or when it calls in again) belongs to no live
        call, unless a signal handler called the cache from inside a call
        (that call's hold is left alone). Each step runs even if a second
        signal interrupts the one before.
        """
        mutex = self.mutex
        if not mutex._is_owned() or _nested_call():  # type: ignore[attr-defined]
            return False
        if self._generation != _fork_generation:  # a forked child whose reopen failed: the
            while mutex._is_owned():  # type: ignore[attr-defined]  # descriptor, the flock and
                mutex.release()  # the table's flag are still its parent's, and stay so
            return True
        try:
            if self.on_recover is not None:
                self.on_recover()  # with the mutex and (if we had it) the flock still held
        finally:
            try:
                if self.fd >= 0:
                    fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                while mutex._is_owned():  # type: ignore[attr-defined]
                    mutex.release()
        return True

    def nested(self) -> bool:
        """Whether this thread is inside one of its cache calls right now (a signal handler that
        interrupted it is calling again): that call's locks and files must be left alone."""
        return bool(self.mutex._is_owned()) and _nested_call()  # type: ignore[attr-defined]

    def close(self) -> None:
        """Close the descriptor, with the mutex held so that no thread is between flocks.

        If another thread keeps the mutex past the timeout, the descriptor is
        left open (closing it could let that thread flock a reused number).
        """
        try:
            self.recover()
            if not self.mutex.acquire(True, self.timeout):
                return
            try:
                if self.fd >= 0:
                    try:
                        os.close(self.fd)
                    finally:
                        self.fd = -1
            finally:
                self.mutex.release()
        except BaseException:
            self.recover()
            raise
