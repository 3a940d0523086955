"""The remote tier as the front uses it: a node's cache backed by records the fleet shares.

:class:`~nvcache.remote.RemoteTier` talks to Redis; this module decides *when*, for
:class:`~nvcache.LayerCache` (the front calls these functions; the store never sees the tier):

* **A local miss asks the tier** (:func:`fetch`). A record found there is put into the local
  cache (with the caller's ``keep``, its first reference written by that insert) and counted as a
  hit, exactly
  as if it had been found locally: the seed's four ``cache-stat`` fields do not tell the tiers
  apart. A record the local cache cannot hold (larger than its bound, the cache full of kept
  records) is still returned. A damaged local record is dropped first, then the tier is asked.
* **A put that is new to this node is shared** (:func:`share`): written to the tier before the
  put returns, waiting at most the tier's socket timeout (0.2 s by default; a put takes
  about 50 µs on a healthy local server, bench/results/remote.md). A record the local cache refused
  (RecordTooLarge, CacheFull) is shared all the same, then the error is raised. A put that finds
  the record already here shares nothing: it was shared when it was first stored.
* **One creator per fleet** (:func:`across`): in :meth:`LayerCache.get_or_create`, the node's
  creator (one per node, :mod:`nvcache.flight`) asks the tier, then claims the name in Redis
  (``SET NX PX``, a lease of ``LEASE`` seconds renewed every third of it while ``create()``
  runs, never past the call's ``wait``), and looks once more after taking the claim (another
  node's creator may have shared and let go since). A creator that finds another node's claim
  polls the claim and the record together, with a backoff from ``POLL_FIRST`` to ``POLL_MAX``
  (the holder shares its record before it lets go), and reads the record once it is there; it
  claims the name itself when the claim is gone without a record (that creator raised, was
  killed, or its lease ran out), and creates the record without a fleet claim when the wait
  reaches ``FLEET_WAIT_SHARE`` of ``wait`` (so that it, not each waiter of its node, takes
  over) or when Redis cannot answer (then the node's claim is all there is). A dead Redis
  costs a local miss one clock read once the read breaker is open (``skipping_reads``).

**Counting.** The tier counts what it does in this process (``RemoteTier.stats()``); those
counts are added to the cache's ``remote`` tally (kept in the file, summed over the node's
processes: :meth:`LayerCache.remote_stats`) at most once a second while the tier is used, and at
every flush, stats and close. A tier instance shared by several caches adds each count to one of
them, whichever writes first.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, Iterable, Optional, Tuple

from .arguments import as_record, redact
from .errors import CacheError, CacheFull, RecordTooLarge
from .fallback import REMOTE_TALLY
from .store import Store, log

TALLY = b"remote"  # fallback.TALLIES' key of the remote tier's counters
SYNC_S = 1.0  # the tier's counts reach the cache file at least this often while it is used
LEASE = 10.0  # a fleet claim lives this long unless renewed: a killed creator's claim ends by then
POLL_FIRST = 0.005
POLL_MAX = 0.1
FLEET_WAIT_SHARE = 0.5

Created = Tuple[bytes, bool, Optional[int]]  # (record, stored locally, born when found rather than created)


def _tier_class(what: str) -> Optional[type]:
    """nvcache.remote.RemoteTier, or None (logged, naming ``what``) when redis-py is missing."""
    try:
        from .remote import RemoteTier
    except ImportError as exc:
        log.error("%s not used: redis-py is not installed (pip install 'nvcache[remote]'): %s", what, exc)
        return None
    return RemoteTier


def open_tier(remote: Any, remote_key: Any) -> Any:
    """The tier for ``LayerCache(remote=, remote_key=)``: None, a URL (a new RemoteTier), or a
    RemoteTier used as given. ValueError / TypeError for a bad URL, key or combination; a missing
    redis-py is logged and the cache works on the node alone (it must not take a scanner down)."""
    if remote is None:
        if remote_key is not None:
            raise ValueError("remote_key is the remote tier's key: it needs remote= as well")
        return None
    if isinstance(remote, str):
        if not remote:
            raise ValueError("remote must be a redis://, rediss://, unix:// or redis+cluster:// URL, got ''")
        tier_class = _tier_class(f"remote tier {redact(remote)}")
        return None if tier_class is None else tier_class(remote, key=remote_key)
    tier_class = _tier_class("remote tier")
    if tier_class is not None and isinstance(remote, tier_class):
        if remote_key is not None:
            raise ValueError("a RemoteTier carries its own key: pass remote_key to RemoteTier, not here")
        return remote
    raise TypeError(f"remote must be a URL string or a nvcache.remote.RemoteTier, not {type(remote).__name__}")


def tier_from_env(environ: Any) -> Any:
    """The tier ``NVCACHE_REMOTE`` names (RemoteTier.from_env), or None without redis-py (logged)."""
    tier_class = _tier_class("NVCACHE_REMOTE")
    return None if tier_class is None else tier_class.from_env(environ)  # type: ignore[attr-defined]


# -- counting --------------------------------------------------------------------------------
class Tally:
    """When a cache last added its tier's counts to its file."""

    __slots__ = ("due",)

    def __init__(self) -> None:
        self.due = time.monotonic() + SYNC_S


