"""The eviction policy as a cache's users see it: chosen at creation, stored, kept, and what
LRFU does that LRU does not (both cores; the exact orders are test_model's and test_twins')."""

import logging
import os
import subprocess
import sys

import pytest

import nvcache
from nvcache.cachedir import FORMAT_DIR, DATA_FILE
from nvcache.names import record_key
from payloads import incompressible

RECORD = 1000  # incompressible: stored as given
MiB = 1024 * 1024


def put_all(cache, ids, keep=()):
    for i in ids:
        assert cache.put(i, incompressible(RECORD, i), keep=keep) is True


def after(layer_id):
    """A layer id whose record key sorts after ``layer_id``'s: LRFU orders equal ranks by key, so
    a record put afresh next to it goes second."""
    return next(i for i in (f"sha256:new{n}" for n in range(100))
                if record_key(i, "layer_file") > record_key(layer_id, "layer_file"))


def evict_a_hot_record(cache, hot):
    """``hot`` put and read 20 times, then evicted (with a kept record beside it): its ghost is the
    one eviction so far. The cache holds 2 records: sha256:a and sha256:b."""
    put_all(cache, [hot])
    for _ in range(20):
        assert cache.get(hot) is not None
    put_all(cache, ["sha256:a"])
    put_all(cache, ["sha256:b"], keep=["sha256:a"])
    assert not cache.contains(hot) and cache.evictions() == 1


def names(cache):
    """The layer ids in the dump's order (next victim first)."""
    return [r["layer_id"].rsplit("_layer_file", 1)[0] for r in cache.cache_data()["cache_records"]]


def test_policy_names_are_checked(Cache, cache_dir):
    for bad in ("LRU ", "arc", 3, b"lru"):
        with pytest.raises(ValueError, match="unknown eviction policy .*choose one of lru, lrfu"):
            Cache(cache_dir, 1, policy=bad)
    assert not os.path.exists(os.path.join(cache_dir, FORMAT_DIR, DATA_FILE))  # nothing made
    assert nvcache.POLICIES == ("lru", "lrfu") and nvcache.DEFAULT_POLICY == "lru"


def test_the_policy_is_the_cache_s(Cache, cache_dir, caplog):
    with Cache(cache_dir, 1) as cache:
        assert cache.policy == "lru"  # the default, the seed's
    with Cache(os.path.join(cache_dir, "b"), 1, policy="lrfu") as cache:
        assert cache.policy == "lrfu"
        put_all(cache, ["sha256:a"])
    with Cache(os.path.join(cache_dir, "b"), 1) as cache:  # None: the stored one
        assert cache.policy == "lrfu"
    with caplog.at_level(logging.WARNING, logger="nvcache"):
        with Cache(os.path.join(cache_dir, "b"), 1, policy="lru") as cache:
            assert cache.policy == "lrfu"  # an existing cache keeps its own
            assert cache.get("sha256:a") == incompressible(RECORD, "sha256:a")
    assert "keeps its eviction policy lrfu (asked for lru)" in caplog.text
    assert Cache(cache_dir, 0).policy is None  # disabled: no cache, no policy


def test_from_env_takes_nvcache_policy(Cache, cache_dir, monkeypatch):
    monkeypatch.setenv("NVCACHE_PATH", cache_dir)
    monkeypatch.setenv("MAX_CACHE_RECORD_MB", "1")
    monkeypatch.setenv("NVCACHE_POLICY", "lrfu")
    with Cache.from_env() as cache:
        assert cache.policy == "lrfu"
    monkeypatch.setenv("NVCACHE_POLICY", "nope")
    with pytest.raises(ValueError, match="unknown eviction policy 'nope'"):
        Cache.from_env()


def test_a_rebuilt_cache_keeps_its_policy(Cache, cache_dir):
    with Cache(cache_dir, 1, policy="lrfu") as cache:
        put_all(cache, ["sha256:a"])
    data = os.path.join(cache_dir, FORMAT_DIR, DATA_FILE)
    with open(data, "r+b") as f:  # both meta pages: no usable environment
        f.write(os.urandom(8192))
    with Cache(cache_dir, 1) as cache:
        assert cache.get("sha256:a") is None  # rebuilt empty
        assert cache.policy == "lrfu"
        assert cache.verify() == []


def test_lrfu_never_gathers_equal_ranks(Cache, cache_dir):
    """Puts with no request between them share LRFU's rank (the request clock stands still), as
    in an import: ties go in key order, and the dump lists them so (LRU's go by name)."""
    ids = [f"sha256:{n}" for n in range(50)]
    with Cache(cache_dir, 1, policy="lrfu") as cache:
        put_all(cache, ids)
        assert names(cache) == sorted(ids, key=lambda i: record_key(i, "layer_file"))
    with Cache(os.path.join(cache_dir, "lru"), 1) as cache:
        for i in ids:
            cache.restore(i, incompressible(RECORD, i), reference_count=1, last_referred_ns=10**18)
        assert names(cache) == sorted(ids, key=lambda i: i + "_layer_file")  # the record name


@pytest.mark.parametrize("policy, survives", [("lru", False), ("lrfu", True)])
def test_a_popular_record_outlives_a_scan_of_new_ones_only_under_lrfu(Cache, cache_dir, policy, survives):
    """A base layer hit often, then 300 layers each seen once (a wave of one-off images): LRU
    evicts the base layer once it is the least recent; LRFU keeps it (its CRF is far above a
    new record's 1 until about CAP half-lives of requests have passed)."""
    with Cache(cache_dir, 100_000 / MiB, policy=policy) as cache:
        put_all(cache, ["sha256:base"])
        for _ in range(30):
            assert cache.get("sha256:base") is not None
        for n in range(300):
            i = f"sha256:once{n}"
            assert cache.get(i) is None
            put_all(cache, [i])
        assert cache.contains("sha256:base") is survives
        assert cache.evictions() > 150
        assert cache.verify() == []


