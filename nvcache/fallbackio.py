"""The pure-Python core's transactions: its :class:`Reader` (the hot read in one call) and
:class:`Writer` (write transactions), exported by :mod:`nvcache.fallback` as its own.

They are the twins of the compiled core's Reader and Writer in ``ext/_index.pyx``; the Index
they are handed does the work inside the transaction (fallback.Index, or the compiled one).
"""

from __future__ import annotations

import fcntl
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .errors import StaleReader
from .names import record_key


# Whether this core reads without the flock when the readers table lets it (see locking.py).
FAST_READS = False


class Writer:
    """Write transactions for puts and deletes: here py-lmdb's, on the store's environment.

    The compiled core's Writer has its own C environment on the same file and
    its ``begin()`` returns itself; Index methods handed it run their C
    paths. The store uses both the same way.
    """

    def __init__(self, env: Any, writemap: bool, durable: bool) -> None:
        self.env = env

    def begin(self) -> Any:
        return self.env.begin(write=True)

    def abort(self) -> None:
        """Nothing to do: a py-lmdb transaction that nobody holds any more aborts when freed (the
        compiled Writer keeps its own, which an interrupted store aborts here)."""

    def close(self) -> None:
        self.env = None

    def last_page(self) -> int:
        """The last page in use as of the last commit."""
        return int(self.env.info()["last_pgno"])


def link_count(fd: int) -> int:
    """The link count of an open file (0: unlinked)."""
    return os.fstat(fd).st_nlink


class Reader:
    """The hot read in one call: lock, snapshot, look up, unlock. It counts nothing.

    Bound to one open environment and its :class:`~nvcache.locking.FileLock`
    (the store makes a new Reader whenever either changes, and closes the
    old one). The common case takes the thread mutex and the shared flock
    without waiting; anything else (contention, a timeout to honour) goes
    through ``lock.acquire``. A closed Reader raises StaleReader, checked
    under the mutex before its descriptor is touched.
    """

    __slots__ = ("lock", "fd", "mutex", "env", "index", "codec", "last_txn")

    def __init__(self, lock: Any, env: Any, index: Any, table: Any = None, writer: Any = None) -> None:
        # ``table``, ``writer``: for the compiled twin (reads without the flock, through the
        # Writer's environment). Python has no fence of its own, so this twin always reads under
        # the flock (FAST_READS), through py-lmdb.
        self.lock = lock
        self.fd = lock.fd
        self.mutex = lock.mutex
        self.env = env
        self.index = index
        self.codec: Any = None  # the decoder of this environment's records: set and used by the store
        self.last_txn = 0  # the write transaction id of the snapshot the last read used (0: none yet)

    fast = direct = shared = False  # the compiled twin's properties: never, here

    def close(self) -> None:
        """Called by the store with the lock's mutex held, before it closes the environment."""
        self.env = None

    def _read(self, what: int, arg: Any) -> Any:
        """What ``what`` asks (0 exists, 1 lookup, 2 lookup_many, 3 find); the caller holds the read lock.

        The compiled twin calls this too, when its C environment is unusable.
        """
        if self.env is None:
            raise StaleReader("the environment was replaced")
        txn = self.env.begin()
        self.last_txn = txn.id()  # (AccessBuffer.count reads it: a buffer is due after enough writes)
        try:
            if what == 1:
                return self.index.lookup(txn, arg)
            if what == 3:
                return (arg,) + self.index.lookup(txn, arg)
            if what == 2:
                lookup = self.index.lookup
                return [lookup(txn, key) for key in arg]
            return self.index.exists(txn, arg)
        finally:
            txn.abort()

    def _read_waiting(self, what: int, arg: Any, timeout: Optional[float]) -> Any:
        lock = self.lock
        try:
            lock.acquire(False, timeout)
            try:
                return self._read(what, arg)
            finally:
                lock.release()
        except BaseException:
            lock.recover()  # a signal's exception may have escaped with the lock held (locking.py)
            raise

    def _guarded(self, what: int, arg: Any, timeout: Optional[float] = None) -> Any:
        """``_read`` under the thread mutex and the shared flock (waiting only when contended)."""
        mutex = self.mutex
        try:
            # Owned already: a signal handler calling in during one of this thread's calls (the
            # mutex is reentrant), or a hold an interrupted call left: FileLock.acquire tells which.
            if mutex._is_owned() or not mutex.acquire(False):
                return self._read_waiting(what, arg, timeout)
            if self.env is None:
                mutex.release()
                raise StaleReader("the environment was replaced")
            try:
                fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                mutex.release()
                return self._read_waiting(what, arg, timeout)
            try:
                return self._read(what, arg)
            finally:
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_UN)
                finally:
                    mutex.release()
        except BaseException:
            self.lock.recover()  # a signal's exception may have escaped with the lock held (locking.py)
            raise

    def lookup(self, key: bytes, timeout: Optional[float] = None) -> Tuple[Any, int, int]:
        """(stored bytes, born_ns, encoding) of the record of ``key``; (None, 0, 0) when absent,
        (False, 0, 0) when damaged. Decoding is the store's (after the read lock is released)."""
        return self._guarded(1, key, timeout)  # type: ignore[no-any-return]

    def find(self, layer_id: str, kind: str, timeout: Optional[float] = None) -> Tuple[bytes, Any, int, int]:
        """(key, data, born_ns, encoding) of the record of ``layer_id`` and ``kind`` (validated): a lookup by name.

        One core call for the get path; the key comes back for the front to count with.
        """
        return self._guarded(3, record_key(layer_id, kind), timeout)  # type: ignore[no-any-return]

    def lookup_many(self, keys: Sequence[bytes], timeout: Optional[float] = None) -> List[Tuple[Any, int, int]]:
        """:meth:`lookup` of each key, under one lock acquisition and one read transaction."""
        return self._guarded(2, list(keys), timeout)  # type: ignore[no-any-return]

    def contains(self, key: bytes, timeout: Optional[float] = None) -> bool:
        """Whether the record of ``key`` exists; counts nothing."""
        return bool(self._guarded(0, key, timeout))

    def cache_data(self, timeout: Optional[float] = None) -> Dict[str, Any]:
        """``Index.cache_data`` under the shared flock (a long read: writers wait on the flock)."""
        lock = self.lock
        try:
            lock.acquire(False, timeout)
            try:
                if self.env is None:
                    raise StaleReader("the environment was replaced")
                txn = self.env.begin()
                try:
                    return self.index.cache_data(txn)
                finally:
                    txn.abort()
            finally:
                lock.release()
        except BaseException:
            lock.recover()
            raise
