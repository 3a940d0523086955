"""Import from and export to the seed scanner's directory layout, over both cores.

The seed directories here are built by hand from the documented layout
(never with the exporter under test), so a bug shared by reader and writer
cannot hide.
"""

import fcntl
import gzip
import json
import os
from typing import Any, Dict, List, Tuple

import pytest

from nvcache.errors import CacheError
from nvcache.seedfmt import (DamagedRecord, SeedFormatError, check_source, export_seed, import_seed,
                             parse_rfc3339, split_name)
from nvcache import scanrecords
from payloads import incompressible

SEED_VERSION = {"version": 0, "description": "initial implementation"}
# (digest, payload, ref_cnt, ref_last) -- times in several of Go's spellings.
RECORDS: List[Tuple[str, bytes, int, str]] = [
    ("sha256:" + "a1" * 32, b'{"modules":[{"name":"openssl","version":"3.0.2"}]}', 4,
     "2024-09-27T10:57:20.230068879Z"),
    ("sha256:" + "b2" * 32, json.dumps({"files": ["f%d" % i for i in range(300)]}).encode(), 36,
     "2024-09-27T12:57:20.235165944+02:00"),
    ("sha256:" + "c3" * 32, b"{}", 0, "2024-09-27T10:57:21Z"),
    ("sha256:" + "d4" * 32, b'{"pkgs":[]}', 7, "2024-09-27T05:00:00.5-05:30"),
]


