"""Single-flight get_or_create (issue 14 item 1): one creator per name per node, over real
processes, threads, PID namespaces, exceptions, SIGKILL, a hung creator and real SIGINTs.

The creators append a line to a log file each time create() runs, so "create ran once" is
read from the file, whoever (process or thread) ran it.
"""

import hashlib
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional

import pytest

from nvcache.cachedir import FORMAT_DIR

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "flight_worker.py")
sys.path.insert(0, HERE)
from flight_worker import record_for  # noqa: E402
from test_sharing import _unshare_works  # noqa: E402 (the same probe of PID namespaces)

NAME = "sha256:" + "ab" * 32


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def creations(log: str) -> List[str]:
    try:
        with open(log) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


class Workers:
    """flight_worker processes started, made ready, released together and read back."""

    def __init__(self, env: Dict[str, str]) -> None:
        self.env = env
        self.procs: List[subprocess.Popen] = []

    def start(self, args: List[str], prefix: Optional[List[str]] = None) -> subprocess.Popen:
        proc = subprocess.Popen((prefix or []) + [sys.executable, WORKER] + [str(a) for a in args], env=self.env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read()
        self.procs.append(proc)
        return proc

    @staticmethod
    def go(*procs: subprocess.Popen) -> None:
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()

    @staticmethod
    def result(proc: subprocess.Popen, timeout: float = 60) -> Dict[str, Any]:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1])

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def workers(core_env):
    w = Workers(core_env)
    yield w
    w.close()


def wait_for(check, seconds: float = 20) -> None:
    end = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def threads_call(cache, name: str, create, n: int, wait: Optional[float] = None) -> List[Any]:
    out: List[Any] = []
    lock = threading.Lock()

    def call() -> None:
        try:
            got: Any = sha(cache.get_or_create(name, create, wait=wait))
        except Exception as exc:
            got = type(exc).__name__
        with lock:
            out.append(got)

    ts = [threading.Thread(target=call) for _ in range(n)]
    for t in ts:
        t.start()
    return [ts, out]


def join(pair: List[Any]) -> List[Any]:
    for t in pair[0]:
        t.join(60)
    return pair[1]


