"""Installing without LMDB's header: a warning and the pure-Python core, never a failed install.

A real build through pip (in a temporary directory; build isolation fetches setuptools and
Cython from the package index as any install does). The compiled build itself is what
``make test`` installs before this suite runs (tests/conftest.py fails without it).
"""

import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_no_lmdb_header_installs_the_pure_python_core_with_a_warning(tmp_path):
    env = dict(os.environ, LMDB_INCLUDE_DIR=str(tmp_path / "no-such-prefix" / "include"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(tmp_path / "dist"),
                          ROOT], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "does not hold lmdb.h" in log and "pure-Python core only" in log
    (wheel,) = os.listdir(tmp_path / "dist")
    assert wheel.endswith("-py3-none-any.whl")  # nothing compiled: any platform
    names = zipfile.ZipFile(tmp_path / "dist" / wheel).namelist()
    assert "nvcache/fallback.py" in names and "nvcache/codec.py" in names and "nvcache/scanvocab.txt" in names
    assert not [n for n in names if n.endswith(".so")]
