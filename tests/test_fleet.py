"""The remote tier through LayerCache (issue 14 item 3): nvcache/fleet.py's wiring, against real
redis-server processes.

Every server here is the suite's own (tests/redisservers.py): a standalone one on a loopback port
and a unix socket under /tmp, fresh ones for the faults (killed, SIGSTOPped, restarted, full), a
three-master Redis Cluster on loopback. No Redis is mocked: what a test claims about Redis is read
from the server itself through a plain redis-py client (the keys and values present, their TTL,
INFO commandstats). "Nodes" are cache directories: several in this process (one LayerCache, and
one RemoteTier, each), or many processes of tests/fleet_worker.py in several directories sharing
one Redis. Every test runs over both cores (the ``core`` fixture, through ``make_cache`` or
``core_env``).

Latency bounds are generous for a noisy 2-core machine: a call that meets a fault costs < 1 s
(the tier's socket timeout is 0.2 s), and calls made while the breaker is open cost < 5 ms each on
median (they cost microseconds).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any, Callable, Dict, Iterator, List

import pytest
from redis.crc import key_slot

from nvcache import fleet, remoterecords
from nvcache.remote import RemoteTier
from nvcache.scanrecords import scan_record

import redisservers as rs
from payloads import incompressible

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "fleet_worker.py")
sys.path.insert(0, HERE)
from fleet_worker import record_for  # noqa: E402
from test_single_flight import Workers as FlightWorkers  # noqa: E402

KEY = "a fleet secret of 32+ characters!"
FAST = dict(timeout=0.2, backoff=0.3, max_backoff=0.6)
# Fault tests count exactly one error per fault: the breaker must not probe while the server is
# still down, so its first opening (2 s) outlasts everything the test does meanwhile.
SLOW_PROBE = dict(timeout=0.2, backoff=2.0, max_backoff=4.0)
FAULTED_S = 1.0  # a call that meets a fault
SKIPPED_MEDIAN_S = 0.005  # calls while the breaker is open, median
ZERO = dict(remote_hits=0, remote_misses=0, remote_errors=0, remote_skipped=0, remote_rejected=0,
            remote_puts=0, fleet_claims=0, fleet_waits=0, fleet_takeovers=0)


def lid() -> str:
    return f"sha256:{uuid.uuid4().hex}{uuid.uuid4().hex}"


def rname(layer_id: str, kind: str = "layer_file") -> bytes:
    return f"{layer_id}_{kind}".encode()


def rkey(layer_id: str, prefix: bytes = b"nvcache:") -> bytes:
    return prefix + rname(layer_id)


def claim_key(layer_id: str) -> bytes:
    return b"nvcache:claim " + rname(layer_id)


def record(seed: int, size: int = 6000) -> bytes:
    """A scanner-shaped record (compressible)."""
    return scan_record(f"sha256:{seed:064x}", size, seed=seed)


def counts(**changed: int) -> Dict[str, int]:
    return dict(ZERO, **changed)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def timed(call: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    out = call()
    return out, time.perf_counter() - t0


def median_s(calls: List[Callable[[], Any]]) -> float:
    return statistics.median(timed(c)[1] for c in calls)


def cmdstat(server: rs.RedisServer, command: str) -> int:
    with server.client() as c:
        return int(c.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


class Creates:
    """A create() that counts its calls and returns ``data``."""

    def __init__(self, data: bytes) -> None:
        self.data, self.calls = data, 0

    def __call__(self) -> bytes:
        self.calls += 1
        return self.data


def never() -> bytes:
    raise AssertionError("create() must not run: the record is in the remote tier")


@pytest.fixture
def node(make_cache: Callable[..., Any], tmp_path: Any) -> Callable[..., Any]:
    """``node(label, remote, max_mb=4.0, **kwargs)``: a cache in a node directory of its own."""
    def make(label: str, remote: Any, max_mb: float = 4.0, **kwargs: Any) -> Any:
        return make_cache(max_mb, path=str(tmp_path / f"node-{label}"), remote=remote, **kwargs)
    return make


# -- two nodes, one Redis ---------------------------------------------------------------------------
def test_two_nodes_share_a_put(server: rs.RedisServer, node: Any) -> None:
    """Put on A, get on B: a hit on B (the seed's counters: one hit, no miss), counted as a remote
    hit, stored on B with a reference; B's second get is local (no GET reaches the server). The
    record travels in its stored form (zstd, no dictionary) with checksum, untagged without a key,
    under ``nvcache:``, without TTL by default."""
    a = node("a", server.unix_url)
    b = node("b", server.tcp_url)
    layer, data = lid(), record(1)
    assert a.put(layer, data) is True
    with server.client() as c:
        value, ttl = c.get(rkey(layer)), c.pttl(rkey(layer))
    assert value[:4] == remoterecords.MAGIC and value[4] == 0 and value[5] == remoterecords.ZSTD
    assert len(value) < len(data)
    assert remoterecords.decode_value(rname(layer), value, None, 1 << 20) == data
    assert ttl == -1, "no TTL unless configured"
    assert a.remote_stats() == counts(remote_puts=1)
    assert a.stats()["cache_hits"] == 0 and a.stats()["cache_misses"] == 0

    assert not b.contains(layer)
    gets = cmdstat(server, "get")
    assert b.get(layer) == data
    assert cmdstat(server, "get") == gets + 1
    assert b.contains(layer) and b.peek(layer) == data
    stats = b.stats()
    assert (stats["cache_hits"], stats["cache_misses"], stats["record_count"]) == (1, 0, 1)
    assert stats["record_total_size"] == b.cache_data()["cache_records"][0]["size"] > 0
    assert b.cache_data()["cache_records"][0]["reference_count"] == 1
    assert b.remote_stats() == counts(remote_hits=1)

    gets = cmdstat(server, "get")
    assert b.get(layer) == data  # local now
    assert cmdstat(server, "get") == gets, "a record fetched once is read locally"
    assert b.remote_stats() == counts(remote_hits=1)
    assert b.stats()["cache_hits"] == 2

    sets = cmdstat(server, "set")
    assert b.put(layer, data) is False  # already here: shares nothing
    assert cmdstat(server, "set") == sets
    missing = lid()
    assert b.get(missing) is None
    assert b.remote_stats() == counts(remote_hits=1, remote_misses=1)
    assert b.stats()["cache_misses"] == 1 and b.stats()["cache_hits"] == 2
    assert b.verify() == [] and a.verify() == []


def test_prefix_and_ttl_of_a_given_tier(server: rs.RedisServer, node: Any) -> None:
    """A RemoteTier given as ``remote=`` keeps its prefix and TTL: the value lives under that
    prefix with that TTL; a node with another prefix does not see it, one with the same does."""
    a = node("a", RemoteTier(server.unix_url, prefix="team9:", ttl=30))
    layer, data = lid(), record(3)
    assert a.put(layer, data)
    with server.client() as c:
        assert 0 < c.pttl(rkey(layer, b"team9:")) <= 30_000
        assert c.exists(rkey(layer)) == 0
    other = node("other", server.unix_url)
    assert other.get(layer) is None and other.remote_stats() == counts(remote_misses=1)
    same = node("same", RemoteTier(server.tcp_url, prefix="team9:"))
    assert same.get(layer) == data and same.remote_stats() == counts(remote_hits=1)


def test_get_many_asks_the_tier_for_each_local_miss(server: rs.RedisServer, node: Any) -> None:
    a, b = node("a", server.unix_url), node("b", server.unix_url)
    layers = [lid() for _ in range(3)]
    for i, layer in enumerate(layers[:2]):
        assert a.put(layer, record(10 + i))
    assert b.put(layers[2], record(12))  # B has the third one itself (and shares it)
    absent = lid()
    got = b.get_many(layers + [absent])
    assert got == {layers[0]: record(10), layers[1]: record(11), layers[2]: record(12)}
    assert b.remote_stats() == counts(remote_hits=2, remote_misses=1, remote_puts=1)
    stats = b.stats()
    assert (stats["cache_hits"], stats["cache_misses"], stats["record_count"]) == (3, 1, 3)


def test_a_creators_result_is_shared_and_a_hit_elsewhere(server: rs.RedisServer, node: Any) -> None:
    """get_or_create on A: the tier asked (a remote miss), the name claimed in Redis, create()
    once, the record shared, the claim let go. On B: a hit, create() never runs."""
    a, b = node("a", server.unix_url), node("b", server.tcp_url)
    layer, data = lid(), record(2)
    create = Creates(data)
    assert a.get_or_create(layer, create) == data and create.calls == 1
    assert a.remote_stats() == counts(remote_misses=1, remote_puts=1, fleet_claims=1)
    assert (a.stats()["cache_misses"], a.stats()["cache_hits"]) == (1, 0)
    with server.client() as c:
        assert remoterecords.decode_value(rname(layer), c.get(rkey(layer)), None, 1 << 20) == data
        assert c.exists(claim_key(layer)) == 0, "the claim is let go once the record is shared"
    assert b.get_or_create(layer, never) == data
    assert (b.stats()["cache_hits"], b.stats()["cache_misses"], b.stats()["record_count"]) == (1, 0, 1)
    assert b.cache_data()["cache_records"][0]["reference_count"] == 1  # a hit's reference, as a get's
    assert b.remote_stats() == counts(remote_hits=1)
    assert b.contains(layer)
    assert b.get_or_create(layer, never) == data  # local from now on
    assert b.remote_stats() == counts(remote_hits=1)


def test_a_remote_hit_too_large_here_is_still_returned(server: rs.RedisServer, node: Any) -> None:
    """A record B's bound cannot hold: returned and counted a hit, not stored. A put that the
    local cache refuses (RecordTooLarge) is shared all the same, then raised."""
    import nvcache
    big = incompressible(60_000, "big")
    a, b = node("a", server.unix_url, 1.0, compress=False), node("b", server.unix_url, 0.02, compress=False)
    layer = lid()
    assert a.put(layer, big)
    assert b.get(layer) == big
    assert not b.contains(layer)
    assert (b.stats()["cache_hits"], b.stats()["cache_misses"], b.stats()["record_count"]) == (1, 0, 0)
    assert b.remote_stats() == counts(remote_hits=1)
    other = lid()
    with pytest.raises(nvcache.RecordTooLarge):
        b.put(other, big)
    assert b.remote_stats() == counts(remote_hits=1, remote_puts=1)
    assert a.get(other) == big and a.remote_stats()["remote_hits"] == 1


def test_a_damaged_local_record_is_dropped_then_fetched(server: rs.RedisServer, node: Any, core: Any,
                                                       caplog: Any) -> None:
    """A local record whose bytes fail their checksum is dropped, then the tier is asked: the good
    record comes back from Redis (a hit), never the damaged bytes."""
    import struct
    from test_api import _stored_born, tamper
    b = node("b", server.unix_url, compress=False)
    layer, good = lid(), b"the right bytes"
    assert b.put(layer, good)  # shared
    prefix = struct.pack("<QQ", len(good), core.checksum(good)) + _stored_born(b, layer)
    tamper(b.path, "dat", core.name_key(rname(layer)) + b"\0\0\0\0", prefix + b"the wrong bytes")
    with caplog.at_level(logging.WARNING, logger="nvcache"):
        assert b.get(layer) == good
    assert any("checksum" in r.message for r in caplog.records)
    assert (b.stats()["cache_hits"], b.stats()["cache_misses"], b.stats()["record_count"]) == (1, 0, 1)
    assert b.remote_stats() == counts(remote_hits=1, remote_puts=1)
    assert b.verify() == [] and b.peek(layer) == good


def test_keep_protects_around_a_remote_hit(server: rs.RedisServer, node: Any) -> None:
    """A remote hit fetched inside get_or_create(keep=[...]) is stored as a local put with that
    keep would be: the kept layers survive the eviction it causes, the least recently used
    unkept one goes. Without keep the least recently used one goes."""
    size = 15_000
    origin = node("origin", server.unix_url, 1.0, compress=False)
    wanted = lid()
    assert origin.put(wanted, incompressible(size, "wanted"))

    def prepared(label: str, remote: Any) -> Any:
        # 0.05 MiB = 52428 bytes: three records of 15000 fit, a fourth needs one evicted.
        cache = node(label, remote, 0.05, compress=False)
        olds = [lid() for _ in range(3)]
        for i, old in enumerate(olds):
            assert cache.put(old, incompressible(size, i))
            time.sleep(0.002)  # distinct last_referred: olds[0] is the least recently used
        return cache, olds

    # The reference: a local put with keep.
    ref, olds = prepared("ref", None)
    assert ref.put(wanted, incompressible(size, "wanted"), keep=olds[:2])
    assert [ref.contains(o) for o in olds] == [True, True, False] and ref.contains(wanted)

    for label, kept, survivors in (("kept", True, [True, True, False]), ("unkept", False, [False, True, True])):
        b, olds = prepared(label, server.unix_url)
        got = b.get_or_create(wanted, never, keep=olds[:2] if kept else ())
        assert got == incompressible(size, "wanted")
        assert [b.contains(o) for o in olds] == survivors, label
        assert b.contains(wanted)
        assert b.evictions() == 1
        assert b.remote_stats() == counts(remote_hits=1, remote_puts=3)
        assert (b.stats()["cache_hits"], b.stats()["cache_misses"]) == (1, 0)


# -- many processes, several nodes, one Redis -----------------------------------------------------------
class Workers(FlightWorkers):
    """fleet_worker processes: started, made ready, released together (a barrier), read back
    (go, result and close as test_single_flight's flight_worker processes)."""

    def start(self, **cfg: Any) -> subprocess.Popen:  # type: ignore[override]
        proc = subprocess.Popen([sys.executable, WORKER, json.dumps(cfg)], env=self.env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    @staticmethod
    def ready(proc: subprocess.Popen) -> None:
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read()


@pytest.fixture
def workers(core_env: Dict[str, str]) -> Iterator[Workers]:
    w = Workers(core_env)
    yield w
    w.close()


def creations(log: str) -> List[List[str]]:
    try:
        with open(log) as f:
            return [line.split() for line in f.read().splitlines()]
    except FileNotFoundError:
        return []


def wait_for(check: Callable[[], bool], seconds: float = 20) -> None:
    end = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_one_create_per_name_across_the_fleet(server: rs.RedisServer, Cache: type, tmp_path: Any,
                                              workers: Workers) -> None:
    """3 nodes × 3 processes, released together, each calling get_or_create on the same 4 new
    names at once (a thread per name): create() runs exactly once per name in the whole fleet,
    every call returns the same bytes, every node ends up holding every record, each name was
    claimed in Redis once and no claim is left. Across the fleet: 4 misses (the creators) and 32
    hits."""
    log = str(tmp_path / "log")
    names = [lid() for _ in range(4)]
    paths = [str(tmp_path / f"node{i}") for i in range(3)]
    procs = [workers.start(path=p, url=server.unix_url if i % 2 else server.tcp_url, names=names, log=log,
                           sleep=0.5, key=KEY)
             for p in paths for i in range(3)]
    for proc in procs:
        workers.ready(proc)
    workers.go(*procs)
    outs = [workers.result(p) for p in procs]
    made = creations(log)
    assert sorted(name for name, _pid, _t in made) == sorted(names), made
    for out in outs:
        assert {n: r["outcome"] for n, r in out["results"].items()} == {n: sha(record_for(n)) for n in names}
        assert out["tier"]["remote_errors"] == 0
    with server.client() as c:
        for n in names:
            assert remoterecords.decode_value(rname(n), c.get(rkey(n)), remoterecords.make_key(KEY), 1 << 20) \
                == record_for(n)
        assert list(c.scan_iter(match=b"nvcache:claim *")) == []
    totals = dict.fromkeys(("cache_hits", "cache_misses", "fleet_claims", "fleet_takeovers", "remote_errors"), 0)
    for p in paths:
        with Cache(p, 4.0) as cache:
            assert all(cache.contains(n) for n in names)
            assert [cache.peek(n) for n in names] == [record_for(n) for n in names]
            stats, remote = cache.stats(), cache.remote_stats()
            assert stats["cache_hits"] + stats["cache_misses"] == 3 * len(names)
            for k in totals:
                totals[k] += stats.get(k, 0) + remote.get(k, 0)
    assert totals == dict(cache_hits=32, cache_misses=4, fleet_claims=4, fleet_takeovers=0, remote_errors=0)


def test_a_node_without_redis_falls_back_to_its_own_claim(Cache: type, tmp_path: Any, workers: Workers) -> None:
    """Nothing listens at the tier's address: get_or_create goes on with the node's claim alone,
    so each of the 2 nodes (2 processes each) creates each name once, and no call takes longer
    than create() plus one faulted call."""
    log = str(tmp_path / "log")
    names = [lid() for _ in range(2)]
    url = f"redis://127.0.0.1:{rs.free_port()}/0"
    paths = [str(tmp_path / f"node{i}") for i in range(2)]
    procs = [workers.start(path=p, url=url, names=names, log=log, sleep=0.3) for p in paths for _ in range(2)]
    for proc in procs:
        workers.ready(proc)
    workers.go(*procs)
    outs = [workers.result(p) for p in procs]
    made = creations(log)
    assert sorted(name for name, _pid, _t in made) == sorted(names * 2), made
    by_node = {}
    for proc, out in zip(procs, outs):
        by_node.setdefault(paths[procs.index(proc) // 2], set()).add(str(out["pid"]))
        assert {n: r["outcome"] for n, r in out["results"].items()} == {n: sha(record_for(n)) for n in names}
        assert all(r["seconds"] < 0.3 + 2 * FAULTED_S for r in out["results"].values()), out
    for n in names:  # one create per node, not per process
        pids = [pid for name, pid, _t in made if name == n]
        assert [sum(pid in by_node[p] for pid in pids) for p in paths] == [1, 1]
    for p in paths:
        with Cache(p, 4.0) as cache:
            assert (cache.stats()["cache_misses"], cache.stats()["cache_hits"]) == (2, 2)
            assert cache.remote_stats()["remote_errors"] >= 1
            assert cache.remote_stats()["fleet_claims"] == 0


def test_a_killed_creators_fleet_claim_ends_with_its_lease(server: rs.RedisServer, tmp_path: Any,
                                                           workers: Workers) -> None:
    """A creator on node A is SIGKILLed inside create(); a waiter on node B, which found A's claim
    in Redis, takes the name over once the claim's lease ran out (not before: the claim outlives
    A in Redis), creates it, and shares it. nvcache.fleet reads no environment variable for its
    lease, so the workers patch the module attribute ``fleet.LEASE`` to 1.5 s (fleet_worker.py's
    ``lease``); B's wait (30 s) is far longer, so only the lease can end B's wait."""
    lease = 1.5
    log = str(tmp_path / "log")
    name = lid()
    hung = workers.start(path=str(tmp_path / "a"), url=server.unix_url, names=[name], log=log, mode="hang",
                         lease=lease)
    waiter = workers.start(path=str(tmp_path / "b"), url=server.tcp_url, names=[name], log=log, lease=lease,
                           wait=30)
    workers.ready(hung)
    workers.ready(waiter)
    workers.go(hung)
    wait_for(lambda: len(creations(log)) == 1)
    with server.client() as c:
        assert c.exists(claim_key(name)) == 1
    workers.go(waiter)
    time.sleep(0.5)  # B waits for A's claim
    assert waiter.poll() is None
    hung.send_signal(signal.SIGKILL)
    killed = time.time()
    hung.wait()
    with server.client() as c:
        assert c.pttl(claim_key(name)) > 0, "the killed creator's claim stays until its lease ends"
    out = Workers.result(waiter)
    assert out["results"][name]["outcome"] == sha(record_for(name))
    made = creations(log)
    assert len(made) == 2 and made[1][:2] == [name, str(out["pid"])]
    took = float(made[1][2]) - killed  # B's create() began this long after the kill
    assert 0.4 < took < lease + 1.5, took
    assert out["tier"]["fleet_waits"] == 1 and out["tier"]["fleet_claims"] == 1
    assert out["tier"]["fleet_takeovers"] == 0 and out["tier"]["remote_errors"] == 0
    with server.client() as c:
        assert c.exists(claim_key(name)) == 0 and c.exists(rkey(name)) == 1


def test_a_creator_that_raises_lets_another_node_create(server: rs.RedisServer, tmp_path: Any,
                                                        workers: Workers) -> None:
    """create() raises on A (its caller gets the exception) after B began waiting for A's claim:
    A lets go of its claim at once, so B creates well before the (default, 10 s) lease ends."""
    log, gate = str(tmp_path / "log"), str(tmp_path / "gate")
    name = lid()
    bad = workers.start(path=str(tmp_path / "a"), url=server.unix_url, names=[name], log=log, mode="raise",
                        gate=gate)
    good = workers.start(path=str(tmp_path / "b"), url=server.unix_url, names=[name], log=log)
    workers.ready(bad)
    workers.ready(good)
    workers.go(bad)
    wait_for(lambda: len(creations(log)) == 1)
    workers.go(good)
    time.sleep(0.5)
    assert good.poll() is None, "B waits for A's claim"
    opened = time.time()
    open(gate, "w").close()
    assert Workers.result(bad)["results"][name]["outcome"] == "ValueError"
    out = Workers.result(good)
    assert out["results"][name]["outcome"] == sha(record_for(name))
    made = creations(log)
    assert len(made) == 2 and made[1][:2] == [name, str(out["pid"])]
    assert float(made[1][2]) - opened < 2.0, "B created long after A raised"  # the lease is 10 s
    assert out["tier"]["fleet_waits"] == 1 and out["tier"]["fleet_claims"] == 1


def test_a_hung_creators_claim_is_renewed_and_waited_out_for_half_the_wait(
        server: rs.RedisServer, tmp_path: Any, workers: Workers) -> None:
    """A hangs in create() with a 0.6 s lease: its claim is renewed (still in Redis after 3 leases).
    B, with wait=2, creates without a fleet claim once it waited FLEET_WAIT_SHARE (half) of its
    wait: a fleet takeover."""
    log = str(tmp_path / "log")
    name = lid()
    hung = workers.start(path=str(tmp_path / "a"), url=server.unix_url, names=[name], log=log, mode="hang",
                         lease=0.6)
    waiter = workers.start(path=str(tmp_path / "b"), url=server.unix_url, names=[name], log=log, wait=2.0)
    workers.ready(hung)
    workers.ready(waiter)
    workers.go(hung)
    wait_for(lambda: len(creations(log)) == 1)
    started = time.monotonic()
    workers.go(waiter)
    out = Workers.result(waiter)
    took = out["results"][name]["seconds"]  # B's call, as B timed it
    assert out["results"][name]["outcome"] == sha(record_for(name))
    # fleet gives up one poll early rather than sleep past its deadline: up to POLL_MAX before
    assert fleet.FLEET_WAIT_SHARE * 2.0 - fleet.POLL_MAX - 0.05 < took < 3.0, took
    assert out["tier"]["fleet_waits"] == 1 and out["tier"]["fleet_takeovers"] == 1
    assert out["tier"]["fleet_claims"] == 0
    time.sleep(max(0.0, 3 * 0.6 - (time.monotonic() - started)))
    with server.client() as c:
        assert c.exists(claim_key(name)) == 1, "A's claim is renewed while its create() runs"
    assert hung.poll() is None


@pytest.mark.parametrize("fault", ["kill", "pause"])
def test_redis_fails_while_a_fleet_creator_runs(fresh: rs.RedisServer, tmp_path: Any, workers: Workers,
                                                fault: str) -> None:
    """Redis is killed (or SIGSTOPped) while A's create() runs under its fleet claim and B waits
    for it: B stops waiting (Redis cannot say) and creates under its node's claim; A's share
    fails, bounded; both return the right bytes within create() plus a faulted call or two."""
    log = str(tmp_path / "log")
    name, sleep = lid(), 0.8
    a = workers.start(path=str(tmp_path / "a"), url=fresh.unix_url, names=[name], log=log, sleep=sleep)
    b = workers.start(path=str(tmp_path / "b"), url=fresh.tcp_url, names=[name], log=log, sleep=sleep)
    workers.ready(a)
    workers.ready(b)
    workers.go(a)
    wait_for(lambda: len(creations(log)) == 1)
    workers.go(b)
    time.sleep(0.2)  # B polls A's claim
    try:
        (fresh.kill if fault == "kill" else fresh.pause)()
        failed = time.time()
        out_a, out_b = Workers.result(a), Workers.result(b)
        took = max(out["results"][name]["done"] for out in (out_a, out_b)) - failed
    finally:
        if fault == "pause":
            fresh.resume()
    for out in (out_a, out_b):
        assert out["results"][name]["outcome"] == sha(record_for(name))
        assert out["tier"]["remote_errors"] >= 1
    assert took < sleep + 2 * FAULTED_S, took
    made = creations(log)
    assert [m[0] for m in made] == [name, name] and made[1][1] == str(out_b["pid"])
    assert out_b["tier"]["fleet_waits"] == 1 and out_b["tier"]["fleet_claims"] == 0


# -- faults ------------------------------------------------------------------------------------------
def test_redis_killed_then_restarted(fresh: rs.RedisServer, node: Any) -> None:
    """Killed: the first call that meets it costs < 1 s and counts one error; the breaker then
    skips (< 5 ms median a call, counted); get, put and get_or_create go on locally. Restarted:
    after the breaker's backoff the next call probes, and the tier is used again. A restart
    between two calls is a blip at worst."""
    a = node("a", RemoteTier(fresh.tcp_url, **SLOW_PROBE))
    before, data0 = lid(), record(20)
    assert a.put(before, data0)
    fresh.kill()
    got, first = timed(lambda: a.get(lid()))
    fault = time.monotonic()  # the breaker opened (for SLOW_PROBE's backoff) by now
    assert got is None and first < FAULTED_S, first
    assert a.remote_stats() == counts(remote_puts=1, remote_errors=1)
    gets = [lid() for _ in range(20)]
    assert median_s([lambda layer=layer: a.get(layer) for layer in gets]) < SKIPPED_MEDIAN_S
    puts = [lid() for _ in range(20)]
    assert median_s([lambda layer=layer: a.put(layer, b"local only") for layer in puts]) < SKIPPED_MEDIAN_S
    assert all(a.get(layer) == b"local only" for layer in puts)
    create = Creates(record(21))
    made = lid()
    got, goc = timed(lambda: a.get_or_create(made, create))
    assert got == record(21) and create.calls == 1 and goc < FAULTED_S
    assert a.get(before) == data0
    assert time.monotonic() - fault < SLOW_PROBE["backoff"] - 0.1, "too slow to count exactly one fault"
    remote = a.remote_stats()
    assert remote["remote_errors"] == 1 and remote["remote_puts"] == 1 and remote["remote_hits"] == 0
    assert remote["remote_skipped"] >= 20 + 20 + 2  # each get and put, get_or_create's ask and share
    stats = a.stats()
    assert (stats["cache_misses"], stats["cache_hits"], stats["record_count"]) == (1 + 20 + 1, 20 + 1, 22)

    fresh.restart()  # empty: nothing persisted
    time.sleep(max(0.0, fault + SLOW_PROBE["backoff"] + 0.05 - time.monotonic()))
    after = lid()
    assert a.put(after, record(22))  # the probe
    with fresh.client() as c:
        assert c.exists(rkey(after)) == 1
    assert a.get(lid()) is None
    remote = a.remote_stats()
    assert remote["remote_errors"] == 1 and remote["remote_puts"] == 2 and remote["remote_misses"] == 1
    b = node("b", RemoteTier(fresh.unix_url, **FAST))
    assert b.get(after) == record(22) and b.remote_stats()["remote_hits"] == 1

    fresh.restart()  # between two calls
    blip = lid()
    ok, took = timed(lambda: a.put(blip, record(23)))
    assert ok and took < FAULTED_S and a.get(blip) == record(23)
    deadline = time.monotonic() + 3 * SLOW_PROBE["max_backoff"]
    shared = lid()
    while True:
        assert a.put(shared, record(24))
        with fresh.client() as c:
            if c.exists(rkey(shared)):
                break
        assert time.monotonic() < deadline, "the tier is not used again after a restart"
        time.sleep(0.1)
        shared = lid()


def test_redis_sigstopped_then_resumed(fresh: rs.RedisServer, node: Any) -> None:
    """A server that stops answering (SIGSTOP: connections still accepted): the first call that
    meets it on each node costs about the 0.2 s socket timeout (< 1 s), then the breaker skips;
    everything goes on locally. Resumed: after the backoff the nodes use the tier again."""
    a = node("a", RemoteTier(fresh.unix_url, **SLOW_PROBE))
    b = node("b", RemoteTier(fresh.tcp_url, **SLOW_PROBE))
    shared, data = lid(), record(30)
    assert a.put(shared, data) and b.get(shared) == data
    fresh.pause()
    try:
        got, first = timed(lambda: b.get(lid()))
        fault_b = time.monotonic()  # B's breaker opened by now
        assert got is None and first < FAULTED_S, first
        assert median_s([lambda: b.get(lid()) for _ in range(20)]) < SKIPPED_MEDIAN_S
        assert median_s([lambda: b.put(lid(), b"b only") for _ in range(20)]) < SKIPPED_MEDIAN_S
        create = Creates(record(31))
        made = lid()
        got, took = timed(lambda: b.get_or_create(made, create))
        assert got == record(31) and create.calls == 1 and took < FAULTED_S
        assert b.get(shared) == data  # local
        # A meets the stopped server in get_or_create first: the ask times out, no claim is tried.
        create_a = Creates(record(32))
        made_a = lid()
        got, took = timed(lambda: a.get_or_create(made_a, create_a))
        fault_a = time.monotonic()  # A's breaker opened by now
        assert got == record(32) and create_a.calls == 1 and took < FAULTED_S
        ok, took = timed(lambda: a.put(lid(), b"a only"))
        assert ok and took < SKIPPED_MEDIAN_S * 10
        assert time.monotonic() - fault_b < SLOW_PROBE["backoff"] - 0.1, "too slow to count exactly one fault"
        ra, rb = a.remote_stats(), b.remote_stats()
        assert ra["remote_errors"] == 1 and rb["remote_errors"] == 1
        assert rb["remote_skipped"] >= 40 and ra["remote_skipped"] >= 1
        assert ra["fleet_claims"] == 0 and rb["fleet_claims"] == 0
    finally:
        fresh.resume()
    time.sleep(max(0.0, fault_a + SLOW_PROBE["backoff"] + 0.05 - time.monotonic()))
    after = lid()
    assert b.put(after, record(33))  # B's probe
    with fresh.client() as c:
        assert c.exists(rkey(after)) == 1
        assert c.exists(rkey(made)) == 0 and c.exists(rkey(made_a)) == 0  # skipped while stopped
    assert a.get(after) == record(33)  # A's probe: a remote hit
    assert a.remote_stats()["remote_hits"] == 1 and a.remote_stats()["remote_errors"] == 1
    assert b.remote_stats()["remote_errors"] == 1


def test_a_full_server_skips_writes_and_serves_reads(fresh: rs.RedisServer, node: Any) -> None:
    """maxmemory below what the server holds, noeviction: every write is refused (``OOM command
    not allowed``). Puts succeed locally, the refusal is counted once and later writes skip;
    reads still go to the server (a remote hit on another node, a remote miss here)."""
    a = node("a", RemoteTier(fresh.unix_url, **SLOW_PROBE))
    b = node("b", RemoteTier(fresh.unix_url, **SLOW_PROBE))
    early, data = lid(), record(40)
    assert a.put(early, data)
    with fresh.client() as c:
        c.set(b"filler", incompressible(2_000_000, "filler"))
        c.config_set("maxmemory-policy", "noeviction")
        c.config_set("maxmemory", "1mb")
    late = lid()
    ok, took = timed(lambda: a.put(late, record(41)))
    assert ok and took < FAULTED_S and a.get(late) == record(41)
    assert a.remote_stats() == counts(remote_puts=1, remote_errors=1)
    assert a.remote.writes.is_open and not a.remote.reads.is_open
    assert a.put(lid(), record(42))
    assert a.remote_stats()["remote_skipped"] == 1
    assert b.get(early) == data, "a full server still serves reads"
    assert a.get(lid()) is None and a.remote_stats()["remote_misses"] == 1
    create = Creates(record(43))
    made = lid()
    assert a.get_or_create(made, create) == record(43) and create.calls == 1
    with fresh.client() as c:
        assert c.exists(rkey(late)) == 0 and c.exists(rkey(made)) == 0 and c.exists(claim_key(made)) == 0
    assert b.remote_stats() == counts(remote_hits=1)
    assert a.remote_stats()["remote_errors"] == 1


# -- tampered values ------------------------------------------------------------------------------------
def _flip(value: bytes, at: int) -> bytes:
    return value[:at] + bytes([value[at] ^ 0x01]) + value[at + 1:]


def _fix_checksum(value: bytes, name_len: int, tagged: bool) -> bytes:
    """Recompute the checksum of a changed body: only the tag can catch that change."""
    import xxhash
    h = remoterecords.HEADER
    end = len(value) - (remoterecords.TAG_SIZE if tagged else 0)
    body = value[h.size + name_len:end]
    return value[:12] + xxhash.xxh3_64_intdigest(body).to_bytes(8, "big") + value[20:]


POISON = b'{"packages": []}' * 20
TAMPERS = {
    "keyed, bad tag": (KEY, lambda v, n, other: _fix_checksum(_flip(v, len(v) - 40), len(n), True), "bad tag"),
    "keyed, another secret": (KEY, lambda v, n, other: remoterecords.encode_value(
        n, POISON, remoterecords.make_key("another secret, 16+ bytes")), "bad tag"),
    "keyed, untagged poison": (KEY, lambda v, n, other: remoterecords.encode_value(n, POISON, None), "no tag"),
    "keyed, another key's value": (KEY, lambda v, n, other: other, "wrong name"),
    "keyed, truncated": (KEY, lambda v, n, other: v[:-7], "truncated"),
    "bad checksum": (None, lambda v, n, other: _flip(v, len(v) - 3), "bad checksum"),
    "another key's value": (None, lambda v, n, other: other, "wrong name"),
    "truncated": (None, lambda v, n, other: v[:30], "truncated"),
    "truncated body": (None, lambda v, n, other: v[:-1], "truncated"),
}


@pytest.mark.parametrize("case", sorted(TAMPERS))
def test_tampered_values_are_misses_deleted_never_returned(server: rs.RedisServer, node: Any, case: str,
                                                           caplog: Any) -> None:
    """A value written straight into Redis that does not verify (with remote_key: its tag; always:
    its length, name and checksum) is a miss on B, logged, deleted from Redis (the other record's
    value stays), never returned; get_or_create then creates and shares a good value."""
    key, tamper, reason = TAMPERS[case]
    a, b = node("a", server.unix_url, remote_key=key), node("b", server.tcp_url, remote_key=key)
    layer, other, data, other_data = lid(), lid(), record(50), record(51)
    assert a.put(layer, data) and a.put(other, other_data)
    with server.client() as c:
        good = c.get(rkey(layer))
        bad = tamper(good, rname(layer), c.get(rkey(other)))
        assert bad != good
        c.set(rkey(layer), bad)
        with caplog.at_level(logging.WARNING, logger="nvcache.remote"):
            assert b.get(layer) is None
        assert c.exists(rkey(layer)) == 0, "the bad value is deleted"
        assert c.exists(rkey(other)) == 1
    assert reason in caplog.text
    assert not b.contains(layer)
    assert b.remote_stats() == counts(remote_misses=1, remote_rejected=1)
    assert (b.stats()["cache_hits"], b.stats()["cache_misses"], b.stats()["record_count"]) == (0, 1, 0)
    create = Creates(data)
    assert b.get_or_create(layer, create) == data and create.calls == 1
    with server.client() as c:
        assert remoterecords.decode_value(rname(layer), c.get(rkey(layer)), remoterecords.make_key(key), 1 << 20) \
            == data
    assert b.get(other) == other_data


def test_a_poisoned_value_is_refused_by_a_keyed_node(server: rs.RedisServer, node: Any) -> None:
    """A value with a correct checksum but no tag (someone without the key wrote it): a keyed node
    refuses it; a node without a key trusts it (documented: the tier then trusts every writer)."""
    layer = lid()
    with server.client() as c:
        c.set(rkey(layer), remoterecords.encode_value(rname(layer), POISON, None))
    unkeyed = node("open", server.unix_url)
    assert unkeyed.get(layer) == POISON
    keyed = node("keyed", server.unix_url, remote_key=KEY)
    with server.client() as c:
        c.set(rkey(layer), remoterecords.encode_value(rname(layer), POISON, None))
    assert keyed.get(layer) is None and keyed.remote_stats()["remote_rejected"] == 1
    # A keyed node's values are tagged, and readable by a node without the key (checksum only).
    mine = lid()
    assert keyed.put(mine, record(52))
    with server.client() as c:
        assert c.get(rkey(mine))[4] == remoterecords.TAGGED
    assert unkeyed.get(mine) == record(52)


# -- Redis Cluster ------------------------------------------------------------------------------------------
def _one_per_master(cluster: rs.RedisCluster3) -> Dict[int, str]:
    placed: Dict[int, str] = {}
    while len(placed) < 3:
        layer = lid()
        placed.setdefault(cluster.owner(key_slot(rkey(layer))).port, layer)
    return placed


def test_cluster_two_nodes_share(cluster: rs.RedisCluster3, node: Any) -> None:
    """Two nodes through ``redis+cluster://``: a record on each master put by A is a hit on B;
    the values live on the master of their slot; get_or_create claims across the cluster; a slot
    moved to another master after both learned the map is followed (MOVED), no error."""
    a, b = node("a", cluster.url, remote_key=KEY), node("b", cluster.url, remote_key=KEY)
    placed = _one_per_master(cluster)
    for port, layer in placed.items():
        assert a.put(layer, record(port))
        owner = next(n for n in cluster.nodes if n.port == port)
        with owner.client() as c:
            assert c.exists(rkey(layer)) == 1
    for port, layer in placed.items():
        assert b.get(layer) == record(port)
    assert b.remote_stats() == counts(remote_hits=3)
    assert (b.stats()["cache_hits"], b.stats()["cache_misses"]) == (3, 0)

    made, create = lid(), Creates(record(60))
    assert a.get_or_create(made, create) == record(60) and create.calls == 1
    assert b.get_or_create(made, never) == record(60)
    assert a.remote_stats()["fleet_claims"] == 1

    moved = lid()
    new = cluster.move_slot(key_slot(rkey(moved)))
    assert a.put(moved, record(61))
    assert b.get(moved) == record(61)
    with new.client() as c:
        assert c.exists(rkey(moved)) == 1
    assert a.remote_stats()["remote_errors"] == 0 and b.remote_stats()["remote_errors"] == 0


def test_cluster_master_stopped_then_killed(node: Any) -> None:
    """A master SIGSTOPped, then killed: every call still succeeds locally within the bound;
    resumed, its keys are served again."""
    rs.require_binaries()
    c = rs.RedisCluster3().start()
    try:
        a = node("a", RemoteTier(c.url, **FAST))
        b = node("b", RemoteTier(c.url, **FAST))
        placed = _one_per_master(c)
        for port, layer in placed.items():
            assert a.put(layer, record(port))
        victim = c.nodes[1]
        on_victim = placed[victim.port]
        victim.pause()
        try:
            got, took = timed(lambda: b.get(on_victim))
            assert got is None and took < FAULTED_S, took
            assert b.remote_stats()["remote_errors"] == 1
            local = lid()
            ok, took = timed(lambda: b.put(local, b"local"))
            assert ok and took < FAULTED_S and b.get(local) == b"local"
            create = Creates(record(70))
            made = lid()
            got, took = timed(lambda: b.get_or_create(made, create))
            assert got == record(70) and create.calls == 1 and took < FAULTED_S
            assert a.get(on_victim) == record(victim.port)  # A's own copy
        finally:
            victim.resume()
        deadline = time.monotonic() + 10
        while b.get(on_victim) is None:
            assert time.monotonic() < deadline, "the resumed master's key is not served again"
            time.sleep(FAST["backoff"])
        assert b.remote_stats()["remote_hits"] == 1

        def on_victim_slot() -> str:
            while True:
                layer = lid()
                if c.owner(key_slot(rkey(layer))) is victim:
                    return layer

        late, put_late, made_late = on_victim_slot(), on_victim_slot(), on_victim_slot()
        victim.kill()
        got, took = timed(lambda: a.get(late))
        assert got is None and took < FAULTED_S, took
        assert a.remote_stats()["remote_errors"] == 1, "the first call to the dead master failed"
        ok, took = timed(lambda: a.put(put_late, b"x"))
        assert ok and took < FAULTED_S and a.get(put_late) == b"x"
        got, took = timed(lambda: a.get_or_create(made_late, lambda: b"y"))
        assert got == b"y" and took < FAULTED_S, took
        assert all(a.get(layer) == record(port) for port, layer in placed.items())
        assert a.remote_stats()["remote_errors"] >= 1
    finally:
        c.cleanup()


def test_nothing_listening(tmp_path: Any, node: Any) -> None:
    """Connection refused (TCP, cluster, unix socket): the first call costs < 1 s and counts one
    error, the next ones skip; the cache works on the node alone."""
    port = rs.free_port()
    urls = (f"redis://127.0.0.1:{port}/0", f"redis+cluster://127.0.0.1:{port}", f"unix://{tmp_path}/none.sock")
    for i, url in enumerate(urls):
        cache = node(f"n{i}", RemoteTier(url, **SLOW_PROBE))
        layer, create = lid(), Creates(record(95))
        got, took = timed(lambda: cache.get(layer))
        assert got is None and took < FAULTED_S, (url, took)
        assert cache.put(layer, record(96)) and cache.get(layer) == record(96)
        assert cache.get_or_create(lid(), create) == record(95) and create.calls == 1
        assert median_s([lambda: cache.get(lid()) for _ in range(10)]) < SKIPPED_MEDIAN_S
        remote = cache.remote_stats()
        assert remote["remote_errors"] == 1 and remote["remote_skipped"] >= 10 + 1 + 2, (url, remote)
        assert remote["remote_puts"] == remote["remote_hits"] == remote["remote_misses"] == 0


def test_a_put_of_any_memoryview_is_shared(server: rs.RedisServer, node: Any) -> None:
    """put takes any bytes-like record, a memoryview of any shape or format included (its bytes:
    README, arguments.as_record), and a node-only cache stores a strided one. With a tier the put
    must do the same and share those bytes: the tier must not take the put down."""
    a, b = node("a", server.unix_url), node("b", server.unix_url)
    plain = node("plain", None)
    base = b"abcdef" * 1000
    records = {"bytearray": bytearray(base), "contiguous": memoryview(base),
               "strided": memoryview(base)[::2], "ints": memoryview(bytes(base)).cast("i")}
    for what, rec in records.items():
        want = bytes(rec) if not isinstance(rec, memoryview) else rec.tobytes()
        layer = lid()
        assert plain.put(layer, rec) and plain.get(layer) == want, what
        assert a.put(layer, rec), what
        assert a.get(layer) == want and b.get(layer) == want, what
    assert b.remote_stats()["remote_hits"] == len(records)


def test_a_forked_child_counts_only_its_own_remote_calls(server: rs.RedisServer, node: Any) -> None:
    """A process that forks with an open cache (the registry supports it: the child's store
    reopens itself): the child's remote calls are added to the node's tally, the parent's are
    not added a second time. One remote miss here, one in the child: 2, as cache_misses says."""
    cache = node("a", server.unix_url)
    assert cache.get(lid()) is None  # a remote miss, not in the file's tally yet (synced once a second)
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            cache.get(lid())
            cache.close()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert cache.stats()["cache_misses"] == 2
    assert cache.remote_stats()["remote_misses"] == 2


# -- configuration -------------------------------------------------------------------------------------------
def test_from_env_with_nvcache_remote(server: rs.RedisServer, Cache: type, tmp_path: Any, monkeypatch: Any) -> None:
    """NVCACHE_REMOTE (with _KEY, _PREFIX, _TTL) gives from_env a tier: values tagged, under the
    prefix, with the TTL; another node configured the same reads them. MAX_CACHE_RECORD_MB=0
    (disabled) uses no tier; without NVCACHE_REMOTE there is none."""
    monkeypatch.setenv("MAX_CACHE_RECORD_MB", "4")
    monkeypatch.setenv("NVCACHE_REMOTE", server.unix_url)
    monkeypatch.setenv("NVCACHE_REMOTE_KEY", KEY)
    monkeypatch.setenv("NVCACHE_REMOTE_PREFIX", "fleet7:")
    monkeypatch.setenv("NVCACHE_REMOTE_TTL", "60")
    monkeypatch.setenv("NVCACHE_PATH", str(tmp_path / "a"))
    layer, data = lid(), record(80)
    with Cache.from_env() as a:
        assert a.remote is not None and a.remote.key == remoterecords.make_key(KEY)
        assert a.put(layer, data)
    with server.client() as c:
        value = c.get(rkey(layer, b"fleet7:"))
        assert value is not None and value[4] == remoterecords.TAGGED
        assert 0 < c.pttl(rkey(layer, b"fleet7:")) <= 60_000
        assert c.exists(rkey(layer)) == 0
    monkeypatch.setenv("NVCACHE_PATH", str(tmp_path / "b"))
    with Cache.from_env() as b:
        assert b.get(layer) == data
        assert b.remote_stats() == counts(remote_hits=1)
    monkeypatch.setenv("NVCACHE_PATH", str(tmp_path / "c"))
    monkeypatch.setenv("MAX_CACHE_RECORD_MB", "0")
    with Cache.from_env() as off:
        assert off.remote is None and off.get(layer) is None and off.put(lid(), b"x") is False
    monkeypatch.setenv("MAX_CACHE_RECORD_MB", "4")
    monkeypatch.delenv("NVCACHE_REMOTE")
    with Cache.from_env() as plain:
        assert plain.remote is None and plain.get(layer) is None
    monkeypatch.setenv("NVCACHE_REMOTE", server.unix_url)
    with Cache.from_env(remote=None) as mine:  # remote= wins over the environment
        assert mine.remote is None and mine.get(layer) is None


def test_remote_none_is_node_only(server: rs.RedisServer, make_cache: Any, tmp_path: Any) -> None:
    """remote=None (the default): nothing reaches Redis (no command at all), the remote counters
    stay zero, and get_or_create works on the node alone. A disabled or repair=False cache given a
    tier uses none."""
    watch = server.client()  # one connection for every look (each new one sends a HELLO)

    def calls() -> int:  # every command the server ran, but the INFO asking
        return sum(int(v["calls"]) for k, v in watch.info("commandstats").items() if k != "cmdstat_info")

    keys = watch.dbsize()
    before = calls()
    cache = make_cache(4.0, path=str(tmp_path / "plain"))
    assert cache.remote is None
    layer = lid()
    assert cache.get(layer) is None
    assert cache.put(layer, record(90)) and cache.get(layer) == record(90)
    create = Creates(record(91))
    assert cache.get_or_create(lid(), create) == record(91) and create.calls == 1
    assert cache.get_many([layer, lid()]) == {layer: record(90)}
    assert cache.remote_stats() == ZERO
    stats = cache.stats()
    assert (stats["cache_hits"], stats["cache_misses"], stats["record_count"]) == (2, 3, 2)
    off = make_cache(0, path=str(tmp_path / "off"), remote=server.unix_url)
    assert off.remote is None and off.put(lid(), b"x") is False and off.get(layer) is None
    reader = make_cache(4.0, path=str(tmp_path / "plain"), repair=False, remote=server.unix_url)
    assert reader.remote is None and reader.get(lid()) is None and reader.get(layer) == record(90)
    assert calls() == before, "no command reached the server"
    assert watch.dbsize() == keys
    watch.close()


def test_bad_remote_arguments(Cache: type, tmp_path: Any) -> None:
    with pytest.raises(ValueError):
        Cache(str(tmp_path / "x"), 1.0, remote_key=KEY)  # a key without a tier
    with pytest.raises(TypeError):
        Cache(str(tmp_path / "x"), 1.0, remote=42)
    with pytest.raises(ValueError):
        Cache(str(tmp_path / "x"), 1.0, remote="http://127.0.0.1:1")
    with pytest.raises(ValueError):
        Cache(str(tmp_path / "x"), 1.0, remote="redis://127.0.0.1:1/0", remote_key="short")
    with pytest.raises(ValueError):
        Cache(str(tmp_path / "x"), 1.0, remote=RemoteTier("redis://127.0.0.1:1/0"), remote_key=KEY)


# -- the review's findings (session 8): each test fails on the code before its fix -------------------
def test_a_remote_key_of_another_type_is_refused(server: rs.RedisServer, make_cache: Any) -> None:
    """bytes(32) would have been 32 zero bytes: a key everyone knows."""
    for bad in (32, 7, True, [0] * 32, 3.5):
        with pytest.raises(TypeError, match="remote_key must be str or bytes"):
            make_cache(4.0, remote=server.unix_url, remote_key=bad)


def test_urls_are_checked_at_construction_and_never_show_the_password(make_cache: Any, caplog: Any) -> None:
    for url in ("redis://:S3cretPW@h:notaport/0", "redis+cluster://:S3cretPW@host1:7000,host2",
                "redis+clustr://:S3cretPW@h:1", "unix://:S3cretPW@h:1"):
        with pytest.raises(ValueError) as err:
            make_cache(4.0, remote=url)
        assert "S3cretPW" not in str(err.value) and "***" in str(err.value), err.value
    assert "S3cretPW" not in repr(RemoteTier("redis://:S3cretPW@127.0.0.1:1/0"))


def test_one_stall_seen_by_many_threads_costs_one_backoff(fresh: rs.RedisServer) -> None:
    """Eight threads meet the same stall: the breaker opens for ``backoff`` (0.3 s), not doubled
    once per thread up to max_backoff; only a failed probe doubles it."""
    import threading
    tier = RemoteTier(fresh.unix_url, timeout=0.2, backoff=0.3, max_backoff=30.0)
    assert tier.put(rname(lid()), b"connected")
    fresh.pause()
    try:
        threads = [threading.Thread(target=tier.get, args=(rname(lid()),)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        left = tier.reads.until - time.monotonic()
        assert 0 < left <= 0.3, left
    finally:
        fresh.resume()
    time.sleep(0.35)
    assert tier.get(rname(lid())) is None and not tier.reads.is_open  # the probe succeeded


def test_a_stall_during_create_does_not_lose_the_fleet_claim(fresh: rs.RedisServer, make_cache: Any,
                                                              monkeypatch: Any) -> None:
    """The server stops answering for a moment while create() runs: the renewal that fails is
    tried again, so the claim outlives its first lease and the other node does not create."""
    import threading
    monkeypatch.setattr(fleet, "LEASE", 1.2)  # renewals every 0.4 s; a retry 0.12 s after a fault
    name, data = lid(), record(31)
    a = make_cache(4.0, path=str(fresh.dir) + "/a", remote=RemoteTier(fresh.unix_url, **FAST))
    b = make_cache(4.0, path=str(fresh.dir) + "/b", remote=RemoteTier(fresh.unix_url, **FAST))
    started = threading.Event()

    def slow() -> bytes:
        started.set()
        time.sleep(0.5)
        fresh.pause()  # the renewal due 0.8 s after the claim times out (0.2 s) in here
        time.sleep(0.8)
        fresh.resume()
        time.sleep(1.6)  # past the lease the last good renewal (0.4 s) gave: only a retry keeps it
        return data

    t = threading.Thread(target=lambda: a.get_or_create(name, slow, wait=20))
    t.start()
    started.wait(5)
    time.sleep(2.0)  # after the stall and past 1.6 s (0.4 + the lease), inside create()
    with fresh.client() as c:
        assert c.exists(claim_key(name)) == 1  # still held
    assert b.get_or_create(name, never, wait=20) == data  # waited for a's record
    t.join()
    assert b.remote_stats()["fleet_waits"] == 1 and b.remote_stats()["fleet_takeovers"] == 0


def test_closing_a_cache_leaves_a_tier_it_was_given_open(server: rs.RedisServer, make_cache: Any) -> None:
    tier = RemoteTier(server.unix_url, **FAST)
    a = make_cache(4.0, path=str(server.dir) + "/ga", remote=tier)
    b = make_cache(4.0, path=str(server.dir) + "/gb", remote=tier)
    name = lid()
    assert a.put(name, record(5))
    a.close()
    assert tier._client is not None  # not closed under b
    assert b.get(name) == record(5) and tier.stats()["remote_errors"] == 0


def test_delete_reaches_the_tier_even_with_the_write_breaker_open(server: rs.RedisServer, make_cache: Any,
                                                                    caplog: Any) -> None:
    """A withdrawn record must not come back from the tier: the delete goes past the breaker."""
    a = make_cache(4.0, path=str(server.dir) + "/da", remote=RemoteTier(server.unix_url, **FAST))
    b = make_cache(4.0, path=str(server.dir) + "/db", remote=RemoteTier(server.unix_url, **FAST))
    name = lid()
    assert a.put(name, record(6))
    a.remote.writes.failed("a test's stand-in for a refused write")  # open: puts skip now
    assert a.remote.writes.is_open and a.delete(name)
    with server.client() as c:
        assert c.exists(rkey(name)) == 0
    assert b.get(name) is None


def test_an_interrupt_after_the_fleet_claim_lets_it_go(server: rs.RedisServer, make_cache: Any,
                                                       monkeypatch: Any) -> None:
    """A KeyboardInterrupt between taking the fleet claim and create() (here: in the look that
    follows the claim) releases the claim at once, so other nodes need not wait out the lease."""
    cache = make_cache(4.0, path=str(server.dir) + "/ia", remote=RemoteTier(server.unix_url, **FAST))
    name = lid()
    real = RemoteTier.claimed

    def interrupted(self: RemoteTier, n: bytes) -> Any:
        if self.claim.__self__ is cache.remote and n == rname(name):  # only the look after our claim
            with server.client() as c:
                if c.exists(claim_key(name)):
                    raise KeyboardInterrupt
        return real(self, n)

    monkeypatch.setattr(RemoteTier, "claimed", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.get_or_create(name, never)
    with server.client() as c:
        assert c.exists(claim_key(name)) == 0


def test_without_redis_py_a_cache_given_a_tier_works_on_its_node(tmp_path: Any, core_env: Dict[str, str]) -> None:
    """redis-py is the ``remote`` extra: without it (hidden here: sys.modules["redis"] = None), a
    cache given a tier, by argument or by NVCACHE_REMOTE, logs why and works on its node alone."""
    prog = ("import sys, logging; sys.modules['redis'] = None\n"
            "logging.basicConfig(level=logging.ERROR)\n"
            "import os, nvcache\n"
            "c = nvcache.LayerCache(sys.argv[1], 4, remote='redis://:S3cret@127.0.0.1:1/0')\n"
            "assert c.remote is None and c.put('sha256:' + 'a' * 64, b'rec') and c.get('sha256:' + 'a' * 64) == b'rec'\n"
            "c.close(); os.environ.update(NVCACHE_REMOTE='redis://127.0.0.1:1/0', MAX_CACHE_RECORD_MB='4',\n"
            "                             NVCACHE_PATH=sys.argv[1])\n"
            "e = nvcache.LayerCache.from_env()\n"
            "assert e.remote is None and e.get('sha256:' + 'a' * 64) == b'rec'; e.close(); print('ok')")
    out = subprocess.run([sys.executable, "-c", prog, str(tmp_path / "c")], env=core_env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    assert out.stderr.count("redis-py is not installed (pip install 'nvcache[remote]')") == 2, out.stderr
    assert "S3cret" not in out.stderr
