"""The simulation engine: registry, offline policies, and real multi-process runs over both cores."""

import json
import random
from collections import Counter
from typing import Any, List

import pytest
from hypothesis import given, settings, strategies as st

import nvcache
from nvcache import simulate as sim


# -- offline policies ---------------------------------------------------------------------
def test_policies_on_hand_computed_traces():
    # Unit sizes, room for two, a cycle of three: LRU always misses; Belady keeps 0 and 1.
    sizes, trace = [1, 1, 1], [0, 1, 2, 0, 1, 2]
    assert sim.lru_byte_hits(trace, sizes, 2) == 0
    assert sim.belady_byte_hits(trace, sizes, 2) == 2
    assert sim.optimum_byte_hits(trace, sizes, 2) == 2
    # Two records of 2 bytes, room for 3: whole records allow one hit (2 bytes), bytes allow 2 + 1.
    sizes, trace = [2, 2], [0, 1, 0, 1]
    assert sim.lru_byte_hits(trace, sizes, 3) == 0
    assert sim.belady_byte_hits(trace, sizes, 3) == 2
    assert sim.optimum_byte_hits(trace, sizes, 3) == 3
    # A record larger than the cache is never held.
    # nor by the bound: no cache of whole records holds any of it (it counted 4 of its 5 bytes
    # before session 9, a looser bound)
    assert sim.optimum_byte_hits([0, 0], [5], 4) == 0
    assert sim.belady_byte_hits([0, 0], [5], 4) == 0
    assert sim.lru_byte_hits([0, 0], [5], 4) == 0


@settings(max_examples=300, deadline=None)
@given(sizes=st.lists(st.integers(1, 50), min_size=1, max_size=8), data=st.data(),
       capacity=st.integers(0, 200))
def test_optimum_bounds_every_policy(sizes: List[int], data: Any, capacity: int):
    trace = data.draw(st.lists(st.integers(0, len(sizes) - 1), max_size=60))
    requested = sum(sizes[o] for o in trace)
    compulsory = sum(sizes[o] for o in set(trace))  # a first request can never hit
    opt = sim.optimum_byte_hits(trace, sizes, capacity)
    whole = sim.belady_byte_hits(trace, sizes, capacity)
    lru = sim.lru_byte_hits(trace, sizes, capacity)
    assert 0 <= lru <= opt <= requested - compulsory
    assert 0 <= whole <= opt
    if capacity >= sum(sizes):  # everything fits: every policy hits every repeat
        assert opt == whole == lru == requested - compulsory


# -- the registry -----------------------------------------------------------------------------
def test_catalogue_shape_and_determinism():
    cat = sim.build_catalogue(50, 400, seed=7)
    assert len(cat.sizes) == len(cat.layer_ids) == 400
    assert len(set(cat.layer_ids)) == 400
    assert all(i.startswith("sha256:") and len(i) == 71 for i in cat.layer_ids)
    assert all(sim.MIN_RECORD <= s <= sim.MAX_RECORD for s in cat.sizes)
    assert len(cat.images) == len(cat.weights) == 50
    assert all(len(set(img)) == len(img) for img in cat.images)
    use = Counter(layer for img in cat.images for layer in img)
    assert max(use.values()) >= 5  # base layers are shared by many images
    assert sum(1 for n in use.values() if n == 1) >= 200  # most application layers are one image's own
    assert sorted(cat.weights, reverse=True)[0] == 1.0  # Zipf: rank 1 weighs 1, the tail much less
    assert min(cat.weights) == pytest.approx(1 / 50)
    assert sim.build_catalogue(50, 400, seed=7) == cat
    assert sim.build_catalogue(50, 400, seed=8) != cat
    with pytest.raises(ValueError):
        sim.build_catalogue(50, 51)


def test_records_are_scanner_shaped_and_checkable():
    rec = sim.make_record("sha256:ab", 3000)
    assert 2990 <= len(rec) <= 3000 and "modules" in json.loads(rec)
    assert sim.make_record("sha256:ab", 3000) == rec != sim.make_record("sha256:ac", 3000)
    assert sim.record_digest(rec) == sim.record_digest(bytes(rec)) != sim.record_digest(rec[:-1])
    assert 40 <= len(sim.make_record("sha256:ab", 3)) <= 100  # the smallest record the scanner writes


