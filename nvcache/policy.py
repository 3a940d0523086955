"""The eviction policies: the one place that says which record goes first.

A policy is the whole of what the index knows about eviction order: the u64
rank that orders the ``lru`` table (the walk meets the lowest rank first; equal
ranks go by name), given by ``admit`` when a record is inserted and by
``access`` when a batch of buffered references is applied. Keepers, the
bound, CacheFull and the dump are the index's and the same for every policy;
``cache_data()`` lists records in the policy's order, next victim first.

A cache's policy is chosen when its file is created (``LayerCache(policy=)``)
and stored in it (meta ``policy``): the ranks in a file are one policy's. Both
cores use these classes: the compiled twin implements ``LRFU.access`` in C
(``_lrfu_access``) with the same operations in the same order.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

U64_MAX = (1 << 64) - 1  # ranks saturate, as the counters do


class LRU:
    """Least recently referred first: the seed's policy, and the default (rank = last_ns).

    ``clocked`` policies rank on the file's request clock (hits +
    misses applied so far, the ``access`` counters: it only grows, whichever
    process counts), which insert and apply then read; policies with
    ``ghosts`` leave each victim's rank in the ghost table and get it back in
    ``admit`` when the record returns. ``ties_by_name``: records of equal rank
    go by name (the seed's order for equal last references); else in key order,
    the ``lru`` table's own, so a walk never gathers a group of equal ranks.
    """

    name = "lru"
    clocked = False
    ghosts = False
    ties_by_name = True

    @staticmethod
    def admit(last_ns: int, tick: int, ghost: Optional[int]) -> int:
        """The rank of a record inserted last referred at ``last_ns``, at request ``tick``."""
        return last_ns

    @staticmethod
    def access(rank: int, last_ns: int, n: int, tick: int) -> int:
        """The rank after ``n`` references, the record's last reference now at ``last_ns``."""
        return last_ns


class LRFU:
    """LRFU (Lee et al., 2001) on the request clock, with ghosts: recency and frequency in one rank.

    A record's combined recency-frequency is CRF(t) = sum over its references
    i of 2**(-(t - t_i) / H): every reference adds 1, which halves every
    ``HALF_LIFE`` (H) requests. Ordering records by CRF at a common time t is
    ordering them by ``rank = t_last + H * log2(CRF(t_last))``, which stays
    fixed between references, so the rank fits the ``lru`` table as LRU's
    does. A reference of n at request T: CRF = n + 2**((rank - T) / H), so the
    stored rank is all the state (``access``). log2 CRF is capped at ``CAP``:
    a record outlives its last reference by at most CAP * H requests, so a
    layer popular once goes in the end. A record new to the cache starts at
    CRF 1 (rank = T); one evicted before starts from its ghost's rank, its
    history decayed to now. H = 10,000 requests and CAP = 3 were chosen by
    measurement on the four traces of ``bench/policies2.py`` (DEVELOPERS.md).
    The arithmetic is IEEE double in a fixed order, in both cores, then
    floored to an integer rank.
    """

    name = "lrfu"
    clocked = True
    ghosts = True
    ties_by_name = False  # puts between two requests share a rank: an import's thousands
    HALF_LIFE = 10_000
    CAP = 3

    @staticmethod
    def access(rank: int, last_ns: int, n: int, tick: int) -> int:
        if n == 0:  # a later last reference without references (a merged history): no change
            return rank
        x = min((rank - tick) / LRFU.HALF_LIFE, 64.0)  # above the cap anyway (a damaged rank can be far)
        crf = n + (0.0 if x < -64.0 else 2.0 ** x)
        return min(tick + math.floor(min(LRFU.CAP * LRFU.HALF_LIFE, LRFU.HALF_LIFE * math.log2(crf))), U64_MAX)

    @staticmethod
    def admit(last_ns: int, tick: int, ghost: Optional[int]) -> int:
        return tick if ghost is None else LRFU.access(ghost, last_ns, 1, tick)


POLICIES: Dict[str, Any] = {LRU.name: LRU, LRFU.name: LRFU}
DEFAULT_POLICY = LRU.name


def policy_named(name: str) -> Any:
    """The policy class of ``name``; ValueError naming the choices for another."""
    try:
        return POLICIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown eviction policy {name!r}: choose one of {', '.join(POLICIES)}") from None
