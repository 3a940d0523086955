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
    apply to it only. ``due`` turns true once the oldest unapplied access is
    ``max_age_ns`` old or ``max_keys`` records are pending: the front then
    applies the buffer, so it is written at least once a second while the
    process is active.
    """

    __slots__ = ("pending", "hits", "misses", "first_ns", "due", "max_age_ns", "max_keys")

    def __init__(self, max_age_ns: int, max_keys: int) -> None:
        self.max_age_ns = max_age_ns
        self.max_keys = max_keys
        self.pending: Dict[bytes, List[int]] = {}
        self.hits = 0
        self.misses = 0
        self.first_ns = 0
        self.due = False

    def hit(self, key: bytes, now_ns: int, born_ns: int) -> None:
        """One reference to the record of ``key`` born at ``born_ns`` (another record restarts the entry)."""
        entry = self.pending.get(key)
        if entry is None or entry[2] != born_ns:
            self.pending[key] = [1, now_ns, born_ns]
        else:
            entry[0] += 1
            if now_ns > entry[1]:
                entry[1] = now_ns
        self.hits += 1
        self._aged(now_ns)

    def miss(self, now_ns: int) -> None:
        self.misses += 1
        self._aged(now_ns)

    def count(self, key: bytes, data: Any, born_ns: int) -> bool:
        """Count what a lookup of ``key`` returned (a hit when ``data`` is bytes, else a miss);
        returns ``due`` (whether the buffer should now be applied)."""
        if type(data) is bytes:
            self.hit(key, time.time_ns(), born_ns)
        else:
            self.miss(time.time_ns())
        return self.due

    def _aged(self, now_ns: int) -> None:
        if not self.first_ns:
            self.first_ns = now_ns
        elif now_ns - self.first_ns >= self.max_age_ns or len(self.pending) >= self.max_keys:
            self.due = True

    def take(self) -> Tuple[Dict[bytes, List[int]], int, int, int]:
        """Empty the buffer and return what it held (to apply, or to restore on failure)."""
        out = (self.pending, self.hits, self.misses, self.first_ns)
        self.pending = {}
        self.hits = self.misses = self.first_ns = 0
        self.due = False
        return out

    def restore(self, taken: Tuple[Dict[bytes, List[int]], int, int, int]) -> None:
        """Merge back what :meth:`take` returned, after a failed apply.

        Entries of the same record (equal born_ns) merge; of different
        records, the newer record's entry (larger born_ns) stays.
        """
        pending, hits, misses, first_ns = taken
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

    def clear(self) -> None:
        self.take()

    def __len__(self) -> int:
        """Pending keys, plus one when only counters are pending (so ``bool`` means "non-empty")."""
        return len(self.pending) or (1 if self.hits or self.misses else 0)