def test_threads_and_processes_create_once(make_cache, cache_dir, tmp_path, workers):
    """4 processes × 3 threads and 3 threads here ask for one missing name: one create, the same
    bytes for all, 1 miss and 14 hits, and 14 waits counted."""
    log = str(tmp_path / "log")
    cache = make_cache(4.0, compress=False)
    procs = [workers.start([cache_dir, NAME, "ok", 3, 1.0, log]) for _ in range(4)]

    def create() -> bytes:
        with open(log, "a") as f:
            f.write("here\n")
        time.sleep(1.0)
        return record_for(NAME)

    workers.go(*procs)
    mine = threads_call(cache, NAME, create, 3)
    outs = [workers.result(p) for p in procs]
    got = join(mine) + [r["outcome"] for o in outs for r in o["results"]]
    assert len(creations(log)) == 1
    assert got == [sha(record_for(NAME))] * 15
    stats = cache.stats()
    assert (stats["cache_misses"], stats["cache_hits"], stats["record_count"]) == (1, 14, 1)
    flights = cache.flight_stats()
    assert flights["waits"] == 14 and flights["takeovers"] == 0
    assert flights["wait_seconds"] > 0
    assert cache.verify() == []
    assert os.listdir(os.path.join(cache_dir, FORMAT_DIR, "claims")) == []  # the creator removed its claim
    from prometheus_client.parser import text_string_to_metric_families
    result = subprocess.run([sys.executable, "-m", "nvcache", "--path", cache_dir, "metrics"], env=workers.env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    samples = {s.name: s.value for fam in text_string_to_metric_families(result.stdout) for s in fam.samples}
    assert samples["nvcache_flight_waits_total"] == 14 and samples["nvcache_flight_takeovers_total"] == 0
    assert samples["nvcache_flight_wait_seconds_total"] == pytest.approx(flights["wait_seconds"])


def test_a_creator_that_raises_hands_over(make_cache, cache_dir, tmp_path, workers):
    """The creator's exception reaches its caller only; one waiter then creates; the rest hit."""
    log = str(tmp_path / "log")
    cache = make_cache(4.0, compress=False)
    bad = workers.start([cache_dir, NAME, "raise", 1, 0.8, log])
    good = [workers.start([cache_dir, NAME, "ok", 2, 0.3, log]) for _ in range(2)]
    workers.go(bad)
    wait_for(lambda: len(creations(log)) == 1)
    workers.go(*good)
    assert workers.result(bad)["results"][0]["outcome"] == "ValueError"
    outs = [r["outcome"] for p in good for r in workers.result(p)["results"]]
    assert outs == [sha(record_for(NAME))] * 4
    assert len(creations(log)) == 2
    stats = cache.stats()
    assert (stats["cache_misses"], stats["cache_hits"]) == (2, 3)  # two creators (one raised), three waiters
    flights = cache.flight_stats()
    assert flights["waits"] == 4 and flights["takeovers"] == 1


def test_a_killed_creator_is_taken_over_promptly(make_cache, cache_dir, tmp_path, workers):
    log = str(tmp_path / "log")
    cache = make_cache(4.0, compress=False)
    hung = workers.start([cache_dir, NAME, "hang", 1, 0, log])
    waiter = workers.start([cache_dir, NAME, "ok", 2, 0, log, 4.0, 30])
    workers.go(hung)
    wait_for(lambda: len(creations(log)) == 1)
    workers.go(waiter)
    time.sleep(0.5)  # the waiters are asleep on the claim
    assert waiter.poll() is None
    killed = time.monotonic()
    hung.send_signal(signal.SIGKILL)
    out = workers.result(waiter)
    took = time.monotonic() - killed
    assert [r["outcome"] for r in out["results"]] == [sha(record_for(NAME))] * 2
    assert took < 10, took  # far less than the 30 s wait: the kernel released the claim
    assert len(creations(log)) == 2
    assert cache.flight_stats()["takeovers"] == 1


def test_a_hung_creator_is_taken_over_after_the_wait(make_cache, cache_dir, tmp_path, workers):
    """Waiters stop after ``wait`` and create; a newcomer to a claim older than the wait does not
    wait it out again (the lease counts from the claim's start)."""
    log = str(tmp_path / "log")
    cache = make_cache(4.0, compress=False)
    hung = workers.start([cache_dir, NAME, "hang", 1, 0, log])
    before_claim = time.monotonic()
    workers.go(hung)
    wait_for(lambda: len(creations(log)) == 1)
    other = "sha256:" + "cd" * 32
    start = time.monotonic()
    got = cache.get_or_create(NAME, lambda: record_for(NAME), wait=1.0)
    assert got == record_for(NAME)
    assert time.monotonic() >= before_claim + 1.0  # it waited out the lease (from the claim's start)
    assert cache.flight_stats()["takeovers"] == 1
    cache.delete(NAME)
    start = time.monotonic()
    assert cache.get_or_create(NAME, lambda: record_for(NAME), wait=1.0) == record_for(NAME)
    assert time.monotonic() - start < 0.9  # the claim is older than the wait: no second wait
    assert cache.get_or_create(other, lambda: record_for(other), wait=1.0) == record_for(other)
    assert hung.poll() is None  # it still hangs, and held the claim all along
    stats = cache.flight_stats()
    assert stats["waits"] == 2 and stats["takeovers"] == 2


def test_a_record_too_large_to_store_reaches_every_waiter(make_cache, cache_dir, tmp_path, workers):
    """As documented: the creator hands the bytes it could not store to the waiters (other
    processes through the claim file, threads here directly); nobody creates it again."""
    log = str(tmp_path / "log")
    size = 200_000  # larger than the 0.1 MiB bound, stored raw
    cache = make_cache(0.1, compress=False)
    creator = workers.start([cache_dir, NAME, "ok", 1, 0.8, log, 0.1, 30, size])
    waiters = [workers.start([cache_dir, NAME, "ok", 2, 0.8, log, 0.1, 30, size]) for _ in range(2)]
    workers.go(creator)
    wait_for(lambda: len(creations(log)) == 1)
    workers.go(*waiters)
    mine = threads_call(cache, NAME, lambda: record_for(NAME, size), 2)
    outs = [r["outcome"] for p in [creator] + waiters for r in workers.result(p)["results"]] + join(mine)
    assert outs == [sha(record_for(NAME, size))] * 7
    assert len(creations(log)) == 1
    assert not cache.contains(NAME)
    stats = cache.stats()
    assert (stats["cache_misses"], stats["cache_hits"]) == (1, 6)


def test_create_must_return_bytes_and_arguments_are_checked(make_cache):
    cache = make_cache(1.0)
    with pytest.raises(TypeError, match="create"):
        cache.get_or_create(NAME, lambda: "text")
    assert not cache.contains(NAME)
    with pytest.raises(TypeError):
        cache.get_or_create(NAME, b"not callable")
    with pytest.raises(ValueError):
        cache.get_or_create("", lambda: b"x")
    with pytest.raises(TypeError):
        cache.get_or_create(NAME, lambda: b"x", keep="one string")
    with pytest.raises(ValueError):
        cache.get_or_create(NAME, lambda: b"x", wait=-1)
    with pytest.raises(TypeError):
        cache.get_or_create(NAME, lambda: b"x", wait="5")
    assert cache.get_or_create(NAME, lambda: memoryview(b"abc"), keep=[NAME]) == b"abc"
    assert cache.get(NAME) == b"abc"
    assert cache.get_or_create(NAME, lambda: pytest.fail("a hit never creates")) == b"abc"


def test_disabled_and_read_only_caches(Cache, cache_dir, make_cache):
    calls = []

    def create() -> bytes:
        calls.append(1)
        return b"rec"

    disabled = Cache(cache_dir, 0)
    assert disabled.get_or_create(NAME, create) == b"rec"
    assert disabled.flight_stats() is None and not os.path.exists(cache_dir)
    writer = make_cache(1.0)
    reader = make_cache(path=cache_dir, repair=False)
    assert reader.get_or_create(NAME, create) == b"rec"  # no claim, no put
    assert not writer.contains(NAME) and len(calls) == 2
    writer.put(NAME, b"stored")
    assert reader.get_or_create(NAME, create) == b"stored" and len(calls) == 2
    assert writer.stats()["cache_misses"] == 0  # a reader counts nothing


@pytest.mark.skipif(not _unshare_works(), reason="unshare --pid --fork is refused here (needs root or user namespaces)")
def test_pid_namespaces_create_once(make_cache, cache_dir, tmp_path, workers):
    """Three callers that are each PID 1 in their own namespace, and one outside: one create."""
    log = str(tmp_path / "log")
    cache = make_cache(4.0, compress=False)
    procs = [workers.start([cache_dir, NAME, "ok", 1, 0.8, log], ["unshare", "--pid", "--fork"]) for _ in range(3)]
    procs.append(workers.start([cache_dir, NAME, "ok", 1, 0.8, log]))
    workers.go(*procs)
    outs = [workers.result(p) for p in procs]
    assert [o["pid"] for o in outs[:3]] == [1, 1, 1]
    assert [r["outcome"] for o in outs for r in o["results"]] == [sha(record_for(NAME))] * 4
    assert len(creations(log)) == 1
    assert cache.stats()["cache_misses"] == 1 and cache.flight_stats()["waits"] == 3


def test_real_sigints_leave_no_claim_held(make_cache, cache_dir, core_env):
    """SIGINTs at random moments into a process looping get_or_create on fresh names, while a
    thread here asks for the same names: after every KeyboardInterrupt the process holds no claim
    (no in-process entry, no claim descriptor) and asks again without waiting for itself; the
    caller here never waits out its 10 s wait for an interrupted creator."""
    rng = random.Random(14)
    cache = make_cache(4.0)
    proc = subprocess.Popen([sys.executable, WORKER, "interrupt", cache_dir], env=core_env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        assert lines.get(timeout=60).strip() == "ready"
        interrupted = lost = 0
        for i in range(40):
            name = f"sha256:{i:064x}"
            proc.stdin.write(name + "\n")
            proc.stdin.flush()
            mine = threads_call(cache, name, lambda name=name: record_for(name), 1, wait=10)
            time.sleep(rng.uniform(0.0, 0.03))
            for _again in range(5):
                os.kill(proc.pid, signal.SIGINT)
                try:  # Python drops a KeyboardInterrupt raised inside a finaliser: then again
                    report = json.loads(lines.get(timeout=3))
                    break
                except queue.Empty:
                    lost += 1
            else:
                raise AssertionError(f"the target never reported after 5 SIGINTs; lost {lost}")
            assert join(mine) == [sha(record_for(name))]
            interrupted += report["where"] == "interrupted"
            assert report["held"] == 0 and report["claim_fds"] == [], report
            assert report["ok"] and report["again_s"] < 5, report
        assert interrupted >= 5  # the interrupts did land inside get_or_create
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
        assert cache.flight_stats()["wait_seconds"] < 40 * 5
        assert cache.verify() == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
