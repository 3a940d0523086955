"""The CLI's view of the remote tier: ``stat --all``, ``remote-stat`` and ``metrics``' remote figures.

Against real redis-server processes of the suite's own (tests/redisservers.py): caches that
used a tier through ``LayerCache(path, ..., remote=url)``, the server's own DBSIZE and CONFIG GET
as the reference, a killed, a SIGSTOPped and a password-protected server. No Redis is mocked.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Dict, Iterator, List, Optional

import pytest
from click.testing import CliRunner, Result
from prometheus_client.parser import text_string_to_metric_families

from nvcache import LayerCache
from nvcache.cli import cli
from nvcache.climetrics import CacheCollector
from nvcache.clitier import load_tier, redact
from payloads import incompressible

import redisservers as rs

DIGESTS = ["sha256:" + c * 64 for c in "abcdef"]
SIZE = 4000  # incompressible: stored as 4000 bytes
TALLY_ZERO = dict(remote_hits=0, remote_misses=0, remote_errors=0, remote_skipped=0, remote_rejected=0,
                  remote_puts=0, fleet_claims=0, fleet_waits=0, fleet_takeovers=0)


def run(args: List[str], env: Optional[Dict[str, str]] = None) -> Result:
    result = CliRunner().invoke(cli, args, env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def rows(table: str) -> List[List[str]]:
    lines = [ln for ln in table.splitlines() if ln.startswith("|")]
    return [[cell.strip() for cell in ln.strip("|").split("|")] for ln in lines[1:]]


def samples(text: str) -> Dict[str, float]:
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture
def redis_db(server: rs.RedisServer) -> Iterator[rs.RedisServer]:
    """The module's server, emptied, with its memory settings put back after the test."""
    with server.client() as c:
        c.flushall()
        before = {k: c.config_get(k)[k] for k in ("maxmemory", "maxmemory-policy")}
    yield server
    with server.client() as c:
        for k, v in before.items():
            c.config_set(k, v)


@pytest.fixture
def no_remote_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NVCACHE_REMOTE", "NVCACHE_REMOTE_KEY", "NVCACHE_REMOTE_PREFIX", "NVCACHE_REMOTE_TTL"):
        monkeypatch.delenv(name, raising=False)


def two_nodes(tmp_path: Any, url: str) -> Dict[str, Dict[str, Any]]:
    """Two node caches sharing one tier, used in known ways; what each must report."""
    a, b = str(tmp_path / "node-a"), str(tmp_path / "node-b")
    with LayerCache(a, 16, remote=url) as cache:
        for digest in DIGESTS[:3]:
            assert cache.put(digest, incompressible(SIZE, digest))  # new here: shared (3 puts)
        assert not cache.put(DIGESTS[0], incompressible(SIZE, DIGESTS[0]))  # present: not shared again
        assert cache.get(DIGESTS[0])  # a local hit: the tier is not asked
        assert cache.get(DIGESTS[5]) is None  # a local miss, then a remote miss
    # Node B: 10 KiB holds two of the records: the third evicts the least recently referred.
    with LayerCache(b, 0.01, remote=url) as cache:
        assert cache.get(DIGESTS[1]) == incompressible(SIZE, DIGESTS[1])  # remote hit, stored here: a hit
        assert cache.get(DIGESTS[1])  # now a local hit
        found = cache.get_many([DIGESTS[2], DIGESTS[4]])  # a remote hit and a remote miss
        assert list(found) == [DIGESTS[2]]
        # A local miss; the creator asks the tier (a remote miss), claims the name fleet-wide, checks
        # once more that no node shared it meanwhile (EXISTS: no miss counted), creates, shares.
        made = cache.get_or_create(DIGESTS[3], lambda: incompressible(SIZE, "made"))
        assert made == incompressible(SIZE, "made")
        b_evictions = cache.evictions()
    assert b_evictions == 1  # DIGESTS[1] (referred before DIGESTS[2]) made room for DIGESTS[3]
    return {
        a: dict(stats=dict(cache_misses=1, cache_hits=1, record_count=3, record_total_size=3 * SIZE),
                remote=dict(TALLY_ZERO, remote_misses=1, remote_puts=3), evictions=0, bound=16 << 20),
        b: dict(stats=dict(cache_misses=2, cache_hits=3, record_count=2, record_total_size=2 * SIZE),
                remote=dict(TALLY_ZERO, remote_hits=2, remote_misses=2, remote_puts=1, fleet_claims=1),
                evictions=1, bound=int(0.01 * (1 << 20))),
    }


