"""LRU's multi-process fidelity: nvcache's hit ratio against exact LRU over the same merged log.

Issue 15, item 1. Reads are counted in a per-process access buffer and applied in batches
(DEVELOPERS.md, "Access buffer"), so a put that evicts in one process does not see the
references other processes have buffered: eviction is only approximately LRU across processes.
This bench measures how far from exact LRU that is.

**The run.** N scanner processes (``multiprocessing``, spawn) share one cache at a fixed bound.
A trace is a list of scans; a scan is an image's layers, bottom first, and ``keep`` for its puts
is that image's layers (a churn request is a one-layer "image"). Workers take the next scan from
one shared counter, in trace order, and do what ``nvcache.simulate``'s worker does: ``get``;
on a miss, "analyse" (sleep ``analysis_seconds(len(record))``, simulate's cost model:
``--analysis-us`` fixed plus ``--us-per-kib``), then ``put(record, keep=image)``. Records are
``simulate.make_record``'s scanner-shaped JSON, made once in the parent (so the analysis is a
sleep, not CPU that 8 processes on 2 cores would fight for). Every get is logged with the
CLOCK_REALTIME interval around it (the clock the cache stamps references and births with) and
whether it hit; every put with its interval, its outcome and the record's **stored** size,
``cache.stored_size(record)`` taken in the same process just before the put: the put encodes
with the same codec and dictionary (a process changes its dictionary only after a put), so
that is the size the put adds against the bound, which counts stored (compressed) bytes.
``cache_data()`` at the end checks it: every record left in the cache must have the size its
put logged (``size check`` in the JSON).

**The reference.** Exact LRU of whole records over the merged log of gets *and puts*, at the
same bound in stored bytes, with the cache's rules: a record enters at its put (not at the
miss: the analysis takes time, and a get of the layer by another process meanwhile misses in
both), evicting the least recently used records that are not in the put's ``keep`` until it
fits, and nothing at all when only kept records could make room (CacheFull) or the record is
larger than the bound; a put of a present record changes nothing (it is not a reference).
Where the reference's outcome differs from nvcache's, the reference follows its own world: a
reference hit that nvcache missed skips that process's put (it would not have analysed); a
reference miss that nvcache hit has no put in the log, so the record enters at that get (at
the stored size last logged for the layer). So at one process, with no other process's
buffer to miss, the reference is the cache's own rule and the two must agree request by
request (tests/test_fidelity.py).

**The order.** Events are merged by their end time (a hit's reference is stamped just after
its read, a put's birth just before its commit, both inside the logged interval). The only
order that changes an outcome by itself is a get of layer L overlapping another process's
put that stored L: the log cannot say which came first, the cache's answer can. A miss then
goes at its start (it read before the commit), a hit after the put (whose key goes to its
start). Every key stays inside its own operation's interval, so each process's order is kept;
``reordered`` counts these pairs. ``lru_at_miss`` is the literal alternative (the record
enters at the miss, as in a textbook trace replay): it also counts the misses of layers
being analysed by another process, which buffering has nothing to do with (get_or_create
removes those).

**The cache** starts empty, at the trace's bound, with a first dictionary trained on 500 of the
trace's records (seeded sample). A node's long-lived cache has its dictionaries; an empty one
trains its first at 200 records, and each process adopts the file's newest dictionary only
every 256 puts of its own (or when it decodes a record made with it), so in a run this short
the 8-process cells would store bigger records than the 1-process ones for much of the run
(seen: churn at 0.3 MiB, 44 % hits at 1 process and 31 % at 8, for nvcache and the reference
alike, before the dictionary was trained up front). The reference uses the logged sizes, so
either way the comparison holds; pre-training only makes the rows comparable with each other.

**Traces** (seeds fixed; lengths chosen so the whole matrix takes two to three minutes on 2 cores):

- ``demo``: ``nvcache simulate``'s defaults: 1,000 images over 6,000 layers (seed 1), its plan of
  12,000 scans (120,697 requests), 2 MiB bound. Compressed, its 5,005 requested records take
  2.5 MiB, so the cache is rarely short of room (95 % of requests hit).
- ``demo-tight``: the first 3,000 scans of that plan at 0.5 MiB (a quarter of their records'
  stored bytes): an LRU under pressure (about 75 % hits).
- ``burst``: the demo's registry; the first 1,500 scans of its plan, then a new base image is
  released and 80 % of the images are rebuilt on it (one new 5-layer base replacing each image's
  old base, and a new copy of every layer above it: rebuilt images that shared a layer share
  its copy); the other 1,500 scans are dense: 80 % rebuilt images (by popularity), 20 % old
  ones. 0.5 MiB.
- ``ohw`` (one-hit wonders): 3,000 scans of the demo's plan with 60 % of them replaced by images
  scanned exactly once: the shared layers (base and stack) of a popular image plus 1-4 layers
  of their own (sizes as the demo's application layers). 0.5 MiB.
- ``churn``: 9,000 requests uniform over 1,000 one-layer images (log-normal record sizes,
  median 2 KB): 0.7 MiB stored through a 0.3 MiB bound.
- ``mixed`` (processes that differ): two lanes of scans, taken by alternate workers. Lane 0 is
  the demo plan's scans of its 30 most popular images (nearly all hits: a reader's buffer is
  applied only when due, 1 s, 512 keys or, since session 9, max(8, records / 16) writes by
  anyone since its oldest reference, or at its rare evicting put); lane 1 is 1,500 images
  never seen before, 2-6 layers of their own each (log-normal, median 2 KB: every layer a miss
  and a put that evicts). 0.25 MiB. The case where other processes' buffered references are
  oldest when a put chooses its victims. One worker alternates between the lanes.

``--apply-after-ms`` is a what-if: the workers' access buffers are applied once that old
instead of the cache's 1 s (``nvcache.lifecycle.APPLY_AFTER_NS``, set in each worker before
it opens the cache). ``--apply-after-writes K`` emulates, in the worker, the fix proposed in
bench/results/session8/fidelity.md (made in the cache in session 9, with K = max(8, records /
16): this what-if now only adds a second, fixed K on top of it): after each get, a worker with pending references applies
them (without waiting for the lock, as a due buffer is applied) once the file's last
transaction id (LMDB's ``env.info()``) has moved K past where it was at the oldest of them,
i.e. once K writes (puts, mostly, each evicting a few records) happened meanwhile.
``--writes-due FLOOR,SHARE`` sets the cache's own limit instead (``lifecycle.APPLY_AFTER_WRITES``
and ``APPLY_AFTER_TURNOVER``, in each worker before it opens the cache): a buffer is due after
max(FLOOR, records // SHARE) write transactions; ``--writes-due 1000000000000,1`` turns it off.
``--max-mb`` runs every trace at one bound.

Run::

    .venv/bin/python bench/fidelity.py                        # the matrix: 6 traces x 1, 2, 8 processes
    .venv/bin/python bench/fidelity.py --traces demo,churn --procs 8 --json /tmp/fid.json
    .venv/bin/python bench/fidelity.py --md bench/results/session8/fidelity.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pickle
import queue
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from nvcache import simulate
from nvcache.simulate import analysis_seconds, build_catalogue, make_record, plan_scans

# The demo's registry and plan (nvcache simulate's defaults; nvcache/clisim.py).
DEMO_IMAGES, DEMO_LAYERS, DEMO_SCANS, DEMO_MB, SEED = 1000, 6000, 12000, 2.0, 1
# The bound of the other image traces: about a quarter of what their records take stored
# (3,000 scans: 2-3 MiB). At the demo's 2 MiB their records nearly all fit, compressed.
IMAGE_MB = 0.5
MIXED_MB = 0.25  # the mixed trace's: where its readers' buffered references cost the most (see fidelity.md)
# New layers' record sizes, (median bytes, sigma) of a log-normal: as the demo's base and
# application layers (simulate's _BASE_SIZE and _APP_SIZE), and the churn's records.
BASE_SIZE = (8000.0, 1.2)
OWN_SIZE = (200.0, 2.0)
CHURN_SIZE = (2000.0, 1.0)
NEW_SIZE = (2000.0, 1.5)  # the mixed trace's new images: as the demo's stack layers
# Outcome of a request's put, in the log.
NO_PUT, STORED, PRESENT, FULL, TOO_LARGE, FAILED = range(6)
DICTIONARY_SAMPLES = 500  # records the cache's first dictionary is trained on before a run
FIELDS = 9  # per request: scan, layer, get t0, get t1, hit, put t0, put t1, stored size, outcome


# -- traces -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Trace:
    """Scans (layer indices, bottom first; ``keep`` = the scan's layers) over a set of layers."""

    name: str
    layer_ids: Tuple[str, ...]
    sizes: Tuple[int, ...]  # make_record's target size of each layer
    scans: Tuple[Tuple[int, ...], ...]
    max_mb: float
    # Scan indices per lane (None: one lane, every scan in order). Worker w serves lane w % lanes
    # (with fewer workers than lanes, worker w alternates between lanes w, w + N, ...).
    lanes: Optional[Tuple[Tuple[int, ...], ...]] = None

    @property
    def requests(self) -> int:
        return sum(len(s) for s in self.scans)


def _new_ids(tag: str, count: int, seed: int) -> List[str]:
    """Digests like the catalogue's, from their own seed space (never a catalogue layer's)."""
    return ["sha256:" + random.Random(f"{tag}:{seed}:{i}").getrandbits(256).to_bytes(32, "big").hex()
            for i in range(count)]


def _size(rng: random.Random, kind: Tuple[float, float]) -> int:
    median, sigma = kind
    return min(simulate.MAX_RECORD, max(simulate.MIN_RECORD, int(rng.lognormvariate(math.log(median), sigma))))


def _demo_parts(scans: int) -> Tuple[simulate.Catalogue, Tuple[int, ...]]:
    cat = build_catalogue(DEMO_IMAGES, DEMO_LAYERS, SEED)
    return cat, plan_scans(cat, DEMO_SCANS, SEED)[:scans]


def demo_trace(scans: int = DEMO_SCANS, max_mb: float = DEMO_MB, name: str = "demo") -> Trace:
    cat, plan = _demo_parts(scans)
    return Trace(name, cat.layer_ids, cat.sizes, tuple(cat.images[i] for i in plan), max_mb)


def base_of(cat: simulate.Catalogue) -> List[int]:
    """Each image's number of base layers: the prefix common to every image with its first layer.

    An image alone on its base gets its whole length (29 of the demo's 1,000 images, 1.6 % of
    the scans): rebuilt, such an image is the new base alone."""
    common: Dict[int, Tuple[int, ...]] = {}
    for image in cat.images:
        have = common.get(image[0])
        if have is None:
            common[image[0]] = image
        else:
            n = 0
            while n < min(len(have), len(image)) and have[n] == image[n]:
                n += 1
            common[image[0]] = have[:n]
    return [len(common[image[0]]) for image in cat.images]


def burst_trace(scans: int = 3000, rebuilt_share: float = 0.8, new_share: float = 0.8,
                base_layers: int = 5) -> Trace:
    cat, plan = _demo_parts(scans // 2)
    rng = random.Random(f"burst:{SEED}")
    ids, sizes = list(cat.layer_ids), list(cat.sizes)
    new_base = list(range(len(ids), len(ids) + base_layers))
    ids += _new_ids("burst-base", base_layers, SEED)
    sizes += [_size(rng, BASE_SIZE) for _ in new_base]
    copies: Dict[int, int] = {}
    fresh = _new_ids("burst-copy", DEMO_LAYERS, SEED)

    def copy(layer: int) -> int:
        if layer not in copies:
            copies[layer] = len(ids)
            ids.append(fresh[len(copies) - 1])
            sizes.append(cat.sizes[layer])  # the same content, rebuilt: a new digest
        return copies[layer]

    bases = base_of(cat)
    n = len(cat.images)
    rebuilt_of = {i: tuple(new_base + [copy(l) for l in cat.images[i][bases[i]:]])
                  for i in sorted(rng.sample(range(n), int(rebuilt_share * n)))}
    rebuilt = sorted(rebuilt_of)
    weights = [cat.weights[i] for i in rebuilt]
    out = [cat.images[i] for i in plan]
    for _ in range(scans - len(out)):
        if rng.random() < new_share:
            out.append(rebuilt_of[rng.choices(rebuilt, weights)[0]])
        else:
            out.append(cat.images[rng.choices(range(n), cat.weights)[0]])
    return Trace("burst", tuple(ids), tuple(sizes), tuple(out), IMAGE_MB)


def ohw_trace(scans: int = 3000, once_share: float = 0.6) -> Trace:
    cat, plan = _demo_parts(scans)
    rng = random.Random(f"ohw:{SEED}")
    users: Dict[int, int] = {}
    for image in cat.images:
        for l in image:
            users[l] = users.get(l, 0) + 1
    ids, sizes = list(cat.layer_ids), list(cat.sizes)
    fresh = _new_ids("ohw", 4 * scans, SEED)
    out = []
    for i in plan:
        if rng.random() < once_share:
            shared = [l for l in cat.images[rng.choices(range(len(cat.images)), cat.weights)[0]] if users[l] > 1]
            own = list(range(len(ids), len(ids) + rng.randint(1, 4)))
            ids += fresh[len(ids) - len(cat.layer_ids):][:len(own)]
            sizes += [_size(rng, OWN_SIZE) for _ in own]
            out.append(tuple(shared + own))
        else:
            out.append(cat.images[i])
    return Trace("ohw", tuple(ids), tuple(sizes), tuple(out), IMAGE_MB)


def mixed_trace(readers: int = DEMO_SCANS, new: int = 1500, max_mb: float = MIXED_MB, hot: int = 30) -> Trace:
    """Two lanes (see the module's docstring): the demo plan's scans of its ``hot`` most popular
    images, and ``new`` images of 2-6 layers of their own, never seen before."""
    cat, plan = _demo_parts(readers)
    top = set(sorted(range(len(cat.images)), key=lambda i: -cat.weights[i])[:hot])
    out = [cat.images[i] for i in plan if i in top]
    reading = len(out)
    rng = random.Random(f"mixed:{SEED}")
    ids, sizes = list(cat.layer_ids), list(cat.sizes)
    fresh = iter(_new_ids("mixed", 6 * new, SEED))
    for _ in range(new):
        own = list(range(len(ids), len(ids) + rng.randint(2, 6)))
        ids += [next(fresh) for _ in own]
        sizes += [_size(rng, NEW_SIZE) for _ in own]
        out.append(tuple(own))
    lanes = (tuple(range(reading)), tuple(range(reading, len(out))))
    return Trace("mixed", tuple(ids), tuple(sizes), tuple(out), max_mb, lanes)


def churn_trace(requests: int = 9000, keys: int = 1000, max_mb: float = 0.3) -> Trace:
    rng = random.Random(f"churn:{SEED}")
    sizes = tuple(_size(rng, CHURN_SIZE) for _ in range(keys))
    scans = tuple((rng.randrange(keys),) for _ in range(requests))
    return Trace("churn", tuple(_new_ids("churn", keys, SEED)), sizes, scans, max_mb)


TRACES = ("demo", "demo-tight", "burst", "ohw", "churn", "mixed")


def build_traces(names: Sequence[str], scale: float = 1.0) -> List[Trace]:
    """The named traces at their default lengths × ``scale``."""
    makers = {"demo": lambda: demo_trace(int(DEMO_SCANS * scale)),
              "demo-tight": lambda: demo_trace(int(3000 * scale), IMAGE_MB, "demo-tight"),
              "burst": lambda: burst_trace(int(3000 * scale)), "ohw": lambda: ohw_trace(int(3000 * scale)),
              "churn": lambda: churn_trace(int(9000 * scale)),
              "mixed": lambda: mixed_trace(int(DEMO_SCANS * scale), int(1500 * scale))}
    unknown = set(names) - set(makers)
    if unknown:
        raise SystemExit(f"unknown traces {sorted(unknown)}; known: {', '.join(TRACES)}")
    return [makers[n]() for n in names]


# -- the run ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """What every worker needs (pickled once per process under spawn)."""

    path: str
    max_mb: float
    records_file: str  # pickle of {layer index: record}
    layer_ids: Tuple[str, ...]
    scans: Tuple[Tuple[int, ...], ...]
    lanes: Tuple[Tuple[int, ...], ...]
    fixed_us: float
    us_per_kib: float
    apply_after_ns: Optional[int] = None  # what-if: the access buffer's age limit (None: the cache's own)
    apply_after_writes: int = 0  # what-if: apply the buffer once the file saw this many writes since
    writes_due: Optional[Tuple[int, int]] = None  # what-if: the cache's (APPLY_AFTER_WRITES, _TURNOVER)


def _next_scans(wid: int, processes: int, plan: Plan, counters: Sequence[Any]) -> Any:
    """The scans worker ``wid`` takes, in order: the next of each of its lanes in turn."""
    mine = [l for l in range(len(plan.lanes)) if l % processes == wid] or [wid % len(plan.lanes)]
    while mine:
        for lane in list(mine):
            counter = counters[lane]
            with counter.get_lock():
                k = counter.value
                counter.value = k + 1
            if k >= len(plan.lanes[lane]):
                mine.remove(lane)
                continue
            yield plan.lanes[lane][k]


def _worker(wid: int, processes: int, plan: Plan, counters: Sequence[Any], start: Any, out: Any) -> None:
    """One scanner: simulate's loop (get; on a miss analyse, then put with keep), every request logged."""
    log = array("q")
    counts = {"errors": 0, "wrong": 0}
    try:
        import nvcache
        from nvcache import CacheError, CacheFull, RecordTooLarge

        with open(plan.records_file, "rb") as f:
            records: Dict[int, bytes] = pickle.load(f)
        from nvcache import lifecycle
        if plan.apply_after_ns is not None:  # read when the store makes its buffer, at the first open
            lifecycle.APPLY_AFTER_NS = plan.apply_after_ns
        if plan.writes_due is not None:  # the buffer's write limit, max(floor, records // share)
            lifecycle.APPLY_AFTER_WRITES, lifecycle.APPLY_AFTER_TURNOVER = plan.writes_due
        cache = nvcache.LayerCache(plan.path, plan.max_mb)
        clock = time.time_ns
        every = plan.apply_after_writes
        store = cache._store if every else None  # (the what-if reaches into the store: bench only)
        mark = None
        try:
            start.wait(120)  # every worker has its cache open: they start together
            for i in _next_scans(wid, processes, plan, counters):
                scan = plan.scans[i]
                keep = [plan.layer_ids[l] for l in scan]
                for li in scan:
                    lid = plan.layer_ids[li]
                    t0 = clock()
                    try:
                        data = cache.get(lid)
                    except CacheError:  # a scanner treats it as a miss
                        counts["errors"] += 1
                        data = None
                    t1 = clock()
                    if store is not None:  # what-if: a buffer due after ``every`` writes by anyone
                        if not len(store.buffer):
                            mark = None
                        else:
                            txnid = store.files.env.info()["last_txnid"]
                            if mark is None:
                                mark = txnid
                            elif txnid - mark >= every:
                                store.apply_due()  # (never waits: a busy lock keeps it for the next get)
                                if not len(store.buffer):
                                    mark = None
                    if data is not None:
                        if data != records[li]:
                            counts["wrong"] += 1
                        log.extend((i, li, t0, t1, 1, 0, 0, 0, NO_PUT))
                        continue
                    record = records[li]
                    time.sleep(analysis_seconds(len(record), plan.fixed_us, plan.us_per_kib))
                    stored = cache.stored_size(record)
                    p0 = clock()
                    try:
                        outcome = STORED if cache.put(lid, record, keep=keep) else PRESENT
                    except CacheFull:
                        outcome = FULL
                    except RecordTooLarge:
                        outcome = TOO_LARGE
                    except CacheError:
                        counts["errors"] += 1
                        outcome = FAILED
                    log.extend((i, li, t0, t1, 0, p0, clock(), stored, outcome))
        finally:
            cache.close()  # writes this process's buffered accesses
        counts["extension"] = int(nvcache.EXTENSION)
    except BaseException:
        start.abort()  # (a worker that failed before the start must not keep the others waiting)
        out.put(("error", wid, traceback.format_exc()))
        return
    out.put(("ok", wid, log.tobytes(), counts))


def trace_records(trace: Trace) -> Dict[int, bytes]:
    """The record of every layer the trace requests (make_record: about a millisecond each)."""
    return {l: make_record(trace.layer_ids[l], trace.sizes[l]) for l in sorted({l for s in trace.scans for l in s})}


def _last_txnid(cache: Any) -> int:
    """The file's last write transaction id (LMDB's env.info(); reaches into the store: bench only)."""
    cache.flush()
    return int(cache._store.files.env.info()["last_txnid"])


def run_nvcache(trace: Trace, processes: int, fixed_us: float = 500.0, us_per_kib: float = 40.0,
                start_method: str = "spawn", timeout: float = 600.0,
                records: Optional[Dict[int, bytes]] = None, dictionary: bool = True,
                apply_after_ms: Optional[float] = None, apply_after_writes: int = 0,
                writes_due: Optional[Tuple[int, int]] = None) -> Dict[str, Any]:
    """Run ``trace`` with ``processes`` scanners on a fresh cache; the merged log and the cache's view."""
    import multiprocessing

    import nvcache

    if records is None:
        records = trace_records(trace)
    used = sorted(records)
    work = tempfile.mkdtemp(prefix="nvcache-fidelity-")
    try:
        path = os.path.join(work, "cache")
        records_file = os.path.join(work, "records.pickle")
        with open(records_file, "wb") as f:
            pickle.dump(records, f, protocol=pickle.HIGHEST_PROTOCOL)
        with nvcache.LayerCache(path, trace.max_mb) as cache:  # records the bound
            max_bytes = cache.max_bytes
            if dictionary:  # as a warm cache has: see the module's docstring
                sample = random.Random(f"dictionary:{SEED}").sample(used, min(len(used), DICTIONARY_SAMPLES))
                cache.train_dictionary([records[l] for l in sample])
            txn_before = _last_txnid(cache)
        lanes = trace.lanes or (tuple(range(len(trace.scans))),)
        plan = Plan(path, trace.max_mb, records_file, trace.layer_ids, trace.scans, lanes, fixed_us, us_per_kib,
                    None if apply_after_ms is None else int(apply_after_ms * 1e6), apply_after_writes, writes_due)
        ctx = multiprocessing.get_context(start_method)
        counters = [ctx.Value("q", 0) for _ in lanes]
        start, out = ctx.Barrier(processes + 1), ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(w, processes, plan, counters, start, out), name=f"fidelity-{w}")
                 for w in range(processes)]
        for p in procs:
            p.start()
        load_before = os.getloadavg()[0]
        reports: Dict[int, Any] = {}
        try:
            try:
                start.wait(120)
            except threading.BrokenBarrierError:
                pass  # a worker failed before the start: its report says why
            started = time.monotonic()
            while len(reports) < processes:
                try:
                    msg = out.get(timeout=0.2)
                except queue.Empty:
                    if time.monotonic() - started > timeout:
                        raise RuntimeError(f"{trace.name}: the run took more than {timeout} s")
                    for w, p in enumerate(procs):
                        if w not in reports and p.exitcode not in (None, 0):
                            raise RuntimeError(f"worker {w} died with exit code {p.exitcode}")
                    continue
                if msg[0] != "ok":
                    raise RuntimeError(f"worker {msg[1]} failed:\n{msg[2]}")
                reports[msg[1]] = msg
        finally:
            for counter, lane in zip(counters, lanes):
                with counter.get_lock():
                    counter.value = len(lane)
            for p in procs:
                p.join(30)
                if p.is_alive():
                    p.terminate()
                    p.join()
        wall = time.monotonic() - started
        load_after = os.getloadavg()[0]
        logs = []
        for wid in sorted(reports):
            raw = array("q")
            raw.frombytes(reports[wid][2])
            logs.append([tuple(raw[k:k + FIELDS]) for k in range(0, len(raw), FIELDS)])
        with nvcache.LayerCache(path) as cache:
            writes = _last_txnid(cache) - txn_before
            stats = cache.stats()
            evictions = cache.evictions()
            present = {r["layer_id"].rsplit("_layer_file", 1)[0]: r["size"] for r in cache.cache_data()["cache_records"]}
            # Layers whose size no put logged (hits only at the reference's misses): as they would be now.
            final_size = {l: cache.stored_size(records[l]) for l in used}
        counts = {k: sum(r[3][k] for r in reports.values()) for k in ("errors", "wrong")}
        cores = sorted({"compiled" if r[3]["extension"] else "python" for r in reports.values()})
        return {"logs": logs, "max_bytes": max_bytes, "record_size": {l: len(r) for l, r in records.items()},
                "final_size": final_size, "present": present, "stats": stats, "evictions": evictions,
                "wall_s": wall, "load": (load_before, load_after), "cores": cores, "writes": writes, **counts}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- the reference ----------------------------------------------------------------------------
