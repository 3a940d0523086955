"""One bound per cache, and a data.mdb that grows with use: real processes on one path.

The bound lives in the cache's file: every process obeys the stored one from its next write
on, and a process that opens with another replaces it (with a warning naming both). The map
starts small and grows when a write finds it full; processes that mapped the shorter file
meet LMDB's MapResizedError at their next transaction and reopen (writemap.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any, Dict

import pytest

from nvcache.cachedir import format_dir

from nvcache import RecordTooLarge
from nvcache import writemap
from payloads import incompressible

MiB = 1024 * 1024

# A peer process: opens the cache, then answers one JSON line per command read from stdin.
PEER = textwrap.dedent("""
    import json, logging, os, sys
    sys.path.insert(0, os.path.join(os.environ["NVCACHE_TESTS"]))
    from payloads import incompressible
    import nvcache
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    path, max_mb = sys.argv[1], sys.argv[2]
    cache = nvcache.LayerCache(path, None if max_mb == "none" else float(max_mb))
    print(json.dumps({"bound": cache.max_bytes}), flush=True)
    for line in sys.stdin:
        op, *args = line.split()
        try:
            if op == "put":
                out = cache.put(f"sha256:{int(args[0]):064d}", incompressible(int(args[1]), int(args[0])))
            elif op == "get":
                got = cache.get(f"sha256:{int(args[0]):064d}")
                out = None if got is None else got == incompressible(int(args[1]), int(args[0]))
            elif op == "stats":
                out = dict(cache.stats(), bound=cache.max_bytes, evictions=cache.evictions(),
                           map_size=cache._store.files.map_size)
            else:
                break
            print(json.dumps({"ok": out}), flush=True)
        except Exception as exc:
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
    cache.close()
