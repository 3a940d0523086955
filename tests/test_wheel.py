"""`make wheel`'s manylinux wheel, installed into a fresh venv: the compiled core loads with the
liblmdb the wheel carries, not the system's.

The wheel is built once for this module (``make wheel`` into a temporary wheelhouse, so the
repository's dist/ is left alone) and installed into one venv made without pip, by the running
pip (``--python``): nvcache from the wheel, its dependencies resolved as any user's install
resolves them (pip's cache serves them after the first run), without the ``cli`` extra until the
last test adds it. The only skip is for a package index that cannot be reached (pip fails with
a connection error): then the tools or the dependencies cannot be installed at all. Any other
failure fails.
"""

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import zipfile
from typing import Any, Dict, List

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 280  # under pytest-timeout's 300 s for the test whose setup builds the wheel

# What pip prints when it cannot reach the index (urllib3's exception names, the resolver's):
# only with one of these is a failure a missing network rather than a broken build.
NO_NETWORK = re.compile(r"NewConnectionError|Temporary failure in name resolution|Network is unreachable|"
                        r"ConnectTimeoutError|Max retries exceeded|ProxyError|No route to host")


def _run(cmd: List[str], what: str, **kwargs: Any) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, **kwargs)
    log = out.stdout + out.stderr
    if out.returncode != 0 and NO_NETWORK.search(log):
        pytest.skip(f"{what}: pip cannot reach the package index ({NO_NETWORK.search(log).group(0)})")
    assert out.returncode == 0, f"{what} failed:\n{log[-4000:]}"
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: Any) -> str:
    base = tmp_path_factory.mktemp("wheel")
    _run(["make", "-s", "-C", ROOT, "wheel", f"WHEELHOUSE={base / 'wheelhouse'}", f"WHEEL_RAW={base / 'raw'}"],
         "make wheel")
    (path,) = glob.glob(str(base / "wheelhouse" / "nvcache-*.whl"))
    return path


@pytest.fixture(scope="module")
def venv(wheel: str, tmp_path_factory: Any) -> str:
    path = str(tmp_path_factory.mktemp("venv") / "v")
    _run([sys.executable, "-m", "venv", "--without-pip", path], "python -m venv")
    _run([sys.executable, "-m", "pip", "--python", os.path.join(path, "bin", "python"), "install", "-q",
          "--disable-pip-version-check", wheel], "pip install of the wheel into the fresh venv")
    return path


def _in_venv(venv: str, code: str, cwd: str) -> subprocess.CompletedProcess:
    """Run code in the venv's interpreter, isolated (-I: no PYTHONPATH, no repository on sys.path)."""
    env: Dict[str, str] = {k: v for k, v in os.environ.items() if k != "NVCACHE_NO_EXTENSIONS"}
    return _run([os.path.join(venv, "bin", "python"), "-I", "-c", textwrap.dedent(code)], "the venv's python",
                cwd=cwd, env=env)


def _site_packages(venv: str) -> str:
    (path,) = glob.glob(os.path.join(venv, "lib", "python3*", "site-packages"))
    return path


