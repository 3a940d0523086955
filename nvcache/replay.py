"""Replaying a trace file through real caches, one per eviction policy, beside Belady's optimum.

``nvcache replay TRACE`` (and :func:`replay`) reads a trace (:mod:`nvcache.trace`: one request per
line, ``time layer_id size image``), groups it into scans (consecutive lines of one image) and,
for each policy asked for, replays it in this one process through a real
:class:`~nvcache.LayerCache` opened with that policy in a fresh temporary directory (removed at
the end), at the given bound, the way a scanner uses the cache:

* for every request, ``get(layer_id)``; a hit saves the layer's analysis;
* on a miss, ``put(layer_id, record, keep=<the scan's layers>)``, where the record is ``size``
  pseudo-random bytes, the same for the same layer id (seeded by the id), in a cache opened with
  ``compress=False``: a record's stored size, what counts against the bound, is its size in the
  trace, and the bound is reported in stored bytes (``LayerCache.max_bytes``);
* a put the cache refuses (``RecordTooLarge``: larger than the bound, counted without making
  its bytes; ``CacheFull``: only the scan's kept records could make room) is counted, and the
  scan goes on.

A layer's size is the one of its first request (a cache holds one record per layer id).

Figures per policy: requests, hits, hit ratio, byte-hit ratio (bytes of the records hit / bytes
requested, in the trace's sizes), evictions, refused puts, and the analysis time saved under the
cost model of ``nvcache simulate`` (:func:`nvcache.simulate.analysis_seconds`, bench/policies.py's
``cost_ns``): analysing a layer whose record has ``n`` bytes costs
``fixed_us + us_per_kib * n / 1024`` µs, and a hit saves that. Beside them, on the same trace and
bound, two offline figures of :mod:`nvcache.simulate`, over stored bytes:

* ``optimum``: Belady's rule applied byte by byte (``optimum_byte_hits``), an upper bound of the
  byte-hit ratio of every policy that holds whole records in that bound;
* ``belady_whole``: Belady's rule on whole records (``belady_byte_hits``: evict or bypass the
  record needed furthest ahead), a good heuristic rather than a bound when sizes vary. Neither
  applies the keep rule, which only restricts a real cache further.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .arguments import bound_bytes
from .cache import LayerCache
from .errors import CacheFull, RecordTooLarge
from . import simulate as sim
from .trace import Request, read_trace, scans

DEFAULT_MAX_MB = 2.0  # `nvcache simulate`'s default bound: the demo's
DEFAULT_FIXED_US = 500.0
DEFAULT_US_PER_KIB = 40.0


@dataclass
class Workload:
    """A trace made ready to replay: layers numbered in order of first request, and the scans."""

    source: str
    layer_ids: List[str]
    sizes: List[int]  # bytes of each layer's record (its first request's size)
    scans: List[Tuple[str, Tuple[int, ...]]]  # (image, the layers it requested, in order)

    @property
    def requests(self) -> List[int]:
        """Every request's layer, in order (what the offline models replay)."""
        return [li for _image, layers in self.scans for li in layers]


def load(requests: Iterable[Request], source: str = "<trace>") -> Workload:
    """A :class:`Workload` of ``requests`` (read lazily: a bad line of a file raises TraceFormatError)."""
    index: Dict[str, int] = {}
    ids: List[str] = []
    sizes: List[int] = []
    runs: List[Tuple[str, Tuple[int, ...]]] = []
    for image, run in scans(requests):
        layers = []
        for r in run:
            li = index.get(r.layer_id)
            if li is None:
                li = index[r.layer_id] = len(ids)
                ids.append(r.layer_id)
                sizes.append(r.size)
            layers.append(li)
        runs.append((image, tuple(layers)))
    return Workload(source, ids, sizes, runs)


def load_file(path: Union[str, "os.PathLike[str]"]) -> Workload:
    """The :class:`Workload` of a trace file."""
    return load(read_trace(path), os.fspath(path))


def record_bytes(layer_id: str, size: int) -> bytes:
    """``size`` incompressible bytes standing for the record of ``layer_id``: the same every time."""
    return random.Random(f"nvcache-replay:{layer_id}").randbytes(size)


@dataclass
class PolicyResult(sim.HitRatios):
    """What one policy's replay measured (ratios are properties; ``as_dict`` has them too)."""

    policy: str
    requests: int = 0
    hits: int = 0
    requested_bytes: int = 0  # the trace's sizes
    hit_bytes: int = 0
    requested_stored: int = 0  # the same in stored bytes (equal for incompressible records)
    hit_stored: int = 0
    cost_all_s: float = 0.0  # the cost model: every request analysed
    cost_saved_s: float = 0.0  # the cost model: the hits' analyses
    evictions: int = 0
    cache_full: int = 0
    too_large: int = 0
    cache_s: float = 0.0  # measured time in get and put
    final_records: int = 0
    final_stored: int = 0

    @property
    def time_saved_share(self) -> float:
        return self.cost_saved_s / self.cost_all_s if self.cost_all_s else 0.0

    def as_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out.update(hit_ratio=self.hit_ratio, byte_hit_ratio=self.byte_hit_ratio,
                   stored_byte_hit_ratio=self.stored_byte_hit_ratio, time_saved_share=self.time_saved_share)
        return out


