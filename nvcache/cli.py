"""``nvcache``: the operator's view of a node's layer cache, and the simulation that exercises it.

The tables match what operators already read from the controller CLI
(``show scan cache-stat`` / ``cache-data``): same library (prettytable),
same layout and row order. Everything goes through :class:`LayerCache`'s
public API.

Read-only commands never create a cache: a path without ``version`` and
``data.mdb`` in this format's directory (``<path>/v<N>``) is reported like the seed reports a scanner without a cache
(``None`` values), through a disabled ``LayerCache`` (bound 0), which
touches nothing on disk. They open a cache with ``repair=False``: a damaged
one is reported (exit status 1, the damage on stderr) and left byte for
byte as it is; ``nvcache repair`` fixes it. Commands that write (clear,
import, simulate) repair, as scanners do. ``simulate`` lives in
:mod:`nvcache.clisim`, ``metrics`` in :mod:`nvcache.climetrics`, ``remote-stat`` in
:mod:`nvcache.cliremote`.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import shlex
import shutil
import sys
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, TypeVar

import click
from prettytable import PrettyTable

from . import __version__
from .arguments import mib_text, parse_mib
from .cache import DEFAULT_PATH, LayerCache
from .controller import STAT_FIELDS, controller_stat
from .cachedir import DATA_FILE, FORMAT_DIR
from .errors import CacheDamaged, CacheError
from .fallback import REMOTE_TALLY
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
        except CacheDamaged as exc:  # from a read-only command: say how to fix it
            log.debug("command failed", exc_info=True)
            settings = click.get_current_context().find_object(Settings)
            where = f" --path {shlex.quote(settings.path)}" if settings is not None else ""
            raise click.ClickException(f"{exc}. Nothing was changed: `nvcache{where} repair` fixes it") from exc
        except (CacheError, SeedFormatError, ValueError) as exc:
            log.debug("command failed", exc_info=True)
            raise click.ClickException(str(exc)) from exc

    return wrapper  # type: ignore[return-value]


def _mib(ctx: click.Context, param: click.Parameter, value: Any) -> Optional[float]:
    """--max-mb as LayerCache.from_env reads MAX_CACHE_RECORD_MB (plain decimals); a bad value
    from the environment is reported under the variable's name, not the option's."""
    if value is None or isinstance(value, float):
        return value
    try:
        return parse_mib(str(value))
    except ValueError as exc:
        from_env = ctx.get_parameter_source(param.name or "") == click.core.ParameterSource.ENVIRONMENT
        raise click.BadParameter(str(exc), param_hint="MAX_CACHE_RECORD_MB (environment)" if from_env
                                 else "'--max-mb'") from None


def _max_mb_option(fn: F) -> F:
    return click.option(
        "--max-mb", type=str, callback=_mib, envvar="MAX_CACHE_RECORD_MB", default=None,
        help="Make this the cache's bound in MiB (env MAX_CACHE_RECORD_MB, as the scanners "
             "use it); default: the bound stored in the cache (1000 for a new one).")(fn)


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
def open_cache(path: str, repair: bool = False) -> Iterator[LayerCache]:
    """The cache at ``path`` with its own stored bound; a disabled one (all ``None``, nothing on
    disk) when there is none.

    ``repair=False`` (read-only commands): CacheDamaged for a damaged cache, which stays as it is.
    """
    found = has_cache(path)
    if not found:
        if os.path.isfile(os.path.join(path, SEED_INDEX)):
            log.warning("%s holds the seed scanner's cache layout; `nvcache import %s` moves it into nvcache",
                        path, path)
        else:
            log.info("no nvcache cache at %s", path)
        if note_for(path):
            log.warning("%s", note_for(path))
    cache = LayerCache(path, None if found else 0, repair=repair)
    try:
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


# ``stat --all``'s rows after the seed's four, group by group: (row name, key in all_stats' group).
FLIGHT_ROWS = (("flight_waits", "waits"), ("flight_takeovers", "takeovers"), ("flight_wait_seconds", "wait_seconds"))
_DIVIDERS = "divider" in inspect.signature(PrettyTable.add_row).parameters  # prettytable >= 3.5


def all_stats(cache: LayerCache) -> Dict[str, Any]:
    """``stat --all --json``: the seed's four fields (as ``stat --json``), then ``flight``
    (flight_stats()), ``remote`` (remote_stats(): the tally kept in the file), ``evictions``
    and ``bound_bytes``; null for each without a cache."""
    stats = cache.stats()
    out: Dict[str, Any] = {name: stats[name] for name in STAT_FIELDS}
    out["flight"] = cache.flight_stats()
    out["remote"] = cache.remote_stats()
    out["evictions"] = cache.evictions()
    out["bound_bytes"] = cache.max_bytes if cache.enabled else None
    return out


def all_stat_table(figures: Dict[str, Any]) -> str:
    """``stat --all``'s table: the seed's four rows exactly as ``stat`` shows them, then one row
    group each for single flight, the remote tier's tally, evictions and the bound, with
    nvcache's own numbers (0 stays 0; None without a cache)."""
    flight, remote = figures["flight"], figures["remote"]
    groups: List[List[List[Any]]] = [
        [[name, value] for name, value in controller_stat(figures).items()],
        [[row, None if flight is None else (f"{flight[key]:.3f}" if key == "wait_seconds" else flight[key])]
         for row, key in FLIGHT_ROWS],
        [[name, None if remote is None else remote[name]] for name in REMOTE_TALLY],
        [["evictions", figures["evictions"]], ["bound_bytes", figures["bound_bytes"]]],
    ]
    table = PrettyTable(["Field", "Value"])
    table.align = "l"
    for number, group in enumerate(groups):
        for index, row in enumerate(group):
            last = index == len(group) - 1 and number < len(groups) - 1
            if _DIVIDERS:
                table.add_row(row, divider=last)
            else:  # an older prettytable: no rules between the groups
                table.add_row(row)
    return table.get_string()


