"""Latency of the remote tier (nvcache/remote.py) against a local redis-server of its own.

Cells, each timed call by call with perf_counter_ns (median / mean / p99, microseconds):

* get hit / put of scanner-shaped records (about 6 KiB, zstd-compressible), keyed (BLAKE2b tag)
  and not, over TCP loopback and the unix socket; a bare redis-py GET of the same value on the
  same socket, for the tier's own overhead;
* get miss (absent key);
* a killed server: the first call (connection refused) and the calls after the breaker opened;
* a SIGSTOPped server: the first call (waits for the socket timeout) and the calls after.

Run: ``.venv/bin/python bench/remote.py [N]`` (N calls a cell, default 2000). Prints the table
and the load average; the numbers depend on the load (this is a 2-core VM).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Callable, Dict, List

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import redisservers as rs  # noqa: E402

from nvcache.remote import RemoteTier  # noqa: E402
from nvcache.scanrecords import scan_record  # noqa: E402

KEY = "a fleet secret of 32+ characters!"


def timed(call: Callable[[int], object], n: int) -> List[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter_ns()
        call(i)
        out.append((time.perf_counter_ns() - t0) / 1000)
    return out


def row(name: str, us: List[float]) -> str:
    us_sorted = sorted(us)
    p99 = us_sorted[min(len(us) - 1, int(len(us) * 0.99))]
    return f"| {name} | {len(us)} | {statistics.median(us):.1f} | {statistics.fmean(us):.1f} | {p99:.1f} |"


def main(n: int) -> None:
    records = [scan_record(f"sha256:{i:064x}", 6000, seed=i) for i in range(200)]
    names = [f"sha256:{i:064x}_layer_file".encode() for i in range(200)]
    lines = ["| cell | calls | median us | mean us | p99 us |", "| --- | --- | --- | --- | --- |"]
    server = rs.RedisServer().start()
    try:
        for via, url in (("unix", server.unix_url), ("tcp", server.tcp_url)):
            for keyed in (False, True):
                tier = RemoteTier(url, key=KEY if keyed else None, prefix=f"b{via}{keyed}:")
                tag = f"{via}{', keyed' if keyed else ''}"
                lines.append(row(f"put ({tag})", timed(lambda i: tier.put(names[i % 200], records[i % 200]), n)))
                lines.append(row(f"get hit ({tag})", timed(lambda i: tier.get(names[i % 200]), n)))
                assert tier.stats()["remote_hits"] == n and tier.stats()["remote_errors"] == 0
                client = tier._get_client()
                keys = [tier.prefix + name for name in names]
                lines.append(row(f"bare redis-py GET ({tag})", timed(lambda i: client.get(keys[i % 200]), n)))
                lines.append(row(f"get miss ({tag})", timed(lambda i: tier.get(b"absent%d" % i), n)))
                tier.close()
        # A stopped server: the first call waits for the socket timeout; then the breaker skips.
        tier = RemoteTier(server.unix_url, prefix="bunixFalse:")
        assert tier.get(names[0]) is not None
        server.pause()
        try:
            lines.append(row("get, server SIGSTOPped: first call", timed(lambda i: tier.get(names[0]), 1)))
            lines.append(row("get, server SIGSTOPped: breaker open", timed(lambda i: tier.get(names[i % 200]), n)))
            lines.append(row("put, server SIGSTOPped: breaker open", timed(lambda i: tier.put(names[i % 200], records[0]), n)))
        finally:
            server.resume()
        tier = RemoteTier(server.tcp_url, prefix="btcpFalse:")
        assert tier.get(names[0]) is not None
        server.kill()
        lines.append(row("get, server killed: first call (refused)", timed(lambda i: tier.get(names[0]), 1)))
        lines.append(row("get, server killed: breaker open", timed(lambda i: tier.get(names[i % 200]), n)))
        stats: Dict[str, int] = tier.stats()
    finally:
        server.cleanup()
        rs.cleanup()
    print("\n".join(lines))
    print(f"\nlast tier's counters: {stats}")
    print(f"load average: {os.getloadavg()}, cpus: {os.cpu_count()}, calls a cell: {n}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
