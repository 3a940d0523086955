"""Single-flight :meth:`LayerCache.get_or_create` on one node: one creator per name at a time.

A claim on a name is an exclusive ``flock`` on ``<format dir>/claims/<key hex>``: the kernel
releases it when the creator's process dies (even by SIGKILL), and it works across PID
namespaces, as the cache's own lock does. Threads of one process share nothing through flock
(a lock belongs to the open file description), so they first meet in a per-name in-process
lock; only the thread holding it goes on to the file.

A waiter asks for a *shared* flock on the claim file: the kernel grants it to every waiter at
once when the creator lets go, so waiters sleep in the kernel and wake together, and none of
them reads the cache before then. The creator puts its record *before* it unlinks the file and
lets go, so a waiter that wakes finds the record. A blocking flock cannot time out, so the wait
runs in a short-lived helper thread and the caller waits on an Event for at most the time left
(``wait``); a waiter that gives up leaves the helper to drop the lock whenever it comes.

A record the creator could not store (too large, cache full of kept records, disk full) is
written into the claim file before the creator lets go: waiters read it from their descriptor
(the unlinked file lives while they hold it), checked by its BLAKE2b digest. When even that
write fails, the waiters create the record themselves, one at a time.

Every failure of this machinery (no claims directory, no descriptors, ...) is logged and the
call goes on as a plain get, create and put: claims must never take a scanner down.
DEVELOPERS.md ("Single flight") has the design's reasons and its measurements.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct
import threading
import time
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

from . import fleet
from .arguments import as_record, seconds
from .errors import CacheError
from .locking import open_nofollow
from .store import Store, log

CLAIMS_DIR = "claims"
WAIT_FACTOR = 6  # the default wait (and lease of a hung creator): this many lock_timeouts
GRACE = 0.2  # the least a waiter waits for a claim, however old its recorded start (see _wait)
_MAGIC = b"NVF1"
# magic, the claim's start (CLOCK_REALTIME ns), length of a delivered record (0: none), its digest
_HEADER = struct.Struct("<4sQQ32s")


def wait_arg(wait: object, lock_timeout: float) -> float:
    """The ``wait`` argument checked like ``lock_timeout``; None: WAIT_FACTOR × lock_timeout."""
    return WAIT_FACTOR * lock_timeout if wait is None else seconds("wait", wait)


def created(create: Callable[[], Any]) -> bytes:
    """``create()``'s result as bytes; TypeError (nothing stored) when it is not bytes-like."""
    data = create()
    try:
        return bytes(as_record(data))
    except TypeError:
        raise TypeError(f"create() must return bytes, bytearray or memoryview, "
                        f"not {type(data).__name__}") from None


