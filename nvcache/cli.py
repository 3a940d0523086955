"""``nvcache``: the operator's view of a node's layer cache, and the simulation that exercises it.

The tables match what operators already read from the controller CLI
(``show scan cache-stat`` / ``cache-data``): same library (prettytable),
same layout and row order. Everything goes through :class:`LayerCache`'s
public API.

Read-only commands never create a cache: a path without ``version`` and
``data.mdb`` in this format's directory (``<path>/v<N>``) is reported like the seed reports a scanner without a cache
(``None`` values), through a disabled ``LayerCache`` (bound 0), which
touches nothing on disk.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, make_server

import click
from prettytable import PrettyTable
from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from tqdm import tqdm

from . import __version__, simulate as sim
from .cache import DEFAULT_PATH, LayerCache, parse_mib
from .cachedir import DATA_FILE, FORMAT_DIR, format_dir
from .controller import STAT_FIELDS, controller_stat
from .errors import CacheError
from .formats import note_for
from .importtarget import has_cache, import_into
from .seedfmt import SeedFormatError, export_seed

SHOW_COLUMNS = ("layer_id", "size", "reference_count", "last_referred")
# Natural direction per sort key: the next victim, the biggest, the most used first.
SORT_DESCENDING = {"last_referred": False, "layer_id": False, "size": True, "reference_count": True}
SEED_INDEX = "cacher.json"

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("nvcache.cli")


class Settings:
    """The group's options, handed to every command."""

    def __init__(self, path: str, path_given: bool, verbose: int) -> None:
        self.path = path
        self.path_given = path_given  # on the command line, not from NVCACHE_PATH or the default
        self.verbose = verbose


pass_settings = click.make_pass_decorator(Settings)


class _EchoHandler(logging.Handler):
    """Log to whatever stderr is at the time (click's test runner swaps it per invocation)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(self.format(record), err=True)
        except Exception:  # logging must never take the command down
            self.handleError(record)


def _setup_logging(ctx: click.Context, verbose: int) -> None:
    """Send the ``nvcache`` loggers to stderr for this invocation only (undone when it ends,
    so a process that calls the CLI in-process, like a test run, keeps its own logging)."""
    logger = logging.getLogger("nvcache")
    handler = _EchoHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG)

    def undo() -> None:
        logger.removeHandler(handler)
        logger.setLevel(previous)

    ctx.call_on_close(undo)


def _friendly(fn: F) -> F:
    """Turn the cache's and the seed format's errors into a one-line ``Error:`` and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (CacheError, SeedFormatError, ValueError) as exc:
            log.debug("command failed", exc_info=True)
            raise click.ClickException(str(exc)) from exc

    return wrapper  # type: ignore[return-value]


def _mib(ctx: click.Context, param: click.Parameter, value: Any) -> float:
    """--max-mb as LayerCache.from_env reads MAX_CACHE_RECORD_MB (plain decimals); a bad value
    from the environment is reported under the variable's name, not the option's."""
    if isinstance(value, float):
        return value
    try:
        return parse_mib(str(value))
    except ValueError as exc:
        from_env = ctx.get_parameter_source(param.name or "") == click.core.ParameterSource.ENVIRONMENT
        raise click.BadParameter(str(exc), param_hint="MAX_CACHE_RECORD_MB (environment)" if from_env
                                 else "'--max-mb'") from None


def _max_mb_option(fn: F) -> F:
    return click.option(
        "--max-mb", type=str, callback=_mib, envvar="MAX_CACHE_RECORD_MB", default="1000", show_default=True,
        help="Bound of the cache in MiB (env MAX_CACHE_RECORD_MB), as the scanners use it; "
             "0 means disabled.")(fn)


