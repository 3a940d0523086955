"""Caches that do not repair (``LayerCache(..., repair=False)``), the CLI's read-only commands, and
``nvcache repair`` (issue 13, honest diagnoses), over both cores.

A repair=False cache never writes to the cache's files: damage or another format raises
CacheDamaged and every file stays byte for byte as it was (hashed before and after, holes
skipped: data.mdb is a sparse file as long as the map under the write map). repair=True, the default,
rebuilds as before. The CLI runs as real processes (the console script's module, with the core
chosen through the environment).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys
from typing import Any, Callable, Dict, List

import pytest

from nvcache.cachedir import FORMAT_DIR, format_dir

import nvcache
from nvcache import CacheDamaged, CacheError
from test_api import _stored_born, tamper
from test_reliability import (_follow_up, corruption_cases, damage, lid,
                              populate, read_back, record, run_forked)

DIGEST = "sha256:" + "d" * 64


def file_digest(path: str) -> str:
    """sha256 of a file's size and of its data extents (holes skipped, so a sparse map is cheap)."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        h.update(b"size %d;" % size)
        off = 0
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            h.update(b"@%d:" % start)
            while start < end:
                chunk = os.pread(fd, min(1 << 20, end - start), start)
                if not chunk:
                    break
                h.update(chunk)
                start += len(chunk)
            off = end
    finally:
        os.close(fd)
    return h.hexdigest()


def snapshot(path: str) -> Dict[str, str]:
    """Every entry of a cache directory: its kind, mode, owner and (files) contents."""
    out = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        st = os.lstat(full)
        what = "dir" if os.path.isdir(full) else file_digest(full)
        out[name] = f"{st.st_mode:o} {st.st_uid} {what}"
        if what == "dir" and not os.path.islink(full):  # the format directory's files: "v8/data.mdb"
            out.update({f"{name}/{sub}": entry for sub, entry in snapshot(full).items()})
    return out


def filled(Cache: type, path: str, n: int = 12) -> None:
    with Cache(path, 1) as cache:
        for i in range(n):
            assert cache.put(lid(i), record(i, 200 + i))


def _meta_pages(path: str) -> str:
    with open(os.path.join(format_dir(path), "data.mdb"), "r+b") as f:
        f.write(b"\xff" * 8192)  # both LMDB meta pages
    return "deep check at first open"


def _version(number: int) -> Callable[[str], str]:
    def run(path: str) -> str:
        with open(os.path.join(format_dir(path), "version"), "w") as f:
            json.dump({"version": number, "description": "another format"}, f)
        return f"format version {number} is not"
    return run


def _readers_garbled(path: str) -> str:
    with open(os.path.join(format_dir(path), "readers"), "r+b") as f:
        f.write(b"not a table at all")
    return "readers table"


def _readers_missing(path: str) -> str:
    os.unlink(os.path.join(format_dir(path), "readers"))
    return "readers table"


def _readers_foreign(path: str) -> str:
    # Another cache's table: processes may still read through ours, so only a new data.mdb is safe.
    other = path + "-other"
    nvcache.LayerCache(other, 1).close()
    shutil.copyfile(os.path.join(format_dir(other), "readers"), os.path.join(format_dir(path), "readers"))
    shutil.rmtree(other)
    return "does not belong to data.mdb"


def _record_bytes(path: str) -> str:
    # The bytes of one record changed behind the cache's back (same length, the same size,
    # checksum and birth in front): the first opener's deep check finds the checksum mismatch.
    core = nvcache.LayerCache._core
    with nvcache.LayerCache(path, 1) as holder:
        prefix = struct.pack("<QQ", 200, core.checksum(record(0, 200))) + _stored_born(holder, lid(0))
    tamper(path, "dat", core.name_key((lid(0) + "_layer_file").encode()) + b"\0\0\0\0", prefix + b"x" * 200)
    return "deep check at first open: inconsistent index"


