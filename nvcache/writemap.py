"""The write map: LMDB commits as memory stores, and the disk room they need reserved first.

With LMDB's write map a commit is memory stores into the shared mapping instead of one
pwrite per dirty page (a put-evict at 10k records: 42 -> 20 us). LMDB then extends
data.mdb to the whole map as a sparse file, and a store into a hole gets its disk block at
that moment: on a full disk that is SIGBUS, which would kill the scanner. So before a write
transaction changes anything the store fallocates what it can use (:class:`Reservation`),
and a full disk becomes ENOSPC there, a CacheError before anything changed. Only on
filesystems where an fallocated block stays writable without new space (not copy-on-write
ones). The map's size, and how it grows with the file, is here too.
"""

from __future__ import annotations

import ctypes
import os
import struct
from typing import Callable

# The map grows with the file: it starts at FIRST_MAP (or the limit, if smaller), doubles
# when a write finds it full, and stops doubling at map_limit(bound). Under the write map
# LMDB makes data.mdb as long as the map, so `ls -l` and copy tools that do not keep holes
# see at most twice what the cache has needed, and no more than the limit, 2 x the bound +
# 64 MiB, unless the map fills there (churn never made it: DEVELOPERS.md has the figures);
# then it grows by a quarter at a time, logged, so that a put never fails for want of it.
FIRST_MAP = 8 << 20
MAP_MARGIN = 64 << 20
_MAP_STEP = 1 << 20  # map sizes are whole MiB


def _whole_mib(size: int) -> int:
    return -(-size // _MAP_STEP) * _MAP_STEP


def map_limit(bound: int) -> int:
    """The size data.mdb stays within for a cache bounded to ``bound`` stored bytes."""
    return _whole_mib(2 * bound + MAP_MARGIN)


def first_map_size(bound: int) -> int:
    """The map a new cache starts with."""
    return min(FIRST_MAP, map_limit(bound))


def grown_map_size(current: int, bound: int) -> int:
    """The map after a write found ``current`` full: doubled up to the limit, then a quarter more."""
    limit = map_limit(bound)
    if current < limit:
        return min(_whole_mib(2 * current), limit)
    return _whole_mib(current + max(current // 4, MAP_MARGIN))


PAGE_SIZE = 4096  # LMDB's page size on x86-64 and aarch64 Linux with 4 KiB pages
_SAFE_FILESYSTEMS = {0xEF53: "ext2/3/4", 0x58465342: "xfs", 0x01021994: "tmpfs"}
# Pages one key can dirty: its leaf-to-root path in idx, dat and lru (trees deeper than 5
# levels need billions of records) and in the ghost table (3 levels at most), plus free-list
# records. Pessimistic on purpose.
PAGES_PER_KEY = 20
_RESERVE_SLACK = 64 * PAGE_SIZE  # meta, main and free-list pages of any transaction
# fallocate in steps (most writes then find their room reserved): an eighth of the file, at
# least 256 KiB (a small cache stays small on disk), at most 8 MiB.
_RESERVE_STEP_MIN, _RESERVE_STEP_MAX = 256 << 10, 8 << 20


class NoRoom(Exception):
    """The disk cannot give a write-map transaction the room it may need (see Reservation)."""


def filesystem_type(path: str) -> int:
    """statfs(2)'s f_type for ``path``, or 0 when it cannot be asked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(512)  # struct statfs: f_type is the first word
        if libc.statfs(os.fsencode(path), buf) != 0:
            return 0
        return int(struct.unpack_from("=q" if ctypes.sizeof(ctypes.c_long) == 8 else "=i", buf.raw)[0]) & 0xFFFFFFFF
    except (OSError, AttributeError, ValueError):
        return 0


def writemap_wanted(path: str) -> bool:
    """Whether this process writes through LMDB's write map (see :class:`Reservation`).

    Off when ``NVCACHE_WRITEMAP=0`` and on filesystems not known to keep
    fallocated blocks writable. (LMDB truncates data.mdb to the opener's
    map size: every environment is therefore opened with a map at least as
    long as the file, see ``opening.environment``, and grown only under the
    exclusive lock, so no process's reserved pages become holes again.)
    """
    if os.environ.get("NVCACHE_WRITEMAP", "1").strip() == "0":
        return False
    if not hasattr(os, "posix_fallocate"):
        return False
    return filesystem_type(path) in _SAFE_FILESYSTEMS


class Reservation:
    """Disk blocks reserved in one open data.mdb ahead of its write transactions.

    ``fd`` is data.mdb opened for writing; ``last_page()`` returns LMDB's
    last used page as of the last commit. Call :meth:`begin` before each
    write transaction, then :meth:`reserve` before it changes anything.
    """

    def __init__(self, fd: int, map_size: int, last_page: Callable[[], int]) -> None:
        self._fd = fd
        self.map_size = map_size
        self._last_page = last_page
        self._allocated = 0  # data.mdb has disk blocks below this offset
        # What the current transaction reserved so far: tree pages, bytes of data, and
        # data.mdb's used bytes when it began (-1: not read yet).
        self._pages = self._data = 0
        self._used = -1

    def begin(self) -> None:
        """A new write transaction: the file's used size is read again at its first reserve."""
        self._used = -1

    def reserve(self, pages: int, data: int = 0) -> None:
        """Give data.mdb disk blocks for what the current write transaction may add.

        ``pages``: tree pages it may dirty (a pessimistic count); ``data``:
        record bytes it writes. LMDB writes new pages after its last used one,
        one per dirty page at most (and a transaction cannot dirty more than
        every page of the trees), so blocks up to ``used + min(pages, 2 * used)
        + data`` suffice. Only growth is ever needed: no process deallocates
        (no environment is opened shorter than the file), and a rebuilt or
        grown file gets a new Reservation.

        Raises NoRoom when the disk cannot give that: the caller then commits
        with pwrite instead, which reuses LMDB's free pages and meets a full
        disk as ENOSPC.
        """
        used = self._used
        if used < 0:  # once per transaction: the last commit's size, which only this one changes now
            used = self._used = (self._last_page() + 1) * PAGE_SIZE
            self._pages = self._data = 0
        self._pages += pages
        self._data += data
        need = min(used + min(self._pages * PAGE_SIZE, 2 * used) + self._data
                   + (used >> 8) + _RESERVE_SLACK, self.map_size)  # used >> 8: free-list records
        if need <= self._allocated:
            return
        step = min(max(used >> 3, _RESERVE_STEP_MIN), _RESERVE_STEP_MAX)
        for target in (min(need + step, self.map_size), need):  # the step is a convenience
            try:
                os.posix_fallocate(self._fd, 0, target)
            except OSError as exc:
                failure = exc
                continue
            self._allocated = target
            return
        raise NoRoom(failure.strerror)

    def reserve_insert(self, victims: int, size: int) -> None:
        """An insert chose its victims and is about to write a record of ``size`` bytes."""
        self.reserve((victims + 1) * PAGES_PER_KEY, size + (size >> 9))
