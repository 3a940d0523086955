"""The main job: scanner processes sharing one cache over a synthetic registry.

A registry of images that share base layers is generated from a seed:
a few OS bases, language/runtime stacks built on them, and images built on
the stacks with their own application layers. Image popularity follows a
Zipf law, as the Docker Hub workload studies found (a small share of the
images draws most of the pulls), and so does the choice of base and stack,
so popular base layers are shared by many images. Layer record sizes are
log-normal, from tens of bytes to hundreds of KB like the seed's dump.

Each worker process opens its own :class:`~nvcache.LayerCache` and scans
images the way a scanner does: for every layer, ``get``; on a miss,
"analyse" the layer (sleep in proportion to its size) and ``put`` the
record with ``keep`` = the image's layers. A layer's record is JSON shaped
like the scanner's (:mod:`nvcache.scanrecords`), so it compresses as real
records do: the byte-hit ratio (record bytes, the analysis they stand for)
shows what compression adds at a given bound. Every access is recorded
with a timestamp; the merged trace is replayed offline through Belady's
rule. The cache holds stored (compressed) bytes, so the offline models
charge each record its stored size, as reported by the workers' puts, and
their figures are stored-byte-hit ratios: Belady's rule applied byte by
byte bounds every policy only where each byte is worth the same.
"""

from __future__ import annotations

import hashlib
import logging
import math
import multiprocessing
import queue
import random
import tempfile
import time
import traceback
from array import array
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .cache import LayerCache
from .errors import CacheError, CacheFull, RecordTooLarge
from .optimum import belady_byte_hits, belady_hits, lru_byte_hits, optimum_byte_hits  # noqa: F401 (simulate's API)
from .scanrecords import scan_record
from .trace import Request, write_trace

log = logging.getLogger("nvcache.simulate")

MIN_RECORD = 40
MAX_RECORD = 512 * 1024
# (median bytes, sigma) of the log-normal record size of each kind of layer:
# OS layers list many packages, application layers are often a few files.
_BASE_SIZE = (8000.0, 1.2)
_STACK_SIZE = (2000.0, 1.5)
_APP_SIZE = (200.0, 2.0)


# -- the synthetic registry --------------------------------------------------------
@dataclass(frozen=True)
class Catalogue:
    """Layers (ids and record sizes) and images (their layers, bottom first, and popularity)."""

    layer_ids: Tuple[str, ...]
    sizes: Tuple[int, ...]
    images: Tuple[Tuple[int, ...], ...]
    weights: Tuple[float, ...]

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes)


def _zipf_weights(n: int, skew: float, rng: random.Random) -> List[float]:
    """Zipf weights 1/rank**skew, assigned to the n items in random order."""
    ranks = list(range(1, n + 1))
    rng.shuffle(ranks)
    return [1.0 / r ** skew for r in ranks]


def _split(total: int, parts: int, rng: random.Random) -> List[int]:
    """``total`` split into ``parts`` random counts of at least 1 each."""
    counts = [1] * parts
    for i in rng.choices(range(parts), k=total - parts):
        counts[i] += 1
    return counts