DAMAGE: Dict[str, Callable[[str], str]] = {
    "meta-pages": _meta_pages, "older-version": _version(5), "newer-version": _version(999),
    "readers-garbled": _readers_garbled, "readers-missing": _readers_missing,
    "readers-foreign": _readers_foreign, "record-bytes": _record_bytes,
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_read_only_raises_cache_damaged_and_changes_nothing(Cache, cache_dir, caplog, kind):
    filled(Cache, cache_dir)
    reason = DAMAGE[kind](cache_dir)
    before = snapshot(cache_dir)
    with pytest.raises(CacheDamaged, match="repair=False") as raised:
        Cache(cache_dir, 1, repair=False)
    assert reason in str(raised.value) and cache_dir in str(raised.value)
    assert isinstance(raised.value, CacheError)  # a scanner's `except CacheError` still holds
    assert snapshot(cache_dir) == before
    # The default repairs, as before: the cache is rebuilt (empty) and healthy.
    with Cache(cache_dir, 1) as cache:
        assert len(cache) == 0 and cache.verify() == []
        assert cache.put(DIGEST, b"r") and cache.get(DIGEST) == b"r"
    assert any("emptying cache" in r.message and reason in r.message for r in caplog.records)


def test_read_only_cache_only_reads(Cache, cache_dir):
    filled(Cache, cache_dir)
    with Cache(cache_dir, 1) as cache:
        assert cache.get(lid(1)) and cache.get("sha256:" + "e" * 64) is None
        stats = cache.stats()
    before = snapshot(cache_dir)
    assert f"{FORMAT_DIR}/clean" in before  # closed cleanly: a read-only first opener consumes and puts back this mark
    with Cache(cache_dir, 1, repair=False) as cache:
        assert cache.repair is False and len(cache) == 12 and cache.verify() == []
        assert cache.get(lid(3)) == record(3, 203) and cache.peek(lid(4)) == record(4, 204)
        assert cache.get_many([lid(5), "sha256:" + "e" * 64]) == {lid(5): record(5, 205)}
        assert cache.get("sha256:" + "e" * 64) is None and lid(6) in cache
        assert cache.stats() == stats  # no hit, miss or reference counted: counting is a write
        assert [r["reference_count"] for r in cache.cache_data()["cache_records"] if r["layer_id"] ==
                lid(3) + "_layer_file"] == [0]
        writes: List[Callable[[], Any]] = [
            lambda: cache.put(DIGEST, b"r"), lambda: cache.delete(lid(1)), cache.clear,
            lambda: cache.restore(DIGEST, b"r", reference_count=1, last_referred_ns=1),
            lambda: cache.add_counters(1, 1), lambda: cache.merge_history([(lid(1), "layer_file", 9, 9)], 9, 9),
            lambda: cache.train_dictionary([b"sample %d" % i for i in range(100)]), cache.repair_damage]
        for write in writes:
            with pytest.raises(CacheError, match="repair=False, which only reads"):
                write()
        assert cache.stored_size(b"abc" * 100) > 0
    assert snapshot(cache_dir) == before  # the clean mark too: the same bytes were put back
    with Cache(cache_dir, 1) as cache:
        assert cache.stats() == stats and cache.verify() == []
    with pytest.raises(TypeError, match="repair must be True or False"):
        Cache(cache_dir, 1, repair="no")


def test_read_only_creates_no_cache(Cache, tmp_path):
    missing = tmp_path / "missing" / "caches"
    with pytest.raises(CacheError, match="no nvcache cache"):
        Cache(str(missing), 1, repair=False)
    assert not (tmp_path / "missing").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CacheError, match="no nvcache cache"):
        Cache(str(empty), 1, repair=False)
    assert os.listdir(empty) == []
    assert Cache(str(empty), 0, repair=False).get(DIGEST) is None  # disabled: nothing to open