def test_the_wheel_is_manylinux_carries_liblmdb_and_is_stripped(wheel: str, tmp_path: Any) -> None:
    # manylinux2014 (glibc 2.17): the extension needs no newer glibc symbol (fstat is a syscall)
    assert re.search(r"[-.]manylinux_2_17_\w+\.whl$", wheel), wheel
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (ext,) = [n for n in names if re.fullmatch(r"nvcache/_index\..*\.so", n)]
        (lib,) = [n for n in names if re.fullmatch(r"nvcache\.libs/liblmdb-[0-9a-f]+\.so[.0-9]*", n)]
        zf.extract(ext, tmp_path)
        zf.extract(lib, tmp_path)
    for member in (ext, lib):
        sections = subprocess.run(["readelf", "-S", "-W", str(tmp_path / member)], capture_output=True, text=True,
                                  check=True).stdout
        assert ".text" in sections  # the listing is real, so the absences below mean something
        assert ".symtab" not in sections and ".debug_info" not in sections, f"{member} is not stripped"
    dynamic = subprocess.run(["readelf", "-d", "-W", str(tmp_path / ext)], capture_output=True, text=True,
                             check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
    assert os.path.basename(lib) in needed and "liblmdb.so.0" not in needed, needed
    assert "$ORIGIN/../nvcache.libs" in dynamic  # RUNPATH: found beside the package, wherever installed


def test_the_installed_core_is_compiled_and_loads_the_bundled_liblmdb(venv: str, tmp_path: Any) -> None:
    site = _site_packages(venv)
    out = _in_venv(venv, """
        import nvcache
        print(nvcache.EXTENSION, nvcache.LayerCache._core.__name__, nvcache.__file__)
        for line in open("/proc/self/maps"):
            if "/liblmdb" in line:
                print("mapped", line.split()[-1])
        """, str(tmp_path))
    first, *mapped = out.stdout.splitlines()
    extension, core, init = first.split()
    assert (extension, core) == ("True", "nvcache._index"), out.stdout + out.stderr
    assert init == os.path.join(site, "nvcache", "__init__.py")  # the wheel's copy, not the repository's
    assert "compiled core cannot be loaded" not in out.stderr
    libs = os.path.join(site, "nvcache.libs") + os.sep
    assert mapped and all(m.split()[1].startswith(libs) for m in mapped), mapped  # no system liblmdb in memory

    (so,) = glob.glob(os.path.join(site, "nvcache", "_index*.so"))
    ldd = subprocess.run(["ldd", so], capture_output=True, text=True, check=True).stdout
    lmdb_lines = [line.strip() for line in ldd.splitlines() if "liblmdb" in line]
    assert len(lmdb_lines) == 1, ldd
    name, arrow, resolved = lmdb_lines[0].split()[:3]
    assert arrow == "=>" and re.fullmatch(r"liblmdb-[0-9a-f]+\.so[.0-9]*", name), ldd
    assert os.path.realpath(resolved).startswith(libs), ldd


def test_the_installed_core_runs_where_the_system_has_no_liblmdb(venv: str, tmp_path: Any) -> None:
    """The system's liblmdb made unloadable (/dev/null bound over it, in a private mount namespace
    of this one command: nothing outside sees it), the wheel's compiled core still loads and works."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare (util-linux) to hide the system's liblmdb with")
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    listing = subprocess.run([ldconfig, "-p"], capture_output=True, text=True).stdout
    system = sorted({os.path.realpath(p) for p in re.findall(r"liblmdb\.so\S* \(.*\) => (\S+)", listing)})
    cache = str(tmp_path / "caches")
    code = textwrap.dedent(f"""
        import ctypes
        print("started", flush=True)
        for path in {system!r}:
            try:
                ctypes.CDLL(path)
            except OSError:
                pass
            else:
                raise SystemExit(path + " still loads: it is not hidden")
        import nvcache
        with nvcache.LayerCache({cache!r}, 1) as cache:
            print(nvcache.EXTENSION, cache.put("sha256:" + "ab" * 32, b"record"), cache.get("sha256:" + "ab" * 32))
        """)
    hide = "".join(f"mount --bind /dev/null {shlex.quote(path)} && " for path in system)
    userns = [] if os.geteuid() == 0 else ["--map-root-user"]  # unprivileged: a user namespace allows the mount
    env = {k: v for k, v in os.environ.items() if k != "NVCACHE_NO_EXTENSIONS"}
    out = subprocess.run(["unshare", "--mount", *userns, "sh", "-c", hide + 'exec "$0" -I -c "$1"',
                          os.path.join(venv, "bin", "python"), code], capture_output=True, text=True, cwd=str(tmp_path),
                         env=env, timeout=TIMEOUT)
    if "started" not in out.stdout and re.search(r"^(unshare|mount): ", out.stderr, re.M):
        pytest.skip(f"cannot hide the system's liblmdb here: {out.stderr.strip()}")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.split()[1:] == ["True", "True", "b'record'"], out.stdout + out.stderr


CLI_DEPENDENCIES = ("click", "prettytable", "prometheus_client", "tqdm")


def test_a_put_and_get_round_trip_in_the_fresh_venv(venv: str, tmp_path: Any) -> None:
    cache = str(tmp_path / "caches")
    put = _in_venv(venv, f"""
        import importlib.util
        import nvcache
        assert nvcache.EXTENSION
        # installed without [cli]: the library works without the command's dependencies
        assert not [m for m in {CLI_DEPENDENCIES!r} if importlib.util.find_spec(m)], "CLI deps installed"
        with nvcache.LayerCache({cache!r}, 1) as cache:
            print(cache.put("sha256:" + "ab" * 32, b"layer record " * 100, keep=()), cache.stats()["record_count"])
        """, str(tmp_path))
    assert put.stdout.split() == ["True", "1"], put.stdout + put.stderr
    get = _in_venv(venv, f"""
        import nvcache
        with nvcache.LayerCache({cache!r}, 1) as cache:  # another process: the record is in the file
            print(cache.get("sha256:" + "ab" * 32) == b"layer record " * 100, cache.get("sha256:" + "cd" * 32),
                  cache.stats()["cache_hits"], cache.stats()["cache_misses"], cache.verify())
        """, str(tmp_path))
    assert get.stdout.split() == ["True", "None", "1", "1", "[]"], get.stdout + get.stderr


def test_the_cli_extra_adds_a_working_command(venv: str, wheel: str, tmp_path: Any) -> None:
    cache = str(tmp_path / "caches")
    _in_venv(venv, f"""
        import nvcache
        with nvcache.LayerCache({cache!r}, 1) as cache:
            assert cache.put("sha256:" + "ef" * 32, b"record")
        """, str(tmp_path))
    bare = subprocess.run([os.path.join(venv, "bin", "nvcache"), "--path", cache, "stat"], capture_output=True,
                          text=True, cwd=str(tmp_path))  # without the extra: one line says what to install
    assert bare.returncode == 1 and "pip install 'nvcache[cli]'" in bare.stderr, bare.stderr
    assert "Traceback" not in bare.stderr
    _run([sys.executable, "-m", "pip", "--python", os.path.join(venv, "bin", "python"), "install", "-q",
          "--disable-pip-version-check", wheel + "[cli]"], "pip install of the wheel's [cli] extra")
    env = dict(os.environ, MAX_CACHE_RECORD_MB="1")
    out = _run([os.path.join(venv, "bin", "nvcache"), "--path", cache, "stat", "--json"], "the venv's nvcache stat",
               cwd=str(tmp_path), env=env)
    assert json.loads(out.stdout)["record_count"] == 1, out.stdout + out.stderr
