"""``nvcache simulate``: the main job, scanner processes sharing one cache, and its result table;
``nvcache replay``: a trace file replayed through a cache per eviction policy, beside Belady's.

Registered on the ``nvcache`` group by :mod:`nvcache.cli` (kept apart: they are jobs of their own,
with their own options, and cli.py holds the commands that look at or repair a cache).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Optional, Tuple

import click
from prettytable import PrettyTable
from tqdm import tqdm

from . import replay as rp
from . import simfleet
from . import simulate as sim
from .trace import target_problem
from .cli import Settings, _friendly, cli, pass_settings, self_command, stat_table


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def result_table(r: sim.SimResult) -> str:
    """The figures of a simulation, one per row."""
    table = PrettyTable(["Result", "Value"])
    table.align = "l"
    rate = r.scans_done / r.wall_s if r.wall_s else 0.0
    table.add_row(["policy", r.policy])
    table.add_row(["scans", f"{r.scans_done} of {r.scans_planned} in {r.wall_s:.1f} s ({rate:.0f}/s)"
                   + (" - stopped at --duration" if r.stopped_by_deadline else "")])
    table.add_row(["layer requests", f"{r.requests} ({r.requested_bytes / 2**20:.1f} MiB of records)"])
    table.add_row(["hit ratio", f"{_pct(r.hit_ratio)} ({r.hits} hits, {r.misses} misses)"])
    table.add_row(["byte-hit ratio", f"{_pct(r.byte_hit_ratio)} of record bytes ("
                   f"{'compressed' if r.compress else 'raw'}: {_pct(r.stored_byte_hit_ratio)} of stored bytes)"])
    table.add_row(["Belady optimum byte-hit ratio", f"{_pct(r.optimum_byte_hit_ratio)} of stored bytes (same bound, "
                   f"same trace; whole records: {_pct(r.belady_byte_hit_ratio)})"])
    table.add_row(["evictions", r.evictions])
    table.add_row(["analysis without cache", f"{r.analysis_no_cache_s:.1f} s"])
    table.add_row(["analysis with cache", f"{r.analysis_with_cache_s:.1f} s + {r.cache_overhead_s:.1f} s "
                   "in cache calls"])
    saved = r.time_saved_s / r.analysis_no_cache_s if r.analysis_no_cache_s else 0.0
    table.add_row(["time saved", f"{r.time_saved_s:.1f} s ({_pct(saved)}) of scanner time"])
    table.add_row(["wrong records read", r.wrong_records])
    return table.get_string()


def fleet_table(r: simfleet.FleetResult) -> str:
    """The comparison of the fleet's modes, one row per mode (simfleet's docstring defines each figure)."""
    table = PrettyTable(["Mode", "Analyses run", "Duplicated", "Fleet-wide dup.", "Analysis time saved",
                         "Cache calls", "Local hit ratio", "Remote hit ratio", "Local byte-hit (Belady)"])
    table.align = "r"
    table.align["Mode"] = "l"
    for m in r.modes:
        ran = m.mode != "none"
        avoided = m.analysis_no_cache_s - m.analysis_run_s  # modelled; the calls' own time is measured
        share = avoided / m.analysis_no_cache_s if m.analysis_no_cache_s else 0.0
        table.add_row([
            m.label + (" *" if m.stopped_by_deadline else ""),
            f"{m.analyses} ({m.analyses / m.layers_analysed:.2f}/layer)" if m.layers_analysed else m.analyses,
            m.duplicated if m.duplicated is not None else "-",
            m.fleet_duplicated if m.fleet_duplicated is not None else "-",
            f"{avoided:.1f} s ({_pct(share)})",
            f"{m.cache_overhead_s:.1f} s" if ran else "-",
            _pct(m.local_hit_ratio) if ran else "-",
            _pct(m.remote_hit_ratio) if m.mode == "remote" else "-",
            f"{_pct(m.local_stored_byte_hit_ratio)} ({_pct(m.optimum_byte_hit_ratio)})" if ran else "-",
        ])
    return table.get_string()


def fleet_details(r: simfleet.FleetResult) -> str:
    """What each run did: scans, time, accesses and the counters that back the comparison."""
    table = PrettyTable(["Mode", "Scans", "Wall", "Accesses (hits + misses)", "Net time saved", "Evictions",
                         "Node waits", "Fleet claims / waits", "Remote puts / errors", "Wrong"])
    table.align = "r"
    table.align["Mode"] = "l"
    for m in r.modes:
        if m.mode == "none":
            continue
        rs = m.remote_stats
        table.add_row([m.label, m.scans_done, f"{m.wall_s:.1f} s",
                       f"{m.accesses} ({m.local_hits + m.remote_hits} + {m.analyses})", f"{m.time_saved_s:.1f} s",
                       m.evictions, m.flight_waits,
                       f"{rs.get('fleet_claims', 0)} / {rs.get('fleet_waits', 0)}" if rs else "-",
                       f"{rs.get('remote_puts', 0)} / {rs.get('remote_errors', 0)}" if rs else "-",
                       m.wrong_records])
    return table.get_string()


@cli.command()
@click.option("--processes", "-p", type=click.IntRange(min=1), default=None,
              help="Scanner processes sharing the cache [default: one per core; with --nodes, two per node, "
                   "and a given number is split over the nodes].")
@click.option("--nodes", type=click.IntRange(min=1), default=None,
              help="Simulate a fleet of this many nodes, each with its own cache and scanners, and compare: no "
                   "sharing, per-node cache, per-node + single-flight, per-node + remote tier + fleet "
                   "single-flight, on the same scans.")
@click.option("--remote", "remote_url", default=None, metavar="URL",
              help="With --nodes: the remote tier's Redis (redis://, unix://, redis+cluster://) [default: a "
                   "private redis-server of the run's own, when installed]. The run's keys are removed after.")
@click.option("--remote-mb", type=click.FloatRange(min=1), default=64.0, show_default=True,
              help="With --nodes and no --remote: the private redis-server's maxmemory (allkeys-lru).")
@click.option("--images", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Images in the synthetic registry.")
@click.option("--layers", type=click.IntRange(min=3), default=6000, show_default=True,
              help="Distinct layers (at least images + 2).")
@click.option("--scans", type=click.IntRange(min=1), default=12000, show_default=True,
              help="Image scans to run (popular images are scanned more often).")
@click.option("--max-mb", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True,
              help="Cache bound in MiB (the default catalogue holds about 20 MiB of records).")
@click.option("--seed", type=int, default=1, show_default=True, help="Random seed of registry and scans.")
@click.option("--skew", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Zipf exponent of image, stack and base popularity.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=50.0, show_default=True,
              help="Stop after this many seconds even if scans remain.")
@click.option("--analysis-us", type=click.FloatRange(min=0), default=500.0, show_default=True,
              help="Fixed cost of analysing one layer, in microseconds.")
@click.option("--us-per-kib", type=click.FloatRange(min=0), default=40.0, show_default=True,
              help="Cost of analysing one KiB of layer record, in microseconds.")
@click.option("--path", "sim_path", default=None,
              help="Cache directory (default: a fresh temporary one, so a real cache is never touched).")
@click.option("--start-method", type=click.Choice(["spawn", "fork", "forkserver"]), default="spawn",
              show_default=True, help="How the scanner processes are started.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@click.option("--compress/--no-compress", default=True, show_default=True,
              help="Store records zstd-compressed (the cache's default) or raw.")
@click.option("--keep", is_flag=True, help="Keep the temporary cache directory (removed at the end otherwise).")
@click.option("--policy", type=click.Choice(sim.known_policies()), default="lru", show_default=True,
              help="The cache's eviction policy for the run.")
@click.option("--trace-out", type=click.Path(dir_okay=False, writable=True), default=None, metavar="FILE",
              help="Write the requests the scanners made, in the order the cache saw them, as a trace file "
                   "`nvcache replay` reads (README, 'Replaying a trace').")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON instead of tables.")
@pass_settings
@_friendly
def simulate(settings: Settings, processes: Optional[int], nodes: Optional[int], remote_url: Optional[str],
             remote_mb: float, images: int, layers: int, scans: int, max_mb: float, seed: int,
             skew: float, duration: float, analysis_us: float, us_per_kib: float, sim_path: Optional[str],
             start_method: str, progress: Optional[bool], compress: bool, keep: bool, policy: str,
             trace_out: Optional[str], as_json: bool) -> None:
    """The main job: scanner processes scanning a synthetic registry through one shared cache.

    A miss "analyses" the layer (a sleep in proportion to its record size)
    and puts the record, keeping the image's layers. At the end: the stat
    table, hit and byte-hit ratios, time saved, evictions and the byte-hit
    ratio Belady's offline optimum reaches on the recorded trace with the
    same bound. The global --path is used only when given on the command
    line; NVCACHE_PATH is ignored here, so the demo never fills a real cache. Without a
    path, the run's temporary directory is removed at the end (also after Ctrl-C) unless
    --keep; its path is printed first.

    With --nodes N: N node directories under that one, each with its own cache and scanner
    processes, run once per mode on the same scans (scan i on node i mod N), and a table
    comparing analyses run, duplicated analyses, time saved, hit ratios per tier and Belady's
    optimum (nvcache/simfleet.py defines each). --duration then bounds each mode's run.
    """
    if remote_url is not None and nodes is None:
        raise click.UsageError("--remote needs --nodes")
    if nodes is not None and (trace_out is not None or policy != "lru"):
        raise click.UsageError("--trace-out and --policy are for a single node's run: not with --nodes")
    problem = None if trace_out is None else target_problem(trace_out)
    if problem is not None:  # before the run, not after it
        raise click.BadParameter(problem, param_hint="'--trace-out'")
    if nodes is None and processes is None:
        processes = os.cpu_count() or 1
    temporary = not sim_path and not settings.path_given
    path = sim_path or (settings.path if settings.path_given else sim.fresh_path())
    what = "cache" if nodes is None else "fleet (a directory per mode and node)"
    if temporary and not keep:
        click.echo(f"{what}: {path} (temporary: removed at the end; --keep keeps it)", err=as_json)
    else:
        click.echo(f"{what}: {path}", err=as_json)
    try:
        if nodes is not None:
            _fleet(path, nodes, processes or 2 * nodes, remote_url, remote_mb, images, layers, scans, max_mb, seed,
                   skew, duration, analysis_us, us_per_kib, start_method, progress, compress, as_json)
            return
        assert processes is not None
        _simulate(path, processes, images, layers, scans, max_mb, seed, skew, duration, analysis_us, us_per_kib,
                  start_method, progress, compress, as_json, kept=not temporary or keep, policy=policy,
                  trace_out=trace_out)
    finally:
        if temporary and not keep:
            shutil.rmtree(path, ignore_errors=True)


def _progress_bar(total: int, desc: str, progress: Optional[bool]) -> tqdm:
    """The run's bar on stderr (``progress`` None: when stderr is a terminal)."""
    tqdm.monitor_interval = 0  # no monitor thread: nothing to inherit if workers fork
    return tqdm(total=total, unit="scan", desc=desc, file=sys.stderr, dynamic_ncols=True,
                disable=None if progress is None else not progress)


