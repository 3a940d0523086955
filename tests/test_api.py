"""The public API, rule by rule, over both cores (the ``core`` fixture)."""

import calendar
import json
import logging
import os
import re
import struct
import subprocess
import sys
import time

import pytest

import nvcache
import nvcache.cachedir
from nvcache import CacheError, CacheFull, RecordTooLarge
from nvcache.cachedir import format_dir
from payloads import incompressible

MiB = 1024 * 1024
DIGEST = "sha256:" + "ab" * 32


def lid(i: int) -> str:
    return f"sha256:{i:064x}"


_RFC3339_UTC = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z")


def rfc3339_ns(text: str) -> int:
    """Nanoseconds since the epoch of a dump's ``last_referred`` (UTC, Go's trimmed fraction).

    Compare these, never the strings: the fraction's trailing zeros are trimmed, so
    "...20.1Z" (100 ms) sorts after "...20.12Z" (120 ms) as text.
    """
    match = _RFC3339_UTC.fullmatch(text)
    assert match, text
    seconds = calendar.timegm(time.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S"))
    return seconds * 10**9 + int((match.group(2) or "").ljust(9, "0"))


def test_rfc3339_ns_helper():
    assert rfc3339_ns("2024-09-27T10:57:20.1Z") == 1727434640_100000000
    assert rfc3339_ns("2024-09-27T10:57:20.12Z") == 1727434640_120000000
    assert rfc3339_ns("2024-09-27T10:57:20Z") == 1727434640_000000000
    assert rfc3339_ns("2024-09-27T10:57:20.000000001Z") == 1727434640_000000001
    assert rfc3339_ns("1970-01-01T00:00:00Z") == 0
    assert "2024-09-27T10:57:20.1Z" > "2024-09-27T10:57:20.12Z"  # why the helper exists


# -- construction ---------------------------------------------------------------

def test_max_bytes_and_attributes(make_cache, cache_dir):
    cache = make_cache(1.5)
    assert cache.max_bytes == int(1.5 * MiB)
    assert cache.enabled is True
    assert cache.path == cache_dir
    assert os.path.isdir(cache_dir)
    assert len(cache) == 0


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), -0.5, 1e20, (1 << 20) + 1])
def test_bad_bound_is_value_error(Cache, cache_dir, bad):
    with pytest.raises(ValueError):
        Cache(cache_dir, bad)
    assert not os.path.exists(cache_dir)


@pytest.mark.parametrize("bad", ["10", True, b"1"])  # None: the stored bound (test_bound_is_the_caches)
def test_non_numeric_bound_is_type_error(Cache, cache_dir, bad):
    with pytest.raises(TypeError):
        Cache(cache_dir, bad)


def test_bad_path(Cache, tmp_path):
    with pytest.raises(ValueError):
        Cache("", 1)
    with pytest.raises(ValueError):
        Cache(str(tmp_path / "a\0b"), 1)
    with pytest.raises(TypeError):
        Cache(123, 1)
    afile = tmp_path / "file"
    afile.write_bytes(b"x")
    with pytest.raises(CacheError, match="not a directory"):
        Cache(str(afile), 1)


def test_path_may_be_pathlike(Cache, tmp_path):
    with Cache(tmp_path / "c", 1) as cache:
        assert cache.path == str(tmp_path / "c")
        assert cache.put(DIGEST, b"r")


# -- disabled -------------------------------------------------------------------

def test_disabled_cache_touches_nothing(Cache, cache_dir):
    cache = Cache(cache_dir, 0)
    assert cache.enabled is False and cache.max_bytes == 0
    assert cache.put(DIGEST, b"x") is False
    assert cache.get(DIGEST) is None
    assert cache.contains(DIGEST) is False and DIGEST not in cache and len(cache) == 0
    assert cache.delete(DIGEST) is False
    assert cache.stats() == {"cache_hits": None, "cache_misses": None, "record_count": None,
                             "record_total_size": None}
    assert cache.verify() == []
    cache.flush()
    cache.clear()
    assert cache.cache_data()["cache_records"] == []
    assert cache.cache_data_json() == "{}"  # the controller leaves out every empty field
    with pytest.raises(ValueError):  # bad input is still bad input
        cache.get("has space")
    assert not os.path.exists(cache_dir)
    cache.close()
    with pytest.raises(CacheError):
        cache.get(DIGEST)


def test_from_env(Cache, cache_dir, monkeypatch):
    monkeypatch.setenv("NVCACHE_PATH", cache_dir)
    monkeypatch.delenv("MAX_CACHE_RECORD_MB", raising=False)
    with Cache.from_env() as cache:
        assert not cache.enabled and cache.path == cache_dir
    monkeypatch.setenv("MAX_CACHE_RECORD_MB", "0")
    with Cache.from_env() as cache:
        assert not cache.enabled
    monkeypatch.setenv("MAX_CACHE_RECORD_MB", " 2.5 ")
    with Cache.from_env() as cache:
        assert cache.enabled and cache.max_bytes == int(2.5 * MiB) and cache.path == cache_dir
    for bad in ("abc", "-1", "nan", "inf", "1e999", "1e20"):
        monkeypatch.setenv("MAX_CACHE_RECORD_MB", bad)
        with pytest.raises(ValueError, match="MAX_CACHE_RECORD_MB"):
            Cache.from_env()
    monkeypatch.delenv("NVCACHE_PATH")
    monkeypatch.setenv("MAX_CACHE_RECORD_MB", "0")
    assert Cache.from_env().path == nvcache.DEFAULT_PATH == "/tmp/images/caches"


