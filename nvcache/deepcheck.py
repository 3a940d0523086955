"""The deep check: is a data.mdb safe to use, before this process maps it?

LMDB has no page checksums and trusts what it reads: a damaged page can
crash the process that touches it. So the first process to open a cache
that was not closed cleanly (or any small one) walks it in a forked child
with a time limit (:func:`deep_check`): LMDB's pages (:func:`check_pages`),
then every record through the index's own consistency check, then a trial
write that is aborted (:func:`exercise_writes`). A crash there only means
"rebuild".
"""

from __future__ import annotations

import mmap
import os
import signal
import struct
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from .cachedir import DATA_FILE, DB_NAMES, allocated_bytes, closed_cleanly, consume_clean_mark, file_mark
from .errors import CacheError
from .writemap import PAGE_SIZE

# The first opener walks a data.mdb this small even after a clean close (silent bit rot keeps
# mtime, and LMDB has no page checksums); larger files trust the clean mark to keep opens fast.
ALWAYS_CHECK_BYTES = 64 << 20


class FirstOpenCheck:
    """When the first opener of a cache walks it, and the walk's verdict for one file.

    Small files are always walked (it costs less than a scanner's first
    layer); large ones only without a clean mark that matches the file.
    Either way the mark is consumed: if this process dies before closing
    cleanly, the next first opener walks the file. The verdict is kept per
    file identity, so an open retried under the exclusive lock (which finds
    the mark consumed) does not walk the same file again. ``consume=False``
    (a read-only opener): the caller consumes the mark itself, once the open
    succeeded, so that an open refused for damage changes no file.
    """

    def __init__(self, path: str, walk: Callable[[], Optional[str]], consume: bool = True) -> None:
        self.path = path
        self.walk = walk
        self.consume = consume
        self._verdict: Optional[Tuple[Dict[str, int], Optional[str]]] = None  # (file mark, problem)

    def __call__(self) -> Optional[str]:
        data_path = os.path.join(self.path, DATA_FILE)
        try:
            trusted = closed_cleanly(self.path) and allocated_bytes(data_path) > ALWAYS_CHECK_BYTES
            mark = file_mark(os.stat(data_path))
        except FileNotFoundError:  # removed meanwhile (its directory too, maybe): the caller looks again
            return f"{DATA_FILE} vanished"
        if self.consume:
            consume_clean_mark(self.path)
        if trusted:
            self._verdict = (mark, None)
        elif self._verdict is None or self._verdict[0] != mark:
            self._verdict = (mark, self.walk())
        return self._verdict[1]


def deep_check(path: str, open_env: Callable[[], Any], index_class: Any) -> Optional[str]:
    """Walk ``<path>/data.mdb`` in a child process; the problem found, or None when it is sound.

    ``open_env()`` opens the file without the write map (the trial write is
    aborted and must leave no trace); ``index_class(*dbs).check(txn, None)``
    is the index's consistency check.
    """
    try:
        size = allocated_bytes(os.path.join(path, DATA_FILE))
    except FileNotFoundError:
        return f"{DATA_FILE} vanished"
    limit = 30.0 + size / (50 << 20)  # generous: a cycle in damaged pages must not hang us
    try:
        pid = os.fork()
    except OSError as exc:  # a shortage of processes or memory says nothing about the file
        raise CacheError(f"cannot start the deep check of {path}: {exc.strerror}") from exc
    if pid == 0:  # pragma: no cover - runs in the child, reported by exit status
        code = 70
        try:
            code = 68
            if check_pages(os.path.join(path, DATA_FILE)) is not None:
                os._exit(68)
            code = 70
            env = open_env()
            dbs = [env.open_db(name, create=False) for name in DB_NAMES]
            with env.begin() as txn:
                code = 0 if not index_class(*dbs).check(txn, None) else 65
            if code == 0:
                code = 67
                exercise_writes(env, dbs)
                code = 0
        except BaseException:
            code = code if code in (67, 68) else 66
        os._exit(code)
    deadline = time.monotonic() + limit
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return f"no answer within {limit:.0f} s"
        time.sleep(0.002)
    if os.WIFSIGNALED(status):
        return f"the checking process died of signal {os.WTERMSIG(status)}"
    code = os.WEXITSTATUS(status)
    return None if code == 0 else {65: "inconsistent index", 66: "LMDB error",
                                    67: "LMDB error in a trial write",
                                    68: "a damaged page"}.get(code, f"exit {code}")


def exercise_writes(env: Any, dbs: List[Any]) -> None:
    """Delete every key of every database in one write transaction, then abort it.

    Part of the deep check (in a child process): reading every record does not
    interpret everything a write relies on (a leaf's free-space bounds, node
    offsets, branch pages when pages merge, the free list when pages are
    allocated), and LMDB trusts those; bit rot there made the first *write*
    crash (SIGBUS) in the bit-rot campaign. Aborted, and without a write map,
    the transaction never reaches the file.
    """
    txn = env.begin(write=True)
    try:
        for db in dbs:
            with txn.cursor(db) as cur:
                keys = list(cur.iternext(keys=True, values=False))
            for key in keys:
                txn.delete(key, db=db)
    finally:
        txn.abort()


