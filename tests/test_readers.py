"""The readers table: reads without the flock, and what keeps them safe.

A process with the compiled core reads with a slot in ``<path>/readers``
instead of the flock (see nvcache/locking.py). These tests pin down the
handshake from both sides: writers of either core wait for a reader inside
a read, never for a dead one, and a table that is deleted or swapped makes
the cache start over rather than let a writer miss a reader.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

import nvcache
from nvcache import CacheTimeout
from nvcache.readertable import CLAIMED_OFFSET, FAST_READS_SUPPORTED, SLOT_SIZE, SLOTS, SLOTS_OFFSET, ReaderTable
from nvcache.cachedir import format_dir

pytestmark = pytest.mark.skipif(not FAST_READS_SUPPORTED, reason="reads without the flock need x86-64 Linux")


def _compiled():
    from nvcache import _index  # the slot owner is always a compiled reader
    return type("LayerCache_ext", (nvcache.LayerCache,), {"_core": _index})


def _slot_byte(path, slot):
    with open(os.path.join(format_dir(path), "readers"), "rb") as f:
        f.seek(SLOTS_OFFSET + slot * SLOT_SIZE)
        return f.read(1)[0]


def _reader_child(path, then):
    """Fork a compiled reader that owns a slot, marks itself inside a read, then ``then``s.

    Returns (pid, slot). ``then``: "stop" (SIGSTOP itself) or "die" (SIGKILL itself).
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            cache = _compiled()(path, 1)
            store = cache._store
            assert store.reader.fast
            slot = store.files.table.slot
            store.files.table.mm[SLOTS_OFFSET + slot * SLOT_SIZE] = 1  # as if inside a read
            os.write(w, str(slot).encode())
            os.kill(os.getpid(), signal.SIGSTOP if then == "stop" else signal.SIGKILL)
            store.files.table.mm[SLOTS_OFFSET + slot * SLOT_SIZE] = 0  # resumed: the read ends
            cache.close()
            os._exit(0)
        except BaseException:
            os._exit(3)
    os.close(w)
    slot = int(os.read(r, 20))
    os.close(r)
    return pid, slot


def _wait_stopped(pid):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(") ", 1)[1][0] == "T":
                return
        time.sleep(0.005)
    raise AssertionError("child never stopped")


def test_a_reader_inside_a_read_holds_writers_off_bounded(Cache, cache_dir):
    """A reader stopped inside a read: writers of either core time out, reads go on; then all is well."""
    with Cache(cache_dir, 1) as cache:
        cache.put("sha256:a", b"A")
    pid, slot = _reader_child(cache_dir, "stop")
    try:
        _wait_stopped(pid)
        with Cache(cache_dir, 1, lock_timeout=0.3) as other:
            t0 = time.monotonic()
            with pytest.raises(CacheTimeout):
                other.put("sha256:b", b"B")
            assert 0.27 <= time.monotonic() - t0 < 3
            assert other.get("sha256:a") == b"A"  # readers never wait for readers
            assert "sha256:b" not in other
            os.kill(pid, signal.SIGCONT)
            assert os.waitpid(pid, 0)[1] == 0
            pid = 0
            assert other.put("sha256:b", b"B") is True
            assert other.get("sha256:b") == b"B" and other.verify() == []
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def test_a_reader_killed_inside_a_read_is_not_waited_for(Cache, cache_dir):
    """The kernel drops a dead reader's slot lock: the next writer clears its slot and goes on."""
    with Cache(cache_dir, 1) as cache:
        cache.put("sha256:a", b"A")
    pid, slot = _reader_child(cache_dir, "die")
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert _slot_byte(cache_dir, slot) == 1
    with Cache(cache_dir, 1, lock_timeout=5) as other:
        t0 = time.monotonic()
        assert other.put("sha256:b", b"B") is True
        assert time.monotonic() - t0 < 1.0
        assert _slot_byte(cache_dir, slot) == 0
        assert other.verify() == []