def _digest(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2b(data, key=key, digest_size=32).digest()


class _Local:
    """The threads of this process asking for one name: the one holding ``lock`` goes on."""

    __slots__ = ("lock", "users", "result")

    def __init__(self) -> None:
        # An RLock records its owner atomically with the acquisition: a KeyboardInterrupt
        # right after it is undone by _release (same reasoning as locking.FileLock.recover).
        self.lock = threading.RLock()
        self.users = 0
        self.result: Optional[bytes] = None  # a record its creator could not store


_table_lock = threading.Lock()
_table: Dict[Tuple[str, bytes], _Local] = {}


def _after_fork_in_child() -> None:
    global _table_lock, _table
    _table_lock = threading.Lock()  # may have been held by a thread that does not exist here
    _table = {}


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Handoff:
    """A flock request that a helper thread blocks in, for a caller that waits a bounded time.

    The helper locks through its own duplicate of the descriptor (the same open file
    description), so closing the caller's descriptor never makes it lock another file.
    """

    def __init__(self, fd: int, op: int) -> None:
        self.mutex = threading.Lock()
        self.done = threading.Event()
        self.granted = False
        self.abandoned = False
        self.error: Optional[OSError] = None
        self.dup = os.dup(fd)
        self.op = op

    def run(self) -> None:
        try:
            fcntl.flock(self.dup, self.op)
            got = True
        except OSError as exc:
            self.error, got = exc, False
        with self.mutex:
            if got and self.abandoned:  # nobody wants it any more
                fcntl.flock(self.dup, fcntl.LOCK_UN)
            self.granted = got and not self.abandoned
            os.close(self.dup)
            self.done.set()

    def give_up(self) -> bool:
        """Stop wanting the lock; whether it was granted meanwhile (then the caller holds it)."""
        with self.mutex:
            self.abandoned = not self.granted
            return self.granted


def _timed_flock(fd: int, op: int, deadline: float) -> bool:
    """flock ``op`` on ``fd``, waiting until ``deadline`` (monotonic) at most; whether granted."""
    try:
        fcntl.flock(fd, op | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        pass
    left = deadline - time.monotonic()
    if left <= 0:
        return False
    handoff = _Handoff(fd, op)
    try:
        threading.Thread(target=handoff.run, name="nvcache-claim-wait", daemon=True).start()
    except RuntimeError as exc:  # no thread to spare (it never ran): the claim machinery's failure
        os.close(handoff.dup)
        raise OSError(errno.EAGAIN, f"cannot start a thread to wait for the claim: {exc}") from exc
    except BaseException:
        # A Ctrl-C inside start(): the thread may be running already, so its duplicate is its
        # own to close (closing it here could make it lock whatever file reuses the number).
        handoff.give_up()
        raise
    try:
        handoff.done.wait(left)
    finally:  # also on KeyboardInterrupt: a lock granted now is the caller's, which releases it
        granted = handoff.give_up()
    if handoff.error is not None:
        raise handoff.error
    return granted


class _Claim:
    """This call's hold on a name: the in-process lock, then the claim file's descriptor."""

    def __init__(self, directory: str, key: bytes) -> None:
        self.path = os.path.join(directory, key.hex())
        self.table_key = (directory, key)
        self.key = key
        self.local: Optional[_Local] = None
        self.fd = -1
        self.waited = False
        self.may_hold_local = False  # set once this call tried the in-process lock (never when reentered)

    # -- in-process ---------------------------------------------------------------
    def join(self) -> _Local:
        with _table_lock:
            local = _table.get(self.table_key)
            if local is None:
                local = _table[self.table_key] = _Local()
            local.users += 1
            self.local = local
        return local

    def lock_local(self, deadline: float) -> bool:
        local = self.local
        assert local is not None
        self.may_hold_local = True  # before acquiring: an interrupt right after it is still undone
        if local.lock.acquire(blocking=False):
            return True
        self.waited = True
        return local.lock.acquire(timeout=max(0.0, deadline - time.monotonic()))

    # -- across processes -----------------------------------------------------------
    def open(self) -> None:
        self.fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT, 0o640)

    def close_fd(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)  # drops any flock this call held on it

    def current(self) -> bool:
        """Whether the file this call locked is still the one at the path (see acquire)."""
        try:
            st, now = os.fstat(self.fd), os.stat(self.path)
        except FileNotFoundError:
            return False
        return st.st_nlink > 0 and (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)

    def started_ns(self) -> int:
        raw = os.pread(self.fd, _HEADER.size, 0)
        if len(raw) == _HEADER.size and raw[:4] == _MAGIC:
            return int(_HEADER.unpack(raw)[1])
        return 0

    def mark_started(self) -> None:
        """Truncate what an earlier creator left and note when this claim started (for the lease)."""
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, _HEADER.pack(_MAGIC, time.time_ns(), 0, bytes(32)), 0)
        except OSError as exc:  # a full disk: the claim holds all the same, without its start
            log.debug("claim %s: cannot note its start: %s", self.path, exc)

    def deliver(self, data: bytes) -> bool:
        """Leave ``data`` for the waiters in the claim file (a record that could not be stored)."""
        try:
            os.pwrite(self.fd, data, _HEADER.size)
            os.pwrite(self.fd, _HEADER.pack(_MAGIC, time.time_ns(), len(data), _digest(self.key, data)), 0)
            return True
        except OSError as exc:
            log.warning("claim %s: cannot hand the record to its waiters (%s): they will create it", self.path, exc)
            return False

    def delivered(self) -> Optional[bytes]:
        """A record the last creator left in the file, if whole and its digest matches."""
        raw = os.pread(self.fd, _HEADER.size, 0)
        if len(raw) != _HEADER.size:
            return None
        magic, _started, length, digest = _HEADER.unpack(raw)
        if magic != _MAGIC or not length:
            return None
        data = os.pread(self.fd, length, _HEADER.size)
        return data if len(data) == length and _digest(self.key, data) == digest else None

    def release(self, unlink: bool) -> None:
        """Let go of everything this call holds (idempotent; also after a KeyboardInterrupt).

        ``unlink``: this call holds the exclusive lock on the file at the path, so nobody else
        can be removing or creating it now; the unlink comes before the unlock, so a newcomer
        never locks a file that is about to disappear.
        """
        try:
            if unlink and self.fd >= 0:
                try:
                    os.unlink(self.path)
                except OSError as exc:
                    log.debug("claim %s: cannot remove it: %s", self.path, exc)
            self.close_fd()
        finally:
            local, self.local = self.local, None
            if local is not None:
                # Whatever this thread holds of it was taken by this call (a reentered call never
                # takes it), also if an interrupt landed right after the acquisition.
                while self.may_hold_local and local.lock._is_owned():  # type: ignore[attr-defined]
                    local.lock.release()
                with _table_lock:
                    local.users -= 1
                    if not local.users and _table.get(self.table_key) is local:
                        del _table[self.table_key]