# -- real runs --------------------------------------------------------------------------------
@pytest.fixture
def worker_core(core: Any, monkeypatch: Any) -> str:
    """Make the spawned scanner processes pick ``core`` (they read NVCACHE_NO_EXTENSIONS at import)."""
    monkeypatch.setenv("NVCACHE_NO_EXTENSIONS", "1" if core is nvcache.fallback else "")
    return "python" if core is nvcache.fallback else "compiled"


TINY_MB = 0.015  # about 60 % of what the tiny catalogue's 40 records take stored: eviction happens


def _tiny_run(path: str, processes: int) -> sim.SimResult:
    return sim.run(path, processes=processes, images=8, layers=40, scans=80, max_mb=TINY_MB, seed=3,
                   duration=60, fixed_us=50, us_per_kib=2)


def _check_counts(r: sim.SimResult, path: str, Cache: type) -> None:
    cat = sim.build_catalogue(8, 40, 3)
    assert r.scans_done == 80 and not r.stopped_by_deadline
    assert r.requests == r.hits + r.misses
    assert r.requests == sum(len(cat.images[i]) for i in sim.plan_scans(cat, 80, 3))
    assert (r.counter_hits, r.counter_misses) == (r.hits, r.misses)  # the cache's counters agree
    assert r.hits > 0 and r.evictions > 0
    assert r.wrong_records == 0 and r.errors == 0
    with Cache(path, TINY_MB) as cache:
        assert cache.verify() == []
        stats = cache.stats()
    assert stats == r.stats
    assert stats["record_total_size"] <= r.max_bytes


def test_one_scanner_never_beats_the_optimum(worker_core, Cache, cache_dir):
    r = _tiny_run(cache_dir, processes=1)
    assert r.worker_cores == [worker_core]
    _check_counts(r, cache_dir, Cache)
    # One process loads a record right after its miss, so its LRU is a feasible policy on the trace
    # (the optimum is of stored bytes, each worth the same).
    assert r.optimum_byte_hit_ratio >= r.stored_byte_hit_ratio
    assert r.optimum_byte_hit_ratio >= r.belady_byte_hit_ratio
    assert 0 < r.byte_hit_ratio < 1


def test_two_scanners_share_one_cache(worker_core, Cache, cache_dir):
    r = _tiny_run(cache_dir, processes=2)
    assert r.worker_cores == [worker_core, worker_core]
    _check_counts(r, cache_dir, Cache)
    assert r.optimum_byte_hit_ratio >= r.belady_byte_hit_ratio
    assert r.analysis_no_cache_s > r.analysis_with_cache_s > 0
    assert json.loads(json.dumps(r.as_dict()))["hit_ratio"] == pytest.approx(r.hits / r.requests)


def test_duration_stops_the_run(tmp_path):
    r = sim.run(str(tmp_path / "c"), processes=1, images=8, layers=40, scans=100_000, max_mb=1,
                duration=1.0, fixed_us=200, us_per_kib=0)
    assert r.stopped_by_deadline and 0 < r.scans_done < 100_000
    assert r.requests == r.hits + r.misses == r.counter_hits + r.counter_misses
    assert r.wall_s < 10


def test_belady_hits_says_which_requests_hit():
    """Belady on whole records, by hand: capacity 2, layer 2 is never needed again (bypassed)."""
    assert list(sim.belady_hits([0, 1, 0, 2, 0, 1], [1, 1, 1], 2)) == [0, 0, 1, 0, 1, 1]
    assert list(sim.belady_hits([0, 1, 2, 0], [2, 1, 1], 2)) == [0, 0, 0, 1]  # 0 kept: needed again
    rng = random.Random(3)
    for _ in range(20):
        sizes = [rng.randrange(1, 50) for _ in range(30)]
        trace = [rng.randrange(30) for _ in range(300)]
        hits = sim.belady_hits(trace, sizes, 200)
        assert sim.belady_byte_hits(trace, sizes, 200) == sum(sizes[o] for o, h in zip(trace, hits) if h)
        assert sum(hits) <= len(trace) - len(set(trace))  # a first request never hits