# -- validation -------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["", "a b", "tab\there", "x" * 1025, "caf\u00e9", "nl\n", "\x7f", "nul\0"])
def test_bad_layer_id_is_value_error(make_cache, bad):
    cache = make_cache()
    for call in (lambda: cache.get(bad), lambda: cache.put(bad, b"r"), lambda: cache.delete(bad),
                 lambda: cache.contains(bad), lambda: bad in cache):
        with pytest.raises(ValueError):
            call()
    assert cache.stats()["cache_misses"] == 0 and cache.verify() == []


@pytest.mark.parametrize("bad", [None, 1, b"sha256:aa", ["x"]])
def test_non_str_layer_id_is_type_error(make_cache, bad):
    cache = make_cache()
    with pytest.raises(TypeError):
        cache.get(bad)
    with pytest.raises(TypeError):
        cache.put(bad, b"r")


def test_layer_id_limits(make_cache):
    cache = make_cache()
    longest = "x" * 1024
    assert cache.put(longest, b"long") and cache.get(longest) == b"long"
    assert cache.put("!", b"one") and cache.get("!") == b"one"
    printable = "".join(chr(c) for c in range(0x21, 0x7F))
    assert cache.put(printable, b"all") and cache.get(printable) == b"all"


@pytest.mark.parametrize("bad", ["", "Layer", "a-b", "x" * 33, "k\u00e9", " "])
def test_bad_kind_is_value_error(make_cache, bad):
    cache = make_cache()
    with pytest.raises(ValueError):
        cache.put(DIGEST, b"r", kind=bad)
    with pytest.raises(ValueError):
        cache.get(DIGEST, kind=bad)


def test_kind_type_and_limits(make_cache):
    cache = make_cache()
    with pytest.raises(TypeError):
        cache.get(DIGEST, kind=None)
    assert cache.put(DIGEST, b"a", kind="k" * 32)
    assert cache.put(DIGEST, b"b", kind="secret_0")
    assert cache.get(DIGEST, kind="k" * 32) == b"a" and cache.get(DIGEST, kind="secret_0") == b"b"
    assert cache.get(DIGEST) is None  # layer_file is another record


@pytest.mark.parametrize("bad", ["text", 12, None, [1, 2], object()])
def test_bad_record_is_type_error(make_cache, bad):
    cache = make_cache()
    with pytest.raises(TypeError):
        cache.put(DIGEST, bad)
    assert len(cache) == 0


def test_record_types_round_trip(make_cache):
    import array
    cache = make_cache()
    assert cache.put(lid(1), b"bytes")
    assert cache.put(lid(2), bytearray(b"bytearray"))
    assert cache.put(lid(3), memoryview(b"xxmemoryviewxx")[2:-2])
    ints = array.array("I", [1, 2, 3])
    assert cache.put(lid(4), memoryview(ints))
    assert cache.put(lid(5), b"")
    for i, want in [(1, b"bytes"), (2, b"bytearray"), (3, b"memoryview"), (4, ints.tobytes()), (5, b"")]:
        got = cache.get(lid(i))
        assert type(got) is bytes and got == want
    assert cache.stats()["record_total_size"] == 5 + 9 + 10 + 12 + 0


@pytest.mark.parametrize("bad", ["sha256:aa", b"ab", 5, [1], [None], {"x": 1, 2: 3}])
def test_bad_keep_is_type_error(make_cache, bad):
    cache = make_cache()
    with pytest.raises(TypeError):
        cache.put(DIGEST, b"r", keep=bad)
    assert len(cache) == 0


def test_keep_accepts_any_iterable_of_str(make_cache):
    cache = make_cache()
    assert cache.put(lid(1), b"r", keep=[lid(2)])
    assert cache.put(lid(2), b"r", keep=(x for x in [lid(1), lid(3)]))
    assert cache.put(lid(3), b"r", keep={lid(1)})


@pytest.mark.parametrize("bad", ["caf\u00e9", "with space", "", "x" * 1025])
def test_keep_ids_are_validated_like_layer_ids(make_cache, bad):
    cache = make_cache()
    with pytest.raises(ValueError, match="each layer id in keep"):
        cache.put(lid(1), b"r", keep=[lid(2), bad])
    assert len(cache) == 0


# -- put / get / delete -----------------------------------------------------------

def test_put_get_delete(make_cache):
    cache = make_cache()
    assert cache.get(DIGEST) is None
    assert cache.put(DIGEST, b"record") is True
    assert cache.put(DIGEST, b"other") is False  # the first record stays
    assert cache.get(DIGEST) == b"record"
    assert DIGEST in cache and cache.contains(DIGEST) and len(cache) == 1
    assert cache.delete(DIGEST) is True
    assert cache.delete(DIGEST) is False
    assert DIGEST not in cache and len(cache) == 0
    assert cache.stats() == {"cache_hits": 1, "cache_misses": 1, "record_count": 0, "record_total_size": 0}
    assert cache.verify() == []


def test_contains_and_len_change_no_statistic(make_cache):
    cache = make_cache()
    cache.put(DIGEST, b"r")
    before = cache.cache_data()
    for _ in range(3):
        assert DIGEST in cache
        assert lid(9) not in cache
        assert len(cache) == 1
    assert cache.cache_data() == before