class Outcome:
    """How one get_or_create ended, for its counting."""

    __slots__ = ("data", "born", "hit", "waited", "took_over", "wait_ns", "calling")

    def __init__(self) -> None:
        self.data: Optional[bytes] = None
        self.born = 0
        self.hit = False  # found (in the cache, or handed over by its creator): counted as a hit
        self.waited = False  # another caller held the claim when this one asked
        self.took_over = False  # waited, then created the record itself
        self.wait_ns = 0
        self.calling = False  # inside create_and_put: what it raises is the caller's, never a fallback


Probe = Callable[[], Tuple[Optional[bytes], int]]
# (record, whether the cache now holds one of the name, born when it was found rather than created:
# the remote tier's record, nvcache.fleet; None when create() made it)
CreateAndPut = Callable[[], Tuple[bytes, bool, Optional[int]]]


def single_flight(store: Store, key: bytes, probe: Probe, create_and_put: CreateAndPut, wait: float) -> Outcome:
    """Run one get_or_create after its first probe missed (see the module docstring).

    ``probe()`` reads the cache uncounted: (bytes or None, born). ``create_and_put()``
    runs create and puts its result (see CreateAndPut). The caller counts the outcome.
    """
    out = Outcome()
    started = time.monotonic()
    claim: Optional[_Claim] = None
    try:
        try:
            directory = os.path.join(store.lock.dir, CLAIMS_DIR)
            os.makedirs(directory, 0o750, exist_ok=True)
            claim = _Claim(directory, key)
            _run(claim, claim.join(), out, probe, create_and_put, started, wait)
        except Exception as exc:
            if out.calling:
                raise  # create's own exception (or put's) is the caller's
            if out.data is not None:  # the record is had: only letting go failed (released below)
                log.warning("single flight in %s: %r after the record was had", store.path, exc)
                return out
            log.warning("single flight in %s failed (%r): creating without a claim", store.path, exc)
            if claim is not None:
                claim.release(False)
            out.took_over = out.waited
            _call(out, create_and_put)
        return out
    finally:
        if claim is not None:
            claim.release(False)  # whatever is still held: after create raised, a Ctrl-C, a fallback
        if out.waited:
            out.wait_ns = int((time.monotonic() - started) * 1e9)


def _call(out: Outcome, create_and_put: CreateAndPut) -> bool:
    out.calling = True
    out.data, stored, born = create_and_put()
    out.calling = False
    if born is not None:  # found by the node's creator (in the remote tier): a hit
        out.hit, out.born = True, born
    return stored


def _found(out: Outcome, probe: Probe) -> bool:
    data, born = probe()
    if data is None:
        return False
    out.data, out.born, out.hit = data, born, True
    return True


def _handed_over(out: Outcome, claim: _Claim) -> bool:
    """A record its creator could not store, from the claim file; passed on to this process's threads."""
    data = claim.delivered()
    if data is None:
        return False
    out.data, out.hit = data, True
    if claim.local is not None:
        claim.local.result = data
    return True


def _wait(claim: _Claim, op: int, started: float, wait: float) -> bool:
    """Wait for ``op`` on the claim until the lease ends; whether granted (False: take over).

    The lease ends ``wait`` after this call started, or sooner when the claim itself started
    longer ago than that (a hung creator: every newcomer would otherwise wait the whole lease
    again). The start read may be a killed creator's, left in the file, in the microseconds
    before the new holder writes its own: so a lease never ends sooner than GRACE from now, and
    a lease that ended is checked against the start written now before giving up.
    """
    end = started + wait
    while True:
        claimed_ns = claim.started_ns()
        now = time.monotonic()
        until = end
        if claimed_ns:
            until = min(end, max(now + GRACE, now + claimed_ns / 1e9 + wait - time.time()))
        if _timed_flock(claim.fd, op, until):
            return True
        if time.monotonic() >= end or claim.started_ns() == claimed_ns:
            return False
        # Another claim started meanwhile: wait for it on a new open file description (the
        # helper thread left waiting on the old one unlocks that one if it ever gets it).
        claim.close_fd()
        claim.open()


def _create(claim: _Claim, local: _Local, out: Outcome, create_and_put: CreateAndPut) -> None:
    """This call holds the claim: create, store, hand over what could not be stored, let go."""
    claim.mark_started()
    local.result = None
    out.took_over = out.waited
    if not _call(out, create_and_put):
        assert out.data is not None
        local.result = out.data  # for this process's waiting threads
        claim.deliver(out.data)
    claim.release(True)


def _take_over(claim: _Claim, out: Outcome, create_and_put: CreateAndPut) -> None:
    log.warning("claim %s: its creator did not finish within the wait; creating without the claim", claim.path)
    claim.release(False)
    out.took_over = True
    _call(out, create_and_put)


