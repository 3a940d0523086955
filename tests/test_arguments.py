"""Arguments and configuration: each mistake is a clear exception that names what was wrong.

Over both cores where a cache is opened. (Issue 13, "Smaller things found".)
"""

import logging
import subprocess
import sys

import pytest

import nvcache

MiB = 1024 * 1024


@pytest.mark.parametrize("bad", ["yes", None, 1, 0.0])
def test_durable_is_true_or_false(Cache, cache_dir, bad):
    with pytest.raises(TypeError, match="durable must be True or False"):
        Cache(cache_dir, 1, durable=bad)


def test_keep_of_bytes_names_the_type(make_cache):
    cache = make_cache()
    with pytest.raises(TypeError, match="not bytes"):
        cache.put("sha256:aa", b"r", keep=b"abc")
    with pytest.raises(TypeError, match="not a single string"):
        cache.put("sha256:aa", b"r", keep="sha256:bb")


def test_a_positive_bound_below_one_byte_is_an_error(Cache, cache_dir):
    with pytest.raises(ValueError, match="at least one byte"):
        Cache(cache_dir, 1e-9)
    assert not Cache(cache_dir, 0).enabled  # 0 still disables
    assert Cache(cache_dir, 1 / MiB).max_bytes == 1


def test_lock_timeout_message_is_readable(Cache, cache_dir):
    with pytest.raises(ValueError) as info:
        Cache(cache_dir, 1, lock_timeout=-1)
    assert "between 0 and" in str(info.value) and "e+" not in str(info.value)


@pytest.mark.parametrize("raw", ["1_0", "1e3", "0x10", "inf", "nan", "+5", "5 MB", "1,5"])
def test_max_cache_record_mb_takes_plain_decimals_only(Cache, cache_dir, monkeypatch, raw):
    monkeypatch.setenv("NVCACHE_PATH", cache_dir)
    monkeypatch.setenv("MAX_CACHE_RECORD_MB", raw)
    with pytest.raises(ValueError, match="MAX_CACHE_RECORD_MB must be a plain decimal"):
        Cache.from_env()


@pytest.mark.parametrize("raw, mib", [("10", 10), (" 2.5 ", 2.5), ("0.5", 0.5), (".5", 0.5), ("3.", 3)])
def test_max_cache_record_mb_plain_decimals(Cache, cache_dir, monkeypatch, raw, mib):
    monkeypatch.setenv("NVCACHE_PATH", cache_dir)
    monkeypatch.setenv("MAX_CACHE_RECORD_MB", raw)
    with Cache.from_env() as cache:
        assert cache.max_bytes == int(mib * MiB)


def test_from_env_says_what_it_takes(Cache, cache_dir, monkeypatch):
    monkeypatch.setenv("MAX_CACHE_RECORD_MB", "1")
    for given in ({"max_mb": 5}, {"path": cache_dir}):
        with pytest.raises(TypeError, match="from_env\\(\\) takes the path and the bound from NVCACHE_PATH"):
            Cache.from_env(**given)
    monkeypatch.setenv("NVCACHE_PATH", cache_dir)
    with Cache.from_env(lock_timeout=3, compress=False) as cache:  # the other arguments pass through
        assert cache.lock_timeout == 3 and not cache.compress


def test_from_env_unset_logs_why_the_cache_is_off(Cache, cache_dir, monkeypatch, caplog):
    monkeypatch.setenv("NVCACHE_PATH", cache_dir)
    monkeypatch.delenv("MAX_CACHE_RECORD_MB", raising=False)
    with caplog.at_level(logging.INFO, logger="nvcache"):
        assert not Cache.from_env().enabled
    assert "MAX_CACHE_RECORD_MB is not set: the layer cache is disabled" in caplog.text


def test_a_compiled_core_that_cannot_load_is_a_warning_with_the_reason():
    """A stand-in for a broken build (an import finder that fails ``nvcache._index`` as a missing
    liblmdb would; the real module is not touched): the package warns once, says why, and works."""
    prog = (
        "import importlib.abc, importlib.machinery, logging, sys\n"
        "class Broken(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'nvcache._index':\n"
        "            raise ImportError('liblmdb.so.0: cannot open shared object file')\n"
        "sys.meta_path.insert(0, Broken())\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "import nvcache\n"
        "print('EXTENSION', nvcache.EXTENSION)\n")
    env = {"PATH": "/usr/bin:/bin", "NVCACHE_NO_EXTENSIONS": ""}
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "EXTENSION False"
    assert out.stderr.count("compiled core cannot be loaded") == 1 and "liblmdb.so.0" in out.stderr
    quiet = subprocess.run([sys.executable, "-c", "import nvcache; print(nvcache.EXTENSION)"], capture_output=True,
                           text=True, env=dict(env, NVCACHE_NO_EXTENSIONS="1"), check=True)
    assert quiet.stdout.strip() == "False" and "cannot be loaded" not in quiet.stderr
