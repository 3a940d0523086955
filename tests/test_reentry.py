"""A signal handler that calls the cache inside one of its calls, a lock wait that fails under an
API caller of nvcache's own, and a forked child whose lock cannot reopen: no call may take or
release another call's locks, and each ends in a CacheError or its normal result.

The mutex is reentrant (its owner is known atomically, see locking.py), so a handler's call in
the same thread would otherwise succeed inside the outer call and, leaving, unlock the flock
that call still needs. Real signals (``os.kill`` of this process, delivered at the next bytecode
of the main thread), both cores; the flock is probed through a descriptor of our own (flock
belongs to the open file description: a second one in this process conflicts like another
process's would).
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
from typing import Any, Callable, Dict, List

import pytest

import nvcache
from nvcache import CacheError, CacheTimeout
from nvcache.cachedir import format_dir
from test_removal import LOCK_HOLDER
from payloads import incompressible


def lid(i: int) -> str:
    return f"sha256:{i:064d}"


def _flock_free(path: str) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # (closing drops the lock we may have taken)
    return True


def _inside_a_put(cache: Any, handler: Callable[[], None], probe: Callable[[], Any]) -> Dict[str, Any]:
    """Put a record; inside its write transaction, SIGUSR1 runs ``handler`` in this thread, then
    ``probe()`` looks at the locks. What the handler raised and the probe saw."""
    seen: Dict[str, Any] = {}
    store = cache._store
    real = store._insert

    def on_signal(_signum: int, _frame: Any) -> None:
        try:
            handler()
            seen["handler"] = "returned"
        except CacheError as exc:
            seen["handler"] = f"CacheError: {exc}"

    def insert(*args: Any) -> Any:
        os.kill(os.getpid(), signal.SIGUSR1)  # handled before the next line runs
        seen["probe"] = probe()
        return real(*args)

    previous = signal.signal(signal.SIGUSR1, on_signal)
    store._insert = insert
    try:
        seen["put"] = cache.put(lid(1), incompressible(5000, 1))
    finally:
        del store._insert
        signal.signal(signal.SIGUSR1, previous)
    return seen


def test_a_handler_reading_inside_a_put_leaves_its_flock_alone(Cache, cache_dir):
    with Cache(cache_dir, 1) as cache:
        cache.put(lid(2), b"two")
        where = format_dir(cache_dir)
        seen = _inside_a_put(cache, lambda: cache.get(lid(2)), lambda: _flock_free(where))
        assert "signal handler" in seen["handler"]  # refused at once, not a wait
        assert seen["probe"] is False  # the put still held its exclusive flock after the handler
        assert seen["put"] is True and cache.get(lid(1)) == incompressible(5000, 1)
        assert cache.verify() == [] and _flock_free(where)


def test_a_handler_closing_the_cache_inside_a_put_lets_the_put_finish(Cache, cache_dir, core_env, caplog):
    """A SIGTERM handler that closes the cache: the put in progress ends normally (before, its
    files were closed under it and it raised ValueError, which is no CacheError)."""
    cache = Cache(cache_dir, 1)
    with caplog.at_level(logging.WARNING, logger="nvcache"):
        seen = _inside_a_put(cache, cache.close, lambda: None)
    assert seen["handler"] == "returned" and seen["put"] is True
    assert "inside one of its calls" in caplog.text
    with pytest.raises(CacheError, match="closed"):
        cache.get(lid(1))  # closed for its user from then on
    reader = subprocess.run([sys.executable, "-c", "import sys, nvcache; c = nvcache.LayerCache(sys.argv[1]); "
                             "print(len(c.get(sys.argv[2]) or b''), c.verify())", cache_dir, lid(1)],
                            capture_output=True, text=True, env=core_env)
    assert reader.stdout.split() == ["5000", "[]"], reader.stderr  # the put is in the file


# Stands for nvcache's own command calling the API (``python -m nvcache``, the console script,
# the metrics server, simulate's workers): a caller whose code lives in the package.
CLI_CALLER = """
def call(fn):
    return fn()
"""


def test_a_lock_timeout_under_nvcaches_own_callers_releases_the_mutex(Cache, cache_dir, core_env):
    cli_file = os.path.join(os.path.dirname(nvcache.__file__), "cli.py")
    namespace: Dict[str, Any] = {}
    exec(compile(CLI_CALLER, cli_file, "exec"), namespace)
    call = namespace["call"]
    cache = Cache(cache_dir, 1, lock_timeout=0.2)
    try:
        cache.put(lid(3), b"three")
        holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, format_dir(cache_dir)], env=core_env,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
            with pytest.raises(CacheTimeout):
                call(lambda: cache.put(lid(4), b"four"))
            assert not cache._store.lock.mutex._is_owned()  # nothing left held by the failed wait
        finally:
            holder.kill()
            holder.wait()
        assert call(lambda: cache.put(lid(4), b"four")) is True and cache.get(lid(3)) == b"three"
    finally:
        cache.close()


def test_a_forked_child_whose_lock_cannot_reopen_leaves_the_parents_flock(Cache, cache_dir, monkeypatch):
    """The child's first call reopens the lock's descriptor (the inherited one shares the parent's
    flock); if that fails, its recovery must not unlock the inherited descriptor."""
    from nvcache import locking
    cache = Cache(cache_dir, 1)
    try:
        cache.put(lid(5), b"five")
        lock = cache._store.lock
        lock.acquire(True)  # the parent holds the exclusive lock across the fork
        try:
            pid = os.fork()
            if pid == 0:  # the child: every reopen of the directory fails
                code = 0
                try:
                    def refuse(path: str) -> int:
                        raise CacheError(f"cannot open cache directory {path}: Too many open files")
                    monkeypatch.setattr(locking, "open_directory", refuse)
                    try:
                        cache.get(lid(5))
                        code = 3  # the get should have failed
                    except CacheError:
                        pass
                except BaseException:
                    code = 4
                os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.WEXITSTATUS(status) == 0
            assert _flock_free(format_dir(cache_dir)) is False  # still the parent's
        finally:
            lock.release()
        assert cache.get(lid(5)) == b"five" and _flock_free(format_dir(cache_dir))
    finally:
        cache.close()


def test_nested_callers_are_told_apart_from_the_library(Cache, cache_dir):
    """The mutex this thread owns outside any call (a leak) is healed at the next call; inside a
    call only a handler's call is refused. ``FileLock.nested`` says which."""
    with Cache(cache_dir, 1) as cache:
        lock = cache._store.lock
        assert lock.nested() is False
        lock.mutex.acquire()  # as an interrupted call whose recovery was itself interrupted leaves it
        assert lock.nested() is False  # owned, but by no call in progress
        assert cache.get(lid(6)) is None  # healed: the next call recovers the hold and goes on
        assert not lock.mutex._is_owned()
        found: List[bool] = []
        seen = _inside_a_put(cache, lambda: found.append(lock.nested()), lambda: None)
        assert found == [True] and seen["put"] is True
