"""The access buffer, in pure Python: fallback.py's (the specification of ``_index.pyx``'s).

Reads change a record's reference count and last reference and the hit and
miss counters, but a read takes no write lock: the changes wait here, per
process, until the store applies them in a write (``Index.apply``).
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Tuple


class AccessBuffer:
    """Hits and misses seen by this process and not yet written to the index.

    ``pending`` maps a record key to ``[references, last_ns, born_ns]``: the
    references were counted against the record born at ``born_ns`` and
    apply to it only. ``due`` turns true, at an access, once the oldest
    unapplied access is ``max_age_ns`` old, or ``max_keys`` records are
    pending, or the file has committed ``max_writes`` write transactions
    since the read of the oldest one (``txn - first_txn``: the ids of the
    snapshots the two reads used): the front then applies the buffer. So it
    is written at least once a second while the process is active, and
    before other processes' puts have turned much of the cache over (their
    victims are chosen without the references waiting here; the store sets
    ``max_writes`` from the record count, see ``Store._apply_buffer``).

    ``reader``: the Reader whose reads :meth:`count` counts; its
    ``last_txn`` is the snapshot of the read just counted (None: 0, never
    due by writes). :meth:`hit` and :meth:`miss` are handed the id.
    """

    __slots__ = ("pending", "hits", "misses", "first_ns", "first_txn", "due", "max_age_ns", "max_keys",
                 "max_writes", "reader")

    def __init__(self, max_age_ns: int, max_keys: int, max_writes: int = 1 << 62) -> None:
        self.max_age_ns = max_age_ns
        self.max_keys = max_keys
        self.max_writes = max_writes
        self.reader: Any = None
        self.pending: Dict[bytes, List[int]] = {}
        self.hits = 0
        self.misses = 0
        self.first_ns = 0
        self.first_txn = 0
        self.due = False

    def hit(self, key: bytes, now_ns: int, born_ns: int, txn: int = 0) -> None:
        """One reference to the record of ``key`` born at ``born_ns``, read in the snapshot of
        write transaction ``txn`` (another record restarts the entry)."""
        entry = self.pending.get(key)
        if entry is None or entry[2] != born_ns:
            self.pending[key] = [1, now_ns, born_ns]
        else:
            entry[0] += 1
            if now_ns > entry[1]:
                entry[1] = now_ns
        self.hits += 1
        self._aged(now_ns, txn)

    def miss(self, now_ns: int, txn: int = 0) -> None:
        self.misses += 1
        self._aged(now_ns, txn)

    def count(self, key: bytes, data: Any, born_ns: int) -> bool:
        """Count what a lookup of ``key`` returned (a hit when ``data`` is bytes, else a miss),
        read by ``reader`` in the snapshot of its ``last_txn``; returns ``due`` (whether the
        buffer should now be applied)."""
        reader = self.reader
        txn = 0 if reader is None else reader.last_txn
        if type(data) is bytes:
            self.hit(key, time.time_ns(), born_ns, txn)
        else:
            self.miss(time.time_ns(), txn)
        return self.due

    def _aged(self, now_ns: int, txn: int) -> None:
        if not self.first_ns:
            self.first_ns = now_ns
            self.first_txn = txn
            return
        if not self.first_txn:  # 0: no snapshot id was known at the first access (a reopened reader)
            self.first_txn = txn
        if (now_ns - self.first_ns >= self.max_age_ns or len(self.pending) >= self.max_keys
                or (self.first_txn and txn - self.first_txn >= self.max_writes)):
            self.due = True

    def take(self) -> Tuple[Dict[bytes, List[int]], int, int, int, int]:
        """Empty the buffer and return what it held (to apply, or to restore on failure):
        (pending, hits, misses, first_ns, first_txn)."""
        out = (self.pending, self.hits, self.misses, self.first_ns, self.first_txn)
        self.pending = {}
        self.hits = self.misses = self.first_ns = self.first_txn = 0
        self.due = False
        return out

    def restore(self, taken: Tuple[Dict[bytes, List[int]], int, int, int, int]) -> None:
        """Merge back what :meth:`take` returned, after a failed apply.

        Entries of the same record (equal born_ns) merge; of different
        records, the newer record's entry (larger born_ns) stays. The older
        of the two first accesses stays first (its time and snapshot).
        """
        pending, hits, misses, first_ns, first_txn = taken
        for key, (refs, last, born) in pending.items():
            entry = self.pending.get(key)
            if entry is None or born > entry[2]:
                self.pending[key] = [refs, last, born]
            elif born == entry[2]:
                entry[0] += refs
                entry[1] = max(entry[1], last)
        self.hits += hits
        self.misses += misses
        if first_ns and (not self.first_ns or first_ns < self.first_ns):
            self.first_ns = first_ns
            self.first_txn = first_txn

    def clear(self) -> None:
        self.take()

    def __len__(self) -> int:
        """Pending keys, plus one when only counters are pending (so ``bool`` means "non-empty")."""
        return len(self.pending) or (1 if self.hits or self.misses else 0)