# -- stat --all -----------------------------------------------------------------------------------
def test_stat_all_shows_what_the_caches_did_with_the_tier(tmp_path, redis_db):
    nodes = two_nodes(tmp_path, redis_db.unix_url)
    for path, want in nodes.items():
        with LayerCache(path, repair=False) as cache:  # the API's own figures agree
            assert cache.stats() == want["stats"] and cache.remote_stats() == want["remote"]
        got = json.loads(run(["--path", path, "stat", "--all", "--json"]).stdout)
        assert got == {**want["stats"], "flight": {"waits": 0, "takeovers": 0, "wait_seconds": 0.0},
                       "remote": want["remote"], "evictions": want["evictions"], "bound_bytes": want["bound"]}
        assert list(got)[:4] == ["cache_misses", "cache_hits", "record_count", "record_total_size"]
        # The plain stat is the seed's four fields, unchanged; --all starts with exactly those rows.
        plain = run(["--path", path, "stat"])
        assert plain.exit_code == 0 and len(rows(plain.stdout)) == 4
        table = run(["--path", path, "stat", "--all"])
        assert table.exit_code == 0 and table.stderr == ""
        assert rows(table.stdout)[:4] == rows(plain.stdout)
        assert dict(rows(table.stdout)[4:]) == {
            "flight_waits": "0", "flight_takeovers": "0", "flight_wait_seconds": "0.000",
            **{k: str(v) for k, v in want["remote"].items()},
            "evictions": str(want["evictions"]), "bound_bytes": str(want["bound"])}
        assert json.loads(run(["--path", path, "stat", "--json"]).stdout) == want["stats"]
    # A node that never used a tier shows zeros, not None, in the tier's rows.
    with LayerCache(str(tmp_path / "alone"), 1) as cache:
        cache.put(DIGESTS[0], b"x" * 100)
    got = json.loads(run(["--path", str(tmp_path / "alone"), "stat", "--all", "--json"]).stdout)
    assert got["remote"] == TALLY_ZERO and got["evictions"] == 0


def test_stat_all_without_a_cache_is_all_none_and_creates_nothing(tmp_path):
    path = tmp_path / "nothing"
    table = run(["--path", str(path), "stat", "--all"])
    assert table.exit_code == 0 and all(value == "None" for _, value in rows(table.stdout))
    assert [name for name, _ in rows(table.stdout)][4:7] == ["flight_waits", "flight_takeovers",
                                                             "flight_wait_seconds"]
    assert json.loads(run(["--path", str(path), "stat", "--all", "--json"]).stdout) == {
        "cache_misses": None, "cache_hits": None, "record_count": None, "record_total_size": None,
        "flight": None, "remote": None, "evictions": None, "bound_bytes": None}
    assert not path.exists()


# -- remote-stat ----------------------------------------------------------------------------------
def test_remote_stat_reports_the_servers_own_figures(tmp_path, redis_db, no_remote_env):
    two_nodes(tmp_path, redis_db.unix_url)
    with redis_db.client() as c:
        c.config_set("maxmemory", str(64 << 20))
        c.config_set("maxmemory-policy", "allkeys-lru")
        dbsize = c.dbsize()
        policy = c.config_get("maxmemory-policy")["maxmemory-policy"]
    assert dbsize == 4  # the four records shared (fleet claims are gone once their creator shared)
    result = run(["remote-stat", "--remote", redis_db.unix_url, "--json"])
    assert result.exit_code == 0 and result.stderr == ""
    got = json.loads(result.stdout)
    assert got["keys"] == dbsize and got["maxmemory_policy"] == policy == "allkeys-lru"
    assert got["maxmemory"] == 64 << 20 and got["masters"] == 1 and got["used_memory"] > 0
    assert got["remote"] == redis_db.unix_url and got["warning"] is None
    # The table, with the URL from NVCACHE_REMOTE as the scanners have it.
    table = run(["remote-stat"], env={"NVCACHE_REMOTE": redis_db.unix_url})
    assert table.exit_code == 0 and table.stderr == ""
    shown = dict(rows(table.stdout))
    assert list(shown) == ["remote", "keys", "used_memory", "maxmemory", "maxmemory_policy", "masters"]
    assert shown["keys"] == str(dbsize) and shown["maxmemory_policy"] == "allkeys-lru"


