"""The fleet simulation (``nvcache simulate --nodes N``): the duplicate rule, the split of the plan,
and real runs of every mode over node directories sharing a real redis-server."""

import json
import os
from typing import Any, Dict

import pytest
from click.testing import CliRunner

from nvcache import redislocal, simfleet
from nvcache import simulate as sim
from nvcache.cli import cli

import redisservers

HERE, PEER, REMOTE = simfleet.HELD_HERE, simfleet.HELD_PEER, simfleet.HELD_REMOTE


# -- the rules ---------------------------------------------------------------------------------
def test_duplicated_counts_overlaps_in_scope_and_held_records():
    # (layer, start, end, node, probe flags)
    a = [(7, 0, 10, 0, 0),       # the first analysis of layer 7
         (7, 5, 12, 0, 0),       # same node, while the first ran: a duplicate on the node
         (7, 6, 9, 1, 0),        # another node while both ran: a duplicate only fleet-wide
         (7, 20, 30, 1, PEER),   # node 0 held it: a duplicate only fleet-wide
         (7, 40, 50, 0, 0),      # nothing held, nothing running (evicted since): no duplicate
         (8, 0, 10, 0, HERE),    # its own node held it: a duplicate everywhere
         (9, 3, 4, 1, REMOTE)]   # the tier held it
    assert simfleet.duplicated(a, fleet_scope=False, held_mask=HERE) == 2
    assert simfleet.duplicated(a, fleet_scope=True, held_mask=HERE | REMOTE) == 4
    assert simfleet.duplicated(a, fleet_scope=True, held_mask=HERE | PEER | REMOTE) == 5
    assert simfleet.duplicated([], True, 7) == 0
    # Back to back is not an overlap: the second starts when the first's record is stored.
    assert simfleet.duplicated([(1, 0, 5, 0, 0), (1, 5, 9, 0, 0)], True, 0) == 0


def test_a_report_never_shows_the_password():
    assert simfleet.public_url("redis://:s3cret@10.0.0.1:6379/0") == "redis://***@10.0.0.1:6379/0"
    assert simfleet.public_url("rediss://user:pw@h:1") == "rediss://***@h:1"
    assert simfleet.public_url("unix:///run/redis.sock?password=s3cret") == "unix:///run/redis.sock"
    assert simfleet.public_url("redis://h:6379/0") == "redis://h:6379/0"


def test_the_plan_is_split_over_the_nodes():
    assert simfleet.node_scans((3, 1, 4, 1, 5, 9, 2), 3) == ((3, 1, 2), (1, 5), (4, 9))
    assert simfleet.node_processes(7, 3) == [3, 2, 2]
    assert simfleet.node_processes(2, 3) == [1, 1, 1]  # at least one scanner per node


# -- real runs ---------------------------------------------------------------------------------
ARGS: Dict[str, Any] = dict(images=10, layers=60, scans=90, max_mb=0.02, seed=1, fixed_us=300, us_per_kib=20)


def _planned_accesses(nodes: int) -> int:
    cat = sim.build_catalogue(ARGS["images"], ARGS["layers"], ARGS["seed"])
    return sum(len(cat.images[i]) for i in sim.plan_scans(cat, ARGS["scans"], ARGS["seed"]))


@pytest.fixture(scope="module")
def redis_server() -> Any:
    redisservers.require_binaries()
    server = redisservers.RedisServer(config={"maxmemory": "64mb", "maxmemory-policy": "allkeys-lru"}).start()
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def fleet(redis_server: Any, tmp_path_factory: Any) -> simfleet.FleetResult:
    """One run of every mode on 2 nodes with 2 scanners each, the tier on the suite's server."""
    root = str(tmp_path_factory.mktemp("fleet"))
    return simfleet.run_fleet(root, nodes=2, processes=4, remote=redis_server.unix_url, **ARGS)


