"""The remote tier: records shared across nodes through Redis or Redis Cluster (redis-py).

``RemoteTier(url)`` with ``url`` one of::

    redis://[:password@]host:port/db      rediss://...  (TLS)      unix:///path/redis.sock[?db=n]
    redis+cluster://[:password@]host:port[,host:port...]  (redis-py's RedisCluster; rediss+cluster: TLS)

``get(name)`` returns the record's bytes or None; ``put(name, data)`` writes it and returns
whether it was written. Names are record names (``layer_id + b"_" + kind``, names.record_name);
keys are ``prefix + name`` (default prefix ``nvcache:``); values are remoterecords.py's format
(stored form, checksum, name, and with a key a BLAKE2b tag). TTL: none by default, so records
stay until the server's ``maxmemory-policy`` evicts them: run the server with ``maxmemory`` set
and ``maxmemory-policy allkeys-lru`` (with ``noeviction``, a full server refuses writes: puts are
skipped, reads go on).

**Faults never reach the caller.** Every call is bounded by the socket timeouts (``timeout``,
default 0.2 s, for connecting and for each reply) and redis-py's own retries are switched off,
so one call waits at most about one timeout (cluster: the redirect it follows). These end as a
miss or a skipped write, counted in ``remote_errors`` and logged once per state change:

* ``redis.exceptions.RedisError``: ConnectionError (refused, reset, AUTH failed), TimeoutError
  (a stopped server), ResponseError (``OOM command not allowed``, ``READONLY``, ``MISCONF``,
  ``CLUSTERDOWN``, a MOVED that redis-py could not follow), every ClusterError;
* ``redis.exceptions.RedisClusterException`` (not a RedisError: no node reachable at start,
  slots not covered) and ``OSError`` (a socket error redis-py did not wrap);
* anything else raised inside a call (a bug here or in redis-py) is also caught and counted,
  logged with its traceback once: the tier is an optimisation, and a scanner must not fail
  because of it.

**Circuit breaker.** A fault opens a breaker: for ``backoff`` seconds (default 1 s) calls skip
the server (``remote_skipped``, about a microsecond each); then one call is let through as a
probe (the others keep skipping); its success closes the breaker, its failure doubles the
backoff, up to ``max_backoff`` (default 30 s). Reads and writes have one breaker each: a
connection-level fault opens both, a refused write (ResponseError: a full or read-only server)
only the write breaker, so a full server still serves reads.

**Bad values** (remoterecords.BadValue: bad tag, wrong name, bad checksum, truncated) are a
miss, counted in ``remote_rejected``, logged (with the reason, for the first few) and deleted
from the server, but only if the key still holds those same bytes (a Lua compare-and-delete),
so a good value another node wrote meanwhile stays.

Writes are synchronous: a put waits for the server's reply (about 50 µs on a local server,
bench/remote.py), never longer than the timeout, and nothing runs in the background (nothing
to restart after a fork, nothing lost at exit). redis-py's connection pools notice a fork and
reconnect in the child.
"""

from __future__ import annotations

import logging
import os
import itertools
import math
import threading
import time
import weakref
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, TypeVar
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException, RedisError, ResponseError
from redis.retry import Retry

from .arguments import as_record, cluster_nodes, redact, remote_url
from .fallback import REMOTE_TALLY
from .remoterecords import BadValue, KeyLike, TooLarge, decode_value, encode_value, make_key

log = logging.getLogger("nvcache.remote")

T = TypeVar("T")

DEFAULT_PREFIX = "nvcache:"
DEFAULT_TIMEOUT = 0.2
DEFAULT_BACKOFF = 1.0
DEFAULT_MAX_BACKOFF = 30.0
DEFAULT_MAX_RECORD = 64 << 20  # larger records are not shared (a value is one Redis string)
_LOGGED_REJECTS = 10  # bad values logged one by one; after that, counted only

# Faults of the server or the path to it (see the module docstring).
FAULTS: Tuple[type, ...] = (RedisError, RedisClusterException, OSError)

# Delete the key only if it still holds the bad value read: a good value written meanwhile stays.
# (Also lets go of a fleet claim: only the token that took it can delete it.)
_DELETE_IF_SAME = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
# Extend a fleet claim's lease, only while this token still holds it.
_RENEW_IF_SAME = ("if redis.call('GET', KEYS[1]) == ARGV[1] then "
                  "return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0")
# A claim's key: a record name never holds a space (names.py), so no record key can be one.
_CLAIM = b"claim "
COUNTERS = REMOTE_TALLY  # the names of the counters, as the cache file's tally keeps them


