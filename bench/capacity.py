"""Capacity: how many scanner-shaped records a bound holds, and what storing them costs.

Layouts compared on the same records, in one run:

* ``scanner``        - the seed scanner's layout (bench/seedcache.py: one gzip -6 file per
                       record, ``size`` = the file's length, a JSON index rewritten per call);
* ``nvcache``        - LayerCache as shipped: zstd, with the dictionary the cache trains itself
                       (first at ``codec.TRAIN_AT`` records);
* ``nvcache-nodict`` - LayerCache with dictionary training switched off (``codec.MAX_DICTIONARIES
                       = 0`` in this process only): plain zstd frames;
* ``nvcache-raw``    - LayerCache(compress=False): records stored as given.

Record sets (built here, seeds fixed): scanner-shaped JSON from ``nvcache.scanrecords``
(package lists, apps, file lists; tens of bytes to hundreds of KB) and the same sizes as
random bytes. For each layout and set: stored bytes of the whole set (each record as it was
stored when put), the ratio to the scanner's bytes, how many of the most recent records fit
the bound (pure capacity, whatever the eviction rule), the records the cache actually held at
the end, and put / get cost per record (median and mean, µs). Then ``nvcache simulate``'s
byte-hit ratio at the same bound with compression on and off, on a catalogue larger than the
bound. Run::

    .venv/bin/python bench/capacity.py                    # ~4 minutes on 2 cores
    .venv/bin/python bench/capacity.py --records 1500 --no-simulate   # a quick look

Output: ``bench/results/capacity.json`` and ``capacity.md`` (``--out`` for another place).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import nvcache  # noqa: E402
from nvcache import codec, scanrecords  # noqa: E402
from nvcache import simulate as sim  # noqa: E402
from seedcache import SeedCache  # noqa: E402

MiB = 1024 * 1024
Records = List[Tuple[str, bytes]]


def _us(samples: Sequence[int]) -> Dict[str, float]:
    return {"median_us": round(statistics.median(samples) / 1000, 2),
            "mean_us": round(statistics.fmean(samples) / 1000, 2)} if samples else {}


def held_by_capacity(sizes: Sequence[int], bound: int) -> int:
    """How many of the most recent records (the end of ``sizes``) fit within ``bound`` bytes."""
    total = count = 0
    for size in reversed(sizes):
        if total + size > bound:
            break
        total += size
        count += 1
    return count


def run_scanner(records: Records, bound: int, root: str, ops: int) -> Dict[str, Any]:
    """The seed's layout. Its every call parses and rewrites the whole index, so only the last
    ``ops`` records are put one by one (timed); those before go in with one index write."""
    path = os.path.join(root, "scanner")
    stored = [len(gzip.compress(data, 6, mtime=0)) for _lid, data in records]
    fit = held_by_capacity(stored, bound)
    first = max(len(records) - fit, 0)
    timed = min(ops, len(records) - first)
    put_ns: List[int] = []
    get_ns: List[int] = []
    try:
        cache = SeedCache(path, bound / MiB)
        cache.bulk_load(records[first:len(records) - timed])  # what the bound holds, but the last ones
        for layer_id, data in records[len(records) - timed:]:
            t = time.perf_counter_ns()
            cache.put(layer_id, data)
            put_ns.append(time.perf_counter_ns() - t)
        held = [lid for lid, _ in records[first:] if os.path.exists(os.path.join(cache.ref_dir,
                                                                                  cache.record_name(lid)))]
        for layer_id in random.Random(7).choices(held, k=ops) if held else []:
            t = time.perf_counter_ns()
            cache.get(layer_id)
            get_ns.append(time.perf_counter_ns() - t)
        stats = cache.stats()
        cache.close()
    finally:
        shutil.rmtree(path, ignore_errors=True)
    return {"layout": "scanner", "stored_bytes": sum(stored), "raw_bytes": sum(len(d) for _, d in records),
            "fit_at_bound": fit, "held_at_end": int(stats["record_count"] or 0),
            "total_at_end": int(stats["record_total_size"] or 0), "dictionary": None,
            "put": _us(put_ns), "get_hit": _us(get_ns), "gets": len(get_ns),
            "note": f"the first {len(records) - timed - first} held records bulk-loaded, {timed} put one by one"}


def run_layout(name: str, records: Records, bound: int, root: str, gets: int) -> Dict[str, Any]:
    path = os.path.join(root, name)
    rng = random.Random(7)
    put_ns: List[int] = []
    get_ns: List[int] = []
    stored: List[int] = []
    saved_max = codec.MAX_DICTIONARIES
    if name == "nvcache-nodict":
        codec.MAX_DICTIONARIES = 0
    try:
        cache = nvcache.LayerCache(path, bound / MiB, compress=name != "nvcache-raw")
        for layer_id, data in records:
            stored.append(cache.stored_size(data))  # untimed: what this put stores (the current dictionary)
            t = time.perf_counter_ns()
            cache.put(layer_id, data)
            put_ns.append(time.perf_counter_ns() - t)
        held_ids = [r["layer_id"][: -len("_layer_file")] for r in cache.cache_data()["cache_records"]]
        for layer_id in rng.choices(held_ids, k=min(gets, 20 * len(held_ids))) if held_ids else []:
            t = time.perf_counter_ns()
            cache.get(layer_id)
            get_ns.append(time.perf_counter_ns() - t)
        stats = cache.stats()
        dictionaries = cache._store.reader.codec  # which dictionary the cache ended with (a bench may look)
        cache.close()
    finally:
        codec.MAX_DICTIONARIES = saved_max
        shutil.rmtree(path, ignore_errors=True)
    return {"layout": name, "stored_bytes": sum(stored), "raw_bytes": sum(len(d) for _, d in records),
            "fit_at_bound": held_by_capacity(stored, bound), "held_at_end": int(stats["record_count"] or 0),
            "total_at_end": int(stats["record_total_size"] or 0),
            "dictionary": dictionaries.current,
            "put": _us(put_ns), "get_hit": _us(get_ns), "gets": len(get_ns)}


def run_simulations(bound_mb: float, args: argparse.Namespace) -> List[Dict[str, Any]]:
    out = []
    for compress in (True, False):
        path = sim.fresh_path()
        try:
            r = sim.run(path, processes=2, images=args.sim_images, layers=args.sim_layers, scans=args.sim_scans,
                        max_mb=bound_mb, seed=1, duration=600, compress=compress)
        finally:
            shutil.rmtree(path, ignore_errors=True)
        out.append({"compress": compress, "bound_mb": bound_mb, "catalogue_bytes": r.catalogue_bytes,
                    "byte_hit_ratio": round(r.byte_hit_ratio, 4), "hit_ratio": round(r.hit_ratio, 4),
                    "stored_byte_hit_ratio": round(r.stored_byte_hit_ratio, 4),
                    "optimum_stored_byte_hit_ratio": round(r.optimum_byte_hit_ratio, 4),
                    "time_saved_s": round(r.time_saved_s, 2), "scans": r.scans_done, "evictions": r.evictions,
                    "wrong_records": r.wrong_records})
        print(f"  simulate bound {bound_mb} MiB compress={compress}: byte-hit {r.byte_hit_ratio:.3f}", flush=True)
    return out


def markdown(doc: Dict[str, Any]) -> str:
    L = [f"# Capacity at a {doc['bound_mb']} MiB bound", "",
         f"{doc['records']} records per set, seed {doc['seed']}; {doc['machine']}; load average "
         f"{doc['load_before']} before, {doc['load_after']} after. Stored bytes: each record as stored when put. "
         "'fit' = most recent records that fit the bound; 'held' = what the cache held at the end "
         "(the scanner prunes 256 at a time at the bound).", ""]
    for set_name, rows in doc["sets"].items():
        scanner = next(r for r in rows if r["layout"] == "scanner")["stored_bytes"]
        L += [f"## {set_name}", "", "| layout | stored bytes | vs scanner | fit | held | put µs med / mean | "
              "get-hit µs med / mean |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            L.append(f"| {r['layout']} | {r['stored_bytes']:,} | {r['stored_bytes'] / scanner:.3f} | {r['fit_at_bound']:,} "
                     f"| {r['held_at_end']:,} | {r['put'].get('median_us')} / {r['put'].get('mean_us')} | "
                     f"{r['get_hit'].get('median_us')} / {r['get_hit'].get('mean_us')} |")
        L.append(f"\nraw bytes of the set: {rows[0]['raw_bytes']:,}\n")
    if doc.get("simulate"):
        L += ["## nvcache simulate (2 processes)", "", "| bound MiB | catalogue | compress | byte-hit | hit | "
              "stored-byte-hit | optimum (stored) | time saved s |", "|---:|---:|---|---:|---:|---:|---:|---:|"]
        for s in doc["simulate"]:
            L.append(f"| {s['bound_mb']} | {s['catalogue_bytes'] / MiB:.1f} MiB | {s['compress']} | "
                     f"{100 * s['byte_hit_ratio']:.1f} % | {100 * s['hit_ratio']:.1f} % | "
                     f"{100 * s['stored_byte_hit_ratio']:.1f} % | {100 * s['optimum_stored_byte_hit_ratio']:.1f} % | "
                     f"{s['time_saved_s']} |")
    return "\n".join(L) + "\n"


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=6000, help="records per set")
    ap.add_argument("--bound-mb", type=float, default=16.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--gets", type=int, default=20000, help="timed gets per nvcache layout")
    ap.add_argument("--scanner-ops", type=int, default=200, help="timed puts and gets of the seed's layout")
    ap.add_argument("--no-simulate", dest="simulate", action="store_false")
    ap.add_argument("--sim-images", type=int, default=4000)
    ap.add_argument("--sim-layers", type=int, default=24000)
    ap.add_argument("--sim-scans", type=int, default=30000)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    bound = int(args.bound_mb * MiB)
    doc: Dict[str, Any] = {"bound_mb": args.bound_mb, "records": args.records, "seed": args.seed,
                           "load_before": [round(x, 2) for x in os.getloadavg()],
                           "machine": f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
                                      f"nvcache.EXTENSION={nvcache.EXTENSION}, zstd level {codec.SMALL_LEVEL} below "
                                      f"{codec.LARGE} B, {codec.LEVEL} above",
                           "sets": {}}
    json_set = scanrecords.record_set(args.records, args.seed)
    random_set = [(lid, scanrecords.incompressible_record(lid, len(data))) for lid, data in json_set]
    root = tempfile.mkdtemp(prefix="nvcache-capacity-")
    try:
        for set_name, records in (("scanner-shaped JSON", json_set), ("incompressible", random_set)):
            rows = []
            rows.append(run_scanner(records, bound, root, args.scanner_ops))
            for layout in ("nvcache", "nvcache-nodict", "nvcache-raw"):
                rows.append(run_layout(layout, records, bound, root, args.gets))
                print(f"{set_name} {layout}: {rows[-1]['stored_bytes']:,} B, fit {rows[-1]['fit_at_bound']}", flush=True)
            doc["sets"][set_name] = rows
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.simulate:
        doc["simulate"] = run_simulations(args.bound_mb, args) + run_simulations(2.0, argparse.Namespace(
            sim_images=1000, sim_layers=6000, sim_scans=12000))  # and the demo's own catalogue and bound
    doc["load_after"] = [round(x, 2) for x in os.getloadavg()]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "capacity.json"), "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.join(args.out, "capacity.md"), "w") as f:
        f.write(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
