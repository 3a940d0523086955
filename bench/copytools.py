"""Can ordinary tools copy a cache directory? ``ls -l``, ``du``, ``tar``, ``rsync`` and
``shutil.copytree`` on a cache made by this tree or by an older release.

Each run fills a cache with scanner-shaped records (a child process, so that an older
release can be imported from ``--pythonpath``), then measures what each tool makes of
the directory. Copies go to a small tmpfs (root) or a temporary directory, and every
tool has a time limit: a release whose data.mdb is a 64 GiB sparse file must not fill
the disk or run for minutes.

Run::

    .venv/bin/python bench/copytools.py --json bench/results/session7/copytools-new.json
    git worktree add /tmp/old c1ae00f
    .venv/bin/python bench/copytools.py --pythonpath /tmp/old --label c1ae00f \\
        --json bench/results/session7/copytools-old.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

MiB = 1 << 20

FILL = r"""
import os, sys
os.environ["NVCACHE_NO_EXTENSIONS"] = "1"
import nvcache
path, records, max_mb = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
body = (b'{"Name":"openssl","Version":"1.1.1n-0+deb11u4","Vulnerabilities":[]}' * 40)
with nvcache.LayerCache(path, max_mb) as cache:
    for i in range(records):
        cache.put(f"sha256:{i:064d}", body + str(i).encode())
    print(nvcache.__file__)
    print(cache.stats()["record_total_size"])
"""


def _data_files(root: str) -> List[str]:
    return [os.path.join(d, f) for d, _dirs, files in os.walk(root) for f in files if f == "data.mdb"]


def _sizes(root: str) -> Dict[str, int]:
    apparent = allocated = 0
    for d, _dirs, files in os.walk(root):
        for f in files:
            st = os.lstat(os.path.join(d, f))
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return {"apparent": apparent, "allocated": allocated}


def _timed(argv: List[str], limit: float, stdout: Any = subprocess.DEVNULL) -> Dict[str, Any]:
    t0 = time.monotonic()
    try:
        proc = subprocess.run(argv, stdout=stdout, stderr=subprocess.PIPE, timeout=limit)
        outcome = "ok" if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr.decode()[-200:].strip()}"
    except subprocess.TimeoutExpired:
        outcome = f"stopped after {limit:.0f} s"
    return {"outcome": outcome, "seconds": round(time.monotonic() - t0, 2)}


def _tar(cache: str, limit: float) -> Dict[str, Any]:
    """``tar cf -`` of the directory into a pipe: the archive's bytes, counted."""
    t0 = time.monotonic()
    proc = subprocess.Popen(["tar", "cf", "-", "-C", os.path.dirname(cache), os.path.basename(cache)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    total = 0
    outcome = "ok"
    while True:
        if time.monotonic() - t0 > limit:
            proc.kill()
            outcome = f"stopped after {limit:.0f} s"
            break
        chunk = proc.stdout.read(1 << 20)
        if not chunk:
            break
        total += len(chunk)
    proc.wait()
    return {"outcome": outcome, "seconds": round(time.monotonic() - t0, 2), "archive_bytes": total}


def _copy(tool: str, cache: str, dest_root: str, limit: float) -> Dict[str, Any]:
    dest = os.path.join(dest_root, tool)
    if tool == "rsync":
        result = _timed(["rsync", "-a", cache + "/", dest + "/"], limit)
    elif tool == "cp":
        result = _timed(["cp", "-r", cache, dest], limit)
    else:  # shutil.copytree, in a child so that the time limit can stop it
        code = f"import shutil; shutil.copytree({cache!r}, {dest!r})"
        result = _timed([sys.executable, "-c", code], limit)
    result.update(_sizes(dest) if os.path.exists(dest) else {"apparent": 0, "allocated": 0})
    shutil.rmtree(dest, ignore_errors=True)
    return result


def _tmpfs(size_mb: int) -> Optional[str]:
    """A small tmpfs to copy into (root only): a copy that would fill the disk fills it instead."""
    if os.geteuid() != 0:
        return None
    mnt = tempfile.mkdtemp(prefix="nvcache-copy-")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", mnt],
                      capture_output=True).returncode != 0:
        os.rmdir(mnt)
        return None
    return mnt


def run(records: int, max_mb: float, pythonpath: Optional[str], label: str, limit: float,
        tmpfs_mb: int) -> Dict[str, Any]:
    root = tempfile.mkdtemp(prefix="nvcache-copytools-")
    mnt = None
    try:
        cache = os.path.join(root, "caches")
        env = dict(os.environ)
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        out = subprocess.run([sys.executable, "-c", FILL, cache, str(records), str(max_mb)], env=env, cwd=root,
                             capture_output=True, text=True, check=True)
        result: Dict[str, Any] = {
            "label": label, "records": records, "bound": int(max_mb * MiB),
            "nvcache": out.stdout.strip().splitlines()[-2],
            "record_bytes": int(out.stdout.strip().splitlines()[-1]),
            "data_mdb": [{"path": os.path.relpath(f, cache), "apparent": os.stat(f).st_size,
                          "allocated": os.stat(f).st_blocks * 512} for f in _data_files(cache)],
            "directory": _sizes(cache),
            "du_s": subprocess.run(["du", "-sh", cache], capture_output=True, text=True).stdout.split()[0],
            "tar": _tar(cache, limit),
        }
        mnt = _tmpfs(tmpfs_mb)
        dest_root = mnt or tempfile.mkdtemp(prefix="nvcache-copydest-", dir=root)
        result["copy_target"] = f"tmpfs of {tmpfs_mb} MiB" if mnt else "a temporary directory"
        for tool in ("cp", "rsync", "copytree"):
            if tool == "rsync" and shutil.which("rsync") is None:
                result[tool] = {"outcome": "rsync is not installed"}
                continue
            result[tool] = _copy(tool, cache, dest_root, limit)
        return result
    finally:
        if mnt:
            subprocess.run(["umount", mnt], capture_output=True)
            os.rmdir(mnt)
        shutil.rmtree(root, ignore_errors=True)


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--max-mb", type=float, default=1000, help="the cache's bound (the library's default)")
    ap.add_argument("--pythonpath", default=None, help="import nvcache from here (an older release's tree)")
    ap.add_argument("--label", default="this tree")
    ap.add_argument("--limit", type=float, default=20.0, help="seconds each tool may run")
    ap.add_argument("--tmpfs-mb", type=int, default=1024)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    res = run(args.records, args.max_mb, args.pythonpath, args.label, args.limit, args.tmpfs_mb)
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