def sync(tier: Any, tally: Tally, store: Store, timeout: float, force: bool = False) -> None:
    """Add the tier's new counts to the cache's tally when due (``force``: now). Never raises
    CacheError: counts that cannot be written now are kept for the next time."""
    now = time.monotonic()
    if not force and now < tally.due:
        return
    tally.due = now + SYNC_S
    taken = tier.take_counts()
    values = [taken[name] for name in REMOTE_TALLY]
    if not any(values):
        return
    try:
        store.add_tally(TALLY, values, timeout)
    except CacheError as exc:
        tier.give_back(taken)
        log.debug("remote tier's counts not written to %s yet: %s", store.path, exc)


def stats(store: Store, timeout: float) -> dict:
    """The cache's remote tally by name (every process of the node that used a tier)."""
    return dict(zip(REMOTE_TALLY, store.tally(TALLY, timeout)))


# -- reads and writes --------------------------------------------------------------------------
def fetch(cache: Any, store: Store, key: bytes, layer_id: str, kind: str,
          kept: frozenset) -> Tuple[Optional[bytes], int]:
    """A local miss asks the tier: (record, 0) with the record now local too, else (None, 0).

    The local record starts with the reference the caller's hit counts (its born, 0, matches
    no record, so the buffer adds no second one). It is compressed again with this node's
    dictionary rather than kept in the remote form (zstd without dictionary): about 11 us more
    per remote hit, against 23 % more local bytes and 6 x the evictions for records fetched
    from the tier (DEVELOPERS.md, "Remote tier")."""
    tier = cache._remote
    if tier.skipping_reads():  # Redis is down: a miss costs about what a node-only miss does
        return None, 0
    name, lid = cache._core.record_name(layer_id, kind)
    data = tier.get(name)
    if data is not None:
        try:
            store.insert(key, name, lid, data, kept, 1, time.time_ns(), cache.lock_timeout, cache.compress)
        except CacheError as exc:  # too large here, full of kept records, lock busy: still a hit
            log.info("record %s_%s from the remote tier not stored here: %s", layer_id, kind, exc)
    sync(tier, cache._tally, store, cache.lock_timeout)
    return data, 0


def share(cache: Any, store: Store, layer_id: str, kind: str, data: Any) -> None:
    """Write a record new to this node to the tier (bounded by the tier's timeout; never raises)."""
    tier = cache._remote
    tier.put(cache._core.record_name(layer_id, kind)[0], data)
    sync(tier, cache._tally, store, cache.lock_timeout)


def put(cache: Any, store: Store, layer_id: str, record: Any, kind: str, keep: Iterable[str]) -> bool:
    """:meth:`LayerCache.put` with a tier: the local put, then the record shared (see above)."""
    data = as_record(record)  # its bytes, as the local put takes them (any memoryview's shape)
    try:
        stored = cache._insert(layer_id, data, kind, keep, 0, 0)
    except (RecordTooLarge, CacheFull):
        share(cache, store, layer_id, kind, data)
        raise
    if stored:
        share(cache, store, layer_id, kind, data)
    return stored


