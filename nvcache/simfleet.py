"""The fleet: ``nvcache simulate --nodes N``, the same scans run over N nodes in four ways.

Every node is a directory of its own (``<root>/<mode>/node-<k>``: one cache each) with its own
scanner processes (``processes`` in all, split as evenly as possible). The registry and the scans
are :mod:`nvcache.simulate`'s (``build_catalogue``, ``plan_scans``): scan ``i`` of the plan goes
to node ``i % N``, and a node's processes take its scans in order from a counter of its own, so
every mode sees the same images on the same nodes in the same order. The modes:

``none``
    No sharing, no cache: every scan analyses every layer. Computed from the plan, not run.
``node``
    A cache per node, used as the scanner does today: ``get``, and on a miss analyse and ``put``.
``flight``
    The same caches through ``get_or_create``: on a node, one caller at a time analyses a layer.
``remote``
    ``get_or_create`` on caches with a remote tier shared by every node (``LayerCache(...,
    remote=RemoteTier(url))``): a local miss asks the tier, a put goes to it, and a creator
    claims the name fleet-wide, so the fleet analyses a layer once while the tier keeps it.
    Each run uses a fresh key prefix, so a shared server's earlier records never hit.

**Duplicated analyses.** An analysis runs from the moment the scanner starts analysing a layer
until its record is stored (``put`` returned; for ``get_or_create``, the call returned). An
analysis of layer L started at time s on node n is *duplicated* when at s

1. L's record was held where n's scanner could have had it from: n's own cache, and in the
   ``remote`` mode also the tier (each analysis looks, with an uncounted ``contains`` and an
   ``EXISTS``, the moment it starts), or
2. another analysis of L was in progress (started before s, record not stored yet) where its
   record would reach n: on n itself, and in the ``remote`` mode on any node
   (measured afterwards from every analysis's recorded (start, end) monotonic-clock stamps).

*Fleet-wide* duplicates use the same rule with "anywhere in the fleet" for both (any node's
cache, the tier, any node's analysis): what a fleet-wide tier could still save. Neither count
includes an analysis of a layer whose record was evicted meanwhile (that is the bound's cost,
the hit ratios' business). ``none`` keeps no record and reaches nothing: it has no duplicates
by this rule, and its row shows none.

**Hit ratios per tier.** Every access ends one of three ways: the node's cache had the record
(or got it from a process of the node that was creating it): a *local hit*; the tier had it
(counted by the process's RemoteTier: its ``remote_hits`` rose during the call): a *remote
hit*; or the call analysed the layer: a miss. The local hit ratio is local hits over accesses,
the remote one remote hits over the accesses the node's cache missed. Belady's optimum is
:func:`nvcache.simulate.optimum_byte_hits` per node on that node's trace with the node's bound,
in stored bytes, beside the local tier's own stored-byte-hit ratio (a remote hit is a local miss
there): as in the single-node run, a bound on what any policy of the local cache could reach.
"""

from __future__ import annotations

import inspect
import logging
import multiprocessing
import os
import time
import traceback
import uuid
from array import array
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import simulate as sim
from .cache import LayerCache
from .errors import CacheError, CacheFull, RecordTooLarge

log = logging.getLogger("nvcache.simfleet")

MODES: Tuple[str, ...] = ("none", "node", "flight", "remote")
LABELS: Dict[str, str] = {
    "none": "no sharing (no cache)",
    "node": "per-node cache",
    "flight": "per-node + single-flight",
    "remote": "per-node + remote + fleet single-flight",
}
# Bits of an analysis's probe: where the layer's record was held when the analysis started.
HELD_HERE, HELD_PEER, HELD_REMOTE = 1, 2, 4
LOCAL_HIT, REMOTE_HIT, ANALYSED = 1, 2, 0


def public_url(url: str) -> str:
    """``url`` without its password (``redis://:secret@host`` -> ``redis://***@host``; a unix
    URL's query, which may carry ``password=``, dropped): what a report may print."""
    scheme, sep, rest = url.partition("://")
    rest = rest.split("?", 1)[0]
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return scheme + sep + rest


