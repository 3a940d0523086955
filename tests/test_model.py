"""A hypothesis state machine: nvcache against a plain in-memory model of each policy.

The model is the specification in a few lines: records keyed by name, a
bound on their total size, victims taken lowest rank first (ties by name),
never the new record nor a kept layer; hits, misses and reference counts
counted exactly. LRU's rank is the order of last references; LRFU's is
computed here from its definition on the request clock (hits + misses),
with a ghost table of evicted ranks by slot. Every step compares the real
cache's stats and full dump (in eviction order) with the model, over both
cores and both policies.
"""

import math
import shutil
import tempfile
from typing import Dict, List, Optional, Tuple

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

import nvcache
from nvcache import CacheFull, RecordTooLarge
from nvcache.codec import stored_sizes
from nvcache.names import record_key
from payloads import incompressible

BOUND = 1000
IDS = [f"sha256:{i:02d}" for i in range(8)]
KINDS = ["layer_file", "secrets"]
H, CAP, SLOTS, WINDOW = 10_000, 3, 1 << 16, 8  # LRFU's half-life (requests), log2 cap, ghost slots and window


def lrfu(rank: int, n: int, clock: int) -> int:
    """LRFU's rank after n references at request ``clock``: clock + H log2 CRF, log2 CRF <= CAP,
    CRF = n + the old CRF decayed by 2 ** ((rank - clock) / H)."""
    x = (rank - clock) / H
    return clock + math.floor(min(CAP * H, H * math.log2(n + (2.0 ** x if x >= -64 else 0.0))))


def slot(i: str, kind: str) -> int:
    return int.from_bytes(record_key(i, kind)[:4], "big") % SLOTS


class Rec:
    def __init__(self, data: bytes, seq: int) -> None:
        self.data = data
        # What the cache charges: the zstd frame when it is smaller (the model's caches stay far
        # below codec.TRAIN_AT records, so no dictionary is ever trained here).
        self.size = stored_sizes([data])[0]
        self.refs = 0
        self.seq = seq  # LRU's rank; LRFU's is ``rank``
        self.rank = 0