# -- the group ------------------------------------------------------------------------------
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--path", envvar="NVCACHE_PATH", default=DEFAULT_PATH, show_default=True,
              help="Cache directory (env NVCACHE_PATH).")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
@click.version_option(__version__, prog_name="nvcache")
@click.pass_context
def cli(ctx: click.Context, path: str, verbose: int) -> None:
    """Inspect and manage the node's shared cache of layer scan records.

    \b
    Exit status: 0 done (verify: healthy);
    1 the cache is damaged (verify's problems, or damage a read-only command met:
      the message says which, nothing was changed, `nvcache repair` fixes it),
      or the command failed (the message says why: permissions, not a directory,
      a remote tier that does not answer, redis-py not installed...);
    2 a usage error.
    Read-only commands (stat, data, show, verify, export, metrics) never write to
    the cache; clear, import, repair and simulate repair damage as scanners do.
    remote-stat only asks the remote tier's server.
    """
    _setup_logging(ctx, verbose)
    given = ctx.get_parameter_source("path") == click.core.ParameterSource.COMMANDLINE
    ctx.obj = Settings(path, given, verbose)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the fields as JSON.")
@click.option("--all", "show_all", is_flag=True,
              help="Also single flight's waits, the remote tier's tally, evictions and the bound.")
@pass_settings
@_friendly
def stat(settings: Settings, as_json: bool, show_all: bool) -> None:
    """Counters, as the controller's `show scan cache-stat` prints them.

    The table shows None where the controller does: for a zero (its REST
    struct leaves zeros out) and without a cache. --json prints nvcache's
    own numbers (0 stays 0; null only without a cache), for scripts.

    --all adds row groups after those four: get_or_create's waits
    (flight_*), the remote tier's tally (remote_*, fleet_*: summed over
    the node's processes, as kept in the cache; a remote hit is also one
    of cache_hits), evictions and the bound in stored bytes, with
    nvcache's own numbers (0 stays 0). --all --json: the four fields,
    then "flight", "remote", "evictions" and "bound_bytes".
    """
    with open_cache(settings.path) as cache:
        if show_all:
            figures = all_stats(cache)
        else:
            stats = cache.stats()
    if show_all:
        click.echo(json.dumps(figures, indent=2) if as_json else all_stat_table(figures))
    elif as_json:
        click.echo(json.dumps({name: stats[name] for name in STAT_FIELDS}, indent=2))
    else:
        click.echo(stat_table(stats))


@cli.command()
@pass_settings
@_friendly
def data(settings: Settings) -> None:
    """The dump, byte for byte as the controller's `show scan cache-data` prints it.

    Sorted keys, 2-space indent, and the controller's omissions: zero
    counters and sizes, a zero reference_count and an empty cache_records
    are left out (last_referred never is); a reference count above
    4294967295 (its uint32) shows as 4294967295. `{}` without a cache.
    """
    with open_cache(settings.path) as cache:
        click.echo(cache.cache_data_json())


@cli.command()
@click.option("--sort", "sort_key", type=click.Choice(list(SORT_DESCENDING)), default="last_referred",
              show_default=True,
              help="last_referred and layer_id ascending (next victim first), size and reference_count descending.")
@click.option("--reverse", is_flag=True, help="Reverse the order.")
@click.option("--limit", type=click.IntRange(min=0), default=None, help="Show at most this many records.")
@pass_settings
@_friendly
def show(settings: Settings, sort_key: str, reverse: bool, limit: Optional[int]) -> None:
    """A table of the records, oldest reference (the next victim) first by default."""
    with open_cache(settings.path) as cache:
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
@pass_settings
@_friendly
def verify(settings: Settings) -> None:
    """Check index, records, totals, LRU order and checksums; exit status 1 on any problem.

    Read-only: a damaged cache is reported and left byte for byte as it
    is (`nvcache repair` fixes it).
    """
    if not has_cache(settings.path):
        click.echo(f"no nvcache cache at {settings.path} (no {FORMAT_DIR}/version or {FORMAT_DIR}/{DATA_FILE})")
        sys.exit(1)
    # Read-only: damage found while opening is CacheDamaged (_friendly: stderr, exit status 1).
    with open_cache(settings.path) as cache:
        problems = cache.verify()
        stats = cache.stats()
    for problem in problems:
        click.echo(problem)
    if problems:
        click.echo(f"{len(problems)} problem(s) in {settings.path}; nothing was changed "
                   f"(`nvcache --path {shlex.quote(settings.path)} repair` fixes them)")
        sys.exit(1)
    click.echo(f"ok: {stats['record_count']} records, {stats['record_total_size']} bytes, no problems")


