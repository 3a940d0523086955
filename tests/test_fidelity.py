"""bench/fidelity.py's core on tiny traces: at one process nvcache's LRU is exact LRU.

One process applies its own buffered references in every put that evicts, before the victims
are chosen, so nothing is pending from anyone else: every request must hit or miss exactly as
in the bench's reference (exact LRU over the logged gets and puts, stored sizes, keep), and
both must evict the same number of records. The spawned worker picks the same core as this
process (``NVCACHE_NO_EXTENSIONS`` is inherited), so ``make test``'s two runs cover both.
"""

import os
import random
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import fidelity  # noqa: E402
from nvcache import simulate  # noqa: E402


def _agree(trace: "fidelity.Trace") -> dict:
    run = fidelity.run_nvcache(trace, 1, fixed_us=20.0, us_per_kib=2.0, timeout=60.0)
    ref = fidelity.reference(run["logs"], trace.scans, run["max_bytes"], run["final_size"])
    (log,) = run["logs"]
    ours = [rec[4] for rec in log]
    assert len(log) == trace.requests
    assert ours == list(ref["hits"][0])  # request by request
    assert ref["only_ref_miss"] == ref["only_ref_hit"] == 0
    assert run["evictions"] == ref["evictions"] > 0  # the bound was reached: the order mattered
    assert run["errors"] == run["wrong"] == 0
    assert run["stats"]["cache_hits"] == sum(ours)  # the cache's own counters saw the same
    present = run["present"]  # every record left has the stored size its put logged
    assert present and all(fidelity.STORED in [r[8] for r in log if trace.layer_ids[r[1]] == lid]
                           for lid in present)
    return run


@pytest.mark.timeout(60)
def test_one_process_is_exact_lru_on_images_with_keep() -> None:
    trace = fidelity.demo_trace(scans=40, max_mb=0.04, name="tiny")
    run = _agree(trace)
    assert 0 < sum(rec[4] for rec in run["logs"][0]) < trace.requests


@pytest.mark.timeout(60)
def test_one_process_is_exact_lru_on_uniform_churn() -> None:
    _agree(fidelity.churn_trace(requests=300, keys=100, max_mb=0.02))


def test_exact_lru_without_keep_is_simulates_lru_model() -> None:
    """The reference's LRU, with records entering at the miss and no keep, is simulate.lru_byte_hits."""
    rng = random.Random(3)
    sizes = [rng.randint(1, 300) for _ in range(50)]
    trace = [rng.randrange(50) for _ in range(3000)]
    for capacity in (200, 1000, 5000):
        lru, hit = fidelity.ExactLRU(capacity), 0
        for obj in trace:
            if lru.get(obj):
                hit += sizes[obj]
            else:
                lru.put(obj, sizes[obj])
        assert hit == simulate.lru_byte_hits(trace, sizes, capacity)


def test_keep_and_full() -> None:
    lru = fidelity.ExactLRU(10)
    assert lru.put(1, 4) == lru.put(2, 4) == fidelity.STORED
    assert lru.put(3, 4, keep=(1, 2)) == fidelity.FULL  # only kept records could make room
    assert lru.put(3, 4, keep=(1,)) == fidelity.STORED and list(lru.lru) == [1, 3]  # 2 evicted, 1 kept
    assert lru.put(3, 1) == fidelity.PRESENT and lru.put(4, 11) == fidelity.TOO_LARGE