def test_hit_counts_a_reference(make_cache):
    cache = make_cache()
    cache.put(DIGEST, b"r")
    (rec,) = cache.cache_data()["cache_records"]
    assert rec["reference_count"] == 0
    for _ in range(3):
        cache.get(DIGEST)
    cache.get(lid(7))
    data = cache.cache_data()
    (rec2,) = data["cache_records"]
    assert rec2["reference_count"] == 3
    assert rfc3339_ns(rec2["last_referred"]) > rfc3339_ns(rec["last_referred"])
    assert (data["cache_hits"], data["cache_misses"]) == (3, 1)


def test_name_is_layer_id_underscore_kind(make_cache):
    cache = make_cache()
    cache.put(DIGEST, b"x")
    cache.put(DIGEST, b"y", kind="secrets")
    names = sorted(r["layer_id"] for r in cache.cache_data()["cache_records"])
    assert names == [DIGEST + "_layer_file", DIGEST + "_secrets"]


# -- the bound and eviction ----------------------------------------------------------

def test_record_too_large(make_cache):
    cache = make_cache(0.001)  # 1048 bytes
    cache.put(lid(1), incompressible(500, "a"))
    with pytest.raises(RecordTooLarge):
        cache.put(lid(2), incompressible(1049, "b"))
    with pytest.raises(ValueError):  # RecordTooLarge is a ValueError too
        cache.put(lid(2), incompressible(5000, "b"))
    assert cache.put(lid(3), incompressible(1048, "c"))  # exactly the bound fits, by evicting
    assert cache.stats()["record_count"] == 1 and cache.get(lid(1)) is None


def test_eviction_is_lru_and_stops_at_the_bound(make_cache):
    cache = make_cache(1000 / MiB)  # 1000 bytes
    for i in range(10):
        assert cache.put(lid(i), incompressible(100, i))
    assert cache.stats()["record_total_size"] == 1000
    cache.get(lid(0))  # 0 becomes the most recent
    cache.put(lid(10), incompressible(250, "n"))  # needs 250: evicts 1, 2, 3 (300 bytes), no more
    present = [i for i in range(11) if lid(i) in cache]
    assert present == [0, 4, 5, 6, 7, 8, 9, 10]
    assert cache.stats()["record_total_size"] == 950
    assert cache.evictions() == 3
    assert cache.verify() == []


def test_keep_protects_every_kind(make_cache):
    cache = make_cache(600 / MiB)
    cache.put(lid(0), incompressible(200, "a"))
    cache.put(lid(0), incompressible(200, "b"), kind="other")
    cache.put(lid(1), incompressible(200, "c"))
    cache.put(lid(2), incompressible(200, "d"), keep=[lid(0)])  # lid(0) in any kind stays; lid(1) goes
    assert cache.contains(lid(0)) and cache.contains(lid(0), kind="other")
    assert not cache.contains(lid(1)) and cache.contains(lid(2))


def test_cache_full_changes_nothing(make_cache):
    cache = make_cache(500 / MiB)
    cache.put(lid(0), incompressible(200, "a"))
    cache.put(lid(1), incompressible(200, "b"))
    cache.get(lid(0))
    before = cache.cache_data()
    with pytest.raises(CacheFull):
        cache.put(lid(2), incompressible(300, "c"), keep=[lid(0), lid(1)])
    assert cache.cache_data() == before
    assert lid(2) not in cache and cache.verify() == []
    assert cache.put(lid(2), incompressible(300, "c"), keep=[lid(1)])  # now lid(0) may go
    assert lid(0) not in cache and lid(1) in cache


def test_put_applies_own_buffered_hits_before_choosing_victims(make_cache):
    cache = make_cache(300 / MiB)
    for i in range(3):
        cache.put(lid(i), incompressible(100, "x"))
    cache.get(lid(0))  # buffered, not yet written
    cache.put(lid(3), incompressible(100, "y"))
    assert lid(0) in cache and lid(1) not in cache


def test_a_new_record_never_inherits_buffered_references_of_its_name(make_cache):
    """Deletes and puts that fit leave the buffer for later; a record deleted and put again
    by this process starts at 0 references, and the hits seen before still count."""
    cache = make_cache()
    cache.put(lid(1), b"old")
    cache.put(lid(2), b"other")
    assert cache.get(lid(1)) == b"old" and cache.get(lid(1)) == b"old"  # two buffered references
    assert cache.get(lid(2)) == b"other"
    assert cache.delete(lid(1))
    assert cache.put(lid(1), b"new")
    by_name = {r["layer_id"]: r for r in cache.cache_data()["cache_records"]}
    assert by_name[lid(1) + "_layer_file"]["reference_count"] == 0
    assert by_name[lid(2) + "_layer_file"]["reference_count"] == 1  # kept, then applied
    assert cache.stats()["cache_hits"] == 3


def _elsewhere(cache, code: str):
    """Run ``code`` in another process with ``c``, a LayerCache on the same directory and core;
    returns the JSON it prints."""
    env = dict(os.environ, NVCACHE_NO_EXTENSIONS="" if type(cache)._core.__name__.endswith("_index") else "1")
    prog = (f"import json, sys, nvcache; c = nvcache.LayerCache(sys.argv[1], {cache.max_bytes} / 1048576)\n"
            + code)
    out = subprocess.run([sys.executable, "-c", prog, cache.path], capture_output=True, text=True, env=env,
                         check=True)
    return json.loads(out.stdout)


