"""Reliability campaigns (issue 3), short forms, over both cores.

A cache is an optimisation: it must never take a scanner down, block it for
long, return wrong bytes or lose what it acknowledged. Each campaign below
attacks one of those promises:

* kill -9: a writer SIGKILLed at random moments (opening, eviction-heavy
  puts, delete, clear); the cache must hold exactly what its acknowledged
  operations left, possibly plus the one in flight, byte-exact, verify() == [];
* corruption of every file in the directory by every kind of damage; the
  victim opener runs in a child process and each outcome is classified as
  rebuilt at open / served as misses / CacheError / intact / crashed;
* reboots (a faked boot id), bounded waits (SIGSTOP with the lock held),
  hostile /tmp (symlinks, foreign owners, modes), fuzzing of the whole
  public API, a full disk (tmpfs), and hundreds of openers, some killed.

Sizes: the default is the short form run by ``make test``. Environment:
``NVCACHE_CAMPAIGN_ROUNDS`` (kill rounds per core), ``NVCACHE_CORRUPTION_ROUNDS``
(rounds per damage kind and file), ``NVCACHE_OPENERS`` (opener processes),
``NVCACHE_FUZZ_EXAMPLES``, and ``NVCACHE_CAMPAIGN_RESULTS`` (a directory:
each campaign writes its figures there as JSON). For example the long form::

    NVCACHE_CAMPAIGN_ROUNDS=200 NVCACHE_CORRUPTION_ROUNDS=8 NVCACHE_OPENERS=200 \\
    NVCACHE_CAMPAIGN_RESULTS=bench/results/reliability \\
        .venv/bin/python -m pytest -q tests/test_reliability.py -k "kill or corruption or openers"
"""

from __future__ import annotations

import collections
import errno
import faulthandler
import fcntl
import hashlib
import json
import math
import os
import random
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

import nvcache
from nvcache import CacheError, CacheFull, CacheTimeout, RecordTooLarge
from nvcache.readertable import FLAG_OFFSET, SLOT_SIZE, SLOTS, SLOTS_OFFSET
from nvcache.cachedir import FORMAT_DIR, format_dir
from payloads import incompressible

MiB = 1024 * 1024
NOBODY = 65534
OTHER_UID = 65533


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


KILL_ROUNDS = env_int("NVCACHE_CAMPAIGN_ROUNDS", 30)
CORRUPTION_ROUNDS = env_int("NVCACHE_CORRUPTION_ROUNDS", 1)
OPENERS = env_int("NVCACHE_OPENERS", 200)
FUZZ_EXAMPLES = env_int("NVCACHE_FUZZ_EXAMPLES", 150)
RESULTS = os.environ.get("NVCACHE_CAMPAIGN_RESULTS", "")


def save_figures(name: str, core: Any, figures: Dict[str, Any]) -> None:
    if not RESULTS:
        return
    os.makedirs(RESULTS, exist_ok=True)
    core_name = "py" if core.__name__ == "nvcache.fallback" else "ext"
    with open(os.path.join(RESULTS, f"{name}-{core_name}.json"), "w") as f:
        json.dump(figures, f, indent=2, sort_keys=True)
        f.write("\n")


# -- records: deterministic functions of their key --------------------------------

def lid(i: int) -> str:
    return f"sha256:{i:064x}"


def name_of(i: int) -> str:
    return lid(i) + "_layer_file"


def index_of(name: str) -> int:
    assert name.startswith("sha256:") and name.endswith("_layer_file"), name
    return int(name[7:71], 16)


def size_of(i: int, lo: int, hi: int) -> int:
    h = int.from_bytes(hashlib.blake2b(b"%d" % i, digest_size=8).digest(), "little")
    return lo + h % (hi - lo + 1)


def record(i: int, size: int) -> bytes:
    """Incompressible (stored raw), so that a record's stored size is ``size``."""
    return (struct.pack("<QQ", i, size) + random.Random(i * 1_000_003 + size).randbytes(size))[:size]


# -- child processes ------------------------------------------------------------------

class Outcome:
    """How a child process ended: ok (with its JSON value), exception, signal, exit or timeout."""

    def __init__(self, kind: str, value: Any = None, detail: str = "") -> None:
        self.kind = kind
        self.value = value
        self.detail = detail

    @property
    def crashed(self) -> bool:
        return self.kind in ("signal", "exception", "exit", "timeout")

    def __repr__(self) -> str:
        return f"Outcome({self.kind}, {self.value!r}, {self.detail[-2000:]})"


def _child_run(fn: Callable[[], Any], wfd: int) -> None:
    try:
        try:
            value = fn()
            payload = {"ok": value}
        except CacheError as exc:
            payload = {"cache_error": f"{type(exc).__name__}: {exc}"}
        except BaseException as exc:  # everything else is a crash of the caller
            payload = {"exception": f"{type(exc).__name__}: {exc}", "tb": traceback.format_exc()}
        data = json.dumps(payload).encode()
        view = memoryview(data)
        while view:
            n = os.write(wfd, view)
            view = view[n:]
    finally:
        os._exit(0)


def start_forked(fn: Callable[[], Any]) -> Tuple[int, int]:
    """Run ``fn`` in a forked child; returns (pid, read end of its result pipe)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        _child_run(fn, w)
    os.close(w)
    return pid, r


def finish_forked(pid: int, r: int, timeout: float) -> Outcome:
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return Outcome("timeout", detail=f"no answer within {timeout} s")
            ready, _, _ = select.select([r], [], [], left)
            if ready:
                chunk = os.read(r, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return Outcome("signal", os.WTERMSIG(status), f"died of signal {os.WTERMSIG(status)}")
    raw = b"".join(chunks)
    if not raw:
        return Outcome("exit", os.WEXITSTATUS(status), "no result")
    payload = json.loads(raw)
    if "ok" in payload:
        return Outcome("ok", payload["ok"])
    if "cache_error" in payload:
        return Outcome("cache_error", payload["cache_error"])
    return Outcome("exception", payload["exception"], payload.get("tb", ""))


def run_forked(fn: Callable[[], Any], timeout: float = 60.0) -> Outcome:
    pid, r = start_forked(fn)
    return finish_forked(pid, r, timeout)


def reap(pids: List[int]) -> None:
    """Kill and reap stragglers (teardown)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


@pytest.fixture
def children():
    pids: List[int] = []
    yield pids
    reap(pids)


@pytest.fixture
def popen_procs():
    procs: List[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGCONT)
            except ProcessLookupError:
                pass
            p.kill()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


# =========================================================================================
# kill -9 campaign
# =========================================================================================

PUT, DELETE, CLEAR = "P", "D", "C"


def kill_plan(seed: int, first_key: int, n_ops: int) -> List[Tuple[str, int]]:
    """The writer's ops, a deterministic function of the seed: mostly new puts."""
    rng = random.Random(seed)
    ops: List[Tuple[str, int]] = []
    nxt = first_key
    for _ in range(n_ops):
        x = rng.random()
        if x < 0.75 or nxt == first_key:
            ops.append((PUT, nxt))
            nxt += 1
        elif x < 0.85:  # put again: present (no change) or evicted (inserted again)
            ops.append((PUT, rng.randrange(max(first_key - 50, 0), nxt)))
        elif x < 0.985:
            ops.append((DELETE, rng.randrange(max(first_key - 30, 0), nxt)))
        else:
            ops.append((CLEAR, 0))
    return ops


class LruModel:
    """The cache's contents as the semantics say: puts in order, oldest first out."""

    def __init__(self, order: List[Tuple[int, int]], max_bytes: int) -> None:
        self.records = collections.OrderedDict(order)  # key -> size, oldest first
        self.max_bytes = max_bytes

    def copy(self) -> "LruModel":
        return LruModel(list(self.records.items()), self.max_bytes)

    def apply(self, op: Tuple[str, int], lo: int, hi: int) -> None:
        kind, i = op
        if kind == CLEAR:
            self.records.clear()
        elif kind == DELETE:
            self.records.pop(i, None)
        elif i not in self.records:
            size = size_of(i, lo, hi)
            over = sum(self.records.values()) + size - self.max_bytes
            while over > 0:
                _victim, vsize = self.records.popitem(last=False)
                over -= vsize
            self.records[i] = size

    def keys(self) -> List[int]:
        return list(self.records)


def _writer(Cache: type, path: str, max_mb: float, plan: List[Tuple[str, int]], lo: int, hi: int,
            ack_fd: int) -> Callable[[], Any]:
    def run() -> Any:
        cache = Cache(path, max_mb)
        for step, (kind, i) in enumerate(plan):
            if kind == PUT:
                cache.put(lid(i), record(i, size_of(i, lo, hi)))
            elif kind == DELETE:
                cache.delete(lid(i))
            else:
                cache.clear()
            os.write(ack_fd, struct.pack("<I", step))
        cache.close()
        return "done"
    return run


