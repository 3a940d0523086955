"""``nvcache remote-stat``: the remote tier's server, as the node's caches use it.

Registered on the ``nvcache`` group by :mod:`nvcache.cli`. The server's figures come from
:meth:`RemoteTier.info` (``INFO memory`` and ``DBSIZE``), asked with the tier's bounded
timeouts; nothing is written to the server or to the cache. The node's own counts of the tier
(hits, misses, puts, claims...) are in the cache file: ``nvcache stat --all``.
"""

from __future__ import annotations

import json
from typing import Optional

import click
from prettytable import PrettyTable

from .cli import Settings, cli
from .clitier import eviction_warning, load_tier, quiet_tier_log, redact, remote_option, unreachable

INFO_ROWS = ("keys", "used_memory", "maxmemory", "maxmemory_policy", "masters")


@cli.command("remote-stat")
@remote_option("The tier's URL: redis://[:password@]host:port/db, rediss://, unix:///path.sock, "
               "redis+cluster://host:port[,host:port...] (env NVCACHE_REMOTE, as the scanners use it).")
@click.option("--timeout", metavar="SECONDS", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True,
              help="Seconds to wait for connecting and for each reply.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.pass_context
def remote_stat(ctx: click.Context, remote_url: Optional[str], timeout: float, as_json: bool) -> None:
    """The remote tier's server: keys, used_memory, maxmemory, maxmemory_policy, masters.

    keys is the database's DBSIZE (nvcache's records and fleet claims, and
    any other keys in it); memory in bytes; a cluster sums its masters.
    Warns on stderr when records would never leave the server (maxmemory
    0, or a policy that evicts none of them) and says what to set.
    NVCACHE_REMOTE_TTL (whether records carry a TTL) is read as the
    scanners read it; NVCACHE_REMOTE_KEY and _PREFIX are checked as theirs
    are and change no figure. The node's own counts of the tier (hits,
    misses, puts, claims): `nvcache stat --all`.

    \b
    Exit status: 0 the server answered; 1 it could not be reached (the
    message says why), or redis-py is not installed; 2 no URL given, or a bad one.
    """
    if not remote_url:
        raise click.UsageError("no remote tier given: pass --remote URL or set NVCACHE_REMOTE")
    settings = ctx.find_object(Settings)
    quiet_tier_log(ctx, settings.verbose if settings is not None else 0)
    tier = load_tier(remote_url, timeout)
    try:
        info = tier.info()
        if not info:
            raise click.ClickException(unreachable(tier, remote_url))
    finally:
        tier.close()
    warning = eviction_warning(info, tier.ttl_ms is not None)
    if as_json:
        click.echo(json.dumps({"remote": redact(remote_url), **{k: info[k] for k in INFO_ROWS},
                               "warning": warning}, indent=2))
    else:
        table = PrettyTable(["Field", "Value"])
        table.align = "l"
        table.add_row(["remote", redact(remote_url)])
        for name in INFO_ROWS:
            table.add_row([name, info[name]])
        click.echo(table.get_string())
    if warning is not None:
        click.echo(f"warning: {warning}", err=True)
