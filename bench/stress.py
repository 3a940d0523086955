#!/usr/bin/env python3
"""Stress driver: many processes hammering one nvcache directory.

Runs N worker processes for a duration against one cache directory (some of
them, where ``unshare`` is allowed, as PID 1 in their own PID namespace),
with a configurable mix of get / put / delete / contains / stats /
cache_data / clear, record sizes and bound. Every record is a deterministic
function of its key, so every read is checked byte-exact. The supervisor
samples the invariants all the time (``record_total_size`` never above the
bound; ``record_count``, totals and the dump consistent; counters never
decreasing); with ``--chaos`` it SIGKILLs random workers and restarts them.
At the end it runs ``verify()`` and checks the counters: the hits and
misses of the workers that closed cleanly add up exactly to the cache's
counters when no worker was killed (with kills: they bound them from both
sides). It prints a summary table and writes JSON. Exit status 0 = passed.

    python bench/stress.py --workers 16 --duration 300 --chaos \\
        --json bench/results/reliability/stress-16x300-chaos.json

Run ``python bench/stress.py --help`` for every option.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Dict, List, Optional, Tuple

OPS = ("get", "put", "delete", "contains", "len", "stats", "cache_data", "clear")
DEFAULT_MIX = "get=60,put=25,delete=4,contains=4,len=1,stats=4,cache_data=2,clear=0"
STATUS = struct.Struct("<QQQQ")  # hits, misses, ops, get errors: streamed after every op


# -- records: deterministic functions of their key ------------------------------
def layer_id(i: int) -> str:
    return "sha256:" + hashlib.sha256(b"layer-%d" % i).hexdigest()


def record_size(i: int, min_size: int, max_size: int) -> int:
    h = int.from_bytes(hashlib.blake2b(b"size-%d" % i, digest_size=8).digest(), "little")
    return min_size + h % (max_size - min_size + 1)


@functools.lru_cache(maxsize=None)  # a worker checks every read against it: made once per key
def record_bytes(i: int, size: int) -> bytes:
    """Record i: incompressible for even i (stored raw: its stored size is ``size``), a repeat that
    zstd shrinks for odd i (stored compressed: its stored size is below ``size``)."""
    if i % 2 == 0:
        return (struct.pack("<QQ", i, size) + hashlib.shake_256(b"record-%d" % i).digest(size))[:size]
    block = hashlib.blake2b(b"record-%d" % i, digest_size=64).digest()
    return (struct.pack("<QQ", i, size) + block * (size // 64 + 1))[:size]


def key_index(name: str) -> Optional[int]:
    """The key number of a dumped record name (``<layer_id>_layer_file``), or None if foreign."""
    return _NAME_TO_INDEX.get(name)


_NAME_TO_INDEX: Dict[str, int] = {}


def _index_names(keys: int) -> None:
    if len(_NAME_TO_INDEX) != keys:
        _NAME_TO_INDEX.clear()
        for i in range(keys):
            _NAME_TO_INDEX[layer_id(i) + "_layer_file"] = i


def parse_mix(text: str) -> Dict[str, int]:
    mix = {op: 0 for op in OPS}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        op, _, weight = part.partition("=")
        op = op.strip()
        if op not in mix:
            raise argparse.ArgumentTypeError(f"unknown op {op!r} in --mix (known: {', '.join(OPS)})")
        try:
            mix[op] = int(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(f"weight of {op!r} must be an integer") from None
        if mix[op] < 0:
            raise argparse.ArgumentTypeError(f"weight of {op!r} must be >= 0")
    if not sum(mix.values()):
        raise argparse.ArgumentTypeError("--mix has no op with a weight above 0")
    return mix


def check_dump(dump: Dict[str, Any], max_bytes: int, args: argparse.Namespace) -> List[str]:
    """Invariants of one cache_data() dump (taken in one read transaction)."""
    problems = []
    records = dump["cache_records"]
    total = sum(r["size"] for r in records)
    if total != dump["record_total_size"]:
        problems.append(f"dump: sizes add up to {total}, record_total_size says {dump['record_total_size']}")
    if dump["record_total_size"] > max_bytes:
        problems.append(f"dump: record_total_size {dump['record_total_size']} above bound {max_bytes}")
    last = ""
    for r in records:
        i = key_index(r["layer_id"])
        if i is None:
            problems.append(f"dump: foreign record {r['layer_id']!r}")
            continue
        want = record_size(i, args.min_size, args.max_size)
        if (r["size"] != want) if i % 2 == 0 else not 0 < r["size"] < want:
            problems.append(f"dump: record {i} has size {r['size']}, expected "
                            f"{want if i % 2 == 0 else f'below {want} (compressed)'}")
        if args.policy != "lru":
            continue  # the dump is in the policy's order, which its fields do not show (LRFU's rank)
        # RFC 3339 in UTC with trimmed nanoseconds does not sort as text; compare as (seconds, fraction).
        stamp = r["last_referred"].rstrip("Z")
        sec, _, frac = stamp.partition(".")
        key = sec + "." + frac.ljust(9, "0")
        if key < last:
            problems.append(f"dump: records not oldest reference first at {r['layer_id']}")
        last = key
    if len({r["layer_id"] for r in records}) != len(records):
        problems.append("dump: a record listed twice")
    return problems


def check_stats(st: Dict[str, Any], max_bytes: int, args: argparse.Namespace) -> List[str]:
    problems = []
    count, total = st["record_count"], st["record_total_size"]
    if total > max_bytes:
        problems.append(f"stats: record_total_size {total} above bound {max_bytes}")
    if count < 0 or not count <= total <= count * args.max_size:  # compressed records weigh less than min_size
        problems.append(f"stats: {count} records cannot weigh {total} bytes "
                        f"(sizes are {args.min_size}..{args.max_size} put, stored raw or smaller)")
    return problems


# -- worker ---------------------------------------------------------------------
def worker_main(args: argparse.Namespace) -> int:
    import nvcache

    _index_names(args.keys)
    rng = random.Random(args.seed)
    mix = parse_mix(args.mix)
    ops = [op for op in OPS if mix[op]]
    weights = [mix[op] for op in ops]
    max_bytes = int(args.max_mb * 1024 * 1024)
    status_fd = os.open(args.status, os.O_WRONLY | os.O_CREAT, 0o644)
    counts = {op: 0 for op in OPS}
    lat_max = {op: 0.0 for op in OPS}
    errors: Dict[str, int] = {}
    wrong: List[str] = []
    violations: List[str] = []
    hits = misses = get_errors = 0
    puts_new = puts_existing = cache_full = 0
    crash = None
    ops_done = 0

    def pick() -> int:
        # Skewed towards low key numbers, like layers shared by many images.
        return min(int(args.keys * rng.random() ** args.skew), args.keys - 1)

    cache = None
    try:
        cache = nvcache.LayerCache(args.path, args.max_mb, durable=args.durable,
                                   lock_timeout=args.lock_timeout, policy=args.policy)
        deadline = time.monotonic() + args.duration
        choices = rng.choices
        while time.monotonic() < deadline:
            batch = choices(ops, weights, k=64)
            for op in batch:
                t0 = time.perf_counter()
                try:
                    if op == "get":
                        i = pick()
                        try:
                            data = cache.get(layer_id(i))
                        except nvcache.CacheError:
                            get_errors += 1
                            raise
                        if data is None:
                            misses += 1
                        else:
                            hits += 1
                            want = record_bytes(i, record_size(i, args.min_size, args.max_size))
                            if data != want:
                                wrong.append(f"key {i}: got {len(data)} bytes, expected {len(want)}")
                    elif op == "put":
                        i = pick()
                        keep = [layer_id(pick()) for _ in range(rng.randrange(4))]
                        try:
                            if cache.put(layer_id(i), record_bytes(i, record_size(i, args.min_size, args.max_size)),
                                         keep=keep):
                                puts_new += 1
                            else:
                                puts_existing += 1
                        except nvcache.CacheFull:
                            cache_full += 1
                    elif op == "delete":
                        cache.delete(layer_id(pick()))
                    elif op == "contains":
                        layer_id(pick()) in cache  # noqa: B015
                    elif op == "len":
                        n = len(cache)
                        if n < 0 or n * args.min_size > max_bytes:
                            violations.append(f"len: {n} records cannot fit the bound")
                    elif op == "stats":
                        violations.extend(check_stats(cache.stats(), max_bytes, args))
                    elif op == "cache_data":
                        violations.extend(check_dump(cache.cache_data(), max_bytes, args))
                    elif op == "clear":
                        cache.clear()
                except nvcache.CacheError as exc:
                    name = type(exc).__name__
                    errors[name] = errors.get(name, 0) + 1
                counts[op] += 1
                ops_done += 1
                dt = time.perf_counter() - t0
                if dt > lat_max[op]:
                    lat_max[op] = dt
                os.pwrite(status_fd, STATUS.pack(hits, misses, ops_done, get_errors), 0)
        cache.close()
        closed = True
    except Exception:  # anything but CacheError is a crash of the scanner
        crash = traceback.format_exc()
        closed = False
    result = {
        "slot": args.slot, "incarnation": args.incarnation, "pid": os.getpid(),
        "pidns": args.pidns, "ops": counts, "ops_total": ops_done, "hits": hits, "misses": misses,
        "get_errors": get_errors, "puts_new": puts_new, "puts_existing": puts_existing,
        "cache_full": cache_full, "errors": errors, "wrong_reads": len(wrong),
        "wrong_examples": wrong[:5], "violations": len(violations),
        "violation_examples": violations[:5], "crash": crash, "closed": closed,
        "max_latency_s": lat_max,
    }
    tmp = args.result + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, args.result)
    return 0


# -- supervisor -----------------------------------------------------------------
def unshare_available() -> Tuple[bool, str]:
    exe = shutil.which("unshare")
    if exe is None:
        return False, "unshare(1) is not installed"
    try:
        proc = subprocess.run([exe, "--pid", "--fork", "--kill-child", sys.executable, "-c",
                               "import os; print(os.getpid())"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"unshare failed: {exc}"
    if proc.returncode != 0 or proc.stdout.strip() != "1":
        return False, f"unshare --pid --fork refused: {proc.stderr.strip() or proc.returncode}"
    return True, ""


def _children(pid: int) -> List[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


class Worker:
    def __init__(self, slot: int, incarnation: int, pidns: bool, rundir: str) -> None:
        self.slot = slot
        self.incarnation = incarnation
        self.pidns = pidns
        self.result = os.path.join(rundir, f"result-{slot}-{incarnation}.json")
        self.status = os.path.join(rundir, f"status-{slot}-{incarnation}")
        self.proc: Optional[subprocess.Popen] = None
        self.killed = False

    def start(self, args: argparse.Namespace, env: Dict[str, str], remaining: float) -> None:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--path", args.path,
               "--duration", f"{max(remaining, 0.0):.3f}", "--seed", str(args.seed * 1000003 + self.slot * 1009 + self.incarnation),
               "--slot", str(self.slot), "--incarnation", str(self.incarnation),
               "--result", self.result, "--status", self.status, "--mix", args.mix,
               "--keys", str(args.keys), "--skew", str(args.skew), "--min-size", str(args.min_size),
               "--max-size", str(args.max_size), "--max-mb", repr(args.max_mb),
               "--lock-timeout", repr(args.lock_timeout), "--policy", args.policy]
        if args.durable:
            cmd.append("--durable")
        if args.core == "mixed":  # both cores, with and without the write map, on one cache
            env = dict(env, NVCACHE_NO_EXTENSIONS="1" if self.slot % 2 else "",
                       NVCACHE_WRITEMAP="0" if self.slot // 2 % 2 else "1")
        if self.pidns:
            cmd = ["unshare", "--pid", "--fork", "--kill-child", "--"] + cmd + ["--in-pidns"]
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)

    def sigkill(self) -> None:
        """SIGKILL the process that uses the cache (inside its PID namespace if it has one)."""
        assert self.proc is not None
        self.killed = True
        targets = _children(self.proc.pid) if self.pidns else []
        for pid in targets + [self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def streamed(self) -> Tuple[int, int, int, int]:
        try:
            with open(self.status, "rb") as f:
                raw = f.read(STATUS.size)
            return STATUS.unpack(raw) if len(raw) == STATUS.size else (0, 0, 0, 0)
        except OSError:
            return (0, 0, 0, 0)

    def load(self) -> Optional[Dict[str, Any]]:
        try:
            with open(self.result) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None


class Sampler(threading.Thread):
    """Samples stats() continuously and cache_data() regularly from the supervisor."""

    def __init__(self, cache: Any, args: argparse.Namespace, max_bytes: int) -> None:
        super().__init__(daemon=True)
        self.cache = cache
        self.args = args
        self.max_bytes = max_bytes
        self.stop = threading.Event()
        self.samples = self.dumps = self.errors = 0
        self.violations: List[str] = []
        self.max_total = 0
        self.max_count = 0

    def run(self) -> None:
        import nvcache
        last_hits = last_misses = 0
        n = 0
        while not self.stop.is_set():
            try:
                st = self.cache.stats()
                self.samples += 1
                self.violations.extend(check_stats(st, self.max_bytes, self.args))
                if st["cache_hits"] < last_hits or st["cache_misses"] < last_misses:
                    self.violations.append(f"counters went backwards: {st}")
                last_hits, last_misses = st["cache_hits"], st["cache_misses"]
                self.max_total = max(self.max_total, st["record_total_size"])
                self.max_count = max(self.max_count, st["record_count"])
                n += 1
                if n % 10 == 0:
                    self.violations.extend(check_dump(self.cache.cache_data(), self.max_bytes, self.args))
                    self.dumps += 1
            except nvcache.CacheError:
                self.errors += 1
            except Exception:
                self.violations.append("sampler crashed: " + traceback.format_exc())
                return
            self.stop.wait(self.args.sample_every)


def supervise(args: argparse.Namespace) -> int:
    if args.core == "py":
        os.environ["NVCACHE_NO_EXTENSIONS"] = "1"
    elif args.core == "ext":
        os.environ["NVCACHE_NO_EXTENSIONS"] = ""
    import lmdb
    import nvcache
    if args.core in ("ext", "mixed") and not nvcache.EXTENSION:
        print("the compiled core is not built", file=sys.stderr)
        return 2
    _index_names(args.keys)
    own_dir = None
    if not args.path:
        own_dir = tempfile.mkdtemp(prefix="nvcache-stress-")
        args.path = os.path.join(own_dir, "caches")
    rundir = tempfile.mkdtemp(prefix="nvcache-stress-run-")
    max_bytes = int(args.max_mb * 1024 * 1024)
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in [here, env.get("PYTHONPATH", "")] if p)

    pidns_ok, pidns_reason = (False, "disabled by --pidns 0") if args.pidns == 0 else unshare_available()
    n_pidns = 0
    if pidns_ok:
        n_pidns = args.workers // 4 if args.pidns < 0 else min(args.pidns, args.workers)
    if not args.quiet and not pidns_ok:
        print(f"note: no worker runs in its own PID namespace: {pidns_reason}", file=sys.stderr)

    # A fresh, healthy cache: counters start at zero.
    cache = nvcache.LayerCache(args.path, args.max_mb, durable=args.durable, lock_timeout=args.lock_timeout,
                               policy=args.policy)
    base = cache.stats()
    sampler = Sampler(cache, args, max_bytes)
    sampler.start()

    rng = random.Random(args.seed)
    start = time.monotonic()
    end = start + args.duration
    workers: List[Worker] = []
    live: Dict[int, Worker] = {}
    for slot in range(args.workers):
        w = Worker(slot, 0, slot < n_pidns, rundir)
        w.start(args, env, args.duration)
        workers.append(w)
        live[slot] = w
    kills = 0
    restarts = 0
    next_kill = start + rng.expovariate(1.0 / args.kill_every) if args.chaos else float("inf")
    while time.monotonic() < end:
        now = time.monotonic()
        if now >= next_kill and now < end - args.kill_margin:
            slot = rng.choice(sorted(live))
            victim = live[slot]
            victim.sigkill()
            try:
                victim.proc.wait(timeout=10)  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                pass
            kills += 1
            w = Worker(slot, victim.incarnation + 1, victim.pidns, rundir)
            w.start(args, env, end - time.monotonic())
            workers.append(w)
            live[slot] = w
            restarts += 1
            next_kill = time.monotonic() + rng.expovariate(1.0 / args.kill_every)
        time.sleep(min(0.02, max(0.0, min(next_kill, end) - time.monotonic())))
    hung = 0
    for w in workers:
        try:
            w.proc.wait(timeout=max(5.0, end + 60 - time.monotonic()))  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            hung += 1
            w.sigkill()
            w.proc.wait(timeout=10)  # type: ignore[union-attr]
    elapsed = time.monotonic() - start
    sampler.stop.set()
    sampler.join(timeout=30)

    # -- totals ---------------------------------------------------------------
    results = []
    failures: List[str] = []
    clean_hits = clean_misses = 0
    killed_hits_hi = killed_misses_hi = 0
    get_error_slack = 0
    killed_ops = 0
    ops = {op: 0 for op in OPS}
    errors: Dict[str, int] = {}
    wrong = violations = crashes = pid1 = 0
    puts_new = cache_full = 0
    lat_max = {op: 0.0 for op in OPS}
    for w in workers:
        r = w.load()
        if r is None:
            if not w.killed:
                crashes += 1
                failures.append(f"worker {w.slot}.{w.incarnation} left no result "
                                f"(exit status {w.proc.returncode})")  # type: ignore[union-attr]
            h, m, n_ops, ge = w.streamed()
            killed_ops += n_ops
            # A killed worker may have applied up to the access it was making when killed.
            killed_hits_hi += h + 1
            killed_misses_hi += m + 1
            get_error_slack += ge
            continue
        results.append(r)
        if r["pidns"] and r["pid"] == 1:
            pid1 += 1
        for op in OPS:
            ops[op] += r["ops"][op]
            lat_max[op] = max(lat_max[op], r["max_latency_s"][op])
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
        wrong += r["wrong_reads"]
        violations += r["violations"]
        puts_new += r["puts_new"]
        cache_full += r["cache_full"]
        get_error_slack += r["get_errors"]
        if r["crash"]:
            crashes += 1
            failures.append(f"worker {w.slot}.{w.incarnation} crashed:\n{r['crash']}")
        for ex in r["wrong_examples"] + r["violation_examples"]:
            failures.append(f"worker {w.slot}.{w.incarnation}: {ex}")
        if r["closed"]:
            clean_hits += r["hits"]
            clean_misses += r["misses"]
    if wrong:
        failures.append(f"{wrong} reads returned wrong bytes")
    if hung:
        failures.append(f"{hung} workers did not finish within 60 s of the end")
    failures.extend(sampler.violations[:20])
    if n_pidns and not pid1:
        failures.append("no worker ran as PID 1 in its own PID namespace")

    # -- final checks -----------------------------------------------------------
    problems = cache.verify()
    final = cache.stats()
    dump = cache.cache_data()
    failures.extend(f"verify: {p}" for p in problems)
    failures.extend(check_dump(dump, max_bytes, args))
    failures.extend(check_stats(final, max_bytes, args))
    got_hits = final["cache_hits"] - base["cache_hits"]
    got_misses = final["cache_misses"] - base["cache_misses"]
    exact = kills == 0 and hung == 0 and get_error_slack == 0
    if exact:
        counters_ok = got_hits == clean_hits and got_misses == clean_misses
        counter_rule = "cache == sum of workers (exact)"
    else:
        counters_ok = (clean_hits <= got_hits <= clean_hits + killed_hits_hi + get_error_slack
                       and clean_misses <= got_misses <= clean_misses + killed_misses_hi + get_error_slack)
        counter_rule = "clean workers <= cache <= clean + killed workers' streamed counts (kills)"
    if not counters_ok:
        failures.append(f"counters: cache saw {got_hits} hits / {got_misses} misses; "
                        f"clean workers {clean_hits} / {clean_misses}; rule: {counter_rule}")
    # Read every record back byte-exact (after the counter check: gets count hits).
    readback_bad = 0
    for r in dump["cache_records"]:
        i = key_index(r["layer_id"])
        if i is None:
            continue
        data = cache.get(layer_id(i))
        if data is not None and data != record_bytes(i, record_size(i, args.min_size, args.max_size)):
            readback_bad += 1
    if readback_bad:
        failures.append(f"{readback_bad} records read back wrong at the end")
    cache.close()

    total_ops = sum(ops.values()) + killed_ops
    summary = {
        "passed": not failures and crashes == 0 and violations == 0,
        "config": {k: v for k, v in vars(args).items() if k not in ("worker",)},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "lmdb": lmdb.__version__, "lmdb_library": ".".join(map(str, lmdb.version())),
                    "core": "mixed" if args.core == "mixed" else ("ext" if nvcache.EXTENSION else "py"),
                    "kernel": platform.release()},
        "processes": {"slots": args.workers, "started": len(workers), "pidns_slots": n_pidns,
                      "ran_as_pid1": pid1, "pidns_note": pidns_reason},
        "duration_s": round(elapsed, 3),
        "ops": ops, "ops_killed_workers": killed_ops, "ops_total": total_ops, "ops_per_s": round(total_ops / elapsed, 1),
        "hits": clean_hits, "misses": clean_misses, "puts_new": puts_new, "cache_full": cache_full,
        "errors": errors, "wrong_reads": wrong, "worker_violations": violations,
        "crashes": crashes, "hung": hung, "kills": kills, "restarts": restarts,
        "max_latency_ms": {op: round(v * 1000, 3) for op, v in lat_max.items()},
        "sampler": {"samples": sampler.samples, "dumps": sampler.dumps, "errors": sampler.errors,
                    "violations": len(sampler.violations), "max_record_total_size": sampler.max_total,
                    "max_record_count": sampler.max_count, "bound": max_bytes},
        "final": {"verify": problems, "stats": final, "cache_hits": got_hits, "cache_misses": got_misses,
                  "counter_rule": counter_rule, "counters_ok": counters_ok,
                  "records_read_back": len(dump["cache_records"]), "readback_bad": readback_bad},
        "failures": failures[:50],
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2, sort_keys=True)
            f.write("\n")
    if not args.quiet:
        print_table(summary)
    shutil.rmtree(rundir, ignore_errors=True)
    if own_dir:
        shutil.rmtree(own_dir, ignore_errors=True)
    return 0 if summary["passed"] else 1


def print_table(s: Dict[str, Any]) -> None:
    rows = [
        ("core", s["machine"]["core"]),
        ("worker slots / processes started", f"{s['processes']['slots']} / {s['processes']['started']}"),
        ("as PID 1 in own PID namespace", f"{s['processes']['ran_as_pid1']} (slots {s['processes']['pidns_slots']})"),
        ("duration (s)", s["duration_s"]),
        ("ops (total, per s)", f"{s['ops_total']} ({s['ops_per_s']}/s)"),
    ]
    rows += [(f"  {op}", n) for op, n in s["ops"].items() if n]
    if s["ops_killed_workers"]:
        rows.append(("  by workers later killed", s["ops_killed_workers"]))
    rows += [
        ("hits / misses (clean workers)", f"{s['hits']} / {s['misses']}"),
        ("cache counters", f"{s['final']['cache_hits']} / {s['final']['cache_misses']}"),
        ("counter check", f"{'ok' if s['final']['counters_ok'] else 'FAILED'}: {s['final']['counter_rule']}"),
        ("new puts / CacheFull", f"{s['puts_new']} / {s['cache_full']}"),
        ("CacheError raised", json.dumps(s["errors"]) if s["errors"] else 0),
        ("kills / restarts", f"{s['kills']} / {s['restarts']}"),
        ("wrong reads", s["wrong_reads"]),
        ("invariant samples (stats / dumps)", f"{s['sampler']['samples']} / {s['sampler']['dumps']}"),
        ("invariant violations", s["sampler"]["violations"] + s["worker_violations"]),
        ("max record_total_size / bound", f"{s['sampler']['max_record_total_size']} / {s['sampler']['bound']}"),
        ("max latency ms (get / put)", f"{s['max_latency_ms']['get']} / {s['max_latency_ms']['put']}"),
        ("crashed / hung workers", f"{s['crashes']} / {s['hung']}"),
        ("verify()", "[]" if not s["final"]["verify"] else f"{len(s['final']['verify'])} problems"),
        ("RESULT", "PASSED" if s["passed"] else "FAILED"),
    ]
    try:
        from prettytable import PrettyTable
    except ImportError:  # the table is a convenience; the JSON holds everything
        for k, v in rows:
            print(f"{k:40} {v}")
    else:
        t = PrettyTable(["measure", "value"])
        t.align = "l"
        for row in rows:
            t.add_row(row)
        print(t)
    for f in s["failures"][:10]:
        print("FAILURE:", f, file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workers", type=int, default=16, help="worker processes running at once")
    p.add_argument("--duration", type=float, default=20.0, help="seconds")
    p.add_argument("--path", default="", help="cache directory (default: a fresh temporary one)")
    p.add_argument("--core", choices=("auto", "ext", "py", "mixed"), default="auto",
                   help="hot index: compiled, pure Python, as NVCACHE_NO_EXTENSIONS says, or mixed (odd workers "
                        "on the twin; workers 2-3 of every 4 without the write map)")
    p.add_argument("--pidns", type=int, default=-1,
                   help="workers run as PID 1 in their own PID namespace (-1: a quarter, where unshare works)")
    p.add_argument("--mix", default=DEFAULT_MIX, help="op weights")
    p.add_argument("--keys", type=int, default=3000, help="distinct layer ids")
    p.add_argument("--skew", type=float, default=2.0, help="key popularity skew (1 = uniform)")
    p.add_argument("--min-size", type=int, default=256, help="smallest record, bytes")
    p.add_argument("--max-size", type=int, default=16384, help="largest record, bytes")
    p.add_argument("--max-mb", type=float, default=2.0, help="cache bound, MiB")
    p.add_argument("--durable", action="store_true", help="open with durable=True")
    p.add_argument("--policy", default="lru", help="the cache's eviction policy (a name in nvcache.POLICIES)")
    p.add_argument("--lock-timeout", type=float, default=10.0, help="LayerCache lock_timeout, s")
    p.add_argument("--chaos", action="store_true", help="SIGKILL random workers and restart them")
    p.add_argument("--kill-every", type=float, default=0.5, help="mean seconds between kills")
    p.add_argument("--kill-margin", type=float, default=1.0, help="no kill in the last seconds")
    p.add_argument("--sample-every", type=float, default=0.01, help="seconds between invariant samples")
    p.add_argument("--seed", type=int, default=1, help="random seed")
    p.add_argument("--json", default="", help="write the summary here")
    p.add_argument("--quiet", action="store_true", help="no table")
    # internal: one worker
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--slot", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--incarnation", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    p.add_argument("--status", default="", help=argparse.SUPPRESS)
    p.add_argument("--in-pidns", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        args.pidns = args.in_pidns
        return worker_main(args)
    parse_mix(args.mix)
    if args.workers < 1 or args.duration <= 0 or args.keys < 1:
        raise SystemExit("--workers, --duration and --keys must be positive")
    if not 1 <= args.min_size <= args.max_size:
        raise SystemExit("need 1 <= --min-size <= --max-size")
    if args.max_size > args.max_mb * 1024 * 1024:
        raise SystemExit("--max-size must not exceed the bound (--max-mb)")
    return supervise(args)


if __name__ == "__main__":
    sys.exit(main())
