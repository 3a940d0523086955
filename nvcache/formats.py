"""Older formats in a cache path, and their removal once nobody uses them.

Each format keeps its files in its own directory of the cache path,
``<path>/v<N>`` (this one's is :data:`nvcache.cachedir.FORMAT_DIR`), so during
a rolling upgrade old and new scanners each keep their own cache instead of
rebuilding each other's. Releases before the per-format directories kept the
files directly in ``<path>`` (data.mdb, version, readers, users, clean): that
*legacy* layout counts as the oldest format, whatever its version file says.

When a cache opens, :func:`remove_unused` removes every older format (never
a newer one) that nobody uses: no process holds its ``users`` file (each user
of a cache holds it shared, so a non-blocking exclusive flock succeeds only
when there is none), no process is inside one of its transactions (the same
test on its lock, the directory), and none of its files changed for
:data:`UNUSED_FORMAT_AGE_S` seconds (a release that only just closed it, a
restarting pod, keeps it). Both flocks are held while it checks the age and
removes, so an old process that opens meanwhile waits, then finds no cache
and creates an empty one: it never maps a file while it is removed.

A ``v<N>`` directory is renamed away first and then deleted: an older process
that opened its path just before sees its directory moved and follows the
path (a new empty one). In the legacy layout the lock is ``<path>`` itself,
which stays; its ``users`` file stays too (empty): a process of the old
release that is waiting for it would otherwise end up holding a lock on a
deleted file, and the next one would take itself for the cache's only user.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import time
from typing import List, Optional, Tuple

from .cachedir import CLEAN_FILE, DATA_FILE, FORMAT_VERSION, USERS_FILE, VERSION_FILE, flock_alone, remove_entry
from .errors import CacheError
from .locking import open_directory
from .readertable import READERS_FILE

log = logging.getLogger("nvcache")

# An older format untouched this long (newest file's mtime) and held by no process is removed. An hour:
# far longer than a rollout's pause between an old pod's exit and its replacement, far shorter than the
# disk an abandoned cache would keep for good. Documented in README (Rolling upgrades) and DEVELOPERS.
UNUSED_FORMAT_AGE_S = 3600.0

LEGACY = ""  # the name of the legacy layout: the files directly in the cache path
# Removed with it (USERS_FILE stays, above). Its version file only when it is nvcache's: the seed
# scanner's cache directory has one too (``nvcache import`` reads it), and it is not ours to remove.
LEGACY_FILES = (VERSION_FILE, DATA_FILE, READERS_FILE, CLEAN_FILE)
_TEMP_FILE = re.compile(r"\.(version|clean)\.[0-9]+\.[0-9]+\Z")  # write_atomically's, left by a crash
_FORMAT_NAME = re.compile(r"v([0-9]{1,9})\Z")
_GRAVE = ".removing."  # ".v5.removing.<pid>": a renamed-away format directory being deleted


def describe(name: str) -> str:
    return "the pre-directory layout (files directly in the cache path)" if name == LEGACY else f"{name}/"


def older_formats(path: str) -> List[str]:
    """The formats older than this one present in ``path``: LEGACY and/or ``v<N>`` names."""
    try:
        names = os.listdir(path)
    except OSError:
        return []
    found = [LEGACY] if _legacy_entries(path, names) else []
    for name in sorted(names):
        match = _FORMAT_NAME.match(name)
        if match and int(match.group(1)) < FORMAT_VERSION:
            found.append(name)
    return found


def _legacy_entries(path: str, names: List[str]) -> List[str]:
    """The legacy layout's entries among ``names`` (those of ``path``)."""
    found = [name for name in names if (name in LEGACY_FILES and name != VERSION_FILE) or _TEMP_FILE.match(name)]
    if VERSION_FILE in names and _nvcache_version_file(os.path.join(path, VERSION_FILE)):
        found.append(VERSION_FILE)
    return found


def _nvcache_version_file(file: str) -> bool:
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        with os.fdopen(fd, "rb") as f:
            doc = json.loads(f.read(4096))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and str(doc.get("description", "")).startswith("nvcache")


def holds_nvcache(path: str) -> bool:
    """Whether ``path`` looks like an nvcache cache path of any format (for the seed tools' checks)."""
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return DATA_FILE in names or any(_FORMAT_NAME.match(name) for name in names)


def remove_unused(path: str, max_age: float = UNUSED_FORMAT_AGE_S) -> List[str]:
    """Remove every older format in the cache path ``path`` that nobody uses (see the module
    docstring); the names removed. Best effort: what cannot be done is logged, never raised."""
    removed: List[str] = []
    cutoff = time.time() - max_age
    for name in older_formats(path):
        try:
            if _remove_if_unused(path, name, cutoff):
                removed.append(name)
                log.info("removed %s from %s: an older nvcache format nobody used for %.0f s",
                         describe(name), path, max_age)
        except (OSError, CacheError) as exc:  # removed by another process meanwhile, or not ours to remove
            log.info("could not remove %s from %s: %s", describe(name), path, exc)
    _remove_graves(path)
    return removed


def _newest_mtime(directory: str, names: List[str]) -> float:
    newest = 0.0
    for name in names:
        try:
            newest = max(newest, os.lstat(os.path.join(directory, name)).st_mtime)
        except FileNotFoundError:
            pass
    return newest


def _remove_if_unused(path: str, name: str, cutoff: float) -> bool:
    where = os.path.join(path, name) if name else path
    fd = open_directory(where)  # never through a symlink planted as v<N>
    users = -1
    try:
        if not flock_alone(fd):
            return False  # a process of that format is inside a transaction
        try:
            users = os.open(os.path.join(where, USERS_FILE), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            pass  # nobody ever joined it (a process about to would follow the moved directory)
        if users >= 0 and not flock_alone(users):
            return False  # a process of that format has it open
        if name == LEGACY:
            if _newest_mtime(where, list(LEGACY_FILES) + [USERS_FILE]) > cutoff:
                return False
            entries = _legacy_entries(where, os.listdir(where))
            for entry in sorted(entries, key=lambda e: e != VERSION_FILE):  # the version file first
                remove_entry(os.path.join(where, entry))
            return bool(entries)
        if _newest_mtime(where, os.listdir(where) + [os.curdir]) > cutoff:
            return False
        st = os.stat(where, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode) or (st.st_dev, st.st_ino) != _identity(fd):
            return False  # replaced since we locked it: that one is not the one we checked
        grave = os.path.join(path, f".{name}{_GRAVE}{os.getpid()}")
        os.rename(where, grave)
        shutil.rmtree(grave)  # unlinks only: a process still mapping a file keeps it (no SIGBUS)
        return True
    finally:
        if users >= 0:
            os.close(users)
        os.close(fd)


def _identity(fd: int) -> Tuple[int, int]:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


def _remove_graves(path: str) -> None:
    """Delete what a remover that died midway left renamed away (nobody uses those: they were
    checked unused before the rename, and no path leads to them since)."""
    try:
        names = os.listdir(path)
    except OSError:
        return
    for name in names:
        if name.startswith(".v") and _GRAVE in name:
            shutil.rmtree(os.path.join(path, name), ignore_errors=True)


def note_for(path: str) -> Optional[str]:
    """What to tell an operator about older formats in ``path`` (None when there are none)."""
    older = older_formats(path)
    if not older:
        return None
    return (f"{path} also holds {', '.join(describe(name) for name in older)}, from an older nvcache release; "
            f"this release does not read it (it is removed once unused for {UNUSED_FORMAT_AGE_S:.0f} s)")