REFS = "print(json.dumps({r['layer_id']: r['reference_count'] for r in c.cache_data()['cache_records']}))"


def test_a_put_that_fits_leaves_the_buffer_and_one_that_evicts_applies_it(make_cache):
    """Seen from another process: a put that fits writes no buffered reference; an evicting
    put writes them first (so they decide its victims)."""
    cache = make_cache(300 / MiB)
    cache.put(lid(0), incompressible(100, "x"))
    cache.put(lid(1), incompressible(100, "x"))
    cache.get(lid(0))
    cache.put(lid(2), incompressible(100, "x"))  # fits: 300 of 300 bytes
    assert _elsewhere(cache, REFS)[lid(0) + "_layer_file"] == 0  # still buffered
    cache.put(lid(3), incompressible(100, "x"))  # evicts: lid(1), the oldest unreferenced one
    refs = _elsewhere(cache, REFS)
    assert refs[lid(0) + "_layer_file"] == 1 and lid(1) + "_layer_file" not in refs


def test_a_delete_that_finds_nothing_still_drops_what_was_buffered(make_cache):
    """Another process deleted the record first and then put a new one of the same name: the
    references this process buffered for the old one must not land on the new one."""
    cache = make_cache()
    cache.put(lid(1), b"old")
    assert cache.get(lid(1)) == b"old"
    _elsewhere(cache, f"print(json.dumps(c.delete({lid(1)!r})))")
    assert cache.delete(lid(1)) is False
    _elsewhere(cache, f"print(json.dumps(c.put({lid(1)!r}, b'new')))")
    cache.flush()
    assert _elsewhere(cache, REFS)[lid(1) + "_layer_file"] == 0
    assert cache.stats()["cache_hits"] == 1


def test_a_record_put_again_by_another_process_never_inherits_our_buffered_references(make_cache):
    """Issue 16 part 3: A reads k five times (buffered); B deletes k and puts a new k, then closes;
    A flushes: the new k has no references and its own last reference (the birth stamp)."""
    cache = make_cache()
    cache.put(lid(1), b"old")
    cache.put(lid(2), b"other")
    for _ in range(5):
        assert cache.get(lid(1)) == b"old"
    assert cache.get(lid(2)) == b"other"
    before = {r["layer_id"]: r for r in cache.cache_data()["cache_records"]}  # applies: lid(1) has 5
    assert before[lid(1) + "_layer_file"]["reference_count"] == 5
    for _ in range(5):
        assert cache.get(lid(1)) == b"old"  # five more, buffered for the old record
    assert cache.get(lid(2)) == b"other"
    assert _elsewhere(cache, f"print(json.dumps(c.delete({lid(1)!r}) and c.put({lid(1)!r}, b'new'))); c.close()")
    cache.flush()
    by_name = {r["layer_id"]: r for r in cache.cache_data()["cache_records"]}
    assert by_name[lid(1) + "_layer_file"]["reference_count"] == 0
    assert by_name[lid(1) + "_layer_file"]["last_referred"] != before[lid(1) + "_layer_file"]["last_referred"]
    assert by_name[lid(2) + "_layer_file"]["reference_count"] == 2  # the other record's still count
    assert cache.get(lid(1)) == b"new"
    assert cache.stats()["cache_hits"] == 13


def test_a_process_that_only_writes_still_applies_its_buffer_every_second(make_cache):
    cache = make_cache()
    cache.put(lid(1), b"r")
    assert cache.get(lid(1)) == b"r" and cache.get(lid(2)) is None
    deadline = time.monotonic() + 1.3
    i = 10
    while time.monotonic() < deadline:  # puts that fit and deletes: no get to notice the age
        cache.put(lid(i), b"w")
        cache.delete(lid(i))
        i += 1
        time.sleep(0.02)
    seen = _elsewhere(cache, "s = c.stats(); print(json.dumps([s['cache_hits'], s['cache_misses']]))")
    assert seen == [1, 1]


def test_holes_left_by_pwrite_commits_are_not_damage(make_cache, caplog):
    """LMDB without the write map never writes pages it freed in the same transaction, so a
    healthy file can have holes below its last page: a write-map process must not take them
    for damage (it emptied the cache once)."""
    cache = make_cache(1)
    # Many small records, then one large one that evicts most of them in one transaction: the
    # pages that transaction freed after dirtying them are never written.
    fill = ("for i in range(3000): c.put('sha256:%064x' % i, os.urandom(300))\n"  # incompressible: stored
            "c.put('sha256:big', os.urandom(900_000)); c.close(); print('1')")  # at their length
    env = dict(os.environ, NVCACHE_WRITEMAP="0",
               NVCACHE_NO_EXTENSIONS="" if type(cache)._core.__name__.endswith("_index") else "1")
    prog = "import json, os, sys, nvcache; c = nvcache.LayerCache(sys.argv[1], 1)\n" + fill
    subprocess.run([sys.executable, "-c", prog, cache.path], check=True, env=env, capture_output=True)
    before = cache.stats()["record_count"]
    assert before > 100
    with caplog.at_level(logging.WARNING, logger="nvcache"):
        assert cache.put(lid(1), incompressible(100, "x"))
    assert cache.stats()["record_count"] in (before, before + 1)  # at most one evicted
    assert not [r for r in caplog.records if "damaged" in r.message or "emptying" in r.message]


# -- the dump ----------------------------------------------------------------------

