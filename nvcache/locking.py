"""Locking between processes, threads and forks.

LMDB's own lock table keys readers by PID, and two scanner containers that
share a hostPath are often both PID 1: their readers collide. So nvcache
opens LMDB with ``lock=False`` and guards every transaction itself:

* across processes, ``flock`` on the cache directory itself: shared for
  reads, exclusive for writes. flock belongs to the open file description,
  so it works across PID namespaces and is released by the kernel when a
  process dies, even by ``kill -9``. The directory, not a ``lock`` file in
  it: a /tmp cleaner may unlink an old lock file while a writer holds it,
  and the next opener would then lock a new file and go ahead; a directory
  that still holds the cache cannot be removed;
* across threads, a mutex: threads share the descriptor and therefore the
  flock, so they must not take it concurrently (an exclusive request would
  silently convert another thread's shared lock);
* across ``fork``: a child must never release its parent's flock (the
  descriptor is shared) nor inherit a mutex held by another thread, so
  :func:`fork_generation` changes in every child and the lock reopens.

Every wait is bounded by ``timeout`` seconds and then raises CacheTimeout,
so a process stopped while holding the lock cannot hang the others.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import threading
import time
import weakref
from typing import Optional

from .errors import CacheError, CacheTimeout

_fork_generation = 0
# Every live FileLock: a forked child gives each a fresh mutex before any thread of its own runs.
_locks: "weakref.WeakSet[FileLock]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1
    for lock in list(_locks):
        # The parent's mutex may have been held by a thread that does not exist here.
        lock.mutex = threading.Lock()


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


class FileLock:
    """A reader/writer lock on one directory, safe for threads of one process."""

    _POLL_MIN = 0.00005
    _POLL_MAX = 0.002

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self.mutex = threading.Lock()
        self.fd = open_directory(path)
        self._generation = _fork_generation
        _locks.add(self)

    def _reopen_after_fork(self) -> None:
        # Called with the (child's own) mutex held, so only one thread does it.
        # The inherited descriptor shares the parent's lock: close our copy
        # (that never releases the parent's flock) and take a fresh one.
        old = self.fd
        self.fd = open_directory(self.path)
        self._generation = _fork_generation
        try:
            os.close(old)
        except OSError:
            pass

    def acquire(self, exclusive: bool, timeout: Optional[float] = None) -> None:
        """Take the mutex, then the flock; raise CacheTimeout after ``timeout`` seconds.

        ``timeout`` defaults to the lock's own; 0 tries once without waiting.
        """
        timeout = self.timeout if timeout is None else timeout
        mutex = self.mutex
        if not (mutex.acquire(True, timeout) if timeout > 0 else mutex.acquire(False)):
            raise CacheTimeout(f"another thread held the cache lock for {timeout} s")
        op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            if self.fd < 0:
                raise CacheError("the cache is closed")
            if self._generation != _fork_generation:
                self._reopen_after_fork()
            fcntl.flock(self.fd, op | fcntl.LOCK_NB)
        except BlockingIOError:
            self._wait(op, timeout)
        except BaseException:
            mutex.release()
            raise

    def _wait(self, op: int, timeout: float) -> None:
        # flock has no timeout of its own: poll with a growing pause.
        deadline = time.monotonic() + timeout
        pause = self._POLL_MIN
        try:
            while True:
                if timeout <= 0:
                    raise CacheTimeout(f"{self.path} is locked by another process") from None
                time.sleep(pause)
                try:
                    fcntl.flock(self.fd, op | fcntl.LOCK_NB)
                    return
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise CacheTimeout(
                            f"{self.path} stayed locked by another process for {timeout} s") from None
                    pause = min(pause * 2, self._POLL_MAX)
        except BaseException:
            self.mutex.release()
            raise

    def release(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            self.mutex.release()

    def close(self) -> None:
        """Close the descriptor, with the mutex held (bounded) so no thread is between flocks."""
        held = self.mutex.acquire(True, self.timeout)
        try:
            if self.fd >= 0:
                try:
                    os.close(self.fd)
                finally:
                    self.fd = -1
        finally:
            if held:
                self.mutex.release()
