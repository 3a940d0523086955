"""The seed scanner's cache directory layout: read it into nvcache, write it back out.

The seed scanner (see ``shared/reference/seed-cache-design.md``) keeps::

    <dir>/cacher.json   {"cache_records": {name: {path, size, ref_cnt, ref_last}},
                         "cache_hits": n, "cache_misses": n, "current_record_size": n}
    <dir>/ref/<name>    the record's JSON, gzip-compressed (``size`` is the file's length)
    <dir>/lock          empty; every seed operation holds an exclusive flock on it
    <dir>/version       {"version": 0, "description": "initial implementation"}

A record name is ``<layer id>_<kind>``. An import takes each record's
decompressed bytes (what a scanner parses) and stores them the nvcache way:
zstd-compressed with a dictionary trained on the imported records, which
stores fewer bytes than the seed's gzip files, so a cache that fits a bound
in the seed fits it in nvcache (the fit check counts stored bytes). An
export writes gzip files whose ``size`` is their length, as the seed does.
Sizes differ between the two layouts; contents, reference counts, last
references and hit/miss counters carry over. A seed
cache that was never written (``version`` and ``ref/`` but no
``cacher.json``) is empty, as the seed scanner reads it.

:func:`import_seed` validates the whole source (index, every file, every
gzip stream, names, room in the target) before writing anything, and
deletes what it restored if a write fails half-way. History merges by
maximum (see :func:`import_seed`), so nothing is ever counted twice. It
needs ``LayerCache.restore`` and ``LayerCache.merge_history``, because the
public ``put`` cannot set reference counts, last references or counters.
:func:`nvcache.importtarget.import_into` imports into a cache directory.
"""

from __future__ import annotations

import calendar
import datetime
import errno
import fcntl
import gzip
import json
import logging
import os
import re
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Optional, Tuple, Union

from . import codec
from .cache import LayerCache
from .errors import CacheError
from .formats import holds_nvcache

if TYPE_CHECKING:
    from .importtarget import ReadOnlyCache

log = logging.getLogger("nvcache.seedfmt")

INDEX_FILE = "cacher.json"
REF_DIR = "ref"
LOCK_FILE = "lock"
VERSION_FILE = "version"
SEED_VERSION = {"version": 0, "description": "initial implementation"}
# The record kinds the seed scanner writes (RecordName in its scan_cache.go).
KNOWN_KINDS = ("layer_file", "secrets", "fmap")
_KIND_RE = re.compile(r"[a-z0-9_]{1,32}")
_LAYER_ID_RE = re.compile(r"[\x21-\x7e]{1,1024}")
_RFC3339_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d{2}):(\d{2}))")
_UINT32_MAX = 2**32 - 1  # the seed's ref_cnt is a Go uint32
_NAME_MAX = 255
Target = Union[LayerCache, "ReadOnlyCache"]  # what an import's fit check reads


class SeedFormatError(Exception):
    """The source or destination cannot be used; nothing was changed."""


class DamagedRecord(SeedFormatError):
    """A record's ``ref/`` file is not what the index says (size) or not a complete gzip stream.

    ``skip_damaged`` drops such records (with a warning naming each) instead.
    """


@dataclass(frozen=True)
class SeedRecord:
    """One entry of a seed index, resolved to its file."""

    name: str
    layer_id: str
    kind: str
    file: str
    stored_size: int
    ref_cnt: int
    ref_last: str
    last_ns: int


@dataclass
class SeedIndex:
    """A validated seed cache directory."""

    path: str
    records: List[SeedRecord]
    hits: int
    misses: int
    warnings: List[str] = field(default_factory=list)
    damaged: int = 0  # records dropped by skip_damaged


@dataclass
class ImportResult:
    """What an import did (or, with ``dry_run``, would do).

    ``skipped``: records already in the cache (their history merged);
    ``merged``: how many of them got a larger reference count or a later
    last reference from the source; ``damaged``: records dropped by
    ``skip_damaged``; ``hits`` / ``misses``: how much the cache's counters
    rose (the merge keeps the larger of two, so a re-import adds 0).
    """

    imported: int = 0
    skipped: int = 0
    merged: int = 0
    damaged: int = 0
    record_bytes: int = 0  # what the imported records take in the cache (stored bytes)
    dictionary: Optional[bytes] = None  # the compression dictionary trained on them (None: none)
    hits: int = 0
    misses: int = 0
    dry_run: bool = False
    warnings: List[str] = field(default_factory=list)


