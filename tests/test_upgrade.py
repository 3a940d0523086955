"""Rolling upgrades: the release before the per-format directories and this one on one path.

The old release is built from the repository's own history (``git archive``)
and runs on its pure-Python core (NVCACHE_NO_EXTENSIONS=1: its compiled core
keeps the same files, and building it costs ~25 s); this release runs over
both cores (``core_env``). Every scanner is a real process
(tests/upgrade_worker.py), and each round opens the cache anew.
"""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from typing import Any, Dict, List, Tuple

import pytest

from nvcache import formats
from nvcache.cachedir import FORMAT_DIR, FORMAT_VERSION, USERS_FILE, format_dir
from nvcache.importtarget import has_cache

OLD_RELEASE = "c1ae00f"  # the last release that kept its files directly in the cache path (format 6)
FORMAT7_RELEASE = "bc2af10"  # the last release of format 7 (<path>/v7/), before the policy's rank
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "upgrade_worker.py")
ROUNDS, OPS = 4, 30


def release_env(tmp_path_factory: Any, commit: str) -> Dict[str, str]:
    """The environment that runs an old release: its tree first on PYTHONPATH, its pure-Python core."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the old release is built from the repository's history")
    found = subprocess.run(["git", "-C", ROOT, "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True)
    if found.returncode != 0:
        pytest.skip(f"commit {commit} is not in this clone's history (shallow clone?): the old release "
                    "cannot be built")
    tree = tmp_path_factory.mktemp("old-release")
    archive = subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", commit, "nvcache"],
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tree)
    env = dict(os.environ)
    env["NVCACHE_NO_EXTENSIONS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(tree)] + [p for p in sys.path if p])
    return env


@pytest.fixture(scope="module")
def old_env(tmp_path_factory: Any) -> Dict[str, str]:
    return release_env(tmp_path_factory, OLD_RELEASE)


@pytest.fixture(scope="module")
def format7_env(tmp_path_factory: Any) -> Dict[str, str]:
    return release_env(tmp_path_factory, FORMAT7_RELEASE)


def start(env: Dict[str, str], path: str, tag: str, rnd: int, hold: bool = False) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, WORKER, path, tag, str(rnd), str(OPS)] + (["hold"] if hold else []),
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"{tag} worker did not open the cache: {line!r}, exit {proc.wait()}")
    return proc


def finish(proc: subprocess.Popen) -> Dict[str, Any]:
    out, _ = proc.communicate("go\n", timeout=120)
    assert proc.returncode == 0, f"worker exit status {proc.returncode}: {out!r}"
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def side_by_side(old_env: Dict[str, str], new_env: Dict[str, str], path: str,
                 rounds: int) -> List[Tuple[Dict[str, Any], Dict[str, Any]]]:
    """``rounds`` rounds of an old and a new scanner open at once, interleaving puts and gets."""
    results = []
    for rnd in range(rounds):
        old, new = start(old_env, path, "old", rnd), start(new_env, path, "new", rnd)
        results.append((finish(old), finish(new)))
    return results


def age(path: str) -> None:
    """Make every file directly in ``path`` (the old layout's) look unused for longer than the threshold."""
    then = time.time() - formats.UNUSED_FORMAT_AGE_S - 600
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            os.utime(full, (then, then))


def legacy_files(path: str) -> List[str]:
    return sorted(name for name in os.listdir(path) if name in formats.LEGACY_FILES)


def check_round(result: Dict[str, Any], rnd: int, previous: Dict[str, Any], version: int) -> None:
    assert result["version"] == version
    assert (result["rebuilds"], result["lost"], result["wrong"]) == (0, 0, 0), result
    assert result["checked"] == rnd * OPS and result["acked"] == OPS, result
    assert result["created"] == (rnd == 0), result
    if previous:  # nothing happened to this release's cache between its two opens
        assert result["opened"] == previous["closing"], (result, previous)


def test_old_and_new_release_side_by_side_then_the_old_format_goes(old_env, core_env, tmp_path):
    path = str(tmp_path / "caches")
    previous: Dict[str, Dict[str, Any]] = {"old": {}, "new": {}}
    for rnd, (old, new) in enumerate(side_by_side(old_env, core_env, path, ROUNDS)):
        check_round(old, rnd, previous["old"], 6)
        check_round(new, rnd, previous["new"], FORMAT_VERSION)
        previous = {"old": old, "new": new}
        # Both formats stay while the old one is in use (and young).
        assert legacy_files(path) == ["clean", "data.mdb", "readers", "version"]
        assert has_cache(path) and os.path.isfile(os.path.join(format_dir(path), "data.mdb"))
    # An old scanner holds the old cache open: old files or not, the new release leaves it.
    holder = start(old_env, path, "old", ROUNDS, hold=True)
    try:
        age(path)
        new = finish(start(core_env, path, "new", ROUNDS))
        check_round(new, ROUNDS, previous["new"], FORMAT_VERSION)
        assert legacy_files(path) == ["data.mdb", "readers", "version"]  # (its user consumed the clean mark)
    finally:
        held = finish(holder)
    assert (held["lost"], held["wrong"], held["checked"]) == (0, 0, ROUNDS * OPS), held
    # Unused, but the old scanner only just closed it: still kept.
    finish(start(core_env, path, "new", ROUNDS + 1))
    assert legacy_files(path) == ["clean", "data.mdb", "readers", "version"]
    # Unused and older than the threshold: the next open of the new release removes it.
    age(path)
    new = finish(start(core_env, path, "new", ROUNDS + 2))
    assert (new["lost"], new["wrong"], new["rebuilds"], new["checked"]) == (0, 0, 0, (ROUNDS + 2) * OPS), new
    assert legacy_files(path) == [] and sorted(os.listdir(path)) == [USERS_FILE, FORMAT_DIR]
    # An old scanner that comes back starts over in its own layout, as after a format change.
    back = finish(start(old_env, path, "old", 0))
    assert (back["created"], back["rebuilds"], back["wrong"], back["acked"]) == (1, 0, 0, OPS), back
    assert has_cache(path) and legacy_files(path) == ["clean", "data.mdb", "readers", "version"]


def test_the_format_7_release_beside_this_one_then_v7_goes(format7_env, core_env, tmp_path):
    """Format 7 (no rank, four databases) and this release's format 8 in their own directories
    of one path, in real processes: neither loses, rebuilds or misreads a record; once v7 is
    unused and old, this release removes it."""
    path = str(tmp_path / "caches")
    previous: Dict[str, Dict[str, Any]] = {"old": {}, "new": {}}
    for rnd, (old, new) in enumerate(side_by_side(format7_env, core_env, path, 2)):
        check_round(old, rnd, previous["old"], 7)
        check_round(new, rnd, previous["new"], FORMAT_VERSION)
        previous = {"old": old, "new": new}
        assert {"v7", FORMAT_DIR} <= set(os.listdir(path))
    then = time.time() - formats.UNUSED_FORMAT_AGE_S - 600
    for top, dirs, files in os.walk(os.path.join(path, "v7")):
        for name in files + dirs + [os.curdir]:
            os.utime(os.path.join(top, name), (then, then))
    new = finish(start(core_env, path, "new", 2))
    check_round(new, 2, previous["new"], FORMAT_VERSION)
    assert "v7" not in os.listdir(path) and FORMAT_DIR in os.listdir(path)


OLD_LOOP = r"""
import json, sys, time
import nvcache
path, seconds = sys.argv[1], float(sys.argv[2])
rec = lambda k: (k * 40).encode()
opens = errors = wrong = puts = hits = 0
end = time.monotonic() + seconds
i = 0
while time.monotonic() < end:
    try:
        with nvcache.LayerCache(path, 8) as cache:
            opens += 1
            for _ in range(5):
                k = "sha256:race-%06d" % i
                i += 1
                puts += cache.put(k, rec(k))
                for j in range(max(0, i - 20), i):
                    got = cache.get("sha256:race-%06d" % j)
                    hits += got is not None
                    wrong += got is not None and got != rec("sha256:race-%06d" % j)
    except nvcache.CacheError as exc:
        errors += 1
    time.sleep(0.005)  # between two scans: the only time the old format is unused
print(json.dumps({"version": nvcache.cachedir.FORMAT_VERSION, "opens": opens, "errors": errors, "wrong": wrong,
                  "puts": puts, "hits": hits}))
"""


def test_an_old_release_racing_the_removal_never_reads_wrong_bytes(old_env, tmp_path):
    """The new release removes the old format (threshold 0 here) again and again while an old
    scanner keeps opening, writing and reading it: no wrong bytes, no crash; the old scanner
    only starts over (its records are gone) whenever the removal found it between two opens."""
    path = str(tmp_path / "caches")
    os.makedirs(path)
    old = subprocess.Popen([sys.executable, "-c", OLD_LOOP, path, "4"], env=old_env, stdout=subprocess.PIPE, text=True,
                           cwd=tmp_path)  # (-c puts the working directory first on sys.path: not this tree)
    removed = tries = 0
    while old.poll() is None:
        removed += len(formats.remove_unused(path, max_age=0))
        tries += 1
        time.sleep(0.002)
    out = json.loads(old.stdout.read())  # type: ignore[union-attr]
    assert old.returncode == 0, out
    assert out["version"] == 6 and out["wrong"] == 0 and out["opens"] > 10 and out["puts"] > 0, out
    assert removed >= 1, f"the removal never found the old format unused in {tries} tries: {out}"
    assert tries > removed  # and it was refused while the old scanner had it open


def test_format_directories_are_removed_only_when_older_unused_and_untouched(tmp_path, popen_holder):
    path = str(tmp_path / "caches")
    for name in ("v3", "v99"):
        os.makedirs(os.path.join(path, name))
        for file in ("data.mdb", "version", "users", "readers"):
            with open(os.path.join(path, name, file), "wb") as f:
                f.write(b"x" * 100)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data.mdb").write_bytes(b"not yours")
    os.symlink(outside, os.path.join(path, "v2"))
    assert formats.older_formats(path) == ["v2", "v3"]
    assert formats.remove_unused(path) == []  # young
    then = time.time() - formats.UNUSED_FORMAT_AGE_S - 600
    for name in ("v3", "v99"):
        for entry in os.listdir(os.path.join(path, name)) + [os.curdir]:
            os.utime(os.path.join(path, name, entry), (then, then))
    v3 = os.path.join(path, "v3")
    for target, what in ((os.path.join(v3, "users"), "a user"), (v3, "a process inside a transaction")):
        holder = popen_holder(target)
        assert formats.remove_unused(path) == [], what
        assert os.path.isfile(os.path.join(v3, "data.mdb")), what
        holder.kill()
        holder.wait()
    assert formats.remove_unused(path) == ["v3"]
    assert sorted(os.listdir(path)) == ["v2", "v99"]  # never a newer format; a symlink is not followed
    assert (outside / "data.mdb").read_bytes() == b"not yours"


def test_a_seed_scanner_directory_is_not_an_older_format(tmp_path):
    """The seed scanner's cache has a ``version`` too: it is not nvcache's and stays."""
    path = tmp_path / "seed"
    (path / "ref").mkdir(parents=True)
    (path / "version").write_text('{"version": 0, "description": "initial implementation"}')
    (path / "cacher.json").write_text("{}")
    age(str(path))
    assert formats.older_formats(str(path)) == [] and formats.remove_unused(str(path)) == []
    assert sorted(os.listdir(path)) == ["cacher.json", "ref", "version"]


def test_a_path_with_only_the_old_layout_has_no_cache_of_this_format(old_env, tmp_path):
    path = str(tmp_path / "caches")
    finish(start(old_env, path, "old", 0))
    assert not has_cache(path)
    note = formats.note_for(path)
    assert note is not None and "pre-directory layout" in note and "3600 s" in note


HOLDER = r"""
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_SH)
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def popen_holder() -> Any:
    """A process holding a shared flock on a file or directory, as a user of a cache does."""
    procs: List[subprocess.Popen] = []

    def hold(target: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, target], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"  # type: ignore[union-attr]
        return proc
    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()
