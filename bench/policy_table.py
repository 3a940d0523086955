"""The cache's eviction policies replayed on the four bench traces (issue 15, items 3-4).

bench/policies.py compares policies in an offline simulator; this replays the same traces through
the real cache, one :class:`~nvcache.LayerCache` per policy (``nvcache.POLICIES``; LRU alone on a
cache without a choice), with ``nvcache.replay`` (what ``nvcache replay TRACE`` runs):

1. the four traces of bench/policies.py, seeds fixed: ``demo`` (``nvcache simulate``'s defaults),
   ``burst`` (a base image release), ``onehit`` (one-hit-wonder heavy) and ``uniform`` (uniform
   churn); bench/policies.py's docstring says how each is built;
2. each written as a trace file (nvcache/trace.py) under a temporary directory, removed at the
   end (``--keep-traces DIR`` writes them there instead): one line per request, time = the
   request's number in ms, the layer id, its record's size (``len(simulate.make_record(...))``,
   bench/policies.py's ``record_sizes``) and the image (``image-<n>``, numbered by first scan);
3. each read back and replayed at the demo's bound (2 MiB) and at 0.25x (0.5 MiB), with every
   policy, beside Belady's figures on the same trace and bound (``simulate.optimum_byte_hits``:
   byte by byte, a bound; ``belady_byte_hits``: whole records, a heuristic).

The replay stores incompressible records, so stored bytes are the record bytes: the figures are
those of ``simulate --no-compress`` (bench/policies.py ``--raw``), and LRU's match that
simulator's LRU row (demo, 1x: 81.51 % byte-hit). Cost model: ``simulate.analysis_seconds``,
500 µs + 40 µs/KiB of record a layer, which a hit saves.

Run::

    .venv/bin/python bench/policy_table.py            # ~1 min per policy
    .venv/bin/python bench/policy_table.py --traces demo --factors 1

Output: ``bench/results/session9/policy-table.md`` and ``.json`` beside it (``--out`` for another
place). Rerun after a policy is added to ``nvcache.POLICIES``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import shutil
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import policies as P  # noqa: E402  (bench/policies.py: the traces)

import nvcache  # noqa: E402
from nvcache import replay as rp  # noqa: E402
from nvcache import simulate as sim  # noqa: E402
from nvcache import trace as tr  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(HERE, "results", "session9", "policy-table.md")
DEMO_MB = P.DEMO_BOUND / 2**20  # `nvcache simulate --max-mb 2`
FACTORS = (1.0, 0.25)
TRACE_NAMES = ("demo", "burst", "onehit", "uniform")


def trace_requests(trace: P.Trace) -> Iterator[tr.Request]:
    """A bench trace as trace-file requests (see the module's docstring); ``trace`` is measured first."""
    if not trace.record_sizes:
        P.measure(trace, raw=True)
    names: Dict[tuple, str] = {}
    k = 0
    for scan in trace.scans:
        image = names.setdefault(scan, f"image-{len(names)}")
        for li in scan:
            yield tr.Request(k / 1000, trace.layer_ids[li], trace.record_sizes[li], image)
            k += 1


def write_trace_file(name: str, directory: str) -> str:
    """Build the bench trace ``name`` and write it as ``<directory>/<name>.trace``; its path."""
    trace = P.TRACES[name]()
    path = os.path.join(directory, f"{name}.trace")
    tr.write_trace(path, trace_requests(trace), [f"bench/policies.py {name} trace: {trace.note}"])
    return path


def provenance() -> Dict[str, Any]:
    """When, where and on what this ran: date, git commit, machine, core."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT).stdout.strip()
        commit += " (uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit, "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "core": "compiled" if nvcache.EXTENSION else "python",
            "policies": list(sim.known_policies())}


def run(trace_names: Sequence[str], factors: Sequence[float], policies: Optional[Sequence[str]],
        trace_dir: Optional[str], log: Callable[[str], None]) -> Dict[str, Any]:
    """Every trace x bound x policy: the replays' figures (``ReplayResult.as_dict``), one row per replay."""
    made = trace_dir is None
    directory = tempfile.mkdtemp(prefix="nvcache-traces-") if made else trace_dir
    assert directory is not None
    os.makedirs(directory, exist_ok=True)
    rows: List[Dict[str, Any]] = []
    try:
        for name in trace_names:
            t0 = time.perf_counter()
            path = write_trace_file(name, directory)
            work = rp.load_file(path)
            log(f"{name}: {len(work.scans)} scans, {len(work.requests)} requests, {len(work.layer_ids)} layers, "
                f"{os.path.getsize(path) / 2**20:.1f} MiB trace file ({time.perf_counter() - t0:.1f} s)")
            for f in factors:
                t0 = time.perf_counter()
                result = rp.replay(work, DEMO_MB * f, policies)
                row = result.as_dict()
                row.update(trace=name, factor=f, source=os.path.basename(path), seconds=time.perf_counter() - t0)
                rows.append(row)
                figures = ", ".join(f"{p['policy']} {100 * p['byte_hit_ratio']:.2f}" for p in row["policies"])
                log(f"  x{f:g}: byte-hit {figures}; optimum {100 * result.optimum_byte_hit_ratio:.2f} "
                    f"({row['seconds']:.1f} s)")
    finally:
        if made:
            shutil.rmtree(directory, ignore_errors=True)
    return {"rows": rows}


def _pct(x: Optional[float], digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}"


def markdown(results: Dict[str, Any], info: Dict[str, Any]) -> str:
    """The report: provenance, then one table per bound (trace x policy, with Belady's two rows)."""
    lines = ["# Eviction policies replayed through the cache (bench/policy_table.py)", "",
             f"{info['date']}, commit {info['commit']}, Python {info['python']} on {info['machine']} "
             f"({info['cpus']} CPUs), {info['core']} core; 1/5/15-min load "
             f"{'/'.join(f'{x:.2f}' for x in info['load_before'])} before, "
             f"{'/'.join(f'{x:.2f}' for x in info['load_after'])} after; {info['wall_s']:.0f} s. "
             f"Policies: {', '.join(info['policies'])}.", "",
             "Each trace of bench/policies.py (seeds fixed) was written as a trace file and replayed by "
             "`nvcache.replay` through a real cache per policy (incompressible records: stored bytes = record "
             "bytes, as `simulate --no-compress`). Cost model: 500 µs + 40 µs/KiB of record per layer analysed; "
             "time saved is the share of the analysis time of every request that the hits save. *Gap closed*: "
             "the share of LRU's stored-byte-hit gap to the byte-level optimum that the policy closes "
             "(and, in brackets, to Belady on whole records). Neither Belady figure applies the keep rule.", ""]
    for f in sorted({r["factor"] for r in results["rows"]}, reverse=True):
        rows = [r for r in results["rows"] if r["factor"] == f]
        lines += [f"## Bound {f:g} × the demo's ({rows[0]['max_bytes']} stored bytes, {rows[0]['max_mb']:g} MiB)", "",
                  "| trace | policy | hit ratio % | byte-hit ratio % | time saved % | gap to Belady closed % | "
                  "refused puts | evictions |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lru = next((p for p in r["policies"] if p["policy"] == "lru"), None)
            for p in r["policies"]:
                whole = None
                if lru is not None and r["belady_byte_hit_ratio"] - lru["stored_byte_hit_ratio"] > 1e-12:
                    whole = ((p["stored_byte_hit_ratio"] - lru["stored_byte_hit_ratio"])
                             / (r["belady_byte_hit_ratio"] - lru["stored_byte_hit_ratio"]))
                lines.append(f"| {r['trace']} | {p['policy']} | {_pct(p['hit_ratio'])} | {_pct(p['byte_hit_ratio'], 2)} "
                             f"| {_pct(p['time_saved_share'])} | {_pct(p['gap_closed'], 0)} ({_pct(whole, 0)}) | "
                             f"{p['cache_full'] + p['too_large']} | {p['evictions']} |")
            lines.append(f"| {r['trace']} | *Belady optimum, byte by byte (a bound)* | | "
                         f"{_pct(r['optimum_byte_hit_ratio'], 2)} | | 100 | | |")
            lines.append(f"| {r['trace']} | *Belady, whole records (heuristic)* | {_pct(r['belady_hit_ratio'])} | "
                         f"{_pct(r['belady_byte_hit_ratio'], 2)} | {_pct(r['belady_time_saved_share'])} | | | |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--traces", default=",".join(TRACE_NAMES), help="comma-separated, of " + ", ".join(TRACE_NAMES))
    ap.add_argument("--factors", default=",".join(f"{f:g}" for f in FACTORS),
                    help="bounds, as multiples of the demo's 2 MiB")
    ap.add_argument("--policies", default=None, help="comma-separated (default: every one of nvcache.POLICIES)")
    ap.add_argument("--keep-traces", default=None, metavar="DIR", help="write the trace files here and keep them")
    ap.add_argument("--out", default=OUT, help="the markdown report (the JSON goes beside it)")
    args = ap.parse_args(argv)
    names = [n for n in args.traces.split(",") if n]
    unknown = sorted(set(names) - set(TRACE_NAMES))
    if unknown:
        ap.error(f"unknown traces: {', '.join(unknown)}")
    factors = [float(x) for x in args.factors.split(",") if x]
    policies = [p for p in args.policies.split(",") if p] if args.policies else None
    info = provenance()
    info["load_before"] = list(os.getloadavg())
    t0 = time.perf_counter()
    results = run(names, factors, policies, args.keep_traces, lambda s: print(s, file=sys.stderr, flush=True))
    info["wall_s"] = time.perf_counter() - t0
    info["load_after"] = list(os.getloadavg())
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(markdown(results, info))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as fh:
        json.dump(dict(results, info=info), fh, indent=1, sort_keys=True)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
