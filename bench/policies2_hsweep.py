"""LRFU with ghosts (8x) over H x cap on the target's cells: the best an LRFU rank reaches on each trace
when its parameters are tuned in hindsight for that trace (policies2.md's evidence)."""
import sys
sys.path.insert(0, "bench")
import policies as P  # noqa: E402
import policies2 as Q  # noqa: E402
from nvcache import simulate as sim  # noqa: E402

cells = [("demo", True, 1.0), ("burst", True, 1.0), ("demo", False, 0.25), ("burst", False, 0.25)]
cls = [Q._lrfu(h, True, mult=8, cap=c) for h in (2000, 5000, 10000, 20000, 40000, 80000) for c in (2, 3, 4, None)]
res = {}
for tn, raw, f in cells:
    tr = P.measure(P.TRACES[tn](), raw=raw)
    cost = [P.cost_ns(n, 500.0, 40.0) for n in tr.record_sizes]
    reqs = tr.requests()
    cap = int(P.DEMO_BOUND * f)
    tot = sum(tr.stored[i] for i in reqs)
    opt = sim.optimum_byte_hits(reqs, tr.stored, cap) / tot
    lru = P.simulate(P.LRU, tr, cap, cost).stored_bhr
    for c in cls:
        o = P.simulate(c, tr, cap, cost)
        res.setdefault(c.name, []).append(100 * (o.stored_bhr - lru) / (opt - lru))
print("| LRFU, ghosts 8x | gap closed % demo raw 1x | burst raw 1x | demo zstd 0.25x | burst zstd 0.25x | min of the four |")
print("|---|---:|---:|---:|---:|---:|")
for n, v in res.items():
    print(f"| {n} | " + " | ".join(f"{x:.0f}" for x in v) + f" | {min(v):.0f} |")
best = [max(v[i] for v in res.values()) for i in range(4)]
print("| best per cell (hindsight) | " + " | ".join(f"{x:.0f}" for x in best) + " | |")