def test_cache_data_format(make_cache):
    cache = make_cache()
    cache.put(lid(2), b"22")
    cache.put(lid(1), b"1")
    cache.get(lid(2))
    cache.get(lid(3))
    data = cache.cache_data()
    assert set(data) == {"cache_hits", "cache_misses", "cache_records", "record_total_size"}
    assert (data["cache_hits"], data["cache_misses"], data["record_total_size"]) == (1, 1, 3)
    recs = data["cache_records"]
    assert [r["layer_id"] for r in recs] == [lid(1) + "_layer_file", lid(2) + "_layer_file"]
    for r in recs:
        assert set(r) == {"last_referred", "layer_id", "reference_count", "size"}
        assert r["last_referred"].endswith("Z") and "T" in r["last_referred"]
    assert recs[0]["reference_count"] == 0  # cache_data() keeps every key...
    shown = dict(data, cache_records=[{k: v for k, v in recs[0].items() if k != "reference_count"}, recs[1]])
    # ... its JSON is the controller's, which leaves out a zero reference count (omitempty)
    assert cache.cache_data_json() == json.dumps(shown, indent=2, sort_keys=True)


def test_rfc3339nano_matches_go(core):
    f = core.rfc3339nano
    assert f(1727434640_232903070) == "2024-09-27T10:57:20.23290307Z"
    assert f(1727434640_000000000) == "2024-09-27T10:57:20Z"
    assert f(1727434640_100000000) == "2024-09-27T10:57:20.1Z"
    assert f(1727434640_000000001) == "2024-09-27T10:57:20.000000001Z"
    assert f(0) == "1970-01-01T00:00:00Z"
    assert f(951782400_000000005) == "2000-02-29T00:00:00.000000005Z"
    for ns in (1727434640_232903070, 1727434640_100000000, 1727434640_120000000, 0, 951782400_000000005):
        assert rfc3339_ns(f(ns)) == ns


def test_dump_orders_ties_by_name(make_cache, core):
    cache = make_cache()
    same = 1_700_000_000_000_000_000
    for name in ("c", "a", "b"):
        cache.restore(name, b"r", reference_count=1, last_referred_ns=same)
    cache.restore("z", b"r", reference_count=0, last_referred_ns=same - 1)
    names = [r["layer_id"] for r in cache.cache_data()["cache_records"]]
    assert names == ["z_layer_file", "a_layer_file", "b_layer_file", "c_layer_file"]
    cache.put("new", incompressible((cache.max_bytes - 2), "n"))  # must free 2 bytes: the first two victims
    assert [n for n in "zabc" if n in cache] == ["b", "c"]


def test_restore_and_add_counters(make_cache):
    cache = make_cache()
    assert cache.restore(DIGEST, b"rec", reference_count=7, last_referred_ns=1727434640_232903070)
    assert not cache.restore(DIGEST, b"x", reference_count=1, last_referred_ns=1)
    cache.add_counters(5, 2)
    data = cache.cache_data()
    assert data["cache_records"] == [{"last_referred": "2024-09-27T10:57:20.23290307Z",
                                      "layer_id": DIGEST + "_layer_file", "reference_count": 7,
                                      "size": 3}]
    assert (data["cache_hits"], data["cache_misses"]) == (5, 2)
    for bad in (-1, 1.5, True, 1 << 64):
        with pytest.raises((TypeError, ValueError)):
            cache.restore(lid(1), b"r", reference_count=bad, last_referred_ns=1)
        with pytest.raises((TypeError, ValueError)):
            cache.add_counters(bad, 0)
    with pytest.raises(ValueError):
        cache.restore(lid(1), b"r", reference_count=0, last_referred_ns=0)


# -- lifecycle and maintenance ------------------------------------------------------

def test_close_is_idempotent_and_closed_cache_raises(make_cache):
    cache = make_cache()
    cache.put(DIGEST, b"r")
    cache.close()
    cache.close()
    for call in (lambda: cache.get(DIGEST), lambda: cache.put(lid(1), b"r"), lambda: cache.delete(DIGEST),
                 lambda: cache.contains(DIGEST), lambda: len(cache), cache.stats, cache.cache_data,
                 cache.flush, cache.clear, cache.verify):
        with pytest.raises(CacheError, match="closed"):
            call()
    with pytest.raises(CacheError):
        with cache:
            pass


def test_context_manager_flushes(Cache, cache_dir):
    with Cache(cache_dir, 1) as cache:
        cache.put(DIGEST, b"r")
        cache.get(DIGEST)
    with Cache(cache_dir, 1) as again:
        assert again.stats()["cache_hits"] == 1
        assert again.get(DIGEST) == b"r"


def test_clear_keeps_counters(make_cache):
    cache = make_cache()
    for i in range(5):
        cache.put(lid(i), b"r")
    cache.get(lid(0))
    cache.get(lid(99))
    cache.clear()
    assert cache.stats() == {"cache_hits": 1, "cache_misses": 1, "record_count": 0, "record_total_size": 0}
    assert cache.cache_data()["cache_records"] == [] and cache.verify() == []
    assert cache.put(lid(0), b"again") and cache.get(lid(0)) == b"again"


def test_two_instances_in_one_process_share_the_cache(make_cache):
    a = make_cache()
    b = make_cache()
    a.put(DIGEST, b"shared")
    assert b.get(DIGEST) == b"shared"
    b.close()
    assert a.get(DIGEST) == b"shared"
    assert a.stats()["cache_hits"] == 2


