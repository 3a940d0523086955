"""The front's batch read and what each LayerCache keeps for itself when several share one path.

Both cores (the ``Cache`` fixture). The lock holder is a real process holding the directory's
exclusive flock and the readers table's writer flag, as a writer in a transaction does.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from nvcache import CacheError, CacheTimeout
from nvcache.cachedir import format_dir

from test_removal import LOCK_HOLDER  # a process holding the directory's flock and the writer flag

MiB = 1024 * 1024



def lid(i: int) -> str:
    return f"sha256:{i:064x}"


def test_get_many_returns_what_is_there_and_counts_like_gets(make_cache):
    cache = make_cache()
    for i in range(5):
        assert cache.put(lid(i), b"r%d" % i)
    cache.put(lid(2), b"s", kind="secrets")
    asked = [lid(i) for i in (0, 2, 4, 7, 9)]
    assert cache.get_many(asked) == {lid(0): b"r0", lid(2): b"r2", lid(4): b"r4"}
    assert cache.get_many([lid(2), lid(3)], kind="secrets") == {lid(2): b"s"}
    assert cache.get_many([]) == {}
    stats = cache.stats()
    assert (stats["cache_hits"], stats["cache_misses"]) == (4, 3)
    refs = {r["layer_id"]: r["reference_count"] for r in cache.cache_data()["cache_records"]}
    assert refs == {f"{lid(0)}_layer_file": 1, f"{lid(1)}_layer_file": 0, f"{lid(2)}_layer_file": 1,
                    f"{lid(3)}_layer_file": 0, f"{lid(4)}_layer_file": 1, f"{lid(2)}_secrets": 1}


def test_get_many_checks_every_id_before_reading(make_cache):
    cache = make_cache()
    cache.put(lid(1), b"r")
    with pytest.raises(TypeError):
        cache.get_many(lid(1))  # a single string would be read as characters
    with pytest.raises(ValueError):
        cache.get_many([lid(1), "bad id"])
    with pytest.raises(TypeError):
        cache.get_many([lid(1), 7])
    with pytest.raises(ValueError):
        cache.get_many([lid(1)], kind="Bad")
    assert cache.stats()["cache_hits"] == 0 and cache.stats()["cache_misses"] == 0  # nothing was read


def test_get_many_disabled_and_closed(Cache, cache_dir):
    disabled = Cache(cache_dir, 0)
    assert disabled.get_many([lid(1)]) == {}
    with pytest.raises(ValueError):
        disabled.get_many(["bad id"])
    cache = Cache(cache_dir, 1)
    cache.close()
    with pytest.raises(CacheError, match="closed"):
        cache.get_many([lid(1)])


def test_get_many_drops_a_damaged_record_as_a_miss(make_cache, cache_dir):
    cache = make_cache()
    cache.put(lid(1), b"good")
    cache.put(lid(2), b"rots")
    key = cache._core.record_key(lid(2), "layer_file")

    def rot(files, txn):  # flip the last byte of lid(2)'s bytes, keeping size and checksum
        first = bytes(txn.get(key + b"\0\0\0\0", None, files.index.dat))
        txn.put(key + b"\0\0\0\0", first[:-1] + bytes([first[-1] ^ 1]), db=files.index.dat)
    cache._store._write(rot, native=False)
    assert cache.get_many([lid(1), lid(2)]) == {lid(1): b"good"}
    assert lid(2) not in cache and cache.verify() == []
    assert (cache.stats()["cache_hits"], cache.stats()["cache_misses"]) == (1, 1)


def test_each_cache_on_a_shared_path_waits_its_own_lock_timeout(Cache, cache_dir, core_env):
    """Two caches on one path in one process share a store; a get, put or stats of the one
    with lock_timeout=0.2 gives up after about 0.2 s behind another process's write, although
    the first cache (opened first, so the store's lock) waits up to 30 s."""
    patient = Cache(cache_dir, 1, lock_timeout=30)
    hasty = Cache(cache_dir, 1, lock_timeout=0.2)
    patient.put(lid(1), b"r")
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, format_dir(cache_dir)], env=core_env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for call in (lambda: hasty.get(lid(1)), lambda: hasty.put(lid(2), b"x"), hasty.stats,
                     lambda: hasty.get_many([lid(1)]), lambda: hasty.delete(lid(1)), hasty.cache_data):
            t0 = time.monotonic()
            with pytest.raises(CacheTimeout):
                call()
            assert time.monotonic() - t0 < 5, "waited the other cache's lock_timeout"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert hasty.get(lid(1)) == b"r" and patient.get(lid(1)) == b"r"  # the lock is free again
    hasty.close()
    patient.close()


def test_a_second_cache_with_a_larger_bound_makes_it_the_caches(Cache, cache_dir, caplog):
    """Two caches of one path in one process share a store: the second's larger bound becomes the
    cache's bound (logged with both values), both obey it, and the map grows to hold it."""
    from nvcache import writemap
    small = Cache(cache_dir, 1)
    small.put(lid(1), b"r")
    big_mb = 20_000
    with caplog.at_level("WARNING", logger="nvcache"):
        big = Cache(cache_dir, big_mb)
    try:
        assert "bound changed from 1 MiB to 20000 MiB" in caplog.text
        assert small.max_bytes == big.max_bytes == big_mb * MiB
        for i in range(40):  # 80 MiB: more than the first map holds
            assert small.put(lid(100 + i), os.urandom(2 * MiB))  # larger than the old bound
        assert big.get(lid(1)) == b"r" and small.get(lid(1)) == b"r"
        length = os.path.getsize(os.path.join(format_dir(cache_dir), "data.mdb"))
        assert 80 * MiB < length <= writemap.map_limit(big_mb * MiB)
        assert big.verify() == [] and small.stats()["record_count"] == 41
    finally:
        big.close()
        small.close()
