"""The remote tier's cells side by side in one run (issue 14 item 5).

One private redis-server (tests/redisservers.py: a temporary directory under /tmp, a unix socket,
no RDB, no AOF) and cache directories of this run's own, all removed at the end. Cells of a group
are interleaved (A B B A ... rounds, the order flipping every round) because the machine is shared
and noisy; each cell's figures are over all its rounds, and each ratio is given both as the ratio
of the two medians and as the median of the per-round ratios (paired: robust to drift).

Groups and targets (issue 14 item 5):

* **local hit**: ``LayerCache.get`` of a record present locally, a cache without a remote tier vs
  one with a tier configured (the server up). Target: with ≤ 1.05 × without.
* **remote hit**: ``LayerCache.get`` of a record absent locally and present in Redis (a local
  miss, the tier's GET, the local store of what it read), each name asked once, the names
  written to Redis beforehand by another node directory's cache; vs a bare redis-py ``GET`` of the
  same key over the same client and unix socket; ``RemoteTier.get`` alone is shown between them.
  Target: ≤ 1.5 × the bare GET.
* **server stopped**: ``LayerCache.get`` of an absent name with the server SIGSTOPped after the
  tier's breaker opened, vs a local miss of a cache without a tier. Target: ≤ 1.1 ×. Once every
  ``backoff`` seconds (1 s, doubling to 30 s) the breaker lets one probe through, which waits for
  the socket timeout (0.2 s): blocks holding a probe are counted and left out of the "steady"
  mean, kept in the plain mean.
* **burst**: PROCS processes (8) each scan the same LAYERS (50) new layers at once (released by
  one barrier), every process in the same order, each layer's analysis a sleep (or a CPU spin) of
  ANALYSIS_MS; "without single flight" is get, analyse on a miss, put; "with" is
  ``get_or_create``. Counted: analyses actually run (a shared counter each analysis adds to),
  wall time from the barrier to the last process done, over ROUNDS rounds (new names each round,
  the two modes alternating). With a remote tier the burst also runs over NODES node directories
  (PROCS / NODES processes each) sharing the one Redis: the fleet-wide claim.

The sub-microsecond cells (local hit, server stopped) are timed a block of BLOCK calls at a time
(one clock read per block; the per-call figure is the block's mean); the remote cells call by call.
The remote tier's cells need ``LayerCache(remote=...)``; without it (a main before that commit) they
are left out and said so, and the RemoteTier-alone and bare-GET cells still run.

Run: ``.venv/bin/python bench/fleet.py [--core py] [--quick] [--out FILE]``; ``--profile`` adds a
cProfile of the remote-hit and server-stopped paths.
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import io
import multiprocessing as mp
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

KIND = "layer_file"
RECORD_BYTES = 6000


def layer(tag: int, i: int) -> str:
    return f"sha256:{tag:08x}{i:056x}"


def loads() -> str:
    a, b, c = os.getloadavg()
    return f"{a:.2f} / {b:.2f} / {c:.2f}"


# -- statistics ---------------------------------------------------------------------------------
class Cell:
    """One cell's samples (µs per call), by round."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.rounds: List[List[float]] = []
        self.weights: List[List[int]] = []  # calls behind each sample (1: timed call by call)
        self.note = ""

    def add(self, samples: List[float], calls: int = 1) -> None:
        self.rounds.append(samples)
        self.weights.append([calls] * len(samples))

    @property
    def samples(self) -> List[float]:
        return [s for r in self.rounds for s in r]

    def median(self) -> float:
        return statistics.median(self.samples)

    def mean(self) -> float:
        num = sum(s * w for r, ws in zip(self.rounds, self.weights) for s, w in zip(r, ws))
        return num / sum(w for ws in self.weights for w in ws)

    def round_medians(self) -> List[float]:
        return [statistics.median(r) for r in self.rounds]

    def p99(self) -> float:
        s = sorted(self.samples)
        return s[min(len(s) - 1, int(len(s) * 0.99))]

    def calls(self) -> int:
        return sum(w for ws in self.weights for w in ws)


