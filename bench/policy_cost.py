"""A put into a full cache under each policy, warm: the steady state beside compare.py's first pass.

bench/compare.py's put-evict cell times the first pass after a reopen, where most of a put's cost
is page faults on pages this process has not touched yet (DEVELOPERS.md, "Page faults"). LRFU
writes one more B-tree page per eviction (its ghost slot), so that cell shows it; this loop times
20,000 evicting puts after as many others, alternating the policies, to show what is left once
the pages are mapped. Run: ``.venv/bin/python bench/policy_cost.py [rounds]``.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Tuple

import nvcache


def put_evict(policy: str, records: int = 10_000, puts: int = 20_000, size: int = 2048) -> Tuple[float, float]:
    """(median, mean) µs of a put that evicts one record, in a cache of ``records`` records."""
    path = tempfile.mkdtemp(prefix="nvcache-policy-cost-")
    try:
        data = os.urandom(size)
        with nvcache.LayerCache(path, records * size / 1048576, policy=policy, compress=False) as cache:
            for i in range(records + puts):  # fill, then as many evicting puts to map the pages
                cache.put(f"sha256:warm{i}", data)
            times = []
            for i in range(puts):
                start = time.perf_counter_ns()
                cache.put(f"sha256:timed{i}", data)
                times.append(time.perf_counter_ns() - start)
        return statistics.median(times) / 1000, statistics.mean(times) / 1000
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main(rounds: int) -> int:
    print(f"compiled core: {nvcache.EXTENSION}; load {os.getloadavg()[0]:.2f}")
    for rnd in range(rounds):
        for policy in nvcache.POLICIES:
            median, mean = put_evict(policy)
            print(f"round {rnd}  {policy:5s} put-evict median {median:6.2f} µs  mean {mean:6.2f} µs", flush=True)
    print(f"load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3))
