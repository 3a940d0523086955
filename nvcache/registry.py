"""One :class:`~nvcache.store.Store` per cache directory per process.

Every LayerCache of a directory in a process shares one Store: LMDB must
not map the same file twice for one purpose, threads must share one flock
descriptor (a second one would lock against the first), and the access
buffer must be one so that every hit is counted once. Stores are found by
the directory's identity (st_dev, st_ino), so two spellings of one path
share a store, and a store that followed its path to a new directory
(``Store._follow_directory``) is found under the new one.

A store is reference counted by its caches. The last :func:`release`
flushes and closes it; when that flush cannot be done (the lock stayed busy
past ``lock_timeout``), the store stays registered with its buffer, and the
at-exit flush (:func:`flush_all`) or the next cache on the path writes it.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from types import ModuleType
from typing import List, Optional, Tuple

from .cachedir import DATA_FILE, VERSION_FILE, format_dir, prepare_format_directory
from .errors import CacheError
from .locking import fork_generation
from .lifecycle import REOPEN, existing_directory
from .policy import DEFAULT_POLICY
from .store import Store

log = logging.getLogger("nvcache")

_stores: List[Store] = []
_lock = threading.Lock()


def _find(path: str, ident: Tuple[int, int]) -> Optional[Store]:
    for store in _stores:  # (not one that will leave this directory to follow its own path)
        if store.ident == ident and (store.path == path or not store.lock.moved()):
            return store
    for store in _stores:  # one whose directory was replaced at this path: it follows at its next use
        if store.path == path and store.lock.moved():
            store.state = max(store.state, REOPEN)
            return store
    return None


def _exists(path: str) -> bool:
    """Whether ``path`` exists; CacheError when that cannot be told (permissions): not "no"."""
    try:
        os.lstat(path)
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise CacheError(f"cannot look at {path}: {exc.strerror}") from None


def acquire(path: str, core: ModuleType, max_bytes: int, durable: bool, lock_timeout: float,
            repair: bool = True, policy: str = DEFAULT_POLICY) -> Store:
    """The store of the cache path ``path`` (created 0o750 when missing, with this format's
    directory in it), with one more user.

    ``repair=False``: nothing is created, and a new store only reads (see Lifecycle.repair). One
    store serves every cache of the path in the process: when a repair=True cache joins a store
    opened by a repair=False one, the store repairs from then on (each cache's own verbs still
    follow its own ``repair``). ``policy`` is a new file's: an existing file keeps its own.
    """
    if repair:
        prepare_format_directory(format_dir(path))
    else:
        existing_directory(path)
        if not any(_exists(os.path.join(format_dir(path), name)) for name in (VERSION_FILE, DATA_FILE)):
            raise CacheError(f"no nvcache cache in {path} (a cache opened with repair=False creates none)")
        existing_directory(format_dir(path))
    try:
        st = os.stat(format_dir(path))
    except OSError as exc:  # removed again right after it was made
        raise CacheError(f"cannot use cache directory {path}: {exc.strerror}") from None
    with _lock:
        store = _find(path, (st.st_dev, st.st_ino))
        if store is None:
            store = Store(path, core, max_bytes, durable, lock_timeout, repair, policy)
            _stores.append(store)
        elif store.core is not core:  # its index and buffer are the other core's objects
            raise CacheError(f"{path} is already open in this process with the other core "
                             f"({store.core.__name__})")
        else:  # inherited through fork, the store reopens itself at first use
            store.join(durable)
            if repair:
                store.allow_repair(lock_timeout)
        store.users += 1
        return store


def release(store: Store) -> None:
    """One user fewer; the last one flushes and closes the store. Never raises CacheError."""
    with _lock:
        store.users -= 1
        if store.users > 0:
            return
    if not store.final_flush():
        return  # stays registered with its buffer (see the module docstring)
    with _lock:
        if store.users > 0 or store not in _stores:
            return  # another cache on this path took the store meanwhile (and may have closed it)
        _stores.remove(store)
    store.close()


def flush_all() -> None:
    """At interpreter exit: write every open store's buffered accesses (what fails is logged)."""
    for store in list(_stores):
        if store.generation == fork_generation() and len(store.buffer):
            try:
                store.flush()
            except CacheError as exc:
                log.warning("at exit: dropped buffered accesses for %s (%s): %s", store.path,
                            store.buffer_summary(), exc)


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # a parent thread may have held it: it does not exist here
    for store in _stores:
        store.state = max(store.state, REOPEN)  # the files are the parent's: the first use refreshes


atexit.register(flush_all)
os.register_at_fork(after_in_child=_after_fork_in_child)
