"""Side-by-side benchmark of nvcache against its peers, in one run on one machine.

Peers (same operations, same keys, same record bytes):

* ``nvcache``            - LayerCache with the compiled core (``nvcache._index``);
* ``nvcache-py``         - LayerCache bound to the pure-Python twin (``nvcache.fallback``);
* ``nvcache-lrfu``       - LayerCache with the compiled core and ``policy="lrfu"`` (issue 15's target:
                           its put and get within 10 % of ``nvcache``'s, the LRU cache);
* ``lmdb``               - raw py-lmdb, LMDB's default locking (``lock=True``): read txn + get,
                           write txn + put; the floor;
* ``lmdb-nolock``        - raw py-lmdb opened with ``lock=False`` and no other lock (one process only:
                           it is unsafe with concurrent writers);
* ``lmdb-nolock+flock``  - ``lock=False`` guarded by a flock shared/exclusive per transaction: nvcache's
                           locking design without nvcache's Python layers;
* ``diskcache-lru``      - diskcache.Cache(eviction_policy="least-recently-used");
* ``diskcache-default``  - diskcache.Cache with its default policy (least-recently-stored);
* ``seed-json``          - bench/seedcache.py, the seed scanner's JSON-index design (the anchor).

Single-process operations at each size N: open, get-hit, get-miss, put-new,
put-evict (a put into a full cache: each put evicts), delete, dump
(``cache_data()``; the seed's equivalent; a cursor walk for raw LMDB).
Multi-process: diskcache's own benchmark workload (90% get / 9% set / 1% delete
over 100 keys) and a layer-scan workload (images sharing base layers, Zipf
popularity, mixed record sizes, bounded cache), each with 1 and 8 processes.
Also: per-process heap growth vs N (fresh subprocess per probe) and a long
mixed-size churn (bench/churn.py).

Every operation is timed on its own with ``time.perf_counter_ns``; results are
median / p90 / p99 / max / ops/s (ops/s = 1 / mean latency), each also as a
ratio to nvcache (peer / nvcache of the same statistic).

Run::

    .venv/bin/python bench/compare.py                 # default sizes 10k,100k,1M; ~10-14 min
    .venv/bin/python bench/compare.py --quick         # ~1 minute smoke run -> bench/results/quick/
    .venv/bin/python bench/compare.py --sizes 10000,100000 --procs 1,4 --peers nvcache,lmdb
    .venv/bin/python bench/compare.py --report-only   # re-render Markdown/plots from results.json

Output: ``bench/results/results.md``, ``results.json`` and ``*.png``.
"""

from __future__ import annotations

import argparse
import array
import bisect
import contextlib
import datetime
import fcntl
import gc
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import deque
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import churn  # noqa: E402
from seedcache import SeedCache  # noqa: E402

MiB = 1 << 20
KIND = "layer_file"
PEERS = ["nvcache", "nvcache-py", "nvcache-lrfu", "lmdb", "lmdb-nolock", "lmdb-nolock+flock",
         "diskcache-lru", "diskcache-default", "seed-json"]
MP_PEERS = [p for p in PEERS if p != "lmdb-nolock"]  # lock=False without a lock is unsafe with writers
OPS = ["open", "get-hit", "get-miss", "put-new", "put-evict", "delete", "dump"]
REF = "nvcache"
LMDB_MAP = 64 << 30
pc = time.perf_counter_ns


# ----------------------------------------------------------------------------- data
def layer_id(i: int) -> str:
    """A deterministic, realistic layer digest for record number ``i``."""
    return "sha256:" + hashlib.sha256(i.to_bytes(8, "little")).hexdigest()


_PKGS = ["openssl", "glibc", "zlib", "busybox", "libxml2", "curl", "python3", "openjdk", "nodejs",
         "log4j-core", "jackson-databind", "bash", "sqlite", "expat", "ncurses", "pcre2"]
_SEV = ["Low", "Medium", "High", "Critical"]


def scan_text(rng: random.Random, size: int) -> bytes:
    """``size`` bytes of JSON-like scan findings (compressible like real records)."""
    parts: List[str] = []
    n = 0
    while n < size:
        s = json.dumps({"name": f"CVE-{rng.randint(2000, 2025)}-{rng.randint(1000, 99999)}",
                        "package": rng.choice(_PKGS),
                        "version": f"{rng.randint(0, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 99)}",
                        "fixed": f"{rng.randint(0, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 99)}",
                        "severity": rng.choice(_SEV), "score": round(rng.uniform(0, 10), 1),
                        "file": f"/usr/lib/{rng.choice(_PKGS)}/{rng.randint(0, 999)}.so"})
        parts.append(s)
        n += len(s) + 1
    return ("[" + ",".join(parts) + "]").encode()[:size]


def payloads(size: int, count: int = 4096, seed: int = 11, kind: str = "json") -> List[bytes]:
    """``count`` records of ``size`` bytes: JSON-like scan text (compresses about 4x with zstd), or
    random bytes (``kind="random"``: incompressible, stored raw). Record i gets payload i % count:
    4,096 distinct ones (8 MiB at 2 KiB), more than a compression dictionary (64 KiB) can learn
    by heart, so that neither kind compresses better than unrepeated records would."""
    rng = random.Random(seed)
    if kind == "random":
        return [rng.randbytes(size) for _ in range(count)]
    return [scan_text(rng, size) for _ in range(count)]


# ----------------------------------------------------------------------------- peers
class Peer:
    """One system under test, with a uniform set of operations; keys are layer ids (str)."""

    name = "?"
    dump_label = "dump"

    def __init__(self, path: str) -> None:
        self.path = path

    def key(self, lid: str) -> Any:
        return lid

    def create(self, bound: int) -> None:
        raise NotImplementedError

    def open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def populate(self, items: Iterable[Tuple[str, bytes]]) -> None:
        put = self.putter()
        for lid, data in items:
            put(self.key(lid), data)

    def settle(self) -> None:
        """Between phases: write anything buffered, so one phase's debt is not billed to the next."""

    def getter(self) -> Callable[[Any], Any]:
        raise NotImplementedError

    def putter(self) -> Callable[[Any, bytes], Any]:
        raise NotImplementedError

    def scan_putter(self) -> Callable[[Any, bytes, Any], Any]:
        """put(key, data, keep_layer_ids) for the layer-scan workload."""
        put = self.putter()
        return lambda k, d, keep: put(k, d)

    def deleter(self) -> Callable[[Any], Any]:
        raise NotImplementedError

    def dumper(self) -> Optional[Callable[[], Any]]:
        return None

    def make_full(self) -> None:
        """Configure the store so that every further put evicts."""

    def evict_putter(self) -> Callable[[Any, bytes], Any]:
        return self.putter()

    def count(self) -> int:
        return -1


class NvPeer(Peer):
    dump_label = "cache_data()"

    def __init__(self, path: str, core: str, policy: str = "lru") -> None:
        super().__init__(path)
        self.name = ("nvcache" if core == "ext" else "nvcache-py") + ("" if policy == "lru" else f"-{policy}")
        self.core_name = core
        self.policy = policy
        self.cls = churn.cache_class(core)
        self.max_mb = 1024.0
        self.cache: Any = None

    def create(self, bound: int) -> None:
        self.max_mb = bound / MiB
        self.open()

    def open(self) -> None:
        self.cache = self.cls(self.path, self.max_mb, policy=self.policy)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
            self.cache = None

    def populate(self, items: Iterable[Tuple[str, bytes]]) -> None:
        """Bulk fill through the core's own insert, 10k records per write transaction.

        Falls back to the public put() when the store internals changed.
        """
        cache = self.cache
        core = self.cls._core
        batch: List[Tuple[str, bytes]] = []

        def flush_batch() -> None:
            try:
                cache._opened().write(_nv_bulk_insert, list(batch), cache.max_bytes, core)
            except (AttributeError, TypeError):
                for lid, data in batch:
                    cache.put(lid, data)
            batch.clear()

        for item in items:
            batch.append(item)
            if len(batch) >= 10000:
                flush_batch()
        if batch:
            flush_batch()

    def settle(self) -> None:
        self.cache.flush()

    def getter(self) -> Callable[[Any], Any]:
        return self.cache.get

    def putter(self) -> Callable[[Any, bytes], Any]:
        return self.cache.put

    def scan_putter(self) -> Callable[[Any, bytes, Any], Any]:
        put = self.cache.put
        return lambda k, d, keep: put(k, d, KIND, keep)

    def deleter(self) -> Callable[[Any], Any]:
        return self.cache.delete

    def dumper(self) -> Optional[Callable[[], Any]]:
        return self.cache.cache_data

    def make_full(self) -> None:
        total = int(self.cache.stats()["record_total_size"])
        self.close()
        self.max_mb = total / MiB  # exactly full: the next put evicts (records are equal-sized)
        self.open()

    def count(self) -> int:
        return len(self.cache)