def test_read_only_open_leaves_the_boot_record_to_the_next_writer(Cache, cache_dir, monkeypatch):
    """A healthy cache whose boot record needs updating opens read-only without the update."""
    monkeypatch.setenv("NVCACHE_BOOT_ID", "boot-a")
    with Cache(cache_dir, 1, durable=True) as cache:
        assert cache.put(DIGEST, b"durable")
    monkeypatch.setenv("NVCACHE_BOOT_ID", "boot-b")  # a reboot: a durable-only cache is kept
    before = snapshot(cache_dir)
    with Cache(cache_dir, 1, repair=False) as cache:
        assert cache.get(DIGEST) == b"durable" and cache.verify() == []
    assert snapshot(cache_dir) == before
    with Cache(cache_dir, 1, durable=True) as cache:  # a writer records the new boot
        assert cache.get(DIGEST) == b"durable"
    assert snapshot(cache_dir)[f"{FORMAT_DIR}/data.mdb"] != before[f"{FORMAT_DIR}/data.mdb"]


def test_read_only_reports_a_reboot_after_non_durable_writes(Cache, cache_dir, monkeypatch):
    monkeypatch.setenv("NVCACHE_BOOT_ID", "boot-a")
    filled(Cache, cache_dir)
    monkeypatch.setenv("NVCACHE_BOOT_ID", "boot-b")
    before = snapshot(cache_dir)
    with pytest.raises(CacheDamaged, match="rebooted since non-durable writes"):
        Cache(cache_dir, 1, repair=False)
    assert snapshot(cache_dir) == before
    with Cache(cache_dir, 1) as cache:
        assert len(cache) == 0


def test_a_repairing_cache_joins_a_read_only_store(Cache, cache_dir):
    filled(Cache, cache_dir)
    reader = Cache(cache_dir, 1, repair=False)
    try:
        with Cache(cache_dir, 1) as writer:  # one store per path in a process: it now has a writer
            assert writer.put(DIGEST, b"r") and writer.get(DIGEST) == b"r"
            assert reader.get(DIGEST) == b"r"
            with pytest.raises(CacheError, match="only reads"):
                reader.put(lid(99), b"r")  # the reader's own verbs still only read
        assert reader.get(DIGEST) == b"r" and reader.verify() == []
    finally:
        reader.close()