def test_reopen_keeps_records_and_counts(Cache, cache_dir):
    with Cache(cache_dir, 1) as cache:
        for i in range(20):
            cache.put(lid(i), os.urandom(100))
        cache.get(lid(3))
        before = cache.cache_data()
    with Cache(cache_dir, 1) as cache:
        assert cache.cache_data() == before and cache.verify() == []


def test_bad_version_empties_with_warning(Cache, cache_dir, caplog):
    with Cache(cache_dir, 1) as cache:
        cache.put(DIGEST, b"r")
    vfile = os.path.join(format_dir(cache_dir), "version")
    assert json.load(open(vfile))["version"] == nvcache.cachedir.FORMAT_VERSION
    for content in ('{"version": 0, "description": "initial implementation"}', "garbage", None):
        if content is None:
            os.unlink(vfile)
        else:
            with open(vfile, "w") as f:
                f.write(content)
        with caplog.at_level(logging.WARNING, logger="nvcache"):
            with Cache(cache_dir, 1) as cache:
                assert len(cache) == 0 and cache.verify() == []
                cache.put(DIGEST, b"r")
        assert any("emptying cache" in r.message for r in caplog.records)
        caplog.clear()
    assert json.load(open(vfile))["version"] == nvcache.cachedir.FORMAT_VERSION


def test_foreign_files_are_left_alone(Cache, cache_dir):
    os.makedirs(os.path.join(cache_dir, "ref"))
    with open(os.path.join(cache_dir, "cacher.json"), "w") as f:
        f.write("{}")
    with Cache(cache_dir, 1) as cache:
        cache.put(DIGEST, b"r")
    assert os.path.exists(os.path.join(cache_dir, "cacher.json"))
    assert os.path.isdir(os.path.join(cache_dir, "ref"))


def test_corrupt_data_file_is_rebuilt_at_open(Cache, cache_dir, caplog):
    with Cache(cache_dir, 1) as cache:
        for i in range(50):
            cache.put(lid(i), os.urandom(500))
    with open(os.path.join(format_dir(cache_dir), "data.mdb"), "r+b") as f:
        f.write(os.urandom(3 * 4096))  # both meta pages and the first data page
    with caplog.at_level(logging.WARNING, logger="nvcache"):
        with Cache(cache_dir, 1) as cache:
            assert len(cache) == 0 and cache.verify() == []
            assert cache.put(DIGEST, b"r") and cache.get(DIGEST) == b"r"
    assert any("emptying cache" in r.message for r in caplog.records)


def tamper(cache_dir: str, db: str, key: bytes, value: bytes) -> None:
    """Overwrite one LMDB value behind the cache's back, from another process, under its lock."""
    code = (
        "import fcntl, lmdb, sys\n"
        "d, db, k, v = sys.argv[1], sys.argv[2].encode(), bytes.fromhex(sys.argv[3]), bytes.fromhex(sys.argv[4])\n"
        "import os; lock = os.open(d, os.O_RDONLY); fcntl.flock(lock, fcntl.LOCK_EX)\n"
        "env = lmdb.Environment(d, max_dbs=4, lock=False, map_size=1 << 36)\n"
        "h = env.open_db(db, create=False)\n"
        "with env.begin(write=True) as t: t.put(k, v, db=h)\n")
    subprocess.run([sys.executable, "-c", code, format_dir(cache_dir), db, key.hex(), value.hex()], check=True)


def _stored_born(cache, layer_id: str) -> bytes:
    """The 8 bytes of born_ns in front of a record's first chunk (after its size and checksum)."""
    key = cache._core.record_key(layer_id, "layer_file")
    first = cache._store._read(lambda index, txn: txn.get(key + b"\0\0\0\0", None, index.dat), None)
    return bytes(first[16:24])


def test_checksum_mismatch_is_a_logged_miss(Cache, cache_dir, caplog, core):
    holder = Cache(cache_dir, 1)  # keeps the cache in use, so tampering is not an unclean close
    holder.put(DIGEST, b"the right bytes")
    holder.put(lid(1), b"other")
    # Change the stored bytes behind the cache's back (same length), keeping the index entry and
    # the size and checksum stored in front of them.
    prefix = struct.pack("<QQ", 15, core.checksum(b"the right bytes")) + _stored_born(holder, DIGEST)
    tamper(cache_dir, "dat", core.name_key((DIGEST + "_layer_file").encode()) + b"\0\0\0\0",
           prefix + b"the wrong bytes")
    with caplog.at_level(logging.WARNING, logger="nvcache"):
        with holder as cache:
            assert any("checksum mismatch" in p for p in cache.verify())
            assert cache.get(DIGEST) is None
            assert DIGEST not in cache
            assert cache.get(lid(1)) == b"other"
            assert cache.stats() == {"cache_hits": 1, "cache_misses": 1, "record_count": 1,
                                     "record_total_size": 5}
            assert cache.verify() == []
    assert any("checksum" in r.message for r in caplog.records)


def test_verify_reports_tampered_totals(Cache, cache_dir):
    import struct
    with Cache(cache_dir, 1) as cache:
        cache.put(DIGEST, b"r")
        tamper(cache_dir, "meta", b"records", struct.pack("<QQ", 5, 999))
        problems = cache.verify()
        assert any("record_count 5" in p for p in problems)
        assert any("record_total_size 999" in p for p in problems)


