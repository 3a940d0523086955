"""One scanner of one release in the rolling-upgrade tests: ``python upgrade_worker.py PATH TAG ROUND OPS [hold]``.

Runs under whichever nvcache its PYTHONPATH finds (the old release's tree or
this one), through the API both have. It opens the cache, prints ``ready``
and waits for ``go`` on stdin (so that the test runs two releases' workers
at once), then checks every record this TAG acknowledged in earlier rounds,
and puts OPS new ones, each followed by gets of its own and of the other
tag's keys, pausing between operations so that the other release's worker
interleaves. Prints one JSON line: what it found at open, what it lost, how
many rebuilds the core logged, its counters at close.
``hold``: puts nothing, only holds the cache open until ``go`` and then
checks (a user under whom the new release must not remove the old format).
"""

import json
import logging
import sys
import time
from typing import Dict, List

import nvcache

OTHER = {"old": "new", "new": "old"}


def key(tag: str, rnd: int, i: int) -> str:
    return f"sha256:{tag}-{rnd:03d}-{i:04d}"


def record(name: str) -> bytes:
    raw = (name + "|").encode()
    return (raw * (200 + sum(raw) % 700))[: 300 + sum(raw) % 2000]


class Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: List[str] = []

    def emit(self, rec: logging.LogRecord) -> None:
        self.messages.append(rec.getMessage())


def main(path: str, tag: str, rnd: int, ops: int, hold: bool) -> Dict[str, object]:
    logged = Count()
    logging.getLogger("nvcache").addHandler(logged)
    logging.getLogger("nvcache").setLevel(logging.INFO)
    cache = nvcache.LayerCache(path, 8)
    opened = cache.stats()
    print("ready", flush=True)
    sys.stdin.readline()
    earlier = [key(tag, r, i) for r in range(rnd) for i in range(ops)]
    lost = [k for k in earlier if cache.peek(k) is None]
    wrong = sum(1 for k in earlier if (got := cache.peek(k)) is not None and got != record(k))
    acked = 0
    for i in range(0 if hold else ops):
        k = key(tag, rnd, i)
        acked += bool(cache.put(k, record(k)))
        got = cache.get(k)
        wrong += got is not None and got != record(k)
        other = key(OTHER[tag], rnd, i)  # the other release's record (in its own cache, after the change)
        got = cache.get(other)
        wrong += got is not None and got != record(other)
        time.sleep(0.003)
    closing = cache.stats()
    cache.close()
    return {"version": nvcache.cachedir.FORMAT_VERSION, "opened": opened, "closing": closing,
            "lost": len(lost), "wrong": wrong, "acked": acked, "checked": len(earlier),
            "rebuilds": sum("emptying cache" in m for m in logged.messages),
            "created": sum(m.startswith("creating cache") for m in logged.messages)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:] == ["hold"])),
          flush=True)
