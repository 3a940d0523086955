"""Processes for tests/test_fleet.py: ``python tests/fleet_worker.py CONFIG_JSON``.

One process is one scanner of one node: it opens ``LayerCache(path, max_mb, remote=url,
remote_key=key, compress=False)`` (the core is the one ``NVCACHE_NO_EXTENSIONS`` chooses, as the
test's ``core_env`` sets it), prints ``ready``, waits for ``go`` on stdin (so that every process
of the fleet starts at once: a barrier), then calls ``get_or_create(name, create, wait=wait)``
once for each name, each in a thread of its own, all at once.

``create`` appends ``name pid time`` (time.time(), comparable across processes) to ``log`` (O_APPEND: one line per create() that ran, whoever
ran it), sleeps ``sleep`` seconds, then per ``mode``: ``ok`` returns the record, ``raise``
waits until the file ``gate`` exists and raises ValueError, ``hang`` sleeps an hour (the test
SIGKILLs it). The record is a deterministic function of the name (``record_for``), so every
caller's bytes can be checked.

``lease`` (seconds), when given, replaces ``nvcache.fleet.LEASE`` in this process before the
cache opens: fleet reads no environment variable for it, so the module attribute is patched
here (fleet reads it at each claim and renewal).

Prints one JSON line: each call's outcome (the record's sha256 or the exception's name), its
seconds and when it returned (time.time()), and this process's tier counts (``RemoteTier.stats()``).
"""

import hashlib
import json
import os
import sys
import threading
import time
from typing import Any, Dict

import nvcache
from nvcache import fleet


def record_for(name: str, size: int = 3000) -> bytes:
    return hashlib.shake_256(name.encode()).digest(size)


def make_create(cfg: Dict[str, Any], name: str) -> Any:
    def create() -> bytes:
        fd = os.open(cfg["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{name} {os.getpid()} {time.time():.6f}\n".encode())
        finally:
            os.close(fd)
        time.sleep(cfg.get("sleep", 0.0))
        mode = cfg.get("mode", "ok")
        if mode == "raise":
            while not os.path.exists(cfg["gate"]):
                time.sleep(0.01)
            raise ValueError("the analysis failed")
        if mode == "hang":
            time.sleep(3600)
        return record_for(name, cfg.get("size", 3000))
    return create


def main(cfg: Dict[str, Any]) -> Dict[str, Any]:
    if cfg.get("lease") is not None:
        fleet.LEASE = float(cfg["lease"])
    results: Dict[str, Dict[str, Any]] = {}
    lock = threading.Lock()
    with nvcache.LayerCache(cfg["path"], cfg.get("max_mb", 4.0), compress=False, remote=cfg["url"],
                            remote_key=cfg.get("key")) as cache:
        cache.contains(cfg["names"][0])  # opened (and the cache created) before the start
        print("ready", flush=True)
        sys.stdin.readline()

        def call(name: str) -> None:
            start = time.monotonic()
            try:
                got = cache.get_or_create(name, make_create(cfg, name), wait=cfg.get("wait", 30.0))
                outcome = hashlib.sha256(got).hexdigest()
            except Exception as exc:
                outcome = type(exc).__name__
            with lock:
                results[name] = {"outcome": outcome, "seconds": time.monotonic() - start, "done": time.time()}

        threads = [threading.Thread(target=call, args=(name,)) for name in cfg["names"]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        tier = cache.remote
        counts = tier.stats() if tier is not None else {}
    return {"pid": os.getpid(), "results": results, "tier": counts}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