@pytest.fixture
def holder(core_env, cache_dir):
    """Another process with the cache open (so that no later opener is first and walks the file)."""
    procs: List[subprocess.Popen] = []

    def start() -> None:
        code = ("import sys, nvcache\n"
                "c = nvcache.LayerCache(sys.argv[1], 1)\n"
                "print('ready', flush=True)\n"
                "sys.stdin.read()\n"
                "c.close()\n")
        proc = subprocess.Popen([sys.executable, "-c", code, cache_dir], env=core_env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"

    yield start
    for proc in procs:
        proc.communicate("", timeout=30)


def _tamper_record(cache_dir: str, core: Any, i: int) -> None:
    """Change record i's bytes (same length), keeping its size, checksum and birth in front."""
    size = 200 + i
    with nvcache.LayerCache(cache_dir, 1, repair=False) as peek:
        born = _stored_born(peek, lid(i))
    prefix = struct.pack("<QQ", size, core.checksum(record(i, size))) + born
    tamper(cache_dir, "dat", core.name_key((lid(i) + "_layer_file").encode()) + b"\0\0\0\0", prefix + b"x" * size)


def test_a_damaged_record_met_by_a_read_is_reported_not_dropped(Cache, cache_dir, core, holder, caplog):
    filled(Cache, cache_dir)
    holder()
    _tamper_record(cache_dir, core, 2)
    before = snapshot(cache_dir)
    with Cache(cache_dir, 1, repair=False) as cache:
        for read in (lambda: cache.get(lid(2)), lambda: cache.peek(lid(2)),
                     lambda: cache.get_many([lid(1), lid(2)])):
            with pytest.raises(CacheDamaged, match=f"record {lid(2)}_layer_file .* fails its checksum"):
                read()
        assert cache.get(lid(1)) == record(1, 201) and len(cache) == 12
        assert any("checksum mismatch" in p for p in cache.verify())
    assert snapshot(cache_dir) == before
    # repair_damage() drops it (as a repairing get would), and nothing else.
    with Cache(cache_dir, 1) as cache:
        assert cache.repair_damage() == [f"dropped record {lid(2)}_layer_file: its bytes are damaged"]
        assert cache.verify() == [] and len(cache) == 11 and cache.get(lid(3)) == record(3, 203)
        assert cache.repair_damage() == []


def test_repair_damage_rebuilds_what_dropping_cannot_fix(Cache, cache_dir, holder):
    filled(Cache, cache_dir)
    holder()
    tamper(cache_dir, "meta", b"records", struct.pack("<QQ", 5, 999))  # totals that lie
    with Cache(cache_dir, 1) as cache:
        done = cache.repair_damage()
        assert len(done) == 1 and done[0].startswith("rebuilt the cache (emptied") and "record_count 5" in done[0]
        assert len(cache) == 0 and cache.verify() == []
        assert cache.put(DIGEST, b"r") and cache.get(DIGEST) == b"r"


def _read_only_victim(Cache: type, path: str) -> Callable[[], Any]:
    """Open the damaged cache read-only and read everything: CacheError allowed, wrong bytes never."""
    def run() -> Any:
        out: Dict[str, Any] = {"open": "ok", "hits": 0, "misses": 0, "errors": 0, "wrong": 0}
        try:
            cache = Cache(path, 1, repair=False)
        except CacheError as exc:
            out["open"] = f"{type(exc).__name__}: {exc}"
            return out
        with cache:
            read_back(cache, out)
        return out
    return run


def test_read_only_corruption_campaign(Cache, tmp_path, core):
    """The corruption campaign's damage to every file, met by a read-only opener: no crash, no wrong
    bytes, no file changed (``users`` aside when it was the one damaged: its lock file is made
    again), and the repairing opener after it leaves a healthy cache."""
    rng = random.Random(0x5EED)
    bad: List[Dict[str, Any]] = []
    outcomes: Dict[str, int] = {}
    for n, (fname, kind) in enumerate(corruption_cases()):
        path = str(tmp_path / f"c{n}")
        populate(Cache, path)
        what = damage(format_dir(path), fname, kind, random.Random(rng.randrange(1 << 30)))
        before = snapshot(path)
        victim = run_forked(_read_only_victim(Cache, path), timeout=120)
        after = snapshot(path)
        if fname == "users":
            before.pop(f"{FORMAT_DIR}/users", None), after.pop(f"{FORMAT_DIR}/users", None)
        follow = run_forked(_follow_up(Cache, path), timeout=120)
        v = victim.value if victim.kind == "ok" else {}
        outcome = ("crashed" if victim.crashed else "wrong-bytes" if v.get("wrong") else
                   "CacheDamaged-at-open" if str(v.get("open")).startswith("CacheDamaged") else
                   "CacheError-at-open" if v.get("open") != "ok" else "read")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        healthy = follow.kind == "ok" and follow.value["verify"] == [] and follow.value["roundtrip"] is True
        if outcome in ("crashed", "wrong-bytes") or after != before or not healthy:
            bad.append({"file": fname, "kind": kind, "damage": what, "victim": repr(victim)[:800],
                        "changed": sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)),
                        "follow_up": repr(follow)[:800]})
        shutil.rmtree(path, ignore_errors=True)
    print(json.dumps(outcomes))
    assert bad == [], bad[:5]
    assert outcomes.get("CacheDamaged-at-open", 0) >= 20 and outcomes.get("read", 0) >= 10, outcomes


# -- the CLI, as real processes ------------------------------------------------------------------
def cli_run(core_env: Dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nvcache", *args], env=core_env, capture_output=True, text=True,
                          timeout=120)


READ_ONLY_COMMANDS = [["stat"], ["stat", "--json"], ["data"], ["show"], ["verify"], ["metrics"]]