def test_writers_look_at_every_claimed_slot_and_only_those(Cache, cache_dir, core_env):
    """Claims take the lowest free slots and mark them; a writer checks claimed slots up to the last.

    The last claimed slot inside a read holds a writer of either core off; a
    set slot that nobody ever claimed (no reader can be using it) is not
    even looked at: it is neither waited for nor cleared.
    """
    owner = _compiled()(cache_dir, 1)
    tables = []
    try:
        owner.put("sha256:a", b"A")
        first = owner._store.files.table.slot
        tables = [ReaderTable(format_dir(cache_dir), create=False) for _ in range(5)]
        slots = [t.claim() for t in tables]
        assert [first] + slots == list(range(6))
        mm = tables[0].mm
        assert mm[CLAIMED_OFFSET:CLAIMED_OFFSET + SLOTS] == b"\1" * 6 + b"\0" * (SLOTS - 6)
        # Give slot 4 back (it stays marked): a writer with the compiled core claims it, so the
        # last claimed slot, 5, stays ours and is the one a reader sits in below.
        tables.pop(3).close()
        probe = ReaderTable(format_dir(cache_dir), create=False)
        assert probe.claim() == 4  # the lowest free one
        probe.close()
        stray = SLOTS_OFFSET + 700 * SLOT_SIZE
        mm[stray] = 1
        # The writer is another process (one process uses one core on a path).
        code = ("import sys, nvcache\n"
                "from nvcache import CacheTimeout\n"
                "with nvcache.LayerCache(sys.argv[1], 1, lock_timeout=0.2) as other:\n"
                "    try:\n"
                "        done = other.put(sys.argv[2], b'x')\n"
                "    except CacheTimeout:\n"
                "        done = 'timeout'\n"
                "    print(done)\n")

        def put(layer_id):
            return subprocess.run([sys.executable, "-c", code, cache_dir, layer_id], env=core_env,
                                  check=True, timeout=60, capture_output=True, text=True).stdout.strip()
        assert put("sha256:b") == "True"
        assert mm[stray] == 1
        assert mm.rfind(b"\1", CLAIMED_OFFSET) == CLAIMED_OFFSET + slots[-1] == CLAIMED_OFFSET + 5
        last = SLOTS_OFFSET + slots[-1] * SLOT_SIZE
        mm[last] = 1  # the last claimant is inside a read, and alive (we hold its claim)
        assert put("sha256:c") == "timeout"
        assert "sha256:c" not in owner
        mm[last] = 0
        assert put("sha256:c") == "True"
        assert owner.get("sha256:c") == b"x" and owner.verify() == []
    finally:
        for t in tables:
            t.close()
        owner.close()


def test_a_forked_child_reads_with_its_own_slot(cache_dir):
    """After fork the child owns a new slot; the parent's stays owned by the parent alone."""
    cache = _compiled()(cache_dir, 1)
    try:
        cache.put("sha256:a", b"A")
        assert cache.get("sha256:a") == b"A"
        parent_slot = cache._store.files.table.slot
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                ok = cache.get("sha256:a") == b"A" and cache._store.reader.fast
                os.write(w, str(cache._store.files.table.slot if ok else -1).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        child_slot = int(os.read(r, 20))
        os.close(r)
        assert os.waitpid(pid, 0)[1] == 0
        assert child_slot >= 0 and child_slot != parent_slot
        # The child is gone; the parent's slot must still look owned to a writer.
        table = ReaderTable(format_dir(cache_dir), create=False)
        try:
            assert table._owner_alive(parent_slot)
            assert not table._owner_alive(child_slot)
        finally:
            table.close()
        assert cache.get("sha256:a") == b"A" and cache._store.reader.fast
    finally:
        cache.close()


@pytest.mark.parametrize("how", ["delete", "swap"])
def test_a_replaced_readers_table_makes_the_cache_start_over(Cache, cache_dir, core_env, how):
    """A new table would hide readers that still use the old one: a new data.mdb comes with it."""
    first = Cache(cache_dir, 1)
    try:
        first.put("sha256:old", b"old")
        assert first.get("sha256:old") == b"old"
        table = os.path.join(format_dir(cache_dir), "readers")
        if how == "delete":
            os.unlink(table)
        else:  # another cache's table, valid in itself, moved in
            other_dir = cache_dir + "-other"
            Cache(other_dir, 1).close()
            os.replace(os.path.join(format_dir(other_dir), "readers"), table)
        code = ("import sys, nvcache\n"
                "with nvcache.LayerCache(sys.argv[1], 1) as second:\n"
                "    assert second.get('sha256:old') is None, 'did not start over'\n"
                "    assert second.put('sha256:new', b'new')\n")
        subprocess.run([sys.executable, "-c", code, cache_dir], env=core_env, check=True, timeout=60)
        # The first process writes to the new file only (its old data.mdb was unlinked).
        assert first.put("sha256:mine", b"mine") is True
        assert first.get("sha256:new") == b"new" and first.get("sha256:mine") == b"mine"
        assert first.verify() == []
    finally:
        first.close()