def remote_supported() -> bool:
    """Whether this LayerCache takes ``remote=`` (the remote tier wired into the cache)."""
    return "remote" in inspect.signature(LayerCache.__init__).parameters


def node_scans(scans: Sequence[int], nodes: int) -> Tuple[Tuple[int, ...], ...]:
    """The plan split over the nodes: scan i goes to node i % nodes."""
    return tuple(tuple(scans[k::nodes]) for k in range(nodes))


def node_processes(processes: int, nodes: int) -> List[int]:
    """``processes`` split over the nodes as evenly as possible, at least one each."""
    processes = max(processes, nodes)
    return [processes // nodes + (k < processes % nodes) for k in range(nodes)]


@dataclass(frozen=True)
class FleetPlan:
    """What every fleet worker needs (pickled once per process under 'spawn')."""

    mode: str
    paths: Tuple[str, ...]  # every node's cache, by node
    max_mb: float
    layer_ids: Tuple[str, ...]
    sizes: Tuple[int, ...]
    digests: Tuple[bytes, ...]
    images: Tuple[Tuple[int, ...], ...]
    scans: Tuple[Tuple[int, ...], ...]  # by node
    fixed_us: float
    us_per_kib: float
    deadline: float  # time.monotonic()
    compress: bool = True
    remote_url: Optional[str] = None
    remote_prefix: str = ""


class _Probe:
    """Where a layer's record is held right now, asked without counting anything."""

    def __init__(self, plan: FleetPlan, node: int) -> None:
        self.node = node
        self.caches = [LayerCache(p, compress=plan.compress) for p in plan.paths]  # the stored bound
        self.client: Any = None
        self.prefix = plan.remote_prefix.encode()
        if plan.remote_url is not None:
            from .remote import connect
            self.client = connect(plan.remote_url, 1.0)

    def __call__(self, layer_id: str) -> int:
        flags = 0
        for k, cache in enumerate(self.caches):
            try:
                if cache.contains(layer_id):
                    flags |= HELD_HERE if k == self.node else HELD_PEER
            except CacheError:
                pass
        if self.client is not None:
            try:
                if self.client.exists(self.prefix + layer_id.encode() + b"_layer_file"):
                    flags |= HELD_REMOTE
            except Exception:  # noqa: BLE001 - a probe that fails says "not held"
                pass
        return flags

    def close(self) -> None:
        for cache in self.caches:
            cache.close()
        if self.client is not None:
            self.client.close()


def _fleet_worker(wid: int, node: int, plan: FleetPlan, next_scan: Any, done: Any, out: Any) -> None:
    """One scanner of node ``node``: the node's next scan until none are left or time is up."""
    stamps, layers, outcomes = array("q"), array("l"), bytearray()
    analyses, flags = array("q"), bytearray()  # (layer, start ns, end ns) triples; their probes
    counts = {"analysis_ns": 0, "cache_ns": 0, "wrong": 0, "errors": 0, "full": 0, "too_large": 0}
    tier_stats: Dict[str, int] = {}
    try:
        tier: Any = None
        kwargs: Dict[str, Any] = {}
        if plan.mode == "remote":
            from .remote import RemoteTier
            tier = RemoteTier(plan.remote_url or "", prefix=plan.remote_prefix)
            kwargs["remote"] = tier
        cache = LayerCache(plan.paths[node], plan.max_mb, compress=plan.compress, **kwargs)
        probe = _Probe(plan, node)
        my_scans = plan.scans[node]
        made: Dict[str, bytes] = {}  # a layer analysed again costs the model's time, not more
        try:
            while time.monotonic() < plan.deadline:
                with next_scan.get_lock():
                    i = next_scan.value
                    next_scan.value = i + 1
                if i >= len(my_scans):
                    break
                image = plan.images[my_scans[i]]
                keep = [plan.layer_ids[li] for li in image]
                for li in image:
                    lid, size = plan.layer_ids[li], plan.sizes[li]
                    spent = [0]  # analysis and probe time inside the call: not the cache's

                    def analyse(lid: str = lid, size: int = size, li: int = li) -> bytes:  # this access's
                        t0 = time.perf_counter_ns()
                        start = time.monotonic_ns()
                        flags.append(probe(lid))
                        analyses.extend((li, start, 0))
                        t1 = time.perf_counter_ns()
                        record = sim.analyse(lid, size, plan.fixed_us, plan.us_per_kib, made)
                        t2 = time.perf_counter_ns()
                        counts["analysis_ns"] += t2 - t1
                        spent[0] += t2 - t0
                        return record

                    stamps.append(time.monotonic_ns())
                    layers.append(li)
                    before = tier.stats()["remote_hits"] if tier is not None else 0
                    t0 = time.perf_counter_ns()
                    if plan.mode == "node":
                        data = _get(cache, lid, counts)
                        if data is None:
                            data = analyse()
                            _put(cache, lid, data, keep, counts)
                    else:
                        try:
                            data = cache.get_or_create(lid, analyse, keep=keep)
                        except CacheError as exc:  # it falls back to get/create/put itself: never here
                            log.warning("get_or_create %s: %s", lid, exc)
                            counts["errors"] += 1
                            data = analyse()
                    counts["cache_ns"] += time.perf_counter_ns() - t0 - spent[0]
                    if spent[0]:  # this call analysed: its record is stored now
                        analyses[-1] = time.monotonic_ns()
                        outcomes.append(ANALYSED)
                    else:
                        remote = tier is not None and tier.stats()["remote_hits"] > before
                        outcomes.append(REMOTE_HIT if remote else LOCAL_HIT)
                    if sim.record_digest(data) != plan.digests[li]:
                        counts["wrong"] += 1
                with done.get_lock():
                    done.value += 1
        finally:
            probe.close()
            cache.close()  # writes this process's buffered hits, misses and references
            if tier is not None:
                tier_stats = tier.stats()
                tier.close()
    except KeyboardInterrupt:
        out.put(("interrupted", wid, "interrupted (SIGINT)"))
        return
    except BaseException:
        out.put(("error", wid, traceback.format_exc()))
        return
    out.put(("ok", wid, node, stamps.tobytes(), layers.tobytes(), bytes(outcomes), analyses.tobytes(),
             bytes(flags), counts, tier_stats))


def _get(cache: LayerCache, lid: str, counts: Dict[str, int]) -> Optional[bytes]:
    try:
        return cache.get(lid)
    except CacheError as exc:  # a scanner treats it as a miss
        log.warning("get %s: %s", lid, exc)
        counts["errors"] += 1
        return None


def _put(cache: LayerCache, lid: str, data: bytes, keep: List[str], counts: Dict[str, int]) -> None:
    try:
        cache.put(lid, data, keep=keep)
    except RecordTooLarge:
        counts["too_large"] += 1
    except CacheFull:
        counts["full"] += 1
    except CacheError as exc:
        log.warning("put %s: %s", lid, exc)
        counts["errors"] += 1


# -- the figures ------------------------------------------------------------------------
Analysis = Tuple[int, int, int, int, int]  # (layer, start ns, end ns, node, probe flags)


def duplicated(analyses: Sequence[Analysis], fleet_scope: bool, held_mask: int) -> int:
    """How many of ``analyses`` are duplicated (module docstring): their probe has a bit of
    ``held_mask``, or an earlier analysis of the layer, on the same node unless ``fleet_scope``,
    was still in progress when they started."""
    groups: Dict[Tuple[int, int], List[Tuple[int, int, int]]] = {}
    for layer, start, end, node, flags in analyses:
        groups.setdefault((layer, -1 if fleet_scope else node), []).append((start, end, flags))
    count = 0
    for group in groups.values():
        group.sort()
        busy_until = -1  # the latest end among the analyses started so far
        for start, end, flags in group:
            if flags & held_mask or busy_until > start:
                count += 1
            busy_until = max(busy_until, end)
    return count


@dataclass
class ModeResult:
    """One mode's figures (``none``'s are computed from the plan)."""

    mode: str
    label: str
    scans_done: int = 0
    stopped_by_deadline: bool = False
    wall_s: float = 0.0
    accesses: int = 0
    local_hits: int = 0
    remote_hits: int = 0
    analyses: int = 0
    layers_analysed: int = 0  # distinct layers
    duplicated: Optional[int] = None
    fleet_duplicated: Optional[int] = None
    analysis_no_cache_s: float = 0.0  # modelled: every access analysed
    analysis_run_s: float = 0.0       # modelled: the analyses run
    analysis_measured_s: float = 0.0  # what the workers slept
    cache_overhead_s: float = 0.0     # measured time in cache calls, analyses and probes excluded
    requested_stored: int = 0
    local_hit_stored: int = 0
    optimum_hit_stored: int = 0
    counter_hits: int = 0  # the node caches' own counters, summed
    counter_misses: int = 0
    evictions: int = 0
    flight_waits: int = 0
    flight_takeovers: int = 0
    remote_stats: Dict[str, int] = field(default_factory=dict)  # the workers' tiers, summed
    wrong_records: int = 0
    errors: int = 0
    cache_full: int = 0
    too_large: int = 0

    @property
    def local_hit_ratio(self) -> float:
        return self.local_hits / self.accesses if self.accesses else 0.0

    @property
    def remote_hit_ratio(self) -> float:
        asked = self.accesses - self.local_hits
        return self.remote_hits / asked if asked else 0.0

    @property
    def local_stored_byte_hit_ratio(self) -> float:
        return self.local_hit_stored / self.requested_stored if self.requested_stored else 0.0

    @property
    def optimum_byte_hit_ratio(self) -> float:
        return self.optimum_hit_stored / self.requested_stored if self.requested_stored else 0.0

    @property
    def time_saved_s(self) -> float:
        return self.analysis_no_cache_s - self.analysis_run_s - self.cache_overhead_s

    def as_dict(self) -> Dict[str, Any]:
        out = dict(self.__dict__)
        out.update(local_hit_ratio=self.local_hit_ratio, remote_hit_ratio=self.remote_hit_ratio,
                   local_stored_byte_hit_ratio=self.local_stored_byte_hit_ratio,
                   optimum_byte_hit_ratio=self.optimum_byte_hit_ratio, time_saved_s=self.time_saved_s)
        return out


@dataclass
class FleetResult:
    """Everything ``nvcache simulate --nodes N`` reports."""

    root: str
    nodes: int
    processes: List[int]  # per node
    images: int
    layers: int
    catalogue_bytes: int
    max_bytes: int
    seed: int
    scans_planned: int
    remote_url: Optional[str] = None  # without its password (public_url)
    remote_private: bool = False  # the run started its own redis-server
    remote_maxmemory_mb: Optional[float] = None
    modes: List[ModeResult] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)  # mode -> why it did not run
    worker_cores: List[str] = field(default_factory=list)

    def as_dict(self) -> Dict[str, Any]:
        out = dict(self.__dict__)
        out["modes"] = [m.as_dict() for m in self.modes]
        return out