# -- one creator per fleet ------------------------------------------------------------------------
class _Renewer:
    """Renews a fleet claim every third of its lease until stopped, lost, or ``until`` (monotonic).

    A renewal the server could not answer (a stall, a fault) is tried again a second later while
    the lease may still hold: one blip must not let the claim lapse under a running create()."""

    def __init__(self, tier: Any, name: bytes, token: bytes, until: float) -> None:
        self.tier, self.name, self.token, self.until = tier, name, token, until
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="nvcache-fleet-lease", daemon=True)

    def _run(self) -> None:
        held_until = time.monotonic() + LEASE  # the lease as last granted (from the claim on)
        pause = LEASE / 3
        while not self.stop.wait(pause):
            now = time.monotonic()
            if now >= self.until or now >= held_until:
                return  # past the wait (waiters take over anyway), or the lease ran out unrenewed
            renewed = self.tier.renew(self.name, self.token, LEASE)
            if renewed is False:
                return  # lost: expired, or another holder's now
            if renewed:
                held_until, pause = now + LEASE, LEASE / 3
            else:
                pause = min(1.0, LEASE / 10)


def across(cache: Any, store: Store, key: bytes, layer_id: str, kind: str, kept: frozenset,
           create_local: Callable[[], Tuple[bytes, bool]], wait: float) -> Callable[[], Created]:
    """The node creator's step of get_or_create with a tier: fetch, else one creator per fleet.

    ``create_local()`` runs create() and the local put: (record, stored). The returned
    function is what :func:`nvcache.flight.single_flight` runs as the node's creator. Whatever
    ends it between taking a fleet claim and returning (create() raising, a KeyboardInterrupt)
    lets go of the claim first (a compare-and-delete: safe even if the claim's SET never landed).
    """
    tier = cache._remote
    name = cache._core.record_name(layer_id, kind)[0]

    def found() -> Optional[Created]:
        data, born = fetch(cache, store, key, layer_id, kind, kept)
        if data is None:
            return None
        try:
            stored = store.contains(key, timeout=cache.lock_timeout)
        except CacheError:  # the lock stayed busy: hand the bytes over through the claim file
            stored = False
        return data, stored, born

    def create(claimed: Optional[bytes]) -> Created:
        """create() and the local put; with a fleet claim (``claimed``: its token) renewed meanwhile,
        then shared and let go. The caller let go of the claim if this raises."""
        renewer = None
        if claimed is not None:
            tier.count("fleet_claims")
            renewer = _Renewer(tier, name, claimed, time.monotonic() + wait)
            try:
                renewer.thread.start()
            except RuntimeError as exc:  # no thread to spare: the lease then ends on its own
                log.warning("fleet claim on %r not renewed: %s", name, exc)
        try:
            data, stored = create_local()
        finally:
            if renewer is not None:
                renewer.stop.set()
        share(cache, store, layer_id, kind, data)
        return data, stored, None

    def claimed_run(token: bytes) -> Created:
        # Another node's creator may have shared it and let go since our look: its holder
        # shares before it lets go, so one more look after the claim settles it (EXISTS first:
        # a record that is not there is not counted as a second miss).
        polled = tier.claimed(name)
        hit = found() if polled is not None and polled[1] else None
        return hit if hit is not None else create(token)

    def run() -> Created:
        hit = found()
        if hit is not None:
            return hit
        deadline = time.monotonic() + FLEET_WAIT_SHARE * wait
        token = os.urandom(16)
        waited = False
        pause = POLL_FIRST
        while True:
            try:
                got = tier.claim(name, token, LEASE)
                if got:
                    out = claimed_run(token)
                    tier.unclaim(name, token)  # after the share: waiters that see it gone find the record
                    return out
            except BaseException:
                tier.unclaim(name, token)
                raise
            if got is None:  # Redis cannot say: the node's claim is all there is
                return create(None)
            if not waited:
                waited = True
                tier.count("fleet_waits")
            while True:  # another node creates it: wait for its claim to go (its record lands first)
                if time.monotonic() + pause > deadline:
                    log.warning("fleet claim on %r held past the wait; creating it here", name)
                    tier.count("fleet_takeovers")
                    return create(None)
                time.sleep(pause)
                pause = min(pause * 2, POLL_MAX)
                polled = tier.claimed(name)
                if polled is None:
                    return create(None)
                held, there = polled
                if there:  # shared (even if its holder's release is late or lost)
                    hit = found()
                    if hit is not None:
                        return hit
                if not held:
                    break  # gone without a record: claim it (the look after the claim sees a late one)

    return run