def self_command() -> str:
    """How to run this CLI again as typed here: ``nvcache`` when that is this one on PATH, else
    the console script's path (``.venv/bin/nvcache`` after ``make demo``), else ``python -m``."""
    script = os.path.join(os.path.dirname(sys.executable), "nvcache")
    if not os.path.exists(script):
        return f"{sys.executable} -m nvcache"
    found = shutil.which("nvcache")
    if found and os.path.realpath(found) == os.path.realpath(script):
        return "nvcache"
    relative = os.path.relpath(script)
    return relative if not relative.startswith("..") else script


@contextmanager
def open_cache(path: str, max_mb: float) -> Iterator[LayerCache]:
    """The cache at ``path``; a disabled one (all ``None``, nothing on disk) when there is none."""
    if not has_cache(path):
        if os.path.isfile(os.path.join(path, SEED_INDEX)):
            log.warning("%s holds the seed scanner's cache layout; `nvcache import %s` moves it into nvcache",
                        path, path)
        else:
            log.info("no nvcache cache at %s", path)
        older = note_for(path)
        if older:
            log.warning("%s", older)
        max_mb = 0
    cache = LayerCache(path, max_mb)
    try:
        if not cache.enabled and max_mb == 0 and has_cache(path):
            log.warning("--max-mb 0 disables the cache: showing it as the seed shows a disabled cache")
        yield cache
    finally:
        cache.close()


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def _core_warnings() -> Iterator[List[str]]:
    """The warnings the ``nvcache`` logger emits meanwhile (damage found and repaired, dropped records)."""
    logger = logging.getLogger("nvcache")
    handler = _ListHandler()
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def stat_table(stats: Dict[str, Optional[int]]) -> str:
    """The controller's ``cache-stat`` table of ``stats``: None where it shows None (a zero, or no cache)."""
    table = PrettyTable(["Field", "Value"])
    table.align = "l"
    for name, value in controller_stat(stats).items():
        table.add_row([name, value])
    return table.get_string()


# -- the group ------------------------------------------------------------------------------
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--path", envvar="NVCACHE_PATH", default=DEFAULT_PATH, show_default=True,
              help="Cache directory (env NVCACHE_PATH).")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
@click.version_option(__version__, prog_name="nvcache")
@click.pass_context
def cli(ctx: click.Context, path: str, verbose: int) -> None:
    """Inspect and manage the node's shared cache of layer scan records."""
    _setup_logging(ctx, verbose)
    given = ctx.get_parameter_source("path") == click.core.ParameterSource.COMMANDLINE
    ctx.obj = Settings(path, given, verbose)


@cli.command()
@_max_mb_option
@click.option("--json", "as_json", is_flag=True, help="Print the fields as JSON.")
@pass_settings
@_friendly
def stat(settings: Settings, max_mb: float, as_json: bool) -> None:
    """Counters, as the controller's `show scan cache-stat` prints them.

    The table shows None where the controller does: for a zero (its REST
    struct leaves zeros out) and without a cache. --json prints nvcache's
    own numbers (0 stays 0; null only without a cache), for scripts.
    """
    with open_cache(settings.path, max_mb) as cache:
        stats = cache.stats()
    if as_json:
        click.echo(json.dumps({name: stats[name] for name in STAT_FIELDS}, indent=2))
    else:
        click.echo(stat_table(stats))


@cli.command()
@_max_mb_option
@pass_settings
@_friendly
def data(settings: Settings, max_mb: float) -> None:
    """The dump, byte for byte as the controller's `show scan cache-data` prints it.

    Sorted keys, 2-space indent, and the controller's omissions: zero
    counters and sizes, a zero reference_count and an empty cache_records
    are left out (last_referred never is); a reference count above
    4294967295 (its uint32) shows as 4294967295. `{}` without a cache.
    """
    with open_cache(settings.path, max_mb) as cache:
        click.echo(cache.cache_data_json())


@cli.command()
@_max_mb_option
@click.option("--sort", "sort_key", type=click.Choice(list(SORT_DESCENDING)), default="last_referred",
              show_default=True,
              help="last_referred and layer_id ascending (next victim first), size and reference_count descending.")
