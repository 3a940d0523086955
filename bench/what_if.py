"""What-if experiments behind the suggestions in the performance report (not part of compare.py).

1. ``writemap``: nvcache unchanged except that its LMDB environment is opened
   with ``writemap=True`` (patched in at ``lmdb.Environment``): put-evict,
   the apply of buffered accesses, get-hit, anonymous-memory growth of a
   20k-get run, and disk use. The commit of a put without writemap pwrite()s
   ~20 scattered pages (idx, dat, lru, meta trees + freelist); with writemap
   they are already in the shared map.
2. ``chunks``: raw LMDB under the churn of bench/churn.py (FIFO eviction at a
   64 MiB bound), values stored whole vs split into fixed-size chunks: large
   overflow values fragment the free list and grow the file; equal-sized
   chunks do not.

Run::

    .venv/bin/python bench/what_if.py                   # both, 100k records / 8 GiB churn
    .venv/bin/python bench/what_if.py writemap --records 1000000
    .venv/bin/python bench/what_if.py chunks --factor 32
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

MiB = 1 << 20


def _patch_writemap(writemap: bool) -> None:
    import lmdb

    from nvcache import store

    real = lmdb.Environment

    def env(*a: Any, **kw: Any) -> Any:
        kw["writemap"] = writemap
        return real(*a, **kw)

    store.lmdb.Environment = env  # type: ignore[attr-defined]


def _writemap_child(phase: str, writemap: bool, n: int, path: str) -> Dict[str, Any]:
    """``populate`` a cache, or ``measure`` it in a fresh process (so the heap starts clean)."""
    _patch_writemap(writemap)
    import compare

    peer = compare.make_peer("nvcache", path)
    data = compare.payloads(2048)
    if phase == "populate":
        peer.create(n * 2048)
        peer.populate((compare.layer_id(i), data[i % len(data)]) for i in range(n))
        peer.close()
        return {}
    peer.max_mb = n * 2048 / MiB
    base = compare.rss_anon_kib()
    peer.open()
    cache = peer.cache
    rng = random.Random(1)
    gets = [compare.layer_id(rng.randrange(n)) for _ in range(20000)]
    lat = []
    for lid in gets:
        t0 = time.perf_counter_ns()
        cache.get(lid)
        lat.append(time.perf_counter_ns() - t0)
    cache.flush()
    grown = compare.rss_anon_kib() - base
    apply = []
    for _ in range(3):
        for i in rng.sample(range(n), 4000):
            cache.get(compare.layer_id(i))
        t0 = time.perf_counter_ns()
        cache.flush()
        apply.append((time.perf_counter_ns() - t0) / 4000)
    puts = []
    for r in range(5):
        t0 = time.perf_counter_ns()
        for i in range(1000):
            cache.put(compare.layer_id(9 * 10 ** 9 + r * 1000 + i), data[i % len(data)])
        puts.append((time.perf_counter_ns() - t0) / 1000)
    problems = cache.verify()
    peer.close()
    from nvcache.cachedir import format_dir
    st = os.stat(os.path.join(format_dir(path), "data.mdb"))
    return {"writemap": writemap, "records": n, "put_evict_us": statistics.median(puts) / 1000,
            "apply_per_key_us": statistics.median(apply) / 1000,
            "get_hit_median_us": statistics.median(lat) / 1000, "get_hit_mean_us": statistics.mean(lat) / 1000,
            "rss_anon_growth_kib_20k_gets": grown, "file_mib": st.st_size / MiB,
            "allocated_mib": st.st_blocks * 512 / MiB, "verify": problems[:3]}


def writemap(n: int) -> List[Dict[str, Any]]:
    out = []
    for wm in (False, True):
        root = tempfile.mkdtemp(prefix="nvcache-whatif-")
        try:
            for phase in ("populate", "measure"):
                res = subprocess.run([sys.executable, os.path.abspath(__file__), "_writemap_child", phase,
                                      str(int(wm)), str(n), os.path.join(root, "nv")],
                                     capture_output=True, text=True, timeout=900)
                if res.returncode != 0:
                    raise SystemExit(res.stderr)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        out.append(r)
        print(f"writemap={str(r['writemap']):5s} N={n:,}: put-evict {r['put_evict_us']:.1f} µs, apply "
              f"{r['apply_per_key_us']:.1f} µs/key, get-hit median {r['get_hit_median_us']:.2f} µs / mean "
              f"{r['get_hit_mean_us']:.2f} µs, RssAnon +{r['rss_anon_growth_kib_20k_gets']} KiB over open + 20k gets (fresh process), "
              f"data.mdb {r['file_mib']:.0f} MiB apparent / {r['allocated_mib']:.0f} MiB allocated, "
              f"verify {r['verify'] or 'ok'}")
    return out


def chunks(factor: float, bound_mb: float = 64) -> List[Dict[str, Any]]:
    import lmdb

    import churn

    out = []
    for chunk in (0, 65536 - 32, 4080):
        root = tempfile.mkdtemp(prefix="nvcache-whatif-")
        try:
            env = lmdb.open(root, map_size=64 << 30, lock=False, sync=False, metasync=False)
            rng = random.Random(1)
            blob = random.Random(2).randbytes(9 * MiB)
            fifo: collections.deque = collections.deque()
            bound = int(bound_mb * MiB)
            total = written = i = peak = 0
            t0 = time.perf_counter()
            while written < factor * bound:
                size = churn.mixed_size(rng)
                off = rng.randrange(len(blob) - size)
                v = blob[off:off + size]
                k = b"%012d" % i
                i += 1
                with env.begin(write=True) as txn:
                    if chunk:
                        for c in range(0, size, chunk):
                            txn.put(k + b"%04d" % (c // chunk), v[c:c + chunk])
                    else:
                        txn.put(k, v)
                    fifo.append((k, size))
                    total += size
                    while total > bound:
                        ok, osz = fifo.popleft()
                        total -= osz
                        if chunk:
                            for c in range(0, osz, chunk):
                                txn.delete(ok + b"%04d" % (c // chunk))
                        else:
                            txn.delete(ok)
                written += size
                if i % 256 == 0:
                    peak = max(peak, os.path.getsize(os.path.join(root, "data.mdb")))
            peak = max(peak, os.path.getsize(os.path.join(root, "data.mdb")))
            env.close()
            r = {"chunk": chunk or "whole", "peak_mib": peak / MiB, "bound_mib": bound_mb,
                 "written_gib": written / (1 << 30), "seconds": time.perf_counter() - t0}
            out.append(r)
            print(f"raw LMDB churn, values {('in ' + str(chunk) + '-byte chunks') if chunk else 'whole'}: "
                  f"data.mdb peak {r['peak_mib']:.0f} MiB (bound {bound_mb:.0f} MiB, limit {2 * bound_mb + 64:.0f}) "
                  f"after {r['written_gib']:.1f} GiB in {r['seconds']:.1f} s")
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return out


def main(argv: List[str]) -> int:
    if argv[:1] == ["_writemap_child"]:
        print(json.dumps(_writemap_child(argv[1], argv[2] == "1", int(argv[3]), argv[4])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", nargs="*", default=["writemap", "chunks"])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--factor", type=float, default=128.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    res: Dict[str, Any] = {}
    if "writemap" in args.which:
        res["writemap"] = writemap(args.records)
    if "chunks" in args.which:
        res["chunks"] = chunks(args.factor)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