class _Busy(Exception):
    """Another thread is making the client (RemoteTier._get_client)."""


class Breaker:
    """Closed (calls go through) or open until a time (calls skip, then one probe goes through)."""

    def __init__(self, what: str, backoff: float, max_backoff: float) -> None:
        self.what = what
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._wait = backoff  # the next opening's length: doubles while probes fail
        self.until = 0.0  # 0: closed; else the monotonic time until which calls skip (then a probe)
        self._probing = False  # a probe was let through and has not answered yet
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self.until != 0.0

    def admit(self) -> bool:
        """Whether a call may go to the server now."""
        if not self.until:  # closed: the hot path takes no lock
            return True
        with self._lock:
            now = time.monotonic()
            if not self.until:
                return True
            if now < self.until:
                return False
            # This call is the probe; the others skip until it has failed or succeeded.
            self.until = now + self._wait
            self._probing = True
            return True

    def failed(self, reason: str) -> None:
        """A call failed. Closed: open for ``backoff``. Open: only the probe's failure doubles the
        wait; calls that were let through before it opened (several threads meeting one stall)
        leave it as it is, so one blip costs one backoff, not ``max_backoff``."""
        with self._lock:
            opening = not self.until
            probe = self._probing
            if opening:
                self._wait = self.backoff
            elif probe:
                self._wait = min(self._wait * 2, self.max_backoff)
            else:
                return
            self._probing = False
            self.until = time.monotonic() + self._wait
            wait = self._wait
        if opening:
            log.warning("remote tier: %s fail (%s); skipped for %.1f s, then probed", self.what, reason, wait)
        else:
            log.debug("remote tier: %s probe failed (%s); skipped for %.1f s", self.what, reason, wait)

    def succeeded(self) -> None:
        if not self.until:
            return
        with self._lock:
            was_open = bool(self.until)
            self.until = 0.0
            self._probing = False
            self._wait = self.backoff
        if was_open:
            log.warning("remote tier: %s work again", self.what)


def _retry_none() -> Retry:
    # redis-py (>= 6) retries a failed command 3 times with backoff by default: that would
    # multiply the bounded latency of a dead server by four. The breaker decides when to retry.
    return Retry(NoBackoff(), 0)


def connect(url: str, timeout: float, password: Optional[str] = None) -> Any:
    """A redis-py client for ``url`` (RedisCluster connects at once and may raise a FAULT)."""
    common: Dict[str, Any] = dict(socket_timeout=timeout, socket_connect_timeout=timeout,
                                  retry=_retry_none(), health_check_interval=0)
    if password is not None:
        common["password"] = password
    scheme = remote_url(url).split("://", 1)[0].lower()
    if scheme in ("redis+cluster", "rediss+cluster"):
        parts = urlsplit(url)
        nodes = [ClusterNode(host, port) for host, port in cluster_nodes(url)]
        if parts.password is not None and password is None:
            common["password"] = unquote(parts.password)
        if parts.username:
            common["username"] = unquote(parts.username)
        return RedisCluster(startup_nodes=nodes, ssl=scheme.startswith("rediss"),
                            require_full_coverage=False, **common)
    return redis.Redis.from_url(url, **common)


# Every tier of this process: a forked child gets new locks (one may have been held by a thread
# that does not exist in the child); redis-py's pools notice the fork themselves.
_tiers: "weakref.WeakSet[RemoteTier]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for tier in list(_tiers):
        tier._new_locks()
        tier._new_counts()  # the parent's counts are the parent's to write into its tally


os.register_at_fork(after_in_child=_after_fork_in_child)