@click.option("--reverse", is_flag=True, help="Reverse the order.")
@click.option("--limit", type=click.IntRange(min=0), default=None, help="Show at most this many records.")
@pass_settings
@_friendly
def show(settings: Settings, max_mb: float, sort_key: str, reverse: bool, limit: Optional[int]) -> None:
    """A table of the records, oldest reference (the next victim) first by default."""
    with open_cache(settings.path, max_mb) as cache:
        records: List[Dict[str, Any]] = cache.cache_data()["cache_records"]
    total = len(records)
    if sort_key != "last_referred":  # the dump already comes in eviction order
        records.sort(key=lambda r: r[sort_key], reverse=SORT_DESCENDING[sort_key])
    if reverse:
        records.reverse()
    if limit is not None:
        records = records[:limit]
    table = PrettyTable(list(SHOW_COLUMNS))
    table.align = "l"
    table.align["size"] = table.align["reference_count"] = "r"
    for rec in records:
        table.add_row([rec[c] for c in SHOW_COLUMNS])
    click.echo(table.get_string())
    if len(records) < total:
        click.echo(f"({len(records)} of {total} records)")


@cli.command()
@_max_mb_option
@pass_settings
@_friendly
def verify(settings: Settings, max_mb: float) -> None:
    """Check index, records, totals, LRU order and checksums; exit status 1 on any problem."""
    if max_mb == 0:
        raise click.UsageError("a bound of 0 MiB disables the cache: there is nothing to verify "
                               "(give the bound the scanners use, or leave --max-mb out)")
    if not has_cache(settings.path):
        click.echo(f"no nvcache cache at {settings.path} "
                   f"(its {FORMAT_DIR}/version or {FORMAT_DIR}/{DATA_FILE} is missing)")
        sys.exit(1)
    # Opening a damaged cache rebuilds it (the core's policy) before verify() can look, and the
    # core only logs that: what it logs while we open and check is reported as a problem too.
    with _core_warnings() as logged, open_cache(settings.path, max_mb) as cache:
        problems = cache.verify()
        stats = cache.stats()
    problems = [f"the core reported: {message}" for message in logged] + problems
    for problem in problems:
        click.echo(problem)
    if problems:
        click.echo(f"{len(problems)} problem(s) in {settings.path}")
        sys.exit(1)
    click.echo(f"ok: {stats['record_count']} records, {stats['record_total_size']} bytes, no problems")


@cli.command()
@_max_mb_option
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_settings
@_friendly
def clear(settings: Settings, max_mb: float, yes: bool) -> None:
    """Remove every record (hit, miss and eviction counters are kept)."""
    if not has_cache(settings.path):
        click.echo(f"no nvcache cache at {settings.path}; nothing to clear")
        return
    with open_cache(settings.path, max_mb) as cache:
        stats = cache.stats()
        if not cache.enabled:
            raise click.ClickException("the cache is disabled (--max-mb 0); give its bound to clear it")
        if not yes:
            click.confirm(f"Remove all {stats['record_count']} records ({stats['record_total_size']} bytes) "
                          f"from {settings.path}?", abort=True)
        cache.clear()
    click.echo(f"removed {stats['record_count']} records from {settings.path}")


@cli.command("import")
@_max_mb_option
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.option("--skip-missing", is_flag=True,
              help="Drop index entries whose ref/ file is gone (the seed leaves such stale entries).")
@click.option("--skip-damaged", is_flag=True,
              help="Drop records whose ref/ file is not a complete gzip stream or not the indexed size "
                   "(a warning names each).")
@click.option("--dry-run", is_flag=True,
              help="Validate the source and the fit, and report; --path is only read, never created or changed.")
