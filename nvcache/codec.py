"""How records are stored: zstd-compressed, with the cache's own dictionary once it has one.

A put compresses before it takes the write lock and a get decompresses after
its read let go of the lock (the readers-table slot or the flock), so the
lock covers LMDB's work only; both cores share this module. A record is
stored raw when compression does not make it smaller, and always raw from a
cache opened with ``compress=False`` (for callers who compress themselves).
The record's first chunk says how it was stored (its size word, see
fallback.py): 0 raw; n >= 1 a zstd frame made with dictionary n - 1 of the
same file (0: no dictionary). Sizes, the bound, eviction and the dump all
count stored bytes, as the seed scanner counts its gzip files.

Frames are standard zstd frames that carry their content size (for one-shot
decompression) but neither a checksum nor a dictionary id: the record's xxh3
checksum covers the stored bytes, and the encoding names the dictionary.
(Magicless frames would save 4 bytes a record, but zstandard makes them only
with parameters fixed in advance, not tuned to each record's size, which
cost more than the 4 bytes: DEVELOPERS.md, "Compression".)

Dictionaries are trained from a random sample of the cache's own records
(:func:`train`), stored in the file's ``meta`` table and never changed, so
records made with an older one stay readable. A :class:`Codec` belongs to
one open file, because dictionary numbers are that file's: the store
decodes a record with the codec of the reader that read it. A process
learns a newer dictionary when a record it reads names one, or when it
looks at the current number (every ``REFRESH_EVERY`` puts).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, cast

import zstandard

# Chosen by measurement on scanner-shaped records (DEVELOPERS.md, "Compression"): with a 64 KiB
# dictionary, level 6 for records of LARGE bytes or more and level 3 below store 0.91 of the seed's
# gzip -6 bytes in 0.6 of its compression time, and a small record's put compresses in half the
# time level 6 takes; without a dictionary no level up to 6 reaches gzip's bytes, so the first
# dictionary is trained early.
LEVEL = 6
SMALL_LEVEL = 3
LARGE = 16 * 1024
DICT_SIZE = 64 * 1024
TRAIN_AT = 200  # records in the cache before the first dictionary is trained
TRAIN_GROWTH = 4  # dictionary g is trained at TRAIN_AT * TRAIN_GROWTH ** (g - 1) records
MAX_DICTIONARIES = 8  # trainings per file, so at most this many dictionaries (DICT_SIZE each)
SAMPLES = 1000  # records sampled to train one
SAMPLE_BYTES = 32 * 1024  # of each sample (a dictionary learns from the front of records)
SAMPLES_TOTAL = 8 << 20  # at most this many bytes of samples: training time grows with them
MIN_GAIN = 0.02  # a new dictionary must save 2 % of the held-out samples' bytes to be used
REFRESH_EVERY = 256  # puts between two looks at the file's current dictionary

RAW = 0


def _compressor(dictionary: Optional[zstandard.ZstdCompressionDict], level: int = LEVEL) -> zstandard.ZstdCompressor:
    return zstandard.ZstdCompressor(level=level, dict_data=dictionary, write_checksum=False,
                                    write_content_size=True, write_dict_id=False)


def level_of(data: Any) -> int:
    return LEVEL if len(data) >= LARGE else SMALL_LEVEL


def _decompressor(dictionary: Optional[zstandard.ZstdCompressionDict]) -> zstandard.ZstdDecompressor:
    return zstandard.ZstdDecompressor(dict_data=dictionary)


class Codec:
    """The encoder and decoder of one open file's records.

    ``load(n)`` returns dictionary ``n`` of the file (None when it is absent
    or damaged); it is called outside any lock the caller holds. zstd
    contexts are not safe to share between threads, so each thread gets its
    own compressor and decompressor per dictionary.
    """

    def __init__(self, load: Callable[[int], Optional[bytes]]) -> None:
        self._load = load
        self._dicts: Dict[int, Optional[zstandard.ZstdCompressionDict]] = {0: None}
        self._local = threading.local()
        self.current = 0  # the dictionary new records are made with
        self.puts = 0  # puts since the store last looked at the file's current dictionary

    # -- dictionaries --------------------------------------------------------------------
    def _dictionary(self, number: int) -> Optional[zstandard.ZstdCompressionDict]:
        """Dictionary ``number`` (0: none); KeyError when the file does not have it."""
        try:
            return self._dicts[number]
        except KeyError:
            pass
        body = self._load(number)
        if body is None:
            raise KeyError(number)
        found = self._dicts.setdefault(number, zstandard.ZstdCompressionDict(body))
        return found

    def learn(self, number: int, body: Optional[bytes]) -> None:
        """Dictionary ``number`` read by the caller (None: the file lacks it); newest becomes current."""
        if number and body is not None:
            self._dicts.setdefault(number, zstandard.ZstdCompressionDict(body))
            if number > self.current:
                self.current = number

    def body(self, number: int) -> Optional[bytes]:
        """The bytes of a dictionary this codec holds (None: none or not loaded)."""
        found = self._dicts.get(number)
        return found.as_bytes() if found is not None else None

    def adopt(self, number: int) -> bool:
        """Make dictionary ``number`` the one new records use, if it is newer and readable."""
        if number <= self.current:
            return False
        try:
            self._dictionary(number)
        except KeyError:
            return False
        self.current = number
        return True

    # -- records ---------------------------------------------------------------------------
    def _contexts(self) -> Tuple[Dict[int, Any], Dict[int, Any]]:
        local = self._local
        try:
            return local.compressors, local.decompressors  # type: ignore[no-any-return]
        except AttributeError:
            local.compressors, local.decompressors = {}, {}
            return local.compressors, local.decompressors

    def encode(self, data: Any, number: Optional[int] = None) -> Tuple[int, Any]:
        """(encoding, stored bytes) of ``data``: compressed with dictionary ``number`` (default
        the current one) when that makes it smaller, else (RAW, data)."""
        if number is None:
            number = self.current
        compressors = self._contexts()[0]
        slot = number * 2 + (len(data) >= LARGE)  # by dictionary and level
        comp = compressors.get(slot)
        if comp is None:
            comp = compressors[slot] = _compressor(self._dictionary(number), level_of(data))
        try:
            out = comp.compress(data)
        except zstandard.ZstdError:  # never fails a put: a record zstd cannot take is stored raw
            return RAW, data
        if len(out) >= len(data):
            return RAW, data
        return number + 1, out

    def decode(self, enc: int, stored: bytes,
               load: Optional[Callable[[int], Optional[bytes]]] = None) -> Optional[bytes]:
        """The record's bytes; None when they cannot be decoded (a missing or damaged dictionary,
        a frame zstd rejects): the caller treats that as a damaged record. ``load``: how to read
        a dictionary not loaded yet, for a caller inside a transaction (default: the codec's)."""
        try:  # every compressed hit: this thread's decompressor for this encoding (compressors go by
            # dictionary number and level), found or made
            dec = self._local.decompressors[enc]
        except (AttributeError, KeyError):
            dec = self._new_decompressor(enc, load)
            if dec is None:
                return None
        try:
            return dec.decompress(stored)  # type: ignore[no-any-return]
        except zstandard.ZstdError:
            return None

    def _new_decompressor(self, enc: int, load: Optional[Callable[[int], Optional[bytes]]]) -> Any:
        number = enc - 1
        if load is not None and number not in self._dicts:
            body = load(number)
            if body is None:
                return None
            self.learn(number, body)
        try:
            dec = _decompressor(self._dictionary(number))
        except KeyError:
            return None
        self._contexts()[1][enc] = dec
        if number > self.current:  # made with a dictionary newer than ours: use it too
            self.adopt(number)
        return dec


def due_generation(records: int, trainings: int) -> bool:
    """Whether a cache of ``records`` records that trained ``trainings`` times should train again."""
    return trainings < MAX_DICTIONARIES and records >= TRAIN_AT * TRAIN_GROWTH ** trainings


def check_dictionary(body: bytes) -> None:
    """Raise ValueError unless zstd compresses and decompresses with ``body`` as a dictionary."""
    probe = b'{"modules":{"Pkgs":{},"Apps":{}},"files":["/usr/lib/probe"]}' * 4
    try:
        d = zstandard.ZstdCompressionDict(body)
        if _decompressor(d).decompress(_compressor(d, SMALL_LEVEL).compress(probe)) != probe:
            raise ValueError("a dictionary that does not round-trip")
    except zstandard.ZstdError as exc:
        raise ValueError(f"not a usable zstd dictionary: {exc}") from None


def train(samples: Sequence[bytes], current: Optional[bytes] = None) -> Optional[bytes]:
    """A dictionary trained on ``samples`` (decoded records), or None when it would not help.

    Each sample counts with its first ``SAMPLE_BYTES`` and all with at most
    ``SAMPLES_TOTAL``, which bounds the time training takes. One sample in
    five is held out: the new dictionary is kept only if it stores those in
    at least ``MIN_GAIN`` fewer bytes than the ``current`` dictionary (or
    none) does.
    """
    capped: List[bytes] = []
    total = 0
    for sample in samples:
        if total >= SAMPLES_TOTAL:
            break
        capped.append(sample[:SAMPLE_BYTES])
        total += len(capped[-1])
    held = [s for i, s in enumerate(capped) if i % 5 == 4]
    used = [s for i, s in enumerate(capped) if i % 5 != 4]
    if len(used) < 16 or not held:
        return None
    try:
        trained = zstandard.train_dictionary(DICT_SIZE, cast(List[Any], used), level=LEVEL)
    except zstandard.ZstdError:  # too few or too uniform samples
        return None
    body = trained.as_bytes()
    try:
        check_dictionary(body)
    except ValueError:
        return None
    before = sum(stored_sizes(held, current))
    after = sum(stored_sizes(held, body))
    return body if after <= before * (1 - MIN_GAIN) else None


def stored_sizes(records: Iterable[bytes], dictionary: Optional[bytes] = None) -> List[int]:
    """What each record would take in a cache (its stored size) with ``dictionary`` (or none)."""
    d = zstandard.ZstdCompressionDict(dictionary) if dictionary else None
    comps = (_compressor(d, SMALL_LEVEL), _compressor(d, LEVEL))
    return [min(len(comps[len(r) >= LARGE].compress(r)), len(r)) for r in records]