_P_BRANCH, _P_LEAF, _P_OVERFLOW = 0x01, 0x02, 0x04
_F_BIGDATA, _F_SUBDATA = 0x01, 0x02
_NO_PAGE = (1 << 64) - 1


def check_pages(path: str) -> Optional[str]:
    """Walk data.mdb's B-trees page by page (LMDB 0.9's on-disk format); the first problem found.

    Part of the deep check: LMDB trusts a page's own header, and bit rot there
    can be harmless to every read but not to a write. A page's number is the
    one LMDB frees it by when a write copies it: a wrong one goes to the free
    list, and a later transaction writes to that page, which under the write
    map is an address outside the file (a crash). So every page reachable from
    the newer meta page must carry its own number and a kind that fits, and
    every free-list entry must lie inside the file.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 2 * PAGE_SIZE:
            return "shorter than its two meta pages"
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as raw:
            metas = [raw[0:PAGE_SIZE], raw[PAGE_SIZE:2 * PAGE_SIZE]]
            meta = max(metas, key=lambda m: struct.unpack_from("<Q", m, 144)[0])
            last = struct.unpack_from("<Q", meta, 136)[0]
            if (last + 1) * PAGE_SIZE > size:
                return f"the meta page's last page {last} lies beyond the file"
            walker = _PageWalker(raw, last)
            walker.walk(struct.unpack_from("<Q", meta, 80)[0], walker.free_leaf)
            walker.walk(struct.unpack_from("<Q", meta, 128)[0], walker.main_leaf)
            return walker.problems[0] if walker.problems else None


class _PageWalker:
    """check_pages' walk over one mapped file: every page is reached once, problems are collected."""

    def __init__(self, raw: Any, last: int) -> None:
        self.raw = raw
        self.last = last
        self.seen: set = set()
        self.problems: List[str] = []

    def page(self, n: int, kind: int) -> Optional[bytes]:
        if n < 2 or n > self.last or n in self.seen:
            self.problems.append(f"page {n} is out of range or reached twice")
            return None
        self.seen.add(n)
        pg = self.raw[n * PAGE_SIZE:(n + 1) * PAGE_SIZE]
        number, _pad, flags = struct.unpack_from("<QHH", pg, 0)
        if number != n or not flags & kind:
            self.problems.append(f"page {n} says it is page {number} with flags {flags:#x}")
            return None
        return pg

    def value(self, pg: bytes, off: int, flags: int, dsize: int) -> Optional[bytes]:
        if not flags & _F_BIGDATA:
            return pg[off:off + dsize]
        first = struct.unpack_from("<Q", pg, off)[0]
        head = self.page(first, _P_OVERFLOW)
        if head is None:
            return None
        count = struct.unpack_from("<I", head, 12)[0]
        if first + count - 1 > self.last or count * PAGE_SIZE < 16 + dsize:
            self.problems.append(f"overflow page {first} runs past the file")
            return None
        self.seen.update(range(first + 1, first + count))
        return self.raw[first * PAGE_SIZE + 16:first * PAGE_SIZE + 16 + dsize]

    def walk(self, root: int, on_leaf: Callable[[bytes, int, int, int], None], depth: int = 0) -> None:
        problems = self.problems
        if root == _NO_PAGE or problems:
            return
        if depth > 32:
            problems.append("a B-tree deeper than 32 levels")
            return
        pg = self.page(root, _P_BRANCH | _P_LEAF)
        if pg is None:
            return
        flags, lower, upper = struct.unpack_from("<HHH", pg, 10)
        if not 16 <= lower <= upper <= PAGE_SIZE:
            problems.append(f"page {root} has free-space bounds {lower}..{upper}")
            return
        for off in struct.unpack_from(f"<{(lower - 16) >> 1}H", pg, 16):
            if not upper <= off <= PAGE_SIZE - 8:
                problems.append(f"page {root} has a node outside its bounds")
                return
            lo, hi, nflags, ksize = struct.unpack_from("<HHHH", pg, off)
            if off + 8 + ksize > PAGE_SIZE:
                problems.append(f"page {root} has a key past its end")
                return
            if flags & _P_BRANCH:
                self.walk(lo | hi << 16 | nflags << 32, on_leaf, depth + 1)
            else:
                on_leaf(pg, off + 8 + ksize, nflags, lo | hi << 16)
            if problems:
                return

    def free_leaf(self, pg: bytes, off: int, flags: int, dsize: int) -> None:
        ids = self.value(pg, off, flags, dsize)
        if ids is None or len(ids) < 8:
            return
        n = struct.unpack_from("<Q", ids, 0)[0]
        if (n + 1) * 8 > len(ids):
            self.problems.append("a free-list record longer than its value")
        elif n and max(struct.unpack_from(f"<{n}Q", ids, 8)) > self.last:
            self.problems.append("a free-list entry beyond the file's last page")

    def data_leaf(self, pg: bytes, off: int, flags: int, dsize: int) -> None:
        if flags & _F_BIGDATA:  # only overflow pages have a header to check
            self.value(pg, off, flags, dsize)

    def main_leaf(self, pg: bytes, off: int, flags: int, dsize: int) -> None:
        if flags & _F_SUBDATA and off + 48 <= PAGE_SIZE:  # a named database's record
            self.walk(struct.unpack_from("<Q", pg, off + 40)[0], self.data_leaf, 1)
