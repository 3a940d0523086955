"""pytest-benchmark microbenchmarks of nvcache's hot paths, with its peers in the same groups.

Each group holds one operation on 10k-record stores (2 KiB records) for both
nvcache cores and the peers, so ratios can be read off the table:

* ``get-hit`` / ``get-miss``: one get of a random present / absent key;
* ``put-evict``: one put into a full store (every put evicts one record);
* ``apply``: ``flush()`` writing the buffered accesses of N get-hits (nvcache only);
* ``dump``: ``cache_data()`` of 10k records (raw lmdb: a cursor walk; seed: parse its index).

Run::

    make bench                                                  # all, --benchmark-only
    .venv/bin/python -m pytest bench --benchmark-only --benchmark-group-by=group -k "get_hit"
    .venv/bin/python -m pytest bench --benchmark-disable -q     # smoke: each body runs once

Peers are the adapters of bench/compare.py (see there for what each one does).
"""

from __future__ import annotations

import itertools
import random
from typing import Any, Callable, List

import pytest

import compare

CORES = ["nvcache", "nvcache-py"]
PEERS = CORES + ["lmdb", "lmdb-nolock", "lmdb-nolock+flock", "diskcache-lru", "diskcache-default"]


def _keys(peer: Any, ids: List[int]) -> Callable[[], Any]:
    keys = [peer.key(compare.layer_id(i)) for i in ids]
    return itertools.cycle(keys).__next__


@pytest.mark.parametrize("name", PEERS + ["seed-json"])
def test_get_hit(benchmark: Any, stores: Callable[[str], Any], n_records: int, name: str) -> None:
    benchmark.group = f"get-hit ({n_records:,} records)"
    peer = stores(name)
    rng = random.Random(1)
    nxt = _keys(peer, [rng.randrange(n_records) for _ in range(4096)])
    get = peer.getter()
    benchmark(lambda: get(nxt()))
    assert get(nxt()) is not None
    peer.settle()


@pytest.mark.parametrize("name", PEERS)
def test_get_miss(benchmark: Any, stores: Callable[[str], Any], n_records: int, name: str) -> None:
    benchmark.group = f"get-miss ({n_records:,} records)"
    peer = stores(name)
    nxt = _keys(peer, [10 ** 9 + i for i in range(1024)])
    get = peer.getter()
    benchmark(lambda: get(nxt()))
    assert get(nxt()) is None
    peer.settle()


@pytest.mark.parametrize("n_gets", [100, 1000, 4000])
@pytest.mark.parametrize("name", CORES)
def test_apply(benchmark: Any, stores: Callable[[str], Any], n_records: int, name: str, n_gets: int) -> None:
    """flush() after ``n_gets`` get-hits on distinct records (4096 pending keys trigger it on their own)."""
    benchmark.group = f"apply: flush after {n_gets} get-hits"
    peer = stores(name)
    cache = peer.cache
    rng = random.Random(n_gets)
    get = cache.get
    suffix = "_" + compare.KIND
    present = [r["layer_id"][:-len(suffix)] for r in cache.cache_data()["cache_records"]]
    assert len(present) >= n_gets

    def setup() -> None:
        for lid in rng.sample(present, n_gets):
            get(lid)

    benchmark.pedantic(cache.flush, setup=setup, rounds=20, iterations=1, warmup_rounds=1)
    assert cache.stats()["cache_hits"] >= n_gets


@pytest.mark.parametrize("name", CORES + ["lmdb", "seed-json"])
def test_dump(benchmark: Any, stores: Callable[[str], Any], n_records: int, name: str) -> None:
    benchmark.group = f"dump ({n_records:,} records)"
    peer = stores(name)
    dump = peer.dumper()
    out = benchmark(dump)
    records = out["cache_records"] if isinstance(out, dict) else out
    assert len(records) == n_records


@pytest.mark.parametrize("name", PEERS)
def test_put_evict(benchmark: Any, stores: Callable[[str], Any], record_data: List[bytes], n_records: int,
                   name: str) -> None:
    benchmark.group = f"put-evict ({n_records:,} records, every put evicts one)"
    peer = stores(name)
    put = peer.evict_putter()
    fresh = (peer.key(compare.layer_id(3 * 10 ** 9 + i)) for i in itertools.count(PEERS.index(name) * 10 ** 7))
    data = itertools.cycle(record_data).__next__
    benchmark(lambda: put(next(fresh), data()))
    peer.settle()
    count = peer.count()
    assert count in (-1, n_records) or name.startswith("diskcache"), f"{name}: {count} records"
