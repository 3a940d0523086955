"""The process that test_interrupt.py interrupts: ``python tests/interrupt_worker.py MODE PATH SEED``.

``worker``: gets, puts (with evictions), deletes and the other calls in a loop on a 1 MiB cache,
under the default SIGINT handler. Before each SIGINT the test writes a command line to stdin
(``probe``, ``close`` or ``stop``); after each KeyboardInterrupt the worker reads it and reports
one JSON line: where the interrupt landed and whether the locks were left released (another
thread's call, a fresh descriptor's flock, the readers table's writer flag, this thread's next
calls). ``close`` closes both caches first (close must not raise) and opens new ones; ``stop``
closes them and ends with a last line listing every acknowledged put.

``neighbour``: another process's gets and writes (deletes, flushes: writes that evict nothing) on
the same cache with a 1 s lock timeout until the file ``PATH.stop`` appears; it reports its
timeouts and errors.

With ``--unstick`` (only for measuring code without the fix) a worker whose locks stayed held
releases them by hand and goes on, so that every interrupt of the campaign is counted.
"""

import faulthandler
import fcntl
import json
import os
import random
import signal
import sys
import threading
import time
import traceback

import nvcache
from nvcache import CacheError, CacheTimeout, readertable
from nvcache.cachedir import format_dir

PACKAGE = os.path.dirname(os.path.abspath(nvcache.__file__))
MAX_MB = 1.0
KEEPER = 600  # bytes of an acknowledged record (never evicted: every put keeps them)