@cli.command()
@pass_settings
@_friendly
def repair(settings: Settings) -> None:
    """Fix what verify reports, and say what was done.

    A cache that cannot be used as it is (a damaged data.mdb, another
    format's version, a bad readers table, a reboot after non-durable
    writes) is rebuilt, empty; records whose bytes are damaged are dropped;
    if verify still finds problems, the cache is rebuilt. Scanners using it
    meanwhile carry on with the new file. Exit status 0 once it is healthy.
    """
    if not has_cache(settings.path):
        click.echo(f"no nvcache cache at {settings.path}; nothing to repair")
        return
    # A repair=True open rebuilds what it finds damaged and only logs it: that is reported as done.
    with _core_warnings() as logged, open_cache(settings.path, repair=True) as cache:
        done = [f"at open: {message}" for message in logged]
        done += cache.repair_damage()
        problems = cache.verify()
        stats = cache.stats()
    for line in done:
        click.echo(line)
    if problems:  # a repair leaves none; if one does, say so rather than claim success
        for problem in problems:
            click.echo(problem)
        click.echo(f"{len(problems)} problem(s) remain in {settings.path}")
        sys.exit(1)
    summary = f"{stats['record_count']} records, {stats['record_total_size']} bytes, no problems"
    click.echo(f"repaired {settings.path}: {summary}" if done else f"nothing to repair: {summary}")


@cli.command()
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_settings
@_friendly
def clear(settings: Settings, yes: bool) -> None:
    """Remove every record (hit, miss and eviction counters are kept)."""
    if not has_cache(settings.path):
        click.echo(f"no nvcache cache at {settings.path}; nothing to clear")
        return
    with open_cache(settings.path, repair=True) as cache:
        stats = cache.stats()
        if not yes:
            click.confirm(f"Remove all {stats['record_count']} records ({stats['record_total_size']} bytes) "
                          f"from {settings.path}?", abort=True)
        cache.clear()
    click.echo(f"removed {stats['record_count']} records from {settings.path}")


@cli.command()
@click.argument("mb", metavar="MB")
@pass_settings
@_friendly
def resize(settings: Settings, mb: str) -> None:
    """Make MB (MiB, a plain decimal) the cache's bound for every process using it.

    Records beyond a smaller bound are evicted at once, least recently
    referred first (kept records too: the bound is the cache's); the
    scanners obey the new bound from their next write on.
    """
    try:
        max_mb = parse_mib(mb)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'MB'") from None
    if max_mb == 0:
        raise click.BadParameter("0 would disable the cache, which is each process's choice "
                                 "(MAX_CACHE_RECORD_MB=0), not a bound", param_hint="'MB'")
    if not has_cache(settings.path):
        raise click.ClickException(f"no nvcache cache at {settings.path}")
    with LayerCache(settings.path) as cache:  # opened with the stored bound: resize() changes it
        old, evicted = cache.resize(max_mb)
        new = cache.max_bytes
    if old == new:
        click.echo(f"{settings.path}: the bound is {mib_text(new)} already; nothing changed")
    else:
        click.echo(f"{settings.path}: bound {mib_text(old) if old else 'unrecorded'} -> {mib_text(new)}; "
                   f"evicted {evicted} records")


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
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Replace a seed cache already in DST.")
@click.option("--seed-path", default=None,
              help="Where the seed scanner will see DST (its index stores absolute paths); default: DST.")
@pass_settings
@_friendly
def export_cmd(settings: Settings, dst: str, force: bool, seed_path: Optional[str]) -> None:
    """Write the cache in the seed scanner's layout under DST (gzipped ref/ files, cacher.json, version)."""
    if not has_cache(settings.path):
        raise click.ClickException(f"no nvcache cache at {settings.path}")
    with open_cache(settings.path) as cache:
        result = export_seed(cache, dst, force=force, seed_path=seed_path)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"exported {result.exported} records ({result.stored_bytes} bytes gzipped) to {dst}; "
               f"{result.hits} hits, {result.misses} misses")


from . import climetrics, cliremote, clisim  # noqa: E402,F401  (register `metrics`, `remote-stat`, `simulate`)


def main() -> None:
    """The ``nvcache`` console script."""
    cli(prog_name="nvcache")