def test_tampered_file_is_deep_checked_and_rebuilt_at_next_first_open(Cache, cache_dir, caplog):
    import struct
    with Cache(cache_dir, 1) as cache:
        cache.put(DIGEST, b"r")
    tamper(cache_dir, "meta", b"records", struct.pack("<QQ", 5, 999))  # nobody has it open
    with caplog.at_level(logging.WARNING, logger="nvcache"):
        with Cache(cache_dir, 1) as cache:
            assert cache.verify() == [] and len(cache) == 0
    assert any("deep check" in r.message for r in caplog.records)


def test_deep_check_policy_at_first_open(Cache, cache_dir, monkeypatch):
    """Small files are always walked; large ones only without a matching clean mark, which is consumed."""
    from nvcache import deepcheck, store
    with Cache(cache_dir, 1) as cache:
        cache.put(DIGEST, b"r")
    calls = []
    real = store.Store._deep_check
    monkeypatch.setattr(store.Store, "_deep_check", lambda self: calls.append(1) or real(self))
    with Cache(cache_dir, 1) as cache:  # small: walked even after a clean close
        assert cache.get(DIGEST) == b"r"
    assert calls == [1]
    monkeypatch.setattr(deepcheck, "ALWAYS_CHECK_BYTES", 0)  # as if the file were large
    with Cache(cache_dir, 1) as cache:  # clean mark matches: trusted, and consumed at open
        assert not os.path.exists(os.path.join(format_dir(cache_dir), "clean"))
        assert cache.get(DIGEST) == b"r"
    assert calls == [1]
    assert os.path.exists(os.path.join(format_dir(cache_dir), "clean"))  # rewritten by the clean close
    with Cache(cache_dir, 1):
        second = Cache(cache_dir, 1)  # not the first opener in this process: no check either
        second.close()
    assert calls == [1]


def _committed_map_size(data_path: str) -> int:
    """``mm_mapsize`` of the newer of data.mdb's two meta pages (LMDB 0.9's on-disk format).

    LMDB writes its opener's map size there when it creates the file and at every commit
    keeps the larger of the stored and the open map size, so for a cache created by one
    instance it is the map that instance opened with.
    """
    with open(data_path, "rb") as f:
        first = f.read(4096)
        page_size = struct.unpack_from("<I", first, 40)[0]  # mm_dbs[FREE_DBI].md_pad holds it
        f.seek(page_size)
        second = f.read(page_size)
    for meta in (first, second):  # page header (16 bytes), then mm_magic, mm_version
        assert struct.unpack_from("<II", meta, 16) == (0xBEEFC0DE, 1)
    newer = max((first, second), key=lambda meta: struct.unpack_from("<Q", meta, 144)[0])  # mm_txnid
    return struct.unpack_from("<Q", newer, 32)[0]


# A new cache's file is short whatever its bound (the map grows with the file: writemap.py),
# so `ls -l`, tar and rsync see what is there, not a 64 GiB hole.
@pytest.mark.parametrize("max_mb", [1, 16 * 1024, 100_000, 1 << 20])  # 1 << 20 MB: the largest bound
def test_a_new_caches_file_is_short_whatever_its_bound(Cache, cache_dir, max_mb):
    from nvcache import writemap
    with Cache(cache_dir, max_mb) as cache:
        assert cache.put(DIGEST, b"r")  # a commit, which rewrites a meta page
        bound = cache.max_bytes
    assert bound == int(max_mb * MiB)
    data = os.path.join(format_dir(cache_dir), "data.mdb")
    assert _committed_map_size(data) == writemap.first_map_size(bound) == 8 * MiB
    assert os.path.getsize(data) <= 8 * MiB


def test_planted_data_symlink_is_replaced_not_followed(Cache, cache_dir, tmp_path):
    with Cache(cache_dir, 1) as cache:
        cache.put(DIGEST, b"r")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    data = os.path.join(format_dir(cache_dir), "data.mdb")
    os.unlink(data)
    os.symlink(victim, data)
    with Cache(cache_dir, 1) as cache:
        assert cache.put(DIGEST, b"new") and cache.get(DIGEST) == b"new"
    assert victim.read_bytes() == b"precious" and not os.path.islink(data)


def test_peek_counts_nothing(make_cache):
    cache = make_cache()
    cache.put(DIGEST, b"r")
    before = cache.cache_data()
    assert cache.peek(DIGEST) == b"r"
    assert cache.peek(lid(5)) is None
    with pytest.raises(ValueError):
        cache.peek("bad id")
    assert cache.cache_data() == before


def test_opener_that_dies_leaves_no_clean_mark(Cache, cache_dir, monkeypatch):
    from nvcache import deepcheck, store
    monkeypatch.setattr(deepcheck, "ALWAYS_CHECK_BYTES", 0)  # large-file policy: trust a matching mark
    with Cache(cache_dir, 1) as cache:
        cache.put(DIGEST, b"r")
    assert os.path.exists(os.path.join(format_dir(cache_dir), "clean"))
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: opens alone, then dies without closing
        opened = Cache(cache_dir, 1)  # kept referenced: no close before the exit
        opened.get(DIGEST)
        os._exit(0)
    os.waitpid(pid, 0)
    calls = []
    real = store.Store._deep_check
    monkeypatch.setattr(store.Store, "_deep_check", lambda self: calls.append(1) or real(self))
    with Cache(cache_dir, 1) as cache:
        assert cache.get(DIGEST) == b"r"
    assert calls == [1]