KILL_SHAPES = [
    # (name, bound MiB, record sizes lo..hi): eviction-heavy with small and large records
    ("evict-small", 0.25, 4096, 40000),
    ("evict-large", 2.0, 100_000, 600_000),
    ("roomy", 8.0, 200, 9000),
]


def test_kill9_campaign(Cache, cache_dir, core, children):
    """SIGKILL a writer at random moments; acknowledged work survives byte-exact."""
    rng = random.Random(0x51C)
    state: Dict[str, List[Tuple[int, int]]] = {}
    figures = {"rounds": 0, "kills": 0, "completed_plans": 0, "acked_ops": 0, "acked_puts": 0,
               "acked_new_puts": 0, "in_flight_committed": 0, "lost": 0, "mismatches": [],
               "by_shape": {}}
    next_key = 0
    for rnd in range(KILL_ROUNDS):
        shape, max_mb, lo, hi = KILL_SHAPES[rnd % len(KILL_SHAPES)]
        path = os.path.join(cache_dir, shape)
        model = LruModel(state.get(shape, []), int(max_mb * MiB))
        plan = kill_plan(rnd, next_key, 6000)
        next_key += 6000
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            os.close(r)
            try:
                _writer(Cache, path, max_mb, plan, lo, hi, w)()
            finally:
                os._exit(0)
        children.append(pid)
        os.close(w)
        # Kill at a random moment: often early (inside open), mostly while writing.
        delay = rng.choice([0.0, rng.uniform(0, 0.01), rng.uniform(0, 0.1), rng.uniform(0, 0.25)])
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        children.remove(pid)
        acks = b""
        while True:
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            acks += chunk
        os.close(r)
        n = len(acks) // 4
        assert acks == b"".join(struct.pack("<I", s) for s in range(n))
        killed = os.WIFSIGNALED(status)
        figures["rounds"] += 1
        figures["kills"] += int(killed and n < len(plan))
        figures["completed_plans"] += int(n == len(plan))
        # Expected: the acknowledged ops applied; maybe also the one in flight.
        before = model.copy()
        for op in plan[:n]:
            if op[0] == PUT:
                figures["acked_puts"] += 1
                figures["acked_new_puts"] += int(op[1] not in model.records)
            model.apply(op, lo, hi)
        figures["acked_ops"] += n
        candidates = [model.keys()]
        if n < len(plan):
            nxt = model.copy()
            nxt.apply(plan[n], lo, hi)
            candidates.append(nxt.keys())
        # Check from the parent: exact contents, LRU order, bytes, counters, verify().
        with Cache(path, max_mb) as cache:
            dump = cache.cache_data()
            got = [index_of(r_["layer_id"]) for r_ in dump["cache_records"]]
            if got not in candidates:
                missing = set(candidates[0]) - set(got)
                if len(candidates) > 1:
                    missing &= set(candidates[1])
                figures["lost"] += len(missing)
                figures["mismatches"].append({"round": rnd, "shape": shape, "acked": n,
                                              "expected": candidates, "got": got})
            elif len(candidates) > 1 and got == candidates[1] and candidates[0] != candidates[1]:
                figures["in_flight_committed"] += 1
            for r_ in dump["cache_records"]:
                i = index_of(r_["layer_id"])
                assert r_["size"] == size_of(i, lo, hi)
            assert dump["record_total_size"] == sum(r_["size"] for r_ in dump["cache_records"])
            assert dump["record_total_size"] <= cache.max_bytes
            for i in got:  # in LRU order, so the order stays as it was
                assert cache.get(lid(i)) == record(i, size_of(i, lo, hi)), (rnd, shape, i)
            assert cache.verify() == []
            st = cache.stats()
            assert st["record_count"] == len(got)
            order = [index_of(r_["layer_id"]) for r_ in cache.cache_data()["cache_records"]]
        assert order == got
        state[shape] = [(i, size_of(i, lo, hi)) for i in got]
        del before
        by = figures["by_shape"].setdefault(shape, {"rounds": 0, "acked_ops": 0})
        by["rounds"] += 1
        by["acked_ops"] += n
    save_figures("kill9", core, figures)
    assert figures["mismatches"] == [], figures["mismatches"][:3]
    assert figures["lost"] == 0
    # The campaign really killed writers mid-work and really acknowledged work.
    assert figures["kills"] >= KILL_ROUNDS // 2
    assert figures["acked_new_puts"] >= KILL_ROUNDS * 3


# =========================================================================================
# corruption campaign
# =========================================================================================

PAGE = 4096
P_BRANCH, P_LEAF, P_OVERFLOW, P_META = 0x01, 0x02, 0x04, 0x08
CORRUPT_KEYS = 250
CORRUPT_LO, CORRUPT_HI = 100, 6000
GENERIC_DAMAGE = ["truncate-zero", "truncate-random", "zero-fill", "random-bytes", "garbage-file",
                  "delete", "replace-with-directory", "foreign-owner"]
# The files attacked: every file nvcache opens. Not `lock`: nvcache flocks the directory and
# never opens a `lock` file (one left by the seed's scanner is left alone), so damage to it
# tested nothing; the "foreign-owner" and "stale-garbage" damage once aimed at it became
# "foreign-owner" on every file below ("stale-garbage" is what "garbage-file" already does).
CACHE_FILES = ["data.mdb", "version", "users", "clean", "readers"]
SPECIAL_DAMAGE = {
    "data.mdb": ["meta-page", "branch-page", "leaf-page", "overflow-page", "whole-page-random",
                 "bit-rot-mtime-kept"],
    "version": ["other-version", "seed-version-0", "not-json"],
    # A writer killed between raising and lowering the flag; readers killed inside a read.
    "readers": ["flag-stuck", "slots-stuck"],
}


def populate(Cache: type, path: str) -> None:
    with Cache(path, 1) as cache:
        for i in range(CORRUPT_KEYS):
            cache.put(lid(i), record(i, size_of(i, CORRUPT_LO, CORRUPT_HI)))
        for i in range(0, CORRUPT_KEYS, 3):
            cache.get(lid(i))


def lmdb_used_bytes(path: str) -> int:
    """The bytes of an LMDB file in use (up to its last page), read from the newer meta page.

    With a write map the file is as long as the whole map (sparse): damage aimed at its
    size would land in holes. Falls back to the file's size when the meta pages are unreadable.
    """
    with open(path, "rb") as f:
        head = f.read(2 * PAGE)
    try:
        metas = [head[:PAGE], head[PAGE:]]
        meta = max(metas, key=lambda m: struct.unpack_from("<Q", m, 144)[0])
        used = (struct.unpack_from("<Q", meta, 136)[0] + 1) * PAGE
    except struct.error:
        return os.path.getsize(path)
    return min(used, os.path.getsize(path))


def live_pages(path: str) -> Dict[str, List[int]]:
    """The pages of data.mdb in use, by kind: walks LMDB's B-trees from the newest meta page."""
    with open(path, "rb") as f:
        raw = f.read(lmdb_used_bytes(path))

    def page(n: int) -> bytes:
        return raw[n * PAGE:(n + 1) * PAGE]

    metas = [page(0), page(1)]
    meta = max(metas, key=lambda m: struct.unpack_from("<Q", m, 144)[0])
    roots = [struct.unpack_from("<Q", meta, 80)[0], struct.unpack_from("<Q", meta, 128)[0]]
    out: Dict[str, List[int]] = {"branch": [], "leaf": [], "overflow": []}
    invalid = (1 << 64) - 1

    def walk(pgno: int, main: bool) -> None:
        if pgno == invalid or pgno * PAGE >= len(raw):
            return
        pg = page(pgno)
        flags, lower = struct.unpack_from("<HH", pg, 10)
        n = (lower - 16) >> 1
        ptrs = struct.unpack_from(f"<{n}H", pg, 16)
        if flags & P_BRANCH:
            out["branch"].append(pgno)
            for off in ptrs:
                lo, hi, fl = struct.unpack_from("<HHH", pg, off)
                walk(lo | hi << 16 | fl << 32, main)
        elif flags & P_LEAF:
            out["leaf"].append(pgno)
            for off in ptrs:
                _lo, _hi, fl, ksize = struct.unpack_from("<HHHH", pg, off)
                data = off + 8 + ksize
                if fl & 0x01:  # F_BIGDATA: the value lives on overflow pages
                    out["overflow"].append(struct.unpack_from("<Q", pg, data)[0])
                elif fl & 0x02 and main:  # F_SUBDATA: a named database's root
                    walk(struct.unpack_from("<Q", pg, data + 40)[0], False)

    walk(roots[0], False)
    walk(roots[1], True)
    return out


