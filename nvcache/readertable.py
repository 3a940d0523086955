"""The readers table: reads of the compiled core without a system call.

A flock pair costs two system calls per read, about as much as the rest of a
compiled get. So a process with the compiled core reads without it when it
can: ``<path>/readers`` is a small file that every process maps, holding a
writer flag and one slot (a cache line) per reading process. A reader sets
its slot, then checks the flag; a writer (holding the exclusive flock) sets
the flag, then waits for every set slot to clear. Each side makes its store
visible before its load (a full fence), so at least one of them sees the
other: either the reader falls back to the shared flock and waits, or the
writer waits for the reader. Slot i is owned through an OFD lock on byte i
of the file (a token: those bytes guard nothing), which the kernel drops
when the owner dies, so a writer can tell a slot left set by a killed
process (and clears it) from a slow reader.

The table belongs to one data.mdb: it is created with it, and data.mdb
records the table's nonce. A table that is missing or foreign when a process
opens the cache makes it rebuild both, so processes that still map an old
table also still map the old data.mdb, which nobody writes any more.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import platform
import stat
import struct
import threading
import time
import weakref
from typing import Dict

from .errors import CacheError, CacheTimeout
from .locking import is_resource_error, open_nofollow


READERS_FILE = "readers"
TABLE_MAGIC = b"nvcache readers\0"
FLAG_OFFSET = 64  # one byte: nonzero while a writer is (about to be) inside a write transaction
SLOTS_OFFSET = 128
SLOT_SIZE = 64  # a cache line each: readers of different processes never share one
SLOTS = 1024
# One byte per slot, set for good by the first process that claims it (claims take the lowest free
# slot), so a writer looks only at slots up to the last claimed one instead of all 1,024 lines.
CLAIMED_OFFSET = SLOTS_OFFSET + SLOTS * SLOT_SIZE
TABLE_SIZE = CLAIMED_OFFSET + SLOTS
NONCE_OFFSET = len(TABLE_MAGIC)

# The writer's fence is a lock-prefixed atomic (CPython's own lock), a full barrier on x86-64
# only; elsewhere no process reads without the flock. OFD locks are Linux's.
FAST_READS_SUPPORTED = (platform.machine().lower() in ("x86_64", "amd64")
                        and hasattr(fcntl, "F_OFD_SETLK") and hasattr(fcntl, "F_OFD_GETLK"))
_FLOCK = struct.Struct("hhxxxxqqixxxx")  # struct flock on Linux x86-64


def _fence() -> None:
    # acquire + release of a CPython lock: lock-prefixed read-modify-writes, each a full
    # barrier on x86-64, so the flag store above is visible before the slot loads below.
    # A fresh lock each time: a shared one that a signal's exception left held between the
    # two calls hung every later writer of the process (found by tests/test_interrupt.py).
    lock = threading.Lock()
    lock.acquire()
    lock.release()


_tables: "weakref.WeakSet[ReaderTable]" = weakref.WeakSet()


class BadTable(CacheError):
    """The readers file is missing or is not a readers table (the cache must be remade)."""


class ReaderTable:
    """One mapped ``readers`` file: the writer flag and the reader slots.

    Opening an existing table raises :class:`BadTable` when the file is
    missing or not a table, and a plain CacheError when the machine is short
    of descriptors or memory: only the first means "rebuild".
    """

    def __init__(self, path: str, create: bool) -> None:
        self.path = os.path.join(path, READERS_FILE)
        self.slot = -1
        self._claim_fd = -1
        self.raised = False  # this process set the writer flag and has not cleared it yet
        self.claimed_upto = 0  # slots up to the last claimed one, as this process's last write saw them
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        try:
            fd = open_nofollow(self.path, flags)
        except CacheError as exc:
            if create or is_resource_error(exc):
                raise
            raise BadTable(str(exc)) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BadTable(f"{self.path} is not a regular file")
            if create:
                os.ftruncate(fd, TABLE_SIZE)
                os.pwrite(fd, TABLE_MAGIC + os.urandom(8), 0)
            elif st.st_size != TABLE_SIZE:
                raise BadTable(f"{self.path} has {st.st_size} bytes, not {TABLE_SIZE}")
            self.mm = mmap.mmap(fd, TABLE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise CacheError(f"cannot map {self.path}: {exc.strerror}") from exc
        finally:
            os.close(fd)  # the mapping keeps the file
        if self.mm[:NONCE_OFFSET] != TABLE_MAGIC:
            self.mm.close()
            raise BadTable(f"{self.path} is not an nvcache readers table")
        self.nonce = bytes(self.mm[NONCE_OFFSET:NONCE_OFFSET + 8])
        _tables.add(self)

    # -- the reader side (used by the compiled core) --------------------------------
    def claim(self) -> int:
        """Own a free slot for this process; -1 when all are taken.

        Ownership of slot ``i`` is an OFD write lock on byte ``i`` of the file
        (bytes 0-1023: the lock is only a token, it guards nothing there).
        """
        if not FAST_READS_SUPPORTED or self.slot >= 0:
            return self.slot
        try:
            self._claim_fd = open_nofollow(self.path, os.O_RDWR)
        except CacheError:
            return -1
        for slot in range(SLOTS):  # the lowest free one: claimed slots stay few and together
            try:
                fcntl.fcntl(self._claim_fd, fcntl.F_OFD_SETLK,
                            _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, slot, 1, 0))
            except OSError:
                continue
            self.mm[SLOTS_OFFSET + slot * SLOT_SIZE] = 0  # a dead owner may have left it set
            # Before the slot is ever set. A writer reads the claimed bytes after raising the flag
            # and fencing; a reader stores this byte, later its slot, fences, then loads the flag.
            # Stores become visible in program order (x86-64), so if the writer missed this byte,
            # the reader's flag load comes after the writer's flag store and sees it (the reader
            # then takes the flock). Never cleared: a new owner may be claiming it right then.
            self.mm[CLAIMED_OFFSET + slot] = 1
            self.slot = slot
            return slot
        self._drop_claim()
        return -1

    def _drop_claim(self) -> None:
        if self._claim_fd >= 0:
            try:
                os.close(self._claim_fd)
            except OSError:
                pass
        self._claim_fd = -1
        self.slot = -1

    def _owner_alive(self, slot: int) -> bool:
        try:
            fd = open_nofollow(self.path, os.O_RDWR)
        except CacheError:
            return True  # cannot tell: keep waiting (bounded by the caller's deadline)
        try:
            got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, slot, 1, 0))
            return _FLOCK.unpack(got[:_FLOCK.size])[0] != fcntl.F_UNLCK
        except OSError:
            return True
        finally:
            os.close(fd)

    def attached(self) -> int:
        """About the processes reading this cache: the slots up to the last claimed one when this
        process last wrote (claims take the lowest free slot, so they stay together; at least the
        claimed count), found by the write's handshake at no cost of its own."""
        return self.claimed_upto

    # -- the writer side (both cores; the caller holds the exclusive flock) ------------
    def enter_write(self, timeout: float) -> None:
        """Raise the flag and wait until no reader is inside a read without the flock.

        ``timeout`` 0 (bookkeeping that must not wait) gives up after a brief
        spin; otherwise a slot set for more than 2 ms has its owner checked.
        """
        mm = self.mm
        self.raised = True  # first: recover() then clears a flag that a signal kept us from clearing
        mm[FLAG_OFFSET] = 1
        _fence()
        # Readers only ever set the first byte of a slot they claimed: look at those first.
        top = mm.rfind(b"\1", CLAIMED_OFFSET, TABLE_SIZE)
        self.claimed_upto = top - CLAIMED_OFFSET + 1 if top >= 0 else 0
        if top < 0 or 1 not in mm[SLOTS_OFFSET:SLOTS_OFFSET + (top - CLAIMED_OFFSET + 1) * SLOT_SIZE:SLOT_SIZE]:
            return
        pos = mm.find(b"\1", SLOTS_OFFSET, CLAIMED_OFFSET)  # someone is inside a read: wait for it
        start = time.monotonic()
        deadline = start + timeout
        checked: Dict[int, float] = {}
        pause = 0.0
        while pos >= 0:
            if (pos - SLOTS_OFFSET) % SLOT_SIZE:
                mm[pos] = 0  # a stray byte (a damaged table): nobody owns it
            else:
                now = time.monotonic()
                first = checked.setdefault(pos, now)
                # A read takes microseconds: a slot still set after 2 ms may belong to a dead
                # process (its OFD lock is then gone), else to a stopped or descheduled one.
                if timeout > 0 and now - first > 0.002 and not self._owner_alive((pos - SLOTS_OFFSET) // SLOT_SIZE):
                    mm[pos] = 0
                    checked.pop(pos)
                elif (timeout <= 0 and now - start > 0.0001) or (now >= deadline and now - first > 0.002):
                    self.leave_write()
                    raise CacheTimeout(f"a reader of {os.path.dirname(self.path)} stayed inside a read for "
                                       f"{max(timeout, now - start):.3g} s")
                else:
                    time.sleep(pause)
                    pause = min(pause * 2 or 0.00002, 0.002)
            pos = mm.find(b"\1", pos, CLAIMED_OFFSET)

    def leave_write(self) -> None:
        self.mm[FLAG_OFFSET] = 0
        self.raised = False

    def abandon_write(self, fd: int) -> None:
        """After an interrupted write (recover): clear the flag we raised, if no other writer has
        come since. Only while we hold the exclusive flock of ``fd`` (taken here if free): else
        another process's writer may have raised it for itself, and it clears it."""
        if not self.raised:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return
        self.leave_write()

    def close(self) -> None:
        self._drop_claim()
        try:
            self.mm.close()
        except BufferError:
            pass  # a closed Reader still holds a view: the mapping goes with it


def _tables_after_fork_in_child() -> None:
    # The claim's OFD lock belongs to the open file, which the child shares with its parent:
    # drop our copy at once, or the parent's slot would look alive after the parent died.
    for table in list(_tables):
        table._drop_claim()


os.register_at_fork(after_in_child=_tables_after_fork_in_child)
