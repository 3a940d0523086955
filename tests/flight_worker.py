"""Processes for tests/test_single_flight.py: ``python tests/flight_worker.py PATH NAME MODE THREADS SLEEP LOG
[MAX_MB [WAIT [SIZE]]]``.

Each of THREADS threads calls ``get_or_create(NAME, create, wait=WAIT)`` once, after the test
writes ``go`` on stdin (the process prints ``ready`` first, so that every caller starts at once).
``create`` appends a line (pid, thread) to LOG, sleeps SLEEP seconds, then per MODE: ``ok``
returns the record, ``raise`` raises ValueError, ``hang`` sleeps an hour (the test kills it).
The record is a deterministic function of NAME and SIZE, so any caller can be checked. Prints
one JSON line: each call's outcome (the record's sha256 or the exception's name) and time.
``interrupt``: the SIGINT campaign's target (see test_single_flight.py).
"""

import hashlib
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Dict, List

import nvcache
from nvcache import flight


def record_for(name: str, size: int = 3000) -> bytes:
    return hashlib.shake_256(name.encode()).digest(size)


def logged_create(log: str, name: str, mode: str, sleep: float, size: int) -> Any:
    def create() -> bytes:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{os.getpid()} {threading.get_ident()}\n".encode())
        finally:
            os.close(fd)
        time.sleep(sleep)
        if mode == "raise":
            raise ValueError("the analysis failed")
        if mode == "hang":
            time.sleep(3600)
        return record_for(name, size)
    return create


def callers(path: str, name: str, mode: str, threads: int, sleep: float, log: str, max_mb: float,
            wait: float, size: int) -> Dict[str, Any]:
    results: List[Dict[str, Any]] = []
    lock = threading.Lock()
    with nvcache.LayerCache(path, max_mb, compress=False) as cache:
        cache.contains(name)  # opened (and the cache created) before the start
        print("ready", flush=True)
        sys.stdin.readline()

        def call() -> None:
            start = time.monotonic()
            try:
                got = cache.get_or_create(name, logged_create(log, name, mode, sleep, size), wait=wait)
                outcome = hashlib.sha256(got).hexdigest()
            except Exception as exc:
                outcome = type(exc).__name__
            with lock:
                results.append({"outcome": outcome, "seconds": time.monotonic() - start})

        workers = [threading.Thread(target=call) for _ in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
    return {"pid": os.getpid(), "results": results}


def interrupt_target(path: str) -> None:
    """Loop get_or_create over names given on stdin under the default SIGINT handler; after each
    KeyboardInterrupt report whether this process still holds anything of the claim machinery."""
    cache = nvcache.LayerCache(path, 4.0)
    # Ignored until a name is read: a SIGINT that lands while this process still waits for its
    # name (a loaded machine) would otherwise end it inside sys.stdin; the test sends it again.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print("ready", flush=True)
    for line in sys.stdin:
        name = line.strip()
        if not name:
            break
        called = False
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:  # one SIGINT per name lands inside the call or in the sleep after it
            cache.get_or_create(name, lambda: (time.sleep(0.02), record_for(name))[1], wait=10)
            called = True
            time.sleep(60)
        except KeyboardInterrupt:
            pass
        # The test sends it again when Python dropped it (raised in a finaliser): ignored from here.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        held = [k for k, local in list(flight._table.items()) if local.users or local.lock._is_owned()]
        # A waiter that gave up leaves its helper thread blocked in flock on its own duplicate of
        # the descriptor until the creator (the test's thread, done within milliseconds) lets go:
        # by design (flight._Handoff). Those descriptors end with their threads; any other, or a
        # helper still there after 5 s, is a leak the test reports.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(t.name == "nvcache-claim-wait" for t in threading.enumerate()):
            time.sleep(0.005)
        fds = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                fds.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
        claims = [f for f in fds if "/claims/" in f]
        start = time.monotonic()  # nothing held: the same name again never waits for ourselves
        got = cache.get_or_create(name, lambda: record_for(name), wait=10)
        print(json.dumps({"where": "after" if called else "interrupted", "held": len(held), "claim_fds": claims,
                          "ok": got == record_for(name), "again_s": time.monotonic() - start}), flush=True)
    cache.close()


if __name__ == "__main__":
    if sys.argv[1] == "interrupt":
        interrupt_target(sys.argv[2])
        sys.exit(0)
    path, name, mode, threads, sleep, log = sys.argv[1:7]
    max_mb = float(sys.argv[7]) if len(sys.argv) > 7 else 4.0
    wait = float(sys.argv[8]) if len(sys.argv) > 8 else 30.0
    size = int(sys.argv[9]) if len(sys.argv) > 9 else 3000
    print(json.dumps(callers(path, name, mode, int(threads), float(sleep), log, max_mb, wait, size)), flush=True)
