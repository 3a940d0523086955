"""What the NeuVector controller shows for a cache: nvcache's numbers through its rules.

The controller serves ``show scan cache-stat`` and ``show scan cache-data``
through Go structs (neuvector/neuvector ``controller/api/apis.go``) whose
fields are all ``omitempty``::

    RESTScanCacheStat   record_count, record_total_size, cache_misses, cache_hits   (uint64)
    RESTScanCacheData   cache_records, record_total_size, cache_misses, cache_hits
    RESTScanCacheRecord layer_id (string), size (uint64), reference_count (uint32),
                        last_referred (time.Time)

Go's encoding/json leaves out a zero number, an empty string and an empty
list under ``omitempty``, but never a struct: ``last_referred`` is always
there. The manager CLI prints the dump with sorted keys and a 2-space
indent, and its cache-stat table shows ``None`` for a field it did not get.

``reference_count`` is a uint32 there (and the scanner's own ``ref_cnt``).
nvcache counts references in 64 bits; a count above 2**32-1 is shown as
4294967295. A Go conversion would wrap it modulo 2**32 instead (and
json.Unmarshal of a too-large number leaves the field zero, so it vanishes),
which would show a heavily used record as rarely or never used; saturating
keeps it the most used one, as ``nvcache export`` caps ``ref_cnt``.

:meth:`nvcache.LayerCache.cache_data` keeps every key; these functions make
what the controller would print from it.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Mapping, Optional

UINT32_MAX = 2**32 - 1  # RESTScanCacheRecord.RefCnt is a Go uint32
STAT_FIELDS = ("cache_misses", "cache_hits", "record_count", "record_total_size")  # the table's row order


def _present(value: Any) -> bool:
    """Whether Go's ``omitempty`` keeps the field: not zero, not empty (None: nvcache has no value)."""
    return value is not None and value != 0 and value != "" and value != []


def controller_record(record: Mapping[str, Any]) -> Dict[str, Any]:
    """One record of the dump as RESTScanCacheRecord marshals it."""
    out: Dict[str, Any] = {"last_referred": record["last_referred"]}  # a struct: omitempty keeps it
    refs = record.get("reference_count")
    if refs is not None:
        refs = min(refs, UINT32_MAX)
    for name, value in (("layer_id", record.get("layer_id")), ("reference_count", refs),
                        ("size", record.get("size"))):
        if _present(value):
            out[name] = value
    return out


def controller_view(data: Mapping[str, Any]) -> Dict[str, Any]:
    """``cache_data()`` as the controller serves it (RESTScanCacheData): zero counters and sizes,
    zero reference counts and an empty record list left out; reference counts above 2**32-1
    shown as 2**32-1. The records keep their order (next victim first)."""
    out: Dict[str, Any] = {}
    records = [controller_record(r) for r in data.get("cache_records") or ()]
    for name, value in (("cache_hits", data.get("cache_hits")), ("cache_misses", data.get("cache_misses")),
                        ("cache_records", records), ("record_total_size", data.get("record_total_size"))):
        if _present(value):
            out[name] = value
    return out


def controller_json(data: Mapping[str, Any]) -> str:
    """The text ``show scan cache-data`` prints for ``cache_data()``: :func:`controller_view`,
    sorted keys, 2-space indent (the manager CLI's ``json.dumps``)."""
    return json.dumps(controller_view(data), indent=2, sort_keys=True)


def controller_stat(stats: Mapping[str, Optional[int]]) -> Dict[str, Optional[int]]:
    """``stats()`` as ``show scan cache-stat`` shows it: the four rows in the table's order, None
    for each one RESTScanCacheStat leaves out (zero, or no cache at all)."""
    return {name: stats.get(name) if _present(stats.get(name)) else None for name in STAT_FIELDS}