def _simulate(path: str, processes: int, images: int, layers: int, scans: int, max_mb: float, seed: int,
              skew: float, duration: float, analysis_us: float, us_per_kib: float, start_method: str,
              progress: Optional[bool], compress: bool, as_json: bool, kept: bool, policy: str = "lru",
              trace_out: Optional[str] = None) -> None:
    bar = _progress_bar(scans, "scanning", progress)

    def tick(done: int, _total: int) -> None:
        bar.update(done - bar.n)

    try:
        result = sim.run(path, processes=processes, images=images, layers=layers, scans=scans, max_mb=max_mb,
                         seed=seed, skew=skew, duration=duration, fixed_us=analysis_us, us_per_kib=us_per_kib,
                         start_method=start_method, compress=compress, policy=policy, trace_out=trace_out,
                         progress=tick)
    except RuntimeError as exc:  # a worker failed, or the trace could not be written (TraceOutError)
        raise click.ClickException(str(exc)) from exc
    finally:
        bar.close()
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2, sort_keys=True))
        return
    click.echo(f"{processes} scanner processes, {images} images over {layers} layers "
               f"({result.catalogue_bytes / 2**20:.1f} MiB of records), bound {max_mb:g} MiB, seed {seed}, "
               f"policy {result.policy}")
    click.echo(stat_table(result.stats))
    click.echo(result_table(result))
    if (result.counter_hits, result.counter_misses) != (result.hits, result.misses):
        click.echo(f"warning: the cache counted {result.counter_hits} hits and {result.counter_misses} misses, "
                   f"the trace {result.hits} and {result.misses}", err=True)
    if trace_out is not None:
        click.echo(f"trace: {result.requests} requests written to {trace_out} (replay it: "
                   f"{self_command()} replay {trace_out} --max-mb {max_mb:g})")
    if kept:
        click.echo(f"inspect it: {self_command()} --path {path} show --limit 10")
    else:
        click.echo(f"removing {path} (run with --keep to inspect it)")