def ratio(a: Cell, b: Cell) -> Tuple[float, float]:
    """(a's median / b's median, the median of the per-round ratios of medians)."""
    paired = [x / y for x, y in zip(a.round_medians(), b.round_medians())]
    return a.median() / b.median(), statistics.median(paired)


def interleave(cells: Sequence[Tuple[Cell, Callable[[int], Tuple[List[float], int]]]], rounds: int,
               between: Optional[Callable[[int], None]] = None) -> None:
    """Run each cell's ``run(round)`` once a round, the order flipping every round (A B, B A, ...)."""
    for r in range(rounds):
        order = list(cells) if r % 2 == 0 else list(reversed(cells))
        for cell, run in order:
            samples, calls = run(r)
            cell.add(samples, calls)
        if between is not None:
            between(r)


def blocks(call: Callable[[str], Any], names: Sequence[str], count: int) -> List[float]:
    """``count`` samples, each the mean µs per call of one pass over ``names`` (one clock read a pass)."""
    out = []
    clock = time.perf_counter_ns
    for _ in range(count):
        t0 = clock()
        for name in names:
            call(name)
        out.append((clock() - t0) / len(names) / 1000)
    return out


def each(call: Callable[[Any], Any], items: Sequence[Any]) -> List[float]:
    """µs of each call, one by one."""
    out = []
    clock = time.perf_counter_ns
    for item in items:
        t0 = clock()
        call(item)
        out.append((clock() - t0) / 1000)
    return out


# -- the burst ----------------------------------------------------------------------------------
def burst_worker(path: str, url: Optional[str], no_ext: bool, barrier: Any, cmds: Any, results: Any,
                 counter: Any) -> None:
    if no_ext:
        os.environ["NVCACHE_NO_EXTENSIONS"] = "1"
    import nvcache
    from nvcache.scanrecords import scan_record

    cache = nvcache.LayerCache(path, 1000, remote=url) if url else nvcache.LayerCache(path, 1000)
    records: Dict[int, bytes] = {}
    while True:
        cmd = cmds.get()
        if cmd is None:
            break
        mode, tag, count, analysis, ms = cmd
        names = [layer(tag, i) for i in range(count)]
        for i in range(count):
            if i not in records:
                records[i] = scan_record(layer(0, i), RECORD_BYTES, seed=i)

        def analyse(i: int) -> bytes:
            if analysis == "sleep":
                time.sleep(ms / 1000)
            else:  # spin: the analysis takes a CPU
                end = time.perf_counter() + ms / 1000
                while time.perf_counter() < end:
                    pass
            with counter.get_lock():
                counter.value += 1
            return records[i]

        barrier.wait()
        t0 = time.monotonic_ns()
        for i, name in enumerate(names):
            if mode == "with":
                cache.get_or_create(name, lambda i=i: analyse(i), wait=60)
            else:
                if cache.get(name) is None:
                    cache.put(name, analyse(i))
        results.put((t0, time.monotonic_ns()))
    cache.close()


class Burst:
    """PROCS worker processes over NODES node directories, kept for every round of a variant."""

    def __init__(self, procs: int, nodes: int, url: Optional[str], no_ext: bool, root: str, label: str) -> None:
        self.label = label
        ctx = mp.get_context("spawn")
        self.paths = [tempfile.mkdtemp(prefix=f"node{n}-", dir=root) for n in range(nodes)]
        self.barrier = ctx.Barrier(procs)
        self.cmds = [ctx.Queue() for _ in range(procs)]
        self.results = ctx.Queue()
        self.counter = ctx.Value("i", 0)
        self.procs = [ctx.Process(target=burst_worker, daemon=True,
                                  args=(self.paths[p % nodes], url, no_ext, self.barrier, self.cmds[p],
                                        self.results, self.counter)) for p in range(procs)]
        for p in self.procs:
            p.start()

    def round(self, mode: str, tag: int, count: int, analysis: str, ms: float) -> Tuple[int, float]:
        with self.counter.get_lock():
            self.counter.value = 0
        for q in self.cmds:
            q.put((mode, tag, count, analysis, ms))
        got = [self.results.get(timeout=300) for _ in self.procs]
        wall = (max(t1 for _, t1 in got) - min(t0 for t0, _ in got)) / 1e6
        return self.counter.value, wall

    def close(self) -> None:
        for q in self.cmds:
            q.put(None)
        for p in self.procs:
            p.join(30)
            if p.is_alive():
                p.kill()