def build_seed(root: str, records: List[Tuple[str, bytes, int, str]] = RECORDS, hits: int = 68,
               misses: int = 17, origin: str = "/tmp/images/caches") -> Dict[str, Any]:
    """A seed cache directory as the seed scanner leaves it; returns its index."""
    os.makedirs(os.path.join(root, "ref"))
    index: Dict[str, Any] = {"cache_records": {}, "current_record_size": 0}
    for digest, payload, refs, last in records:
        name = digest + "_layer_file"
        blob = gzip.compress(payload)
        with open(os.path.join(root, "ref", name), "wb") as f:
            f.write(blob)
        index["cache_records"][name] = {"path": f"{origin}/ref/{name}", "size": len(blob),
                                        "ref_cnt": refs, "ref_last": last}
        index["current_record_size"] += len(blob)
    if hits:
        index["cache_hits"] = hits
    if misses:
        index["cache_misses"] = misses
    with open(os.path.join(root, "cacher.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(root, "version"), "w") as f:
        json.dump(SEED_VERSION, f)
    open(os.path.join(root, "lock"), "w").close()
    return index


def _by_name(data: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    return {r["layer_id"]: r for r in data["cache_records"]}


def test_parse_rfc3339_exact_nanoseconds():
    assert parse_rfc3339("1970-01-01T00:00:00Z") == 0
    assert parse_rfc3339("2024-09-27T10:57:20.230068879Z") == 1727434640_230068879
    assert parse_rfc3339("2024-09-27T12:57:20.230068879+02:00") == 1727434640_230068879
    assert parse_rfc3339("2024-09-27T05:27:20.5-05:30") == 1727434640_500000000
    assert parse_rfc3339("2024-09-27t10:57:20.1z") == 1727434640_100000000
    for bad in ("2024-09-27 10:57:20Z", "2024-02-30T00:00:00Z", "2024-09-27T10:57:20", "yesterday",
                "2024-09-27T10:57:20.1234567890Z", "2024-09-27T10:57:60Z"):
        with pytest.raises(ValueError):
            parse_rfc3339(bad)


def test_split_name_prefers_the_seeds_kinds():
    assert split_name("sha256:ab_layer_file") == ("sha256:ab", "layer_file")
    assert split_name("sha256:ab_secrets") == ("sha256:ab", "secrets")
    assert split_name("sha256:ab_fmap") == ("sha256:ab", "fmap")
    assert split_name("sha256:ab_other_kind") == ("sha256:ab", "other_kind")
    for bad in ("noseparator", "_layer_file", "sha256:ab_Bad-Kind"):
        with pytest.raises(SeedFormatError):
            split_name(bad)


def test_round_trip_keeps_contents_references_times_and_counters(make_cache, tmp_path):
    src, out = str(tmp_path / "seed"), str(tmp_path / "out")
    seed_index = build_seed(src)
    cache = make_cache(1.0)
    result = import_seed(src, cache)
    assert (result.imported, result.skipped, result.hits, result.misses) == (len(RECORDS), 0, 68, 17)
    # Stored bytes: what the cache holds, less than the records' length (the file list compresses).
    assert result.record_bytes == cache.stats()["record_total_size"] < sum(len(p) for _d, p, _r, _t in RECORDS)

    data = cache.cache_data()
    assert (data["cache_hits"], data["cache_misses"]) == (68, 17)
    assert data["record_total_size"] == result.record_bytes
    got = _by_name(data)
    assert set(got) == set(seed_index["cache_records"])
    for digest, payload, refs, last in RECORDS:
        rec = got[digest + "_layer_file"]
        assert rec["reference_count"] == refs
        assert parse_rfc3339(rec["last_referred"]) == parse_rfc3339(last)
        assert rec["size"] == cache.stored_size(payload) <= len(payload)  # stored compressed when smaller
    order = [parse_rfc3339(r["last_referred"]) for r in data["cache_records"]]
    assert order == sorted(order)  # oldest reference is the next victim, as in the seed
    assert cache.verify() == []

    exported = export_seed(cache, out, seed_path="/tmp/images/caches")
    assert exported.exported == len(RECORDS)
    with open(os.path.join(out, "version")) as f:
        assert json.load(f) == SEED_VERSION
    with open(os.path.join(out, "cacher.json")) as f:
        index = json.load(f)
    assert (index["cache_hits"], index["cache_misses"]) == (68, 17)
    assert set(index["cache_records"]) == set(seed_index["cache_records"])
    total = 0
    for digest, payload, refs, last in RECORDS:
        name = digest + "_layer_file"
        entry = index["cache_records"][name]
        assert entry["path"] == f"/tmp/images/caches/ref/{name}"
        assert entry["ref_cnt"] == refs
        assert parse_rfc3339(entry["ref_last"]) == parse_rfc3339(last)
        with open(os.path.join(out, "ref", name), "rb") as f:
            blob = f.read()
        assert entry["size"] == len(blob)
        assert gzip.decompress(blob) == payload
        total += len(blob)
    assert index["current_record_size"] == total
    assert os.path.isfile(os.path.join(out, "lock"))

    # And back again: a second cache gets the same dump as the first had after the import.
    again = make_cache(1.0, path=str(tmp_path / "again"))
    import_seed(out, again)
    assert again.cache_data() == data
    for digest, payload, _refs, _last in RECORDS:
        assert again.get(digest) == payload


def test_import_merges_and_never_counts_a_source_twice(make_cache, tmp_path):
    src = str(tmp_path / "seed")
    build_seed(src)
    cache = make_cache(1.0)
    assert cache.put(RECORDS[0][0], b"already here")
    first = import_seed(src, cache)
    assert (first.imported, first.skipped) == (len(RECORDS) - 1, 1)
    assert cache.get(RECORDS[0][0]) == b"already here"  # an existing record is left as it is
    again = import_seed(src, cache)
    assert (again.imported, again.skipped, again.hits, again.misses) == (0, len(RECORDS), 0, 0)
    assert any("imported before" in w for w in again.warnings)
    stats = cache.stats()
    assert (stats["cache_hits"], stats["cache_misses"]) == (68 + 1, 17)


def _corrupt(kind: str, src: str) -> str:
    """Damage a seed directory one way; return a phrase the error must contain."""
    index_path = os.path.join(src, "cacher.json")
    with open(index_path) as f:
        index = json.load(f)
    name = sorted(index["cache_records"])[1]
    ref = os.path.join(src, "ref", name)
    if kind == "no-version":
        os.unlink(os.path.join(src, "version"))
        return "version is missing"
    if kind == "other-version":
        with open(os.path.join(src, "version"), "w") as f:
            json.dump({"version": 3}, f)
        return "only seed cache version 0"
    if kind == "truncated-index":
        with open(index_path, "rb") as f:
            raw = f.read()
        with open(index_path, "wb") as f:
            f.write(raw[: len(raw) // 2])
        return "not valid JSON"
    if kind == "missing-file":
        os.unlink(ref)
        return "is missing"
    if kind == "size-mismatch":
        with open(ref, "ab") as f:
            f.write(b"junk")
        return "truncated or partial copy"
    if kind == "truncated-gzip":
        with open(ref, "rb") as f:
            raw = f.read()
        with open(ref, "wb") as f:
            f.write(raw[:-6])
        index["cache_records"][name]["size"] = len(raw) - 6
    elif kind == "bad-time":
        index["cache_records"][name]["ref_last"] = "27/09/2024"
    elif kind == "negative-refs":
        index["cache_records"][name]["ref_cnt"] = -1
    elif kind == "path-traversal":
        bad = "sha256:../../etc_layer_file"
        index["cache_records"][bad] = dict(index["cache_records"][name], path=f"/x/ref/{bad}")
    elif kind == "nvcache-unfriendly-name":
        bad = "sha256:with space_layer_file"
        index["cache_records"][bad] = dict(index["cache_records"][name], path=f"/x/ref/{bad}")
    with open(index_path, "w") as f:
        json.dump(index, f)
    return {"truncated-gzip": "gzip", "bad-time": "ref_last", "negative-refs": "ref_cnt",
            "path-traversal": "file name", "nvcache-unfriendly-name": "printable ASCII"}[kind]


@pytest.mark.parametrize("kind", ["no-version", "other-version", "truncated-index", "missing-file",
                                  "size-mismatch", "truncated-gzip", "bad-time", "negative-refs",
                                  "path-traversal", "nvcache-unfriendly-name"])
def test_bad_or_partial_source_imports_nothing(make_cache, tmp_path, kind):
    src = str(tmp_path / "seed")
    build_seed(src)
    phrase = _corrupt(kind, src)
    cache = make_cache(1.0)
    before = cache.cache_data()
    with pytest.raises(SeedFormatError, match=phrase):
        check_source(src)
    with pytest.raises(SeedFormatError, match=phrase):
        import_seed(src, cache)
    assert cache.cache_data() == before
    assert len(cache) == 0


def test_skip_missing_drops_stale_entries_only(make_cache, tmp_path):
    src = str(tmp_path / "seed")
    build_seed(src)
    _corrupt("missing-file", src)
    cache = make_cache(1.0)
    result = import_seed(src, cache, skip_missing=True)
    assert result.imported == len(RECORDS) - 1
    assert any("stale" in w for w in result.warnings)
    assert len(cache) == len(RECORDS) - 1


def test_a_cache_that_fits_a_bound_in_the_seed_fits_it_here(make_cache, tmp_path):
    """Scanner-shaped records, gzipped as the seed stores them: imported with the seed's own
    current_record_size as the bound, they all fit (stored compressed, with a dictionary trained
    on them), evict nothing and read back exactly."""
    src = str(tmp_path / "seed")
    records = scanrecords.record_set(300, seed=5)
    index = build_seed(src, [(lid, data, 1, "2024-01-01T00:00:00Z") for lid, data in records], hits=0, misses=0)
    bound = index["current_record_size"]
    cache = make_cache(bound / (1024 * 1024))
    assert cache.max_bytes <= bound and sum(len(d) for _l, d in records) > 3 * bound  # raw would not fit
    result = import_seed(src, cache)
    assert result.imported == len(records) and result.dictionary is not None
    stats = cache.stats()
    assert stats["record_count"] == len(records) and cache.evictions() == 0
    assert stats["record_total_size"] == result.record_bytes <= 0.95 * cache.max_bytes
    assert all(cache.peek(lid) == data for lid, data in records)
    assert cache.verify() == []


def test_import_that_would_not_fit_imports_nothing(make_cache, tmp_path):
    src = str(tmp_path / "seed")
    big = [("sha256:" + "%064x" % i, incompressible(40_000, "x"), 1, "2024-01-01T00:00:0%dZ" % i) for i in range(4)]
    build_seed(src, big)
    cache = make_cache(0.1)  # 104857 bytes: three fit, four do not
    with pytest.raises(SeedFormatError, match="exceed the bound"):
        import_seed(src, cache)
    assert len(cache) == 0 and cache.evictions() == 0
    assert cache.stats()["cache_hits"] == 0


def test_failure_half_way_removes_what_was_restored(make_cache, tmp_path):
    src = str(tmp_path / "seed")
    build_seed(src)
    cache = make_cache(1.0)
    real_restore = cache.restore
    calls = []

    def failing_restore(*args: Any, **kwargs: Any) -> bool:
        calls.append(args[0])
        if len(calls) == 3:
            raise CacheError("disk full (injected)")
        return real_restore(*args, **kwargs)

    cache.restore = failing_restore
    with pytest.raises(SeedFormatError, match="removed the 2 records"):
        import_seed(src, cache)
    assert len(calls) == 3
    assert len(cache) == 0
    stats = cache.stats()
    assert (stats["cache_hits"], stats["cache_misses"], stats["record_total_size"]) == (0, 0, 0)
    assert cache.verify() == []


def test_dry_run_changes_nothing(make_cache, tmp_path):
    src = str(tmp_path / "seed")
    build_seed(src)
    cache = make_cache(1.0)
    result = import_seed(src, cache, dry_run=True)
    assert result.dry_run and result.imported == len(RECORDS)
    assert len(cache) == 0 and cache.stats()["cache_hits"] == 0


def test_import_waits_for_the_seeds_lock(make_cache, tmp_path):
    src = str(tmp_path / "seed")
    build_seed(src)
    cache = make_cache(1.0)
    fd = os.open(os.path.join(src, "lock"), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a seed scanner in the middle of an operation
        with pytest.raises(SeedFormatError, match="cannot lock"):
            import_seed(src, cache, lock_timeout=0.2)
    finally:
        os.close(fd)
    assert len(cache) == 0
    assert import_seed(src, cache).imported == len(RECORDS)


def test_an_nvcache_directory_is_not_a_seed_source(make_cache, tmp_path, cache_dir):
    source = make_cache(1.0)
    source.put("sha256:" + "e5" * 32, b"{}")
    target = make_cache(1.0, path=str(tmp_path / "target"))
    with pytest.raises(SeedFormatError, match="nvcache cache, not the seed"):
        import_seed(cache_dir, target)


def test_export_refuses_to_clobber_unless_forced(make_cache, tmp_path):
    cache = make_cache(1.0)
    cache.put("sha256:" + "f6" * 32, b'{"a": 1}')
    out = str(tmp_path / "out")
    build_seed(out)  # an existing seed cache, with other records
    with pytest.raises(SeedFormatError, match="--force"):
        export_seed(cache, out)
    export_seed(cache, out, force=True)
    assert os.listdir(os.path.join(out, "ref")) == ["sha256:" + "f6" * 32 + "_layer_file"]
    with open(os.path.join(out, "cacher.json")) as f:
        index = json.load(f)
    assert list(index["cache_records"]) == ["sha256:" + "f6" * 32 + "_layer_file"]
    assert "cache_misses" not in index  # omitted when zero, as Go's omitempty does
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(SeedFormatError, match="not empty"):
        export_seed(cache, str(other), force=True)
    assert os.listdir(other) == ["notes.txt"]


# -- a seed cache never written --------------------------------------------------------------
def test_a_seed_cache_never_written_imports_as_empty(make_cache, tmp_path):
    src = tmp_path / "seed"
    (src / "ref").mkdir(parents=True)  # what the scanner leaves at start-up: version, ref/, lock
    (src / "version").write_text(json.dumps(SEED_VERSION))
    (src / "lock").write_text("")
    assert check_source(str(src)).records == []
    cache = make_cache(1.0)
    result = import_seed(str(src), cache)
    assert (result.imported, result.skipped, result.hits, result.misses) == (0, 0, 0, 0)
    assert any("never written" in w for w in result.warnings)
    assert cache.cache_data()["cache_records"] == [] and cache.stats()["cache_hits"] == 0
    # Without a version file it is not a seed cache at all.
    (src / "version").unlink()
    with pytest.raises(SeedFormatError, match="version is missing"):
        import_seed(str(src), cache)


# -- counting rule: merge by maximum -------------------------------------------------------------
GO_NOW = "2025-03-04T05:06:07.123456789-03:30"  # time.Now() as the scanner marshals it, any offset


def _scanner_reads(root: str, hits: List[str], misses: int) -> None:
    """Change a seed index as the scanner's reads do: a hit is cache_hits+1, ref_cnt+1, ref_last=now."""
    path = os.path.join(root, "cacher.json")
    with open(path) as f:
        index = json.load(f)
    for name in hits:
        entry = index["cache_records"][name]
        entry["ref_cnt"] += 1
        entry["ref_last"] = GO_NOW
        index["cache_hits"] = index.get("cache_hits", 0) + 1
    index["cache_misses"] = index.get("cache_misses", 0) + misses
    with open(path, "w") as f:
        json.dump(index, f)


def _history(data: Dict[str, Any]) -> Tuple[Any, ...]:
    return (data["cache_hits"], data["cache_misses"],
            {r["layer_id"]: (r["reference_count"], parse_rfc3339(r["last_referred"])) for r in data["cache_records"]})


def _seed_history(root: str) -> Tuple[Any, ...]:
    with open(os.path.join(root, "cacher.json")) as f:
        index = json.load(f)
    return (index.get("cache_hits", 0), index.get("cache_misses", 0),
            {n: (e["ref_cnt"], parse_rfc3339(e["ref_last"])) for n, e in index["cache_records"].items()})


def test_importing_back_a_used_export_ends_equal_to_the_source(make_cache, tmp_path):
    src, out = str(tmp_path / "seed"), str(tmp_path / "out")
    build_seed(src)
    cache = make_cache(1.0)
    import_seed(src, cache)
    export_seed(cache, out)
    names = [d + "_layer_file" for d, _p, _r, _t in RECORDS]
    _scanner_reads(out, [names[0], names[0], names[2]], misses=2)  # a scanner used the exported copy
    again = import_seed(out, cache)
    assert (again.imported, again.skipped, again.merged, again.hits, again.misses) == (0, 4, 2, 3, 2)
    assert _history(cache.cache_data()) == _seed_history(out)
    assert _history(cache.cache_data())[:2] == (68 + 3, 17 + 2)
    assert cache.verify() == []  # the raised last references moved their lru entries
    # The raised records are no longer the next victims: the order follows the merged times.
    order = [parse_rfc3339(r["last_referred"]) for r in cache.cache_data()["cache_records"]]
    assert order == sorted(order)
    # Once more, and the older original: nothing changes (the larger of two is kept).
    for source in (out, src):
        before = cache.cache_data()
        result = import_seed(source, cache)
        assert (result.merged, result.hits, result.misses) == (0, 0, 0)
        assert cache.cache_data() == before


def test_importing_the_same_source_twice_counts_once(make_cache, tmp_path):
    src = str(tmp_path / "seed")
    build_seed(src)
    cache = make_cache(1.0)
    import_seed(src, cache)
    first = cache.cache_data()
    assert _history(first) == _seed_history(src)
    again = import_seed(src, cache)
    assert (again.imported, again.skipped, again.merged, again.hits, again.misses) == (0, len(RECORDS), 0, 0, 0)
    assert cache.cache_data() == first


def test_an_unrelated_cache_merges_by_maximum_not_by_sum(make_cache, tmp_path):
    src = str(tmp_path / "seed")
    build_seed(src)  # 68 hits, 17 misses; RECORDS[1] has 36 references
    cache = make_cache(1.0)
    assert cache.restore(RECORDS[1][0], b"other bytes", reference_count=50, last_referred_ns=1)
    assert cache.restore(RECORDS[3][0], b"other bytes", reference_count=1, last_referred_ns=1)
    cache.add_counters(100, 5)
    result = import_seed(src, cache)
    assert (result.imported, result.skipped, result.merged, result.hits, result.misses) == (2, 2, 2, 0, 12)
    data = cache.cache_data()
    assert (data["cache_hits"], data["cache_misses"]) == (100, 17)  # each the larger, never the sum
    got = {r["layer_id"]: r for r in data["cache_records"]}
    kept, raised = got[RECORDS[1][0] + "_layer_file"], got[RECORDS[3][0] + "_layer_file"]
    assert kept["reference_count"] == 50 and parse_rfc3339(kept["last_referred"]) == parse_rfc3339(RECORDS[1][3])
    assert raised["reference_count"] == 7 and parse_rfc3339(raised["last_referred"]) == parse_rfc3339(RECORDS[3][3])
    assert cache.peek(RECORDS[1][0]) == b"other bytes"  # a record already here keeps its bytes


# -- damaged records -----------------------------------------------------------------------------
def _damage(src: str, how: str) -> str:
    """Damage the second record's ref/ file; return its name."""
    name = sorted(os.listdir(os.path.join(src, "ref")))[1]
    ref = os.path.join(src, "ref", name)
    with open(ref, "rb") as f:
        raw = bytearray(f.read())
    if how == "crc":
        raw[-8] ^= 0xFF  # the gzip trailer's CRC: same size, the stream no longer checks
    elif how == "garbage":
        raw[10:] = b"\x00" * (len(raw) - 10)
    elif how == "truncated":
        raw = raw[:-6]
    elif how == "size":
        raw += b"x"  # the file is no longer the size the index says
    with open(ref, "wb") as f:
        f.write(raw)
    if how != "size":  # the index agrees with the file's size: the stream itself is bad
        with open(os.path.join(src, "cacher.json")) as f:
            index = json.load(f)
        index["cache_records"][name]["size"] = len(raw)
        with open(os.path.join(src, "cacher.json"), "w") as f:
            json.dump(index, f)
    return name


@pytest.mark.parametrize("how", ["crc", "garbage", "truncated", "size"])
def test_a_damaged_record_fails_the_import_unless_skipped(make_cache, tmp_path, how):
    src = str(tmp_path / "seed")
    build_seed(src)
    name = _damage(src, how)
    cache = make_cache(1.0)
    with pytest.raises(DamagedRecord, match="--skip-damaged") as info:
        import_seed(src, cache)
    assert name in str(info.value)
    assert len(cache) == 0 and cache.stats()["cache_hits"] == 0  # nothing imported
    with pytest.raises(DamagedRecord):
        check_source(src)
    checked = check_source(src, skip_damaged=True)
    assert {r.name for r in checked.records} == {d + "_layer_file" for d, _p, _r, _t in RECORDS} - {name}
    assert checked.damaged == 1
    result = import_seed(src, cache, skip_damaged=True)
    assert (result.imported, result.damaged) == (len(RECORDS) - 1, 1)
    assert [w for w in result.warnings if name in w and w.startswith("skipped")]
    assert not cache.contains(*split_name(name))
    assert len(cache) == len(RECORDS) - 1 and cache.stats()["cache_hits"] == 68
    assert cache.verify() == []
