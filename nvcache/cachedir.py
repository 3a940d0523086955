"""The cache directory's files and marks, apart from LMDB's data.mdb itself.

The cache path holds one directory per format, ``<path>/v<FORMAT_VERSION>``
(:func:`format_dir`; older formats are removed once unused, see
:mod:`nvcache.formats`). A format directory holds ``data.mdb`` (LMDB), ``version`` (the format, JSON),
``readers`` (the readers table, :mod:`nvcache.locking`), ``users`` (every
process using the cache holds a shared flock on it, so the first opener
knows it is alone) and ``clean`` (data.mdb's identity and mtime when its
last user closed it). The boot record lives in data.mdb's ``meta`` table;
its encoding is here. Every file is opened without following symlinks.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import stat
import threading
import time
from typing import Dict, Optional

from .errors import CacheError, CacheTimeout
from .locking import is_resource_error, open_nofollow

log = logging.getLogger("nvcache")

# 2: record bytes in chunks of at most 64 KiB; 3: the readers table; 4: size and checksum in front
# of a record's first chunk (a get reads dat alone); 5: the readers table marks claimed slots;
# 6: a birth stamp (born_ns) in the idx header and in front of chunk 0, so buffered references
# apply only to the record they were counted against; 7: records may be zstd-compressed (written under 6
# by session 6, which a raw-only format-6 release reads as damaged), and the files live in <path>/v7/;
# 8: the policy's rank in the idx header, the policy's name in meta and a ghost table (issue 15)
FORMAT_VERSION = 8
FORMAT_DIR = f"v{FORMAT_VERSION}"  # this format's directory in the cache path: the one place it is named
FORMAT_DESCRIPTION = ("nvcache LMDB layout: idx (with birth and rank), dat (chunked, size+checksum+birth first, "
                      "raw or zstd), lru, meta (with the policy), ghost; readers table")
DATA_FILE = "data.mdb"
VERSION_FILE = "version"
USERS_FILE = "users"
CLEAN_FILE = "clean"
DB_NAMES = (b"idx", b"dat", b"lru", b"meta", b"ghost")  # data.mdb's named databases (see fallback.py)
BOOT_KEY = b"boot"  # in meta: the boot record
READERS_KEY = b"readers"  # in meta: the nonce of the readers table made with this data.mdb
MARK_BOOT = "update the boot record"  # boot_problem's answer when the file is fine but the record is old


def prepare_directory(path: str) -> None:
    """Create ``path`` (0o750) or check that it is safe to use."""
    try:
        os.makedirs(path, mode=0o750, exist_ok=True)
    except FileExistsError:
        raise CacheError(f"cache path {path} exists and is not a directory") from None
    except OSError as exc:
        raise CacheError(f"cannot create cache directory {path}: {exc.strerror}") from None
    try:
        st = os.lstat(path)
    except OSError as exc:  # removed again right after it was made (a cleaner at work)
        raise CacheError(f"cannot use cache directory {path}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise CacheError(f"cache path {path} is a symlink; refusing to follow it")
    if not stat.S_ISDIR(st.st_mode):
        raise CacheError(f"cache path {path} is not a directory")
    if st.st_uid not in (os.geteuid(), 0):
        raise CacheError(f"cache directory {path} is owned by uid {st.st_uid}, not by this user or root")


def format_dir(path: str) -> str:
    """This format's directory in the cache path ``path``: where every file of the cache is."""
    return os.path.join(path, FORMAT_DIR)


def prepare_format_directory(directory: str) -> None:
    """Create (0o750) or check the format directory ``directory`` and the cache path holding it."""
    prepare_directory(os.path.dirname(directory))
    prepare_directory(directory)


def read_version(path: str) -> Optional[int]:
    """The format version recorded in ``<path>/version``, or None if missing or unreadable.

    A shortage of descriptors or memory raises CacheError instead: it says
    nothing about the file, and None would empty the cache.
    """
    version = _version_doc(path).get("version")
    return version if type(version) is int else None


def recorded_bound(path: str) -> int:
    """The cache's bound as ``<path>/version`` last recorded it (0: none). A copy of data.mdb's,
    kept outside it so that a rebuild of a damaged file keeps the bound an operator set."""
    bound = _version_doc(path).get("bound")
    return bound if type(bound) is int and bound > 0 else 0


def recorded_policy(path: str) -> str:
    """The cache's eviction policy as ``<path>/version`` last recorded it ("": none), kept for
    rebuilds as the bound is."""
    policy = _version_doc(path).get("policy")
    return policy if isinstance(policy, str) else ""


def _version_doc(path: str) -> Dict[str, object]:
    try:
        fd = open_nofollow(os.path.join(path, VERSION_FILE), os.O_RDONLY)
    except CacheError as exc:
        if is_resource_error(exc):
            raise
        return {}
    try:
        with os.fdopen(fd, "rb") as f:
            doc = json.loads(f.read(4096))
        return doc if isinstance(doc, dict) else {}
    except OSError as exc:
        if is_resource_error(exc):
            raise CacheError(f"cannot read {path}/{VERSION_FILE}: {exc.strerror}") from exc
        return {}
    except ValueError:
        return {}


