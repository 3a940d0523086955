"""Worker processes for the multi-process tests: ``python tests/worker.py MODE PATH ARGS...``.

The core follows NVCACHE_NO_EXTENSIONS (the tests' ``core_env``). Records
are a deterministic function of their key, so any reader can check any
record byte for byte. Each mode prints one JSON line with what it saw.
"""

import json
import os
import random
import sys
import time

import nvcache


def record_for(key: str, size: int = 0) -> bytes:
    """The one valid record of ``key``: a repeat of the key, of a size derived from it."""
    size = size or 50 + (sum(key.encode()) * 7919) % 900
    raw = (key + "|").encode()
    return (raw * (size // len(raw) + 1))[:size]


def mixed(path: str, seed: int, ops: int, keys: int, max_mb: float) -> dict:
    """Gets and puts over a shared key range; reports its own hits and misses."""
    rng = random.Random(seed)
    hits = misses = puts = wrong = 0
    with nvcache.LayerCache(path, max_mb) as cache:
        for _ in range(ops):
            key = f"sha256:{rng.randrange(keys):08d}"
            got = cache.get(key)
            if got is None:
                misses += 1
                try:
                    puts += cache.put(key, record_for(key))
                except nvcache.CacheFull:
                    pass
            else:
                hits += 1
                wrong += got != record_for(key)
    return {"pid": os.getpid(), "hits": hits, "misses": misses, "puts": puts, "wrong": wrong}


def writer(path: str, seed: int, max_mb: float) -> None:
    """Puts forever, printing each acknowledged key (after put returned) for the killer to collect."""
    rng = random.Random(seed)
    with nvcache.LayerCache(path, max_mb) as cache:
        i = 0
        while True:
            key = f"sha256:{seed:04d}{i:08d}"
            size = rng.choice([10, 500, 3000, 20000])
            if cache.put(key, record_for(key, size)):
                sys.stdout.write(f"{key} {size}\n")
                sys.stdout.flush()
            if rng.random() < 0.05:
                cache.delete(f"sha256:{seed:04d}{rng.randrange(i + 1):08d}")
            i += 1


def getter(path: str, key: str, seconds: float) -> None:
    """Hits one key for ``seconds`` without closing, then waits to be killed."""
    cache = nvcache.LayerCache(path, 1)
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        assert cache.get(key) is not None
        n += 1
    print(json.dumps({"hits": n}), flush=True)
    time.sleep(3600)


if __name__ == "__main__":
    mode, path, *args = sys.argv[1:]
    if mode == "mixed":
        print(json.dumps(mixed(path, int(args[0]), int(args[1]), int(args[2]), float(args[3]))))
    elif mode == "writer":
        writer(path, int(args[0]), float(args[1]))
    elif mode == "getter":
        getter(path, args[0], float(args[1]))
    else:
        raise SystemExit(f"unknown mode {mode}")
