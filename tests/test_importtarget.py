"""An import's target directory: a dry run never creates or changes it, a refused or failed import
leaves no cache where there was none, and LayerCache.merge_history, the import's counting rule.

Over both cores (``Cache``), plus the CLI (package core). Each test compares the target's listing
(names, sizes, modification times, and the bytes of the small files) before and after.
"""

import hashlib
import os
import stat
from typing import Any, Dict, Optional, Tuple

import pytest
from click.testing import CliRunner

from nvcache import CacheError
from nvcache.cli import cli
from nvcache.importtarget import ReadOnlyCache, existing, import_into, remove_created
from nvcache.seedfmt import SeedFormatError
from nvcache.cachedir import FORMAT_DIR, format_dir

from test_seedfmt import RECORDS, build_seed
from payloads import incompressible

BIG = [("sha256:" + "%064x" % i, incompressible(40_000, i), 1, "2024-01-01T00:00:0%dZ" % i) for i in range(4)]
T1 = 1727434640_230068879


def listing(path: str) -> Optional[Dict[str, Tuple[int, int, str]]]:
    """Every entry of ``path``: (size, mtime_ns, digest of its bytes, '' for a directory); None if absent.

    data.mdb is sparse under the write map (as long as the map): its first 4 MiB hold every page of these caches.
    Directories are listed too, their entries as ``<dir>/<name>`` (the cache's files are in its
    format directory).
    """
    if not os.path.lexists(path):
        return None
    out = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        st = os.lstat(full)
        digest = ""
        if os.path.isfile(full):
            with open(full, "rb") as f:
                digest = hashlib.sha256(f.read(4 << 20)).hexdigest()
        out[name] = (st.st_size, st.st_mtime_ns, digest)
        if stat.S_ISDIR(st.st_mode):
            out.update({f"{name}/{sub}": entry for sub, entry in (listing(full) or {}).items()})
    return out


def run(args):
    return CliRunner().invoke(cli, args)


@pytest.fixture
def seed(tmp_path) -> str:
    src = str(tmp_path / "seed")
    build_seed(src)
    return src


# -- the read-only view ----------------------------------------------------------------------
def test_the_view_reads_a_cache_without_changing_a_byte(Cache, core, cache_dir):
    with Cache(cache_dir, 1) as cache:
        cache.put(RECORDS[0][0], b"held")
        cache.get(RECORDS[0][0])
        cache.get("sha256:" + "9" * 64)
        stats = cache.stats()
    before = listing(cache_dir)
    assert f"{FORMAT_DIR}/clean" in before  # closed cleanly: a LayerCache opening it would consume the mark
    with ReadOnlyCache(cache_dir, 1, core=core) as view:
        assert view.enabled and view.note is None
        assert view.contains(RECORDS[0][0]) and not view.contains(RECORDS[1][0])
        assert view.stats() == stats
        with pytest.raises(ValueError):
            view.contains("bad id")  # validated as the cache validates it
    assert listing(cache_dir) == before


def test_the_view_of_no_cache_is_empty_and_creates_nothing(core, tmp_path):
    for path in (tmp_path / "none", tmp_path / "empty"):
        if path.name == "empty":
            path.mkdir()
        before = listing(str(path))
        with ReadOnlyCache(str(path), 1, core=core) as view:
            assert not view.contains(RECORDS[0][0])
            assert view.stats() == {"cache_hits": 0, "cache_misses": 0, "record_count": 0,
                                    "record_total_size": 0}
            assert "counts as empty" in view.note
        assert listing(str(path)) == before
    with ReadOnlyCache(str(tmp_path / "none"), 0, core=core) as view:
        assert not view.enabled and view.stats()["record_count"] is None


def test_the_view_of_an_older_format_is_what_the_import_would_start_from(Cache, core, cache_dir):
    with Cache(cache_dir, 1) as cache:
        cache.put(RECORDS[0][0], b"held")
    with open(os.path.join(format_dir(cache_dir), "version"), "w") as f:
        f.write('{"version": 1}')
    before = listing(cache_dir)
    with ReadOnlyCache(cache_dir, 1, core=core) as view:
        assert not view.contains(RECORDS[0][0]) and view.stats()["record_count"] == 0
        assert "would empty it" in view.note
    assert listing(cache_dir) == before


def test_the_view_of_damaged_files_is_empty_and_they_stay_damaged(Cache, core, cache_dir):
    with Cache(cache_dir, 1) as cache:
        cache.put(RECORDS[0][0], b"held")
    with open(os.path.join(format_dir(cache_dir), "data.mdb"), "r+b") as f:
        f.write(b"\xff" * 8192)  # both LMDB meta pages
    before = listing(cache_dir)
    with ReadOnlyCache(cache_dir, 1, core=core) as view:
        assert view.stats()["record_count"] == 0 and "would rebuild it" in view.note
    assert listing(cache_dir) == before