def write_atomically(path: str, name: str, body: bytes) -> None:
    """Write ``<path>/<name>`` through a new temp file and rename: never through a planted symlink."""
    tmp = os.path.join(path, f".{name}.{os.getpid()}.{threading.get_ident()}")
    fd = open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        os.write(fd, body)
    finally:
        os.close(fd)
    os.replace(tmp, os.path.join(path, name))


def remove_entry(path: str) -> None:
    """Remove a file, symlink (never its target) or planted directory; absent is fine."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        shutil.rmtree(path)  # does not follow symlinks inside


def write_version(path: str, bound: int, policy: str) -> None:
    """Record the format, and the cache's bound and policy beside data.mdb's (see recorded_bound)."""
    body = json.dumps({"version": FORMAT_VERSION, "description": FORMAT_DESCRIPTION, "bound": bound,
                       "policy": policy}).encode()
    write_atomically(path, VERSION_FILE, body)


def current_boot_id() -> str:
    """The kernel's boot id; "" when unknown.

    ``NVCACHE_BOOT_ID`` overrides it: an operator's switch (documented in the
    README) for machines whose boot id is not what tells reboots apart, and
    the way the tests fake a reboot.
    """
    forced = os.environ.get("NVCACHE_BOOT_ID")
    if forced:
        return forced
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return f.read(64).decode("ascii", "replace").strip()
    except OSError:
        return ""


def allocated_bytes(path: str) -> int:
    """Disk space a file holds: its size, or less when sparse (with the write map, data.mdb's
    size is the whole map and its blocks are what LMDB used plus what the store reserved)."""
    st = os.stat(path)
    return min(st.st_size, st.st_blocks * 512)


def file_mark(st: os.stat_result) -> Dict[str, int]:
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def closed_cleanly(path: str) -> bool:
    """Whether ``<path>/data.mdb`` is exactly as the last process to close it left it."""
    try:
        fd = open_nofollow(os.path.join(path, CLEAN_FILE), os.O_RDONLY)
        with os.fdopen(fd, "rb") as f:
            mark = json.loads(f.read(4096))
        st = os.stat(os.path.join(path, DATA_FILE))
    except (OSError, ValueError, CacheError):
        return False
    return bool(mark == file_mark(st))


def mark_clean(path: str) -> None:
    """Record a clean close (by the last process, under the exclusive lock); best effort."""
    try:
        st = os.stat(os.path.join(path, DATA_FILE))
        write_atomically(path, CLEAN_FILE, json.dumps(file_mark(st)).encode())
    except (OSError, CacheError) as exc:
        log.debug("could not record a clean close of %s: %s", path, exc)


def consume_clean_mark(path: str) -> None:
    """Remove the clean mark: if this process dies before closing cleanly, the next first opener checks."""
    try:
        remove_entry(os.path.join(path, CLEAN_FILE))
    except OSError as exc:
        log.debug("could not consume the clean mark of %s: %s", path, exc)


def claim_users(fd: int, path: str, timeout: float) -> bool:
    """Join the users of the cache (a shared flock on ``users``); True when no other process has it open."""
    first = True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        first = False
    deadline = time.monotonic() + timeout
    while True:  # a closing process holds the exclusive lock for a moment
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return first
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise CacheTimeout(f"{path}/{USERS_FILE} stayed locked for {timeout} s") from None
            time.sleep(0.001)


def flock_alone(fd: int) -> bool:
    """Take ``fd``'s flock exclusively if nobody else holds it, without waiting; whether it did."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def last_user(fd: int) -> bool:
    """Whether this process is the only user left (then it holds ``users`` exclusively)."""
    return flock_alone(fd)


# -- reboots -----------------------------------------------------------------
# Without fsync a commit is safe from a process crash but not from an OS
# crash, which always comes with a reboot. The cache records the boot id
# and whether any non-durable process ever opened it ("N") or only
# durable ones ("D"); after a reboot an "N" cache is rebuilt.
def boot_problem(boot: Optional[bytes], durable: bool) -> Optional[str]:
    """Why the cache must be rebuilt after a reboot, MARK_BOOT when only its record is old, or None."""
    current = current_boot_id()
    stored, _, flag = (boot or b"").decode("ascii", "replace").partition("\0")
    if not current:
        return None  # no boot id to compare (not Linux): trust the file
    if stored != current:
        if flag == "D":
            return MARK_BOOT
        return f"the machine rebooted since non-durable writes (boot id {stored or 'unknown'})"
    if flag != "D" or durable:
        return None
    return MARK_BOOT  # first non-durable user of a durable-only cache: record it


def boot_record(previous: Optional[bytes], durable: bool) -> bytes:
    flag = "D" if durable and (previous is None or previous.endswith(b"\0D")) else "N"
    return f"{current_boot_id()}\0{flag}".encode("ascii", "replace")