class RemoteTier:
    """Records shared through one Redis (or Redis Cluster); every call is safe to make."""

    def __init__(self, url: str, *, key: Optional[KeyLike] = None, prefix: str = DEFAULT_PREFIX,
                 ttl: Optional[float] = None, timeout: float = DEFAULT_TIMEOUT,
                 backoff: float = DEFAULT_BACKOFF, max_backoff: float = DEFAULT_MAX_BACKOFF,
                 max_record: int = DEFAULT_MAX_RECORD, password: Optional[str] = None) -> None:
        remote_url(url)  # TypeError / ValueError now, naming the URL without its password
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be str, not {type(prefix).__name__}")
        for what, value in (("ttl", ttl), ("timeout", timeout), ("backoff", backoff), ("max_backoff", max_backoff)):
            if value is None and what == "ttl":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{what} must be a number of seconds, not {type(value).__name__}")
            if not 0 < value < 1e9:
                raise ValueError(f"{what} must be a positive, finite number of seconds, got {value!r}")
        if backoff > max_backoff:
            raise ValueError(f"backoff ({backoff}) must not exceed max_backoff ({max_backoff})")
        self.url = url
        self.key = make_key(key)
        self.prefix = prefix.encode("utf-8")
        self.ttl_ms = int(ttl * 1000) if ttl is not None else None
        self.timeout = timeout
        self.max_record = max_record
        self._password = password
        self.reads = Breaker("reads", backoff, max_backoff)
        self.writes = Breaker("writes", backoff, max_backoff)
        self._client: Any = None
        self._new_locks()
        _tiers.add(self)
        self._unexpected_logged = False
        self.last_error: Optional[str] = None  # the last fault, "Type: message" (for tools to report)
        self._new_counts()

    def __repr__(self) -> str:
        return f"<RemoteTier {redact(self.url)} prefix={self.prefix!r} keyed={self.key is not None}>"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, **kwargs: Any) -> Optional["RemoteTier"]:
        """The tier ``NVCACHE_REMOTE`` names (None when unset or empty), keyed by
        ``NVCACHE_REMOTE_KEY`` when set; ``NVCACHE_REMOTE_PREFIX`` and ``NVCACHE_REMOTE_TTL``
        (seconds) when set. Keyword arguments win over the environment."""
        url = environ.get("NVCACHE_REMOTE", "")
        if not url:
            return None
        if environ.get("NVCACHE_REMOTE_KEY"):
            kwargs.setdefault("key", environ["NVCACHE_REMOTE_KEY"])
        if environ.get("NVCACHE_REMOTE_PREFIX"):
            kwargs.setdefault("prefix", environ["NVCACHE_REMOTE_PREFIX"])
        if environ.get("NVCACHE_REMOTE_TTL"):
            raw = environ["NVCACHE_REMOTE_TTL"]
            try:
                ttl = float(raw)
            except ValueError:
                ttl = math.nan
            if not 0 < ttl < 1e9:
                raise ValueError(f"NVCACHE_REMOTE_TTL must be a positive, finite number of seconds, got {raw!r}")
            kwargs.setdefault("ttl", ttl)
        return cls(url, **kwargs)

    # -- plumbing ------------------------------------------------------------------------
    def _new_counts(self) -> None:
        self.counts: Dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._untaken: Dict[str, int] = dict.fromkeys(COUNTERS, 0)  # not yet in a cache's tally
        self._skip_ticks = itertools.count()  # see _fold_skips
        self.skipped_read = self._skip_ticks.__next__  # count one read skipped (no lock: C-level next)
        self._skip_folds = self._skips_folded = 0

    def _new_locks(self) -> None:
        self._attempt: Optional[threading.Event] = None  # set when the client being made is ready
        self._client_lock = threading.Lock()
        self._counts_lock = threading.Lock()
        self.reads._lock = threading.Lock()
        self.writes._lock = threading.Lock()

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name`` (one of COUNTERS)."""
        with self._counts_lock:
            self.counts[name] += n
            self._untaken[name] += n

    def _fold_skips(self) -> None:
        """Add the reads :meth:`skipping_reads` skipped to the counters (under the counts lock).
        Those are counted by ``next()`` on an itertools.count, atomic under the GIL and without
        a lock, since that check is all a miss pays while Redis is down; each fold takes one
        number of the count too, so skips = the number drawn - folds before it."""
        drawn = next(self._skip_ticks)
        skips = drawn - self._skip_folds
        self._skip_folds += 1
        new, self._skips_folded = skips - self._skips_folded, skips
        self.counts["remote_skipped"] += new
        self._untaken["remote_skipped"] += new

    def stats(self) -> Dict[str, int]:
        """This tier's counters since it was made (this process only)."""
        with self._counts_lock:
            self._fold_skips()
            return dict(self.counts)

    def take_counts(self) -> Dict[str, int]:
        """What the counters gained since the last take (for a cache's tally); zeros them."""
        with self._counts_lock:
            self._fold_skips()
            taken, self._untaken = self._untaken, dict.fromkeys(COUNTERS, 0)
        return taken

    def give_back(self, taken: Dict[str, int]) -> None:
        """Undo :meth:`take_counts` (the tally could not be written): counted at the next take."""
        with self._counts_lock:
            for name, n in taken.items():
                self._untaken[name] += n

    def _get_client(self) -> Any:
        """The client, made by one thread at a time outside the lock (a cluster client connects
        to its startup nodes in turn): the others wait for that attempt up to ``timeout`` and
        then skip (_Busy) rather than queue behind it or connect again themselves."""
        client = self._client
        if client is not None:
            return client
        with self._client_lock:
            if self._client is not None:
                return self._client
            attempt, mine = self._attempt, self._attempt is None
            if mine:
                attempt = self._attempt = threading.Event()
        assert attempt is not None
        if not mine:
            if not attempt.wait(self.timeout) or self._client is None:
                raise _Busy()
            return self._client
        try:
            client = connect(self.url, self.timeout, self._password)
            self._client = client
            return client
        finally:
            with self._client_lock:
                self._attempt = None
            attempt.set()

    def _call(self, breaker: Breaker, op: Callable[[Any], T], writing: bool,
              admitted: bool = False) -> Tuple[bool, Optional[T]]:
        """(True, op's result) or (False, None) when skipped or failed; never raises.
        ``admitted``: the caller already had the breaker's admission (it may be the probe)."""
        if not admitted and not breaker.admit():
            self.count("remote_skipped")
            return False, None
        try:
            result = op(self._get_client())
        except _Busy:  # another thread is connecting: skipped, not failed
            self.count("remote_skipped")
            return False, None
        except FAULTS as exc:
            self._failed(exc, writing)
            return False, None
        except Exception as exc:  # noqa: BLE001 - see the module docstring: never reach the scanner
            if not self._unexpected_logged:
                self._unexpected_logged = True
                log.exception("remote tier: unexpected %s", type(exc).__name__)
            self._failed(exc, writing)
            return False, None
        breaker.succeeded()
        if writing:  # a write that went through proves the connection too
            self.reads.succeeded()
        return True, result

    def _failed(self, exc: BaseException, writing: bool) -> None:
        self.count("remote_errors")
        reason = f"{type(exc).__name__}: {exc}".replace(self.url, redact(self.url))[:300]
        self.last_error = reason
        if writing and isinstance(exc, ResponseError):
            # The server answered and refused the write (full, read-only): reads may still work.
            self.writes.failed(reason)
            return
        self.writes.failed(reason)
        self.reads.failed(reason)
        if isinstance(exc, RedisClusterException):
            # A client that could not learn the slots is remade on the next probe.
            with self._client_lock:
                self._client = None

    # -- the tier ---------------------------------------------------------------------------
    def get(self, name: bytes) -> Optional[bytes]:
        """Record ``name``'s bytes from the server, or None (absent, rejected, skipped, a fault)."""
        key = self.prefix + name
        ok, value = self._call(self.reads, lambda c: c.get(key), writing=False)
        if not ok:
            return None
        if value is None:
            self.count("remote_misses")
            return None
        try:
            data = decode_value(name, value, self.key, self.max_record)
        except TooLarge:  # a good value, larger than this tier takes: a miss, left for the others
            self.count("remote_misses")
            return None
        except BadValue as exc:
            self._reject(key, value, str(exc))
            return None
        self.count("remote_hits")
        return data

    def _reject(self, key: bytes, value: bytes, reason: str) -> None:
        self.count("remote_misses")
        self.count("remote_rejected")
        if self.stats()["remote_rejected"] <= _LOGGED_REJECTS:
            log.warning("remote tier: rejected the value of %r: %s; deleting it", key[:200], reason)
        self._call(self.writes, lambda c: c.eval(_DELETE_IF_SAME, 1, key, value), writing=True)

    def put(self, name: bytes, data: Any) -> bool:
        """Write record ``name`` (its bytes ``data``); whether it was written."""
        data = as_record(data)  # a memoryview's bytes, whatever its shape: its length is theirs
        if len(data) > self.max_record:
            self.count("remote_skipped")
            return False
        if not self.writes.admit():  # encode nothing for a write that will be skipped
            self.count("remote_skipped")
            return False
        return self._set(name, encode_value(name, data, self.key), admitted=True)

    def _set(self, name: bytes, value: bytes, admitted: bool) -> bool:
        key = self.prefix + name
        ttl = self.ttl_ms
        ok, _ = self._call(self.writes, lambda c: c.set(key, value, px=ttl), writing=True, admitted=admitted)
        if ok:
            self.count("remote_puts")
        return ok

    def clear(self) -> Optional[int]:
        """Delete every key under this tier's prefix (records and claims, in batches of SCAN);
        how many, or None when the server could not be asked. Every node's records go."""
        pattern = b"".join(b"\\" + bytes([c]) if c in b"*?[]\\" else bytes([c]) for c in self.prefix) + b"*"

        def op(client: Any) -> int:
            removed, batch = 0, []
            for key in client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    removed += int(client.unlink(*batch))
                    batch = []
            return removed + (int(client.unlink(*batch)) if batch else 0)
        ok, removed = self._call(self.writes, op, writing=True)
        return removed if ok else None

    def delete(self, name: bytes) -> bool:
        """Remove record ``name`` from the server; whether the call went through. Sent even while
        the write breaker is open (one bounded call): a withdrawn record must not come back."""
        key = self.prefix + name
        return self._call(self.writes, lambda c: c.delete(key), writing=True, admitted=True)[0]

    # -- fleet claims (see nvcache.fleet) ------------------------------------------------------
    def claim(self, name: bytes, token: bytes, lease_s: float) -> Optional[bool]:
        """Claim ``name`` for ``lease_s`` seconds (SET NX PX): True when this token took it, False
        when another holds it, None when the server could not say (skipped or a fault)."""
        key = self.prefix + _CLAIM + name
        ms = max(1, int(lease_s * 1000))
        ok, got = self._call(self.writes, lambda c: c.set(key, token, nx=True, px=ms), writing=True)
        return bool(got) if ok else None

    def renew(self, name: bytes, token: bytes, lease_s: float) -> Optional[bool]:
        """Extend the claim ``token`` holds on ``name`` by ``lease_s``: True when it still held it,
        False when it is lost (expired, or another's), None when the server could not say (a fault;
        sent even while the write breaker is open, so the holder can tell "lost" from "unknown")."""
        key = self.prefix + _CLAIM + name
        ms = max(1, int(lease_s * 1000))
        ok, got = self._call(self.writes, lambda c: c.eval(_RENEW_IF_SAME, 1, key, token, ms), writing=True,
                             admitted=True)
        return bool(got) if ok else None

    def unclaim(self, name: bytes, token: bytes) -> None:
        """Let go of the claim ``token`` holds on ``name`` (another token's claim stays). Sent even
        while the write breaker is open: one bounded call, where a lost release would make every
        other node wait out the lease."""
        key = self.prefix + _CLAIM + name
        self._call(self.writes, lambda c: c.eval(_DELETE_IF_SAME, 1, key, token), writing=True, admitted=True)

    def claimed(self, name: bytes) -> Optional[Tuple[bool, bool]]:
        """(whether anyone holds a claim on ``name``, whether its record is there), in one round
        trip; None when the server could not say."""
        claim, record = self.prefix + _CLAIM + name, self.prefix + name

        def ask(client: Any) -> Tuple[bool, bool]:
            pipe = client.pipeline(transaction=False)  # two slots in a cluster: no MULTI
            pipe.exists(claim)
            pipe.exists(record)
            held, there = pipe.execute()
            return bool(held), bool(there)
        ok, got = self._call(self.reads, ask, writing=False)
        return got if ok else None

    def skipping_reads(self) -> bool:
        """Whether the read breaker is open and it is not yet time to probe: the caller then
        skips the tier at once (counted as skipped, without a lock), building no call to make."""
        until = self.reads.until
        if not until or time.monotonic() >= until:
            return False
        self.skipped_read()
        return True

    def info(self) -> Dict[str, Any]:
        """The server's figures: ``keys`` (all keys of the database; a cluster: of every master),
        ``used_memory``, ``maxmemory`` (bytes, summed over masters), ``maxmemory_policy`` and
        ``masters``; {} when the server could not be asked (skipped or a fault)."""
        def ask(client: Any) -> Dict[str, Any]:
            if isinstance(client, RedisCluster):  # asked of every master: {"host:port": {...}}, a sum
                memory = client.info("memory", target_nodes=RedisCluster.PRIMARIES)
                keys = client.dbsize(target_nodes=RedisCluster.PRIMARIES)
                masters = [v for v in memory.values() if isinstance(v, dict)] or [memory]  # 1 master: flat
                policy = sorted({str(v.get("maxmemory_policy", "?")) for v in masters})
                return dict(keys=int(keys), used_memory=sum(int(v.get("used_memory", 0)) for v in masters),
                            maxmemory=sum(int(v.get("maxmemory", 0)) for v in masters),
                            maxmemory_policy=",".join(policy), masters=len(masters))
            memory, keys = client.info("memory"), client.dbsize()
            return dict(keys=int(keys), used_memory=int(memory.get("used_memory", 0)),
                        maxmemory=int(memory.get("maxmemory", 0)),
                        maxmemory_policy=str(memory.get("maxmemory_policy", "?")), masters=1)
        ok, got = self._call(self.reads, ask, writing=False)
        return got if ok and got is not None else {}

    def close(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing a dead connection must not raise either
                pass
