"""Builds the Cython hot index ``ext/_index.pyx`` into ``nvcache._index``, when it can.

The compiled core reads through LMDB's C API, so it needs LMDB's header and
library. They are looked for in ``LMDB_INCLUDE_DIR`` / ``LMDB_LIB_DIR`` when set,
else through ``pkg-config lmdb``, else in the usual prefixes (/usr, /usr/local,
/opt/homebrew, /opt/local). When they are not found, or the build fails, the
package is installed without the extension and a warning says why: nvcache then
runs on its pure-Python core, ``nvcache/fallback.py`` (the same cache, slower).
Set NVCACHE_NO_EXTENSIONS=1 to skip the build on purpose.
"""

import os
import shutil
import subprocess
import sys
from typing import List, Optional, Tuple

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

PREFIXES = ("/usr", "/usr/local", "/opt/homebrew", "/opt/local")


def warn(message: str) -> None:
    print(f"WARNING: {message}; installing nvcache with its pure-Python core only "
          "(same cache, slower; see README, Install)", file=sys.stderr)


def _pkg_config() -> Optional[Tuple[List[str], List[str]]]:
    if shutil.which("pkg-config") is None:
        return None
    try:
        out = subprocess.run(["pkg-config", "--cflags-only-I", "--libs-only-L", "lmdb"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    flags = out.stdout.split()
    return [f[2:] for f in flags if f.startswith("-I")], [f[2:] for f in flags if f.startswith("-L")]


def lmdb_dirs() -> Optional[Tuple[List[str], List[str]]]:
    """(include dirs, library dirs) where lmdb.h is, or None (a warning said why)."""
    include, lib = os.environ.get("LMDB_INCLUDE_DIR"), os.environ.get("LMDB_LIB_DIR")
    if include or lib:
        if not include or not os.path.isfile(os.path.join(include, "lmdb.h")):
            warn(f"LMDB_INCLUDE_DIR={include!r} does not hold lmdb.h")
            return None
        return [include], [lib] if lib else []
    found = _pkg_config()
    if found is not None and any(os.path.isfile(os.path.join(d, "lmdb.h")) for d in found[0] or ["/usr/include"]):
        return found
    for prefix in PREFIXES:
        if os.path.isfile(os.path.join(prefix, "include", "lmdb.h")):
            return [os.path.join(prefix, "include")], [os.path.join(prefix, "lib")]
    warn("LMDB's header lmdb.h was not found (install liblmdb-dev or lmdb-devel, or set "
         "LMDB_INCLUDE_DIR and LMDB_LIB_DIR)")
    return None


class OptionalBuildExt(build_ext):
    """A compiled core that fails to build is a warning, not a failed install (as PyYAML does)."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # a missing compiler, a failing one: the same pure-Python package
            warn(f"the compiled core could not be built ({exc})")

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            warn(f"the compiled core could not be built ({exc})")


ext_modules = []
if os.environ.get("NVCACHE_NO_EXTENSIONS", "") in ("", "0"):
    dirs = lmdb_dirs()
    if dirs is not None:
        from Cython.Build import cythonize

        ext_modules = cythonize(
            [Extension("nvcache._index", ["ext/_index.pyx"], libraries=["lmdb"], include_dirs=dirs[0],
                       library_dirs=dirs[1], extra_compile_args=["-O2"])],
            compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
        )

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
