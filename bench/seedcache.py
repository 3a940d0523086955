"""A baseline of the seed scanner's own layer-record cache, for comparison only.

Written from the description in ``/work/shared/reference/seed-cache-design.md``
(no code of the seed is used). It reproduces the design nvcache replaces:

* ``cacher.json`` - one JSON index of every record, parsed whole and
  rewritten whole (truncate, then write, in place) on every read and write;
* ``lock`` - an empty file; every operation holds an exclusive ``flock`` on it;
* ``ref/<layer id>_<kind>`` - one gzip-compressed file per record;
* ``version`` - ``{"version": 0, ...}``; a missing or different version empties
  the cache at start-up;
* the seed's prune rule: when the total is at or above the bound after a
  write, candidates are every record but the image's own layers ("keepers");
  more than 256 candidates are sorted oldest ``ref_last`` first and 256 are
  removed; 256 or fewer are all removed, unsorted.

``delete`` and :meth:`SeedCache.bulk_load` do not exist in the seed: the first
follows the same parse/rewrite pattern so that the benchmark can time it, the
second only builds a large cache quickly (one index write instead of N).

Run directly for a tiny self-check::

    .venv/bin/python bench/seedcache.py
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import json
import os
import re
import shutil
import time
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

INDEX_FILE = "cacher.json"
LOCK_FILE = "lock"
REF_DIR = "ref"
VERSION_FILE = "version"
VERSION_DOC = {"version": 0, "description": "initial implementation"}
PRUNE_BATCH = 256
GZIP_LEVEL = 6  # Go's gzip.DefaultCompression

_RFC3339 = re.compile(r"^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)$")


def rfc3339nano(ns: int) -> str:
    """``ns`` since the epoch as Go's RFC3339Nano prints a UTC time (trailing zeros dropped)."""
    secs, frac = divmod(ns, 1_000_000_000)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    if frac:
        text += (".%09d" % frac).rstrip("0")
    return text + "Z"


