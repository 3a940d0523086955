"""Where does the time go in get-hit and put-evict? A step-by-step breakdown of nvcache's hot paths.

Each step is timed in a batch (``--reps`` loops of ``--loops`` calls, median
of the per-call means), on a populated cache, with the compiled core unless
``--core py``. Steps are nested: a row's time includes the rows indented under
it, so "python layers" are found by subtraction. Write steps that must not
change the cache run inside a write transaction that is then aborted.

Run::

    .venv/bin/python bench/profile_hot.py                      # 100k records, table on stdout
    .venv/bin/python bench/profile_hot.py --records 1000000 --json /tmp/prof.json
    # a plain loop for external profilers:
    .venv/bin/py-spy record --native -r 5000 -f raw -o /tmp/get.txt -- \\
        .venv/bin/python bench/profile_hot.py --loop get-hit --count 2000000
    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \\
        .venv/bin/python bench/profile_hot.py --small-map --loop get-hit --count 20000 --records 10000
    .venv/bin/python bench/profile_hot.py --cprofile get-hit
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import compare  # noqa: E402

KIND = compare.KIND
pc = time.perf_counter_ns


def per_call_ns(fn: Callable[[], Any], loops: int, reps: int) -> float:
    """Median over ``reps`` of the mean time of one ``fn()`` call in a loop of ``loops``."""
    out = []
    for _ in range(reps):
        t0 = pc()
        for _ in range(loops):
            fn()
        out.append((pc() - t0) / loops)
    return statistics.median(out)


class Fixture:
    """A populated, exactly full cache plus a raw lmdb floor with the same records."""

    def __init__(self, root: str, core: str, n: int, record_size: int) -> None:
        self.n = n
        self.data = compare.payloads(record_size)
        self.peer = compare.make_peer("nvcache" if core == "ext" else "nvcache-py", os.path.join(root, "nv"))
        self.peer.create(n * record_size)
        self.peer.populate((compare.layer_id(i), self.data[i % len(self.data)]) for i in range(n))
        self.peer.settle()
        self.cache = self.peer.cache
        self.lm = compare.make_peer("lmdb-nolock", os.path.join(root, "lmdb"))
        self.lm.create(0)
        self.lm.populate((compare.layer_id(i), self.data[i % len(self.data)]) for i in range(n))
        rng = random.Random(2)
        self.hot = [compare.layer_id(rng.randrange(n)) for _ in range(1000)]
        self.fresh = 0

    def new_ids(self, count: int) -> List[str]:
        base = 7 * 10 ** 9 + self.fresh
        self.fresh += count
        return [compare.layer_id(base + i) for i in range(count)]


def cycle(seq: List[Any]) -> Callable[[], Any]:
    it = iter(seq)
    n = [0]

    def nxt() -> Any:
        nonlocal it
        try:
            return next(it)
        except StopIteration:
            it = iter(seq)
            n[0] += 1
            return next(it)
    return nxt


def get_hit_steps(fx: Fixture, loops: int, reps: int) -> List[Tuple[int, str, float]]:
    """(depth, label, ns per call) for the get-hit path, outermost first."""
    cache = fx.cache
    store = cache._opened()
    core = cache._core
    buf = store.buffer
    hot = fx.hot
    rows: List[Tuple[int, str, float]] = []
    # keep the buffer from becoming due during the measurement (the apply is measured on its own)
    saved = (buf.max_age_ns, buf.max_keys)
    buf.max_age_ns, buf.max_keys = 10 ** 18, 10 ** 9

    def flush_after(fn: Callable[[], Any]) -> Callable[[], Any]:
        return fn

    nxt = cycle(hot)
    get = cache.get
    rows.append((0, "LayerCache.get (cache.py)", per_call_ns(lambda: get(nxt()), loops, reps)))
    store.flush()
    names = [core.record_name(lid, KIND)[0] for lid in hot]
    keys = [core.name_key(nm) for nm in names]
    rk = core.record_key
    rows.append((1, "record_key (validate id + kind, xxh3-128)", per_call_ns(lambda: rk(nxt(), KIND), loops, reps)))
    nkey0 = cycle(keys)
    slook = store.lookup
    rows.append((1, "Store.lookup (store.py)", per_call_ns(lambda: slook(nkey0()), loops, reps)))
    reader = store.reader
    rlook = reader.lookup
    rows.append((2, "core Reader.lookup (lock, read, unlock)", per_call_ns(lambda: rlook(nkey0()), loops, reps)))
    count = buf.count
    blob0 = rlook(keys[0])
    rows.append((1, "core AccessBuffer.count (a hit)", per_call_ns(lambda: count(nkey0(), blob0[0], blob0[1]), loops, reps)))
    buf.take()
    batch = keys[:64]
    rmany = reader.lookup_many
    rows.append((2, "core Reader.lookup_many, per key (64 keys)", per_call_ns(lambda: rmany(batch), loops // 64 + 1, reps) / 64))
    rn = core.record_name
    rows.append((3, "record_name (validate id + kind)", per_call_ns(lambda: rn(nxt(), KIND), loops, reps)))
    nn = cycle(names)
    nk = core.name_key
    rows.append((3, "name_key (xxh3-128 of the name)", per_call_ns(lambda: nk(nn()), loops, reps)))
    mutex = store.lock.mutex if hasattr(store.lock, "mutex") else threading.Lock()

    def mtx() -> None:
        mutex.acquire(False)
        mutex.release()
    rows.append((3, "threading mutex acquire+release", per_call_ns(mtx, loops, reps)))
    fd = getattr(store.lock, "fd", getattr(store.lock, "_fd", -1))
    flock, SH, NB, UN = fcntl.flock, fcntl.LOCK_SH, fcntl.LOCK_NB, fcntl.LOCK_UN

    def fl() -> None:
        flock(fd, SH | NB)
        flock(fd, UN)
    rows.append((3, "flock LOCK_SH|NB + LOCK_UN (2 syscalls, via fcntl)", per_call_ns(fl, loops, reps)))

    def fl_full() -> None:
        store.lock.acquire(False)
        store.lock.release()
    rows.append((3, "FileLock.acquire(shared)+release (locking.py)", per_call_ns(fl_full, loops, reps)))
    begin = store.files.env.begin

    def txn_ba() -> None:
        begin().abort()
    rows.append((3, "env.begin() + txn.abort() (lock=False)", per_call_ns(txn_ba, loops, reps)))
    index = store.files.index
    nkey = cycle(keys)
    txn = begin()
    try:
        look = index.lookup
        rows.append((3, "Index.lookup (py-lmdb txn: fallback's)", per_call_ns(lambda: look(txn, nkey()), loops, reps)))
        idx, dat = index.idx, index.dat
        tget = txn.get
        rows.append((4, "txn.get idx header", per_call_ns(lambda: tget(nkey(), None, idx), loops, reps)))
        rows.append((4, "txn.get dat (2 KiB copy to bytes)",
                     per_call_ns(lambda: tget(nkey() + b"\0\0\0\0", None, dat), loops, reps)))
        import xxhash
        blob = tget(keys[0] + b"\0\0\0\0", None, dat)  # first chunk
        x64 = xxhash.xxh3_64_intdigest
        rows.append((4, "xxh3-64 checksum of the record", per_call_ns(lambda: x64(blob), loops, reps)))
    finally:
        txn.abort()
    tn = time.time_ns

    def hit() -> None:
        buf.hit(nkey(), tn(), 1)
    rows.append((3, "AccessBuffer.hit + time_ns", per_call_ns(hit, loops, reps)))
    buf.take()
    buf.max_age_ns, buf.max_keys = saved
    lm_get = fx.lm.getter()
    lkeys = cycle([h.encode() for h in hot])
    rows.append((0, "floor: raw lmdb begin + get + abort (lock=False)", per_call_ns(lambda: lm_get(lkeys()), loops, reps)))
    rows.append((0, "loop + lambda + cycle overhead (in every row)", per_call_ns(lambda: nxt(), loops, reps)))
    return rows


def apply_steps(fx: Fixture, reps: int) -> List[Tuple[int, str, float]]:
    """flush() after k distinct get-hits, per pending key (the buffer is never due meanwhile)."""
    cache = fx.cache
    buf = cache._opened().buffer
    saved = buf.max_age_ns, buf.max_keys
    buf.max_age_ns, buf.max_keys = 1 << 62, 1 << 30
    rows = []
    rng = random.Random(9)
    try:
        for k in (64, 512, min(4000, fx.n)):
            t = []
            for _ in range(reps):
                for i in rng.sample(range(fx.n), k):
                    cache.get(compare.layer_id(i))
                t0 = pc()
                cache.flush()
                t.append((pc() - t0) / k)
            rows.append((0, f"flush() after {k} distinct get-hits, per key", statistics.median(t)))
    finally:
        buf.max_age_ns, buf.max_keys = saved
    return rows


def put_evict_steps(fx: Fixture, loops: int, reps: int) -> List[Tuple[int, str, float]]:
    cache = fx.cache
    store = cache._opened()
    core = cache._core
    index = store.files.index
    data = fx.data[0]
    rows: List[Tuple[int, str, float]] = []
    store.flush()
    total_loops = loops * reps
    ids = cycle(fx.new_ids(total_loops + 10))
    put = cache.put
    rows.append((0, "LayerCache.put into a full cache (commit, evicts 1)", per_call_ns(lambda: put(ids(), data), loops, reps)))
    max_bytes = cache.max_bytes
    empty: frozenset = frozenset()
    ids2 = cycle(fx.new_ids(total_loops + 10))

    def store_write() -> None:
        name, n = core.record_name(ids2(), KIND)
        store.insert(core.name_key(name), name, n, data, empty)
    rows.append((1, "Store.insert incl. name+key (store.py)", per_call_ns(store_write, loops, reps)))
    lock = store.lock

    def lk() -> None:
        lock.acquire(True)
        lock.release()
    rows.append((2, "FileLock.acquire(exclusive)+release", per_call_ns(lk, loops, reps)))
    fd = getattr(lock, "fd", getattr(lock, "_fd", -1))

    def fl() -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    rows.append((3, "flock LOCK_EX|NB + LOCK_UN", per_call_ns(fl, loops, reps)))
    rows.append((2, "Store._replaced() (fstat of data.mdb)", per_call_ns(store._replaced, loops, reps)))
    take = store.buffer.take
    rows.append((2, "AccessBuffer.take() (empty)", per_call_ns(take, loops, reps)))
    begin = store.files.env.begin

    def wb() -> None:
        begin(write=True).abort()
    rows.append((2, "env.begin(write=True) + abort", per_call_ns(wb, loops, reps)))
    pre = [(core.name_key(core.record_name(i, KIND)[0]),) + core.record_name(i, KIND) for i in fx.new_ids(64)]
    nxt = cycle(pre)

    def ins_abort() -> None:
        key, name, n = nxt()
        txn = begin(write=True)
        try:
            index.insert(txn, key, name, n, data, index.victims(txn, len(data), max_bytes, empty))
        finally:
            txn.abort()
    rows.append((2, "begin(write) + victims + insert (evicts 1) + abort (py-lmdb)", per_call_ns(ins_abort, loops, reps)))

    def walk1() -> None:
        txn = begin(write=True)
        try:
            index.victims(txn, len(data), max_bytes, empty)
        finally:
            txn.abort()
    rows.append((3, "begin(write) + Index.victims (py-lmdb) + abort", per_call_ns(walk1, loops, reps)))
    import xxhash
    rows.append((3, "xxh3-64 of the new record", per_call_ns(lambda: xxhash.xxh3_64_intdigest(data), loops, reps)))
    def committing(begin_txn: Callable[[], Any]) -> Callable[[], None]:
        """One insert (evicting one) committed in a transaction from ``begin_txn``: no lock, no Store."""
        ids_ = cycle(fx.new_ids(total_loops + 10))

        def run() -> None:
            name, n = core.record_name(ids_(), KIND)
            key = core.name_key(name)
            if store.files.room is not None:
                store.files.room.begin()  # what Store._write does before a transaction (write map)
            txn = begin_txn()
            try:
                index.insert(txn, key, name, n, data, index.victims(txn, len(data), max_bytes, empty))
            except BaseException:
                txn.abort()
                raise
            txn.commit()
        return run
    rows.append((2, "begin(write) + Index.insert + commit (no lock, no Python layers)",
                 per_call_ns(committing(lambda: begin(write=True)), loops, reps)))
    writer = store.files.writer
    if writer is not None and type(writer).__module__ != "nvcache.fallback":
        rows.append((2, "the same through the C API (Writer; the put path)",
                     per_call_ns(committing(writer.begin), loops, reps)))
    lm = fx.lm
    ev = lm.evict_putter()
    lids = cycle([i.encode() for i in fx.new_ids(total_loops + 10)])
    rows.append((0, "floor: raw lmdb begin(write) + put + delete oldest + commit", per_call_ns(lambda: ev(lids(), data), loops, reps)))
    return rows


def render(title: str, rows: List[Tuple[int, str, float]]) -> str:
    out = [f"{title}", "-" * len(title)]
    for depth, label, ns in rows:
        out.append(f"{'  ' * depth}{label:<{64 - 2 * depth}} {ns / 1000:8.3f} µs")
    return "\n".join(out)


def loop(op: str, fx: Fixture, count: int) -> None:
    cache = fx.cache
    if op == "get-hit":
        hot = fx.hot
        get = cache.get
        for i in range(count):
            get(hot[i % 1000])
    elif op == "put-evict":
        data = fx.data[0]
        put = cache.put
        for lid in fx.new_ids(count):
            put(lid, data)
    else:
        raise SystemExit(f"unknown op {op}")


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--record-size", type=int, default=2048)
    ap.add_argument("--core", choices=("ext", "py"), default="ext")
    ap.add_argument("--loops", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--loop", default=None, help="run a plain loop of this op (get-hit, put-evict) and exit")
    ap.add_argument("--count", type=int, default=200_000)
    ap.add_argument("--cprofile", default=None, help="cProfile this op's loop and print the top functions")
    ap.add_argument("--small-map", action="store_true",
                    help="1 GiB LMDB maps for the peers (valgrind cannot reserve large address spaces; "
                         "nvcache's map grows with its file)")
    ap.add_argument("--warm-puts", type=int, default=0,
                    help="untimed puts before the put steps (the records' count: every page touched once)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    if args.small_map:
        compare.LMDB_MAP = 1 << 30
    root = tempfile.mkdtemp(prefix="nvcache-prof-", dir=args.workdir)
    try:
        fx = Fixture(root, args.core, args.records, args.record_size)
        if args.loop:
            t0 = time.perf_counter()
            loop(args.loop, fx, args.count)
            print(f"{args.loop} x {args.count}: {(time.perf_counter() - t0) / args.count * 1e6:.2f} µs/op")
            return 0
        if args.cprofile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            loop(args.cprofile, fx, args.count)
            prof.disable()
            st = pstats.Stats(prof)
            st.sort_stats("tottime").print_stats(25)
            return 0
        res: Dict[str, Any] = {"records": args.records, "core": args.core}
        g = get_hit_steps(fx, args.loops, args.reps)
        print(render(f"get-hit, {args.core} core, {args.records:,} records (1000 hot keys, buffer never due)", g))
        a = apply_steps(fx, 3)
        print(render("applying buffered accesses", a))
        if args.warm_puts:
            put, data = fx.cache.put, fx.data
            for i, lid in enumerate(fx.new_ids(args.warm_puts)):
                put(lid, data[i % len(data)])
        p = put_evict_steps(fx, max(args.loops // 10, 500), args.reps)
        warm = f", after {args.warm_puts:,} untimed puts" if args.warm_puts else ""
        print(render(f"put-evict, {args.core} core, {args.records:,} records{warm}", p))
        res.update(get_hit=g, apply=a, put_evict=p)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        fx.peer.close()
        fx.lm.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
