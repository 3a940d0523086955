"""Many processes, PID namespaces, threads, fork and kill -9 on one cache directory."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from nvcache import CacheFull
from nvcache.cachedir import format_dir

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "worker.py")
sys.path.insert(0, HERE)
from worker import record_for  # noqa: E402


def run_workers(commands, env, timeout=120):
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in commands]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, err
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


def test_counters_are_exact_across_processes(Cache, cache_dir, core_env):
    args = ["mixed", cache_dir]
    cmds = [[sys.executable, WORKER, *args, str(seed), "1500", "400", "0.2"] for seed in range(6)]
    outs = run_workers(cmds, core_env)
    assert sum(o["wrong"] for o in outs) == 0
    with Cache(cache_dir, 0.2) as cache:
        stats = cache.stats()
        assert stats["cache_hits"] == sum(o["hits"] for o in outs)
        assert stats["cache_misses"] == sum(o["misses"] for o in outs)
        assert stats["record_total_size"] <= cache.max_bytes
        assert cache.verify() == []
        for rec in cache.cache_data()["cache_records"]:
            key = rec["layer_id"][: -len("_layer_file")]
            assert cache.get(key) == record_for(key)


def _unshare_works() -> bool:
    if not shutil.which("unshare"):
        return False
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True,
                              timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _unshare_works(), reason="unshare --pid --fork is refused here (needs root or user namespaces)")
def test_pid_namespaces_with_the_same_pid(Cache, cache_dir, core_env):
    """Scanner containers sharing a hostPath are each PID 1: LMDB's own locks would collide."""
    probe = subprocess.run(["unshare", "--pid", "--fork", sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, env=core_env, timeout=30)
    assert probe.stdout.strip() == "1"
    cmds = [["unshare", "--pid", "--fork", sys.executable, WORKER, "mixed", cache_dir, str(seed), "1500", "300",
             "0.15"] for seed in range(4)]
    cmds.append([sys.executable, WORKER, "mixed", cache_dir, "99", "1500", "300", "0.15"])
    outs = run_workers(cmds, core_env)
    assert [o["pid"] for o in outs[:4]] == [1, 1, 1, 1]
    assert sum(o["wrong"] for o in outs) == 0
    with Cache(cache_dir, 0.15) as cache:
        stats = cache.stats()
        assert stats["cache_hits"] == sum(o["hits"] for o in outs)
        assert stats["cache_misses"] == sum(o["misses"] for o in outs)
        assert cache.verify() == []


def test_threads_share_one_instance(make_cache):
    cache = make_cache(0.1)
    counts = []
    errors = []

    def work(seed):
        rng = random.Random(seed)
        hits = misses = 0
        try:
            for _ in range(400):
                key = f"sha256:{rng.randrange(150)}"
                got = cache.get(key)
                if got is None:
                    misses += 1
                    try:
                        cache.put(key, record_for(key))
                    except CacheFull:
                        pass
                else:
                    hits += 1
                    assert got == record_for(key)
                if rng.random() < 0.02:
                    cache.delete(key)
                if rng.random() < 0.01:
                    cache.stats()
        except BaseException as exc:  # reported below
            errors.append(exc)
        counts.append((hits, misses))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    stats = cache.stats()
    assert stats["cache_hits"] == sum(h for h, _ in counts)
    assert stats["cache_misses"] == sum(m for _, m in counts)
    assert cache.verify() == []


def test_fork_child_uses_inherited_instance(make_cache):
    cache = make_cache(1)
    cache.put("sha256:parent", b"from parent")
    for _ in range(3):
        assert cache.get("sha256:parent") == b"from parent"  # buffered in the parent
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child; reports through the pipe and exit status
        code = 1
        try:
            ok = cache.get("sha256:parent") == b"from parent" and cache.get("sha256:parent") is not None
            ok = ok and cache.put("sha256:child", b"from child")
            cache.close()
            os.write(w, b"ok" if ok else b"bad")
            code = 0
        except BaseException as exc:
            os.write(w, repr(exc).encode()[:200])
        os._exit(code)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    said = os.read(r, 300)
    os.close(r)
    assert status == 0 and said == b"ok", said
    assert cache.get("sha256:child") == b"from child"
    # 3 parent hits before the fork + 2 in the child + 1 now: the parent's buffer is not counted twice
    assert cache.stats()["cache_hits"] == 6
    assert cache.verify() == []


def test_fork_child_opens_its_own_cache_too(make_cache, cache_dir, Cache):
    cache = make_cache(1)
    cache.put("sha256:a", b"A")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            with Cache(cache_dir, 1) as mine:
                ok = mine.get("sha256:a") == b"A" and mine.put("sha256:b", b"B")
            ok = ok and cache.get("sha256:b") == b"B"
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert cache.get("sha256:b") == b"B" and cache.verify() == []


def test_acknowledged_puts_survive_kill_9(Cache, cache_dir, core_env):
    rng = random.Random(3)
    acked = {}
    for round_ in range(6):
        p = subprocess.Popen([sys.executable, WORKER, "writer", cache_dir, str(round_), "0.5"],
                             env=core_env, stdout=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(0.3, 0.8))
        p.send_signal(signal.SIGKILL)
        out, _ = p.communicate(timeout=30)
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2:  # a torn last line was never fully acknowledged
                acked[parts[0]] = int(parts[1])
    assert len(acked) > 50
    with Cache(cache_dir, 0.5) as cache:
        assert cache.verify() == []
        present = 0
        for key, size in acked.items():
            got = cache.get(key)
            if got is not None:  # evicted or deleted records may be gone, never wrong
                assert got == record_for(key, size)
                present += 1
        assert present > 0
        assert cache.stats()["record_total_size"] <= cache.max_bytes


def test_durable_cache_round_trip(make_cache):
    cache = make_cache(1, durable=True)
    assert cache.put("sha256:d", b"durable") and cache.get("sha256:d") == b"durable"
    assert cache.verify() == []


def test_buffer_is_applied_every_second_and_kill_loses_only_it(Cache, cache_dir, core_env):
    with Cache(cache_dir, 1) as cache:
        cache.put("sha256:hot", b"hot")
    p = subprocess.Popen([sys.executable, WORKER, "getter", cache_dir, "sha256:hot", "2.5"],
                         env=core_env, stdout=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()  # the getter is done and idle, not closed
        hits = json.loads(line)["hits"]
        with Cache(cache_dir, 1) as cache:
            seen = cache.stats()["cache_hits"]
        assert 0 < seen <= hits  # applied while active, without close or flush
    finally:
        p.kill()
        p.wait()
    with Cache(cache_dir, 1) as cache:
        assert cache.stats()["cache_hits"] == seen  # the kill lost only the unapplied tail
        (rec,) = cache.cache_data()["cache_records"]
        assert rec["reference_count"] == seen
        assert cache.verify() == []


def test_many_caches_many_paths(Cache, tmp_path):
    caches = [Cache(str(tmp_path / f"c{i}"), 0.01) for i in range(20)]
    for i, c in enumerate(caches):
        c.put("sha256:x", bytes([i]) * 10)
    for i, c in enumerate(caches):
        assert c.get("sha256:x") == bytes([i]) * 10
        c.close()


def test_rebuild_by_another_process_is_noticed(Cache, cache_dir, core_env):
    """Another process empties the cache (bad version file): this one reopens, never writes to the old file."""
    cache = Cache(cache_dir, 1)
    try:
        cache.put("sha256:before", b"old")
        with open(os.path.join(format_dir(cache_dir), "version"), "w") as f:
            f.write("garbage")
        code = ("import sys, nvcache\n"
                "c = nvcache.LayerCache(sys.argv[1], 1)\n"
                "assert len(c) == 0, len(c)\n"
                "c.put('sha256:other', b'new'); c.close()\n")
        subprocess.run([sys.executable, "-c", code, cache_dir], env=core_env, check=True, timeout=60)
        assert cache.put("sha256:after", b"mine")  # reopens on the rebuilt file first
        assert len(cache) == 2
        assert cache.get("sha256:other") == b"new" and cache.get("sha256:before") is None
        assert cache.stats()["record_count"] == 2 and cache.verify() == []
    finally:
        cache.close()
    with Cache(cache_dir, 1) as again:
        assert again.get("sha256:after") == b"mine"


def _threads_hammer(cache, n_threads, seconds, start=None):
    """Threads mixing get, put, len and stats on one instance; returns (errors, [(hits, misses)])."""
    errors, counts = [], []
    go = start or threading.Event()

    def work(seed):
        rng = random.Random(seed)
        hits = misses = 0
        go.wait(10)
        end = time.monotonic() + seconds
        try:
            while time.monotonic() < end:
                key = f"sha256:{rng.randrange(60)}"
                got = cache.get(key)
                if got is None:
                    misses += 1
                    try:
                        cache.put(key, record_for(key))
                    except CacheFull:
                        pass
                else:
                    hits += 1
                    assert got == record_for(key), key
                if rng.random() < 0.05:
                    len(cache)
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
        counts.append((hits, misses))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(n_threads)]
    for t in threads:
        t.start()
    if start is None:
        go.set()
    for t in threads:
        t.join(60)
    return errors, counts


def test_threads_racing_the_first_use_after_fork(make_cache):
    """Many threads of a forked child all find the inherited instance stale at once: one reopens."""
    cache = make_cache(0.1)
    cache.put("sha256:1", record_for("sha256:1"))
    for round_ in range(6):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child; reports through the pipe and exit status
            code = 1
            try:
                errors, counts = _threads_hammer(cache, 8, 0.3)
                if errors:
                    os.write(w, repr(errors[:3]).encode()[:400])
                else:
                    stats = cache.stats()
                    ok = stats["cache_hits"] >= sum(h for h, _ in counts) and cache.verify() == []
                    os.write(w, b"ok" if ok else repr(stats).encode())
                    code = 0 if ok else 1
            except BaseException as exc:
                os.write(w, repr(exc).encode()[:400])
            os._exit(code)
        os.close(w)
        _, status = os.waitpid(pid, 0)
        said = os.read(r, 500)
        os.close(r)
        assert said == b"ok" and os.WEXITSTATUS(status) == 0, (round_, said)
    assert cache.verify() == []
    assert cache.get("sha256:1") == record_for("sha256:1")


def test_threads_racing_a_rebuild_by_another_process(Cache, cache_dir, core_env):
    """Threads keep working while another process rebuilds the file again and again under them."""
    cache = Cache(cache_dir, 0.1)
    stop = threading.Event()
    rebuilds = []
    code = ("import os, sys, nvcache\n"
            "path = sys.argv[1]\n"
            "for i in range(int(sys.argv[2])):\n"
            "    os.unlink(os.path.join(nvcache.cachedir.format_dir(path), 'version'))\n"
            "    c = nvcache.LayerCache(path, 0.1); c.put('sha256:r%d' % i, b'x'); c.close()\n")

    def rebuild():
        while not stop.is_set():
            subprocess.run([sys.executable, "-c", code, cache_dir, "10"], env=core_env, check=True, timeout=60)
            rebuilds.append(10)

    try:
        t = threading.Thread(target=rebuild)
        t.start()
        try:
            errors, _ = _threads_hammer(cache, 6, 4.0)
        finally:
            stop.set()
            t.join(120)
        assert errors == [], errors[:3]
        assert sum(rebuilds) >= 10
        assert cache.verify() == []
        assert cache.put("sha256:last", b"z") and cache.get("sha256:last") == b"z"
    finally:
        cache.close()


def test_a_rebuild_elsewhere_is_seen_by_put_len_and_the_dump(Cache, cache_dir, core_env):
    """After another process rebuilt the cache, nothing here answers from the old file."""
    cache = Cache(cache_dir, 1)
    try:
        cache.put("sha256:kept", b"old")
        os.unlink(os.path.join(format_dir(cache_dir), "version"))
        code = ("import sys, nvcache\n"
                "with nvcache.LayerCache(sys.argv[1], 1) as c:\n"
                "    assert len(c) == 0, 'not rebuilt'\n"
                "    c.put('sha256:other', b'new')\n")
        subprocess.run([sys.executable, "-c", code, cache_dir], env=core_env, check=True, timeout=60)
        assert cache.put("sha256:kept", b"again") is True  # not answered from the old file
        assert len(cache) == 2
        names = sorted(r["layer_id"] for r in cache.cache_data()["cache_records"])
        assert names == ["sha256:kept_layer_file", "sha256:other_layer_file"]
        assert cache.get("sha256:kept") == b"again" and cache.verify() == []
    finally:
        cache.close()