def parse_rfc3339(text: str) -> int:
    """Nanoseconds since the epoch of an RFC 3339 time with any UTC offset (0 when unparsable)."""
    m = _RFC3339.match(text)
    if m is None:
        return 0
    year, mon, day, hh, mm, ss = (int(m.group(i)) for i in range(1, 7))
    frac = int((m.group(7) or "0").ljust(9, "0"))
    # days since the epoch of a proleptic Gregorian date (civil-from-days inverse)
    y = year - (mon <= 2)
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (mon + (-3 if mon > 2 else 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    days = era * 146097 + doe - 719468
    secs = days * 86400 + hh * 3600 + mm * 60 + ss
    zone = m.group(8)
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        secs -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return secs * 1_000_000_000 + frac


def _empty_index() -> Dict[str, Any]:
    return {"cache_records": {}, "current_record_size": 0}


class SeedCache:
    """The seed's cache directory: JSON index + gzipped files, one exclusive flock per operation.

    ``max_mb`` is the bound in MiB (like ``MAX_CACHE_RECORD_MB``). Records are
    bytes; the seed stores each gzip-compressed and counts the compressed size.
    """

    def __init__(self, path: str, max_mb: float) -> None:
        self.path = os.path.abspath(path)
        self.max_bytes = int(max_mb * 1024 * 1024)
        self.index_path = os.path.join(self.path, INDEX_FILE)
        self.ref_dir = os.path.join(self.path, REF_DIR)
        os.makedirs(self.ref_dir, exist_ok=True)
        self._lock_fd = os.open(os.path.join(self.path, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        with self._locked():
            if self._read_version() != VERSION_DOC["version"]:
                self._reset()

    # -- plumbing ---------------------------------------------------------------
    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> "SeedCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _read_version(self) -> Optional[int]:
        try:
            with open(os.path.join(self.path, VERSION_FILE), "rb") as f:
                doc = json.load(f)
        except (OSError, ValueError):
            return None
        return doc.get("version") if isinstance(doc, dict) else None

    def _reset(self) -> None:
        shutil.rmtree(self.ref_dir, ignore_errors=True)
        os.makedirs(self.ref_dir, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.index_path)
        with open(os.path.join(self.path, VERSION_FILE), "w") as f:
            json.dump(VERSION_DOC, f)

    def _load(self) -> Dict[str, Any]:
        """Parse the whole index; missing or invalid JSON reads back as an empty index (as in the seed)."""
        try:
            with open(self.index_path, "rb") as f:
                index = json.load(f)
        except (OSError, ValueError):
            return _empty_index()
        if not isinstance(index, dict) or not isinstance(index.get("cache_records"), dict):
            return _empty_index()
        return index

    def _save(self, index: Dict[str, Any]) -> None:
        """Rewrite the whole index in place: truncate, then write (not crash-safe, like the seed)."""
        for counter in ("cache_hits", "cache_misses"):  # omitted when zero
            if not index.get(counter):
                index.pop(counter, None)
        body = json.dumps(index).encode()
        fd = os.open(self.index_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, body)
        finally:
            os.close(fd)

    @staticmethod
    def record_name(layer_id: str, kind: str = "layer_file") -> str:
        return f"{layer_id}_{kind}"

    # -- operations ---------------------------------------------------------------
    def get(self, layer_id: str, kind: str = "layer_file") -> Optional[bytes]:
        """Lock, parse, count a hit (read + gunzip the file, ref_cnt++, ref_last = now) or a miss, rewrite."""
        name = self.record_name(layer_id, kind)
        with self._locked():
            index = self._load()
            entry = index["cache_records"].get(name)
            data: Optional[bytes] = None
            if entry is None:
                index["cache_misses"] = index.get("cache_misses", 0) + 1
            else:
                try:
                    with open(entry["path"], "rb") as f:
                        data = gzip.decompress(f.read())
                except (OSError, EOFError, gzip.BadGzipFile):
                    # The seed drops the entry by layer id instead of record name: the stale entry stays.
                    index["cache_records"].pop(layer_id, None)
                    index["cache_misses"] = index.get("cache_misses", 0) + 1
                else:
                    index["cache_hits"] = index.get("cache_hits", 0) + 1
                    entry["ref_cnt"] = entry.get("ref_cnt", 0) + 1
                    entry["ref_last"] = rfc3339nano(time.time_ns())
            self._save(index)
            return data

    def put(self, layer_id: str, record: bytes, kind: str = "layer_file", keep: Iterable[str] = ()) -> bool:
        """Lock, parse; if absent write the gzipped file and add it, prune at or above the bound; rewrite."""
        name = self.record_name(layer_id, kind)
        with self._locked():
            index = self._load()
            records = index["cache_records"]
            added = name not in records
            if added:
                path = os.path.join(self.ref_dir, name)
                blob = gzip.compress(bytes(record), compresslevel=GZIP_LEVEL, mtime=0)
                with open(path, "wb") as f:
                    f.write(blob)
                records[name] = {"path": path, "size": len(blob), "ref_cnt": 0,
                                 "ref_last": rfc3339nano(time.time_ns())}
                index["current_record_size"] = index.get("current_record_size", 0) + len(blob)
                if index["current_record_size"] >= self.max_bytes:
                    self._prune(index, {self.record_name(k, kind) for k in keep})
            self._save(index)
            return added

    def _prune(self, index: Dict[str, Any], keepers: set) -> int:
        records: Dict[str, Any] = index["cache_records"]
        candidates = [name for name in records if name not in keepers]
        if len(candidates) > PRUNE_BATCH:
            candidates.sort(key=lambda n: parse_rfc3339(records[n].get("ref_last", "")))
            candidates = candidates[:PRUNE_BATCH]
        for name in candidates:
            entry = records.pop(name)
            with contextlib.suppress(OSError):
                os.unlink(entry["path"])
            index["current_record_size"] -= entry.get("size", 0)
        return len(candidates)

    def delete(self, layer_id: str, kind: str = "layer_file") -> bool:
        """Not in the seed: remove one record with the same lock/parse/rewrite pattern."""
        name = self.record_name(layer_id, kind)
        with self._locked():
            index = self._load()
            entry = index["cache_records"].pop(name, None)
            if entry is not None:
                with contextlib.suppress(OSError):
                    os.unlink(entry["path"])
                index["current_record_size"] -= entry.get("size", 0)
            self._save(index)
            return entry is not None

    def stats(self) -> Dict[str, int]:
        """``show scan cache-stat``: record_count, record_total_size, cache_misses, cache_hits."""
        with self._locked():
            index = self._load()
        return {"record_count": len(index["cache_records"]),
                "record_total_size": index.get("current_record_size", 0),
                "cache_misses": index.get("cache_misses", 0), "cache_hits": index.get("cache_hits", 0)}

    def cache_data(self) -> Dict[str, Any]:
        """``show scan cache-data``: the records and counters (the seed's equivalent of nvcache's dump)."""
        with self._locked():
            index = self._load()
        records = [{"layer_id": name, "size": e.get("size", 0), "reference_count": e.get("ref_cnt", 0),
                    "last_referred": e.get("ref_last", "")}
                   for name, e in index["cache_records"].items()]
        return {"cache_hits": index.get("cache_hits", 0), "cache_misses": index.get("cache_misses", 0),
                "cache_records": records, "record_total_size": index.get("current_record_size", 0)}

    def __len__(self) -> int:
        with self._locked():
            return len(self._load()["cache_records"])

    # -- benchmark helper ------------------------------------------------------------
    def bulk_load(self, items: Iterable[Tuple[str, bytes]], kind: str = "layer_file") -> int:
        """Not in the seed: add many records with one index rewrite (to build a large cache fast).

        Each record gets its own gzipped file and a distinct, increasing ``ref_last``.
        """
        with self._locked():
            index = self._load()
            records = index["cache_records"]
            total = index.get("current_record_size", 0)
            t0 = time.time_ns()
            n = 0
            blobs: Dict[bytes, bytes] = {}
            for layer_id, record in items:
                name = self.record_name(layer_id, kind)
                if name in records:
                    continue
                raw = bytes(record)
                blob = blobs.get(raw)
                if blob is None:
                    if len(blobs) > 256:
                        blobs.clear()
                    blob = blobs[raw] = gzip.compress(raw, compresslevel=GZIP_LEVEL, mtime=0)
                path = os.path.join(self.ref_dir, name)
                with open(path, "wb") as f:
                    f.write(blob)
                records[name] = {"path": path, "size": len(blob), "ref_cnt": 0,
                                 "ref_last": rfc3339nano(t0 + n * 1000)}
                total += len(blob)
                n += 1
            index["current_record_size"] = total
            self._save(index)
            return n


def _selfcheck() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        c = SeedCache(d, 0.01)  # ~10 KiB bound
        assert c.get("sha256:aa") is None
        assert c.put("sha256:aa", b"x" * 100)
        assert not c.put("sha256:aa", b"y")
        assert c.get("sha256:aa") == b"x" * 100
        assert c.delete("sha256:aa") and not c.delete("sha256:aa")
        for i in range(400):
            c.put(f"sha256:{i:064x}", os.urandom(64))  # incompressible: ~90 B each
        s = c.stats()
        assert s["record_total_size"] < c.max_bytes + 200, s
        assert parse_rfc3339("1970-01-01T01:00:00.5+01:00") == 500_000_000
        assert parse_rfc3339(rfc3339nano(1_700_000_000_123_456_789)) == 1_700_000_000_123_456_789
        print("seedcache ok:", s, "records in dump:", len(c.cache_data()["cache_records"]))
        c.close()


if __name__ == "__main__":
    _selfcheck()
