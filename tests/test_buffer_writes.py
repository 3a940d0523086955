"""A reading process's buffered references reach the file after K writes by others, not after 1 s.

Issue 15 item 1 (the ``mixed`` trace of bench/fidelity.py): a process that only reads buffers
its references, and other processes' puts choose their victims without them. The buffer is
therefore also due once the file has committed ``max_writes`` write transactions since the
snapshot that its oldest pending access read (lifecycle.writes_due: max(8, records // 16,
2 x processes reading)).
The reader here never reaches the buffer's age limit (set to ~17 minutes in the child), so
only the writes can make it apply.
"""

import json
import subprocess
import sys

from nvcache import lifecycle

K = 8  # lifecycle.writes_due(records, processes) for fewer than 256 records and 4 processes

READER = r"""
import json, sys
from nvcache import lifecycle
lifecycle.APPLY_AFTER_NS = 10**12  # never due by age in this test: only by keys or writes
import nvcache
cache = nvcache.LayerCache(sys.argv[1], 1.0)
store = cache._store
for line in sys.stdin:
    if line.strip() == "quit":
        break
    got = cache.get("sha256:hot")
    buf = store.buffer
    print(json.dumps({"hit": got is not None, "pending": len(buf), "first_txn": getattr(buf, "first_txn", None),
                      "last_txn": getattr(store.reader, "last_txn", None),
                      "max_writes": getattr(buf, "max_writes", None)}), flush=True)
cache.close()
"""


def _refs(cache, layer_id):
    for rec in cache.cache_data()["cache_records"]:
        if rec["layer_id"] == f"{layer_id}_layer_file":
            return rec["reference_count"]
    raise AssertionError(f"{layer_id} is not in the cache")


def test_a_readers_references_reach_the_file_after_k_writes(Cache, cache_dir, core_env):
    with Cache(cache_dir, 1.0) as writer:
        writer.put("sha256:hot", b"h" * 300)
        base = _refs(writer, "sha256:hot")
        reader = subprocess.Popen([sys.executable, "-c", READER, cache_dir], env=core_env, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            def read():
                reader.stdin.write("get\n")
                reader.stdin.flush()
                line = reader.stdout.readline()
                assert line, reader.stderr.read()
                return json.loads(line)

            first = read()
            assert first["hit"] and first["pending"] == 1
            for n in range(K - 1):  # K - 1 write transactions (each put of a new record is one)
                writer.put(f"sha256:w{n}", b"w" * 200)
            second = read()
            assert second["pending"] == 1  # not due yet
            assert _refs(writer, "sha256:hot") == base
            writer.put("sha256:wK", b"w" * 200)  # the K-th
            third = read()
            assert _refs(writer, "sha256:hot") == base + 3  # well before the reader's 1 s (here: 17 min)
            assert third["pending"] == 0  # due at this get, applied right after it
            assert first["max_writes"] == K == lifecycle.writes_due(0, 2)
            assert second["last_txn"] - second["first_txn"] == K - 1  # (the writes were the puts alone)
            fourth = read()  # a new batch starts from this snapshot
            assert fourth["pending"] == 1 and fourth["first_txn"] == fourth["last_txn"] > third["last_txn"]
            reader.stdin.write("quit\n")
            reader.stdin.flush()
            assert reader.wait(60) == 0, reader.stderr.read()
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait()
            for f in (reader.stdin, reader.stdout, reader.stderr):
                f.close()
        assert _refs(writer, "sha256:hot") == base + 4  # the close wrote the last one


def test_the_write_limit_follows_the_record_count(make_cache):
    """max_writes = max(8, records // 16, 2 x processes reading), refreshed whenever the buffer is applied."""
    cache = make_cache(4.0)
    store = cache._store
    assert store.buffer.max_writes == 8
    for i in range(100):
        cache.put(f"sha256:{i}", b"%d" % i * 20)
    cache.get("sha256:1")
    cache.flush()
    assert store.buffer.max_writes == 8  # 100 // 16 = 6 < 8
    for i in range(100, 330):
        cache.put(f"sha256:{i}", b"%d" % i * 20)
    cache.get("sha256:1")
    cache.flush()
    assert store.buffer.max_writes == lifecycle.writes_due(330, 1) == 20
    assert lifecycle.writes_due(330, 12) == 24  # 12 processes reading: their applies alone never keep it due


SPINNER = r"""
import sys, time
import nvcache
cache = nvcache.LayerCache(sys.argv[1], 1.0)
print("ready", flush=True)
sys.stdin.readline()
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    for i in range(30):
        cache.get("sha256:hot%d" % i)
cache.close()
"""


def test_readers_alone_do_not_keep_each_other_due(make_cache, cache_dir, core_env):
    """Processes that only read: every apply is a write transaction the others count, so a write
    limit at or below the number of readers let their applies keep each other due (the review
    measured 1,961 writes in 4 s from 12 readers, 48 without the rule). With the limit at twice
    the readers, each reader applies about once a second (its age limit)."""
    writer = make_cache(1.0)
    for i in range(30):
        writer.put(f"sha256:hot{i}", b"h" * 300)
    writer.flush()
    readers, seconds = 10, 2.0
    procs = [subprocess.Popen([sys.executable, "-c", SPINNER, cache_dir, str(seconds)], env=core_env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(readers)]
    try:
        assert all(p.stdout.readline().strip() == "ready" for p in procs)
        before = writer._store.files.env.info()["last_txnid"]
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        assert all(p.wait(120) == 0 for p in procs)
        writes = writer._store.files.env.info()["last_txnid"] - before
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stdin.close()
            p.stdout.close()
    # each reader: about one apply a second, one at its close, and one when it first joins
    assert writes <= readers * (seconds + 3), writes
    assert writer.stats()["cache_hits"] > readers * 30  # they did read
