"""The remote tier (nvcache/remote.py, remoterecords.py) against real redis-server processes.

Every server here is the suite's own (tests/redisservers.py): a standalone one on a loopback port
and a unix socket, one with requirepass, a three-master cluster, and fresh ones for the faults
(killed, SIGSTOPped, restarted, full). No Redis is mocked. Latencies of the faults are printed
(``pytest -s``) and asserted only to be bounded; bench/remote.py measures them properly.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from nvcache import remoterecords
from nvcache.remote import RemoteTier
from nvcache.scanrecords import scan_record

import redisservers as rs

KEY = "a fleet secret of 32+ characters!"
FAST = dict(timeout=0.2, backoff=0.3, max_backoff=0.6)  # short backoffs keep the file quick


def _name() -> bytes:
    return f"sha256:{uuid.uuid4().hex}".encode() + b"_layer_file"


def _record(seed: int = 1) -> bytes:
    """A scanner-shaped record (compressible, a few KiB)."""
    return scan_record(f"sha256:{seed:064x}", 6000, seed=seed)


# -- round trips ----------------------------------------------------------------------------------
@pytest.mark.parametrize("via", ["tcp", "unix"])
@pytest.mark.parametrize("key", [None, KEY])
def test_round_trip(server: rs.RedisServer, via: str, key: Any) -> None:
    tier = RemoteTier(server.tcp_url if via == "tcp" else server.unix_url, key=key)
    compressible, incompressible, name1, name2 = _record(3), os.urandom(3000), _name(), _name()
    assert tier.get(name1) is None
    assert tier.put(name1, compressible) and tier.put(name2, incompressible)
    assert tier.get(name1) == compressible and tier.get(name2) == incompressible
    with server.client() as c:
        v1, v2 = c.get(b"nvcache:" + name1), c.get(b"nvcache:" + name2)
    # The remote form: zstd without dictionary when it is smaller, else raw; tagged iff keyed.
    assert v1[:4] == remoterecords.MAGIC and v1[5] == remoterecords.ZSTD and len(v1) < len(compressible)
    assert v2[5] == 0  # raw
    assert v1[4] == (remoterecords.TAGGED if key else 0)
    assert tier.stats() == dict(remote_hits=2, remote_misses=1, remote_errors=0, remote_skipped=0,
                                remote_rejected=0, remote_puts=2, fleet_claims=0, fleet_waits=0,
                                fleet_takeovers=0)
    tier.close()


def test_prefix_ttl_and_env(server: rs.RedisServer) -> None:
    tier = RemoteTier.from_env({"NVCACHE_REMOTE": server.unix_url, "NVCACHE_REMOTE_KEY": KEY,
                                "NVCACHE_REMOTE_PREFIX": "fleet7:", "NVCACHE_REMOTE_TTL": "60"})
    assert tier is not None and tier.key is not None
    name = _name()
    assert tier.put(name, b"x" * 500)
    with server.client() as c:
        assert 0 < c.pttl(b"fleet7:" + name) <= 60_000
    assert RemoteTier.from_env({}) is None
    # Another node with the same key reads it; without the key it reads it too (trusting the checksum).
    assert RemoteTier(server.tcp_url, key=KEY, prefix="fleet7:").get(name) == b"x" * 500
    assert RemoteTier(server.tcp_url, prefix="fleet7:").get(name) == b"x" * 500


def test_dictionary_encodings_are_not_shipped(server: rs.RedisServer) -> None:
    """A value is raw or zstd without dictionary: encoding 2 (a file's dictionary 1) cannot be
    made, and a zstd frame made elsewhere without one decodes."""
    tier = RemoteTier(server.unix_url)
    with pytest.raises(ValueError):
        remoterecords.encode_stored(_name(), 2, b"a frame made with dictionary 1", None)
    import zstandard
    name, data = _name(), b"layer " * 1000
    with server.client() as c:
        c.set(b"nvcache:" + name, remoterecords.encode_stored(name, 1, zstandard.ZstdCompressor().compress(data), None))
    assert tier.get(name) == data


# -- tampered values ------------------------------------------------------------------------------
def _flip(value: bytes, at: int) -> bytes:
    return value[:at] + bytes([value[at] ^ 0x01]) + value[at + 1:]


def _fix_checksum(value: bytes, name_len: int, tagged: bool) -> bytes:
    """Recompute the checksum of a changed body: only the tag can catch that change."""
    import xxhash
    h = remoterecords.HEADER
    end = len(value) - (remoterecords.TAG_SIZE if tagged else 0)
    body = value[h.size + name_len:end]
    return value[:12] + xxhash.xxh3_64_intdigest(body).to_bytes(8, "big") + value[20:]


TAMPERS = {
    "bad tag": (KEY, lambda v, n, other: _fix_checksum(_flip(v, len(v) - 40), len(n), True), "bad tag"),
    "wrong key": (KEY, lambda v, n, other: remoterecords.encode_value(n, b"poison" * 50, remoterecords.make_key("another key, 16+ bytes")), "bad tag"),
    "wrong name keyed": (KEY, lambda v, n, other: other, "wrong name"),
    "truncated keyed": (KEY, lambda v, n, other: v[:-7], "truncated"),
    "untagged, keyed tier": (KEY, lambda v, n, other: remoterecords.encode_value(n, b"poison" * 50, None), "no tag"),
    "bad checksum": (None, lambda v, n, other: _flip(v, len(v) - 3), "bad checksum"),
    "wrong name": (None, lambda v, n, other: other, "wrong name"),
    "truncated": (None, lambda v, n, other: v[:30], "truncated"),
    "not ours": (None, lambda v, n, other: b"some other program's value", "not an nvcache"),
}


@pytest.mark.parametrize("case", sorted(TAMPERS))
def test_tampered_values_are_misses_and_deleted(server: rs.RedisServer, case: str, caplog: Any) -> None:
    key, tamper, reason = TAMPERS[case]
    tier = RemoteTier(server.unix_url, key=key)
    name, other = _name(), _name()
    record = _record(5)
    assert tier.put(name, record) and tier.put(other, _record(6))
    rkey, okey = b"nvcache:" + name, b"nvcache:" + other
    with server.client() as c:
        good = c.get(rkey)
        bad = tamper(good, name, c.get(okey))
        assert bad != good
        c.set(rkey, bad)
        with caplog.at_level(logging.WARNING, logger="nvcache.remote"):
            assert tier.get(name) is None
        assert c.exists(rkey) == 0, "the bad value is deleted"
        assert c.get(okey) is not None, "only the bad value"
    assert reason in caplog.text
    stats = tier.stats()
    assert stats["remote_rejected"] == 1 and stats["remote_misses"] == 1 and stats["remote_errors"] == 0
    assert tier.put(name, record) and tier.get(name) == record  # the name works again


def test_a_value_changed_after_it_was_read_is_not_deleted(server: rs.RedisServer) -> None:
    """The delete of a bad value is compare-and-delete: a good value written meanwhile stays."""
    tier = RemoteTier(server.unix_url, key=KEY)
    name = _name()
    with server.client() as c:
        c.set(b"nvcache:" + name, b"junk value long enough to be read as a header.")
        value = c.get(b"nvcache:" + name)
        good = remoterecords.encode_value(name, b"good", tier.key)
        c.set(b"nvcache:" + name, good)
        tier._reject(b"nvcache:" + name, value, "test")  # as if the GET had read the junk
        assert c.get(b"nvcache:" + name) == good


def test_oversized_zstd_frame_is_not_decoded_nor_deleted(server: rs.RedisServer) -> None:
    """A frame whose content is larger than this tier's max_record is a miss: never decompressed
    (a forged frame cannot make a node allocate more), and left in Redis, since a node with a
    larger max_record may use it (deleting it would make nodes fight over valid records)."""
    tier = RemoteTier(server.unix_url, max_record=10_000)
    name = _name()
    with server.client() as c:
        c.set(b"nvcache:" + name, remoterecords.encode_value(name, b"\0" * 100_000, None))
        assert tier.get(name) is None
        assert tier.stats()["remote_misses"] == 1 and tier.stats()["remote_rejected"] == 0
        assert c.exists(b"nvcache:" + name) == 1
    assert RemoteTier(server.unix_url).get(name) == b"\0" * 100_000


# -- AUTH -------------------------------------------------------------------------------------------
def test_requirepass() -> None:
    rs.require_binaries()
    s = rs.RedisServer(password="s3cret-pass").start()
    try:
        for url in (s.tcp_url, s.unix_url):
            tier = RemoteTier(url, key=KEY)
            name = _name()
            assert tier.put(name, b"authenticated" * 10) and tier.get(name) == b"authenticated" * 10
        wrong = RemoteTier(f"redis://:wrong@127.0.0.1:{s.port}/0", **FAST)
        none = RemoteTier(f"redis://127.0.0.1:{s.port}/0", **FAST)
        for tier in (wrong, none):
            assert tier.get(name) is None and not tier.put(name, b"x")
            assert tier.stats()["remote_errors"] == 1 and tier.stats()["remote_skipped"] == 1
    finally:
        s.cleanup()


# -- faults ------------------------------------------------------------------------------------------
def _timed(call: Any) -> Any:
    t0 = time.perf_counter()
    out = call()
    return out, time.perf_counter() - t0


def test_killed_then_restarted(fresh: rs.RedisServer) -> None:
    tier = RemoteTier(fresh.tcp_url, **FAST)
    name = _name()
    assert tier.put(name, b"before" * 100)
    fresh.kill()
    got, first = _timed(lambda: tier.get(name))
    assert got is None and tier.reads.is_open and tier.writes.is_open
    _, skipped = _timed(lambda: tier.get(name))
    assert not tier.put(name, b"x")
    stats = tier.stats()
    assert stats["remote_errors"] == 1 and stats["remote_skipped"] == 2
    print(f"\nkilled server: first get {first * 1e3:.2f} ms, then skipped {skipped * 1e6:.1f} us")
    fresh.restart()  # empty: nothing persisted
    time.sleep(FAST["backoff"] + 0.05)
    assert tier.put(name, b"after" * 100), "the breaker lets the probe through after its backoff"
    assert not tier.reads.is_open and not tier.writes.is_open
    assert tier.get(name) == b"after" * 100


def test_sigstopped(fresh: rs.RedisServer) -> None:
    tier = RemoteTier(fresh.unix_url, **FAST)
    name = _name()
    assert tier.put(name, b"v" * 1000)
    fresh.pause()
    try:
        got, first = _timed(lambda: tier.get(name))
        assert got is None and tier.stats()["remote_errors"] == 1
        assert first < 5 * FAST["timeout"], f"a stopped server cost {first:.3f} s"
        _, skipped = _timed(lambda: tier.get(name))
        put_ok, put_skipped = _timed(lambda: tier.put(name, b"w" * 1000))
        assert not put_ok and tier.stats()["remote_skipped"] == 2
        print(f"\nSIGSTOPped server: first get {first * 1e3:.1f} ms, then get {skipped * 1e6:.1f} us, "
              f"put {put_skipped * 1e6:.1f} us (skipped)")
        time.sleep(FAST["backoff"] + 0.05)
        got, probe = _timed(lambda: tier.get(name))  # the probe, still stopped: fails, backoff doubles
        assert got is None and tier.stats()["remote_errors"] == 2
    finally:
        fresh.resume()
    time.sleep(2 * FAST["backoff"] + 0.05)
    assert tier.get(name) == b"v" * 1000 and not tier.reads.is_open


def test_full_server_skips_writes_keeps_reads(fresh: rs.RedisServer) -> None:
    tier = RemoteTier(fresh.unix_url, **FAST)
    small = _name()
    assert tier.put(small, b"small" * 20)
    with fresh.client() as c:
        c.config_set("maxmemory", "1mb")
        c.config_set("maxmemory-policy", "noeviction")
    big = _name()
    assert not tier.put(big, os.urandom(800_000)), "OOM command not allowed: the write is skipped"
    assert tier.stats()["remote_errors"] == 1
    assert tier.writes.is_open and not tier.reads.is_open
    assert tier.get(small) == b"small" * 20, "a full server still serves reads"
    assert not tier.put(_name(), b"x") and tier.stats()["remote_skipped"] == 1


def test_bad_urls_are_the_callers_bug() -> None:
    for url in ("http://x", "localhost:6379", "redis+cluster://nohostport"):
        with pytest.raises(ValueError):
            tier = RemoteTier(url)
            tier._get_client()
    with pytest.raises(ValueError):
        RemoteTier("redis://127.0.0.1:1/0", key="short")


def test_nothing_listening() -> None:
    """Connection refused: a miss and a skipped write, the second call costs nothing."""
    port = rs.free_port()
    for url in (f"redis://127.0.0.1:{port}/0", f"redis+cluster://127.0.0.1:{port}", "unix:///tmp/nvr-none.sock"):
        tier = RemoteTier(url, **FAST)
        assert tier.get(b"a_layer_file") is None and not tier.put(b"a_layer_file", b"x")
        assert tier.stats()["remote_errors"] == 1 and tier.stats()["remote_skipped"] == 1


# -- cluster ------------------------------------------------------------------------------------------
def test_cluster_a_key_in_each_master(cluster: rs.RedisCluster3) -> None:
    tier = RemoteTier(cluster.url, key=KEY)
    placed = {}
    while len(placed) < 3:
        name = _name()
        owner = cluster.owner(key_slot(b"nvcache:" + name))
        placed.setdefault(owner.port, name)
    for port, name in placed.items():
        data = _record(port)
        assert tier.put(name, data) and tier.get(name) == data
        owner = next(n for n in cluster.nodes if n.port == port)
        with owner.client() as c:
            assert c.exists(b"nvcache:" + name) == 1  # on the master of its slot
    assert tier.stats()["remote_hits"] == 3 and tier.stats()["remote_errors"] == 0


def test_cluster_slot_moved(cluster: rs.RedisCluster3) -> None:
    """A slot given to another master after the client learned the map: MOVED, followed."""
    tier = RemoteTier(cluster.url)
    assert tier.put(_name(), b"learn the slots")
    name = _name()
    new = cluster.move_slot(key_slot(b"nvcache:" + name))
    assert tier.put(name, b"moved" * 10) and tier.get(name) == b"moved" * 10
    with new.client() as c:
        assert c.exists(b"nvcache:" + name) == 1
    assert tier.stats()["remote_errors"] == 0


def test_cluster_master_killed() -> None:
    rs.require_binaries()
    c = rs.RedisCluster3().start()
    try:
        tier = RemoteTier(c.url, **FAST)
        names = {}
        while len(names) < 3:
            name = _name()
            names.setdefault(c.owner(key_slot(b"nvcache:" + name)).port, name)
        for name in names.values():
            assert tier.put(name, b"c" * 100)
        victim = c.nodes[1]
        victim.pause()
        try:
            got, stopped = _timed(lambda: tier.get(names[victim.port]))
            assert got is None and tier.stats()["remote_errors"] == 1
            assert stopped < 5 * FAST["timeout"], f"a stopped master cost {stopped:.3f} s"
        finally:
            victim.resume()
        time.sleep(FAST["backoff"] + 0.05)
        assert tier.get(names[victim.port]) == b"c" * 100, "resumed: the probe closes the breaker"
        victim.kill()
        got, first = _timed(lambda: tier.get(names[victim.port]))
        assert got is None and tier.stats()["remote_errors"] == 2
        print(f"\ncluster master SIGSTOPped: first get {stopped * 1e3:.1f} ms; killed: first get {first * 1e3:.1f} ms")
        time.sleep(2 * FAST["max_backoff"])
        alive = [n for p, n in names.items() if p != victim.port]
        # Keys on the living masters: the probe may still fail while the client relearns the map;
        # within a few backoffs they are served again.
        deadline = time.monotonic() + 10
        while tier.get(alive[0]) != b"c" * 100 and time.monotonic() < deadline:
            time.sleep(FAST["max_backoff"])
        assert [tier.get(name) for name in alive] == [b"c" * 100] * 2, "the living masters serve their keys"
    finally:
        c.cleanup()


# -- maintenance: info, clear, claims --------------------------------------------------------------
@pytest.mark.parametrize("where", ["standalone", "cluster"])
def test_info_clear_and_claims(server: rs.RedisServer, cluster: rs.RedisCluster3, where: str) -> None:
    """info() sums every master; clear() removes exactly the keys under its own prefix (a prefix
    with glob characters matches only itself); a claim is held by one token at a time."""
    url = server.unix_url if where == "standalone" else cluster.url
    raw = redis.Redis.from_url(url) if where == "standalone" else redis.RedisCluster.from_url(
        url.replace("redis+cluster://", "redis://"))
    raw.flushall() if where == "standalone" else raw.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
    mine, other, globby = (RemoteTier(url, prefix=p) for p in ("nv:", "other:", "n*:"))
    names = [_name() for _ in range(30)]
    for name in names:
        assert mine.put(name, _record(1)) and other.put(name, _record(2)) and globby.put(name, _record(3))
    token = os.urandom(16)
    assert mine.claim(names[0], token, 5.0) is True
    assert mine.claim(names[0], os.urandom(16), 5.0) is False and mine.claimed(names[0]) == (True, True)
    info = mine.info()
    assert info["keys"] == 91 and info["used_memory"] > 0
    assert info["masters"] == (1 if where == "standalone" else 3)
    assert globby.clear() == 30  # "n*:" is not a pattern: the "nv:" keys stay
    assert mine.clear() == 31  # its records and its claim
    assert mine.get(names[1]) is None and mine.claimed(names[0]) == (False, False)
    assert other.get(names[1]) == _record(2) and mine.info()["keys"] == 30
    assert mine.claim(names[0], token, 5.0) is True and mine.renew(names[0], token, 5.0)
    assert not mine.renew(names[0], os.urandom(16), 5.0)
    mine.unclaim(names[0], os.urandom(16))  # another token's release leaves the claim
    assert mine.claimed(names[0]) == (True, False)
    mine.unclaim(names[0], token)
    assert mine.claimed(names[0]) == (False, False)
    raw.close()


def test_delete_and_clear_reach_the_tier(server: rs.RedisServer, tmp_path: Any) -> None:
    """LayerCache.delete removes the record from the tier too (else the next miss of any node
    would bring it back), clear() every record under the tier's prefix; other nodes' local
    copies stay theirs."""
    import nvcache
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    nodes = [nvcache.LayerCache(str(tmp_path / n), 16, remote=RemoteTier(server.unix_url, prefix=prefix))
             for n in ("a", "b", "c")]
    a, b, c = nodes
    try:
        for i in range(20):
            assert a.put(f"L{i}", _record(i))
        assert b.get("L3") == _record(3) and b.remote_stats()["remote_hits"] == 1
        assert a.delete("L3") and not c.contains("L3")
        assert c.get("L3") is None  # gone from the tier: c's miss finds nothing
        assert b.get("L3") == _record(3)  # b's own copy is b's
        with server.client() as raw:
            assert raw.exists(f"{prefix}L4_layer_file") == 1
            b.clear()
            assert list(raw.scan_iter(match=f"{prefix}*")) == []
        assert len(b) == 0 and a.get("L4") == _record(4)  # a's local copy stays
        assert c.get("L5") is None
    finally:
        for n in nodes:
            n.close()


def test_a_forked_child_uses_the_tier(server: rs.RedisServer) -> None:
    """After fork the child has new locks (one held by a parent thread would never be released
    there) and redis-py reconnects: the child reads and writes through the same tier object."""
    tier = RemoteTier(server.unix_url, key=KEY)
    name, other = _name(), _name()
    assert tier.put(name, _record(5))
    holder_done, release = threading.Event(), threading.Event()

    def hold() -> None:  # a thread of the parent inside the counters' lock while the fork happens
        with tier._counts_lock:
            holder_done.set()
            release.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    holder_done.wait(5)
    pid = os.fork()
    if pid == 0:  # the child: its exit status says what it saw, and it never returns into pytest
        try:
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(5)  # a deadlock in the child ends as SIGALRM (-14), not a hung test
            ok = tier.get(name) == _record(5) and tier.put(other, _record(6)) and tier.stats()["remote_hits"] >= 1
            os._exit(0 if ok else 1)
        finally:
            os._exit(2)
    release.set()
    t.join()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert tier.get(other) == _record(6)
