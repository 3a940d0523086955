"""The store: one cache directory in this process, and every transaction on it.

Every :class:`~nvcache.LayerCache` of a directory in a process shares one
:class:`Store` (one mapping, one flock descriptor, one access buffer). It
offers named verbs: reads that count nothing (lookup, find, lookup_many,
contains, counters, cache_data, check) and writes (insert, remove,
drop_damaged, add_counters, clear, flush, merge_history, train_dictionary,
add_dictionary), each write one transaction under the exclusive lock
(:meth:`Store._write`) that applies the buffered accesses first when it must.
Records are compressed before a write and decompressed after a read
(:mod:`nvcache.codec`). LMDB failures become CacheError, and damage is rebuilt
by the next writer. How the files are opened, found stale and reopened is the
base class's job (:mod:`nvcache.lifecycle`). DEVELOPERS.md has the reasons.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import lmdb

from .cachedir import write_version
from .codec import RAW, REFRESH_EVERY, SAMPLES, due_generation, train
from .fallback import HEADER_SIZE
from .errors import CacheError, RecordTooLarge, StaleReader
from .lifecycle import APPLY_RETRY_NS, REBUILD, Lifecycle, writes_due
from .opening import CORRUPTION_ERRORS, Files
from .writemap import PAGES_PER_KEY, NoRoom

log = logging.getLogger("nvcache")

# What an index operation raises on bad stored bytes (arguments were checked by the front).
DATA_ERRORS = (lmdb.Error,) + CORRUPTION_ERRORS
# A read that meets these goes on with the current files: another thread replaced ours
# (StaleReader), or another process grew data.mdb past our map (reopened first: REOPEN_ERRORS).
RETRY_ERRORS = (StaleReader, lmdb.MapResizedError)
# Retries of one write that found the map full or grown: each reopens with a larger map.
_MAP_RETRIES = 8


def _decoded(reader: Any, data: Any, enc: int) -> Any:
    """The record's bytes from stored ones (False, a damaged record, when they do not decode)."""
    out = reader.codec.decode(enc, data)
    return False if out is None else out


def _decoded_found(reader: Any, found: Tuple[Any, int, int]) -> Tuple[Any, int]:
    data, born, enc = found
    return (_decoded(reader, data, enc) if enc else data), born


def _decoded_named(reader: Any, found: Tuple[bytes, Any, int, int]) -> Tuple[bytes, Any, int]:
    key, data, born, enc = found
    return key, (_decoded(reader, data, enc) if enc else data), born

_Op = Callable[..., Any]