# -- dry runs ------------------------------------------------------------------------------------
def test_a_dry_run_into_no_cache_creates_nothing(Cache, seed, tmp_path):
    for target in (tmp_path / "none" / "deeper", tmp_path / "empty", tmp_path / "other"):
        if target.name == "empty":
            target.mkdir()
        if target.name == "other":
            target.mkdir()
            (target / "notes.txt").write_text("mine")
        before = listing(str(target))
        result = import_into(seed, str(target), 1, dry_run=True, cache_class=Cache)
        assert result.dry_run and (result.imported, result.hits, result.misses) == (len(RECORDS), 68, 17)
        assert any("counts as empty" in w for w in result.warnings)
        assert listing(str(target)) == before
    assert not (tmp_path / "none").exists()


def test_a_dry_run_reads_an_existing_cache_read_only(Cache, seed, cache_dir):
    with Cache(cache_dir, 1) as cache:
        cache.put(RECORDS[0][0], b"already here")
        cache.add_counters(70, 1)
    before = listing(cache_dir)
    result = import_into(seed, cache_dir, 1, dry_run=True, cache_class=Cache)
    assert (result.imported, result.skipped, result.hits, result.misses) == (len(RECORDS) - 1, 1, 0, 16)
    assert listing(cache_dir) == before
    # The fit counts what the cache holds: a bound that fits the source alone refuses here.
    with Cache(cache_dir, 1) as cache:
        # 62,800 bytes of 62,914: the source alone fits (about 300 bytes stored), not beside these
        cache.put("sha256:" + "9" * 64, incompressible(62_800, "h"))
    before = listing(cache_dir)
    with pytest.raises(SeedFormatError, match="exceed the bound"):
        import_into(seed, cache_dir, 0.06, dry_run=True, cache_class=Cache)
    assert listing(cache_dir) == before


def test_cli_dry_run_leaves_the_target_alone(seed, tmp_path):
    target = tmp_path / "nv"
    dry = run(["--path", str(target), "import", "--dry-run", seed])
    assert dry.exit_code == 0 and dry.stdout.startswith(f"would import {len(RECORDS)} records")
    assert "counts as empty" in dry.stderr
    assert not target.exists()
    assert run(["--path", str(target), "import", seed]).exit_code == 0
    before = listing(str(target))
    again = run(["--path", str(target), "import", "--dry-run", seed])
    assert again.exit_code == 0 and again.stdout.startswith(f"would import 0 records")
    assert f"{len(RECORDS)} already present" in again.stdout and "+0 hits, +0 misses" in again.stdout
    assert listing(str(target)) == before


# -- refused and failed imports ------------------------------------------------------------------
def test_an_import_refused_for_the_bound_leaves_no_cache(Cache, tmp_path):
    src = str(tmp_path / "seed")
    build_seed(src, BIG)
    for target in (tmp_path / "a" / "b", tmp_path / "empty", tmp_path / "other"):
        if target.name in ("empty", "other"):
            target.mkdir()
        if target.name == "other":
            (target / "notes.txt").write_text("mine")
        before = listing(str(target))
        with pytest.raises(SeedFormatError, match="exceed the bound"):
            import_into(src, str(target), 0.1, cache_class=Cache)  # three of four fit
        assert listing(str(target)) == before
    assert not (tmp_path / "a").exists()
    result = run(["--path", str(tmp_path / "cli"), "--", "import", "--max-mb", "0.1", src])
    assert result.exit_code == 1 and "exceed the bound" in result.stderr
    assert not (tmp_path / "cli").exists()


def test_a_source_refused_for_its_names_leaves_no_cache(Cache, tmp_path):
    src = str(tmp_path / "seed")
    build_seed(src, [("sha256:with space", b"{}", 1, "2024-01-01T00:00:00Z")])
    target = tmp_path / "nv"
    with pytest.raises(SeedFormatError, match="printable ASCII"):
        import_into(src, str(target), 1, cache_class=Cache)
    assert not target.exists()


def test_an_import_failing_half_way_removes_the_cache_it_created(Cache, seed, tmp_path):
    class Failing(Cache):  # type: ignore[misc, valid-type]
        calls = 0

        def restore(self, *args: Any, **kwargs: Any) -> bool:
            Failing.calls += 1
            if Failing.calls == 3:
                raise CacheError("disk full (injected)")
            return super().restore(*args, **kwargs)

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    for target in (tmp_path / "x" / "nv", tmp_path / "other"):
        Failing.calls = 0
        before = listing(str(target))
        with pytest.raises(SeedFormatError, match="removed the 2 records"):
            import_into(seed, str(target), 1, cache_class=Failing)
        assert Failing.calls == 3  # it did create the cache and write into it
        assert listing(str(target)) == before
    assert not (tmp_path / "x").exists()


def test_a_failed_import_into_an_existing_cache_keeps_it(Cache, seed, cache_dir):
    class Failing(Cache):  # type: ignore[misc, valid-type]
        def merge_history(self, *args: Any, **kwargs: Any) -> Tuple[int, int, int]:
            raise CacheError("lock timeout (injected)")

    with Cache(cache_dir, 1) as cache:
        cache.put("sha256:" + "9" * 64, b"mine")
    with pytest.raises(SeedFormatError, match=f"removed the {len(RECORDS)} records"):
        import_into(seed, cache_dir, 1, cache_class=Failing)
    with Cache(cache_dir, 1) as cache:
        assert [r["layer_id"] for r in cache.cache_data()["cache_records"]] == ["sha256:" + "9" * 64 + "_layer_file"]
        assert cache.stats()["cache_hits"] == 0