def run_bursts(args: argparse.Namespace, url: Optional[str], no_ext: bool, root: str, has_remote: bool,
               lines: List[str]) -> None:
    variants = [("one node, no remote tier", 1, None)]
    if has_remote and args.nodes > 1:
        variants.append((f"{args.nodes} node directories, one Redis (remote tier)", args.nodes, url))
    tag = 1000
    lines += ["", f"### Burst: {args.procs} processes, the same {args.layers} new layers at once, "
              f"analysis {args.analysis_ms:g} ms, {args.burst_rounds} rounds a mode (alternating)", "",
              "| nodes | analysis | mode | analyses (median; min–max) | ideal | wall ms median | wall ms mean | wall min–max |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, nodes, vurl in variants:
        burst = Burst(args.procs, nodes, vurl, no_ext, root, label)
        try:
            for analysis in args.analysis:
                res: Dict[str, List[Tuple[int, float]]] = {"without": [], "with": []}
                burst.round("without", tag, 2, analysis, 0.1)  # warm-up: imports, first opens
                tag += 1
                for r in range(args.burst_rounds * 2):
                    mode = ("without", "with")[(r + r // 2) % 2]  # without with with without ...
                    res[mode].append(burst.round(mode, tag, args.layers, analysis, args.analysis_ms))
                    tag += 1
                for mode in ("without", "with"):
                    an = [a for a, _ in res[mode]]
                    wall = [w for _, w in res[mode]]
                    ideal = args.layers if mode == "with" else f"≤ {args.layers * args.procs}"
                    lines.append(f"| {label} | {analysis} | {mode} single flight | {statistics.median(an):g} "
                                 f"({min(an)}–{max(an)}) | {ideal} | {statistics.median(wall):.0f} | "
                                 f"{statistics.fmean(wall):.0f} | {min(wall):.0f}–{max(wall):.0f} |")
                print(f"burst {label} {analysis} done, load {loads()}", file=sys.stderr)
        finally:
            burst.close()
    lines.append(f"\nload after the bursts: {loads()}")


# -- the single-process cells -------------------------------------------------------------------
def table(cells: Sequence[Cell]) -> List[str]:
    out = ["| cell | calls | rounds | median µs | mean µs | p99 µs (of samples) | note |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in cells:
        out.append(f"| {c.name} | {c.calls()} | {len(c.rounds)} | {c.median():.3f} | {c.mean():.3f} | "
                   f"{c.p99():.3f} | {c.note} |")
    return out


def ratio_line(what: str, a: Cell, b: Cell, target: float) -> str:
    r_med, r_paired = ratio(a, b)
    r_mean = a.mean() / b.mean()
    met = "met" if max(r_med, r_paired) <= target else "**NOT met**"
    return (f"| {what} | {r_med:.3f} | {r_paired:.3f} | {r_mean:.3f} | ≤ {target:g} | {met} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--core", choices=["ext", "py"], default="ext", help="py: the pure-Python twin")
    ap.add_argument("--records", type=int, default=2000, help="records in the local cache (6 KB each)")
    ap.add_argument("--rounds", type=int, default=30, help="interleaved rounds of each single-process group")
    ap.add_argument("--block", type=int, default=500, help="calls a timed block (local hit, server stopped)")
    ap.add_argument("--blocks", type=int, default=10, help="blocks a cell a round")
    ap.add_argument("--remote-names", type=int, default=100, help="names a cell a round in the remote-hit group")
    ap.add_argument("--procs", type=int, default=8)
    ap.add_argument("--nodes", type=int, default=2, help="node directories of the remote-tier burst")
    ap.add_argument("--layers", type=int, default=50)
    ap.add_argument("--analysis-ms", type=float, default=5.0)
    ap.add_argument("--analysis", nargs="+", choices=["sleep", "spin"], default=["sleep", "spin"])
    ap.add_argument("--burst-rounds", type=int, default=7, help="rounds a mode")
    ap.add_argument("--no-burst", action="store_true")
    ap.add_argument("--only-burst", action="store_true")
    ap.add_argument("--quick", action="store_true", help="a smoke run: few rounds")
    ap.add_argument("--profile", action="store_true", help="cProfile the remote-hit and server-stopped paths")
    ap.add_argument("--out", help="also write the report to this file")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.blocks, args.burst_rounds, args.remote_names = 4, 4, 2, 50
    no_ext = args.core == "py"
    if no_ext:
        os.environ["NVCACHE_NO_EXTENSIONS"] = "1"
    import redis  # noqa: F401

    import nvcache
    import redisservers as rs
    from nvcache.remote import RemoteTier
    from nvcache.scanrecords import scan_record

    assert nvcache.EXTENSION == (not no_ext), f"asked for core {args.core}, nvcache.EXTENSION is {nvcache.EXTENSION}"
    has_remote = "remote" in inspect.signature(nvcache.LayerCache.__init__).parameters
    commit = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", HERE, "status", "--porcelain", "--", "nvcache"], capture_output=True,
                           text=True).stdout.strip()
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip()
    lines = [f"## bench/fleet.py, core {args.core}, {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}", "",
             f"commit {commit}{' (nvcache/ modified)' if dirty else ''}; {os.cpu_count()} CPUs; load at the start "
             f"{loads()}; {redis_version.split(' sha=')[0]}; redis-py {redis.__version__}; "
             f"records {RECORD_BYTES} B (scanrecords.scan_record); LayerCache(remote=...) "
             f"{'present' if has_remote else 'ABSENT on this commit: its cells are left out'}"]
    print(lines[-1], file=sys.stderr)
    root = tempfile.mkdtemp(prefix="nvfleet-", dir="/tmp")
    server = rs.RedisServer(config={"save": '""', "appendonly": "no"})
    caches: List[Any] = []
    tiers: List[Any] = []
    try:
        server.start()
        url = server.unix_url
        if not args.only_burst:
            run_cells(args, nvcache, RemoteTier, scan_record, server, url, root, has_remote, caches, tiers, lines)
            for c in caches:
                c.close()
            caches.clear()
            for t in tiers:
                t.close()
            tiers.clear()
        if not args.no_burst:
            server.resume()
            run_bursts(args, url, no_ext, root, has_remote, lines)
    finally:
        for c in caches:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass
        server.cleanup()  # SIGCONT, SIGKILL, its directory
        rs.cleanup()
        shutil.rmtree(root, ignore_errors=True)
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with open(args.out, "a") as f:
            f.write(report + "\n")
    return 0


def run_cells(args: argparse.Namespace, nvcache: Any, RemoteTier: Any, scan_record: Any, server: Any, url: str,
              root: str, has_remote: bool, caches: List[Any], tiers: List[Any], lines: List[str]) -> None:
    LayerCache = nvcache.LayerCache
    n_remote = args.remote_names * args.rounds
    records = [scan_record(layer(0, i), RECORD_BYTES, seed=i) for i in range(args.records)]

    # -- local hit: one node directory, two handles on it (one store): without and with a tier --
    node_a = os.path.join(root, "a")
    plain = LayerCache(node_a, 1000)
    caches.append(plain)
    for i, rec in enumerate(records):
        plain.put(layer(0, i), rec)
    hot = [layer(0, i) for i in range(0, args.records, max(1, args.records // 1000))]
    absent = [layer(0xFFFF, i) for i in range(args.block)]
    local_plain = Cell("local hit, no remote tier")
    local_remote = Cell("local hit, remote tier configured (server up)")
    group_local: List[Tuple[Cell, Callable[[int], Tuple[List[float], int]]]] = [
        (local_plain, lambda r: (blocks(plain.get, hot[:args.block], args.blocks), args.block))]
    with_remote = None
    if has_remote:
        with_remote = LayerCache(node_a, 1000, remote=url)
        caches.append(with_remote)
        # Two handles on one path share its store: the plain one must still have no tier.
        assert plain.remote is None and with_remote.remote is not None, (plain.remote, with_remote.remote)
        assert with_remote.get(hot[0]) is not None
        group_local.append((local_remote, lambda r: (blocks(with_remote.get, hot[:args.block], args.blocks),
                                                     args.block)))
    for c in caches:
        c.get(hot[0])
    print(f"local-hit group, load {loads()}", file=sys.stderr)
    interleave(group_local, args.rounds)
    lines += ["", f"### Local hit ({args.records} records in the cache, {len(hot[:args.block])} hot names, "
              f"blocks of {args.block} calls), load after: {loads()}", ""]
    lines += table([c for c, _ in group_local])

    # -- remote hit vs a bare GET of the same key over the same client ---------------------------
    remote_names = [layer(0x5000, i) for i in range(n_remote)]
    tier = RemoteTier(url)  # the reference: the tier alone, default prefix, no key
    tiers.append(tier)
    if has_remote:
        writer = LayerCache(os.path.join(root, "b"), 1000, remote=url)  # another node's directory
        for i, name in enumerate(remote_names):
            writer.put(name, records[i % len(records)])
        writer_stats = writer.remote_stats()
        writer.close()
        reader = LayerCache(os.path.join(root, "c"), 1000, remote=url)
        caches.append(reader)
        rtier = reader.remote
        client = rtier._get_client()
        prefix = rtier.prefix
    else:
        writer_stats = None
        for i, name in enumerate(remote_names):
            assert tier.put(f"{name}_{KIND}".encode(), records[i % len(records)])
        client = tier._get_client()
        prefix = tier.prefix
    keys = [prefix + f"{name}_{KIND}".encode() for name in remote_names]
    assert client.get(keys[0]) is not None, "the names were not written to Redis"
    bare = Cell("bare redis-py GET, same key, same client (unix socket)")
    alone = Cell("RemoteTier.get alone (same value)")
    through = Cell("LayerCache.get, remote hit (local miss, GET, local store)")
    m = args.remote_names
    group_remote: List[Tuple[Cell, Callable[[int], Tuple[List[float], int]]]] = [
        (bare, lambda r: (each(client.get, keys[r * m:(r + 1) * m]), 1)),
        (alone, lambda r: (each(tier.get, [f"{n}_{KIND}".encode() for n in remote_names[r * m:(r + 1) * m]]), 1)),
    ]
    if has_remote:
        group_remote.append((through, lambda r: (each(reader.get, remote_names[r * m:(r + 1) * m]), 1)))
    print(f"remote-hit group, load {loads()}", file=sys.stderr)
    for _ in range(3):  # warm the connections
        client.get(keys[0])
        tier.get(f"{remote_names[0]}_{KIND}".encode())
    interleave(group_remote, args.rounds)
    if has_remote:
        missing = sum(1 for n in remote_names if reader.peek(n) is None)
        through.note = f"{n_remote - missing}/{n_remote} names now local; reader's remote_stats {reader.remote_stats()}"
    alone.note = f"tier stats {tier.stats()}"
    lines += ["", f"### Remote hit ({m} distinct names a cell a round, each asked once), load after: {loads()}", ""]
    if writer_stats is not None:
        lines.append(f"(the writer node's remote_stats after its {n_remote} puts: {writer_stats})\n")
    lines += table([c for c, _ in group_remote])

    # -- server stopped, breaker open, vs a local miss without a tier ---------------------------
    stopped = Cell("LayerCache.get miss, server SIGSTOPped, breaker open")
    miss = Cell("local miss, no remote tier")
    tier_open = Cell("RemoteTier.get alone, server SIGSTOPped, breaker open")
    probes = {"first": 0.0}
    server.pause()
    try:
        t0 = time.perf_counter()
        tier.get(b"absent_layer_file")  # waits for the socket timeout: the breaker opens
        probes["tier first"] = (time.perf_counter() - t0) * 1e6
        if has_remote:
            t0 = time.perf_counter()
            with_remote.get(absent[0])
            probes["first"] = (time.perf_counter() - t0) * 1e6
        group_stop: List[Tuple[Cell, Callable[[int], Tuple[List[float], int]]]] = [
            (miss, lambda r: (blocks(plain.get, absent, args.blocks), args.block)),
            (tier_open, lambda r: (blocks(tier.get, [f"{n}_{KIND}".encode() for n in absent], args.blocks),
                                   args.block))]
        if has_remote:
            group_stop.append((stopped, lambda r: (blocks(with_remote.get, absent, args.blocks), args.block)))
        print(f"server-stopped group, load {loads()}", file=sys.stderr)
        interleave(group_stop, args.rounds)
        if args.profile:
            prof(lines, "LayerCache.get remote miss, server stopped, breaker open" if has_remote else
                 "RemoteTier.get, server stopped, breaker open",
                 lambda: [(with_remote.get if has_remote else (lambda n: tier.get(f"{n}_{KIND}".encode())))(n)
                          for _ in range(40) for n in absent])
    finally:
        server.resume()
    # A block holding a probe spends the socket timeout (0.2 s) in one call: its mean is above
    # half of timeout / BLOCK (200 µs for 500 calls), which no load spike seen here came near.
    limit = tier.timeout / 2 / args.block * 1e6
    for c, errors in ((stopped, with_remote.remote.stats()["remote_errors"] if has_remote else 0),
                      (tier_open, tier.stats()["remote_errors"])):
        if c.rounds:
            slow = [s for s in c.samples if s > limit]
            steady = [s for s in c.samples if s <= limit]
            c.note = (f"{len(slow)} of {len(c.samples)} blocks held a probe ({errors - 1} probes by remote_errors); "
                      f"mean without them {statistics.fmean(steady):.3f}" if slow else "no probe")
    tier_open.note += f"; first call {probes['tier first'] / 1000:.0f} ms"
    if has_remote:
        stopped.note += f"; first call {probes['first'] / 1000:.0f} ms; remote_stats {with_remote.remote_stats()}"
    lines += ["", f"### Server stopped (SIGSTOP) after the breaker opened ({len(absent)} absent names, blocks of "
              f"{args.block}), load after: {loads()}", ""]
    lines += table([c for c, _ in group_stop])

    if args.profile and has_remote:
        more = [layer(0x6000, i) for i in range(2000)]
        writer = LayerCache(os.path.join(root, "b"), 1000, remote=url)
        for i, name in enumerate(more):
            writer.put(name, records[i % len(records)])
        writer.close()
        prof(lines, "LayerCache.get, remote hit", lambda: [reader.get(n) for n in more])

    lines += ["", "### Ratios (median ratio: of the cells' medians; paired: median of the per-round ratios; "
              "target met when both are within it)", "",
              "| ratio | of medians | paired | of means | target | |", "| --- | --- | --- | --- | --- | --- |"]
    if has_remote:
        lines.append(ratio_line("local hit: with a tier / without", local_remote, local_plain, 1.05))
        lines.append(ratio_line("remote hit through LayerCache.get / bare GET", through, bare, 1.5))
        lines.append(ratio_line("server stopped, breaker open / local miss", stopped, miss, 1.1))
    lines.append(ratio_line("(reference) RemoteTier.get alone / bare GET", alone, bare, 1.5))
    lines.append(ratio_line("(reference) local miss + RemoteTier.get with breaker open / local miss",
                            _sum_cell(miss, tier_open), miss, 1.1))


def _sum_cell(a: Cell, b: Cell) -> Cell:
    """A cell whose samples are a's plus b's, round by round and sample by sample (a rough sum)."""
    c = Cell(f"{a.name} + {b.name}")
    for ra, rb, wa in zip(a.rounds, b.rounds, a.weights):
        c.rounds.append([x + y for x, y in zip(ra, rb)])
        c.weights.append(wa)
    return c


def prof(lines: List[str], what: str, run: Callable[[], Any]) -> None:
    p = cProfile.Profile()
    p.enable()
    run()
    p.disable()
    s = io.StringIO()
    pstats.Stats(p, stream=s).sort_stats("tottime").print_stats(18)
    body = "\n".join(x for x in s.getvalue().splitlines() if x.strip())
    lines += ["", f"### cProfile: {what} (tottime; cProfile's own cost inflates small calls)", "", "```", body, "```"]


if __name__ == "__main__":
    sys.exit(main())