@dataclass
class ExportResult:
    exported: int = 0
    stored_bytes: int = 0
    hits: int = 0
    misses: int = 0
    warnings: List[str] = field(default_factory=list)


# -- names and times -------------------------------------------------------------
def split_name(name: str) -> Tuple[str, str]:
    """(layer id, kind) of a record name ``<layer id>_<kind>``.

    The seed's kinds are tried first; any other name splits at its first
    underscore, since layer digests (``sha256:<hex>``) contain none.
    """
    for kind in KNOWN_KINDS:
        suffix = "_" + kind
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[:-len(suffix)], kind
    layer_id, sep, kind = name.partition("_")
    if not sep or not layer_id or not _KIND_RE.fullmatch(kind):
        raise SeedFormatError(f"record name {name!r} is not <layer id>_<kind>")
    return layer_id, kind


def _check_name(name: str) -> Tuple[str, str]:
    layer_id, kind = split_name(name)
    if not _LAYER_ID_RE.fullmatch(layer_id):
        raise SeedFormatError(f"record name {name!r}: the layer id must be 1-1024 printable ASCII characters")
    if "/" in name or name in (".", "..") or len(name.encode()) > _NAME_MAX:
        raise SeedFormatError(f"record name {name!r} cannot be a file name under {REF_DIR}/")
    return layer_id, kind


def parse_rfc3339(text: str) -> int:
    """Nanoseconds since the epoch of an RFC 3339 time (Go's RFC3339Nano, any UTC offset)."""
    m = _RFC3339_RE.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    y, mo, d, h, mi, s = (int(g) for g in m.groups()[:6])
    try:
        datetime.datetime(y, mo, d, h, mi, s)  # rejects month 13, Feb 30, second 60...
    except ValueError as exc:
        raise ValueError(f"not a valid time: {text!r} ({exc})") from None
    frac = int((m.group(7) or "").ljust(9, "0"))
    offset = 0
    if m.group(9):
        oh, om = int(m.group(10)), int(m.group(11))
        if oh > 23 or om > 59:
            raise ValueError(f"bad UTC offset in {text!r}")
        offset = (oh * 3600 + om * 60) * (1 if m.group(9) == "+" else -1)
    return (calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)) - offset) * 1_000_000_000 + frac


# -- locking -------------------------------------------------------------------------
@contextmanager
def seed_lock(directory: str, exclusive: bool, timeout: float, create: bool) -> Iterator[None]:
    """Hold the seed's ``lock`` flock, so a seed scanner cannot change the directory meanwhile.

    The seed takes LOCK_EX for every operation, so a shared lock is enough to
    read a consistent snapshot. A source without a lock file (a copy) is read
    unlocked.
    """
    path = os.path.join(directory, LOCK_FILE)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        log.debug("%s has no lock file; reading it unlocked", directory)
        yield
        return
    except OSError as exc:
        raise SeedFormatError(f"cannot open {path}: {exc.strerror}") from None
    try:
        op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, op)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() >= deadline:
                    raise SeedFormatError(
                        f"cannot lock {path} within {timeout:g} s (is a seed scanner busy?)") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)  # closing drops the flock


# -- reading --------------------------------------------------------------------------
def _read_json(path: str, what: str) -> Any:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise SeedFormatError(f"{path} is missing: not a seed scanner cache, or a partial copy") from None
    except OSError as exc:
        raise SeedFormatError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise SeedFormatError(f"{path} is not valid JSON ({exc}): the {what} is truncated or damaged") from None


def _uint(value: Any, where: str) -> int:
    if type(value) is not int or value < 0:
        raise SeedFormatError(f"{where} must be a non-negative integer, got {value!r}")
    return value