class Store(Lifecycle):
    """One directory's cache in this process (shared by its LayerCaches, reference counted)."""

    _apply_retry_at = 0  # monotonic ns before which apply_due does not try again (the lock was busy)

    # -- reads (count nothing: the front counts) -------------------------------------------
    # Each takes the caller's lock timeout (None: the lock's own): caches that share this store
    # may each have their own.
    # Reads return the record's bytes as put: the core returns the stored bytes and their
    # encoding, and a compressed record is decoded here, after the core released its read lock,
    # with the codec of the reader that read it (dictionary numbers are a file's own).
    def lookup(self, key: bytes, timeout: Optional[float] = None) -> Tuple[Any, int]:
        """(bytes, born) of a record; (None, 0) when absent; (False, 0) when damaged."""
        if self.state:
            self._refresh(timeout)
        reader = self.reader
        again = lambda reader: _decoded_found(reader, reader.lookup(key, timeout))  # noqa: E731
        try:
            found = reader.lookup(key, timeout)
        except RETRY_ERRORS as exc:  # replaced meanwhile, or the map outgrown
            self._retrying(exc)
            return self._via_reader(again, timeout)  # type: ignore[no-any-return]
        except DATA_ERRORS as exc:
            raise self._failure(exc, reader) from exc
        try:  # outside the try above: nothing decoding raises is damage of the file
            return _decoded_found(reader, found)
        except StaleReader:  # a dictionary to load, and the file replaced meanwhile
            return self._via_reader(again, timeout)  # type: ignore[no-any-return]

    def find(self, layer_id: str, kind: str, timeout: Optional[float] = None) -> Tuple[bytes, Any, int]:
        """(key, data, born) of a record by name (validated): :meth:`lookup` in one core call, the hot read."""
        if self.state:
            self._refresh(timeout)
        reader = self.reader
        try:
            key, data, born, enc = reader.find(layer_id, kind, timeout)
        except RETRY_ERRORS as exc:
            self._retrying(exc)
            return self._via_reader(
                lambda reader: _decoded_named(reader, reader.find(layer_id, kind, timeout)), timeout)
        except DATA_ERRORS as exc:
            if isinstance(exc, ValueError):
                self.core.record_key(layer_id, kind)  # raises again for a bad argument: not damage
            raise self._failure(exc, reader) from exc
        if enc:  # decoded outside the try above: nothing decoding raises is damage of the file
            try:
                data = _decoded(reader, data, enc)
            except StaleReader:  # a dictionary to load, and the file replaced meanwhile
                return self._via_reader(
                    lambda reader: _decoded_named(reader, reader.find(layer_id, kind, timeout)), timeout)
        return key, data, born

    def lookup_many(self, keys: List[bytes], timeout: Optional[float] = None) -> List[Tuple[Any, int]]:
        """:meth:`lookup` of every key under one lock and in one read transaction."""
        return self._via_reader(  # type: ignore[no-any-return]
            lambda reader: [_decoded_found(reader, found) for found in reader.lookup_many(keys, timeout)], timeout)

    def contains(self, key: bytes, fresh: bool = False, timeout: Optional[float] = None) -> bool:
        """Whether a record exists, read like :meth:`lookup`; counts nothing.

        ``fresh``: first reopen if another process rebuilt the file (a put must
        not skip its write because of a record in a file nobody uses any more).
        """
        if fresh:
            self._current(True, timeout)
        elif not self.state:  # the common case first, as in lookup: one core call
            reader = self.reader
            try:
                return bool(reader.contains(key, timeout))
            except RETRY_ERRORS as exc:
                self._retrying(exc)  # replaced meanwhile: the slow way below
            except DATA_ERRORS as exc:
                raise self._failure(exc, reader) from exc
        return bool(self._via_reader(lambda reader: reader.contains(key, timeout), timeout))

    def _via_reader(self, read: Callable[[Any], Any], timeout: Optional[float]) -> Any:
        """``read(reader)``, retried while other threads keep replacing the reader."""
        for _attempt in range(8):  # each retry follows a reopen (a failed one raises)
            self._current(False, timeout)
            reader = self.reader
            try:
                return read(reader)
            except RETRY_ERRORS as exc:
                self._retrying(exc)  # another thread closed it meanwhile: its reopen is due or done
                continue
            except DATA_ERRORS as exc:
                raise self._failure(exc, reader) from exc
        raise CacheError(f"the cache in {self.path} could not be reopened; the next call tries again")

    def _retrying(self, exc: BaseException) -> None:
        """A read will be retried after ``exc`` (one of RETRY_ERRORS): reopen first if it asks so."""
        if isinstance(exc, lmdb.MapResizedError):
            self._failure(exc)  # sets REOPEN

    def cache_data(self, timeout: Optional[float] = None) -> Dict[str, Any]:
        """The seed's dump (counters and records, next victim first) from the newest file."""
        self._current(True, timeout)
        return self._via_reader(lambda reader: reader.cache_data(timeout), timeout)  # type: ignore[no-any-return]

    def counters(self, timeout: Optional[float] = None) -> Tuple[int, int, int, int, int]:
        """(record count, total bytes, hits, misses, evictions) from the newest file."""
        return self._read(lambda index, txn: index.counters(txn), timeout)  # type: ignore[no-any-return]

    def check(self, timeout: Optional[float] = None) -> List[str]:
        """Every problem the index finds in the newest file (see ``Index.check``), against the bound
        the file stores (not the one this process saw last)."""
        return list(self._read(lambda index, txn: index.check(txn, index.bound(txn) or self.bound), timeout))

    def _read(self, read: Callable[[Any, Any], Any], timeout: Optional[float]) -> Any:
        """``read(index, txn)`` in a py-lmdb read transaction under the shared lock (cold reads)."""
        for attempt in range(_MAP_RETRIES):
            try:
                return self._read_once(read, timeout)
            except lmdb.MapResizedError as exc:  # another process grew the file: reopen, read again
                failure = self._failure(exc)
                if attempt + 1 >= _MAP_RETRIES:
                    raise failure from exc
        raise AssertionError("unreachable")

    def _read_once(self, read: Callable[[Any, Any], Any], timeout: Optional[float]) -> Any:
        self._current(True, timeout)
        lock = self.lock
        try:
            lock.acquire(False, timeout)
            try:
                files = self._files_locked()
                txn = files.env.begin()
                try:
                    return read(files.index, txn)
                finally:
                    txn.abort()
            except lmdb.MapResizedError:
                raise  # (an lmdb.Error: not a failure, _read reopens and retries)
            except DATA_ERRORS as exc:
                raise self._failure(exc) from exc
            finally:
                lock.release()
        except BaseException:
            lock.recover()  # a signal's exception may have escaped with the lock held (locking.py)
            raise

    # -- writes -------------------------------------------------------------------------
    def insert(self, key: bytes, name: bytes, lid_len: int, data: Any, keep: frozenset,
               refs: int = 0, last_ns: int = 0, timeout: Optional[float] = None, compress: bool = True,
               train: bool = True) -> int:
        """Add a record, evicting by the policy to stay within the cache's bound: the number
        evicted, or -1 (and no change) when the name exists. ``compress``: store it zstd-compressed
        when that is smaller (see codec.py; compressed here, before the lock). Raises
        RecordTooLarge for stored bytes above the bound, and CacheFull when only kept records
        could make room; both change nothing. ``train``: this put may be the one that looks at
        the file's dictionary and trains the next (imports say no)."""
        codec = self.reader.codec
        enc, stored = codec.encode(data) if compress else (RAW, data)
        codec.puts += 1
        # (Too large is decided in the transaction, against the bound the file stores then.)
        evicted = self._write(self._insert, key, name, lid_len, data, enc, stored, codec, keep,
                              refs, last_ns, timeout=timeout)
        if compress and train and codec.puts >= REFRESH_EVERY:
            self._dictionary_due(codec, timeout)
        return evicted  # type: ignore[no-any-return]

    def stored_size(self, data: Any) -> int:
        """The bytes ``data`` would take if put compressed now (with the current dictionary)."""
        return len(self.reader.codec.encode(data)[1])

    def _insert(self, files: Files, txn: Any, key: bytes, name: bytes, lid_len: int, data: Any, enc: int,
                stored: Any, codec: Any, keep: frozenset, refs: int, last_ns: int) -> int:
        index = files.index
        if enc > 1 and codec is not files.codec:  # compressed for a file replaced since: its dictionaries
            enc, stored = files.codec.encode(data, 0)  # are not this one's (no dictionary: nothing to load)
        max_bytes = self.bound = index.bound(txn) or self.bound  # the file's bound (none in older files)
        if index.current_dictionary(txn) > codec.current:  # another process trained one: adopt it
            codec.puts = REFRESH_EVERY  # after this commit (insert's _dictionary_due)
        size = len(stored)
        if size > max_bytes:  # first: an existing name does not hide a record that can never fit
            raise RecordTooLarge(f"record of {size} bytes stored ({len(data)} put) exceeds the cache bound "
                                 f"of {max_bytes}")
        if index.exists(txn, key):
            return -1
        # Before the victims are chosen (the buffer changes their order), and only when this insert
        # evicts or the buffer is due: rewriting hundreds of buffered headers on every put that
        # fits would cost more than the put.
        if len(self.buffer) and (self._buffer_due() or index.records(txn)[1] + size > max_bytes):
            self._apply_buffer(files, txn)
        victims = index.victims(txn, size, max_bytes, keep)
        if files.room is not None:
            files.room.reserve_insert(len(victims), size)
        return index.insert(txn, key, name, lid_len, stored, victims, refs, last_ns, enc)  # type: ignore[no-any-return]

    def remove(self, key: bytes, timeout: Optional[float] = None) -> bool:
        """Delete a record; False when there was none."""
        return bool(self._write(self._remove, key, timeout=timeout))

    def _remove(self, files: Files, txn: Any, key: bytes) -> bool:
        self._reserve(files, 0)
        if len(self.buffer) and self._buffer_due():
            self._apply_buffer(files, txn)
        return bool(files.index.remove(txn, key))

    def drop_damaged(self, key: bytes, timeout: Optional[float] = None) -> bool:
        """Remove a record whose bytes fail their checksum; False if it is healthy or gone."""
        return bool(self._write(self._drop_damaged, key, timeout=timeout, native=False))

    def _drop_damaged(self, files: Files, txn: Any, key: bytes) -> bool:
        self._flush(files, txn)
        index = files.index
        data, _born, enc = index.lookup(txn, key)
        if data is False or (enc and files.codec.decode(enc, data, lambda n: index.dictionary(txn, n)) is None):
            return bool(index.remove(txn, key))
        return False

    def drop_all_damaged(self, timeout: Optional[float] = None) -> List[str]:
        """Remove every record whose bytes fail their checksum or do not decode (the repair's first
        step, in one write); the names of those removed."""
        return self._write(self._drop_all_damaged, timeout=timeout, native=False)  # type: ignore[no-any-return]

    def _drop_all_damaged(self, files: Files, txn: Any) -> List[str]:
        self._flush(files, txn)
        index = files.index
        with txn.cursor(index.idx) as cur:
            keys = [(bytes(key), bytes(hdr)) for key, hdr in cur]
        dropped = []
        for key, hdr in keys:
            if self._drop_damaged(files, txn, key):
                dropped.append(hdr[HEADER_SIZE:].decode("ascii", "replace"))
        return dropped

    def rebuild(self, reason: str, timeout: Optional[float] = None) -> None:
        """Empty and recreate the cache now (a repair of damage that dropping records cannot fix)."""
        if self.state:
            self._refresh(timeout)
        try:
            self.lock.acquire(True, timeout)
            try:
                self._rebuild(reason)
                self._suspect = False  # a new file: what verify() found was in the old one
            finally:
                self.lock.release()
        except BaseException:
            self.lock.recover()  # a signal's exception may have escaped with the lock held (locking.py)
            raise

    # -- compression dictionaries ---------------------------------------------------------
    def _dictionary_due(self, codec: Any, timeout: Optional[float]) -> None:
        """After ``REFRESH_EVERY`` puts: use the file's newest dictionary, and train the next one
        when the cache has grown enough (codec.due_generation). One process per cache trains
        each generation: it claims it in the file first, whether or not its dictionary is then
        good enough to keep. Never fails the put that called it."""
        codec.puts = 0
        try:
            number, count, tries = self._read(lambda index, txn: (
                index.current_dictionary(txn), index.records(txn)[0], index.trainings(txn)), timeout)
            codec.adopt(number)
            if due_generation(count, tries) and self._write(self._claim_training, tries, timeout=timeout,
                                                            native=False):
                self.train_dictionary(None, timeout, claimed=True)
        except CacheError as exc:
            log.debug("dictionary check of %s skipped: %s", self.path, exc)
        except Exception as exc:  # e.g. MemoryError while training: the put itself succeeded
            log.warning("training a compression dictionary for %s failed: %r", self.path, exc)

    def _claim_training(self, files: Files, txn: Any, seen: int) -> bool:
        self._reserve(files, 1)
        return bool(files.index.claim_training(txn, seen))

    def train_dictionary(self, samples: Optional[List[bytes]] = None, timeout: Optional[float] = None,
                         claimed: bool = False) -> int:
        """Train a dictionary on ``samples`` (default: a random sample of the cache's records) and make
        it the one new records use; returns its number, or 0 when it would not save enough bytes
        (see codec.train) or another process stored a newer one meanwhile. ``claimed``: the
        caller claimed this training already (else a stored dictionary counts as one)."""
        reader = self.reader
        codec = reader.codec
        number = self._read(lambda index, txn: index.current_dictionary(txn), timeout)
        codec.adopt(number)
        if samples is None:
            stored = self._read(lambda index, txn: index.sample(txn, os.urandom(16), SAMPLES), timeout)
            samples = [data for data in (_decoded(reader, d, e) if e else d for d, e in stored)
                       if type(data) is bytes]
        body = train(samples, codec.body(codec.current))  # outside every lock: it takes a while
        if body is None:
            return 0
        return self._add_dictionary_now(codec, body, number, timeout, claim=not claimed)

    def add_dictionary(self, body: bytes, timeout: Optional[float] = None) -> int:
        """Store a dictionary trained elsewhere (codec.train) as the current one; its number, or 0
        when another process stored one meanwhile."""
        codec = self.reader.codec
        number = self._read(lambda index, txn: index.current_dictionary(txn), timeout)
        return self._add_dictionary_now(codec, body, number, timeout, claim=True)

    def _add_dictionary_now(self, codec: Any, body: bytes, base: int, timeout: Optional[float],
                            claim: bool) -> int:
        """``claim``: count it as a training (one the caller did not claim): the automatic ones
        then go on from the next generation."""
        added = self._write(self._add_dictionary, body, codec, base, claim, timeout=timeout, native=False)
        if added:
            codec.learn(added, body)
        return int(added)

    def _add_dictionary(self, files: Files, txn: Any, body: bytes, codec: Any, base: int, claim: bool) -> int:
        index = files.index
        if files.codec is not codec or index.current_dictionary(txn) != base:
            return 0  # another file now, or another process trained one since: keep theirs
        self._reserve(files, len(body) // 4096 + 4)
        if claim:
            index.claim_training(txn, index.trainings(txn))
        return int(index.add_dictionary(txn, body))

    def add_counters(self, hits: int, misses: int, timeout: Optional[float] = None) -> None:
        """Add to the hit and miss counters (imports)."""
        self._write(self._add_counters, hits, misses, timeout=timeout)

    def _add_counters(self, files: Files, txn: Any, hits: int, misses: int) -> None:
        self._flush(files, txn)
        files.index.apply(txn, {}, hits, misses)

    def add_tally(self, name: bytes, values: Sequence[int], timeout: Optional[float] = None) -> None:
        """Add to the counters of tally ``name`` (fallback.TALLIES: get_or_create's, the remote tier's)."""
        self._write(self._add_tally, name, values, timeout=timeout, native=False)

    def _add_tally(self, files: Files, txn: Any, name: bytes, values: Sequence[int]) -> None:
        self._reserve(files, 1)
        files.index.add_tally(txn, name, values)

    def tally(self, name: bytes, timeout: Optional[float] = None) -> Tuple[int, ...]:
        """The counters of tally ``name``."""
        return self._read(lambda index, txn: index.tally(txn, name), timeout)  # type: ignore[no-any-return]

    @property
    def recorded_bound(self) -> int:
        """The bound the file recorded when this process opened it (0: none, an older release's)."""
        files = self.files
        return files.bound if files is not None else 0

    def set_bound(self, max_bytes: int, timeout: Optional[float] = None,
                  unless_recorded: bool = False) -> Tuple[int, int]:
        """Record ``max_bytes`` as the cache's bound and evict down to it at once, so that one bound
        holds from now on for every process: (the bound it replaced, 0 if none; records evicted).
        Kept records are evicted too: the bound is the cache's, ``keep`` only a put's.
        ``unless_recorded``: only if the file has none yet (decided in the transaction)."""
        return self._write(self._set_bound, max_bytes, unless_recorded,  # type: ignore[no-any-return]
                           timeout=timeout, native=False)

    def _set_bound(self, files: Files, txn: Any, max_bytes: int, unless_recorded: bool) -> Tuple[int, int]:
        index = files.index
        old = index.bound(txn)
        if old and unless_recorded:
            self.bound = old
            return old, 0
        if old != max_bytes:
            self._flush(files, txn)  # the buffered references order the victims
            victims = index.victims(txn, 0, max_bytes, frozenset())
            self._reserve(files, (len(victims) + 1) * PAGES_PER_KEY)
            index.evict(txn, victims)
            index.set_bound(txn, max_bytes)
            write_version(self.lock.dir, max_bytes, files.policy)  # its copy for rebuilds (we hold the exclusive lock)
            self.bound = files.bound = max_bytes
            return old, len(victims)
        self.bound = max_bytes
        return old, 0

    def clear(self, timeout: Optional[float] = None) -> None:
        """Remove every record (counters stay)."""
        self._write(self._clear, timeout=timeout, native=False)

    def _clear(self, files: Files, txn: Any) -> None:
        self._flush(files, txn)
        files.index.clear(txn)

    def flush(self, timeout: Optional[float] = None) -> None:
        """Write this process's buffered accesses now."""
        if len(self.buffer):
            self._write(self._flush, timeout=timeout)

    def _flush(self, files: Files, txn: Any) -> None:
        self._reserve(files, 0)
        if len(self.buffer):
            self._apply_buffer(files, txn)

    def apply_due(self) -> None:
        """Write the buffer if the lock is free right now; else keep it for later.

        Called after a read whose buffer came due: the read has succeeded, and
        bookkeeping must never turn it into an error or a wait behind another
        process (a failed write keeps the buffer).
        """
        now = time.monotonic_ns()
        if now < self._apply_retry_at:  # the lock was busy a moment ago: not at every get
            return
        try:
            self._write(self._flush, timeout=0)
        except CacheError as exc:
            self._apply_retry_at = now + APPLY_RETRY_NS
            log.debug("buffered accesses for %s kept for later: %s", self.path, exc)

    def merge_history(self, entries: List[Tuple[bytes, int, int]], hits: int, misses: int,
                      timeout: Optional[float] = None) -> Tuple[int, int, int]:
        """Merge another cache's history by maximum (imports): each present record of ``entries``
        (key, refs, last_ns) keeps the larger reference count and the later last reference, and the
        hit and miss counters each become the larger of theirs and ``hits`` / ``misses``. Returns
        (records raised, hits added, misses added); merging the same history again changes nothing."""
        return self._write(self._merge_history, entries, hits, misses, timeout=timeout,  # type: ignore[no-any-return]
                           native=False)

    def _merge_history(self, files: Files, txn: Any, entries: List[Tuple[bytes, int, int]], hits: int,
                       misses: int) -> Tuple[int, int, int]:
        self._flush(files, txn)  # this process's own counts are part of the cache's side
        index = files.index
        raise_by: Dict[bytes, List[int]] = {}
        for key, refs, last_ns in entries:
            have = index.history(txn, key)
            if have is not None and (refs > have[0] or last_ns > have[1]):
                # apply adds n references and keeps the later of the two times: the maximum of both
                raise_by[key] = [max(refs - have[0], 0), last_ns, have[2]]
        _count, _total, have_hits, have_misses, _evictions = index.counters(txn)
        more_hits, more_misses = max(hits - have_hits, 0), max(misses - have_misses, 0)
        if raise_by or more_hits or more_misses:
            self._reserve(files, len(raise_by) * PAGES_PER_KEY)
            index.apply(txn, raise_by, more_hits, more_misses)
        return len(raise_by), more_hits, more_misses

    def _apply_buffer(self, files: Files, txn: Any) -> None:
        """Inside a write: apply the buffered accesses (restored by _write if the write fails)."""
        buffer = self.buffer
        self._taken = taken = buffer.take()
        pending, hits, misses, _first_ns, _first_txn = taken
        if pending or hits or misses:
            self._reserve(files, len(pending) * PAGES_PER_KEY)
            files.index.apply(txn, pending, hits, misses)
            # follows the cache's size and its readers
            buffer.max_writes = writes_due(files.index.records(txn)[0], files.table.attached())

    def _buffer_due(self) -> bool:
        """The buffer's time has come (a process that only writes must still apply it every second)."""
        buf = self.buffer
        return bool(buf.due or (buf.first_ns and time.time_ns() - buf.first_ns >= buf.max_age_ns))

    @staticmethod
    def _reserve(files: Files, pages: int) -> None:
        if files.room is not None:
            files.room.reserve(pages)

    def _write(self, op: _Op, *args: Any, timeout: Optional[float] = None, native: bool = True) -> Any:
        """``op(files, txn, *args)`` in one write transaction under the exclusive lock: every write.

        ``native``: the core's own write transaction (the compiled core's C
        path) rather than py-lmdb's (for the cold writes the C path does not
        do). Readers without the flock are waited out before any page changes.
        If the transaction meets a damaged file, the file is rebuilt (we hold
        the exclusive lock) and the operation retried once on the new one: a
        put then stores its record instead of failing on every later try.
        (Every put runs this: kept in one piece, its steps inline.)
        """
        if self.state:
            self._refresh(timeout)
        if not self.repair:  # opened by LayerCache(..., repair=False): no writer, and none wanted
            raise CacheError(f"the cache in {self.path} was opened with repair=False, which only reads")
        lock = self.lock
        wait = lock.timeout if timeout is None else timeout
        now = time.monotonic()
        deadline = now + wait
        try:
            lock.acquire(True, timeout)
            try:
                self._look_at_directory(now)
                attempt = remapped = 0
                while True:
                    attempt += 1
                    self._taken = None
                    try:
                        if self.state or self._replaced():
                            self._reopen_locked(timeout)
                        files = self._files_locked()
                        # What is left of the caller's timeout (0 stays 0: bookkeeping never waits).
                        files.table.enter_write(max(deadline - time.monotonic(), 0.0) if wait > 0 else 0.0)
                        try:
                            if files.room is not None:
                                files.room.begin()
                            txn = None
                            try:
                                txn = files.writer.begin() if native else files.env.begin(write=True)
                                self._txn = txn  # for recover()
                                result = op(files, txn, *args)
                            except BaseException:
                                self._txn = None
                                if txn is not None:
                                    txn.abort()
                                elif native:  # a signal as begin() returned: the compiled writer holds
                                    files.writer.abort()  # its own (a py-lmdb one aborts when freed)
                                raise
                            self._txn = None
                            txn.commit()
                        finally:
                            files.table.leave_write()
                    except RecordTooLarge:  # (a ValueError too, but the caller's record, not damage)
                        self._untake()
                        raise
                    except (lmdb.MapFullError, lmdb.MapResizedError) as exc:  # nothing was written
                        self._untake()
                        remapped += 1
                        failure = self._failure(exc)  # a grown file (MapResizedError) sets REOPEN
                        if remapped > _MAP_RETRIES:
                            raise failure from exc
                        try:
                            if isinstance(exc, lmdb.MapFullError):
                                self._grow_map(timeout)
                            else:
                                self._reopen_locked(timeout)
                        except OSError as err:
                            raise CacheError(f"cache operation failed in {self.path}: {err}") from err
                        continue
                    except DATA_ERRORS as exc:
                        self._untake()
                        failure = self._failure(exc)
                        if attempt >= 2 or self.state != REBUILD:
                            raise failure from exc
                        continue
                    except NoRoom as exc:  # nothing was written: retry with pwrite (once: it is off now)
                        self._untake()
                        try:
                            self._stop_writemap(str(exc), timeout)
                        except OSError as err:
                            raise CacheError(f"cache operation failed in {self.path}: {err}") from err
                        continue
                    except OSError as exc:  # a file vanished under a reopen, or a shortage
                        self._untake()
                        raise CacheError(f"cache operation failed in {self.path}: {exc}") from exc
                    except BaseException:
                        self._untake()
                        raise
                    if self.force_sync:  # committed: a failed fsync must not re-apply the buffer
                        try:
                            files.env.sync(True)
                        except lmdb.Error as exc:
                            raise self._failure(exc) from exc
                    return result
            finally:
                lock.release()
        except BaseException:
            lock.recover()  # a signal's exception may have escaped with the lock held (locking.py)
            raise

    def _untake(self) -> None:
        taken, self._taken = self._taken, None
        if taken is not None:  # what a failed transaction did not write goes back to the buffer
            self.buffer.restore(taken)

    def suspect(self) -> None:
        """verify() found problems: never mark this file as closed cleanly.

        The next process to open the cache alone then walks it in the deep
        check, which rebuilds it (a live cache is not emptied under others).
        """
        self._suspect = True