@pass_settings
@_friendly
def import_cmd(settings: Settings, max_mb: float, src: str, skip_missing: bool, skip_damaged: bool,
               dry_run: bool) -> None:
    """Move a seed scanner cache directory SRC (cacher.json, ref/, version) into the cache.

    Reference counts, last references and hit/miss counters are kept;
    records are stored decompressed. A SRC the scanner never wrote (no
    cacher.json) is empty. All or nothing: a bad or partial SRC, or records
    that would not fit the bound, import nothing, and a --path that had no
    cache is left without one.

    Nothing is counted twice: history merges by maximum. A record already
    in the cache keeps its bytes, the larger of the two reference counts and
    the later last reference; the hit and miss counters each become the
    larger of the cache's and SRC's. So importing SRC again, or this cache's
    own export, changes no count (an export that scanners used since brings
    its larger counts back), and importing an unrelated cache into a
    non-empty one keeps the larger counters rather than their sum.
    """
    if os.path.abspath(src) == os.path.abspath(settings.path):
        raise click.ClickException("SRC and --path must be different directories")
    result = import_into(src, settings.path, max_mb, skip_missing=skip_missing, skip_damaged=skip_damaged,
                         dry_run=dry_run)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    verb = "would import" if dry_run else "imported"
    click.echo(f"{verb} {result.imported} records ({result.record_bytes} bytes stored) from {src} into "
               f"{settings.path}; {result.skipped} already present; counters +{result.hits} hits, "
               f"+{result.misses} misses (merged by maximum)")


@cli.command("export")
@_max_mb_option
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Replace a seed cache already in DST.")
@click.option("--seed-path", default=None,
              help="Where the seed scanner will see DST (its index stores absolute paths); default: DST.")
@pass_settings
@_friendly
def export_cmd(settings: Settings, max_mb: float, dst: str, force: bool, seed_path: Optional[str]) -> None:
    """Write the cache in the seed scanner's layout under DST (gzipped ref/ files, cacher.json, version)."""
    if not has_cache(settings.path):
        raise click.ClickException(f"no nvcache cache at {settings.path}")
    with open_cache(settings.path, max_mb) as cache:
        result = export_seed(cache, dst, force=force, seed_path=seed_path)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"exported {result.exported} records ({result.stored_bytes} bytes gzipped) to {dst}; "
               f"{result.hits} hits, {result.misses} misses")


# -- metrics ---------------------------------------------------------------------------------
class CacheCollector:
    """A Prometheus collector over the public API: read at every scrape, never cached.

    The cache is opened at the first scrape that finds one (an exporter may
    start before any scanner created it) and reopened after a failure.
    """

    def __init__(self, path: str, max_mb: float) -> None:
        self.path = path
        self.max_mb = max_mb
        self._cache: Optional[LayerCache] = None
        self._lock = threading.Lock()  # the HTTP server scrapes from several threads

    def _open(self) -> Optional[LayerCache]:
        if self._cache is None and self.max_mb > 0 and has_cache(self.path):
            self._cache = LayerCache(self.path, self.max_mb)
        return self._cache

    def close(self) -> None:
        with self._lock:
            if self._cache is not None:
                self._cache.close()
                self._cache = None

    def _read(self) -> Optional[Tuple[Dict[str, Optional[int]], int, int, int]]:
        with self._lock:
            try:
                cache = self._open()
                if cache is None:
                    return None
                stats = cache.stats()
                evictions = cache.evictions() or 0
                st = os.stat(os.path.join(format_dir(self.path), DATA_FILE))
                size = min(st.st_size, st.st_blocks * 512)  # on disk: with a write map the file is sparse
                return stats, evictions, cache.max_bytes, size
            except (CacheError, OSError) as exc:
                log.warning("cannot read the cache at %s: %s", self.path, exc)
                if self._cache is not None:
                    self._cache.close()
                    self._cache = None
                return None

    def collect(self) -> Iterator[Metric]:
        labels = ["path"]
        values = [self.path]
        up = GaugeMetricFamily("nvcache_up", "1 when the cache could be read at this scrape", labels=labels)
        got = self._read()
        up.add_metric(values, 1 if got is not None else 0)
        yield up
        if got is None:
            return
        stats, evictions, bound, size = got

        def family(kind: type, name: str, doc: str, value: Optional[int]) -> Metric:
            metric = kind(name, doc, labels=labels)
            metric.add_metric(values, value or 0)
            return metric

        yield family(CounterMetricFamily, "nvcache_cache_hits", "Reads that found their record", stats["cache_hits"])
        yield family(CounterMetricFamily, "nvcache_cache_misses", "Reads that found no record", stats["cache_misses"])
        yield family(CounterMetricFamily, "nvcache_evictions", "Records evicted to respect the bound", evictions)
        yield family(GaugeMetricFamily, "nvcache_records", "Records in the cache", stats["record_count"])
        yield family(GaugeMetricFamily, "nvcache_record_bytes", "Total size of the records",
                     stats["record_total_size"])
        yield family(GaugeMetricFamily, "nvcache_bound_bytes", "The bound this exporter was given (--max-mb)", bound)
        yield family(GaugeMetricFamily, "nvcache_data_file_bytes", f"Size of {DATA_FILE} on disk", size)


