"""Shared fixtures: every test that takes ``core`` runs over both hot indexes.

``core`` is the module (compiled ``nvcache._index`` or ``nvcache.fallback``);
``Cache`` is a LayerCache subclass bound to it; ``make_cache`` opens caches
in a fresh directory and closes them after the test. Subprocess helpers get
``core_env``: the environment that makes a child pick the same core.
"""

import os
import sys
from typing import Any, Callable, Dict, Iterator, List

import pytest

import nvcache
from nvcache import fallback

CORES = ["ext", "py"]


@pytest.fixture(params=CORES)
def core(request: Any) -> Any:
    if request.param == "py":
        return fallback
    try:  # imported here, not at collection: the NVCACHE_NO_EXTENSIONS run must not load it
        from nvcache import _index
    except ImportError:  # a missing build is a failure, never a silent skip
        pytest.fail("the compiled core nvcache._index is not built (pip install -e . builds it)")
    return _index


@pytest.fixture
def Cache(core: Any) -> type:
    return type(f"LayerCache_{core.__name__.rsplit('.', 1)[-1]}", (nvcache.LayerCache,), {"_core": core})


@pytest.fixture
def core_env(core: Any) -> Dict[str, str]:
    env = dict(os.environ)
    env["NVCACHE_NO_EXTENSIONS"] = "1" if core is fallback else ""
    env["PYTHONPATH"] = os.pathsep.join(p for p in [os.getcwd()] + sys.path if p)
    return env


@pytest.fixture
def cache_dir(tmp_path: Any) -> str:
    return str(tmp_path / "caches")


@pytest.fixture
def make_cache(Cache: type, cache_dir: str) -> Iterator[Callable[..., Any]]:
    opened: List[Any] = []

    def make(max_mb: float = 1.0, path: str = "", **kwargs: Any) -> Any:
        cache = Cache(path or cache_dir, max_mb, **kwargs)
        opened.append(cache)
        return cache

    yield make
    for cache in opened:
        cache.close()


# -- real Redis servers of the suite's own (tests/redisservers.py), shared by the remote tier's tests --
@pytest.fixture(scope="module")
def server() -> Iterator[Any]:
    """A redis-server for the module (standalone: loopback port and unix socket)."""
    import redisservers as rs
    rs.require_binaries()
    s = rs.RedisServer().start()
    yield s
    s.cleanup()


@pytest.fixture
def fresh() -> Iterator[Any]:
    """A redis-server of this test's own, to kill, stop or fill."""
    import redisservers as rs
    rs.require_binaries()
    s = rs.RedisServer().start()
    yield s
    s.cleanup()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """Three cluster masters on loopback for the module."""
    import redisservers as rs
    rs.require_binaries()
    c = rs.RedisCluster3().start()
    yield c
    c.cleanup()