def read_index(src: str, skip_missing: bool = False, skip_damaged: bool = False) -> SeedIndex:
    """Validate ``src`` as a seed cache directory and resolve every record to its file.

    Checks the version file, the index and, for each record, that its file
    exists under ``ref/`` with the indexed size. With ``skip_missing`` an
    entry whose file is gone (the seed leaves such stale entries) is dropped
    with a warning instead of failing; with ``skip_damaged``, one whose file
    has another size (DamagedRecord otherwise). Without ``cacher.json`` the
    index is empty: the seed scanner reads a cache it never wrote that way.
    """
    src = os.path.abspath(src)
    if not os.path.isdir(src):
        raise SeedFormatError(f"{src} is not a directory")
    index_path = os.path.join(src, INDEX_FILE)
    if not os.path.exists(index_path) and holds_nvcache(src):
        raise SeedFormatError(f"{src} is an nvcache cache, not the seed scanner's layout")
    version = _read_json(os.path.join(src, VERSION_FILE), "version file")
    if not isinstance(version, dict) or version.get("version") != SEED_VERSION["version"]:
        raise SeedFormatError(f"{src}/{VERSION_FILE} says {version!r}; only seed cache version "
                              f"{SEED_VERSION['version']} is supported (the seed itself empties any other)")
    warnings: List[str] = []
    if os.path.lexists(index_path):
        doc = _read_json(index_path, "index")
    else:  # made by a scanner that never wrote a record: it reads a missing index as empty
        doc = {}
        warnings.append(f"{src} has no {INDEX_FILE} (a seed cache that was never written): it is empty")
    if not isinstance(doc, dict):
        raise SeedFormatError(f"{index_path} must hold a JSON object")
    entries = doc.get("cache_records") or {}  # Go omits an empty map
    if not isinstance(entries, dict):
        raise SeedFormatError(f"{index_path}: cache_records must be an object")
    hits = _uint(doc.get("cache_hits", 0), "cache_hits")
    misses = _uint(doc.get("cache_misses", 0), "cache_misses")
    if max(hits, misses) >= 1 << 63:
        raise SeedFormatError(f"{index_path}: cache_hits/cache_misses do not fit 63 bits")
    if doc.get("cache_data"):
        warnings.append("the raw layer data cache (cache_data, data/) is not imported: nvcache holds records only")
    records: List[SeedRecord] = []
    indexed = damaged = 0
    for name, entry in entries.items():
        where = f"{INDEX_FILE} record {name!r}"
        layer_id, kind = _check_name(name)
        if not isinstance(entry, dict):
            raise SeedFormatError(f"{where} must be an object")
        rec_path = entry.get("path")
        if not isinstance(rec_path, str) or os.path.basename(rec_path) != name:
            raise SeedFormatError(f"{where}: path {rec_path!r} does not name ref/{name}")
        size = _uint(entry.get("size"), f"{where}: size")
        indexed += size
        ref_cnt = _uint(entry.get("ref_cnt", 0), f"{where}: ref_cnt")
        if ref_cnt >= 1 << 64:
            raise SeedFormatError(f"{where}: ref_cnt {ref_cnt} does not fit 64 bits")
        ref_last = entry.get("ref_last")
        try:
            last_ns = parse_rfc3339(ref_last)  # type: ignore[arg-type]
        except ValueError as exc:
            raise SeedFormatError(f"{where}: ref_last: {exc}") from None
        if last_ns <= 0:
            raise SeedFormatError(f"{where}: ref_last {ref_last!r} is not after 1970-01-01T00:00:00Z")
        # The recorded path is where the seed scanner saw it; a copy lives under src.
        file = os.path.join(src, REF_DIR, name)
        try:
            actual = os.stat(file).st_size
        except FileNotFoundError:
            if skip_missing:
                warnings.append(f"skipped {name}: {REF_DIR}/{name} is missing (a stale index entry)")
                continue
            raise SeedFormatError(f"{where}: {REF_DIR}/{name} is missing (partial copy or stale entry; "
                                  "--skip-missing drops such entries)") from None
        if actual != size:
            problem = f"{REF_DIR}/{name} has {actual} bytes, the index says {size} (truncated or partial copy)"
            if skip_damaged:
                warnings.append(f"skipped {name}: {problem}")
                damaged += 1
                continue
            raise DamagedRecord(f"{where}: {problem}; --skip-damaged drops such records")
        records.append(SeedRecord(name, layer_id, kind, file, size, ref_cnt, ref_last, last_ns))
    current = doc.get("current_record_size")
    if current is not None and current != indexed:
        warnings.append(f"current_record_size {current!r} != {indexed}, the sum of the indexed sizes "
                        "(the seed's own accounting drifted; the files' sizes are what count)")
    try:
        orphans = [n for n in os.listdir(os.path.join(src, REF_DIR)) if n not in entries]
    except FileNotFoundError:
        orphans = []
    if orphans:
        warnings.append(f"{len(orphans)} file(s) under {REF_DIR}/ are not in the index and are not imported")
    records.sort(key=lambda r: (r.last_ns, r.name))
    return SeedIndex(src, records, hits, misses, warnings, damaged)


