"""Byte-hit ratio against the bound on the demo's trace: every policy of the cache and Belady's.

The demo's trace (bench/policies.py ``demo_trace``: ``nvcache simulate``'s defaults, seeds fixed)
is written as a trace file (bench/policy_table.py's ``write_trace_file``, in a temporary directory
removed at the end) and replayed by ``nvcache.replay`` through a real cache per policy
(``nvcache.POLICIES``) at 8 bounds from 0.125x to 4x the demo's 2 MiB; beside them Belady's rule
byte by byte (an upper bound of every policy) and on whole records (a heuristic), on the same
trace and bounds. Records are incompressible, so stored bytes are record bytes.

Run::

    .venv/bin/python bench/policy_plot.py     # ~30 s per policy

Output: ``docs/policy-bounds.png`` (matplotlib, Agg backend: no display needed) and
``docs/policy-bounds.json`` (the figures plotted, with date, commit and load). Rerun after a policy
is added to ``nvcache.POLICIES``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # before pyplot: files only
import matplotlib.pyplot as plt  # noqa: E402

import policy_table as PT  # noqa: E402  (bench/policy_table.py: the trace file, provenance)

from nvcache import replay as rp  # noqa: E402

FACTORS = (0.125, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0)
OUT = os.path.join(PT.ROOT, "docs", "policy-bounds.png")


def measure(factors: Sequence[float], policies: Optional[Sequence[str]]) -> Dict[str, Any]:
    """The demo trace replayed at each bound: {"mib": [...], "series": {label: [byte-hit ratio, ...]}}."""
    directory = tempfile.mkdtemp(prefix="nvcache-traces-")
    try:
        work = rp.load_file(PT.write_trace_file("demo", directory))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    series: Dict[str, List[float]] = {}
    mib: List[float] = []
    for f in factors:
        t0 = time.perf_counter()
        result = rp.replay(work, PT.DEMO_MB * f, policies)
        mib.append(result.max_bytes / 2**20)
        for p in result.policies:
            series.setdefault(p.policy, []).append(p.byte_hit_ratio)
        series.setdefault("Belady optimum (byte by byte: a bound)", []).append(result.optimum_byte_hit_ratio)
        series.setdefault("Belady, whole records (heuristic)", []).append(result.belady_byte_hit_ratio)
        print(f"x{f:g}: " + ", ".join(f"{k.split(' (')[0]} {100 * v[-1]:.2f}" for k, v in series.items())
              + f" ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    return {"factors": list(factors), "mib": mib, "series": series, "requests": len(work.requests),
            "scans": len(work.scans), "layer_mib": sum(work.sizes) / 2**20}


def plot(figures: Dict[str, Any], path: str) -> None:
    """The PNG: one line per policy (solid) and per Belady figure (dashed), bound on a log axis."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for label, values in figures["series"].items():
        offline = label.startswith("Belady")
        ax.plot(figures["mib"], [100 * v for v in values], marker="." if offline else "o",
                linestyle="--" if offline else "-", linewidth=1.2 if offline else 1.8, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(figures["mib"])
    ax.set_xticklabels([f"{m:g}" for m in figures["mib"]])
    ax.set_xlabel("cache bound (MiB of stored bytes; the demo's is 2)")
    ax.set_ylabel("byte-hit ratio (%)")
    ax.set_title(f"nvcache replay of the demo's trace ({figures['requests']} requests, "
                 f"{figures['layer_mib']:.1f} MiB of distinct records)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--factors", default=",".join(f"{f:g}" for f in FACTORS),
                    help="bounds, as multiples of the demo's 2 MiB")
    ap.add_argument("--policies", default=None, help="comma-separated (default: every one of nvcache.POLICIES)")
    ap.add_argument("--out", default=OUT, help="the PNG (the JSON goes beside it)")
    args = ap.parse_args(argv)
    info = PT.provenance()
    info["load_before"] = list(os.getloadavg())
    t0 = time.perf_counter()
    figures = measure([float(x) for x in args.factors.split(",") if x],
                      [p for p in args.policies.split(",") if p] if args.policies else None)
    info["wall_s"] = time.perf_counter() - t0
    info["load_after"] = list(os.getloadavg())
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    plot(figures, args.out)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as fh:
        json.dump(dict(figures, info=info), fh, indent=1, sort_keys=True)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
