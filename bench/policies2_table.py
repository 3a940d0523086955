"""Markdown tables of policies2.py's JSON output (``policies2.json``, ``policies2-sweep.json``)."""
import json
import sys


def table(path: str) -> str:
    rows = json.load(open(path))["rows"]
    out = ["| trace | sizes, bound | policy | stored-byte-hit % | vs LRU (points) | time saved % | vs LRU (points) | "
           "gap closed % vs byte-level optimum | gap closed % vs whole-record Belady |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    last = None
    for r in rows:
        if "buffered_procs" in r:
            continue
        cell = (r["trace"], r["raw"], r["factor"])
        k = f"{'raw' if r['raw'] else 'zstd'} {r['factor']:g}x"
        if cell != last:
            out.append(f"| {r['trace']} | {k} | *optimum / Belady whole* | {100 * r['optimum']:.2f} / "
                       f"{100 * r['belady_whole']:.2f} | | | | 100 | 100 |")
            last = cell
        g = lambda x: "n/a" if x is None else f"{100 * x:.0f}"  # noqa: E731
        out.append(f"| {r['trace']} | {k} | {r['policy']} | {100 * r['stored_bhr']:.2f} | "
                   f"{100 * (r['stored_bhr'] - r['lru']):+.2f} | {100 * r['saved']:.1f} | "
                   f"{100 * (r['saved'] - r['lru_saved']):+.1f} | {g(r['gap_opt'])} | {g(r['gap_bel'])} |")
    return "\n".join(out)


def worst(path: str) -> str:
    rows = [r for r in json.load(open(path))["rows"] if "buffered_procs" not in r]
    pols = []
    for r in rows:
        if r["policy"] not in pols:
            pols.append(r["policy"])
    out = ["| policy | worst stored-byte-hit vs LRU over 4 traces x 6 bounds x {raw, zstd} (points) | where | "
           "best | mean time saved vs LRU (points) |", "|---|---:|---|---:|---:|"]
    for p in pols:
        sel = [r for r in rows if r["policy"] == p]
        w = min(sel, key=lambda r: r["stored_bhr"] - r["lru"])
        b = max(sel, key=lambda r: r["stored_bhr"] - r["lru"])
        m = sum(r["saved"] - r["lru_saved"] for r in sel) / len(sel)
        out.append(f"| {p} | {100 * (w['stored_bhr'] - w['lru']):+.2f} | {w['trace']} {'raw' if w['raw'] else 'zstd'} "
                   f"{w['factor']:g}x | {100 * (b['stored_bhr'] - b['lru']):+.2f} | {100 * m:+.1f} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(worst(sys.argv[2]) if sys.argv[1] == "worst" else table(sys.argv[2]))
