"""The API front: :class:`LayerCache` checks arguments and owns the lifecycle.

A scanner keeps one ``LayerCache`` for the cache directory its pods share
and asks it for a layer's scan record before analysing the layer::

    cache = LayerCache.from_env()          # MAX_CACHE_RECORD_MB, NVCACHE_PATH
    record = cache.get(digest)
    if record is None:
        record = analyse(layer)
        cache.put(digest, record, keep=image_layers)

Every method either does what it says or raises: ``TypeError`` /
``ValueError`` for bad arguments (before anything is touched), and
:class:`~nvcache.CacheError` for everything the cache itself cannot do.
A scanner that treats ``CacheError`` as a miss can never be taken down or
fed wrong bytes by its cache.

Reads take the shared lock only; the reference count, last reference and
hit/miss counters they change are buffered in the process and written before
a put that evicts, by :meth:`LayerCache.flush` (and stats, dumps, verify,
close), or at least once a second while the process is active (see
:mod:`nvcache.store`).
"""

from __future__ import annotations

import os
from types import ModuleType, TracebackType
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Type, Union

from .arguments import (DEFAULT_MB, as_record, bound_bytes, count_arg, env_mib, flag, history_entries, mib_text,
                        seconds)
from .cachedir import DATA_FILE, FORMAT_VERSION, read_version
from . import codec, fleet, flight
from .controller import controller_json
from .errors import CacheDamaged, CacheError
from .policy import DEFAULT_POLICY, policy_named
from . import registry
from .store import Store, log

DEFAULT_PATH = "/tmp/images/caches"
_EMPTY: frozenset = frozenset()
Record = Union[bytes, bytearray, memoryview]