def _nv_bulk_insert(index: Any, txn: Any, batch: List[Tuple[str, bytes]], max_bytes: int, core: Any) -> None:
    empty: frozenset = frozenset()
    for lid, data in batch:
        name, n = core.record_name(lid, KIND)
        index.insert(txn, core.name_key(name), name, n, data, index.victims(txn, len(data), max_bytes, empty))


class LmdbPeer(Peer):
    """Raw py-lmdb: the floor. Keys are the layer id's bytes; no bound, no LRU bookkeeping."""

    dump_label = "cursor walk (key, len)"

    def __init__(self, path: str, lock: bool, flock: bool) -> None:
        super().__init__(path)
        self.lock = lock
        self.flock = flock
        self.name = "lmdb" if lock else ("lmdb-nolock+flock" if flock else "lmdb-nolock")
        self.env: Any = None
        self.fd = -1
        self.order: deque = deque()

    def key(self, lid: str) -> Any:
        return lid.encode()

    def create(self, bound: int) -> None:
        os.makedirs(self.path, exist_ok=True)
        self.open()

    def open(self) -> None:
        import lmdb

        self.env = lmdb.open(self.path, map_size=LMDB_MAP, lock=self.lock, sync=False, metasync=False,
                             readahead=False, max_spare_txns=4)
        if self.flock:
            self.fd = os.open(os.path.join(self.path, "flock"), os.O_RDWR | os.O_CREAT, 0o644)

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def populate(self, items: Iterable[Tuple[str, bytes]]) -> None:
        it = iter(items)
        while True:
            n = 0
            with self.env.begin(write=True) as txn:
                for lid, data in it:
                    k = lid.encode()
                    txn.put(k, data)
                    self.order.append(k)
                    n += 1
                    if n >= 10000:
                        break
            if n < 10000:
                return

    def getter(self) -> Callable[[Any], Any]:
        begin = self.env.begin
        if not self.flock:
            def get(k: bytes) -> Any:
                txn = begin()
                v = txn.get(k)
                txn.abort()
                return v
            return get
        fd, flock, SH, UN = self.fd, fcntl.flock, fcntl.LOCK_SH, fcntl.LOCK_UN

        def get_locked(k: bytes) -> Any:
            flock(fd, SH)
            try:
                txn = begin()
                v = txn.get(k)
                txn.abort()
                return v
            finally:
                flock(fd, UN)
        return get_locked

    def _writer(self, body: Callable[[Any, Any, Any], Any]) -> Callable[..., Any]:
        begin = self.env.begin

        def write(k: Any, v: Any = None) -> Any:
            txn = begin(write=True)
            try:
                r = body(txn, k, v)
            except BaseException:
                txn.abort()
                raise
            txn.commit()
            return r
        if not self.flock:
            return write
        fd, flock, EX, UN = self.fd, fcntl.flock, fcntl.LOCK_EX, fcntl.LOCK_UN

        def write_locked(k: Any, v: Any = None) -> Any:
            flock(fd, EX)
            try:
                return write(k, v)
            finally:
                flock(fd, UN)
        return write_locked

    def putter(self) -> Callable[[Any, bytes], Any]:
        return self._writer(lambda txn, k, v: txn.put(k, v))

    def deleter(self) -> Callable[[Any], Any]:
        return self._writer(lambda txn, k, v: txn.delete(k))

    def evict_putter(self) -> Callable[[Any, bytes], Any]:
        """One in, one out: put the new key and delete the oldest inserted one, in one write txn."""
        order = self.order

        def body(txn: Any, k: bytes, v: bytes) -> Any:
            txn.put(k, v)
            while order and not txn.delete(order.popleft()):
                pass
            order.append(k)
        return self._writer(body)

    def dumper(self) -> Optional[Callable[[], Any]]:
        env = self.env

        def dump() -> Any:
            with env.begin(buffers=True) as txn:
                return [(bytes(k), len(v)) for k, v in txn.cursor()]
        return dump

    def count(self) -> int:
        return int(self.env.stat()["entries"])


class DiskcachePeer(Peer):
    def __init__(self, path: str, policy: str) -> None:
        super().__init__(path)
        self.policy = policy
        self.name = "diskcache-lru" if policy == "least-recently-used" else "diskcache-default"
        self.cache: Any = None
        self.size_limit = 1 << 40

    def create(self, bound: int) -> None:
        self.size_limit = bound
        self.open()

    def open(self) -> None:
        import diskcache

        kw: Dict[str, Any] = {}
        if self.policy == "least-recently-used":
            kw["eviction_policy"] = self.policy
        self.cache = diskcache.Cache(self.path, size_limit=self.size_limit, **kw)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
            self.cache = None

    def populate(self, items: Iterable[Tuple[str, bytes]]) -> None:
        it = iter(items)
        cache = self.cache
        while True:
            n = 0
            with cache.transact():
                for lid, data in it:
                    cache.set(lid, data)
                    n += 1
                    if n >= 10000:
                        break
            if n < 10000:
                return

    def getter(self) -> Callable[[Any], Any]:
        return self.cache.get

    def putter(self) -> Callable[[Any, bytes], Any]:
        return self.cache.set

    def deleter(self) -> Callable[[Any], Any]:
        return self.cache.delete

    def make_full(self) -> None:
        # diskcache bounds the SQLite file's volume, which never shrinks: with the limit at 0 and
        # cull_limit 1 every set evicts exactly one entry (its default, 10, would evict ten).
        self.size_limit = 0
        self.cache.reset("size_limit", 0)
        self.cache.reset("cull_limit", 1)

    def count(self) -> int:
        return len(self.cache)


class SeedPeer(Peer):
    dump_label = "cache_data() (parse index)"
    name = "seed-json"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.max_mb = 1 << 20
        self.cache: Optional[SeedCache] = None

    def create(self, bound: int) -> None:
        self.max_mb = bound / MiB
        self.open()

    def open(self) -> None:
        self.cache = SeedCache(self.path, self.max_mb)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
            self.cache = None

    def populate(self, items: Iterable[Tuple[str, bytes]]) -> None:
        assert self.cache is not None
        self.cache.bulk_load(items)

    def getter(self) -> Callable[[Any], Any]:
        assert self.cache is not None
        return self.cache.get

    def putter(self) -> Callable[[Any, bytes], Any]:
        assert self.cache is not None
        return self.cache.put

    def scan_putter(self) -> Callable[[Any, bytes, Any], Any]:
        assert self.cache is not None
        put = self.cache.put
        return lambda k, d, keep: put(k, d, KIND, keep)

    def deleter(self) -> Callable[[Any], Any]:
        assert self.cache is not None
        return self.cache.delete

    def dumper(self) -> Optional[Callable[[], Any]]:
        assert self.cache is not None
        return self.cache.cache_data

    def make_full(self) -> None:
        assert self.cache is not None
        total = self.cache.stats()["record_total_size"]
        self.close()
        self.max_mb = total / MiB  # at the bound: the next put prunes (256 records at once)
        self.open()

    def count(self) -> int:
        assert self.cache is not None
        return len(self.cache)


def make_peer(name: str, path: str) -> Peer:
    if name == "nvcache":
        return NvPeer(path, "ext")
    if name == "nvcache-py":
        return NvPeer(path, "py")
    if name == "nvcache-lrfu":
        return NvPeer(path, "ext", "lrfu")
    if name == "lmdb":
        return LmdbPeer(path, lock=True, flock=False)
    if name == "lmdb-nolock":
        return LmdbPeer(path, lock=False, flock=False)
    if name == "lmdb-nolock+flock":
        return LmdbPeer(path, lock=False, flock=True)
    if name == "diskcache-lru":
        return DiskcachePeer(path, "least-recently-used")
    if name == "diskcache-default":
        return DiskcachePeer(path, "least-recently-stored")
    if name == "seed-json":
        return SeedPeer(path)
    raise ValueError(f"unknown peer {name}")


# ----------------------------------------------------------------------------- statistics
def summarize(lat_ns: Sequence[int]) -> Dict[str, Any]:
    """median / p90 / p99 / max / mean (microseconds), ops/s (1 / mean) and a CDF sketch."""
    import numpy as np

    if not len(lat_ns):
        return {"n": 0}
    a = np.asarray(lat_ns, dtype=np.float64) / 1000.0
    qs = [0, 1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9, 100]
    pv = np.percentile(a, qs)
    mean = float(a.mean())
    return {"n": int(a.size), "median": float(pv[5]), "p90": float(pv[7]), "p99": float(pv[9]),
            "max": float(pv[11]), "min": float(pv[0]), "mean": mean,
            "ops_s": 1e6 / mean if mean > 0 else float("inf"),
            "cdf": {str(q): float(v) for q, v in zip(qs, pv)}}


def timer_overhead_ns() -> float:
    import numpy as np

    d = []
    for _ in range(20000):
        t0 = pc()
        d.append(pc() - t0)
    return float(np.median(d))


# ----------------------------------------------------------------------------- single process
class Budget:
    def __init__(self, seconds: float, max_n: int, min_n: int) -> None:
        self.seconds = seconds
        self.max_n = max_n
        self.min_n = min_n


