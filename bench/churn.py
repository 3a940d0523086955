"""Long churn of mixed-size records: does nvcache's ``data.mdb`` stay within 2x the bound + 64 MiB?

Both its disk use (allocated blocks) and its length (``ls -l``: under LMDB's write map the
file is as long as the map, which grows with use up to ``writemap.map_limit``) are checked.

LMDB reuses freed pages, but a large value needs a run of contiguous free
pages (an overflow chain), so a mix of small and large records can fragment
the free list and make the file grow. This script writes ``--factor`` times
the bound through one cache (every put past the first fill evicts), with two
Zipf-ish reads per put (so the LRU order is not plain FIFO) and an occasional
delete, and samples the file size as it goes.

Run (also called from bench/compare.py)::

    .venv/bin/python bench/churn.py                      # 64 MiB bound, 16x churn, compiled core
    .venv/bin/python bench/churn.py --bound-mb 32 --factor 4 --core py --json /tmp/churn.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List, Tuple

MiB = 1 << 20

# (share of puts, smallest, largest) - sizes are log-uniform within each band.
SIZE_BANDS: Tuple[Tuple[float, int, int], ...] = (
    (0.60, 256, 8 << 10),
    (0.30, 8 << 10, 128 << 10),
    (0.09, 128 << 10, 1 << 20),
    (0.01, 1 << 20, 8 << 20),
)


def mixed_size(rng: random.Random) -> int:
    """One record size drawn from :data:`SIZE_BANDS`."""
    r = rng.random()
    for share, lo, hi in SIZE_BANDS:
        if r < share:
            return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        r -= share
    return SIZE_BANDS[-1][2]


def cache_class(core: str) -> type:
    """A LayerCache subclass bound to the compiled ("ext") or pure-Python ("py") core."""
    import nvcache
    from nvcache import fallback

    if core == "py":
        mod = fallback
    else:
        from nvcache import _index as mod  # noqa: F811 - fail loudly when the extension is not built
    return type(f"LayerCache_{core}", (nvcache.LayerCache,), {"_core": mod})


def run_churn(path: str, core: str = "ext", bound_mb: float = 64, factor: float = 16.0,
              seed: int = 1, samples: int = 64) -> Dict[str, Any]:
    """Churn ``factor`` x ``bound_mb`` MiB of mixed-size records through a cache at ``path``.

    ``max_file`` is the largest disk use of data.mdb seen (allocated blocks, capped by its size).
    """
    from nvcache import CacheError
    from nvcache.cachedir import format_dir

    rng = random.Random(seed)
    bound = int(bound_mb * MiB)
    blob = random.Random(seed + 1).randbytes(SIZE_BANDS[-1][2] + MiB)
    cls = cache_class(core)
    cache = cls(path, bound_mb)
    data_file = os.path.join(format_dir(path), "data.mdb")
    target = int(factor * bound)
    step = max(target // samples, 1)
    recent: List[str] = []
    written = puts = gets = deletes = errors = 0
    next_sample = 0
    series: List[Dict[str, int]] = []
    max_file = 0
    t0 = time.perf_counter()
    i = 0
    while written < target:
        size = mixed_size(rng)
        lid = f"sha256:churn{seed:04d}{i:012d}"
        i += 1
        off = rng.randrange(len(blob) - size)
        try:
            cache.put(lid, blob[off:off + size])
        except CacheError:
            errors += 1
        puts += 1
        written += size
        recent.append(lid)
        if len(recent) > 2048:
            del recent[:1024]
        for _ in range(2):  # skewed to the newest: they are the ones still present
            j = len(recent) - 1 - min(int(rng.paretovariate(1.2)) - 1, len(recent) - 1)
            cache.get(recent[j])
            gets += 1
        if rng.random() < 0.02 and recent:
            cache.delete(recent.pop(rng.randrange(len(recent))))
            deletes += 1
        if written >= next_sample:
            series.append(_sample(cache, data_file, written))
            max_file = max(max_file, series[-1]["used"])
            next_sample += step
    cache.flush()
    series.append(_sample(cache, data_file, written))
    max_file = max(max_file, series[-1]["used"])
    problems = cache.verify()
    cache.close()
    from nvcache.writemap import map_limit
    limit = map_limit(bound)
    max_apparent = max(p["file"] for p in series)
    return {
        "core": core, "bound": bound, "limit": limit, "factor": factor, "written": written,
        "puts": puts, "gets": gets, "deletes": deletes, "errors": errors,
        "elapsed_s": time.perf_counter() - t0, "max_file": max_file, "final_file": series[-1]["used"],
        "max_apparent": max_apparent,
        "met": max_file <= limit and max_apparent <= limit, "verify_problems": problems[:5], "series": series,
        "size_bands": [list(b) for b in SIZE_BANDS],
    }


def _sample(cache: Any, data_file: str, written: int) -> Dict[str, int]:
    """File size now. ``used`` = allocated blocks (st_size is the whole map if LMDB runs with writemap)."""
    st = os.stat(data_file)
    stats = cache.stats()
    high_water = -1
    try:  # LMDB's own high-water mark, when the store exposes its environment
        env = cache._opened().env
        high_water = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    except Exception:
        pass
    used = min(st.st_size, st.st_blocks * 512)
    return {"written": written, "file": st.st_size, "allocated": st.st_blocks * 512, "used": used,
            "high_water": high_water, "total": int(stats["record_total_size"] or 0),
            "records": int(stats["record_count"] or 0)}


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bound-mb", type=float, default=64)
    ap.add_argument("--factor", type=float, default=16.0, help="bytes written as a multiple of the bound")
    ap.add_argument("--core", choices=("ext", "py"), default="ext")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", default=None, help="where to create the scratch cache (default: a temp dir)")
    ap.add_argument("--json", default=None, help="write the result here")
    args = ap.parse_args(argv)
    root = tempfile.mkdtemp(prefix="nvcache-churn-", dir=args.workdir)
    try:
        res = run_churn(os.path.join(root, "cache"), args.core, args.bound_mb, args.factor, args.seed)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"core={res['core']} bound={res['bound'] / MiB:.0f} MiB written={res['written'] / MiB:.0f} MiB "
          f"puts={res['puts']} in {res['elapsed_s']:.1f} s: data.mdb max {res['max_file'] / MiB:.1f} MiB used, "
          f"{res['max_apparent'] / MiB:.1f} MiB long, "
          f"final {res['final_file'] / MiB:.1f} MiB, limit {res['limit'] / MiB:.0f} MiB -> "
          f"{'met' if res['met'] else 'NOT met'}; verify: {res['verify_problems'] or 'ok'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