@dataclass
class ReplayResult:
    """A trace replayed at one bound: the trace's figures, each policy's, and the offline ones."""

    source: str
    max_mb: float
    max_bytes: int  # the bound in stored bytes, as the caches report it
    fixed_us: float
    us_per_kib: float
    scans: int
    requests: int
    layers: int  # distinct layers requested
    layer_bytes: int  # their sizes, summed once each
    requested_bytes: int
    requested_stored: int
    optimum_byte_hit_ratio: float = 0.0  # Belady byte by byte: the bound (stored bytes)
    belady_byte_hit_ratio: float = 0.0  # Belady on whole records: a heuristic (stored bytes)
    belady_hit_ratio: float = 0.0  # the same schedule's share of requests hit
    belady_time_saved_share: float = 0.0  # and of the analysis time (the cost model) its hits save
    policies: List[PolicyResult] = field(default_factory=list)

    def gap_closed(self, policy: PolicyResult, reference: str = "lru") -> Optional[float]:
        """The share of the ``reference`` policy's gap to the optimum that ``policy`` closes
        (stored byte-hit ratios; None when there is no reference or no gap)."""
        ref = next((p for p in self.policies if p.policy == reference), None)
        if ref is None:
            return None
        gap = self.optimum_byte_hit_ratio - ref.stored_byte_hit_ratio
        return (policy.stored_byte_hit_ratio - ref.stored_byte_hit_ratio) / gap if gap > 1e-12 else None

    def as_dict(self) -> Dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "policies"}
        out["policies"] = [dict(p.as_dict(), gap_closed=self.gap_closed(p)) for p in self.policies]
        return out


def replay_policy(work: Workload, path: str, max_mb: float, policy: Optional[str], fixed_us: float,
                  us_per_kib: float, stored: Sequence[int], cache_class: type = LayerCache) -> PolicyResult:
    """Replay ``work`` through a LayerCache at ``path`` (a new directory) opened with ``policy``.

    ``stored``: each layer's stored size (its size: stored as given); ``cache_class``: LayerCache
    or a subclass (the tests' one per core). Records are made again
    at each miss (about 20 µs for 8 KB), so a trace of any size replays in bounded memory."""
    cost = [sim.analysis_seconds(n, fixed_us, us_per_kib) for n in work.sizes]
    ids, sizes = work.layer_ids, work.sizes
    with cache_class(path, max_mb, compress=False, **sim.policy_kwargs(policy)) as cache:
        max_bytes = cache.max_bytes
        result = PolicyResult(sim.policy_of(cache))
        before = cache.evictions() or 0
        for _image, layers in work.scans:
            keep = [ids[li] for li in dict.fromkeys(layers)]
            for li in layers:
                result.requests += 1
                result.requested_bytes += sizes[li]
                result.requested_stored += stored[li]
                result.cost_all_s += cost[li]
                t0 = time.perf_counter()
                data = cache.get(ids[li])
                result.cache_s += time.perf_counter() - t0
                if data is not None:
                    result.hits += 1
                    result.hit_bytes += sizes[li]
                    result.hit_stored += stored[li]
                    result.cost_saved_s += cost[li]
                    continue
                if stored[li] > max_bytes:  # what put would refuse: no need to make the bytes
                    result.too_large += 1
                    continue
                record = record_bytes(ids[li], sizes[li])
                t0 = time.perf_counter()
                try:
                    cache.put(ids[li], record, keep=keep)
                except RecordTooLarge:
                    result.too_large += 1
                except CacheFull:
                    result.cache_full += 1
                result.cache_s += time.perf_counter() - t0
        result.evictions = (cache.evictions() or 0) - before
        stats = cache.stats()
        result.final_records = stats["record_count"] or 0
        result.final_stored = stats["record_total_size"] or 0
    return result


def replay(work: Workload, max_mb: float = DEFAULT_MAX_MB, policies: Optional[Sequence[str]] = None,
           fixed_us: float = DEFAULT_FIXED_US, us_per_kib: float = DEFAULT_US_PER_KIB,
           tmp_dir: Optional[str] = None, cache_class: type = LayerCache) -> ReplayResult:
    """Replay ``work`` once per policy (default: every one of ``simulate.known_policies()``) at a
    bound of ``max_mb`` MiB, and compute Belady's figures on the same trace and bound.

    The caches live in a temporary directory (under ``tmp_dir``, default the system's), removed
    at the end whatever happens."""
    if max_mb <= 0:
        raise ValueError(f"the bound must be above 0 MiB for a replay, got {max_mb:g}")
    names = list(policies) if policies else list(sim.known_policies())
    for name in names:
        sim.policy_kwargs(name)  # an unknown name fails before anything runs
    root = tempfile.mkdtemp(prefix="nvcache-replay-", dir=tmp_dir)
    try:
        max_bytes = bound_bytes(max_mb)  # as the caches count it
        stored = list(work.sizes)  # stored as given (compress=False)
        trace = work.requests
        result = ReplayResult(work.source, max_mb, max_bytes, fixed_us, us_per_kib, len(work.scans), len(trace),
                              len(work.layer_ids), sum(work.sizes), sum(work.sizes[li] for li in trace),
                              sum(stored[li] for li in trace))
        if result.requested_stored:
            result.optimum_byte_hit_ratio = sim.optimum_byte_hits(trace, stored, max_bytes) / result.requested_stored
            hits = sim.belady_hits(trace, stored, max_bytes)
            cost = [sim.analysis_seconds(n, fixed_us, us_per_kib) for n in work.sizes]
            result.belady_byte_hit_ratio = sum(stored[li] for li, hit in zip(trace, hits) if hit) / result.requested_stored
            result.belady_hit_ratio = sum(hits) / len(trace)
            result.belady_time_saved_share = (sum(cost[li] for li, hit in zip(trace, hits) if hit)
                                              / sum(cost[li] for li in trace))
        for i, name in enumerate(names):
            result.policies.append(replay_policy(work, os.path.join(root, f"{i}-{name}"), max_mb, name, fixed_us,
                                                 us_per_kib, stored, cache_class))
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)
