"""Issue 15, item 2, round 3: ``LRFU-10k-g8-cap3`` "as built" for the index, against the float reference.

As built (what the index will store; policies2's ``LRFU`` is the float reference it came from):

* one u64 rank per record, on the request clock T (``RankPolicy.clock``), H = 10000, cap C = 3;
* a put with no ghost: rank = T;
* a reference by n requests at T: ``rank = T + floor(min(C*H, H*log2(n + 2**((rank - T)/H))))``
  (``access`` below; 2**x taken as 0 below x = -64);
* ghosts: a direct-mapped table of G slots, slot = xxh3_128(layer id)[:4] big-endian % G. An
  eviction overwrites its slot with (layer, rank); a put whose slot holds its own layer starts at
  ``access(1, ghost rank)`` and clears the slot; otherwise rank = T (the slot is left as it is).

``asbuilt-fifo8``: the as-built rank with the reference's FIFO ghosts (8 x held), to separate the arithmetic
from the table; ``asbuilt-allghosts``: the same with every evicted name remembered (no bound, no collisions).

``-b64``: the references are not applied at once but in batches, as a multi-process cache applies
its access buffers: every 64 requests the references made since are applied, with n = that record's
references in the batch and T = the clock at the batch's end. References to a record evicted before
its batch ends are dropped (its ghost is the rank it had). Puts are not delayed.

Run::

    .venv/bin/python bench/policies3.py --json OUT.json            # the 8 headline cells
    .venv/bin/python bench/policies3.py --sweep --json OUT.json    # 4 traces x 6 bounds x raw/zstd
    .venv/bin/python bench/policies3.py --report HEADLINE.json SWEEP.json ...   # lrfu-asbuilt.md's tables
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections import OrderedDict
from typing import Dict, FrozenSet, List, Optional, Sequence

import xxhash

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import policies as P  # noqa: E402
import policies2 as Q  # noqa: E402
from nvcache import simulate as sim  # noqa: E402

H = 10000
C = 3
GS = (4096, 16384, 65536, 262144)
BATCH = 64
LAST: Dict[str, P.Policy] = {}  # the last policy instance built: its state at the end of the run


def access(n: int, rank: int, T: int, h: int = H, c: int = C) -> int:
    """The as-built rank after n references at clock T to a record of rank ``rank`` (exactly as specified)."""
    x = (rank - T) / h
    term = 0.0 if x < -64 else 2.0 ** x
    return T + int(math.floor(min(c * h, h * math.log2(n + term))))


class Tracked:
    """Mixin: remember the instance, so the run can read how many records it held at the end."""

    def __init__(self, *a) -> None:
        super().__init__(*a)  # type: ignore[call-arg]
        LAST["p"] = self  # type: ignore[assignment]


class AsBuilt(Tracked, P.RankPolicy):
    """LRFU-10k-cap3 as the index computes it: the rank is the whole state; direct-mapped ghosts."""

    G = 65536
    salt = b""  # --salt: another fixed hash, to see how much the slot placement alone moves the figures
    layer_ids: Sequence[str] = ()  # set per trace (the ghost slot hashes the layer id)
    name = "asbuilt"
    fits = "yes: rank only (u64); a G-slot direct-mapped ghost table in meta"

    def __init__(self, capacity: int, stored: Sequence[int], cost: Sequence[int]) -> None:
        super().__init__(capacity, stored, cost)
        self.slot = [int.from_bytes(xxhash.xxh3_128_digest(self.salt + lid.encode())[:4], "big") % self.G
                     for lid in self.layer_ids]
        self.ghost: List[Optional[tuple]] = [None] * self.G
        self.put_rank = 0
        self.victim_rank = 0
        self.ghost_hits = 0

    def evicted(self, rank: int) -> None:
        self.victim_rank = rank

    def forget(self, v: int) -> None:
        self.ghost[self.slot[v]] = (v, self.victim_rank)

    def arrived(self, obj: int) -> int:
        s, T = self.slot[obj], self.clock
        g = self.ghost[s]
        if g is not None and g[0] == obj:
            self.put_rank = access(1, g[1], T)
            self.ghost[s] = None
            self.ghost_hits += 1
        else:
            self.put_rank = T
        return 0

    def rank(self, obj: int, refs: int) -> int:
        if refs == 0:  # the put (arrived just ran)
            return self.put_rank
        return access(1, self.held[obj], self.clock)  # an unbatched hit: held[obj] is still the old rank

    def ghosts_used(self) -> int:
        return sum(g is not None for g in self.ghost)


class AsBuiltFifo(AsBuilt):
    """The as-built rank with the reference's ghosts (a FIFO of 8 x records held, exact names): isolates the
    integer rank arithmetic from the direct-mapped table."""

    mult = 8

    def __init__(self, capacity: int, stored: Sequence[int], cost: Sequence[int]) -> None:
        super().__init__(capacity, stored, cost)
        self.fifo: "OrderedDict[int, int]" = OrderedDict()

    def forget(self, v: int) -> None:
        self.fifo[v] = self.victim_rank
        self.fifo.move_to_end(v)
        while len(self.fifo) > self.mult * max(1, len(self.held)):
            self.fifo.popitem(last=False)

    def arrived(self, obj: int) -> int:
        g = self.fifo.pop(obj, None)
        self.put_rank = self.clock if g is None else access(1, g, self.clock)
        return 0


class AsBuiltExpiring(AsBuilt):
    """Beyond the specification (exploratory): the direct-mapped table, but a ghost is honoured only while
    young, as the reference's FIFO of 8 x held names forgets. ``window="evictions"``: the slot also holds the
    eviction count at its eviction (a counter in meta), honoured while fewer than ``mult`` x held evictions
    since; ``window="rank"``: honoured while T - ghost rank <= ``age`` x H (no new field)."""

    window = "evictions"
    mult = 8
    age = 1.0

    def forget(self, v: int) -> None:
        self.ghost[self.slot[v]] = (v, self.victim_rank, self.evictions)

    def arrived(self, obj: int) -> int:
        s, T = self.slot[obj], self.clock
        g = self.ghost[s]
        self.put_rank = T
        if g is not None and g[0] == obj:
            self.ghost[s] = None
            young = (self.evictions - g[2] <= self.mult * max(1, len(self.held)) if self.window == "evictions"
                     else T - g[1] <= self.age * H)
            if young:
                self.put_rank = access(1, g[1], T)
                self.ghost_hits += 1
        return 0


class Batched:
    """Mixin for a RankPolicy: hits are applied every ``batch`` requests, n at a time, at the batch's
    end clock (``batch_rank(obj, n)``). Every request is one hit() or one admit(), so clock = requests."""

    batch = BATCH

    def __init__(self, *a) -> None:
        super().__init__(*a)  # type: ignore[call-arg]
        self.pending: Dict[int, int] = {}

    def hit(self, obj: int) -> None:
        self.clock += 1
        self.pending[obj] = self.pending.get(obj, 0) + 1
        self.tick()

    def admit(self, obj: int, keep: FrozenSet[int]) -> bool:
        ok = super().admit(obj, keep)  # type: ignore[misc]
        self.tick()
        return ok

    def forget(self, v: int) -> None:
        self.pending.pop(v, None)  # references to a record evicted before its batch ends are lost
        super().forget(v)  # type: ignore[misc]

    def tick(self) -> None:
        if self.clock % self.batch:
            return
        for obj, n in self.pending.items():
            self.refs[obj] += n
            r = self.held[obj] = self.batch_rank(obj, n)
            heapq.heappush(self.heap, (r, obj))
        self.pending.clear()


class AsBuiltBatched(Batched, AsBuilt):
    def batch_rank(self, obj: int, n: int) -> int:
        return access(n, self.held[obj], self.clock)


class TrackedLRU(Tracked, P.LRU):
    pass


class LRUBatched(Batched, TrackedLRU):
    def batch_rank(self, obj: int, n: int) -> int:
        return self.clock


def table() -> Dict[str, type]:
    ref = Q.candidates()[Q.RECOMMENDED]
    out: Dict[str, type] = {"LRU": type("LRU", (TrackedLRU,), {"name": "LRU"}),
                            Q.RECOMMENDED: type("Ref", (Tracked, ref), {"name": ref.name})}
    for g in GS:
        n = f"asbuilt-G{g // 1024}k"
        out[n] = type(n.replace("-", "_"), (AsBuilt,), {"G": g, "name": n})
    out["asbuilt-fifo8"] = type("AsBuiltFifo8", (AsBuiltFifo,), {"G": 1, "name": "asbuilt-fifo8"})
    out["asbuilt-allghosts"] = type("AsBuiltAll", (AsBuiltFifo,), {"G": 1, "mult": 10 ** 9, "name": "asbuilt-allghosts"})
    for g in (16384, 65536):
        n = f"asbuilt-G{g // 1024}k-ev8"
        out[n] = type(n.replace("-", "_"), (AsBuiltExpiring,), {"G": g, "name": n})
    for age in (0.5, 1.0, 2.0):
        n = f"asbuilt-G64k-age{age:g}"
        out[n] = type(n.replace("-", "_").replace(".", "_"), (AsBuiltExpiring,),
                      {"G": 65536, "name": n, "window": "rank", "age": age})
    out["LRU-b64"] = type("LRUb64", (LRUBatched,), {"name": "LRU-b64"})
    out["asbuilt-G64k-b64"] = type("AsBuiltG64kb64", (AsBuiltBatched,), {"G": 65536, "name": "asbuilt-G64k-b64"})
    return out


def run(names: Sequence[str], cells, log, optimum: bool = True) -> List[dict]:
    tab = table()
    rows: List[dict] = []
    built: Dict[tuple, tuple] = {}
    for tname, raw, f in cells:
        if (tname, raw) not in built:
            tr = P.measure(P.TRACES[tname](), raw=raw)
            built[(tname, raw)] = (tr, [P.cost_ns(n, 500.0, 40.0) for n in tr.record_sizes])
        tr, cost = built[(tname, raw)]
        reqs = tr.requests()
        cap = int(P.DEMO_BOUND * f)
        total = sum(tr.stored[i] for i in reqs)
        opt = sim.optimum_byte_hits(reqs, tr.stored, cap) / total if optimum else None
        lru = None
        for n in names:
            cls = tab[n]
            cls.layer_ids = tr.layer_ids
            o = P.simulate(cls, tr, cap, cost)
            p = LAST["p"]
            if lru is None:
                lru = o
            row = {"trace": tname, "raw": raw, "factor": f, "policy": n, "stored_bhr": o.stored_bhr,
                   "hit_ratio": o.hit_ratio, "saved": o.saved, "optimum": opt, "lru": lru.stored_bhr,
                   "lru_saved": lru.saved, "held": len(p.held), "used": p.used, "evictions": o.evictions,
                   "requests": o.requests}
            if isinstance(p, AsBuilt) and not hasattr(p, "fifo"):
                row["ghost_slots_used"] = p.ghosts_used()
                row["ghost_hits"] = p.ghost_hits
            if hasattr(p, "fifo") or isinstance(p, Q.GhostRank):
                row["ghost_names"] = len(p.fifo if hasattr(p, "fifo") else p.ghost)
            row["gap_opt"] = ((o.stored_bhr - lru.stored_bhr) / (opt - lru.stored_bhr)
                              if opt is not None and opt > lru.stored_bhr else None)
            rows.append(row)
            log(f"{tname:8s} {'raw' if raw else 'zstd'} {f:g}x {n:18s} bhr {100 * o.stored_bhr:6.2f} "
                f"(lru {100 * lru.stored_bhr:6.2f} opt {100 * (opt or 0):6.2f}) gap {100 * (row['gap_opt'] or 0):5.1f} "
                f"saved {100 * o.saved:5.1f} held {row['held']} {o.seconds:.1f}s")
    return rows


def _key(r: dict) -> tuple:
    return (r["trace"], r["raw"], r["factor"])


def _cell(k: tuple) -> str:
    return f"{k[0]} {'raw' if k[1] else 'zstd'} {k[2]:g}x"


def report(headline: str, sweeps: Sequence[str]) -> str:
    """policies3's markdown tables from a headline run's JSON and sweep JSONs."""
    rows = json.load(open(headline))["rows"]
    cells = list(dict.fromkeys(_key(r) for r in rows))
    pols = list(dict.fromkeys(r["policy"] for r in rows))
    by = {(_key(r), r["policy"]): r for r in rows}
    out = ["| policy | " + " | ".join(_cell(c) for c in cells) + " |", "|---|" + "---:|" * len(cells)]
    for p in pols:
        out.append(f"| {p} | " + " | ".join(
            f"{100 * by[c, p]['stored_bhr']:.2f} / {100 * by[c, p]['saved']:.1f} / {100 * (by[c, p]['gap_opt'] or 0):.0f}"
            for c in cells) + " |")
    out.append("| *optimum* | " + " | ".join(f"{100 * by[c, 'LRU']['optimum']:.2f}" for c in cells) + " |")
    out += ["", "Records held at the end (as-built: and ghost slots in use / ghost hits):", "",
            "| policy | " + " | ".join(_cell(c) for c in cells) + " |", "|---|" + "---:|" * len(cells)]
    for p in pols:
        out.append(f"| {p} | " + " | ".join(
            str(by[c, p]["held"]) + (f" ({by[c, p]['ghost_slots_used']} / {by[c, p]['ghost_hits']})"
                                     if "ghost_slots_used" in by[c, p] else "")
            for c in cells) + " |")
    srows = [r for path in sweeps for r in json.load(open(path))["rows"]]
    if not srows:
        return "\n".join(out)
    sby = {(_key(r), r["policy"]): r for r in srows}
    scells = list(dict.fromkeys(_key(r) for r in srows))
    out += ["", "Over the 48 cells (4 traces x 6 bounds 0.125x-4x x raw/zstd), stored-byte-hit points:", "",
            "| policy | worst vs LRU | where | best vs LRU | vs the float reference: lowest | where | highest | where "
            "| cells more than 1 point from the reference | held at the end: min-max |", "|---|---:|---|---:|---:|---|---:|---|---:|---|"]
    for p in dict.fromkeys(r["policy"] for r in srows):
        d = [(100 * (sby[c, p]["stored_bhr"] - sby[c, p]["lru"]), c) for c in scells]
        e = [(100 * (sby[c, p]["stored_bhr"] - sby[c, RECOMMENDED_REF]["stored_bhr"]), c) for c in scells]
        held = [sby[c, p]["held"] for c in scells]
        w, b, lo, hi = min(d), max(d), min(e), max(e)
        out.append(f"| {p} | {w[0]:+.2f} | {_cell(w[1])} | {b[0]:+.2f} | {lo[0]:+.2f} | {_cell(lo[1])} | {hi[0]:+.2f} "
                   f"| {_cell(hi[1])} | {sum(abs(x) > 1 for x, _ in e)} | {min(held)}-{max(held)} |")
    return "\n".join(out)


RECOMMENDED_REF = Q.RECOMMENDED


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policies", default=None)
    ap.add_argument("--sweep", action="store_true", help="4 traces x 6 bounds x raw/zstd")
    ap.add_argument("--json", default=None)
    ap.add_argument("--salt", default="", help="prefix the hashed layer ids with this (another slot placement)")
    ap.add_argument("--report", nargs="+", default=None, help="HEADLINE.json SWEEP.json...: print the tables")
    a = ap.parse_args(argv)
    AsBuilt.salt = a.salt.encode()
    if a.report:
        print(report(a.report[0], a.report[1:]))
        return 0
    names = list(table()) if a.policies is None else ["LRU"] + [n for n in a.policies.split(",") if n != "LRU"]
    if a.sweep:
        cells = [(t, raw, f) for raw in (True, False) for t in P.TRACES for f in (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)]
    else:
        cells = Q.CELLS
    load0 = os.getloadavg()
    t0 = time.time()
    rows = run(names, cells, lambda s: print(s, flush=True))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    info = {"argv": sys.argv, "commit": commit, "seconds": time.time() - t0, "load_before": load0,
            "load_after": os.getloadavg(), "python": platform.python_version()}
    print(info, flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"rows": rows, "run": info}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
