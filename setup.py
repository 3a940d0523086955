"""Builds the Cython hot index ``ext/_index.pyx`` into ``nvcache._index``.

Set NVCACHE_NO_EXTENSIONS=1 at build time to skip it (the package then runs
on its pure-Python twin, ``nvcache/fallback.py``).
"""

import os

from setuptools import Extension, setup

ext_modules = []
if os.environ.get("NVCACHE_NO_EXTENSIONS", "") in ("", "0"):
    from Cython.Build import cythonize

    ext_modules = cythonize(
        # liblmdb (Debian: liblmdb-dev): the compiled Reader reads through LMDB's C API.
        [Extension("nvcache._index", ["ext/_index.pyx"], libraries=["lmdb"], extra_compile_args=["-O2"])],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    )

setup(ext_modules=ext_modules)