def _run(claim: _Claim, local: _Local, out: Outcome, probe: Probe, create_and_put: CreateAndPut,
         started: float, wait: float) -> None:
    if local.lock._is_owned():  # type: ignore[attr-defined]
        # create() asked for its own name: waiting for ourselves would last the whole lease
        log.warning("claim %s: asked for again from inside its own create(); creating without it", claim.path)
        _call(out, create_and_put)
        return
    if not claim.lock_local(started + wait):
        out.waited = True  # another thread of this process held the name past the wait
        _take_over(claim, out, create_and_put)
        return
    if claim.waited:
        out.waited = True
        if _found(out, probe):
            return
        if local.result is not None:
            out.data, out.hit = local.result, True
            return
    claim.open()
    if not _timed_flock(claim.fd, fcntl.LOCK_EX, 0.0):
        out.waited = True
        # Shared: every waiter is woken at once when the creator lets go.
        if not _wait(claim, fcntl.LOCK_SH, started, wait):
            _take_over(claim, out, create_and_put)
            return
        if _found(out, probe) or _handed_over(out, claim):
            return
        # The creator raised, died, or could not hand its record over: the next creator is
        # whoever gets the exclusive lock; the others wait in the kernel for it in turn.
        claim.close_fd()
        claim.open()
        if not _wait(claim, fcntl.LOCK_EX, started, wait):
            _take_over(claim, out, create_and_put)
            return
    while not claim.current():  # the file was removed by the creator that let go before we locked
        if _found(out, probe) or _handed_over(out, claim):
            return
        claim.close_fd()
        claim.open()
        if not _timed_flock(claim.fd, fcntl.LOCK_EX, 0.0):
            out.waited = True  # a newcomer that lost the race to the file now at the path
            if not _wait(claim, fcntl.LOCK_EX, started, wait):
                _take_over(claim, out, create_and_put)
                return
    if _found(out, probe):  # stored since our first probe
        claim.release(True)
        return
    _create(claim, local, out, create_and_put)


def get_or_create(cache: Any, layer_id: str, create: Callable[[], Any], kind: str, keep: Iterable[str],
                  wait: Optional[float]) -> bytes:
    """:meth:`LayerCache.get_or_create` (the front's checks and counting around single_flight)."""
    key = cache._key(layer_id, kind)  # validated before anything else, as get and put do
    if not callable(create):
        raise TypeError(f"create must be callable, not {type(create).__name__}")
    kept = cache._core.keep_set(keep)
    seconds = wait_arg(wait, cache.lock_timeout)
    store = cache._opened()
    if store is None:  # disabled: the scanner's own path, nothing stored
        return created(create)
    if not cache.repair:  # a reader writes nothing: no claim (a claim is for a put), no put
        data = cache._uncounted(store, key, layer_id, kind)
        return data if data is not None else created(create)
    timeout = cache.lock_timeout

    def probe() -> Tuple[Optional[bytes], int]:
        data, born = store.lookup(key, timeout)
        if data is False:  # damaged: dropped, as get drops it; this call then misses
            if store.drop_damaged(key, timeout):
                log.warning("record %s_%s failed its checksum (or could not be decoded); dropped it", layer_id, kind)
            return None, 0
        return data, born

    def create_local() -> Tuple[bytes, bool]:
        data = created(create)
        try:
            cache._insert(layer_id, data, kind, (), 0, 0, kept=kept)  # False: one exists, which is as good
            return data, True
        except CacheError as exc:  # too large, full of kept records, disk full, lock busy: still returned
            log.warning("record %s_%s created but not stored: %s", layer_id, kind, exc)
            return data, False

    create_and_put: CreateAndPut
    if cache._remote is not None:  # the node's creator asks the fleet first (nvcache.fleet)
        create_and_put = fleet.across(cache, store, key, layer_id, kind, kept, create_local, seconds)
    else:
        def create_and_put() -> Tuple[bytes, bool, Optional[int]]:
            return create_local() + (None,)

    data, born = probe()
    if data is not None:
        out = Outcome()
        out.data, out.born, out.hit = data, born, True
    else:
        try:
            out = single_flight(store, key, probe, create_and_put, seconds)
        except Exception:  # create() raised: this call was a creator, and missed
            store.buffer.count(key, None, 0)
            raise
    assert out.data is not None
    if store.buffer.count(key, out.data if out.hit else None, out.born):  # one hit or one miss per call
        store.apply_due()
    if out.waited:
        try:
            store.add_tally(b"flight", (1, int(out.took_over), out.wait_ns), timeout)
        except CacheError as exc:  # a count is never worth failing the call that has its record
            log.warning("could not count a get_or_create wait in %s: %s", store.path, exc)
    return out.data