@pytest.mark.parametrize("maxmemory, policy, ttl, warned", [
    ("0", "noeviction", None, "maxmemory is 0"),  # the server's defaults
    ("0", "allkeys-lru", None, "maxmemory is 0"),
    ("0", "allkeys-lru", "3600", "leave only when their NVCACHE_REMOTE_TTL ends"),
    ("64mb", "noeviction", None, "maxmemory-policy noeviction evicts nothing"),
    ("64mb", "volatile-lru", None, "evicts only keys with a TTL"),
    ("64mb", "volatile-lru", "3600", None),  # records with a TTL do leave
    ("64mb", "allkeys-lfu", None, None),
])
def test_remote_stat_warns_when_records_never_leave(redis_db, no_remote_env, maxmemory, policy, ttl, warned):
    with redis_db.client() as c:
        c.config_set("maxmemory", maxmemory)
        c.config_set("maxmemory-policy", policy)
    env = {"NVCACHE_REMOTE_TTL": ttl} if ttl else None
    for args in (["--json"], []):
        result = run(["remote-stat", "--remote", redis_db.unix_url] + args, env=env)
        assert result.exit_code == 0  # a warning, not a failure
        if warned is None:
            assert result.stderr == ""
        else:
            assert result.stderr.startswith("warning: ") and result.stderr.count("\n") == 1
            assert warned in result.stderr and "allkeys-lru" in result.stderr  # what to set
        if args:
            assert json.loads(result.stdout)["warning"] == (None if warned is None else result.stderr[9:-1])


def test_remote_stat_needs_a_url(no_remote_env):
    for env in (None, {"NVCACHE_REMOTE": ""}):
        result = run(["remote-stat"], env=env)
        assert result.exit_code == 2 and "no remote tier given: pass --remote URL or set NVCACHE_REMOTE" in result.stderr
    result = run(["remote-stat", "--remote", "http://:hunter2-secret@example.invalid:6379/0"])
    assert result.exit_code == 2 and "redis://" in result.stderr and "hunter2-secret" not in result.stderr
    result = run(["remote-stat", "--remote", "redis://:hunter2-secret@127.0.0.1:notaport/0"])
    assert result.exit_code == 2 and "Traceback" not in result.stderr and "hunter2-secret" not in result.stderr
    result = run(["remote-stat", "--remote", "redis://127.0.0.1:1/0"], env={"NVCACHE_REMOTE_KEY": "short"})
    assert result.exit_code == 2 and "NVCACHE_REMOTE_KEY must be at least 16 bytes" in result.stderr
    result = run(["remote-stat", "--remote", "redis://127.0.0.1:1/0"], env={"NVCACHE_REMOTE_TTL": "soon"})
    assert result.exit_code == 2 and "NVCACHE_REMOTE_TTL must be a positive, finite number of seconds" in result.stderr


def test_remote_stat_on_a_dead_server_is_one_line_without_the_password(no_remote_env):
    rs.require_binaries()
    secret = "pw-9f2c1e7d-never-shown"
    s = rs.RedisServer(password=secret).start()
    try:
        for url in (s.tcp_url, s.unix_url):
            assert secret in url
            assert run(["remote-stat", "--remote", url]).exit_code == 0  # alive, with the right password
        wrong = s.tcp_url.replace(secret, "wrong-password-xyz")
        result = run(["remote-stat", "--remote", wrong])
        assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "wrong-password-xyz" not in result.stderr
        s.kill()
        for url in (s.tcp_url, s.unix_url):
            started = time.monotonic()
            result = run(["remote-stat", "--remote", url])
            elapsed = time.monotonic() - started
            assert result.exit_code == 1 and result.stdout == ""
            assert result.stderr == f"Error: cannot reach the remote tier at {redact(url)}: " \
                                    f"{result.stderr.split(': ', 2)[2]}"
            assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
            assert "ConnectionError" in result.stderr and secret not in result.stderr
            assert ("127.0.0.1:%d" % s.port if url == s.tcp_url else s.socket) in result.stderr
            assert elapsed < 3
        # -v shows the tier's own log too (never the password)
        result = run(["-v", "remote-stat", "--remote", s.tcp_url])
        assert result.exit_code == 1 and "remote tier: reads fail" in result.stderr and secret not in result.stderr
    finally:
        s.cleanup()


