"""Following a cache directory that is replaced at unlucky moments, and closing a shared store twice.

The review of session 5 found three holes next to issue 16's fix: a directory removed while
the first opener walks the file (its deep check) was opened by path afterwards, under the old
directory's lock; a directory renamed away and kept was never left by a process that only puts;
and two threads closing caches on one path could close the store twice. Real processes, both
cores (``core_env``); the "slow deep check" is the real one, made slower by a sleep in front of it.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

from nvcache.cachedir import format_dir
from test_removal import LOCK_HOLDER  # a process holding the directory's flock and the writer flag

CHILD = r"""
import json, os, sys, time
import nvcache
from nvcache import store
path, mode = sys.argv[1], sys.argv[2]
if mode == "slow-open":
    walk = store.Store._deep_check
    def slow(self):
        print("walking", flush=True)
        sys.stdin.readline()  # the test removes the directory and makes a new cache meanwhile
        return walk(self)
    store.Store._deep_check = slow
cache = nvcache.LayerCache(path, 64)
print("open", flush=True)
if mode == "put-again":
    cache.put("sha256:x000000", b"X0")
    print("put", flush=True)
    sys.stdin.readline()  # the directory is renamed away here
    deadline = time.monotonic() + 10
    stored = False
    while time.monotonic() < deadline and not stored:
        stored = cache.put("sha256:x000000", b"X0")  # False while it sees the old directory's record
        time.sleep(0.01)
    print(json.dumps({"followed": stored and cache.contains("sha256:z000000")}), flush=True)
elif mode == "put-only":
    sys.stdin.readline()  # the directory is renamed away here
    deadline = time.monotonic() + 10
    i = 0
    while time.monotonic() < deadline:
        cache.put("sha256:x%06d" % i, b"X%d" % i)
        i += 1
        if cache.contains("sha256:z000000"):  # the new cache's record: we write there now
            break
        time.sleep(0.01)
    print(json.dumps({"followed": cache.contains("sha256:z000000"), "puts": i}), flush=True)
else:
    for i in range(300):
        assert cache.put("sha256:x%06d" % i, b"X%d" % i)
    print(json.dumps({"puts": 300}), flush=True)