def time_calls1(fn: Callable[[Any], Any], args: Sequence[Any], b: Budget) -> List[int]:
    lat: List[int] = []
    app = lat.append
    deadline = pc() + int(b.seconds * 1e9)
    for a in args[:b.max_n]:
        t0 = pc()
        fn(a)
        t1 = pc()
        app(t1 - t0)
        if t1 > deadline and len(lat) >= b.min_n:
            break
    return lat


def time_calls2(fn: Callable[[Any, Any], Any], args: Sequence[Any], data: Sequence[bytes], b: Budget) -> List[int]:
    lat: List[int] = []
    app = lat.append
    nd = len(data)
    deadline = pc() + int(b.seconds * 1e9)
    for i, a in enumerate(args[:b.max_n]):
        d = data[i % nd]
        t0 = pc()
        fn(a, d)
        t1 = pc()
        app(t1 - t0)
        if t1 > deadline and len(lat) >= b.min_n:
            break
    return lat


def time_calls0(fn: Callable[[], Any], b: Budget) -> List[int]:
    lat: List[int] = []
    deadline = pc() + int(b.seconds * 1e9)
    while len(lat) < b.max_n:
        gc.collect()
        t0 = pc()
        fn()
        t1 = pc()
        lat.append(t1 - t0)
        if t1 > deadline and len(lat) >= b.min_n:
            break
    return lat


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_single(peer_name: str, n: int, root: str, cfg: argparse.Namespace, data: List[bytes],
               results: Dict[str, Any]) -> None:
    """All single-process operations for one peer at one size; appends rows to results['single']."""
    path = os.path.join(root, f"{peer_name}-{n}")
    peer = make_peer(peer_name, path)
    size = cfg.record_size
    rng = random.Random(1000 + n)
    t0 = time.perf_counter()
    # nvcache is bounded at exactly N records (full once populated); the others get a bound they never
    # reach until put-evict, because theirs is not on record bytes (diskcache: SQLite file volume; seed:
    # gzipped size, pruned 256 at a time).
    peer.create(n * size if isinstance(peer, NvPeer) else 1 << 50)
    peer.populate((layer_id(i), data[i % len(data)]) for i in range(n))
    populate_s = time.perf_counter() - t0
    count = peer.count()
    if count not in (-1, n):
        raise RuntimeError(f"{peer_name}: populated {count} records, expected {n}")
    q = cfg.budget
    ops_budget = {
        "open": Budget(q, 20, 3),
        "get-hit": Budget(q, cfg.max_gets, 5),
        "get-miss": Budget(q, cfg.max_gets, 5),
        "dump": Budget(q * 1.5, 10, 3),
        "delete": Budget(q, cfg.max_deletes, 5),
        "put-new": Budget(q, cfg.max_deletes, 5),
        "put-evict": Budget(q, cfg.max_puts, 5),
    }
    out: Dict[str, Any] = {}
    k = peer.key
    # open: close, then time each reopen (the last one stays open)
    peer.settle()
    peer.close()
    lat_open: List[int] = []
    deadline = pc() + int(ops_budget["open"].seconds * 1e9)
    while True:
        gc.collect()
        t_a = pc()
        peer.open()
        t_b = pc()
        lat_open.append(t_b - t_a)
        if len(lat_open) >= ops_budget["open"].max_n or (t_b > deadline and len(lat_open) >= 3):
            break
        peer.close()
    out["open"] = lat_open
    # reads: a short untimed warm-up on other keys first
    hit_keys = [k(layer_id(rng.randrange(n))) for _ in range(cfg.max_gets)]
    warm = [k(layer_id(rng.randrange(n))) for _ in range(min(500, n))]
    get = peer.getter()
    warm_until = pc() + int(min(0.2, q) * 1e9)
    for key in warm:
        get(key)
        if pc() > warm_until:
            break
    peer.settle()
    gc.collect()
    out["get-hit"] = time_calls1(get, hit_keys, ops_budget["get-hit"])
    peer.settle()
    miss_keys = [k(layer_id(10 ** 9 + i)) for i in range(cfg.max_gets)]
    gc.collect()
    out["get-miss"] = time_calls1(get, miss_keys, ops_budget["get-miss"])
    peer.settle()
    dump = peer.dumper()
    if dump is not None:
        out["dump"] = time_calls0(dump, ops_budget["dump"])
    # delete (records outside the get sample, so later peers' semantics do not matter), then put-new
    # exactly as many records as were deleted: the cache returns to full without evicting.
    del_ids = rng.sample(range(n), min(cfg.max_deletes, max(n // 10, 5)))
    gc.collect()
    out["delete"] = time_calls1(peer.deleter(), [k(layer_id(i)) for i in del_ids], ops_budget["delete"])
    peer.settle()
    deleted = len(out["delete"])
    new_keys = [k(layer_id(2 * 10 ** 9 + i)) for i in range(deleted)]
    gc.collect()
    out["put-new"] = time_calls2(peer.putter(), new_keys, data, Budget(q, deleted, 5))
    peer.settle()
    peer.make_full()
    ev_keys = [k(layer_id(3 * 10 ** 9 + i)) for i in range(cfg.max_puts)]
    gc.collect()
    out["put-evict"] = time_calls2(peer.evict_putter(), ev_keys, data, ops_budget["put-evict"])
    peer.settle()
    final_count = peer.count()
    peer.close()
    for op in OPS:
        if op in out:
            row = {"n_records": n, "peer": peer_name, "op": op, **summarize(out[op])}
        else:
            row = {"n_records": n, "peer": peer_name, "op": op, "n": 0,
                   "skipped": "no equivalent operation"}
        results["single"].append(row)
    results["populate"].append({"n_records": n, "peer": peer_name, "seconds": populate_s,
                                "final_count": final_count, "disk_bytes": du(path)})
    med = {op: results["single"][-len(OPS) + i].get("median") for i, op in enumerate(OPS)}
    log(f"  {peer_name:18s} N={n:>8d} populate {populate_s:6.1f}s  " +
        "  ".join(f"{op}={v:.1f}" for op, v in med.items() if v is not None) + " us")
    if peer_name in ("nvcache", "nvcache-py") and cfg.memory:
        results["memory"].append(probe_memory_subprocess(path, "ext" if peer_name == "nvcache" else "py",
                                                         n, size, n * size))
    shutil.rmtree(path, ignore_errors=True)


def du(path: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
    return total


# ----------------------------------------------------------------------------- memory probe
def rss_anon_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return -1


def probe_memory(path: str, core: str, n: int, record_size: int, bound: int, gets: int, puts: int) -> Dict[str, Any]:
    """In a fresh interpreter: open time and anonymous-memory (heap) growth for gets and puts."""
    cls = churn.cache_class(core)
    data = payloads(record_size, 8)
    rng = random.Random(5)
    keys = [layer_id(rng.randrange(n)) for _ in range(gets)]
    new = [layer_id(4 * 10 ** 9 + i) for i in range(puts)]
    gc.collect()
    base = rss_anon_kib()
    t0 = pc()
    cache = cls(path, bound / MiB)
    open_ns = pc() - t0
    after_open = rss_anon_kib()
    t0 = pc()
    first = cache.get(keys[0])
    first_get_ns = pc() - t0
    for key in keys:
        cache.get(key)
    cache.flush()
    gc.collect()
    after_gets = rss_anon_kib()
    for i, lid in enumerate(new):
        cache.put(lid, data[i % len(data)])
    gc.collect()
    after_puts = rss_anon_kib()
    # Python objects only (tracemalloc does not see LMDB's own mallocs, e.g. a write txn's dirty pages)
    import tracemalloc

    tracemalloc.start()
    for key in keys:
        cache.get(key)
    cache.flush()
    py_current, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    cache.close()
    return {"core": core, "n_records": n, "open_ms": open_ns / 1e6, "first_get_us": first_get_ns / 1e3,
            "first_get_hit": first is not None, "gets": gets, "puts": puts,
            "rss_anon_kib": {"before_open": base, "after_open": after_open, "after_gets": after_gets,
                             "after_puts": after_puts},
            "growth_kib": {"open": after_open - base, "gets": after_gets - after_open,
                           "puts": after_puts - after_gets, "total": after_puts - base},
            "python_heap_kib": {"retained_after_gets": py_current // 1024, "peak_during_gets": py_peak // 1024}}


def probe_memory_subprocess(path: str, core: str, n: int, record_size: int, bound: int) -> Dict[str, Any]:
    env = dict(os.environ)
    env["NVCACHE_NO_EXTENSIONS"] = "1" if core == "py" else ""
    arg = json.dumps({"path": path, "core": core, "n": n, "record_size": record_size, "bound": bound,
                      "gets": 20000, "puts": 2000})
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--probe-memory", arg], env=env,
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        return {"core": core, "n_records": n, "error": out.stderr[-2000:]}
    res = json.loads(out.stdout.strip().splitlines()[-1])
    log(f"  memory probe {core} N={n}: open {res['open_ms']:.2f} ms (fresh process), heap growth "
        f"open {res['growth_kib']['open']} KiB, 20k gets {res['growth_kib']['gets']} KiB, "
        f"2k puts {res['growth_kib']['puts']} KiB")
    return res


# ----------------------------------------------------------------------------- multi-process workloads
# diskcache's own benchmark (tests/benchmark_core.py there): keys 0..99, all present at the start,
# values str(count) * randrange(1, 100), 90% get / 9% set / 1% delete. It drops each process's first
# 1000 operations; here a warm-up time is dropped instead (the seed does fewer than 1000 in a run).
DC_RANGE = 100


class LayerUniverse:
    """Images built on shared base layers; image popularity is Zipf-distributed.

    Roots (OS layers) -> bases (runtimes, some extending other bases) -> images
    (a base plus 1-6 own layers). Record sizes are log-normal (median 4 KiB,
    clipped to 128 B..512 KiB), fixed per layer.
    """

    def __init__(self, n_images: int = 2000, n_bases: int = 40, zipf_s: float = 1.0, seed: int = 7) -> None:
        rng = random.Random(seed)
        self.sizes: Dict[str, int] = {}
        counter = [0]

        def new_layer() -> str:
            counter[0] += 1
            lid = layer_id(5 * 10 ** 9 + counter[0])
            self.sizes[lid] = int(min(max(rng.lognormvariate(math.log(4096), 1.4), 128), 512 << 10))
            return lid

        roots = [[new_layer() for _ in range(rng.randint(1, 3))] for _ in range(8)]
        bases: List[List[str]] = []
        for b in range(n_bases):
            parent = rng.choice(bases) if bases and rng.random() < 0.4 else rng.choice(roots)
            bases.append(parent + [new_layer() for _ in range(rng.randint(1, 4))])
        base_w = _zipf_cum(len(bases), 1.2)
        self.images: List[Tuple[str, ...]] = []
        for _ in range(n_images):
            base = bases[bisect.bisect(base_w, rng.random() * base_w[-1])]
            self.images.append(tuple(base + [new_layer() for _ in range(rng.randint(1, 6))]))
        rng.shuffle(self.images)
        self.cum = _zipf_cum(len(self.images), zipf_s)
        text = scan_text(random.Random(seed + 1), (512 << 10) + (64 << 10))
        self.blob = text

    def pick(self, rng: random.Random) -> Tuple[str, ...]:
        return self.images[bisect.bisect(self.cum, rng.random() * self.cum[-1])]

    def payload(self, lid: str, rng: random.Random) -> bytes:
        size = self.sizes[lid]
        off = rng.randrange(len(self.blob) - size)
        return self.blob[off:off + size]

    def prefill(self, bound: int) -> Iterator[Tuple[str, bytes]]:
        """The most popular images' layers, up to 90% of ``bound`` (the same warm start for every peer)."""
        rng = random.Random(3)
        seen = set()
        total = 0
        for img in self.images:  # already in popularity order: rank 0 is the most popular
            for lid in img:
                if lid in seen:
                    continue
                if total + self.sizes[lid] > 0.9 * bound:
                    return
                seen.add(lid)
                total += self.sizes[lid]
                yield lid, self.payload(lid, rng)

    def stats(self) -> Dict[str, Any]:
        return {"images": len(self.images), "layers": len(self.sizes),
                "total_bytes": sum(self.sizes.values()),
                "mean_layers_per_image": sum(map(len, self.images)) / len(self.images)}


def _zipf_cum(n: int, s: float) -> List[float]:
    out: List[float] = []
    acc = 0.0
    for r in range(1, n + 1):
        acc += 1.0 / r ** s
        out.append(acc)
    return out


def _mp_worker(peer_name: str, path: str, bound: int, workload: str, universe: Optional[LayerUniverse],
               wid: int, barrier: Any, queue: Any, warmup_s: float, duration_s: float) -> None:
    lat = array.array("q")
    counts = [0, 0, 0]
    hits = misses = errors = 0
    try:
        peer = make_peer(peer_name, path)
        if isinstance(peer, (NvPeer, SeedPeer)):
            peer.max_mb = bound / MiB
        if isinstance(peer, DiskcachePeer):
            peer.size_limit = bound
        peer.open()
        get, put, delete = peer.getter(), peer.putter(), peer.deleter()
        scan_put = peer.scan_putter()
        rng = random.Random(wid)
        key = peer.key
        barrier.wait(timeout=120)
        start = pc()
        measure_from = start + int(warmup_s * 1e9)
        end = measure_from + int(duration_s * 1e9)
        t1 = start
        if workload == "diskcache":
            keys = [key(str(i)) for i in range(DC_RANGE)]
            count = 0
            while t1 < end:
                kk = keys[rng.randrange(DC_RANGE)]
                value = str(count).encode() * rng.randrange(1, 100)
                c = rng.random()
                try:
                    if c < 0.9:
                        t0 = pc()
                        r = get(kk)
                        t1 = pc()
                        op = 0
                    elif c < 0.99:
                        t0 = pc()
                        put(kk, value)
                        t1 = pc()
                        op = 1
                    else:
                        t0 = pc()
                        delete(kk)
                        t1 = pc()
                        op = 2
                except Exception:
                    t1 = pc()
                    errors += 1
                    continue
                count += 1
                if t0 >= measure_from and t1 <= end:
                    lat.append(t1 - t0)
                    counts[op] += 1
                    if op == 0:
                        if r is None:
                            misses += 1
                        else:
                            hits += 1
        else:
            assert universe is not None
            while t1 < end:
                image = universe.pick(rng)
                keep = image  # the image being scanned: its layers must not be evicted
                for lid in image:
                    kk = key(lid)
                    try:
                        t0 = pc()
                        r = get(kk)
                        t1 = pc()
                    except Exception:
                        t1 = pc()
                        errors += 1
                        continue
                    if t0 >= measure_from and t1 <= end:
                        lat.append(t1 - t0)
                        counts[0] += 1
                        if r is None:
                            misses += 1
                        else:
                            hits += 1
                    if r is None:
                        d = universe.payload(lid, rng)
                        try:
                            t0 = pc()
                            scan_put(kk, d, keep)
                            t1 = pc()
                        except Exception:
                            t1 = pc()
                            errors += 1
                            continue
                        if t0 >= measure_from and t1 <= end:
                            lat.append(t1 - t0)
                            counts[1] += 1
        peer.close()
        queue.put((wid, None, lat.tobytes(), counts, hits, misses, errors))
    except BaseException as exc:  # report, never hang the parent
        queue.put((wid, f"{type(exc).__name__}: {exc}", lat.tobytes(), counts, hits, misses, errors))


def run_multi(peers: List[str], workload: str, procs: int, root: str, cfg: argparse.Namespace,
              universe: LayerUniverse, results: Dict[str, Any]) -> None:
    """``cfg.mp_reps`` runs of every peer, interleaved (so a burst of noise from other tenants hits
    different peers in different rounds); the run with the median aggregate ops/s is reported."""
    runs: Dict[str, List[Dict[str, Any]]] = {p: [] for p in peers}
    for rep in range(cfg.mp_reps):
        for p in peers:
            runs[p].append(run_multi_once(p, workload, procs, root, cfg, universe, rep))
    for p in peers:
        rs = sorted(runs[p], key=lambda r: r["aggregate_ops_s"])
        row = dict(rs[len(rs) // 2])
        row["aggregate_runs"] = [r["aggregate_ops_s"] for r in runs[p]]
        results["multi"].append(row)
        log(f"  {workload:9s} procs={procs} {p:18s} aggregate {row['aggregate_ops_s']:10.0f} ops/s (runs: " +
            ", ".join(f"{a:.0f}" for a in row["aggregate_runs"]) + f")  median {row.get('median', float('nan')):8.1f} us"
            f"  hit {row['hit_ratio'] if row['hit_ratio'] is None else round(row['hit_ratio'], 3)}"
            f"{'  FAILURES: ' + '; '.join(row['failures']) if row['failures'] else ''}")


def run_multi_once(peer_name: str, workload: str, procs: int, root: str, cfg: argparse.Namespace,
                   universe: LayerUniverse, rep: int) -> Dict[str, Any]:
    path = os.path.join(root, f"mp-{workload}-{peer_name}-{procs}-{rep}")
    bound = (64 * MiB) if workload == "diskcache" else int(cfg.layer_bound_mb * MiB)
    peer = make_peer(peer_name, path)
    peer.create(bound)
    if workload == "diskcache":
        peer.populate((str(i), str(i).encode()) for i in range(DC_RANGE))
    else:
        peer.populate(universe.prefill(bound))
    peer.settle()
    peer.close()
    del peer
    gc.collect()
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(procs)
    queue = ctx.Queue()
    workers = [ctx.Process(target=_mp_worker, args=(peer_name, path, bound, workload, universe, w, barrier,
                                                   queue, cfg.warmup, cfg.duration)) for w in range(procs)]
    for w in workers:
        w.start()
    got = []
    deadline = time.monotonic() + cfg.warmup + cfg.duration + 180
    while len(got) < procs and time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            got.append(queue.get(timeout=5))
    for w in workers:
        w.join(timeout=30)
        if w.is_alive():
            w.kill()
    lat = array.array("q")
    counts = [0, 0, 0]
    hits = misses = errors = 0
    failures = []
    for wid, err, raw, c, h, m, e in got:
        if err:
            failures.append(f"worker {wid}: {err}")
        part = array.array("q")
        part.frombytes(raw)
        lat.extend(part)
        counts = [a + b for a, b in zip(counts, c)]
        hits += h
        misses += m
        errors += e
    if len(got) < procs:
        failures.append(f"{procs - len(got)} workers did not report")
    s = summarize(lat)
    total_ops = len(lat)
    agg = total_ops / cfg.duration
    row = {"workload": workload, "procs": procs, "peer": peer_name, "aggregate_ops_s": agg, **s,
           "ops": {"get": counts[0], "set": counts[1], "delete": counts[2]},
           "hit_ratio": hits / (hits + misses) if hits + misses else None, "errors": errors,
           "failures": failures, "duration_s": cfg.duration}
    shutil.rmtree(path, ignore_errors=True)
    return row


# ----------------------------------------------------------------------------- machine info
def machine_info(workdir: str) -> Dict[str, Any]:
    from importlib import metadata

    import lmdb

    import nvcache

    cpu = "?"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    versions = {}
    for pkg in ("nvcache", "lmdb", "diskcache", "xxhash", "Cython", "matplotlib", "numpy", "pytest-benchmark"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    repo = os.path.dirname(HERE)
    git = "?"
    with contextlib.suppress(Exception):
        git = subprocess.run(["git", "-C", repo, "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
    ext_hash = None
    with contextlib.suppress(Exception):
        from nvcache import _index

        with open(_index.__file__, "rb") as f:
            ext_hash = hashlib.sha256(f.read()).hexdigest()[:16]
    mem_gib = None
    with contextlib.suppress(Exception):
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1)
    fs = "?"
    with contextlib.suppress(Exception):
        best = ""
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, typ = line.split()[:3]
                if os.path.abspath(workdir).startswith(mnt) and len(mnt) > len(best):
                    best, fs = mnt, f"{typ} ({dev} on {mnt})"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": mem_gib, "kernel": platform.release(), "os": platform.platform(),
        "python": platform.python_version() + " " + platform.python_implementation(),
        "versions": versions, "lmdb_c": ".".join(map(str, lmdb.version())), "sqlite": sqlite3.sqlite_version,
        "nvcache_extension": nvcache.EXTENSION, "nvcache_git": git, "extension_sha256_16": ext_hash,
        "workdir_fs": fs, "loadavg_start": os.getloadavg(), "timer_overhead_ns": timer_overhead_ns(),
    }


# ----------------------------------------------------------------------------- targets
def _med(results: Dict[str, Any], n: int, peer: str, op: str, stat: str = "median") -> Optional[float]:
    for r in results["single"]:
        if r["n_records"] == n and r["peer"] == peer and r["op"] == op and r.get("n"):
            return r.get(stat)
    return None


def _agg(results: Dict[str, Any], workload: str, procs: int, peer: str) -> Optional[float]:
    for r in results["multi"]:
        if r["workload"] == workload and r["procs"] == procs and r["peer"] == peer and r.get("n"):
            return r["aggregate_ops_s"]
    return None


def evaluate_targets(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Each target of issue 4 with its measured ratio (at every size measured), met or not."""
    sizes = sorted({r["n_records"] for r in results["single"]})
    out: List[Dict[str, Any]] = []

    def add(target: str, measured: Optional[float], ok: Optional[bool], detail: str) -> None:
        out.append({"target": target, "measured": measured, "met": ok, "detail": detail})

    def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
        return a / b if a is not None and b is not None and b > 0 else None

    for n in sizes:
        nv = _med(results, n, REF, "get-hit")
        for peer, limit, text in (("lmdb", 2.0, "raw lmdb read txn+get, default locking"),
                                  ("lmdb-nolock", 2.0, "raw lmdb read txn+get, lock=False")):
            r = ratio(nv, _med(results, n, peer, "get-hit"))
            add(f"get-hit <= 2x {text} (N={n:,})", r, None if r is None else r <= limit,
                f"nvcache {nv and round(nv, 2)} us vs {peer} {_med(results, n, peer, 'get-hit') and round(_med(results, n, peer, 'get-hit'), 2)} us; ratio nvcache/peer")
        for peer, want in (("diskcache-lru", 30.0), ("diskcache-default", 3.0)):
            r = ratio(_med(results, n, peer, "get-hit"), nv)
            add(f"get-hit >= {want:g}x faster than {peer} get (N={n:,})", r,
                None if r is None else r >= want, "ratio peer/nvcache of medians")
        r = ratio(_med(results, n, "diskcache-lru", "put-evict"), _med(results, n, REF, "put-evict"))
        add(f"put-evict >= 10x faster than diskcache-lru set into a full cache (N={n:,})", r,
            None if r is None else r >= 10, "ratio peer/nvcache of medians")
    procs = sorted({r["procs"] for r in results["multi"]})
    if procs:
        p = max(procs)
        for peer in ("diskcache-default", "diskcache-lru"):
            r = ratio(_agg(results, "diskcache", p, REF), _agg(results, "diskcache", p, peer))
            add(f"{p} processes, diskcache workload: aggregate ops/s >= 20x {peer}", r,
                None if r is None else r >= 20, "ratio nvcache/peer of aggregate ops/s")
    if len(sizes) >= 2:
        lo, hi = sizes[0], sizes[-1]
        for op in ("get-hit", "put-evict"):
            for stat in ("median", "mean"):
                r = ratio(_med(results, hi, REF, op, stat), _med(results, lo, REF, op, stat))
                add(f"{op} growth {lo:,} -> {hi:,} records <= 1.5x ({stat})", r,
                    None if r is None else r <= 1.5, f"nvcache {stat} at {hi:,} / at {lo:,}")
    for n in sizes:
        if n >= 1_000_000 or n == sizes[-1]:
            m = _med(results, n, REF, "open")
            add(f"open a {n:,}-record cache <= 50 ms (in-process reopen, median)", None if m is None else m / 1e3,
                None if m is None else m / 1e3 <= 50, "milliseconds")
            for mem in results.get("memory", []):
                if mem.get("core") == "ext" and mem.get("n_records") == n and "open_ms" in mem:
                    add(f"open a {n:,}-record cache <= 50 ms (fresh process, first open)", mem["open_ms"],
                        mem["open_ms"] <= 50, "milliseconds")
    for n in sizes:
        if n == 100_000 or (n == sizes[-1] and 100_000 not in sizes):
            m = _med(results, n, REF, "dump")
            add(f"cache_data() of {n:,} records <= 0.5 s", None if m is None else m / 1e6,
                None if m is None else m / 1e6 <= 0.5, "seconds (median)")
    for n in sizes:
        for op in ("get-hit", "put-evict", "dump"):
            r = ratio(_med(results, n, "nvcache-py", op), _med(results, n, REF, op))
            add(f"compiled >= 2x faster than the twin: {op} (N={n:,})", r, None if r is None else r >= 2,
                "ratio twin/compiled of medians")
    mem = [m for m in results.get("memory", []) if m.get("core") == "ext" and "growth_kib" in m]
    if len(mem) >= 2:
        mem.sort(key=lambda m: m["n_records"])
        g = [m["growth_kib"]["total"] for m in mem]
        spread = max(g) - min(g)
        add("per-process heap growth independent of record count", float(spread), spread <= 4096,
            "spread (KiB) of RssAnon growth (open + 20k gets + 2k puts) across sizes: " +
            ", ".join(f"{m['n_records']:,}: {m['growth_kib']['total']} KiB" for m in mem) +
            " (met when the spread is within 4 MiB)")
    ch = results.get("churn")
    if ch and "max_file" in ch:
        add(f"data.mdb <= 2x bound + 64 MiB under churn ({ch['written'] / MiB / 1024:.1f} GiB written, "
            f"bound {ch['bound'] / MiB:.0f} MiB)", ch["max_file"] / MiB, bool(ch["met"]),
            f"max data.mdb MiB; limit {ch['limit'] / MiB:.0f} MiB; final {ch['final_file'] / MiB:.1f} MiB")
    return out


# ----------------------------------------------------------------------------- report
def fmt_us(v: Optional[float]) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if v >= 1e6:
        return f"{v / 1e6:.2f} s"
    if v >= 1e3:
        return f"{v / 1e3:.2f} ms"
    if v >= 100:
        return f"{v:.0f} µs"
    return f"{v:.2f} µs" if v < 10 else f"{v:.1f} µs"


def fmt_ratio(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:,.0f}×"
    if v >= 10:
        return f"{v:.1f}×"
    return f"{v:.2f}×"


def fmt_ops(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if v >= 1e6:
        return f"{v / 1e6:.2f} M"
    if v >= 1e3:
        return f"{v / 1e3:.1f} k"
    return f"{v:.1f}"


def write_markdown(results: Dict[str, Any], out_dir: str, plots: List[str]) -> str:
    m = results["machine"]
    cfg = results["config"]
    L: List[str] = []
    L.append("# nvcache benchmark: side by side with diskcache, raw LMDB and the seed's JSON index\n")
    argv = " ".join(results.get("argv", [])) or "(default arguments)"
    L.append(f"Generated by `bench/compare.py` {argv} on {m['date']} "
             f"in {results.get('elapsed_s', 0) / 60:.1f} min.\n")
    L.append("| machine | |\n|---|---|")
    L.append(f"| CPU | {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {m['memory_gib']} GiB RAM |")
    L.append(f"| kernel / OS | {m['kernel']} / {m['os']} |")
    L.append(f"| Python | {m['python']} |")
    v = m["versions"]
    L.append(f"| packages | nvcache {v.get('nvcache')} (git {m['nvcache_git']}, compiled core: "
             f"{m['nvcache_extension']}, .so sha256 {m['extension_sha256_16']}), py-lmdb {v.get('lmdb')} "
             f"(LMDB {m['lmdb_c']}), diskcache {v.get('diskcache')} (SQLite {m['sqlite']}), "
             f"xxhash {v.get('xxhash')}, Cython {v.get('Cython')}, matplotlib {v.get('matplotlib')} |")
    L.append(f"| scratch filesystem | {m['workdir_fs']} |")
    L.append(f"| load average start / end | {' '.join(f'{x:.2f}' for x in m['loadavg_start'])} / "
             f"{' '.join(f'{x:.2f}' for x in m.get('loadavg_end', []))} |")
    la = results.get("loadavg_samples") or [0.0]
    L.append(f"| 1-min load average sampled between cells | min {min(la):.2f}, median {sorted(la)[len(la) // 2]:.2f}, "
             f"max {max(la):.2f} (2 cores: above ~1 means other tenants compete with the benchmark) |")
    L.append(f"| timer | perf_counter_ns around every operation; its own overhead ≈ {m['timer_overhead_ns']:.0f} ns "
             f"(included in every figure) |")
    kind = "random bytes, incompressible" if cfg.get("payload") == "random" else "JSON-like scan text"
    L.append(f"| records | {cfg['record_size']} B each ({kind}), keys `sha256:<64 hex>`; "
             f"per-op budget {cfg['budget']} s, up to {cfg['max_gets']} gets / {cfg['max_puts']} puts / "
             f"{cfg['max_deletes']} deletes per cell |")
    L.append("")
    L.append("Ratios are **peer ÷ nvcache (compiled)** of the same statistic: for latencies, 30× means the peer "
             "takes 30 times as long; for ops/s, 0.03× means it does 3% of nvcache's throughput. "
             "The machine is shared and noisy: read medians and ratios, not single maxima.\n")
    peers = [p for p in PEERS if any(r["peer"] == p for r in results["single"])]
    sizes = sorted({r["n_records"] for r in results["single"]})
    # headline
    L.append("## Headline: median latency per operation (ratio to nvcache)\n")
    L.append("| N | operation | " + " | ".join(peers) + " |")
    L.append("|---:|---|" + "---:|" * len(peers))
    for n in sizes:
        for op in OPS:
            ref = _med(results, n, REF, op)
            cells = []
            for p in peers:
                row = next((r for r in results["single"] if r["n_records"] == n and r["peer"] == p and r["op"] == op), None)
                if row is None:
                    cells.append(_skip_reason(results, n, p))
                elif not row.get("n"):
                    cells.append("n/a")
                else:
                    cells.append(f"{fmt_us(row['median'])} ({fmt_ratio(row['median'] / ref if ref else None)})")
            L.append(f"| {n:,} | {op} | " + " | ".join(cells) + " |")
    L.append("")
    for sk in results.get("skipped", []):
        extra = ""
        if sk["peer"] == "seed-json":
            est = _seed_estimate(results, sk["n_records"])
            if est:
                extra = (f" Its cost grows linearly with N (every operation parses and rewrites the whole index): "
                         f"extrapolated from the two largest measured sizes, a get-hit would take about {est}"
                         " (an estimate, not a measurement).")
        L.append(f"*Skipped at {sk['n_records']:,} records: {sk['peer']}* - {sk['reason']}.{extra}\n")
    # multi
    if results["multi"]:
        L.append("## Several processes: aggregate throughput (ratio to nvcache)\n")
        L.append("*diskcache* = diskcache's own benchmark workload (keys 0-99, 90% get / 9% set / 1% delete, "
                 "values `str(count) * randrange(1, 100)`); *layers* = layer-scan workload (get each layer of a "
                 "Zipf-popular image, put it with `keep=` the image's layers on a miss; "
                 f"{results.get('universe', {}).get('images', '?')} images sharing base layers, "
                 f"bound {cfg['layer_bound_mb']} MiB). Each run: {cfg['warmup']} s warm-up, then "
                 f"{cfg['duration']} s measured; latency over all operations of all processes. Every peer ran "
                 f"{cfg.get('mp_reps', 1)} times, interleaved; the run with the median aggregate is shown, "
                 "the others in the last column.\n")
        L.append("| workload | procs | peer | aggregate ops/s | ratio | median | p90 | p99 | max | hit ratio | notes (all runs' ops/s) |")
        L.append("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in results["multi"]:
            ref = _agg(results, r["workload"], r["procs"], REF)
            refrow = next((x for x in results["multi"] if x["workload"] == r["workload"] and
                           x["procs"] == r["procs"] and x["peer"] == REF), None)
            notes = "; ".join(r.get("failures", []) + (["runs: " + ", ".join(fmt_ops(a) for a in r["aggregate_runs"])]
                                                        if len(r.get("aggregate_runs", [])) > 1 else []))
            if r.get("errors"):
                notes = (notes + "; " if notes else "") + f"{r['errors']} errors"
            lat = []
            for st in ("median", "p90", "p99", "max"):
                rv = refrow.get(st) if refrow else None
                lat.append(f"{fmt_us(r.get(st))} ({fmt_ratio(r[st] / rv if rv and r.get(st) is not None else None)})")
            hr = r.get("hit_ratio")
            L.append(f"| {r['workload']} | {r['procs']} | {r['peer']} | {fmt_ops(r['aggregate_ops_s'])} | "
                     f"{fmt_ratio(r['aggregate_ops_s'] / ref if ref else None)} | " + " | ".join(lat) +
                     f" | {'-' if hr is None else f'{hr:.3f}'} | {notes} |")
        L.append("")
    # targets
    L.append("## Issue 4 targets\n")
    L.append("| target | measured | met |")
    L.append("|---|---:|:---:|")
    for t in results.get("targets", []):
        meas = t["measured"]
        met = "n/a" if t["met"] is None else ("**yes**" if t["met"] else "**no**")
        ms = "-" if meas is None else (f"{meas:.2f}" if abs(meas) < 1000 else f"{meas:,.0f}")
        L.append(f"| {t['target']} | {ms} ({t['detail']}) | {met} |")
    L.append("")
    # memory
    if results.get("memory"):
        L.append("## Memory: anonymous RSS (heap) of a fresh process\n")
        L.append("Open the cache, 20k random get-hits + flush, then 2k puts (each evicts). RssAnon excludes the "
                 "LMDB map (file-backed pages).\n")
        L.append("| core | N | open (fresh process) | first get | RssAnon before open | growth: open | 20k gets | 2k puts | total | Python heap (tracemalloc) peak / retained over 20k more gets |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for mm in results["memory"]:
            if "growth_kib" not in mm:
                L.append(f"| {mm.get('core')} | {mm.get('n_records'):,} | error: {mm.get('error', '')[:80]} |||||||")
                continue
            g = mm["growth_kib"]
            L.append(f"| {mm['core']} | {mm['n_records']:,} | {mm['open_ms']:.2f} ms | {fmt_us(mm['first_get_us'])} | "
                     f"{mm['rss_anon_kib']['before_open'] / 1024:.1f} MiB | {g['open']} KiB | {g['gets']} KiB | "
                     f"{g['puts']} KiB | {g['total']} KiB | {_pyheap(mm)} |")
        L.append("")
    ch = results.get("churn")
    if ch and "max_file" in ch:
        L.append("## Churn: data.mdb size under mixed-size records\n")
        bands = ", ".join(f"{int(s * 100)}% {lo}-{hi} B" for s, lo, hi in ch["size_bands"])
        L.append(f"Bound {ch['bound'] / MiB:.0f} MiB; {ch['written'] / MiB / 1024:.1f} GiB written in {ch['puts']:,} puts "
                 f"({bands}; log-uniform within each band), {ch['gets']:,} gets, {ch['deletes']:,} deletes, "
                 f"{ch['elapsed_s']:.1f} s. data.mdb disk use (allocated blocks) max **{ch['max_file'] / MiB:.1f} MiB**, final "
                 f"{ch['final_file'] / MiB:.1f} MiB; limit (2× bound + 64 MiB) {ch['limit'] / MiB:.0f} MiB → "
                 f"**{'met' if ch['met'] else 'not met'}**. verify(): {ch['verify_problems'] or 'no problems'}.\n")
    # populate / disk
    if results.get("populate"):
        L.append("## Setup: bulk population time and disk use\n")
        L.append("Population is not a benchmarked operation (nvcache: the core's insert, 10k per transaction; "
                 "lmdb: 10k puts per transaction; diskcache: `transact()` batches of 10k; seed: one index "
                 "write).\n")
        L.append("| N | peer | populate | disk after the run | records at the end |")
        L.append("|---:|---|---:|---:|---:|")
        for r in results["populate"]:
            L.append(f"| {r['n_records']:,} | {r['peer']} | {r['seconds']:.1f} s | {r['disk_bytes'] / MiB:,.1f} MiB | "
                     f"{r['final_count']:,} |")
        L.append("")
    if plots:
        L.append("## Plots\n")
        for p in plots:
            L.append(f"![{p}]({p})\n")
    # details
    L.append("## Detail: every statistic, with its ratio to nvcache\n")
    for n in sizes:
        L.append(f"### N = {n:,} records\n")
        L.append("| peer | op | count | median | p90 | p99 | max | ops/s |")
        L.append("|---|---|---:|---:|---:|---:|---:|---:|")
        for op in OPS:
            ref = next((r for r in results["single"] if r["n_records"] == n and r["peer"] == REF and r["op"] == op), None)
            for p in peers:
                r = next((x for x in results["single"] if x["n_records"] == n and x["peer"] == p and x["op"] == op), None)
                if r is None or not r.get("n"):
                    continue
                cells = []
                for st in ("median", "p90", "p99", "max"):
                    rv = ref.get(st) if ref and ref.get("n") else None
                    cells.append(f"{fmt_us(r[st])} ({fmt_ratio(r[st] / rv if rv else None)})")
                rv = ref.get("ops_s") if ref and ref.get("n") else None
                cells.append(f"{fmt_ops(r['ops_s'])} ({fmt_ratio(r['ops_s'] / rv if rv else None)})")
                L.append(f"| {p} | {op} | {r['n']:,} | " + " | ".join(cells) + " |")
        L.append("")
    L.append("## What each operation means per peer\n")
    L.append("- **open**: the constructor on an existing store (nvcache: `LayerCache(path, max_mb)` after the last "
             "instance closed; diskcache: `Cache(dir)`; lmdb: `lmdb.open`; seed: `SeedCache(dir)`, which only checks "
             "the version file - the seed parses its index on every operation instead).")
    L.append("- **get-hit / get-miss**: uniform random keys. nvcache buffers the access (reference count, last "
             "reference) in the process and writes it with the next write or when 4096 keys / 1 s are pending, so "
             "some get-hits carry that write: it shows in p99/max and in ops/s (1/mean), not in the median. "
             "diskcache-lru writes access_time on every get; the seed rewrites its whole index on every get.")
    L.append("- **put-new**: records deleted in the previous phase are replaced by as many new ones: no eviction.")
    L.append("- **put-evict**: the store is exactly full and every put evicts one record (nvcache: bound = current "
             "total; diskcache: `size_limit=0`, `cull_limit=1`, since its limit is on the SQLite file's volume, "
             "which never shrinks; raw lmdb: put + delete of the oldest key in one write txn; seed: at the bound, "
             "its prune removes 256 records at once, so most puts evict nothing and one in ~256 pays for 256).")
    L.append("- **delete**: existing random records. The seed has no delete; ours uses its lock/parse/rewrite pattern.")
    L.append("- **dump**: nvcache `cache_data()` (every record's layer id, size, reference count and last "
             "reference, next victim first); seed: `cache_data()` (parse the index, list its records); raw lmdb: "
             "a read-only cursor walk collecting (key, value length) with zero-copy buffers; diskcache has none.")
    L.append("- Multi-process *set*: nvcache's `put` never overwrites (a layer's record is immutable): a set on "
             "an existing key is a write transaction that finds the key and changes nothing; the peers overwrite.")
    L.append("")
    text = "\n".join(L) + "\n"
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text)
    return text


def _seed_estimate(results: Dict[str, Any], n: int) -> Optional[str]:
    pts = sorted((r["n_records"], r["median"]) for r in results["single"]
                 if r["peer"] == "seed-json" and r["op"] == "get-hit" and r.get("n"))
    if len(pts) < 2:
        return None
    (n0, v0), (n1, v1) = pts[-2], pts[-1]
    slope = (v1 - v0) / (n1 - n0)
    return fmt_us(v1 + slope * (n - n1))


def _pyheap(mm: Dict[str, Any]) -> str:
    h = mm.get("python_heap_kib")
    return f"{h['peak_during_gets']:,} KiB / {h['retained_after_gets']:,} KiB" if h else "-"


def _skip_reason(results: Dict[str, Any], n: int, peer: str) -> str:
    for s in results.get("skipped", []):
        if s["n_records"] == n and s["peer"] == peer:
            return "skipped"
    return "-"


COLORS = {"nvcache": "#1f77b4", "nvcache-py": "#aec7e8", "nvcache-lrfu": "#9467bd", "lmdb": "#2ca02c", "lmdb-nolock": "#98df8a",
          "lmdb-nolock+flock": "#17becf", "diskcache-lru": "#d62728", "diskcache-default": "#ff9896",
          "seed-json": "#7f7f7f"}


def make_plots(results: Dict[str, Any], out_dir: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: List[str] = []
    sizes = sorted({r["n_records"] for r in results["single"]})
    peers = [p for p in PEERS if any(r["peer"] == p for r in results["single"])]
    if sizes:
        fig, axes = plt.subplots(1, 3, figsize=(16, 5))
        for ax, op in zip(axes, ("get-hit", "put-evict", "dump")):
            for p in peers:
                xs, ys = [], []
                for n in sizes:
                    v = _med(results, n, p, op)
                    if v is not None:
                        xs.append(n)
                        ys.append(v)
                if xs:
                    ax.plot(xs, ys, "o-", label=p, color=COLORS.get(p))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("records in the cache")
            ax.set_ylabel("median latency (µs)")
            ax.set_title(op)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle("Median latency vs. cache size (log-log; lower is better)")
        fig.tight_layout()
        fn = "latency_vs_records.png"
        fig.savefig(os.path.join(out_dir, fn), dpi=110)
        plt.close(fig)
        files.append(fn)
        for n in sizes:
            fig, ax = plt.subplots(figsize=(14, 5))
            width = 0.8 / max(len(peers), 1)
            for i, p in enumerate(peers):
                ys = [_med(results, n, p, op) or 0 for op in OPS]
                xs = [j + i * width for j in range(len(OPS))]
                ax.bar(xs, [y if y > 0 else float("nan") for y in ys], width, label=p, color=COLORS.get(p))
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(OPS))])
            ax.set_xticklabels(OPS)
            ax.set_yscale("log")
            ax.set_ylabel("median latency (µs, log)")
            ax.set_title(f"Every operation at {n:,} records (lower is better; missing bar = skipped / no equivalent)")
            ax.grid(True, axis="y", which="both", alpha=0.3)
            ax.legend(fontsize=8, ncol=4)
            fig.tight_layout()
            fn = f"ops_{n}.png"
            fig.savefig(os.path.join(out_dir, fn), dpi=110)
            plt.close(fig)
            files.append(fn)
        n = sizes[-1]
        fig, ax = plt.subplots(figsize=(8, 5))
        for p in peers:
            r = next((x for x in results["single"] if x["n_records"] == n and x["peer"] == p and x["op"] == "get-hit"), None)
            if r and r.get("n"):
                qs = [float(q) for q in r["cdf"]]
                ax.plot([r["cdf"][k] for k in r["cdf"]], qs, "o-", ms=3, label=p, color=COLORS.get(p))
        ax.set_xscale("log")
        ax.set_xlabel("get-hit latency (µs, log)")
        ax.set_ylabel("percentile")
        ax.set_title(f"get-hit latency distribution at {n:,} records")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fn = "get_hit_cdf.png"
        fig.savefig(os.path.join(out_dir, fn), dpi=110)
        plt.close(fig)
        files.append(fn)
    if results["multi"]:
        workloads = sorted({r["workload"] for r in results["multi"]})
        fig, axes = plt.subplots(1, len(workloads), figsize=(7 * len(workloads), 5), squeeze=False)
        for ax, wl in zip(axes[0], workloads):
            rows = [r for r in results["multi"] if r["workload"] == wl]
            procs = sorted({r["procs"] for r in rows})
            mpeers = [p for p in PEERS if any(r["peer"] == p for r in rows)]
            width = 0.8 / max(len(mpeers), 1)
            for i, p in enumerate(mpeers):
                ys = [next((r["aggregate_ops_s"] for r in rows if r["peer"] == p and r["procs"] == pr), 0) for pr in procs]
                ax.bar([j + i * width for j in range(len(procs))], [y if y > 0 else float("nan") for y in ys], width,
                       label=p, color=COLORS.get(p))
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(procs))])
            ax.set_xticklabels([f"{p} process{'es' if p > 1 else ''}" for p in procs])
            ax.set_yscale("log")
            ax.set_ylabel("aggregate ops/s (log; higher is better)")
            ax.set_title(f"{wl} workload")
            ax.grid(True, axis="y", which="both", alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
        fig.suptitle("Aggregate throughput, 1 and N processes (median of the repeated runs)")
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        fn = "multiprocess.png"
        fig.savefig(os.path.join(out_dir, fn), dpi=110)
        plt.close(fig)
        files.append(fn)
    ch = results.get("churn")
    if ch and ch.get("series"):
        fig, ax = plt.subplots(figsize=(8, 5))
        s = ch["series"]
        xs = [p["written"] / (1 << 30) for p in s]
        ax.plot(xs, [p.get("used", p["file"]) / MiB for p in s], label="data.mdb disk use")
        ax.plot(xs, [p["total"] / MiB for p in s], label="record_total_size")
        ax.axhline(ch["bound"] / MiB, color="gray", ls="--", label="bound")
        ax.axhline(ch["limit"] / MiB, color="red", ls=":", label="target: 2× bound + 64 MiB")
        ax.set_xlabel("GiB written")
        ax.set_ylabel("MiB")
        ax.set_title("Churn of mixed-size records (nvcache, compiled core)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fn = "churn.png"
        fig.savefig(os.path.join(out_dir, fn), dpi=110)
        plt.close(fig)
        files.append(fn)
    return files


# ----------------------------------------------------------------------------- main
def parse_args(argv: List[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~1 minute smoke run (small sizes, short budgets)")
    ap.add_argument("--sizes", default=None,
                    help="comma-separated record counts (default 10000,100000,1000000; empty: none)")
    ap.add_argument("--procs", default=None, help="comma-separated process counts (default 1,8; empty: none)")
    ap.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset of: " + ", ".join(PEERS))
    ap.add_argument("--workloads", default="diskcache,layers")
    ap.add_argument("--record-size", type=int, default=2048)
    ap.add_argument("--payload", choices=("json", "random"), default="json",
                    help="record bytes: JSON-like scan text (compressible) or random (incompressible)")
    ap.add_argument("--seed-max", type=int, default=100_000, help="largest N for the JSON seed baseline")
    ap.add_argument("--diskcache-max", type=int, default=1_000_000, help="largest N for diskcache")
    ap.add_argument("--budget", type=float, default=None, help="seconds per (peer, op, N) cell")
    ap.add_argument("--max-gets", type=int, default=None)
    ap.add_argument("--max-puts", type=int, default=None)
    ap.add_argument("--max-deletes", type=int, default=None)
    ap.add_argument("--duration", type=float, default=None, help="measured seconds per multi-process run")
    ap.add_argument("--warmup", type=float, default=None, help="warm-up seconds per multi-process run")
    ap.add_argument("--mp-reps", type=int, default=None, help="multi-process runs per peer (median reported)")
    ap.add_argument("--layer-bound-mb", type=float, default=16)
    ap.add_argument("--churn-bound-mb", type=float, default=64)
    ap.add_argument("--churn-factor", type=float, default=None, help="churn volume as a multiple of the bound")
    ap.add_argument("--no-memory", dest="memory", action="store_false")
    ap.add_argument("--no-churn", dest="churn", action="store_false")
    ap.add_argument("--out", default=None, help="results directory (default bench/results, quick: bench/results/quick)")
    ap.add_argument("--workdir", default=None, help="scratch directory parent (default: system temp)")
    ap.add_argument("--report-only", action="store_true", help="re-render results.md and plots from results.json")
    ap.add_argument("--probe-memory", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    q = a.quick
    sizes = a.sizes if a.sizes is not None else ("2000,10000" if q else "10000,100000,1000000")
    a.sizes = [int(x) for x in sizes.split(",") if x.strip()]  # --sizes= : no single-process runs
    procs = a.procs if a.procs is not None else "1,8"
    a.procs = [int(x) for x in procs.split(",") if x.strip()]
    a.peers = [p for p in a.peers.split(",") if p]
    for p in a.peers:
        if p not in PEERS:
            ap.error(f"unknown peer {p}")
    a.workloads = [w for w in a.workloads.split(",") if w]
    a.budget = a.budget if a.budget is not None else (0.15 if q else 1.0)
    a.max_gets = a.max_gets or (3000 if q else 20000)
    a.max_puts = a.max_puts or (1000 if q else 5000)
    a.max_deletes = a.max_deletes or (500 if q else 2000)
    a.duration = a.duration if a.duration is not None else (0.5 if q else 2.0)
    a.mp_reps = a.mp_reps or (1 if q else 3)
    a.warmup = a.warmup if a.warmup is not None else (0.2 if q else 0.5)
    a.churn_factor = a.churn_factor if a.churn_factor is not None else (4.0 if q else 128.0)
    if q and a.churn_bound_mb == 64:
        a.churn_bound_mb = 16
    a.out = a.out or (os.path.join(HERE, "results", "quick") if q else os.path.join(HERE, "results"))
    return a


def main(argv: List[str]) -> int:
    cfg = parse_args(argv)
    if cfg.probe_memory:
        p = json.loads(cfg.probe_memory)
        print(json.dumps(probe_memory(p["path"], p["core"], p["n"], p["record_size"], p["bound"], p["gets"], p["puts"])))
        return 0
    os.makedirs(cfg.out, exist_ok=True)
    json_path = os.path.join(cfg.out, "results.json")
    if cfg.report_only:
        with open(json_path) as f:
            results = json.load(f)
        results["targets"] = evaluate_targets(results)
        plots = make_plots(results, cfg.out)
        write_markdown(results, cfg.out, plots)
        print(f"wrote {cfg.out}/results.md and {len(plots)} plots")
        return 0
    t_start = time.perf_counter()
    root = tempfile.mkdtemp(prefix="nvcache-bench-", dir=cfg.workdir)
    results: Dict[str, Any] = {"argv": argv, "machine": machine_info(root), "config": {
        k: v for k, v in vars(cfg).items() if k not in ("probe_memory", "report_only")},
        "single": [], "multi": [], "memory": [], "populate": [], "skipped": []}
    log(f"scratch in {root}; sizes {cfg.sizes}; procs {cfg.procs}; peers {cfg.peers}")
    data = payloads(cfg.record_size, kind=cfg.payload)

    def checkpoint() -> None:
        results.setdefault("loadavg_samples", []).append(round(os.getloadavg()[0], 2))
        tmp = json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)

    try:
        for n in cfg.sizes:
            log(f"N = {n:,}")
            for p in cfg.peers:
                if p == "seed-json" and n > cfg.seed_max:
                    results["skipped"].append({"n_records": n, "peer": p, "reason":
                                               f"seed baseline stops at {cfg.seed_max:,} records (--seed-max)"})
                    continue
                if p.startswith("diskcache") and n > cfg.diskcache_max:
                    results["skipped"].append({"n_records": n, "peer": p, "reason": f"--diskcache-max {cfg.diskcache_max:,}"})
                    continue
                run_single(p, n, root, cfg, data, results)
                checkpoint()
        universe = LayerUniverse()
        results["universe"] = universe.stats()
        for wl in cfg.workloads:
            for procs in cfg.procs:
                run_multi([p for p in cfg.peers if p in MP_PEERS], wl, procs, root, cfg, universe, results)
                checkpoint()
        if cfg.churn and "nvcache" in cfg.peers:
            log(f"churn: bound {cfg.churn_bound_mb} MiB x {cfg.churn_factor}")
            results["churn"] = churn.run_churn(os.path.join(root, "churn"), "ext", cfg.churn_bound_mb,
                                               cfg.churn_factor)
            ch = results["churn"]
            log(f"  data.mdb max {ch['max_file'] / MiB:.1f} MiB (limit {ch['limit'] / MiB:.0f}), "
                f"{ch['elapsed_s']:.1f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["elapsed_s"] = time.perf_counter() - t_start
    results["targets"] = evaluate_targets(results)
    checkpoint()
    os.replace(json_path + ".tmp", json_path)
    plots = make_plots(results, cfg.out)
    write_markdown(results, cfg.out, plots)
    log(f"done in {results['elapsed_s'] / 60:.1f} min: {cfg.out}/results.md, results.json, {len(plots)} plots")
    for t in results["targets"]:
        met = "n/a" if t["met"] is None else ("MET" if t["met"] else "NOT MET")
        meas = "-" if t["measured"] is None else f"{t['measured']:.2f}"
        print(f"  {met:8s} {meas:>10s}  {t['target']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