def test_without_redis_py_one_line_names_the_extra(tmp_path, monkeypatch, no_remote_env):
    monkeypatch.setitem(sys.modules, "nvcache.remote", None)  # `from .remote import ...` now fails
    result = run(["remote-stat", "--remote", "redis://127.0.0.1:1/0"])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "pip install 'nvcache[remote]'" in result.stderr and "Traceback" not in result.stderr
    path = str(tmp_path / "c")
    LayerCache(path, 1).close()
    result = run(["--path", path, "metrics", "--remote", "redis://127.0.0.1:1/0"])  # asked for: an error
    assert result.exit_code == 1 and "pip install 'nvcache[remote]'" in result.stderr
    # A scanner's NVCACHE_REMOTE in the exporter's environment: the cache's metrics, and a warning.
    result = run(["--path", path, "metrics"], env={"NVCACHE_REMOTE": "redis://127.0.0.1:1/0"})
    assert result.exit_code == 0 and "pip install 'nvcache[remote]'" in result.stderr
    assert samples(result.stdout)["nvcache_up"] == 1 and "nvcache_remote_up" not in result.stdout


# -- metrics --------------------------------------------------------------------------------------
def test_metrics_count_the_tier_and_read_the_server(tmp_path, redis_db, no_remote_env):
    nodes = two_nodes(tmp_path, redis_db.unix_url)
    for path, want in nodes.items():
        result = run(["--path", path, "metrics"])
        assert result.exit_code == 0
        got = samples(result.stdout)
        for name, value in want["remote"].items():
            assert got[f"nvcache_{name}_total"] == value, name
        assert got["nvcache_cache_hits_total"] == want["stats"]["cache_hits"]
        assert got["nvcache_evictions_total"] == want["evictions"]
        assert "nvcache_remote_up" not in got  # no --remote, no NVCACHE_REMOTE: the server is not asked
        families = {f.name: f.type for f in text_string_to_metric_families(result.stdout)}
        assert all(families[f"nvcache_{name}"] == "counter" for name in want["remote"])
    path = next(iter(nodes))
    with redis_db.client() as c:
        c.config_set("maxmemory", str(32 << 20))
        c.config_set("maxmemory-policy", "allkeys-lru")
        dbsize = c.dbsize()
    for args, env in ((["--remote", redis_db.unix_url], None), ([], {"NVCACHE_REMOTE": redis_db.unix_url})):
        result = run(["--path", path, "metrics"] + args, env=env)
        assert result.exit_code == 0 and result.stderr == ""
        families = {f.name: f for f in text_string_to_metric_families(result.stdout)}
        assert families["nvcache_remote_up"].samples[0].value == 1
        assert families["nvcache_remote_up"].samples[0].labels == {"remote": redis_db.unix_url}
        assert families["nvcache_remote_keys"].samples[0].value == dbsize == 4
        assert families["nvcache_remote_used_memory_bytes"].samples[0].value > 0
        (maxmemory,) = families["nvcache_remote_maxmemory_bytes"].samples
        assert maxmemory.value == 32 << 20 and maxmemory.labels["policy"] == "allkeys-lru"
        assert all(families[n].type == "gauge" for n in ("nvcache_remote_up", "nvcache_remote_keys"))


