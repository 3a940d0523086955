"""Wake-up latency of get_or_create's waiters (issue 14 item 1).

One creator (this process) holds a name's claim; WAITERS processes (each with THREADS threads)
ask for the same name meanwhile and sleep on the claim. The latency is from the moment create()
returned its bytes in the creator to the moment each waiter's get_or_create returned them: the
creator's put, its unlink and unlock, the kernel's wake-up and the waiter's read of the record.
CLOCK_REALTIME stamps, one machine. ``python bench/flight.py [ROUNDS] [WAITERS] [THREADS] [--core py]``.
"""

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from typing import Any, List


def waiter(path: str, threads: int, start: Any, stamps: Any, no_ext: bool) -> None:
    if no_ext:
        os.environ["NVCACHE_NO_EXTENSIONS"] = "1"
    import nvcache
    cache = nvcache.LayerCache(path, 64)
    while True:
        name = start.get()
        if name is None:
            break
        out: List[int] = []

        def call() -> None:
            cache.get_or_create(name, lambda: b"never: the creator holds the claim", wait=30)
            out.append(time.time_ns())

        ts = [threading.Thread(target=call) for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        stamps.put(out)
    cache.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("rounds", type=int, nargs="?", default=50)
    ap.add_argument("waiters", type=int, nargs="?", default=4)
    ap.add_argument("threads", type=int, nargs="?", default=1)
    ap.add_argument("--core", choices=["ext", "py"], default="ext")
    args = ap.parse_args()
    no_ext = args.core == "py"
    if no_ext:
        os.environ["NVCACHE_NO_EXTENSIONS"] = "1"
    import nvcache
    path = tempfile.mkdtemp(prefix="nvcache-flight-bench-")
    ctx = mp.get_context("spawn")
    starts = [ctx.Queue() for _ in range(args.waiters)]
    stamps = ctx.Queue()
    procs = [ctx.Process(target=waiter, args=(path, args.threads, q, stamps, no_ext)) for q in starts]
    cache = nvcache.LayerCache(path, 64)
    record = os.urandom(20_000)
    latencies: List[float] = []
    creator: List[float] = []  # create() returned -> the creator's get_or_create returned (put, unlink, unlock)
    try:
        for p in procs:
            p.start()
        for i in range(args.rounds):
            name = f"sha256:{i:064x}"
            produced = [0]

            def create() -> bytes:
                for q in starts:  # the waiters ask while this claim is held
                    q.put(name)
                time.sleep(0.3)  # long enough for every waiter to be asleep on the claim
                produced[0] = time.time_ns()
                return record

            cache.get_or_create(name, create)
            returned = time.time_ns()
            got = [t for _ in procs for t in stamps.get(timeout=60)]
            if i:  # round 0 is the warm-up: waiters still starting may arrive after the put
                latencies += [(t - produced[0]) / 1e3 for t in got]
                creator.append((returned - produced[0]) / 1e3)
        for q in starts:
            q.put(None)
        for p in procs:
            p.join(30)
        flights = cache.flight_stats()
    finally:
        cache.close()
        shutil.rmtree(path, ignore_errors=True)
    latencies.sort()
    n = len(latencies)
    print(f"core {args.core}, {args.rounds} rounds, {args.waiters} waiter processes x {args.threads} threads, "
          f"20 kB record, load {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"wake-up latency (create() returned -> waiter has the bytes), us: median {statistics.median(latencies):.0f}, "
          f"mean {statistics.fmean(latencies):.0f}, p90 {latencies[int(n * 0.9)]:.0f}, max {latencies[-1]:.0f} "
          f"over {n} waits (round 0, the warm-up, left out); the creator's own put + release: median "
          f"{statistics.median(creator):.0f}, mean {statistics.fmean(creator):.0f}; cache counted {flights['waits']} waits, {flights['takeovers']} takeovers")


if __name__ == "__main__":
    sys.exit(main())