def _fleet(root: str, nodes: int, processes: int, remote_url: Optional[str], remote_mb: float, images: int,
           layers: int, scans: int, max_mb: float, seed: int, skew: float, duration: float, analysis_us: float,
           us_per_kib: float, start_method: str, progress: Optional[bool], compress: bool, as_json: bool) -> None:
    runs = len(simfleet.MODES) - 1  # "none" is computed, not run
    bar = _progress_bar(scans * runs, "fleet", progress)
    offsets: dict = {}

    def tick(mode: str, done: int, _total: int) -> None:
        base = offsets.setdefault(mode, bar.n)  # the modes run one after another
        bar.set_description(simfleet.LABELS[mode], refresh=False)
        bar.update(base + done - bar.n)

    try:
        result = simfleet.run_fleet(root, nodes=nodes, processes=processes, images=images, layers=layers,
                                    scans=scans, max_mb=max_mb, seed=seed, skew=skew, duration=duration,
                                    fixed_us=analysis_us, us_per_kib=us_per_kib, start_method=start_method,
                                    compress=compress, remote=remote_url, remote_mb=remote_mb, progress=tick)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        bar.close()
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2, sort_keys=True))
        return
    per_node = ", ".join(str(n) for n in result.processes)
    if result.remote_private:
        tier = f"a private redis-server (maxmemory {result.remote_maxmemory_mb:g} MiB, allkeys-lru)"
    else:
        tier = result.remote_url or "none"
    click.echo(f"{nodes} nodes ({per_node} scanner processes), {images} images over {layers} layers "
               f"({result.catalogue_bytes / 2**20:.1f} MiB of records), bound {max_mb:g} MiB per node, "
               f"{scans} scans, seed {seed}; remote tier: {tier}")
    click.echo(fleet_table(result))
    click.echo(fleet_details(result))
    for mode, why in result.skipped.items():
        click.echo(f"{simfleet.LABELS[mode]}: skipped: {why}")
    if any(m.stopped_by_deadline for m in result.modes):
        click.echo("* stopped at --duration: fewer scans than planned", err=True)
    for m in result.modes:
        if m.mode != "none" and (m.counter_hits, m.counter_misses) != (m.local_hits + m.remote_hits, m.analyses):
            click.echo(f"warning: {m.label}: the caches counted {m.counter_hits} hits and {m.counter_misses} "
                       f"misses, the scanners {m.local_hits + m.remote_hits} and {m.analyses}", err=True)