def test_metrics_with_a_dead_or_hung_server_stay_quick(tmp_path, no_remote_env, caplog):
    rs.require_binaries()
    s = rs.RedisServer(password="pw-metrics-secret").start()
    path = str(tmp_path / "c")
    LayerCache(path, 1).close()
    try:
        s.pause()  # SIGSTOP: connections are accepted, nothing answers
        collector = CacheCollector(path, load_tier(s.tcp_url, 0.2, backoff=0.3, max_backoff=0.3), s.tcp_url)
        try:
            times = []
            for _ in range(3):
                started = time.monotonic()
                got = {m.name: m.samples[0].value for m in collector.collect()}
                times.append(time.monotonic() - started)
                assert got["nvcache_up"] == 1 and got["nvcache_remote_up"] == 0
                assert "nvcache_remote_keys" not in got
            print("scrapes of a SIGSTOPped server: %s s" % ", ".join(f"{t:.3f}" for t in times))
            assert times[0] < 1.0  # one reply timeout (0.2 s), then the breaker skips the server
            assert max(times[1:]) < 0.15
            s.resume()
            time.sleep(0.4)  # past the breaker's backoff: the next scrape probes, and finds it back
            caplog.clear()
            with caplog.at_level("WARNING", logger="nvcache"):
                got = {m.name: m.samples[0].value for m in collector.collect()}
            assert got["nvcache_remote_up"] == 1 and got["nvcache_remote_keys"] == 0
            assert f"the remote tier at {redact(s.tcp_url)} answers again" in [r.getMessage() for r in caplog.records]
        finally:
            collector.close()
        s.kill()
        started = time.monotonic()
        result = run(["--path", path, "metrics", "--remote", s.tcp_url])
        assert time.monotonic() - started < 2
        assert result.exit_code == 0  # the cache's figures are there; the tier's absence is a gauge
        assert samples(result.stdout)["nvcache_remote_up"] == 0 and samples(result.stdout)["nvcache_up"] == 1
        assert result.stderr.count("\n") == 1 and "cannot reach the remote tier at redis://:***@" in result.stderr
        assert "pw-metrics-secret" not in result.stderr + result.stdout
    finally:
        s.cleanup()


def test_remote_stat_of_a_cluster_sums_its_masters(tmp_path, no_remote_env):
    """Every master is asked (redis-py sends INFO and DBSIZE to a single node unless told)."""
    rs.require_binaries()
    cluster = rs.RedisCluster3().start()
    try:
        with LayerCache(str(tmp_path / "node"), 16, remote=cluster.url) as cache:
            for digest in DIGESTS:
                assert cache.put(digest, incompressible(SIZE, digest))
            assert cache.remote_stats()["remote_puts"] == len(DIGESTS)
        sizes = []
        for node in cluster.nodes:
            with node.client() as c:
                sizes.append(c.dbsize())
                c.config_set("maxmemory", str(16 << 20))
                c.config_set("maxmemory-policy", "allkeys-lru")
        assert sum(sizes) == len(DIGESTS) and max(sizes) < len(DIGESTS)  # spread over the masters
        result = run(["remote-stat", "--remote", cluster.url, "--json"])
        assert result.exit_code == 0 and result.stderr == ""
        got = json.loads(result.stdout)
        assert (got["keys"], got["masters"], got["maxmemory"]) == (len(DIGESTS), 3, 3 * (16 << 20))
        assert got["maxmemory_policy"] == "allkeys-lru" and got["warning"] is None
        with cluster.nodes[1].client() as c:
            c.config_set("maxmemory-policy", "noeviction")
        result = run(["remote-stat", "--remote", cluster.url, "--json"])
        assert json.loads(result.stdout)["maxmemory_policy"] == "allkeys-lru,noeviction"
        assert "maxmemory-policy noeviction evicts nothing" in result.stderr
    finally:
        cluster.cleanup()


def test_remote_stat_of_a_single_master_cluster(no_remote_env):
    """redis-py returns a single node's INFO flat, not per node: still one master, its figures."""
    rs.require_binaries()
    node = rs.RedisServer(cluster=True).start()
    try:
        with node.client() as c:
            c.execute_command("CLUSTER ADDSLOTSRANGE", 0, 16383)
            deadline = time.monotonic() + 10
            while c.execute_command("CLUSTER INFO").get("cluster_state") != "ok":
                assert time.monotonic() < deadline, "the one-node cluster did not reach cluster_state:ok"
                time.sleep(0.05)
            c.set("a", "1")
            c.set("b", "2")
        result = run(["remote-stat", "--remote", f"redis+cluster://127.0.0.1:{node.port}", "--json"])
        assert result.exit_code == 0, result.stderr
        got = json.loads(result.stdout)
        assert (got["keys"], got["masters"], got["maxmemory_policy"]) == (2, 1, "noeviction")
        assert got["used_memory"] > 0
    finally:
        node.cleanup()