class ExactLRU:
    """Whole records in exact LRU order within ``bound`` bytes; a put evicts the least recently
    used records not in its ``keep`` and stores nothing when only kept records could make room."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.lru: "OrderedDict[int, int]" = OrderedDict()  # layer -> stored size, oldest first
        self.held = 0
        self.evictions = 0

    def get(self, layer: int) -> bool:
        if layer in self.lru:
            self.lru.move_to_end(layer)
            return True
        return False

    def put(self, layer: int, size: int, keep: Sequence[int] = ()) -> int:
        """The cache's outcome code: STORED, PRESENT, FULL or TOO_LARGE."""
        if size > self.bound:
            return TOO_LARGE
        if layer in self.lru:
            return PRESENT
        over = self.held + size - self.bound
        if over > 0:
            kept = set(keep)
            victims, freed = [], 0
            for victim, vsize in self.lru.items():
                if victim in kept:
                    continue
                victims.append(victim)
                freed += vsize
                if freed >= over:
                    break
            if freed < over:
                return FULL
            for victim in victims:
                self.held -= self.lru.pop(victim)
            self.evictions += len(victims)
        self.lru[layer] = size
        self.held += size
        return STORED


def merged_events(logs: Sequence[Sequence[Tuple[int, ...]]]) -> Tuple[List[Tuple[int, int, int, int, int]], int]:
    """The log's gets and puts in one order: [(key, process, request, is_put, ...)], and how many
    get/put pairs of one layer the outcomes ordered (see the module's docstring)."""
    get_key: Dict[Tuple[int, int], int] = {}
    put_key: Dict[Tuple[int, int], int] = {}
    stored_puts: Dict[int, List[Tuple[int, int, int, int]]] = {}  # layer -> [(p0, p1, process, request)]
    for w, log in enumerate(logs):
        for r, (_scan, layer, t0, t1, hit, p0, p1, _size, outcome) in enumerate(log):
            get_key[w, r] = t1
            if not hit:
                put_key[w, r] = p1
                if outcome == STORED:
                    stored_puts.setdefault(layer, []).append((p0, p1, w, r))
    reordered = 0
    for w, log in enumerate(logs):
        for r, (_scan, layer, t0, t1, hit, _p0, _p1, _size, _outcome) in enumerate(log):
            for p0, p1, pw, pr in stored_puts.get(layer, ()):
                if pw == w or p1 < t0 or p0 > t1:
                    continue  # its own put, or no overlap: the end times order them
                if not hit and p1 < t1:  # read before that commit: the get goes first
                    get_key[w, r] = t0
                    reordered += 1
                elif hit and p1 > t1:  # read after that commit: the put goes first
                    put_key[pw, pr] = p0
                    reordered += 1
    events = [(k, w, r, 0) for (w, r), k in get_key.items()] + [(k, w, r, 1) for (w, r), k in put_key.items()]
    events.sort()
    return events, reordered  # type: ignore[return-value]


