"""Fixtures for the pytest-benchmark microbenchmarks in bench/ (independent of tests/conftest.py).

``stores(name)`` returns a populated, full store of one peer (see compare.py's
adapters), created once per session in a temporary directory: ``BENCH_RECORDS``
records (default 10,000) of ``BENCH_RECORD_SIZE`` bytes (default 2048).

Run::

    make bench                                   # pytest bench --benchmark-only ...
    .venv/bin/python -m pytest bench --benchmark-disable -q     # each benchmark once: a smoke test
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Dict, Iterator, List

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import compare  # noqa: E402

N_RECORDS = int(os.environ.get("BENCH_RECORDS", "10000"))
RECORD_SIZE = int(os.environ.get("BENCH_RECORD_SIZE", "2048"))


@pytest.fixture(scope="session")
def n_records() -> int:
    return N_RECORDS


@pytest.fixture(scope="session")
def record_data() -> List[bytes]:
    return compare.payloads(RECORD_SIZE)


@pytest.fixture(scope="session")
def stores(tmp_path_factory: Any, record_data: List[bytes]) -> Iterator[Callable[[str], Any]]:
    """``stores(peer_name)``: that peer's store with N records, exactly full (the next put evicts)."""
    opened: Dict[str, Any] = {}
    root = tmp_path_factory.mktemp("bench-stores")

    def get(name: str) -> Any:
        peer = opened.get(name)
        if peer is None:
            peer = compare.make_peer(name, str(root / name))
            peer.create(N_RECORDS * RECORD_SIZE if isinstance(peer, compare.NvPeer) else 1 << 50)
            peer.populate((compare.layer_id(i), record_data[i % len(record_data)]) for i in range(N_RECORDS))
            peer.settle()
            count = peer.count()
            assert count in (-1, N_RECORDS), f"{name}: {count} records after populating {N_RECORDS}"
            peer.make_full()
            opened[name] = peer
        return peer

    yield get
    for peer in opened.values():
        peer.close()
