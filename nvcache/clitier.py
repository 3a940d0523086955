"""The CLI's side of the remote tier, shared by ``remote-stat`` (:mod:`nvcache.cliremote`) and
``metrics --remote`` (:mod:`nvcache.climetrics`): the tier opened as the scanners open it, its
URL without the password for messages, one-line errors, and the eviction check.

redis-py is the ``remote`` extra: without it :func:`load_tier` says so in one line
(:class:`RedisMissing`). This module imports neither redis-py nor :mod:`nvcache.cli`.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Dict, List, Optional
from urllib.parse import unquote, urlsplit

import click

from .arguments import redact

INSTALL_REDIS = "pip install 'nvcache[remote]'"
# Policies under which a full server evicts nvcache's records: allkeys-* always; volatile-* only
# keys with a TTL, which the records have only when NVCACHE_REMOTE_TTL is set.
EVICTS_ALL = frozenset({"allkeys-lru", "allkeys-lfu", "allkeys-random"})
EVICTS_VOLATILE = frozenset({"volatile-lru", "volatile-lfu", "volatile-random", "volatile-ttl"})
FIX = "set maxmemory (e.g. `CONFIG SET maxmemory 4gb`) and `maxmemory-policy allkeys-lru` (redis.conf, " \
      "or CONFIG SET then CONFIG REWRITE)"


class RedisMissing(click.ClickException):
    """redis-py is not installed (exit status 1, one line)."""


def _secrets(url: str) -> List[str]:
    """The passwords written in ``url`` (its userinfo, a password= query parameter)."""
    head, _, query = url.partition("?")
    found = [m.group(2) for m in re.finditer(r"(?i)(^|&)(?:password|pass|auth)=([^&]*)", query)]
    netloc = head.partition("://")[2].partition("/")[0]
    if "@" in netloc:
        userinfo = netloc.rsplit("@", 1)[0]
        found.append(userinfo.partition(":")[2] or userinfo)
    return [form for secret in found if secret for form in {secret, unquote(secret)}]


def _scrub(text: str, url: str) -> str:
    """``text`` (an error message) with ``url`` redacted and the URL's passwords masked."""
    text = text.replace(url, redact(url))
    for secret in _secrets(url):
        text = text.replace(secret, "***")
    return text


def load_tier(url: str, timeout: float, **kwargs: Any) -> Any:
    """A RemoteTier for ``url`` configured as ``RemoteTier.from_env`` does (NVCACHE_REMOTE_KEY,
    _PREFIX and _TTL honoured); RedisMissing without redis-py, UsageError for a bad URL or setting."""
    try:
        from .remote import RemoteTier
    except ImportError as exc:
        raise RedisMissing(f"the remote tier needs redis-py, which is not installed: {INSTALL_REDIS} "
                           f"({exc})") from None
    environ = dict(os.environ)
    environ["NVCACHE_REMOTE"] = url
    try:
        parts = urlsplit(url)
        if parts.scheme.lower() in ("redis", "rediss"):
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        return RemoteTier.from_env(environ, timeout=timeout, **kwargs)
    except ValueError as exc:
        message = _scrub(str(exc), url).replace("remote_key", "NVCACHE_REMOTE_KEY")
        raise click.UsageError(f"remote tier {redact(url)}: {message}") from None


def quiet_tier_log(ctx: click.Context, verbose: int) -> None:
    """Keep the tier's own log lines (its breaker's "reads fail ... then probed", tracebacks of
    unexpected faults) off stderr for this invocation unless -v: the command reports the fault
    itself, in one line naming the server."""
    if verbose > 0:
        return
    logger = logging.getLogger("nvcache.remote")
    previous = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    ctx.call_on_close(lambda: logger.setLevel(previous))


def unreachable(tier: Any, url: str) -> str:
    """The one-line reason ``tier`` could not answer, naming the server without its password."""
    reason = tier.last_error or "skipped while the tier's circuit breaker is open"
    return f"cannot reach the remote tier at {redact(url)}: {_scrub(reason, url)}"


def eviction_warning(info: Dict[str, Any], ttl_set: bool) -> Optional[str]:
    """Why nvcache's records would never leave this server, and what to set; None when they do."""
    if not info.get("maxmemory"):
        if ttl_set:
            return ("maxmemory is 0 (no limit): records leave only when their NVCACHE_REMOTE_TTL ends, "
                    f"and the server's memory has no bound; {FIX}")
        return (f"records never leave this server: maxmemory is 0 (no limit), so it grows with every record "
                f"shared; {FIX}")
    policies = sorted(set(str(info.get("maxmemory_policy", "?")).split(",")))
    volatile = [p for p in policies if p in EVICTS_VOLATILE]
    refusing = [p for p in policies if p not in EVICTS_ALL and p not in EVICTS_VOLATILE]
    if refusing:
        return (f"records never leave this server: maxmemory-policy {','.join(refusing)} evicts nothing, so once "
                "maxmemory is reached it refuses new records (the caches' puts are skipped); "
                "set `maxmemory-policy allkeys-lru`")
    if volatile and not ttl_set:
        return (f"records never leave this server: maxmemory-policy {','.join(volatile)} evicts only keys with "
                "a TTL, and nvcache's records have none (NVCACHE_REMOTE_TTL is not set here); "
                "set `maxmemory-policy allkeys-lru` (or NVCACHE_REMOTE_TTL for the scanners)")
    return None


def remote_option(help_text: str) -> Any:
    return click.option("--remote", "remote_url", metavar="URL", envvar="NVCACHE_REMOTE", default=None,
                        help=help_text)