def _parse_listen(value: str) -> Tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise click.BadParameter(f"expected HOST:PORT, got {value!r}", param_hint="--listen")
    return host.strip("[]") or "127.0.0.1", int(port)


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


# The signals that stop ``metrics --listen``. SIGINT is handled here too rather than left
# to Python's default handler: Python installs that handler only when SIGINT was not
# ignored at exec, and a process started with SIGINT ignored (a background job of a
# shell without job control, a supervisor that ignores it) kept serving after Ctrl-C or
# ``kill -INT`` (seen as test_metrics_listen_serves_until_interrupted timing out).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def metrics_app(registry: CollectorRegistry) -> Callable[..., Any]:
    """prometheus_client's WSGI app on ``/metrics``; 404 on every other path."""
    inner = make_wsgi_app(registry)

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO") in ("/metrics", "/metrics/"):
            return inner(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: the metrics are at /metrics\n"]
    return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        """No access log on stderr (as prometheus_client's own server)."""


@cli.command()
@_max_mb_option
@click.option("--listen", metavar="HOST:PORT", default=None,
              help="Serve /metrics on HOST:PORT until interrupted instead of printing once.")
@pass_settings
@_friendly
def metrics(settings: Settings, max_mb: float, listen: Optional[str]) -> None:
    """Prometheus text exposition: hits, misses, records, bytes, evictions, bound, data.mdb size."""
    collector = CacheCollector(settings.path, max_mb)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)  # type: ignore[arg-type]
    try:
        if listen is None:
            click.echo(generate_latest(registry).decode(), nl=False)
            return
        host, port = _parse_listen(listen)
        try:
            server = make_server(host, port, metrics_app(registry), handler_class=_QuietHandler)
        except OSError as exc:
            raise click.ClickException(f"cannot listen on {listen}: {exc.strerror or exc}") from exc
        thread = threading.Thread(target=server.serve_forever, name="nvcache-metrics", daemon=True)
        thread.start()
        bound_host, bound_port = server.server_address[:2]
        previous = {}
        try:
            for signum in STOP_SIGNALS:
                previous[signum] = signal.signal(signum, _interrupt)
            # Announced only once a stop signal lands in this try: one that arrives right
            # after the line is a clean stop (exit 0), not an exception escaping the command.
            click.echo(f"serving http://{bound_host}:{bound_port}/metrics for {settings.path} (Ctrl-C stops)",
                       err=True)
            while thread.is_alive():
                thread.join(3600)
        except KeyboardInterrupt:
            pass
        finally:
            for signum, handler in previous.items():
                if handler is not None:  # None: a handler not set from Python, cannot be put back
                    signal.signal(signum, handler)
            server.shutdown()
            server.server_close()
    finally:
        collector.close()


# -- simulate ------------------------------------------------------------------------------------
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


def main() -> None:
    """The ``nvcache`` console script."""
    cli(prog_name="nvcache")