def damage(path: str, fname: str, kind: str, rng: random.Random) -> str:
    """Damage ``path/fname`` in the way ``kind`` says; returns what was done."""
    target = os.path.join(path, fname)
    size = lmdb_used_bytes(target) if fname == "data.mdb" else os.path.getsize(target)

    def scribble(start: int, end: int, spans: int) -> str:
        done = []
        with open(target, "r+b") as f:
            for _ in range(spans):
                off = rng.randrange(start, max(start + 1, end))
                ln = rng.randint(1, 64)
                f.seek(off)
                f.write(os.urandom(ln))
                done.append(f"{ln}@{off}")
        return "random bytes " + ",".join(done)

    if kind == "truncate-zero":
        os.truncate(target, 0)
        return "truncated to 0"
    if kind == "truncate-random":
        n = rng.randrange(0, max(size, 1))
        os.truncate(target, n)
        return f"truncated to {n} of {size}"
    if kind == "zero-fill":
        if size == 0:
            return "empty file: nothing to zero"
        unit = PAGE if fname == "data.mdb" else 1
        start = rng.randrange(0, max(size // unit, 1)) * unit
        ln = min(rng.randint(1, 16) * unit, size - start)
        with open(target, "r+b") as f:
            f.seek(start)
            f.write(b"\0" * ln)
        return f"zeroed {ln}@{start}"
    if kind == "random-bytes":
        if size == 0:
            with open(target, "wb") as f:
                f.write(os.urandom(rng.randint(1, 64)))
            return "random bytes into an empty file"
        return scribble(0, size, rng.randint(1, 8))
    if kind == "garbage-file":
        with open(target, "wb") as f:
            f.write(os.urandom(rng.randint(1, 8192)))
        return "replaced by random bytes"
    if kind == "delete":
        os.unlink(target)
        return "deleted"
    if kind == "replace-with-directory":
        os.unlink(target)
        os.mkdir(target, 0o750)
        return "replaced by a directory"
    if kind in ("meta-page", "branch-page", "leaf-page", "overflow-page", "whole-page-random",
                "bit-rot-mtime-kept"):
        if kind == "meta-page":
            pages = [0, 1]
        else:
            live = live_pages(target)
            pages = {"branch-page": live["branch"], "leaf-page": live["leaf"],
                     "overflow-page": live["overflow"],
                     "whole-page-random": live["branch"] + live["leaf"] + live["overflow"],
                     "bit-rot-mtime-kept": live["branch"] + live["leaf"]}[kind]
        if not pages:
            return f"no {kind} in the file"
        page = rng.choice(pages)
        st = os.stat(target)
        if kind == "whole-page-random":
            with open(target, "r+b") as f:
                f.seek(page * PAGE)
                f.write(os.urandom(PAGE))
            return f"page {page} replaced by random bytes"
        if kind == "meta-page" or kind == "overflow-page":
            # Within the page, header included sometimes.
            start = page * PAGE + (0 if rng.random() < 0.3 else 16)
            what = scribble(start, page * PAGE + PAGE, rng.randint(1, 4))
        else:  # the used part of a B-tree page: its header, pointers or nodes
            with open(target, "rb") as f:
                f.seek(page * PAGE + 12)
                lower, upper = struct.unpack("<HH", f.read(4))
            region = rng.choice([(0, 16), (16, max(lower, 17)), (min(upper, PAGE - 1), PAGE)])
            what = scribble(page * PAGE + region[0], page * PAGE + region[1], rng.randint(1, 4))
        if kind == "bit-rot-mtime-kept":
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
        return f"page {page}: {what}"
    if kind == "foreign-owner":
        os.chown(target, NOBODY, NOBODY)
        os.chmod(target, 0o600)
        return "owned by another uid, mode 0600"
    if kind == "other-version":
        with open(target, "w") as f:
            json.dump({"version": 999, "description": "from the future"}, f)
        return "version 999"
    if kind == "seed-version-0":
        with open(target, "w") as f:
            json.dump({"version": 0, "description": "initial implementation"}, f)
        return "the seed's version 0"
    if kind in ("flag-stuck", "slots-stuck"):
        with open(target, "r+b") as f:
            if kind == "flag-stuck":
                f.seek(FLAG_OFFSET)
                f.write(b"\1")
                return "writer flag left raised"
            picked = rng.sample(range(SLOTS), 5)
            for slot in picked:
                f.seek(SLOTS_OFFSET + slot * SLOT_SIZE)
                f.write(b"\1")
            return f"slots {picked} left set by dead readers"
    if kind == "not-json":
        with open(target, "wb") as f:
            f.write(b"\xff\xfe{version: one")
        return "not JSON"
    raise AssertionError(kind)


def _victim(Cache: type, path: str) -> Callable[[], Any]:
    """Open the damaged cache and use it as a scanner would; CacheError is allowed, nothing else."""
    def run() -> Any:
        out: Dict[str, Any] = {"open": "ok", "hits": 0, "misses": 0, "errors": 0, "wrong": 0}
        try:
            cache = Cache(path, 1)
        except CacheError as exc:
            out["open"] = f"CacheError: {exc}"
            return out
        try:
            out["count_at_open"] = cache.stats()["record_count"]
        except CacheError:
            out["count_at_open"] = None
            out["errors"] += 1
        read_back(cache, out)
        new = record(10**6, 777)
        try:
            cache.put(lid(10**6), new)
            out["roundtrip"] = cache.get(lid(10**6)) == new
        except CacheError as exc:
            out["roundtrip"] = f"CacheError: {exc}"
        cache.close()
        return out
    return run


def _follow_up(Cache: type, path: str) -> Callable[[], Any]:
    """A later scanner: the cache must be healthy again and never serve wrong bytes."""
    def run() -> Any:
        with Cache(path, 1) as cache:
            wrong = 0
            for i in list(range(CORRUPT_KEYS)) + [10**6]:
                data = cache.get(lid(i))
                size = 777 if i == 10**6 else size_of(i, CORRUPT_LO, CORRUPT_HI)
                if data is not None and data != record(i, size):
                    wrong += 1
            new = record(10**6 + 1, 999)
            cache.put(lid(10**6 + 1), new)
            return {"wrong": wrong, "verify": cache.verify(),
                    "roundtrip": cache.get(lid(10**6 + 1)) == new}
    return run


def classify(victim: Outcome, follow: Outcome) -> str:
    if victim.crashed or follow.crashed:
        return "crashed"
    v = victim.value if victim.kind == "ok" else {}
    if v.get("wrong") or (follow.kind == "ok" and follow.value["wrong"]):
        return "wrong-bytes"
    if victim.kind == "cache_error" or not str(v.get("open", "")).startswith("ok"):
        return "CacheError-at-open"
    if v.get("count_at_open") == 0:
        return "rebuilt-at-open"
    if v.get("errors"):
        return "CacheError-in-use"
    if v.get("misses"):
        return "served-as-miss"
    return "intact"


def read_back(cache: Any, out: Dict[str, Any]) -> None:
    """Read every record of a corrupted cache into ``out``'s hits, misses, wrong and errors, then
    its verify() (a CacheError there is reported as its problem)."""
    for i in range(CORRUPT_KEYS):
        try:
            data = cache.get(lid(i))
        except CacheError:
            out["errors"] += 1
            continue
        if data is None:
            out["misses"] += 1
        elif data == record(i, size_of(i, CORRUPT_LO, CORRUPT_HI)):
            out["hits"] += 1
        else:
            out["wrong"] += 1
    try:
        out["verify"] = cache.verify()
    except CacheError as exc:
        out["verify"] = [f"{type(exc).__name__}: {exc}"]


def corruption_cases() -> List[Tuple[str, str]]:
    cases = [(f, k) for f in CACHE_FILES for k in GENERIC_DAMAGE]
    cases += [(f, k) for f, kinds in SPECIAL_DAMAGE.items() for k in kinds]
    return cases


def test_corruption_campaign(Cache, tmp_path, core):
    """Every kind of damage to every file: zero crashes, never wrong bytes, healthy afterwards."""
    rng = random.Random(0xC0FFEE)
    table: Dict[str, Dict[str, int]] = {}
    rounds: List[Dict[str, Any]] = []
    bad: List[Dict[str, Any]] = []
    n = 0
    seen_files: set = set()
    for rnd in range(CORRUPTION_ROUNDS):
        for fname, kind in corruption_cases():
            n += 1
            path = str(tmp_path / f"c{n}")
            populate(Cache, path)
            files = format_dir(path)
            seen_files.update(os.listdir(files))
            if fname not in os.listdir(files):
                pytest.fail(f"{fname} is not in a cache directory any more: {os.listdir(files)}")
            seed = rng.randrange(1 << 30)
            what = damage(files, fname, kind, random.Random(seed))
            victim = run_forked(_victim(Cache, path), timeout=120)
            follow = run_forked(_follow_up(Cache, path), timeout=120)
            outcome = classify(victim, follow)
            row = {"file": fname, "kind": kind, "seed": seed, "damage": what, "outcome": outcome,
                   "victim": repr(victim)[:1500], "follow_up": repr(follow)[:1500]}
            rounds.append(row)
            table.setdefault(f"{fname}:{kind}", {}).setdefault(outcome, 0)
            table[f"{fname}:{kind}"][outcome] += 1
            healthy_after = (follow.kind == "ok" and follow.value["verify"] == []
                             and follow.value["roundtrip"] is True)
            if outcome in ("crashed", "wrong-bytes") or not healthy_after:
                bad.append(row)
            shutil.rmtree(path, ignore_errors=True)
    totals: Dict[str, int] = {}
    for counts in table.values():
        for k, v in counts.items():
            totals[k] = totals.get(k, 0) + v
    save_figures("corruption", core, {"corruptions": n, "totals": totals, "by_damage": table,
                                      "failures": bad, "files": sorted(seen_files)})
    print(json.dumps(totals))
    # Every file in a cache directory was attacked.
    assert {f for f, _k in corruption_cases()} >= seen_files - {"lock.mdb"}, seen_files
    assert totals.get("crashed", 0) == 0, [b for b in bad if b["outcome"] == "crashed"][:5]
    assert totals.get("wrong-bytes", 0) == 0, [b for b in bad if b["outcome"] == "wrong-bytes"][:5]
    assert bad == [], bad[:5]
    # The damage was real: some of it was noticed and repaired.
    assert totals.get("rebuilt-at-open", 0) > 0


# =========================================================================================
# reboots: a faked boot id
# =========================================================================================

def _with_boot(boot_id: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        os.environ["NVCACHE_BOOT_ID"] = boot_id
        return fn()
    return run


def _fill(Cache: type, path: str, durable: bool, keys: range) -> Callable[[], Any]:
    def run() -> Any:
        with Cache(path, 1, durable=durable) as cache:
            for i in keys:
                cache.put(lid(i), record(i, 500))
            return len(cache)
    return run


def _contents(Cache: type, path: str, durable: bool) -> Callable[[], Any]:
    def run() -> Any:
        with Cache(path, 1, durable=durable) as cache:
            present = [i for i in range(40) if cache.get(lid(i)) is not None]
            for i in present:
                assert cache.get(lid(i)) == record(i, 500)
            return {"present": present, "verify": cache.verify()}
    return run


def test_reboot_rebuilds_a_non_durable_cache(Cache, cache_dir):
    assert run_forked(_with_boot("boot-A", _fill(Cache, cache_dir, False, range(10)))).value == 10
    # Same boot: kept.
    same = run_forked(_with_boot("boot-A", _contents(Cache, cache_dir, False)))
    assert same.kind == "ok", same
    assert same.value == {"present": list(range(10)), "verify": []}
    # After a reboot, a non-durable cache may hold torn pages: rebuilt, empty and healthy.
    after = run_forked(_with_boot("boot-B", _contents(Cache, cache_dir, False)))
    assert after.kind == "ok", after
    assert after.value == {"present": [], "verify": []}
    # And it works under the new boot id, and survives a reopen in that boot.
    assert run_forked(_with_boot("boot-B", _fill(Cache, cache_dir, False, range(20, 25)))).value == 5
    again = run_forked(_with_boot("boot-B", _contents(Cache, cache_dir, False)))
    assert again.value == {"present": list(range(20, 25)), "verify": []}


def test_reboot_keeps_a_durable_cache(Cache, cache_dir):
    assert run_forked(_with_boot("boot-A", _fill(Cache, cache_dir, True, range(10)))).value == 10
    after = run_forked(_with_boot("boot-B", _contents(Cache, cache_dir, True)))
    assert after.kind == "ok", after
    assert after.value == {"present": list(range(10)), "verify": []}
    again = run_forked(_with_boot("boot-C", _contents(Cache, cache_dir, True)))
    assert again.value == {"present": list(range(10)), "verify": []}


def test_reboot_after_a_non_durable_writer_rebuilds_even_a_durable_cache(Cache, cache_dir):
    """One non-durable writer since the boot is enough for torn pages after a crash."""
    assert run_forked(_with_boot("boot-A", _fill(Cache, cache_dir, True, range(5)))).value == 5
    assert run_forked(_with_boot("boot-A", _fill(Cache, cache_dir, False, range(5, 10)))).value == 10
    after = run_forked(_with_boot("boot-B", _contents(Cache, cache_dir, True)))
    assert after.kind == "ok", after
    assert after.value == {"present": [], "verify": []}


# =========================================================================================
# bounded waits: SIGSTOP with a lock held
# =========================================================================================

# Holds the cache lock as nvcache does: "sh" as a reader under the flock, "ex" as a writer (the
# exclusive flock, then the readers table's writer flag, which keeps readers without the flock out).
LOCK_HOLDER = r"""
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
fcntl.flock(fd, fcntl.LOCK_SH if sys.argv[2] == "sh" else fcntl.LOCK_EX)
if sys.argv[2] == "ex":
    table = os.open(os.path.join(sys.argv[1], "readers"), os.O_RDWR)
    os.pwrite(table, b"\1", int(sys.argv[3]))
print("locked", flush=True)
time.sleep(120)
"""


def reader_slots_set(path: str) -> int:
    """How many readers are inside a read without the flock (slots set in the readers table)."""
    with open(os.path.join(format_dir(path), "readers"), "rb") as f:
        table = f.read()
    return sum(1 for i in range(SLOTS) if table[SLOTS_OFFSET + i * SLOT_SIZE])


def writer_flag_raised(path: str) -> bool:
    """Whether a writer is inside its transaction (the readers table's writer flag)."""
    with open(os.path.join(format_dir(path), "readers"), "rb") as f:
        f.seek(FLAG_OFFSET)
        return f.read(1) == b"\1"


def lock_state(path: str) -> str:
    """'free', 'shared' or 'exclusive': how another process holds the cache lock now.

    Shared: a reader holds the directory's flock, or is inside a read through its slot.
    """
    fd = os.open(format_dir(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return "shared" if reader_slots_set(path) else "free"
        except BlockingIOError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return "shared"
        except BlockingIOError:
            return "exclusive"
    finally:
        os.close(fd)


def timed(fn: Callable[[], Any]) -> Tuple[Any, float]:
    t0 = time.monotonic()
    try:
        return fn(), time.monotonic() - t0
    except Exception as exc:  # noqa: BLE001 - returned for the caller's assertion
        return exc, time.monotonic() - t0


TIMEOUT = 0.4


def assert_times_out(fn: Callable[[], Any], what: str) -> None:
    result, took = timed(fn)
    assert isinstance(result, CacheTimeout), f"{what}: expected CacheTimeout, got {result!r}"
    assert isinstance(result, CacheError)
    assert TIMEOUT * 0.9 <= took <= TIMEOUT + 2.0, f"{what} waited {took:.2f} s"


def _stopped_holder(path: str, mode: str, procs: List[subprocess.Popen]) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, format_dir(path), mode, str(FLAG_OFFSET)],
                              stdout=subprocess.PIPE, text=True)
    procs.append(holder)
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGSTOP)
    return holder


def _release(holder: subprocess.Popen) -> None:
    holder.send_signal(signal.SIGCONT)
    holder.kill()
    holder.wait(timeout=10)


def test_stopped_exclusive_holder_gives_timeouts_then_recovers(Cache, cache_dir, popen_procs):
    with Cache(cache_dir, 1) as cache:
        cache.put(lid(1), record(1, 300))
    # A process stopped while holding the exclusive lock: a new opener gives up after lock_timeout.
    holder = _stopped_holder(cache_dir, "ex", popen_procs)
    assert lock_state(cache_dir) == "exclusive"
    assert_times_out(lambda: Cache(cache_dir, 1, lock_timeout=TIMEOUT), "open")
    _release(holder)
    opened = Cache(cache_dir, 1, lock_timeout=TIMEOUT)
    try:
        # ... and so does every operation of a cache opened before.
        holder = _stopped_holder(cache_dir, "ex", popen_procs)
        for what, fn in [("get", lambda: opened.get(lid(1))), ("put", lambda: opened.put(lid(2), b"x")),
                         ("delete", lambda: opened.delete(lid(1))), ("contains", lambda: lid(1) in opened),
                         ("len", lambda: len(opened)), ("stats", opened.stats),
                         ("cache_data", opened.cache_data), ("clear", opened.clear),
                         ("verify", opened.verify)]:
            assert_times_out(fn, what)
        _release(holder)
        # Then everything works again, and nothing was changed meanwhile.
        assert opened.get(lid(1)) == record(1, 300)
        assert opened.put(lid(2), b"x") is True
        assert opened.verify() == []
        assert opened.stats()["record_count"] == 2
        # A shared holder (a stopped reader) blocks writers only.
        holder = _stopped_holder(cache_dir, "sh", popen_procs)
        assert_times_out(lambda: opened.put(lid(3), b"x"), "put behind a reader")
        assert opened.get(lid(2)) == b"x"
        _release(holder)
        assert opened.put(lid(3), b"x") is True
    finally:
        opened.close()


def _busy(Cache: type, path: str, mode: str, stop_file: str) -> Callable[[], Any]:
    def run() -> Any:
        n = 0
        with Cache(path, 4) as cache:
            big = [record(i, 1_500_000) for i in range(4)]
            while not os.path.exists(stop_file):
                if mode == "put":  # eviction-heavy puts of large records
                    cache.put(lid(1000 + n), big[n % 4])
                else:
                    assert cache.get(lid(n % 2)) == record(n % 2, 1_500_000)
                n += 1
        return n
    return run


def wait_stopped(pid: int, timeout: float = 10.0) -> None:
    """Wait until ``pid`` is really stopped (state T in /proc), not just signalled."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                return
        time.sleep(0.0005)
    raise AssertionError(f"process {pid} did not stop")


def catch_holding(pid: int, path: str, want: str, attempts: int = 400) -> bool:
    """SIGSTOP ``pid`` at random moments until it is stopped holding the lock as ``want``.

    "exclusive" means inside a write transaction: the flock held and the writer flag raised.
    A writer holds the flock a moment before it raises the flag and after it lowers it, and
    readers with a slot rightly go ahead then (no page is changing).
    """
    rng = random.Random(pid)
    for _ in range(attempts):
        time.sleep(rng.uniform(0, 0.004))
        os.kill(pid, signal.SIGSTOP)
        wait_stopped(pid)
        if lock_state(path) == want and (want != "exclusive" or writer_flag_raised(path)):
            return True
        os.kill(pid, signal.SIGCONT)
    return False


def test_writer_stopped_inside_put(Cache, cache_dir, children):
    with Cache(cache_dir, 4) as cache:
        cache.put(lid(0), record(0, 1_500_000))
    stop = os.path.join(os.path.dirname(cache_dir), "stop")
    pid, r = start_forked(_busy(Cache, cache_dir, "put", stop))
    children.append(pid)
    time.sleep(0.2)
    assert catch_holding(pid, cache_dir, "exclusive"), "never caught the writer inside a put"
    try:
        assert_times_out(lambda: Cache(cache_dir, 4, lock_timeout=TIMEOUT), "open")
    finally:
        os.kill(pid, signal.SIGCONT)
    # Open while it runs, then stop it inside a put again with the cache open here.
    other = Cache(cache_dir, 4, lock_timeout=TIMEOUT)
    try:
        assert catch_holding(pid, cache_dir, "exclusive")
        assert_times_out(lambda: other.get(lid(0)), "get")
        assert_times_out(lambda: other.put(lid(5), b"y"), "put")
        assert_times_out(other.stats, "stats")
        os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 20
        while True:  # the writer is busy: a short timeout may still expire, but not forever
            try:
                other.put(lid(5), b"y")
                break
            except CacheTimeout:
                assert time.monotonic() < deadline
        with open(stop, "w"):
            pass
        out = finish_forked(pid, r, 60)
        children.remove(pid)
        assert out.kind == "ok" and out.value > 0, out
        # The busy writer's eviction-heavy puts may have evicted lid(5) before it stopped (it is
        # then the least recently used): put it again now that nobody else writes, either way.
        other.put(lid(5), b"y")
        assert other.get(lid(5)) == b"y"
        assert other.verify() == []
    finally:
        os.kill(pid, signal.SIGCONT) if pid in children else None
        other.close()


def test_reader_stopped_inside_get(Cache, cache_dir, children):
    """A reader stopped with the shared lock blocks writers (bounded), never readers."""
    with Cache(cache_dir, 4) as cache:
        for i in range(2):
            cache.put(lid(i), record(i, 1_500_000))
    stop = os.path.join(os.path.dirname(cache_dir), "stop")
    pid, r = start_forked(_busy(Cache, cache_dir, "get", stop))
    children.append(pid)
    other = Cache(cache_dir, 4, lock_timeout=TIMEOUT)
    try:
        time.sleep(0.2)
        assert catch_holding(pid, cache_dir, "shared"), "never caught the reader inside a get"
        assert_times_out(lambda: other.put(lid(7), b"z"), "put")
        assert_times_out(lambda: other.delete(lid(0)), "delete")
        # Reads go on, and keep going past the moment this process's buffer is due
        # (a due buffer must not turn a successful read into an error or a long wait).
        t_end = time.monotonic() + 1.5
        worst = 0.0
        while time.monotonic() < t_end:
            data, took = timed(lambda: other.get(lid(1)))
            worst = max(worst, took)
            assert data == record(1, 1_500_000), data
        assert worst < TIMEOUT / 2, f"a read waited {worst:.2f} s behind a stopped reader"
        os.kill(pid, signal.SIGCONT)
        with open(stop, "w"):
            pass
        out = finish_forked(pid, r, 60)
        children.remove(pid)
        assert out.kind == "ok", out
        assert other.put(lid(7), b"z") is True
        assert other.verify() == []
    finally:
        if pid in children:
            os.kill(pid, signal.SIGCONT)
        other.close()


# =========================================================================================
# hostile /tmp: symlinks, foreign owners, modes (as root, with a second uid)
# =========================================================================================

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second uid")


def as_uid(uid: int, fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        return fn()
    return run


@pytest.fixture
def open_tmp():
    """A temporary directory that a second uid can reach (pytest's tmp_path is 0o700)."""
    import pathlib
    path = tempfile.mkdtemp(prefix="nvcache-hostile-", dir="/tmp")
    os.chmod(path, 0o755)
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


def test_symlink_cache_path_is_refused(Cache, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "caches"
    link.symlink_to(target)
    with pytest.raises(CacheError, match="symlink"):
        Cache(str(link), 1)
    assert os.listdir(target) == []


@needs_root
def test_directory_of_another_user_is_refused(Cache, tmp_path):
    path = tmp_path / "caches"
    path.mkdir()
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(CacheError, match="owned by"):
        Cache(str(path), 1)
    assert os.listdir(path) == []


@needs_root
def test_second_uid_is_refused_another_users_directory(Cache, open_tmp):
    tmp_path = open_tmp
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o777)
    os.chmod(theirs, 0o777)
    os.chown(theirs, OTHER_UID, OTHER_UID)
    out = run_forked(as_uid(NOBODY, lambda: Cache(str(theirs), 1).close()))
    assert out.kind == "cache_error" and "owned by" in out.value, out
    assert os.listdir(theirs) == []
    # A cache root made for itself, 0o750: another uid gets a CacheError, never an OSError.
    with Cache(str(tmp_path / "roots"), 1) as cache:
        cache.put(lid(1), b"r")
    out = run_forked(as_uid(NOBODY, lambda: Cache(str(tmp_path / "roots"), 1).close()))
    assert out.kind == "cache_error", out


@needs_root
def test_second_uid_makes_its_own_cache_with_tight_modes(Cache, open_tmp):
    tmp_path = open_tmp
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    path = str(home / "caches")

    def use() -> Any:
        os.umask(0o022)
        with Cache(path, 1) as cache:
            cache.put(lid(1), b"mine")
            return cache.get(lid(1)) == b"mine"
    out = run_forked(as_uid(NOBODY, use))
    assert out.kind == "ok" and out.value is True, out
    for directory in (path, format_dir(path)):
        st = os.lstat(directory)
        assert st.st_uid == NOBODY and stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750
    assert os.listdir(path) == [FORMAT_DIR]
    for name in os.listdir(format_dir(path)):
        fst = os.lstat(os.path.join(format_dir(path), name))
        assert fst.st_uid == NOBODY, name
        assert stat.S_ISREG(fst.st_mode), name
        assert stat.S_IMODE(fst.st_mode) == 0o640, (name, oct(fst.st_mode))
    # Root may not adopt it either: it belongs to another user.
    with pytest.raises(CacheError, match="owned by"):
        Cache(path, 1)


@pytest.mark.parametrize("umask,dir_mode,file_mode", [(0o022, 0o750, 0o640), (0o002, 0o750, 0o640),
                                                      (0o027, 0o750, 0o640), (0o077, 0o700, 0o600)])
def test_modes_respect_a_stricter_umask(Cache, cache_dir, umask, dir_mode, file_mode):
    def make() -> Any:
        os.umask(umask)
        with Cache(cache_dir, 1) as cache:
            cache.put(lid(1), b"r")
        return sorted(os.listdir(format_dir(cache_dir)))
    out = run_forked(make)
    assert out.kind == "ok", out
    assert {"data.mdb", "version", "users"} <= set(out.value)
    assert os.listdir(cache_dir) == [FORMAT_DIR]
    assert stat.S_IMODE(os.lstat(cache_dir).st_mode) == dir_mode
    assert stat.S_IMODE(os.lstat(format_dir(cache_dir)).st_mode) == dir_mode
    for name in out.value:
        mode = os.lstat(os.path.join(format_dir(cache_dir), name)).st_mode
        assert stat.S_ISREG(mode), name
        assert stat.S_IMODE(mode) == file_mode, (name, oct(mode))


PLANTABLE = ["version", "lock", "data.mdb", "users", "clean"]


@pytest.mark.parametrize("name", PLANTABLE)
@pytest.mark.parametrize("victim_kind", ["empty", "text", "lmdb-like"])
@pytest.mark.parametrize("state", ["fresh", "existing"])
def test_planted_symlink_inside_never_leads_a_write_out(Cache, tmp_path, name, victim_kind, state):
    """A symlink planted in the cache directory must not let any write reach its target."""
    path = tmp_path / "caches"
    if state == "existing":
        with Cache(str(path), 1) as cache:
            cache.put(lid(1), record(1, 5000))
    else:
        path.mkdir(mode=0o750)
        os.mkdir(format_dir(str(path)), mode=0o750)
    victim = tmp_path / "victim"
    if victim_kind == "empty":
        victim.write_bytes(b"")
    elif victim_kind == "text":
        victim.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 50)
    else:  # a copy of a healthy cache file: LMDB would accept it
        src = tmp_path / "src"
        with Cache(str(src), 1) as cache:
            cache.put(lid(2), record(2, 5000))
        src_data = os.path.join(format_dir(str(src)), "data.mdb")
        with open(src_data, "rb") as f:  # the used part (the file may be a sparse map)
            victim.write_bytes(f.read(lmdb_used_bytes(src_data)))
    os.chmod(victim, 0o644)
    before = victim.read_bytes()
    vst = os.stat(victim)
    planted = path / FORMAT_DIR / name
    if planted.exists() or planted.is_symlink():
        planted.unlink()
    planted.symlink_to(victim)

    def use() -> Any:
        try:
            with Cache(str(path), 1) as cache:
                cache.put(lid(3), record(3, 3000))
                cache.get(lid(1))
                cache.clear()
                cache.put(lid(4), record(4, 3000))
                return "worked"
        except CacheError as exc:
            return f"CacheError: {exc}"
    out = run_forked(use)
    assert out.kind == "ok", out  # worked, or refused with a CacheError: nothing else
    after = os.stat(victim)
    assert victim.read_bytes() == before, f"a write reached the symlink's target ({out.value})"
    assert (after.st_size, after.st_mtime_ns, after.st_mode, after.st_uid) == \
        (vst.st_size, vst.st_mtime_ns, vst.st_mode, vst.st_uid)


# =========================================================================================
# fuzzing the whole public API with hostile arguments
# =========================================================================================

from array import array  # noqa: E402

from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

VALID_IDS = [lid(i) for i in range(12)]
junk = st.one_of(st.none(), st.integers(min_value=-2**70, max_value=2**70), st.floats(),
                 st.binary(max_size=8), st.lists(st.integers(), max_size=2), st.booleans(),
                 st.just(object()), st.just(float("nan")), st.just(b"\0"))
ids = st.one_of(st.sampled_from(VALID_IDS), st.sampled_from(VALID_IDS), st.text(max_size=30),
                st.sampled_from(["", " ", "a b", "x\0y", "\t", "é", "\ud800", "a" * 1024, "b" * 1025, "sha256:" + "f" * 64 + "\n", "\x7f", "🙂"]),
                st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=1,
                        max_size=40), st.builds(lambda: "c" * 100_000), junk)
kinds = st.one_of(st.just("layer_file"), st.sampled_from(["sbom", "a" * 32, "a" * 33, "", "A", "x y",
                                                           "é", "k\0", "-", "layer_file\n"]),
                  st.text(max_size=40), junk)


def _view(b: bytes, how: int) -> memoryview:
    if how == 0:
        return memoryview(b)
    if how == 1:
        return memoryview(array("I", b[: len(b) // 4 * 4]))
    if how == 2:
        return memoryview(b)[::2]
    return memoryview(bytearray(b + b"pad!"))[: len(b)]


def _views(b: bytes) -> Any:
    return st.integers(0, 3).map(lambda how: _view(b, how))


records = st.one_of(st.binary(max_size=5000), st.binary(max_size=200).map(bytearray),
                    st.binary(max_size=200).flatmap(_views), st.just(b""),
                    st.builds(lambda: incompressible((MiB + 1), "x")), st.text(max_size=10), junk)
keeps = st.one_of(st.just(()), st.lists(ids, max_size=4), st.sets(st.sampled_from(VALID_IDS), max_size=3),
                  st.text(max_size=5), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                  st.lists(st.sampled_from(VALID_IDS), max_size=3).map(iter), junk)
numbers = st.one_of(st.integers(min_value=-2**70, max_value=2**70), st.sampled_from([0, 1, 2**63 - 1, 2**63,
                                                                                     2**64 - 1, 2**64]), junk)
bounds = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=-10, max_value=10**30),
                   st.sampled_from([0, 0.0001, 1, 1e-300, 1e300, 2**63, 10**6, -0.0]), junk, st.text(max_size=4))
names = st.one_of(st.text(alphabet=st.characters(blacklist_characters="/\0"), min_size=1, max_size=30)
                  .filter(lambda n: n not in (".", "..")), st.sampled_from(["a\0b", "", "d/../e"]), st.builds(lambda: "x" * 300))
ops = st.one_of(
    st.tuples(st.just("get"), ids, kinds),
    st.tuples(st.just("put"), ids, records, kinds, keeps),
    st.tuples(st.just("delete"), ids, kinds),
    st.tuples(st.just("contains"), ids, kinds),
    st.tuples(st.just("in"), ids),
    st.tuples(st.just("restore"), ids, records, kinds, numbers, numbers),
    st.tuples(st.just("add_counters"), numbers, numbers),
    st.tuples(st.just("merge_history"), st.one_of(st.lists(st.tuples(ids, kinds, numbers, numbers), max_size=3),
                                                   junk), numbers, numbers),
    st.sampled_from([("len",), ("stats",), ("cache_data",), ("json",), ("flush",), ("verify",),
                     ("evictions",), ("clear",)]),
    st.tuples(st.just("open"), st.one_of(names, junk), bounds,
              st.one_of(st.booleans(), junk), st.one_of(st.floats(), st.integers(-5, 5), junk)),
    st.tuples(st.just("from_env"), st.one_of(st.text(max_size=12), st.sampled_from(
        ["1", "0", "-1", "nan", "inf", "1e300", " 2 ", "0x10", "1_0", "\0"]))),
)
ALLOWED = (TypeError, ValueError, CacheError)


def _call(cache: Any, Cache: type, root: str, op: Tuple[Any, ...]) -> None:
    name = op[0]
    if name == "get":
        got = cache.get(op[1], op[2])
        assert got is None or type(got) is bytes
    elif name == "put":
        assert cache.put(op[1], op[2], op[3], op[4]) in (True, False)
    elif name == "delete":
        assert cache.delete(op[1], op[2]) in (True, False)
    elif name == "contains":
        assert cache.contains(op[1], op[2]) in (True, False)
    elif name == "in":
        assert (op[1] in cache) in (True, False)
    elif name == "restore":
        cache.restore(op[1], op[2], op[3], reference_count=op[4], last_referred_ns=op[5])
    elif name == "add_counters":
        cache.add_counters(op[1], op[2])
    elif name == "merge_history":
        assert len(cache.merge_history(op[1], op[2], op[3])) == 3
    elif name == "len":
        assert len(cache) >= 0
    elif name == "stats":
        cache.stats()
    elif name in ("cache_data", "json"):
        json.dumps(cache.cache_data()) if name == "cache_data" else json.loads(cache.cache_data_json())
    elif name == "flush":
        cache.flush()
    elif name == "verify":
        assert cache.verify() == []
    elif name == "evictions":
        cache.evictions()
    elif name == "clear":
        cache.clear()
    elif name == "open":
        path = os.path.join(root, op[1]) if isinstance(op[1], str) else op[1]
        other = Cache(path, op[2], durable=op[3], lock_timeout=op[4])
        other.close()
    elif name == "from_env":
        saved = {k: os.environ.get(k) for k in ("MAX_CACHE_RECORD_MB", "NVCACHE_PATH")}
        try:
            os.environ["NVCACHE_PATH"] = os.path.join(root, "env")
            if "\0" in op[1]:
                raise ValueError("an environment value cannot hold NUL")  # os.environ refuses it
            os.environ["MAX_CACHE_RECORD_MB"] = op[1]
            Cache.from_env().close()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def test_fuzz_public_api(Cache, tmp_path):
    root = str(tmp_path / "fz")
    os.makedirs(root)
    cache = Cache(str(tmp_path / "main"), 1)
    escaped: List[str] = []

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(ops, min_size=1, max_size=12))
    # What earlier runs found, kept as fixed examples (every run tries them).
    @example([("from_env", "1e20")])
    @example([("open", "big", 1e300, False, 1.0), ("open", "huge", 10**30, True, 1.0)])
    @example([("add_counters", 2**63 - 1, 0), ("add_counters", 2**63 - 1, 0),
              ("add_counters", 0, 2**63 - 1), ("add_counters", 0, 2**63 - 1), ("stats",)])
    @example([("open", "slow", 1, False, 1e300), ("open", "slower", 1, False, 2.96e222)])
    @example([("put", lid(1), incompressible((MiB + 1), "x"), "layer_file", ()), ("put", lid(2), b"r", "k\0", ()),
              ("put", lid(3), b"r", "layer_file", [lid(3), 5])])
    def run(seq: List[Tuple[Any, ...]]) -> None:
        for op in seq:
            try:
                _call(cache, Cache, root, op)
            except ALLOWED:
                pass
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                escaped.append(f"{op[0]}{tuple(repr(a)[:60] for a in op[1:])} -> {type(exc).__name__}: {exc}")
                raise
        assert cache.verify() == []
        st_ = cache.stats()
        assert 0 <= st_["record_total_size"] <= cache.max_bytes

    try:
        run()
    finally:
        try:
            assert cache.verify() == []
        finally:
            cache.close()
    assert escaped == []


# =========================================================================================
# disk full: a small tmpfs
# =========================================================================================

@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"mount -t tmpfs was refused: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(path: str, leave: int) -> None:
    """Fill the file system of ``path`` with a ballast file, leaving about ``leave`` bytes."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\xa5" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    os.truncate(path, max(0, os.path.getsize(path) - leave))


def test_disk_full(Cache, small_tmpfs, children):
    path = str(small_tmpfs / "caches")
    ballast = str(small_tmpfs / "ballast")
    cache = Cache(path, 64)  # the bound is above the disk: the disk fills first
    try:
        for i in range(20):
            assert cache.put(lid(i), record(i, 20_000))
        fill(ballast, 1_500_000)
        acked = list(range(20))
        errors = 0
        for i in range(20, 400):
            try:
                assert cache.put(lid(i), record(i, 50_000)) is True
                acked.append(i)
            except CacheError as exc:  # anything else (OSError, MapFullError...) fails the test
                assert not isinstance(exc, (CacheFull, RecordTooLarge)), exc
                errors += 1
                if errors >= 10:
                    break
        assert errors >= 10, "the disk never filled up"
        # Nothing acknowledged was lost or corrupted; gets, stats and verify keep working.
        for i in acked:
            assert cache.get(lid(i)) == record(i, 20_000 if i < 20 else 50_000), i
        assert cache.verify() == []
        st_ = cache.stats()
        assert st_["record_count"] == len(acked)
        assert cache.get(lid(9999)) is None
        try:
            cache.delete(lid(0))  # may need space itself: CacheError is fine
            deleted = [0]
        except CacheError:
            deleted = []
        # Another process opens the full cache: no rebuild, same records, never a crash.
        def reader() -> Any:
            os.environ.pop("NVCACHE_BOOT_ID", None)
            with Cache(path, 64) as other:
                return [i for i in acked if other.get(lid(i)) is not None]
        out = run_forked(reader)
        assert out.kind in ("ok", "cache_error"), out
        if out.kind == "ok":
            assert out.value == [i for i in acked if i not in deleted]
        # Space comes back: puts work again.
        os.unlink(ballast)
        assert cache.put(lid(5000), record(5000, 50_000)) is True
        assert cache.get(lid(5000)) == record(5000, 50_000)
        for i in acked:
            if i not in deleted:
                assert cache.get(lid(i)) == record(i, 20_000 if i < 20 else 50_000), i
        assert cache.verify() == []
    finally:
        try:
            cache.close()
        except CacheError:
            pass


def _fill_through_the_write_map(Cache: type, root: str, reserve: bool) -> Callable[[], Any]:
    """A child that opens a cache with the write map, fills the disk, then keeps putting."""
    def run() -> Any:
        from nvcache import writemap
        if not reserve:  # the control: the write map without the store's fallocate
            writemap.Reservation.reserve = lambda self, pages, data=0: None
            faulthandler.disable()  # its SIGBUS is expected: no traceback on the test's output
        path = os.path.join(root, "caches")
        with Cache(path, 64) as cache:
            assert cache._store.writemap, "the write map is off on this tmpfs"
            for i in range(10):
                cache.put(lid(i), record(i, 20_000))
            fill(os.path.join(root, "ballast"), 300_000)
            errors = 0
            for i in range(10, 200):
                try:
                    cache.put(lid(i), record(i, 50_000))
                except CacheError:
                    errors += 1
            wrong = [i for i in range(10) if cache.get(lid(i)) != record(i, 20_000)]
            return {"errors": errors, "wrong": wrong, "writemap_left_on": cache._store.writemap}
    return run


def test_a_full_disk_under_the_write_map_is_an_error_not_sigbus(Cache, small_tmpfs):
    """LMDB's write map stores into a sparse file: on a full disk that is SIGBUS, unless the
    store reserved the blocks first. The control run (no reservation) shows the hazard is real
    on this file system; the store's own run must end in CacheErrors or pwrite commits."""
    from nvcache import writemap
    if not writemap.writemap_wanted(str(small_tmpfs)):
        pytest.skip("no write map here (NVCACHE_WRITEMAP=0 or an unsupported file system)")
    control_root = small_tmpfs / "control"
    control_root.mkdir()
    control = run_forked(_fill_through_the_write_map(Cache, str(control_root), reserve=False))
    shutil.rmtree(control_root)
    mine_root = small_tmpfs / "mine"
    mine_root.mkdir()
    mine = run_forked(_fill_through_the_write_map(Cache, str(mine_root), reserve=True))
    assert mine.kind == "ok", mine
    assert mine.value["wrong"] == [] and mine.value["errors"] > 0, mine.value
    assert mine.value["writemap_left_on"] is False  # the store fell back to pwrite commits
    assert control.kind == "signal" and control.value == signal.SIGBUS, control


def test_a_file_longer_than_the_map_is_mapped_whole_and_never_cut(Cache, cache_dir):
    """LMDB truncates data.mdb to a write-map opener's map: an opener whose own size is shorter
    than the file (another process grew it) must map the whole file, or it would cut pages that
    process maps (SIGBUS there) or reserved. It keeps the write map and its reservation covers
    the longer map."""
    from nvcache import writemap
    with Cache(cache_dir, 1) as cache:
        if not cache._store.writemap:
            pytest.skip("no write map here (NVCACHE_WRITEMAP=0 or an unsupported file system)")
        cache.put(lid(1), b"r")
    data = os.path.join(format_dir(cache_dir), "data.mdb")
    longer = writemap.first_map_size(MiB) + (3 << 20)
    os.truncate(data, longer)  # sparse: what a process with a grown map leaves
    with Cache(cache_dir, 1) as cache:
        assert cache._store.writemap is True and cache._store.files.map_size == longer
        assert cache.get(lid(1)) == b"r" and cache.put(lid(2), b"s") and cache.verify() == []
        assert os.path.getsize(data) == longer


def test_disk_full_at_creation(Cache, small_tmpfs):
    ballast = str(small_tmpfs / "ballast")
    fill(ballast, 0)
    path = str(small_tmpfs / "caches")
    with pytest.raises(CacheError):
        Cache(path, 1).close()
    os.unlink(ballast)
    with Cache(path, 1) as cache:  # whatever was left half-made is repaired
        assert cache.put(lid(1), record(1, 1000)) is True
        assert cache.get(lid(1)) == record(1, 1000)
        assert cache.verify() == []


# =========================================================================================
# many openers, some killed inside a read
# =========================================================================================

def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _opener(Cache: type, path: str, loops: int, seed: int) -> Callable[[], Any]:
    def run() -> Any:
        rng = random.Random(seed)
        counts = []
        wrong = 0
        for k in range(loops):
            with Cache(path, 4, lock_timeout=20) as cache:
                for _ in range(6):
                    i = rng.randrange(40)
                    data = cache.get(lid(i))
                    if data is not None and data != record(i, 60_000):
                        wrong += 1
                if k % 4 == 1:
                    i = rng.randrange(40, 80)
                    cache.put(lid(i), record(i, 60_000))
            counts.append(fd_count())
        return {"fds": counts, "wrong": wrong}
    return run


def test_many_openers(Cache, cache_dir, core, children):
    with Cache(cache_dir, 4) as cache:
        for i in range(40):
            cache.put(lid(i), record(i, 60_000))
    allowed = {"data.mdb", "lock", "version", "users", "clean", "readers"}
    rng = random.Random(7)
    kills = finished = 0
    failures: List[str] = []
    wave = 20
    for start in range(0, OPENERS, wave):
        batch = []
        for n in range(start, min(start + wave, OPENERS)):
            kill = rng.random() < 0.25
            # A victim loops until killed, so the kill always lands inside its open/read/close
            # loop whatever the machine's speed; the others run 12 loops and must finish clean.
            pid, r = start_forked(_opener(Cache, cache_dir, 10**6 if kill else 12, n))
            children.append(pid)
            batch.append((pid, r, kill))
        time.sleep(rng.uniform(0.01, 0.05))
        for pid, r, kill in batch:
            if kill:
                time.sleep(rng.uniform(0, 0.01))
                os.kill(pid, signal.SIGKILL)
        for pid, r, kill in batch:
            out = finish_forked(pid, r, 120)
            children.remove(pid)
            if kill and out.kind == "signal":
                kills += 1
                continue
            finished += 1
            if out.kind != "ok":
                failures.append(repr(out))
            elif out.value["wrong"] or len(set(out.value["fds"])) != 1:
                failures.append(f"opener {pid}: {out.value}")
    save_figures("openers", core, {"openers": OPENERS, "loops_each": 12, "killed": kills,
                                   "finished": finished, "failures": failures[:20]})
    assert failures == [], failures[:5]
    assert kills >= OPENERS // 20 and finished >= OPENERS // 2, (kills, finished)
    # This process: opening and closing many times leaks no descriptor.
    with Cache(cache_dir, 4, lock_timeout=2) as cache:
        cache.get(lid(1))
    before = fd_count()
    for k in range(50):
        with Cache(cache_dir, 4, lock_timeout=2) as cache:
            cache.get(lid(k % 40))
    assert fd_count() == before
    # Nobody's lock outlived its process: a write gets through at once; the cache is healthy.
    with Cache(cache_dir, 4, lock_timeout=2) as cache:
        t0 = time.monotonic()
        cache.put(lid(500), record(500, 1000))
        assert time.monotonic() - t0 < 1.0
        assert cache.verify() == []
        st_ = cache.stats()
        dump = cache.cache_data()
        assert st_["record_count"] == len(dump["cache_records"])
        assert st_["record_total_size"] == sum(r_["size"] for r_ in dump["cache_records"]) <= cache.max_bytes
    assert os.listdir(cache_dir) == [FORMAT_DIR]
    leftovers = sorted(set(os.listdir(format_dir(cache_dir))) - allowed)
    # A process killed between writing a temp file and renaming it may leave one; never more.
    assert len(leftovers) <= kills, leftovers
    assert all(name.startswith(".") for name in leftovers), leftovers


def test_lock_file_removed_while_held_still_excludes(Cache, cache_dir, children):
    """A /tmp cleaner unlinks lock-like files while a writer holds the lock: a later opener must still wait."""
    with Cache(cache_dir, 4) as cache:
        cache.put(lid(0), record(0, 1_500_000))
    stop = os.path.join(os.path.dirname(cache_dir), "stop")
    pid, r = start_forked(_busy(Cache, cache_dir, "put", stop))
    children.append(pid)
    try:
        time.sleep(0.2)
        assert catch_holding(pid, cache_dir, "exclusive"), "never caught the writer inside a put"
        for name in ("lock", "users", "clean"):  # what a cleaner may unlink; nvcache locks the directory
            if os.path.exists(os.path.join(format_dir(cache_dir), name)):
                os.unlink(os.path.join(format_dir(cache_dir), name))
        result, took = timed(lambda: Cache(cache_dir, 4, lock_timeout=TIMEOUT).put(lid(9), b"w"))
        assert isinstance(result, CacheTimeout), \
            f"a second writer went ahead ({result!r}) while the first was inside a put"
    finally:
        os.kill(pid, signal.SIGCONT)
        with open(stop, "w"):
            pass
        out = finish_forked(pid, r, 60)
        children.remove(pid)
    assert out.kind == "ok", out
    with Cache(cache_dir, 4) as cache:
        assert cache.verify() == []


@pytest.mark.parametrize("kind", ["leaf", "branch", "overflow"])
def test_a_page_with_a_wrong_number_is_rebuilt_at_open(Cache, tmp_path, kind):
    """Bit rot in a page's own number (found by the bit-rot campaign): reads never look at it,
    but a write frees the page by it, and a later write to that free-list entry landed outside
    the file (SIGBUS under the write map). The deep check compares every page's number."""
    path = str(tmp_path / "c")
    populate(Cache, path)
    target = os.path.join(format_dir(path), "data.mdb")
    pages = live_pages(target)[kind]
    assert pages, kind
    victim = random.Random(7).choice(pages)
    st = os.stat(target)
    with open(target, "r+b") as f:
        f.seek(victim * PAGE + 4)  # the high half of the page number
        f.write(b"\x01")
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # silent: the clean mark still matches

    def use() -> Any:
        with Cache(path, 1) as cache:
            rebuilt = len(cache) == 0
            for rnd in range(6):  # enough write transactions to reuse every freed page
                for i in range(40):
                    cache.put(lid(10_000 + rnd * 40 + i), record(i, 3000))
                cache.flush()
            return {"rebuilt": rebuilt, "verify": cache.verify()}
    out = run_forked(use)
    assert out.kind == "ok", out
    assert out.value == {"rebuilt": True, "verify": []}


def test_an_absurd_size_in_a_victims_header_is_damage_not_a_hang(Cache, cache_dir):
    """Evicting a record deletes its chunks by the size in its header: a rotted size of 2**50
    bytes must be damage (the put rebuilds the cache and stores its record), not 17 billion
    deletes."""
    def run() -> Any:
        import logging
        import struct as _struct
        warnings: List[str] = []
        handler = logging.Handler()
        handler.emit = lambda rec: warnings.append(rec.getMessage())  # type: ignore[assignment]
        logging.getLogger("nvcache").addHandler(handler)
        with Cache(cache_dir, 0.01) as cache:
            for i in range(5):
                cache.put(lid(i), record(i, 2000))
            key = cache._core.name_key(f"{lid(0)}_layer_file".encode())

            def rot(index: Any, txn: Any) -> None:
                hdr = bytearray(txn.get(key, None, index.idx))
                _struct.pack_into("<Q", hdr, 0, 1 << 50)
                txn.put(key, bytes(hdr), db=index.idx)
            cache._store._write(lambda files, txn: rot(files.index, txn), native=False)  # py-lmdb's txn
            put = cache.put(lid(5), record(5, 2000))  # evicts lid(0), the oldest
            return {"put": put, "got": cache.get(lid(5)) == record(5, 2000), "verify": cache.verify(),
                    "damaged": sum("damaged" in w for w in warnings)}
    out = run_forked(run, timeout=60)
    assert out.kind == "ok", out
    assert out.value == {"put": True, "got": True, "verify": [], "damaged": 1}, out.value


BIT_ROT_ROUNDS = env_int("NVCACHE_BIT_ROT_ROUNDS", 40)


def test_silent_bit_rot_after_a_clean_close(Cache, tmp_path, core):
    """Damage inside live B-tree pages after a clean close, mtime kept (what failing media does).

    The clean-close mark still matches, so a cheap open trusts the file; the opener must still
    never crash nor serve wrong bytes, and the cache must not stay damaged for every later user.
    """
    rng = random.Random(0xB17)
    outcomes: Dict[str, int] = {}
    bad = []
    for n in range(BIT_ROT_ROUNDS):
        path = str(tmp_path / f"b{n}")
        populate(Cache, path)
        seed = rng.randrange(1 << 30)
        what = damage(format_dir(path), "data.mdb", "bit-rot-mtime-kept", random.Random(seed))
        victim = run_forked(_victim(Cache, path), timeout=120)
        follow = run_forked(_follow_up(Cache, path), timeout=120)
        outcome = classify(victim, follow)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        healthy_after = (follow.kind == "ok" and follow.value["verify"] == []
                         and follow.value["roundtrip"] is True)
        if outcome in ("crashed", "wrong-bytes") or not healthy_after:
            bad.append({"seed": seed, "damage": what, "outcome": outcome,
                        "victim": repr(victim)[:300], "follow_up": repr(follow)[:300]})
        shutil.rmtree(path, ignore_errors=True)
    save_figures("bit-rot", core, {"rounds": BIT_ROT_ROUNDS, "outcomes": outcomes, "failures": bad})
    assert outcomes.get("crashed", 0) == 0, [b for b in bad if b["outcome"] == "crashed"][:3]
    assert outcomes.get("wrong-bytes", 0) == 0
    assert bad == [], bad[:3]


SHORT_OF_DESCRIPTORS = r"""
import os, resource, sys
import nvcache
_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + int(sys.argv[2]), hard))
try:
    with nvcache.LayerCache(sys.argv[1], 4, lock_timeout=2) as cache:
        print("ok" if cache.get(sys.argv[3]) is not None else "miss")
except nvcache.CacheError:
    print("cache_error")
"""


def test_a_shortage_of_descriptors_never_empties_the_cache(Cache, cache_dir, core_env):
    """EMFILE while opening version, readers or data.mdb is an error, never damage to rebuild."""
    with Cache(cache_dir, 4) as cache:
        cache.put(lid(1), record(1, 1000))
        ino = os.stat(os.path.join(format_dir(cache_dir), "data.mdb")).st_ino
        outcomes = set()
        for spare in range(0, 16):  # a fresh process, each step of its open short in turn
            out = subprocess.run([sys.executable, "-c", SHORT_OF_DESCRIPTORS, cache_dir, str(spare), lid(1)],
                                 env=core_env, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, (spare, out.stderr[-2000:])
            outcomes.add(out.stdout.strip())
            assert os.stat(os.path.join(format_dir(cache_dir), "data.mdb")).st_ino == ino, f"rebuilt with {spare} spare"
        assert outcomes == {"cache_error", "ok"}, outcomes  # some were short, some had enough
        assert cache.get(lid(1)) == record(1, 1000) and cache.verify() == []
