"""``nvcache simulate``: the main job, scanner processes sharing one cache, and its result table.

Registered on the ``nvcache`` group by :mod:`nvcache.cli` (kept apart: it is a job of its own,
with its own options, and cli.py holds the commands that look at or repair a cache).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Optional

import click
from prettytable import PrettyTable
from tqdm import tqdm

from . import simulate as sim
from .cli import Settings, _friendly, cli, pass_settings, self_command, stat_table


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def result_table(r: sim.SimResult) -> str:
    """The figures of a simulation, one per row."""
    table = PrettyTable(["Result", "Value"])
    table.align = "l"
    rate = r.scans_done / r.wall_s if r.wall_s else 0.0
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


@cli.command()
@click.option("--processes", "-p", type=click.IntRange(min=1), default=os.cpu_count() or 1, show_default=True,
              help="Scanner processes sharing the cache.")
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
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON instead of tables.")
@pass_settings
@_friendly
def simulate(settings: Settings, processes: int, images: int, layers: int, scans: int, max_mb: float, seed: int,
             skew: float, duration: float, analysis_us: float, us_per_kib: float, sim_path: Optional[str],
             start_method: str, progress: Optional[bool], compress: bool, keep: bool, as_json: bool) -> None:
    """The main job: scanner processes scanning a synthetic registry through one shared cache.

    A miss "analyses" the layer (a sleep in proportion to its record size)
    and puts the record, keeping the image's layers. At the end: the stat
    table, hit and byte-hit ratios, time saved, evictions and the byte-hit
    ratio Belady's offline optimum reaches on the recorded trace with the
    same bound. The global --path is used only when given on the command
    line; NVCACHE_PATH is ignored here, so the demo never fills a real cache. Without a
    path, the run's temporary directory is removed at the end (also after Ctrl-C) unless
    --keep; its path is printed first.
    """
    temporary = not sim_path and not settings.path_given
    path = sim_path or (settings.path if settings.path_given else sim.fresh_path())
    if temporary and not keep:
        click.echo(f"cache: {path} (temporary: removed at the end; --keep keeps it)", err=as_json)
    else:
        click.echo(f"cache: {path}", err=as_json)
    try:
        _simulate(path, processes, images, layers, scans, max_mb, seed, skew, duration, analysis_us, us_per_kib,
                  start_method, progress, compress, as_json, kept=not temporary or keep)
    finally:
        if temporary and not keep:
            shutil.rmtree(path, ignore_errors=True)


def _simulate(path: str, processes: int, images: int, layers: int, scans: int, max_mb: float, seed: int,
              skew: float, duration: float, analysis_us: float, us_per_kib: float, start_method: str,
              progress: Optional[bool], compress: bool, as_json: bool, kept: bool) -> None:
    tqdm.monitor_interval = 0  # no monitor thread: nothing to inherit if workers fork
    bar = tqdm(total=scans, unit="scan", desc="scanning", file=sys.stderr, dynamic_ncols=True,
               disable=None if progress is None else not progress)

    def tick(done: int, _total: int) -> None:
        bar.update(done - bar.n)

    try:
        result = sim.run(path, processes=processes, images=images, layers=layers, scans=scans, max_mb=max_mb,
                         seed=seed, skew=skew, duration=duration, fixed_us=analysis_us, us_per_kib=us_per_kib,
                         start_method=start_method, compress=compress, progress=tick)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        bar.close()
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2, sort_keys=True))
        return
    click.echo(f"{processes} scanner processes, {images} images over {layers} layers "
               f"({result.catalogue_bytes / 2**20:.1f} MiB of records), bound {max_mb:g} MiB, seed {seed}")
    click.echo(stat_table(result.stats))
    click.echo(result_table(result))
    if (result.counter_hits, result.counter_misses) != (result.hits, result.misses):
        click.echo(f"warning: the cache counted {result.counter_hits} hits and {result.counter_misses} misses, "
                   f"the trace {result.hits} and {result.misses}", err=True)
    if kept:
        click.echo(f"inspect it: {self_command()} --path {path} show --limit 10")
    else:
        click.echo(f"removing {path} (run with --keep to inspect it)")