def test_every_mode_ran_the_same_scans_and_its_counts_add_up(fleet: simfleet.FleetResult, redis_server: Any):
    assert [m.mode for m in fleet.modes] == list(simfleet.MODES) and not fleet.skipped
    planned = _planned_accesses(2)
    assert fleet.processes == [2, 2]
    for m in fleet.modes:
        assert m.scans_done == ARGS["scans"] and not m.stopped_by_deadline
        assert m.accesses == planned
        if m.mode == "none":
            assert m.analyses == m.accesses and m.duplicated is None and m.time_saved_s == 0
            continue
        assert m.local_hits + m.remote_hits + m.analyses == m.accesses  # every access ends one way
        assert (m.counter_hits, m.counter_misses) == (m.local_hits + m.remote_hits, m.analyses)  # the caches agree
        assert m.wrong_records == 0 and m.errors == 0
        assert 0 <= m.duplicated <= m.fleet_duplicated <= m.analyses
        assert m.layers_analysed <= ARGS["layers"] and m.analyses >= m.layers_analysed
        assert 0 < m.optimum_byte_hit_ratio <= 1 and m.evictions > 0  # the bound is below the catalogue
        assert m.analysis_no_cache_s > m.analysis_run_s > 0
    with redis_server.client() as c:
        assert c.dbsize() == 0  # the run removed its keys from a server it was given


def test_single_flight_and_the_remote_tier_save_analyses(fleet: simfleet.FleetResult):
    none, node, flight, remote = fleet.modes
    assert node.analyses < none.analyses
    assert flight.duplicated <= node.duplicated  # one creator per node
    assert flight.flight_waits >= 0 and node.flight_waits == 0
    # Shared layers (bases, stacks) are analysed on every node without the tier, about once with it.
    assert remote.analyses < node.analyses and remote.analyses < flight.analyses
    assert remote.analyses / remote.layers_analysed < node.analyses / node.layers_analysed
    assert remote.fleet_duplicated < node.fleet_duplicated
    assert remote.remote_hits > 0 and 0 < remote.remote_hit_ratio <= 1
    assert node.remote_hits == flight.remote_hits == 0 and not node.remote_stats
    rs = remote.remote_stats
    assert rs["remote_hits"] == remote.remote_hits and rs["remote_errors"] == 0
    assert rs["fleet_claims"] >= remote.analyses - rs["fleet_takeovers"] > 0


def test_without_redis_server_the_remote_mode_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(redislocal, "available", lambda: None)
    r = simfleet.run_fleet(str(tmp_path), nodes=2, processes=2, modes=("none", "remote"), **ARGS)
    assert [m.mode for m in r.modes] == ["none"]
    assert "redis-server is not installed" in r.skipped["remote"]


def test_the_cli_compares_the_modes_with_a_private_server(tmp_path):
    redisservers.require_binaries()
    root = tmp_path / "fleet"
    args = ["--path", str(root), "simulate", "--nodes", "2", "-p", "2", "--images", "8", "--layers", "40",
            "--scans", "40", "--max-mb", "0.02", "--analysis-us", "200", "--us-per-kib", "10", "--no-progress"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = result.output
    for label in simfleet.LABELS.values():
        assert label in out
    assert "a private redis-server (maxmemory 64 MiB, allkeys-lru)" in out
    assert "warning" not in out and "skipped" not in out
    # Its server is gone: killed, its socket removed (the directory stays with the run's caches).
    assert not os.path.exists(root / "redis" / "redis.sock")
    assert sorted(os.listdir(root)) == ["flight", "node", "redis", "remote"]


def test_the_cli_uses_a_given_server_and_prints_json(tmp_path, redis_server):
    args = ["simulate", "--nodes", "2", "-p", "2", "--images", "8", "--layers", "40", "--scans", "30",
            "--max-mb", "0.02", "--analysis-us", "200", "--us-per-kib", "10", "--no-progress", "--json",
            "--remote", redis_server.unix_url, "--path", str(tmp_path / "fleet")]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [m["mode"] for m in doc["modes"]] == list(simfleet.MODES)
    assert doc["remote_url"] == redis_server.unix_url and not doc["remote_private"]
    for m in doc["modes"][1:]:
        assert m["accesses"] == m["counter_hits"] + m["counter_misses"] == m["local_hits"] + m["remote_hits"] + m["analyses"]
    assert doc["modes"][3]["analyses"] < doc["modes"][1]["analyses"]
    with redis_server.client() as c:
        assert c.dbsize() == 0


def test_remote_needs_nodes():
    result = CliRunner().invoke(cli, ["simulate", "--remote", "redis://127.0.0.1:1/0", "--no-progress"])
    assert result.exit_code == 2 and "--remote needs --nodes" in result.output
