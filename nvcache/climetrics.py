"""``nvcache metrics``: the cache's figures in Prometheus's text format, printed or served.

Registered on the ``nvcache`` group by :mod:`nvcache.cli`. Read-only: the exporter opens the
cache with ``repair=False`` and reports what is stored, the cache's own bound included, and the
remote tier's tally kept in it. With ``--remote`` (or ``NVCACHE_REMOTE``) it also asks the tier's
server for its keys and memory at each scrape, with the tier's bounded timeouts and breaker (a
dead server costs a scrape at most about one timeout, 0.2 s, and then nothing while the breaker
is open).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Callable, Dict, Iterator, Optional, Tuple
from wsgiref.simple_server import WSGIRequestHandler, make_server

import click
from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .cache import LayerCache
from .cachedir import DATA_FILE, format_dir
from .cli import Settings, _friendly, cli, log, pass_settings
from .clitier import RedisMissing, load_tier, quiet_tier_log, redact, remote_option, unreachable
from .errors import CacheError
from .fallback import REMOTE_TALLY
from .importtarget import has_cache

# The remote tally's counters (LayerCache.remote_stats(), kept in the cache file): name -> help.
REMOTE_COUNTERS = {
    "remote_hits": "Local misses that the remote tier answered (each also one of nvcache_cache_hits)",
    "remote_misses": "Remote tier reads that found no record (or a rejected one)",
    "remote_errors": "Remote tier calls that failed (connection, timeout, refused write)",
    "remote_skipped": "Remote tier calls skipped (circuit breaker open, record too large to share)",
    "remote_rejected": "Remote values rejected (bad tag, checksum, name or length) and deleted",
    "remote_puts": "Records written to the remote tier",
    "fleet_claims": "Fleet-wide claims taken by this node's creators (get_or_create)",
    "fleet_waits": "Creators that waited for another node's claimed create()",
    "fleet_takeovers": "Fleet waits after which this node created the record itself",
}
assert tuple(REMOTE_COUNTERS) == REMOTE_TALLY
# The exporter's tier: the scanners' short timeout; a breaker that probes again within 5 s.
SCRAPE_TIMEOUT = 0.2
SCRAPE_BACKOFF = (1.0, 5.0)


class CacheCollector:
    """A Prometheus collector over the public API: read at every scrape, never cached.

    The cache is opened at the first scrape that finds one (an exporter may
    start before any scanner created it) and reopened after a failure.
    """

    def __init__(self, path: str, tier: Any = None, remote_url: str = "") -> None:
        self.path = path
        self._cache: Optional[LayerCache] = None
        self._lock = threading.Lock()  # the HTTP server scrapes from several threads
        self.failure: Optional[CacheError] = None  # why the last scrape could not read the cache
        self.tier = tier  # a RemoteTier to ask for the server's figures, or None
        self.remote_url = remote_url
        self._remote_up: Optional[bool] = None  # at the last scrape (its changes are logged)
        self._remote_lock = threading.Lock()  # one scrape at a time asks the server

    def _open(self) -> Optional[LayerCache]:
        if self._cache is None and has_cache(self.path):
            self._cache = LayerCache(self.path, repair=False)  # an exporter never repairs nor resizes
        return self._cache

    def close(self) -> None:
        with self._lock:
            if self._cache is not None:
                self._cache.close()
                self._cache = None
        if self.tier is not None:
            self.tier.close()

    def _read(self) -> Optional[Tuple[Dict[str, Optional[int]], int, int, int, Dict[str, float], Dict[str, int]]]:
        with self._lock:
            self.failure = None
            try:
                cache = self._open()
                if cache is None:
                    return None
                stats = cache.stats()
                evictions = cache.evictions() or 0
                st = os.stat(os.path.join(format_dir(self.path), DATA_FILE))
                size = min(st.st_size, st.st_blocks * 512)  # on disk: with a write map the file is sparse
                return (stats, evictions, cache.max_bytes, size, cache.flight_stats() or {},
                        cache.remote_stats() or {})
            except (CacheError, OSError) as exc:
                log.warning("cannot read the cache at %s: %s", self.path, exc)
                self.failure = exc if isinstance(exc, CacheError) else CacheError(str(exc))
                if self._cache is not None:
                    self._cache.close()
                    self._cache = None
                return None

    def collect(self) -> Iterator[Metric]:
        yield from self._collect_cache()
        if self.tier is not None:
            yield from self._collect_remote()

    def _collect_cache(self) -> Iterator[Metric]:
        labels = ["path"]
        values = [self.path]
        up = GaugeMetricFamily("nvcache_up", "1 when the cache could be read at this scrape", labels=labels)
        got = self._read()
        up.add_metric(values, 1 if got is not None else 0)
        yield up
        if got is None:
            return
        stats, evictions, bound, size, flights, remote = got

        def family(kind: type, name: str, doc: str, value: Optional[float]) -> Metric:
            metric = kind(name, doc, labels=labels)
            metric.add_metric(values, value or 0)
            return metric

        yield family(CounterMetricFamily, "nvcache_cache_hits", "Reads that found their record", stats["cache_hits"])
        yield family(CounterMetricFamily, "nvcache_cache_misses", "Reads that found no record", stats["cache_misses"])
        yield family(CounterMetricFamily, "nvcache_evictions", "Records evicted to respect the bound", evictions)
        yield family(GaugeMetricFamily, "nvcache_records", "Records in the cache", stats["record_count"])
        yield family(GaugeMetricFamily, "nvcache_record_bytes", "Total size of the records",
                     stats["record_total_size"])
        yield family(GaugeMetricFamily, "nvcache_bound_bytes", "The cache's bound (stored in it)", bound)
        yield family(GaugeMetricFamily, "nvcache_data_file_bytes", f"Size of {DATA_FILE} on disk", size)
        yield family(CounterMetricFamily, "nvcache_flight_waits",
                     "get_or_create calls that waited for another caller's create()", flights.get("waits"))
        yield family(CounterMetricFamily, "nvcache_flight_takeovers",
                     "Waits after which the waiter created the record itself", flights.get("takeovers"))
        yield family(CounterMetricFamily, "nvcache_flight_wait_seconds",
                     "Total time get_or_create calls waited for another's create()", flights.get("wait_seconds"))
        for name, doc in REMOTE_COUNTERS.items():
            yield family(CounterMetricFamily, f"nvcache_{name}", doc, remote.get(name))

    def _collect_remote(self) -> Iterator[Metric]:
        """The tier's server, asked now (bounded by the tier's timeout; skipped while its breaker is open)."""
        with self._remote_lock:
            info = self.tier.info()
            up = bool(info)
            if up != self._remote_up:  # logged when it changes, not at every scrape
                if not up:
                    log.warning("%s", unreachable(self.tier, self.remote_url))
                elif self._remote_up is not None:
                    log.warning("the remote tier at %s answers again", redact(self.remote_url))
                self._remote_up = up
        labels, values = ["remote"], [redact(self.remote_url)]
        metric = GaugeMetricFamily("nvcache_remote_up", "1 when the remote tier's server answered at this scrape",
                                   labels=labels)
        metric.add_metric(values, 1 if up else 0)
        yield metric
        if not up:
            return
        for name, key, doc in (
                ("nvcache_remote_keys", "keys", "Keys in the remote tier's database (DBSIZE; a cluster: all masters)"),
                ("nvcache_remote_used_memory_bytes", "used_memory", "The remote tier's used_memory"),
        ):
            metric = GaugeMetricFamily(name, doc, labels=labels)
            metric.add_metric(values, info[key])
            yield metric
        metric = GaugeMetricFamily("nvcache_remote_maxmemory_bytes",
                                   "The remote tier's maxmemory (0: no limit), with its maxmemory-policy",
                                   labels=labels + ["policy"])
        metric.add_metric(values + [info["maxmemory_policy"]], info["maxmemory"])
        yield metric


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
@click.option("--listen", metavar="HOST:PORT", default=None,
              help="Serve /metrics on HOST:PORT until interrupted instead of printing once.")
@remote_option("Also ask this remote tier's server for its keys and memory at each scrape "
               "(env NVCACHE_REMOTE; bounded by a 0.2 s timeout).")
@pass_settings
@_friendly
def metrics(settings: Settings, listen: Optional[str], remote_url: Optional[str]) -> None:
    """Prometheus text exposition: hits, misses, records, bytes, evictions, bound, data.mdb size, waits,
    the remote tier's tally; with --remote, the tier's server (keys, memory).

    Read-only. Printed once: exit status 1 when the cache could not be read (nvcache_up is then 0,
    and the message says why); --listen keeps serving nvcache_up 0 and logs why. A remote tier
    that does not answer is nvcache_remote_up 0 and a logged warning, not a failure.
    """
    ctx = click.get_current_context()
    tier = None
    if remote_url:
        quiet_tier_log(ctx, settings.verbose)
        try:
            tier = load_tier(remote_url, SCRAPE_TIMEOUT, backoff=SCRAPE_BACKOFF[0], max_backoff=SCRAPE_BACKOFF[1])
        except RedisMissing as exc:
            if ctx.get_parameter_source("remote_url") != click.core.ParameterSource.ENVIRONMENT:
                raise
            log.warning("NVCACHE_REMOTE is set but not used: %s", exc.message)  # a scanner's setting
    collector = CacheCollector(settings.path, tier, remote_url or "")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)  # type: ignore[arg-type]
    try:
        if listen is None:
            click.echo(generate_latest(registry).decode(), nl=False)
            if collector.failure is not None:  # printed with nvcache_up 0; the status says so too
                raise collector.failure
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
