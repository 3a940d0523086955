"""NVCACHE_NO_EXTENSIONS picks the pure-Python core in the package itself."""

import os
import subprocess
import sys

import nvcache
from nvcache import fallback


def _expected_extension() -> bool:
    return os.environ.get("NVCACHE_NO_EXTENSIONS", "") in ("", "0")


def test_package_default_core_follows_the_switch():
    assert nvcache.EXTENSION is _expected_extension()
    assert (nvcache.LayerCache._core is fallback) is (not nvcache.EXTENSION)
    if not nvcache.EXTENSION:
        assert "nvcache._index" not in sys.modules


def test_switch_in_a_fresh_interpreter():
    code = "import nvcache, sys; print(nvcache.EXTENSION, 'nvcache._index' in sys.modules)"
    for value, expected in (("1", "False False"), ("", "True True")):
        env = dict(os.environ, NVCACHE_NO_EXTENSIONS=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             check=True).stdout.strip()
        assert out == expected