def reference(logs: Sequence[Sequence[Tuple[int, ...]]], scans: Sequence[Tuple[int, ...]], bound: int,
              final_size: Dict[int, int], at_miss: bool = False) -> Dict[str, Any]:
    """Exact LRU over the merged log (see the module's docstring): its hit per request.

    ``at_miss``: a missed record enters at the miss instead of at its logged put.
    """
    events, reordered = merged_events(logs)
    lru = ExactLRU(bound)
    hits = [bytearray(len(log)) for log in logs]
    last_size: Dict[int, int] = {}
    first_size: Dict[int, int] = {}
    for log in logs:
        for rec in log:
            if not rec[4] and rec[8] != FAILED:
                first_size.setdefault(rec[1], rec[7])
    only_ref_miss = only_ref_hit = 0

    def size_of(layer: int) -> int:
        return last_size.get(layer) or first_size.get(layer) or final_size[layer]

    for _key, w, r, is_put in events:
        scan, layer, _t0, _t1, hit, _p0, _p1, size, outcome = logs[w][r]
        if is_put:
            if outcome != FAILED:
                last_size[layer] = size
            if not hits[w][r] and not at_miss:
                lru.put(layer, size, scans[scan])
            continue
        if lru.get(layer):
            hits[w][r] = 1
            only_ref_hit += not hit
        else:
            only_ref_miss += hit
            if hit or at_miss:  # no put logged for it (or the record enters now)
                lru.put(layer, size if not hit else size_of(layer), scans[scan])
    return {"hits": hits, "reordered": reordered, "only_ref_miss": only_ref_miss, "only_ref_hit": only_ref_hit,
            "evictions": lru.evictions}


