"""Offline models of a trace of requests: what a cache of a given capacity could have hit.

The trace is a sequence of object numbers, ``sizes`` their sizes (in the unit the capacity
counts: stored bytes for nvcache). Belady's rule applied byte by byte (``optimum_byte_hits``) is
an upper bound of every policy holding whole records; on whole records (``belady_hits``,
``belady_byte_hits``) it is a heuristic (evict or bypass the record needed furthest ahead);
``lru_byte_hits`` is exact LRU of whole records, a reference for tests. ``nvcache simulate``,
``nvcache replay`` and the bench's policy comparisons report their figures beside a real cache's.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple

_NEVER = math.inf


def _next_uses(trace: Sequence[int]) -> List[float]:
    nxt: List[float] = [_NEVER] * len(trace)
    seen: Dict[int, int] = {}
    for i in range(len(trace) - 1, -1, -1):
        nxt[i] = seen.get(trace[i], _NEVER)
        seen[trace[i]] = i
    return nxt


def optimum_byte_hits(trace: Sequence[int], sizes: Sequence[int], capacity: int) -> int:
    """Bytes hit by Belady's rule applied byte by byte: the optimum byte-hit count.

    Treating every byte as a unit page makes the sizes uniform, where
    Belady's rule (keep what is needed soonest, may bypass) is optimal; a
    cache that must hold whole records can only do worse, so this bounds
    every policy (LRU, and Belady on whole records) from above for the same
    capacity and trace. A record larger than the capacity is left out: no
    such cache holds any of it, so the bound stays one and is tighter.
    """
    nxt = _next_uses(trace)
    held_of: Dict[int, int] = {}
    due: Dict[int, float] = {}
    heap: List[Tuple[float, int]] = []
    held = hit = 0
    for i, obj in enumerate(trace):
        have = held_of.get(obj, 0)
        hit += have
        if sizes[obj] > capacity:  # no cache of whole records holds it: nor does this bound
            continue
        if nxt[i] == _NEVER:  # never needed again: no reason to keep any of it
            held -= held_of.pop(obj, 0)
            due.pop(obj, None)
            continue
        held += sizes[obj] - have
        held_of[obj] = sizes[obj]
        due[obj] = nxt[i]
        heapq.heappush(heap, (-nxt[i], obj))
        while held > capacity:
            neg, victim = heap[0]
            if due.get(victim) != -neg:  # stale entry
                heapq.heappop(heap)
                continue
            excess = held - capacity
            have = held_of[victim]
            if have <= excess:
                heapq.heappop(heap)
                del held_of[victim], due[victim]
                held -= have
            else:
                held_of[victim] = have - excess
                held -= excess
    return hit


def belady_byte_hits(trace: Sequence[int], sizes: Sequence[int], capacity: int) -> int:
    """Bytes hit by Belady's rule on whole records (evict or bypass the one needed furthest ahead)."""
    hits = belady_hits(trace, sizes, capacity)
    return sum(sizes[obj] for obj, hit in zip(trace, hits) if hit)


def belady_hits(trace: Sequence[int], sizes: Sequence[int], capacity: int) -> bytearray:
    """Which requests Belady's rule on whole records hits (1) or misses (0)."""
    nxt = _next_uses(trace)
    cached: Dict[int, float] = {}
    heap: List[Tuple[float, int]] = []
    held = 0
    hits = bytearray(len(trace))
    for i, obj in enumerate(trace):
        size = sizes[obj]
        if obj in cached:
            hits[i] = 1
        if nxt[i] == _NEVER:
            if cached.pop(obj, None) is not None:
                held -= size
            continue
        if obj not in cached:
            if size > capacity:
                continue
            held += size
        cached[obj] = nxt[i]
        heapq.heappush(heap, (-nxt[i], obj))
        while held > capacity:
            neg, victim = heapq.heappop(heap)
            if cached.get(victim) == -neg:
                del cached[victim]
                held -= sizes[victim]
    return hits


def lru_byte_hits(trace: Sequence[int], sizes: Sequence[int], capacity: int) -> int:
    """Bytes hit by a plain LRU of whole records (a model, for comparison and tests)."""
    lru: "OrderedDict[int, None]" = OrderedDict()
    held = hit = 0
    for obj in trace:
        size = sizes[obj]
        if obj in lru:
            hit += size
            lru.move_to_end(obj)
            continue
        if size > capacity:
            continue
        lru[obj] = None
        held += size
        while held > capacity:
            victim, _ = lru.popitem(last=False)
            held -= sizes[victim]
    return hit