class LayerCache:
    """A bounded, LRU cache of layer scan records shared by every process on a node.

    ``path`` is the cache directory (created 0o750 if missing); ``max_mb``
    bounds the total stored size of the records in MiB (0 disables the
    cache, as ``MAX_CACHE_RECORD_MB`` unset does for the scanner). The
    bound is the cache's, stored in it: every process obeys the one stored,
    and one that opens with another ``max_mb`` replaces it (logged as a
    warning naming both) and evicts down to it; ``max_mb=None`` uses the
    stored bound (``DEFAULT_MB`` for a new cache);
    ``durable=True`` fsyncs every write so that it also survives power loss,
    at a large cost per put. ``lock_timeout`` bounds every wait for another
    process's lock; past it the call raises :class:`~nvcache.CacheTimeout`.
    ``compress=True`` stores each record zstd-compressed (with the cache's
    own dictionary once it has trained one) when that makes it smaller;
    ``compress=False`` stores records as given, for callers who compress
    themselves. One cache holds both kinds; :meth:`get` returns exactly the
    bytes put, and sizes (``size``, ``record_total_size``, the bound) count
    stored bytes, as the seed scanner counts its gzip files.

    ``repair=True`` (the default, and what a scanner wants: its cache must never take it down)
    rebuilds a cache found damaged or of another format, and drops a damaged record a read
    meets. ``repair=False`` opens a reader for tools (the CLI's read-only commands): it never
    writes to the cache's files, so damage raises :class:`~nvcache.CacheDamaged` and stays as
    it is; reads count nothing, nothing missing is created (CacheError), and the writing
    methods raise CacheError. README ("Rules worth knowing") has the details: the users file,
    the clean mark, one store per path in a process.

    ``remote`` shares records across nodes through Redis: a ``redis://``, ``rediss://``,
    ``unix://`` or ``redis+cluster://`` URL, or a :class:`~nvcache.remote.RemoteTier`;
    ``remote_key`` (str or bytes, at least 16 bytes) authenticates its values. A local miss asks the
    tier, a new put is shared, get_or_create runs one creator per fleet; the tier's faults
    never reach the caller. None (the default) is a node-only cache. See :mod:`nvcache.fleet`
    (a disabled or repair=False cache uses no tier).

    ``policy`` names the eviction policy of a new cache (:data:`nvcache.POLICIES`: ``"lru"``, the
    seed's and the default, or ``"lrfu"``, see :mod:`nvcache.policy`); the cache stores it, and an
    existing cache keeps its own (another name is logged as a warning). None: the stored one.
    """

    _core: ModuleType  # the hot index, chosen in nvcache/__init__.py

    def __init__(self, path: Union[str, "os.PathLike[str]"] = DEFAULT_PATH, max_mb: Optional[float] = None,
                 *, durable: bool = False, lock_timeout: float = 10.0, compress: bool = True,
                 repair: bool = True, remote: Any = None, remote_key: Optional[Union[str, bytes]] = None,
                 policy: Optional[str] = None) -> None:
        path = os.fspath(path)
        if not isinstance(path, str):
            raise TypeError("path must be str or os.PathLike[str]")
        if not path or "\0" in path:
            raise ValueError(f"path must be a non-empty path without NUL, got {path!r}")
        given = None if max_mb is None else bound_bytes(max_mb)
        self._max_bytes = bound_bytes(DEFAULT_MB) if given is None else given
        self.lock_timeout = seconds("lock_timeout", lock_timeout)
        self.path = path
        self.durable = flag("durable", durable)
        self.compress = flag("compress", compress)
        self.repair = flag("repair", repair)
        self.enabled = self._max_bytes > 0
        wanted = DEFAULT_POLICY if policy is None else policy_named(policy).name
        tier = fleet.open_tier(remote, remote_key)  # bad URLs and keys raise before anything opens
        self._remote = tier if self.enabled and repair else None
        self._own_tier = isinstance(remote, str)  # made here: closed here (a given one is the caller's)
        self._tally = fleet.Tally()
        self._store: Optional[Store] = None
        self._hot: Optional[Store] = None  # the store for get's counted path; None: get's other path
        self._closed = False
        if self.enabled:  # a disabled cache creates nothing on disk, like the seed's
            self._store = registry.acquire(os.path.abspath(path), self._core, self._max_bytes,
                                           self.durable, float(lock_timeout), repair, wanted)
            self._hot = self._store if repair else None
            if policy is not None and self._store.policy != wanted:
                log.warning("cache in %s keeps its eviction policy %s (asked for %s): a cache's policy "
                            "is chosen when it is created", self.path, self._store.policy, wanted)
            try:
                self._adopt_bound(self._store, given)
            except BaseException:
                self.close()
                raise

    def _adopt_bound(self, store: Store, given: Optional[int]) -> None:
        """Use the cache's stored bound, or replace it with ``given`` (see the class docstring).

        Opening with the stored bound takes no lock (the store read it when it
        opened the file, and every write reads it again). A replacement that
        cannot be written now (the lock stays busy) is logged, and this
        process then obeys the stored bound: the cache never has two.
        """
        if not self.repair:  # a read-only handle writes nothing: it obeys what is stored
            return
        if store.recorded_bound and given in (None, store.bound):
            return
        wanted = store.bound if given is None else given  # None: record ours only if the file has none
        try:  # compared again in the write: another process may have recorded one since
            old, evicted = store.set_bound(wanted, self.lock_timeout, unless_recorded=given is None)
        except CacheError as exc:
            log.warning("cache in %s: could not record the bound %s (%s); using the stored %s", self.path,
                        mib_text(wanted), exc, mib_text(store.bound))
            return
        if given is not None and old and old != given:
            log.warning("cache in %s: bound changed from %s to %s by this process%s", self.path,
                        mib_text(old), mib_text(given), f"; evicted {evicted} records" if evicted else "")

    @property
    def remote(self) -> Any:
        """The remote tier this cache uses (a :class:`~nvcache.remote.RemoteTier`), or None."""
        return self._remote

    @property
    def policy(self) -> Optional[str]:
        """The name of the cache's eviction policy (None when disabled)."""
        return self._store.policy if self._store is not None else None

    @property
    def max_bytes(self) -> int:
        """The cache's bound in stored bytes, as last read from it (0 when disabled)."""
        store = self._store
        return store.bound if store is not None else self._max_bytes

    @classmethod
    def from_env(cls, **kwargs: Any) -> "LayerCache":
        """A cache configured like the scanner: ``NVCACHE_PATH`` (or the default) and ``MAX_CACHE_RECORD_MB``
        (a plain decimal number of MiB; unset or 0 disables the cache), and the remote tier of
        ``NVCACHE_REMOTE`` (a URL; unset or empty: none) with ``NVCACHE_REMOTE_KEY``,
        ``NVCACHE_REMOTE_PREFIX`` and ``NVCACHE_REMOTE_TTL`` (seconds), and a new cache's policy from
        ``NVCACHE_POLICY`` (unset or empty: the stored one). ``kwargs``: the other arguments
        (``durable``, ``lock_timeout``, ``compress``; ``remote=`` and ``policy=`` win over the
        environment); the path and the bound come from the environment only."""
        given = sorted(set(kwargs) & {"path", "max_mb"})
        if given:
            raise TypeError(f"from_env() takes the path and the bound from NVCACHE_PATH and MAX_CACHE_RECORD_MB, "
                            f"not from {', '.join(given)}: call LayerCache(path, max_mb, ...) instead")
        max_mb = env_mib(os.environ, "MAX_CACHE_RECORD_MB")
        if not max_mb:
            log.info("MAX_CACHE_RECORD_MB is %s: the layer cache is disabled, as in the scanner",
                     "0" if os.environ.get("MAX_CACHE_RECORD_MB", "").strip() else "not set")
        made = "remote" not in kwargs and bool(os.environ.get("NVCACHE_REMOTE")) and bool(max_mb)
        if made:
            kwargs["remote"] = fleet.tier_from_env(os.environ)
        kwargs.setdefault("policy", os.environ.get("NVCACHE_POLICY", "").strip() or None)
        cache = cls(os.environ.get("NVCACHE_PATH") or DEFAULT_PATH, max_mb, **kwargs)
        cache._own_tier = cache._own_tier or made  # a tier made here is the cache's to close
        return cache

    # -- lifecycle -------------------------------------------------------------
    def _opened(self) -> Optional[Store]:
        """The store, or None when the cache is disabled; CacheError once closed."""
        if self._closed:
            raise CacheError("the cache is closed")
        return self._store

    def close(self) -> None:
        """Write buffered accesses and release the cache; calling it again does nothing.

        Never raises CacheError: if the buffered accesses cannot be written
        now (the lock stays busy past ``lock_timeout``), they are kept for the
        at-exit flush (or the next cache this process opens on the path), and
        a warning is logged.
        """
        if self._closed:
            return
        self._closed = True
        self._hot = None
        store, self._store = self._store, None
        tier, self._remote = self._remote, None
        if store is not None:
            if tier is not None:
                fleet.sync(tier, self._tally, store, self.lock_timeout, force=True)
            registry.release(store)
        if tier is not None and self._own_tier:
            tier.close()

    def __enter__(self) -> "LayerCache":
        self._opened()
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # never raise from a finaliser; the atexit flush still runs
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("enabled" if self.enabled else "disabled")
        return f"<LayerCache {self.path!r} max_bytes={self.max_bytes} {state}>"

    # -- records ---------------------------------------------------------------
    def _writable(self) -> None:
        if not self.repair:
            raise CacheError(f"the cache in {self.path} was opened with repair=False, which only reads")

    def _uncounted(self, store: Store, key: bytes, layer_id: str, kind: str) -> Optional[bytes]:
        """A read of a repair=False cache: it counts nothing, and a damaged record is reported (left as it is)."""
        data = store.lookup(key, self.lock_timeout)[0]
        if data is False:
            raise CacheDamaged(f"record {layer_id}_{kind} in {self.path} fails its checksum or cannot be decoded "
                               "(left unchanged: opened with repair=False)")
        return data  # type: ignore[no-any-return]

    def _key(self, layer_id: str, kind: str) -> bytes:
        """Validate the arguments (before anything else) and return the record's LMDB key."""
        return self._core.record_key(layer_id, kind)  # type: ignore[no-any-return]

    def _counted(self, store: Store, key: bytes, data: Any, born: int, layer_id: str, kind: str) -> Optional[bytes]:
        """Count one read's outcome: the one place hits, misses and references are counted.

        A damaged record (``data`` False) is dropped and counts as a miss.
        """
        if data is False:
            if store.drop_damaged(key, self.lock_timeout):
                log.warning("record %s_%s failed its checksum (or could not be decoded); dropped it", layer_id, kind)
            else:  # gone meanwhile, or replaced by a healthy one: this read still missed
                log.warning("record %s_%s read as damaged, but not when it was to be dropped", layer_id, kind)
            data = None
        tier = self._remote
        if data is None and tier is not None and not tier.skipping_reads():  # Redis down: a plain miss
            data, born = fleet.fetch(self, store, key, layer_id, kind, _EMPTY)  # a remote hit is a hit
        store.buffer.count(key, data, born)
        return data  # type: ignore[no-any-return]

    def get(self, layer_id: str, kind: str = "layer_file") -> Optional[bytes]:
        """The record put for ``layer_id`` and ``kind``, or None on a miss.

        A hit counts a reference (``reference_count`` + 1, ``last_referred`` =
        now) and a cache hit; a miss counts a cache miss. A record whose bytes
        fail their checksum is dropped, logged and reported as a miss
        (``repair=False``: nothing is counted, and such a record raises CacheDamaged).
        """
        store = self._hot
        if store is None:  # disabled, closed or repair=False: a bad argument is still a bad argument
            key = self._key(layer_id, kind)
            store = self._opened()
            return None if store is None else self._uncounted(store, key, layer_id, kind)
        key, data, born = store.find(layer_id, kind, self.lock_timeout)  # validated, hashed and read
        if type(data) is not bytes:  # a miss, or a damaged record: asks the remote tier, if any
            data = self._counted(store, key, data, born, layer_id, kind)
            if store.buffer.due:
                store.apply_due()
        elif store.buffer.count(key, data, born):  # what _counted does, inlined: every get's path
            store.apply_due()
        return data

    def get_many(self, layer_ids: Iterable[str], kind: str = "layer_file") -> Dict[str, bytes]:
        """The records of ``layer_ids`` found in the cache, by layer id: an image's layers in one read.

        One lock and one read transaction for all of them; each is counted like
        :meth:`get` (a hit or a miss). Ids missing from the result were misses.
        """
        if isinstance(layer_ids, (str, bytes)):
            raise TypeError("layer_ids must be an iterable of layer_id strings, not a single string")
        ids = list(layer_ids)
        keys = [self._key(layer_id, kind) for layer_id in ids]
        store = self._opened()
        if store is None:
            return {}
        found: Dict[str, bytes] = {}
        if not self.repair:  # counts nothing; a damaged record raises CacheDamaged
            for layer_id, key in zip(ids, keys):
                data = self._uncounted(store, key, layer_id, kind)
                if data is not None:
                    found[layer_id] = data
            return found
        for layer_id, key, (data, born) in zip(ids, keys, store.lookup_many(keys, self.lock_timeout)):
            data = self._counted(store, key, data, born, layer_id, kind)
            if data is not None:
                found[layer_id] = data
        if store.buffer.due:
            store.apply_due()
        return found

    def peek(self, layer_id: str, kind: str = "layer_file") -> Optional[bytes]:
        """The record, like :meth:`get`, but counting nothing: for operators' exports and tools.

        No hit, miss or reference is counted and ``last_referred`` stays. A
        record that fails its checksum reads as None (:meth:`get` drops it);
        with ``repair=False`` it raises CacheDamaged.
        """
        key = self._key(layer_id, kind)
        store = self._opened()
        if store is None:
            return None
        if not self.repair:
            return self._uncounted(store, key, layer_id, kind)
        data = store.lookup(key, self.lock_timeout)[0]
        return data if data is not False else None

    def put(self, layer_id: str, record: Record, kind: str = "layer_file",
            keep: Iterable[str] = ()) -> bool:
        """Store ``record``; False (and no change) if the name already has one.

        Evicts the least recently referred records until the total fits
        ``max_bytes``, never the new record nor any record of a layer in
        ``keep`` (the image being scanned). Raises RecordTooLarge for a
        record whose stored (compressed) size is larger than the bound and
        CacheFull when only kept records could make room; both change nothing.
        """
        if self._remote is None:
            return self._insert(layer_id, record, kind, keep, 0, 0)
        store = self._opened()
        assert store is not None  # a cache with a tier is enabled
        return fleet.put(self, store, layer_id, record, kind, keep)

    def get_or_create(self, layer_id: str, create: Callable[[], Record], kind: str = "layer_file",
                      keep: Iterable[str] = (), wait: Optional[float] = None) -> bytes:
        """The record, from the cache or else from ``create()``, which then runs once per node.

        A hit counts as :meth:`get`'s. On a miss one caller per name at a time (threads,
        processes, PID namespaces) runs ``create()`` (bytes-like, else TypeError and nothing
        stored), puts the result with ``keep`` and returns it: a miss. The others wait for it,
        ``wait`` seconds at most (default ``flight.WAIT_FACTOR`` × ``lock_timeout``, also the
        lease of a hung creator), and get its record as a hit; if it raised or died, one of
        them creates next. A record that cannot be stored still reaches the waiters. Disabled:
        calls ``create()``; repair=False: get, else ``create()``, nothing claimed nor stored.
        Waits are counted in :meth:`flight_stats`. See :mod:`nvcache.flight`.
        """
        return flight.get_or_create(self, layer_id, create, kind, keep, wait)

    def _insert(self, layer_id: str, record: Record, kind: str, keep: Iterable[str],
                refs: int, last_ns: int, train: bool = True, kept: Optional[frozenset] = None) -> bool:
        core = self._core
        name, lid = core.record_name(layer_id, kind)
        data = as_record(record)
        keep_ids = kept if kept is not None else (_EMPTY if type(keep) is tuple and not keep else core.keep_set(keep))
        store = self._opened()
        if store is None:
            return False
        self._writable()
        key = core.name_key(name)
        # The first record stays: no write lock, no transaction. Only a "present" must come from a
        # file nobody rebuilt (the write checks that itself), so only then is freshness asked for.
        # A record longer than the bound goes on to the store, which says whether it is too large
        # even stored compressed (a shorter one never is: it is stored raw at worst).
        if (len(data) <= store.bound and store.contains(key, timeout=self.lock_timeout)
                and store.contains(key, True, self.lock_timeout)):
            return False
        return store.insert(key, name, lid, data, keep_ids, refs, last_ns, self.lock_timeout,
                            self.compress, train) >= 0

    def restore(self, layer_id: str, record: Record, kind: str = "layer_file", *,
                reference_count: int, last_referred_ns: int) -> bool:
        """:meth:`put` with a record's history: for importing another cache's records.

        The record keeps ``reference_count`` and ``last_referred_ns``
        (nanoseconds since the epoch, > 0) instead of starting at 0 and now,
        and no compression dictionary is trained meanwhile (an import measured
        its records' sizes with the current one);
        eviction, ``RecordTooLarge`` and ``CacheFull`` work as in put.
        """
        count_arg("reference_count", reference_count, 1 << 64)
        count_arg("last_referred_ns", last_referred_ns, 1 << 64)
        if last_referred_ns == 0:
            raise ValueError("last_referred_ns must be > 0")
        # No dictionary is trained meanwhile: an import measured its fit with the dictionary it has.
        return self._insert(layer_id, record, kind, (), reference_count, last_referred_ns, train=False)

    def add_counters(self, hits: int, misses: int) -> None:
        """Add ``hits`` and ``misses`` to the cache's counters (for imports); they saturate at 2**64-1."""
        count_arg("hits", hits, 1 << 63)
        count_arg("misses", misses, 1 << 63)
        store = self._opened()
        if store is None:
            return
        self._writable()
        store.add_counters(hits, misses, self.lock_timeout)

    def merge_history(self, records: Iterable[Tuple[str, str, int, int]], hits: int,
                      misses: int) -> Tuple[int, int, int]:
        """Merge another cache's history into this one by maximum, in one write (for imports).

        ``records`` holds (layer_id, kind, reference_count, last_referred_ns)
        as :meth:`restore` takes them. A record of those already here keeps
        the larger of the two reference counts and the later of the two last
        references (absent ones are left out); the hit and miss counters
        each become the larger of the cache's and ``hits`` / ``misses``.
        Nothing is added up, so merging the same history twice, or this
        cache's own export, changes nothing. Returns (records raised, hits
        added, misses added); (0, 0, 0) when disabled.
        """
        count_arg("hits", hits, 1 << 63)
        count_arg("misses", misses, 1 << 63)
        entries = history_entries(records, self._key)
        store = self._opened()
        if store is None:
            return 0, 0, 0
        self._writable()
        return store.merge_history(entries, hits, misses, self.lock_timeout)

    def delete(self, layer_id: str, kind: str = "layer_file") -> bool:
        """Remove a record (from the remote tier too, if any); False if this node had none."""
        key = self._key(layer_id, kind)
        store = self._opened()
        if store is None:
            return False
        self._writable()
        if self._remote is not None and not self._remote.delete(self._core.record_name(layer_id, kind)[0]):
            log.warning("cache in %s: record %s_%s could not be deleted from the remote tier: it may come "
                        "back at a miss", self.path, layer_id, kind)  # first: else it would return
        return store.remove(key, self.lock_timeout)

    def contains(self, layer_id: str, kind: str = "layer_file") -> bool:
        """Whether a record exists; counts no hit, miss or reference."""
        key = self._key(layer_id, kind)
        store = self._opened()
        if store is None:
            return False
        return store.contains(key, timeout=self.lock_timeout)

    def __contains__(self, layer_id: object) -> bool:
        return self.contains(layer_id)  # type: ignore[arg-type]

    def __len__(self) -> int:
        store = self._opened()
        if store is None:
            return 0
        return store.counters(self.lock_timeout)[0]

    # -- statistics and dumps ----------------------------------------------------
    def stats(self) -> Dict[str, Optional[int]]:
        """The seed's ``cache-stat`` fields; all None when the cache is disabled."""
        store = self._opened()
        if store is None:
            return {"cache_hits": None, "cache_misses": None, "record_count": None,
                    "record_total_size": None}
        self._flush(store)
        count, total, hits, misses, _evictions = store.counters(self.lock_timeout)
        return {"cache_hits": hits, "cache_misses": misses, "record_count": count,
                "record_total_size": total}

    def flight_stats(self) -> Optional[Dict[str, float]]:
        """get_or_create's waits (calls that found their name claimed), takeovers (waiters that
        then created the record themselves) and wait_seconds (their total); None when disabled."""
        store = self._opened()
        if store is None:
            return None
        waits, takeovers, wait_ns = store.tally(b"flight", self.lock_timeout)
        return {"waits": waits, "takeovers": takeovers, "wait_seconds": wait_ns / 1e9}

    def remote_stats(self) -> Optional[Dict[str, int]]:
        """The remote tier's counters kept in the cache (every process of the node that used one;
        this process's counts written first): remote_hits, remote_misses, remote_errors,
        remote_skipped, remote_rejected, remote_puts, fleet_claims, fleet_waits and
        fleet_takeovers (see :mod:`nvcache.fleet`); None when disabled."""
        store = self._opened()
        if store is None:
            return None
        self._flush(store)
        return fleet.stats(store, self.lock_timeout)

    def evictions(self) -> Optional[int]:
        """How many records were evicted to respect the bound (None when disabled)."""
        store = self._opened()
        if store is None:
            return None
        return store.counters(self.lock_timeout)[4]

    def cache_data(self) -> Dict[str, Any]:
        """The seed's ``cache-data`` dump: counters and records, next victim first."""
        store = self._opened()
        if store is None:
            return {"cache_hits": None, "cache_misses": None, "cache_records": [],
                    "record_total_size": None}
        store.flush(self.lock_timeout)
        return store.cache_data(self.lock_timeout)

    def cache_data_json(self) -> str:
        """:meth:`cache_data` as the controller prints it, byte for byte: sorted keys, 2-space
        indent, and without the keys its REST structs leave out (zeros, an empty record list;
        see :func:`nvcache.controller.controller_view`). ``cache_data()`` keeps every key."""
        return controller_json(self.cache_data())

    # -- maintenance ---------------------------------------------------------------
    def flush(self) -> None:
        """Write this process's buffered accesses (reference counts, hits, misses) and remote
        tier counts now."""
        store = self._opened()
        if store is None:
            return
        self._flush(store)

    def _flush(self, store: Store) -> None:
        store.flush(self.lock_timeout)
        if self._remote is not None:
            fleet.sync(self._remote, self._tally, store, self.lock_timeout, force=True)

    def resize(self, max_mb: float) -> Tuple[int, int]:
        """Make ``max_mb`` the cache's bound for every process, evicting down to it now (kept
        records too: the bound is the cache's). Returns (the bound it replaced in bytes, records
        evicted). ``nvcache resize`` does this; a cache opened with ``max_mb`` does it too."""
        new = bound_bytes(max_mb)
        if not new:
            raise ValueError("a cache's bound must be positive: 0 disables a cache in one process, "
                             "it is not a size")
        store = self._opened()
        if store is None:
            raise CacheError("the cache is disabled in this process (max_mb=0): nothing to resize")
        return store.set_bound(new, self.lock_timeout)

    def clear(self) -> None:
        """Remove every record (with a remote tier, every record under its prefix: the fleet's).
        Hit, miss and eviction counters are kept."""
        store = self._opened()
        if store is None:
            return
        self._writable()
        if self._remote is not None and self._remote.clear() is None:
            log.warning("cache in %s: the remote tier's records could not be cleared", self.path)
        store.clear(self.lock_timeout)

    def stored_size(self, record: Record) -> int:
        """How many bytes ``record`` would take in this cache if put now: what counts against
        the bound and shows as its ``size`` (its length when ``compress=False`` or disabled)."""
        data = as_record(record)
        store = self._opened()
        if store is None or not self.compress:
            return len(data)
        return store.stored_size(data)

    def train_dictionary(self, samples: Optional[Iterable[Record]] = None) -> int:
        """Train a compression dictionary for the records put from now on; its number, or 0.

        ``samples``: records like those to come (default: a random sample of
        the cache's own). The cache trains one by itself as it grows (see
        :mod:`nvcache.codec`); an import trains one from what it imports.
        0 when the dictionary would not save enough bytes, or another
        process stored a newer one meanwhile (which is then used).
        Records made with an older dictionary stay readable.
        """
        data = None if samples is None else [bytes(as_record(s)) for s in samples]
        store = self._opened()
        if store is None:
            return 0
        self._writable()
        return store.train_dictionary(data, self.lock_timeout)

    def add_dictionary(self, dictionary: bytes) -> int:
        """Make ``dictionary`` (from :func:`nvcache.codec.train`) the one new records are compressed
        with; its number, or 0 if another process stored one meanwhile. Imports use it to store
        the dictionary their fit check measured with."""
        if not isinstance(dictionary, bytes) or not dictionary:
            raise TypeError("dictionary must be non-empty bytes (from nvcache.codec.train)")
        codec.check_dictionary(dictionary)  # ValueError: zstd cannot use it
        store = self._opened()
        if store is None:
            return 0
        self._writable()
        return store.add_dictionary(dictionary, self.lock_timeout)

    def verify(self) -> List[str]:
        """Every problem found in the cache (index, records, totals, LRU order, checksums); [] when healthy."""
        store = self._opened()
        if store is None:
            return []
        store.flush(self.lock_timeout)
        problems = store.check(self.lock_timeout)
        version = read_version(store.lock.dir)
        if version != FORMAT_VERSION:
            problems.append(f"version file says {version!r}, expected {FORMAT_VERSION}")
        if not os.path.exists(os.path.join(store.lock.dir, DATA_FILE)):
            problems.append(f"{DATA_FILE} is missing")
        if problems:
            store.suspect()
        return problems

    def repair_damage(self) -> List[str]:
        """Fix what :meth:`verify` finds; what was done, [] when there was nothing to fix.

        Records whose bytes fail their checksum or do not decode are dropped
        (a read would drop each anyway); if :meth:`verify` still finds
        problems, the cache is rebuilt, empty. (Damage found while this cache
        was opened was rebuilt then, as a repair=True cache does, and logged.)
        """
        store = self._opened()
        if store is None:
            return []
        self._writable()
        done = [f"dropped record {name}: its bytes are damaged" for name in store.drop_all_damaged(self.lock_timeout)]
        problems = self.verify()
        if problems:
            store.rebuild(f"repair: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
                          self.lock_timeout)
            done.append(f"rebuilt the cache (emptied: its records are gone) for {len(problems)} problem(s): "
                        + "; ".join(problems))
        return done
