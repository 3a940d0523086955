"""An import's target directory: read without changing it, and put back as it was after a failure.

A dry run must not create or change the target, but opening a
:class:`~nvcache.LayerCache` does both (it creates a missing cache, joins its
users, consumes its clean mark, and empties a damaged or older-format one).
:class:`ReadOnlyCache` answers the fit check's questions (is a record there,
how many bytes are held, the counters) from the files as they are, under the
directory's shared flock, through the core's Index on a read-only py-lmdb
environment, and never writes. A directory without a usable cache reads as
the empty cache an import would start from.

:func:`import_into` runs an import into a directory with both: a dry run
through the view, and a real one that, when the directory had no cache and
the import fails, removes what opening the cache created
(:func:`remove_created`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
from types import ModuleType, TracebackType
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Type

import lmdb

from .arguments import DEFAULT_MB, bound_bytes
from .cache import LayerCache
from .cachedir import (CLEAN_FILE, DATA_FILE, DB_NAMES, FORMAT_DIR, FORMAT_VERSION, USERS_FILE, VERSION_FILE,
                       format_dir, read_version)
from .errors import CacheError
from .locking import FileLock
from .readertable import READERS_FILE
from .opening import CORRUPTION_ERRORS
from .seedfmt import ImportResult, import_seed

log = logging.getLogger("nvcache.importtarget")

# What opening a cache may create in its format directory (the directory lock is the directory itself).
CACHE_FILES = frozenset({DATA_FILE, VERSION_FILE, USERS_FILE, CLEAN_FILE, READERS_FILE})


def has_cache(path: str) -> bool:
    """Whether the cache path ``path`` holds a cache of this format (both ``version`` and ``data.mdb``
    in its format directory, ``<path>/v<FORMAT_VERSION>``; an older release's files are not one).

    False only when there is none there. A path this process cannot look
    into (permissions), or one that is not a directory, raises CacheError
    saying which: "no cache" would be a wrong diagnosis.
    """
    directory = format_dir(path)
    for where in (path, directory, os.path.join(directory, VERSION_FILE), os.path.join(directory, DATA_FILE)):
        try:
            st = os.stat(where)
        except FileNotFoundError:
            return False
        except PermissionError:
            raise CacheError(f"cannot look into {path}: permission denied (uid {os.geteuid()}; "
                             "run as the scanners' user, or as root)") from None
        except NotADirectoryError:
            raise CacheError(f"{path} is not a directory (a cache is a directory)") from None
        except OSError as exc:
            raise CacheError(f"cannot look into {path}: {exc.strerror or exc}") from None
        if where in (path, directory) and not stat.S_ISDIR(st.st_mode):
            raise CacheError(f"{where} is not a directory (a cache is a directory, its files in {FORMAT_DIR}/)")
    return True


class ReadOnlyCache:
    """The cache at ``path`` as it is, read without joining it: nothing on disk is created or changed.

    It offers what an import's fit check asks of a :class:`~nvcache.LayerCache`:
    ``enabled``, ``max_bytes`` (``max_mb``, validated alike; None: the bound the
    cache stores, or a new cache's default), ``contains``
    and ``stats``. No cache there, another format version, or a data.mdb
    that cannot be opened as nvcache's, reads as empty: opening it for the
    import would create or rebuild it. ``note`` then says why (else None).
    Unlike a LayerCache it does not walk a file nobody has open before
    mapping it (the first opener's deep check), and it never repairs.
    Raises CacheError when the directory or its files cannot be read at all.
    """

    def __init__(self, path: str, max_mb: Optional[float] = None, *, lock_timeout: float = 10.0,
                 core: Optional[ModuleType] = None) -> None:
        self.path = path
        self._given = max_mb is not None
        self.max_bytes = bound_bytes(DEFAULT_MB if max_mb is None else max_mb)
        self.enabled = self.max_bytes > 0
        self.lock_timeout = float(lock_timeout)
        self.core: ModuleType = core or LayerCache._core
        self.note: Optional[str] = None
        self._lock: Optional[FileLock] = None
        self._env: Any = None
        self._index: Any = None
        if not self.enabled:
            return
        if not os.path.isdir(path) or not has_cache(path):
            self.note = f"no nvcache cache at {path}: it counts as empty"
            return
        self._lock = FileLock(format_dir(path), self.lock_timeout)
        try:
            self._with_lock(self._open)
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        directory = self._lock.dir  # type: ignore[union-attr]
        version = read_version(directory)
        if version != FORMAT_VERSION:
            self.note = f"its format version is {version}, not {FORMAT_VERSION}: opening it would empty it"
            return
        try:
            if not stat.S_ISREG(os.lstat(os.path.join(directory, DATA_FILE)).st_mode):
                self.note = f"its {DATA_FILE} is not a regular file: opening it would rebuild it"
                return
            env = lmdb.Environment(directory, subdir=True, readonly=True, create=False, lock=False,
                                   max_dbs=len(DB_NAMES), readahead=False)
        except FileNotFoundError:
            self.note = f"its {DATA_FILE} is gone: opening it would create it"
            return
        except (lmdb.Error, OSError) as exc:
            if isinstance(exc, CORRUPTION_ERRORS):
                self.note = f"its {DATA_FILE} cannot be opened ({exc}): opening it would rebuild it"
                return
            raise CacheError(f"cannot read the cache in {self.path}: {exc}") from exc
        try:
            index = self.core.Index(*[env.open_db(name, create=False) for name in DB_NAMES])
            with env.begin() as txn:
                index.counters(txn)  # a damaged or foreign meta database fails here
                stored = index.bound(txn)
            if stored and not self._given:
                self.max_bytes = stored
        except (lmdb.NotFoundError, lmdb.ReadonlyError) + CORRUPTION_ERRORS as exc:
            env.close()
            self.note = f"its {DATA_FILE} is not a usable nvcache file ({exc}): opening it would rebuild it"
            return
        except BaseException:
            env.close()
            raise
        self._env, self._index = env, index

    def _with_lock(self, read: Callable[[], Any]) -> Any:
        lock = self._lock
        assert lock is not None
        try:
            lock.acquire(False, self.lock_timeout)
            try:
                return read()
            finally:
                lock.release()
        except BaseException:
            lock.recover()  # a signal's exception may have escaped with the lock held (locking.py)
            raise

    def _read(self, read: Callable[[Any, Any], Any], empty: Any) -> Any:
        """``read(index, txn)`` in one read transaction under the shared flock; ``empty`` without a cache."""
        if self._env is None:
            return empty

        def run() -> Any:
            txn = self._env.begin()
            try:
                return read(self._index, txn)
            finally:
                txn.abort()
        try:
            return self._with_lock(run)
        except (lmdb.Error,) + CORRUPTION_ERRORS as exc:
            raise CacheError(f"cannot read the cache in {self.path}: {exc}") from exc

    def contains(self, layer_id: str, kind: str = "layer_file") -> bool:
        """Whether the record exists (arguments validated as by LayerCache.contains)."""
        key = self.core.record_key(layer_id, kind)
        if not self.enabled:
            return False
        return bool(self._read(lambda index, txn: index.exists(txn, key), False))

    def stats(self) -> Dict[str, Optional[int]]:
        """LayerCache.stats() of the files as they are (this process's unwritten counts aside)."""
        if not self.enabled:
            return {"cache_hits": None, "cache_misses": None, "record_count": None, "record_total_size": None}
        count, total, hits, misses, _evictions = self._read(lambda index, txn: index.counters(txn),
                                                            (0, 0, 0, 0, 0))
        return {"cache_hits": hits, "cache_misses": misses, "record_count": count, "record_total_size": total}

    def close(self) -> None:
        env, self._env = self._env, None
        if env is not None:
            env.close()
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.close()

    def __enter__(self) -> "ReadOnlyCache":
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.close()


# -- importing into a directory ---------------------------------------------------------------
def import_into(src: str, path: str, max_mb: Optional[float], *, skip_missing: bool = False, skip_damaged: bool = False,
                dry_run: bool = False, lock_timeout: float = 10.0,
                cache_class: Type[LayerCache] = LayerCache) -> ImportResult:
    """:func:`~nvcache.seedfmt.import_seed` into the cache directory ``path``, opened as
    ``cache_class`` with the bound ``max_mb`` (None: the one the cache stores; given, it becomes
    the cache's bound).

    A dry run only reads ``path`` through a :class:`ReadOnlyCache`: nothing
    is created or changed there, and no cache counts as empty (the view's
    note, why it is empty, becomes a warning). An import into a path
    without a cache is checked in full against that empty view before the
    cache is created, so a refused one creates nothing; if it fails later,
    :func:`remove_created` removes what opening the cache created.
    """
    options: Dict[str, Any] = {"skip_missing": skip_missing, "skip_damaged": skip_damaged,
                               "lock_timeout": lock_timeout}
    had_cache = has_cache(path)
    if dry_run or not had_cache:
        with ReadOnlyCache(path, max_mb, lock_timeout=lock_timeout, core=cache_class._core) as view:
            planned = import_seed(src, view, dry_run=True, **options)
        if view.note and dry_run:
            planned.warnings.append(view.note)
        if dry_run:
            return planned
    before = existing(path)
    try:
        with cache_class(path, max_mb, lock_timeout=lock_timeout) as cache:
            return import_seed(src, cache, **options)
    except BaseException:
        if not had_cache:
            removed = remove_created(path, before)
            log.info("the import failed; removed what it had created at %s: %s", path, ", ".join(removed))
        raise


# -- undoing a created cache ----------------------------------------------------------------
def existing(path: str) -> Tuple[Optional[Set[str]], List[str]]:
    """What is at the cache path ``path`` before a cache is opened there: its format directory's
    entries (None: no directory) and the directories opening would create, deepest first."""
    path = format_dir(os.path.abspath(path))
    missing: List[str] = []
    probe = path
    while not os.path.lexists(probe):
        missing.append(probe)
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if missing:
        return None, missing
    try:
        return set(os.listdir(path)), []
    except OSError:
        return None, []  # not a directory we can list: opening the cache fails, nothing to undo


def remove_created(path: str, before: Tuple[Optional[Set[str]], List[str]]) -> List[str]:
    """Remove the cache files and directories that appeared at ``path`` since :func:`existing`
    returned ``before``, and only those; returns what was removed.

    Left alone, with a warning, when another process has joined the cache
    meanwhile (it holds ``users``): its records are not ours to remove.
    """
    path = format_dir(os.path.abspath(path))
    entries, made_dirs = before
    removed: List[str] = []
    users = os.path.join(path, USERS_FILE)
    try:
        fd = os.open(users, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        fd = -1
    try:
        if fd >= 0:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # every user holds it shared
            except BlockingIOError:
                log.warning("%s is in use by another process now; left the cache created there", path)
                return removed
        try:
            now = set(os.listdir(path))
        except OSError:
            return removed
        for name in sorted((now - (entries or set())) & CACHE_FILES):
            try:
                os.unlink(os.path.join(path, name))
                removed.append(name)
            except OSError as exc:
                log.warning("could not remove %s: %s", os.path.join(path, name), exc.strerror)
    finally:
        if fd >= 0:
            os.close(fd)
    for directory in made_dirs:  # deepest first; one that is not empty stays
        try:
            os.rmdir(directory)
            removed.append(directory)
        except OSError:
            break
    return removed
