"""What a page costs the first time a process touches it through a shared file mapping.

LMDB's write map turns a commit into stores into the mapping, and each page a
process writes for the first time since it mapped the file (or since writeback
cleaned it) is a page fault. This measures, per 4 KiB page of a file in the page
cache: a write fault on a fresh mapping, a read fault (pages 32 apart, so that
the kernel's fault-around, which maps up to 16 cached neighbours of a read
fault, does not spare the next one), a write after a read, a write to a page
already dirty and mapped, and a ``pwrite`` of a clean page instead.

Run::

    .venv/bin/python bench/faults.py                 # 20,000 pages in the system temp dir
    .venv/bin/python bench/faults.py --dir /tmp/images --pages 50000

The Python loop adds about 0.05 µs per page to every row.
"""

from __future__ import annotations

import argparse
import mmap
import os
import tempfile
import time

PAGE = mmap.PAGESIZE


def per_page(fn, pages: range) -> float:
    t0 = time.perf_counter_ns()
    for i in pages:
        fn(i)
    return (time.perf_counter_ns() - t0) / len(pages) / 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--pages", type=int, default=20_000)
    args = ap.parse_args()
    n = args.pages
    block = b"\1" * PAGE
    fd, path = tempfile.mkstemp(dir=args.dir, prefix="nvcache-faults-")
    try:
        for i in range(n):  # in the page cache, with blocks on disk, before anything is mapped
            os.pwrite(fd, block, i * PAGE)
        os.fsync(fd)
        mm = mmap.mmap(fd, n * PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        even, apart = range(0, n, 2), range(1, n, 32)

        def store(i: int) -> None:
            mm[i * PAGE] = 2

        def load(i: int) -> None:
            mm[i * PAGE]

        rows = [
            ("write, fresh mapping (write fault)", per_page(store, even)),
            ("read, fresh mapping (read fault)", per_page(load, apart)),
            ("write after a read (write-protect fault)", per_page(store, apart)),
            ("write, page already dirty and mapped", per_page(store, even)),
        ]
        os.fsync(fd)  # every page clean again, as a commit finds the pages it writes
        rows.append(("pwrite of a clean page instead", per_page(lambda i: os.pwrite(fd, block, i * PAGE), even)))
        mm.close()
        for label, us in rows:
            print(f"{label:<44} {us:7.3f} µs/page")
    finally:
        os.close(fd)
        os.unlink(path)


if __name__ == "__main__":
    main()