def replay_table(r: rp.ReplayResult) -> str:
    """One row per policy replayed, then Belady's two offline figures on the same trace and bound."""
    table = PrettyTable(["Policy", "Hits", "Hit ratio", "Byte-hit ratio", "Analysis time saved", "Gap closed",
                         "Evictions", "Refused puts"])
    table.align = "r"
    table.align["Policy"] = "l"
    for p in r.policies:
        gap = r.gap_closed(p)
        table.add_row([p.policy, f"{p.hits} of {p.requests}", _pct(p.hit_ratio), _pct(p.byte_hit_ratio),
                       f"{p.cost_saved_s:.1f} s ({_pct(p.time_saved_share)})", "-" if gap is None else _pct(gap),
                       p.evictions, p.cache_full + p.too_large])
    table.add_row(["Belady optimum (byte by byte: a bound)", "", "", _pct(r.optimum_byte_hit_ratio), "", "100.0 %",
                   "", ""])
    table.add_row(["Belady, whole records (heuristic)", "", _pct(r.belady_hit_ratio), _pct(r.belady_byte_hit_ratio),
                   _pct(r.belady_time_saved_share), "", "", ""])
    return table.get_string()


@cli.command()
@click.argument("trace_file", metavar="TRACE", type=click.Path(exists=True, dir_okay=False))
@click.option("--max-mb", type=click.FloatRange(min=0, min_open=True), default=rp.DEFAULT_MAX_MB, show_default=True,
              help="The caches' bound in MiB of stored bytes (the default is `nvcache simulate`'s, the demo's).")