def test_remove_created_leaves_a_cache_someone_uses(Cache, tmp_path):
    target = str(tmp_path / "nv")
    before = existing(target)
    assert before == (None, [format_dir(target), target])
    cache = Cache(target, 1)  # holds the cache's users file, as any process using it does
    try:
        assert remove_created(target, before) == []
        assert os.path.isfile(os.path.join(format_dir(target), "data.mdb"))
    finally:
        cache.close()
    assert sorted(remove_created(target, before)) == sorted(
        ["clean", "data.mdb", "readers", "users", "version", format_dir(target), target])
    assert not os.path.exists(target)


# -- the counting rule's verb ----------------------------------------------------------------------
def _refs(cache: Any) -> Dict[str, Tuple[int, str]]:
    return {r["layer_id"]: (r["reference_count"], r["last_referred"]) for r in cache.cache_data()["cache_records"]}


def test_merge_history_keeps_the_larger_of_two(make_cache):
    cache = make_cache()
    a, b, c = ("sha256:" + ch * 64 for ch in "abc")
    cache.restore(a, b"a", reference_count=5, last_referred_ns=T1)
    cache.restore(b, b"b", reference_count=1, last_referred_ns=T1 + 10)
    cache.add_counters(10, 4)
    assert [r["layer_id"][:8] for r in cache.cache_data()["cache_records"]] == ["sha256:a", "sha256:b"]
    # a: fewer references but a later time; b: more references, an older time; c: absent.
    got = cache.merge_history([(a, "layer_file", 2, T1 + 20), (b, "layer_file", 9, T1),
                               (c, "layer_file", 3, T1)], hits=7, misses=6)
    assert got == (2, 0, 2)
    assert _refs(cache) == {a + "_layer_file": (5, "2024-09-27T10:57:20.230068899Z"),
                            b + "_layer_file": (9, "2024-09-27T10:57:20.230068889Z")}
    assert (cache.stats()["cache_hits"], cache.stats()["cache_misses"]) == (10, 6)
    assert [r["layer_id"][:8] for r in cache.cache_data()["cache_records"]] == ["sha256:b", "sha256:a"]
    assert cache.verify() == []  # a's lru entry moved with its time
    assert not cache.contains(c)
    before = cache.cache_data()
    assert cache.merge_history([(a, "layer_file", 2, T1 + 20), (b, "layer_file", 9, T1)], 7, 6) == (0, 0, 0)
    assert cache.cache_data() == before


def test_merge_history_counts_this_processs_buffered_reads_first(make_cache):
    cache = make_cache()
    a = "sha256:" + "a" * 64
    cache.put(a, b"a")
    for _ in range(3):
        assert cache.get(a) == b"a"  # buffered: 3 references, 3 hits, not written yet
    # Merged against the written state alone, 2 would be raised to 2 and the buffer added on top (5).
    assert cache.merge_history([(a, "layer_file", 2, T1)], hits=2, misses=0) == (0, 0, 0)
    assert _refs(cache)[a + "_layer_file"][0] == 3
    assert cache.stats()["cache_hits"] == 3


def test_merge_history_checks_everything_before_writing(make_cache, Cache, cache_dir):
    cache = make_cache()
    a = "sha256:" + "a" * 64
    cache.restore(a, b"a", reference_count=1, last_referred_ns=T1)
    good = (a, "layer_file", 9, T1 + 1)
    for records, hits, misses, error in [
            ([good], -1, 0, ValueError), ([good], 0, 2**63, ValueError), ([good], True, 0, TypeError),
            ([good], 1.0, 0, TypeError), ("abc", 0, 0, TypeError)]:
        with pytest.raises(error):
            cache.merge_history(records, hits, misses)
    for bad, error in [((a, "layer_file", 1), TypeError), ([a, "layer_file", 1, 1], TypeError),
                       (("bad id", "layer_file", 1, 1), ValueError), ((a, "Bad", 1, 1), ValueError),
                       ((a, "layer_file", -1, 1), ValueError), ((a, "layer_file", 2**64, 1), ValueError),
                       ((a, "layer_file", 1, 0), ValueError), ((a, "layer_file", 1, 1.5), TypeError),
                       ((a, "layer_file", False, 1), TypeError)]:
        with pytest.raises(error):
            cache.merge_history([good, bad], 0, 0)  # the good one first: still nothing is written
    assert _refs(cache)[a + "_layer_file"] == (1, "2024-09-27T10:57:20.230068879Z")  # nothing merged
    assert cache.merge_history(iter([good]), 0, 0) == (1, 0, 0)  # any iterable
    disabled = Cache(cache_dir, 0)
    assert disabled.merge_history([good], 5, 5) == (0, 0, 0)
    disabled.close()
    cache.close()
    with pytest.raises(CacheError):
        cache.merge_history([good], 0, 0)