def record_for(key: str, size: int) -> bytes:
    raw = (key + "|").encode()
    return (raw * (size // len(raw) + 1))[:size]


def _held_by_others(check, seconds: float = 0.5) -> bool:
    """True when ``check()`` stays False for ``seconds`` (a neighbour holds a lock only briefly)."""
    end = time.monotonic() + seconds
    while True:
        if check():
            return False
        if time.monotonic() >= end:
            return True
        time.sleep(0.002)


class Worker:
    def __init__(self, path: str, seed: int, unstick: bool) -> None:
        self.path = path
        self.rng = random.Random(seed)
        self.unstick = unstick
        self.keepers: list = []  # acknowledged: put returned True
        self.keep = frozenset()
        self.churn = [f"sha256:churn{i:04d}" for i in range(60)]
        self.n = 0
        self._open()

    def _open(self) -> None:
        self.cache = nvcache.LayerCache(self.path, MAX_MB, lock_timeout=2.0)
        self.probe = nvcache.LayerCache(self.path, MAX_MB, lock_timeout=0.5)  # same store, short wait

    def one_op(self) -> None:
        rng, cache = self.rng, self.cache
        r = rng.random()
        if r < 0.35:
            cache.get(rng.choice(self.churn))
        elif r < 0.60:
            key = rng.choice(self.churn)
            try:
                cache.put(key, record_for(key, rng.randrange(2000, 40000)), keep=self.keep)
            except nvcache.CacheFull:
                pass
        elif r < 0.66 and len(self.keepers) < 200 and rng.random() < 0.2:
            self.n += 1
            key = f"sha256:keeper{os.getpid()}-{self.n:06d}"
            if cache.put(key, record_for(key, KEEPER), keep=self.keep):
                self.keepers.append(key)
                self.keep = frozenset(self.keepers)
        elif r < 0.76:
            cache.delete(rng.choice(self.churn))
        elif r < 0.82:
            cache.get_many(rng.sample(self.churn, 5))
        elif r < 0.88:
            rng.choice(self.churn) in cache
        elif r < 0.92:
            cache.flush()
        elif r < 0.95:
            cache.stats()
        elif r < 0.98:
            len(cache)
        else:
            cache.cache_data()

    def _store(self):
        return self.cache._store

    def check(self) -> dict:
        """Whether the locks were left released, seen from another thread, another descriptor, the table."""
        out: dict = {}
        box: dict = {}

        def other_thread() -> None:  # a leaked mutex makes another thread's calls time out
            try:
                self.probe.get(self.churn[0])
                self.probe.put(f"sha256:thread{self.rng.randrange(10**9)}", b"x" * 100, keep=self.keep)
                box["ok"] = True
            except CacheTimeout as exc:
                box["err"] = f"CacheTimeout: {exc}"
            except BaseException as exc:  # reported, not raised: the campaign goes on
                box["err"] = repr(exc)
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        if "err" in box:
            out["thread"] = box["err"]
        fd = os.open(format_dir(self.path), os.O_RDONLY | os.O_DIRECTORY)  # the lock: the format directory
        try:
            def free() -> bool:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False
                fcntl.flock(fd, fcntl.LOCK_UN)
                return True
            if _held_by_others(free):
                out["flock"] = "the directory's flock stayed held"
        finally:
            os.close(fd)
        try:
            tfd = os.open(os.path.join(format_dir(self.path), readertable.READERS_FILE), os.O_RDONLY)
        except FileNotFoundError:
            tfd = -1
        if tfd >= 0:
            try:
                if _held_by_others(lambda: os.pread(tfd, 1, readertable.FLAG_OFFSET) == b"\0"):
                    out["flag"] = "the readers table's writer flag stayed raised"
            finally:
                os.close(tfd)
        try:  # and this thread's own next calls
            self.probe.get(self.churn[1])
            self.probe.put(f"sha256:main{self.rng.randrange(10**9)}", b"y" * 100, keep=self.keep)
        except BaseException as exc:
            out["main"] = f"{type(exc).__name__}: {exc}"
        return out

    def force_release(self, store=None) -> None:
        """Measurement only (--unstick): release by hand what an interrupted call left held."""
        store = store or self._store()
        lock = store.lock
        files = store.files
        if files is not None:
            try:
                files.writer.abort()
            except Exception:
                pass
            files.table.leave_write()
        try:
            fcntl.flock(lock.fd, fcntl.LOCK_UN)
        except OSError:
            pass
        mutex = lock.mutex
        while True:
            try:
                mutex.release()
            except RuntimeError:
                break

    def interrupted(self, exc: BaseException) -> dict:
        frames = traceback.extract_tb(exc.__traceback__)
        ours = [f for f in frames if f.filename.startswith(PACKAGE)]
        report = {"inside": bool(ours),
                  "where": f"{os.path.basename(ours[-1].filename)}:{ours[-1].lineno} {ours[-1].name}" if ours else ""}
        command = sys.stdin.readline().strip()
        if command in ("close", "stop"):
            old = self._store()
            try:
                self.cache.close()
                self.probe.close()
            except BaseException as exc2:
                report["close"] = repr(exc2)
            if command == "stop":
                report["stopping"] = True
                return report
            try:
                self._open()
            except CacheError as exc2:
                report["reopen"] = f"{type(exc2).__name__}: {exc2}"
                if not self.unstick:
                    raise
                self.force_release(old)
                self._open()
        problems = self.check()
        if problems:
            report["stuck"] = problems
            if self.unstick:
                self.force_release()
                report["after_unstick"] = self.check()
        return report

    def run(self) -> None:
        errors: list = []
        pending = json.dumps({"ready": os.getpid()})
        stopping = False
        while not stopping:
            try:
                # Printed inside the try: the test sends the next SIGINT only after reading this line.
                line, pending = pending, None
                print(line, flush=True)
                while True:
                    try:
                        self.one_op()
                    except CacheError as exc:  # e.g. a timeout behind a stuck lock (the probe counts those)
                        errors.append(f"{type(exc).__name__}: {exc}")
            except KeyboardInterrupt as exc:
                report = self.interrupted(exc)
                stopping = report.pop("stopping", False)
                pending = json.dumps(report)
        print(pending, flush=True)
        print(json.dumps({"keepers": self.keepers, "errors": len(errors), "first_errors": errors[:5]}),
              flush=True)


def neighbour(path: str, seed: int) -> None:
    rng = random.Random(seed)
    stop = path.rstrip("/") + ".stop"
    ops = timeouts = 0
    errors: list = []
    with nvcache.LayerCache(path, MAX_MB, lock_timeout=1.0) as cache:
        while not os.path.exists(stop):
            try:
                cache.get(f"sha256:churn{rng.randrange(60):04d}")
                cache.delete(f"sha256:absent{rng.randrange(1000)}")  # a write transaction, evicting nothing
                if rng.random() < 0.1:
                    cache.flush()
                ops += 1
            except CacheTimeout as exc:
                timeouts += 1
                errors.append(str(exc))
            except CacheError as exc:
                errors.append(repr(exc))
            time.sleep(0.0005)
    print(json.dumps({"ops": ops, "timeouts": timeouts, "errors": errors[:10]}), flush=True)


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1)  # the test dumps a hung worker's stacks
    # A program with Python's Ctrl-C handling, whatever it inherited: Python leaves SIGINT ignored
    # when it was ignored at exec (a background job of a non-interactive shell, as CI may run
    # the suite), and the campaign's signals would then never reach the worker.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    mode, path, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "worker":
        Worker(path, seed, "--unstick" in sys.argv).run()
    elif mode == "neighbour":
        neighbour(path, seed)
    else:
        raise SystemExit(f"unknown mode {mode}")