class CacheMachine(RuleBasedStateMachine):
    core = None  # set per core by the test below
    policy = "lru"

    @initialize()
    def open_cache(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="nvcache-model-")
        self.Cache = type("C", (nvcache.LayerCache,), {"_core": self.core})
        self.cache = self.Cache(self.dir, BOUND / (1024 * 1024), policy=self.policy)
        assert self.cache.max_bytes == BOUND and self.cache.policy == self.policy
        self.records: Dict[str, Rec] = {}
        # LRFU: slot -> (name, rank, evictions counted with it) of an evicted record
        self.ghosts: Dict[int, Tuple[str, int, int]] = {}
        self.hits = self.misses = self.evictions = 0
        self.seq = 0

    def teardown(self) -> None:
        if hasattr(self, "cache"):
            self.cache.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _tick(self) -> int:
        self.seq += 1
        return self.seq

    def _order(self) -> List[str]:
        if self.policy == "lrfu":
            return sorted(self.records, key=lambda n: (self.records[n].rank, n))
        return sorted(self.records, key=lambda n: (self.records[n].seq, n))

    @property
    def clock(self) -> int:
        return self.hits + self.misses

    # -- operations ---------------------------------------------------------
    @rule(i=st.sampled_from(IDS), kind=st.sampled_from(KINDS), size=st.integers(0, 450),
          keep=st.sets(st.sampled_from(IDS), max_size=4))
    def put(self, i: str, kind: str, size: int, keep: set) -> None:
        name = f"{i}_{kind}"
        # Half compressible (a repeat of the name), half not: the bound counts stored bytes.
        data = (name.encode() * (size // len(name) + 1))[:size] if size % 2 else incompressible(size, name)
        expected: Optional[bool]
        victims: List[str] = []
        if name in self.records:
            expected = False
        else:
            over = sum(r.size for r in self.records.values()) + stored_sizes([data])[0] - BOUND
            freed = 0
            for victim in self._order():
                if freed >= over:
                    break
                if victim.split("_", 1)[0] in keep:  # ids have no "_": the rest is the kind
                    continue
                victims.append(victim)
                freed += self.records[victim].size
            expected = True if freed >= over else None
        try:
            got = self.cache.put(i, data, kind=kind, keep=keep)
        except CacheFull:
            got = None
        assert got is expected
        if expected:
            ghost = self.ghosts.get(slot(i, kind))
            if ghost is not None and ghost[0] == name:
                del self.ghosts[slot(i, kind)]  # taken back before the victims leave theirs
                if self.evictions - ghost[2] > WINDOW * max(1, len(self.records)):
                    ghost = None  # too many evictions since: forgotten
            else:
                ghost = None
            for victim in victims:
                self.evictions += 1
                self.ghosts[slot(*victim.split("_", 1))] = (victim, self.records.pop(victim).rank, self.evictions)
            rec = self.records[name] = Rec(data, self._tick())
            rec.rank = self.clock if ghost is None else lrfu(ghost[1], 1, self.clock)

    @rule(i=st.sampled_from(IDS), kind=st.sampled_from(KINDS))
    def get(self, i: str, kind: str) -> None:
        name = f"{i}_{kind}"
        got = self.cache.get(i, kind=kind)
        rec = self.records.get(name)
        if rec is None:
            assert got is None
            self.misses += 1
        else:
            assert got == rec.data
            rec.refs += 1
            rec.seq = self._tick()
            self.hits += 1
            rec.rank = lrfu(rec.rank, 1, self.clock)  # applied before the next step (cache_data flushes)

    @rule(i=st.sampled_from(IDS), kind=st.sampled_from(KINDS))
    def delete(self, i: str, kind: str) -> None:
        name = f"{i}_{kind}"
        assert self.cache.delete(i, kind=kind) is (name in self.records)
        self.records.pop(name, None)

    @rule(i=st.sampled_from(IDS), kind=st.sampled_from(KINDS))
    def contains(self, i: str, kind: str) -> None:
        assert self.cache.contains(i, kind=kind) is (f"{i}_{kind}" in self.records)

    @rule(size=st.integers(BOUND + 1, BOUND + 50))
    def too_large(self, size: int) -> None:
        with pytest.raises(RecordTooLarge):
            self.cache.put(IDS[0], incompressible(size, "x"), kind="secrets")

    @rule()
    def reopen(self) -> None:
        self.cache.close()
        self.cache = self.Cache(self.dir, BOUND / (1024 * 1024))

    @rule()
    def clear(self) -> None:
        self.cache.clear()
        self.records.clear()
        self.ghosts.clear()

    # -- the cache always matches the model ----------------------------------------
    @invariant()
    def matches_model(self) -> None:
        if not hasattr(self, "cache"):
            return
        assert len(self.cache) == len(self.records)
        data = self.cache.cache_data()
        assert data["cache_hits"] == self.hits and data["cache_misses"] == self.misses
        total = sum(r.size for r in self.records.values())
        assert data["record_total_size"] == total <= BOUND
        got = [(r["layer_id"], r["size"], r["reference_count"]) for r in data["cache_records"]]
        want = [(n, self.records[n].size, self.records[n].refs) for n in self._order()]
        assert got == want
        assert self.cache.evictions() == self.evictions
        assert self.cache.stats() == {"cache_hits": self.hits, "cache_misses": self.misses,
                                      "record_count": len(self.records), "record_total_size": total}


@pytest.mark.parametrize("policy", nvcache.POLICIES)
def test_cache_matches_the_policy_model(core, policy):
    machine = type("Machine", (CacheMachine,), {"core": core, "policy": policy})
    run_state_machine_as_test(machine, settings=settings(max_examples=60, stateful_step_count=40,
                                                         deadline=None))


@pytest.mark.parametrize("policy", nvcache.POLICIES)
def test_model_runs_verify_clean(core, tmp_path, policy):
    """A longer random walk over many ids, then the full consistency check."""
    import random
    rng = random.Random(7)
    Cache = type("C", (nvcache.LayerCache,), {"_core": core})
    with Cache(str(tmp_path / "c"), 20000 / (1024 * 1024), policy=policy) as cache:
        for step in range(3000):
            i = f"sha256:{rng.randrange(300)}"
            op = rng.random()
            if op < 0.5:
                cache.get(i)
            elif op < 0.9:
                try:
                    cache.put(i, bytes(rng.randrange(256) for _ in range(rng.randrange(400))),
                              keep=[f"sha256:{rng.randrange(300)}" for _ in range(3)])
                except CacheFull:
                    pass
            else:
                cache.delete(i)
            if step % 500 == 0:
                assert cache.verify() == []
        assert cache.verify() == []
        assert cache.stats()["record_total_size"] <= 20000