cache.close()
"""

WRITER = r"""
import sys
import nvcache
cache = nvcache.LayerCache(sys.argv[1], 64)
acked = [i for i in range(int(sys.argv[2])) if cache.put("sha256:z%06d" % i, b"Z%d" % i)]
cache.close()
print(len(acked), flush=True)
"""


def _child(path, mode, env):
    return subprocess.Popen([sys.executable, "-c", CHILD, path, mode], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _verify_all(path, env, x_records, z_records):
    code = ("import json, sys, nvcache\n"
            "c = nvcache.LayerCache(sys.argv[1], 64)\n"
            "bad = [i for i in range(int(sys.argv[2])) if c.peek('sha256:x%06d' % i) != b'X%d' % i]\n"
            "bad += [-i - 1 for i in range(int(sys.argv[3])) if c.peek('sha256:z%06d' % i) != b'Z%d' % i]\n"
            "print(json.dumps({'verify': c.verify(), 'bad': bad[:10]}))\n")
    out = subprocess.run([sys.executable, "-c", code, path, str(x_records), str(z_records)], env=env,
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def test_a_directory_removed_during_the_first_openers_walk_is_left_for_the_new_one(tmp_path, core_env):
    """X is the first opener and walks data.mdb; meanwhile the directory is removed and Z makes a new
    cache there and writes. X must open Z's cache under Z's directory lock (not the old one's),
    and both caches' writes must land intact."""
    path = str(tmp_path / "caches")
    seeded = subprocess.run([sys.executable, "-c", WRITER, path, "5"], env=core_env, capture_output=True,
                            text=True, timeout=60)
    assert seeded.returncode == 0, seeded.stderr
    x = _child(path, "slow-open", core_env)
    z = None
    try:
        assert x.stdout.readline().strip() == "walking", x.stderr.read()
        shutil.rmtree(path)
        z = subprocess.Popen([sys.executable, "-c", WRITER, path, "3000"], env=core_env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(format_dir(path), "version")) and time.monotonic() < deadline:
            time.sleep(0.005)  # Z has made its cache and is writing
        x.stdin.write("go\n")  # X's walk ends: it opens and writes while Z writes
        x.stdin.flush()
        out, err = x.communicate(timeout=60)
        z_out, z_err = z.communicate(timeout=60)
    finally:
        for proc in (x, z):
            if proc.poll() is None:
                proc.kill()
    assert x.returncode == 0, err[-2000:]
    assert z.returncode == 0 and z_out.strip() == "3000", z_err[-2000:]
    assert json.loads(out.splitlines()[-1]) == {"puts": 300}
    assert "Assertion" not in err + z_err and "damaged" not in err + z_err, (err + z_err)[-2000:]
    assert _verify_all(path, core_env, 300, 3000) == {"verify": [], "bad": []}


def _rename_under(path, mode, env, ready):
    """Start X in ``mode``, wait for its ``ready`` lines, rename the directory away (kept), let a new
    process make a cache at the path with one record, then let X go on; X's last report."""
    x = _child(path, mode, env)
    try:
        for line in ready:
            assert x.stdout.readline().strip() == line, x.stderr.read()
        os.rename(path, path + ".old")
        z = subprocess.run([sys.executable, "-c", WRITER, path, "1"], env=env, capture_output=True,
                           text=True, timeout=60)
        assert z.returncode == 0 and z.stdout.strip() == "1", z.stderr
        x.stdin.write("go\n")
        x.stdin.flush()
        out, err = x.communicate(timeout=60)
    finally:
        if x.poll() is None:
            x.kill()
    assert x.returncode == 0, err[-2000:]
    return json.loads(out.splitlines()[-1]), err


def test_a_process_that_only_puts_follows_a_directory_renamed_away_and_kept(tmp_path, core_env):
    """mv cache cache.old (kept), a new cache appears at the path: a process that only puts moves to
    the new cache within about a second (it looks at the directory once a second of writes)."""
    path = str(tmp_path / "caches")
    report, err = _rename_under(path, "put-only", core_env, ["open"])
    assert report["followed"] is True, err[-2000:]
    assert _verify_all(path + ".old", core_env, 0, 0)["verify"] == []  # the old one is left healthy


def test_two_threads_closing_caches_of_one_path_close_the_store_once(Cache, cache_dir, core_env):
    """Thread A closes the last cache of a path while another process holds the lock (its final flush
    waits); thread B opens and closes a cache on the path meanwhile. Neither close raises, and the
    store's descriptors are closed once (a second close could shut a descriptor reused since)."""
    a = Cache(cache_dir, 1, lock_timeout=20)
    a.put("sha256:a", b"A")
    assert a.get("sha256:a") == b"A"  # a buffered hit: the last close must flush it
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, format_dir(cache_dir)], env=core_env,
                              stdout=subprocess.PIPE, text=True)
    errors = []

    def close(cache):
        try:
            cache.close()
        except BaseException as exc:  # what the test is about: close must not raise
            errors.append(repr(exc))
    try:
        assert holder.stdout.readline().strip() == "locked"
        ta = threading.Thread(target=close, args=(a,))
        ta.start()
        time.sleep(0.3)  # A is inside its final flush, waiting for the lock
        b = Cache(cache_dir, 1, lock_timeout=20)
        tb = threading.Thread(target=close, args=(b,))
        tb.start()
        time.sleep(0.3)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    ta.join(30)
    tb.join(30)
    assert not ta.is_alive() and not tb.is_alive()
    assert errors == []
    with Cache(cache_dir, 1) as again:
        assert again.get("sha256:a") == b"A" and again.stats()["cache_hits"] == 2


def test_a_process_that_puts_what_the_old_directory_holds_still_follows(tmp_path, core_env):
    """The same rename, but the process keeps putting a record the old directory already has: the
    put's "already there" check looks at the directory too (at most once a second), so the put
    ends up in the new cache instead of being skipped forever."""
    report, err = _rename_under(str(tmp_path / "caches"), "put-again", core_env, ["open", "put"])
    assert report["followed"] is True, err[-2000:]