def _no_sharing(cat: sim.Catalogue, scans: Sequence[int], cost: Sequence[float]) -> ModeResult:
    r = ModeResult("none", LABELS["none"], scans_done=len(scans))
    for s in scans:
        for li in cat.images[s]:
            r.accesses += 1
            r.analysis_no_cache_s += cost[li]
    r.analyses, r.analysis_run_s = r.accesses, r.analysis_no_cache_s
    r.layers_analysed = len({li for s in scans for li in cat.images[s]})
    return r


def _run_mode(mode: str, root: str, plan_args: Dict[str, Any], split: List[int], records: List[bytes],
              cost: Sequence[float], start_method: str, duration: float, result: FleetResult,
              progress: Optional[Callable[[str, int, int], None]]) -> ModeResult:
    nodes = len(split)
    paths = tuple(os.path.join(root, mode, f"node-{k}") for k in range(nodes))
    befores = []
    for p in paths:  # created (and their bound stored) before any worker opens a peer's
        with LayerCache(p, plan_args["max_mb"], compress=plan_args["compress"]) as cache:
            if not cache.enabled:
                raise ValueError("the bound must be above 0 MiB for a simulation")
            result.max_bytes = cache.max_bytes
            befores.append((cache.stats(), cache.evictions() or 0, cache.flight_stats()))
    ctx = multiprocessing.get_context(start_method)
    counters = [ctx.Value("q", 0) for _ in range(nodes)]
    done, out = ctx.Value("q", 0), ctx.Queue()
    started = time.monotonic()
    plan = FleetPlan(mode=mode, paths=paths, deadline=started + duration, **plan_args)
    total = sum(len(s) for s in plan.scans)
    procs, w = [], 0
    for k, n in enumerate(split):
        for _ in range(n):
            procs.append(ctx.Process(target=_fleet_worker, args=(w, k, plan, counters[k], done, out),
                                     name=f"nvcache-node{k}-scanner-{w}"))
            w += 1

    def stop() -> None:
        for k, c in enumerate(counters):
            with c.get_lock():
                c.value = max(c.value, len(plan.scans[k]))

    def poll() -> None:
        if progress is not None:
            progress(mode, min(done.value, total), total)

    reports = sim.gather(procs, out, stop, poll)
    r = ModeResult(mode, LABELS[mode], wall_s=time.monotonic() - started, scans_done=done.value)
    r.stopped_by_deadline = r.scans_done < total
    poll()
    traces: List[List[Tuple[int, int, int]]] = [[] for _ in range(nodes)]
    found: List[Analysis] = []
    for _tag, _w, node, raw_ts, raw_layers, outs, raw_an, raw_flags, counts, tier_stats in reports.values():
        ts, ls, an = array("q"), array("l"), array("q")
        ts.frombytes(raw_ts)
        ls.frombytes(raw_layers)
        an.frombytes(raw_an)
        traces[node].extend(zip(ts, ls, outs))
        found.extend((an[i], an[i + 1], an[i + 2], node, raw_flags[i // 3]) for i in range(0, len(an), 3))
        r.analysis_measured_s += counts["analysis_ns"] / 1e9
        r.cache_overhead_s += counts["cache_ns"] / 1e9
        for name, key in (("wrong_records", "wrong"), ("errors", "errors"), ("cache_full", "full"),
                          ("too_large", "too_large")):
            setattr(r, name, getattr(r, name) + counts[key])
        for key, value in tier_stats.items():
            r.remote_stats[key] = r.remote_stats.get(key, 0) + value
    r.analyses = len(found)
    r.layers_analysed = len({a[0] for a in found})
    r.duplicated = duplicated(found, mode == "remote", HELD_HERE | (HELD_REMOTE if mode == "remote" else 0))
    r.fleet_duplicated = duplicated(found, True, HELD_HERE | HELD_PEER | HELD_REMOTE)
    for k, trace in enumerate(traces):
        trace.sort()  # the order the node's cache saw its accesses
        r.accesses += len(trace)
        r.local_hits += sum(1 for _t, _l, o in trace if o == LOCAL_HIT)
        r.remote_hits += sum(1 for _t, _l, o in trace if o == REMOTE_HIT)
        r.analysis_no_cache_s += sum(cost[li] for _t, li, _o in trace)
        with LayerCache(paths[k], compress=plan.compress) as cache:
            stats, (before, evictions_before, flight_before) = cache.stats(), befores[k]
            r.counter_hits += (stats["cache_hits"] or 0) - (before["cache_hits"] or 0)
            r.counter_misses += (stats["cache_misses"] or 0) - (before["cache_misses"] or 0)
            r.evictions += (cache.evictions() or 0) - evictions_before
            flight = cache.flight_stats() or {}
            r.flight_waits += int(flight.get("waits", 0) - (flight_before or {}).get("waits", 0))
            r.flight_takeovers += int(flight.get("takeovers", 0) - (flight_before or {}).get("takeovers", 0))
            used = {li for _t, li, _o in trace}
            stored = [cache.stored_size(records[i]) if i in used else 0 for i in range(len(records))]
        layer_trace = [li for _t, li, _o in trace]
        r.requested_stored += sum(stored[li] for li in layer_trace)
        r.local_hit_stored += sum(stored[li] for _t, li, o in trace if o == LOCAL_HIT)
        r.optimum_hit_stored += sim.optimum_byte_hits(layer_trace, stored, result.max_bytes)
    r.analysis_run_s = sum(cost[a[0]] for a in found)
    return r


def run_fleet(root: str, *, nodes: int, processes: int, images: int, layers: int, scans: int, max_mb: float,
              seed: int = 1, skew: float = 1.0, duration: float = 60.0, fixed_us: float = 500.0,
              us_per_kib: float = 40.0, start_method: str = "spawn", compress: bool = True,
              remote: Optional[str] = None, remote_mb: float = 64.0, modes: Sequence[str] = MODES,
              progress: Optional[Callable[[str, int, int], None]] = None) -> FleetResult:
    """Run ``modes`` (default all four, in order) over ``nodes`` node directories under ``root``
    and return their figures; ``progress(mode, done, total)`` is called while each runs.

    ``remote``: the tier's URL for the ``remote`` mode; None starts a private redis-server
    (:class:`nvcache.redislocal.PrivateRedis`, ``maxmemory`` = ``remote_mb`` MiB, allkeys-lru)
    in ``<root>/redis`` for that mode and stops it after; without the binary, or without
    ``LayerCache(remote=...)``, the mode is skipped and ``skipped`` says why. ``duration``
    bounds each mode's run.
    """
    if nodes < 1 or scans < 1 or processes < 1:
        raise ValueError("nodes, processes and scans must be at least 1")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown modes {unknown}: choose from {list(MODES)}")
    cat = sim.build_catalogue(images, layers, seed, skew)
    plan = sim.plan_scans(cat, scans, seed)
    records = [sim.make_record(lid, size) for lid, size in zip(cat.layer_ids, cat.sizes)]
    cost = [sim.analysis_seconds(len(r), fixed_us, us_per_kib) for r in records]
    split = node_processes(processes, nodes)
    result = FleetResult(root=root, nodes=nodes, processes=split, images=images, layers=layers,
                         catalogue_bytes=sum(len(r) for r in records), max_bytes=0, seed=seed, scans_planned=scans)
    plan_args = dict(max_mb=max_mb, layer_ids=cat.layer_ids, sizes=cat.sizes,
                     digests=tuple(sim.record_digest(r) for r in records), images=cat.images,
                     scans=node_scans(plan, nodes), fixed_us=fixed_us, us_per_kib=us_per_kib, compress=compress)
    for mode in modes:
        if mode == "none":
            result.modes.append(_no_sharing(cat, plan, cost))
            continue
        if mode != "remote":
            result.modes.append(_run_mode(mode, root, plan_args, split, records, cost, start_method, duration,
                                          result, progress))
            continue
        if not remote_supported():
            result.skipped[mode] = "this LayerCache has no remote tier yet (LayerCache(remote=...))"
            continue
        server = None
        url = remote
        if url is None:
            from .redislocal import PrivateRedis, available
            if available() is None:
                result.skipped[mode] = "redis-server is not installed (and no --remote URL was given)"
                continue
            server = PrivateRedis(os.path.join(root, "redis"), remote_mb).start()
            url, result.remote_private, result.remote_maxmemory_mb = server.url, True, remote_mb
        result.remote_url = public_url(url)
        try:
            args = dict(plan_args, remote_url=url, remote_prefix=f"nvcache-sim:{uuid.uuid4().hex[:12]}:")
            result.modes.append(_run_mode(mode, root, args, split, records, cost, start_method, duration,
                                          result, progress))
        finally:
            if server is not None:
                server.stop()
            else:
                _drop_prefix(url, args["remote_prefix"])
    return result


def _drop_prefix(url: str, prefix: str) -> None:
    """Remove this run's keys from a server it was given (it was there before us; leave it as found)."""
    from .remote import RemoteTier
    tier = RemoteTier(url, prefix=prefix, timeout=5.0)
    try:
        if tier.clear() is None:
            log.warning("could not remove this run's keys (%s*) from %s", prefix, url.split("@")[-1])
    finally:
        tier.close()