@pytest.mark.parametrize("kind", ["meta-pages", "older-version", "readers-garbled"])
def test_cli_read_only_commands_report_damage_then_repair_fixes_it(Cache, cache_dir, core_env, tmp_path, kind):
    filled(Cache, cache_dir)
    reason = DAMAGE[kind](cache_dir)
    before = snapshot(cache_dir)
    out = tmp_path / "export"
    for command in READ_ONLY_COMMANDS + [["export", str(out)]]:
        result = cli_run(core_env, "--path", cache_dir, *command)
        assert result.returncode == 1, (command, result)
        assert f"Error: the cache in {cache_dir} is damaged" in result.stderr and reason in result.stderr, \
            (command, result.stderr)
        assert f"Nothing was changed: `nvcache --path {cache_dir} repair` fixes it" in result.stderr
        assert "Traceback" not in result.stderr and "None" not in result.stdout
        assert snapshot(cache_dir) == before, command
    assert not out.exists()
    repaired = cli_run(core_env, "--path", cache_dir, "repair")
    assert repaired.returncode == 0, repaired
    assert f"at open: emptying cache in {cache_dir}: " in repaired.stdout and reason in repaired.stdout
    assert repaired.stdout.splitlines()[-1] == f"repaired {cache_dir}: 0 records, 0 bytes, no problems"
    verified = cli_run(core_env, "--path", cache_dir, "verify")
    assert verified.returncode == 0 and verified.stdout == "ok: 0 records, 0 bytes, no problems\n", verified
    again = cli_run(core_env, "--path", cache_dir, "repair")
    assert again.returncode == 0 and again.stdout == "nothing to repair: 0 records, 0 bytes, no problems\n"


def test_cli_verify_reports_a_damaged_record_and_repair_drops_it(Cache, cache_dir, core, core_env, holder, tmp_path):
    filled(Cache, cache_dir)
    holder()  # in use elsewhere: the CLI is not the first opener, so its open does not walk the file
    _tamper_record(cache_dir, core, 2)
    before = snapshot(cache_dir)
    verified = cli_run(core_env, "--path", cache_dir, "verify")
    assert verified.returncode == 1, verified
    assert f"record {lid(2)}_layer_file: checksum mismatch" in verified.stdout
    assert f"1 problem(s) in {cache_dir}; nothing was changed (`nvcache --path {cache_dir} repair` fixes them)" \
        in verified.stdout
    exported = cli_run(core_env, "--path", cache_dir, "export", str(tmp_path / "out"))
    assert exported.returncode == 1 and f"record {lid(2)}_layer_file in {cache_dir} fails its checksum" \
        in exported.stderr, exported
    assert not (tmp_path / "out").exists()
    assert snapshot(cache_dir) == before
    repaired = cli_run(core_env, "--path", cache_dir, "repair")
    assert repaired.returncode == 0, repaired
    size = sum(200 + i for i in range(12) if i != 2)
    assert repaired.stdout == (f"dropped record {lid(2)}_layer_file: its bytes are damaged\n"
                               f"repaired {cache_dir}: 11 records, {size} bytes, no problems\n")
    verified = cli_run(core_env, "--path", cache_dir, "verify")
    assert verified.returncode == 0 and verified.stdout == f"ok: 11 records, {size} bytes, no problems\n"


def test_cli_read_only_commands_change_nothing_on_a_healthy_cache(Cache, cache_dir, core_env, tmp_path):
    filled(Cache, cache_dir)
    before = snapshot(cache_dir)
    for command in READ_ONLY_COMMANDS + [["export", str(tmp_path / "out")]]:
        result = cli_run(core_env, "--path", cache_dir, *command)
        assert result.returncode == 0, (command, result)
        assert snapshot(cache_dir) == before, command
    stats = json.loads(cli_run(core_env, "--path", cache_dir, "stat", "--json").stdout)
    assert stats["record_count"] == 12 and stats["cache_hits"] == 0  # reading counted nothing


def test_cli_help_documents_exit_statuses_and_repair():
    text = " ".join(cli_run(dict(os.environ), "--help").stdout.split())
    assert "Exit status: 0 done" in text and "1 the cache is damaged" in text and "2 a usage error" in text
    assert "repair Fix what verify reports" in text