def measure(trace: Trace, processes: int, **kw: Any) -> Dict[str, Any]:
    """One cell of the matrix: nvcache's run and the references over its log."""
    run = run_nvcache(trace, processes, **kw)
    logs, rsize = run["logs"], run["record_size"]
    ref = reference(logs, trace.scans, run["max_bytes"], run["final_size"])
    literal = reference(logs, trace.scans, run["max_bytes"], run["final_size"], at_miss=True)
    requests = sum(len(log) for log in logs)
    req_bytes = sum(rsize[rec[1]] for log in logs for rec in log)

    def ratios(hit_of: Any) -> Tuple[int, float, float]:
        n = hb = 0
        for w, log in enumerate(logs):
            for r, rec in enumerate(log):
                if hit_of(w, r, rec):
                    n += 1
                    hb += rsize[rec[1]]
        return n, n / requests, hb / req_bytes

    nv_hits, nv_ratio, nv_bytes = ratios(lambda w, r, rec: rec[4])
    ref_hits, ref_ratio, ref_bytes = ratios(lambda w, r, rec: ref["hits"][w][r])
    lit_hits, lit_ratio, lit_bytes = ratios(lambda w, r, rec: literal["hits"][w][r])
    # Size check: every record left in the cache has the stored size its put logged.
    stored_last: Dict[str, int] = {}
    for rec in sorted((rec for log in logs for rec in log if rec[8] == STORED), key=lambda rec: rec[6]):
        stored_last[trace.layer_ids[rec[1]]] = rec[7]
    size_mismatches = sum(1 for lid, size in run["present"].items() if stored_last.get(lid) != size)
    lane_of = {i: k for k, lane in enumerate(trace.lanes or ()) for i in lane}
    per_lane: List[Dict[str, int]] = [{"requests": 0, "nvcache_hits": 0, "lru_hits": 0} for _ in trace.lanes or ()]
    for w, log in enumerate(logs):
        for r, rec in enumerate(log):
            if per_lane:
                cell = per_lane[lane_of[rec[0]]]
                cell["requests"] += 1
                cell["nvcache_hits"] += rec[4]
                cell["lru_hits"] += ref["hits"][w][r]
    outcomes = [rec[8] for log in logs for rec in log if not rec[4]]
    stats = run["stats"]
    return {
        "trace": trace.name, "processes": processes, "requests": requests, "scans": len(trace.scans),
        "max_bytes": run["max_bytes"], "cores": run["cores"],
        "nvcache_hits": nv_hits, "nvcache_hit_ratio": nv_ratio, "nvcache_byte_hit_ratio": nv_bytes,
        "lru_hits": ref_hits, "lru_hit_ratio": ref_ratio, "lru_byte_hit_ratio": ref_bytes,
        "diff_points": 100 * (nv_ratio - ref_ratio), "byte_diff_points": 100 * (nv_bytes - ref_bytes),
        "lru_at_miss_hit_ratio": lit_ratio, "lru_at_miss_byte_hit_ratio": lit_bytes,
        "nvcache_only_hits": ref["only_ref_miss"], "lru_only_hits": ref["only_ref_hit"],
        "reordered": ref["reordered"], "lru_evictions": ref["evictions"], "nvcache_evictions": run["evictions"],
        "puts": {name: outcomes.count(code) for code, name in ((STORED, "stored"), (PRESENT, "present"),
                                                               (FULL, "full"), (TOO_LARGE, "too_large"),
                                                               (FAILED, "failed"))},
        "counter_hits": stats.get("cache_hits"), "counter_misses": stats.get("cache_misses"),
        "size_check": {"records": len(run["present"]), "mismatches": size_mismatches},
        "lanes": per_lane, "apply_after_ms": kw.get("apply_after_ms"),
        "apply_after_writes": kw.get("apply_after_writes", 0), "writes_due": kw.get("writes_due"),
        "write_transactions": run["writes"],
        "errors": run["errors"], "wrong": run["wrong"], "wall_s": run["wall_s"],
        "load_before": run["load"][0], "load_after": run["load"][1],
    }