def load_record(rec: SeedRecord) -> bytes:
    """The record's bytes: its ``ref/`` file, gunzipped and checked (CRC and length)."""
    try:
        with open(rec.file, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise SeedFormatError(f"cannot read {rec.file}: {exc.strerror}") from None
    if len(raw) != rec.stored_size:
        raise SeedFormatError(f"{rec.file} changed size while importing ({len(raw)} != {rec.stored_size})")
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DamagedRecord(f"{rec.file} is not a complete gzip stream: {exc}") from None


# -- import ---------------------------------------------------------------------------
def _loaded(rec: SeedRecord, skip_damaged: bool, warnings: List[str]) -> Optional[bytes]:
    """The record's bytes; None (with a warning naming it) for a damaged one under ``skip_damaged``."""
    try:
        return load_record(rec)
    except DamagedRecord as exc:
        if not skip_damaged:
            raise DamagedRecord(f"{exc}; --skip-damaged drops such records") from None
        warnings.append(f"skipped {rec.name}: {exc}")
        return None


def check_source(src: str, skip_missing: bool = False, lock_timeout: float = 10.0, *,
                 skip_damaged: bool = False) -> SeedIndex:
    """Validate a seed cache directory completely (index and every gzip stream) without a target cache.

    The index returned lacks what ``skip_missing`` / ``skip_damaged`` dropped.
    """
    with seed_lock(os.path.abspath(src), exclusive=False, timeout=lock_timeout, create=False):
        index = read_index(src, skip_missing, skip_damaged)
        good = [rec for rec in index.records if _loaded(rec, skip_damaged, index.warnings) is not None]
        index.damaged += len(index.records) - len(good)
        index.records = good
    return index


def _storage(cache: Target, records: Iterable[bytes], samples: List[bytes]) -> Tuple[List[int], Optional[bytes]]:
    """How ``records`` will be stored in ``cache``, the fit check's one measure: each one's stored
    size, and the dictionary trained on ``samples`` (some of them) that the import stores first
    (None when none helps, or the cache stores records raw). Compression is deterministic and
    restores train no dictionary, so the records then take exactly these sizes."""
    if not getattr(cache, "compress", True):
        return [len(record) for record in records], None
    body = codec.train(samples)
    if body is None and isinstance(cache, LayerCache):  # the cache's own current dictionary, if any
        return [cache.stored_size(record) for record in records], None
    return codec.stored_sizes(records, body), body


def import_seed(src: str, cache: Target, *, skip_missing: bool = False, skip_damaged: bool = False,
                dry_run: bool = False, lock_timeout: float = 10.0) -> ImportResult:
    """Copy a seed cache directory into ``cache``, all or nothing.

    History merges by maximum, so importing twice, or importing back an
    export of the same cache, never counts anything twice: a record already
    in ``cache`` keeps its bytes (it is counted as skipped), and its
    reference count becomes the larger of the cache's and the source's and
    its last reference the later of the two; the cache's hit and miss
    counters each become the larger of the cache's and the source's. They
    are never added up: importing an unrelated cache into a non-empty one
    keeps, per counter, the larger of the two (use ``add_counters`` to sum).

    A source without ``cacher.json`` (a seed cache never written) is empty.
    ``skip_missing`` drops index entries whose file is gone, ``skip_damaged``
    records whose file is not a complete gzip stream or not the indexed size
    (each named in a warning). Raises SeedFormatError, with nothing imported,
    when the source is bad or partial (DamagedRecord for a damaged record),
    a name is not valid for nvcache, or the records would not fit within
    ``cache.max_bytes`` without evicting anything. ``dry_run`` checks all
    that and changes nothing: ``cache`` may then be a read-only
    :class:`~nvcache.importtarget.ReadOnlyCache`.
    """
    if not cache.enabled:
        raise SeedFormatError("the target cache is disabled (bound 0); give a bound with --max-mb")
    with seed_lock(os.path.abspath(src), exclusive=False, timeout=lock_timeout, create=False):
        index = read_index(src, skip_missing, skip_damaged)
        result = ImportResult(dry_run=dry_run, damaged=index.damaged, warnings=list(index.warnings))
        # Pass 1: every file decompresses, every name is valid here, everything fits as stored.
        good: List[SeedRecord] = []
        new: List[SeedRecord] = []
        samples: List[bytes] = []
        for rec in index.records:
            data = _loaded(rec, skip_damaged, result.warnings)
            if data is None:
                result.damaged += 1
                continue
            good.append(rec)
            try:
                present = cache.contains(rec.layer_id, rec.kind)
            except ValueError as exc:
                raise SeedFormatError(f"record {rec.name!r} cannot be an nvcache record: {exc}") from None
            if present:
                result.skipped += 1
                continue
            new.append(rec)
            if len(samples) < codec.SAMPLES:
                samples.append(data)
        sizes, result.dictionary = _storage(cache, (load_record(rec) for rec in new), samples)
        todo: List[Tuple[SeedRecord, int]] = []
        for rec, size in zip(new, sizes):
            if size > cache.max_bytes:
                raise SeedFormatError(f"record {rec.name} ({size} bytes stored) exceeds the bound of "
                                      f"{cache.max_bytes} bytes")
            todo.append((rec, size))
            result.record_bytes += size
        stats = cache.stats()
        held = stats["record_total_size"] or 0
        if held + result.record_bytes > cache.max_bytes:
            raise SeedFormatError(
                f"{len(todo)} records of {result.record_bytes} bytes plus the {held} bytes already cached "
                f"exceed the bound of {cache.max_bytes} bytes; raise --max-mb or clear the cache")
        if good and not todo:
            result.warnings.append("every record is already in the cache (imported before?); their history "
                                   "and the counters merge by maximum, so nothing is counted twice")
        if dry_run:
            result.imported = len(todo)
            result.hits = max(index.hits - (stats["cache_hits"] or 0), 0)
            result.misses = max(index.misses - (stats["cache_misses"] or 0), 0)
            return result
        if not isinstance(cache, LayerCache):  # checked before anything is written
            raise TypeError(f"only a dry run can take a {type(cache).__name__}; an import needs a LayerCache")
        _write(cache, index, good, todo, result)
        return result


def _write(cache: LayerCache, index: SeedIndex, good: List[SeedRecord], todo: List[Tuple[SeedRecord, int]],
           result: ImportResult) -> None:
    """Pass 2: restore the new records, then merge the history of all; undo the restores on failure."""
    restored: List[SeedRecord] = []
    evictions_before = cache.evictions() or 0
    if todo and result.dictionary is not None and not cache.add_dictionary(result.dictionary):
        # The fit was measured with this dictionary: without it the sizes would not hold.
        raise SeedFormatError("another process stored a compression dictionary while this import was "
                              "checking the source; nothing was imported: run the import again")
    try:
        for rec, _size in todo:
            data = load_record(rec)  # load_record checks the file still has the indexed size
            if cache.restore(rec.layer_id, data, rec.kind, reference_count=rec.ref_cnt,
                             last_referred_ns=rec.last_ns):
                restored.append(rec)
            else:  # put there by a scanner since pass 1: its history merges below
                result.skipped += 1
        # Records restored just now already carry the source's history: the merge leaves them.
        result.merged, result.hits, result.misses = cache.merge_history(
            [(rec.layer_id, rec.kind, rec.ref_cnt, rec.last_ns) for rec in good], index.hits, index.misses)
    except BaseException as exc:
        undone = _undo(cache, restored)
        if isinstance(exc, Exception):
            raise SeedFormatError(f"import failed ({type(exc).__name__}: {exc}); removed the {undone} "
                                  "records it had restored, nothing else changed") from exc
        raise
    result.imported = len(restored)
    evicted = (cache.evictions() or 0) - evictions_before
    if evicted:
        result.warnings.append(f"{evicted} records were evicted while importing (scanners writing meanwhile?)")


def _undo(cache: LayerCache, restored: List[SeedRecord]) -> int:
    undone = 0
    for rec in restored:
        try:
            undone += cache.delete(rec.layer_id, rec.kind)
        except CacheError as exc:  # keep going: remove as much as possible
            log.error("could not remove %s while undoing the import: %s", rec.name, exc)
    return undone


# -- export ---------------------------------------------------------------------------
def _write_atomic(directory: str, name: str, data: bytes, mode: int = 0o644) -> None:
    """Write ``directory/name`` through a temp file and rename, so readers never see a partial file."""
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(directory, name))
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _prepare_destination(dst: str, force: bool) -> bool:
    """Check ``dst`` can take a seed cache; True when it had to be created."""
    if os.path.islink(dst):
        raise SeedFormatError(f"{dst} is a symlink; refusing to follow it")
    if not os.path.exists(dst):
        os.makedirs(os.path.join(dst, REF_DIR), mode=0o755)
        return True
    if not os.path.isdir(dst):
        raise SeedFormatError(f"{dst} exists and is not a directory")
    entries = set(os.listdir(dst))
    if holds_nvcache(dst):
        raise SeedFormatError(f"{dst} holds an nvcache cache; export to the seed layout elsewhere")
    if entries - {INDEX_FILE, REF_DIR, LOCK_FILE, VERSION_FILE, "data"}:
        raise SeedFormatError(f"{dst} is not empty and does not look like a seed cache directory")
    if entries - {LOCK_FILE} and not force:
        raise SeedFormatError(f"{dst} already holds a seed cache; --force replaces it")
    os.makedirs(os.path.join(dst, REF_DIR), mode=0o755, exist_ok=True)
    return False


