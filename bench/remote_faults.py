"""What a scanner sees when its Redis fails: every fault of issue 14 through ``LayerCache``.

Two node directories share one private redis-server (or a three-master cluster). For each fault
the scanner's node makes calls the way a scanner does (``get``, ``put``, ``get_or_create``) and
we record, per call, its latency and whether it returned the right bytes (or None for a miss that
really is one). Cells: the first call after the fault (the one that meets it and opens the
breaker), the median of the next calls (the breaker skipping), and after the server is back, the
first call that uses the tier again (a remote hit of a record the other node put).

Faults: connection refused (server killed), a server that stops answering (SIGSTOP), a restart
(killed then started on the same socket), a full server (``maxmemory`` tiny, ``noeviction``:
``OOM command not allowed``), a cluster master SIGSTOPped, and a cluster slot moved to another
master. ``python bench/remote_faults.py [CALLS]`` prints a markdown table and the load.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, List, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import redisservers as rs  # noqa: E402
from redis.crc import key_slot  # noqa: E402

import nvcache  # noqa: E402
from nvcache.remote import RemoteTier  # noqa: E402
from nvcache.scanrecords import scan_record  # noqa: E402

FAST = dict(timeout=0.2, backoff=1.0, max_backoff=2.0)


def record(i: int) -> bytes:
    return scan_record(f"sha256:{i:064x}", 6000, seed=i)


def timed(call: Callable[[], Any]) -> Tuple[float, Any]:
    t0 = time.perf_counter_ns()
    out = call()
    return (time.perf_counter_ns() - t0) / 1000, out


class Node:
    def __init__(self, root: str, name: str, url: str) -> None:
        self.cache = nvcache.LayerCache(os.path.join(root, name), 64, remote=RemoteTier(url, **FAST))

    def ops(self, base: int, calls: int) -> List[Tuple[str, float, bool]]:
        """``calls`` of each kind on fresh names from ``base``: (kind, µs, right)."""
        out = []
        for i in range(base, base + calls):
            made, created = record(i), record(-i)  # made before the clock starts: a scanner's analysis
            us, got = timed(lambda: self.cache.get(f"L{i}"))
            out.append(("get (a miss)", us, got is None))
            us, got = timed(lambda: self.cache.put(f"L{i}", made))
            out.append(("put", us, got is True))
            us, got = timed(lambda: self.cache.get_or_create(f"G{i}", lambda: created))
            out.append(("get_or_create (a miss)", us, got == created))
        return out


def run_fault(label: str, make: Callable[[], Any], url_of: Callable[[Any], str], fault: Callable[[Any], None],
              heal: Callable[[Any], None], calls: int, base: int) -> List[str]:
    server = make()
    root = tempfile.mkdtemp(prefix="nvcache-faults-")
    rows = []
    try:
        url = url_of(server)
        scanner, other = Node(root, "scanner", url), Node(root, "other", url)
        for node in (scanner, other):  # connected before the fault, as a running scanner is
            node.cache.put(f"W{base}{id(node)}", b"warm")
            node.cache.get(f"W{base}")
        fault(server)
        first = scanner.ops(base, 1)
        rest = scanner.ops(base + 1, calls)
        heal(server)
        time.sleep(2.1)  # past the breaker's longest backoff here: the next call is a probe
        other.cache.put(f"H{base}", record(base))  # may itself be the other node's probe
        other.cache.put(f"H{base + 1}", record(base + 1))
        time.sleep(0.05)
        us_back, got = timed(lambda: scanner.cache.get(f"H{base + 1}"))
        if got is None:  # the scanner's own probe came first and opened nothing: ask once more
            time.sleep(0.05)
        us_back, got = timed(lambda: scanner.cache.get(f"H{base + 1}"))
        stats = scanner.cache.remote_stats() or {}
        for kind in ("get (a miss)", "put", "get_or_create (a miss)"):
            f = [(us, ok) for k, us, ok in first if k == kind]
            r = [(us, ok) for k, us, ok in rest if k == kind]
            right = all(ok for _, ok in f + r)
            rows.append(f"| {label} | {kind} | {f[0][0]:.0f} | {statistics.median(u for u, _ in r):.1f} | "
                        f"{'yes' if right else '**NO**'} | |")
        rows.append(f"| {label} | back: get of another node's record | {us_back:.0f} | | "
                    f"{'yes (remote hit)' if got == record(base + 1) else '**no**'} | "
                    f"errors {stats.get('remote_errors')}, skipped {stats.get('remote_skipped')} |")
        scanner.cache.close()
        other.cache.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
        server.cleanup()
    return rows


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    rs.require_binaries = lambda: None  # a bench, not a test: missing binaries fail loudly below
    load = os.getloadavg()
    print(f"# bench/remote_faults.py: {calls} calls of each kind a fault; load {load[0]:.2f} / {load[1]:.2f} / "
          f"{load[2]:.2f}; {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}\n")
    print("| fault | call | first call µs | next calls median µs | right bytes | tier counts |")
    print("| --- | --- | --- | --- | --- | --- |")
    single = lambda: rs.RedisServer().start()  # noqa: E731
    unix = lambda s: s.unix_url  # noqa: E731

    def restart(s: Any) -> None:
        s.restart()

    def stop_owner(c: Any) -> None:
        c._stopped = c.owner(key_slot(b"nvcache:L400_layer_file"))
        c._stopped.pause()

    def move_slots(c: Any) -> None:
        """The slots of the scanner's next names given to another master after the clients
        learned the map (the names are new: their slots hold no keys): MOVED, to be followed."""
        names = [b"nvcache:L%d_layer_file" % i for i in range(500, 500 + calls + 1)]
        for slot in sorted({key_slot(n) for n in names})[:5]:
            c.move_slot(slot)

    cells = [
        ("refused (killed)", single, unix, lambda s: s.kill(), restart, 0),
        ("stopped (SIGSTOP)", single, unix, lambda s: s.pause(), lambda s: s.resume(), 100),
        ("restarted", single, unix, restart, lambda s: None, 200),
        ("full (OOM, noeviction)", single, unix, lambda s: s.client().config_set("maxmemory", 1),
         lambda s: s.client().config_set("maxmemory", 0), 300),
        ("cluster master SIGSTOP", lambda: rs.RedisCluster3().start(), lambda c: c.url, stop_owner,
         lambda c: c._stopped.resume(), 400),
        ("cluster slots moved", lambda: rs.RedisCluster3().start(), lambda c: c.url, move_slots, lambda c: None, 500),
    ]
    for label, make, url_of, fault, heal, base in cells:
        for row in run_fault(label, make, url_of, fault, heal, calls, base):
            print(row, flush=True)
    rs.cleanup()


if __name__ == "__main__":
    main()