# -- the report -------------------------------------------------------------------------------
def markdown(rows: Sequence[Dict[str, Any]]) -> str:
    out = ["| trace | procs | requests | nvcache hit % | exact LRU hit % | Δ points | nvcache byte-hit % "
           "| exact LRU byte-hit % | Δ points | nvcache-only / LRU-only hits | LRU at miss hit % | wall s | load 1-min |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['trace']} | {r['processes']} | {r['requests']:,} | {100 * r['nvcache_hit_ratio']:.2f} "
                   f"| {100 * r['lru_hit_ratio']:.2f} | {r['diff_points']:+.2f} "
                   f"| {100 * r['nvcache_byte_hit_ratio']:.2f} | {100 * r['lru_byte_hit_ratio']:.2f} "
                   f"| {r['byte_diff_points']:+.2f} | {r['nvcache_only_hits']} / {r['lru_only_hits']} "
                   f"| {100 * r['lru_at_miss_hit_ratio']:.2f} | {r['wall_s']:.1f} "
                   f"| {r['load_before']:.1f} → {r['load_after']:.1f} |")
    return "\n".join(out)


def _commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--traces", default=",".join(TRACES))
    ap.add_argument("--procs", default="1,2,8")
    ap.add_argument("--scale", type=float, default=1.0, help="trace lengths × this (default sizes: module doc)")
    ap.add_argument("--analysis-us", type=float, default=500.0)
    ap.add_argument("--us-per-kib", type=float, default=40.0)
    ap.add_argument("--apply-after-ms", type=float, default=None,
                    help="what-if: the workers' access-buffer age limit (default: the cache's own, 1000 ms)")
    ap.add_argument("--apply-after-writes", type=int, default=0,
                    help="what-if: a worker also applies its buffer once the file saw this many write "
                         "transactions since its oldest pending reference (0: no)")
    ap.add_argument("--writes-due", default=None, metavar="FLOOR,SHARE",
                    help="what-if: the cache's own write limit, max(FLOOR, records // SHARE) write "
                         "transactions (default 8,16: nvcache.lifecycle); a huge FLOOR,SHARE turns it off")
    ap.add_argument("--max-mb", type=float, default=None, help="every trace at this bound instead of its own")
    ap.add_argument("--json", help="write every cell's figures here")
    ap.add_argument("--md", help="write the markdown report here")
    args = ap.parse_args(argv)
    procs = [int(p) for p in args.procs.split(",") if p]
    started = time.monotonic()
    rows = []
    for trace in build_traces([t for t in args.traces.split(",") if t], args.scale):
        if args.max_mb is not None:
            trace = dataclasses.replace(trace, max_mb=args.max_mb)
        records = trace_records(trace)
        for n in procs:
            row = measure(trace, n, fixed_us=args.analysis_us, us_per_kib=args.us_per_kib, records=records,
                          apply_after_ms=args.apply_after_ms, apply_after_writes=args.apply_after_writes,
                          writes_due=tuple(int(x) for x in args.writes_due.split(",")) if args.writes_due else None)
            rows.append(row)
            print(f"{row['trace']:6} {n} procs: nvcache {100 * row['nvcache_hit_ratio']:.2f} % "
                  f"exact LRU {100 * row['lru_hit_ratio']:.2f} % ({row['diff_points']:+.2f} points), byte-hit "
                  f"{100 * row['nvcache_byte_hit_ratio']:.2f} / {100 * row['lru_byte_hit_ratio']:.2f} % "
                  f"({row['byte_diff_points']:+.2f}); {row['wall_s']:.1f} s, load {row['load_after']:.1f}",
                  flush=True)
    total = time.monotonic() - started
    table = markdown(rows)
    worst = max(abs(r["diff_points"]) for r in rows)
    worst_bytes = max(abs(r["byte_diff_points"]) for r in rows)
    summary = (f"Largest |Δ|: {worst:.2f} points (hit ratio), {worst_bytes:.2f} points (byte-hit ratio); "
               f"target ≤ 1 point: {'met' if max(worst, worst_bytes) <= 1.0 else 'MISSED'}. "
               f"Matrix wall time {total:.0f} s.")
    print(table)
    print(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv, "commit": _commit(), "rows": rows, "wall_s": total}, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(f"Command: `{' '.join(['.venv/bin/python'] + sys.argv)}` at commit {_commit()}, "
                    f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, cores: "
                    f"{', '.join(sorted({c for r in rows for c in r['cores']}))}.\n\n{table}\n\n{summary}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