def test_an_evicted_record_comes_back_with_its_history_under_lrfu(Cache, cache_dir):
    """LRFU keeps an evicted record's rank in the ghost table: put again, it is ranked by its
    history (decayed), so a once-popular layer put back before a cold one still outranks it."""
    with Cache(cache_dir, 3 * RECORD / MiB, policy="lrfu") as cache:
        put_all(cache, ["sha256:hot"])
        for _ in range(20):
            assert cache.get("sha256:hot") is not None
        put_all(cache, ["sha256:cold", "sha256:filler"])
        cache.resize(RECORD / MiB)
        assert names(cache) == ["sha256:hot"]  # the two put after it go first
        put_all(cache, ["sha256:x"])  # evicts hot
        cache.resize(3 * RECORD / MiB)
        put_all(cache, ["sha256:hot", "sha256:cold"])
        assert names(cache) == ["sha256:x", "sha256:cold", "sha256:hot"]  # each ranked by its ghost
        assert cache.verify() == []


@pytest.mark.parametrize("forget", ["clear", "delete"])
def test_clear_and_delete_leave_no_ghost(Cache, cache_dir, forget):
    """A ghost is what an eviction leaves; clear() drops the ghosts, and a deleted record
    leaves none: put again, the record starts afresh (a tie with a new one, in key order)."""
    hot = "sha256:hot"
    with Cache(cache_dir, 2 * RECORD / MiB, policy="lrfu") as cache:
        evict_a_hot_record(cache, hot)
        cache.delete("sha256:a")
        put_all(cache, [hot])  # back from its ghost, ranked above b
        assert names(cache) == ["sha256:b", hot]
        if forget == "clear":
            put_all(cache, ["sha256:c"], keep=["sha256:b"])  # evicts hot again: a ghost again
            cache.clear()
        else:
            cache.delete(hot)
            cache.delete("sha256:b")
        put_all(cache, [hot, after(hot)])
        assert names(cache) == [hot, after(hot)]
        assert cache.verify() == []


def test_the_policy_is_the_file_s_across_processes(cache_dir, core_env, Cache):
    """Another process fills an LRFU cache; this one opens it without naming a policy and sees
    the policy and the ranks that process wrote."""
    code = ("import nvcache, sys\n"
            "from payloads import incompressible\n"
            "c = nvcache.LayerCache(sys.argv[1], 0.01, policy='lrfu')\n"
            "for n in range(40):\n"
            "    i = 'sha256:%d' % n\n"
            "    c.put(i, incompressible(1000, i))\n"
            "    [c.get('sha256:0') for _ in range(3)]\n"
            "c.close()\n")
    env = dict(core_env)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.abspath(__file__)), env["PYTHONPATH"]])
    subprocess.run([sys.executable, "-c", code, cache_dir], env=env, check=True, timeout=120)
    with Cache(cache_dir) as cache:
        assert cache.policy == "lrfu"
        assert cache.contains("sha256:0")  # hit 120 times: LRFU keeps it through 40 puts into 10 places
        assert len(cache) == 10 and cache.verify() == []
        assert names(cache)[-1] == "sha256:0"


@pytest.mark.parametrize("churn, remembered", [(3, True), (20, False)])
def test_a_ghost_counts_for_a_window_of_evictions(Cache, cache_dir, churn, remembered):
    """A ghost is honoured while fewer than GHOST_WINDOW x (records held) evictions followed its
    own: here 8 x 1 (one record held when it returns). After 3 it still lifts the returning record
    above a new one; after 20 the record starts afresh (a tie with a new one, in key order)."""
    hot = "sha256:hot"
    with Cache(cache_dir, 2 * RECORD / MiB, policy="lrfu") as cache:
        evict_a_hot_record(cache, hot)
        put_all(cache, [f"sha256:c{n}" for n in range(churn)])  # one eviction each
        assert cache.evictions() == 1 + churn
        cache.delete(f"sha256:c{churn - 1}")
        put_all(cache, [hot, after(hot)], keep=[hot])
        assert names(cache) == ([after(hot), hot] if remembered else [hot, after(hot)])


@pytest.mark.parametrize("policy", nvcache.POLICIES)
def test_a_merged_history_keeps_every_record(Cache, cache_dir, policy):
    """merge_history (a seed import's second half) raising only a last reference passes no
    references: under LRFU the rank stays (it once took log2(0) far behind the clock, which the
    store took for damage and emptied the cache); a higher count adds references."""
    with Cache(cache_dir, 1, policy=policy) as cache:
        for i in ("sha256:a", "sha256:b"):
            cache.restore(i, incompressible(RECORD, i), reference_count=5, last_referred_ns=10**18)
        merged = cache.merge_history([("sha256:a", "layer_file", 1, 2 * 10**18),
                                      ("sha256:b", "layer_file", 9, 10**18)], 10**6, 0)
        assert merged == (2, 10**6, 0)
        records = {r["layer_id"]: r for r in cache.cache_data()["cache_records"]}
        assert sorted(records) == ["sha256:a_layer_file", "sha256:b_layer_file"]
        assert records["sha256:a_layer_file"]["reference_count"] == 5
        assert records["sha256:b_layer_file"]["reference_count"] == 9
        assert cache.verify() == []
        if policy == "lrfu":  # b's 4 more references rank it above a (LRU: a's later time does)
            assert names(cache) == ["sha256:a", "sha256:b"]
        else:
            assert names(cache) == ["sha256:b", "sha256:a"]