def export_seed(cache: LayerCache, dst: str, *, force: bool = False, seed_path: Optional[str] = None,
                lock_timeout: float = 10.0) -> ExportResult:
    """Write ``cache``'s records in the seed scanner's layout under ``dst``.

    ``seed_path`` is the directory the seed scanner will see the cache at
    (its index stores absolute file paths and reads them as they are);
    default: ``dst`` itself. The index is written last, through a rename,
    so a seed scanner never reads a half-written one.
    """
    if not cache.enabled:
        raise SeedFormatError("the cache is disabled (bound 0); give a bound with --max-mb")
    dst = os.path.abspath(dst)
    seed_dir = os.path.abspath(seed_path) if seed_path else dst
    snapshot = cache.cache_data()
    names = [rec["layer_id"] for rec in snapshot["cache_records"]]
    split = {name: _check_name(name) for name in names}  # every name checked before writing
    result = ExportResult(hits=snapshot["cache_hits"] or 0, misses=snapshot["cache_misses"] or 0)
    created = _prepare_destination(dst, force)
    ref_dir = os.path.join(dst, REF_DIR)
    written: List[str] = []
    try:
        with seed_lock(dst, exclusive=True, timeout=lock_timeout, create=True):
            records: Dict[str, Dict[str, Any]] = {}
            total = 0
            for rec in snapshot["cache_records"]:
                name = rec["layer_id"]
                data = cache.peek(*split[name])  # counts nothing: the exported cache is unchanged
                if data is None:
                    result.warnings.append(f"{name} was evicted or deleted while exporting; left out")
                    continue
                blob = gzip.compress(bytes(data), mtime=0)
                _write_atomic(ref_dir, name, blob)
                written.append(name)
                refs = rec["reference_count"]
                if refs > _UINT32_MAX:
                    result.warnings.append(f"{name}: reference count {refs} capped at the seed's {_UINT32_MAX}")
                    refs = _UINT32_MAX
                records[name] = {"path": os.path.join(seed_dir, REF_DIR, name), "size": len(blob),
                                 "ref_cnt": refs, "ref_last": rec["last_referred"]}
                total += len(blob)
            # Field names and omissions as the seed's Go struct marshals them.
            doc: Dict[str, Any] = {}
            if records:
                doc["cache_records"] = records
            if result.hits:
                doc["cache_hits"] = result.hits
            if result.misses:
                doc["cache_misses"] = result.misses
            doc["current_record_size"] = total
            _write_atomic(dst, VERSION_FILE, json.dumps(SEED_VERSION).encode())
            _write_atomic(dst, INDEX_FILE, json.dumps(doc).encode())
            for stale in set(os.listdir(ref_dir)) - set(records):  # only with --force: the old cache's files
                os.unlink(os.path.join(ref_dir, stale))
    except BaseException:
        if created:
            for name in written:
                _unlink_quiet(os.path.join(ref_dir, name))
            for name in (INDEX_FILE, VERSION_FILE, LOCK_FILE):
                _unlink_quiet(os.path.join(dst, name))
            for d in (ref_dir, dst):
                try:
                    os.rmdir(d)
                except OSError:
                    pass
        raise
    result.exported = len(records)
    result.stored_bytes = total
    return result


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