def build_catalogue(images: int, layers: int, seed: int = 1, skew: float = 1.0) -> Catalogue:
    """A registry of ``images`` images over exactly ``layers`` distinct layers.

    A quarter of the layers (at most ``layers - images``) are shared: bases
    hold 40 % of them, stacks the rest; the remaining layers are each one
    image's own. Needs ``layers >= images + 2``.
    """
    if images < 1:
        raise ValueError("images must be at least 1")
    if layers < images + 2:
        raise ValueError(f"layers must be at least images + 2 = {images + 2}, got {layers}")
    rng = random.Random(seed)
    shared = max(2, min(layers - images, layers // 4))
    base_layers = max(1, shared * 2 // 5)
    n_bases = max(1, min(base_layers, shared // 8))
    stack_layers = shared - base_layers
    n_stacks = max(1, min(stack_layers, stack_layers // 2))
    app_layers = layers - shared

    sizes: List[int] = []

    def new_layers(count: int, kind: Tuple[float, float]) -> List[int]:
        median, sigma = kind
        first = len(sizes)
        for _ in range(count):
            size = int(rng.lognormvariate(math.log(median), sigma))
            sizes.append(min(MAX_RECORD, max(MIN_RECORD, size)))
        return list(range(first, first + count))

    bases = [new_layers(n, _BASE_SIZE) for n in _split(base_layers, n_bases, rng)]
    base_weights = _zipf_weights(n_bases, skew, rng)
    stacks = []
    for n in _split(stack_layers, n_stacks, rng):
        base = rng.choices(bases, base_weights)[0]
        stacks.append(base + new_layers(n, _STACK_SIZE))
    stack_weights = _zipf_weights(n_stacks, skew, rng)
    image_layers = []
    for n in _split(app_layers, images, rng):
        stack = rng.choices(stacks, stack_weights)[0]
        image_layers.append(tuple(stack + new_layers(n, _APP_SIZE)))
    # Ids look like the seed's: sha256 digests, deterministic in the seed.
    ids = tuple("sha256:" + random.Random(f"{seed}:{i}").getrandbits(256).to_bytes(32, "big").hex()
                for i in range(len(sizes)))
    return Catalogue(ids, tuple(sizes), tuple(image_layers), tuple(_zipf_weights(images, skew, rng)))


def plan_scans(cat: Catalogue, scans: int, seed: int = 1) -> Tuple[int, ...]:
    """The images to scan, in order, drawn by popularity."""
    return tuple(random.Random(seed + 1).choices(range(len(cat.images)), cat.weights, k=scans))


def known_policies() -> Tuple[str, ...]:
    """The eviction policies the cache offers: ``nvcache.POLICIES``, or ("lru",) for a cache
    that has only its LRU."""
    import nvcache  # the package, loaded before this module: its POLICIES, when it has them
    return tuple(getattr(nvcache, "POLICIES", ("lru",)))


def policy_kwargs(policy: Optional[str]) -> Dict[str, Any]:
    """LayerCache's arguments for ``policy``: none for None (the policy the cache stored, LRU for a
    new one), nor for "lru" on a LayerCache that has no policy argument (no ``nvcache.POLICIES``):
    it is then the only policy, and the cache opens as before."""
    if policy is None:
        return {}
    known = known_policies()
    if policy not in known:
        raise ValueError(f"unknown policy {policy!r}: choose one of {', '.join(known)}")
    import nvcache
    return {"policy": policy} if hasattr(nvcache, "POLICIES") else {}


def policy_of(cache: LayerCache) -> str:
    """The name of the policy an open cache uses ("lru" for a cache without a choice)."""
    return str(getattr(cache, "policy", None) or "lru")


def make_record(layer_id: str, size: int) -> bytes:
    """The synthetic scan record of a layer: scanner-shaped JSON of about ``size`` bytes (at most
    that, a few bytes less; never below the smallest record, about 60 bytes), the same for the
    same layer id."""
    return scan_record(layer_id, size)


def record_digest(record: bytes) -> bytes:
    """What a worker checks a hit against (workers never regenerate a record to compare it)."""
    return hashlib.blake2b(record, digest_size=16).digest()


def analysis_seconds(size: int, fixed_us: float, us_per_kib: float) -> float:
    """The modelled cost of analysing a layer whose record has ``size`` bytes."""
    return (fixed_us + us_per_kib * size / 1024.0) / 1e6


def analyse(layer_id: str, size: int, fixed_us: float, us_per_kib: float,
            made: Optional[Dict[str, bytes]] = None) -> bytes:
    """A scanner's analysis of a layer: its record, returned after the modelled time
    (``analysis_seconds`` of the record's length; making the record is part of that time).

    ``made``: records made before, by layer id, reused and added to. Making a record costs
    about 0.25 µs a byte, more than the default model's 40 µs/KiB for large ones, so a process
    that analyses a layer again would otherwise take longer than the model says."""
    t0 = time.perf_counter_ns()
    record = made.get(layer_id) if made is not None else None
    if record is None:
        record = make_record(layer_id, size)
        if made is not None:
            made[layer_id] = record
    left = analysis_seconds(len(record), fixed_us, us_per_kib) - (time.perf_counter_ns() - t0) / 1e9
    if left > 0:
        time.sleep(left)
    return record


# -- the scanner processes ------------------------------------------------------------
@dataclass(frozen=True)
class WorkerPlan:
    """What every worker needs (pickled once per process under 'spawn')."""

    path: str
    max_mb: float
    layer_ids: Tuple[str, ...]
    sizes: Tuple[int, ...]  # the catalogue's target sizes (make_record's argument)
    digests: Tuple[bytes, ...]  # record_digest of each layer's record
    images: Tuple[Tuple[int, ...], ...]
    scans: Tuple[int, ...]
    fixed_us: float
    us_per_kib: float
    deadline: float  # time.monotonic(); CLOCK_MONOTONIC is the same clock in every process
    compress: bool = True
    policy: Optional[str] = None  # LayerCache's policy argument (None: the one the cache stored)


def _worker(wid: int, plan: WorkerPlan, next_scan: Any, done: Any, out: Any) -> None:
    """One scanner: take the next scan from the shared counter until none are left or time is up."""
    stamps, layers, hits = array("q"), array("l"), bytearray()
    scanned = array("l")  # the image each request was made for (the trace file's image field)
    stored = array("q")  # (layer, stored size) pairs of this worker's puts
    counts = {"analysis_ns": 0, "cache_ns": 0, "wrong": 0, "errors": 0, "full": 0, "too_large": 0}
    try:
        import nvcache  # which core this process picked (NVCACHE_NO_EXTENSIONS), for the report
        counts["extension"] = int(nvcache.EXTENSION)
        cache = LayerCache(plan.path, plan.max_mb, compress=plan.compress, **policy_kwargs(plan.policy))
        try:
            while time.monotonic() < plan.deadline:
                with next_scan.get_lock():
                    i = next_scan.value
                    next_scan.value = i + 1
                if i >= len(plan.scans):
                    break
                image = plan.images[plan.scans[i]]
                keep = [plan.layer_ids[li] for li in image]
                for li in image:
                    lid, size = plan.layer_ids[li], plan.sizes[li]
                    stamps.append(time.monotonic_ns())
                    layers.append(li)
                    scanned.append(plan.scans[i])
                    t0 = time.perf_counter_ns()
                    try:
                        data = cache.get(lid)
                    except CacheError as exc:  # a scanner treats it as a miss
                        log.warning("get %s: %s", lid, exc)
                        counts["errors"] += 1
                        data = None
                    counts["cache_ns"] += time.perf_counter_ns() - t0
                    if data is not None:
                        hits.append(1)
                        if record_digest(data) != plan.digests[li]:
                            counts["wrong"] += 1
                        continue
                    hits.append(0)
                    t0 = time.perf_counter_ns()
                    record = analyse(lid, size, plan.fixed_us, plan.us_per_kib)
                    t1 = time.perf_counter_ns()
                    counts["analysis_ns"] += t1 - t0
                    weight = cache.stored_size(record)  # for the offline models: not timed
                    t1 = time.perf_counter_ns()
                    try:
                        if cache.put(lid, record, keep=keep):
                            stored.extend((li, weight))
                    except RecordTooLarge:
                        counts["too_large"] += 1
                    except CacheFull:
                        counts["full"] += 1
                    except CacheError as exc:
                        log.warning("put %s: %s", lid, exc)
                        counts["errors"] += 1
                    counts["cache_ns"] += time.perf_counter_ns() - t1
                with done.get_lock():
                    done.value += 1
        finally:
            cache.close()  # writes this process's buffered hits, misses and references
    except KeyboardInterrupt:  # a few bytes: never blocks the exit, whatever the parent does
        out.put(("interrupted", wid, "interrupted (SIGINT)"))
        return
    except BaseException:
        out.put(("error", wid, traceback.format_exc()))
        return
    out.put(("ok", wid, stamps.tobytes(), layers.tobytes(), bytes(hits), counts, stored.tobytes(),
             scanned.tobytes()))


def gather(procs: Sequence[Any], out: Any, stop: Callable[[], None],
           poll: Callable[[], None] = lambda: None) -> Dict[int, Tuple[Any, ...]]:
    """Start ``procs`` and return each one's report, by worker number: ("ok", wid, ...) on ``out``.

    ``poll()`` is called about every 0.1 s while they run (the progress bar). A worker that fails
    (reports an error, or dies) raises RuntimeError; ``stop()`` is then called (and always at the
    end) so the others finish their current scan, and every process is joined, or terminated
    after 30 s.
    """
    for p in procs:
        p.start()
    reports: Dict[int, Tuple[Any, ...]] = {}
    try:
        while len(reports) < len(procs):
            try:
                msg = out.get(timeout=0.1)
            except queue.Empty:
                for w, p in enumerate(procs):
                    if w not in reports and p.exitcode not in (None, 0):
                        raise RuntimeError(f"scanner process {w} died with exit code {p.exitcode}")
            else:
                if msg[0] != "ok":
                    raise RuntimeError(f"scanner process {msg[1]} failed:\n{msg[2]}")
                reports[msg[1]] = msg
            poll()
    finally:
        stop()
        # Keep reading while they exit: a child cannot exit before its report left the pipe.
        give_up = time.monotonic() + 30
        for p in procs:
            while p.is_alive() and time.monotonic() < give_up:
                p.join(0.05)
                try:
                    while True:
                        msg = out.get_nowait()
                        if msg[0] == "ok":
                            reports.setdefault(msg[1], msg)
                except queue.Empty:
                    pass
            if p.is_alive():
                p.terminate()
                p.join()
    return reports


# -- the run ---------------------------------------------------------------------------
class HitRatios:
    """The ratios of a run's counts (``hits``, ``requests``, ``hit_bytes``, ``requested_bytes``,
    ``hit_stored``, ``requested_stored``), for the result classes of simulate and replay."""

    hits: int
    requests: int
    hit_bytes: int
    requested_bytes: int
    hit_stored: int
    requested_stored: int

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def byte_hit_ratio(self) -> float:
        return self.hit_bytes / self.requested_bytes if self.requested_bytes else 0.0

    @property
    def stored_byte_hit_ratio(self) -> float:
        """The byte-hit ratio counted in stored bytes: comparable with the offline optimum."""
        return self.hit_stored / self.requested_stored if self.requested_stored else 0.0


@dataclass
class SimResult(HitRatios):
    """Everything ``nvcache simulate`` reports."""

    path: str
    processes: int
    images: int
    layers: int
    catalogue_bytes: int
    max_bytes: int
    seed: int
    scans_planned: int
    scans_done: int = 0
    stopped_by_deadline: bool = False
    wall_s: float = 0.0
    requests: int = 0
    hits: int = 0
    misses: int = 0
    requested_bytes: int = 0  # record bytes (what a hit saves analysing)
    hit_bytes: int = 0
    requested_stored: int = 0  # the same requests in stored (compressed) bytes: what the cache holds
    hit_stored: int = 0
    compress: bool = True
    policy: str = "lru"  # the eviction policy the run's cache used
    trace_out: Optional[str] = None  # the trace file written (simulate --trace-out), if any
    counter_hits: int = 0    # from the cache's own counters (delta over the run)
    counter_misses: int = 0
    evictions: int = 0
    analysis_no_cache_s: float = 0.0    # modelled: every request analysed
    analysis_with_cache_s: float = 0.0  # modelled: the misses analysed
    analysis_measured_s: float = 0.0    # what the workers slept
    cache_overhead_s: float = 0.0       # measured get/put time
    optimum_byte_hit_ratio: float = 0.0  # of stored bytes, as stored_byte_hit_ratio
    belady_byte_hit_ratio: float = 0.0
    wrong_records: int = 0
    errors: int = 0
    cache_full: int = 0
    too_large: int = 0
    stats: Dict[str, Optional[int]] = field(default_factory=dict)
    worker_cores: List[str] = field(default_factory=list)  # "compiled" or "python", one per process

    @property
    def time_saved_s(self) -> float:
        return self.analysis_no_cache_s - self.analysis_with_cache_s - self.cache_overhead_s

    def as_dict(self) -> Dict[str, Any]:
        out = dict(self.__dict__)
        out.update(hit_ratio=self.hit_ratio, byte_hit_ratio=self.byte_hit_ratio, time_saved_s=self.time_saved_s,
                   stored_byte_hit_ratio=self.stored_byte_hit_ratio)
        return out


def fresh_path() -> str:
    """A new directory for a simulated cache, so a run never touches a real one."""
    return tempfile.mkdtemp(prefix="nvcache-sim-")


def run(path: str, *, processes: int, images: int, layers: int, scans: int, max_mb: float,
        seed: int = 1, skew: float = 1.0, duration: float = 60.0, fixed_us: float = 500.0,
        us_per_kib: float = 40.0, start_method: str = "spawn", compress: bool = True,
        policy: Optional[str] = None, trace_out: Optional[str] = None,
        progress: Optional[Callable[[int, int], None]] = None) -> SimResult:
    """Run the simulation and return its figures; ``progress(done, total)`` is called while it runs.

    ``compress``: the caches store records compressed (the default) or raw. ``policy``: the
    eviction policy to open the cache with (a name of ``known_policies()``; None: the one the
    cache stored, LRU for a new cache). ``trace_out``: write the requests the scanners made, in
    the order the cache saw them, as a trace file (:mod:`nvcache.trace`: time from the first
    request, layer id, record size in bytes, ``image-<n>`` for the catalogue's image n) that
    ``nvcache replay`` reads.
    """
    if processes < 1 or scans < 1:
        raise ValueError("processes and scans must be at least 1")
    cat = build_catalogue(images, layers, seed, skew)
    scan_list = plan_scans(cat, scans, seed)
    records = [make_record(lid, size) for lid, size in zip(cat.layer_ids, cat.sizes)]
    sizes = [len(r) for r in records]  # what a hit saves (record bytes) and what the analysis costs
    with LayerCache(path, max_mb, compress=compress, **policy_kwargs(policy)) as cache:
        if not cache.enabled:
            raise ValueError("the bound must be above 0 MiB for a simulation")
        max_bytes = cache.max_bytes
        used_policy = policy_of(cache)
        before = cache.stats()
        evictions_before = cache.evictions() or 0
    if before["record_count"]:
        log.warning("%s already holds %s records: the optimum assumes a cold start", path, before["record_count"])
    result = SimResult(path=path, processes=processes, images=images, layers=layers,
                       catalogue_bytes=sum(sizes), max_bytes=max_bytes, seed=seed, scans_planned=scans,
                       compress=compress, policy=used_policy, trace_out=trace_out)
    ctx = multiprocessing.get_context(start_method)
    next_scan, done, out = ctx.Value("q", 0), ctx.Value("q", 0), ctx.Queue()
    started = time.monotonic()
    plan = WorkerPlan(path, max_mb, cat.layer_ids, cat.sizes, tuple(record_digest(r) for r in records), cat.images,
                      scan_list, fixed_us, us_per_kib, started + duration, compress, policy)
    procs = [ctx.Process(target=_worker, args=(w, plan, next_scan, done, out), name=f"nvcache-scanner-{w}")
             for w in range(processes)]

    def stop() -> None:  # on any failure, let the others stop after their current scan
        with next_scan.get_lock():
            next_scan.value = max(next_scan.value, scans)

    def poll() -> None:
        if progress is not None:
            progress(min(done.value, scans), scans)

    reports = gather(procs, out, stop, poll)
    result.wall_s = time.monotonic() - started
    result.scans_done = done.value
    result.stopped_by_deadline = result.scans_done < scans
    if progress is not None:
        progress(result.scans_done, scans)

    # Merge the traces in time order: the order the cache saw the requests.
    merged: List[Tuple[int, int, int, int]] = []
    weights: Dict[int, int] = {}  # layer -> its stored size (the smallest any put reported)
    for _tag, _w, raw_ts, raw_layers, raw_hits, counts, raw_stored, raw_images in reports.values():
        pairs = array("q")
        pairs.frombytes(raw_stored)
        for li, weight in zip(pairs[0::2], pairs[1::2]):
            weights[li] = min(weight, weights.get(li, weight))
        ts, ls, ims = array("q"), array("l"), array("l")
        ts.frombytes(raw_ts)
        ls.frombytes(raw_layers)
        ims.frombytes(raw_images)
        merged.extend(zip(ts, ls, raw_hits, ims))
        result.analysis_measured_s += counts["analysis_ns"] / 1e9
        result.cache_overhead_s += counts["cache_ns"] / 1e9
        result.wrong_records += counts["wrong"]
        result.errors += counts["errors"]
        result.cache_full += counts["full"]
        result.too_large += counts["too_large"]
        result.worker_cores.append("compiled" if counts["extension"] else "python")
    merged.sort()
    trace = [l for _t, l, _h, _i in merged]
    if trace_out is not None:
        _write_run_trace(trace_out, merged, cat, sizes, result)
    result.requests = len(trace)
    result.hits = sum(h for _t, _l, h, _i in merged)
    result.misses = result.requests - result.hits
    result.requested_bytes = sum(sizes[l] for l in trace)
    result.hit_bytes = sum(sizes[l] for _t, l, h, _i in merged if h)
    cost = [analysis_seconds(s, fixed_us, us_per_kib) for s in sizes]
    result.analysis_no_cache_s = sum(cost[l] for l in trace)
    result.analysis_with_cache_s = sum(cost[l] for _t, l, h, _i in merged if not h)
    with LayerCache(path, max_mb, compress=compress) as cache:  # the bound and policy it stored
        result.stats = cache.stats()
        result.evictions = (cache.evictions() or 0) - evictions_before
        # Layers no put stored (too large, or the cache full of kept ones): as they would be now.
        stored = [weights[i] if i in weights else cache.stored_size(r) for i, r in enumerate(records)]
    result.requested_stored = sum(stored[l] for l in trace)
    result.hit_stored = sum(stored[l] for _t, l, h, _i in merged if h)
    if result.requested_stored:
        result.optimum_byte_hit_ratio = optimum_byte_hits(trace, stored, max_bytes) / result.requested_stored
        result.belady_byte_hit_ratio = belady_byte_hits(trace, stored, max_bytes) / result.requested_stored
    result.counter_hits = (result.stats["cache_hits"] or 0) - (before["cache_hits"] or 0)
    result.counter_misses = (result.stats["cache_misses"] or 0) - (before["cache_misses"] or 0)
    return result


class TraceOutError(RuntimeError):
    """The run's trace could not be written (``run``'s ``trace_out``); the message names the file."""


def _write_run_trace(path: str, merged: Sequence[Tuple[int, int, int, int]], cat: Catalogue,
                     sizes: Sequence[int], result: SimResult) -> None:
    """The run's requests as a trace file (``run``'s ``trace_out``): (ns, layer, hit, image) in time order."""
    t0 = merged[0][0] if merged else 0
    requests = (Request((t - t0) / 1e9, cat.layer_ids[l], sizes[l], f"image-{i}") for t, l, _h, i in merged)
    comments = [f"nvcache simulate: {result.processes} scanner processes, {result.images} images over "
                f"{result.layers} layers, seed {result.seed}, bound {result.max_bytes} stored bytes, policy "
                f"{result.policy}",
                "sizes are record bytes (the records compress in the run; replay stores them as given)"]
    try:
        write_trace(path, requests, comments)
    except OSError as exc:
        raise TraceOutError(f"--trace-out {path}: {exc.strerror or exc}") from exc