def test_a_full_map_grows_and_every_put_is_stored(Cache, cache_dir, monkeypatch):
    """A write that finds the map full reopens with a doubled one and goes on: no put fails for
    want of address space, and the file stays within the bound's limit."""
    from nvcache import lifecycle, writemap
    monkeypatch.setattr(lifecycle, "first_map_size", lambda bound: 256 * 1024)  # a deliberately tiny map
    cache = Cache(cache_dir, 10)
    try:
        for i in range(1000):  # 3 MB of records: the map must double at least 4 times
            assert cache.put(lid(i), incompressible(3000, i % 256))
        assert cache._store.files.map_size >= 4 * MiB and cache.verify() == []
        assert all(cache.get(lid(i)) == incompressible(3000, i % 256) for i in range(1000))
        assert cache.stats()["record_count"] == 1000
        assert os.path.getsize(os.path.join(format_dir(cache_dir), "data.mdb")) <= writemap.map_limit(cache.max_bytes)
    finally:
        cache.close()


def test_large_records_are_stored_in_chunks(make_cache, core):
    """Records above one chunk round-trip byte for byte, are evicted and deleted whole."""
    from nvcache.fallback import CHUNK_SIZE
    cache = make_cache(1)
    sizes = [CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 3 * CHUNK_SIZE, 300_001]
    blobs = {lid(i): os.urandom(n) for i, n in enumerate(sizes)}
    for key, blob in blobs.items():
        assert cache.put(key, blob)
    for key, blob in blobs.items():
        assert cache.get(key) == blob and cache.peek(key) == blob
    assert cache.verify() == []
    assert cache.delete(lid(3))
    assert cache.verify() == []
    cache.put(lid(50), os.urandom(cache.max_bytes - 10))  # evicts everything else, chunks included
    assert len(cache) == 1 and cache.verify() == []
    assert cache.stats()["record_total_size"] == cache.max_bytes - 10


def test_reference_counts_saturate(make_cache):
    cache = make_cache()
    cache.restore(DIGEST, b"x", reference_count=2**64 - 1, last_referred_ns=1)
    assert cache.get(DIGEST) == b"x"
    cache.flush()
    (rec,) = cache.cache_data()["cache_records"]
    assert rec["reference_count"] == 2**64 - 1 and cache.verify() == []


def test_malformed_counter_is_damage_not_a_crash(Cache, cache_dir):
    holder = Cache(cache_dir, 1)
    try:
        holder.put(DIGEST, b"r")
        tamper(cache_dir, "meta", b"access", b"\x01\x02\x03")  # a counter of the wrong length
        with pytest.raises(CacheError):
            holder.stats()
        assert holder.put(lid(1), b"again")  # the next write rebuilds the damaged file
        assert holder.get(lid(1)) == b"again" and holder.verify() == []
    finally:
        holder.close()


def test_malformed_evictions_counter_is_damage_in_the_dump(Cache, cache_dir):
    holder = Cache(cache_dir, 1)
    try:
        holder.put(DIGEST, b"r")
        tamper(cache_dir, "meta", b"evictions", b"\x01\x02")
        with pytest.raises(CacheError):
            holder.cache_data()
        assert holder.put(lid(1), b"again")  # the next write rebuilds the damaged file
        assert holder.cache_data()["cache_records"][0]["layer_id"] == lid(1) + "_layer_file"
        assert holder.verify() == []
    finally:
        holder.close()


def test_an_absurd_stored_size_is_a_miss_not_an_allocation(Cache, cache_dir, core):
    """Damage claiming 512 GiB in front of a record's bytes: a logged miss that drops it (no MemoryError)."""
    holder = Cache(cache_dir, 1)
    try:
        holder.put(DIGEST, incompressible(100, "r"))
        key = core.name_key(core.record_name(DIGEST, "layer_file")[0])
        damaged = struct.pack("<QQ", 1 << 39, core.checksum(incompressible(100, "r"))) + _stored_born(holder, DIGEST) + incompressible(100, "r")
        tamper(cache_dir, "dat", key + b"\0\0\0\0", damaged)
        assert holder.get(DIGEST) is None
        assert holder.put(DIGEST, b"new") is True  # the damaged record was dropped
        assert holder.get(DIGEST) == b"new" and holder.verify() == []
    finally:
        holder.close()


def test_a_total_below_the_records_it_counts_is_damage_in_both_cores(Cache, cache_dir, caplog):
    """Bit rot leaves record_total_size smaller than the records an evicting put removes: both cores
    call that damage (the put rebuilds and stores its record) instead of storing a wrapped total,
    which would let the cache grow past its bound."""
    import struct
    holder = Cache(cache_dir, 1)  # in use: the tampering below is not an unclean close
    for i in range(3):
        holder.put(lid(i), incompressible(400_000, "x"))
    tamper(cache_dir, "meta", b"records", struct.pack("<QQ", 3, 1000))  # 1,000 bytes for 1.2 MB
    with caplog.at_level(logging.WARNING, logger="nvcache"):
        # 1,000 + 1,048,000 > 1 MiB: evicts lid(0) (400,000 bytes), more than the total says there is
        assert holder.put(lid(9), incompressible(1_048_000, "y"))
    assert any("damaged" in r.message for r in caplog.records)
    assert holder.get(lid(9)) == incompressible(1_048_000, "y")
    assert holder.verify() == [] and holder.stats()["record_total_size"] == 1_048_000
    holder.close()