@click.option("--policy", "policies", type=click.Choice(sim.known_policies()), multiple=True,
              help="A policy to replay (repeat for several) [default: every one: "
                   f"{', '.join(sim.known_policies())}].")
@click.option("--fixed-us", type=click.FloatRange(min=0), default=rp.DEFAULT_FIXED_US, show_default=True,
              help="Cost model: fixed cost of analysing one layer, in microseconds.")
@click.option("--us-per-kib", type=click.FloatRange(min=0), default=rp.DEFAULT_US_PER_KIB, show_default=True,
              help="Cost model: cost of analysing one KiB of layer record, in microseconds.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON instead of a table.")
@_friendly
def replay(trace_file: str, max_mb: float, policies: Tuple[str, ...], fixed_us: float, us_per_kib: float,
           as_json: bool) -> None:
    """Replay the requests of a trace file through a cache per policy, beside Belady's optimum.

    TRACE: one request per line, `time layer_id size image` separated by single
    spaces (time in seconds, size: the record's bytes), `#` comments and blank
    lines ignored; consecutive lines of one image are one scan, whose layers
    its puts keep. `simulate --trace-out FILE` writes one; README ('Replaying
    a trace') and nvcache/trace.py define the format.

    Each policy runs in this process through a real cache in a fresh
    temporary directory (removed at the end) bounded by --max-mb: a get per
    request, and on a miss a put of a record of the trace's size made of
    incompressible bytes (so its stored size is its size). Reported per
    policy: hits, hit ratio, byte-hit ratio (bytes of the records hit / bytes
    requested), analysis time saved under the cost model (a layer whose
    record has n bytes costs --fixed-us + --us-per-kib * n / 1024 µs, as
    in `simulate`; a hit saves it), the share of LRU's gap to the optimum it
    closes, evictions and refused puts (CacheFull, RecordTooLarge). Beside
    them, on the same trace and bound: Belady's rule byte by byte (an upper
    bound of every policy) and on whole records (a heuristic).
    """
    work = rp.load_file(trace_file)  # a malformed line: "Error: FILE, line N: ..." and exit status 1
    if not work.scans:
        raise click.ClickException(f"{trace_file}: no requests (only comments or blank lines)")
    result = rp.replay(work, max_mb, list(policies) or None, fixed_us, us_per_kib)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2, sort_keys=True))
        return
    click.echo(f"{trace_file}: {result.scans} scans, {result.requests} requests ({result.requested_bytes / 2**20:.1f} "
               f"MiB) of {result.layers} layers ({result.layer_bytes / 2**20:.1f} MiB); bound {max_mb:g} MiB = "
               f"{result.max_bytes} stored bytes; cost model {fixed_us:g} µs + {us_per_kib:g} µs/KiB")
    click.echo(replay_table(result))