""")


class Peer:
    def __init__(self, path: str, max_mb: Any, env: Dict[str, str]) -> None:
        env = dict(env, NVCACHE_TESTS=os.path.dirname(os.path.abspath(__file__)))
        self.proc = subprocess.Popen([sys.executable, "-c", PEER, path, str(max_mb)], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.opened = self._answer()

    def _answer(self) -> Dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, self.proc.stderr.read() if self.proc.stderr else "peer died"
        return json.loads(line)  # type: ignore[no-any-return]

    def ask(self, command: str) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = self._answer()
        assert "error" not in answer, answer["error"]
        return answer["ok"]

    def close(self) -> str:
        """Stop it; its stderr (the warnings it logged)."""
        out, err = self.proc.communicate("quit\n", timeout=30)
        assert self.proc.returncode == 0, err
        return err


def test_one_bound_holds_for_every_process(cache_dir, core_env):
    """The issue's case: a 4 MiB process holds 30 records; a 1 MiB process opens. The stored bound
    becomes 1 MiB at once (evicting down to it, logged with both values), and the 4 MiB process's
    next puts obey 1 MiB: the cache never holds more than the bound last stored."""
    four = Peer(cache_dir, 4, core_env)
    try:
        for i in range(30):
            assert four.ask(f"put {i} 100000") is True
        assert four.ask("stats")["record_count"] == 30
        one = Peer(cache_dir, 1, core_env)
        assert one.opened["bound"] == MiB
        after = one.ask("stats")
        assert after["bound"] == MiB and after["record_total_size"] <= MiB and after["record_count"] == 10
        for i in range(30, 40):  # the 4 MiB process now writes within 1 MiB
            assert four.ask(f"put {i} 100000") is True
            assert four.ask("stats")["record_total_size"] <= MiB
        mine = four.ask("stats")
        assert mine["bound"] == MiB and mine["record_count"] == 10
        assert all(four.ask(f"get {i} 100000") for i in range(30, 40))  # the newest, intact
        assert "bound changed from 4 MiB to 1 MiB" in one.close()
    finally:
        four.close()


def test_the_stored_bound_is_used_without_one_and_kept_across_opens(Cache, cache_dir, caplog):
    with Cache(cache_dir, 3) as cache:
        cache.put("sha256:a", b"r")
    with caplog.at_level("WARNING", logger="nvcache"):
        with Cache(cache_dir, None) as cache:  # no bound given: the cache's own, nothing logged
            assert cache.max_bytes == 3 * MiB
        with Cache(cache_dir, 3) as cache:  # the same bound: nothing to change
            assert cache.max_bytes == 3 * MiB
    assert "bound" not in caplog.text
    with Cache(str(cache_dir) + "-new", None) as cache:  # a new cache without one: the default
        assert cache.max_bytes == 1000 * MiB


def test_a_record_too_large_for_a_bound_lowered_elsewhere_is_refused(Cache, cache_dir, core_env):
    """This process last saw 4 MiB; another lowered the bound to 1 MiB: the put's transaction reads
    the stored bound and refuses a 2 MiB record, changing nothing."""
    cache = Cache(cache_dir, 4)
    try:
        assert cache.put("sha256:small", b"s")
        Peer(cache_dir, 1, core_env).close()
        assert cache._store.bound == 4 * MiB  # not seen yet: no write since
        with pytest.raises(RecordTooLarge, match="bound of 1048576"):
            cache.put("sha256:big", incompressible(2 * MiB, 1))
        assert cache.max_bytes == MiB and cache.get("sha256:small") == b"s" and cache.verify() == []
    finally:
        cache.close()


def test_resize_evicts_down_to_the_new_bound_at_once(Cache, cache_dir):
    with Cache(cache_dir, 4) as cache:
        for i in range(30):
            cache.put(f"sha256:{i:064d}", incompressible(100_000, i))
        assert cache.resize(1) == (4 * MiB, 20)
        stats = cache.stats()
        assert stats["record_count"] == 10 and stats["record_total_size"] <= MiB and cache.evictions() == 20
        assert cache.resize(1) == (MiB, 0)  # again: nothing changes
        assert cache.verify() == []
        with pytest.raises(ValueError):
            cache.resize(0)


def test_a_grown_file_is_reopened_by_processes_that_mapped_it_shorter(Cache, cache_dir, core_env):
    """A peer maps the new 8 MiB file; this process writes 24 MiB, growing the map past it. The peer's
    next read and its next write meet the longer file (MapResizedError in LMDB) and go on."""
    peer = Peer(cache_dir, 200, core_env)
    try:
        assert peer.ask("put 1 1000") is True
        assert peer.ask("stats")["map_size"] == writemap.first_map_size(200 * MiB)
        with Cache(cache_dir, 200) as cache:
            for i in range(100, 124):  # 24 MiB, incompressible
                assert cache.put(f"sha256:{i:064d}", incompressible(MiB, i))
            grown = cache._store.files.map_size
        assert writemap.first_map_size(200 * MiB) < grown <= writemap.map_limit(200 * MiB)
        assert peer.ask(f"get 123 {MiB}") is True  # a read past its old map
        assert peer.ask("put 2 1000") is True  # a write past it
        stats = peer.ask("stats")
        assert stats["map_size"] >= grown and stats["record_count"] == 26
        assert all(peer.ask(f"get {i} {MiB}") for i in range(100, 124))
    finally:
        peer.close()
    assert os.path.getsize(os.path.join(format_dir(cache_dir), "data.mdb")) <= writemap.map_limit(200 * MiB)


def test_verify_checks_against_the_bound_stored_now(Cache, cache_dir, core_env):
    """A process that saw 1 MiB; another raised the bound to 4 MiB and filled 3 MB: verify (and so
    repair_damage) finds nothing wrong, and a record of 2 MiB fits for this process too."""
    cache = Cache(cache_dir, 1)
    try:
        cache.put("sha256:first", b"r")
        peer = Peer(cache_dir, 4, core_env)
        try:
            for i in range(30):
                assert peer.ask(f"put {i} 100000") is True
        finally:
            peer.close()
        assert cache.verify() == [] and cache.repair_damage() == []
        assert cache.stats()["record_count"] == 31
        assert cache.put("sha256:big", incompressible(2 * MiB, 7))  # too large for the bound it saw
        assert cache.max_bytes == 4 * MiB
    finally:
        cache.close()


def test_a_rebuild_keeps_the_bound_an_operator_set(Cache, cache_dir):
    """The bound is also kept beside data.mdb (in ``version``): a damaged file rebuilt by a process
    that gives no bound keeps the operator's, not the default."""
    from nvcache.cachedir import format_dir
    with Cache(cache_dir, 1) as cache:
        cache.put("sha256:a", b"r")
        cache.resize(3)
    with open(os.path.join(format_dir(cache_dir), "data.mdb"), "r+b") as f:
        f.write(b"\xff" * 8192)  # both meta pages: the next opener rebuilds
    with Cache(cache_dir, None) as cache:
        assert len(cache) == 0 and cache.max_bytes == 3 * MiB


def test_an_opener_without_a_bound_never_reverts_one_recorded_since(Cache, cache_dir, core_env):
    """A read-only handle opened the cache (it records nothing); another process resized it; a
    cache opened here without a bound then takes the stored one, not what this process saw."""
    with Cache(cache_dir, 5) as cache:
        cache.put("sha256:a", b"r")
    reader = Cache(cache_dir, repair=False)
    try:
        Peer(cache_dir, 1, core_env).close()  # records 1 MiB
        with Cache(cache_dir, None) as cache:
            assert cache.max_bytes == MiB
        assert Peer(cache_dir, "none", core_env).opened["bound"] == MiB
    finally:
        reader.close()
